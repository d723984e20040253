"""Output and node-object caches kept between prompts.

A node's output is stored under its *signature*: its class, its IS_CHANGED result, its node id when
the class is NOT_IDEMPOTENT, its sorted inputs (constants as given, links as
("ANCESTOR", index-of-ancestor, slot)), followed by the same for every ancestor in a fixed order. Two
prompts that give a node the same signature reuse its output, so an unchanged node is not re-run and a
changed input re-runs exactly its descendants.

Policies (the `--cache-*` flags):
- "classic": keeps the entries whose signatures appear in the current prompt, drops the rest.
- "lru": keeps up to N entries across prompts, evicting the least recently used ones.
- "none": keeps outputs only while the prompt runs.
Node instances (one per node id and class) are kept in a separate cache in every policy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import nodes
from comfy_execution.graph import DynamicPrompt
from comfy_execution.graph_utils import is_link


class CacheEntry(NamedTuple):
    outputs: list  # one list of values per output slot
    ui: dict | None


class Unhashable:
    """Stands for a value that cannot be compared (NaN, arbitrary objects): equal only to itself."""

    __slots__ = ()


def to_hashable(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        # NaN from IS_CHANGED means "always re-run": give it a key that never matches again.
        return Unhashable()
    if isinstance(obj, (int, float, str, bool, bytes, type(None))):
        return obj
    if isinstance(obj, dict):
        return frozenset((to_hashable(k), to_hashable(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(to_hashable(x) for x in obj)
    if isinstance(obj, (set, frozenset)):
        return frozenset(to_hashable(x) for x in obj)
    return Unhashable()


class InputSignatureKeys:
    """Computes (once per prompt) the signature key of any node of a DynamicPrompt."""

    def __init__(self, dynprompt: DynamicPrompt, is_changed: Callable[[str], Any]):
        self.dynprompt = dynprompt
        self.is_changed = is_changed
        self.keys: dict[str, Any] = {}

    def get(self, node_id: str) -> Any:
        if node_id not in self.keys:
            self.keys[node_id] = self._signature(node_id)
        return self.keys[node_id]

    def _ordered_ancestry(self, node_id: str) -> tuple[list[str], dict[str, int]]:
        order: dict[str, int] = {}
        ancestors: list[str] = []
        stack = [node_id]
        seen = {node_id}
        while stack:
            current = stack.pop(0)
            if not self.dynprompt.has_node(current):
                continue
            inputs = self.dynprompt.get_node(current).get("inputs") or {}
            for name in sorted(inputs):
                value = inputs[name]
                if is_link(value) and value[0] not in seen:
                    seen.add(value[0])
                    order[value[0]] = len(ancestors)
                    ancestors.append(value[0])
                    stack.append(value[0])
        return ancestors, order

    def _immediate(self, node_id: str, order: dict[str, int]) -> list:
        if not self.dynprompt.has_node(node_id):
            return [float("nan")]  # a dangling link: never cache
        node = self.dynprompt.get_node(node_id)
        class_type = node["class_type"]
        class_def = nodes.NODE_CLASS_MAPPINGS.get(class_type)
        sig: list = [class_type, self.is_changed(node_id)]
        if class_def is not None and getattr(class_def, "NOT_IDEMPOTENT", False):
            sig.append(node_id)
        inputs = node.get("inputs") or {}
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                sig.append((name, ("ANCESTOR", order.get(value[0], -1), value[1])))
            else:
                sig.append((name, value))
        return sig

    def _signature(self, node_id: str) -> Any:
        ancestors, order = self._ordered_ancestry(node_id)
        sig = [self._immediate(node_id, order)]
        sig.extend(self._immediate(a, order) for a in ancestors)
        return to_hashable(sig)


class OutputCache:
    """Base policy: signature-keyed storage; subclasses decide what survives between prompts."""

    def __init__(self) -> None:
        self.store: dict[Any, CacheEntry] = {}
        self.keys: InputSignatureKeys | None = None
        self.prompt_node_ids: list[str] = []

    def set_prompt(self, dynprompt: DynamicPrompt, node_ids: Any, is_changed: Callable[[str], Any]) -> None:
        self.keys = InputSignatureKeys(dynprompt, is_changed)
        self.prompt_node_ids = list(node_ids)
        for node_id in self.prompt_node_ids:
            self.keys.get(node_id)
        self.clean_unused()

    def clean_unused(self) -> None:
        pass

    def _key(self, node_id: str) -> Any:
        if self.keys is None:
            raise RuntimeError("set_prompt must be called before the output cache is used")
        return self.keys.get(node_id)

    def get(self, node_id: str) -> CacheEntry | None:
        return self.store.get(self._key(node_id))

    def set(self, node_id: str, entry: CacheEntry) -> None:
        self.store[self._key(node_id)] = entry

    def all_node_ids(self) -> list[str]:
        """Node ids (of the current prompt and its expansions) whose outputs are available."""
        if self.keys is None:
            return []
        return [n for n, k in self.keys.keys.items() if k in self.store]

    def prompt_done(self) -> None:
        pass

    def clear(self) -> None:
        self.store.clear()


class ClassicCache(OutputCache):
    def clean_unused(self) -> None:
        live = {self.keys.get(n) for n in self.prompt_node_ids}
        for key in [k for k in self.store if k not in live]:
            del self.store[key]


class LRUCache(OutputCache):
    def __init__(self, max_size: int):
        super().__init__()
        if max_size < 1:
            raise ValueError(f"--cache-lru needs a size of at least 1 (got {max_size})")
        self.max_size = max_size
        self.store = OrderedDict()

    def get(self, node_id: str) -> CacheEntry | None:
        key = self._key(node_id)
        entry = self.store.get(key)
        if entry is not None:
            self.store.move_to_end(key)
        return entry

    def set(self, node_id: str, entry: CacheEntry) -> None:
        key = self._key(node_id)
        self.store[key] = entry
        self.store.move_to_end(key)

    def prompt_done(self) -> None:
        # Evict only between prompts: a running prompt may still need everything it produced.
        while len(self.store) > self.max_size:
            self.store.popitem(last=False)


class NoneCache(OutputCache):
    def clean_unused(self) -> None:
        self.store.clear()

    def prompt_done(self) -> None:
        self.store.clear()


class ObjectCache:
    """One node instance per (node id, class); instances of nodes no longer in the prompt are dropped."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Any] = {}

    def set_prompt(self, dynprompt: DynamicPrompt, node_ids: Any) -> None:
        live = {(n, dynprompt.get_node(n)["class_type"]) for n in node_ids}
        for key in [k for k in self.objects if k not in live]:
            del self.objects[key]

    def get(self, node_id: str, class_type: str) -> Any:
        return self.objects.get((node_id, class_type))

    def set(self, node_id: str, class_type: str, obj: Any) -> None:
        self.objects[(node_id, class_type)] = obj

    def clear(self) -> None:
        self.objects.clear()


class CacheSet:
    def __init__(self, cache_type: str = "classic", cache_args: dict | None = None):
        cache_args = cache_args or {}
        if cache_type == "classic":
            self.outputs: OutputCache = ClassicCache()
        elif cache_type == "lru":
            self.outputs = LRUCache(int(cache_args.get("lru", 0)))
        elif cache_type == "none":
            self.outputs = NoneCache()
        else:
            raise ValueError(f"Unknown cache type {cache_type!r}; use 'classic', 'lru' or 'none'")
        self.cache_type = cache_type
        self.objects = ObjectCache()

    def set_prompt(self, dynprompt: DynamicPrompt, node_ids: Any, is_changed: Callable[[str], Any]) -> None:
        self.outputs.set_prompt(dynprompt, node_ids, is_changed)
        self.objects.set_prompt(dynprompt, node_ids)

    def clear(self) -> None:
        self.outputs.clear()
        self.objects.clear()
