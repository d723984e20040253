"""Image composition nodes used by the official templates: ImageStitch (Flux Kontext puts two reference
images side by side with it before encoding them as one reference latent)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.utils

# RGB of each spacing colour ComfyUI offers (its option names are the interface)
_SPACING_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                   "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def _match_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the shorter batch is extended with copies of its last image, so every output pairs two images
    n = max(a.shape[0], b.shape[0])
    grow = lambda t: torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])]) if t.shape[0] < n else t  # noqa: E731
    return grow(a), grow(b)


def _match_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # an RGB image stitched to an RGBA one gets an opaque alpha channel
    c = max(a.shape[-1], b.shape[-1])
    pad = lambda t: torch.cat([t, torch.ones(*t.shape[:-1], c - t.shape[-1], dtype=t.dtype)], -1)  # noqa: E731
    return (pad(a) if a.shape[-1] < c else a), (pad(b) if b.shape[-1] < c else b)


def _pad_to(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Zero-pad [B,H,W,C] along dim (1 = height, 2 = width) to `size`, centred."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    before, after = missing // 2, missing - missing // 2
    pads = (0, 0, before, after) if dim == 2 else (0, 0, 0, 0, before, after)
    return F.pad(t, pads, value=0.0)


class ImageStitch:
    @classmethod
    def INPUT_TYPES(s):
        return {
            "required": {
                "image1": ("IMAGE",),
                "direction": (["right", "down", "left", "up"], {"default": "right"}),
                "match_image_size": ("BOOLEAN", {"default": True}),
                "spacing_width": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 2}),
                "spacing_color": (list(_SPACING_COLORS), {"default": "white"}),
            },
            "optional": {"image2": ("IMAGE",)},
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "stitch"
    CATEGORY = "image/transform"
    DESCRIPTION = ("Stitches image2 to image1 in the given direction; with match_image_size, image2 is "
                   "resized to image1's height (right/left) or width (down/up) keeping its aspect ratio.")

    def stitch(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        if image2 is None:
            return (image1,)
        image1, image2 = _match_batch(image1, image2)
        image1, image2 = _match_channels(image1, image2)
        horizontal = direction in ("left", "right")
        # concatenation runs along width (dim 2) for left/right, height (dim 1) for up/down
        cat_dim, other_dim = (2, 1) if horizontal else (1, 2)
        if match_image_size:
            h1, w1 = image1.shape[1:3]
            h2, w2 = image2.shape[1:3]
            if horizontal:
                th, tw = h1, max(1, round(h1 * w2 / h2))
            else:
                th, tw = max(1, round(w1 * h2 / w2)), w1
            if (th, tw) != (h2, w2):
                image2 = comfy.utils.common_upscale(image2.movedim(-1, 1), tw, th, "lanczos",
                                                    "disabled").movedim(1, -1).clamp(0.0, 1.0)
        else:
            size = max(image1.shape[other_dim], image2.shape[other_dim])
            image1, image2 = _pad_to(image1, size, other_dim), _pad_to(image2, size, other_dim)
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            shape = list(image1.shape)
            shape[cat_dim] = spacing_width
            color = list(_SPACING_COLORS[spacing_color]) + [1.0] * (shape[-1] - 3)
            strip = torch.tensor(color[:shape[-1]], dtype=image1.dtype).expand(shape)
            parts.insert(1, strip)
        return (torch.cat(parts, dim=cat_dim),)


NODE_CLASS_MAPPINGS = {"ImageStitch": ImageStitch}
NODE_DISPLAY_NAME_MAPPINGS = {"ImageStitch": "Image Stitch"}
