"""The fused LayerNorm + adaLN modulation kernel (comfy/ldm/modules/fused.py `layernorm_modulate`): the Triton
kernel itself, run in Triton's CPU interpreter, against the PyTorch path it replaces
(`torch.addcmul(shift, layer_norm(x), 1 + scale)`); the layouts it takes; the CPU fallback; the first-use check."""

import os
import sys

import pytest
import torch

from comfy.ldm.modules import fused
from tests.triton_helpers import run_in_interpreter


def _in_interpreter(check: str) -> None:
    run_in_interpreter(__file__, check)


def _inputs(g, b, length, c, mod_batch, dtype, mod_dtype=None, x_offset=0):
    """x [b, length, c] (a slice of a wider tensor when x_offset > 0) and shift, scale [mod_batch, 1, c]
    cut from one [mod_batch, 1, 3c] tensor, as Flux's and Wan's modulation chunks are."""
    wide = (torch.randn(b, length, c + 2 * x_offset, generator=g) * 2 + 0.5).to(dtype)
    x = wide[..., x_offset:x_offset + c]
    mod = (torch.randn(mod_batch, 1, 3 * c, generator=g) * 0.5).to(mod_dtype or dtype)
    shift, scale, _ = mod.chunk(3, dim=-1)
    return x, shift, scale


def _truncating_emulation(x, shift, scale, eps):
    """The kernel's rounding sequence with float32 -> bfloat16 rounding by truncation, as Triton's
    interpreter does it (GPUs round to nearest even): layer_norm in float32 rounded to bf16, 1 + scale
    rounded to bf16, then a float32 fused multiply-add rounded to bf16."""
    def trunc(t):
        return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    xf = x.float()
    d = xf - xf.mean(-1, keepdim=True)
    normed = trunc(d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)).double()
    y = normed * trunc(scale.float() + 1.0).double() + shift.double()  # exact in float64, then one rounding
    return trunc(y.float())


def check_matches_pytorch() -> None:
    g = torch.Generator().manual_seed(0)
    cases = ((2, 37, 96, 2, 32), (1, 5, 3072, 1, 0), (2, 6, 160, 1, 8))
    for dtype in (torch.bfloat16, torch.float16):
        for b, length, c, mod_batch, x_offset in cases:
            x, shift, scale = _inputs(g, b, length, c, mod_batch, dtype, x_offset=x_offset)
            assert x.is_contiguous() == (x_offset == 0)
            ref = fused.layernorm_modulate_reference(x, shift, scale, 1e-6)
            out = torch.empty(x.shape, dtype=dtype)
            fused._modulate_launch(x, shift, scale, 1e-6, out)
            what = (dtype, b, length, c, mod_batch)
            mismatched = (out != ref).float().mean().item()
            if dtype == torch.float16:
                # the interpreter rounds float32 -> float16 to nearest even, as GPUs do: all but a few
                # elements (layer_norm's float32 sums in another order) are bit-exact; any rounding left
                # out or added would change about a quarter of them
                assert mismatched < 0.01, what
                assert fused.within_two_ulps_error(out, ref) <= 1 / 16, what  # one fp16 ulp of the row
            else:
                # Triton's interpreter rounds float32 -> bfloat16 by truncation, so each of the three
                # roundings may cost one more ulp here than on a GPU; against the same sequence with
                # truncation the kernel agrees bit for bit but for layer_norm's summation order
                assert fused.within_two_ulps_error(out, ref) <= 2.0, what
                emulated = _truncating_emulation(x, shift, scale, 1e-6)
                assert (out != emulated).float().mean().item() < 0.01, what
                assert fused.within_two_ulps_error(out, emulated) <= 0.5, what

    # float32 shift/scale (x bf16): a float32 result, as torch.addcmul gives
    x, shift, scale = _inputs(g, 2, 9, 96, 2, torch.bfloat16, mod_dtype=torch.float32)
    ref = fused.layernorm_modulate_reference(x, shift, scale, 1e-6)
    assert ref.dtype == torch.float32
    out = torch.empty(x.shape, dtype=torch.float32)
    fused._modulate_launch(x, shift, scale, 1e-6, out)
    assert fused.within_two_ulps_error(out, ref) <= 2.0


