"""HunyuanDiT (v1.0, v1.1, v1.2) diffusion transformer in Tencent's released checkpoint key layout.

Keys: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``mlp_t5.{0,2}`` (mT5 -> CLIP width),
``text_embedding_padding`` (learned stand-ins for padded text positions), ``pooler.{positional_embedding,
q_proj,k_proj,v_proj,c_proj}`` (attention pool of the mT5 tokens), ``extra_embedder.{0,2}``, v1.0 only
``style_embedder``, ``blocks.N.{norm1,attn1.{Wqkv,q_norm,k_norm,out_proj},norm3,attn2.{q_proj,kv_proj,q_norm,
k_norm,out_proj},norm2,mlp.{fc1,fc2},default_modulation.1}``, the second half of the blocks also
``skip_norm`` / ``skip_linear`` (U-Net-style long skips), ``final_layer.{adaLN_modulation.1,linear}``.

The forward runs in stages so the multi-GPU engine can wrap them without model changes:
``embed`` (patch tokens, text tokens [CLIP; mT5], conditioning vector, 2-D RoPE for the image grid) ->
``run_blocks`` -> ``final`` (per token) -> ``unpatchify``. Self-attention over the image tokens goes through
`comfy.ldm.modules.attention.optimized_attention` with the block's transformer_options; cross-attention to
the text and the mT5 attention pool pass `cross_attention_options(...)` so a sequence-parallel override
keeps them local.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size
from comfy.ldm.modules.attention import cross_attention_options, optimized_attention
from comfy.ldm.pixart.model import timestep_embedding

# What a sequence-parallel engine splits and where it gathers.
SEQUENCE_PARALLEL_PLAN = {
    "split_after": "embed",               # x [B, L_img, C] dim 1; rope = (cos, sin), each [L_img, D] dim 0
    "split": {"x": 1, "rope": 0},
    "replicated": ["c", "text_states"],   # conditioning vector and text tokens: whole on every rank
    "gather_before": "unpatchify",        # after `final` (per token), output tokens dim 1
    "attention": "optimized_attention_override",
}


def resize_crop_region(grid: tuple[int, int], base_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (h, w) token grid sits when its aspect ratio is fitted into the square base grid it was
    trained on: (top, left), (bottom, right) in base-grid units (HunyuanDiT's RoPE crop region)."""
    h, w = grid
    if h / w > 1:
        rh, rw = base_size, int(round(base_size / h * w))
    else:
        rw, rh = base_size, int(round(base_size / w * h))
    top, left = int(round((base_size - rh) / 2.0)), int(round((base_size - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


@functools.lru_cache(maxsize=16)
def rope_2d(head_dim: int, h: int, w: int, base_size: int = 32, theta: float = 10000.0):
    """(cos, sin), each [h*w, head_dim] float32, for interleaved-pair 2-D RoPE: the first half of a head
    rotates with the column position, the second with the row; positions span the crop region of the
    base grid (start + (stop - start) * i / n, as the original's endpoint-free linspace)."""
    if head_dim % 4:
        raise ValueError(f"HunyuanDiT 2-D RoPE needs a head size divisible by 4, got {head_dim}")
    (top, left), (bottom, right) = resize_crop_region((h, w), base_size)
    rows = top + (bottom - top) * torch.arange(h, dtype=torch.float64) / h
    cols = left + (right - left) * torch.arange(w, dtype=torch.float64) / w
    rows = rows[:, None].expand(h, w).reshape(-1)
    cols = cols[None, :].expand(h, w).reshape(-1)
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)
    angles = torch.cat([torch.outer(cols, freqs), torch.outer(rows, freqs)], dim=1).float()
    angles = angles.repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] with pairs (x0, x1) rotated: (x0 cos - x1 sin, x1 cos + x0 sin), in float32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def _silu_fp32(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x.float()).to(x.dtype)


class TwoLayerMLP(nn.Module):
    """Linear -> SiLU (in float32, as trained) -> Linear; keys ``0`` and ``2`` as in the nn.Sequential."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.add_module("0", operations.Linear(in_dim, hidden, dtype=dtype, device=device))
        self.add_module("2", operations.Linear(hidden, out_dim, dtype=dtype, device=device))

    def forward(self, x):
        return getattr(self, "2")(_silu_fp32(getattr(self, "0")(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, dtype=None, device=None, operations=None):
        super().__init__()
        self.mlp = nn.Sequential(operations.Linear(freq_dim, hidden, dtype=dtype, device=device), nn.SiLU(),
                                 operations.Linear(hidden, hidden, dtype=dtype, device=device))

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, 256).to(dtype))


class AttentionPool(nn.Module):
    """One query (the mean token) attends over [mean; tokens] + learned positions -> pooled vector."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(seq_len + 1, dim, dtype=dtype, device=device))
        self.q_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.k_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.v_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.c_proj = operations.Linear(dim, out_dim, dtype=dtype, device=device)

    def forward(self, x, transformer_options=None):
        n = x.shape[1]
        if n + 1 > self.positional_embedding.shape[0]:
            raise ValueError(f"HunyuanDiT's mT5 pool takes at most {self.positional_embedding.shape[0] - 1} "
                             f"tokens, got {n}: shorten the prompt")
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding[: n + 1].to(dtype=x.dtype, device=x.device)
        out = optimized_attention(self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x), self.heads,
                                  transformer_options=cross_attention_options(transformer_options))
        return self.c_proj(out[:, 0])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.Wqkv = operations.Linear(dim, dim * 3, dtype=dtype, device=device)
        self.q_norm = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.k_norm = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.out_proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, rope, transformer_options=None):
        b, n, c = x.shape
        q, k, v = self.Wqkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        out = optimized_attention(q, k, v, self.heads, skip_reshape=True, transformer_options=transformer_options)
        return self.out_proj(out)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.q_proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.kv_proj = operations.Linear(context_dim, 2 * dim, dtype=dtype, device=device)
        self.q_norm = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.k_norm = operations.LayerNorm(head_dim, eps=1e-6, dtype=dtype, device=device)
        self.out_proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, context, rope, transformer_options=None):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q_proj(x).view(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv_proj(context).view(b, context.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rope(self.q_norm(q), *rope)   # image queries carry positions; text keys do not
        k = self.k_norm(k)
        out = optimized_attention(q, k, v, self.heads, skip_reshape=True,
                                  transformer_options=cross_attention_options(transformer_options))
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class HunYuanDiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_hidden: int, context_dim: int, skip: bool = False,
                 dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        ln = dict(eps=1e-6, dtype=dtype, device=device)
        self.norm1 = operations.LayerNorm(hidden, **ln)
        self.attn1 = SelfAttention(hidden, heads, **kw)
        self.norm2 = operations.LayerNorm(hidden, **ln)
        self.mlp = Mlp(hidden, mlp_hidden, **kw)
        self.default_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden, hidden, dtype=dtype,
                                                                             device=device))
        self.attn2 = CrossAttention(hidden, context_dim, heads, **kw)
        self.norm3 = operations.LayerNorm(hidden, **ln)
        if skip:
            self.skip_norm = operations.LayerNorm(2 * hidden, **ln)
            self.skip_linear = operations.Linear(2 * hidden, hidden, dtype=dtype, device=device)
        else:
            self.skip_linear = None

    def forward(self, x, c, text_states, rope, skip=None, transformer_options=None):
        if self.skip_linear is not None:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))
        shift = self.default_modulation(c).unsqueeze(1)
        x = x + self.attn1(self.norm1(x) + shift, rope, transformer_options=transformer_options)
        x = x + self.attn2(self.norm3(x), text_states, rope, transformer_options=transformer_options)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden, patch_size * patch_size * out_channels, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden, 2 * hidden, dtype=dtype,
                                                                           device=device))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


