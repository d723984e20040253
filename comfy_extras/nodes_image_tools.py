"""Core ComfyUI image nodes that official workflows use: scaling (ImageScale, ImageScaleBy,
ImageScaleToTotalPixels), batches (ImageBatch, ImageFromBatch, RepeatImageBatch), canvas (EmptyImage,
ImagePadForOutpaint, ImageCrop), GetImageSize, filters (ImageInvert, ImageBlur, ImageSharpen, ImageQuantize)
and the Canny edge detector.

Class names, input names/options/ranges and outputs follow ComfyUI's (they are the workflow interface); the
code is ours. IMAGE is [B,H,W,C] float32 in 0..1 on the CPU, MASK [B,H,W].

Not here: BatchImagesNode (ComfyUI declares it with the V3 Autogrow dynamic input "images.imageN", which our
node protocol does not have).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import comfy.utils

MAX_RESOLUTION = 16384  # nodes.MAX_RESOLUTION (not imported: keeps this module importable on its own)

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


# --- resizing ------------------------------------------------------------------------------------------


def _upscale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """IMAGE [B,H,W,C] through comfy.utils.common_upscale, the one resizer (ComfyUI's methods and pixels)."""
    return comfy.utils.common_upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


class ImageScale:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (CROP_METHODS,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DESCRIPTION = "Resizes to width x height; a 0 dimension follows the other one keeping the aspect ratio."

    def upscale(self, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        h, w = image.shape[1], image.shape[2]
        if width == 0:
            width = max(1, round(w * height / h))
        elif height == 0:
            height = max(1, round(h * width / w))
        return (_upscale_image(image, width, height, upscale_method, crop),)


class ImageScaleBy:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, scale_by):
        width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (_upscale_image(image, width, height, upscale_method, "disabled"),)


class ImageScaleToTotalPixels:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01}),
            "resolution_steps": ("INT", {"default": 1, "min": 1, "max": 256, "advanced": True}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DESCRIPTION = ("Resizes to about megapixels * 1024 * 1024 pixels keeping the aspect ratio; each side is "
                   "rounded to a multiple of resolution_steps.")

    def upscale(self, image, upscale_method, megapixels, resolution_steps=1):
        h, w = image.shape[1], image.shape[2]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
        # ComfyUI rounds each side to the nearest multiple; a side that would round to 0 (it would fail
        # there) is kept at one step
        width = max(1, round(w * scale / resolution_steps)) * resolution_steps
        height = max(1, round(h * scale / resolution_steps)) * resolution_steps
        return (_upscale_image(image, int(width), int(height), upscale_method, "disabled"),)


# --- colour, batches, canvas ---------------------------------------------------------------------------


class ImageInvert:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image/color"

    def invert(self, image):
        return (1.0 - image,)


class ImageBatch:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image/batch"
    DEPRECATED = True

    def batch(self, image1, image2):
        c1, c2 = image1.shape[-1], image2.shape[-1]
        if c1 != c2:  # RGB next to RGBA: the RGB one gets an opaque alpha channel
            if c1 > c2:
                image2 = F.pad(image2, (0, c1 - c2), value=1.0)
            else:
                image1 = F.pad(image1, (0, c2 - c1), value=1.0)
        if image1.shape[1:] != image2.shape[1:]:
            image2 = _upscale_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return (torch.cat((image1, image2), dim=0),)


class EmptyImage:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(self, width, height, batch_size=1, color=0):
        rgb = torch.tensor([((color >> s) & 0xFF) / 0xFF for s in (16, 8, 0)], dtype=torch.float32)
        return (rgb.expand(batch_size, height, width, 3).clone(),)


def outpaint_mask(h: int, w: int, left: int, top: int, right: int, bottom: int, feathering: int) -> torch.Tensor:
    """[H+top+bottom, W+left+right] mask: 1 on the new border, 0 inside the original image, and inside it a
    ramp ((feathering - d) / feathering)^2 within `feathering` pixels of each side that was padded (d = distance
    to that side, 0 on its first row). No ramp unless 2*feathering is smaller than both image sides."""
    mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
    inner = torch.zeros((h, w), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i = torch.arange(h, dtype=torch.float32).unsqueeze(1).expand(h, w)
        j = torch.arange(w, dtype=torch.float32).unsqueeze(0).expand(h, w)
        far_h, far_w = torch.full_like(i, float(h)), torch.full_like(j, float(w))
        d = torch.stack([i if top else far_h, (h - i) if bottom else far_h,
                         j if left else far_w, (w - j) if right else far_w]).amin(0)
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, v * v, inner)
    mask[top:top + h, left:left + w] = inner
    return mask


class ImagePadForOutpaint:
    @classmethod
    def INPUT_TYPES(s):
        side = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8})
        return {"required": {
            "image": ("IMAGE",),
            "left": side, "top": side, "right": side, "bottom": side,
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1, "advanced": True}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"
    CATEGORY = "image/transform"
    DESCRIPTION = "Pads the image with grey (0.5) and returns a mask of the new area, feathered into the image."

    def expand_image(self, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
        out[:, top:top + h, left:left + w, :] = image
        return (out, outpaint_mask(h, w, left, top, right, bottom, feathering).unsqueeze(0))


class ImageCrop:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crop"
    CATEGORY = "image/transform"
    DEPRECATED = True  # ComfyUI marks it deprecated in favour of ImageCropV2 (a bounding-box widget)

    def crop(self, image, width, height, x, y):
        # the origin is clamped into the image; the far edge is cut by the image border
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class RepeatImageBatch:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",), "amount": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image/batch"

    def repeat(self, image, amount):
        return (image.repeat(amount, 1, 1, 1),)


class ImageFromBatch:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "batch_index": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION}),
            "length": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "frombatch"
    CATEGORY = "image/batch"

    def frombatch(self, image, batch_index, length):
        n = image.shape[0]
        if batch_index < 0:  # counts from the end
            batch_index += n
        batch_index = max(0, min(n - 1, batch_index))
        length = min(n - batch_index, length)
        return (image[batch_index:batch_index + length].clone(),)


