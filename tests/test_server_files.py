"""File routes: /view, /upload/image, /upload/mask, /userdata and /v2/userdata, including refusals."""
# Fixtures are shared by importing them by name, which ruff reads as redefinitions:
# ruff: noqa: F811

from __future__ import annotations

import io
import json

import aiohttp
import pytest
from PIL import Image

from tests.test_server_common import server_args, srv, test_nodes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.asyncio


def png_bytes(color=(255, 0, 0, 128), size=(16, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def form(data: bytes, filename="a.png", **fields) -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field("image", data, filename=filename, content_type="image/png")
    for k, v in fields.items():
        f.add_field(k, v)
    return f


async def test_upload_dedupe_rename_subfolder_overwrite(srv, base_dir):
    _, client = srv
    first = png_bytes()
    r = await client.post("/api/upload/image", data=form(first))
    assert r.status == 200 and await r.json() == {"name": "a.png", "subfolder": "", "type": "input"}
    # Same bytes again: deduplicated onto the existing name.
    assert (await (await client.post("/api/upload/image", data=form(first))).json())["name"] == "a.png"
    # Different bytes under the same name: "a (1).png", then "a (2).png".
    other = png_bytes((0, 255, 0, 255))
    assert (await (await client.post("/api/upload/image", data=form(other))).json())["name"] == "a (1).png"
    third = png_bytes((0, 0, 255, 255))
    assert (await (await client.post("/api/upload/image", data=form(third))).json())["name"] == "a (2).png"
    assert (base_dir / "input" / "a (1).png").read_bytes() == other
    # overwrite=true replaces in place.
    r = await client.post("/api/upload/image", data=form(third, overwrite="true"))
    assert (await r.json())["name"] == "a.png" and (base_dir / "input" / "a.png").read_bytes() == third
    # subfolder and type.
    r = await client.post("/api/upload/image", data=form(first, subfolder="clip/x", type="temp"))
    assert await r.json() == {"name": "a.png", "subfolder": "clip/x", "type": "temp"}
    assert (base_dir / "temp" / "clip" / "x" / "a.png").read_bytes() == first


async def test_upload_refusals(srv, base_dir):
    _, client = srv
    assert (await client.post("/api/upload/image", data=form(png_bytes(), subfolder="../../etc"))).status == 400
    assert not (base_dir.parent / "etc").exists()
    assert (await client.post("/api/upload/image", data=form(png_bytes(), type="models"))).status == 400
    no_file = aiohttp.FormData()
    no_file.add_field("subfolder", "x")
    assert (await client.post("/api/upload/image", data=no_file)).status == 400
    # A path in the file name is reduced to its base name, never followed.
    r = await client.post("/api/upload/image", data=form(png_bytes(), filename="../../evil.png"))
    name = (await r.json())["name"]
    assert r.status == 200 and "/" not in name and (base_dir / "input" / name).is_file()
    assert not (base_dir.parent / "evil.png").exists() and not (base_dir / "evil.png").exists()


async def test_oversize_upload_refused(srv, base_dir):
    _, client = srv  # server_args sets --max-upload-size 1 (MB)
    r = await client.post("/api/upload/image", data=form(b"\0" * (1024 * 1024 + 10), filename="big.png"))
    assert r.status == 413
    assert not (base_dir / "input" / "big.png").exists()


async def test_upload_mask_copies_alpha_into_original(srv, base_dir):
    _, client = srv
    original = Image.new("RGB", (8, 8), (10, 20, 30))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("workflow", "{}")
    original.save(base_dir / "input" / "orig.png", pnginfo=info)
    mask = png_bytes((0, 0, 0, 7), size=(8, 8))
    fields = {"original_ref": json.dumps({"filename": "orig.png", "subfolder": "", "type": "input"})}
    r = await client.post("/api/upload/mask", data=form(mask, filename="clipspace-mask.png", **fields))
    assert r.status == 200
    saved = Image.open(base_dir / "input" / (await r.json())["name"])
    assert saved.mode == "RGBA" and saved.getpixel((3, 3)) == (10, 20, 30, 7)
    assert saved.text.get("workflow") == "{}"
    bad = {"original_ref": json.dumps({"filename": "../x.png", "type": "input"})}
    assert (await client.post("/api/upload/mask", data=form(mask, **bad))).status == 400
    missing = {"original_ref": json.dumps({"filename": "nope.png", "type": "input"})}
    assert (await client.post("/api/upload/mask", data=form(mask, **missing))).status == 404


async def test_view_variants_and_refusals(srv, base_dir):
    _, client = srv
    (base_dir / "output" / "sub").mkdir(parents=True)
    (base_dir / "output" / "sub" / "img.png").write_bytes(png_bytes())
    r = await client.get("/api/view", params={"filename": "img.png", "subfolder": "sub", "type": "output"})
    assert r.status == 200 and r.content_type == "image/png"
    assert await r.read() == (base_dir / "output" / "sub" / "img.png").read_bytes()

    r = await client.get("/api/view", params={"filename": "img.png", "subfolder": "sub", "preview": "webp;50"})
    assert r.status == 200 and r.content_type == "image/webp"
    assert Image.open(io.BytesIO(await r.read())).format == "WEBP"
    r = await client.get("/api/view", params={"filename": "img.png", "subfolder": "sub", "preview": "jpeg;80"})
    assert r.content_type == "image/jpeg" and Image.open(io.BytesIO(await r.read())).format == "JPEG"

    r = await client.get("/api/view", params={"filename": "img.png", "subfolder": "sub", "channel": "rgb"})
    assert Image.open(io.BytesIO(await r.read())).mode == "RGB"
    r = await client.get("/api/view", params={"filename": "img.png", "subfolder": "sub", "channel": "a"})
    alpha = Image.open(io.BytesIO(await r.read()))
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0))[3] == 128

    # `name [output]` annotation picks the folder.
    (base_dir / "input" / "in.png").write_bytes(png_bytes())
    r = await client.get("/api/view", params={"filename": "in.png [input]", "type": "output"})
    assert r.status == 200

    assert (await client.get("/api/view", params={"filename": "../secret.png"})).status == 400
    assert (await client.get("/api/view", params={"filename": "/etc/passwd"})).status == 400
    assert (await client.get("/api/view", params={"filename": "img.png", "subfolder": "../../"})).status == 403
    assert (await client.get("/api/view", params={"filename": "img.png", "type": "models"})).status == 400
    assert (await client.get("/api/view", params={"filename": "nope.png"})).status == 404


