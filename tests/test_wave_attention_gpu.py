"""GPU checks of wave_attention through cuDNN and its frontend: at a ring-2 rank's Flux 1024² shape the split is chosen
(forced past the timing margin), agrees with one cuDNN call, writes every head, and is what a captured CUDA graph
runs, replayed on new inputs; one GPU's shape keeps the single call.

Marked `gpu` (excluded from CPU runs; run on the GPU machines: `pytest -m gpu tests/test_wave_attention_gpu.py`).
Needs `nvidia-cudnn-frontend` (scripts/setup_env.sh multigpu installs it with --no-deps).
"""

from __future__ import annotations

import pytest
import torch

from comfy.taco_dit.utils import wave_attention as wa

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(lq: int, lk: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    local = torch.randn(1, lq, 3, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    full = torch.randn(1, lk, 3, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    return local.permute(2, 0, 3, 1, 4)[0], full.permute(2, 0, 3, 1, 4)[1], full.permute(2, 0, 3, 1, 4)[2]


def _single(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def test_split_agrees_with_one_call_and_replays_in_a_graph(monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the split is measured and enabled on Hopper only")
    monkeypatch.setattr(wa, "GAIN", -1.0)  # take the fastest split even if slower: its path is under test
    monkeypatch.setattr(wa, "_decisions", {})
    q, k, v = _inputs(2304, 4608, 0)
    assert wa.refusal(q, k, v) is None
    with torch.inference_mode():
        assert wa.sdpa(q, k, v) is None  # eager: decides, and keeps the single call
        split = wa.decisions()[wa._key(q, k, v)]
        assert isinstance(split, wa.Split) and (split.main, split.parts) in wa.candidates(24, 2304, 4608,
                                                                                          wa._sm_count(q.device))
        got = wa.run_split(split, q, k, v)
        want = _single(q, k, v)
        assert got.shape == want.shape
        assert got.transpose(1, 2).is_contiguous()  # token-major, as cuDNN's own output
        assert (got.float() - want.float()).abs().max().item() < 4e-3
        for h in (0, split.main - 1, split.main, 23):  # heads on both sides of the split are written
            torch.testing.assert_close(got[:, h], want[:, h], atol=4e-3, rtol=0)

        out = torch.empty_like(got)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = wa.sdpa(q, k, v)  # under capture: the split
            assert captured is not None
            out.copy_(captured)
        q2, k2, v2 = _inputs(2304, 4608, 1)
        q.copy_(q2)
        k.copy_(k2)
        v.copy_(v2)
        graph.replay()
        torch.cuda.synchronize()
        assert (out.float() - _single(q, k, v).float()).abs().max().item() < 4e-3


def test_one_gpu_flux_shape_keeps_the_single_call(monkeypatch):
    monkeypatch.setattr(wa, "_decisions", {})
    q, k, v = _inputs(4608, 4608, 2)
    with torch.inference_mode():
        assert wa.sdpa(q, k, v) is None
    assert wa.decisions().get(wa._key(q, k, v)) is None
