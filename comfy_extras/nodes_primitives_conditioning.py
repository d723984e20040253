"""Primitive value nodes, PreviewAny / StringConcatenate, the conditioning combinators (combine, average,
concat, timestep range, area, mask), CLIPTextEncodeSD3, CLIPSetLastLayer and the CFGZeroStar model patch.

Interfaces (class_type, inputs, outputs, categories) follow ComfyUI's nodes of the same names. What the
conditioning nodes set (`start_percent` / `end_percent`, `area`, `strength`, `mask`, `mask_strength`,
`set_area_to_bounds`) is honoured by comfy/samplers.py (`process_conds`, `calc_cond_batch`).
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from node_helpers import conditioning_set_values

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 16384  # nodes.MAX_RESOLUTION


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------


class _Primitive:
    CATEGORY = "utils/primitive"
    FUNCTION = "execute"

    def execute(self, value):
        return (value,)


class PrimitiveString(_Primitive):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {})}}

    RETURN_TYPES = ("STRING",)


class PrimitiveStringMultiline(_Primitive):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("STRING",)


class PrimitiveInt(_Primitive):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"min": -sys.maxsize, "max": sys.maxsize,
                                               "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)


class PrimitiveFloat(_Primitive):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"min": -sys.maxsize, "max": sys.maxsize})}}

    RETURN_TYPES = ("FLOAT",)


class PrimitiveBoolean(_Primitive):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("BOOLEAN", {})}}

    RETURN_TYPES = ("BOOLEAN",)


def preview_text(source) -> str:
    """PreviewAny's text: strings as they are, numbers / booleans via str, else JSON, else str."""
    if source is None:
        return "None"
    if isinstance(source, str):
        return source
    if isinstance(source, (bool, int, float)):
        return str(source)
    try:
        return json.dumps(source)
    except (TypeError, ValueError):
        try:
            return str(source)
        except Exception:  # noqa: BLE001 - any failing __str__
            return "source exists, but could not be serialized."


