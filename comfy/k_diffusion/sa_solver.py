"""SA-Solver: the stochastic Adams sampler of Xue et al., "SA-Solver: Stochastic Adams Solver for Fast
Sampling of Diffusion Models" (NeurIPS 2023), in data-prediction form on a k-diffusion sigma schedule.

Written from the paper and from the behaviour of ComfyUI's ``sa_solver`` / ``sa_solver_pece`` samplers
(defaults, order rules, noise interval); the maths and code here are our own.

Time is the half-log-SNR lambda = log(alpha / sigma) (VE: alpha = 1; rectified flow: alpha = 1 - sigma).
The family of reverse SDEs with stochasticity tau, solved over one step s -> t with tau held constant, gives

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s
          + alpha_t integral_{lambda_s}^{lambda_t} (1 + tau^2) e^{(1 + tau^2)(lambda - lambda_t)} x0(lambda) dlambda
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi,                           h = lambda_t - lambda_s,

(tau = 0 is the probability-flow ODE, i.e. DPM-Solver++). The Adams idea: replace x0(lambda) by the Lagrange
polynomial through the last few model predictions, so each prediction gets a weight b_j = alpha_t * the
integral of its Lagrange basis polynomial against that exponential kernel. The predictor extrapolates with
past points; the corrector re-does the step just taken, interpolating with the new prediction included and
reusing the predictor's noise draw. ``sample_sa_solver_pece`` evaluates the model again on the corrected
state (predict-evaluate-correct-evaluate), otherwise the prediction at the predicted state stands in for it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import trange

from comfy import model_sampling as ms_mod
from comfy.k_diffusion.deis import gauss_legendre, lagrange_weights
from comfy.k_diffusion.sampling import (
    default_noise_sampler,
    model_sampling_of,
    offset_first_sigma_for_snr,
    sigma_to_half_log_snr,
)

_QUAD_NODES = 48


def exponential_lagrange_integrals(nodes, lambda_s, lambda_t, tau):
    """integral_{lambda_s}^{lambda_t} (1 + tau^2) e^{(1 + tau^2)(lambda - lambda_t)} L_j(lambda) dlambda for the
    Lagrange basis L_j over ``nodes`` (float64 numpy, in the order of ``nodes``). Gauss-Legendre quadrature:
    the integrand is an exponential times a low-degree polynomial, so 48 nodes are exact to rounding."""
    nodes = np.asarray(nodes, dtype=np.float64)
    rate = 1.0 + float(tau) ** 2
    u, w = gauss_legendre(_QUAD_NODES)
    half = 0.5 * (lambda_t - lambda_s)
    lam = lambda_s + half * (u + 1.0)
    kernel = rate * np.exp(rate * (lam - lambda_t))
    return lagrange_weights(nodes, lam) @ (w * kernel) * half


def simple_order2_integrals(nodes, lambda_s, lambda_t, tau, corrector):
    """The paper's cheaper order-2 weights (its implementation appendix): keep the exact total weight
    1 - e^{-(1+tau^2) h} and give the older point only the leading-order share."""
    rate = 1.0 + float(tau) ** 2
    h = lambda_t - lambda_s
    total = -np.expm1(-rate * h)
    if corrector:  # nodes = (lambda_s, lambda_t): trapezoid-like split
        newer = 0.5 * rate * h
        return np.array([total - newer, newer])
    older = 0.5 * rate * h ** 2 / (nodes[0] - lambda_s)  # nodes = (previous, lambda_s): AB2-like split
    return np.array([older, total - older])


def sa_solver_weights(nodes, lambda_s, lambda_t, alpha_t, tau, simple_order_2=False, corrector=False):
    """The b_j of one predictor / corrector step for predictions made at ``nodes`` (oldest first)."""
    nodes = [float(n) for n in nodes]
    if simple_order_2 and len(nodes) == 2:
        integrals = simple_order2_integrals(nodes, float(lambda_s), float(lambda_t), tau, corrector)
    else:
        integrals = exponential_lagrange_integrals(nodes, float(lambda_s), float(lambda_t), tau)
    return float(alpha_t) * integrals


def tau_interval(start_sigma, end_sigma, eta=1.0):
    """Stochasticity eta for start_sigma >= sigma > end_sigma, none elsewhere (ComfyUI's noise window)."""
    start_sigma, end_sigma = float(start_sigma), float(end_sigma)

    def tau(sigma):
        if eta <= 0:
            return 0.0
        sigma = float(sigma)
        return float(eta) if start_sigma >= sigma > end_sigma else 0.0

    return tau


def default_tau_func(model_sampling, eta=1.0, start_percent=0.2, end_percent=0.8):
    return tau_interval(model_sampling.percent_to_sigma(start_percent),
                        model_sampling.percent_to_sigma(end_percent), eta)


def _combine(weights, preds):
    out = preds[0] * float(weights[0])
    for w, p in zip(weights[1:], preds[1:]):
        out = out + p * float(w)
    return out


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None,
                     s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False,
                     simple_order_2=False):
    """Stochastic Adams predictor-corrector (ComfyUI ``sa_solver``).

    tau_func(sigma) -> float gives the stochasticity of the step ending at sigma; by default eta = 1 between
    the model's 20% and 80% sampling percents and 0 (ODE) outside. Noise comes from ``noise_sampler`` or is
    drawn seeded by extra_args["seed"], like the other noise-using samplers.
    """
    if len(sigmas) <= 1:
        return x
    if predictor_order < 1 or corrector_order < 0:
        raise ValueError("predictor_order must be >= 1 and corrector_order >= 0")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    model_sampling = model_sampling_of(model)
    if model_sampling is None:  # a bare callable: treat it as a VE (eps) model on the SD1 schedule
        model_sampling = ms_mod.ModelSamplingDiscrete()
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    lambdas = sigma_to_half_log_snr(sigmas.double(), model_sampling)
    lam = [float(v) for v in lambdas]
    sig = [float(v) for v in sigmas]
    if tau_func is None:
        tau_func = default_tau_func(model_sampling)

    def alpha(k):  # alpha = sigma e^lambda for either parameterisation
        return float(sigmas[k].double() * lambdas[k].exp())

    keep = max(predictor_order, corrector_order)
    n = len(sigmas) - 1
    ends_at_zero = sig[-1] == 0
    x_pred = x
    tau, h, noise = 0.0, 0.0, None
    preds = []  # model predictions at sigmas[.. i], oldest first
    for i in trange(n, disable=disable):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_pred, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        preds = (preds + [denoised])[-keep:]

        p_order = min(predictor_order, len(preds))
        # no correction on the first step (nothing to correct) nor, without PECE, on the final jump to 0
        c_order = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if ends_at_zero:  # taper the orders towards the end, as ComfyUI does, for stability
            p_order = min(p_order, n - 1 - i)
            c_order = min(c_order, n - i)

        if c_order == 0:
            x = x_pred
        else:
            # redo the step lambda_{i-1} -> lambda_i with the new prediction among the interpolation points
            b = sa_solver_weights(lam[i - c_order + 1:i + 1], lam[i - 1], lam[i], alpha(i), tau,
                                  simple_order_2, corrector=True)
            x = (sig[i] / sig[i - 1]) * np.exp(-tau ** 2 * h) * x + _combine(b, preds[-c_order:])
            if noise is not None:
                x = x + noise  # the same Brownian increment the predictor used
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                preds[-1] = denoised

        if sig[i + 1] == 0:
            x = denoised
            continue
        tau = float(tau_func(sigmas[i + 1]))
        h = lam[i + 1] - lam[i]
        b = sa_solver_weights(lam[i - p_order + 1:i + 1], lam[i], lam[i + 1], alpha(i + 1), tau,
                              simple_order_2, corrector=False)
        x_pred = (sig[i + 1] / sig[i]) * np.exp(-tau ** 2 * h) * x + _combine(b, preds[-p_order:])
        noise = None
        if tau > 0 and s_noise > 0:
            scale = sig[i + 1] * np.sqrt(-np.expm1(-2.0 * tau ** 2 * h)) * s_noise
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * float(scale)
            x_pred = x_pred + noise
    return x


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None,
                          s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4,
                          simple_order_2=False):
    """SA-Solver in PECE mode (ComfyUI ``sa_solver_pece``): one extra model call per step, on the corrected state."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func=tau_func, s_noise=s_noise,
                            noise_sampler=noise_sampler, predictor_order=predictor_order,
                            corrector_order=corrector_order, use_pece=True, simple_order_2=simple_order_2)
