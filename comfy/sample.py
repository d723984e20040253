"""Node-level sampling entry points (ComfyUI's `comfy.sample`): seeded initial noise and `sample(...)`.

Initial noise is drawn exactly as ComfyUI draws it, so a seed gives the same image here as there:
`torch.manual_seed(seed)` (the global CPU generator) and one `torch.randn` over the latent's shape in
its dtype on the CPU; with `batch_index` the noise is drawn one sample at a time up to the largest index
and each latent takes the draw of its index.
"""

from __future__ import annotations

import numpy as np
import torch

import comfy.model_management
import comfy.samplers


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    if noise_inds is None:
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                           generator=generator, device="cpu")
    unique_inds, inverse = np.unique(noise_inds, return_inverse=True)
    noises = []
    for i in range(int(unique_inds[-1]) + 1):
        noise = torch.randn([1] + list(latent_image.size())[1:], dtype=latent_image.dtype,
                            layout=latent_image.layout, generator=generator, device="cpu")
        if i in unique_inds:
            noises.append(noise)
    noises = [noises[i] for i in np.asarray(inverse).reshape(-1)]
    return torch.cat(noises, dim=0)


def fix_empty_latent_channels(model, latent_image):
    """An empty (all-zero) latent made for another model family gets this model's channel count / rank."""
    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_channels != latent_image.shape[1] and torch.count_nonzero(latent_image) == 0:
        shape = list(latent_image.shape)
        shape[1] = latent_format.latent_channels
        latent_image = torch.zeros(shape, dtype=latent_image.dtype, device=latent_image.device)
    if getattr(latent_format, "latent_dimensions", 2) == 3 and latent_image.ndim == 4:
        latent_image = latent_image.unsqueeze(2)
    return latent_image


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
           sigmas=None, callback=None, disable_pbar=False, seed=None):
    sampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                      scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    samples = sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent_image,
                             start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                             denoise_mask=noise_mask, sigmas=sigmas, callback=callback,
                             disable_pbar=disable_pbar, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=None,
                  callback=None, disable_pbar=False, seed=None):
    samples = comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                                    model_options=model.model_options, latent_image=latent_image,
                                    denoise_mask=noise_mask, callback=callback, disable_pbar=disable_pbar,
                                    seed=seed)
    return samples.to(comfy.model_management.intermediate_device())
