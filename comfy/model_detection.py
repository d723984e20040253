"""Which architecture a state dict holds, and its hyper-parameters, read from key names and shapes.

Table-driven: `DETECTORS` is a list of (family, function) pairs tried in order; each function returns a
unet config dict (always with an ``image_model`` key) or None. A new family (SD3, PixArt, HunyuanDiT,
Wan...) adds one function and one row; `comfy.supported_models` maps the config to a model class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

UNET_PREFIXES = ("model.diffusion_model.", "model.model.", "net.")


def unet_prefix_from_state_dict(state_dict: dict) -> str:
    """The prefix of the diffusion model's keys in a single-file checkpoint (ComfyUI's rule)."""
    counts = {p: 0 for p in UNET_PREFIXES}
    for k in state_dict:
        for p in UNET_PREFIXES:
            if k.startswith(p):
                counts[p] += 1
                break
    best = max(counts, key=lambda p: counts[p])
    return best if counts[best] > 5 else "model."


def count_blocks(state_dict_keys, prefix_string: str) -> int:
    """Number of consecutive blocks `prefix_string.format(i)` present (0, 1, 2, ...)."""
    count = 0
    while any(k.startswith(prefix_string.format(count)) for k in state_dict_keys):
        count += 1
    return count


def flux_axes_dim(head_dim: int) -> list[int]:
    """RoPE axes (t, h, w) for a head dim: Flux's [16, 56, 56] at 128, scaled (even sizes) below it."""
    if head_dim == 128:
        return [16, 56, 56]
    if head_dim % 2:
        raise ValueError(f"Flux head dim {head_dim} is odd; RoPE needs an even head dim")
    a0 = max(2, int(round(head_dim / 8 / 2)) * 2)
    rest = head_dim - a0
    a1 = (rest // 2) // 2 * 2
    return [a0, a1, rest - a1]


def _detect_flux(sd: dict, prefix: str) -> dict | None:
    if f"{prefix}double_blocks.0.img_attn.norm.key_norm.scale" not in sd or f"{prefix}img_in.weight" not in sd:
        return None
    if f"{prefix}txt_in.individual_token_refiner.blocks.0.norm1.weight" in sd:
        return None  # HunyuanVideo shares the block names
    keys = [k for k in sd if k.startswith(prefix)]
    if any(k.startswith(f"{prefix}distilled_guidance_layer.") for k in keys):
        return None  # Chroma: not supported yet (its own modulation network)
    img_in = sd[f"{prefix}img_in.weight"]
    hidden = img_in.shape[0]
    head_dim = sd[f"{prefix}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"Flux checkpoint: hidden size {hidden} is not a multiple of the qk-norm size {head_dim}")
    cfg = {
        "image_model": "flux",
        "in_channels": img_in.shape[1] // 4,
        "out_channels": sd[f"{prefix}final_layer.linear.weight"].shape[0] // 4,
        "patch_size": 2,
        "hidden_size": hidden,
        "num_heads": hidden // head_dim,
        "context_in_dim": sd[f"{prefix}txt_in.weight"].shape[1],
        "vec_in_dim": sd[f"{prefix}vector_in.in_layer.weight"].shape[1],
        "mlp_ratio": sd[f"{prefix}double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        "depth": count_blocks(keys, f"{prefix}double_blocks." + "{}."),
        "depth_single_blocks": count_blocks(keys, f"{prefix}single_blocks." + "{}."),
        "axes_dim": flux_axes_dim(head_dim),
        "theta": 10000,
        "qkv_bias": f"{prefix}double_blocks.0.img_attn.qkv.bias" in sd,
        "guidance_embed": f"{prefix}guidance_in.in_layer.weight" in sd,
    }
    return cfg


def _detect_sd3(sd: dict, prefix: str) -> dict | None:
    from comfy.ldm.mmdit.detect import detect_sd3  # SD3 / SD3.5 MMDiT, Stability or diffusers key names

    return detect_sd3(sd, prefix)


def _detect_wan(sd: dict, prefix: str) -> dict | None:
    from comfy.ldm.wan.detect import detect_wan  # Wan 2.1 t2v / i2v / flf2v, the 2.2 14B DiTs, 2.2 TI2V-5B

    return detect_wan(sd, prefix)


def _detect_pixart(sd: dict, prefix: str) -> dict | None:
    from comfy.ldm.pixart.detect import detect_pixart  # PixArt-α / Σ, released checkpoint layout

    return detect_pixart(sd, prefix)


def _detect_hydit(sd: dict, prefix: str) -> dict | None:
    from comfy.ldm.hydit.detect import detect_hydit  # HunyuanDiT v1.0 / v1.1 / v1.2, released layout

    return detect_hydit(sd, prefix)


# (family, detector). Order matters only where key sets overlap; more specific families go first.
DETECTORS: list[tuple[str, Callable[[dict, str], dict | None]]] = [
    ("flux", _detect_flux),
    ("sd3", _detect_sd3),
    ("wan", _detect_wan),
    ("pixart", _detect_pixart),
    ("hydit", _detect_hydit),
]

# Keys that identify families we know but do not implement yet: named in the error message.
KNOWN_UNSUPPORTED = {
    # only reached when the SD3 detector found its key but not the rest
    "joint_blocks.0.context_block.attn.qkv.weight": "an incomplete SD3 / SD3.5 (MMDiT) file",
    "head.modulation": "a Wan variant other than 2.1 / 2.2-14B t2v / i2v / 2.2 TI2V-5B (VACE, Fun camera, S2V, "
                       "Animate)",
    "distilled_guidance_layer.in_proj.weight": "Chroma",
    "txt_in.individual_token_refiner.blocks.0.norm1.weight": "HunyuanVideo",
    "adaln_single.emb.timestep_embedder.linear_1.bias": "LTX-Video",
    "cap_embedder.1.weight": "Lumina 2",
    "txt_norm.weight": "Qwen-Image",
    "double_layers.0.attn.w1q.weight": "AuraFlow",
    "x_embedder.weight": "Flux in diffusers format",
}


def detect_unet_config(state_dict: dict, key_prefix: str) -> dict | None:
    for family, fn in DETECTORS:
        cfg = fn(state_dict, key_prefix)
        if cfg is not None:
            logger.debug("detected %s: %s", family, cfg)
            return cfg
    return None


def describe_unknown(state_dict: dict, key_prefix: str = "") -> str:
    """Human-readable guess of what an undetected state dict is, for error messages."""
    for key, name in KNOWN_UNSUPPORTED.items():
        if f"{key_prefix}{key}" in state_dict:
            return f"it looks like {name}, which this build cannot load yet"
    sample = ", ".join(sorted(state_dict)[:5])
    return f"no known diffusion-model keys (first keys: {sample})"


def model_config_from_unet(state_dict: dict, unet_key_prefix: str, use_base_if_no_match: bool = False):
    """Detect the architecture and return the matching `comfy.supported_models` config, or None."""
    import comfy.supported_models

    unet_config = detect_unet_config(state_dict, unet_key_prefix)
    if unet_config is None:
        return None
    return comfy.supported_models.model_config_for(unet_config, state_dict, unet_key_prefix)


def weight_dtype(state_dict: dict, prefix: str = "") -> torch.dtype | None:
    """The most common floating dtype among the prefixed weights (what the file stores)."""
    counts: dict[torch.dtype, int] = {}
    for k, v in state_dict.items():
        if k.startswith(prefix) and isinstance(v, torch.Tensor) and v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else None
