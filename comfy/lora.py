"""LoRA files -> weight patches, and how a list of patches for one weight is folded into that weight.

Loading (what LoraLoader / LoraLoaderModelOnly call):

- `model_lora_keys_unet(model)` / `model_lora_keys_clip(clip_model)`: every name a LoRA file may use for
  a weight of this model -> the model's state-dict key, or ``(key, offset, function)`` where the LoRA
  covers a slice of a fused weight (diffusers' separate ``to_q/to_k/to_v`` on Flux's fused
  ``img_attn.qkv``; ``single_blocks.N.linear1`` = q, k, v and the MLP input) or needs a fix-up
  (diffusers' ``norm_out`` stores (scale, shift), BFL (shift, scale)). Name families: ComfyUI
  (``diffusion_model.X``), kohya (``lora_unet_X_with_underscores``, ``lora_te1_`` ...), diffusers / PEFT
  (``transformer.<diffusers name>``, ``text_encoder.``), BFL (bare ``X``), XLabs
  (``double_blocks.N.processor.qkv_lora1`` ...). SD3 / SD3.5: diffusers' ``transformer_blocks.N.attn.to_q``
  / ``add_q_proj`` ... are slices of ``joint_blocks.N.{x,context}_block.attn.qkv``.
- `load_lora(lora_sd, key_map)` -> ``{target: (kind, data)}``: LoRA (up/down/alpha/mid, every suffix
  convention), LoHa, LoKr and full diffs (``.diff`` / ``.diff_b``).
- `load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip, name)`: clones and patches
  the MODEL and the CLIP; a LoRA that matches nothing (another model family, another size), or that
  names another DiT family's blocks, is refused with an error naming the file and what it targets.

Applying: `calculate_weight(patches, weight, key)` is what `ModelPatcher.patch_model` calls per weight. A
patch is ``(strength_patch, value, strength_model, offset, function)``; ``value`` is a tensor (a "diff")
or ``(kind, data)`` with kind "diff", "set", "lora" (``data = (up, down, alpha, mid, dora_scale,
reshape)``), "loha" or "lokr". The delta of a LoRA of rank r is ``strength * up @ down * alpha / r``.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Patch maths
# ---------------------------------------------------------------------------------------------------


def _scale(alpha, rank: int) -> float:
    return float(alpha) / rank if alpha is not None else 1.0


def _lora_delta(data, shape: torch.Size, device, dtype: torch.dtype) -> torch.Tensor:
    up, down, alpha = data[0], data[1], data[2]
    mid = data[3] if len(data) > 3 else None
    rank = down.shape[0]
    up = up.to(device, dtype).flatten(1)
    down = down.to(device, dtype)
    if mid is not None:
        # LoCon with a conv "mid" kernel (kohya): down is first mapped through the mid tensor
        down = torch.mm(mid.to(device, dtype).transpose(0, 1).flatten(1), down.flatten(1))
    return (torch.mm(up, down.flatten(1)) * _scale(alpha, rank)).reshape(shape)


def _loha_delta(data, shape, device, dtype) -> torch.Tensor:
    w1a, w1b, alpha, w2a, w2b, t1, t2 = data[:7]
    rank = w1b.shape[0]
    c = lambda t: t.to(device, dtype)  # noqa: E731
    if t1 is not None:
        # Tucker form (conv): w = t x_0 a x_1 b
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", c(t1), c(w1b), c(w1a))
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", c(t2), c(w2b), c(w2a))
    else:
        m1 = torch.mm(c(w1a), c(w1b))
        m2 = torch.mm(c(w2a), c(w2b))
    return (m1 * m2 * _scale(alpha, rank)).reshape(shape)


def _lokr_delta(data, shape, device, dtype) -> torch.Tensor:
    w1, w2, alpha, w1a, w1b, w2a, w2b, t2 = data[:8]
    c = lambda t: t.to(device, dtype)  # noqa: E731
    dim = None
    if w1 is None:
        dim = w1b.shape[0]
        w1 = torch.mm(c(w1a), c(w1b))
    if w2 is None:
        dim = w2b.shape[0]
        if t2 is None:
            w2 = torch.mm(c(w2a), c(w2b))
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", c(t2), c(w2b), c(w2a))
    w1, w2 = c(w1), c(w2)
    if w2.ndim == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # LyCORIS' convention: alpha / dim applies only to a factored (low-rank) side; full factors use 1
    scale = float(alpha) / dim if (alpha is not None and dim is not None) else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


_DELTAS = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta}


def calculate_weight(patches: list, weight: torch.Tensor, key: str,
                     intermediate_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Apply every patch to `weight` (already in intermediate_dtype) in place and return it."""
    for p in patches:
        strength, value, strength_model = p[0], p[1], p[2]
        offset = p[3] if len(p) > 3 else None
        function = p[4] if len(p) > 4 else None
        target = weight
        if offset is not None:
            target = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            target *= strength_model
        if isinstance(value, torch.Tensor):
            kind, data = "diff", (value,)
        else:
            kind, data = value[0], value[1]
        if kind == "diff":
            diff = data[0]
            if diff.shape != target.shape:
                logger.warning("patch for %s has shape %s, weight is %s: skipped", key, tuple(diff.shape),
                               tuple(target.shape))
                continue
            delta = strength * diff.to(target.device, intermediate_dtype)
        elif kind == "set":
            target.copy_(data[0].to(target.device, intermediate_dtype))
            continue
        elif kind in _DELTAS:
            delta = strength * _DELTAS[kind](data, target.shape, target.device, intermediate_dtype)
        else:
            logger.warning("unknown patch type %r for %s: skipped", kind, key)
            continue
        if function is not None:
            delta = function(delta)
        target += delta
    return weight