class PreviewAny:
    """Shows any value as text: the UI payload is {"text": [value]} (the frontend's text widget)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True
    CATEGORY = "utils"

    def main(self, source=None):
        return {"ui": {"text": (preview_text(source),)}}


class StringConcatenate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string_a": ("STRING", {"multiline": True}),
                             "string_b": ("STRING", {"multiline": True}),
                             "delimiter": ("STRING", {"multiline": False, "default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"
    CATEGORY = "utils/string"

    def execute(self, string_a, string_b, delimiter):
        return (delimiter.join((string_a, string_b)),)


# ---------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------


class ConditioningCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"

    def combine(self, conditioning_1, conditioning_2):
        return (list(conditioning_1) + list(conditioning_2),)


def _first_of(conditioning_from, node):
    if len(conditioning_from) > 1:
        logger.warning("%s: conditioning_from has %d entries; only the first is used", node,
                       len(conditioning_from))
    return conditioning_from[0]


class ConditioningAverage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",),
                             "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0,
                                                                    "step": 0.01})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"
    CATEGORY = "conditioning"

    def addWeighted(self, conditioning_to, conditioning_from, conditioning_to_strength):  # noqa: N802
        src, src_opts = _first_of(conditioning_from, "ConditioningAverage")
        w = float(conditioning_to_strength)
        pooled_from = src_opts.get("pooled_output")
        out = []
        for dst, dst_opts in conditioning_to:
            # the source is cut or zero-padded to the destination's token count
            frm = src[:, :dst.shape[1]]
            if frm.shape[1] < dst.shape[1]:
                pad = torch.zeros((frm.shape[0], dst.shape[1] - frm.shape[1], dst.shape[2]), dtype=frm.dtype,
                                  device=frm.device)
                frm = torch.cat([frm, pad], dim=1)
            opts = dict(dst_opts)
            pooled_to = dst_opts.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                opts["pooled_output"] = pooled_to * w + pooled_from * (1.0 - w)
            elif pooled_from is not None:
                opts["pooled_output"] = pooled_from
            out.append([dst * w + frm * (1.0 - w), opts])
        return (out,)


class ConditioningConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"
    CATEGORY = "conditioning"

    def concat(self, conditioning_to, conditioning_from):
        src = _first_of(conditioning_from, "ConditioningConcat")[0]
        return ([[torch.cat((dst, src), dim=1), dict(opts)] for dst, opts in conditioning_to],)


class ConditioningSetTimestepRange:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",),
                             "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                             "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"
    CATEGORY = "advanced/conditioning"

    def set_range(self, conditioning, start, end):
        return (conditioning_set_values(conditioning, {"start_percent": start, "end_percent": end}),)


def _strength_input():
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})


class ConditioningSetArea:
    @classmethod
    def INPUT_TYPES(cls):
        def px(default, lo):
            return ("INT", {"default": default, "min": lo, "max": MAX_RESOLUTION, "step": 8})
        return {"required": {"conditioning": ("CONDITIONING",), "width": px(64, 64), "height": px(64, 64),
                             "x": px(0, 0), "y": px(0, 0), "strength": _strength_input()}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, width, height, x, y, strength):
        # (h, w, y, x) in latent units (pixels / 8)
        area = (height // 8, width // 8, y // 8, x // 8)
        return (conditioning_set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage:
    @classmethod
    def INPUT_TYPES(cls):
        def frac(default):
            return ("FLOAT", {"default": default, "min": 0, "max": 1.0, "step": 0.01})
        return {"required": {"conditioning": ("CONDITIONING",), "width": frac(1.0), "height": frac(1.0),
                             "x": frac(0), "y": frac(0), "strength": _strength_input()}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, width, height, x, y, strength):
        area = ("percentage", height, width, y, x)
        return (conditioning_set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "strength": _strength_input()}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, strength):
        return (conditioning_set_values(conditioning, {"strength": strength}),)


class ConditioningSetMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "mask": ("MASK",),
                             "strength": _strength_input(),
                             "set_cond_area": (["default", "mask bounds"],)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, mask, set_cond_area, strength):
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (conditioning_set_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                          "mask_strength": strength}),)


# ---------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------


def _prompt():
    return ("STRING", {"multiline": True, "dynamicPrompts": True})


class CLIPTextEncodeSD3:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "clip_l": _prompt(), "clip_g": _prompt(), "t5xxl": _prompt(),
                             "empty_padding": (["none", "empty_prompt"],)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"

    def encode(self, clip, clip_l, clip_g, t5xxl, empty_padding):
        # "none": an empty prompt contributes no tokens; "empty_prompt": it is encoded as "" (padded)
        drop_empty = empty_padding == "none"
        tokens = clip.tokenize(clip_g)
        for key, text in (("g", clip_g), ("l", clip_l), ("t5xxl", t5xxl)):
            if key not in tokens:
                continue
            if drop_empty and len(text) == 0:
                tokens[key] = []
            elif key != "g":
                tokens[key] = clip.tokenize(text)[key]
        if "l" in tokens and "g" in tokens and len(tokens["l"]) != len(tokens["g"]):
            # CLIP-L and CLIP-G are concatenated per token: pad the shorter with empty chunks
            empty = clip.tokenize("")
            while len(tokens["l"]) < len(tokens["g"]):
                tokens["l"] = tokens["l"] + empty["l"]
            while len(tokens["g"]) < len(tokens["l"]):
                tokens["g"] = tokens["g"] + empty["g"]
        return (clip.encode_from_tokens_scheduled(tokens),)


class CLIPSetLastLayer:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",),
                             "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"

    def set_last_layer(self, clip, stop_at_clip_layer):
        clip = clip.clone()
        clip.clip_layer(stop_at_clip_layer)
        return (clip,)


# ---------------------------------------------------------------------------------------------------
# Guidance patches
# ---------------------------------------------------------------------------------------------------


def cfg_zero_star_scale(cond_eps: torch.Tensor, uncond_eps: torch.Tensor) -> torch.Tensor:
    """Per-sample s* = <cond, uncond> / |uncond|^2 (CFG-Zero*), shaped to broadcast over the latent."""
    b = cond_eps.shape[0]
    c = cond_eps.reshape(b, -1)
    u = uncond_eps.reshape(b, -1)
    s = (c * u).sum(dim=1) / ((u * u).sum(dim=1) + 1e-8)
    return s.reshape([b] + [1] * (cond_eps.ndim - 1))


class CFGZeroStar:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"

    def patch(self, model):
        m = model.clone()

        def cfg_zero_star(args):
            x = args["input"]
            uncond = args["uncond_denoised"]
            alpha = cfg_zero_star_scale(x - args["cond_denoised"], x - uncond)
            # the unconditional prediction is rescaled by alpha (in noise space) before guidance
            return args["denoised"] + (alpha - 1.0) * uncond * (1.0 - args["cond_scale"])

        m.set_model_sampler_post_cfg_function(cfg_zero_star)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "PrimitiveString": PrimitiveString,
    "PrimitiveStringMultiline": PrimitiveStringMultiline,
    "PrimitiveInt": PrimitiveInt,
    "PrimitiveFloat": PrimitiveFloat,
    "PrimitiveBoolean": PrimitiveBoolean,
    "PreviewAny": PreviewAny,
    "StringConcatenate": StringConcatenate,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningAverage": ConditioningAverage,
    "ConditioningConcat": ConditioningConcat,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningSetAreaPercentage": ConditioningSetAreaPercentage,
    "ConditioningSetAreaStrength": ConditioningSetAreaStrength,
    "ConditioningSetMask": ConditioningSetMask,
    "CLIPTextEncodeSD3": CLIPTextEncodeSD3,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "CFGZeroStar": CFGZeroStar,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)",
    "PrimitiveInt": "Int",
    "PrimitiveFloat": "Float",
    "PrimitiveBoolean": "Boolean",
    "PreviewAny": "Preview Any",
    "StringConcatenate": "Concatenate",
    "ConditioningCombine": "Conditioning (Combine)",
    "ConditioningAverage": "Conditioning (Average)",
    "ConditioningConcat": "Conditioning (Concat)",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningSetAreaPercentage": "Conditioning (Set Area with Percentage)",
    "ConditioningSetMask": "Conditioning (Set Mask)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
}
