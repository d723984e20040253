"""PixArt-α / Σ detection: hyper-parameters from a state dict in the released checkpoint layout.

Detection key ``t_block.1.weight``; depth counts ``blocks.N``; hidden size and patch from
``x_embedder.proj.weight``; caption width and max length from ``y_embedder.y_embedding``; ``pos_embed``
(when stored) gives the trained input size; ``ar_embedder`` marks α (micro-conditions), its absence Σ.
"""

from __future__ import annotations

import math

HEAD_DIM = 72   # every released PixArt uses 72-wide heads (1152 = 16 x 72); the head count is not stored


def detect_pixart(sd: dict, prefix: str = "") -> dict | None:
    if f"{prefix}t_block.1.weight" not in sd or f"{prefix}x_embedder.proj.weight" not in sd:
        return None
    from comfy.model_detection import count_blocks

    needed = ("blocks.0.mlp.fc1.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight")
    missing = [k for k in needed if f"{prefix}{k}" not in sd]
    if missing:
        raise ValueError(f"incomplete PixArt transformer: it has t_block.1.weight but lacks {', '.join(missing)}")

    proj = sd[f"{prefix}x_embedder.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if hidden % HEAD_DIM:
        raise ValueError(f"PixArt checkpoint: hidden size {hidden} is not a multiple of PixArt's head size "
                         f"{HEAD_DIM}; the file is not a PixArt-α/Σ transformer")
    keys = [k for k in sd if k.startswith(prefix)]
    cfg = {
        "image_model": "pixart_sigma",
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "num_heads": hidden // HEAD_DIM,
        "depth": count_blocks(keys, f"{prefix}blocks." + "{}."),
        "mlp_ratio": sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        "caption_channels": sd[f"{prefix}y_embedder.y_proj.fc1.weight"].shape[1],
        "pred_sigma": sd[f"{prefix}final_layer.linear.weight"].shape[0] == 2 * in_channels * patch * patch,
        "micro_condition": False,
    }
    y_emb = sd.get(f"{prefix}y_embedder.y_embedding")
    cfg["model_max_length"] = y_emb.shape[0] if y_emb is not None else 300
    pe = sd.get(f"{prefix}pos_embed")
    if pe is not None:
        cfg["input_size"] = int(round(math.sqrt(pe.shape[1]))) * patch
    else:
        cfg["input_size"] = 128   # Σ-1024 (and the 2K/4K models interpolate from there)
    cfg["pe_interpolation"] = max(cfg["input_size"] // 64, 1)
    if f"{prefix}ar_embedder.mlp.0.weight" in sd:
        cfg["image_model"] = "pixart_alpha"
        cfg["micro_condition"] = True
    return cfg
