"""Wan conditioning nodes: WanImageToVideo (image_to_video_wan template), WanFirstLastFrameToVideo and
Wan22ImageToVideoLatent (video_wan2_2_5B_ti2v template).

They build the empty video latent and attach what the Wan i2v / flf2v models read from the conditioning:
``concat_latent_image`` (VAE latent of the guide frames, grey elsewhere), ``concat_mask`` (latent-resolution,
0 on known frames, 1 on frames to generate; `comfy.model_base.WAN21` turns it into the 4-channel mask) and
``clip_vision_output`` (CLIP-vision tokens of the guide image(s)).

Wan 2.2 TI2V-5B takes no conditioning extras: Wan22ImageToVideoLatent writes the start image's latent into
the first latent frame(s) and returns a ``noise_mask`` that is 0 there, which the sampler keeps fixed and
`comfy.model_base.WAN22` turns into a timestep of 0 for those frames.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from node_helpers import conditioning_set_values

MAX_RESOLUTION = 16384


def _latent_frames(length: int) -> int:
    # the Wan VAE keeps the first frame and compresses every following 4 frames into one latent frame
    return (length - 1) // 4 + 1


def _fit_frames(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [N, H, W, C] -> [N, height, width, C], centre-cropped to keep the aspect ratio."""
    return comfy.utils.common_upscale(images.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)


