"""DEIS: the multistep exponential integrator of Zhang & Chen, "Fast Sampling of Diffusion Models with
Exponential Integrator" (ICLR 2023), on a k-diffusion sigma schedule.

Written from the paper and from the behaviour of ComfyUI's ``deis`` sampler (defaults, step-order rules);
the maths and code here are our own.

On a k-diffusion schedule the probability-flow ODE reads dx/dsigma = d(sigma), with d = (x - x0_hat) / sigma
(the eps prediction for VE models, the velocity for rectified flow; both obey this same equation). For a VE
latent the linear part of the exponential integrator is the identity, so one step is the exact integral

    x_{i+1} = x_i + integral_{sigma_i}^{sigma_{i+1}} d(sigma) dsigma,

with d replaced by the Lagrange polynomial through the last ``order`` derivatives. Where that polynomial
lives is the DEIS variant:

* ``"tab"`` (t-AB): the polynomial is in VP time t, the time of the VP-SDE whose noise levels map onto
  EDM's range (sigma_min 0.002 at t = 1e-3, sigma_max 80 at t = 1), so the weights are
  integral L_j(t(sigma)) dsigma. ComfyUI evaluates this integral as a Riemann sum over t; we integrate in
  sigma with Gauss-Legendre nodes, which is exact to float64 for these smooth integrands.
* ``"rhoab"`` (rho-AB): the polynomial is in sigma (= rho, the paper's scaled time) itself, so the weights
  are integrals of polynomials, also exact under Gauss-Legendre.

The first steps have no history, so the order ramps up: min(max_order, step + 1); the last step down to
sigma = 0 is always a plain Euler step.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from tqdm.auto import trange

from comfy.k_diffusion.sampling import _cb, to_d

DEIS_MODES = ("tab", "rhoab")

# the VP-SDE that DEIS's "tab" time lives in: chosen so that t(0.002) = 1e-3 and t(80) = 1
_VP_T_EPS = 1e-3
_VP_SIGMA_MIN = 0.002
_VP_SIGMA_MAX = 80.0
_QUAD_NODES = 64


def vp_schedule_constants(t_eps=_VP_T_EPS, sigma_min=_VP_SIGMA_MIN, sigma_max=_VP_SIGMA_MAX):
    """(beta_d, beta_min) of the linear-beta VP-SDE with log(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t,
    pinned by sigma(t_eps) = sigma_min and sigma(1) = sigma_max."""
    big = math.log1p(sigma_max ** 2)
    small = math.log1p(sigma_min ** 2)
    # two linear equations: beta_d/2 + beta_min = big, beta_d t_eps^2/2 + beta_min t_eps = small
    beta_d = 2.0 * (small / t_eps - big) / (t_eps - 1.0)
    beta_min = big - beta_d / 2.0
    return beta_d, beta_min


def vp_time_of_sigma(sigma):
    """VP time t for a VE sigma (numpy / float): the positive root of beta_d t^2 / 2 + beta_min t = log(1+s^2)."""
    beta_d, beta_min = vp_schedule_constants()
    sigma = np.asarray(sigma, dtype=np.float64)
    return (np.sqrt(beta_min ** 2 + 2.0 * beta_d * np.log1p(sigma ** 2)) - beta_min) / beta_d


def sigma_of_vp_time(t):
    beta_d, beta_min = vp_schedule_constants()
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


@lru_cache(maxsize=8)
def gauss_legendre(n):
    """Nodes and weights of n-point Gauss-Legendre quadrature on [-1, 1] (shared with SA-Solver)."""
    return np.polynomial.legendre.leggauss(n)


def lagrange_weights(nodes, points):
    """Values of every Lagrange basis polynomial over ``nodes`` at ``points``: array (len(nodes), len(points))."""
    nodes = np.asarray(nodes, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    out = np.ones((len(nodes), len(points)))
    for j, node_j in enumerate(nodes):
        for k, node_k in enumerate(nodes):
            if k != j:
                out[j] *= (points - node_k) / (node_j - node_k)
    return out


def deis_step_coefficients(sigmas, i, order, deis_mode="tab"):
    """Weights c_0..c_{order-1} of step i (sigma_i -> sigma_{i+1}); c_k multiplies the derivative taken at
    sigma_{i-k}, so x_{i+1} = x_i + sum_k c_k d_{i-k}. They always sum to sigma_{i+1} - sigma_i."""
    if deis_mode not in DEIS_MODES:
        raise ValueError(f"deis_mode must be one of {DEIS_MODES}, got {deis_mode!r}")
    if order > i + 1:
        raise ValueError(f"step {i} has only {i + 1} derivatives to use, asked for order {order}")
    sig = np.asarray(torch.as_tensor(sigmas).detach().double().cpu(), dtype=np.float64)
    lo, hi = sig[i], sig[i + 1]
    if order == 1:
        return np.array([hi - lo])
    # Gauss-Legendre nodes mapped onto [sigma_i, sigma_{i+1}] (the signed interval length keeps the direction)
    u, w = gauss_legendre(_QUAD_NODES)
    half = 0.5 * (hi - lo)
    quad_sigma = lo + half * (u + 1.0)
    history = sig[[i - k for k in range(order)]]
    if deis_mode == "tab":
        quad_time, history_time = vp_time_of_sigma(quad_sigma), vp_time_of_sigma(history)
    else:
        quad_time, history_time = quad_sigma, history
    return lagrange_weights(history_time, quad_time) @ w * half


def deis_coefficient_table(sigmas, max_order=3, deis_mode="tab"):
    """Per-step weights as ``sample_deis`` uses them (order ramping up, Euler on the step to sigma 0)."""
    table = []
    for i in range(len(sigmas) - 1):
        order = 1 if float(sigmas[i + 1]) <= 0 else min(max_order, i + 1)
        table.append(deis_step_coefficients(sigmas, i, order, deis_mode))
    return table


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode="tab"):
    """DEIS multistep sampler (ComfyUI ``deis``): up to ``max_order`` past derivatives, "tab" or "rhoab"."""
    if max_order < 1:
        raise ValueError(f"max_order must be at least 1, got {max_order}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    table = deis_coefficient_table(sigmas, max_order, deis_mode)
    past = []  # derivatives of earlier steps, newest last (at most max_order - 1 kept)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        weights = table[i]
        step = d * float(weights[0])
        for k in range(1, len(weights)):
            step = step + past[-k] * float(weights[k])
        x = x + step
        past = (past + [d])[-(max_order - 1):] if max_order > 1 else []
    return x
