"""SD3 / SD3.5 detection from a state dict's keys and shapes, and the diffusers -> checkpoint key mapping.

`detect_sd3(sd, prefix)` is the row `comfy.model_detection.DETECTORS` calls: it returns the MMDiT
config (``image_model: "mmdit"``) for the Stability layout (``joint_blocks.*``) or for a diffusers-named
SD3 transformer (``transformer_blocks.N.attn.add_q_proj`` + ``pos_embed.proj``); the latter is converted
to the Stability layout by `diffusers_to_checkpoint` when the weights are loaded.
"""

from __future__ import annotations

import logging
import math
import re

import torch

logger = logging.getLogger(__name__)

SD3_KEY = "joint_blocks.0.context_block.attn.qkv.weight"
DIFFUSERS_KEYS = ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight")
HEAD_DIM = 64  # every SD3 / SD3.5 checkpoint: hidden size = 64 x heads


def is_diffusers_sd3(sd: dict, prefix: str = "") -> bool:
    return all(f"{prefix}{k}" in sd for k in DIFFUSERS_KEYS) and f"{prefix}time_text_embed.text_embedder" \
        ".linear_1.weight" in sd


def _block_indices(sd: dict, prefix: str, pattern: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


# where each size is read, per layout: (Stability / ComfyUI checkpoint, diffusers)
_NAMES = {
    "patch": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    "pos": ("pos_embed", "pos_embed.pos_embed"),
    "y": ("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "context": ("context_embedder.weight", "context_embedder.weight"),
    "final": ("final_layer.linear.weight", "proj_out.weight"),
    "fc1": ("joint_blocks.0.x_block.mlp.fc1.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
    "ln_q": ("joint_blocks.0.x_block.attn.ln_q.weight", "transformer_blocks.0.attn.norm_q.weight"),
    "blocks": (r"joint_blocks\.(\d+)\.", r"transformer_blocks\.(\d+)\."),
    "attn2": (r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight", r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"),
}


def detect_sd3(sd: dict, prefix: str = "") -> dict | None:
    """MMDiT config from shapes (no weights are touched), or None when the keys are not SD3's."""
    if f"{prefix}{SD3_KEY}" in sd:
        layout, col = "sd3", 0
    elif is_diffusers_sd3(sd, prefix):
        layout, col = "diffusers", 1
    else:
        return None

    def get(name):
        return sd.get(prefix + _NAMES[name][col])

    missing = [_NAMES[n][col] for n in ("patch", "pos", "final", "fc1") if get(n) is None]
    if missing:
        # an incomplete file: not detected, so the loader's error names the file (see KNOWN_UNSUPPORTED)
        logger.warning("SD3 keys found but %s missing: the file is incomplete", ", ".join(missing))
        return None
    w = get("patch")   # [hidden, in_ch, p, p]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    if hidden % HEAD_DIM:
        raise ValueError(f"SD3 checkpoint: x_embedder width {hidden} is not a multiple of the head size "
                         f"{HEAD_DIM}; the file is damaged or not an SD3 / SD3.5 model")
    pe = get("pos")
    max_size = math.isqrt(pe.shape[1])
    if max_size * max_size != pe.shape[1]:
        raise ValueError(f"SD3 checkpoint: pos_embed holds {pe.shape[1]} positions, not a square grid")
    y_w, ctx_w = get("y"), get("context")
    return {
        "image_model": "mmdit",
        "in_channels": in_ch,
        "out_channels": get("final").shape[0] // (patch * patch),
        "patch_size": patch,
        "hidden_size": hidden,
        "num_heads": hidden // HEAD_DIM,
        "depth": len(_block_indices(sd, prefix, _NAMES["blocks"][col])),
        "mlp_ratio": get("fc1").shape[0] / hidden,
        "adm_in_channels": y_w.shape[1] if y_w is not None else None,
        "context_in_dim": ctx_w.shape[1] if ctx_w is not None else None,
        "pos_embed_max_size": max_size,
        "qk_norm": get("ln_q") is not None,
        "x_block_self_attn_layers": _block_indices(sd, prefix, _NAMES["attn2"][col]),
        "layout": layout,
    }


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous rows are (scale, shift); the checkpoint's are (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_checkpoint(sd: dict) -> dict:
    """A diffusers SD3Transformer2DModel state dict -> the Stability (ComfyUI) key layout."""
    out: dict[str, torch.Tensor] = {}
    take = sd.get
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    out["x_embedder.proj.weight"] = sd["pos_embed.proj.weight"]
    out["x_embedder.proj.bias"] = sd["pos_embed.proj.bias"]
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for kind in ("weight", "bias"):
                out[f"{ours}.mlp.{i}.{kind}"] = sd[f"time_text_embed.{theirs}.linear_{j}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"context_embedder.{kind}"] = sd[f"context_embedder.{kind}"]
        out[f"final_layer.linear.{kind}"] = sd[f"proj_out.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd[f"norm_out.linear.{kind}"])
    n = len({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n):
        d, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = take(f"{d}attn.to_add_out.weight") is None
        for kind in ("weight", "bias"):
            out[f"{b}x_block.attn.qkv.{kind}"] = torch.cat([sd[f"{d}attn.to_{c}.{kind}"] for c in "qkv"])
            out[f"{b}context_block.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{d}attn.add_{c}_proj.{kind}"] for c in "qkv"])
            out[f"{b}x_block.attn.proj.{kind}"] = sd[f"{d}attn.to_out.0.{kind}"]
            out[f"{b}x_block.adaLN_modulation.1.{kind}"] = sd[f"{d}norm1.linear.{kind}"]
            out[f"{b}x_block.mlp.fc1.{kind}"] = sd[f"{d}ff.net.0.proj.{kind}"]
            out[f"{b}x_block.mlp.fc2.{kind}"] = sd[f"{d}ff.net.2.{kind}"]
            ctx_mod = sd[f"{d}norm1_context.linear.{kind}"]
            out[f"{b}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(ctx_mod) if last else ctx_mod
            if not last:
                out[f"{b}context_block.attn.proj.{kind}"] = sd[f"{d}attn.to_add_out.{kind}"]
                out[f"{b}context_block.mlp.fc1.{kind}"] = sd[f"{d}ff_context.net.0.proj.{kind}"]
                out[f"{b}context_block.mlp.fc2.{kind}"] = sd[f"{d}ff_context.net.2.{kind}"]
            if f"{d}attn2.to_q.{kind}" in sd:
                out[f"{b}x_block.attn2.qkv.{kind}"] = torch.cat([sd[f"{d}attn2.to_{c}.{kind}"] for c in "qkv"])
                out[f"{b}x_block.attn2.proj.{kind}"] = sd[f"{d}attn2.to_out.0.{kind}"]
        for ours, theirs in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                             ("context_block.attn.ln_q", "attn.norm_added_q"),
                             ("context_block.attn.ln_k", "attn.norm_added_k"),
                             ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"{d}{theirs}.weight" in sd:
                out[f"{b}{ours}.weight"] = sd[f"{d}{theirs}.weight"]
    return out