def _delta_shape(kind: str, data) -> tuple[int, int] | None:
    """(rows, elements per row) of the delta a patch produces, for checking it against its weight."""
    if kind == "lora":
        up, down, mid = data[0], data[1], data[3]
        cols = math.prod(down.shape[1:]) if mid is None else math.prod(mid.shape[2:]) * down.shape[1]
        return up.shape[0], cols
    if kind == "loha":
        w1a, w1b, t1 = data[0], data[1], data[5]
        return w1a.shape[0], (w1b.shape[1] if t1 is None else w1b.shape[1] * math.prod(t1.shape[2:]))
    if kind == "lokr":
        w1, w2, _, w1a, w1b, w2a, w2b, t2 = data[:8]
        r1, c1 = (w1.shape[0], w1.shape[1]) if w1 is not None else (w1a.shape[0], w1b.shape[1])
        if w2 is not None:
            r2, c2 = w2.shape[0], math.prod(w2.shape[1:])
        else:
            r2, c2 = w2a.shape[0], w2b.shape[1] * (math.prod(t2.shape[2:]) if t2 is not None else 1)
        return r1 * r2, c1 * c2
    if kind == "diff":
        t = data[0]
        return (t.shape[0], math.prod(t.shape[1:])) if t.ndim else (1, 1)
    return None


# ---------------------------------------------------------------------------------------------------
# Key maps: LoRA names -> model keys
# ---------------------------------------------------------------------------------------------------


def _swap_scale_shift(delta: torch.Tensor) -> torch.Tensor:
    # diffusers' AdaLayerNormContinuous emits (scale, shift); the BFL final layer (shift, scale)
    scale, shift = delta.chunk(2, dim=0)
    return torch.cat((shift, scale), dim=0)


