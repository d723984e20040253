"""ComfyUI's mask and latent utility nodes (same class_type names, inputs, outputs and results).

Masks are MASK tensors `[B,H,W]` (a 2-D `[H,W]` mask is accepted and treated as one mask); images are
IMAGE `[B,H,W,C]`; latents are LATENT dicts `{"samples": [B,C,H,W] or [B,C,T,H,W], "noise_mask"?,
"batch_index"?}`. Nodes that change the batch keep `noise_mask` and `batch_index` in step with it, as
ComfyUI does; `noise_mask` is what `SetLatentNoiseMask` sets and what KSampler / SamplerCustom pass on
to the sampler as the denoise mask (comfy.samplers.prepare_mask resizes it to the latent).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

import comfy.utils
import folder_paths
import nodes

MAX_RESOLUTION = nodes.MAX_RESOLUTION

LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


# -- helpers ----------------------------------------------------------------------------------------


def _as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """Any [..., H, W] mask as [B, H, W]."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat (cycling) or cut `t` along dim 0 to `batch` entries."""
    n = t.shape[0]
    if n == batch:
        return t
    if n > batch:
        return t[:batch]
    reps = math.ceil(batch / n)
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


def _match_latent(target_shape, latent: torch.Tensor, repeat_batch: bool = True) -> torch.Tensor:
    """Give `latent` the target's spatial size (bilinear, centre crop) when its non-batch shape differs,
    then (optionally) the target's batch size."""
    if tuple(latent.shape[1:]) != tuple(target_shape[1:]):
        latent = comfy.utils.common_upscale(latent, target_shape[-1], target_shape[-2], "bilinear", "center")
    return _to_batch(latent, target_shape[0]) if repeat_batch else latent


def _load_image_node():
    return nodes.NODE_CLASS_MAPPINGS.get("LoadImage", nodes.LoadImage)


# -- masks --------------------------------------------------------------------------------------------


class ImageToMask:
    CHANNELS = ["red", "green", "blue", "alpha"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channel": (cls.CHANNELS,)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"

    def image_to_mask(self, image, channel):
        return (image[..., self.CHANNELS.index(channel)],)


class MaskToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"

    def mask_to_image(self, mask):
        return (_as_mask_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3),)


class InvertMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"

    def invert(self, mask):
        return (1.0 - mask,)


class SolidMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"

    def solid(self, value, width, height):
        return (torch.full((1, height, width), float(value), dtype=torch.float32),)


class CropMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "crop"

    def crop(self, mask, x, y, width, height):
        return (_as_mask_batch(mask)[:, y:y + height, x:x + width],)


class MaskComposite:
    OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "destination": ("MASK",),
            "source": ("MASK",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "operation": (cls.OPERATIONS,),
        }}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"

    def combine(self, destination, source, x, y, operation):
        dst = _as_mask_batch(destination)
        src = _as_mask_batch(source).to(dst.device)
        out = dst.clone()
        h_dst, w_dst = dst.shape[-2:]
        # the part of the source (placed at x, y) that lies inside the destination
        right = min(x + src.shape[-1], w_dst)
        bottom = min(y + src.shape[-2], h_dst)
        if right > x and bottom > y:
            a = dst[:, y:bottom, x:right]
            b = src[:, :bottom - y, :right - x]
            if operation == "multiply":
                r = a * b
            elif operation == "add":
                r = a + b
            elif operation == "subtract":
                r = a - b
            else:  # boolean operations on the masks rounded to 0/1
                fn = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
                r = fn(a.round().bool(), b.round().bool()).to(out.dtype)
            out[:, y:bottom, x:right] = r
        return (out.clamp(0.0, 1.0),)


