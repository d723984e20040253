"""wave_attention on CPU: which splits are candidates, that the split's views and log-sum-exp merge give the whole
attention back, the Triton merge kernel in Triton's interpreter, the choice rule, and the refusals.

The cuDNN path itself runs on GPUs only: tests/test_wave_attention_gpu.py.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from comfy.ldm.modules import fused
from comfy.taco_dit.utils import wave_attention as wa

try:
    from tests.triton_helpers import run_in_interpreter
except ImportError:  # run as a script by the interpreter check
    run_in_interpreter = None


def test_candidates_for_a_ring2_rank_of_flux_1024():
    # 2304 queries x 24 heads = 864 tiles on 132 SMs (264 slots): 22 heads make three whole waves
    assert wa.candidates(24, 2304, 4608, 132) == [(22, 2), (22, 3), (21, 2)]


@pytest.mark.parametrize("shape", [(24, 4608, 4608), (6, 4608, 4608), (6, 16896, 16896), (24, 1152, 4608)])
def test_no_candidate_where_no_tail_fits_one_wave(shape):
    # one GPU's Flux 1024² call, Ulysses 4's and ring 4's ranks: the tail cannot become one wave
    assert wa.candidates(*shape, 132) == []


@pytest.mark.parametrize("heads,lq,lk,sms", [(24, 2304, 4608, 132), (12, 4608, 4608, 132), (30, 1000, 3000, 114),
                                             (40, 700, 2100, 132), (16, 3000, 6000, 80)])
def test_every_candidate_keeps_whole_waves_and_a_one_wave_tail(heads, lq, lk, sms):
    per_head, slots = math.ceil(lq / wa.TILE_QUERIES), wa.TILES_PER_SM * sms
    whole = heads * per_head // slots
    for main, parts in wa.candidates(heads, lq, lk, sms):
        assert 0 < main < heads and 2 <= parts <= wa.MAX_PARTS and lk % parts == 0
        assert main * per_head <= max(whole, 1) * slots
        assert (heads - main) * per_head * parts <= slots


def _attention_with_lse_cpu(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse.float()


@pytest.mark.parametrize("main,parts", [(5, 2), (4, 3), (6, 4)])
def test_split_views_and_merge_give_the_whole_attention(main, parts):
    # the decomposition run_split performs, with CPU kernels: the first `main` heads at once, the rest over parts of
    # the keys through tail_views, merged by lse_merge into their slots of a token-major output
    g = torch.Generator().manual_seed(main * 10 + parts)
    heads, lq, lk, d = 7, 40, 48, 64
    q = torch.randn(1, lq, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4)[0]  # a packed q view
    kv = torch.randn(1, lk, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4)
    k, v = kv[1], kv[2]
    want = F.scaled_dot_product_attention(q, k, v)
    out = torch.full((1, lq, heads, d), float("nan"))
    out[:, :, :main] = F.scaled_dot_product_attention(q[:, :main], k[:, :main], v[:, :main]).transpose(1, 2)
    qt, kt, vt = wa.tail_views(q, k, v, main, parts)
    assert qt.shape == (parts, heads - main, lq, d) and kt.shape == (parts, heads - main, lk // parts, d)
    assert qt.stride(0) == 0  # the queries are not copied
    for p in range(parts):  # part p holds keys p*n ... (p+1)*n of the tail heads
        n = lk // parts
        assert torch.equal(kt[p], k[0, main:, p * n:(p + 1) * n])
        assert torch.equal(vt[p], v[0, main:, p * n:(p + 1) * n])
    parts_out, lse = _attention_with_lse_cpu(qt.contiguous(), kt.contiguous(), vt.contiguous())
    fused.lse_merge(parts_out, lse, out[0, :, main:].transpose(0, 1))
    torch.testing.assert_close(out.transpose(1, 2), want, atol=2e-6, rtol=2e-5)


def test_merge_of_one_part_is_that_part():
    g = torch.Generator().manual_seed(3)
    parts, lse = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, generator=g)
    assert torch.equal(fused.lse_merge_reference(parts, lse), parts[0])


def test_choice_needs_the_margin():
    # times[0] is the single call; a split is taken only when it beats it by GAIN
    assert wa.choose([1.0, 0.99, 0.995], gain=0.03) is None
    assert wa.choose([1.0, 0.99, 0.96], gain=0.03) == 2  # the fastest, the only one past the margin
    assert wa.choose([1.0, 0.90, 0.93], gain=0.03) == 1
    assert wa.choose([1.0, 0.95, 0.90], gain=0.03) == 2
    assert wa.choose([1.0], gain=0.03) is None


def test_refusals_name_the_reason(monkeypatch):
    q = torch.randn(1, 4, 64, 64)
    assert wa.refusal(q, q, q) == "not a CUDA tensor"
    assert wa.sdpa(q, q, q) is None
    monkeypatch.setattr(wa, "ENABLED", False)
    assert wa.refusal(q, q, q) == "TACO_WAVE_ATTN=0"


def check_merge_kernel() -> None:
    """The Triton merge (interpreted) against the reference, into a strided slice of a token-major output."""
    g = torch.Generator().manual_seed(0)
    for parts_n, heads_t, d in ((3, 2, 128), (2, 3, 64)):
        parts = torch.randn(parts_n, heads_t, 37, d, generator=g).to(torch.bfloat16)
        lse = torch.randn(parts_n, heads_t, 37, generator=g) * 3
        full = torch.zeros(37, 5, d, dtype=torch.bfloat16)
        out = full[:, 5 - heads_t:].transpose(0, 1)
        fused._merge_launch(parts, lse, out)
        ref = fused.lse_merge_reference(parts, lse)
        assert fused.within_two_ulps_error(out, ref) <= 1.0
        assert torch.equal(full[:, :5 - heads_t], torch.zeros_like(full[:, :5 - heads_t]))  # nothing else written


def test_merge_kernel_in_interpreter():
    run_in_interpreter(os.path.abspath(__file__), "check_merge_kernel")


if __name__ == "__main__":  # the interpreter checks, run by run_in_interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1"
    globals()[sys.argv[1]]()
    print(f"ok {sys.argv[1]}")
