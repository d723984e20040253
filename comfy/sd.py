"""Loading model files: diffusion models, single-file checkpoints, text encoders and VAEs.

- `load_diffusion_model(path, model_options)` (UNETLoader): a diffusion-model file -> MODEL
  (`ModelPatcher`). ``model_options["dtype"]`` stores the weights in that dtype (e.g. fp8_e4m3fn) while
  computing in the device's dtype.
- `load_checkpoint_guess_config(path, ...)` (CheckpointLoaderSimple): a single file holding the diffusion
  model (``model.diffusion_model.*``), text encoders (``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``)
  and VAE (``vae.*`` / ``first_stage_model.*``) -> (MODEL, CLIP, VAE, None).
- `load_clip(paths, clip_type=...)` (CLIPLoader, DualCLIPLoader, TripleCLIPLoader) -> CLIP.

`CLIP` (comfy.text_encoders), `VAE` (comfy.vae) and `StyleModel` (comfy.style_model) are re-exported here
because nodes and custom packs import them as ``comfy.sd.CLIP`` / ``comfy.sd.VAE``; `load_style_model`
(StyleModelLoader) likewise. Every error names the file and what was expected.
"""

from __future__ import annotations

import enum
import logging
import os

import torch

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

logger = logging.getLogger(__name__)


class CLIPType(enum.Enum):
    STABLE_DIFFUSION = 1
    STABLE_CASCADE = 2
    SD3 = 3
    STABLE_AUDIO = 4
    HUNYUAN_DIT = 5
    FLUX = 6
    MOCHI = 7
    LTXV = 8
    HUNYUAN_VIDEO = 9
    PIXART = 10
    COSMOS = 11
    LUMINA2 = 12
    WAN = 13
    HIDREAM = 14
    CHROMA = 15
    ACE = 16
    OMNIGEN2 = 17
    QWEN_IMAGE = 18
    HUNYUAN_IMAGE = 19


def __getattr__(name: str):
    # lazy re-exports: the text-encoder and VAE modules are heavy and import transformers
    if name == "CLIP":
        from comfy.text_encoders import CLIP
        return CLIP
    if name == "VAE":
        from comfy.vae import VAE
        return VAE
    if name == "StyleModel":
        from comfy.style_model import StyleModel
        return StyleModel
    raise AttributeError(f"module 'comfy.sd' has no attribute '{name}'")


# ---------------------------------------------------------------------------------------------------
# Diffusion models


def _hint_for_non_diffusion(sd: dict) -> str:
    keys = list(sd)
    if any("text_model.encoder.layers." in k or "encoder.block.0.layer.0.SelfAttention" in k for k in keys):
        return " It is a text encoder: load it with CLIPLoader / DualCLIPLoader (models/text_encoders)."
    if any(k.startswith(("decoder.conv_in.", "encoder.conv_in.", "first_stage_model.", "vae.")) for k in keys) \
            and not any(k.startswith("model.diffusion_model.") for k in keys):
        return " It is a VAE: load it with VAELoader (models/vae)."
    return ""


