"""Latent spaces of the VAEs: channel count, dimensionality and the scale/shift that maps a VAE latent
into the space the diffusion model was trained on (`process_in`) and back (`process_out`)."""

from __future__ import annotations

import torch


class LatentFormat:
    latent_channels = 4
    latent_dimensions = 2
    scale_factor = 1.0
    shift_factor = 0.0
    # latent -> RGB linear preview map; None where no fitted map ships with this build
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


class Flux(SD3):
    latent_channels = 16
    scale_factor = 0.3611
    shift_factor = 0.1159
    taesd_decoder_name = "taef1_decoder"
