"""The single attention entry point every DiT in comfy/ldm calls.

`optimized_attention(q, k, v, heads, ...)` runs scaled dot-product attention through torch SDPA. The
multi-GPU engine (and custom node packs) replace it per call without touching model code: a callable
stored as ``transformer_options["optimized_attention_override"]`` is called instead, as
``override(default_fn, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
transformer_options=...)``; it may run the default itself (e.g. between Ulysses all-to-alls).

Layouts: by default q/k/v are ``[B, L, H*D]`` and the result is ``[B, L, H*D]``. With
``skip_reshape=True`` inputs are already ``[B, H, L, D]`` (what the DiTs produce after qk-norm and RoPE);
with ``skip_output_reshape=True`` the result stays ``[B, H, L, D]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

OVERRIDE_KEY = "optimized_attention_override"
# Cross-attention (queries from image/video tokens, keys from text) must say so: an override that splits
# the token sequence across ranks (sequence parallel) has to leave such calls local, because every rank
# holds all text keys. Models pass `cross_attention_options(transformer_options)` for those calls.
CROSS_ATTENTION_KEY = "attention_is_cross"


def cross_attention_options(transformer_options: dict | None) -> dict:
    """transformer_options for a cross-attention call (see CROSS_ATTENTION_KEY)."""
    opts = dict(transformer_options or {})
    opts[CROSS_ATTENTION_KEY] = True
    return opts


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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def optimized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        mask: torch.Tensor | None = None, attn_precision=None, skip_reshape: bool = False,
                        skip_output_reshape: bool = False,
                        transformer_options: dict | None = None) -> torch.Tensor:
    """Attention for every DiT; honours ``transformer_options[OVERRIDE_KEY]`` (see module docstring)."""
    override: Callable | None = transformer_options.get(OVERRIDE_KEY) if transformer_options else None
    if override is not None:
        return override(attention_sdpa, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, transformer_options=transformer_options)
    return attention_sdpa(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                          skip_output_reshape=skip_output_reshape)


# ComfyUI exposes these names too; custom nodes import them.
optimized_attention_masked = optimized_attention
attention_pytorch = attention_sdpa
