"""The single attention entry point every DiT in comfy/ldm calls.

`optimized_attention(q, k, v, heads, ...)` runs scaled dot-product attention through torch SDPA. The
multi-GPU engine (and custom node packs) replace it per call without touching model code: a callable
stored as ``transformer_options["optimized_attention_override"]`` is called instead, as
``override(default_fn, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
transformer_options=...)``; it may run the default itself (e.g. between Ulysses all-to-alls).

Side work: a caller with work that does not depend on the attention (Flux's single blocks: the MLP branch)
may pass it as ``side_work=(before, after)`` callables. Without an override they simply run first. An
override that sets ``override.accepts_side_work = True`` receives them and may run `before` while its
input exchange is in flight and `after` while its output exchange is (sequence parallel); otherwise they
run before the override is called. Either way each runs exactly once, before the call returns.

Deferred inputs: `k` and `v` may be zero-argument callables that compute the tensor (Wan's self-attention
passes its k and v projections so). Without an override, or with one that does not set
``override.accepts_deferred = True``, they are computed first, in order (k, then v); an override that
accepts them may compute them later, e.g. while q is already being exchanged (sequence parallel).
Where packed q/k/v go: a model that writes q, k and v into one packed ``[B, L, 3, H, D]`` buffer (Flux) asks
``qkv_buffer(transformer_options, shape, dtype, device)`` for it. An override may supply that buffer through
``transformer_options[QKV_BUFFER_KEY]`` (a callable taking shape, dtype and device, returning such a tensor
or None): e.g. a slice of memory its peers read from, so the exchange needs no copy of this rank's part.
Such an override may also set ``transformer_options[KV_READY_KEY]``, a callable taking that buffer: a model
that can write k and v before q (Flux's double blocks) asks `kv_ready_hook` for it, writes k/v, calls it,
then writes q, so the override can start moving k and v while q is still computed.
Layouts: by default q/k/v are ``[B, L, H*D]`` and the result is ``[B, L, H*D]``. With
``skip_reshape=True`` inputs are already ``[B, H, L, D]`` (what the DiTs produce after qk-norm and RoPE);
with ``skip_output_reshape=True`` the result stays ``[B, H, L, D]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from comfy.taco_dit.utils import wave_attention

OVERRIDE_KEY = "optimized_attention_override"
# Cross-attention (queries from image/video tokens, keys from text) must say so: an override that splits
# the token sequence across ranks (sequence parallel) has to leave such calls local, because every rank
# holds all text keys. Models pass `cross_attention_options(transformer_options)` for those calls.
CROSS_ATTENTION_KEY = "attention_is_cross"
QKV_BUFFER_KEY = "packed_qkv_buffer"
KV_READY_KEY = "packed_qkv_kv_ready"


def qkv_buffer(transformer_options: dict | None, shape: tuple, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A packed [B, L, 3, H, D] buffer for the next attention call's q, k and v: the override's (see the module
    docstring), else a new one."""
    supply = transformer_options.get(QKV_BUFFER_KEY) if transformer_options else None
    buf = supply(tuple(shape), dtype, device) if supply is not None else None
    return buf if buf is not None else torch.empty(shape, dtype=dtype, device=device)


def kv_ready_hook(transformer_options: dict | None) -> Callable | None:
    """The override's "k and v of this packed buffer are written, q is not yet" callback, or None (then a model
    writes q, k and v in whatever order suits it). See the module docstring."""
    return transformer_options.get(KV_READY_KEY) if transformer_options else None


def cross_attention_options(transformer_options: dict | None) -> dict:
    """transformer_options for a cross-attention call (see CROSS_ATTENTION_KEY)."""
    opts = dict(transformer_options or {})
    opts[CROSS_ATTENTION_KEY] = True
    return opts


