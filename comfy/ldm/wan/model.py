"""Wan 2.1 video diffusion transformer (t2v, i2v, first-last-frame; also the Wan 2.2 14B and TI2V-5B
DiTs, which share it) in the Wan checkpoint layout.

Key names follow the released checkpoints (`patch_embedding`, `text_embedding`, `time_embedding`,
`time_projection`, `blocks.N.{self_attn,cross_attn,norm3,ffn,modulation}`, `head.{head,modulation}`,
`img_emb.proj` for i2v), so LoRAs and ComfyUI custom nodes address the same weights.

The forward runs in stages so the multi-GPU engine can wrap them without model changes:
``embed`` (3-D patchified video tokens, time modulation, text (+ image) context) -> ``run_blocks`` ->
``final`` (head, per token) -> ``unpatchify``. Self-attention over video tokens passes the block's
``transformer_options``; cross-attention to text / image tokens passes
``cross_attention_options(transformer_options)`` so a sequence-parallel override keeps it local.
`SEQUENCE_PARALLEL_PLAN` says what an engine splits and where it gathers. No distributed code lives here.

Wan 2.2 TI2V-5B (48-channel latents of the Wan 2.2 VAE, dim 3072, 30 layers) is this network with a
timestep per latent frame: the start image's frame is denoised at t = 0 while the rest follow the sampler,
so the time modulation (`e`, `e0`) carries a frame axis and each block applies it per run of h*w tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size
from comfy.ldm.flux.math import apply_rope1, rope
from comfy.ldm.modules.attention import cross_attention_options, optimized_attention
from comfy.ldm.modules.fused import layernorm_modulate
from comfy.ops import linear_gelu

# Every released Wan 2.1 / 2.2 DiT uses 128-wide heads (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128);
# the checkpoint stores qk-norm across all heads, so the head count is not in the file.
WAN_HEAD_DIM = 128

# What a sequence-parallel engine splits (token dim of each stage input) and where it gathers.
SEQUENCE_PARALLEL_PLAN = {
    "split_after": "embed",          # x tokens [B, L, dim] dim 1, freqs [1, L, 1, D/2, 2, 2] dim 1
    "split": {"x": 1, "freqs": 1},
    "replicated": ["e", "e0", "context"],   # time modulation and text/image context: whole on every rank
    "gather_before": "unpatchify",   # after `final` (per token), output tokens dim 1
    "attention": "optimized_attention_override",
}


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps (0..1000) -> [B, dim] float32, cosine half first (Wan's convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) RoPE widths: h and w get 2*(d//6) each, time the rest (44/42/42 at d=128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_table(f: int, h: int, w: int, head_dim: int, theta: float = 10000.0, t_start: int = 0,
               device=None) -> torch.Tensor:
    """RoPE rotations for an f x h x w token grid -> [1, f*h*w, 1, head_dim/2, 2, 2] float32.

    Built per axis (one short table each) and broadcast over the grid, instead of per token.
    """
    parts = []
    for n, start, dim, shape in ((f, t_start, rope_axes(head_dim)[0], (f, 1, 1)),
                                 (h, 0, rope_axes(head_dim)[1], (1, h, 1)),
                                 (w, 0, rope_axes(head_dim)[2], (1, 1, w))):
        pos = torch.arange(start, start + n, device=device)[None]
        r = rope(pos, dim, theta)[0]                    # [n, dim/2, 2, 2]
        parts.append(r.view(*shape, dim // 2, 2, 2).expand(f, h, w, dim // 2, 2, 2))
    return torch.cat(parts, dim=3).reshape(1, f * h * w, 1, head_dim // 2, 2, 2)


class WanRMSNorm(nn.Module):
    """RMS norm over the whole projection (all heads at once), learnt `weight` (the checkpoint's name)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype and self.weight.device == x.device \
            else self.weight.to(dtype=x.dtype, device=x.device)
        # fused: accumulates in fp32 for half-precision inputs
        return F.rms_norm(x, (x.shape[-1],), w, eps=self.eps)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, dtype=None,
                 device=None, operations=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Wan dim {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kw = dict(dtype=dtype, device=device)
        self.q = operations.Linear(dim, dim, **kw)
        self.k = operations.Linear(dim, dim, **kw)
        self.v = operations.Linear(dim, dim, **kw)
        self.o = operations.Linear(dim, dim, **kw)
        self.norm_q = WanRMSNorm(dim, eps, **kw) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps, **kw) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, transformer_options: dict | None = None,
                side_work=None):
        """`side_work`: (before, after) callables independent of this attention (attention.py): under sequence
        parallel they run while its exchanges are in flight, else first."""
        b, n, _ = x.shape

        def rotated(proj, norm):
            # [B, L, H, D] layout: RoPE per head, then back to [B, L, H*D] with a free reshape
            return apply_rope1(norm(proj(x)).view(b, n, self.num_heads, self.head_dim), freqs).view(b, n, self.dim)

        # k and v deferred (attention.py): under sequence parallel q's exchange is in flight while they compute
        out = optimized_attention(rotated(self.q, self.norm_q), lambda: rotated(self.k, self.norm_k),
                                  lambda: self.v(x), self.num_heads, transformer_options=transformer_options,
                                  side_work=side_work)
        return self.o(out)


