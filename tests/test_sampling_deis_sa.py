"""DEIS and SA-Solver (comfy/k_diffusion/deis.py, sa_solver.py) on tiny fake models with exact denoisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import comfy.sample
import comfy.samplers
from comfy import model_sampling as ms
from comfy.k_diffusion import deis, sa_solver
from comfy.k_diffusion import sampling as ks
from tests.sampling_fakes import conditioning, const_x0_fn, gaussian_fn, make_patcher

SHAPE = (2, 4, 3, 3)


def _model_sampling(flow):
    return ms.ModelSamplingDiscreteFlow(shift=3.0) if flow else ms.ModelSamplingDiscrete()


def _sigmas(model_sampling, flow, steps):
    return comfy.samplers.calculate_sigmas(model_sampling, "simple" if flow else "karras", steps)


def _sample(patcher, fn, sigmas, seed=3, latent=None, shape=SHAPE, **options):
    """Run a sampler function through the real KSAMPLER / CFGGuider path; returns (out, noised start)."""
    latent = torch.zeros(shape) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    model_sampling = patcher.get_model_object("model_sampling")
    x_start = model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=True)
    sampler = comfy.samplers.KSAMPLER(fn, extra_options=options)
    out = comfy.samplers.sample(patcher, noise, conditioning(1), conditioning(1), 1.0, "cpu", sampler, sigmas,
                                latent_image=latent, disable_pbar=True, seed=seed)
    return out, x_start


def _x0_table(v):
    return torch.full((4, 3, 3), v) + torch.arange(9.0).reshape(1, 3, 3) / 10


# ------------------------------------------------------------------------------------------------ DEIS


def _dsigma_dt(t):
    beta_d, beta_min = deis.vp_schedule_constants()
    expo = 0.5 * beta_d * t ** 2 + beta_min * t
    return (beta_d * t + beta_min) * math.exp(expo) / (2.0 * math.sqrt(math.expm1(expo)))


def _lagrange(nodes, j, t):
    out = 1.0
    for k, node in enumerate(nodes):
        if k != j:
            out *= (t - node) / (nodes[j] - node)
    return out


def test_deis_coefficients_match_quadrature():
    sigmas = ks.get_sigmas_karras(8, 0.0292, 14.6).double()
    beta_d, beta_min = deis.vp_schedule_constants()
    # the VP time map hits its pinning points
    assert deis.vp_time_of_sigma(0.002) == pytest.approx(1e-3, rel=1e-9)
    assert deis.vp_time_of_sigma(80.0) == pytest.approx(1.0, rel=1e-9)
    assert deis.sigma_of_vp_time(deis.vp_time_of_sigma(3.7)) == pytest.approx(3.7, rel=1e-9)
    for i in range(1, 7):
        for order in range(2, min(4, i + 1) + 1):
            # "tab": integrate in VP time with the Jacobian dsigma/dt, an independent route to the same weights
            tab = deis.deis_step_coefficients(sigmas, i, order, "tab")
            ts = deis.vp_time_of_sigma(sigmas.numpy())
            nodes = [ts[i - k] for k in range(order)]
            ref = [integrate.quad(lambda t, j=j, nodes=nodes: _lagrange(nodes, j, t) * _dsigma_dt(t), ts[i], ts[i + 1],
                                  epsabs=1e-13, epsrel=1e-12)[0] for j in range(order)]
            np.testing.assert_allclose(tab, ref, rtol=1e-8, atol=1e-10)
            # "rhoab": the Lagrange polynomial in sigma integrates exactly via numpy's polynomial tools
            rho = deis.deis_step_coefficients(sigmas, i, order, "rhoab")
            s_nodes = [float(sigmas[i - k]) for k in range(order)]
            for j in range(order):
                basis = np.polyfit(s_nodes, np.eye(order)[j], order - 1)
                prim = np.polyint(basis)
                exact = np.polyval(prim, float(sigmas[i + 1])) - np.polyval(prim, float(sigmas[i]))
                assert rho[j] == pytest.approx(exact, rel=1e-9, abs=1e-12)
            # both reproduce constants: weights sum to the sigma step
            assert sum(tab) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=1e-10)
            assert sum(rho) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=1e-10)
    table = deis.deis_coefficient_table(sigmas, max_order=3)
    assert [len(c) for c in table] == [1, 2, 3, 3, 3, 3, 3, 1]  # ramp-up, Euler into sigma = 0
    with pytest.raises(ValueError):
        deis.deis_step_coefficients(sigmas, 1, 3)
    with pytest.raises(ValueError):
        deis.deis_step_coefficients(sigmas, 2, 2, "nope")


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_deis_order_one_is_the_euler_ddim_step(flow):
    model_sampling = _model_sampling(flow)
    fn, _ = gaussian_fn(model_sampling)
    patcher = make_patcher(model_sampling, fn)
    sigmas = _sigmas(model_sampling, flow, 6)
    euler, _ = _sample(patcher, ks.sample_euler, sigmas)
    for mode in deis.DEIS_MODES:
        out, _ = _sample(patcher, deis.sample_deis, sigmas, max_order=1, deis_mode=mode)
        torch.testing.assert_close(out, euler, rtol=1e-6, atol=1e-6)
    # a single step (no history yet) is the Euler step whatever max_order says
    one, _ = _sample(patcher, deis.sample_deis, sigmas[:2])
    torch.testing.assert_close(one, _sample(patcher, ks.sample_euler, sigmas[:2])[0], rtol=1e-6, atol=1e-6)


def _error_vs_exact(patcher, exact_end, func, sigmas, **opts):
    """(sample, largest |sample - exact ODE solution from the same start|) for one sampler run."""
    out, x_start = _sample(patcher, func, sigmas, **opts)
    expected = exact_end(x_start.double(), float(sigmas[0])).float()
    return out, float((out - expected).abs().max())


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_deis_follows_the_exact_ode(flow):
    model_sampling = _model_sampling(flow)
    fn, exact_end = gaussian_fn(model_sampling)
    patcher = make_patcher(model_sampling, fn)
    sigmas = _sigmas(model_sampling, flow, 12)
    errors = {}
    for name, func, opts in [("euler", ks.sample_euler, {}), ("tab1", deis.sample_deis, {"max_order": 1}),
                             ("tab", deis.sample_deis, {}), ("rhoab", deis.sample_deis, {"deis_mode": "rhoab"}),
                             ("tab4", deis.sample_deis, {"max_order": 4})]:
        errors[name] = _error_vs_exact(patcher, exact_end, func, sigmas, **opts)[1]
    for name in ["tab", "rhoab", "tab4"]:
        assert errors[name] < 0.5 * errors["euler"], errors
    assert errors["tab"] < 0.35 * errors["euler"], errors
    # a point distribution (constant x0) makes the ODE linear: it must land exactly
    patcher = make_patcher(model_sampling, const_x0_fn(_x0_table))
    for mode in deis.DEIS_MODES:
        out, _ = _sample(patcher, deis.sample_deis, _sigmas(model_sampling, flow, 5), deis_mode=mode)
        torch.testing.assert_close(out, _x0_table(1.0).expand(SHAPE), atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------- SA-Solver


def test_sa_solver_weights_match_quadrature():
    lam_nodes = [-1.3, -0.6, 0.2]
    lambda_s, lambda_t = 0.2, 0.9
    for tau in [0.0, 0.7, 1.0]:
        rate = 1 + tau ** 2
        for count in [1, 2, 3]:
            nodes = lam_nodes[-count:]
            got = sa_solver.exponential_lagrange_integrals(nodes, lambda_s, lambda_t, tau)
            ref = [integrate.quad(lambda v, j=j, nodes=nodes, rate=rate:
                                  rate * math.exp(rate * (v - lambda_t)) * _lagrange(nodes, j, v),
                                  lambda_s, lambda_t, epsabs=1e-14, epsrel=1e-13)[0] for j in range(count)]
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
            # weights sum to the order-1 (exponential Euler) weight 1 - e^{-(1+tau^2) h}
            assert got.sum() == pytest.approx(-math.expm1(-rate * (lambda_t - lambda_s)), rel=1e-12)
        # the simplified order-2 split keeps the total and agrees with the exact one to O(h^2)
        for corrector, nodes, s, t in [(False, [-0.6, 0.2], 0.2, 0.9), (True, [0.2, 0.9], 0.2, 0.9)]:
            simple = sa_solver.simple_order2_integrals(nodes, s, t, tau, corrector)
            exact = sa_solver.exponential_lagrange_integrals(nodes, s, t, tau)
            assert simple.sum() == pytest.approx(exact.sum(), rel=1e-12)
            np.testing.assert_allclose(simple, exact, atol=0.1 * rate ** 2)
    # tau window: eta inside (start, end], zero outside and everywhere when eta = 0
    tau = sa_solver.tau_interval(5.0, 1.0, eta=0.8)
    assert [tau(s) for s in [6.0, 5.0, 2.0, 1.0, 0.5]] == [0.0, 0.8, 0.8, 0.0, 0.0]
    assert sa_solver.tau_interval(5.0, 1.0, eta=0.0)(2.0) == 0.0


def _no_tau(sigma):
    return 0.0


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_sa_solver_ode_mode_is_deterministic_and_exact(flow):
    model_sampling = _model_sampling(flow)
    fn, exact_end = gaussian_fn(model_sampling)
    patcher = make_patcher(model_sampling, fn)
    sigmas = _sigmas(model_sampling, flow, 20)
    errors = {}
    for name, func, opts in [("euler", ks.sample_euler, {}), ("dpmpp_2m", ks.sample_dpmpp_2m, {}),
                             ("sa", sa_solver.sample_sa_solver, {"tau_func": _no_tau}),
                             ("sa_pece", sa_solver.sample_sa_solver_pece, {"tau_func": _no_tau})]:
        out, errors[name] = _error_vs_exact(patcher, exact_end, func, sigmas, **opts)
        if name.startswith("sa"):
            # tau = 0 draws no noise: the seed only enters through the shared initial noise
            calls = []

            def spy_noise(s, s_next, calls=calls):
                calls.append(1)
                return torch.zeros(SHAPE)

            again, _ = _sample(patcher, func, sigmas, noise_sampler=spy_noise, **opts)
            torch.testing.assert_close(again, out, rtol=0, atol=0)
            assert calls == []
    assert errors["sa"] < 0.5 * errors["euler"], errors
    assert errors["sa_pece"] < 0.5 * errors["euler"], errors
    if not flow:  # (our dpmpp_2m steps in -log(sigma) even for flow models, so compare on eps only)
        assert errors["sa"] < errors["dpmpp_2m"], errors
    # order 1 with tau = 0 is the DDIM / exponential-Euler step, i.e. Euler on the k-diffusion ODE
    sa1, _ = _sample(patcher, sa_solver.sample_sa_solver, sigmas, tau_func=_no_tau, predictor_order=1,
                     corrector_order=0)
    euler, _ = _sample(patcher, ks.sample_euler, sigmas)
    # (flow: SA-Solver evaluates its first step at sigma 1 - 1e-4, Euler at 1)
    torch.testing.assert_close(sa1, euler, rtol=1e-3 if flow else 1e-5, atol=1e-3 if flow else 1e-5)


@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_seeding_and_gaussian_statistics(name):
    func = getattr(sa_solver, f"sample_{name}")
    model_sampling = ms.ModelSamplingDiscrete()
    mu, s = 0.5, 0.8
    fn, _ = gaussian_fn(model_sampling, mu=mu, s=s)
    patcher = make_patcher(model_sampling, fn)
    sigmas = _sigmas(model_sampling, False, 10)
    a, _ = _sample(patcher, func, sigmas, seed=5)
    b, _ = _sample(patcher, func, sigmas, seed=5)
    c, _ = _sample(patcher, func, sigmas, seed=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # tau > 0 changes the result (the default window is active for some steps) ...
    ode, _ = _sample(patcher, func, sigmas, seed=5, tau_func=_no_tau)
    assert not torch.allclose(a, ode, atol=1e-3)
    # ... but the samples still come from N(mu, s^2): check the moments on a big batch, eta = 0.7 throughout.
    # The SDE noise here is independent of the initial noise (the seeded default re-uses the seed, so its
    # first draw equals the initial noise, as in ComfyUI: that correlation would bias the spread).
    big = (8, 4, 16, 16)
    gen = torch.Generator().manual_seed(1234)
    out, _ = _sample(patcher, func, _sigmas(model_sampling, False, 40), seed=9, shape=big,
                     tau_func=sa_solver.tau_interval(1e9, 0.0, eta=0.7),
                     noise_sampler=lambda sig, sig_next: torch.randn(big, generator=gen))
    assert float(out.mean()) == pytest.approx(mu, abs=0.04)
    assert float(out.std()) == pytest.approx(s, rel=0.05)


def test_sa_solver_model_calls_and_noise_window():
    model_sampling = ms.ModelSamplingDiscreteFlow(shift=3.0)
    fn, _ = gaussian_fn(model_sampling)
    patcher = make_patcher(model_sampling, fn)
    sigmas = _sigmas(model_sampling, True, 8)
    n = len(sigmas) - 1
    _sample(patcher, sa_solver.sample_sa_solver, sigmas)
    assert len(patcher.model.calls) == n
    first = float(patcher.model.calls[0]["sigma"][0])
    assert 0.99 < first < 1.0  # flow sigma 1 is offset to a finite half-log-SNR, as ComfyUI does
    patcher.model.calls.clear()
    _sample(patcher, sa_solver.sample_sa_solver_pece, sigmas)
    assert len(patcher.model.calls) == 1 + 2 * (n - 1)  # every step but the first re-evaluates its correction
    # default noise only inside the model's 20%..80% sigma window; the noise sampler sees (sigma, sigma_next)
    seen = []

    def noise_sampler(sig, sig_next):
        seen.append((float(sig), float(sig_next)))
        return torch.zeros(SHAPE)

    _sample(patcher, sa_solver.sample_sa_solver, sigmas, noise_sampler=noise_sampler)
    hi, lo = model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8)
    expected = [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(n)
                if sigmas[i + 1] > 0 and hi >= float(sigmas[i + 1]) > lo]
    assert len(seen) == len(expected) > 0
    flat = [v for pair in seen for v in pair]
    assert flat[2:] == pytest.approx([v for pair in expected for v in pair][2:])