def flux_diffusers_key_map(depth: int, depth_single: int, hidden: int, mlp_hidden: int,
                           final_layer: bool = True) -> dict:
    """diffusers FluxTransformer2DModel module name -> (BFL module name, row slice or None, fix-up or None).

    The row slice ``(0, start, length)`` says which rows of a fused BFL weight the diffusers module is.
    """
    m: dict[str, tuple] = {
        "x_embedder": ("img_in", None, None),
        "context_embedder": ("txt_in", None, None),
        "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None, None),
        "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None, None),
        "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None, None),
        "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None, None),
        "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None, None),
        "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None, None),
    }
    if final_layer:
        m["proj_out"] = ("final_layer.linear", None, None)
        m["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, _swap_scale_shift)
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        m[f"{d}.norm1.linear"] = (f"{b}.img_mod.lin", None, None)
        m[f"{d}.norm1_context.linear"] = (f"{b}.txt_mod.lin", None, None)
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            m[f"{d}.attn.{img}"] = (f"{b}.img_attn.qkv", (0, j * hidden, hidden), None)
            m[f"{d}.attn.{txt}"] = (f"{b}.txt_attn.qkv", (0, j * hidden, hidden), None)
        m[f"{d}.attn.to_out.0"] = (f"{b}.img_attn.proj", None, None)
        m[f"{d}.attn.to_add_out"] = (f"{b}.txt_attn.proj", None, None)
        m[f"{d}.ff.net.0.proj"] = (f"{b}.img_mlp.0", None, None)
        m[f"{d}.ff.net.2"] = (f"{b}.img_mlp.2", None, None)
        m[f"{d}.ff_context.net.0.proj"] = (f"{b}.txt_mlp.0", None, None)
        m[f"{d}.ff_context.net.2"] = (f"{b}.txt_mlp.2", None, None)
    for i in range(depth_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        m[f"{d}.norm.linear"] = (f"{b}.modulation.lin", None, None)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            m[f"{d}.attn.{name}"] = (f"{b}.linear1", (0, j * hidden, hidden), None)
        m[f"{d}.proj_mlp"] = (f"{b}.linear1", (0, 3 * hidden, mlp_hidden), None)
        m[f"{d}.proj_out"] = (f"{b}.linear2", None, None)
    return m


def _flux_keys(net, sd_keys: set, key_map: dict, prefix: str) -> None:
    p = net.params
    hidden = net.hidden_size
    mlp_hidden = int(hidden * p.mlp_ratio)
    for dname, (bname, offset, fn) in flux_diffusers_key_map(len(net.double_blocks), len(net.single_blocks),
                                                             hidden, mlp_hidden).items():
        key = f"{prefix}{bname}.weight"
        if key not in sd_keys:
            continue
        target = key if offset is None and fn is None else (key, offset, fn)
        for name in (f"transformer.{dname}", dname, f"base_model.model.{dname}", f"unet.{dname}",
                     "lora_transformer_" + dname.replace(".", "_")):
            key_map[name] = target
    # XLabs: LoRA processors attached to each block; lora1 = image stream, lora2 = text stream
    for i in range(len(net.double_blocks)):
        for n, side in (("1", "img"), ("2", "txt")):
            key_map[f"double_blocks.{i}.processor.qkv_lora{n}"] = f"{prefix}double_blocks.{i}.{side}_attn.qkv.weight"
            key_map[f"double_blocks.{i}.processor.proj_lora{n}"] = f"{prefix}double_blocks.{i}.{side}_attn.proj.weight"
    for i in range(len(net.single_blocks)):
        key_map[f"single_blocks.{i}.processor.qkv_lora"] = (f"{prefix}single_blocks.{i}.linear1.weight",
                                                            (0, 0, 3 * hidden), None)
        key_map[f"single_blocks.{i}.processor.proj_lora"] = f"{prefix}single_blocks.{i}.linear2.weight"


def sd3_diffusers_key_map(depth: int, hidden: int, attn2_layers=()) -> dict:
    """diffusers SD3Transformer2DModel module name -> (Stability module name, row slice or None, fix-up or None).

    The inverse of `comfy.ldm.mmdit.detect.diffusers_to_checkpoint` for the weights a LoRA can patch:
    separate ``to_q/to_k/to_v`` (image stream) and ``add_{q,k,v}_proj`` (text stream) are row slices of
    the fused ``x_block.attn.qkv`` / ``context_block.attn.qkv``. The last block's context side is
    pre-only: diffusers gives it an AdaLayerNormContinuous, (scale, shift) where the checkpoint has
    (shift, scale), as in the final layer.
    """
    m: dict[str, tuple] = {
        "pos_embed.proj": ("x_embedder.proj", None, None),
        "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", None, None),
        "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", None, None),
        "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", None, None),
        "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", None, None),
        "context_embedder": ("context_embedder", None, None),
        "proj_out": ("final_layer.linear", None, None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", None, _swap_scale_shift),
    }
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == depth - 1
        for j, c in enumerate("qkv"):
            m[f"{d}.attn.to_{c}"] = (f"{b}.x_block.attn.qkv", (0, j * hidden, hidden), None)
            m[f"{d}.attn.add_{c}_proj"] = (f"{b}.context_block.attn.qkv", (0, j * hidden, hidden), None)
            if i in attn2_layers:
                m[f"{d}.attn2.to_{c}"] = (f"{b}.x_block.attn2.qkv", (0, j * hidden, hidden), None)
        m[f"{d}.attn.to_out.0"] = (f"{b}.x_block.attn.proj", None, None)
        m[f"{d}.norm1.linear"] = (f"{b}.x_block.adaLN_modulation.1", None, None)
        m[f"{d}.ff.net.0.proj"] = (f"{b}.x_block.mlp.fc1", None, None)
        m[f"{d}.ff.net.2"] = (f"{b}.x_block.mlp.fc2", None, None)
        m[f"{d}.norm1_context.linear"] = (f"{b}.context_block.adaLN_modulation.1", None,
                                          _swap_scale_shift if last else None)
        if i in attn2_layers:
            m[f"{d}.attn2.to_out.0"] = (f"{b}.x_block.attn2.proj", None, None)
        if not last:
            m[f"{d}.attn.to_add_out"] = (f"{b}.context_block.attn.proj", None, None)
            m[f"{d}.ff_context.net.0.proj"] = (f"{b}.context_block.mlp.fc1", None, None)
            m[f"{d}.ff_context.net.2"] = (f"{b}.context_block.mlp.fc2", None, None)
    return m


