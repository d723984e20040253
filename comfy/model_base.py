"""BaseModel: a diffusion network plus its sampling parameterisation and latent format.

`apply_model(x, sigma, ...)` is what the samplers call: it scales the noisy latent for the network,
converts sigma to the network's timestep, runs the network with the conditioning keyword arguments that
`extra_conds` produced, and returns the denoised latent (x0). Family subclasses (Flux, ...) say which
conditioning their network takes.
"""

from __future__ import annotations

import logging
from enum import Enum

import torch

import comfy.model_sampling
import comfy.ops
import comfy.utils

logger = logging.getLogger(__name__)


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    V_PREDICTION_EDM = 3
    STABLE_CASCADE = 4
    EDM = 5
    FLOW = 6
    V_PREDICTION_CONTINUOUS = 7
    FLUX = 8
    IMG_TO_IMG = 9
    FLOW_COSMOS = 10


def model_sampling(model_config, model_type: ModelType):
    ms = comfy.model_sampling
    if model_type == ModelType.FLOW:
        return ms.ModelSamplingDiscreteFlow(model_config)
    if model_type == ModelType.FLUX:
        return ms.ModelSamplingFlux(model_config)
    if model_type == ModelType.EPS:
        return ms.make_model_sampling(ms.ModelSamplingDiscrete, ms.EPS, model_config)
    if model_type == ModelType.V_PREDICTION:
        return ms.make_model_sampling(ms.ModelSamplingDiscrete, ms.V_PREDICTION, model_config)
    raise NotImplementedError(f"model type {model_type.name} has no sampling implementation yet")