class FeatherMask:
    @classmethod
    def INPUT_TYPES(cls):
        edge = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1})
        return {"required": {"mask": ("MASK",), "left": edge, "top": edge, "right": edge, "bottom": edge}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "feather"

    def feather(self, mask, left, top, right, bottom):
        out = _as_mask_batch(mask).clone()
        h, w = out.shape[-2:]
        left, right = min(left, w), min(right, w)
        top, bottom = min(top, h), min(bottom, h)
        # Ramps of (i + 1) / n. ComfyUI indexes the right and bottom ramps as column/row -i, so step 0
        # lands on column/row 0 (not the last one) and the last column/row gets 2/n; kept for identical
        # results.
        for i in range(left):
            out[:, :, i] *= (i + 1.0) / left
        for i in range(right):
            out[:, :, -i] *= (i + 1.0) / right
        for i in range(top):
            out[:, i, :] *= (i + 1.0) / top
        for i in range(bottom):
            out[:, -i, :] *= (i + 1.0) / bottom
        return (out,)


class GrowMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK",),
            "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "tapered_corners": ("BOOLEAN", {"default": True}),
        }}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"

    def expand_mask(self, mask, expand, tapered_corners):
        """`expand` rounds of 3x3 grey dilation (erosion when negative); the footprint is a cross with
        tapered corners, the full square without. Pixels outside the mask take no part."""
        out = _as_mask_batch(mask).float().clone()
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if not (tapered_corners and dy != 0 and dx != 0)]
        grow = expand > 0
        fill = float("-inf") if grow else float("inf")
        h, w = out.shape[-2:]
        for _ in range(abs(expand)):
            padded = F.pad(out, (1, 1, 1, 1), value=fill)
            shifted = torch.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets])
            out = shifted.amax(0) if grow else shifted.amin(0)
        return (out,)


class ThresholdMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"

    def image_to_mask(self, mask, value):
        return ((mask > value).float(),)


class JoinImageWithAlpha:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "alpha": ("MASK",)}}

    CATEGORY = "mask/compositing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "join_image_with_alpha"

    def join_image_with_alpha(self, image, alpha):
        """RGB plus 1 - mask as the alpha channel (the mask bilinearly resized to the image); the batch is
        the shorter of the two."""
        n = min(image.shape[0], _as_mask_batch(alpha).shape[0])
        a = _as_mask_batch(alpha).unsqueeze(1).float()
        a = F.interpolate(a, size=tuple(image.shape[1:3]), mode="bilinear").squeeze(1)
        a = (1.0 - a).to(image.dtype)
        return (torch.cat((image[:n, ..., :3], a[:n].unsqueeze(-1)), dim=-1),)


class SplitImageWithAlpha:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    CATEGORY = "mask/compositing"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "split_image_with_alpha"

    def split_image_with_alpha(self, image):
        rgb = image[..., :3]
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (rgb, 1.0 - alpha)


