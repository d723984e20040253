"""Sampler step loops and their noise sources (`sample_<name>`, as ComfyUI's KSAMPLER looks them up).

Every sampler has the k-diffusion signature `sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)`: `model(x, sigma[B], **extra_args)` returns the denoised latent, `x` starts
already noised to `sigmas[0]`, and `callback({"x", "i", "sigma", "sigma_hat", "denoised"})` runs once
per step. The formulas follow the published methods (Karras et al. 2022; DPM-Solver++, Lu et al. 2022;
LCM; iPNDM) with ComfyUI's conventions, which matter for bit-compatible results:

* per-step noise of ancestral samplers comes from `torch.Generator(device=x.device)` seeded with the
  node's seed (`extra_args["seed"]`); SDE samplers use a Brownian tree seeded the same way, on the CPU
  (`_gpu` variants build it on x's device);
* for rectified-flow models (CONST) the ancestral samplers switch to their RF forms, and the SDE samplers
  work in half-log-SNR of the flow parameterisation.

On a GPU, a Python `if` on a device tensor (`if sigmas[i + 1] == 0:`) makes the host wait until the device
has finished all queued work, which exposes the host's per-step overhead. The step loops therefore take
their decisions from a CPU copy of the schedule made once per run (`_host_copy`), and the latent's
arithmetic keeps using `sigmas` as given, so the results are the same bits either way.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torchsde
from scipy import integrate
from tqdm.auto import tqdm, trange

from comfy import model_sampling as ms_mod
from comfy.k_diffusion.utils import append_dims, append_zero

# ---------------------------------------------------------------------------------------------------
# Sigma schedules that need only (n, sigma_min, sigma_max)
# ---------------------------------------------------------------------------------------------------


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu"):
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    if isinstance(sigma_to, torch.Tensor) and isinstance(sigma_up, torch.Tensor):
        # min(sigma_to, sigma_up) without reading device values back: the same pick (sigma_to unless
        # sigma_up is smaller), made on the device
        sigma_up = torch.where(sigma_up < sigma_to, sigma_up, sigma_to)
    else:
        sigma_up = min(sigma_to, sigma_up)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _host_copy(sigmas):
    """The schedule on the CPU, copied once per run, for the step loop's Python decisions.

    Comparing a device tensor in an `if` would make every step wait for the device. Decisions on derived
    values (an ancestral step's sigma_down) apply the same float32 operations to this copy as the device
    applies to `sigmas` (+, -, *, / and square roots, correctly rounded on both), so each branch goes the
    way the device values would send it.
    """
    return sigmas.detach().cpu()


def default_noise_sampler(x, seed=None):
    """Fresh Gaussian noise per call; seeded generator on x's device, so results depend on the device."""
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    else:
        generator = None
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def _seeded_noise(x, extra_args, noise_sampler):
    """The caller's noise sampler, or one seeded from the sampling seed (ComfyUI's extra_args["seed"])."""
    return default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler


def _prepare(x, extra_args, noise_sampler=None, noise=True):
    """What every step loop starts with: (extra_args or {}, the noise sampler or None, a ones [B] to
    broadcast sigma over the batch)."""
    extra_args = {} if extra_args is None else extra_args
    return extra_args, _seeded_noise(x, extra_args, noise_sampler) if noise else None, x.new_ones([x.shape[0]])


class BatchedBrownianTree:
    """A torchsde Brownian tree (one per seed) that answers W(t1) - W(t0) for any interval."""

    def __init__(self, x, t0, t1, seed=None, cpu=True):
        self.cpu_tree = cpu
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, (tuple, list))
        if seed is None:
            seeds = [torch.randint(0, 2 ** 63 - 1, []).item()]
        elif self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"{len(seed)} seeds given for a batch of {x.shape[0]}; pass one seed per sample")
            seeds = list(seed)
            w0 = w0[0]
        else:
            seeds = [seed]
        if self.cpu_tree:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        if self.cpu_tree:
            w = torch.stack([tree(t0.cpu().float(), t1.cpu().float()).to(t0.dtype).to(t0.device)
                             for tree in self.trees])
        else:
            w = torch.stack([tree(t0, t1) for tree in self.trees])
        w = w * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """Noise for SDE samplers: normalised Brownian increments, so the same seed gives the same path
    whatever the step sizes (a finer schedule refines rather than redraws the noise)."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x, cpu=False):
        self.transform = transform
        t0 = self.transform(torch.as_tensor(sigma_min))
        t1 = self.transform(torch.as_tensor(sigma_max))
        self.tree = BatchedBrownianTree(x, t0, t1, seed, cpu=cpu)

    def __call__(self, sigma, sigma_next):
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


def model_sampling_of(model):
    """The model_sampling object behind the wrapped model a sampler receives (None for a bare callable)."""
    inner = getattr(model, "inner_model", None)
    patcher = getattr(inner, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        return patcher.get_model_object("model_sampling")
    base = getattr(inner, "inner_model", None)
    return getattr(base, "model_sampling", None)


def _is_flow(model) -> bool:
    return isinstance(model_sampling_of(model), ms_mod.CONST)


def sigma_to_half_log_snr(sigma, model_sampling):
    """lambda = log(alpha / sigma): -log(sigma) for VE models, -logit(sigma) for rectified flow."""
    if isinstance(model_sampling, ms_mod.CONST):
        return sigma.logit().neg()
    return sigma.log().neg()


def half_log_snr_to_sigma(half_log_snr, model_sampling):
    if isinstance(model_sampling, ms_mod.CONST):
        return half_log_snr.neg().sigmoid()
    return half_log_snr.neg().exp()


def offset_first_sigma_for_snr(sigmas, model_sampling, percent_offset=1e-4):
    """Flow sigma 1.0 has infinite negative log-SNR; start just below it instead."""
    if len(sigmas) <= 1:
        return sigmas
    if isinstance(model_sampling, ms_mod.CONST) and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = model_sampling.percent_to_sigma(percent_offset)
    return sigmas


def _churn(host_sigmas, i, s_churn, s_tmin, s_tmax):
    """Karras' gamma for step i; `host_sigmas` (see `_host_copy`) is only read when s_churn > 0."""
    if s_churn > 0 and s_tmin <= host_sigmas[i] <= s_tmax:
        return min(s_churn / (len(host_sigmas) - 1), 2 ** 0.5 - 1)
    return 0.0


