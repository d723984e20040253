"""Helpers node packs import to build dynamic sub-graphs and to block execution.

`is_link`, `ExecutionBlocker` and `GraphBuilder` are the names ComfyUI custom nodes import from
`comfy_execution.graph_utils`; the executor uses them to recognise links in a prompt, to stop
downstream nodes, and to give every expansion call a unique node-id prefix.
"""

from __future__ import annotations

import threading
from typing import Any


def is_link(obj: Any) -> bool:
    """A prompt link is a 2-item list/tuple `[source_node_id (str), output_slot (int)]`."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        return False
    # bool is an int subclass; a [str, True] pair is a constant, not a link
    return isinstance(obj[0], str) and isinstance(obj[1], int) and not isinstance(obj[1], bool)


class ExecutionBlocker:
    """Returned in place of an output value to stop every node that consumes it.

    With a message, the first blocked consumer reports it as an `execution_error`; with None the block
    is silent (used to switch branches of a graph off).
    """

    def __init__(self, message: str | None):
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


_prefix_state = threading.local()


class GraphBuilder:
    """Builds the `{"expand": graph}` dictionary a node returns to run a sub-graph.

    Node ids get a prefix unique to the expanding node and call index (set by the executor through
    `set_default_prefix`), so two expansions never collide and re-running one gives the same ids,
    which keeps the sub-graph's nodes cacheable.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix if prefix is not None else GraphBuilder.alloc_prefix()
        self.nodes: dict[str, Node] = {}
        self.id_gen = 1

    @classmethod
    def set_default_prefix(cls, prefix_root: str, call_index: int, graph_index: int = 0) -> None:
        _prefix_state.root = prefix_root
        _prefix_state.call_index = call_index
        _prefix_state.graph_index = graph_index

    @classmethod
    def alloc_prefix(cls, root: str | None = None, call_index: int | None = None,
                     graph_index: int | None = None) -> str:
        root = root if root is not None else getattr(_prefix_state, "root", "")
        call_index = call_index if call_index is not None else getattr(_prefix_state, "call_index", 0)
        if graph_index is None:
            graph_index = getattr(_prefix_state, "graph_index", 0)
            _prefix_state.graph_index = graph_index + 1
        return f"{root}.{call_index}.{graph_index}."

    def node(self, class_type: str, id: str | None = None, **kwargs: Any) -> Node:
        if id is None:
            id = str(self.id_gen)
            self.id_gen += 1
        id = self.prefix + id
        if id in self.nodes:
            return self.nodes[id]
        node = Node(id, class_type, kwargs)
        self.nodes[id] = node
        return node

    def lookup_node(self, id: str) -> Node | None:
        return self.nodes.get(self.prefix + id)

    def finalize(self) -> dict[str, dict]:
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}

    def replace_node_output(self, node_id: str, index: int, new_value: Any) -> None:
        """Point every input that reads output `index` of `node_id` at `new_value` instead."""
        node_id = self.prefix + node_id
        for node in self.nodes.values():
            for key, value in list(node.inputs.items()):
                if is_link(value) and value[0] == node_id and value[1] == index:
                    if new_value is None:
                        del node.inputs[key]
                    else:
                        node.inputs[key] = new_value

    def remove_node(self, id: str) -> None:
        self.nodes.pop(self.prefix + id, None)


class Node:
    def __init__(self, id: str, class_type: str, inputs: dict[str, Any]):
        self.id = id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id: str | None = None

    def out(self, index: int) -> list:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key: str) -> Any:
        return self.inputs.get(key)

    def set_override_display_id(self, override_display_id: str) -> None:
        self.override_display_id = override_display_id

    def serialize(self) -> dict:
        out: dict[str, Any] = {"class_type": self.class_type, "inputs": dict(self.inputs)}
        if self.override_display_id is not None:
            out["override_display_id"] = self.override_display_id
        return out


def add_graph_prefix(graph: dict, outputs: list, prefix: str) -> tuple[dict, list]:
    """Prefix every node id (and every internal link) of a finalized graph; returns (graph, outputs)."""
    new_graph = {}
    for node_id, info in graph.items():
        inputs = {k: ([prefix + v[0], v[1]] if is_link(v) and v[0] in graph else v)
                  for k, v in info.get("inputs", {}).items()}
        new_graph[prefix + node_id] = {**info, "inputs": inputs}
    new_outputs = [[prefix + o[0], o[1]] if is_link(o) and o[0] in graph else o for o in outputs]
    return new_graph, new_outputs
