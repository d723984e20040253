"""Server routes the frontend calls at start-up: info, lists, settings, users, internal, static."""
# Fixtures are shared by importing them by name, which ruff reads as redefinitions:
# ruff: noqa: F811

from __future__ import annotations

import json
import os

import pytest

from tests.test_server_common import server_args, srv, test_nodes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.asyncio


async def test_index_served_with_no_cache(srv):
    server, client = srv
    r = await client.get("/")
    assert r.status == 200
    assert "no-cache" in r.headers["Cache-Control"]
    body = await r.text()
    with open(os.path.join(server.web_root, "index.html"), encoding="utf-8") as f:
        assert body == f.read()  # the official build, unchanged
    # A bundle file next to index.html is served from the same folder.
    assets = [f for f in os.listdir(os.path.join(server.web_root, "assets")) if f.endswith(".js")]
    r = await client.get(f"/assets/{assets[0]}")
    assert r.status == 200


async def test_front_end_root_override(base_dir, server_args, aiohttp_client, tmp_path):
    import asyncio

    import server as server_module

    root = tmp_path / "fe"
    root.mkdir()
    (root / "index.html").write_text("<html>custom</html>")
    server_args.front_end_root = str(root)
    s = server_module.PromptServer(asyncio.get_running_loop())
    s.add_routes()
    client = await aiohttp_client(s.app)
    r = await client.get("/")
    assert await r.text() == "<html>custom</html>"


async def test_front_end_root_missing_names_flag(base_dir, server_args):
    import asyncio

    import server as server_module

    server_args.front_end_root = "/nonexistent/frontend"
    with pytest.raises(RuntimeError, match="--front-end-root"):
        server_module.PromptServer(asyncio.get_running_loop())


async def test_every_route_bare_and_under_api(srv):
    _, client = srv
    for path in ("/system_stats", "/features", "/embeddings", "/models", "/extensions", "/users",
                 "/settings", "/prompt", "/object_info", "/history", "/queue", "/experiment/models",
                 "/workflow_templates", "/i18n", "/global_subgraphs", "/node_replacements"):
        for prefix in ("", "/api"):
            r = await client.get(prefix + path)
            assert r.status == 200, (prefix + path, r.status)
            await r.json()


async def test_object_info_shape(srv):
    _, client = srv
    info = await (await client.get("/api/object_info")).json()
    show = info["SrvShowInt"]
    assert show["input"]["required"]["value"] == ["INT", {"forceInput": True}]
    assert show["input_order"]["required"] == ["value"]
    assert show["input_order"]["optional"] == ["label"]
    assert show["output"] == [] and show["output_is_list"] == [] and show["output_name"] == []
    assert show["name"] == "SrvShowInt" and show["display_name"] == "Show Int (test)"
    assert show["output_node"] is True and show["category"] == "testing"
    assert show["python_module"] == "nodes"
    assert show["is_input_list"] is False and show["search_aliases"] == []
    const = info["SrvConstInt"]
    assert const["output"] == ["INT"] and const["output_is_list"] == [False] and const["output_name"] == ["INT"]
    assert const["description"] == "Outputs its value." and const["output_node"] is False
    one = await (await client.get("/object_info/SrvConstInt")).json()
    assert one == {"SrvConstInt": const}
    assert await (await client.get("/object_info/NoSuchNode")).json() == {}


async def test_broken_node_left_out_of_object_info(srv):
    import nodes

    class Broken:
        @classmethod
        def INPUT_TYPES(cls):
            raise RuntimeError("boom")

    nodes.NODE_CLASS_MAPPINGS["SrvBroken"] = Broken
    try:
        info = await (await srv[1].get("/object_info")).json()
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop("SrvBroken")
    assert "SrvBroken" not in info and "SrvConstInt" in info


