"""Flux conditioning nodes: FluxGuidance, FluxDisableGuidance, CLIPTextEncodeFlux, and the Kontext pieces
(ReferenceLatent, FluxKontextImageScale)."""

from __future__ import annotations

import comfy.utils
from node_helpers import conditioning_set_values


class CLIPTextEncodeFlux:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"clip": ("CLIP",),
                             "clip_l": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                             "t5xxl": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning/flux"

    def encode(self, clip, clip_l, t5xxl, guidance):
        tokens = clip.tokenize(clip_l)
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        cond = clip.encode_from_tokens_scheduled(tokens)
        return (conditioning_set_values(cond, {"guidance": guidance}),)


class FluxGuidance:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"conditioning": ("CONDITIONING",),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "advanced/conditioning/flux"

    def append(self, conditioning, guidance):
        return (conditioning_set_values(conditioning, {"guidance": guidance}),)


class FluxDisableGuidance:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "advanced/conditioning/flux"
    DESCRIPTION = "This node completely disables the guidance embed on Flux and Flux like models"

    def append(self, conditioning):
        return (conditioning_set_values(conditioning, {"guidance": None}),)


class ReferenceLatent:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "advanced/conditioning/edit_models"
    DESCRIPTION = "This node sets the guiding latent for an edit model. If the model supports it you can " \
                  "chain multiple to set multiple reference images."

    def append(self, conditioning, latent=None):
        if latent is not None:
            conditioning = conditioning_set_values(conditioning, {"reference_latents": [latent["samples"]]},
                                                   append=True)
        return (conditioning,)


# The resolutions Flux Kontext was trained at (width, height), from BFL's release.
PREFERED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


class FluxKontextImageScale:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "scale"
    CATEGORY = "advanced/conditioning/flux"
    DESCRIPTION = "This node resizes the image to one that is more optimal for flux kontext."

    def scale(self, image):
        width, height = image.shape[2], image.shape[1]
        aspect = width / height
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERED_KONTEXT_RESOLUTIONS)
        out = comfy.utils.common_upscale(image.movedim(-1, 1), w, h, "lanczos", "center").movedim(1, -1)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "CLIPTextEncodeFlux": CLIPTextEncodeFlux,
    "FluxGuidance": FluxGuidance,
    "FluxDisableGuidance": FluxDisableGuidance,
    "ReferenceLatent": ReferenceLatent,
    "FluxKontextImageScale": FluxKontextImageScale,
}