class WanT2VCrossAttention(WanSelfAttention):
    def context_kv(self, context: torch.Tensor, context_img_len: int | None, kv: dict):
        """(before, after): the keys and values of the context, which depend on nothing else of the block,
        computed into `kv` as the self-attention's side work (one GEMM each side of its exchanges)."""
        def keys():
            kv["k"] = self.norm_k(self.k(context))

        def values():
            kv["v"] = self.v(context)
        return keys, values

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int | None = 0,
                transformer_options: dict | None = None, kv: dict | None = None):
        opts = cross_attention_options(transformer_options)
        q = self.norm_q(self.q(x))
        kv = kv or {}
        k = kv["k"] if "k" in kv else self.norm_k(self.k(context))
        v = kv["v"] if "v" in kv else self.v(context)
        out = optimized_attention(q, k, v, self.num_heads, transformer_options=opts)
        return self.o(out)


class WanI2VCrossAttention(WanSelfAttention):
    """Text cross-attention plus a second one over the CLIP-vision tokens (k_img / v_img), summed."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, dtype=None,
                 device=None, operations=None):
        super().__init__(dim, num_heads, qk_norm, eps, dtype=dtype, device=device, operations=operations)
        kw = dict(dtype=dtype, device=device)
        self.k_img = operations.Linear(dim, dim, **kw)
        self.v_img = operations.Linear(dim, dim, **kw)
        self.norm_k_img = WanRMSNorm(dim, eps, **kw) if qk_norm else nn.Identity()

    @staticmethod
    def _split(context: torch.Tensor, context_img_len: int | None):
        # context = [image tokens, text tokens]. Without image tokens (context_img_len None) both branches
        # see the whole text context, which is what ComfyUI computes for an i2v model run without CLIP vision.
        return context[:, :context_img_len], context[:, context_img_len:]

    def context_kv(self, context: torch.Tensor, context_img_len: int | None, kv: dict):
        """(before, after) side work as WanT2VCrossAttention's: the text keys and values, then the image ones."""
        ctx_img, ctx = self._split(context, context_img_len)

        def text():
            kv["k"], kv["v"] = self.norm_k(self.k(ctx)), self.v(ctx)

        def image():
            kv["k_img"], kv["v_img"] = self.norm_k_img(self.k_img(ctx_img)), self.v_img(ctx_img)
        return text, image

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int | None = 0,
                transformer_options: dict | None = None, kv: dict | None = None):
        opts = cross_attention_options(transformer_options)
        ctx_img, ctx = self._split(context, context_img_len)
        q = self.norm_q(self.q(x))
        kv = kv or {}
        k = kv["k"] if "k" in kv else self.norm_k(self.k(ctx))
        v = kv["v"] if "v" in kv else self.v(ctx)
        out = optimized_attention(q, k, v, self.num_heads, transformer_options=opts)
        k_img = kv["k_img"] if "k_img" in kv else self.norm_k_img(self.k_img(ctx_img))
        v_img = kv["v_img"] if "v_img" in kv else self.v_img(ctx_img)
        out_img = optimized_attention(q, k_img, v_img, self.num_heads, transformer_options=opts)
        return self.o(out + out_img)