class GetImageSize:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("width", "height", "batch_size")
    FUNCTION = "get_size"
    CATEGORY = "image"
    DESCRIPTION = "Returns the width, height, and batch size of the image."

    def get_size(self, image, unique_id=None):
        batch_size, height, width = image.shape[0], image.shape[1], image.shape[2]
        if unique_id:  # shown on the node, as ComfyUI does
            import server
            instance = getattr(server.PromptServer, "instance", None)
            if instance is not None and hasattr(instance, "send_progress_text"):
                instance.send_progress_text(f"width: {width}, height: {height}\n batch size: {batch_size}",
                                            unique_id)
        return (width, height, batch_size)


# --- filters -------------------------------------------------------------------------------------------


def _comfy_gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's blur kernel: a 2-D Gaussian over coordinates spread on [-1, 1] (whatever the radius),
    normalised to sum 1."""
    r = torch.linspace(-1, 1, size)
    d2 = r.view(-1, 1) ** 2 + r.view(1, -1) ** 2
    g = torch.exp(-d2 / (2.0 * sigma * sigma))
    return g / g.sum()


def _depthwise(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Convolve every channel of [B,H,W,C] with `kernel` over a reflect-padded border."""
    c = image.shape[-1]
    x = F.pad(image.movedim(-1, 1), (radius,) * 4, mode="reflect")
    w = kernel.to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, w, groups=c).movedim(1, -1)


class ImageBlur:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"
    CATEGORY = "image/filters"

    def blur(self, image, blur_radius, sigma):
        if blur_radius == 0:
            return (image,)
        return (_depthwise(image, _comfy_gaussian_kernel(blur_radius * 2 + 1, sigma), blur_radius),)


class ImageSharpen:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1, "advanced": True}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01, "advanced": True}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01, "advanced": True}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sharpen"
    CATEGORY = "image/filters"

    def sharpen(self, image, sharpen_radius, sigma, alpha):
        if sharpen_radius == 0:
            return (image,)
        # unsharp kernel: minus 10*alpha times the Gaussian, with the centre raised so the kernel sums to 1
        k = _comfy_gaussian_kernel(sharpen_radius * 2 + 1, sigma) * -(alpha * 10)
        k[sharpen_radius, sharpen_radius] += 1.0 - k.sum()
        return (_depthwise(image, k, sharpen_radius).clamp(0, 1),)


def _bayer(n: int) -> np.ndarray:
    """n x n ordered-dither matrix (n a power of two), values centred in (-0.5, 0.5)."""
    m = np.zeros((1, 1))
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return (m + 0.5) / (n * n) - 0.5


