"""latent2rgb preview maps fitted from the VAE the user loads (no tables copied from other projects).

Owns `fit_latent_rgb(vae)`: draws a few seeded random raw-space latents with the spread the family's
diffusion models produce, decodes them with the VAE itself, average-pools each latent pixel's block of
decoded pixels to one colour and solves least squares `rgb ~= raw @ factors + bias` (colours in the
decoder's -1..1 range). `maybe_fit_for_vae(vae)` is the hook comfy/vae.py calls after loading: it fits
only when previews are on (`--preview-method` not `none`), caches per VAE object and registers the map
under `(latent_channels, latent_dimensions)`, where `latent_preview.py` finds it with
`lookup(channels, dims)` for latent formats that have no `latent_rgb_factors` of their own.
The map applies to RAW VAE latents: the previewer converts model-space x0 with `latent_format.process_out`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# number of random latents, their spatial size, and the model-space spreads drawn (x0 early in sampling is
# a blurry, low-contrast estimate; late it is a full-contrast latent: cover both)
N_LATENTS = 8
LATENT_SIZE = 8
MODEL_SPACE_SPREADS = (0.5, 1.0)
SEED = 0


@dataclass(frozen=True)
class LatentRGBMap:
    """rgb (-1..1) ~= raw_latent @ factors + bias, per latent pixel."""

    factors: torch.Tensor  # [C, 3] float32, CPU
    bias: torch.Tensor  # [3] float32, CPU
    latent_channels: int
    latent_dimensions: int
    residual_rms: float  # RMS error of the fit on its own samples (colour units, -1..1 range)
    baseline_rms: float  # RMS error of predicting the mean colour: what the fit has to beat
    seconds: float
    source: str  # the VAE file it was fitted from

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latent [B, C, H, W] -> rgb [B, 3, H, W] in the decoder's -1..1 range (not clamped)."""
        weight = self.factors.to(raw.device, raw.dtype).t()[:, :, None, None]
        return F.conv2d(raw, weight, bias=self.bias.to(raw.device, raw.dtype))


_lock = threading.Lock()
_registry: dict[tuple[int, int], LatentRGBMap] = {}
# per VAE object: loading the same VAE again (node cache, several samplers) does not refit
_by_vae: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def previews_enabled(method=None) -> bool:
    from comfy.cli_args import LatentPreviewMethod, args

    method = args.preview_method if method is None else method
    return method not in (None, "none", LatentPreviewMethod.NoPreviews)


def lookup(latent_channels: int, latent_dimensions: int) -> LatentRGBMap | None:
    with _lock:
        return _registry.get((int(latent_channels), int(latent_dimensions)))


def register(fit: LatentRGBMap) -> None:
    with _lock:
        _registry[(fit.latent_channels, fit.latent_dimensions)] = fit


def clear() -> None:
    """Forget every fitted map (tests; a process that unloads its VAEs)."""
    with _lock:
        _registry.clear()
        _by_vae.clear()


def _model_space_formats(vae) -> list:
    """Latent formats of the diffusion models that use this VAE family: their process_out maps unit-spread
    model latents to the raw spread this VAE actually sees."""
    import comfy.latent_formats as lf

    family = getattr(vae, "family", None)
    if family == "kl_16":
        return [lf.Flux(), lf.SD3()]
    if family == "kl_sd":
        return [lf.SD15(), lf.SDXL()]
    if family == "wan21" and vae.latent_channels == lf.Wan21.latent_channels:
        return [lf.Wan21()]
    if family == "wan22" and vae.latent_channels == lf.Wan22.latent_channels:
        return [lf.Wan22()]
    return [lf.LatentFormat()]  # unknown family: raw space is model space