def _sd3_keys(net, sd_keys: set, key_map: dict, prefix: str) -> None:
    for dname, (sname, offset, fn) in sd3_diffusers_key_map(len(net.joint_blocks), net.hidden_size,
                                                            net.x_block_self_attn_layers).items():
        key = f"{prefix}{sname}.weight"
        if key not in sd_keys:
            continue
        target = key if offset is None and fn is None else (key, offset, fn)
        # diffusers / PEFT (``transformer.``), bare, PEFT-wrapped, and kohya over diffusers names
        for name in (f"transformer.{dname}", dname, f"base_model.model.{dname}",
                     "lora_transformer_" + dname.replace(".", "_")):
            key_map[name] = target


# family adapters for diffusers-named LoRAs: (diffusion model class path, function(net, keys, map, prefix))
UNET_KEY_MAPPERS: list[tuple[str, object]] = [("comfy.ldm.flux.model.Flux", _flux_keys),
                                              ("comfy.ldm.mmdit.model.MMDiT", _sd3_keys)]


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def model_lora_keys_unet(model, key_map: dict | None = None) -> dict:
    """LoRA module names -> keys of `model` (a BaseModel: keys start with ``diffusion_model.``)."""
    key_map = {} if key_map is None else key_map
    sd_keys = set(model.state_dict().keys())
    prefix = "diffusion_model."
    for k in sd_keys:
        if not (k.startswith(prefix) and k.endswith(".weight")):
            continue
        base = k[len(prefix):-len(".weight")]
        key_map[f"{prefix}{base}"] = k                           # ComfyUI
        key_map[base] = k                                        # BFL / original layout, no prefix
        key_map[f"model.{prefix}{base}"] = k                     # full-checkpoint names
        key_map["lora_unet_" + base.replace(".", "_")] = k       # kohya
    net = getattr(model, "diffusion_model", None)
    for path, fn in UNET_KEY_MAPPERS:
        if net is not None and any(_class_path(net) == path or c.__module__ + "." + c.__qualname__ == path
                                   for c in type(net).__mro__):
            fn(net, sd_keys, key_map, prefix)
    return key_map