class ImageQuantize:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "colors": ("INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
            "dither": (["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"],),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "quantize"
    CATEGORY = "image/filters"

    def quantize(self, image, colors, dither):
        rgb = image[..., :3]
        out = torch.zeros_like(rgb)
        for i in range(rgb.shape[0]):
            im = Image.fromarray((rgb[i] * 255).to(torch.uint8).numpy(), mode="RGB")
            palette = im.quantize(colors=colors)  # PIL needs a palette image to quantize onto
            if dither.startswith("bayer"):
                n = int(dither.split("-")[1])
                spread = 2 * 256 / (len(palette.getpalette()) // 3)
                arr = np.asarray(im, dtype=np.float32)
                h, w = arr.shape[:2]
                thr = np.tile(_bayer(n), (h // n + 1, w // n + 1))[:h, :w, None]
                arr = np.clip(arr + spread * thr + 0.5, 0, 255).astype(np.uint8)
                q = Image.fromarray(arr).quantize(palette=palette, dither=Image.Dither.NONE)
            else:
                mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
                q = im.quantize(palette=palette, dither=mode)
            out[i] = torch.from_numpy(np.asarray(q.convert("RGB"), dtype=np.float32) / 255.0)
        if image.shape[-1] == 4:
            out = torch.cat((out, image[..., 3:]), dim=-1)
        return (out,)


# --- Canny -----------------------------------------------------------------------------------------------


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zero outside."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def canny(gray: torch.Tensor, low: float, high: float, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Canny edges of [B,1,H,W] (values 0..1): returns (thinned gradient magnitude, edges in {0, 1}).

    Our implementation of the steps kornia.filters.canny (what ComfyUI calls, with its defaults) takes:
    5x5 Gaussian blur with sigma 1 and a reflected border; unnormalised 3x3 Sobel gradients with a replicated
    border; magnitude sqrt(gx^2 + gy^2 + eps); gradient direction rounded to the nearest multiple of 45
    degrees; non-maximum suppression keeping a pixel only if its magnitude is strictly larger than both
    neighbours along that direction (outside the image counts as 0); magnitude > low is weak, > high is
    strong; hysteresis repeatedly promotes weak pixels with a strong 8-neighbour until nothing changes.
    The arithmetic is the same, so results match kornia's up to float rounding (a pixel whose direction or
    magnitude sits exactly on a rounding/threshold boundary may differ); it is not bit-identical by design.
    """
    gray = gray.float()
    k = _gaussian_1d(5, 1.0).to(gray.device)
    x = F.pad(gray, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, sobel_x.view(1, 1, 3, 3))
    gy = F.conv2d(xp, sobel_x.t().contiguous().view(1, 1, 3, 3))
    mag = torch.sqrt(gx * gx + gy * gy + eps)

    # direction index 0..7 (45 degree steps, y pointing down the rows); compare with the neighbours at
    # that direction and the opposite one
    sector = torch.remainder(torch.round(torch.rad2deg(torch.atan2(gy, gx)) / 45.0), 8).long()
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s in range(4):  # a direction and its opposite share the same pair of neighbours
        dy, dx = round(math.sin(math.radians(45 * s))), round(math.cos(math.radians(45 * s)))
        is_max = (mag > _shift(mag, dy, dx)) & (mag > _shift(mag, -dy, -dx))
        keep |= ((sector == s) | (sector == s + 4)) & is_max
    mag = mag * keep

    weak = mag > low
    strong = mag > high
    while True:
        near_strong = F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0
        grown = strong | (weak & near_strong)
        if torch.equal(grown, strong):
            break
        strong = grown
    return mag, strong.to(gray.dtype)


class Canny:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "image": ("IMAGE",),
            "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
            "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect_edge"
    CATEGORY = "image/filters"
    DESCRIPTION = "Canny edge detection: white edges on black, as ControlNet canny models expect."

    def detect_edge(self, image, low_threshold, high_threshold):
        x = image.float().movedim(-1, 1)
        if x.shape[1] >= 3:  # luma with the weights kornia's rgb_to_grayscale uses
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
            x = (x[:, :3] * w).sum(1, keepdim=True)
        else:
            x = x[:, :1]
        _, edges = canny(x, low_threshold, high_threshold)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)


NODE_CLASS_MAPPINGS = {
    "ImageScale": ImageScale,
    "ImageScaleBy": ImageScaleBy,
    "ImageScaleToTotalPixels": ImageScaleToTotalPixels,
    "ImageInvert": ImageInvert,
    "ImageBatch": ImageBatch,
    "EmptyImage": EmptyImage,
    "ImagePadForOutpaint": ImagePadForOutpaint,
    "ImageCrop": ImageCrop,
    "RepeatImageBatch": RepeatImageBatch,
    "ImageFromBatch": ImageFromBatch,
    "GetImageSize": GetImageSize,
    "ImageBlur": ImageBlur,
    "ImageSharpen": ImageSharpen,
    "ImageQuantize": ImageQuantize,
    "Canny": Canny,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageScale": "Upscale Image",
    "ImageScaleBy": "Upscale Image By",
    "ImageScaleToTotalPixels": "Scale Image to Total Pixels",
    "ImageInvert": "Invert Image Colors",
    "ImageBatch": "Batch Images (DEPRECATED)",
    "EmptyImage": "Empty Image",
    "ImagePadForOutpaint": "Pad Image for Outpainting",
    "ImageCrop": "Crop Image (DEPRECATED)",
    "RepeatImageBatch": "Repeat Image Batch",
    "ImageFromBatch": "Get Image from Batch",
    "GetImageSize": "Get Image Size",
    "ImageBlur": "Blur Image",
    "ImageSharpen": "Sharpen Image",
    "ImageQuantize": "Quantize Image",
    "Canny": "Canny Edge Detection",
}
