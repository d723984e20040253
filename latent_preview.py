"""Per-step sampler callback: progress bar updates and latent previews (ComfyUI's `latent_preview`).

`prepare_callback(model, steps)` returns `callback(step, x0, x, total_steps)`. Each call updates a
`comfy.utils.ProgressBar` (the executor's hook turns it into WebSocket `progress` messages, checks for
interrupts and, in multi-rank runs, is the per-step agreement point) and, when `--preview-method` is
not `none`, passes a preview `("JPEG", PIL.Image, max_size)` that the server sends as an image.
Previews are latent2rgb: a linear map from latent channels to RGB. A format's own
`latent_rgb_factors` (model space) win; otherwise the map comfy/latent_preview_fit.py fitted from the
loaded VAE for `(latent_channels, latent_dimensions)` (raw space: x0 goes through
`latent_format.process_out` first). With neither, no preview. A VAE loaded after sampling started is
picked up at the next step. TAESD needs decoder weights we do not ship, so `taesd` falls back to
latent2rgb with a warning.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image

import comfy.latent_preview_fit
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args

logger = logging.getLogger(__name__)

MAX_PREVIEW_RESOLUTION = args.preview_size
_warned_taesd = False


class LatentPreviewer:
    def decode_latent_to_preview(self, x0):
        raise NotImplementedError

    def decode_latent_to_preview_image(self, preview_format, x0):
        return (preview_format, self.decode_latent_to_preview(x0), MAX_PREVIEW_RESOLUTION)


class Latent2RGBPreviewer(LatentPreviewer):
    def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None):
        self.latent_rgb_factors = torch.tensor(latent_rgb_factors, device="cpu").transpose(0, 1)  # [3, C]
        self.latent_rgb_factors_bias = (torch.tensor(latent_rgb_factors_bias, device="cpu")
                                        if latent_rgb_factors_bias is not None else None)

    def decode_latent_to_preview(self, x0):
        sample = x0[:1].detach().float()
        if sample.ndim == 5:  # video latent [1, C, T, H, W]: preview the first frame
            sample = sample[:, :, 0]
        weight = self.latent_rgb_factors.to(sample.device)
        bias = self.latent_rgb_factors_bias.to(sample.device) if self.latent_rgb_factors_bias is not None else None
        rgb = torch.nn.functional.conv2d(sample, weight[:, :, None, None], bias=bias)[0]  # [3, H, W]
        img = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(img)


class FittedLatent2RGBPreviewer(LatentPreviewer):
    """Applies a map fitted from the loaded VAE (comfy.latent_preview_fit.LatentRGBMap) to raw latents."""

    def __init__(self, fitted, latent_format):
        self.fitted = fitted
        self.latent_format = latent_format

    def decode_latent_to_preview(self, x0):
        sample = x0[:1].detach().float()
        raw = self.latent_format.process_out(sample)  # the map was fitted in the VAE's raw space
        if raw.ndim == 5:  # video latent [1, C, T, H, W]: preview the first frame
            raw = raw[:, :, 0]
        rgb = self.fitted.apply(raw)[0]  # [3, H, W] in -1..1
        img = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(img)


def _fitted_previewer(latent_format):
    channels = getattr(latent_format, "latent_channels", None)
    if channels is None:
        return None
    fitted = comfy.latent_preview_fit.lookup(channels, getattr(latent_format, "latent_dimensions", 2))
    return FittedLatent2RGBPreviewer(fitted, latent_format) if fitted is not None else None


def get_previewer(device, latent_format, method=None):
    global _warned_taesd
    method = method or args.preview_method
    if method in (LatentPreviewMethod.NoPreviews, "none", None):
        return None
    if method in (LatentPreviewMethod.TAESD, "taesd") and not _warned_taesd:
        logger.warning("TAESD previews are not available; using latent2rgb previews instead")
        _warned_taesd = True
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        return _fitted_previewer(latent_format) if latent_format is not None else None
    return Latent2RGBPreviewer(factors, getattr(latent_format, "latent_rgb_factors_bias", None))


def prepare_callback(model, steps, x0_output_dict=None):
    latent_format = model.get_model_object("latent_format") if hasattr(model, "get_model_object") else None
    previewer = get_previewer(getattr(model, "load_device", None), latent_format)
    # the VAE may load after sampling starts (graph order): look for a fitted map again at each step
    retry = (previewer is None and latent_format is not None
             and comfy.latent_preview_fit.previews_enabled(args.preview_method))
    pbar = comfy.utils.ProgressBar(steps)

    def callback(step, x0, x, total_steps):
        nonlocal previewer
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        preview = None
        if previewer is None and retry:
            previewer = _fitted_previewer(latent_format)
        if previewer is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", x0)
        pbar.update_absolute(step + 1, total_steps, preview)

    return callback
