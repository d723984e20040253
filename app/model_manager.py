"""/experiment/models routes: model folders, their files with sizes and times, and preview images."""

from __future__ import annotations

import io
import json
import os
import struct

from aiohttp import web
from PIL import Image

import folder_paths

# Not model folders a user browses in the model library.
_HIDDEN_FOLDERS = ("configs", "custom_nodes")
_PREVIEW_EXTENSIONS = (".webp", ".png", ".jpg", ".jpeg")


def safetensors_metadata(path: str, max_header: int = 100 * 1024 * 1024) -> dict | None:
    """The parsed JSON header of a .safetensors file (None if it is not one)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > max_header:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def model_previews(full_path: str) -> list[str]:
    """Preview image files next to a model file: <stem>.webp/.png/... or <stem>.preview.<ext>."""
    stem = os.path.splitext(full_path)[0]
    out = []
    for suffix in ("", ".preview"):
        for ext in _PREVIEW_EXTENSIONS:
            candidate = stem + suffix + ext
            if os.path.isfile(candidate):
                out.append(candidate)
    return out


def add_routes(routes: web.RouteTableDef) -> None:
    @routes.get("/experiment/models")
    async def model_folders(request):
        return web.json_response([{"name": key, "folders": folder_paths.get_folder_paths(key)}
                                  for key in folder_paths.folder_names_and_paths if key not in _HIDDEN_FOLDERS])

    @routes.get("/experiment/models/{folder}")
    async def model_files(request):
        folder = request.match_info["folder"]
        if folder not in folder_paths.folder_names_and_paths:
            return web.Response(status=404, text=f"Unknown model folder '{folder}'")
        paths, exts = folder_paths.folder_names_and_paths[folder]
        out = []
        for index, root in enumerate(paths):
            files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
            for rel in folder_paths.filter_files_extensions(files, exts):
                full = os.path.join(root, rel)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                out.append({"name": rel, "pathIndex": index, "modified": st.st_mtime,
                            "created": st.st_ctime, "size": st.st_size})
        return web.json_response(out)

    @routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.*}")
    async def model_preview(request):
        folder = request.match_info["folder"]
        if folder not in folder_paths.folder_names_and_paths:
            return web.Response(status=404)
        try:
            root = folder_paths.folder_names_and_paths[folder][0][int(request.match_info["path_index"])]
        except (ValueError, IndexError):
            return web.Response(status=404)
        full = os.path.abspath(os.path.join(root, request.match_info["filename"]))
        if os.path.commonpath((os.path.abspath(root), full)) != os.path.abspath(root):
            return web.Response(status=403)
        previews = model_previews(full)
        if not previews:
            return web.Response(status=404)
        with Image.open(previews[0]) as img:
            buf = io.BytesIO()
            img.save(buf, format="WEBP")
        return web.Response(body=buf.getvalue(), content_type="image/webp")