async def test_system_stats_and_features(srv):
    _, client = srv
    stats = await (await client.get("/api/system_stats")).json()
    system = stats["system"]
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version",
                "installed_templates_version", "required_templates_version", "python_version",
                "pytorch_version", "embedded_python", "argv"):
        assert key in system
    assert system["required_frontend_version"] == "1.58.1"
    # the frontend iterates this as a list of {name, installed, required} (a dict makes it throw)
    versions = {p["name"]: p for p in system["comfy_package_versions"]}
    assert versions["comfyui-frontend-package"] == {"name": "comfyui-frontend-package", "installed": "1.58.1",
                                                    "required": "1.58.1"}
    dev = stats["devices"][0]
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(dev)
    features = await (await client.get("/api/features")).json()
    assert features["supports_preview_metadata"] is True
    assert features["assets"] is False
    assert features["max_upload_size"] == 1024 * 1024  # server_args sets 1 MB


async def test_models_and_embeddings(srv, base_dir):
    _, client = srv
    (base_dir / "models" / "loras" / "sub").mkdir(parents=True, exist_ok=True)
    (base_dir / "models" / "loras" / "sub" / "a.safetensors").write_bytes(b"x")
    (base_dir / "models" / "loras" / "notes.txt").write_text("ignored: wrong extension")
    (base_dir / "models" / "embeddings" / "emb1.pt").write_bytes(b"x")
    keys = await (await client.get("/api/models")).json()
    assert "loras" in keys and "checkpoints" in keys
    assert await (await client.get("/api/models/loras")).json() == ["sub/a.safetensors"]
    assert (await client.get("/api/models/nonexistent")).status == 404
    assert await (await client.get("/api/embeddings")).json() == ["emb1"]

    folders = await (await client.get("/api/experiment/models")).json()
    names = [f["name"] for f in folders]
    assert "loras" in names and "configs" not in names and "custom_nodes" not in names
    files = await (await client.get("/api/experiment/models/loras")).json()
    assert [(f["name"], f["pathIndex"], f["size"]) for f in files] == [("sub/a.safetensors", 0, 1)]
    assert (await client.get("/api/experiment/models/nope")).status == 404


async def test_model_preview_and_view_metadata(srv, base_dir):
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    _, client = srv
    ckpt = base_dir / "models" / "checkpoints" / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(ckpt), metadata={"modelspec.title": "tiny"})
    Image.new("RGB", (8, 8), (255, 0, 0)).save(base_dir / "models" / "checkpoints" / "m.png")
    r = await client.get("/api/experiment/models/preview/checkpoints/0/m.safetensors")
    assert r.status == 200 and r.content_type == "image/webp"
    assert (await client.get("/api/experiment/models/preview/checkpoints/0/..%2F..%2Fx.safetensors")).status in (
        403, 404)
    meta = await (await client.get("/api/view_metadata/checkpoints?filename=m.safetensors")).json()
    assert meta == {"modelspec.title": "tiny"}
    assert (await client.get("/api/view_metadata/checkpoints?filename=missing.safetensors")).status == 404
    assert (await client.get("/api/view_metadata/checkpoints?filename=m.ckpt")).status == 404
    assert (await client.get("/api/view_metadata/nofolder?filename=m.safetensors")).status == 404


async def test_settings_roundtrip(srv, base_dir):
    _, client = srv
    assert await (await client.get("/api/settings")).json() == {}
    r = await client.post("/api/settings", json={"Comfy.A": 1, "Comfy.B": "x"})
    assert r.status == 200
    r = await client.post("/api/settings/Comfy.B", data=json.dumps({"nested": True}))
    assert r.status == 200
    assert await (await client.get("/api/settings")).json() == {"Comfy.A": 1, "Comfy.B": {"nested": True}}
    assert await (await client.get("/api/settings/Comfy.A")).json() == 1
    assert await (await client.get("/api/settings/Missing")).json() is None
    stored = json.loads((base_dir / "user" / "default" / "comfy.settings.json").read_text())
    assert stored["Comfy.A"] == 1
    assert (await client.post("/api/settings", data="not json")).status == 400


