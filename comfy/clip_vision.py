"""CLIP vision encoders (CLIPVisionLoader / CLIPVisionEncode): ComfyUI's `clip_vision` files on transformers'
`CLIPVisionModelWithProjection`.

Owns `load(path)` / `load_clipvision_from_sd(sd)` -> `ClipVisionModel`, whose `encode_image(image, crop=True)`
returns an `Output` with ComfyUI's fields: ``last_hidden_state``, ``penultimate_hidden_states`` (the
second-to-last layer's tokens, what Wan i2v reads), ``image_embeds`` (projected pooled vector) and
``mm_projected`` (None here). Files use the Hugging Face key layout of ComfyUI's clip_vision folder
(``vision_model.*``, ``visual_projection.weight``), optionally under a ``clip_vision.`` prefix (single-file
checkpoints). The architecture (ViT-B/L/H/G or a tiny test size) is read from the weight shapes.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils

logger = logging.getLogger(__name__)

# OpenAI CLIP image normalisation (every CLIP vision tower ComfyUI ships uses it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# hidden size -> heads for the released ViTs (ViT-H/G use 80/104-wide heads, so hidden // 64 is wrong)
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def clip_preprocess(image: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, crop: bool = True):
    """IMAGE [B, H, W, C] in 0..1 -> normalised pixels [B, 3, size, size].

    crop=True scales the short side to `size` and centre-crops; crop=False squashes the whole image.
    Pixels are quantised to 8-bit levels after resizing, as a saved-and-reloaded image would be.
    """
    x = image[..., :3].movedim(-1, 1).float()
    if crop:
        scale = size / min(x.shape[-2], x.shape[-1])
        hw = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
    else:
        hw = (size, size)
    x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    x = torch.clip(x * 255.0, 0, 255).round() / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class Output:
    """Attribute and item access (`out.penultimate_hidden_states`, `out["image_embeds"]`), as in ComfyUI."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, value):
        setattr(self, key, value)


def _vision_config(sd: dict):
    import transformers

    if "vision_model.embeddings.class_embedding" not in sd:
        if any(k.startswith("visual.transformer.resblocks.") for k in sd):
            raise ValueError("this CLIP vision file is in the open_clip layout (visual.transformer.*); use the "
                             "Hugging Face layout ComfyUI's clip_vision folder holds (e.g. clip_vision_h.safetensors)")
        if any("siglip" in k or k.startswith("vision_model.head.") for k in sd):
            raise ValueError("SigLIP vision encoders are not supported yet; use a CLIP vision file")
        raise ValueError("not a CLIP vision model (no vision_model.embeddings.class_embedding): load image "
                         "encoders such as clip_vision_h.safetensors from models/clip_vision")
    hidden = sd["vision_model.embeddings.class_embedding"].shape[0]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"CLIP vision position table of {positions} entries is not a square grid plus a class "
                         "token; the file is damaged")
    layers = 0
    while f"vision_model.encoder.layers.{layers}.mlp.fc1.weight" in sd:
        layers += 1
    heads = _KNOWN_HEADS.get(hidden, max(1, hidden // 64))
    proj = sd.get("visual_projection.weight")
    return transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=heads, image_size=grid * patch, patch_size=patch,
        projection_dim=proj.shape[0] if proj is not None else hidden,
        # OpenAI's ViT-B/L towers use quick_gelu; the open_clip-trained ViT-H/G (and small test towers) gelu
        hidden_act="quick_gelu" if hidden in (768, 1024) else "gelu", layer_norm_eps=1e-5)


class ClipVisionModel:
    def __init__(self, sd: dict, dtype: torch.dtype | None = None):
        import transformers

        import comfy.model_patcher

        self.load_device = comfy.model_management.text_encoder_device()
        self.offload_device = torch.device("cpu")
        self.dtype = dtype or comfy.model_management.text_encoder_dtype(self.load_device)
        config = _vision_config(sd)
        weights = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        if "visual_projection.weight" not in weights:
            weights["visual_projection.weight"] = torch.eye(config.hidden_size)
        # built on the meta device: a 632M-parameter ViT-H would otherwise be randomly initialised for nothing
        with torch.device("meta"):
            model = transformers.CLIPVisionModelWithProjection(config)
        expected = model.state_dict()
        missing = [k for k in expected if k not in weights and not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"CLIP vision file is missing {len(missing)} weights (e.g. {missing[:3]}); "
                             "the file is truncated or not a CLIP vision model")
        model.load_state_dict({k: v.to(self.dtype) for k, v in weights.items() if k in expected}, strict=False,
                              assign=True)
        for name, buf in list(model.named_buffers()):
            if buf.is_meta:
                mod = model.get_submodule(name.rsplit(".", 1)[0])
                mod.register_buffer(name.rsplit(".", 1)[1], torch.arange(buf.shape[-1]).expand(buf.shape),
                                    persistent=False)
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.image_size = config.image_size
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        # The patcher needs a module it may set `.device` on (transformers models have a read-only one); this
        # holder shares the towers' parameters, so its weight keys are the file's (vision_model.*, visual_projection.*)
        holder = torch.nn.Module()
        holder.vision_model = model.vision_model
        holder.visual_projection = model.visual_projection
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=self.load_device,
                                                        offload_device=self.offload_device)

    def get_sd(self) -> dict:
        return self.model.state_dict()

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> Output:
        comfy.model_management.load_models_gpu([self.patcher])
        pixels = clip_preprocess(image.to(self.load_device), size=self.image_size, crop=crop)
        with torch.no_grad():
            out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True)
        to = comfy.model_management.intermediate_device()
        return Output(last_hidden_state=out.last_hidden_state.to(to).float(),
                      penultimate_hidden_states=out.hidden_states[-2].to(to).float(),
                      image_embeds=out.image_embeds.to(to).float(), mm_projected=None,
                      image_sizes=[image.shape[1:3]] * image.shape[0])


def load_clipvision_from_sd(sd: dict, prefix: str = "", convert_keys: bool = False) -> ClipVisionModel:
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    elif "clip_vision.vision_model.embeddings.class_embedding" in sd:
        sd = {k[len("clip_vision."):]: v for k, v in sd.items() if k.startswith("clip_vision.")}
    return ClipVisionModel(sd)


def load(ckpt_path: str) -> ClipVisionModel:
    sd = comfy.utils.load_torch_file(ckpt_path)
    try:
        return load_clipvision_from_sd(sd)
    except ValueError as e:
        raise ValueError(f"'{ckpt_path}': {e}") from e