def check_writes_into_a_strided_view() -> None:
    g = torch.Generator().manual_seed(1)
    b, length, c = 2, 11, 96
    x, shift, scale = _inputs(g, b, length, c, 1, torch.bfloat16, x_offset=16)
    buffer = torch.zeros(b, length + 3, 2 * c, dtype=torch.bfloat16)
    view = buffer[:, 3:, c:]
    fused._modulate_launch(x, shift, scale, 1e-6, view)
    fresh = torch.empty(x.shape, dtype=torch.bfloat16)
    fused._modulate_launch(x, shift, scale, 1e-6, fresh)
    assert torch.equal(view, fresh)
    assert fused.within_two_ulps_error(view, fused.layernorm_modulate_reference(x, shift, scale)) <= 2.0
    assert torch.count_nonzero(buffer[:, :3]) == 0 and torch.count_nonzero(buffer[:, :, :c]) == 0


def check_first_use_check_passes() -> None:
    """The public function with the kernel let through on CPU tensors: its self-check must accept it.
    float16, where the interpreter rounds as a GPU does (its bf16 truncation could exceed the tolerance)."""
    fused._modulate_plan = lambda x, sh, sc, out: (True, fused._modulate_strides(x, sh, sc, out))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 21, 3072, generator=g).to(torch.float16)
    shift, scale = (torch.randn(2, 2, 3072, generator=g) * 0.5).to(torch.float16).unbind(1)  # [B, C] each
    out = fused.layernorm_modulate(x, shift, scale)
    assert not fused._modulate_state["disabled"] and fused._modulate_state["verified"] == {None}
    ref = fused.layernorm_modulate_reference(x, shift[:, None], scale[:, None])
    assert fused.within_two_ulps_error(out, ref) <= 1 / 16
    again = fused.layernorm_modulate(x, shift, scale)  # verified: the kernel alone
    assert torch.equal(again, out)


def test_kernel_matches_pytorch():
    _in_interpreter("check_matches_pytorch")


def test_kernel_writes_into_a_strided_view():
    _in_interpreter("check_writes_into_a_strided_view")


def test_kernel_passes_its_first_use_check():
    _in_interpreter("check_first_use_check_passes")


