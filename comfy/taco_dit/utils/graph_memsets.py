"""The memset nodes of a captured CUDA graph turned into kernel nodes that write the same bytes.

cuBLAS's Hopper GEMM kernels and cuDNN's attention clear a little workspace with cudaMemsetAsync before many
calls; captured in a graph, each becomes a memset node between two kernels. In a replayed Flux 1024² step on an
H200 the SMs sit idle 4-9 µs around each such node (kernel, memset, kernel) against under 1 µs between two
kernel nodes: 248 memsets a step on two GPUs, 286 on one (benchmarks call s52). A kernel node that writes the
same value over the same bytes, with the same dependencies, gives the graph the same meaning without the
switch.

The kernel is a few lines of PTX, loaded once per device through the driver API (ctypes on libcuda, no build
step); the graph is edited between capture and instantiation (`torch.cuda.CUDAGraph(keep_graph=True)`).
Anything unexpected (no driver symbol, an older PyTorch, a memset with edge data the query cannot return)
leaves the graph as captured. `TACO_GRAPH_MEMSETS=keep` turns the rewrite off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref

import torch

log = logging.getLogger(__name__)

_MEMSET_NODE, _BLOCK = 2, 256
# one thread per element: offset -> (row, column) over `width` elements a row, `pitch` bytes apart; elements
# of 1, 2 or 4 bytes take the low bytes of `value`, as cuMemsetD2D8/16/32 do
_PTX = rb"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry taco_memset(.param .u64 p_dst, .param .u64 p_pitch, .param .u32 p_value, .param .u32 p_esize,
                            .param .u64 p_width, .param .u64 p_total)
{
    .reg .pred %p<4>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<12>;
    ld.param.u64 %rd1, [p_dst];
    ld.param.u64 %rd2, [p_pitch];
    ld.param.u32 %r1, [p_value];
    ld.param.u32 %r2, [p_esize];
    ld.param.u64 %rd3, [p_width];
    ld.param.u64 %rd4, [p_total];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mul.wide.u32 %rd5, %r3, %r4;
    cvt.u64.u32 %rd6, %r5;
    add.u64 %rd5, %rd5, %rd6;
    setp.ge.u64 %p1, %rd5, %rd4;
    @%p1 bra DONE;
    div.u64 %rd7, %rd5, %rd3;
    rem.u64 %rd8, %rd5, %rd3;
    cvt.u64.u32 %rd9, %r2;
    mul.lo.u64 %rd8, %rd8, %rd9;
    mad.lo.u64 %rd10, %rd7, %rd2, %rd1;
    add.u64 %rd10, %rd10, %rd8;
    setp.eq.u32 %p2, %r2, 4;
    @%p2 st.global.b32 [%rd10], %r1;
    @%p2 bra DONE;
    setp.eq.u32 %p3, %r2, 2;
    @%p3 st.global.b16 [%rd10], %r1;
    @%p3 bra DONE;
    st.global.b8 [%rd10], %r1;
DONE:
    ret;
}
"""


class _MemsetParams(ctypes.Structure):  # CUDA_MEMSET_NODE_PARAMS
    _fields_ = [("dst", ctypes.c_uint64), ("pitch", ctypes.c_size_t), ("value", ctypes.c_uint),
                ("elementSize", ctypes.c_uint), ("width", ctypes.c_size_t), ("height", ctypes.c_size_t)]


class _KernelParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint),
                ("kernelParams", ctypes.POINTER(ctypes.c_void_p)), ("extra", ctypes.POINTER(ctypes.c_void_p)),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


_kept: weakref.WeakSet = weakref.WeakSet()  # graphs from new_graph() that finish() has still to instantiate
_state: dict = {"cuda": None, "functions": {}, "warned": False, "largest": 0}


def largest_replaced() -> int:
    """The most bytes one replaced memset wrote (for the benchmarks' reports)."""
    return _state["largest"]


def enabled() -> bool:
    return os.environ.get("TACO_GRAPH_MEMSETS", "kernel").strip().lower() != "keep"


def _driver():
    if _state["cuda"] is None:
        try:
            _state["cuda"] = ctypes.CDLL("libcuda.so.1")
        except OSError:
            _state["cuda"] = False
    return _state["cuda"]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} returned CUDA driver error {status}")


def _function(device: int) -> ctypes.c_void_p:
    """The memset kernel, loaded into the current context (the device's primary context) once."""
    fn = _state["functions"].get(device)
    if fn is None:
        cuda = _driver()
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(_PTX)), "cuModuleLoadData")
        _check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"taco_memset"), "cuModuleGetFunction")
        _state["functions"][device] = fn  # the module stays loaded for the process: graphs point into it
    return fn


