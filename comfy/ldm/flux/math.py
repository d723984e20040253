"""Flux rotary position embedding (interleaved pairs over (t, h, w) ids) and the attention call."""

from __future__ import annotations

import torch

from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.modules.fused import norm_rope


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """[B, L] positions -> [B, L, dim/2, 2, 2] rotation matrices (float64 maths where the device has it)."""
    assert dim % 2 == 0, f"RoPE axis dim must be even, got {dim}"
    # float64 keeps large positions exact; MPS has no float64
    fdtype = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=fdtype, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = pos.to(fdtype).unsqueeze(-1) * omega
    cos, sin = torch.cos(out), torch.sin(out)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.view(*out.shape[:-1], 2, 2).float()


def embed_nd(ids: torch.Tensor, axes_dim: list[int], theta: float) -> torch.Tensor:
    """ids [B, L, n_axes] -> pe [B, 1, L, head_dim/2, 2, 2]."""
    emb = torch.cat([rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])], dim=-3)
    return emb.unsqueeze(1)


def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., D] by `freqs_cis` [..., D/2, 2, 2] (float32 maths; a fused kernel on CUDA)."""
    return norm_rope(x, None, 0.0, freqs_cis)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None,
              mask: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, L, H*D], RoPE applied to q and k first."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return optimized_attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True,
                               transformer_options=transformer_options)
