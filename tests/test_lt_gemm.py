"""lt_gemm's choice of a cuBLASLt algorithm (comfy/taco_dit/utils/lt_gemm.py), on the CPU: which tensors it
takes at all, and which candidate `_tune` keeps (only ones whose output equals PyTorch's bit for bit, the
fastest of them, and only when it beats PyTorch's path by the required margin). The real library is checked on
GPUs by tests/test_lt_gemm_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy.taco_dit.utils import lt_gemm


class _Cand:
    def __init__(self, name: str, exact: bool):
        self.name, self.exact, self.waves = name, exact, 1.0


class _FakePlan:
    """A plan whose candidates compute on the CPU: exact ones give F.linear's bits, others add one ulp."""

    def __init__(self, cands):
        self.cands, self.algo, self.tried, self.calls = cands, None, [], []

    def candidates(self, device, bias_ptr):
        return list(self.cands)

    def run(self, cand, x, w, bias_ptr, out):
        self.calls.append(cand.name)
        y = F.linear(x, w, self._bias)
        out.copy_(y if cand.exact else torch.nextafter(y, torch.full_like(y, float("inf"))))


def _tune_with(monkeypatch, cands, times, gain=0.02):
    monkeypatch.setattr(lt_gemm, "GAIN", gain)
    monkeypatch.setattr(lt_gemm, "time_calls", lambda fns: times[:len(fns)])
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    plan = _FakePlan(cands)
    plan._bias = b
    return plan, lt_gemm._tune(plan, x, w, b, gelu=False)


def test_tune_keeps_the_fastest_bit_identical_candidate(monkeypatch):
    cands = [_Cand("exact-slow", True), _Cand("inexact-fast", False), _Cand("exact-fast", True)]
    # times: PyTorch first, then the bit-identical candidates in order (the inexact one is never timed)
    plan, chosen = _tune_with(monkeypatch, cands, [1.00, 0.99, 0.90])
    assert chosen and plan.algo.name == "exact-fast"
    assert lt_gemm.stats()[(64, 48, 32, False)]["identical_candidates"] == 2


def test_tune_keeps_pytorch_without_a_clear_gain(monkeypatch):
    plan, chosen = _tune_with(monkeypatch, [_Cand("a", True), _Cand("b", True)], [1.00, 0.99, 0.985])
    assert not chosen and plan.algo is None  # 1.5 % faster: below the 2 % margin set here
    plan, chosen = _tune_with(monkeypatch, [_Cand("a", True)], [1.00, 0.99], gain=0.005)
    assert chosen and plan.algo.name == "a"


def test_tune_refuses_when_no_candidate_is_bit_identical(monkeypatch):
    plan, chosen = _tune_with(monkeypatch, [_Cand("x", False), _Cand("y", False)], [1.0, 0.5, 0.5])
    assert not chosen and plan.algo is None and plan.calls == ["x", "y"]


@pytest.mark.parametrize("case,reason", [(None, None), ("fp32", "dtype"), ("few-rows", "size"),
                                         ("disabled", "off"), ("pitched-weight", "layout"), ("bias", "bias"),
                                         ("autograd", "autograd")])
def test_refusal_names_what_keeps_pytorchs_path(monkeypatch, case, reason):
    x, w = torch.randn(8192, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, dtype=torch.bfloat16)
    if case == "fp32":
        x, w = x.float(), w.float()
    if case == "few-rows":
        x = x[:4096]  # below the default TACO_LT_GEMM_MIN_ROWS (8192)
    if case == "disabled":
        monkeypatch.setattr(lt_gemm, "ENABLED", False)
    if case == "pitched-weight":
        w = torch.randn(2048, 4096, dtype=torch.bfloat16)[:, ::2]
    if case == "bias":
        b = torch.randn(4096, dtype=torch.bfloat16)[::2]
    if case == "autograd":
        w.requires_grad_(True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # the rules past the device check
    assert lt_gemm.refusal(x, w, b) == reason


def test_cpu_tensors_never_load_the_library(monkeypatch):
    monkeypatch.setattr(lt_gemm, "_library", lambda: pytest.fail("the library must not be loaded"))
    x, w = torch.randn(8192, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    assert lt_gemm.refusal(x, w, None) == "device" and lt_gemm.linear(x, w, None) is None
