"""Flux.1 diffusion transformer (dev, schnell, Kontext reference latents) in the BFL checkpoint layout.

The forward runs in four stages so the multi-GPU engine can wrap them without model changes:
``embed`` (patchified image tokens, text tokens, conditioning vector, RoPE table) ->
``double_blocks`` -> ``single_blocks`` -> ``final`` (the last layer, image tokens only).
Attention goes through `comfy.ldm.modules.attention.optimized_attention`, whose op a callable in
``transformer_options`` can replace. No distributed code lives here; `SEQUENCE_PARALLEL_PLAN` says what
a sequence-parallel engine splits and where it gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size, patchify_2d, unpatchify_2d
from comfy.ldm.flux.layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)
from comfy.ldm.flux.math import embed_nd


@dataclass
class FluxParams:
    in_channels: int = 16           # latent channels; img_in sees in_channels * patch_size**2
    out_channels: int = 16
    vec_in_dim: int = 768           # CLIP-L pooled
    context_in_dim: int = 4096      # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True


# What a sequence-parallel engine splits (token dim of each stage input) and where it gathers.
SEQUENCE_PARALLEL_PLAN = {
    "split_after": "embed",             # img [B, L_img, C] dim 1, txt [B, L_txt, C] dim 1, pe dim 2
    "split": {"img": 1, "txt": 1, "pe": 2},
    "gather_before": "final",           # img tokens, dim 1
    "attention": "optimized_attention_override",
    # the blocks write q/k/v into one packed buffer from `qkv_buffer` (attention.py): a ring of 2 ranks can
    # gather the keys from where they were written
    "packed_qkv": True,
}


def _add_residual(h: torch.Tensor, res: torch.Tensor, start: int) -> torch.Tensor:
    """h[:, start:start+len(res)] += res: ControlNet residuals cover the main image tokens only (not the
    text before them nor Kontext reference tokens after them)."""
    n = res.shape[1]
    if start == 0 and n == h.shape[1]:
        return h + res.to(h.dtype)
    return torch.cat((h[:, :start], h[:, start:start + n] + res.to(h.dtype), h[:, start + n:]), dim=1)


class Flux(nn.Module):
    SEQUENCE_PARALLEL_PLAN = SEQUENCE_PARALLEL_PLAN

    def __init__(self, image_model=None, final_layer: bool = True, dtype=None, device=None, operations=None,
                 **kwargs):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        self.dtype = dtype
        known = {k: v for k, v in kwargs.items() if k in FluxParams.__dataclass_fields__}
        params = FluxParams(**known)
        self.params = params
        self.patch_size = params.patch_size
        self.in_channels = params.in_channels * params.patch_size ** 2
        self.out_channels = params.out_channels * params.patch_size ** 2
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"Flux hidden size {params.hidden_size} is not divisible by "
                             f"{params.num_heads} heads; check the checkpoint's qk-norm scale size")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"Flux axes_dim {params.axes_dim} must sum to the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.axes_dim = list(params.axes_dim)
        self.theta = params.theta
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.img_in = operations.Linear(self.in_channels, self.hidden_size, bias=True, dtype=dtype, device=device)
        self.time_in = MLPEmbedder(256, self.hidden_size, **kw)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size, **kw)
        self.guidance_in = MLPEmbedder(256, self.hidden_size, **kw) if params.guidance_embed else nn.Identity()
        self.txt_in = operations.Linear(params.context_in_dim, self.hidden_size, dtype=dtype, device=device)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias, **kw)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, **kw)
            for _ in range(params.depth_single_blocks))
        if final_layer:
            self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels, **kw)

    # -- stages --------------------------------------------------------------------------------------

    def embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """-> (img tokens, txt tokens, vec, pe) with pe covering [txt, img] in that order."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Flux.embed expects token inputs [B, L, C]; call Flux.forward with a latent")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        # guidance None on a dev model = FluxDisableGuidance: the embedding is left out, as in ComfyUI
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if y is None:
            y = torch.zeros((img.shape[0], self.params.vec_in_dim), device=img.device, dtype=img.dtype)
        vec = vec + self.vector_in(y[:, :self.params.vec_in_dim].to(img.dtype))
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = embed_nd(ids, self.axes_dim, self.theta)
        return img, txt, vec, pe

    def run_double_blocks(self, img, txt, vec, pe, attn_mask=None, transformer_options=None, control=None):
        transformer_options = transformer_options if transformer_options is not None else {}
        control_in = control.get("input") if control is not None else None
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(args["img"], args["txt"], args["vec"], args["pe"],
                                                   attn_mask=args.get("attn_mask"),
                                                   transformer_options=args.get("transformer_options"))
                    return out
                out = replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, vec, pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control_in is not None and i < len(control_in) and control_in[i] is not None:
                img = _add_residual(img, control_in[i], 0)  # ControlNet residual on the image tokens
        return img, txt

    def run_single_blocks(self, img, txt, vec, pe, attn_mask=None, transformer_options=None, control=None):
        """Runs the single blocks over [txt, img] and returns the image tokens."""
        transformer_options = transformer_options if transformer_options is not None else {}
        control_out = control.get("output") if control is not None else None
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        txt_len = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            if ("single_block", i) in replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"], args["pe"], attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))}
                x = replace[("single_block", i)](
                    {"img": x, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})["img"]
            else:
                x = block(x, vec, pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control_out is not None and i < len(control_out) and control_out[i] is not None:
                x = _add_residual(x, control_out[i], txt_len)
        return x[:, txt_len:]

    def final(self, img, vec):
        return self.final_layer(img, vec)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options=None, attn_mask=None):
        """Token-level forward (ComfyUI's name; custom nodes wrap it)."""
        transformer_options = transformer_options if transformer_options is not None else {}
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img, txt = self.run_double_blocks(img, txt, vec, pe, attn_mask, transformer_options, control)
        img = self.run_single_blocks(img, txt, vec, pe, attn_mask, transformer_options, control)
        return self.final(img, vec)

    # -- latent-level entry point --------------------------------------------------------------------

    @staticmethod
    def img_ids_for(batch: int, h_len: int, w_len: int, index: float = 0.0, h_offset: float = 0.0,
                    w_offset: float = 0.0, device=None, dtype=torch.float32) -> torch.Tensor:
        ids = torch.zeros(h_len, w_len, 3, device=device, dtype=dtype)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h_len, device=device, dtype=dtype)[:, None] + h_offset
        ids[..., 2] = torch.arange(w_len, device=device, dtype=dtype)[None, :] + w_offset
        return ids.reshape(1, h_len * w_len, 3).expand(batch, -1, -1)

    def process_img(self, x: torch.Tensor, index: float = 0.0, h_offset: int = 0, w_offset: int = 0):
        """Latent [B, C, H, W] -> (tokens [B, L, C*4], ids [B, L, 3]); offsets are in latent pixels."""
        x = pad_to_patch_size(x, (self.patch_size, self.patch_size))
        b, _, h, w = x.shape
        ps = self.patch_size
        img = patchify_2d(x, ps, ps)
        ids = self.img_ids_for(b, h // ps, w // ps, index, (h_offset + ps // 2) // ps if h_offset else 0,
                               (w_offset + ps // 2) // ps if w_offset else 0, device=x.device)
        return img, ids

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, attention_mask=None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        bs, c, h_orig, w_orig = x.shape
        ps = self.patch_size
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        h_len = (h_orig + ps - 1) // ps
        w_len = (w_orig + ps - 1) // ps
        if ref_latents:
            # Kontext: reference images become extra tokens; their ids carry index 1 and sit past the
            # main image in (h, w) so RoPE keeps them apart ("offset" method).
            h_off = w_off = 0
            for ref in ref_latents:
                ref = ref.to(device=x.device, dtype=x.dtype)
                if ref.shape[1] != c:
                    raise ValueError(f"Reference latents have {ref.shape[1]} channels, this model's input has {c} "
                                     "(a Fill / Canny / Depth checkpoint takes extra channels); use ReferenceLatent "
                                     "with a Flux dev or Kontext model")
                if ref.shape[-1] + w_off > ref.shape[-2] + h_off:
                    h_shift, w_shift = h_off, 0
                else:
                    h_shift, w_shift = 0, w_off
                kontext, kontext_ids = self.process_img(ref, index=1, h_offset=h_shift, w_offset=w_shift)
                img = torch.cat((img, kontext), dim=1)
                img_ids = torch.cat((img_ids, kontext_ids), dim=1)
                h_off = max(h_off, ref.shape[-2] + h_shift)
                w_off = max(w_off, ref.shape[-1] + w_shift)
        if attention_mask is not None and attention_mask.shape[-1] != context.shape[1] + img.shape[1]:
            raise ValueError(f"The attention mask covers {attention_mask.shape[-1]} tokens; this step has "
                             f"{context.shape[1]} text + {img.shape[1]} image tokens (reference latents included). "
                             "An attn_bias mask (StyleModelApply) cannot be combined with reference latents")
        txt_ids = torch.zeros((bs, context.shape[1], 3), device=x.device, dtype=torch.float32)
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control,
                                transformer_options, attn_mask=attention_mask)
        out = out[:, :img_tokens]
        return unpatchify_2d(out, h_len, w_len, ps, ps)[:, :, :h_orig, :w_orig]
