"""Wan 2.1 (and the Wan 2.2 14B and TI2V-5B models, which share its DiT) hyper-parameters from a checkpoint's
keys and shapes. The 5B is told apart by its 48 output channels (the Wan 2.2 VAE's latent).

Returns the unet config `comfy.ldm.wan.model.WanModel` takes, or None when the state dict is not a Wan DiT
this build runs (`comfy.model_detection` then names the family in its error message).
"""

from __future__ import annotations

import logging
import math

from comfy.ldm.wan.model import WAN_HEAD_DIM

logger = logging.getLogger(__name__)

# Wan variants with extra networks this build does not implement: key -> name for the log
_UNSUPPORTED_VARIANTS = {
    "vace_patch_embedding.weight": "Wan VACE",
    "control_adapter.conv.weight": "Wan Fun camera control",
    "casual_audio_encoder.encoder.conv1.weight": "Wan 2.2 S2V",
    "pose_patch_embedding.weight": "Wan Animate",
}


def _count(keys, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def detect_wan(sd: dict, prefix: str = "") -> dict | None:
    if f"{prefix}head.modulation" not in sd or f"{prefix}patch_embedding.weight" not in sd:
        return None
    for key, name in _UNSUPPORTED_VARIANTS.items():
        if f"{prefix}{key}" in sd:
            logger.info("%s checkpoints are not supported yet", name)
            return None
    pe = sd[f"{prefix}patch_embedding.weight"]          # [dim, in_dim, pt, ph, pw]
    dim = sd[f"{prefix}head.modulation"].shape[-1]
    patch = tuple(int(p) for p in pe.shape[2:])
    out_dim = sd[f"{prefix}head.head.weight"].shape[0] // math.prod(patch)
    if dim % WAN_HEAD_DIM:
        raise ValueError(f"Wan checkpoint: dim {dim} is not a multiple of Wan's {WAN_HEAD_DIM}-wide heads; "
                         "the file is damaged or not a Wan 2.1/2.2 DiT")
    keys = [k for k in sd if k.startswith(prefix)]
    if f"{prefix}img_emb.emb_pos" in sd:
        model_type = "flf2v"
    elif f"{prefix}img_emb.proj.0.bias" in sd:
        model_type = "i2v"
    else:
        model_type = "t2v"
    cfg = {
        "image_model": "wan2.1",
        "model_type": model_type,
        "patch_size": patch,
        "in_dim": pe.shape[1],
        "dim": dim,
        "ffn_dim": sd[f"{prefix}blocks.0.ffn.0.weight"].shape[0],
        "freq_dim": sd[f"{prefix}time_embedding.0.weight"].shape[1],
        "text_dim": sd[f"{prefix}text_embedding.0.weight"].shape[1],
        "out_dim": out_dim,
        "num_heads": dim // WAN_HEAD_DIM,
        "num_layers": _count(keys, f"{prefix}blocks."),
        "qk_norm": f"{prefix}blocks.0.self_attn.norm_q.weight" in sd,
        "cross_attn_norm": f"{prefix}blocks.0.norm3.weight" in sd,
        "eps": 1e-6,
        "text_len": 512,
    }
    if model_type != "t2v":
        cfg["in_dim_img"] = sd[f"{prefix}img_emb.proj.0.weight"].shape[0]
    if model_type == "flf2v":
        cfg["flf_pos_embed_token_number"] = sd[f"{prefix}img_emb.emb_pos"].shape[1]
    return cfg