class LoadImageMask:
    CHANNELS = ["alpha", "red", "green", "blue"]

    @classmethod
    def INPUT_TYPES(cls):
        image = _load_image_node().INPUT_TYPES()["required"]["image"]  # the input folder's files
        return {"required": {"image": image, "channel": (cls.CHANNELS,)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"

    def load_image(self, image, channel):
        from PIL import Image, ImageOps

        img = Image.open(folder_paths.get_annotated_filepath(image))
        img = ImageOps.exif_transpose(img)
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        band = channel[0].upper()
        mask = torch.from_numpy(np.array(img.getchannel(band)).astype(np.float32) / 255.0)
        if band == "A":
            mask = 1.0 - mask
        return (mask.unsqueeze(0),)

    @classmethod
    def IS_CHANGED(cls, image, channel=None):
        return _load_image_node().IS_CHANGED(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _load_image_node().VALIDATE_INPUTS(image)


# -- latents ----------------------------------------------------------------------------------------


class LatentUpscale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (LATENT_UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (CROP_METHODS,),
        }}

    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    def upscale(self, samples, upscale_method, width, height, crop):
        """Pixel size -> latent size at 1/8 (at least 64 px a side); a 0 side keeps the aspect ratio,
        both 0 returns the input unchanged."""
        if width == 0 and height == 0:
            return (samples,)
        x = samples["samples"]
        h_lat, w_lat = x.shape[-2:]
        if width == 0:
            height = max(64, height)
            width = max(64, round(w_lat * height / h_lat))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(h_lat * width / w_lat))
        else:
            width, height = max(64, width), max(64, height)
        out = samples.copy()
        out["samples"] = comfy.utils.common_upscale(x, width // 8, height // 8, upscale_method, crop)
        return (out,)


class LatentUpscaleBy:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (LATENT_UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    def upscale(self, samples, upscale_method, scale_by):
        x = samples["samples"]
        width = round(x.shape[-1] * scale_by)
        height = round(x.shape[-2] * scale_by)
        out = samples.copy()
        out["samples"] = comfy.utils.common_upscale(x, width, height, upscale_method, "disabled")
        return (out,)


def _mask_for_batch(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """A noise mask with fewer entries than the latent batch, cycled up to it (ComfyUI's rule)."""
    if masks.shape[0] < batch:
        masks = masks.repeat((math.ceil(batch / masks.shape[0]),) + (1,) * (masks.ndim - 1))[:batch]
    return masks


class LatentFromBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 63}),
            "length": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "frombatch"

    def frombatch(self, samples, batch_index, length):
        out = samples.copy()
        x = samples["samples"]
        start = min(x.shape[0] - 1, batch_index)
        length = min(x.shape[0] - start, length)
        out["samples"] = x[start:start + length].clone()
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                out["noise_mask"] = _mask_for_batch(masks, x.shape[0])[start:start + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = list(samples["batch_index"][start:start + length])
        else:
            out["batch_index"] = list(range(start, start + length))
        return (out,)


class RepeatLatentBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "amount": ("INT", {"default": 1, "min": 1, "max": 64})}}

    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "repeat"

    def repeat(self, samples, amount):
        out = samples.copy()
        x = samples["samples"]
        out["samples"] = x.repeat((amount,) + (1,) * (x.ndim - 1))
        masks = samples.get("noise_mask")
        if masks is not None and masks.shape[0] > 1:  # a single mask already applies to every latent
            masks = _mask_for_batch(masks, x.shape[0])
            out["noise_mask"] = masks.repeat((amount,) + (1,) * (masks.ndim - 1))
        if "batch_index" in samples:
            idx = list(samples["batch_index"])
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [i + k * offset for k in range(1, amount) for i in idx]
        return (out,)


class LatentBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "batch"

    def batch(self, samples1, samples2):
        out = samples1.copy()
        s1 = samples1["samples"]
        s2 = _match_latent(s1.shape, samples2["samples"], repeat_batch=False)
        out["samples"] = torch.cat((s1, s2), dim=0)
        out["batch_index"] = (list(samples1.get("batch_index", range(s1.shape[0])))
                              + list(samples2.get("batch_index", range(s2.shape[0]))))
        return (out,)


class LatentComposite:
    @classmethod
    def INPUT_TYPES(cls):
        pos = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8})
        return {"required": {"samples_to": ("LATENT",), "samples_from": ("LATENT",),
                             "x": pos, "y": pos, "feather": pos}}

    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"

    def composite(self, samples_to, samples_from, x, y, composite_method="normal", feather=0):
        """Paste samples_from into samples_to at (x, y) pixels (/8 in the latent). With feather, the pasted
        block fades in linearly over feather/8 latent pixels on each side that lies inside the target."""
        x, y, feather = x // 8, y // 8, feather // 8
        out = samples_to.copy()
        dst = samples_to["samples"]
        s = dst.clone()
        h_to, w_to = dst.shape[-2:]
        src = samples_from["samples"][..., :max(h_to - y, 0), :max(w_to - x, 0)]
        h, w = src.shape[-2:]
        if h == 0 or w == 0:
            out["samples"] = s
            return (out,)
        region = (..., slice(y, y + h), slice(x, x + w))
        if feather == 0:
            s[region] = src
        else:
            mask = torch.ones_like(src)
            for t in range(feather):
                rate = (1.0 / feather) * (t + 1)
                if y != 0:
                    mask[..., t:t + 1, :] *= rate
                if y + h < h_to:
                    mask[..., h - 1 - t:h - t, :] *= rate
                if x != 0:
                    mask[..., :, t:t + 1] *= rate
                if x + w < w_to:
                    mask[..., :, w - 1 - t:w - t] *= rate
            s[region] = src * mask + s[region] * (1.0 - mask)
        out["samples"] = s
        return (out,)


class LatentBlend:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples1": ("LATENT",),
            "samples2": ("LATENT",),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}),
        }}

    CATEGORY = "_for_testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "blend"

    def blend(self, samples1, samples2, blend_factor, blend_mode="normal"):
        if blend_mode != "normal":
            raise ValueError(f"Unsupported blend mode: {blend_mode}")
        out = samples1.copy()
        s1 = samples1["samples"]
        s2 = samples2["samples"]
        if s1.shape != s2.shape:
            s2 = comfy.utils.common_upscale(s2, s1.shape[-1], s1.shape[-2], "bicubic", "center")
        out["samples"] = s1 * blend_factor + s2 * (1 - blend_factor)
        return (out,)


