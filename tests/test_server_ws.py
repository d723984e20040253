"""/ws: status on connect, feature flags, addressing, thread-safe ordered delivery, binary frames, and
one tiny graph run end to end through HTTP + WebSocket with the real executor and prompt worker."""
# Fixtures are shared by importing them by name, which ruff reads as redefinitions:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading

import pytest
from PIL import Image

from tests.test_server_common import (  # noqa: F401  (fixtures)
    SrvPreviewSteps,
    receive_json_until,
    server_args,
    srv,
    test_nodes,
)

pytestmark = pytest.mark.asyncio

CLIENT_FLAGS = {"supports_preview_metadata": True, "supports_manager_v4_ui": True,
                "supports_progress_text_metadata": True}


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def connect(client, client_id=None, flags=None):
    ws = await client.ws_connect("/ws" + (f"?clientId={client_id}" if client_id else ""))
    status = await ws.receive_json(timeout=5)
    if flags is not None:
        await ws.send_json({"type": "feature_flags", "data": flags})
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "feature_flags"
    return ws, status


async def test_status_on_connect_with_sid(srv):
    _, client = srv
    ws, status = await connect(client)
    assert status["type"] == "status"
    assert status["data"]["status"] == {"exec_info": {"queue_remaining": 0}}
    sid = status["data"]["sid"]
    assert len(sid) == 32
    ws2, status2 = await connect(client, "my-client")
    assert status2["data"]["sid"] == "my-client"
    await ws.close()
    await ws2.close()


async def test_feature_flags_exchange(srv):
    server, client = srv
    ws = await client.ws_connect("/api/ws?clientId=c1")
    await ws.receive_json(timeout=5)
    await ws.send_json({"type": "feature_flags", "data": CLIENT_FLAGS})
    reply = await ws.receive_json(timeout=5)
    assert reply["type"] == "feature_flags"
    assert reply["data"]["supports_preview_metadata"] is True
    assert reply["data"]["max_upload_size"] == 1024 * 1024
    assert reply["data"]["assets"] is False and reply["data"]["node_replacements"] is True
    assert server.client_supports("c1", "supports_preview_metadata")
    assert not server.client_supports("c1", "something_else")
    await ws.close()


async def test_send_sync_from_thread_ordered_and_addressed(srv):
    server, client = srv
    a, _ = await connect(client, "a")
    b, _ = await connect(client, "b")

    def worker():
        for i in range(50):
            server.send_sync("progress", {"value": i, "max": 50}, "a")
        server.send_sync("execution_interrupted", {"prompt_id": "p"})  # sid None: everyone

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    got = await receive_json_until(a, "execution_interrupted")
    assert [m["data"]["value"] for m in got if m["type"] == "progress"] == list(range(50))
    only_b = await receive_json_until(b, "execution_interrupted")
    assert [m["type"] for m in only_b] == ["execution_interrupted"]  # b got none of a's messages

    server.queue_updated()  # broadcast status
    for ws in (a, b):
        msg = await ws.receive_json(timeout=5)
        assert msg == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}
    await a.close()
    await b.close()


