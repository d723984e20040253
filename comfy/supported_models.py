"""Supported model families: a config class per family that turns a detected unet config into a model.

`model_config_for(unet_config, state_dict, prefix)` walks `models` in order and returns an instance of
the first class whose `unet_config` items all equal the detected ones (the table SD3, PixArt, HunyuanDiT
and Wan add rows to). The instance carries the latent format, sampling settings, dtypes and which text
encoders / VAE a single-file checkpoint of this family bundles.
"""

from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base


class BASE:
    """Family config. Class attributes describe the family; the instance holds the detected sizes."""

    unet_config: dict = {}          # items a detected config must match
    unet_extra_config: dict = {}    # added to the detected config
    sampling_settings: dict = {}
    latent_format = comfy.latent_formats.LatentFormat
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    text_encoder_key_prefix = ["cond_stage_model."]
    vae_key_prefix = ["first_stage_model."]
    # text encoders a checkpoint of this family uses: name -> key prefix inside the checkpoint
    text_encoders: dict[str, str] = {}
    clip_type = "stable_diffusion"

    @classmethod
    def matches(cls, unet_config: dict, state_dict: dict | None = None) -> bool:
        return all(unet_config.get(k) == v for k, v in cls.unet_config.items())

    def __init__(self, unet_config: dict):
        self.unet_config = dict(unet_config)
        self.unet_config.update(self.unet_extra_config)
        self.latent_format = self.latent_format()
        self.manual_cast_dtype: torch.dtype | None = None
        self.custom_operations = None
        self.sampling_settings = dict(self.sampling_settings)

    def model_type(self, state_dict=None, prefix: str = "") -> comfy.model_base.ModelType:
        return comfy.model_base.ModelType.EPS

    def get_model(self, state_dict=None, prefix: str = "", device=None):
        raise NotImplementedError(f"{type(self).__name__} cannot build a model yet")

    def set_inference_dtype(self, dtype: torch.dtype, manual_cast_dtype: torch.dtype | None) -> None:
        self.unet_config["dtype"] = dtype
        self.manual_cast_dtype = manual_cast_dtype

    def process_unet_state_dict(self, state_dict: dict) -> dict:
        return state_dict

    def process_vae_state_dict(self, state_dict: dict) -> dict:
        return state_dict


class Flux(BASE):
    unet_config = {"image_model": "flux", "guidance_embed": True}
    sampling_settings = {}   # ModelSamplingFlux default mu 1.15
    latent_format = comfy.latent_formats.Flux
    memory_usage_factor = 3.1
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    text_encoder_key_prefix = ["text_encoders."]
    vae_key_prefix = ["vae.", "first_stage_model."]
    text_encoders = {"clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer."}
    clip_type = "flux"

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.FLUX

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.Flux(self, model_type=self.model_type(state_dict, prefix), device=device)


class FluxSchnell(Flux):
    unet_config = {"image_model": "flux", "guidance_embed": False}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.FLOW


class SD3(BASE):
    """SD3 / SD3.5 (large, medium, turbo): MMDiT, rectified flow with shift 3, CLIP-L + CLIP-G + T5-XXL."""

    unet_config = {"image_model": "mmdit"}
    sampling_settings = {"shift": 3.0}
    latent_format = comfy.latent_formats.SD3
    memory_usage_factor = 1.6
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    text_encoder_key_prefix = ["text_encoders."]
    vae_key_prefix = ["first_stage_model.", "vae."]
    text_encoders = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                     "t5xxl": "text_encoders.t5xxl.transformer."}
    clip_type = "sd3"

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.FLOW

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.SD3(self, model_type=self.model_type(state_dict, prefix), device=device)

    def process_unet_state_dict(self, state_dict: dict) -> dict:
        if self.unet_config.get("layout") == "diffusers":
            from comfy.ldm.mmdit.detect import diffusers_to_checkpoint

            return diffusers_to_checkpoint(state_dict)
        return state_dict