class _LatentPairOp:
    """Shared interface of LatentAdd / LatentSubtract: samples2 is matched to samples1's shape first."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @staticmethod
    def combine(a, b):
        raise NotImplementedError

    def op(self, samples1, samples2):
        out = samples1.copy()
        s1 = samples1["samples"]
        out["samples"] = self.combine(s1, _match_latent(s1.shape, samples2["samples"]))
        return (out,)


class LatentAdd(_LatentPairOp):
    @staticmethod
    def combine(a, b):
        return a + b


class LatentSubtract(_LatentPairOp):
    @staticmethod
    def combine(a, b):
        return a - b


class LatentMultiply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    def op(self, samples, multiplier):
        out = samples.copy()
        out["samples"] = samples["samples"] * multiplier
        return (out,)


def _axis(dim: str, ndim: int) -> int:
    """x / y / t -> the last, second-last, third-last dim (on a 4-D latent "t" is the channel dim, as in
    ComfyUI)."""
    if "x" in dim:
        return ndim - 1
    if "y" in dim:
        return ndim - 2
    return ndim - 3


class LatentConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",),
                             "dim": (["x", "-x", "y", "-y", "t", "-t"],)}}

    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "execute"

    def execute(self, samples1, samples2, dim):
        """samples2 after samples1 along dim ("-" puts it before); samples2 takes samples1's batch size."""
        out = samples1.copy()
        s1 = samples1["samples"]
        s2 = _to_batch(samples2["samples"], s1.shape[0])
        pair = (s2, s1) if dim.startswith("-") else (s1, s2)
        out["samples"] = torch.cat(pair, dim=_axis(dim, s1.ndim))
        return (out,)


class LatentCut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "dim": (["x", "y", "t"],),
            "index": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "amount": ("INT", {"default": 1, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "execute"

    def execute(self, samples, dim, index, amount):
        """`amount` entries from `index` along dim (negative index counts from the end), clamped to the
        latent: at least one entry is always kept."""
        out = samples.copy()
        x = samples["samples"]
        axis = _axis(dim, x.ndim)
        size = x.shape[axis]
        if index >= 0:
            index = min(index, size - 1)
            amount = min(size - index, amount)
        else:
            index = max(index, -size)
            amount = min(-index, amount)
        out["samples"] = torch.narrow(x, axis, index % size, amount)
        return (out,)


class TrimVideoLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "trim_amount": ("INT", {"default": 0, "min": 0, "max": 99999})}}

    CATEGORY = "latent/video"
    EXPERIMENTAL = True
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "execute"

    def execute(self, samples, trim_amount):
        """Drop the first `trim_amount` latent frames (dim 2 of [B,C,T,H,W])."""
        out = samples.copy()
        out["samples"] = samples["samples"][:, :, trim_amount:]
        return (out,)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"

    def set_mask(self, samples, mask):
        """Only the masked area (1) is denoised; the sampler keeps the rest at the input latent."""
        out = samples.copy()
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


NODE_CLASS_MAPPINGS = {
    "ImageToMask": ImageToMask,
    "MaskToImage": MaskToImage,
    "InvertMask": InvertMask,
    "SolidMask": SolidMask,
    "CropMask": CropMask,
    "MaskComposite": MaskComposite,
    "FeatherMask": FeatherMask,
    "GrowMask": GrowMask,
    "ThresholdMask": ThresholdMask,
    "JoinImageWithAlpha": JoinImageWithAlpha,
    "SplitImageWithAlpha": SplitImageWithAlpha,
    "LoadImageMask": LoadImageMask,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
    "LatentFromBatch": LatentFromBatch,
    "RepeatLatentBatch": RepeatLatentBatch,
    "LatentBatch": LatentBatch,
    "LatentComposite": LatentComposite,
    "LatentBlend": LatentBlend,
    "LatentAdd": LatentAdd,
    "LatentSubtract": LatentSubtract,
    "LatentMultiply": LatentMultiply,
    "LatentConcat": LatentConcat,
    "LatentCut": LatentCut,
    "TrimVideoLatent": TrimVideoLatent,
    "SetLatentNoiseMask": SetLatentNoiseMask,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageToMask": "Convert Image to Mask",
    "MaskToImage": "Convert Mask to Image",
    "JoinImageWithAlpha": "Join Image with Alpha",
    "SplitImageWithAlpha": "Split Image with Alpha",
    "LoadImageMask": "Load Image (as Mask)",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "LatentFromBatch": "Latent From Batch",
    "RepeatLatentBatch": "Repeat Latent Batch",
    "LatentComposite": "Latent Composite",
    "SetLatentNoiseMask": "Set Latent Noise Mask",
}
