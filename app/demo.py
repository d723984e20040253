"""The first-run demo offer: with no diffusion model or checkpoint anywhere, write the small demo models
and put the demo workflow into the default user's workflows folder, so a fresh install opens a UI that
has something to run.

The demo models come from scripts/make_demo_models.py (random weights in the real Flux.1 file layouts;
they draw noise-like pictures) and are named `taco-demo-*`. The workflow is demo/flux_demo_workflow.json
(the UI-format twin of demo/flux_demo_api.json); the frontend lists it in its workflows sidebar because
it is served by /api/userdata?dir=workflows. `--no-demo-models` turns all of this off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile

import folder_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_WORKFLOW_SOURCE = os.path.join(ROOT, "demo", "flux_demo_workflow.json")
DEMO_WORKFLOW_NAME = "taco-demo-flux.json"
DEMO_USER = "default"
# The model kinds whose absence means "nothing to run": a DiT alone or a full checkpoint.
_RUNNABLE_KINDS = ("diffusion_models", "checkpoints")


def _demo_script():
    """scripts/ is not a package; load make_demo_models.py by path (tests do the same)."""
    path = os.path.join(ROOT, "scripts", "make_demo_models.py")
    spec = importlib.util.spec_from_file_location("taco_make_demo_models", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path} is missing; restore it from the repository or start with --no-demo-models")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_runnable_model() -> bool:
    return any(folder_paths.get_filename_list(kind) for kind in _RUNNABLE_KINDS)


def _target_folder(kind: str) -> str:
    """The folder of `kind` under models/ named like the kind itself (models/diffusion_models, not the
    legacy models/unet), where the demo script writes too; else the first folder of that kind."""
    paths = folder_paths.get_folder_paths(kind)
    preferred = os.path.join(folder_paths.models_dir, kind)
    for p in paths:
        if os.path.abspath(p) == os.path.abspath(preferred):
            return p
    if not paths:
        raise ValueError(f"no folder is configured for model kind {kind!r}; check extra_model_paths.yaml")
    return paths[0]


def write_demo_models() -> list[str]:
    """Write the demo models into the models folders; returns the final paths.

    Every file is built in a staging folder and moved into place with os.replace, so a rank or a request
    reading the folder meanwhile sees either no file or a complete one (several torchrun ranks may share
    one base directory and write the same, identically seeded, files).
    """
    os.makedirs(folder_paths.models_dir, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix=".taco-demo-", dir=folder_paths.models_dir) as staging:
        for path in _demo_script().write_demo_models(staging, seed=0):
            kind = os.path.basename(os.path.dirname(path))
            target_dir = _target_folder(kind)
            os.makedirs(target_dir, exist_ok=True)
            final = os.path.join(target_dir, os.path.basename(path))
            os.replace(path, final)
            written.append(final)
    folder_paths.filename_list_cache.clear()
    return written


def demo_workflow_path(user: str = DEMO_USER) -> str:
    return os.path.join(folder_paths.get_user_directory(), user, "workflows", DEMO_WORKFLOW_NAME)


def install_demo_workflow(user: str = DEMO_USER) -> str | None:
    """Copy the UI-format demo workflow into the user's workflows folder unless a file of that name is
    already there (it may be the user's edited copy). Returns the path written, or None."""
    target = demo_workflow_path(user)
    if os.path.exists(target):
        return None
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + f".{os.getpid()}.tmp"
    shutil.copyfile(DEMO_WORKFLOW_SOURCE, tmp)
    os.replace(tmp, target)
    return target


def offer_demo(enabled: bool = True) -> list[str]:
    """At start: if no diffusion model or checkpoint exists, write the demo models and workflow.

    Returns the files written (empty when models exist or `enabled` is False) and logs what was written
    and how to remove it.
    """
    if has_runnable_model():
        return []
    if not enabled:
        logging.info("No diffusion model or checkpoint found under %s; the demo models are off "
                     "(--no-demo-models). Put model files in models/diffusion_models or models/checkpoints.",
                     folder_paths.models_dir)
        return []
    logging.info("No diffusion model or checkpoint found: writing the small TACO-DiT demo models "
                 "(random weights, noise-like pictures; start with --no-demo-models to skip this).")
    written = write_demo_models()
    workflow = install_demo_workflow()
    if workflow:
        written.append(workflow)
    for path in written:
        logging.info("  wrote %s", path)
    logging.info("Open '%s' from the Workflows sidebar and press Run. To remove the demo, delete the "
                 "taco-demo-* files above and put a real model into models/diffusion_models or "
                 "models/checkpoints (or start with --no-demo-models): they are only written while no "
                 "model is there.", DEMO_WORKFLOW_NAME)
    return written