class HunYuanDiT(nn.Module):
    SEQUENCE_PARALLEL_PLAN = SEQUENCE_PARALLEL_PLAN

    def __init__(self, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1408, depth: int = 40,
                 num_heads: int = 16, mlp_hidden: int = 6144, text_states_dim: int = 1024,
                 text_states_dim_t5: int = 2048, t5_mlp_hidden: int = 8192, text_len: int = 77,
                 text_len_t5: int = 256, pooled_dim: int = 1024, pooler_heads: int = 8, learn_sigma: bool = True,
                 use_style_cond: bool = False, image_model=None, dtype=None, device=None, operations=None,
                 **kwargs):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        if hidden_size % num_heads:
            raise ValueError(f"HunyuanDiT hidden size {hidden_size} is not divisible by {num_heads} heads")
        if depth % 2:
            raise ValueError(f"HunyuanDiT depth {depth} is odd: its long skips pair block i with block depth-1-i, "
                             "so the checkpoint is incomplete")
        self.dtype = dtype
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.depth = depth
        self.text_len = text_len
        self.text_len_t5 = text_len_t5
        self.use_style_cond = use_style_cond
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.text_embedding_padding = nn.Parameter(
            torch.empty(text_len + text_len_t5, text_states_dim, dtype=dtype, device=device))
        self.mlp_t5 = TwoLayerMLP(text_states_dim_t5, t5_mlp_hidden, text_states_dim, **kw)
        self.pooler = AttentionPool(text_len_t5, text_states_dim_t5, pooler_heads, pooled_dim, **kw)
        extra_in = pooled_dim + (256 * 6 + hidden_size if use_style_cond else 0)
        self.extra_embedder = TwoLayerMLP(extra_in, hidden_size * 4, hidden_size, **kw)
        if use_style_cond:
            self.style_embedder = operations.Embedding(1, hidden_size, dtype=dtype, device=device)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = operations.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size,
                                                 dtype=dtype, device=device)
        self.t_embedder = TimestepEmbedder(hidden_size, **kw)
        self.blocks = nn.ModuleList(
            HunYuanDiTBlock(hidden_size, num_heads, mlp_hidden, text_states_dim, skip=i > depth // 2, **kw)
            for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, **kw)

    # -- stages --------------------------------------------------------------------------------------

    def text_tokens(self, context, mask, context_t5, mask_t5):
        """[CLIP tokens; mT5 tokens projected to CLIP width] with padded positions replaced by the learned
        padding (the last text_len / text_len_t5 positions of each stream, as the model was trained)."""
        dtype = context.dtype
        t5 = self.mlp_t5(context_t5)
        pad = self.text_embedding_padding.to(dtype=dtype, device=context.device)
        streams = []
        for states, m, pad_part, trained_len in ((context, mask, pad[: self.text_len], self.text_len),
                                                 (t5, mask_t5, pad[self.text_len:], self.text_len_t5)):
            if m is not None:
                n = min(states.shape[1], trained_len)
                keep = m[:, -n:].to(states.device).bool().unsqueeze(-1)
                states = torch.cat([states[:, :-n], torch.where(keep, states[:, -n:], pad_part[:n])], dim=1)
            streams.append(states)
        return torch.cat(streams, dim=1)

    def embed(self, x, timestep, context, text_embedding_mask=None, encoder_hidden_states_t5=None,
              text_embedding_mask_t5=None, image_meta_size=None, style=None, transformer_options=None):
        """Latent [B, C, H, W] (patch-aligned) -> (x tokens, conditioning vector c, text tokens, rope)."""
        if encoder_hidden_states_t5 is None:
            raise ValueError("HunyuanDiT needs the mT5-XL conditioning (encoder_hidden_states_t5): encode the "
                             "prompt with the checkpoint's CLIP (BERT + mT5-XL), clip type hunyuan_dit")
        dtype = x.dtype
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        context_t5 = encoder_hidden_states_t5.to(dtype)
        text_states = self.text_tokens(context.to(dtype), text_embedding_mask, context_t5, text_embedding_mask_t5)
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        extra = self.pooler(context_t5, transformer_options)
        if self.use_style_cond:
            if image_meta_size is None:
                image_meta_size = torch.tensor([[h * self.patch_size * 8, w * self.patch_size * 8] * 2 + [0, 0]],
                                               device=x.device)
            meta = image_meta_size.reshape(-1, 6)
            meta = meta.expand(b, -1) if meta.shape[0] == 1 else meta
            meta = timestep_embedding(meta.reshape(-1), 256).to(dtype).reshape(b, 6 * 256)
            if style is None:
                style = torch.zeros(b, dtype=torch.long, device=x.device)
            extra = torch.cat([extra, meta, self.style_embedder(style.to(x.device).long().reshape(-1))
                               .to(dtype)], dim=1)
        c = self.t_embedder(timestep, dtype) + self.extra_embedder(extra)
        cos, sin = rope_2d(self.head_dim, h, w, 512 // 8 // self.patch_size)
        return tokens, c, text_states, (cos.to(x.device), sin.to(x.device))

    def run_blocks(self, x, c, text_states, rope, transformer_options=None):
        transformer_options = transformer_options if transformer_options is not None else {}
        skips = []
        half = self.depth // 2
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            x = block(x, c, text_states, rope, skips.pop() if i > half else None,
                      transformer_options=transformer_options)
            if i < half - 1:
                skips.append(x)
        return x

    def final(self, x, c):
        return self.final_layer(x, c)

    def unpatchify(self, x, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] (patch-major ``(p q c)``) -> [B, C, h*p, w*p]."""
        p = self.patch_size
        c = x.shape[-1] // (p * p)
        x = x.view(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, timestep, context, text_embedding_mask=None, encoder_hidden_states_t5=None,
                text_embedding_mask_t5=None, image_meta_size=None, style=None, control=None,
                transformer_options=None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        h_orig, w_orig = x.shape[-2:]
        x = pad_to_patch_size(x, (self.patch_size, self.patch_size))
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens, c, text_states, rope = self.embed(x, timestep, context, text_embedding_mask,
                                                  encoder_hidden_states_t5, text_embedding_mask_t5,
                                                  image_meta_size, style, transformer_options)
        tokens = self.run_blocks(tokens, c, text_states, rope, transformer_options)
        out = self.unpatchify(self.final(tokens, c), h, w)
        # learned-sigma checkpoints predict [v, variance]; samplers use the first half
        return out[:, :self.in_channels, :h_orig, :w_orig]
