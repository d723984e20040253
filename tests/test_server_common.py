"""Shared fixtures for the server tests (no tests here): a PromptServer on aiohttp's test client,
with the real `execution.PromptQueue`, and two tiny node classes registered for the test."""

from __future__ import annotations

import asyncio
import os

import pytest
import pytest_asyncio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_queue(server):
    import execution

    return execution.PromptQueue(server)


# --- tiny nodes ------------------------------------------------------------------------------------

class SrvConstInt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "testing"
    DESCRIPTION = "Outputs its value."

    def run(self, value):
        return (value,)


class SrvShowInt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})},
                "optional": {"label": ("STRING", {"default": "n"})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, value, label="n", unique_id=None):
        return {"ui": {"text": [f"{label}={value * 2}"]}}


class SrvPreviewSteps:
    """Reports `steps` progress steps with a preview image each, and a progress text; waits on GATE."""

    GATE = None  # a threading.Event a test may set to hold the node at its first step

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True}),
                             "steps": ("INT", {"default": 2, "min": 1, "max": 10})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, value, steps, unique_id=None):
        from PIL import Image

        import comfy.utils
        import server

        server.PromptServer.instance.send_progress_text("working", unique_id)
        bar = comfy.utils.ProgressBar(steps)
        for i in range(steps):
            gate = SrvPreviewSteps.GATE
            if gate is not None:
                gate.wait(10)
            bar.update_absolute(i + 1, steps, ("JPEG", Image.new("RGB", (1024, 512), (200, 10, 10)), None))
        return (value + steps,)


TEST_NODES = {"SrvConstInt": SrvConstInt, "SrvShowInt": SrvShowInt, "SrvPreviewSteps": SrvPreviewSteps}


@pytest.fixture
def test_nodes():
    import nodes

    added = {k: v for k, v in TEST_NODES.items() if k not in nodes.NODE_CLASS_MAPPINGS}
    nodes.NODE_CLASS_MAPPINGS.update(added)
    nodes.NODE_DISPLAY_NAME_MAPPINGS["SrvShowInt"] = "Show Int (test)"
    yield TEST_NODES
    for k in added:
        nodes.NODE_CLASS_MAPPINGS.pop(k, None)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.pop("SrvShowInt", None)


@pytest.fixture
def server_args(monkeypatch):
    """The shared comfy.cli_args namespace with defaults; tests monkeypatch fields before the server starts."""
    from comfy.cli_args import args

    monkeypatch.setattr(args, "max_upload_size", 1.0)
    monkeypatch.setattr(args, "enable_cors_header", None)
    monkeypatch.setattr(args, "front_end_root", None)
    monkeypatch.setattr(args, "multi_user", False)
    monkeypatch.setattr(args, "preview_size", 512)
    monkeypatch.setattr(args, "tls_keyfile", None)
    monkeypatch.setattr(args, "tls_certfile", None)
    return args


@pytest_asyncio.fixture
async def srv(base_dir, server_args, test_nodes, aiohttp_client):
    """(server, client): a PromptServer with a queue, all routes and a running publish loop."""
    import server as server_module

    prompt_server = server_module.PromptServer(asyncio.get_running_loop())
    prompt_server.prompt_queue = make_queue(prompt_server)
    prompt_server.add_routes()
    publisher = asyncio.create_task(prompt_server.publish_loop())
    client = await aiohttp_client(prompt_server.app)
    yield prompt_server, client
    publisher.cancel()
    await asyncio.gather(publisher, return_exceptions=True)
    server_module.PromptServer.instance = None


async def receive_json_until(ws, wanted_type: str, timeout: float = 10.0) -> list[dict]:
    """JSON messages received up to and including the first of type `wanted_type` (binary frames skipped)."""
    seen = []

    async def _read():
        while True:
            msg = await ws.receive()
            if msg.type.name == "TEXT":
                import json

                data = json.loads(msg.data)
                seen.append(data)
                if data["type"] == wanted_type:
                    return

    await asyncio.wait_for(_read(), timeout)
    return seen
