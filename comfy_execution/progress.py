"""Per-node progress of the running prompt, reported as WebSocket `progress_state` messages.

The executor creates one `ProgressRegistry` per prompt; nodes start, update and finish through it.
Every change sends the state of every node that has started (pending nodes are left out), in the shape
the frontend reads: {prompt_id, nodes: {id: {value, max, state, node_id, prompt_id, display_node_id,
parent_node_id, real_node_id}}}. `get_progress_state()` returns the registry of the running prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

RUNNING, FINISHED, ERROR = "running", "finished", "error"


class ProgressRegistry:
    def __init__(self, prompt_id: str, dynprompt: Any = None,
                 send: Callable[[str, dict], None] | None = None):
        self.prompt_id = prompt_id
        self.dynprompt = dynprompt
        self.send = send
        self.nodes: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _ids(self, node_id: str) -> dict:
        dp = self.dynprompt
        if dp is None:
            return {"display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}
        return {"display_node_id": dp.get_display_node_id(node_id),
                "parent_node_id": dp.get_parent_node_id(node_id),
                "real_node_id": dp.get_real_node_id(node_id)}

    def _set(self, node_id: str, **fields: Any) -> None:
        with self._lock:
            entry = self.nodes.setdefault(node_id, {"value": 0.0, "max": 1.0, "state": RUNNING})
            entry.update(fields)
            snapshot = {nid: {"value": e["value"], "max": e["max"], "state": e["state"], "node_id": nid,
                              "prompt_id": self.prompt_id, **self._ids(nid)}
                        for nid, e in self.nodes.items()}
        if self.send is not None:
            self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": snapshot})

    def start_progress(self, node_id: str) -> None:
        self._set(node_id, value=0.0, max=1.0, state=RUNNING)

    def update_progress(self, node_id: str, value: float, max_value: float, image: Any = None) -> None:
        self._set(node_id, value=float(value), max=float(max_value), state=RUNNING)

    def finish_progress(self, node_id: str) -> None:
        entry = self.nodes.get(node_id)
        top = entry["max"] if entry else 1.0
        self._set(node_id, value=top, max=top, state=FINISHED)

    def error_progress(self, node_id: str) -> None:
        self._set(node_id, state=ERROR)

    def state_of(self, node_id: str) -> str | None:
        entry = self.nodes.get(node_id)
        return entry["state"] if entry else None


_current = ProgressRegistry("")


def get_progress_state() -> ProgressRegistry:
    return _current


def reset_progress_state(prompt_id: str, dynprompt: Any = None,
                         send: Callable[[str, dict], None] | None = None) -> ProgressRegistry:
    global _current
    _current = ProgressRegistry(prompt_id, dynprompt, send)
    return _current
