"""Replaying a whole transformer forward as one CUDA graph.

At small per-GPU token counts (Flux 1024² over 4 GPUs is 1152 tokens a rank) an eager step is bound by
kernel launches and collective synchronisation, not arithmetic: ~2000 launches a step. A CUDA graph
captures the forward once per input signature (collectives included: NCCL supports capture once the
communicators exist, hence the eager warm-up runs) and replays it with one launch.

`CUDAGraphCallable(fn)` is a drop-in for `fn(*tensors, **kwargs)` whose tensor arguments keep their
shapes between calls; non-tensor arguments are part of the cache key. The returned tensor is a fresh
copy, so a later replay never overwrites what a caller still holds.
"""

from __future__ import annotations

import logging
import uuid
import weakref

import torch

from comfy.taco_dit.utils import graph_memsets


def _signature(value):
    if isinstance(value, uuid.UUID):
        # the sampler tags each conditioning with a fresh uuid per prompt (transformer_options["uuids"]);
        # bookkeeping only, never compute: keying on it would re-capture the graph on every prompt
        return ("U",)
    if torch.is_tensor(value):
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, _signature(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    try:
        hash(value)
        return ("V", value)
    except TypeError:
        return ("I", id(value))


def _copy_into(static, value):
    if torch.is_tensor(static):
        static.copy_(value)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)
    elif isinstance(static, dict):
        # the model may add keys to its options dict while it runs (block_index, ...): copy what the
        # caller passed, which the signature guarantees matches what was captured
        for k in value:
            if k in static:
                _copy_into(static[k], value[k])


def _clone_inputs(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, list):
        return [_clone_inputs(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_inputs(v) for k, v in value.items()}
    return value


_instances: weakref.WeakSet = weakref.WeakSet()


def release_all_graphs() -> int:
    """Drop every captured graph (their memory pools and what they captured, e.g. NCCL work and symmetric
    buffers) before the process group is torn down; returns how many were dropped. The wrappers stay usable
    and would capture again."""
    n = 0
    if torch.cuda.is_available() and any(w.graphs for w in list(_instances)):
        torch.cuda.synchronize()  # no graph is dropped while a replay of it may still run
    for wrapper in list(_instances):
        n += len(wrapper.graphs)
        wrapper.graphs.clear()
    return n


class CUDAGraphCallable:
    def __init__(self, fn, warmup: int = 2, max_graphs: int = 4):
        self.fn = fn
        self.warmup = warmup
        # each graph keeps its activations' memory: a user trying many resolutions must not pile them up
        self.max_graphs = max_graphs
        self.graphs: dict = {}
        self.failed = False
        _instances.add(self)

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        key = _signature((args, kwargs))
        entry = self.graphs.pop(key, None)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                del self.graphs[next(iter(self.graphs))]  # least recently used
            try:
                entry = self._capture(args, kwargs)
            except RuntimeError as e:
                # e.g. the forward syncs with the host or copies a CPU tensor while capturing: run it
                # eagerly from now on rather than failing the user's prompt
                self.failed = True
                self.graphs.clear()
                logging.getLogger(__name__).warning(
                    "CUDA graph capture failed (%s); running this model without CUDA graphs", e)
                torch.cuda.synchronize()
                return self.fn(*args, **kwargs)
        self.graphs[key] = entry
        static_args, static_kwargs, graph, out = entry
        _copy_into(static_args, args)
        _copy_into(static_kwargs, kwargs)
        graph.replay()
        return out.clone()

    def _capture(self, args, kwargs):
        static_args, static_kwargs = _clone_inputs(args), _clone_inputs(kwargs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = graph_memsets.new_graph()
        with torch.cuda.graph(graph):
            out = self.fn(*static_args, **static_kwargs)
        graph_memsets.finish(graph)
        return static_args, static_kwargs, graph, out
