"""What custom node packs contribute besides nodes: example workflows, translations, global subgraphs.

- `/workflow_templates`: `{pack: [names]}` from each pack's example_workflows/ (or example(s)/,
  workflow(s)/) folder, files served under `/api/workflow_templates/<pack>/`.
- `/i18n`: `{lang: {...main.json, nodeDefs, commands, settings}}` merged over packs' `locales/<lang>/`.
- `/global_subgraphs`: `{id: {source, name, info}}` from packs' `subgraphs/*.json`; `/{id}` adds `data`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

from aiohttp import web

import folder_paths

_EXAMPLE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def _pack_dirs() -> list[tuple[str, str]]:
    out = []
    for root in folder_paths.get_folder_paths("custom_nodes"):
        for path in sorted(glob.glob(os.path.join(glob.escape(root), "*", ""))):
            name = os.path.basename(os.path.dirname(path))
            if not name.startswith(".") and name != "__pycache__":
                out.append((name, os.path.dirname(path)))
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        logging.warning("Skipping unreadable %s: %s", path, e)
        return None


def example_workflow_folders() -> dict[str, str]:
    found = {}
    for name, path in _pack_dirs():
        for sub in _EXAMPLE_FOLDERS:
            folder = os.path.join(path, sub)
            if os.path.isdir(folder) and glob.glob(os.path.join(glob.escape(folder), "*.json")):
                found[name] = folder
                break
    return found


def translations() -> dict:
    out: dict = {}
    for _, path in _pack_dirs():
        locales = os.path.join(path, "locales")
        if not os.path.isdir(locales):
            continue
        for lang in sorted(os.listdir(locales)):
            lang_dir = os.path.join(locales, lang)
            if not os.path.isdir(lang_dir):
                continue
            entry = out.setdefault(lang, {})
            main = _read_json(os.path.join(lang_dir, "main.json"))
            if isinstance(main, dict):
                entry = _merge(entry, main)
            for extra in ("commands", "settings", "nodeDefs"):
                data = _read_json(os.path.join(lang_dir, extra + ".json")) \
                    if os.path.isfile(os.path.join(lang_dir, extra + ".json")) else None
                if isinstance(data, dict):
                    entry = _merge(entry, {extra: data})
            out[lang] = entry
    return out


def global_subgraphs() -> dict[str, dict]:
    out = {}
    for pack, path in _pack_dirs():
        for file in sorted(glob.glob(os.path.join(glob.escape(path), "subgraphs", "*.json"))):
            sid = hashlib.sha256(f"custom_node:{pack}:{os.path.basename(file)}".encode()).hexdigest()
            out[sid] = {"source": "custom_node", "name": os.path.splitext(os.path.basename(file))[0],
                        "info": {"node_pack": pack}, "path": file}
    return out


def add_routes(routes: web.RouteTableDef, app: web.Application) -> None:
    @routes.get("/workflow_templates")
    async def workflow_templates(request):
        return web.json_response({
            pack: sorted(os.path.splitext(os.path.basename(f))[0]
                         for f in glob.glob(os.path.join(glob.escape(folder), "*.json")))
            for pack, folder in example_workflow_folders().items()})

    for pack, folder in example_workflow_folders().items():
        app.add_routes([web.static(f"/api/workflow_templates/{pack}", folder)])

    @routes.get("/i18n")
    async def i18n(request):
        return web.json_response(translations())

    @routes.get("/global_subgraphs")
    async def list_subgraphs(request):
        return web.json_response({k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                  for k, v in global_subgraphs().items()})

    @routes.get("/global_subgraphs/{id}")
    async def get_subgraph(request):
        entry = global_subgraphs().get(request.match_info["id"])
        if entry is None:
            return web.json_response({"error": "Unknown subgraph id"}, status=404)
        try:
            with open(entry.pop("path"), encoding="utf-8") as f:
                entry["data"] = f.read()
        except OSError as e:
            return web.json_response({"error": f"Cannot read subgraph: {e}"}, status=500)
        return web.json_response(entry)