def _modulation_rows(x: torch.Tensor, mod: torch.Tensor) -> tuple[int, int, int]:
    """The [rows, tokens, dim] view of x [B, L, dim] that lines its tokens up with the modulation: [B, L, dim]
    for one modulation per sample, [B*F, L/F, dim] for one per run of L/F tokens (mod [B, F, k, dim])."""
    b, n, d = x.shape
    if mod.ndim < 4 or mod.shape[1] == 1:
        return (b, n, d)
    f = mod.shape[1]
    if n % f:
        raise ValueError(f"Wan per-frame timesteps: {f} timesteps do not divide {n} tokens; give one timestep "
                         "per latent frame (or per token)")
    return (b * f, n // f, d)


class WanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type: str, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool = True,
                 cross_attn_norm: bool = True, eps: float = 1e-6, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps, operations=operations, **kw)
        self.norm3 = operations.LayerNorm(dim, eps=eps, elementwise_affine=True, **kw) if cross_attn_norm \
            else nn.Identity()
        cross = WanI2VCrossAttention if cross_attn_type == "i2v_cross_attn" else WanT2VCrossAttention
        self.cross_attn = cross(dim, num_heads, qk_norm, eps, operations=operations, **kw)
        self.norm2 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.ffn = nn.Sequential(operations.Linear(dim, ffn_dim, **kw), nn.GELU(approximate="tanh"),
                                 operations.Linear(ffn_dim, dim, **kw))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim, **kw))

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, freqs: torch.Tensor,
                context_img_len: int | None = 0, transformer_options: dict | None = None) -> torch.Tensor:
        """x [B, L, dim]; e [B, 6, dim] time projection, or [B, F, 6, dim] with one per run of L/F tokens
        (Wan 2.2 TI2V: per latent frame); context [B, Lc, dim]."""
        mod = self.modulation.to(dtype=e.dtype, device=e.device) + e
        rows = _modulation_rows(x, mod)
        # each [rows or 1, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.reshape(-1, 6, mod.shape[-1]).chunk(6, dim=1)
        # the cross-attention's keys and values of the context are the self-attention's side work: under
        # sequence parallel they run while its exchanges are in flight
        kv: dict = {}
        y = self.self_attn(layernorm_modulate(x.view(rows), shift1, scale1, self.norm1.eps).view(x.shape), freqs,
                           transformer_options, side_work=self.cross_attn.context_kv(context, context_img_len, kv))
        x = torch.addcmul(x.view(rows), y.view(rows), gate1).view(x.shape)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len, transformer_options, kv=kv)
        y = self.ffn[2](linear_gelu(self.ffn[0], layernorm_modulate(x.view(rows), shift2, scale2,
                                                                    self.norm2.eps)))  # GELU in the GEMM
        return torch.addcmul(x.view(rows), y, gate2).view(x.shape)


class WanHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6, dtype=None,
                 device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.head = operations.Linear(dim, out_dim * math.prod(patch_size), **kw)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim, **kw))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], e [B, dim] time embedding (or [B, F, dim], per run of L/F tokens) ->
        [B, L, out_dim * prod(patch)]."""
        mod = self.modulation.to(dtype=e.dtype, device=e.device) + e.unsqueeze(-2)   # [B, (F,) 2, dim]
        rows = _modulation_rows(x, mod)
        shift, scale = mod.reshape(-1, 2, mod.shape[-1]).chunk(2, dim=1)
        return self.head(torch.addcmul(shift, self.norm(x.view(rows)), 1 + scale)).view(*x.shape[:2], -1)


class WanImageEmbedding(nn.Module):
    """CLIP-vision penultimate tokens -> context tokens (`img_emb.proj`); FLF2V adds `emb_pos`."""

    def __init__(self, in_dim: int, out_dim: int, flf_pos_embed_token_number: int | None = None, dtype=None,
                 device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.proj = nn.Sequential(operations.LayerNorm(in_dim, **kw), operations.Linear(in_dim, in_dim, **kw),
                                  nn.GELU(), operations.Linear(in_dim, out_dim, **kw),
                                  operations.LayerNorm(out_dim, **kw))
        self.emb_pos = nn.Parameter(torch.empty(1, flf_pos_embed_token_number, in_dim, **kw)) \
            if flf_pos_embed_token_number is not None else None

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.emb_pos is not None:
            # FLF2V: first- and last-frame tokens arrive concatenated on the token axis (2 x 257)
            image_embeds = image_embeds[:, :self.emb_pos.shape[1]] + self.emb_pos.to(image_embeds)
        return self.proj(image_embeds)


class WanModel(nn.Module):
    """Wan 2.1 / 2.2 DiT. Latent-level entry point: `forward(x [B, C, T, H, W], timestep, context [B, L, C])`
    with timestep [B], or [B, T] (one per latent frame: Wan 2.2 TI2V-5B keeps the start image's frame at 0)."""

    SEQUENCE_PARALLEL_PLAN = SEQUENCE_PARALLEL_PLAN

    def __init__(self, model_type: str = "t2v", patch_size=(1, 2, 2), text_len: int = 512, in_dim: int = 16,
                 dim: int = 2048, ffn_dim: int = 8192, freq_dim: int = 256, text_dim: int = 4096,
                 out_dim: int = 16, num_heads: int = 16, num_layers: int = 32, window_size=(-1, -1),
                 qk_norm: bool = True, cross_attn_norm: bool = True, eps: float = 1e-6, in_dim_img: int = 1280,
                 flf_pos_embed_token_number: int | None = None, image_model=None, dtype=None, device=None,
                 operations=None, **kwargs):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        if model_type not in ("t2v", "i2v", "flf2v"):
            raise ValueError(f"Wan model_type '{model_type}' is not one of t2v, i2v, flf2v")
        if dim % num_heads:
            raise ValueError(f"Wan dim {dim} is not divisible by {num_heads} heads")
        head_dim = dim // num_heads
        if head_dim % 2 or min(rope_axes(head_dim)) <= 0 or any(a % 2 for a in rope_axes(head_dim)):
            raise ValueError(f"Wan head dim {head_dim} cannot be split into even (t, h, w) RoPE axes; "
                             f"released models use {WAN_HEAD_DIM}")
        self.dtype = dtype
        self.model_type = model_type
        self.patch_size = tuple(int(p) for p in patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.head_dim = head_dim
        self.window_size = window_size   # only (-1, -1) (global attention) exists in released models
        kw = dict(dtype=dtype, device=device)
        self.patch_embedding = operations.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size,
                                                 **kw)
        self.text_embedding = nn.Sequential(operations.Linear(text_dim, dim, **kw), nn.GELU(approximate="tanh"),
                                            operations.Linear(dim, dim, **kw))
        self.time_embedding = nn.Sequential(operations.Linear(freq_dim, dim, **kw), nn.SiLU(),
                                            operations.Linear(dim, dim, **kw))
        self.time_projection = nn.Sequential(nn.SiLU(), operations.Linear(dim, dim * 6, **kw))
        cross_type = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        self.blocks = nn.ModuleList(
            WanAttentionBlock(cross_type, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps,
                              operations=operations, **kw)
            for _ in range(num_layers))
        self.head = WanHead(dim, out_dim, self.patch_size, eps, operations=operations, **kw)
        if model_type != "t2v":
            self.img_emb = WanImageEmbedding(in_dim_img, dim, flf_pos_embed_token_number, operations=operations,
                                             **kw)
        else:
            self.img_emb = None

    # -- stages --------------------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None):
        """Padded latent [B, C, T, H, W] -> (tokens [B, L, dim], e [B, dim], e0 [B, 6, dim],
        context [B, Lc, dim] (image tokens first), context_img_len, grid (f, h, w)).

        t is [B], or [B, F] for one timestep per latent frame / [B, L] per token (Wan 2.2 TI2V: the start
        image's frame at 0); then e is [B, F, dim] and e0 [B, F, 6, dim]."""
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        # one copy to [B, L, dim] row-major: every later op then works on contiguous tokens
        x = x.flatten(2).transpose(1, 2).contiguous()
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.freq_dim).to(x.dtype))
        if t.ndim == 2:
            e = e.view(t.shape[0], t.shape[1], -1)
        e0 = self.time_projection(e).unflatten(-1, (6, self.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None and self.img_emb is not None:
            ctx_img = self.img_emb(clip_fea.to(context.dtype))
            context = torch.cat((ctx_img, context), dim=1)
            context_img_len = ctx_img.shape[1]
        return x, e, e0, context, context_img_len, grid

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, freqs: torch.Tensor,
                   context_img_len: int | None = None, transformer_options: dict | None = None) -> torch.Tensor:
        transformer_options = transformer_options if transformer_options is not None else {}
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in replace:
                # ComfyUI's Wan block-replace protocol: img = video tokens, txt = context, vec = e0, pe = freqs
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"], args["txt"], args["pe"],
                                         args.get("context_img_len"), args.get("transformer_options"))}
                x = replace[("double_block", i)](
                    {"img": x, "txt": context, "vec": e0, "pe": freqs, "context_img_len": context_img_len,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})["img"]
            else:
                x = block(x, e0, context, freqs, context_img_len, transformer_options)
        return x

    def final(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.head(x, e)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, out_dim*pt*ph*pw] -> [B, out_dim, f*pt, h*ph, w*pw]."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.view(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    def forward_orig(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     clip_fea: torch.Tensor | None = None, freqs: torch.Tensor | None = None,
                     transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        """Padded latent in, unpatchified prediction out (ComfyUI's name; engines and custom nodes wrap it)."""
        transformer_options = transformer_options if transformer_options is not None else {}
        tokens, e, e0, context, context_img_len, grid = self.embed(x, t, context, clip_fea)
        if freqs is None:
            freqs = self.rope_encode(*grid, device=x.device)
        tokens = self.run_blocks(tokens, e0, context, freqs, context_img_len, transformer_options)
        return self.unpatchify(self.final(tokens, e), grid)

    # -- latent-level entry point --------------------------------------------------------------------

    def rope_encode(self, f: int, h: int, w: int, t_start: int = 0, device=None) -> torch.Tensor:
        """RoPE table for a token grid (already divided by the patch size)."""
        return rope_table(f, h, w, self.head_dim, t_start=t_start, device=device)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, transformer_options: dict | None = None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        _, _, t, h, w = x.shape
        x = pad_to_patch_size(x, self.patch_size)
        pt, ph, pw = self.patch_size
        freqs = self.rope_encode(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw, device=x.device)
        out = self.forward_orig(x, timestep, context, clip_fea=clip_fea, freqs=freqs,
                                transformer_options=transformer_options)
        return out[:, :, :t, :h, :w]
