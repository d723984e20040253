"""The prompt as the executor sees it, and the order nodes run in.

`DynamicPrompt` is the submitted prompt plus the ephemeral nodes that node expansion adds while it runs.
`ExecutionList` is a staged topological sort over the ancestors of the requested outputs: a node
becomes runnable once every linked input it needs (lazy inputs only once asked for) has an output in
the output cache. Cached ancestors are never added, so an unchanged part of the graph is not re-run.
"""

from __future__ import annotations

from typing import Any

import nodes
from comfy_execution.graph_utils import ExecutionBlocker, is_link

__all__ = ["DynamicPrompt", "ExecutionList", "ExecutionBlocker", "DependencyCycleError",
           "NodeInputError", "NodeNotFoundError", "get_input_info"]


class DependencyCycleError(Exception):
    pass


class NodeInputError(Exception):
    pass


class NodeNotFoundError(Exception):
    pass


class DynamicPrompt:
    def __init__(self, original_prompt: dict):
        # The user's prompt is never modified; ephemeral nodes live beside it.
        self.original_prompt = original_prompt
        self.ephemeral_prompt: dict[str, dict] = {}
        self.ephemeral_parents: dict[str, str] = {}
        self.ephemeral_display: dict[str, str] = {}

    def get_node(self, node_id: str) -> dict:
        if node_id in self.ephemeral_prompt:
            return self.ephemeral_prompt[node_id]
        if node_id in self.original_prompt:
            return self.original_prompt[node_id]
        raise NodeNotFoundError(f"Node {node_id} not found")

    def has_node(self, node_id: str) -> bool:
        return node_id in self.original_prompt or node_id in self.ephemeral_prompt

    def add_ephemeral_node(self, node_id: str, node_info: dict, parent_id: str, display_id: str) -> None:
        self.ephemeral_prompt[node_id] = node_info
        self.ephemeral_parents[node_id] = parent_id
        self.ephemeral_display[node_id] = display_id

    def get_real_node_id(self, node_id: str) -> str:
        while node_id in self.ephemeral_parents:
            node_id = self.ephemeral_parents[node_id]
        return node_id

    def get_parent_node_id(self, node_id: str) -> str | None:
        return self.ephemeral_parents.get(node_id)

    def get_display_node_id(self, node_id: str) -> str:
        while node_id in self.ephemeral_display:
            node_id = self.ephemeral_display[node_id]
        return node_id

    def all_node_ids(self) -> set[str]:
        return set(self.original_prompt) | set(self.ephemeral_prompt)

    def get_original_prompt(self) -> dict:
        return self.original_prompt


def get_input_info(class_def: type, input_name: str, valid_inputs: dict | None = None
                   ) -> tuple[Any, str | None, dict | None]:
    """(type, "required"|"optional"|"hidden", options) of one declared input; (None, None, None) if undeclared.

    A legacy combo is declared as a bare list of options: its type is that list.
    """
    if valid_inputs is None:
        valid_inputs = class_def.INPUT_TYPES()
    for category in ("required", "optional", "hidden"):
        section = valid_inputs.get(category) or {}
        if input_name not in section:
            continue
        spec = section[input_name]
        if category == "hidden":
            return spec, category, {}
        if isinstance(spec, (list, tuple)) and len(spec) > 0:
            input_type = spec[0]
            info = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        else:
            input_type, info = spec, {}
        return input_type, category, info
    return None, None, None


def _node_inputs(dynprompt: DynamicPrompt, node_id: str) -> dict:
    return dynprompt.get_node(node_id).get("inputs", {}) or {}


