"""PixArt-α / PixArt-Σ diffusion transformer (PixArtMS) in the released checkpoint's key layout.

Keys: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``t_block.1`` (adaLN-single), ``y_embedder.y_proj.
{fc1,fc2}`` and ``y_embedder.y_embedding`` (the trained null caption), α only ``csize_embedder`` /
``ar_embedder``, ``blocks.N.{scale_shift_table,attn.qkv,attn.proj,cross_attn.{q_linear,kv_linear,proj},
mlp.{fc1,fc2}}``, ``final_layer.{scale_shift_table,linear}``. ``pos_embed`` is a fixed sin-cos table
recomputed for every latent size, so a stored copy is ignored.

The forward runs in stages so the multi-GPU engine can wrap them without model changes:
``embed`` (patch tokens + 2-D sin-cos positions, caption tokens, adaLN-single vectors) -> ``run_blocks``
-> ``final`` (per token) -> ``unpatchify``. Self-attention goes through
`comfy.ldm.modules.attention.optimized_attention` with the block's transformer_options; cross-attention to
the caption passes `cross_attention_options(...)` so a sequence-parallel override keeps it local.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size
from comfy.ldm.modules.attention import cross_attention_options, optimized_attention

# What a sequence-parallel engine splits (image tokens after `embed`) and where it gathers.
SEQUENCE_PARALLEL_PLAN = {
    "split_after": "embed",            # x [B, L_img, C] dim 1
    "split": {"x": 1},
    "replicated": ["y", "t", "t0"],    # caption tokens and adaLN vectors: whole on every rank
    "gather_before": "unpatchify",     # after `final` (per token), output tokens dim 1
    "attention": "optimized_attention_override",
}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding of a timestep (cos half first), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@functools.lru_cache(maxsize=16)
def _sincos_2d(dim: int, h: int, w: int, base_size: float, interpolation: float) -> torch.Tensor:
    """PixArt's 2-D sin-cos table [h*w, dim]: first half encodes the column, second the row, each
    [sin, cos]; positions are rescaled so a grid of `base_size` spans the trained range / interpolation."""
    gh = torch.arange(h, dtype=torch.float64) / (h / base_size) / interpolation
    gw = torch.arange(w, dtype=torch.float64) / (w / base_size) / interpolation
    rows = gh[:, None].expand(h, w).reshape(-1)
    cols = gw[None, :].expand(h, w).reshape(-1)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one(pos):
        out = torch.outer(pos, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, dtype=None,
                 device=None, operations=None):
        super().__init__()
        self.fc1 = operations.Linear(in_features, hidden_features, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden_features, out_features or in_features, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear (``mlp.0`` / ``mlp.2``); also PixArt-α's size embedder."""

    def __init__(self, hidden: int, freq_dim: int = 256, dtype=None, device=None, operations=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(operations.Linear(freq_dim, hidden, dtype=dtype, device=device), nn.SiLU(),
                                 operations.Linear(hidden, hidden, dtype=dtype, device=device))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))

    def embed_values(self, s: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[B or 1, n] values -> [B, n*hidden] (each value embedded on its own, then concatenated)."""
        s = s.reshape(s.shape[0], -1)
        if s.shape[0] != batch:
            s = s.repeat(-(-batch // s.shape[0]), 1)[:batch]
        n = s.shape[1]
        return self(s.reshape(-1), dtype).reshape(batch, n * self.mlp[2].out_features)


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, hidden: int, max_length: int, dtype=None, device=None,
                 operations=None):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden, hidden, dtype=dtype, device=device, operations=operations)
        # the trained "empty caption" used for classifier-free dropout in training; kept so saved and
        # patched models round-trip, unused at inference (the uncond comes from the text encoder)
        self.y_embedding = nn.Parameter(torch.empty(max_length, caption_channels, dtype=dtype, device=device))

    def forward(self, y):
        return self.y_proj(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, hidden, patch_size, stride=patch_size, bias=True, dtype=dtype,
                                      device=device)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        self.qkv = operations.Linear(dim, dim * 3, bias=True, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, transformer_options=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = optimized_attention(q, k, v, self.heads, skip_reshape=True, transformer_options=transformer_options)
        return self.proj(out)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        self.q_linear = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(dim, dim * 2, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, y, mask=None, transformer_options=None):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q_linear(x).view(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv_linear(y).view(b, y.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = optimized_attention(q, k, v, self.heads, mask=mask, skip_reshape=True,
                                  transformer_options=cross_attention_options(transformer_options))
        return self.proj(out)


class PixArtBlock(nn.Module):
    """adaLN-single block: modulated self-attention, cross-attention to the caption, modulated MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads, **kw)
        self.cross_attn = CrossAttention(hidden, heads, **kw)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), **kw)
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden, dtype=dtype, device=device))

    def forward(self, x, y, t0, mask=None, transformer_options=None):
        table = self.scale_shift_table.to(dtype=t0.dtype, device=t0.device)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            table[None] + t0.view(t0.shape[0], 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa),
                                     transformer_options=transformer_options)
        x = x + self.cross_attn(x, y, mask, transformer_options=transformer_options)
        return x + gate_mlp * self.mlp(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden, patch_size * patch_size * out_channels, dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden, dtype=dtype, device=device))

    def forward(self, x, t):
        table = self.scale_shift_table.to(dtype=t.dtype, device=t.device)
        shift, scale = (table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


class PixArtMS(nn.Module):
    SEQUENCE_PARALLEL_PLAN = SEQUENCE_PARALLEL_PLAN

    def __init__(self, input_size: int = 128, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, pred_sigma: bool = True,
                 caption_channels: int = 4096, model_max_length: int = 300, micro_condition: bool = False,
                 pe_interpolation: float | None = None, image_model=None, dtype=None, device=None,
                 operations=None, **kwargs):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        if hidden_size % num_heads:
            raise ValueError(f"PixArt hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.dtype = dtype
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.micro_condition = micro_condition
        self.base_size = input_size // patch_size
        # the trained position range: 512 px (64 latent) per unit of interpolation, as PixArt sets it
        self.pe_interpolation = pe_interpolation or max(input_size // 64, 1)
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(hidden_size, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), operations.Linear(hidden_size, 6 * hidden_size, dtype=dtype,
                                                                  device=device))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length, **kw)
        if micro_condition:
            self.csize_embedder = TimestepEmbedder(hidden_size // 3, **kw)
            self.ar_embedder = TimestepEmbedder(hidden_size // 3, **kw)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, mlp_ratio, **kw) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, **kw)

    # -- stages --------------------------------------------------------------------------------------

    def pos_embed(self, h: int, w: int, device, dtype) -> torch.Tensor:
        return _sincos_2d(self.hidden_size, h, w, float(self.base_size), float(self.pe_interpolation)).to(
            device=device, dtype=dtype)

    def embed(self, x, timestep, y, c_size=None, c_ar=None):
        """Latent [B, C, H, W] (patch-aligned) -> (x tokens, caption y, t for the final layer, t0 for blocks)."""
        dtype = x.dtype
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.x_embedder(x) + self.pos_embed(h, w, x.device, dtype)
        t = self.t_embedder(timestep, dtype)
        if self.micro_condition:
            b = x.shape[0]
            if c_size is None or c_ar is None:
                raise ValueError("PixArt-α needs c_size and c_ar (image size and aspect ratio) conditioning")
            t = t + torch.cat([self.csize_embedder.embed_values(c_size.to(x.device), b, dtype),
                               self.ar_embedder.embed_values(c_ar.to(x.device), b, dtype)], dim=1)
        t0 = self.t_block(t)
        y = self.y_embedder(y.to(dtype))
        return x, y, t, t0

    def run_blocks(self, x, y, t0, mask=None, transformer_options=None):
        transformer_options = transformer_options if transformer_options is not None else {}
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            x = block(x, y, t0, mask, transformer_options=transformer_options)
        return x

    def final(self, x, t):
        return self.final_layer(x, t)

    def unpatchify(self, x, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] (patch-major ``(p q c)``) -> [B, C, h*p, w*p]."""
        p = self.patch_size
        c = x.shape[-1] // (p * p)
        x = x.view(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, timestep, context, c_size=None, c_ar=None, transformer_options=None,
                attention_mask=None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        h_orig, w_orig = x.shape[-2:]
        x = pad_to_patch_size(x, (self.patch_size, self.patch_size))
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        mask = None
        if attention_mask is not None:
            # [B, L_txt] keep-mask -> boolean [B, 1, L_txt] over the caption keys
            mask = attention_mask.to(device=x.device).bool()[:, None, :]
        tokens, y, t, t0 = self.embed(x, timestep, context, c_size, c_ar)
        tokens = self.run_blocks(tokens, y, t0, mask, transformer_options)
        out = self.unpatchify(self.final(tokens, t), h, w)
        # learned-sigma models predict [eps, variance]; samplers use eps
        return out[:, :self.in_channels, :h_orig, :w_orig]