async def test_view_serves_html_as_download(srv, base_dir):
    _, client = srv
    (base_dir / "output" / "page.html").write_text("<script>alert(1)</script>")
    r = await client.get("/view", params={"filename": "page.html"})
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Content-Disposition"].startswith("attachment")


async def test_userdata_crud(srv, base_dir):
    _, client = srv
    r = await client.post("/api/userdata/workflows%2Fa.json", data=b'{"x": 1}')
    assert r.status == 200 and await r.json() == "workflows/a.json"
    assert (base_dir / "user" / "default" / "workflows" / "a.json").read_bytes() == b'{"x": 1}'
    r = await client.get("/api/userdata/workflows%2Fa.json")
    assert r.status == 200 and await r.read() == b'{"x": 1}'
    # overwrite=false on an existing file -> 409, content unchanged.
    r = await client.post("/api/userdata/workflows%2Fa.json?overwrite=false", data=b"other")
    assert r.status == 409
    assert (base_dir / "user" / "default" / "workflows" / "a.json").read_bytes() == b'{"x": 1}'
    r = await client.post("/api/userdata/workflows%2Fsub%2Fb.json?full_info=true", data=b"{}")
    info = await r.json()
    assert info["path"] == "workflows/sub/b.json" and info["size"] == 2 and "modified" in info

    listing = await (await client.get("/api/userdata", params={"dir": "workflows", "recurse": "true"})).json()
    assert sorted(listing) == ["a.json", "sub/b.json"]
    flat = await (await client.get("/api/userdata", params={"dir": "workflows"})).json()
    assert flat == ["a.json"]
    split = await (await client.get("/api/userdata", params={"dir": "workflows/", "recurse": "true",
                                                              "split": "true"})).json()
    assert sorted(split) == [["a.json", "a.json"], ["sub/b.json", "sub", "b.json"]]
    full = await (await client.get("/api/userdata", params={"dir": "workflows/", "recurse": "true",
                                                             "full_info": "true", "split": "false"})).json()
    assert sorted(e["path"] for e in full) == ["a.json", "sub/b.json"]
    assert (await client.get("/api/userdata", params={"dir": "missing"})).status == 404
    assert (await client.get("/api/userdata")).status == 400
    assert (await client.get("/api/userdata/workflows%2F.index.json")).status == 404

    v2 = await (await client.get("/api/v2/userdata", params={"path": "workflows"})).json()
    assert v2[0] == {"name": "sub", "path": "workflows/sub", "type": "directory"}
    assert v2[1]["name"] == "a.json" and v2[1]["type"] == "file" and v2[1]["size"] == 8
    assert (await client.get("/api/v2/userdata", params={"path": "workflows/a.json"})).status == 400

    r = await client.post("/api/userdata/workflows%2Fa.json/move/workflows%2Fc.json")
    assert r.status == 200 and await r.json() == "workflows/c.json"
    (base_dir / "user" / "default" / "workflows" / "d.json").write_text("d")
    r = await client.post("/api/userdata/workflows%2Fc.json/move/workflows%2Fd.json?overwrite=false")
    assert r.status == 409
    r = await client.delete("/api/userdata/workflows%2Fc.json")
    assert r.status == 204 and not (base_dir / "user" / "default" / "workflows" / "c.json").exists()
    assert (await client.delete("/api/userdata/workflows%2Fc.json")).status == 404


async def test_userdata_traversal_refused(srv, base_dir):
    _, client = srv
    (base_dir / "secret.txt").write_text("top secret")
    (base_dir / "user" / "other").mkdir(parents=True)
    (base_dir / "user" / "other" / "x.json").write_text("{}")
    for name in ("..%2F..%2Fsecret.txt", "..%2Fother%2Fx.json", "%2E%2E%2F%2E%2E%2Fsecret.txt"):
        r = await client.get(f"/api/userdata/{name}")
        assert r.status == 403, name
        r = await client.post(f"/api/userdata/{name}", data=b"overwritten")
        assert r.status == 403, name
    assert (base_dir / "secret.txt").read_text() == "top secret"
    assert (await client.get("/api/userdata", params={"dir": "../"})).status == 403
    assert (await client.get("/api/v2/userdata", params={"path": "../other"})).status == 403
    r = await client.post("/api/userdata/a.json", data=b"{}")
    assert r.status == 200
    r = await client.post("/api/userdata/a.json/move/..%2F..%2Fmoved.json")
    assert r.status == 403 and not (base_dir / "moved.json").exists()
