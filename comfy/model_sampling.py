"""Noise parameterisations and sigma tables (ComfyUI's `comfy.model_sampling` interface).

A model's sampling object answers two questions for the samplers:

* the *prediction type* (EPS, V_PREDICTION, X0, CONST): how the network input is scaled from the noisy
  latent (`calculate_input`), how its output becomes a denoised latent (`calculate_denoised`), and how
  noise is mixed into a clean latent before sampling (`noise_scaling` / `inverse_noise_scaling`);
* the *schedule* (ModelSamplingDiscrete, ModelSamplingDiscreteFlow, ModelSamplingFlux): the map between
  sigma and the timestep the network is conditioned on, and a table of `sigmas` the schedulers sample.

ComfyUI combines one of each (`class X(Schedule, PredictionType)`); the flow schedules here already
carry CONST so that `ModelSamplingDiscreteFlow(shift=3.0)` is usable on its own, and `make_model_sampling`
builds any other combination. Formulas follow comfyui-compat.md §7.
"""

from __future__ import annotations

import math

import torch


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Shape a scalar or [B] sigma so it broadcasts over a [B, C, ...] latent."""
    # keep sigma's own dtype (fp32 sigmas against a bf16 latent must not be rounded to bf16)
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim == 0:
        return sigma.reshape((1,) * like.ndim)
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------------
# Prediction types
# ---------------------------------------------------------------------------------------------------

class EPS:
    """The network predicts the noise; latents live in variance-exploding space x = latent + sigma*noise."""

    sigma_data = 1.0

    def calculate_input(self, sigma, noise):
        sigma = _per_sample(sigma, noise)
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _per_sample(sigma, model_output)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = _per_sample(sigma, noise)
        if max_denoise:
            # the first step of a full denoise starts from the VP-normalised noise level
            noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
        else:
            noise = noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _per_sample(sigma, model_output)
        sd2 = self.sigma_data ** 2
        return (model_input * sd2 / (sigma ** 2 + sd2)
                - model_output * sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5)


class X0(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


class CONST:
    """Rectified flow: x = sigma*noise + (1-sigma)*latent; the network predicts the velocity noise - latent."""

    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _per_sample(sigma, model_output)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = _per_sample(sigma, noise)
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        sigma = _per_sample(sigma, latent)
        return latent / (1.0 - sigma)


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------

def _settings(model_config) -> dict:
    return dict(getattr(model_config, "sampling_settings", None) or {})


class _SigmaTable(torch.nn.Module):
    """A schedule held as an ascending `sigmas` buffer (set by each subclass's set_parameters)."""

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class ModelSamplingDiscrete(_SigmaTable, EPS):
    """The 1000-step DDPM schedule of SD1/SDXL-style models (scaled-linear betas by default)."""

    def __init__(self, model_config=None, zsnr=None):
        super().__init__()
        s = _settings(model_config)
        self._register_schedule(beta_schedule=s.get("beta_schedule", "linear"),
                                linear_start=s.get("linear_start", 0.00085),
                                linear_end=s.get("linear_end", 0.012),
                                timesteps=s.get("timesteps", 1000),
                                zsnr=s.get("zsnr", False) if zsnr is None else zsnr)
        self.sigma_data = 1.0

    def _register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                           linear_end=2e-2, zsnr=False):
        if beta_schedule == "linear":  # ComfyUI's name for the "scaled linear" schedule of SD
            betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "sqrt_linear":
            betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
        elif beta_schedule == "cosine":
            s = 8e-3
            t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s
            alphas = torch.cos(t / (1 + s) * math.pi / 2).pow(2)
            alphas = alphas / alphas[0]
            betas = (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"Unknown beta_schedule {beta_schedule!r}: use linear, sqrt_linear or cosine")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zsnr:
            alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if zsnr:
            sigmas[-1] = 4096.0  # an infinite sigma is unusable; ComfyUI uses the same stand-in
        self.num_timesteps = timesteps
        self.set_sigmas(sigmas.float())

    def set_sigmas(self, sigmas):
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        percent = 1.0 - percent
        return self.sigma(torch.tensor(percent * 999.0)).item()


def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023)."""
    a = alphas_cumprod.sqrt()
    a0, at = a[0].clone(), a[-1].clone()
    a = (a - at) * a0 / (a0 - at)
    return a ** 2


def time_snr_shift(alpha: float, t):
    """SD3's resolution shift of the flow time t in [0, 1]."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def flux_time_shift(mu: float, sigma: float, t):
    """Flux's exponential time shift: e^mu / (e^mu + (1/t - 1)^sigma)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class ModelSamplingDiscreteFlow(_SigmaTable, CONST):
    """Rectified-flow schedule of SD3 / Wan / AuraFlow: sigma(t) = shift*t / (1 + (shift-1)*t).

    `timestep = sigma * multiplier` (1000 for SD3 and Wan, 1.0 for AuraFlow-style models).
    Accepts ComfyUI's `model_config` (reads `sampling_settings`) or explicit `shift` / `multiplier`.
    """

    def __init__(self, model_config=None, shift=None, multiplier=None):
        super().__init__()
        if isinstance(model_config, (int, float)):  # ModelSamplingDiscreteFlow(3.0)
            model_config, shift = None, float(model_config)
        s = _settings(model_config)
        self.set_parameters(shift=s.get("shift", 1.0) if shift is None else shift,
                            multiplier=s.get("multiplier", 1000) if multiplier is None else multiplier)

    def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift = shift
        self.multiplier = multiplier
        ts = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)
        self.register_buffer("sigmas", ts)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)


class ModelSamplingFlux(_SigmaTable, CONST):
    """Flux's schedule: sigma(t) = e^mu / (e^mu + (1/t - 1)), a 10 000-entry table, timestep = sigma.

    `shift` is mu (Flux-dev default 1.15; ModelSamplingFlux node computes it from the image size).
    """

    def __init__(self, model_config=None, shift=None):
        super().__init__()
        if isinstance(model_config, (int, float)):
            model_config, shift = None, float(model_config)
        s = _settings(model_config)
        self.set_parameters(shift=s.get("shift", 1.15) if shift is None else shift)

    def set_parameters(self, shift=1.15, timesteps=10000):
        self.shift = shift
        ts = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)
        self.register_buffer("sigmas", ts)

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return flux_time_shift(self.shift, 1.0, timestep)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return flux_time_shift(self.shift, 1.0, 1.0 - percent)


def make_model_sampling(schedule_cls: type, prediction_cls: type, model_config=None, **params):
    """Combine a schedule with a prediction type (as ComfyUI's model_base does) and set parameters.

    `make_model_sampling(ModelSamplingDiscrete, V_PREDICTION)`; `params` go to `set_parameters`.
    """
    cls = type(f"{schedule_cls.__name__}_{prediction_cls.__name__}", (schedule_cls, prediction_cls), {})
    ms = cls(model_config)
    if params:
        ms.set_parameters(**params)
    return ms
