"""Shared fixtures for the server tests (no tests here): a PromptServer on aiohttp's test client.

The queue is the real `execution.PromptQueue` when execution.py exists, else `ContractQueue`, a small
stand-in written from the PromptQueue contract in docs/internals.md.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import importlib.util
import os
import threading

import pytest
import pytest_asyncio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_EXECUTION = importlib.util.find_spec("execution") is not None


class ContractQueue:
    """PromptQueue as docs/internals.md specifies it; used only until the real one is importable."""

    def __init__(self, server):
        self.server = server
        self.mutex = threading.RLock()
        self.queue: list = []
        self.currently_running: dict = {}
        self.task_counter = 0
        self.history: dict = {}
        self.flags: dict = {}

    def put(self, item):
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.server.queue_updated()

    def get(self, timeout=None):
        with self.mutex:
            if not self.queue:
                return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.server.queue_updated()
            return item, i

    def task_done(self, item_id, history_result, status):
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            self.history[prompt[1]] = {"prompt": list(prompt[:5]), "outputs": history_result.get("outputs", {}),
                                       "status": status, "meta": history_result.get("meta", {})}
            self.server.queue_updated()

    def get_current_queue(self):
        with self.mutex:
            return list(self.currently_running.values()), copy.deepcopy(self.queue)

    get_current_queue_volatile = get_current_queue

    def get_tasks_remaining(self):
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self):
        with self.mutex:
            self.queue = []
            self.server.queue_updated()

    def delete_queue_item(self, fn):
        with self.mutex:
            for i, item in enumerate(self.queue):
                if fn(item):
                    self.queue.pop(i)
                    heapq.heapify(self.queue)
                    self.server.queue_updated()
                    return True
            return False

    def get_history(self, prompt_id=None, max_items=None, offset=-1):
        with self.mutex:
            if prompt_id is not None:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])} if prompt_id in self.history else {}
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = max(len(keys) - max_items, 0)
            offset = max(offset, 0)
            keys = keys[offset:offset + max_items] if max_items is not None else keys[offset:]
            return {k: copy.deepcopy(self.history[k]) for k in keys}

    def wipe_history(self):
        with self.mutex:
            self.history.clear()

    def delete_history_item(self, id_to_delete):
        with self.mutex:
            self.history.pop(id_to_delete, None)

    def set_flag(self, name, data):
        with self.mutex:
            self.flags[name] = data

    def get_flags(self, reset=True):
        with self.mutex:
            out = self.flags
            if reset:
                self.flags = {}
            else:
                out = dict(out)
            return out


def make_queue(server):
    if HAVE_EXECUTION:
        import execution

        return execution.PromptQueue(server)
    return ContractQueue(server)


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


TEST_NODES = {"SrvConstInt": SrvConstInt, "SrvShowInt": SrvShowInt}


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
