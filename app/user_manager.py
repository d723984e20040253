"""Users, settings and per-user files (/users, /settings, /userdata, /v2/userdata).

Everything lives under `folder_paths.get_user_directory()/<user>/`: `comfy.settings.json`, `workflows/`,
`subgraphs/`, ... One user, `default`, unless --multi-user, where the `comfy-user` header picks a user
registered in `users.json`. Every path a request names is resolved inside that user's folder; anything
that would leave it is refused with 403 (or 400 when nothing usable was given).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import uuid
from urllib import parse

from aiohttp import web

import folder_paths
from comfy.cli_args import args

DEFAULT_USER = "default"


def _inside(root: str, path: str) -> bool:
    root = os.path.abspath(root)
    return os.path.commonpath((root, os.path.abspath(path))) == root


def file_info(path: str, relative_to: str) -> dict:
    return {"path": os.path.relpath(path, relative_to).replace(os.sep, "/"),
            "size": os.path.getsize(path), "modified": os.path.getmtime(path),
            "created": os.path.getctime(path)}


class UserManager:
    def __init__(self):
        self.users: dict[str, str] = {}
        if args.multi_user:
            path = self._users_file()
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        self.users = json.load(f)
                except (OSError, json.JSONDecodeError) as e:
                    logging.warning("Could not read %s (%s); starting with no users.", path, e)

    # -- users ---------------------------------------------------------------------------------------
    @staticmethod
    def _users_file() -> str:
        return os.path.join(folder_paths.get_user_directory(), "users.json")

    def get_request_user_id(self, request: web.Request) -> str:
        user = DEFAULT_USER
        if args.multi_user and "comfy-user" in request.headers:
            user = request.headers["comfy-user"]
            if user not in self.users:
                raise KeyError(f"Unknown user: {user}")
        return user

    def add_user(self, name: str) -> str:
        name = name.strip()
        if not name:
            raise ValueError("username must not be empty")
        user_id = re.sub("[^a-zA-Z0-9-_]+", "-", name) + "_" + str(uuid.uuid4())
        self.users[user_id] = name
        os.makedirs(folder_paths.get_user_directory(), exist_ok=True)
        with open(self._users_file(), "w", encoding="utf-8") as f:
            json.dump(self.users, f)
        return user_id

    def get_request_user_filepath(self, request: web.Request, file: str | None, create_dir: bool = True
                                  ) -> str | None:
        """Absolute path of `file` in the requesting user's folder, or None if it would leave it."""
        root = os.path.abspath(folder_paths.get_user_directory())
        user_root = os.path.abspath(os.path.join(root, self.get_request_user_id(request)))
        if not _inside(root, user_root) or user_root == root:
            return None
        path = user_root
        if file is not None:
            # The frontend URL-encodes the whole relative path (workflows%2Fa.json).
            if "%" in file:
                file = parse.unquote(file)
            path = os.path.abspath(os.path.join(user_root, file))
            if not _inside(user_root, path):
                return None
        if create_dir:
            os.makedirs(os.path.dirname(path) if file is not None else path, exist_ok=True)
        return path

    # -- settings ------------------------------------------------------------------------------------
    def _settings_path(self, request: web.Request) -> str:
        path = self.get_request_user_filepath(request, "comfy.settings.json")
        assert path is not None  # a fixed file name inside the user folder always resolves
        return path

    def get_settings(self, request: web.Request) -> dict:
        path = self._settings_path(request)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError) as e:
            logging.warning("Ignoring unreadable settings file %s: %s", path, e)
            return {}

    def save_settings(self, request: web.Request, settings: dict) -> None:
        path = self._settings_path(request)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=4)
        os.replace(tmp, path)

    # -- routes --------------------------------------------------------------------------------------
    def _user_file_or_error(self, request: web.Request, check_exists: bool = False, param: str = "file"):
        file = request.match_info.get(param)
        if not file:
            return web.Response(status=400, text="No file name given")
        path = self.get_request_user_filepath(request, file)
        if path is None:
            return web.Response(status=403, text="Path leaves the user folder")
        if check_exists and not os.path.exists(path):
            return web.Response(status=404, text="File not found")
        return path

    def add_routes(self, routes: web.RouteTableDef) -> None:
        def user_errors(handler):
            async def wrapped(request):
                try:
                    return await handler(request)
                except KeyError as e:
                    # Unknown comfy-user header in --multi-user mode.
                    return web.json_response({"error": str(e).strip("'\"")}, status=403)
            wrapped.__name__ = handler.__name__
            return wrapped

        @routes.get("/users")
        @user_errors
        async def get_users(request):
            if args.multi_user:
                return web.json_response({"storage": "server", "users": self.users})
            user_dir = self.get_request_user_filepath(request, None, create_dir=False)
            return web.json_response({"storage": "server", "migrated": bool(user_dir and os.path.exists(user_dir))})

        @routes.post("/users")
        async def post_users(request):
            try:
                body = await request.json()
                username = body["username"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return web.json_response({"error": 'Send {"username": "<name>"}.'}, status=400)
            if not isinstance(username, str) or not username.strip():
                return web.json_response({"error": "username must be a non-empty string"}, status=400)
            if username in self.users.values():
                return web.json_response({"error": "Duplicate username."}, status=400)
            return web.json_response(self.add_user(username))

        @routes.get("/settings")
        @user_errors
        async def get_all_settings(request):
            return web.json_response(self.get_settings(request))

        @routes.get("/settings/{id}")
        @user_errors
        async def get_setting(request):
            return web.json_response(self.get_settings(request).get(request.match_info["id"]))

        @routes.post("/settings")
        @user_errors
        async def post_settings(request):
            try:
                new = await request.json()
            except json.JSONDecodeError:
                return web.Response(status=400, text="Body must be a JSON object")
            if not isinstance(new, dict):
                return web.Response(status=400, text="Body must be a JSON object")
            settings = self.get_settings(request)
            settings.update(new)
            self.save_settings(request, settings)
            return web.Response(status=200)

        @routes.post("/settings/{id}")
        @user_errors
        async def post_setting(request):
            try:
                value = await request.json()
            except json.JSONDecodeError:
                return web.Response(status=400, text="Body must be a JSON value")
            settings = self.get_settings(request)
            settings[request.match_info["id"]] = value
            self.save_settings(request, settings)
            return web.Response(status=200)

        @routes.get("/userdata")
        @user_errors
        async def list_userdata(request):
            directory = request.rel_url.query.get("dir", "")
            if not directory:
                return web.Response(status=400, text="Directory not provided")
            path = self.get_request_user_filepath(request, directory, create_dir=False)
            if path is None:
                return web.Response(status=403, text="Invalid directory")
            if not os.path.isdir(path):
                return web.Response(status=404, text="Directory not found")
            q = request.rel_url.query
            recurse = q.get("recurse", "").lower() == "true"
            full_info = q.get("full_info", "").lower() == "true"
            split = q.get("split", "").lower() == "true"
            pattern = os.path.join(glob.escape(path), "**", "*") if recurse else os.path.join(glob.escape(path), "*")
            results = []
            for full in sorted(glob.glob(pattern, recursive=recurse)):
                if not os.path.isfile(full):
                    continue
                if full_info:
                    results.append(file_info(full, path))
                    continue
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                results.append([rel] + rel.split("/") if split else rel)
            return web.json_response(results)

        @routes.get("/v2/userdata")
        @user_errors
        async def list_userdata_v2(request):
            rel = request.rel_url.query.get("path", "")
            user_root = self.get_request_user_filepath(request, None, create_dir=False)
            if user_root is None:
                return web.Response(status=403, text="Invalid user")
            target = user_root
            if rel.strip("/"):
                target = self.get_request_user_filepath(request, rel.strip("/"), create_dir=False)
                if target is None:
                    return web.json_response({"error": "Path leaves the user folder"}, status=403)
            if not os.path.exists(target):
                return web.json_response({"error": f"Path not found: {rel}"}, status=404)
            if not os.path.isdir(target):
                return web.json_response({"error": f"Not a directory: {rel}"}, status=400)
            entries = []
            with os.scandir(target) as it:
                for entry in it:
                    entry_rel = os.path.relpath(entry.path, user_root).replace(os.sep, "/")
                    if entry.is_dir():
                        entries.append({"name": entry.name, "path": entry_rel, "type": "directory"})
                    elif entry.is_file():
                        st = entry.stat()
                        entries.append({"name": entry.name, "path": entry_rel, "type": "file",
                                        "size": st.st_size, "modified": st.st_mtime})
            entries.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
            return web.json_response(entries)

        @routes.get("/userdata/{file}")
        @user_errors
        async def get_userdata(request):
            path = self._user_file_or_error(request, check_exists=True)
            if not isinstance(path, str):
                return path
            if not os.path.isfile(path):
                return web.Response(status=404, text="Not a file")
            return web.FileResponse(path)

        def _saved_response(request, path):
            user_root = self.get_request_user_filepath(request, None)
            if request.rel_url.query.get("full_info", "false").lower() == "true":
                return web.json_response(file_info(path, user_root))
            return web.json_response(os.path.relpath(path, user_root).replace(os.sep, "/"))

        @routes.post("/userdata/{file}")
        @user_errors
        async def post_userdata(request):
            path = self._user_file_or_error(request)
            if not isinstance(path, str):
                return path
            overwrite = request.rel_url.query.get("overwrite", "true") != "false"
            if not overwrite and os.path.exists(path):
                return web.Response(status=409, text="File already exists")
            if os.path.isdir(path):
                return web.Response(status=400, text="A folder has that name")
            body = await request.read()
            with open(path, "wb") as f:
                f.write(body)
            return _saved_response(request, path)

        @routes.delete("/userdata/{file}")
        @user_errors
        async def delete_userdata(request):
            path = self._user_file_or_error(request, check_exists=True)
            if not isinstance(path, str):
                return path
            if os.path.isdir(path):
                return web.Response(status=400, text="Refusing to delete a folder")
            os.remove(path)
            return web.Response(status=204)

        @routes.post("/userdata/{file}/move/{dest}")
        @user_errors
        async def move_userdata(request):
            source = self._user_file_or_error(request, check_exists=True)
            if not isinstance(source, str):
                return source
            dest = self._user_file_or_error(request, param="dest")
            if not isinstance(dest, str):
                return dest
            overwrite = request.rel_url.query.get("overwrite", "true") != "false"
            if not overwrite and os.path.exists(dest):
                return web.Response(status=409, text="File already exists")
            shutil.move(source, dest)
            return _saved_response(request, dest)