class ExecutionList:
    """Nodes still to run and the links that hold them back.

    `is_cached(node_id)` tells whether a node's output is already available; such nodes block nothing
    and are never scheduled.
    """

    def __init__(self, dynprompt: DynamicPrompt, output_cache: Any):
        self.dynprompt = dynprompt
        self.output_cache = output_cache
        self.pending: dict[str, bool] = {}  # insertion ordered: gives a stable, readable run order
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, set[int]]] = {}  # from -> to -> sockets
        self.staged_node_id: str | None = None

    def is_cached(self, node_id: str) -> bool:
        return self.output_cache.get(node_id) is not None

    def is_empty(self) -> bool:
        return len(self.pending) == 0

    def add_node(self, node_id: str, include_lazy: bool = False) -> None:
        stack = [node_id]
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = True
            self.block_count.setdefault(current, 0)
            self.blocking.setdefault(current, {})
            node = self.dynprompt.get_node(current)
            class_def = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            valid_inputs = class_def.INPUT_TYPES() if class_def is not None else {}
            for name, value in (node.get("inputs") or {}).items():
                if not is_link(value):
                    continue
                _, _, info = get_input_info(class_def, name, valid_inputs) if class_def else (None, None, None)
                info = info or {}
                if info.get("rawLink"):
                    continue  # the node receives the link itself, not the value behind it
                if info.get("lazy") and not include_lazy:
                    continue
                from_id, slot = value[0], value[1]
                if not self.is_cached(from_id):
                    self._link(from_id, slot, current)
                    stack.append(from_id)

    def _link(self, from_id: str, slot: int, to_id: str) -> None:
        targets = self.blocking.setdefault(from_id, {})
        if to_id not in targets:
            targets[to_id] = set()
            self.block_count[to_id] = self.block_count.get(to_id, 0) + 1
        targets[to_id].add(slot)

    def add_strong_link(self, from_id: str, from_socket: int, to_id: str) -> None:
        """Make `to_id` wait for `from_id` (adding `from_id` and its ancestors if needed)."""
        if self.is_cached(from_id):
            return
        self.add_node(from_id)
        self._link(from_id, from_socket, to_id)

    def make_input_strong_link(self, to_id: str, to_input: str) -> None:
        link = _node_inputs(self.dynprompt, to_id)[to_input]
        if not is_link(link):
            raise NodeInputError(f"Input {to_input} of node {to_id} is not a link")
        self.add_strong_link(link[0], link[1], to_id)

    def _is_output(self, node_id: str) -> bool:
        class_def = nodes.NODE_CLASS_MAPPINGS.get(self.dynprompt.get_node(node_id)["class_type"])
        return bool(getattr(class_def, "OUTPUT_NODE", False))

    def stage_node_execution(self) -> tuple[str | None, dict | None, Exception | None]:
        """Pick the next runnable node: (node_id, None, None) or (None, error_details, exception)."""
        assert self.staged_node_id is None, "a node is already staged"
        if self.is_empty():
            return None, None, None
        ready = [n for n in self.pending if self.block_count.get(n, 0) == 0]
        if not ready:
            cycle = self._cycle_nodes()
            blamed = cycle[0] if cycle else next(iter(self.pending))
            ex = DependencyCycleError("Dependency cycle detected")
            error = {"node_id": blamed, "exception_message": str(ex),
                     "exception_type": "graph.DependencyCycleError", "traceback": [],
                     "current_inputs": []}
            return None, error, ex
        # Output nodes first: the user sees results as soon as they can exist.
        outputs = [n for n in ready if self._is_output(n)]
        self.staged_node_id = outputs[0] if outputs else ready[0]
        return self.staged_node_id, None, None

    def unstage_node_execution(self) -> None:
        self.staged_node_id = None

    def complete_node_execution(self) -> None:
        node_id = self.staged_node_id
        assert node_id is not None, "no node is staged"
        self.pending.pop(node_id, None)
        for to_id in self.blocking.pop(node_id, {}):
            self.block_count[to_id] -= 1
        self.block_count.pop(node_id, None)
        self.staged_node_id = None

    def _cycle_nodes(self) -> list[str]:
        # Peel off nodes that block nothing still pending; what remains contains the cycle.
        remaining = set(self.pending)
        changed = True
        while changed:
            changed = False
            for n in list(remaining):
                if not any(t in remaining for t in self.blocking.get(n, {})):
                    remaining.discard(n)
                    changed = True
        return [n for n in self.pending if n in remaining]