def _edges(cuda, name: str, node) -> list:
    """A node's dependencies or dependents (default edges only: the v2 query refuses to drop edge data)."""
    fn = getattr(cuda, name + "_v2")
    count = ctypes.c_size_t(0)
    _check(fn(node, None, None, ctypes.byref(count)), name)
    nodes = (ctypes.c_void_p * max(count.value, 1))()
    _check(fn(node, nodes, None, ctypes.byref(count)), name)
    return [ctypes.c_void_p(nodes[i]) for i in range(count.value)]


def new_graph() -> torch.cuda.CUDAGraph:
    """A graph to capture into: one kept editable after capture when the rewrite can run (`finish`)."""
    if enabled() and _driver():
        try:
            graph = torch.cuda.CUDAGraph(keep_graph=True)
        except TypeError:  # a PyTorch without keep_graph
            return torch.cuda.CUDAGraph()
        _kept.add(graph)
        return graph
    return torch.cuda.CUDAGraph()


def finish(graph: torch.cuda.CUDAGraph) -> int:
    """After capture into a `new_graph()`: replace its memset nodes by kernel nodes and instantiate it.
    Returns how many were replaced (0 where the graph was left as captured)."""
    if graph not in _kept:  # instantiated at capture's end, as usual
        return 0
    _kept.discard(graph)
    replaced = 0
    try:
        replaced = replace_memsets(ctypes.c_void_p(graph.raw_cuda_graph()), torch.cuda.current_device())
    except (RuntimeError, AttributeError) as e:  # the graph may be half edited: it is still correct
        if not _state["warned"]:
            _state["warned"] = True
            log.warning("CUDA graph memsets left as captured (%s)", e)
    finally:
        graph.instantiate()
    return replaced


def replace_memsets(raw_graph: ctypes.c_void_p, device: int) -> int:
    """Each memset node of the graph (a cudaGraph_t) becomes a kernel node with the same dependencies and
    dependents that writes the same value over the same bytes. Returns the number replaced."""
    cuda = _driver()
    if not cuda:
        return 0
    count = ctypes.c_size_t(0)
    _check(cuda.cuGraphGetNodes(raw_graph, None, ctypes.byref(count)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * max(count.value, 1))()
    _check(cuda.cuGraphGetNodes(raw_graph, nodes, ctypes.byref(count)), "cuGraphGetNodes")
    fn, replaced = None, 0
    for i in range(count.value):
        node = ctypes.c_void_p(nodes[i])
        kind = ctypes.c_int(-1)
        _check(cuda.cuGraphNodeGetType(node, ctypes.byref(kind)), "cuGraphNodeGetType")
        if kind.value != _MEMSET_NODE:
            continue
        p = _MemsetParams()
        _check(cuda.cuGraphMemsetNodeGetParams(node, ctypes.byref(p)), "cuGraphMemsetNodeGetParams")
        total = p.width * max(p.height, 1)
        if p.elementSize not in (1, 2, 4) or total == 0:
            continue
        deps = _edges(cuda, "cuGraphNodeGetDependencies", node)
        after = _edges(cuda, "cuGraphNodeGetDependentNodes", node)
        fn = fn or _function(device)
        args = [ctypes.c_uint64(p.dst), ctypes.c_uint64(p.pitch if p.height > 1 else 0), ctypes.c_uint32(p.value),
                ctypes.c_uint32(p.elementSize), ctypes.c_uint64(p.width), ctypes.c_uint64(total)]
        arg_ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        kp = _KernelParams(func=fn, gridDimX=(total + _BLOCK - 1) // _BLOCK, gridDimY=1, gridDimZ=1,
                           blockDimX=_BLOCK, blockDimY=1, blockDimZ=1, sharedMemBytes=0,
                           kernelParams=ctypes.cast(arg_ptrs, ctypes.POINTER(ctypes.c_void_p)), extra=None,
                           kern=None, ctx=None)
        new = ctypes.c_void_p()
        dep_arr = (ctypes.c_void_p * max(len(deps), 1))(*[d.value for d in deps])
        _check(cuda.cuGraphAddKernelNode_v2(ctypes.byref(new), raw_graph, dep_arr, ctypes.c_size_t(len(deps)),
                                            ctypes.byref(kp)), "cuGraphAddKernelNode")
        if after:
            frm = (ctypes.c_void_p * len(after))(*([new.value] * len(after)))
            to = (ctypes.c_void_p * len(after))(*[a.value for a in after])
            status = cuda.cuGraphAddDependencies_v2(raw_graph, frm, to, None, ctypes.c_size_t(len(after)))
            if status != 0:  # the new node must not run unordered with what followed the memset
                cuda.cuGraphDestroyNode(new)
                _check(status, "cuGraphAddDependencies")
        _check(cuda.cuGraphDestroyNode(node), "cuGraphDestroyNode")
        replaced += 1
        _state["largest"] = max(_state["largest"], total * p.elementSize)
    return replaced