def _video_inputs():
    return {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
            "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
            "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
            "length": ("INT", {"default": 81, "min": 1, "max": MAX_RESOLUTION, "step": 4}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}


def _empty_latent(batch_size: int, length: int, height: int, width: int) -> torch.Tensor:
    return torch.zeros([batch_size, 16, _latent_frames(length), height // 8, width // 8],
                       device=comfy.model_management.intermediate_device())


def _latent_mask(frames_known: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C, T_lat] known-flags (True = known) -> mask [1, C, T_lat, h, w] of like's size, 0 where known."""
    m = (~frames_known).float()
    return m[None, :, :, None, None].expand(1, m.shape[0], m.shape[1], like.shape[-2], like.shape[-1]).contiguous()


class WanImageToVideo:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": _video_inputs(),
                "optional": {"clip_vision_output": ("CLIP_VISION_OUTPUT",), "start_image": ("IMAGE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "execute"
    CATEGORY = "conditioning/video_models"

    def execute(self, positive, negative, vae, width, height, length, batch_size, start_image=None,
                clip_vision_output=None):
        latent = _empty_latent(batch_size, length, height, width)
        if start_image is not None:
            start = _fit_frames(start_image[:length], width, height)
            frames = torch.full((length, height, width, start.shape[-1]), 0.5, dtype=start.dtype)
            frames[:start.shape[0]] = start
            concat_latent_image = vae.encode(frames[:, :, :, :3])
            # whole latent frames: the first one holds pixel frame 0, each later one 4 more pixel frames
            known = torch.zeros(1, latent.shape[2], dtype=torch.bool)
            known[:, :(start.shape[0] - 1) // 4 + 1] = True
            mask = _latent_mask(known, concat_latent_image)
            values = {"concat_latent_image": concat_latent_image, "concat_mask": mask}
            positive = conditioning_set_values(positive, values)
            negative = conditioning_set_values(negative, values)
        if clip_vision_output is not None:
            positive = conditioning_set_values(positive, {"clip_vision_output": clip_vision_output})
            negative = conditioning_set_values(negative, {"clip_vision_output": clip_vision_output})
        return (positive, negative, {"samples": latent})


class WanFirstLastFrameToVideo:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": _video_inputs(),
                "optional": {"clip_vision_start_image": ("CLIP_VISION_OUTPUT",),
                             "clip_vision_end_image": ("CLIP_VISION_OUTPUT",),
                             "start_image": ("IMAGE",), "end_image": ("IMAGE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "execute"
    CATEGORY = "conditioning/video_models"

    def execute(self, positive, negative, vae, width, height, length, batch_size, start_image=None,
                end_image=None, clip_vision_start_image=None, clip_vision_end_image=None):
        latent = _empty_latent(batch_size, length, height, width)
        if start_image is not None or end_image is not None:
            frames = torch.full((length, height, width, 3), 0.5)
            # per pixel frame, 4 per latent frame; pixel frame 0 fills the whole first group of 4
            known = torch.zeros(latent.shape[2] * 4, dtype=torch.bool)
            if start_image is not None:
                start = _fit_frames(start_image[:length], width, height)[..., :3]
                frames[:start.shape[0]] = start
                known[:start.shape[0] + 3] = True
            if end_image is not None:
                end = _fit_frames(end_image[-length:], width, height)[..., :3]
                frames[-end.shape[0]:] = end
                known[-end.shape[0]:] = True
            concat_latent_image = vae.encode(frames)
            mask = _latent_mask(known.view(latent.shape[2], 4).t(), concat_latent_image)
            values = {"concat_latent_image": concat_latent_image, "concat_mask": mask}
            positive = conditioning_set_values(positive, values)
            negative = conditioning_set_values(negative, values)
        outs = [c for c in (clip_vision_start_image, clip_vision_end_image) if c is not None]
        if outs:
            # FLF2V reads the start and end image tokens as one sequence (its img_emb adds a 2 x 257 position table)
            from comfy.clip_vision import Output

            cv = Output(penultimate_hidden_states=torch.cat([o.penultimate_hidden_states for o in outs], dim=-2))
            positive = conditioning_set_values(positive, {"clip_vision_output": cv})
            negative = conditioning_set_values(negative, {"clip_vision_output": cv})
        return (positive, negative, {"samples": latent})


class Wan22ImageToVideoLatent:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"vae": ("VAE",),
                             "width": ("INT", {"default": 1280, "min": 32, "max": MAX_RESOLUTION, "step": 32}),
                             "height": ("INT", {"default": 704, "min": 32, "max": MAX_RESOLUTION, "step": 32}),
                             "length": ("INT", {"default": 49, "min": 1, "max": MAX_RESOLUTION, "step": 4}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
                "optional": {"start_image": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "execute"
    CATEGORY = "conditioning/inpaint"

    def execute(self, vae, width, height, length, batch_size, start_image=None):
        import comfy.latent_formats

        fmt = comfy.latent_formats.Wan22()
        # always the Wan 2.2 VAE's layout (48 channels, 16x); without a start image ComfyUI returns this one
        # empty latent, batch_size not applied (the sampler's noise, drawn for its shape, depends on that)
        latent = torch.zeros([1, fmt.latent_channels, _latent_frames(length), height // 16, width // 16],
                             device=comfy.model_management.intermediate_device())
        if start_image is None:
            return ({"samples": latent},)
        if vae.latent_channels != fmt.latent_channels:
            raise ValueError(f"Wan22ImageToVideoLatent: VAE '{getattr(vae, 'name', '?')}' makes {vae.latent_channels}-"
                             "channel latents; the start image needs the Wan 2.2 VAE (wan2.2_vae.safetensors, 48 "
                             "channels) that Wan 2.2 TI2V-5B uses")
        start = _fit_frames(start_image[:length], width, height)[..., :3]
        encoded = vae.encode(start).to(latent)
        known = encoded.shape[2]
        latent[:, :, :known] = encoded
        mask = torch.ones([1, 1] + list(latent.shape[2:]), device=latent.device)
        mask[:, :, :known] = 0.0
        # frames to generate hold the latent mean (process_out of 0): zero in the model's space, where the
        # sampler starts from; the known frames keep the raw VAE latent, as LATENT always does
        latent = fmt.process_out(latent) * mask + latent * (1.0 - mask)
        return ({"samples": latent.repeat(batch_size, 1, 1, 1, 1), "noise_mask": mask.repeat(batch_size, 1, 1, 1, 1)},)


NODE_CLASS_MAPPINGS = {"WanImageToVideo": WanImageToVideo, "WanFirstLastFrameToVideo": WanFirstLastFrameToVideo,
                       "Wan22ImageToVideoLatent": Wan22ImageToVideoLatent}
