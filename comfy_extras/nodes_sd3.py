"""SD3-family latent nodes; EmptySD3LatentImage is also the empty latent of Flux workflows (16 channels)."""

from __future__ import annotations

import torch

import comfy.model_management

MAX_RESOLUTION = 16384


class EmptySD3LatentImage:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent/sd3"

    def generate(self, width, height, batch_size=1):
        latent = torch.zeros([batch_size, 16, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return ({"samples": latent},)


NODE_CLASS_MAPPINGS = {"EmptySD3LatentImage": EmptySD3LatentImage}
