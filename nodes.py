"""Core nodes and the node registry.

`NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS` are ComfyUI's registry interface: the server's
/object_info, the executor and custom node packs all read them. Built-in feature nodes live in
`comfy_extras/nodes_<feature>.py`; third-party packs in `custom_nodes/` load the same way ComfyUI loads
them (a module or package exporting NODE_CLASS_MAPPINGS, optionally NODE_DISPLAY_NAME_MAPPINGS and
WEB_DIRECTORY). A pack that fails to import is logged and skipped, never fatal.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import traceback

import folder_paths

MAX_RESOLUTION = 16384

# ---------------------------------------------------------------------------------------------------
# Core node classes
# ---------------------------------------------------------------------------------------------------

# (core node classes are defined here)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

# ---------------------------------------------------------------------------------------------------
# Loading comfy_extras and custom_nodes
# ---------------------------------------------------------------------------------------------------

EXTENSION_WEB_DIRS: dict[str, str] = {}
LOADED_MODULE_DIRS: dict[str, str] = {}
# name -> error text for packs that failed to import (shown in the log and by tests)
FAILED_CUSTOM_NODES: dict[str, str] = {}

_BUILTIN_EXTRAS_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "comfy_extras")


def _module_name_for(module_path: str) -> str:
    base = os.path.basename(module_path)
    if os.path.isfile(module_path):
        base = os.path.splitext(base)[0]
    return base


def load_custom_node(module_path: str, ignore: set[str] | frozenset[str] = frozenset(),
                     module_parent: str = "custom_nodes") -> bool:
    """Import one node module or package and merge its nodes into the registry. False on failure."""
    name = _module_name_for(module_path)
    if os.path.isfile(module_path):
        module_dir = os.path.dirname(module_path)
        spec = importlib.util.spec_from_file_location(f"{module_parent}.{name}", module_path)
    else:
        module_dir = module_path
        init = os.path.join(module_path, "__init__.py")
        spec = importlib.util.spec_from_file_location(f"{module_parent}.{name}", init,
                                                      submodule_search_locations=[module_path])
    try:
        if spec is None or spec.loader is None:
            raise ImportError(f"no importable module at {module_path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        LOADED_MODULE_DIRS[name] = os.path.abspath(module_dir)

        web_dir = getattr(module, "WEB_DIRECTORY", None)
        if web_dir is not None:
            web_dir = os.path.abspath(os.path.join(module_dir, web_dir))
            if os.path.isdir(web_dir):
                EXTENSION_WEB_DIRS[name] = web_dir

        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is None:
            raise AttributeError(f"{module_path} has no NODE_CLASS_MAPPINGS")
        for node_name, node_cls in mappings.items():
            if node_name in ignore:
                continue
            node_cls.RELATIVE_PYTHON_MODULE = f"{module_parent}.{name}"
            NODE_CLASS_MAPPINGS[node_name] = node_cls
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
        for node_name, title in display.items():
            if node_name not in ignore:
                NODE_DISPLAY_NAME_MAPPINGS[node_name] = title
        return True
    except Exception as e:  # a broken pack must never take the server down
        sys.modules.pop(spec.name if spec else "", None)
        tb = traceback.format_exc()
        FAILED_CUSTOM_NODES[name] = f"{type(e).__name__}: {e}"
        logging.warning("Cannot import %s module for custom nodes: %s\n%s", module_path, e, tb)
        return False


def _candidate_modules(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    out = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.startswith(".") or entry == "__pycache__" or entry.endswith(".disabled"):
            continue
        if os.path.isfile(path) and entry.endswith(".py"):
            out.append(path)
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            out.append(path)
    return out


def init_builtin_extra_nodes() -> list[str]:
    """Load comfy_extras/nodes_*.py. Returns the names that failed (a bug in our code)."""
    failed = []
    for path in _candidate_modules(_BUILTIN_EXTRAS_DIR):
        if not os.path.basename(path).startswith("nodes_"):
            continue
        if not load_custom_node(path, module_parent="comfy_extras"):
            failed.append(os.path.basename(path))
    return failed


def init_external_custom_nodes(whitelist: list[str] | None = None, disable_all: bool = False) -> None:
    base_node_names = set(NODE_CLASS_MAPPINGS)
    for directory in folder_paths.get_folder_paths("custom_nodes"):
        for path in _candidate_modules(directory):
            name = _module_name_for(path)
            if disable_all and name not in (whitelist or []):
                logging.info("Skipping custom node pack %s (--disable-all-custom-nodes)", name)
                continue
            t0 = time.perf_counter()
            ok = load_custom_node(path, ignore=base_node_names)
            logging.info("Import %s custom nodes %s (%.1fs)", "of" if ok else "FAILED for", path,
                         time.perf_counter() - t0)


def init_extra_nodes(init_custom_nodes: bool = True, disable_all_custom_nodes: bool = False,
                     whitelist: list[str] | None = None) -> None:
    failed = init_builtin_extra_nodes()
    if failed:
        logging.warning("Built-in node modules failed to import: %s", ", ".join(failed))
    if init_custom_nodes:
        init_external_custom_nodes(whitelist=whitelist, disable_all=disable_all_custom_nodes)
