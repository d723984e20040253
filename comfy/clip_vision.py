"""Image encoders of ComfyUI's `clip_vision` folder (CLIPVisionLoader / CLIPVisionEncode): OpenAI/open_clip CLIP
towers on transformers' `CLIPVisionModelWithProjection`, and SigLIP towers (Flux Redux's
``sigclip_vision_patch14_384.safetensors``, SigLIP so400m patch14 384) on transformers' `SiglipVisionModel`.

Owns `load(path)` / `load_clipvision_from_sd(sd)` -> `ClipVisionModel`, whose `encode_image(image, crop=True)`
returns an `Output` with ComfyUI's fields: ``last_hidden_state``, ``penultimate_hidden_states`` (the
second-to-last layer's tokens, what Wan i2v reads), ``image_embeds`` and ``mm_projected`` (None here).
For CLIP, ``image_embeds`` is the projected pooled vector [B, D]; for SigLIP it is, as in ComfyUI, the whole
post-normed sequence (the same tensor as ``last_hidden_state``: SigLIP has no projection and its pooling head
is not run), and ``all_hidden_states`` [B, layers, tokens, D] holds every layer's output.

Both families use transformers' key names under ``vision_model.`` (the layout of ComfyUI's clip_vision folder;
ComfyUI's loader detects SigLIP from ``vision_model.embeddings.position_embedding.weight`` and
``vision_model.encoder.layers.0.layer_norm1.weight``); CLIP adds ``visual_projection.weight``, and a SigLIP
file may carry its attention-pooling head (``vision_model.head.*``), which is ignored. A ``clip_vision.``
prefix (single-file checkpoints) is stripped. The architecture (sizes, layers) is read from the weight
shapes, so tiny test towers load too.
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

# SigLIP normalises to [-1, 1]
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# hidden size -> heads for the released SigLIP towers (so400m: 1152 wide, 16 heads of 72)
_SIGLIP_HEADS = {768: 12, 1024: 16, 1152: 16}
# (patch, grid) -> input resolution where the patch grid does not tile the image: so400m-patch14-384 has a
# 27x27 grid, and its 14-pixel convolution leaves the last 6 pixel rows and columns of the 384x384 input unused
_SIGLIP_IMAGE_SIZE = {(14, 27): 384}
# SigLIP was trained with LayerNorm eps 1e-6; ComfyUI runs it with its CLIP layers, whose LayerNorms keep
# torch's default 1e-5. We match ComfyUI (on real activations the difference is far below fp16 resolution).
SIGLIP_LAYER_NORM_EPS = 1e-5


def clip_preprocess(image: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, crop: bool = True):
    """IMAGE [B, H, W, C] in 0..1 -> normalised pixels [B, 3, size, size].

    crop=True scales the short side to `size` and centre-crops; crop=False squashes the whole image; an image
    already size x size is not resampled. Pixels are quantised to 8-bit levels (after resizing), as a
    saved-and-reloaded image would be.
    """
    x = image[..., :3].movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
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


_EXPECTED = ("a CLIP vision tower (vision_model.embeddings.class_embedding, e.g. clip_vision_h.safetensors) or a "
             "SigLIP one (vision_model.embeddings.patch_embedding.weight and .bias, no class embedding, e.g. "
             "sigclip_vision_patch14_384.safetensors)")


def _family(sd: dict) -> str:
    """'clip' or 'siglip' from the keys, else a ValueError saying what the file is and what was expected."""
    if "vision_model.embeddings.class_embedding" in sd:
        return "clip"
    patch = sd.get("vision_model.embeddings.patch_embedding.weight")
    if patch is not None and "vision_model.embeddings.patch_embedding.bias" in sd:
        if patch.ndim != 4:
            raise ValueError("this is a SigLIP 2 NaFlex vision tower (linear patch embedding), which is not "
                             f"supported; expected {_EXPECTED}")
        return "siglip"
    if any(k.startswith("visual.transformer.resblocks.") for k in sd):
        raise ValueError("this CLIP vision file is in the open_clip layout (visual.transformer.*); use the "
                         "Hugging Face layout ComfyUI's clip_vision folder holds (e.g. clip_vision_h.safetensors)")
    if "redux_up.weight" in sd or "redux_down.weight" in sd:
        raise ValueError("this is a Flux Redux style model: load it with StyleModelLoader from "
                         f"models/style_models; CLIPVisionLoader expects {_EXPECTED}")
    if any(".layer_scale1." in k or ".layer_scale2." in k for k in sd):
        raise ValueError(f"DINOv2 image encoders are not supported; expected {_EXPECTED}")
    raise ValueError(f"not a CLIP vision model: expected {_EXPECTED}; load image encoders from models/clip_vision")


def _tower_shape(sd: dict, extra_tokens: int, name: str) -> tuple[int, int, int, int]:
    """(hidden, patch, grid, layers) of a ViT in the vision_model.* layout; `extra_tokens` class tokens."""
    patch_w = sd["vision_model.embeddings.patch_embedding.weight"]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(max(positions - extra_tokens, 0))
    if grid * grid != positions - extra_tokens:
        raise ValueError(f"{name} position table of {positions} entries is not a square grid"
                         f"{' plus a class token' if extra_tokens else ''}; the file is damaged")
    layers = 0
    while f"vision_model.encoder.layers.{layers}.mlp.fc1.weight" in sd:
        layers += 1
    if layers == 0:
        raise ValueError(f"{name} file has no encoder layers (vision_model.encoder.layers.0.*); the file is "
                         "truncated")
    return patch_w.shape[0], patch_w.shape[-1], grid, layers


def _vision_config(sd: dict):
    import transformers

    hidden, patch, grid, layers = _tower_shape(sd, 1, "CLIP vision")
    heads = _KNOWN_HEADS.get(hidden, max(1, hidden // 64))
    proj = sd.get("visual_projection.weight")
    return transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=heads, image_size=grid * patch, patch_size=patch,
        projection_dim=proj.shape[0] if proj is not None else hidden,
        # OpenAI's ViT-B/L towers use quick_gelu; the open_clip-trained ViT-H/G (and small test towers) gelu
        hidden_act="quick_gelu" if hidden in (768, 1024) else "gelu", layer_norm_eps=1e-5)


def _siglip_config(sd: dict):
    import transformers

    hidden, patch, grid, layers = _tower_shape(sd, 0, "SigLIP vision")
    return transformers.SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=_SIGLIP_HEADS.get(hidden, max(1, hidden // 64)),
        image_size=_SIGLIP_IMAGE_SIZE.get((patch, grid), grid * patch), patch_size=patch,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=SIGLIP_LAYER_NORM_EPS,
        vision_use_head=False)  # ComfyUI never runs the attention-pooling head


class ClipVisionModel:
    def __init__(self, sd: dict, dtype: torch.dtype | None = None):
        import transformers

        import comfy.model_patcher

        self.load_device = comfy.model_management.text_encoder_device()
        self.offload_device = torch.device("cpu")
        self.dtype = dtype or comfy.model_management.text_encoder_dtype(self.load_device)
        self.family = _family(sd)
        if self.family == "siglip":
            config = _siglip_config(sd)
            model_class = transformers.SiglipVisionModel
            # transformers' SiglipVisionModel names its tower's weights without the file's vision_model. prefix
            weights = {k[len("vision_model."):]: v for k, v in sd.items()
                       if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
            self.image_mean, self.image_std = SIGLIP_MEAN, SIGLIP_STD
        else:
            config = _vision_config(sd)
            model_class = transformers.CLIPVisionModelWithProjection
            weights = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
            if "visual_projection.weight" not in weights:
                weights["visual_projection.weight"] = torch.eye(config.hidden_size)
            self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        # built on the meta device: a 632M-parameter ViT-H would otherwise be randomly initialised for nothing
        with torch.device("meta"):
            model = model_class(config)
        expected = model.state_dict()
        missing = [k for k in expected if k not in weights and not k.endswith("position_ids")]
        if missing:
            name = "SigLIP" if self.family == "siglip" else "CLIP"
            raise ValueError(f"{name} vision file is missing {len(missing)} weights (e.g. {missing[:3]}); the "
                             f"file is truncated or not a {name} vision model")
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
        # The patcher needs a module it may set `.device` on (transformers models have a read-only one); this
        # holder shares the tower's parameters under the file's key names (vision_model.*, visual_projection.*)
        holder = torch.nn.Module()
        if self.family == "siglip":
            holder.vision_model = model
        else:
            holder.vision_model = model.vision_model
            holder.visual_projection = model.visual_projection
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=self.load_device,
                                                        offload_device=self.offload_device)

    def get_sd(self) -> dict:
        return self.patcher.model.state_dict()

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> Output:
        comfy.model_management.load_models_gpu([self.patcher])
        pixels = clip_preprocess(image.to(self.load_device), size=self.image_size, mean=self.image_mean,
                                 std=self.image_std, crop=crop)
        with torch.no_grad():
            out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True)
        to = comfy.model_management.intermediate_device()
        last = out.last_hidden_state.to(to).float()
        fields = dict(last_hidden_state=last, penultimate_hidden_states=out.hidden_states[-2].to(to).float(),
                      mm_projected=None, image_sizes=[image.shape[1:3]] * image.shape[0])
        if self.family == "siglip":
            # ComfyUI's SigLIP "pooled" output is the post-normed sequence itself, with no projection after it
            fields["image_embeds"] = last
            fields["all_hidden_states"] = torch.stack(out.hidden_states[1:], dim=1).to(to).float()
        else:
            fields["image_embeds"] = out.image_embeds.to(to).float()
        return Output(**fields)


def load_clipvision_from_sd(sd: dict, prefix: str = "", convert_keys: bool = False) -> ClipVisionModel:
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    elif "clip_vision.vision_model.embeddings.patch_embedding.weight" in sd:
        sd = {k[len("clip_vision."):]: v for k, v in sd.items() if k.startswith("clip_vision.")}
    return ClipVisionModel(sd)


def load(ckpt_path: str) -> ClipVisionModel:
    sd = comfy.utils.load_torch_file(ckpt_path)
    try:
        return load_clipvision_from_sd(sd)
    except ValueError as e:
        raise ValueError(f"'{ckpt_path}': {e}") from e
