"""Tiny stand-ins that follow the ModelPatcher / BaseModel contract (docs/internals.md) for sampler tests.

`GaussianDenoiser` is the exact denoiser of a per-element Gaussian data distribution N(mu, s^2), so the
probability-flow ODE has a closed-form end point: samplers can be checked against it.
"""

from __future__ import annotations

import torch

from comfy import model_sampling as ms


class FakeLatentFormat:
    latent_channels = 4
    latent_dimensions = 2
    scale_factor = 1.0
    shift_factor = 0.0
    latent_rgb_factors = [[0.3, 0.2, 0.1], [0.1, 0.3, 0.2], [0.2, 0.1, 0.3], [0.0, 0.0, 0.1]]
    latent_rgb_factors_bias = [0.0, 0.1, 0.0]

    def process_in(self, x):
        return (x - self.shift_factor) * self.scale_factor

    def process_out(self, x):
        return x / self.scale_factor + self.shift_factor


class FakeBaseModel(torch.nn.Module):
    """apply_model returns `denoise_fn(x, sigma, c_crossattn)`; every call is recorded."""

    def __init__(self, model_sampling, denoise_fn):
        super().__init__()
        self.model_sampling = model_sampling
        self.latent_format = FakeLatentFormat()
        self.denoise_fn = denoise_fn
        self.calls = []

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        self.calls.append({"batch": x.shape[0], "sigma": t.clone(), "x": x.clone(),
                           "cond_or_uncond": list((transformer_options or {}).get("cond_or_uncond", []))})
        return self.denoise_fn(x, t, c_crossattn)

    def extra_conds(self, **kwargs):
        return {"c_crossattn": kwargs["cross_attn"]}

    def process_latent_in(self, x):
        return self.latent_format.process_in(x)

    def process_latent_out(self, x):
        return self.latent_format.process_out(x)


class FakePatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.load_device = torch.device("cpu")
        self.offload_device = torch.device("cpu")
        self.object_patches = {}

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def patch_model(self, device_to=None, **kwargs):
        for k, v in self.object_patches.items():
            setattr(self.model, k, v)
        return self.model

    def unpatch_model(self, *args, **kwargs):
        pass

    def clone(self):
        c = FakePatcher(self.model)
        c.model_options = {"transformer_options": dict(self.model_options["transformer_options"])}
        c.object_patches = dict(self.object_patches)
        return c


def const_x0_fn(x0_of_cond):
    """Denoiser that returns a fixed latent chosen by the conditioning's first value."""
    def fn(x, sigma, c):
        return torch.stack([x0_of_cond(float(ci.flatten()[0])).expand(x.shape[1:]) for ci in c])
    return fn


def gaussian_fn(model_sampling, mu=0.5, s=0.8):
    """Exact E[x0 | x_sigma] for x0 ~ N(mu, s^2) elementwise, for EPS (VE) or CONST (flow) models."""
    flow = isinstance(model_sampling, ms.CONST)

    def fn(x, sigma, c):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        x = x.to(torch.float64)
        a = (1 - sig) if flow else torch.ones_like(sig)  # x = a*x0 + sig*noise
        var = a ** 2 * s ** 2 + sig ** 2
        return (mu + a * s ** 2 / var * (x - a * mu)).float()

    def exact_end(x_start, sigma_start):
        a = (1 - sigma_start) if flow else 1.0
        return mu + s * (x_start - a * mu) / (a ** 2 * s ** 2 + sigma_start ** 2) ** 0.5

    return fn, exact_end


def make_patcher(model_sampling, denoise_fn):
    return FakePatcher(FakeBaseModel(model_sampling, denoise_fn))


def conditioning(value, tokens=3, dim=4):
    return [[torch.full((1, tokens, dim), float(value)), {}]]
