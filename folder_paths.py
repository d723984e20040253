"""Where models, inputs, outputs, temp files and user data live.

This module's functions and module-level state are ComfyUI's public interface: custom node packs call
`folder_paths.get_filename_list("loras")`, `get_full_path(...)`, `get_save_image_path(...)` and read
`folder_names_and_paths` directly, so the state stays at module level. `configure(args)` (called by
main.py, and by tests) sets it from the command line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import yaml

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# Model folder keys and their default sub-folders under models/ (several folders per key where ComfyUI
# accepts old names too).
_MODEL_FOLDERS: dict[str, tuple[list[str], set[str]]] = {
    "checkpoints": (["checkpoints"], supported_pt_extensions),
    "configs": (["configs"], {".yaml"}),
    "loras": (["loras"], supported_pt_extensions),
    "vae": (["vae"], supported_pt_extensions),
    "text_encoders": (["text_encoders", "clip"], supported_pt_extensions),
    "diffusion_models": (["unet", "diffusion_models"], supported_pt_extensions),
    "clip_vision": (["clip_vision"], supported_pt_extensions),
    "style_models": (["style_models"], supported_pt_extensions),
    "embeddings": (["embeddings"], supported_pt_extensions),
    "diffusers": (["diffusers"], {"folder"}),
    "vae_approx": (["vae_approx"], supported_pt_extensions),
    "controlnet": (["controlnet", "t2i_adapter"], supported_pt_extensions),
    "gligen": (["gligen"], supported_pt_extensions),
    "upscale_models": (["upscale_models"], supported_pt_extensions),
    "latent_upscale_models": (["latent_upscale_models"], supported_pt_extensions),
    "hypernetworks": (["hypernetworks"], supported_pt_extensions),
    "photomaker": (["photomaker"], supported_pt_extensions),
    "classifiers": (["classifiers"], {""}),
    "model_patches": (["model_patches"], supported_pt_extensions),
    "audio_encoders": (["audio_encoders"], supported_pt_extensions),
    "tokenizers": (["tokenizers"], {"folder"}),
}

_LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

base_path: str = os.path.dirname(os.path.realpath(__file__))
models_dir: str = os.path.join(base_path, "models")
output_directory: str = os.path.join(base_path, "output")
temp_directory: str = os.path.join(base_path, "temp")
input_directory: str = os.path.join(base_path, "input")
user_directory: str = os.path.join(base_path, "user")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
filename_list_cache: dict[str, tuple[list[str], dict[str, float], float]] = {}


def _reset_model_folders() -> None:
    folder_names_and_paths.clear()
    for key, (subdirs, exts) in _MODEL_FOLDERS.items():
        folder_names_and_paths[key] = ([os.path.join(models_dir, d) for d in subdirs], set(exts))
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())
    filename_list_cache.clear()


def set_base_path(path: str) -> None:
    """Re-root models/, input/, output/, temp/, user/ and custom_nodes/ under `path`."""
    global base_path, models_dir, output_directory, temp_directory, input_directory, user_directory
    base_path = os.path.abspath(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    user_directory = os.path.join(base_path, "user")
    _reset_model_folders()


_reset_model_folders()


def map_legacy(folder_name: str) -> str:
    return _LEGACY_NAMES.get(folder_name, folder_name)


def set_output_directory(path: str) -> None:
    global output_directory
    output_directory = os.path.abspath(path)


def set_temp_directory(path: str) -> None:
    global temp_directory
    temp_directory = os.path.abspath(path)


def set_input_directory(path: str) -> None:
    global input_directory
    input_directory = os.path.abspath(path)


def set_user_directory(path: str) -> None:
    global user_directory
    user_directory = os.path.abspath(path)


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": output_directory, "temp": temp_directory, "input": input_directory}.get(type_name)


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """Split ComfyUI's `name [output]` / `[input]` / `[temp]` suffix off a file name."""
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base_dir, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([], set())
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)
    filename_list_cache.pop(folder_name, None)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def recursive_search(directory: str, excluded_dir_names: Iterable[str] | None = None
                     ) -> tuple[list[str], dict[str, float]]:
    """Relative paths of all files under `directory` (with '/' separators) and the folders' mtimes."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or ()) | {".git"}
    files: list[str] = []
    dirs: dict[str, float] = {directory: os.path.getmtime(directory)}
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        for f in filenames:
            files.append(os.path.relpath(os.path.join(dirpath, f), directory).replace(os.sep, "/"))
        for d in subdirs:
            full = os.path.join(dirpath, d)
            try:
                dirs[full] = os.path.getmtime(full)
            except OSError:
                continue
    return files, dirs


def filter_files_extensions(files: Iterable[str], extensions: Iterable[str]) -> list[str]:
    exts = set(extensions)
    return sorted(f for f in files if not exts or os.path.splitext(f)[1].lower() in exts or "" in exts)


def _safe_join(root: str, relative: str) -> str | None:
    full = os.path.realpath(os.path.join(root, relative))
    root_real = os.path.realpath(root)
    if os.path.commonpath([full, root_real]) != root_real:
        return None
    return full


def get_full_path(folder_name: str, filename: str) -> str | None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root in folder_names_and_paths[folder_name][0]:
        full = _safe_join(root, filename)
        if full is not None and os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        where = ", ".join(get_folder_paths(folder_name)) if map_legacy(folder_name) in folder_names_and_paths \
            else "(unknown folder)"
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found. "
                                f"Put it in one of: {where}")
    return full


def _filename_list_uncached(folder_name: str) -> tuple[list[str], dict[str, float], float]:
    folder_name = map_legacy(folder_name)
    paths, exts = folder_names_and_paths[folder_name]
    out: set[str] = set()
    dirs: dict[str, float] = {}
    for root in paths:
        files, folders = recursive_search(root, excluded_dir_names=[".git"])
        out.update(filter_files_extensions(files, exts))
        dirs.update(folders)
    return sorted(out), dirs, time.perf_counter()


def _cache_valid(folder_name: str) -> bool:
    cached = filename_list_cache.get(folder_name)
    if cached is None:
        return False
    _, dirs, _ = cached
    for d, mtime in dirs.items():
        try:
            if os.path.getmtime(d) != mtime:
                return False
        except OSError:
            return False
    for root in folder_names_and_paths[folder_name][0]:
        if os.path.isdir(root) and root not in dirs:
            return False
    return True


def get_filename_list(folder_name: str) -> list[str]:
    folder_name = map_legacy(folder_name)
    if not _cache_valid(folder_name):
        filename_list_cache[folder_name] = _filename_list_uncached(folder_name)
    return list(filename_list_cache[folder_name][0])


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
                        ) -> tuple[str, str, int, str, str]:
    """Resolve a SaveImage prefix into (folder, filename, next counter, subfolder, prefix).

    `%width%`, `%height%`, `%year%` ... in the prefix are replaced; a prefix may contain a sub-folder
    but never leave `output_dir`.
    """
    def expand(text: str) -> str:
        if "%" not in text:
            return text
        now = time.localtime()
        repl = {"%width%": str(image_width), "%height%": str(image_height), "%year%": str(now.tm_year),
                "%month%": f"{now.tm_mon:02d}", "%day%": f"{now.tm_mday:02d}", "%hour%": f"{now.tm_hour:02d}",
                "%minute%": f"{now.tm_min:02d}", "%second%": f"{now.tm_sec:02d}"}
        for k, v in repl.items():
            text = text.replace(k, v)
        return text

    filename_prefix = expand(filename_prefix)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((os.path.abspath(output_dir), os.path.abspath(full_output_folder))) != \
            os.path.abspath(output_dir):
        raise ValueError(f"Saving outside the output folder is not allowed: prefix '{filename_prefix}' "
                         f"resolves to {os.path.abspath(full_output_folder)}")
    counter = 1
    try:
        taken = []
        for f in os.listdir(full_output_folder):
            stem = os.path.splitext(f)[0]
            if stem.startswith(filename + "_"):
                digits = stem[len(filename) + 1:].split("_")[0]
                if digits.isdigit():
                    taken.append(int(digits))
        counter = max(taken, default=0) + 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
    return full_output_folder, filename, counter, subfolder, filename_prefix


def get_input_subfolders() -> list[str]:
    root = get_input_directory()
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            out.append(os.path.relpath(os.path.join(dirpath, d), root).replace(os.sep, "/"))
    return sorted(out)


def load_extra_path_config(yaml_path: str) -> None:
    """Read an extra_model_paths.yaml: sections with base_path, is_default and `key: path(s)`."""
    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    for section_name, section in config.items():
        if not isinstance(section, dict):
            continue
        section = dict(section)
        base = section.pop("base_path", None)
        if base:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.abspath(os.path.join(yaml_dir, base))
        is_default = bool(section.pop("is_default", False))
        for key, value in section.items():
            if value is None:
                continue
            for line in str(value).split("\n"):
                line = line.strip()
                if not line:
                    continue
                full = os.path.join(base, line) if base else line
                full = os.path.expandvars(os.path.expanduser(full))
                if not os.path.isabs(full):
                    full = os.path.abspath(os.path.join(yaml_dir, full))
                logging.info("Adding extra search path %s %s (from %s)", key, full, section_name)
                add_model_folder_path(key, full, is_default=is_default)


def configure(args) -> None:
    """Apply the directory flags of `args` (a comfy.cli_args namespace)."""
    if getattr(args, "base_directory", None):
        set_base_path(args.base_directory)
    if getattr(args, "output_directory", None):
        set_output_directory(args.output_directory)
    if getattr(args, "input_directory", None):
        set_input_directory(args.input_directory)
    if getattr(args, "temp_directory", None):
        set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
    if getattr(args, "user_directory", None):
        set_user_directory(args.user_directory)
    default_yaml = os.path.join(os.path.dirname(os.path.realpath(__file__)), "extra_model_paths.yaml")
    if os.path.isfile(default_yaml):
        load_extra_path_config(default_yaml)
    for group in getattr(args, "extra_model_paths_config", None) or []:
        for path in group:
            load_extra_path_config(path)


def create_directories() -> None:
    for d in (output_directory, input_directory, user_directory, models_dir):
        os.makedirs(d, exist_ok=True)
    for paths, _ in folder_names_and_paths.values():
        if paths and paths[0].startswith(models_dir):
            os.makedirs(paths[0], exist_ok=True)