def _sample_raw_latents(vae, generator: torch.Generator) -> torch.Tensor:
    """[N, C, S, S] raw latents: unit normals scaled per spread and mapped through each format's process_out."""
    formats = _model_space_formats(vae)
    c = vae.latent_channels
    combos = [(fmt, s) for fmt in formats for s in MODEL_SPACE_SPREADS]
    out = []
    for i in range(N_LATENTS):
        fmt, spread = combos[i % len(combos)]
        z = torch.randn(1, c, LATENT_SIZE, LATENT_SIZE, generator=generator) * spread
        out.append(fmt.process_out(z))
    return torch.cat(out)


@torch.no_grad()
def _decode_pooled(vae, raw: torch.Tensor) -> torch.Tensor:
    """Decode raw latents [N, C, h, w] with the VAE's own network and average-pool each latent pixel's block
    -> [N, 3, h, w] in -1..1. Calls the network directly: no progress bar, no model-management reload."""
    net = vae.first_stage_model
    param = next(net.parameters())
    z = raw.to(param.device, param.dtype)
    if vae.latent_dim == 3:
        img = net.decode(z[:, :, None])[:, :, 0]  # one latent frame decodes to one pixel frame (causal)
    else:
        img = net.decode(z)
    img = img.float().clamp(-1.0, 1.0)  # what the user would see: VAE.decode clamps too
    r = vae.spacial_compression_decode()
    return F.avg_pool2d(img, kernel_size=r).cpu()


def fit_from_samples(raw: torch.Tensor, rgb: torch.Tensor, border: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares over latent pixels: raw [N, C, h, w], rgb [N, 3, h, w] -> (factors [C, 3], bias [3]).
    `border` latent pixels at each edge are left out: there the decoder sees its zero padding."""
    if border:
        raw = raw[..., border:-border, border:-border]
        rgb = rgb[..., border:-border, border:-border]
    x = raw.movedim(1, -1).reshape(-1, raw.shape[1]).double()
    y = rgb.movedim(1, -1).reshape(-1, 3).double()
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    sol = torch.linalg.lstsq(a, y).solution  # [C+1, 3]
    return sol[:-1].float(), sol[-1].float()


def fit_latent_rgb(vae) -> LatentRGBMap:
    """Fit the raw-latent -> RGB map of `vae` (comfy.vae.VAE, image KL or Wan 2.1 video)."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(SEED)
    raw = _sample_raw_latents(vae, g)
    rgb = _decode_pooled(vae, raw)
    factors, bias = fit_from_samples(raw, rgb)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    pred = F.conv2d(raw, factors.t()[:, :, None, None], bias=bias)
    residual = (pred[inner] - rgb[inner]).pow(2).mean().sqrt().item()
    target = rgb[inner]
    baseline = (target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().sqrt().item()
    return LatentRGBMap(factors=factors, bias=bias, latent_channels=int(vae.latent_channels),
                        latent_dimensions=int(vae.latent_dim), residual_rms=residual, baseline_rms=baseline,
                        seconds=time.perf_counter() - start, source=getattr(vae, "name", "<state dict>"))


def maybe_fit_for_vae(vae) -> LatentRGBMap | None:
    """Called by comfy.vae.VAE after loading: fit (once per VAE object) and register the preview map when
    previews are on. A failed fit only costs the preview: it is logged, never raised into the loader."""
    if not previews_enabled():
        return None
    with _lock:
        cached = _by_vae.get(vae)
    if cached is None:
        try:
            cached = fit_latent_rgb(vae)
        except Exception:  # noqa: BLE001 - previews are optional; loading the VAE must still succeed
            logger.warning("latent2rgb preview fit failed for VAE '%s'; previews stay off for its latents",
                           getattr(vae, "name", "<state dict>"), exc_info=True)
            return None
        with _lock:
            _by_vae[vae] = cached
        logger.info("latent2rgb preview map fitted from VAE '%s' (%d channels, %dD) in %.3f s: residual %.4f "
                    "vs mean-colour %.4f (RMS, -1..1)", cached.source, cached.latent_channels,
                    cached.latent_dimensions, cached.seconds, cached.residual_rms, cached.baseline_rms)
    register(cached)
    return cached