async def test_binary_preview_and_text_frames(srv, server_args):
    import server as server_module

    server, client = srv
    plain, _ = await connect(client, "plain", flags={})
    meta, _ = await connect(client, "meta", flags=CLIENT_FLAGS)
    big = Image.new("RGB", (2048, 1024), (0, 128, 255))

    noisy = Image.effect_noise((2048, 1024), 64).convert("RGB")  # detail, so JPEG quality shows in size
    server.send_sync(server_module.BinaryEventTypes.UNENCODED_PREVIEW_IMAGE,
                     ("JPEG", noisy, server_args.preview_size), "plain")
    frame = await plain.receive_bytes(timeout=10)
    event, fmt = struct.unpack(">II", frame[:8])
    assert (event, fmt) == (1, 1)
    img = Image.open(io.BytesIO(frame[8:]))
    assert img.format == "JPEG" and img.size == (512, 256)  # fitted to --preview-size 512
    # JPEG quality 95: re-encoding the decoded frame at q95 gives back about the same size (q75 is ~half).
    assert abs(len(frame[8:]) - len(_jpeg(img, 95))) < 0.1 * len(frame[8:])
    server.send_sync(server_module.BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, ("JPEG", big, None), "plain")
    frame = await plain.receive_bytes(timeout=10)
    assert Image.open(io.BytesIO(frame[8:])).size == (2048, 1024)  # None: full size

    server.send_sync(server_module.BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA,
                     (("PNG", big, 64), {"node_id": "5", "prompt_id": "p1", "display_node_id": "5",
                                         "parent_node_id": None, "real_node_id": "5"}), "meta")
    frame = await meta.receive_bytes(timeout=10)
    (event, length) = struct.unpack(">II", frame[:8])
    assert event == 4
    info = json.loads(frame[8:8 + length])
    assert info["node_id"] == "5" and info["prompt_id"] == "p1" and info["image_type"] == "image/png"
    img = Image.open(io.BytesIO(frame[8 + length:]))
    assert img.format == "PNG" and img.size == (64, 32)

    # With a metadata event, a client that did not advertise support still gets a type 1 frame.
    server.send_sync(server_module.BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA,
                     (("JPEG", big, 64), {"node_id": "5"}), "plain")
    assert struct.unpack(">I", (await plain.receive_bytes(timeout=10))[:4])[0] == 1

    server.send_progress_text("hello ✓", "12", "plain")
    frame = await plain.receive_bytes(timeout=5)
    event, n = struct.unpack(">II", frame[:8])
    assert event == 3 and frame[8:8 + n] == b"12" and frame[8 + n:].decode() == "hello ✓"
    await plain.close()
    await meta.close()


async def test_reconnect_replaces_socket_and_resends_executing(srv):
    server, client = srv
    first, _ = await connect(client, "same")
    server.client_id, server.last_node_id = "same", "7"
    second, _ = await connect(client, "same")
    msg = await second.receive_json(timeout=5)
    assert msg == {"type": "executing", "data": {"node": "7"}}
    assert server.sockets["same"] is not None and len([s for s in server.sockets if s == "same"]) == 1
    server.client_id = server.last_node_id = None
    await first.close()
    await second.close()


@pytest.fixture
def worker(srv):
    """The real PromptExecutor and main.prompt_worker on a daemon thread, as main.py runs them."""
    import execution
    import main

    server, _ = srv
    executor = execution.PromptExecutor(server, cache_type="classic")
    thread = threading.Thread(target=main.prompt_worker, args=(server.prompt_queue, server, executor),
                              daemon=True)
    thread.start()
    return executor


async def test_end_to_end_graph_through_http_and_ws(srv, worker):
    server, client = srv
    ws, _ = await connect(client, "e2e", flags=CLIENT_FLAGS)
    prompt = {"1": {"class_type": "SrvConstInt", "inputs": {"value": 5}},
              "2": {"class_type": "SrvPreviewSteps", "inputs": {"value": ["1", 0], "steps": 2}},
              "3": {"class_type": "SrvShowInt", "inputs": {"value": ["2", 0], "label": "out"}}}
    r = await client.post("/api/prompt", json={"prompt": prompt, "client_id": "e2e"})
    assert r.status == 200
    prompt_id = (await r.json())["prompt_id"]

    messages, binary = [], []

    async def read_until_idle():
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type.name == "BINARY":
                binary.append(msg.data)
                continue
            data = json.loads(msg.data)
            messages.append(data)
            if data["type"] == "executing" and data["data"]["node"] is None:
                return

    await asyncio.wait_for(read_until_idle(), 60)
    types = [m["type"] for m in messages]
    assert "execution_start" in types and "execution_success" in types
    assert types.index("execution_start") < types.index("execution_success")
    executed = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed == [{"node": "3", "display_node": "3", "output": {"text": ["out=14"]},
                         "prompt_id": prompt_id}]
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "2"), (2, 2, "2")]
    # Two previews as type-4 frames carrying the node they belong to, and one progress text frame.
    previews = [b for b in binary if struct.unpack(">I", b[:4])[0] == 4]
    assert len(previews) == 2
    length = struct.unpack(">I", previews[0][4:8])[0]
    meta = json.loads(previews[0][8:8 + length])
    assert meta["node_id"] == "2" and meta["prompt_id"] == prompt_id and meta["image_type"] == "image/jpeg"
    texts = [b for b in binary if struct.unpack(">I", b[:4])[0] == 3]
    assert len(texts) == 1 and texts[0].endswith(b"working")

    history = await (await client.get(f"/api/history/{prompt_id}")).json()
    assert history[prompt_id]["outputs"] == {"3": {"text": ["out=14"]}}
    assert history[prompt_id]["status"]["status_str"] == "success"
    job = await (await client.get(f"/api/jobs/{prompt_id}")).json()
    assert job["status"] == "completed" and job["outputs_count"] == 1
    assert job["execution_end_time"] >= job["execution_start_time"]
    await ws.close()


