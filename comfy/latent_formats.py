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
    # latent2rgb preview map (rows: latent channels, columns: R, G, B) on the model-space latent, as
    # published by Stability AI in the SD3.5 reference code (github.com/Stability-AI/sd3.5, sd3_impls.py,
    # SD3LatentFormat.decode_latent_to_preview); it has no bias
    latent_rgb_factors = [
        [-0.0645, 0.0177, 0.1052], [0.0028, 0.0312, 0.0650], [0.1848, 0.0762, 0.0360], [0.0944, 0.0360, 0.0889],
        [0.0897, 0.0506, -0.0364], [-0.0020, 0.1203, 0.0284], [0.0855, 0.0118, 0.0283], [-0.0539, 0.0658, 0.1047],
        [-0.0057, 0.0116, 0.0700], [-0.0412, 0.0281, -0.0039], [0.1106, 0.1171, 0.1220], [-0.0248, 0.0682, -0.0481],
        [0.0815, 0.0846, 0.1207], [-0.0120, -0.0055, -0.0867], [-0.0749, -0.0634, -0.0456],
        [-0.1418, -0.1457, -0.1259],
    ]


class Flux(SD3):
    latent_channels = 16
    scale_factor = 0.3611
    shift_factor = 0.1159
    # latent2rgb preview map and bias for the Flux VAE's model-space latent: the published values of
    # ComfyUI's comfy/latent_formats.py (class Flux), also carried by stable-diffusion.cpp's server
    # latent_preview.h; data, not code
    latent_rgb_factors = [
        [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ]
    latent_rgb_factors_bias = [-0.0329, -0.0718, -0.0851]
    taesd_decoder_name = "taef1_decoder"


class Wan21(LatentFormat):
    """Wan 2.1 VAE: 16 channels, 3-D latents [B, C, T, H, W], per-channel mean/std normalisation."""

    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 1.0
    # latent2rgb preview map and bias for the normalised Wan 2.1 latent (previews show the first frame):
    # the published values of ComfyUI's comfy/latent_formats.py (class Wan21); data, not code
    latent_rgb_factors = [
        [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
        [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
        [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
        [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
    ]
    latent_rgb_factors_bias = [-0.1835, -0.0868, -0.3360]
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