def _pick_dtypes(model_config, stored: torch.dtype | None, requested: torch.dtype | None,
                 load_device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight storage dtype, manual-cast compute dtype or None)."""
    compute = mm.unet_dtype(load_device, weight_dtype=stored)
    if compute not in model_config.supported_inference_dtypes:
        compute = model_config.supported_inference_dtypes[0] if load_device.type != "cpu" else torch.float32
    fp8 = comfy.ops.FP8_DTYPES
    if requested is not None and requested != compute:
        return requested, compute
    if requested is None and stored in fp8:
        return stored, compute  # keep fp8 files in fp8: half the memory, cast per layer
    return compute, None


def _build_model(model_config, sd: dict, prefix: str, source: str, requested_dtype: torch.dtype | None,
                 stored_dtype: torch.dtype | None):
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    weight_dtype, manual_cast = _pick_dtypes(model_config, stored_dtype, requested_dtype, load_device)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    # built on the meta device: weights come from the file, so no memory or time goes to an init
    model = model_config.get_model(sd, prefix, device=torch.device("meta"))
    model.load_model_weights(sd, prefix, source=source)
    model.device = offload_device
    logger.info("Loaded %s from %s: weights %s%s", type(model_config).__name__, source,
                str(weight_dtype).replace("torch.", ""),
                f", computing in {str(manual_cast).replace('torch.', '')}" if manual_cast else "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


_FP8_TYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def dequantize_scaled_fp8(sd: dict, prefix: str = "") -> dict:
    """"fp8 scaled" diffusion models (e.g. flux1-dev-kontext_fp8_scaled, sd3.5_large_fp8_scaled) store
    each weight as fp8(w / s) next to `<name>.scale_weight` = s, plus a `scaled_fp8` marker and sometimes
    `<name>.scale_input`. Multiply the scales back (into bf16) so the model computes with the real
    weights; without this the fp8 values would load as if they were the weights. Other dicts pass as is."""
    scaled = [k for k in sd if k.endswith(".scale_weight") and k.startswith(prefix)]
    if not scaled and (prefix + "scaled_fp8") not in sd and "scaled_fp8" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")) or k in ("scaled_fp8", prefix + "scaled_fp8"):
            continue
        scale = sd.get(k[:-len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        if scale is not None:
            v = (v.to(torch.float32) * scale.to(torch.float32)).to(torch.bfloat16)
        elif isinstance(v, torch.Tensor) and v.dtype in _FP8_TYPES:
            v = v.to(torch.bfloat16)
        out[k] = v
    logger.info("fp8-scaled weights: %d tensors rescaled to bf16", len(scaled))
    return out


def load_diffusion_model_state_dict(sd: dict, model_options: dict | None = None, source: str = "state dict"):
    """A diffusion-model state dict (bare or with a checkpoint prefix) -> ModelPatcher."""
    model_options = model_options or {}
    sd = dequantize_scaled_fp8(sd)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    if not any(k.startswith(prefix) for k in sd) or comfy.model_detection.detect_unet_config(sd, prefix) is None:
        prefix = ""
    model_config = comfy.model_detection.model_config_from_unet(sd, prefix)
    if model_config is None:
        raise ValueError(
            f"{source}: not a diffusion model this build can load "
            f"({comfy.model_detection.describe_unknown(sd, prefix)}). Expected a diffusion-model file "
            f"such as flux1-dev.safetensors (keys img_in.*, double_blocks.*, single_blocks.*)."
            + _hint_for_non_diffusion(sd))
    stored = comfy.model_detection.weight_dtype(sd, prefix)
    return _build_model(model_config, sd, prefix, source, model_options.get("dtype"), stored)


def load_diffusion_model(unet_path: str, model_options: dict | None = None):
    sd = comfy.utils.load_torch_file(unet_path)
    return load_diffusion_model_state_dict(sd, model_options=model_options, source=f"'{unet_path}'")


# ComfyUI's older names
load_unet = load_diffusion_model
load_unet_state_dict = load_diffusion_model_state_dict


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, name: str = "LoRA"):
    """ComfyUI's entry point (custom packs call comfy.sd.load_lora_for_models); lives in comfy.lora."""
    import comfy.lora

    return comfy.lora.load_lora_for_models(model, clip, lora, strength_model, strength_clip, name=name)


def load_style_model(ckpt_path: str):
    """ComfyUI's entry point for StyleModelLoader (Flux Redux); lives in comfy.style_model."""
    import comfy.style_model

    return comfy.style_model.load_style_model(ckpt_path)


# ---------------------------------------------------------------------------------------------------
# Text encoders


def _clip_type_name(clip_type) -> str:
    if isinstance(clip_type, CLIPType):
        return clip_type.name.lower()
    return str(clip_type).lower()


def load_text_encoder_state_dicts(state_dicts: list[dict], clip_type=CLIPType.STABLE_DIFFUSION,
                                  names: list[str] | None = None, model_options: dict | None = None):
    from comfy.text_encoders import load_text_encoders

    model_options = model_options or {}
    return load_text_encoders(state_dicts, _clip_type_name(clip_type), names=names,
                              device=model_options.get("load_device"), dtype=model_options.get("dtype"))


