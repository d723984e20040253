"""The fused q/k RMS-norm + RoPE kernel (comfy/ldm/modules/fused.py): the Triton kernel itself, run in
Triton's CPU interpreter, against the PyTorch path it replaces; the CPU fallback; the first-use check."""

import os
import sys

import torch

from comfy.ldm.flux.math import rope
from comfy.ldm.modules import fused
from tests.triton_helpers import run_in_interpreter


def _in_interpreter(check: str) -> None:
    run_in_interpreter(__file__, check)


def check_norm_and_rope() -> None:
    g = torch.Generator().manual_seed(0)
    b, length, heads, d = 2, 37, 3, 64
    for dtype in (torch.bfloat16, torch.float16):
        qkv = torch.randn(b, length, 3, heads, d, generator=g).to(dtype)
        q = qkv.permute(2, 0, 3, 1, 4)[0]  # the strided view Flux's fused qkv projection gives
        freqs = rope(torch.randint(0, 60, (b, length), generator=g), d, 10000.0)[:, None]
        weight = (torch.rand(d, generator=g) + 0.5).to(dtype)
        for w, f in ((weight, freqs), (None, freqs), (weight, None)):
            ref = fused.norm_rope_reference(q, w, 1e-6, f)
            out = torch.empty(q.shape, dtype=dtype)
            fused._launch(q, w, 1e-6, f, out)
            # Triton's interpreter rounds float32 -> bfloat16 by truncation (GPUs round to nearest even),
            # so in bf16 each of the two roundings may add one more ulp here than on a GPU
            limit = 1.0 if dtype == torch.float16 else 2.0
            assert fused.within_two_ulps_error(out, ref) <= limit, (dtype, w is None, f is None)
            assert not torch.equal(out, q)


def check_slice_in_wan_layout() -> None:
    g = torch.Generator().manual_seed(1)
    b, length, heads, d = 1, 20, 4, 32
    x = torch.randn(b, length, heads, d, generator=g).to(torch.bfloat16)   # Wan: [B, L, H, D]
    freqs = rope(torch.arange(length)[None], d, 10000.0)[:, :, None]     # [1, L, 1, D/2, 2, 2]
    buffer = torch.zeros(b, length + 6, heads, d, dtype=torch.bfloat16)
    fused._launch(x, None, 0.0, freqs, buffer[:, 6:])
    assert fused.within_two_ulps_error(buffer[:, 6:], fused.rope_reference(x, freqs)) <= 1.0  # one rounding
    assert torch.count_nonzero(buffer[:, :6]) == 0


def test_kernel_matches_pytorch_norm_and_rope():
    _in_interpreter("check_norm_and_rope")


def test_kernel_writes_into_a_slice_in_wan_layout():
    _in_interpreter("check_slice_in_wan_layout")


def test_cpu_tensors_take_the_pytorch_path_exactly():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 9, 16, generator=g)
    freqs = rope(torch.arange(9)[None], 16, 10000.0)[:, None]
    w = torch.rand(16, generator=g)
    assert torch.equal(fused.norm_rope(x, w, 1e-6, freqs), fused.norm_rope_reference(x, w, 1e-6, freqs))
    out = torch.zeros(1, 2, 12, 16)
    fused.norm_rope(x, w, 1e-6, freqs, out=out[:, :, 3:])
    assert torch.equal(out[:, :, 3:], fused.norm_rope_reference(x, w, 1e-6, freqs))


def test_a_kernel_that_disagrees_is_turned_off_on_first_use(monkeypatch):
    saved = dict(fused._state)
    fused._state.update(triton=lambda: None, verified=set(), disabled=False)
    monkeypatch.setattr(fused, "_plan", lambda *a: (True, (0, 0, 0)))
    monkeypatch.setattr(fused, "_launch", lambda x, w, eps, f, out, fstr=None: out.fill_(7.0))
    try:
        x = torch.randn(1, 2, 5, 8)
        freqs = rope(torch.arange(5)[None], 8, 10000.0)[:, None]
        out = fused.norm_rope(x, None, 0.0, freqs)
        assert torch.equal(out, fused.rope_reference(x, freqs))  # the PyTorch result, not the bad kernel's
        assert fused._state["disabled"]
    finally:
        fused._state.clear()
        fused._state.update(saved)


if __name__ == "__main__":  # the interpreter checks, run by _in_interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1"
    globals()[sys.argv[1]]()
    print(f"ok {sys.argv[1]}")