# CLIP patcher module names -> (kohya prefixes, diffusers/PEFT prefixes)
_CLIP_LORA_PREFIXES = {
    "clip_l": (["lora_te1_", "lora_te_"], ["text_encoder."]),
    "clip_g": (["lora_te2_"], ["text_encoder_2."]),
    "t5xxl": (["lora_te3_"], ["text_encoder_3."]),
    "umt5xxl": (["lora_te1_", "lora_te_"], ["text_encoder."]),
}


def model_lora_keys_clip(clip_model, key_map: dict | None = None) -> dict:
    """LoRA module names -> keys of the CLIP patcher's module (``clip_l.transformer.text_model...``)."""
    key_map = {} if key_map is None else key_map
    sd_keys = set(clip_model.state_dict().keys())
    present = {k.split(".", 1)[0] for k in sd_keys}
    for k in sd_keys:
        if not k.endswith(".weight") or ".transformer." not in k:
            continue
        enc, rest = k.split(".transformer.", 1)
        base = rest[:-len(".weight")]
        key_map[k[:-len(".weight")]] = k
        key_map["text_encoders." + k[:-len(".weight")]] = k
        kohya, peft = _CLIP_LORA_PREFIXES.get(enc, ([], []))
        kohya, peft = list(kohya), list(peft)
        if enc == "t5xxl" and "clip_g" not in present:
            # Flux (CLIP-L + T5): kohya and diffusers call T5 the second text encoder
            kohya.append("lora_te2_")
            peft.append("text_encoder_2.")
        for p in kohya:
            key_map[p + base.replace(".", "_")] = k
        for p in peft:
            key_map[p + base] = k
    return key_map


# ---------------------------------------------------------------------------------------------------
# Reading LoRA files
# ---------------------------------------------------------------------------------------------------

# (up suffix, down suffix) pairs of the LoRA conventions in the wild
_LORA_SUFFIXES = [
    (".lora_up.weight", ".lora_down.weight"),                 # kohya / ComfyUI
    (".lora_B.weight", ".lora_A.weight"),                     # PEFT / diffusers / BFL
    ("_lora.up.weight", "_lora.down.weight"),                 # old diffusers attention processors
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),     # PEFT with an adapter name
    (".lora_B", ".lora_A"),
    (".up.weight", ".down.weight"),                           # XLabs processors
]