def load_clip(ckpt_paths: list[str], embedding_directory: str | None = None,
              clip_type=CLIPType.STABLE_DIFFUSION, model_options: dict | None = None):
    """Text-encoder files -> CLIP, combined the way `clip_type`'s diffusion model expects."""
    sds = [comfy.utils.load_torch_file(p) for p in ckpt_paths]
    return load_text_encoder_state_dicts(sds, clip_type, names=list(ckpt_paths), model_options=model_options)


# ---------------------------------------------------------------------------------------------------
# Single-file checkpoints


def _sub_state_dict(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_checkpoint_guess_config(ckpt_path: str, output_vae: bool = True, output_clip: bool = True,
                                 output_clipvision: bool = False, embedding_directory: str | None = None,
                                 output_model: bool = True, model_options: dict | None = None,
                                 te_model_options: dict | None = None):
    """-> (MODEL, CLIP or None, VAE or None, None). Errors say which part the file lacks."""
    sd = comfy.utils.load_torch_file(ckpt_path)
    return load_state_dict_guess_config(sd, output_vae, output_clip, output_clipvision, embedding_directory,
                                        output_model, model_options, te_model_options,
                                        source=f"'{ckpt_path}'", name=ckpt_path)


def load_state_dict_guess_config(sd: dict, output_vae: bool = True, output_clip: bool = True,
                                 output_clipvision: bool = False, embedding_directory: str | None = None,
                                 output_model: bool = True, model_options: dict | None = None,
                                 te_model_options: dict | None = None, source: str = "checkpoint",
                                 name: str | None = None):
    model_options = model_options or {}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    model_config = comfy.model_detection.model_config_from_unet(sd, prefix)
    if model_config is None:
        if comfy.model_detection.detect_unet_config(sd, "") is not None:
            raise ValueError(f"{source} holds only a diffusion model (no model.diffusion_model. prefix, no text "
                             "encoders or VAE): load it with UNETLoader (Load Diffusion Model) from "
                             "models/diffusion_models, plus DualCLIPLoader and VAELoader.")
        raise ValueError(f"{source}: could not detect the model type "
                         f"({comfy.model_detection.describe_unknown(sd, prefix)}). CheckpointLoaderSimple "
                         "expects a single-file checkpoint with model.diffusion_model.* keys."
                         + _hint_for_non_diffusion(sd))
    model = clip = vae = None
    if output_model:
        unet_sd = dequantize_scaled_fp8({k: v for k, v in sd.items() if k.startswith(prefix)
                                         or k == "scaled_fp8"}, prefix)
        stored = comfy.model_detection.weight_dtype(unet_sd, prefix)
        model = _build_model(model_config, unet_sd, prefix, source, model_options.get("dtype"), stored)
    if output_vae:
        vae_sd = {}
        for p in model_config.vae_key_prefix:
            vae_sd = _sub_state_dict(sd, p)
            if vae_sd:
                break
        if not vae_sd:
            raise ValueError(f"{source} contains no VAE (no keys under {' / '.join(model_config.vae_key_prefix)}); "
                             "add a VAELoader node for the VAE file")
        from comfy.vae import VAE

        vae = VAE(sd=model_config.process_vae_state_dict(vae_sd),
                  name=f"{os.path.basename(name)} (bundled VAE)" if name else f"{source} (bundled VAE)")
    if output_clip:
        te_sds, te_names = [], []
        for te_name, te_prefix in model_config.text_encoders.items():
            part = _sub_state_dict(sd, te_prefix)
            if part:
                te_sds.append(part)
                te_names.append(f"{name or source}:{te_name}")
        if te_sds:
            clip = load_text_encoder_state_dicts(te_sds, model_config.clip_type, names=te_names,
                                                 model_options=te_model_options)
        else:
            logger.warning("%s contains no text encoders; its CLIP output is None (use a CLIP loader)", source)
    return model, clip, vae, None


def model_file_name(path: str) -> str:
    return os.path.basename(path)