# Which kernel runs the unmasked half-precision attention of the DiTs on CUDA:
#   "cudnn": cuDNN's fused attention, falling back to SDPA's own choice for anything cuDNN refuses. On
#            Hopper it runs the DiTs' shapes 1.6-1.9x faster than SDPA's FlashAttention-2 kernel
#            (benchmarks/probe_attention.py; RESULTS.md). torch 2.11's SDPA already prefers cuDNN there
#            (identical outputs and times); builds that prefer FlashAttention-2 get cuDNN through this;
#   "sdpa":  torch's default choice (`--use-pytorch-cross-attention`, or TACO_ATTENTION=sdpa).
# "auto" picks cudnn on compute capability 9.x and sdpa elsewhere.
_BACKEND_ENV = "TACO_ATTENTION"
_backend: str | None = None
_cudnn_refused: dict = {}  # shape key -> why cuDNN refused it (SDPA's choice runs those)


def attention_backend() -> str:
    """The resolved backend name for CUDA attention ("cudnn" or "sdpa")."""
    global _backend
    if _backend is None:
        choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"
        try:
            from comfy.cli_args import args
            if getattr(args, "use_pytorch_cross_attention", False):
                choice = "sdpa"
        except Exception:  # noqa: BLE001 - cli args not parsed (library use): keep the env / auto choice
            pass
        if choice not in ("auto", "cudnn", "sdpa"):
            raise ValueError(f"{_BACKEND_ENV}={choice!r}: use auto, cudnn or sdpa")
        if choice == "auto":
            choice = "sdpa"
            if torch.cuda.is_available() and torch.backends.cudnn.is_available():
                major, _ = torch.cuda.get_device_capability()
                if major == 9:
                    choice = "cudnn"
        _backend = choice
    return _backend


def set_attention_backend(name: str | None) -> None:
    """Force a backend ("cudnn", "sdpa") or, with None, re-resolve from the environment next call."""
    global _backend
    _backend = name
    _cudnn_refused.clear()


def cudnn_refusals() -> dict:
    """Shapes cuDNN refused since the backend was last set, with its error (benchmarks report these)."""
    return dict(_cudnn_refused)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for [B, H, L, D] tensors, on the fastest kernel for the device."""
    if (mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
            and attention_backend() == "cudnn"):
        key = (tuple(q.shape), tuple(k.shape), q.dtype)
        if key not in _cudnn_refused:
            try:
                # a call whose last wave of tiles would be small may run it over parts of the keys instead
                out = wave_attention.sdpa(q, k, v)
                if out is not None:
                    return out
                return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]
            except RuntimeError as e:  # a layout or size this cuDNN build does not take: SDPA's choice
                _cudnn_refused[key] = str(e)[:300]
                logging.warning("cuDNN attention refused q%s k%s %s (%s); torch SDPA runs it", key[0], key[1],
                                key[2], _cudnn_refused[key])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None, skip_reshape: bool = False,
                   skip_output_reshape: bool = False, **_ignored) -> torch.Tensor:
    """Plain SDPA; no override lookup (overrides call this as their inner op)."""
    if not skip_reshape:
        b, _, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        # [L, S] or [B, L, S] masks broadcast over heads
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
    out = sdpa(q, k, v, mask)
    if skip_output_reshape:
        return out
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def run_side_work(side_work) -> None:
    for step in side_work or ():
        step()


def materialize(t):
    """A deferred attention input (a zero-argument callable) computed; a tensor as it is."""
    return t() if callable(t) else t


def optimized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        mask: torch.Tensor | None = None, attn_precision=None, skip_reshape: bool = False,
                        skip_output_reshape: bool = False,
                        transformer_options: dict | None = None, side_work=None) -> torch.Tensor:
    """Attention for every DiT; honours ``transformer_options[OVERRIDE_KEY]`` and runs `side_work` (see the
    module docstring)."""
    override: Callable | None = transformer_options.get(OVERRIDE_KEY) if transformer_options else None
    if override is None or not getattr(override, "accepts_deferred", False):
        k, v = materialize(k), materialize(v)
    if override is not None:
        extra = {}
        if side_work and getattr(override, "accepts_side_work", False):
            extra["side_work"] = side_work
        else:
            run_side_work(side_work)
        return override(attention_sdpa, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, transformer_options=transformer_options, **extra)
    run_side_work(side_work)
    return attention_sdpa(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                          skip_output_reshape=skip_output_reshape)


# ComfyUI exposes these names too; custom nodes import them.
optimized_attention_masked = optimized_attention
attention_pytorch = attention_sdpa
