"""GPU checks of graph_memsets: a captured graph whose memset nodes became kernel nodes writes the same bytes.

Marked `gpu` (excluded from CPU runs; run on the GPU machines: `pytest -m gpu tests/test_graph_memsets_gpu.py`).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from comfy.taco_dit.utils import graph_memsets

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _driver_memsets(buf: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Memsets of every shape the kernel handles, issued with the driver API on `stream` (captured as nodes):
    1-, 2- and 4-byte elements, 1-D and 2-D (a pitched region), odd sizes, nonzero values."""
    cuda = ctypes.CDLL("libcuda.so.1")
    base, s = buf.data_ptr(), ctypes.c_void_p(stream.cuda_stream)
    u64 = ctypes.c_uint64
    assert cuda.cuMemsetD8Async(u64(base + 3), ctypes.c_ubyte(0xAB), ctypes.c_size_t(1001), s) == 0
    assert cuda.cuMemsetD16Async(u64(base + 2048), ctypes.c_ushort(0x1234), ctypes.c_size_t(333), s) == 0
    assert cuda.cuMemsetD32Async(u64(base + 4096), ctypes.c_uint(0xDEADBEEF), ctypes.c_size_t(777), s) == 0
    # 2-D: 5 rows of 9 four-byte elements, 64 bytes apart (the bytes between rows stay untouched)
    assert cuda.cuMemsetD2D32Async(u64(base + 8192), ctypes.c_size_t(64), ctypes.c_uint(0x01020304),
                                   ctypes.c_size_t(9), ctypes.c_size_t(5), s) == 0
    assert cuda.cuMemsetD8Async(u64(base + 12288), ctypes.c_ubyte(0), ctypes.c_size_t(4), s) == 0


def _capture(rewrite: bool):
    buf = torch.full((16384,), 0x5A, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    graph = graph_memsets.new_graph() if rewrite else torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        buf.add_(1)  # a kernel before the memsets and one after: the rewritten nodes keep their order
        _driver_memsets(buf, stream)
        buf.mul_(1)
    replaced = graph_memsets.finish(graph) if rewrite else 0
    buf.fill_(0x5A)
    graph.replay()
    torch.cuda.synchronize()
    return buf.cpu(), replaced


def test_rewritten_memsets_write_the_same_bytes():
    expected, _ = _capture(rewrite=False)
    got, replaced = _capture(rewrite=True)
    assert replaced == 5
    assert torch.equal(got, expected)
    assert expected[3:1004].eq(0xAB).all() and expected[0:3].eq(0x5B).all()  # the memsets ran after add_(1)
    row = expected[8192 + 64: 8192 + 64 + 36].view(torch.int32)
    assert row.eq(0x01020304).all() and expected[8192 + 36: 8192 + 64].eq(0x5B).all()


def test_gemm_graph_with_rewritten_memsets_matches_eager():
    a = torch.randn(2304, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(9216, 3072, device="cuda", dtype=torch.bfloat16) * 3072 ** -0.5
    b = torch.randn(9216, device="cuda", dtype=torch.bfloat16)
    eager = torch.addmm(b, a, w.t())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.addmm(b, a, w.t())
    torch.cuda.current_stream().wait_stream(side)
    graph = graph_memsets.new_graph()
    with torch.cuda.graph(graph):
        out = torch.addmm(b, a, w.t())
    graph_memsets.finish(graph)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
