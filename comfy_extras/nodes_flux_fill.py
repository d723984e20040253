"""Image-conditioned model nodes of the Flux.1 Fill / Canny / Depth workflows: InpaintModelConditioning,
InstructPixToPixConditioning and DifferentialDiffusion.

None of them is Flux-specific (ComfyUI uses them for every model that takes an image through extra input
channels); they live together because those workflows are what brought them here. The conditioning nodes
only put ``concat_latent_image`` (and ``concat_mask``) on the conditioning: each model family's
`concat_cond` (comfy/model_base.py) decides how those become input channels. DifferentialDiffusion installs
a per-step denoise-mask function that `comfy.samplers.KSamplerX0Inpaint` calls.
"""

from __future__ import annotations

import torch

from node_helpers import conditioning_set_values

# InpaintModelConditioning and InstructPixToPixConditioning crop to multiples of 8 pixels, whatever the
# VAE's ratio (ComfyUI's behaviour; all the VAEs these models use compress 8x)
PIXEL_MULTIPLE = 8


def center_crop_offsets(height: int, width: int, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int, int, int]:
    """(top, left, cropped height, cropped width) of the centred crop to multiples of `multiple`; an odd
    remainder leaves the extra row / column at the bottom / right."""
    h, w = height // multiple * multiple, width // multiple * multiple
    return (height % multiple) // 2, (width % multiple) // 2, h, w


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] with the RGB of every pixel whose mask rounds to 1 replaced by mid grey (0.5), the
    neutral value of the VAE's [-1, 1] input, so the encoded image carries nothing from the area to paint."""
    keep = (1.0 - mask.round()).unsqueeze(-1)  # [B, H, W, 1]
    return (pixels[..., :3] - 0.5) * keep + 0.5


def _pair_inputs(**extra) -> dict:
    """The inputs of a node that adds an image to both conditionings: positive, negative, vae, pixels, ..."""
    return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                         "pixels": ("IMAGE",), **extra}}


class _ConditioningPairNode:
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"


class InpaintModelConditioning(_ConditioningPairNode):
    @classmethod
    def INPUT_TYPES(cls):
        return _pair_inputs(
            mask=("MASK",),
            noise_mask=("BOOLEAN", {"default": True, "tooltip": (
                "Also put the mask on the latent, so the sampler only changes the masked area. Helps some "
                "models and hurts others.")}))

    CATEGORY = "conditioning/inpaint"

    def encode(self, positive, negative, pixels, vae, mask, noise_mask=True):
        height, width = pixels.shape[1], pixels.shape[2]
        # the mask at the image's size, [B, 1, H, W], soft values kept (plain bilinear, as ComfyUI resizes it)
        mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                                               size=(height, width), mode="bilinear")
        top, left, h, w = center_crop_offsets(height, width)
        mask = mask[:, :, top:top + h, left:left + w]
        concat_latent = vae.encode(masked_pixels(pixels[:, top:top + h, left:left + w], mask[:, 0]))
        # the latent to start from is the whole original image (the VAE crops it the same way)
        latent = {"samples": vae.encode(pixels)}
        if noise_mask:
            latent["noise_mask"] = mask
        values = {"concat_latent_image": concat_latent, "concat_mask": mask}
        return (conditioning_set_values(positive, values), conditioning_set_values(negative, values), latent)


class InstructPixToPixConditioning(_ConditioningPairNode):
    @classmethod
    def INPUT_TYPES(cls):
        return _pair_inputs()

    CATEGORY = "conditioning/instructpix2pix"

    def encode(self, positive, negative, pixels, vae):
        top, left, h, w = center_crop_offsets(pixels.shape[1], pixels.shape[2])
        concat_latent = vae.encode(pixels[:, top:top + h, left:left + w])
        values = {"concat_latent_image": concat_latent}
        # the image only conditions; sampling starts from an empty latent of its size
        return (conditioning_set_values(positive, values), conditioning_set_values(negative, values),
                {"samples": torch.zeros_like(concat_latent)})


class DifferentialMask:
    """The denoise-mask function DifferentialDiffusion installs (Differential Diffusion, Levin & Fried 2023).

    With the step's timestep normalised over the schedule, t = (ts(sigma) - ts(end)) / (ts(start) - ts(end))
    (1 at the first step, 0 at the end; end is the last sigma or the model's sigma_min, whichever is larger),
    a latent pixel is denoised at this step when its mask value is >= t: a soft mask becomes a per-pixel
    start time. `strength` < 1 blends that binary mask with the original one.
    """

    def __init__(self, strength: float = 1.0):
        self.strength = strength

    def __call__(self, sigma: torch.Tensor, denoise_mask: torch.Tensor, extra_options: dict) -> torch.Tensor:
        ms = extra_options["model"].inner_model.model_sampling
        sigmas = extra_options["sigmas"]
        # the larger of the two, picked on the device: a Python `if` here would wait for the GPU every step
        sigma_end = torch.where(sigmas[-1] > ms.sigma_min, sigmas[-1], ms.sigma_min)
        ts_start, ts_end = ms.timestep(sigmas[0]), ms.timestep(sigma_end)
        threshold = (ms.timestep(sigma[0]) - ts_end) / (ts_start - ts_end)
        binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
        if self.strength and self.strength < 1:
            return self.strength * binary + (1 - self.strength) * denoise_mask
        return binary


class DifferentialDiffusion:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)},
                "optional": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True

    def apply(self, model, strength=1.0):
        model = model.clone()
        model.set_model_denoise_mask_function(DifferentialMask(strength))
        return (model,)


NODE_CLASS_MAPPINGS = {
    "InpaintModelConditioning": InpaintModelConditioning,
    "InstructPixToPixConditioning": InstructPixToPixConditioning,
    "DifferentialDiffusion": DifferentialDiffusion,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DifferentialDiffusion": "Differential Diffusion",
}
