"""GPU checks of lt_gemm: through the real cuBLASLt, a tuned large GEMM gives F.linear's (and the fused GELU's)
result bit for bit, its cuBLASLt path runs inside a captured CUDA graph, and a GEMM too small to tune keeps
PyTorch's path.

Marked `gpu` (excluded from CPU runs; run on the GPU machines: `pytest -m gpu tests/test_lt_gemm_gpu.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy.taco_dit.utils import lt_gemm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("rows", [16380, 4608])
def test_tuned_gemm_is_bit_identical_and_graph_safe(monkeypatch, rows, gelu):
    monkeypatch.setattr(lt_gemm, "GAIN", -1.0)  # take cuBLASLt's best even when slower: its path is under test
    monkeypatch.setattr(lt_gemm, "MIN_ROWS", 2048)
    torch.manual_seed(rows + gelu)
    x = torch.randn(1, rows, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5120, 3072, device="cuda", dtype=torch.bfloat16) / 3072 ** 0.5
    b = torch.randn(5120, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want = torch._addmm_activation(b, x[0], w.t(), use_gelu=True) if gelu else F.linear(x, w, b)[0]
        got = lt_gemm.linear(x, w, b, gelu=gelu)
        assert got is not None and got.shape == (1, rows, 5120)
        assert torch.equal(got[0], want)
        stats = lt_gemm.stats()[(rows, 5120, 3072, gelu)]
        assert stats["identical_candidates"] >= 1 and stats["lt_chosen"]

        out = torch.empty_like(got)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(lt_gemm.linear(x, w, b, gelu=gelu))
        x.mul_(0.5)  # new inputs in place: the replay must compute them, not repeat the captured result
        graph.replay()
        torch.cuda.synchronize()
        want2 = torch._addmm_activation(b, x[0], w.t(), use_gelu=True) if gelu else F.linear(x, w, b)[0]
        assert torch.equal(out[0], want2)


def test_small_gemm_keeps_pytorch():
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16)
    assert lt_gemm.linear(x, w, None) is None