class BaseModel(torch.nn.Module):
    def __init__(self, model_config, model_type: ModelType = ModelType.EPS, device=None, unet_model=None):
        super().__init__()
        unet_config = model_config.unet_config
        self.model_config = model_config
        self.latent_format = model_config.latent_format
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.device = device
        self.model_type = model_type
        self.model_sampling = model_sampling(model_config, model_type)
        self.memory_usage_factor = getattr(model_config, "memory_usage_factor", 2.0)
        if unet_model is None:
            raise ValueError("BaseModel needs the network class (unet_model)")
        weight_dtype = unet_config.get("dtype")
        operations = model_config.custom_operations or comfy.ops.pick_operations(weight_dtype,
                                                                                 self.manual_cast_dtype)
        self.diffusion_model = unet_model(**unet_config, device=device, operations=operations)
        self.diffusion_model.eval()
        self.diffusion_model.requires_grad_(False)

    # -- dtypes --------------------------------------------------------------------------------------

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype if self.diffusion_model.dtype is not None else \
            next(self.diffusion_model.parameters()).dtype

    def compute_dtype(self) -> torch.dtype:
        return self.manual_cast_dtype or self.get_dtype()

    # -- sampling interface --------------------------------------------------------------------------

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat=None, c_crossattn=None, control=None,
                    transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        sigma = t
        transformer_options = transformer_options if transformer_options is not None else {}
        dtype = self.compute_dtype()
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat.to(xc)], dim=1)
        xc = xc.to(dtype)
        context = c_crossattn.to(dtype) if c_crossattn is not None else None
        batch = x.shape[0]
        extra = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and name != "guidance":
                    value = value.to(dtype)
                if value.ndim >= 1 and value.shape[0] == 1 and batch > 1:
                    value = value.expand(batch, *value.shape[1:])
            extra[name] = value
        if context is not None and context.shape[0] == 1 and batch > 1:
            context = context.expand(batch, -1, -1)
        timestep = self.model_sampling.timestep(sigma).float()
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        timestep = self.process_timestep(timestep, x=x, **extra)
        out = self.diffusion_model(xc, timestep, context=context, control=control,
                                   transformer_options=transformer_options, **extra).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def process_timestep(self, timestep: torch.Tensor, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The network's timestep from the sampler's ([B]); models with per-frame / per-token timesteps
        (Wan 2.2 TI2V) derive them from their model conds here."""
        return timestep

    def extra_conds(self, **kwargs) -> dict:
        """One conditioning entry -> model keyword arguments (tensors on the sampler's device)."""
        out = {}
        device = kwargs.get("device")
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = cross_attn.to(device) if device is not None else cross_attn
        return out

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(latent)

    # -- weights -------------------------------------------------------------------------------------

    def load_model_weights(self, sd: dict, unet_prefix: str = "", source: str = "state dict"):
        """Load the network's weights; a missing key is an error naming the source file."""
        to_load = {k[len(unet_prefix):]: v for k, v in sd.items() if k.startswith(unet_prefix)}
        to_load = self.model_config.process_unet_state_dict(to_load)
        own = self.diffusion_model.state_dict()
        missing = [k for k in own if k not in to_load]
        if missing:
            raise ValueError(f"{source}: {len(missing)} weights the detected "
                             f"{type(self.model_config).__name__} model needs are missing "
                             f"(e.g. {', '.join(missing[:3])}); the file is incomplete or not this model")
        unexpected = [k for k in to_load if k not in own]
        if unexpected:
            logger.warning("%s: %d unused keys (e.g. %s)", source, len(unexpected), ", ".join(unexpected[:3]))
        target_device = self.device if self.device is not None and self.device.type != "meta" else None
        cast = {}
        for k, param in own.items():
            src = to_load[k]
            if src.shape != param.shape:
                raise ValueError(f"{source}: weight {k} has shape {tuple(src.shape)}, the detected model "
                                 f"expects {tuple(param.shape)}; the file is damaged or mis-detected")
            dev = target_device or (src.device if param.device.type == "meta" else param.device)
            # a copy, never a view of the loaded dict: weight patches must not write into the caller's tensors
            cast[k] = src.to(device=dev, dtype=param.dtype, copy=True).contiguous()
        # assign=True: the model may be on the meta device (built without allocating)
        self.diffusion_model.load_state_dict(cast, strict=True, assign=True)
        return self

    def memory_required(self, input_shape) -> int:
        area = 1
        for s in input_shape[2:]:
            area *= s
        return int(input_shape[0] * area * self.memory_usage_factor * 1024 * 16)


def pack_mask_8x8(mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask [B, 1, 8h, 8w] -> [B, 64, h, w]: each 8x8 pixel block becomes 64 channels at its latent
    pixel, row-major within the block (channel = 8 * row + column), the layout Flux Fill was trained on."""
    b, _, hh, ww = mask.shape
    h, w = hh // 8, ww // 8
    return mask.reshape(b, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h, w)


class Flux(BaseModel):
    """Flux.1 dev / schnell / Kontext, and the checkpoints whose img_in takes more than the noisy latent:
    Canny / Depth (noise + 16 channels of the control image's latent, 128 features per patch) and Fill
    (noise + 16 channels of the masked image's latent + the mask packed 8x8 into 64 channels, 384 per
    patch). The extra channels reach the network as ``c_concat``, concatenated after the noise before
    patchifying (`BaseModel.apply_model`), so they are already part of the tokens ``embed`` receives."""

    def __init__(self, model_config, model_type: ModelType = ModelType.FLUX, device=None):
        from comfy.ldm.flux.model import Flux as FluxNet

        super().__init__(model_config, model_type, device=device, unet_model=FluxNet)

    def input_channels(self) -> int:
        """Latent channels img_in takes per pixel, read from the weight itself: a control LoRA may widen it."""
        dm = self.diffusion_model
        return dm.img_in.weight.shape[1] // (dm.patch_size * dm.patch_size)

    def concat_cond(self, **kwargs) -> torch.Tensor | None:
        noise = kwargs.get("noise")
        if noise is None:
            return None
        latent_ch = noise.shape[1]
        extra = self.input_channels() - latent_ch
        if extra <= 0:
            return None
        device = kwargs.get("device") or noise.device
        b, h, w = noise.shape[0], noise.shape[-2], noise.shape[-1]
        image = kwargs.get("concat_latent_image")
        if image is None:
            # no image given: zeros in VAE space, shifted and scaled like a real one (ComfyUI does the same)
            image = torch.zeros_like(noise, device=device)
        image = _fit_latent_hw(image.to(device=device, dtype=noise.dtype), h, w)
        image = self.process_latent_in(_to_batch(image, b))
        if extra == latent_ch:
            return image  # Canny / Depth: the control image's latent
        if extra != latent_ch + 64:
            raise ValueError(f"This Flux checkpoint's img_in takes {self.input_channels()} latent channels; "
                             f"known layouts are {latent_ch} (dev/schnell), {2 * latent_ch} (Canny/Depth) and "
                             f"{2 * latent_ch + 64} (Fill: + image latent + 8x8-packed mask)")
        # Fill: 1 where to paint. InpaintModelConditioning's pixel mask, else the sampler's noise mask,
        # else everything
        mask = kwargs.get("concat_mask", kwargs.get("denoise_mask"))
        if mask is None:
            mask = torch.ones((b, 1, h, w), dtype=noise.dtype, device=device)
        mask = mask.to(device=device, dtype=noise.dtype)
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        mask = _fit_latent_hw(mask.mean(dim=1, keepdim=True), h * 8, w * 8)
        return torch.cat((image, _to_batch(pack_mask_8x8(mask), b)), dim=1)

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        device = kwargs.get("device")
        concat = self.concat_cond(**kwargs)
        if concat is not None:
            out["c_concat"] = concat
        pooled = kwargs.get("pooled_output")
        if pooled is not None:
            out["y"] = pooled.to(device) if device is not None else pooled
        if self.diffusion_model.params.guidance_embed:
            # absent -> Flux-dev's default 3.5; present but None -> disabled (FluxDisableGuidance)
            g = kwargs.get("guidance", 3.5)
            if g is not None:
                out["guidance"] = torch.as_tensor([g] if not isinstance(g, torch.Tensor) else g,
                                                  dtype=torch.float32, device=device).reshape(-1)
        refs = kwargs.get("reference_latents")
        if refs:
            out["ref_latents"] = [self.process_latent_in(r) for r in refs]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            # an additive [batch, txt + img, txt + img] bias (StyleModelApply's attn_bias) made for an image
            # grid of attention_mask_img_shape tokens: resized to this latent's token grid
            noise, ps = kwargs["noise"], self.diffusion_model.patch_size
            grid = (-(-noise.shape[-2] // ps), -(-noise.shape[-1] // ps))
            ref_shape = kwargs.get("attention_mask_img_shape")
            if ref_shape is not None:
                mask = comfy.utils.upscale_dit_mask(mask, ref_shape, grid)
            out["attention_mask"] = mask.to(device) if device is not None else mask
        return out


class SD3(BaseModel):
    """SD3 / SD3.5: the MMDiT takes the text tokens (c_crossattn) and the pooled CLIP-L+G vector (y)."""

    def __init__(self, model_config, model_type: ModelType = ModelType.FLOW, device=None):
        from comfy.ldm.mmdit.model import MMDiT

        super().__init__(model_config, model_type, device=device, unet_model=MMDiT)

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        pooled = kwargs.get("pooled_output")
        if pooled is not None:
            device = kwargs.get("device")
            out["y"] = pooled.to(device) if device is not None else pooled
        return out


def _fit_latent_hw(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a [B, C, T, H, W] (or [B, C, H, W]) latent-space tensor to (height, width), centre-cropped."""
    if x.shape[-2:] == (height, width):
        return x
    import comfy.utils

    if x.ndim == 4:
        return comfy.utils.common_upscale(x, width, height, "bilinear", "center")
    b, c, t = x.shape[:3]
    flat = x.movedim(2, 1).reshape(b * t, c, *x.shape[-2:])
    flat = comfy.utils.common_upscale(flat, width, height, "bilinear", "center")
    return flat.reshape(b, t, c, height, width).movedim(1, 2)


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    return x if device is None else x.to(device)


def _to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    reps = -(-batch // x.shape[0])
    return x.repeat((reps,) + (1,) * (x.ndim - 1))[:batch]


class WAN21(BaseModel):
    """Wan 2.1 (and 2.2-14B). Models with more input channels than the latent (i2v: 36 = 16 + 4 + 16) get
    ``c_concat = [mask (4 ch, 1 = known frame), image latent (16 ch)]`` after the noise; i2v also takes the
    CLIP-vision penultimate tokens as ``clip_fea``."""

    def __init__(self, model_config, model_type: ModelType = ModelType.FLOW, image_to_video: bool = False,
                 device=None):
        from comfy.ldm.wan.model import WanModel

        super().__init__(model_config, model_type, device=device, unet_model=WanModel)
        self.image_to_video = image_to_video

    def _check_latent_channels(self, latent: torch.Tensor, what: str) -> None:
        """A latent of the other Wan VAE would fail deep in the network (or, as a concat image, be silently
        cut): name both sides and the fix."""
        ch = self.latent_format.latent_channels
        if latent.shape[1] == ch:
            return
        model = "Wan 2.2 TI2V-5B" if ch == 48 else "Wan 2.1 / Wan 2.2 14B"
        source = {48: "the Wan 2.2 VAE (wan2.2_vae.safetensors) or Wan22ImageToVideoLatent",
                  16: "the Wan 2.1 VAE (wan_2.1_vae.safetensors) or a 16-channel Wan latent node"}.get(
            latent.shape[1], "another model family's VAE")
        fix = "wan2.2_vae.safetensors" if ch == 48 else "wan_2.1_vae.safetensors"
        raise ValueError(f"This {model} model takes {ch}-channel latents, but the {what} has {latent.shape[1]} "
                         f"channels {tuple(latent.shape)}, which comes from {source}. Use {fix} with this model.")

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        self._check_latent_channels(latent, "latent")
        return super().process_latent_in(latent)

    def concat_cond(self, **kwargs) -> torch.Tensor | None:
        noise = kwargs["noise"]
        extra = self.diffusion_model.in_dim - noise.shape[1]
        if extra <= 0:
            return None
        device = kwargs.get("device") or noise.device
        image = kwargs.get("concat_latent_image")
        if image is None:
            # no start image (WanImageToVideo without one): mask and image channels stay zero, as in ComfyUI
            return torch.zeros((noise.shape[0], extra) + tuple(noise.shape[2:]), dtype=noise.dtype, device=device)
        self._check_latent_channels(image, "start/end image latent (concat_latent_image)")
        image = _fit_latent_hw(image.to(device=device, dtype=noise.dtype), noise.shape[-2], noise.shape[-1])
        ch = self.latent_format.latent_channels
        image = torch.cat([self.process_latent_in(image[:, i:i + ch]) for i in range(0, image.shape[1], ch)], dim=1)
        image = _to_batch(image, noise.shape[0])
        if extra != image.shape[1] + 4 and (not self.image_to_video or extra == image.shape[1]):
            return image   # models whose extra channels are the image latent alone (no mask)
        image = image[:, :extra - 4]
        mask = kwargs.get("concat_mask", kwargs.get("denoise_mask"))
        if mask is None:
            mask = torch.zeros((noise.shape[0], 4) + tuple(noise.shape[2:]), dtype=noise.dtype, device=device)
        else:
            mask = mask.to(device=device, dtype=noise.dtype)
            if mask.shape[1] != 4:
                mask = mask.mean(dim=1, keepdim=True)
            # the node marks frames to generate with 1; the network expects 1 on known frames
            mask = _fit_latent_hw(1.0 - mask, noise.shape[-2], noise.shape[-1])
            if mask.shape[2] < noise.shape[2]:
                mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, noise.shape[2] - mask.shape[2]))
            if mask.shape[1] == 1:
                mask = mask.repeat(1, 4, 1, 1, 1)
            mask = _to_batch(mask, noise.shape[0])
        return torch.cat((mask, image), dim=1)

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        device = kwargs.get("device")
        concat = self.concat_cond(**kwargs)
        if concat is not None:
            out["c_concat"] = concat
        clip_vision_output = kwargs.get("clip_vision_output")
        if clip_vision_output is not None:
            fea = clip_vision_output.penultimate_hidden_states
            out["clip_fea"] = fea.to(device) if device is not None else fea
        return out


class WAN22(WAN21):
    """Wan 2.2 TI2V-5B: 48-channel latents of the Wan 2.2 VAE, the same DiT. Image-to-video works through
    the sampler's denoise mask (Wan22ImageToVideoLatent: 0 on the start image's latent frame): each latent
    frame's timestep is the sampler's times that frame's mean mask, so the start frame is denoised at t = 0
    while the others follow the schedule, and the network sees that frame clean (`scale_latent_inpaint`),
    never re-noised. Without a mask every frame gets the sampler's timestep (text-to-video)."""

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        if kwargs.get("denoise_mask") is not None:  # read back in process_timestep
            out["denoise_mask"] = _to_device(kwargs["denoise_mask"], kwargs.get("device"))
        return out

    def process_timestep(self, timestep: torch.Tensor, x: torch.Tensor, denoise_mask=None, **kwargs):
        if denoise_mask is None:
            return timestep
        per_frame = denoise_mask.float().mean(dim=tuple(i for i in range(1, denoise_mask.ndim) if i != 2))
        return per_frame.to(timestep.device) * timestep.reshape(-1, 1)   # [B, T]

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs) -> torch.Tensor:
        return latent_image


class PixArt(BaseModel):
    """PixArt-α / Σ: EPS prediction on the DDPM schedule; T5 tokens as c_crossattn. α also takes the image
    size (``c_size`` [[height, width]] in pixels) and aspect ratio (``c_ar`` [[height / width]])."""

    def __init__(self, model_config, model_type: ModelType = ModelType.EPS, device=None):
        from comfy.ldm.pixart.model import PixArtMS

        super().__init__(model_config, model_type, device=device, unet_model=PixArtMS)

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        width, height = kwargs.get("width"), kwargs.get("height")
        if self.diffusion_model.micro_condition and width is not None and height is not None:
            device = kwargs.get("device")
            out["c_size"] = torch.tensor([[float(height), float(width)]], device=device)
            out["c_ar"] = torch.tensor([[kwargs.get("aspect_ratio", height / width)]], dtype=torch.float32,
                                       device=device)
        return out


class HunyuanDiT(BaseModel):
    """HunyuanDiT: V prediction on the SD discrete schedule. c_crossattn is the BERT (CLIP) tokens; the
    conditioning entry also carries ``attention_mask``, ``conditioning_mt5xl`` and ``attention_mask_mt5xl``;
    ``image_meta_size`` [[height, width, target_height, target_width, 0, 0]] (pixels) feeds v1.0."""

    def __init__(self, model_config, model_type: ModelType = ModelType.V_PREDICTION, device=None):
        from comfy.ldm.hydit.model import HunYuanDiT

        super().__init__(model_config, model_type, device=device, unet_model=HunYuanDiT)

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        device = kwargs.get("device")
        for src, dst in (("attention_mask", "text_embedding_mask"),
                         ("conditioning_mt5xl", "encoder_hidden_states_t5"),
                         ("attention_mask_mt5xl", "text_embedding_mask_t5")):
            value = kwargs.get(src)
            if value is not None:
                out[dst] = value.to(device) if device is not None else value
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        target_w, target_h = kwargs.get("target_width", width), kwargs.get("target_height", height)
        out["image_meta_size"] = torch.tensor([[height, width, target_h, target_w, 0, 0]], dtype=torch.float32,
                                              device=device)
        return out