async def test_users_single_and_multi(srv, server_args, base_dir):
    server, client = srv
    users = await (await client.get("/api/users")).json()
    assert users["storage"] == "server" and "migrated" in users
    server_args.multi_user = True
    r = await client.post("/api/users", json={"username": "Alice B"})
    user_id = await r.json()
    assert r.status == 200 and user_id.startswith("Alice-B_")
    assert (await client.post("/api/users", json={"username": "Alice B"})).status == 400
    assert (await client.post("/api/users", json={})).status == 400
    listing = await (await client.get("/api/users")).json()
    assert listing["users"] == {user_id: "Alice B"}
    # A registered user gets a separate settings file; an unknown one is refused.
    r = await client.post("/api/settings", json={"k": 2}, headers={"comfy-user": user_id})
    assert r.status == 200
    assert (base_dir / "user" / user_id / "comfy.settings.json").is_file()
    assert (await client.get("/api/settings", headers={"comfy-user": "intruder"})).status == 403


async def test_internal_routes(srv, base_dir):
    import logging
    import time

    _, client = srv
    logging.getLogger("taco.test").warning("marker-for-log-route")
    text = await (await client.get("/internal/logs")).text()
    assert "marker-for-log-route" in text
    raw = await (await client.get("/internal/logs/raw")).json()
    assert any("marker-for-log-route" in e["m"] for e in raw["entries"])
    assert set(raw["size"]) == {"cols", "rows"}
    paths = await (await client.get("/internal/folder_paths")).json()
    assert paths["checkpoints"] == [str(base_dir / "models" / "checkpoints")]
    (base_dir / "input" / "old.png").write_bytes(b"1")
    past = time.time() - 100
    os.utime(base_dir / "input" / "old.png", (past, past))
    (base_dir / "input" / "new.png").write_bytes(b"2")
    assert await (await client.get("/internal/files/input")).json() == ["new.png", "old.png"]
    assert (await client.get("/internal/files/models")).status == 400
    # /internal has no /api twin.
    assert (await client.get("/api/internal/logs")).status == 404


async def test_templates_index_and_assets(srv):
    _, client = srv
    r = await client.get("/templates/index.json")
    assert r.status == 200
    index = json.loads(await r.read())
    assert isinstance(index, list) and index and "templates" in index[0]
    name = index[0]["templates"][0]["name"]
    r = await client.get(f"/templates/{name}.json")
    assert r.status == 200
    workflow = json.loads(await r.read())
    assert "nodes" in workflow or "definitions" in workflow
    # A thumbnail from a media package, and a manifest sub-path.
    from comfyui_workflow_templates_core import iter_templates

    webp = next(a.filename for e in iter_templates() for a in e.assets if a.filename.endswith(".webp"))
    r = await client.get(f"/templates/{webp}")
    assert r.status == 200 and (await r.read())[:4] == b"RIFF"
    assert (await client.get("/templates/no_such_template.json")).status == 404
    assert (await client.get("/templates/..%2F..%2Fserver.py")).status == 404


async def test_extensions_listing_and_static(srv, tmp_path):
    server, client = srv
    listed = await (await client.get("/api/extensions")).json()
    assert listed and all(p.startswith("/extensions/core/") for p in listed)
    r = await client.get(listed[0])
    assert r.status == 200