def _churn_host_copy(sigmas, s_churn):
    return _host_copy(sigmas) if s_churn > 0 else None  # without churn no step compares a sigma


def _churned_step_start(model, x, sigmas, i, s_in, extra_args, callback, s_churn, s_tmin, s_tmax, s_noise,
                        host_sigmas):
    """Start of a Karras-style step: optionally raise sigma to sigma_hat with fresh noise ("churn"), then
    denoise there. Returns (x, sigma_hat, denoised, d = dx/dsigma) and reports the step to `callback`."""
    gamma = _churn(host_sigmas, i, s_churn, s_tmin, s_tmax)
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        eps = torch.randn_like(x) * s_noise
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    denoised = model(x, sigma_hat * s_in, **extra_args)
    d = to_d(x, sigma_hat, denoised)
    _cb(callback, x, i, sigmas[i], sigma_hat, denoised)
    return x, sigma_hat, denoised, d


def _rf_ancestral(sigma, sigma_next, eta):
    """RF ancestral split: the deterministic target sigma_down, and the re-noise scale and alpha ratio."""
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1 = 1 - sigma_next
    alpha_down = 1 - sigma_down
    renoise_coeff = (sigma_next ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
    return sigma_down, alpha_ip1 / alpha_down, renoise_coeff


def _cb(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    hs = _churn_host_copy(sigmas, s_churn)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, denoised, d = _churned_step_start(model, x, sigmas, i, s_in, extra_args, callback,
                                                        s_churn, s_tmin, s_tmax, s_noise, hs)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None):
    if _is_flow(model):
        return sample_euler_ancestral_RF(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                         noise_sampler)
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if get_ancestral_step(hs[i], hs[i + 1], eta=eta)[0] == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    """Ancestral Euler for rectified flow: step to sigma_down along the straight path, then re-noise."""
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if hs[i + 1] == 0:
            x = denoised
        else:
            sigma_down, alpha_ratio, renoise_coeff = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, denoised, d = _churned_step_start(model, x, sigmas, i, s_in, extra_args, callback,
                                                        s_churn, s_tmin, s_tmax, s_noise, hs)
        dt = sigmas[i + 1] - sigma_hat
        if hs[i + 1] == 0:
            x = x + d * dt  # the corrector would evaluate the model at sigma 0
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, denoised, d = _churned_step_start(model, x, sigmas, i, s_in, extra_args, callback,
                                                        s_churn, s_tmin, s_tmax, s_noise, hs)
        if hs[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None):
    if _is_flow(model):
        return sample_dpm_2_ancestral_RF(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                         noise_sampler)
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if get_ancestral_step(hs[i], hs[i + 1], eta=eta)[0] == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpm_2_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ratio, renoise_coeff = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if _rf_ancestral(hs[i], hs[i + 1], eta)[0] == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def linear_multistep_coeff(order, t, i, j):
    """Integral over [t_i, t_i+1] of the j-th Lagrange basis polynomial through the last `order` sigmas."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    if _is_flow(model):
        return sample_dpmpp_2s_ancestral_RF(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                            noise_sampler)
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if get_ancestral_step(hs[i], hs[i + 1], eta=eta)[0] == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if hs[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                 s_noise=1.0, noise_sampler=None):
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)

    def sigma_fn(lbda):
        return (lbda.exp() + 1) ** -1

    def lambda_fn(sigma):
        return ((1 - sigma) / sigma).log()

    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ratio, renoise_coeff = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if hs[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            if hs[i] == 1.0:
                sigma_s = 0.9999  # lambda(1.0) is -inf
            else:
                t_i, t_down = lambda_fn(sigmas[i]), lambda_fn(sigma_down)
                sigma_s = sigma_fn(t_i + 0.5 * (t_down - t_i))
            ratio_s = sigma_s / sigmas[i]
            u = ratio_s * x + (1 - ratio_s) * denoised
            d_i = model(u, sigma_s * s_in, **extra_args)
            ratio_down = sigma_down / sigmas[i]
            x = ratio_down * x + (1 - ratio_down) * d_i
            if eta > 0:
                x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def _brownian(x, sigmas, extra_args, cpu):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=extra_args.get("seed"), cpu=cpu)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++(2S) SDE in half-log-SNR (so VE and rectified-flow models share one update)."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=True) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    model_sampling = model_sampling_of(model)
    sigma_fn = partial(half_log_snr_to_sigma, model_sampling=model_sampling)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = sigma_fn(lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # step 1: to the intermediate point
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)

        # step 2: the full step with the blended data prediction
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                         noise_sampler=None, r=1 / 2):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=False) if noise_sampler is None else noise_sampler
    return sample_dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or hs[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE in half-log-SNR."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=True) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    model_sampling = model_sampling_of(model)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    old_denoised = None
    h, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * h * eta).expm1().neg().sqrt() * s_noise)
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                            s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=False) if noise_sampler is None else noise_sampler
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                               solver_type)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                             s_noise=1.0, noise_sampler=None, solver_type="heun"):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                               solver_type)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                 s_noise=1.0, noise_sampler=None, solver_type="heun"):
    return sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                   noise_sampler, solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE in half-log-SNR."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=True) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    model_sampling = model_sampling_of(model)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                x = x + (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * h * eta).expm1().neg().sqrt() * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                            s_noise=1.0, noise_sampler=None):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args, cpu=False) if noise_sampler is None else noise_sampler
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


def _ddpm_step(x, sigma, sigma_prev, noise, noise_sampler, renoise):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
    if renoise:  # sigma_prev > 0
        mu = mu + ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(
            sigma, sigma_prev)
    return mu


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Ancestral DDPM posterior sampling, done in VP space (x / sqrt(1 + sigma^2))."""
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                       (x - denoised) / sigmas[i], noise_sampler, renoise=bool(hs[i + 1] > 0))
        if hs[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Consistency sampling: jump to the prediction, re-noise it to the next sigma with the model's scaling."""
    extra_args, noise_sampler, s_in = _prepare(x, extra_args, noise_sampler)
    model_sampling = model_sampling_of(model)
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if hs[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            if model_sampling is not None:
                x = model_sampling.noise_scaling(sigmas[i + 1], noise, x)
            else:
                x = x + noise * sigmas[i + 1]
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Improved PNDM: Adams-Bashforth on dx/dsigma with up to 4 past derivatives."""
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    x_next = x
    buffer_model = []
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        _cb(callback, x_cur, i, sigmas[i], sigmas[i], denoised)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        dt = t_next - t_cur
        if order == 1:
            x_next = x_cur + dt * d_cur
        elif order == 2:
            x_next = x_cur + dt * (3 * d_cur - buffer_model[-1]) / 2
        elif order == 3:
            x_next = x_cur + dt * (23 * d_cur - 16 * buffer_model[-1] + 5 * buffer_model[-2]) / 12
        else:
            x_next = x_cur + dt * (55 * d_cur - 59 * buffer_model[-1] + 37 * buffer_model[-2]
                                   - 9 * buffer_model[-3]) / 24
        if len(buffer_model) == max_order - 1:
            buffer_model = buffer_model[1:] + [d_cur]
        else:
            buffer_model.append(d_cur)
    return x_next


# ---------------------------------------------------------------------------------------------------
# CFG++ support: the step uses the unconditional prediction for its direction term
# ---------------------------------------------------------------------------------------------------


class _UncondTap:
    """Installs a post-CFG hook on `extra_args["model_options"]` that remembers the latest unconditional
    prediction (`.latest`) and leaves the guided result unchanged. The cfg==1 shortcut is switched off so
    the unconditional branch is always evaluated, as ComfyUI's CFG++ samplers do."""

    def __init__(self, extra_args):
        from comfy.model_patcher import set_model_options_post_cfg_function

        self.latest = None
        options = dict(extra_args.get("model_options") or {})
        extra_args["model_options"] = set_model_options_post_cfg_function(options, self._record,
                                                                          disable_cfg1_optimization=True)

    def _record(self, args):
        self.latest = args["uncond_denoised"]
        return args["denoised"]


def _noise_scale(model_sampling):
    return getattr(model_sampling, "noise_scale", 1.0) if model_sampling is not None else 1.0


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                  s_noise=1.0, noise_sampler=None):
    """Ancestral Euler, CFG++ form: data term from the guided prediction, noise direction from the
    unconditional one. Works in the model's own (alpha, sigma) so VE and rectified flow share it."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    model_sampling = model_sampling_of(model)
    s_noise = s_noise * _noise_scale(model_sampling)
    tap = _UncondTap(extra_args)
    s_in = x.new_ones([x.shape[0]])
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _cb(callback, x, i, sigma, sigma, denoised)
        if hs[i + 1] == 0:
            x = denoised
            continue
        # alpha = sigma * exp(lambda): 1 for VE models, 1 - sigma for rectified flow
        alpha_now = sigma * sigma_to_half_log_snr(sigma, model_sampling).exp()
        alpha_next = sigma_next * sigma_to_half_log_snr(sigma_next, model_sampling).exp()
        noise_dir = (x - alpha_now * tap.latest) / sigma
        # split the step in the VE space of sigma / alpha, then map the deterministic part back
        down, up = get_ancestral_step(sigma / alpha_now, sigma_next / alpha_next, eta=eta)
        x = alpha_next * denoised + (alpha_next * down) * noise_dir
        if eta > 0 and s_noise > 0:
            x = x + alpha_next * noise_sampler(sigma, sigma_next) * s_noise * up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler, CFG++ form (the ancestral CFG++ step with no fresh noise)."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=extra_args, callback=callback,
                                         disable=disable, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                     s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) ancestral, CFG++ form: the solver runs on the unconditional predictions and the
    guidance difference (guided - unconditional at the step start) is added back after each step."""
    if _is_flow(model):
        return sample_dpmpp_2s_ancestral_RF_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                                   noise_sampler)
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    s_noise = s_noise * _noise_scale(model_sampling_of(model))
    tap = _UncondTap(extra_args)
    s_in = x.new_ones([x.shape[0]])
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        uncond = tap.latest
        guidance = denoised - uncond
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta=eta)
        _cb(callback, x, i, sigma, sigma, denoised)
        if get_ancestral_step(hs[i], hs[i + 1], eta=eta)[0] == 0:
            x = x + to_d(x, sigma, uncond) * (sigma_down - sigma)
        else:
            # in lambda = -log(sigma): midpoint evaluation, then the full exponential step
            h = sigma.log() - sigma_down.log()
            sigma_mid = sigma * (-0.5 * h).exp()
            x_mid = (sigma_mid / sigma) * x - (-0.5 * h).expm1() * uncond
            model(x_mid, sigma_mid * s_in, **extra_args)  # only its unconditional part is used
            x = (sigma_down / sigma) * x - (-h).expm1() * tap.latest
        if hs[i + 1] > 0:
            x = x + noise_sampler(sigma, sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance  # VE: alpha = 1
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_RF_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                        s_noise=1.0, noise_sampler=None):
    """The rectified-flow form of dpmpp_2s_ancestral_cfg_pp (guidance added back scaled by alpha = 1 - sigma)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    s_noise = s_noise * _noise_scale(model_sampling_of(model))
    tap = _UncondTap(extra_args)
    s_in = x.new_ones([x.shape[0]])

    def flow_lambda(sig):
        return ((1 - sig) / sig).log()

    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        uncond = tap.latest
        guidance = denoised - uncond
        sigma_down, alpha_ratio, renoise_coeff = _rf_ancestral(sigma, sigma_next, eta)
        _cb(callback, x, i, sigma, sigma, denoised)
        if hs[i + 1] == 0:
            x = x + to_d(x, sigma, uncond) * (sigma_down - sigma)
        else:
            if hs[i] == 1.0:
                sigma_mid = sigma.new_full((), 0.9999)  # lambda(1) = -inf; filled on the device, not copied
            else:
                lam, lam_down = flow_lambda(sigma), flow_lambda(sigma_down)
                sigma_mid = torch.sigmoid(-(lam + 0.5 * (lam_down - lam)))
            ratio_mid = sigma_mid / sigma
            model(ratio_mid * x + (1 - ratio_mid) * uncond, sigma_mid * s_in, **extra_args)
            ratio_down = sigma_down / sigma
            x = ratio_down * x + (1 - ratio_down) * tap.latest
        if hs[i + 1] > 0 and eta > 0:
            x = alpha_ratio * x + noise_sampler(sigma, sigma_next) * s_noise * renoise_coeff
        x = x + (1 - sigma_next) * guidance
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), CFG++ form: exp(-h) x + the guided prediction - exp(-h) * uncond, with the
    second-order correction built from the previous unconditional prediction."""
    extra_args = {} if extra_args is None else extra_args
    tap = _UncondTap(extra_args)
    s_in = x.new_ones([x.shape[0]])
    prev_uncond = None
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        uncond = tap.latest
        h = sigmas[i].log() - sigmas[i + 1].log()  # lambda step; inf on the final step to sigma 0
        decay = torch.exp(-h)
        if prev_uncond is None or hs[i + 1] == 0:
            correction = 0.0
        else:
            h_prev = sigmas[i - 1].log() - sigmas[i].log()
            correction = -torch.expm1(-h) * (h / (2 * h_prev)) * (denoised - prev_uncond)
        x = denoised - decay * uncond + correction + decay * x
        prev_uncond = uncond
    return x