def load_lora(lora: dict, to_load: dict, log_missing: bool = True) -> dict:
    """Parse a LoRA state dict against `to_load` (name -> target) into ``{target: (kind, data)}``."""
    patch_dict = {}
    loaded = set()
    for x, target in to_load.items():
        alpha_key = f"{x}.alpha"
        alpha = lora[alpha_key].item() if alpha_key in lora else None
        if alpha_key in lora:
            loaded.add(alpha_key)
        dora_key = f"{x}.dora_scale"
        dora = lora.get(dora_key)
        if dora is not None:
            # weight decomposition is not implemented: the plain low-rank delta is applied without it
            logger.warning("LoRA key %s is DoRA; its dora_scale is ignored (applied as a plain LoRA)", x)
        for up_s, down_s in _LORA_SUFFIXES:
            up_k, down_k = x + up_s, x + down_s
            if up_k in lora and down_k in lora:
                mid_k = f"{x}.lora_mid.weight"
                mid = lora.get(mid_k)
                loaded.update(k for k in (up_k, down_k, mid_k) if k in lora)
                if dora is not None:
                    loaded.add(dora_key)
                patch_dict[target] = ("lora", (lora[up_k], lora[down_k], alpha, mid, dora, None))
                break
        if f"{x}.hada_w1_a" in lora:
            names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
            t = {n: lora.get(f"{x}.{n}") for n in names}
            loaded.update(f"{x}.{n}" for n in names if t[n] is not None)
            patch_dict[target] = ("loha", (t["hada_w1_a"], t["hada_w1_b"], alpha, t["hada_w2_a"], t["hada_w2_b"],
                                           t["hada_t1"], t["hada_t2"], dora))
        if any(f"{x}.{n}" in lora for n in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")):
            names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
            t = {n: lora.get(f"{x}.{n}") for n in names}
            loaded.update(f"{x}.{n}" for n in names if t[n] is not None)
            patch_dict[target] = ("lokr", (t["lokr_w1"], t["lokr_w2"], alpha, t["lokr_w1_a"], t["lokr_w1_b"],
                                           t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_t2"], dora))
        for suffix, is_bias in ((".diff", False), (".diff_b", True)):
            if x + suffix in lora:
                loaded.add(x + suffix)
                tgt = target
                if is_bias:
                    key = target[0] if isinstance(target, tuple) else target
                    bias_key = key[:-len("weight")] + "bias"
                    tgt = (bias_key,) + tuple(target[1:]) if isinstance(target, tuple) else bias_key
                patch_dict[tgt] = ("diff", (lora[x + suffix],))
    if log_missing:
        for k in lora:
            if k not in loaded:
                logger.debug("lora key not matched by this key map: %s", k)
    return patch_dict


def guess_lora_target(lora: dict) -> str:
    """A short description of the model a LoRA was made for, from its key names (for error messages)."""
    keys = list(lora)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "Flux (double/single stream blocks)"
    if has("joint_blocks", "context_block") or (has("transformer_blocks") and has("add_q_proj")
                                                   and not has("single_transformer_blocks")):
        return "SD3 / SD3.5 (MMDiT joint blocks)"
    if has("input_blocks", "down_blocks", "output_blocks", "up_blocks", "middle_block", "mid_block"):
        return "an SD1.x / SDXL UNet" + (" (two text encoders: SDXL)" if has("lora_te2_", "text_encoder_2") else "")
    if has("self_attn.q", "cross_attn.q") and has("blocks."):
        return "Wan (blocks.N.self_attn / cross_attn)"
    if has("lora_te", "text_encoder", "text_model"):
        return "text encoders only"
    return "an unknown model (first keys: " + ", ".join(sorted(keys)[:3]) + ")"


# Module names only one DiT family has (kohya's underscored forms contain them too), and the diffusion model
# class of each family: a LoRA naming another family's blocks is refused even where some of its diffusers
# names (transformer_blocks.N.attn.to_q ...) would also fit this model's weights.
_FAMILY_MARKERS = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),
    "sd3": ("joint_blocks", "context_block"),
}
_FAMILY_MODELS = {"comfy.ldm.flux.model.Flux": "flux", "comfy.ldm.mmdit.model.MMDiT": "sd3"}


def _model_family(net) -> str | None:
    for c in type(net).__mro__:
        family = _FAMILY_MODELS.get(f"{c.__module__}.{c.__qualname__}")
        if family:
            return family
    return None


def _lora_families(lora: dict) -> set[str]:
    return {f for f, marks in _FAMILY_MARKERS.items() if any(m in k for k in lora for m in marks)}


def _check_family(model, lora: dict, name: str) -> None:
    net = getattr(model.model, "diffusion_model", None)
    family = _model_family(net) if net is not None else None
    found = _lora_families(lora)
    if family is None or not found or family in found:
        return
    raise ValueError(f"LoRA '{name}' was made for {guess_lora_target(lora)}, but this model is "
                     f"{type(net).__name__} ({family}): its block names do not exist here. "
                     "Load a LoRA made for this model.")


def _is_text_encoder_key(k: str) -> bool:
    return k.startswith(("lora_te", "text_encoder", "text_encoders.", "te_", "clip_l.", "clip_g.", "t5xxl."))


def _check_shapes(patches: dict, model_sd: dict, name: str, what: str, lora: dict) -> dict:
    """Keep patches whose delta fits their weight; refuse the whole file when none fits."""
    ok, bad = {}, []
    for target, value in patches.items():
        key = target[0] if isinstance(target, tuple) else target
        if key not in model_sd:
            continue
        shape = model_sd[key].shape
        offset = target[1] if isinstance(target, tuple) and len(target) > 1 else None
        if offset is not None:
            shape = list(shape)
            shape[offset[0]] = offset[2]
        want = (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)
        got = _delta_shape(value[0], value[1])
        if got is not None and tuple(got) != tuple(want):
            bad.append((key, got, want))
            continue
        ok[target] = value
    if bad and not ok:
        key, got, want = bad[0]
        raise ValueError(f"LoRA '{name}' does not fit this {what}: e.g. its patch for {key} is {got[0]}x{got[1]} "
                         f"but the weight is {want[0]}x{want[1]} ({len(bad)} weights differ). It was made for a "
                         f"model ({guess_lora_target(lora)}, another size); pick a LoRA made for this model.")
    for key, got, want in bad:
        logger.warning("LoRA '%s': patch for %s is %s, weight is %s: skipped", name, key, got, want)
    return ok


def load_lora_for_models(model, clip, lora: dict, strength_model: float, strength_clip: float,
                         name: str = "LoRA"):
    """-> (patched MODEL clone or None, patched CLIP clone or None). ComfyUI's `comfy.sd` entry point."""
    unet_map = model_lora_keys_unet(model.model) if model is not None else {}
    clip_map = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
    new_model = new_clip = None
    n_model = n_clip = 0
    consumed: set = set()
    if model is not None:
        _check_family(model, lora, name)
        patches = load_lora(lora, unet_map, log_missing=False)
        patches = _check_shapes(patches, model.model.state_dict(), name, "model", lora)
        new_model = model.clone()
        applied = new_model.add_patches(patches, strength_model)
        n_model = len(applied)
        consumed.update(_consumed_keys(lora, unet_map))
    if clip is not None and clip.patcher is not None:
        patches = load_lora(lora, clip_map, log_missing=False)
        patches = _check_shapes(patches, clip.cond_stage_model.state_dict(), name, "text encoder", lora)
        new_clip = clip.clone()
        applied = new_clip.patcher.add_patches(patches, strength_clip)
        n_clip = len(applied)
        consumed.update(_consumed_keys(lora, clip_map))
    elif clip is not None:
        new_clip = clip
    leftover = [k for k in lora if k not in consumed and not k.endswith(".alpha")
                and not (clip is None and _is_text_encoder_key(k))]
    if n_model == 0 and n_clip == 0:
        family = type(getattr(model.model, "diffusion_model", model.model)).__name__ if model is not None else "CLIP"
        raise ValueError(f"LoRA '{name}' matches none of this {family} model's weights"
                         f"{' or its text encoders' if clip is not None else ''}: it was made for "
                         f"{guess_lora_target(lora)}. Load a LoRA made for this model.")
    if leftover:
        logger.warning("LoRA '%s': %d keys not loaded (e.g. %s)", name, len(leftover), ", ".join(leftover[:3]))
    logger.info("LoRA '%s': %d model weights, %d text-encoder weights patched", name, n_model, n_clip)
    return (new_model if model is not None else None), new_clip


def _consumed_keys(lora: dict, key_map: dict) -> set:
    """Every key of `lora` that belongs to a module name in `key_map` (for the 'not loaded' report)."""
    out = set()
    for k in lora:
        mod = k
        # strip up to three suffix parts: ".alpha", ".lora_up.weight", ".lora_B.default.weight"
        for _ in range(4):
            if mod in key_map:
                out.add(k)
                break
            if "." not in mod:
                break
            mod = mod.rsplit(".", 1)[0]
        # "_lora.up.weight" (old diffusers processors) hangs off the name without a dot
        if k not in out and "_lora." in k and k.split("_lora.", 1)[0] in key_map:
            out.add(k)
    return out
