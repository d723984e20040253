"""The HTTP and WebSocket server of rank 0 (or the only process): ComfyUI's API on aiohttp.

`PromptServer` owns the aiohttp application, every route the official frontend calls (bare and under
`/api`, compat §1.1), the `/ws` WebSocket with its JSON and binary messages, the static frontend, the
`/templates/` and `/extensions/` files, and the bridge that lets the prompt worker thread send messages
(`send_sync`, thread-safe, delivered in call order by `publish_loop`).

Queue and history are `execution.PromptQueue`'s; validation is `execution.validate_prompt`; users,
settings, jobs, logs, model listings and frontend files are in `app/`.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import inspect
import io
import ipaddress
import json
import logging
import mimetypes
import os
import ssl
import struct
import sys
import time
import urllib.parse
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

import comfy.model_management
import folder_paths
import nodes
from app import custom_node_manager, frontend_management, jobs, model_manager
from app import logs as app_logs
from app.user_manager import UserManager
from comfy.cli_args import args

# The upstream ComfyUI server API level these routes match (newest server.py with /api/jobs). Reported
# as `comfyui_version` because the frontend and node-pack tooling compare it against upstream releases.
COMFYUI_API_VERSION = "0.3.76"

# extra_data keys that reach the executor but are never stored in the queue listing or the history.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

# Served as a download rather than rendered: a file a workflow wrote must not run script in our origin.
_DOWNLOAD_ONLY_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                        "application/javascript", "text/css", "image/svg+xml"}


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


def server_feature_flags() -> dict:
    return {
        "supports_preview_metadata": True,
        "max_upload_size": int(args.max_upload_size * 1024 * 1024),
        "supports_model_type_tags": True,
        "extension": {"manager": {"supports_v4": True}},
        "node_replacements": True,
        # The asset database API (/api/assets*) is not implemented; the frontend then never calls it.
        "assets": False,
    }


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin_check_middleware():
    """Refuse a browser request whose Origin differs from a loopback Host.

    A web page on any site can make the user's browser POST to 127.0.0.1; browsers do not block that,
    but they always send the page's Origin, which then differs from the Host.
    """
    @web.middleware
    async def origin_check(request: web.Request, handler):
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin:
            host_parts = urllib.parse.urlsplit("//" + host.lower())
            origin_parts = urllib.parse.urlsplit(origin.lower())
            if _is_loopback(host_parts.hostname):
                # Compare with ports only when both sides carry one (some browsers drop default ports).
                if host_parts.port is not None and origin_parts.port is not None:
                    same = (host_parts.hostname, host_parts.port) == (origin_parts.hostname, origin_parts.port)
                else:
                    same = host_parts.hostname == origin_parts.hostname
                if not same:
                    logging.warning("Refused a request with Host %s and a different Origin %s (403); start with "
                                    "--enable-cors-header to allow cross-origin use.", host, origin)
                    return web.Response(status=403, text="Origin does not match Host")
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)
    return origin_check


def _cors_middleware(allowed_origin: str):
    @web.middleware
    async def cors(request: web.Request, handler):
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization, comfy-user"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response
    return cors


@web.middleware
async def _cache_middleware(request: web.Request, handler):
    response = await handler(request)
    # Script and style names are not always content-hashed (extensions): always revalidate them.
    if request.path.endswith((".js", ".css", ".json")) and isinstance(response, web.StreamResponse):
        response.headers.setdefault("Cache-Control", "no-cache")
    return response


def _node_info(node_class: str) -> dict:
    cls = nodes.NODE_CLASS_MAPPINGS[node_class]
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 schema nodes describe themselves
        return cls.GET_NODE_INFO_V1()
    input_types = cls.INPUT_TYPES()
    return_types = list(getattr(cls, "RETURN_TYPES", ()))
    info: dict[str, Any] = {
        "input": input_types,
        "input_order": {section: list(values.keys()) for section, values in input_types.items()
                        if isinstance(values, dict)},
        "is_input_list": bool(getattr(cls, "INPUT_IS_LIST", False)),
        "output": return_types,
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(return_types))),
        "output_name": list(getattr(cls, "RETURN_NAMES", return_types)),
        "name": node_class,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
        "has_intermediate_output": getattr(cls, "HAS_INTERMEDIATE_OUTPUT", False) is True,
        "search_aliases": list(getattr(cls, "SEARCH_ALIASES", [])),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    for attr, key in (("DEPRECATED", "deprecated"), ("EXPERIMENTAL", "experimental"), ("DEV_ONLY", "dev_only")):
        if getattr(cls, attr, False):
            info[key] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = cls.API_NODE
    if hasattr(cls, "ESSENTIALS_CATEGORY"):
        info["essentials_category"] = cls.ESSENTIALS_CATEGORY
    return info


def _json_safe(obj: Any) -> Any:
    """Round-trip through JSON so odd values in INPUT_TYPES (tuples, enums, classes) cannot break a reply."""
    return json.loads(json.dumps(obj, default=str))


def _error(type_: str, message: str, details: str = "") -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": {}}


def _fit(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size and (image.width > max_size or image.height > max_size):
        return ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    return image


def encode_preview(image_data: tuple) -> tuple[int, str, bytes]:
    """(format number 1=JPEG/2=PNG, mime type, bytes) for a ("JPEG"|"PNG", PIL.Image, max_size) tuple.

    max_size None sends the image at full size (ComfyUI's meaning: SaveImageWebsocket relies on it);
    sampler previews pass --preview-size.
    """
    fmt, image, max_size = image_data
    image = _fit(image, max_size)
    buf = io.BytesIO()
    if str(fmt).upper() == "PNG":
        image.save(buf, format="PNG", compress_level=1)
        return 2, "image/png", buf.getvalue()
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buf, format="JPEG", quality=95)
    return 1, "image/jpeg", buf.getvalue()


def _package_versions() -> list[dict]:
    """[{name, installed, required}] for the pinned UI packages: the frontend reads this list to warn
    about outdated packages (a dict here makes it throw)."""
    from importlib.metadata import PackageNotFoundError, version

    required: dict[str, str] = {}
    req = os.path.join(os.path.dirname(os.path.realpath(__file__)), "requirements.txt")
    try:
        with open(req, encoding="utf-8") as f:
            for line in f:
                name, sep, pin = line.split("#")[0].strip().partition("==")
                if sep and name.startswith("comfyui-"):
                    required[name] = pin.strip()
    except OSError:
        pass
    out = []
    for name, pin in sorted(required.items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = ""
        out.append({"name": name, "installed": installed, "required": pin})
    return out


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop):
        PromptServer.instance = self
        mimetypes.add_type("application/javascript; charset=utf-8", ".js")
        mimetypes.add_type("image/webp", ".webp")

        self.loop = loop
        self.messages: asyncio.Queue = asyncio.Queue()
        self.prompt_queue = None
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.number = 0
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict] = {}
        self.on_prompt_handlers: list = []
        # old class_type -> [{new_node_id, ...}] for the frontend's node-replacement prompts.
        self.node_replacements: dict[str, list] = {}
        self.log_subscribers: set[str] = set()
        self.supports = ["custom_nodes_from_web"]

        self.user_manager = UserManager()
        self.web_root = frontend_management.init_frontend(args.front_end_root, args.front_end_version)
        self.log_buffer = app_logs.setup_log_buffer()
        self.log_buffer.on_flush(self._forward_logs, key="prompt_server")

        middlewares = [_cache_middleware]
        if args.enable_cors_header:
            middlewares.append(_cors_middleware(args.enable_cors_header))
        else:
            middlewares.append(_origin_check_middleware())
        self.app = web.Application(client_max_size=int(args.max_upload_size * 1024 * 1024),
                                   middlewares=middlewares)
        self.routes = web.RouteTableDef()
        self._routes_added = False
        self._define_routes()

    # ------------------------------------------------------------------------------------------------
    # Messages
    # ------------------------------------------------------------------------------------------------
    def get_queue_info(self) -> dict:
        remaining = self.prompt_queue.get_tasks_remaining() if self.prompt_queue is not None else 0
        return {"exec_info": {"queue_remaining": remaining}}

    def client_supports(self, sid: str | None, feature: str) -> bool:
        return bool(self.sockets_metadata.get(sid, {}).get("feature_flags", {}).get(feature, False)) \
            if sid is not None else False

    def send_sync(self, event, data, sid: str | None = None) -> None:
        """Queue a message from any thread; `publish_loop` sends messages in the order they were queued."""
        if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE and self.last_node_id is not None:
            # The executor's preview is of the node running now; name it here, in the calling thread,
            # because by the time publish_loop sends it the node may have finished. Clients that did not
            # ask for metadata still get a plain type 1 frame.
            node = self.last_node_id
            event = BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA
            data = (data, {"node_id": node, "prompt_id": self.last_prompt_id, "display_node_id": node,
                           "parent_node_id": None, "real_node_id": node})
        try:
            self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))
        except RuntimeError:
            # The loop is closed: the server is shutting down and nobody is listening any more.
            logging.debug("Dropped %s message: event loop closed", event)

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.get_queue_info()})

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        if isinstance(text, str):
            text = text.encode("utf-8")
        node = str(node_id).encode("utf-8")
        self.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + text, sid)

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self.messages.get()
            try:
                await self.send(event, data, sid)
            except Exception:  # one bad message (e.g. unserialisable data) must not stop all messages
                logging.exception("Could not send WebSocket message %r", event)

    async def send(self, event, data, sid: str | None = None) -> None:
        if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
            await self._send_preview(data, None, sid)
        elif event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
            image_data, metadata = data
            await self._send_preview(image_data, dict(metadata or {}), sid)
        elif isinstance(data, (bytes, bytearray)):
            await self.send_bytes(event, bytes(data), sid)
        else:
            await self.send_json(event, data, sid)

    async def _send_preview(self, image_data: tuple, metadata: dict | None, sid: str | None) -> None:
        fmt_num, mime, body = await asyncio.to_thread(encode_preview, image_data)
        targets = list(self.sockets) if sid is None else [sid]
        for target in targets:
            if metadata is not None and self.client_supports(target, "supports_preview_metadata"):
                meta = {**metadata, "image_type": mime}
                encoded = json.dumps(meta).encode("utf-8")
                payload = struct.pack(">I", len(encoded)) + encoded + body
                await self.send_bytes(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, payload, target)
            else:
                await self.send_bytes(BinaryEventTypes.PREVIEW_IMAGE, struct.pack(">I", fmt_num) + body, target)

    @staticmethod
    def encode_bytes(event: int, data: bytes) -> bytes:
        return struct.pack(">I", int(event)) + data

    async def _send_to(self, ws: web.WebSocketResponse, method: str, payload) -> None:
        try:
            await getattr(ws, method)(payload)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as e:
            # The client went away mid-send; its handler cleans up the socket.
            logging.debug("WebSocket send failed: %s", e)

    async def send_bytes(self, event: int, data: bytes, sid: str | None = None) -> None:
        message = self.encode_bytes(event, data)
        if sid is None:
            for ws in list(self.sockets.values()):
                await self._send_to(ws, "send_bytes", message)
        elif sid in self.sockets:
            await self._send_to(self.sockets[sid], "send_bytes", message)

    async def send_json(self, event: str, data, sid: str | None = None) -> None:
        message = json.dumps({"type": event, "data": data})
        if sid is None:
            for ws in list(self.sockets.values()):
                await self._send_to(ws, "send_str", message)
        elif sid in self.sockets:
            await self._send_to(self.sockets[sid], "send_str", message)

    def _forward_logs(self, entries: list[dict]) -> None:
        if not self.log_subscribers:
            return
        data = {"entries": entries, "size": app_logs.terminal_size()}
        for sid in list(self.log_subscribers):
            self.send_sync("logs", data, sid)

    # ------------------------------------------------------------------------------------------------
    # Hooks custom nodes use
    # ------------------------------------------------------------------------------------------------
    def add_on_prompt_handler(self, handler) -> None:
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict) -> dict:
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:  # a custom node's hook failing must not reject the user's prompt
                logging.exception("on_prompt handler %r failed; prompt passed on unchanged", handler)
        return json_data

    # ------------------------------------------------------------------------------------------------
    # Routes
    # ------------------------------------------------------------------------------------------------
    def _define_routes(self) -> None:
        routes = self.routes
        self.user_manager.add_routes(routes)
        model_manager.add_routes(routes)

        @routes.get("/ws")
        async def websocket_handler(request):
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            sid = request.rel_url.query.get("clientId", "")
            if sid:
                # A reconnecting client replaces its old socket.
                old = self.sockets.pop(sid, None)
                if old is not None and not old.closed:
                    await old.close()
            else:
                sid = uuid.uuid4().hex
            self.sockets[sid] = ws
            self.sockets_metadata[sid] = {"feature_flags": {}}
            try:
                await self.send("status", {"status": self.get_queue_info(), "sid": sid}, sid)
                if self.client_id == sid and self.last_node_id is not None:
                    await self.send("executing", {"node": self.last_node_id}, sid)
                first = True
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.ERROR:
                        logging.warning("WebSocket closed with exception %s", ws.exception())
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            message = json.loads(msg.data)
                        except json.JSONDecodeError:
                            logging.warning("Ignoring a WebSocket text frame that is not JSON")
                            first = False
                            continue
                        if first and isinstance(message, dict) and message.get("type") == "feature_flags":
                            flags = message.get("data")
                            self.sockets_metadata[sid]["feature_flags"] = flags if isinstance(flags, dict) else {}
                            await self.send("feature_flags", server_feature_flags(), sid)
                        first = False
            finally:
                if self.sockets.get(sid) is ws:
                    self.sockets.pop(sid, None)
                    self.sockets_metadata.pop(sid, None)
                    self.log_subscribers.discard(sid)
            return ws

        @routes.get("/")
        async def get_root(request):
            response = web.FileResponse(os.path.join(self.web_root, "index.html"))
            response.headers["Cache-Control"] = "no-cache, no-store, must-revalidate"
            response.headers["Pragma"] = "no-cache"
            response.headers["Expires"] = "0"
            return response

        @routes.get("/embeddings")
        async def get_embeddings(request):
            return web.json_response([os.path.splitext(f)[0] for f in folder_paths.get_filename_list("embeddings")])

        @routes.get("/models")
        async def list_model_types(request):
            return web.json_response(list(folder_paths.folder_names_and_paths.keys()))

        @routes.get("/models/{folder}")
        async def get_models(request):
            folder = request.match_info["folder"]
            if folder_paths.map_legacy(folder) not in folder_paths.folder_names_and_paths:
                return web.Response(status=404, text=f"Unknown model folder '{folder}'")
            return web.json_response(folder_paths.get_filename_list(folder))

        @routes.get("/extensions")
        async def get_extensions(request):
            found = glob.glob(os.path.join(glob.escape(self.web_root), "extensions", "**", "*.js"), recursive=True)
            out = ["/" + os.path.relpath(f, self.web_root).replace(os.sep, "/") for f in sorted(found)]
            for name, directory in nodes.EXTENSION_WEB_DIRS.items():
                for f in sorted(glob.glob(os.path.join(glob.escape(directory), "**", "*.js"), recursive=True)):
                    rel = os.path.relpath(f, directory).replace(os.sep, "/")
                    out.append(f"/extensions/{urllib.parse.quote(name)}/{rel}")
            return web.json_response(out)

        @routes.post("/upload/image")
        async def upload_image(request):
            return await self._upload(await request.post())

        @routes.post("/upload/mask")
        async def upload_mask(request):
            return await self._upload(await request.post(), mask=True)

        @routes.get("/view")
        async def view_image(request):
            return await asyncio.to_thread(self._view, request.rel_url.query)

        @routes.get("/view_metadata/{folder_name}")
        async def view_metadata(request):
            filename = request.rel_url.query.get("filename", "")
            if not filename.endswith(".safetensors"):
                return web.Response(status=404)
            folder = request.match_info["folder_name"]
            if folder_paths.map_legacy(folder) not in folder_paths.folder_names_and_paths:
                return web.Response(status=404)
            path = folder_paths.get_full_path(folder, filename)
            if path is None:
                return web.Response(status=404)
            header = model_manager.safetensors_metadata(path)
            if header is None or "__metadata__" not in header:
                return web.Response(status=404)
            return web.json_response(header["__metadata__"])

        @routes.get("/system_stats")
        async def system_stats(request):
            return web.json_response(self.system_stats())

        @routes.get("/features")
        async def get_features(request):
            return web.json_response(server_feature_flags())

        @routes.get("/prompt")
        async def get_prompt(request):
            return web.json_response(self.get_queue_info())

        @routes.post("/prompt")
        async def post_prompt(request):
            return await self._post_prompt(request)

        @routes.get("/object_info")
        async def get_object_info(request):
            out = {}
            for name in list(nodes.NODE_CLASS_MAPPINGS):
                try:
                    out[name] = _json_safe(_node_info(name))
                except Exception:  # one broken node class must not hide all the others
                    logging.exception("Cannot describe node %s in /object_info; it is left out", name)
            return web.json_response(out)

        @routes.get("/object_info/{node_class}")
        async def get_object_info_node(request):
            name = request.match_info["node_class"]
            if name not in nodes.NODE_CLASS_MAPPINGS:
                return web.json_response({})
            return web.json_response({name: _json_safe(_node_info(name))})

        @routes.get("/history")
        async def get_history(request):
            q = request.rel_url.query
            try:
                max_items = int(q["max_items"]) if "max_items" in q else None
                offset = int(q.get("offset", -1))
            except ValueError:
                return web.json_response({"error": "max_items and offset must be integers"}, status=400)
            return web.json_response(self.prompt_queue.get_history(max_items=max_items, offset=offset))

        @routes.get("/history/{prompt_id}")
        async def get_history_prompt(request):
            return web.json_response(self.prompt_queue.get_history(prompt_id=request.match_info["prompt_id"]))

        @routes.post("/history")
        async def post_history(request):
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return body
            if body.get("clear"):
                self.prompt_queue.wipe_history()
            for prompt_id in body.get("delete", []) or []:
                self.prompt_queue.delete_history_item(prompt_id)
            return web.Response(status=200)

        @routes.get("/queue")
        async def get_queue(request):
            running, pending = self.prompt_queue.get_current_queue_volatile()
            return web.json_response({"queue_running": [list(i[:5]) for i in running],
                                      "queue_pending": [list(i[:5]) for i in pending]})

        @routes.post("/queue")
        async def post_queue(request):
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return body
            if body.get("clear"):
                self.prompt_queue.wipe_queue()
            for prompt_id in body.get("delete", []) or []:
                self.prompt_queue.delete_queue_item(lambda item, pid=prompt_id: item[1] == pid)
            return web.Response(status=200)

        @routes.post("/interrupt")
        async def post_interrupt(request):
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = {}
            prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
            if prompt_id:
                running, _ = self.prompt_queue.get_current_queue_volatile()
                if any(item[1] == prompt_id for item in running):
                    comfy.model_management.interrupt_current_processing(True)
                else:
                    logging.info("Interrupt for %s ignored: it is not the running prompt", prompt_id)
            else:
                comfy.model_management.interrupt_current_processing(True)
            return web.Response(status=200)

        @routes.post("/free")
        async def post_free(request):
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return body
            # Applied by the prompt worker between prompts, never under a running one.
            if body.get("unload_models", False):
                self.prompt_queue.set_flag("unload_models", body["unload_models"])
            if body.get("free_memory", False):
                self.prompt_queue.set_flag("free_memory", body["free_memory"])
            return web.Response(status=200)

        @routes.get("/node_replacements")
        async def get_node_replacements(request):
            return web.json_response(self.node_replacements)

        custom_node_manager.add_routes(routes, self.app)

    async def _json_body(self, request: web.Request):
        """The decoded JSON body, or a 400 response naming the problem."""
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return web.json_response({"error": _error("invalid_json", "Request body is not valid JSON", str(e))},
                                     status=400)

    # -- jobs ----------------------------------------------------------------------------------------
    def _jobs_routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/api/jobs")
        async def list_jobs(request):
            q = request.rel_url.query
            statuses = None
            if q.get("status"):
                statuses = [s.strip().lower() for s in q["status"].split(",") if s.strip()]
                bad = [s for s in statuses if s not in jobs.ALL_STATUSES]
                if bad:
                    return web.json_response({"error": f"Invalid status value(s): {', '.join(bad)}. "
                                                       f"Valid: {', '.join(jobs.ALL_STATUSES)}"}, status=400)
            sort_by = q.get("sort_by", "created_at").lower()
            if sort_by not in jobs.SORT_FIELDS:
                return web.json_response({"error": f"sort_by must be one of {', '.join(jobs.SORT_FIELDS)}"},
                                         status=400)
            sort_order = q.get("sort_order", "desc").lower()
            if sort_order not in ("asc", "desc"):
                return web.json_response({"error": "sort_order must be 'asc' or 'desc'"}, status=400)
            try:
                limit = int(q["limit"]) if "limit" in q else None
                offset = int(q.get("offset", 0))
            except ValueError:
                return web.json_response({"error": "limit and offset must be integers"}, status=400)
            if limit is not None and limit <= 0:
                return web.json_response({"error": "limit must be a positive integer"}, status=400)
            offset = max(offset, 0)
            running, pending = self.prompt_queue.get_current_queue_volatile()
            history = self.prompt_queue.get_history()
            page, total = jobs.list_jobs(running, pending, history, statuses, q.get("workflow_id"),
                                         sort_by, sort_order, limit, offset)
            return web.json_response({"jobs": page, "pagination": {
                "offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}})

        @routes.get("/api/jobs/{job_id}")
        async def get_job(request):
            running, pending = self.prompt_queue.get_current_queue_volatile()
            job = jobs.find_job(request.match_info["job_id"], running, pending,
                                self.prompt_queue.get_history(prompt_id=request.match_info["job_id"]))
            if job is None:
                return web.json_response({"error": "Job not found"}, status=404)
            return web.json_response(job)

        @routes.post("/api/jobs/{job_id}/cancel")
        async def cancel_job(request):
            return web.json_response({"cancelled": self.cancel_job(request.match_info["job_id"])})

        @routes.post("/api/jobs/cancel")
        async def cancel_jobs(request):
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return body
            ids = body.get("job_ids")
            if not isinstance(ids, list):
                return web.json_response({"error": 'Send {"job_ids": [<id>, ...]}.'}, status=400)
            results = [self.cancel_job(str(i)) for i in ids]
            return web.json_response({"cancelled": any(results)})

        @routes.route("*", "/api/assets{tail:.*}")
        async def assets_disabled(request):
            # Only under /api: bare /assets/ is the frontend's own bundle folder.
            return web.json_response({"error": "The asset database API is not available on this server "
                                               "(feature flag 'assets' is false)."}, status=503)

        return routes

    def cancel_job(self, job_id: str) -> bool:
        """Interrupt the job if it is running, drop it if it is pending. False if it is neither."""
        running, _ = self.prompt_queue.get_current_queue_volatile()
        if any(item[1] == job_id for item in running):
            comfy.model_management.interrupt_current_processing(True)
            return True
        return bool(self.prompt_queue.delete_queue_item(lambda item: item[1] == job_id))

    # -- prompt --------------------------------------------------------------------------------------
    async def _post_prompt(self, request: web.Request) -> web.Response:
        import execution

        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return web.json_response({"error": _error("invalid_prompt", "Request body is not valid JSON",
                                                      str(e)), "node_errors": {}}, status=400)
        if not isinstance(data, dict):
            return web.json_response({"error": _error("invalid_prompt", "Request body must be a JSON object"),
                                      "node_errors": {}}, status=400)
        data = self.trigger_on_prompt(data)

        if "number" in data:
            try:
                number = float(data["number"])
            except (TypeError, ValueError):
                return web.json_response({"error": _error("invalid_prompt", "number must be a number"),
                                          "node_errors": {}}, status=400)
        else:
            number = self.number
            if data.get("front"):
                number = -number
            self.number += 1

        prompt = data.get("prompt")
        if prompt is None:
            return web.json_response({"error": _error("no_prompt", "No prompt provided", "No prompt provided"),
                                      "node_errors": {}}, status=400)
        if "prompt_id" in data and data["prompt_id"] is not None:
            prompt_id = str(data["prompt_id"])
            try:
                canonical = str(uuid.UUID(prompt_id))
            except ValueError:
                canonical = None
            if canonical != prompt_id:
                return web.json_response({"error": _error(
                    "invalid_prompt_id", "prompt_id must be a UUID in canonical form "
                    "(lowercase 8-4-4-4-12 hex), or left out to have the server pick one",
                    f"Got {prompt_id!r}"), "node_errors": {}}, status=400)
        else:
            prompt_id = str(uuid.uuid4())

        if not isinstance(prompt, dict):
            return web.json_response({"error": _error("invalid_prompt", "prompt must be an object of nodes "
                                                      "keyed by node id"), "node_errors": {}}, status=400)

        result = execution.validate_prompt(prompt_id, prompt, data.get("partial_execution_targets"))
        if inspect.isawaitable(result):
            result = await result
        ok, error, outputs_to_execute, node_errors = result
        if not ok:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)

        extra_data = data.get("extra_data") or {}
        if not isinstance(extra_data, dict):
            extra_data = {}
        extra_data = dict(extra_data)
        if "client_id" in data:
            extra_data["client_id"] = data["client_id"]
        keys = getattr(execution, "SENSITIVE_EXTRA_DATA_KEYS", SENSITIVE_EXTRA_DATA_KEYS)
        sensitive = {k: extra_data.pop(k) for k in keys if k in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        self.prompt_queue.put((number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    # -- files ---------------------------------------------------------------------------------------
    @staticmethod
    def _dir_for_type(type_name: str | None) -> str | None:
        return folder_paths.get_directory_by_type(type_name or "input")

    async def _upload(self, post, mask: bool = False) -> web.Response:
        image = post.get("image")
        if image is None or not hasattr(image, "file"):
            return web.Response(status=400, text="Send the file as multipart field 'image'")
        filename = os.path.basename(image.filename or "")
        if not filename or filename in (".", ".."):
            return web.Response(status=400, text="The uploaded file has no name")
        upload_type = post.get("type") or "input"
        upload_dir = self._dir_for_type(upload_type)
        if upload_dir is None:
            return web.Response(status=400, text=f"type must be input, temp or output, not {upload_type!r}")
        subfolder = post.get("subfolder", "") or ""
        upload_dir = os.path.abspath(upload_dir)
        folder = os.path.abspath(os.path.join(upload_dir, os.path.normpath(subfolder)))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return web.Response(status=400, text="subfolder must stay inside the upload folder")
        content = image.file.read()

        if mask:
            original = self._mask_original(post)
            if isinstance(original, web.Response):
                return original

        os.makedirs(folder, exist_ok=True)
        overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
        duplicate = False
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            digest = hashlib.sha256(content).hexdigest()
            i = 1
            while os.path.exists(filepath):
                with open(filepath, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() == digest:
                        duplicate = True  # same bytes already there: reuse the name
                        break
                filename = f"{stem} ({i}){ext}"
                filepath = os.path.join(folder, filename)
                i += 1
        if not duplicate:
            if mask:
                await asyncio.to_thread(self._save_mask, original, content, filepath)
            else:
                with open(filepath, "wb") as f:
                    f.write(content)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

    def _mask_original(self, post):
        try:
            ref = json.loads(post.get("original_ref") or "")
        except json.JSONDecodeError:
            return web.Response(status=400, text="original_ref must be JSON {filename, subfolder, type}")
        if not isinstance(ref, dict):
            return web.Response(status=400, text="original_ref must be JSON {filename, subfolder, type}")
        path = self._resolve_file(ref.get("filename", ""), ref.get("type", "output"), ref.get("subfolder", ""))
        if isinstance(path, int):
            return web.Response(status=path)
        if not os.path.isfile(path):
            return web.Response(status=404, text="original_ref names a file that does not exist")
        return path

    @staticmethod
    def _save_mask(original_path: str, mask_bytes: bytes, filepath: str) -> None:
        with Image.open(original_path) as original:
            info = PngInfo()
            for key, value in (getattr(original, "text", None) or {}).items():
                info.add_text(key, value)
            rgba = original.convert("RGBA")
        with Image.open(io.BytesIO(mask_bytes)) as mask_img:
            rgba.putalpha(mask_img.convert("RGBA").getchannel("A"))
        rgba.save(filepath, compress_level=4, pnginfo=info)

    @staticmethod
    def _resolve_file(filename: str, type_name: str | None, subfolder: str | None) -> str | int:
        """Absolute path for a (filename, type, subfolder) reference, or an HTTP status refusing it."""
        filename, annotated_dir = folder_paths.annotated_filepath(filename or "")
        if not filename:
            return 400
        if filename[0] in ("/", "\\") or ".." in filename or os.path.isabs(filename):
            return 400
        base = annotated_dir or folder_paths.get_directory_by_type(type_name or "output")
        if base is None:
            return 400
        base = os.path.abspath(base)
        if subfolder:
            full = os.path.abspath(os.path.join(base, subfolder))
            if os.path.commonpath((full, base)) != base:
                return 403
            base = full
        return os.path.join(base, os.path.basename(filename))

    def _view(self, query) -> web.StreamResponse:
        if "filename" not in query:
            return web.Response(status=404)
        path = self._resolve_file(query["filename"], query.get("type", "output"), query.get("subfolder", ""))
        if isinstance(path, int):
            return web.Response(status=path)
        if not os.path.isfile(path):
            return web.Response(status=404)
        name = os.path.basename(path)
        disposition = {"Content-Disposition": f'filename="{name}"'}
        channel = query.get("channel", "rgba")
        if "preview" in query:
            parts = query["preview"].split(";")
            fmt = parts[0] if parts[0] in ("webp", "jpeg") else "webp"
            if "a" in query.get("channel", ""):
                fmt = "webp"  # an alpha channel was asked for and JPEG has none
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            with Image.open(path) as img:
                if fmt == "jpeg" or channel == "rgb":
                    img = img.convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format=fmt, quality=quality)
            return web.Response(body=buf.getvalue(), content_type=f"image/{fmt}", headers=disposition)
        if channel == "rgb":
            with Image.open(path) as img:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
            return web.Response(body=buf.getvalue(), content_type="image/png", headers=disposition)
        if channel == "a":
            with Image.open(path) as img:
                alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
                out = Image.new("RGBA", img.size)
                out.putalpha(alpha)
                buf = io.BytesIO()
                out.save(buf, format="PNG")
            return web.Response(body=buf.getvalue(), content_type="image/png", headers=disposition)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.split(";")[0] in _DOWNLOAD_ONLY_TYPES:
            return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                                   "Content-Type": "application/octet-stream"})
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    # -- system --------------------------------------------------------------------------------------
    def system_stats(self) -> dict:
        import psutil
        import torch

        mm = comfy.model_management
        device = mm.get_torch_device()
        vram_total, vram_free = mm.get_total_memory(device), mm.get_free_memory(device)
        torch_total = torch_free = vram_total
        if device.type == "cuda":
            torch_total = torch.cuda.memory_reserved(device)
            torch_free = torch_total - torch.cuda.memory_allocated(device)
        package_versions = _package_versions()
        vm = psutil.virtual_memory()
        return {
            "system": {
                "os": sys.platform, "ram_total": vm.total, "ram_free": vm.available,
                "comfyui_version": COMFYUI_API_VERSION,
                "required_frontend_version": frontend_management.required_frontend_version(),
                "installed_templates_version": frontend_management.installed_templates_version(),
                "required_templates_version": frontend_management.required_templates_version(),
                "comfy_package_versions": package_versions,
                "python_version": sys.version, "pytorch_version": torch.__version__,
                "embedded_python": os.path.basename(os.path.dirname(sys.executable)) == "python_embeded",
                "deploy_environment": os.environ.get("COMFY_DEPLOY_ENVIRONMENT", "local"),
                "argv": sys.argv,
            },
            "devices": [{"name": mm.get_torch_device_name(device), "type": device.type, "index": device.index,
                         "vram_total": vram_total, "vram_free": vram_free,
                         "torch_vram_total": torch_total, "torch_vram_free": torch_free}],
        }

    # ------------------------------------------------------------------------------------------------
    # Application assembly and start-up
    # ------------------------------------------------------------------------------------------------
    def _internal_app(self) -> web.Application:
        internal = web.RouteTableDef()

        @internal.get("/logs")
        async def logs_text(request):
            return web.Response(text="".join(e["t"] + " - " + e["m"] for e in app_logs.get_logs()))

        @internal.get("/logs/raw")
        async def logs_raw(request):
            return web.json_response({"entries": app_logs.get_logs(), "size": app_logs.terminal_size()})

        @internal.patch("/logs/subscribe")
        async def logs_subscribe(request):
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return body
            client_id = body.get("clientId")
            if not client_id:
                return web.json_response({"error": "clientId is required"}, status=400)
            if body.get("enabled", False):
                self.log_subscribers.add(client_id)
            else:
                self.log_subscribers.discard(client_id)
            return web.Response(status=200)

        @internal.get("/folder_paths")
        async def get_folder_paths(request):
            return web.json_response({k: v[0] for k, v in folder_paths.folder_names_and_paths.items()})

        @internal.get("/files/{directory_type}")
        async def get_files(request):
            kind = request.match_info["directory_type"]
            if kind not in ("output", "input", "temp"):
                return web.json_response({"error": "directory_type must be input, output or temp"}, status=400)
            directory = folder_paths.get_directory_by_type(kind)
            if not os.path.isdir(directory):
                return web.json_response([])
            with os.scandir(directory) as it:
                files = sorted((e for e in it if e.is_file()), key=lambda e: -e.stat().st_mtime)
            return web.json_response([e.name for e in files])

        app = web.Application()
        app.add_routes(internal)
        return app

    def add_routes(self) -> None:
        """Register every route; call once, after custom nodes loaded (they add to `self.routes`)."""
        if self._routes_added:
            return
        self._routes_added = True
        self.app.add_subapp("/internal", self._internal_app())

        api_routes = web.RouteTableDef()
        for route in self.routes:
            # Packs may add static routes to `routes`; only handlers are mirrored under /api.
            if isinstance(route, web.RouteDef):
                api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
        self.app.add_routes(api_routes)
        self.app.add_routes(self.routes)
        self.app.add_routes(self._jobs_routes())

        for name, directory in nodes.EXTENSION_WEB_DIRS.items():
            self.app.add_routes([web.static("/extensions/" + name, directory)])

        self.app.router.add_get("/templates/{path:.+}", self._serve_template)
        docs = frontend_management.embedded_docs_path()
        if docs:
            self.app.add_routes([web.static("/docs", docs)])
        self.app.add_routes([web.static("/", self.web_root)])

    async def _serve_template(self, request: web.Request) -> web.StreamResponse:
        # Only names listed in the templates manifest are served: nothing else on disk is reachable.
        path = (await asyncio.to_thread(frontend_management.template_asset_map)).get(request.match_info["path"])
        if path is None:
            return web.Response(status=404, text="No such workflow template file")
        return web.FileResponse(path)

    async def setup(self) -> None:
        """Async start-up work before serving (nothing is needed yet; kept for ComfyUI's call order)."""
        return None

    async def start(self, address: str, port: int, verbose: bool = True, call_on_start=None) -> None:
        await self.start_multi_address([(address, port)], call_on_start=call_on_start, verbose=verbose)

    async def start_multi_address(self, addresses, call_on_start=None, verbose: bool = True) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        ssl_ctx = None
        scheme = "http"
        if args.tls_keyfile and args.tls_certfile:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(certfile=args.tls_certfile, keyfile=args.tls_keyfile)
            scheme = "https"
        elif args.tls_keyfile or args.tls_certfile:
            raise RuntimeError("TLS needs both --tls-keyfile and --tls-certfile.")
        self.runner = runner
        self.bound: list[tuple[str, int]] = []
        for address, port in addresses:
            site = web.TCPSite(runner, address, port, ssl_context=ssl_ctx)
            await site.start()
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            actual = sockets[0].getsockname()[1] if sockets else port
            self.bound.append((address, actual))
            if not hasattr(self, "address"):
                self.address, self.port = address, actual
            shown = f"[{address}]" if ":" in address else address
            if verbose:
                logging.info("Starting server\nTo see the GUI go to: %s://%s:%s", scheme, shown, actual)
        if call_on_start is not None:
            call_on_start(scheme, self.address, self.port)