# ---------------------------------------------------------------------------------------------------
# RES multistep (exponential integrator, Zhang et al. 2023 "Refined exponential solver")
# ---------------------------------------------------------------------------------------------------


def _phi1(z):
    return torch.expm1(z) / z


def _phi2(z):
    return (_phi1(z) - 1.0) / z


@torch.no_grad()
def _res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                   noise_sampler=None, eta=1.0, cfg_pp=False):
    """Second-order RES multistep in lambda = -log(sigma). The first step (and the last one, to sigma 0)
    is Euler; afterwards x <- exp(-h) x + h (b1 D_i + b2 D_{i-1}) with phi-function weights."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    s_noise = s_noise * _noise_scale(model_sampling_of(model))
    tap = _UncondTap(extra_args) if cfg_pp else None
    s_in = x.new_ones([x.shape[0]])
    prev_x0, prev_sigma_down = None, None
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta=eta)
        _cb(callback, x, i, sigma, sigma, denoised)
        x0 = tap.latest if cfg_pp else denoised  # the prediction the solver integrates
        if get_ancestral_step(hs[i], hs[i + 1], eta=eta)[0] == 0 or prev_x0 is None:
            if cfg_pp:
                x = denoised + to_d(x, sigma, x0) * sigma_down
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            lam = -sigma.log()
            h = -sigma_down.log() - lam
            # relative position of the previous evaluation: (lambda_{i-1} - lambda of the last sigma_down) / h
            c2 = (-sigmas[i - 1].log() + prev_sigma_down.log()) / h
            p1, p2 = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(p1 - p2 / c2, nan=0.0)
            b2 = torch.nan_to_num(p2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - x0)
            x = torch.exp(-h) * x + h * (b1 * x0 + b2 * prev_x0)
        if hs[i + 1] > 0:
            x = x + noise_sampler(sigma, sigmas[i + 1]) * s_noise * sigma_up
        prev_x0, prev_sigma_down = x0, sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0,
                          cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                                noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0,
                          cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                          cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                          eta=1.0, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                          cfg_pp=True)


# ---------------------------------------------------------------------------------------------------
# Gradient estimation (Permenter & Yuan, "Interpreting and improving diffusion models from an
# optimization perspective"): Euler plus (gamma - 1) times the change of the direction
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0,
                               cfg_pp=False):
    extra_args = {} if extra_args is None else extra_args
    tap = _UncondTap(extra_args) if cfg_pp else None
    s_in = x.new_ones([x.shape[0]])
    prev_d = None
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = to_d(x, sigma, tap.latest if cfg_pp else denoised)
        _cb(callback, x, i, sigma, sigma, denoised)
        dt = sigma_next - sigma
        if hs[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if prev_d is not None:
                x = x + (ge_gamma - 1) * (d - prev_d) * dt
        prev_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                      ge_gamma=2.0):
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma=ge_gamma,
                                      cfg_pp=True)


# ---------------------------------------------------------------------------------------------------
# Heun++ (two or three evaluations per step, weighted by sigma) and variable-step iPNDM
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                   s_tmax=float("inf"), s_noise=1.0):
    """Heun++: the slope is a sigma-weighted blend of the derivatives at the current point and one or two
    Euler look-aheads (weights sigma_j / (k * sigma_0)); the last step is plain Euler."""
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    hs = _host_copy(sigmas)
    last = hs[-1]
    for i in trange(len(sigmas) - 1, disable=disable):
        gamma = _churn(hs, i, s_churn, s_tmin, s_tmax)
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + torch.randn_like(x) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _cb(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if hs[i + 1] == last:
            x = x + d * dt
            continue
        x_a = x + d * dt
        d_a = to_d(x_a, sigmas[i + 1], model(x_a, sigmas[i + 1] * s_in, **extra_args))
        if hs[i + 2] == last:
            w_a = sigmas[i + 1] / (2 * sigmas[0])
            slope = (1 - w_a) * d + w_a * d_a
        else:
            x_b = x_a + d_a * (sigmas[i + 2] - sigmas[i + 1])
            d_b = to_d(x_b, sigmas[i + 2], model(x_b, sigmas[i + 2] * s_in, **extra_args))
            w_a = sigmas[i + 1] / (3 * sigmas[0])
            w_b = sigmas[i + 2] / (3 * sigmas[0])
            slope = (1 - w_a - w_b) * d + w_a * d_a + w_b * d_b
        x = x + slope * dt
    return x


def _ipndm_v_weights(t_next, nodes):
    """Weights of the variable-step multistep update over [nodes[0], t_next]; `nodes` are the sigmas of
    the current and past derivatives, newest first.

    Orders 1-2 are the exact variable-step Adams-Bashforth weights. Orders 3-4 follow the closed forms
    ComfyUI's ipndm_v uses (from zju-pi/diff-sampler), on purpose, so results match ComfyUI: order 3 is
    exact for linear slopes and equals AB3 at equal spacing; order 4 at equal spacing gives
    (57, -65, 43, -11) / 24 rather than AB4's (55, -59, 37, -9) / 24."""
    h = t_next - nodes[0]
    k = len(nodes)
    if k == 1:
        return [1.0]
    h1 = nodes[0] - nodes[1]
    r = h / h1
    if k == 2:
        return [1 + r / 2, -r / 2]
    h2 = nodes[1] - nodes[2]
    t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if k == 3:
        return [1 + r / 2 + t1, -r / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = nodes[2] - nodes[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
          * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return [1 + r / 2 + t1 + t2,
            -r / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2]


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable step sizes: Adams-Bashforth on dx/dsigma whose weights follow the actual
    sigma spacing (equal spacing gives ipndm's constant 3/2, 23/12, 55/24 weights)."""
    extra_args, _, s_in = _prepare(x, extra_args, noise=False)
    history = []  # past derivatives, newest first
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _cb(callback, x, i, sigma, sigma, denoised)
        d = (x - denoised) / sigma
        if hs[i + 1] == 0:
            x = denoised
        else:
            order = min(max_order, i + 1)
            nodes = [sigmas[i - j] for j in range(order)]
            weights = _ipndm_v_weights(sigma_next, nodes)
            slope = sum(w * g for w, g in zip(weights, [d] + history[:order - 1]))
            x = x + (sigma_next - sigma) * slope
        history = ([d] + history)[:max(max_order - 1, 1)]
    return x


# ---------------------------------------------------------------------------------------------------
# ER-SDE (Cui et al. 2023) and SEEDS (Gonzalez et al. 2023), in the half-log-SNR of the model
# ---------------------------------------------------------------------------------------------------


def _h_phi1(z):
    """z * phi_1(z) = e^z - 1."""
    return torch.expm1(z)


def _h_phi2(z):
    """z * phi_2(z) = (e^z - 1 - z) / z."""
    return (torch.expm1(z) - z) / z


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, noise_scaler=None, max_stage=3):
    """Extended reverse-time SDE solver (VP ER-SDE-Solver-3) in the variable r = sigma / alpha.

    The noise scale function defaults to f(r) = r (exp(r^0.3) + 10); stage 2 and 3 corrections use the
    integrals of 1 / f and (r - r_s) / f, done with a 200-point Riemann sum as in the reference."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    model_sampling = model_sampling_of(model)
    s_noise = s_noise * _noise_scale(model_sampling)
    s_in = x.new_ones([x.shape[0]])

    def default_scaler(r):
        return r * ((r ** 0.3).exp() + 10.0)

    scaler = default_scaler if noise_scaler is None else noise_scaler
    n_points = 200.0
    point_idx = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    ratios = sigma_to_half_log_snr(sigmas, model_sampling).neg().exp()  # sigma / alpha
    prev_x0, prev_slope = None, None
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if hs[i + 1] == 0:
            x = denoised
        else:
            r_s, r_t = ratios[i], ratios[i + 1]
            alpha_s, alpha_t = sigmas[i] / r_s, sigmas[i + 1] / r_t
            fr = scaler(r_t) / scaler(r_s)
            x = (alpha_t / alpha_s) * fr * x + alpha_t * (1 - fr) * denoised
            if stage >= 2:
                dr = r_t - r_s
                step = -dr / n_points
                grid = r_t + point_idx * step
                f_grid = scaler(grid)
                int_inv = torch.sum(1 / f_grid) * step
                slope = (denoised - prev_x0) / (r_s - ratios[i - 1])
                x = x + alpha_t * (dr + int_inv * scaler(r_t)) * slope
                if stage >= 3:
                    int_lin = torch.sum((grid - r_s) / f_grid) * step
                    curvature = (slope - prev_slope) / ((r_s - ratios[i - 2]) / 2)
                    x = x + alpha_t * (dr ** 2 / 2 + int_lin * scaler(r_t)) * curvature
                prev_slope = slope
            if s_noise > 0:
                spread = (r_t ** 2 - r_s ** 2 * fr ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * spread
        prev_x0 = denoised
    return x


def _snr_tools(model):
    model_sampling = model_sampling_of(model)
    return (model_sampling, partial(half_log_snr_to_sigma, model_sampling=model_sampling),
            partial(sigma_to_half_log_snr, model_sampling=model_sampling))


def _seeds_solver(model, x, sigmas, extra_args, callback, disable, noise_sampler, eta, s_noise, stages):
    """The loop shared by the SEEDS solvers (stochastic exponential Runge-Kutta in data prediction).

    `stages(h_eta)` lists the step's stages as (r, weights): a stage sits at fraction r of the
    half-log-SNR step (the last one at r = 1, landing on the next sigma) and combines the denoised
    predictions taken so far with `weights` (None skips one). The noise of successive stages is
    correlated so that together it is the exact SDE noise over the whole step.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    model_sampling, sigma_fn, lambda_fn = _snr_tools(model)
    s_noise = s_noise * _noise_scale(model_sampling)
    noisy = eta > 0 and s_noise > 0
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    s_in = x.new_ones([x.shape[0]])
    hs = _host_copy(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = [model(x, sigma * s_in, **extra_args)]
        _cb(callback, x, i, sigma, sigma, denoised[0])
        if hs[i + 1] == 0:
            x = denoised[0]
            continue
        lam_s, lam_t = lambda_fn(sigma), lambda_fn(sigma_next)
        h = lam_t - lam_s
        plan = stages(h * (eta + 1))
        w, r_prev, sigma_prev = 0.0, 0.0, sigma
        for n, (r, weights) in enumerate(plan):
            last = n == len(plan) - 1
            lam_r = lam_t if last else torch.lerp(lam_s, lam_t, r)
            sigma_r = sigma_next if last else sigma_fn(lam_r)
            mix = sum(c * d for c, d in zip(weights, denoised) if c is not None)
            x_r = sigma_r / sigma * (-r * h * eta).exp() * x - sigma_r * lam_r.exp() * mix
            if noisy:
                decay = (r_prev - r) * h * eta
                w = w * decay.exp() + decay.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_prev, sigma_r)
                x_r = x_r + w * sigma_r * s_noise
            if last:
                x = x_r
            else:
                denoised.append(model(x_r, sigma_r * s_in, **extra_args))
            r_prev, sigma_prev = r, sigma_r
    return x


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    """SEEDS-2: two-stage stochastic exponential solver in data prediction (one extra stage at r)."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")

    def stages(h_eta):
        if solver_type == "phi_1":  # the final step uses the blend of both predictions at weight 1/(2r)
            phi = _h_phi1(-h_eta)
            final = [phi * (1 - 1 / (2 * r)), phi / (2 * r)]
        else:
            c_mid = _h_phi2(-h_eta) / r
            final = [_h_phi1(-h_eta) - c_mid, c_mid]
        return [(r, [_h_phi1(-r * h_eta)]), (1.0, final)]

    return _seeds_solver(model, x, sigmas, extra_args, callback, disable, noise_sampler, eta, s_noise, stages)


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: three-stage stochastic exponential solver in data prediction (stages at r_1 and r_2)."""

    def stages(h_eta):
        c_1 = r_2 / r_1 * _h_phi2(-r_2 * h_eta)
        b_2 = _h_phi2(-h_eta) / r_2
        return [(r_1, [_h_phi1(-r_1 * h_eta)]),
                (r_2, [_h_phi1(-r_2 * h_eta) - c_1, c_1]),
                (1.0, [_h_phi1(-h_eta) - b_2, None, b_2])]

    return _seeds_solver(model, x, sigmas, extra_args, callback, disable, noise_sampler, eta, s_noise, stages)


# ---------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022): noise prediction, time t = -log(sigma); fixed-step "fast" schedule and
# the adaptive (embedded pair + PID step control) variant. Like ComfyUI (which wraps k-diffusion's),
# these run from sigma_max down to the schedule's smallest nonzero sigma.
# ---------------------------------------------------------------------------------------------------


class PIDStepSizeController:
    """Step-size controller for the adaptive solver: h <- h * limiter(prod of inverse errors^b_k)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.exponents = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.eps = eps
        self.history = []  # inverse errors: current, previous accepted, the one before

    @staticmethod
    def limiter(factor):
        return 1 + math.atan(factor - 1)

    def propose_step(self, error):
        inv = 1 / (float(error) + self.eps)
        if not self.history:
            self.history = [inv, inv, inv]
        self.history[0] = inv
        factor = 1.0
        for value, power in zip(self.history, self.exponents):
            factor *= value ** power
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.history[2], self.history[1] = self.history[1], self.history[0]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver-1/2/3 single steps on eps = (x - D(x, sigma)) / sigma, with a per-step cache so the
    embedded lower/higher-order pair of the adaptive solver share their evaluations."""

    def __init__(self, model, extra_args=None, eps_callback=None, info_callback=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    @staticmethod
    def t(sigma):
        return -sigma.log()

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = self.sigma(t)
            cache[key] = (x - self.model(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)) / sigma
            if self.eps_callback is not None:
                self.eps_callback()
        return cache[key]

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t), cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        e0 = self.eps(cache, "eps", x, t)
        t1 = t + r1 * h
        u1 = x - self.sigma(t1) * (r1 * h).expm1() * e0
        e1 = self.eps(cache, "eps_r1", u1, t1)
        sig_n = self.sigma(t_next)
        return x - sig_n * h.expm1() * e0 - sig_n / (2 * r1) * h.expm1() * (e1 - e0), cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        e0 = self.eps(cache, "eps", x, t)
        t1, t2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(t1) * (r1 * h).expm1() * e0
        e1 = self.eps(cache, "eps_r1", u1, t1)
        u2 = (x - self.sigma(t2) * (r2 * h).expm1() * e0
              - self.sigma(t2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e1 - e0))
        e2 = self.eps(cache, "eps_r2", u2, t2)
        sig_n = self.sigma(t_next)
        return x - sig_n * h.expm1() * e0 - sig_n / r2 * (h.expm1() / h - 1) * (e2 - e0), cache

    def _ancestral_target(self, t, t_next, t_end, eta):
        """With eta > 0: the deterministic target time and the noise to add at t_next."""
        if not eta:
            return t_next, 0.0
        sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_down = torch.minimum(t_end, self.t(sd))
        return t_down, (self.sigma(t_next) ** 2 - self.sigma(t_down) ** 2) ** 0.5

    def _step(self, order, x, t, t_next, cache, low_r1=False):
        if order == 1:
            return self.dpm_solver_1_step(x, t, t_next, eps_cache=cache)[0]
        if order == 2:
            return self.dpm_solver_2_step(x, t, t_next, r1=1 / 3 if low_r1 else 1 / 2, eps_cache=cache)[0]
        return self.dpm_solver_3_step(x, t, t_next, eps_cache=cache)[0]

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise_sampler=None):
        """Spend exactly `nfe` evaluations: equal steps in t, third order except a final 1-2 order tail."""
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        n_steps = nfe // 3 + 1
        ts = torch.linspace(t_start, t_end, n_steps + 1, device=x.device)
        orders = [3] * (n_steps - 2) + [2, 1] if nfe % 3 == 0 else [3] * (n_steps - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache = {}
            t, t_next = ts[i], ts[i + 1]
            t_target, noise_amount = self._ancestral_target(t, t_next, t_end, eta)
            e0 = self.eps(cache, "eps", x, t)
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": x - self.sigma(t) * e0})
            x = self._step(order, x, t, t_target, cache)
            x = x + noise_amount * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                            icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
        """Embedded pair (1 in 2, or 2 with r1=1/3 in 3); the scaled difference drives the PID controller."""
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        if order not in {2, 3}:
            raise ValueError("order should be 2 or 3")
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        h_init = abs(h_init) * (1 if forward else -1)
        atol, rtol = torch.tensor(atol), torch.tensor(rtol)
        s = t_start
        x_prev = x
        pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}

        def not_done(s):
            return s < t_end - 1e-5 if forward else s > t_end + 1e-5

        while not_done(s):
            cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_target, noise_amount = self._ancestral_target(s, t, t_end, eta)
            e0 = self.eps(cache, "eps", x, s)
            denoised = x - self.sigma(s) * e0
            x_low = self._step(order - 1, x, s, t_target, cache, low_r1=True)
            x_high = self._step(order, x, s, t_target, cache)
            scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high + noise_amount * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised,
                                    "error": error, "h": pid.h, **info})
        return x, info


def _dpm_solver_for(model, extra_args, callback, pbar):
    solver = DPMSolver(model, extra_args, eps_callback=pbar.update)
    if callback is not None:
        solver.info_callback = lambda info: callback({"sigma": solver.sigma(info["t"]),
                                                      "sigma_hat": solver.sigma(info["t_up"]), **info})
    return solver


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast with `n` model evaluations from sigma_max to sigma_min (k-diffusion signature;
    comfy.samplers adapts a sigma schedule to it)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    with tqdm(total=n, disable=disable) as pbar:
        solver = _dpm_solver_for(model, extra_args, callback, pbar)
        return solver.dpm_solver_fast(x, solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min)),
                                      n, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12 / 23 with adaptive steps from sigma_max to sigma_min (k-diffusion signature)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _seeded_noise(x, extra_args, noise_sampler)
    with tqdm(disable=disable) as pbar:
        solver = _dpm_solver_for(model, extra_args, callback, pbar)
        x, info = solver.dpm_solver_adaptive(x, solver.t(torch.as_tensor(sigma_max)),
                                             solver.t(torch.as_tensor(sigma_min)), order, rtol, atol, h_init,
                                             pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise, noise_sampler)
    return (x, info) if return_info else x