class WAN21_T2V(BASE):
    """Wan 2.1 text-to-video (1.3B, 14B) and the Wan 2.2 14B DiTs: rectified flow, shift 8, umT5-XXL."""

    unet_config = {"image_model": "wan2.1", "model_type": "t2v"}
    sampling_settings = {"shift": 8.0}
    latent_format = comfy.latent_formats.Wan21
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    text_encoder_key_prefix = ["text_encoders."]
    vae_key_prefix = ["vae.", "first_stage_model."]
    text_encoders = {"umt5xxl": "text_encoders.umt5xxl.transformer."}
    clip_type = "wan"

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.FLOW

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.WAN21(self, model_type=self.model_type(state_dict, prefix), device=device,
                                      image_to_video=False)


class WAN21_I2V(WAN21_T2V):
    """Wan 2.1 image-to-video (14B 480p/720p): 36 input channels (noise + mask + image latent), CLIP-H tokens."""

    unet_config = {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 36}

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.WAN21(self, model_type=self.model_type(state_dict, prefix), device=device,
                                      image_to_video=True)


class WAN21_FLF2V(WAN21_I2V):
    unet_config = {"image_model": "wan2.1", "model_type": "flf2v", "in_dim": 36}


class WAN22_T2V(WAN21_T2V):
    """Wan 2.2 TI2V-5B (text- and image-to-video in one model): 48-channel Wan 2.2 VAE latents, per-frame
    timesteps from the denoise mask (`comfy.model_base.WAN22`)."""

    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "out_dim": 48}
    latent_format = comfy.latent_formats.Wan22

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.WAN22(self, model_type=self.model_type(state_dict, prefix), device=device,
                                      image_to_video=True)


class PixArtAlpha(BASE):
    """PixArt-α: EPS on the linear DDPM betas 1e-4..0.02 (ComfyUI's "sqrt_linear"), SD1.5 latents, T5-XXL."""

    unet_config = {"image_model": "pixart_alpha"}
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02}
    latent_format = comfy.latent_formats.SD15
    memory_usage_factor = 0.5
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    text_encoder_key_prefix = ["text_encoders."]
    vae_key_prefix = ["vae.", "first_stage_model."]
    text_encoders = {"t5xxl": "text_encoders.t5xxl.transformer."}
    clip_type = "pixart"

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.EPS

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.PixArt(self, model_type=self.model_type(state_dict, prefix), device=device)

    def process_unet_state_dict(self, state_dict: dict) -> dict:
        # the stored pos_embed is the fixed sin-cos table at the base size; the network recomputes it
        return {k: v for k, v in state_dict.items() if k != "pos_embed"}


class PixArtSigma(PixArtAlpha):
    """PixArt-Σ: as α with the SDXL VAE's latents."""

    unet_config = {"image_model": "pixart_sigma"}
    latent_format = comfy.latent_formats.SDXL


class HunyuanDiT(BASE):
    """HunyuanDiT v1.0: V prediction, scaled-linear betas 0.00085..0.018, SDXL latents, BERT + mT5-XL."""

    unet_config = {"image_model": "hydit"}
    sampling_settings = {"linear_start": 0.00085, "linear_end": 0.018}
    latent_format = comfy.latent_formats.SDXL
    memory_usage_factor = 1.3
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    text_encoder_key_prefix = ["text_encoders."]
    vae_key_prefix = ["vae.", "first_stage_model."]
    text_encoders = {"hydit_clip": "text_encoders.hydit_clip.transformer.",
                     "mt5xl": "text_encoders.mt5xl.transformer."}
    clip_type = "hunyuan_dit"

    def model_type(self, state_dict=None, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.HunyuanDiT(self, model_type=self.model_type(state_dict, prefix), device=device)


class HunyuanDiT1(HunyuanDiT):
    """HunyuanDiT v1.1 / v1.2: no size/style conditions; betas end at 0.03."""

    unet_config = {"image_model": "hydit1"}
    sampling_settings = {"linear_start": 0.00085, "linear_end": 0.03}


models: list[type[BASE]] = [Flux, FluxSchnell, SD3, WAN22_T2V, WAN21_T2V, WAN21_I2V, WAN21_FLF2V, PixArtAlpha,
                            PixArtSigma, HunyuanDiT, HunyuanDiT1]


def model_config_for(unet_config: dict, state_dict: dict | None = None, prefix: str = "") -> BASE | None:
    for cls in models:
        if cls.matches(unet_config, state_dict):
            return cls(unet_config)
    return None