async def test_end_to_end_cancel_running_job(srv, worker):
    server, client = srv
    ws, _ = await connect(client, "c", flags={})
    gate = threading.Event()
    SrvPreviewSteps.GATE = gate
    try:
        prompt = {"1": {"class_type": "SrvConstInt", "inputs": {"value": 1}},
                  "2": {"class_type": "SrvPreviewSteps", "inputs": {"value": ["1", 0], "steps": 3}},
                  "3": {"class_type": "SrvShowInt", "inputs": {"value": ["2", 0]}}}
        prompt_id = (await (await client.post("/api/prompt", json={"prompt": prompt, "client_id": "c"})).json())[
            "prompt_id"]
        await receive_json_until(ws, "executing", timeout=30)  # the prompt is running
        jobs = await (await client.get("/api/jobs?status=in_progress")).json()
        assert [j["id"] for j in jobs["jobs"]] == [prompt_id]
        assert await (await client.post(f"/api/jobs/{prompt_id}/cancel")).json() == {"cancelled": True}
        gate.set()
        got = await receive_json_until(ws, "execution_interrupted", timeout=30)
        assert got[-1]["data"]["prompt_id"] == prompt_id
        for _ in range(100):
            job = await (await client.get(f"/api/jobs/{prompt_id}")).json()
            if job["status"] != "in_progress":
                break
            await asyncio.sleep(0.05)
        assert job["status"] == "cancelled"
    finally:
        SrvPreviewSteps.GATE = None
        gate.set()
    await ws.close()


class SrvSolidImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 8, "min": 1, "max": 64})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, width):
        import torch

        image = torch.zeros(2, 4, width, 3)
        image[..., 1] = 1.0  # green
        return (image,)


async def test_websocket_image_save_example_node(srv, worker):
    import os

    import nodes

    server, client = srv
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom_nodes",
                        "websocket_image_save.py")
    saved_mapping = nodes.NODE_CLASS_MAPPINGS.get("SaveImageWebsocket")
    assert nodes.load_custom_node(path)
    nodes.NODE_CLASS_MAPPINGS["SrvSolidImage"] = SrvSolidImage
    try:
        ws, _ = await connect(client, "api-client", flags={})
        prompt = {"1": {"class_type": "SrvSolidImage", "inputs": {"width": 6}},
                  "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
        r = await client.post("/api/prompt", json={"prompt": prompt, "client_id": "api-client"})
        assert r.status == 200, await r.text()
        frames = []

        async def read():
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type.name == "BINARY":
                    frames.append(msg.data)
                elif json.loads(msg.data)["type"] == "execution_success":
                    return

        await asyncio.wait_for(read(), 60)
        assert len(frames) == 2
        for frame in frames:
            assert struct.unpack(">II", frame[:8]) == (1, 2)  # preview frame, PNG
            img = Image.open(io.BytesIO(frame[8:]))
            assert img.size == (6, 4) and img.getpixel((0, 0))[:3] == (0, 255, 0)
        await ws.close()
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop("SrvSolidImage", None)
        if saved_mapping is None:
            nodes.NODE_CLASS_MAPPINGS.pop("SaveImageWebsocket", None)
        else:
            nodes.NODE_CLASS_MAPPINGS["SaveImageWebsocket"] = saved_mapping
