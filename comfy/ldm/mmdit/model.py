"""SD3 / SD3.5 MMDiT diffusion transformer in the Stability checkpoint layout.

Keys (after ``model.diffusion_model.``): ``x_embedder.proj``, ``pos_embed`` (a learnt [1, M*M, C] table
that is centre-cropped to the latent's patch grid), ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``,
``context_embedder``, ``joint_blocks.N.{context_block,x_block}.{attn.qkv, attn.proj, attn.ln_q/ln_k,
adaLN_modulation.1, mlp.fc1/fc2}`` and ``final_layer``. SD3.5 adds RMS qk-norm (``ln_q``/``ln_k``);
SD3.5-medium adds a second, image-only self-attention (``x_block.attn2``) to its first blocks. The last
context block is "pre-only": it feeds keys/values to the last joint attention and is then dropped.

The forward runs in stages so the multi-GPU engine can drive them without model changes:
``embed`` (patch + position embedding, text projection, conditioning vector) -> ``run_joint_blocks`` ->
``final`` (per image token). Attention goes through `comfy.ldm.modules.attention.optimized_attention`;
`SEQUENCE_PARALLEL_PLAN` says what a sequence-parallel engine splits and where it gathers. No distributed
code lives here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size
from comfy.ldm.modules.attention import optimized_attention

# What a sequence-parallel engine splits (token dim of each stage output of `embed`) and where it
# gathers. Both streams attend jointly ([context, x] keys); x_block.attn2 (3.5-medium) is a second
# self-attention over the image tokens only, called with the same transformer_options.
SEQUENCE_PARALLEL_PLAN = {
    "split_after": "embed",             # x [B, L_img, C] dim 1, context [B, L_txt, C] dim 1
    "split": {"x": 1, "context": 1},
    "gather_before": "final",           # image tokens, dim 1 (final is per token)
    "attention": "optimized_attention_override",
    "image_only_attention": "x_block.attn2",
}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the raw timestep (0..1000 for SD3), cos half first, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class Mlp2(nn.Module):
    """Linear -> SiLU -> Linear, keys ``mlp.0`` / ``mlp.2`` (timestep and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.mlp = nn.Sequential(operations.Linear(in_dim, hidden, dtype=dtype, device=device), nn.SiLU(),
                                 operations.Linear(hidden, hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size, bias=True,
                                      dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)   # [B, C, h, w] -> [B, h*w, C]


class RMSNorm(nn.Module):
    """qk-norm of SD3.5 (learnt ``weight``, eps 1e-6); one fused F.rms_norm call."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype and self.weight.device == x.device \
            else self.weight.to(dtype=x.dtype, device=x.device)
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)


class Attention(nn.Module):
    """Fused qkv projection, optional RMS qk-norm, output projection (absent when pre-only)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False, dtype=None, device=None,
                 operations=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=True, dtype=dtype, device=device)
        if qk_norm:
            self.ln_q = RMSNorm(head_dim, dtype=dtype, device=device)
            self.ln_k = RMSNorm(head_dim, dtype=dtype, device=device)
        else:
            self.ln_q = self.ln_k = None
        if not pre_only:
            self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def qkv_heads(self, x: torch.Tensor):
        """x [B, L, dim] -> q, k, v each [B, H, L, D] (q, k normed when the model has qk-norm)."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream of a joint block (the checkpoint's name): modulation, attention inputs, and the
    residual updates after the joint attention. ``pre_only`` keeps only the attention inputs."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False,
                 self_attn2: bool = False, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.pre_only = pre_only
        self.self_attn2 = self_attn2
        self.norm1 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.attn = Attention(dim, num_heads, qk_norm, pre_only=pre_only, operations=operations, **kw)
        if self_attn2:
            self.attn2 = Attention(dim, num_heads, qk_norm, operations=operations, **kw)
        if not pre_only:
            self.norm2 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Module()
            self.mlp.fc1 = operations.Linear(dim, hidden, **kw)
            self.mlp.act = nn.GELU(approximate="tanh")
            self.mlp.fc2 = operations.Linear(hidden, dim, **kw)
        # pre-only: (shift, scale); else (shift, scale, gate) for attention and MLP, plus one more
        # triple for attn2
        self.n_mod = 2 if pre_only else (9 if self_attn2 else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(dim, self.n_mod * dim, **kw))

    def modulation(self, c: torch.Tensor):
        return self.adaLN_modulation(c)[:, None, :].chunk(self.n_mod, dim=-1)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> ((q, k, v), modulation chunks, normed x) for the joint attention."""
        mods = self.modulation(c)
        x_norm = self.norm1(x)
        qkv = self.attn.qkv_heads(_modulate(x_norm, mods[0], mods[1]))
        return qkv, mods, x_norm

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, mods, attn2: torch.Tensor | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = torch.addcmul(x, gate_msa, self.attn.proj(attn))
        if attn2 is not None:
            x = torch.addcmul(x, mods[8], self.attn2.proj(attn2))
        h = self.mlp.fc2(self.mlp.act(self.mlp.fc1(_modulate(self.norm2(x), shift_mlp, scale_mlp))))
        return torch.addcmul(x, gate_mlp, h)


class JointBlock(nn.Module):
    """Context (text) and x (image) streams with one joint attention over [context, x]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool,
                 self_attn2: bool, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.num_heads = num_heads
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only, **kw)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, self_attn2=self_attn2, **kw)

    def forward(self, context: torch.Tensor | None, x: torch.Tensor, c: torch.Tensor,
                transformer_options: dict | None = None):
        (xq, xk, xv), x_mods, x_norm = self.x_block.pre_attention(x, c)
        if context is not None:
            (cq, ck, cv), c_mods, _ = self.context_block.pre_attention(context, c)
            q, k, v = torch.cat((cq, xq), dim=2), torch.cat((ck, xk), dim=2), torch.cat((cv, xv), dim=2)
        else:
            q, k, v = xq, xk, xv
        attn = optimized_attention(q, k, v, self.num_heads, skip_reshape=True,
                                   transformer_options=transformer_options)
        attn2 = None
        if self.x_block.self_attn2:
            # 3.5-medium: a second self-attention over the image tokens, on its own modulation of norm1(x)
            q2, k2, v2 = self.x_block.attn2.qkv_heads(_modulate(x_norm, x_mods[6], x_mods[7]))
            attn2 = optimized_attention(q2, k2, v2, self.num_heads, skip_reshape=True,
                                        transformer_options=transformer_options)
        if context is not None:
            n_ctx = context.shape[1]
            c_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]
            context = None if self.context_block.pre_only else \
                self.context_block.post_attention(c_attn, context, c_mods)
        else:
            x_attn = attn
        x = self.x_block.post_attention(x_attn, x, x_mods, attn2)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm_final = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.linear = operations.Linear(dim, patch_size * patch_size * out_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(dim, 2 * dim, bias=True, **kw))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT. Sizes come from `comfy.model_detection` (read from the state dict)."""

    SEQUENCE_PARALLEL_PLAN = SEQUENCE_PARALLEL_PLAN

    def __init__(self, image_model=None, in_channels: int = 16, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 1536, num_heads: int = 24, depth: int = 24,
                 mlp_ratio: float = 4.0, adm_in_channels: int | None = 2048, context_in_dim: int | None = 4096,
                 pos_embed_max_size: int = 192, qk_norm: bool = False,
                 x_block_self_attn_layers: tuple[int, ...] | list[int] = (), dtype=None, device=None,
                 operations=None, **kwargs):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        if hidden_size % num_heads:
            raise ValueError(f"MMDiT hidden size {hidden_size} is not divisible by {num_heads} heads; the "
                             "checkpoint's x_embedder.proj width should be 64 x the head count")
        self.dtype = dtype
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.pos_embed_max_size = pos_embed_max_size
        self.x_block_self_attn_layers = tuple(x_block_self_attn_layers)
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, **kw)
        self.t_embedder = Mlp2(256, hidden_size, **kw)
        self.y_embedder = Mlp2(adm_in_channels, hidden_size, **kw) if adm_in_channels else None
        self.context_embedder = operations.Linear(context_in_dim, hidden_size, dtype=dtype, device=device) \
            if context_in_dim else None
        # the table is added once per forward, so an fp8 weight dtype is not worth its rounding here
        pe_dtype = None if dtype in comfy.ops.FP8_DTYPES else dtype
        self.register_buffer("pos_embed", torch.empty(1, pos_embed_max_size ** 2, hidden_size, dtype=pe_dtype,
                                                      device=device))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=(i == depth - 1),
                       self_attn2=i in self.x_block_self_attn_layers, **kw)
            for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, **kw)

    # -- stages --------------------------------------------------------------------------------------

    def cropped_pos_embed(self, h_len: int, w_len: int, device=None, dtype=None) -> torch.Tensor:
        """The centre h_len x w_len window of the learnt position table -> [1, h_len*w_len, C]."""
        m = self.pos_embed_max_size
        if h_len > m or w_len > m:
            raise ValueError(f"latent of {h_len}x{w_len} patches is larger than this model's position table "
                             f"({m}x{m} patches, {m * self.patch_size * 8} px); generate a smaller image")
        top, left = (m - h_len) // 2, (m - w_len) // 2
        pe = self.pos_embed.view(1, m, m, -1)[:, top:top + h_len, left:left + w_len]
        return pe.reshape(1, h_len * w_len, -1).to(device=device, dtype=dtype)

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
              y: torch.Tensor | None):
        """Latent [B, C, H, W] (H, W multiples of the patch) -> (x tokens, context tokens, c vector)."""
        h_len, w_len = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.x_embedder(x)
        x = x + self.cropped_pos_embed(h_len, w_len, device=x.device, dtype=x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps, 256).to(x.dtype))
        if self.y_embedder is not None:
            if y is None:
                # no pooled text (e.g. a bare conditioning): a zero vector, as an empty prompt's would be near
                y = torch.zeros((x.shape[0], self.y_embedder.mlp[0].in_features), device=x.device, dtype=x.dtype)
            c = c + self.y_embedder(y.to(x.dtype))
        if context is not None and self.context_embedder is not None:
            context = self.context_embedder(context.to(x.dtype))
        return x, context, c

    def run_joint_blocks(self, x: torch.Tensor, context: torch.Tensor | None, c: torch.Tensor, control=None,
                         transformer_options: dict | None = None) -> torch.Tensor:
        transformer_options = transformer_options if transformer_options is not None else {}
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        control_out = control.get("output") if isinstance(control, dict) else None
        for i, block in enumerate(self.joint_blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["txt"], out["img"] = block(args["txt"], args["img"], args["vec"],
                                                   transformer_options=args.get("transformer_options"))
                    return out
                out = replace[("double_block", i)](
                    {"img": x, "txt": context, "vec": c, "transformer_options": transformer_options},
                    {"original_block": block_wrap})
                context, x = out["txt"], out["img"]
            else:
                context, x = block(context, x, c, transformer_options=transformer_options)
            if control_out is not None and i < len(control_out) and control_out[i] is not None:
                x = x + control_out[i]   # ControlNet residuals, one per block
        return x

    def final(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.final_layer(x, c)

    def unpatchify(self, x: torch.Tensor, h_len: int, w_len: int) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]. SD3's final layer is patch-major within a token
        ("(p q c)"), unlike Flux's channel-major "(c p q)", so common_dit.unpatchify_2d does not apply."""
        b, p = x.shape[0], self.patch_size
        x = x.view(b, h_len, w_len, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, x.shape[1], h_len * p, w_len * p)

    def forward_orig(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, control=None, transformer_options: dict | None = None):
        """Padded latent -> final-layer tokens [B, L, p*p*out] (the stage the SP engine replaces)."""
        transformer_options = transformer_options if transformer_options is not None else {}
        x, context, c = self.embed(x, timesteps, context, y)
        x = self.run_joint_blocks(x, context, c, control, transformer_options)
        return self.final(x, c)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control=None, transformer_options: dict | None = None, **kwargs):
        h, w = x.shape[-2:]
        ps = self.patch_size
        x = pad_to_patch_size(x, (ps, ps))
        h_len, w_len = x.shape[-2] // ps, x.shape[-1] // ps
        out = self.forward_orig(x, timesteps, context, y, control, transformer_options)
        return self.unpatchify(out, h_len, w_len)[:, :, :h, :w]


# ComfyUI's class name for this network (custom nodes refer to it)
OpenAISignatureMMDITWrapper = MMDiT
