"""Where the web frontend, the workflow templates and the embedded node docs are read from.

The frontend is the unchanged official build from the PyPI package `comfyui-frontend-package` (its
`static/` folder), or a folder given with --front-end-root. Nothing is ever downloaded at run time.

The workflow templates ship as several PyPI packages: `comfyui_workflow_templates_core` holds the manifest
(template id -> asset file names, including `index.json` and sub-paths such as `logo/x.webp`) and resolves
each asset to the json or media package that carries it. `/templates/<name>` is answered from that map,
so only files named in the manifest can ever be served.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

FRONTEND_PACKAGE = "comfyui_frontend_package"
TEMPLATES_DISTRIBUTION = "comfyui-workflow-templates"
FRONTEND_DISTRIBUTION = "comfyui-frontend-package"
DOCS_PACKAGE = "comfyui_embedded_docs"


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _required_version(distribution: str) -> str | None:
    """The version pinned in requirements.txt next to the repository root (what we were built against)."""
    req = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")
    try:
        with open(req, encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line.lower().startswith(distribution.lower() + "=="):
                    return line.split("==", 1)[1].strip()
    except OSError:
        return None
    return None


def installed_frontend_version() -> str | None:
    return _distribution_version(FRONTEND_DISTRIBUTION)


def required_frontend_version() -> str | None:
    return _required_version(FRONTEND_DISTRIBUTION)


def installed_templates_version() -> str | None:
    return _distribution_version(TEMPLATES_DISTRIBUTION)


def required_templates_version() -> str | None:
    return _required_version(TEMPLATES_DISTRIBUTION)


def default_frontend_path() -> str:
    """The `static/` folder of the installed comfyui-frontend-package."""
    try:
        package = importlib.import_module(FRONTEND_PACKAGE)
    except ImportError as e:
        raise RuntimeError("The web frontend is missing: install it with "
                           "`pip install -r requirements.txt` (package comfyui-frontend-package), "
                           "or point --front-end-root at a built frontend folder.") from e
    return os.path.join(os.path.dirname(os.path.abspath(package.__file__)), "static")


def init_frontend(front_end_root: str | None = None, front_end_version: str | None = None) -> str:
    """The folder to serve at `/`: --front-end-root if given, else the installed package's build."""
    if front_end_root:
        root = os.path.abspath(os.path.expanduser(front_end_root))
        if not os.path.isdir(root):
            raise RuntimeError(f"--front-end-root {front_end_root!r} is not a folder; give the folder that "
                               f"holds the frontend's index.html.")
        return root
    if front_end_version:
        # Upstream downloads other versions from GitHub; this fork never downloads at run time.
        logging.warning("--front-end-version %s ignored: downloading frontends is not supported; serving the "
                        "installed comfyui-frontend-package %s (use --front-end-root for another build).",
                        front_end_version, installed_frontend_version())
    root = default_frontend_path()
    if not os.path.isfile(os.path.join(root, "index.html")):
        raise RuntimeError(f"The installed frontend at {root} has no index.html; reinstall "
                           f"comfyui-frontend-package or use --front-end-root.")
    return root


_template_assets: dict[str, str] | None = None


def template_asset_map() -> dict[str, str]:
    """Relative asset name (as the frontend requests it under /templates/) -> absolute file path.

    Built once from the templates manifest; templates whose media package is not installed are skipped
    (their files answer 404).
    """
    global _template_assets
    if _template_assets is not None:
        return _template_assets
    assets: dict[str, str] = {}
    try:
        core = importlib.import_module("comfyui_workflow_templates_core")
    except ImportError:
        logging.info("Workflow templates are not installed (pip install comfyui-workflow-templates); "
                     "/templates/ will answer 404.")
        _template_assets = assets
        return assets
    missing = 0
    for entry in core.iter_templates():
        for asset in entry.assets:
            try:
                assets[asset.filename] = core.get_asset_path(entry.template_id, asset.filename)
            except (FileNotFoundError, KeyError):
                missing += 1
    if missing:
        logging.info("%d workflow template assets are in the manifest but not installed", missing)
    _template_assets = assets
    return assets


def embedded_docs_path() -> str | None:
    """The docs folder of comfyui-embedded-docs, or None if that optional package is not installed."""
    try:
        package = importlib.import_module(DOCS_PACKAGE)
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(package.__file__)), "docs")
    return path if os.path.isdir(path) else None
