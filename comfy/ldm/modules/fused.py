"""Fused GPU kernels for the DiTs: per-head q/k RMS norm with a learnt scale, then RoPE (`norm_rope`); and
the blocks' adaLN modulation, a LayerNorm without affine then `shift + x * (1 + scale)` (`layernorm_modulate`).

Eager PyTorch spends a large share of a Flux step here (benchmarks/profile_flux_step.py: at 1024² the
strided-input RMS norm, its copies and the float32 RoPE passes take about a fifth of the GPU time), because
each op is a separate pass over [B, H, L, D] tensors, RoPE in float32. One Triton kernel reads each q/k row
once, whole and contiguously, from wherever the projection left it (any strides, last dim contiguous),
normalises it, rotates it and writes it once, into a new tensor or straight into a slice of a larger one (Flux's joint text+image
sequence), so no concatenation follows.

Numerics follow the PyTorch path they replace: the norm is computed in float32 and rounded to the
activation dtype (as F.rms_norm's output is), then RoPE runs in float32 on that rounded value and is
rounded once more. Results agree with the PyTorch path to within one unit in the last place of bf16/fp16.

The adaLN modulation (Flux's and Wan's `torch.addcmul(shift, layer_norm(x), 1 + scale)`) is two memory
passes in eager PyTorch (a Flux 1024² step: layer_norm 2.1 ms + addcmul 6.7 ms); one kernel reads each
[B, L, C] row once, whole, and writes the result once, with the same roundings as the two ops (see
`layernorm_modulate`).

Used only for CUDA half-precision tensors, outside torch.compile tracing (Inductor fuses the PyTorch path
itself), when Triton is importable and `TACO_FUSED_KERNELS` is not "0". The first call of each kernel per
device checks it against the PyTorch path on the real input and turns that kernel off, with a warning, if
they disagree. Everything else takes the PyTorch path.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

# per kernel: the jitted kernel (None: not loaded yet, False: no Triton), the devices whose first call
# was checked against PyTorch, and whether a failed check turned it off
_state: dict = {"triton": None, "verified": set(), "disabled": False, "kernel": "norm_rope_kernel"}
_modulate_state: dict = {"triton": None, "verified": set(), "disabled": False,
                         "kernel": "layernorm_modulate_kernel"}


def _load(state: dict):
    if state["triton"] is None:
        try:
            from comfy.ldm.modules import fused_triton
        except Exception:  # noqa: BLE001 - no Triton: PyTorch path
            state["triton"] = False
            return False
        state["triton"] = getattr(fused_triton, state["kernel"])
    return state["triton"]


def _kernel():
    return _load(_state)


def _enabled(state: dict) -> bool:
    return os.environ.get("TACO_FUSED_KERNELS", "1") != "0" and not state["disabled"]


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


def _run_checked(state: dict, what: str, device: torch.device, target: torch.Tensor, launch, reference):
    """Run `launch()`, a kernel writing `target`, and return `target`.

    On the kernel's first call per device (not while a CUDA graph is captured) it is compared with
    `reference()`, the PyTorch path; if it raises or disagrees by more than two bf16 ulps of the row's
    magnitude, that kernel is turned off with a warning and `target` receives the PyTorch result.
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if device.index in state["verified"] or capturing:
        launch()
        return target
    ref = reference()
    try:
        launch()
    except Exception as e:  # noqa: BLE001 - a Triton build that cannot compile it: PyTorch path
        state["disabled"] = True
        logging.warning("Fused %s kernel failed (%s); using the PyTorch path", what, str(e)[:300])
        target.copy_(ref)
        return target
    err = within_two_ulps_error(target, ref)
    if err > 1.0:
        state["disabled"] = True
        logging.warning("Fused %s kernel disagrees with PyTorch; using the PyTorch path from now on "
                        "(error %.2f times the allowed two bf16 ulps)", what, err)
        target.copy_(ref)
        return target
    state["verified"].add(device.index)
    return target


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