async def test_custom_node_web_directory(base_dir, server_args, test_nodes, aiohttp_client):  # noqa: F811
    import asyncio

    import nodes
    import server as server_module

    web_dir = base_dir / "custom_nodes" / "mypack" / "js"
    web_dir.mkdir(parents=True)
    (web_dir / "ext.js").write_text("export const x = 1;")
    examples = base_dir / "custom_nodes" / "mypack" / "example_workflows"
    examples.mkdir()
    (examples / "demo.json").write_text('{"nodes": []}')
    locales = base_dir / "custom_nodes" / "mypack" / "locales" / "fr"
    locales.mkdir(parents=True)
    (locales / "main.json").write_text('{"hello": "bonjour"}')
    (locales / "nodeDefs.json").write_text('{"SrvConstInt": {"display_name": "Constante"}}')
    subgraphs = base_dir / "custom_nodes" / "mypack" / "subgraphs"
    subgraphs.mkdir()
    (subgraphs / "blur.json").write_text('{"nodes": [1]}')

    nodes.EXTENSION_WEB_DIRS["mypack"] = str(web_dir)
    try:
        s = server_module.PromptServer(asyncio.get_running_loop())
        s.add_routes()
        client = await aiohttp_client(s.app)
        listed = await (await client.get("/api/extensions")).json()
        assert "/extensions/mypack/ext.js" in listed
        r = await client.get("/extensions/mypack/ext.js")
        assert r.status == 200 and "export const x" in await r.text()
        assert await (await client.get("/api/workflow_templates")).json() == {"mypack": ["demo"]}
        r = await client.get("/api/workflow_templates/mypack/demo.json")
        assert r.status == 200
        i18n = await (await client.get("/api/i18n")).json()
        assert i18n["fr"]["hello"] == "bonjour"
        assert i18n["fr"]["nodeDefs"]["SrvConstInt"]["display_name"] == "Constante"
        graphs = await (await client.get("/api/global_subgraphs")).json()
        (gid, entry), = graphs.items()
        assert entry == {"source": "custom_node", "name": "blur", "info": {"node_pack": "mypack"}}
        full = await (await client.get(f"/api/global_subgraphs/{gid}")).json()
        assert json.loads(full["data"]) == {"nodes": [1]}
        assert (await client.get("/api/global_subgraphs/unknown")).status == 404
    finally:
        nodes.EXTENSION_WEB_DIRS.pop("mypack", None)


async def test_origin_check_and_cors(srv, server_args, base_dir, aiohttp_client):
    import asyncio

    import server as server_module

    _, client = srv
    bad = await client.post("/api/settings", json={"a": 1},
                            headers={"Host": "127.0.0.1:8188", "Origin": "http://evil.example"})
    assert bad.status == 403
    good = await client.post("/api/settings", json={"a": 1},
                             headers={"Host": "127.0.0.1:8188", "Origin": "http://127.0.0.1:8188"})
    assert good.status == 200
    # A non-loopback Host (reverse proxy, LAN) is not checked.
    lan = await client.get("/api/settings", headers={"Host": "192.168.1.5:8188", "Origin": "http://other"})
    assert lan.status == 200

    server_args.enable_cors_header = "*"
    s = server_module.PromptServer(asyncio.get_running_loop())
    s.add_routes()
    cors_client = await aiohttp_client(s.app)
    r = await cors_client.get("/api/settings", headers={"Host": "127.0.0.1:8188", "Origin": "http://evil.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    r = await cors_client.options("/api/prompt")
    assert r.status == 200 and "POST" in r.headers["Access-Control-Allow-Methods"]


async def test_embedded_docs_served(srv):
    pytest.importorskip("comfyui_embedded_docs", reason="comfyui-embedded-docs (requirements.txt) not installed")
    _, client = srv
    r = await client.get("/docs/KSampler/en.md")
    assert r.status == 200 and "KSampler" in await r.text()
    assert (await client.get("/docs/NoSuchNode/en.md")).status == 404


async def test_asset_api_disabled_but_bundle_assets_served(srv):
    server, client = srv
    r = await client.get("/api/assets?limit=10")
    assert r.status == 503 and "assets" in (await r.json())["error"]
    bundle = sorted(f for f in os.listdir(os.path.join(server.web_root, "assets")) if f.endswith(".js"))[0]
    assert (await client.get(f"/assets/{bundle}")).status == 200
