"""Fused GPU kernels for the DiTs' per-head q/k work: RMS norm with a learnt scale, then RoPE.

Eager PyTorch spends a large share of a Flux step here (benchmarks/profile_flux_step.py: at 1024² the
strided-input RMS norm, its copies and the float32 RoPE passes take about a fifth of the GPU time), because
each op is a separate pass over [B, H, L, D] tensors, RoPE in float32. One Triton kernel reads each q/k row
once, whole and contiguously, from wherever the projection left it (any strides, last dim contiguous),
normalises it, rotates it and writes it once, into a new tensor or straight into a slice of a larger one (Flux's joint text+image
sequence), so no concatenation follows.

Numerics follow the PyTorch path they replace: the norm is computed in float32 and rounded to the
activation dtype (as F.rms_norm's output is), then RoPE runs in float32 on that rounded value and is
rounded once more. Results agree with the PyTorch path to within one unit in the last place of bf16/fp16.

Used only for CUDA half-precision tensors, outside torch.compile tracing (Inductor fuses the PyTorch path
itself), when Triton is importable and `TACO_FUSED_KERNELS` is not "0". The first call per device checks
the kernel against the PyTorch path on the real input and turns the kernel off, with a warning, if they
disagree. Everything else takes the PyTorch path.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

_state: dict = {"triton": None, "verified": set(), "disabled": False}


def _kernel():
    if _state["triton"] is None:
        try:
            from comfy.ldm.modules import fused_triton
        except Exception:  # noqa: BLE001 - no Triton: PyTorch path
            _state["triton"] = False
            return False
        _state["triton"] = fused_triton.norm_rope_kernel
    return _state["triton"]


def _enabled() -> bool:
    return os.environ.get("TACO_FUSED_KERNELS", "1") != "0" and not _state["disabled"]


def rope_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE with rotation matrices `freqs` [..., D/2, 2, 2] (broadcast over x [..., D]), float32 maths."""
    x_ = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0]
    out.addcmul_(freqs[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                        freqs: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        w = weight if weight.dtype == x.dtype and weight.device == x.device else weight.to(x)
        x = F.rms_norm(x, (x.shape[-1],), w, eps=eps)
    return rope_reference(x, freqs) if freqs is not None else x


def within_two_ulps_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| over rows of the last dim, in units of two bf16 ulps at the row's largest |ref|.

    A rotation mixes the two values of a pair, so a one-ulp difference in the normed input shows up
    relative to the row's magnitude, not the (possibly tiny) rotated value. Values <= 1 pass.
    """
    r = ref.float()
    scale = r.abs().amax(dim=-1, keepdim=True).clamp_min(2.0 ** -20)
    two_ulps = torch.exp2(torch.floor(torch.log2(scale)) - 6)  # bf16 keeps 8 significant bits
    return ((out.float() - r).abs() / two_ulps).max().item()


def _launchable(x: torch.Tensor, weight, freqs, out) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.ndim == 4 and x.stride(-1) == 1):
        return False
    d = x.shape[-1]
    if d % 2 or (d // 2) & (d // 2 - 1) or d > 512:  # the kernel takes one power-of-two row of pairs
        return False
    if weight is not None and (weight.shape != (d,) or not weight.is_contiguous()):
        return False
    if freqs is not None:
        if freqs.dtype != torch.float32 or freqs.ndim != 6 or tuple(freqs.shape[-3:]) != (d // 2, 2, 2):
            return False
        if freqs.stride()[-3:] != (4, 2, 1):
            return False
        try:
            torch.broadcast_shapes(tuple(freqs.shape[:3]), tuple(x.shape[:3]))
        except RuntimeError:
            return False
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
        return False
    return True


_plans: dict = {}  # layout key -> (launchable, freqs strides): the checks run once per layout


def _freqs_strides(x: torch.Tensor, freqs) -> tuple:
    """Strides of `freqs` over x's three leading dims once broadcast to them (0 where it is shared)."""
    return freqs.expand(*x.shape[:3], *freqs.shape[3:]).stride()[:3] if freqs is not None else (0, 0, 0)


def _plan(x: torch.Tensor, weight, freqs, out):
    key = (x.shape, x.stride(), x.dtype, x.device, None if weight is None else (weight.shape, weight.stride()),
           None if freqs is None else (freqs.shape, freqs.stride(), freqs.dtype),
           None if out is None else (out.shape, out.stride(), out.dtype))
    plan = _plans.get(key)
    if plan is None:
        ok = _launchable(x, weight, freqs, out)
        fstr = _freqs_strides(x, freqs) if ok else (0, 0, 0)
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = (ok, fstr)
    return plan


def _launch(x, weight, eps, freqs, out, fstr=None):
    kernel = _kernel()
    n0, n1, n2, d = x.shape
    if fstr is None:
        fstr = _freqs_strides(x, freqs)
    n_rows = n0 * n1 * n2
    block_r = 16
    args = (x, weight if weight is not None else x, freqs if freqs is not None else x, out, n_rows, n1, n2,
            *x.stride()[:3], *fstr, *out.stride()[:3], float(eps))
    meta = dict(HALF=d // 2, BLOCK_R=block_r, NORM=weight is not None, ROPE=freqs is not None, num_warps=4)
    grid = ((n_rows + block_r - 1) // block_r,)
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
    return out


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
              freqs: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """rope(rms_norm(x) * weight) for x [..., D]; either step may be left out (weight / freqs None).

    `out`, if given, receives the result (e.g. a slice of a joint-sequence buffer) and is returned.
    """
    if weight is not None and (weight.device != x.device or weight.dtype != x.dtype):
        weight = weight.to(x)
    fused = False
    if _enabled() and not torch.compiler.is_compiling():
        fused, fstr = _plan(x, weight, freqs, out)  # CPU tensors are never launchable
        fused = fused and _kernel() is not False
    if not fused:
        res = norm_rope_reference(x, weight, eps, freqs)
        if out is None:
            return res
        out.copy_(res)
        return out
    target = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if x.device.index not in _state["verified"] and not capturing:
        ref = norm_rope_reference(x, weight, eps, freqs)
        try:
            _launch(x, weight, eps, freqs, target, fstr)
        except Exception as e:  # noqa: BLE001 - a Triton build that cannot compile it: PyTorch path
            _state["disabled"] = True
            logging.warning("Fused q/k norm + RoPE kernel failed (%s); using the PyTorch path", str(e)[:300])
            target.copy_(ref)
            return target
        err = within_two_ulps_error(target, ref)
        if err > 1.0:
            _state["disabled"] = True
            logging.warning("Fused q/k norm + RoPE kernel disagrees with PyTorch; using the "
                            "PyTorch path from now on (error %.2f times the allowed two bf16 ulps)", err)
            target.copy_(ref)
            return target
        _state["verified"].add(x.device.index)
        return target
    return _launch(x, weight, eps, freqs, target, fstr)