def _layout(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _cached_plan(key: tuple, make):
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = make()
    return plan


def _plan(x: torch.Tensor, weight, freqs, out):
    key = ("norm_rope", *_layout(x), x.device, None if weight is None else (weight.shape, weight.stride()),
           _layout(freqs), _layout(out))

    def make():
        ok = _launchable(x, weight, freqs, out)
        return ok, (_freqs_strides(x, freqs) if ok else (0, 0, 0))
    return _cached_plan(key, make)


def _into(res: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`res`, or `out` filled with it when the caller gave one."""
    if out is None:
        return res
    return out.copy_(res)


def _run(kernel, grid, args, meta, device: torch.device) -> None:
    """Launch a Triton kernel on `device` (made current for the launch when it is not)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


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
    _run(kernel, grid, args, meta, x.device)
    return out


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
              freqs: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """rope(rms_norm(x) * weight) for x [..., D]; either step may be left out (weight / freqs None).

    `out`, if given, receives the result (e.g. a slice of a joint-sequence buffer) and is returned.
    """
    if weight is not None and (weight.device != x.device or weight.dtype != x.dtype):
        weight = weight.to(x)
    fused = False
    if _enabled(_state) and not torch.compiler.is_compiling():
        fused, fstr = _plan(x, weight, freqs, out)  # CPU tensors are never launchable
        fused = fused and _kernel() is not False
    if not fused:
        return _into(norm_rope_reference(x, weight, eps, freqs), out)
    target = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _run_checked(_state, "q/k norm + RoPE", x.device, target,
                        lambda: _launch(x, weight, eps, freqs, target, fstr),
                        lambda: norm_rope_reference(x, weight, eps, freqs))


# -- adaLN modulation: shift + layer_norm(x) * (1 + scale) ---------------------------------------------------

_MAX_ROW = 8192  # the kernel holds a whole row (padded to a power of two) in registers


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """The PyTorch path the kernel replaces (Flux's `_modulate(norm(x), shift, scale)`, Wan's blocks)."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def _modulate_dtype(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)


def _modulate_strides(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out) -> tuple | None:
    """Strides over x's [B, L] of shift, scale (broadcast to x) and the output, or None where the kernel
    does not take this layout. Device is not looked at (see `_modulate_plan`)."""
    if not (x.dtype in (torch.bfloat16, torch.float16) and x.ndim == 3 and x.stride(-1) == 1):
        return None
    c = x.shape[-1]
    if not 0 < c <= _MAX_ROW or x.numel() == 0:
        return None
    strides = []
    for t in (shift, scale):
        if t.dtype not in (x.dtype, torch.float32) or t.ndim != 3 or t.shape[-1] != c or t.stride(-1) != 1:
            return None
        if any(n not in (1, m) for n, m in zip(t.shape[:2], x.shape[:2])):
            return None
        strides.append(tuple(s if n != 1 else 0 for s, n in zip(t.stride()[:2], t.shape[:2])))
    if out is not None:
        if out.shape != x.shape or out.dtype != _modulate_dtype(x, shift, scale) or out.stride(-1) != 1:
            return None
        strides.append(out.stride()[:2])
    return tuple(strides)


def _modulate_plan(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out):
    key = ("layernorm_modulate", *_layout(x), x.device, _layout(shift), _layout(scale), _layout(out))

    def make():
        same_device = all(t is None or t.device == x.device for t in (shift, scale, out))
        strides = _modulate_strides(x, shift, scale, out) if x.is_cuda and same_device else None
        return strides is not None, strides
    return _cached_plan(key, make)


def _modulate_launch(x, shift, scale, eps, out, strides=None):
    """Run the kernel: out[b, l] = shift[b|0, l|0] + layer_norm(x[b, l]) * (1 + scale[b|0, l|0]), for a
    layout `_modulate_strides` accepts (`strides`: what it gave)."""
    kernel = _load(_modulate_state)
    n0, n1, c = x.shape
    shs, scs = (strides or _modulate_strides(x, shift, scale, None))[:2]
    block = 1 << (c - 1).bit_length()
    block_r = max(1, 2048 // block)  # small rows: several per program
    n_rows = n0 * n1
    args = (x, shift, scale, out, n_rows, n1, c, *x.stride()[:2], *shs, *scs, *out.stride()[:2], float(eps))
    meta = dict(BLOCK=block, BLOCK_R=block_r, num_warps=max(4, min(16, block * block_r // 512)))
    grid = ((n_rows + block_r - 1) // block_r,)
    _run(kernel, grid, args, meta, x.device)
    return out


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """shift + layer_norm(x, no affine, eps) * (1 + scale): the adaLN modulation of a DiT block.

    x [B, L, C]; shift and scale broadcast over it, typically [B, 1, C] or [1, 1, C]; a 2-D [B, C] is taken
    as [B, 1, C]. The result has the dtype `torch.addcmul` gives (x's, unless shift/scale are float32).
    `out`, if given, receives the result (any strides with the last dim contiguous) and is returned.

    The kernel runs for CUDA bf16/fp16 x with last dim contiguous, C <= 8192, shift and scale of x's dtype
    or float32 with last dim contiguous and each leading dim 1 or x's; everything else (and CPU tensors,
    torch.compile tracing, TACO_FUSED_KERNELS=0) takes the PyTorch path `layernorm_modulate_reference`.
    The kernel repeats that path's roundings: layer_norm in float32 (two-pass mean and biased variance,
    rstd = rsqrt(var + eps)), its output rounded to x's dtype; `1 + scale` rounded to scale's dtype; then
    one float32 fused multiply-add, rounded to the output dtype.
    """
    if x.ndim == 3:
        shift = shift[:, None] if shift.ndim == 2 else shift
        scale = scale[:, None] if scale.ndim == 2 else scale
    fused = False
    if _enabled(_modulate_state) and not torch.compiler.is_compiling():
        fused, strides = _modulate_plan(x, shift, scale, out)  # CPU tensors are never launchable
        fused = fused and _load(_modulate_state) is not False
    if not fused:
        return _into(layernorm_modulate_reference(x, shift, scale, eps), out)
    target = out if out is not None else torch.empty(x.shape, dtype=_modulate_dtype(x, shift, scale),
                                                     device=x.device)
    return _run_checked(_modulate_state, "LayerNorm + modulation", x.device, target,
                        lambda: _modulate_launch(x, shift, scale, eps, target, strides),
                        lambda: layernorm_modulate_reference(x, shift, scale, eps))


_merge_state: dict = {"triton": None, "verified": set(), "disabled": False, "kernel": "lse_merge_kernel"}


def lse_merge_reference(parts: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Attention over P parts of the keys merged into attention over all of them: parts [P, H, L, D], lse
    [P, H, L] (each part's log-sum-exp of its scaled scores) -> [H, L, D] float32."""
    weights = torch.softmax(lse.float(), dim=0).unsqueeze(-1)
    return (weights * parts.float()).sum(0)


def lse_merge(parts: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`lse_merge_reference` written into `out` ([H, L, D], any strides with D contiguous, e.g. some heads of a
    token-major attention output): one Triton pass on CUDA (checked against the reference on first use per
    device), PyTorch ops elsewhere."""
    d = parts.shape[-1]
    usable = (out.is_cuda and _enabled(_merge_state) and parts.stride(-1) == 1 and out.stride(-1) == 1
              and lse.dtype == torch.float32 and d & (d - 1) == 0 and _load(_merge_state))
    if not usable:
        return out.copy_(lse_merge_reference(parts, lse))
    return _run_checked(_merge_state, "lse_merge", out.device, out, lambda: _merge_launch(parts, lse, out),
                        lambda: lse_merge_reference(parts, lse).to(out.dtype))


def _merge_launch(parts: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The Triton merge itself (no checks): one program per 16 (head, query) rows."""
    p, h, length, d = parts.shape
    n_rows, block_r = h * length, 16
    args = (parts, lse, out, n_rows, length, *parts.stride()[:3], *lse.stride(), *out.stride()[:2])
    meta = dict(D=d, PARTS=p, BLOCK_R=block_r, num_warps=4)
    _run(_load(_merge_state), ((n_rows + block_r - 1) // block_r,), args, meta, out.device)
    return out