def test_layouts_the_kernel_takes():
    x = torch.empty(2, 7, 64, dtype=torch.bfloat16)
    mod = torch.empty(2, 1, 6 * 64, dtype=torch.bfloat16)
    shift, scale = mod[..., :64], mod[..., 64:128]
    assert fused._modulate_strides(x, shift, scale, None) == ((384, 0), (384, 0))
    shared = torch.empty(1, 1, 64, dtype=torch.bfloat16)
    assert fused._modulate_strides(x, shared, scale, None) == ((0, 0), (384, 0))
    per_token = torch.empty(2, 7, 64, dtype=torch.bfloat16)
    assert fused._modulate_strides(x, per_token, shared, None) == ((448, 64), (0, 0))
    wide = torch.empty(2, 9, 80, dtype=torch.float16)
    assert fused._modulate_strides(wide[:, 1:8, 8:72], shift.half(), scale.half(), None) is not None
    out = torch.empty(2, 9, 128, dtype=torch.bfloat16)[:, 1:8, 64:]
    assert fused._modulate_strides(x, shift, scale, out)[2] == (9 * 128, 128)
    assert fused._modulate_strides(x, shift.float(), scale, out) is None  # out must be float32 then
    assert fused._modulate_strides(x, shift.float(), scale, out.float()) is not None
    rejected = (
        (x.float(), shift, scale),                                                  # not half precision
        (torch.empty(2, 64, 7, dtype=torch.bfloat16).transpose(1, 2), shift, scale),  # x's last dim strided
        (x, torch.empty(2, 1, 1, dtype=torch.bfloat16), scale),                     # broadcast along C
        (x, torch.empty(2, 1, 128, dtype=torch.bfloat16)[..., ::2], scale),          # last dim strided
        (x, shift.half(), scale),                                                   # another half dtype
        (x, torch.empty(3, 1, 64, dtype=torch.bfloat16), scale),                    # not broadcastable
        (torch.empty(1, 2, 8200, dtype=torch.bfloat16), torch.empty(1, 1, 8200, dtype=torch.bfloat16),
         torch.empty(1, 1, 8200, dtype=torch.bfloat16)),                            # row over 8192
    )
    for i, (xx, sh, sc) in enumerate(rejected):
        assert fused._modulate_strides(xx, sh, sc, None) is None, i
    assert fused._modulate_strides(x, shift, scale, out[:, :, :32]) is None
    assert fused._modulate_plan(x, shift, scale, None) == (False, None)  # CPU tensors: never the kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_tensors_take_the_pytorch_path_exactly(dtype):
    g = torch.Generator().manual_seed(3)
    x, shift, scale = _inputs(g, 2, 9, 48, 2, dtype, x_offset=4)
    ref = torch.addcmul(shift, torch.nn.functional.layer_norm(x, (48,), eps=1e-6), 1 + scale)
    assert torch.equal(fused.layernorm_modulate(x, shift, scale), ref)
    assert torch.equal(fused.layernorm_modulate(x, shift[:, 0], scale[:, 0]), ref)  # [B, C] is [B, 1, C]
    out = torch.zeros(2, 12, 96, dtype=dtype)
    assert fused.layernorm_modulate(x, shift, scale, out=out[:, 3:, 48:]).data_ptr() == out[:, 3:, 48:].data_ptr()
    assert torch.equal(out[:, 3:, 48:], ref) and torch.count_nonzero(out[:, :, :48]) == 0


@pytest.fixture
def fake_kernel(monkeypatch):
    """Both kernels' state saved and restored; the modulation kernel made 'launchable' on CPU tensors."""
    saved = {id(s): dict(s) for s in (fused._state, fused._modulate_state)}
    fused._modulate_state.update(triton=lambda: None, verified=set(), disabled=False)
    monkeypatch.setattr(fused, "_modulate_plan", lambda *a: (True, None))
    yield
    for s in (fused._state, fused._modulate_state):
        s.clear()
        s.update(saved[id(s)])


def test_a_kernel_that_disagrees_is_turned_off_on_first_use(fake_kernel, monkeypatch):
    monkeypatch.setattr(fused, "_modulate_launch", lambda x, sh, sc, eps, out, strides=None: out.fill_(7.0))
    norm_rope_disabled = fused._state["disabled"]
    x, shift, scale = _inputs(torch.Generator().manual_seed(4), 1, 5, 32, 1, torch.float32)
    out = fused.layernorm_modulate(x, shift, scale)
    assert torch.equal(out, fused.layernorm_modulate_reference(x, shift, scale))  # PyTorch's, not the kernel's
    assert fused._modulate_state["disabled"]
    assert fused._state["disabled"] == norm_rope_disabled  # the other kernel is not affected
    assert torch.equal(fused.layernorm_modulate(x, shift, scale), out)  # PyTorch path from now on


def test_a_kernel_that_fails_to_compile_is_turned_off(fake_kernel, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(fused, "_modulate_launch", broken)
    x, shift, scale = _inputs(torch.Generator().manual_seed(5), 1, 5, 32, 1, torch.float32)
    out = torch.zeros(1, 5, 32)
    fused.layernorm_modulate(x, shift, scale, out=out)
    assert torch.equal(out, fused.layernorm_modulate_reference(x, shift, scale))
    assert fused._modulate_state["disabled"]


if __name__ == "__main__":  # the interpreter checks, run by _in_interpreter
    assert os.environ.get("TRITON_INTERPRET") == "1"
    globals()[sys.argv[1]]()
    print(f"ok {sys.argv[1]}")
