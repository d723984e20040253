"""HunyuanDiT detection: hyper-parameters from a state dict in Tencent's released checkpoint layout.

Detection key ``mlp_t5.0.weight``. Hidden size and patch from ``x_embedder.proj.weight``; the head size from
the per-head qk-norm weight; text widths and lengths from ``attn2.kv_proj``, ``mlp_t5`` and
``text_embedding_padding`` / ``pooler.positional_embedding``. ``extra_embedder.0.weight``'s input width
tells v1.0 (pooled + 6 image-size embeddings + style = 1024 + 1536 + hidden, 3968 at full size) from
v1.1 / v1.2 (pooled mT5 only).
"""

from __future__ import annotations

POOLER_HEADS = 8   # the mT5 attention pool's head count (not stored; 8 in every release)


def detect_hydit(sd: dict, prefix: str = "") -> dict | None:
    if f"{prefix}mlp_t5.0.weight" not in sd or f"{prefix}x_embedder.proj.weight" not in sd:
        return None
    from comfy.model_detection import count_blocks

    needed = ("blocks.0.attn1.q_norm.weight", "blocks.0.mlp.fc1.weight", "blocks.0.attn2.kv_proj.weight",
              "pooler.positional_embedding", "pooler.c_proj.weight", "extra_embedder.0.weight",
              "text_embedding_padding", "final_layer.linear.weight")
    missing = [k for k in needed if f"{prefix}{k}" not in sd]
    if missing:
        raise ValueError(f"incomplete HunyuanDiT transformer: it has mlp_t5.0.weight but lacks {', '.join(missing)}")

    proj = sd[f"{prefix}x_embedder.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    head_dim = sd[f"{prefix}blocks.0.attn1.q_norm.weight"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"HunyuanDiT checkpoint: hidden size {hidden} is not a multiple of the qk-norm size "
                         f"{head_dim}; the file is damaged or not a HunyuanDiT transformer")
    keys = [k for k in sd if k.startswith(prefix)]
    text_len_t5 = sd[f"{prefix}pooler.positional_embedding"].shape[0] - 1
    pooled_dim = sd[f"{prefix}pooler.c_proj.weight"].shape[0]
    extra_in = sd[f"{prefix}extra_embedder.0.weight"].shape[1]
    use_style = extra_in == pooled_dim + 256 * 6 + hidden
    if not use_style and extra_in != pooled_dim:
        raise ValueError(f"HunyuanDiT checkpoint: extra_embedder input width {extra_in} matches neither v1.0 "
                         f"({pooled_dim + 256 * 6 + hidden}) nor v1.1/v1.2 ({pooled_dim})")
    return {
        "image_model": "hydit" if use_style else "hydit1",
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "num_heads": hidden // head_dim,
        "depth": count_blocks(keys, f"{prefix}blocks." + "{}."),
        "mlp_hidden": sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0],
        "text_states_dim": sd[f"{prefix}blocks.0.attn2.kv_proj.weight"].shape[1],
        "text_states_dim_t5": sd[f"{prefix}mlp_t5.0.weight"].shape[1],
        "t5_mlp_hidden": sd[f"{prefix}mlp_t5.0.weight"].shape[0],
        "text_len": sd[f"{prefix}text_embedding_padding"].shape[0] - text_len_t5,
        "text_len_t5": text_len_t5,
        "pooled_dim": pooled_dim,
        "pooler_heads": POOLER_HEADS,
        "learn_sigma": sd[f"{prefix}final_layer.linear.weight"].shape[0] == 2 * in_channels * patch * patch,
        "use_style_cond": use_style,
    }
