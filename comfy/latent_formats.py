"""Latent spaces of the VAEs: channel count, dimensionality and the scale/shift that maps a VAE latent
into the space the diffusion model was trained on (`process_in`) and back (`process_out`)."""

from __future__ import annotations

import torch


class LatentFormat:
    latent_channels = 4
    latent_dimensions = 2
    scale_factor = 1.0
    shift_factor = 0.0
    # latent -> RGB linear preview map ([channels][R, G, B], applied to the model-space latent the sampler
    # reports) and its bias; None where no published map is known
    latent_rgb_factors: list[list[float]] | None = None
    latent_rgb_factors_bias: list[float] | None = None
    taesd_decoder_name: str | None = None

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


class SD15(LatentFormat):
    scale_factor = 0.18215


class SDXL(LatentFormat):
    scale_factor = 0.13025


class SD3(LatentFormat):
    latent_channels = 16
    scale_factor = 1.5305
    shift_factor = 0.0609
    # No fixed latent2rgb table (the published ones live in other projects' code, which we do not copy):
    # previews use the map comfy/latent_preview_fit.py fits from the VAE the user loads.


class Flux(SD3):
    latent_channels = 16
    scale_factor = 0.3611
    shift_factor = 0.1159
    latent_rgb_factors = None  # no fixed table (see SD3): fitted from the loaded VAE
    latent_rgb_factors_bias = None
    taesd_decoder_name = "taef1_decoder"


class Wan21(LatentFormat):
    """Wan 2.1 VAE: 16 channels, 3-D latents [B, C, T, H, W], per-channel mean/std normalisation."""

    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 1.0
    latent_rgb_factors = None  # no fixed table (see SD3): fitted from the loaded VAE
    # the Wan 2.1 VAE's published per-channel latent statistics
    latents_mean = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

    def _stats(self, latent: torch.Tensor):
        shape = (1, self.latent_channels) + (1,) * (latent.ndim - 2)
        mean = torch.tensor(self.latents_mean, device=latent.device, dtype=latent.dtype).view(shape)
        std = torch.tensor(self.latents_std, device=latent.device, dtype=latent.dtype).view(shape)
        return mean, std

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latent)
        return (latent - mean) * self.scale_factor / std

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latent)
        return latent * std / self.scale_factor + mean


class Wan22(Wan21):
    """Wan 2.2 VAE (TI2V-5B): 48 channels, 16x spatial compression, per-channel mean/std normalisation."""

    latent_channels = 48
    # the Wan 2.2 VAE's published per-channel latent statistics (Wan2.2-TI2V-5B's VAE config)
    latents_mean = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
    latents_std = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                   0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                   0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                   0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                   0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                   0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
