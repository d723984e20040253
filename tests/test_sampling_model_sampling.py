"""comfy.model_sampling against the closed-form formulas of comfyui-compat.md §7."""

from __future__ import annotations

import math

import pytest
import torch

from comfy import model_sampling as ms


def test_discrete_flow_table_and_timestep():
    m = ms.ModelSamplingDiscreteFlow(shift=3.0)
    assert m.sigmas.shape == (1000,)
    t = torch.arange(1, 1001) / 1000
    expected = 3.0 * t / (1 + 2.0 * t)
    torch.testing.assert_close(m.sigmas, expected)
    assert float(m.sigma_max) == pytest.approx(1.0)
    sig = torch.tensor([0.25, 0.8])
    torch.testing.assert_close(m.timestep(sig), sig * 1000)
    # sigma(timestep(s)) is the identity only at shift 1; with shift it applies the shift to t
    torch.testing.assert_close(m.sigma(torch.tensor(500.0)), torch.tensor(0.75))
    assert m.percent_to_sigma(0.0) == 1.0 and m.percent_to_sigma(1.0) == 0.0
    assert m.percent_to_sigma(0.5) == pytest.approx(0.75)


def test_positional_shift_and_model_config():
    class Cfg:
        sampling_settings = {"shift": 8.0, "multiplier": 1000}

    assert ms.ModelSamplingDiscreteFlow(Cfg()).shift == 8.0
    assert ms.ModelSamplingDiscreteFlow(3.0).shift == 3.0


def test_auraflow_multiplier_one():
    m = ms.ModelSamplingDiscreteFlow(shift=1.73, multiplier=1.0)
    sig = torch.tensor([0.5])
    torch.testing.assert_close(m.timestep(sig), sig)
    t = torch.arange(1, 1001) / 1000
    torch.testing.assert_close(m.sigmas, 1.73 * t / (1 + 0.73 * t))


def test_flux_table_and_mu():
    m = ms.ModelSamplingFlux(shift=1.15)
    assert m.sigmas.shape == (10000,)
    t = 0.3
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / t - 1))
    assert float(m.sigma(torch.tensor(t))) == pytest.approx(expected, rel=1e-6)
    assert float(m.sigma_max) == pytest.approx(1.0)
    sig = torch.tensor([0.4])
    torch.testing.assert_close(m.timestep(sig), sig)
    assert m.percent_to_sigma(0.25) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + (1 / 0.75 - 1)))


def test_const_noise_scaling_round_trip():
    m = ms.ModelSamplingFlux()
    latent = torch.randn(2, 4, 3, 3)
    noise = torch.randn_like(latent)
    sigma = torch.tensor([0.2, 0.9])
    x = m.noise_scaling(sigma, noise, latent)
    torch.testing.assert_close(x, sigma.view(2, 1, 1, 1) * noise + (1 - sigma.view(2, 1, 1, 1)) * latent)
    # the model predicts velocity v = noise - latent; calculate_denoised must recover the latent
    v = noise - latent
    torch.testing.assert_close(m.calculate_denoised(sigma, v, x), latent)
    assert m.calculate_input(sigma, x) is x
    torch.testing.assert_close(m.inverse_noise_scaling(torch.tensor(0.5), latent), latent * 2)


def test_discrete_eps_schedule():
    m = ms.ModelSamplingDiscrete()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(m.sigmas, (((1 - ac) / ac) ** 0.5).float())
    # timestep(sigma) is the nearest table index and sigma() interpolates in log space
    assert int(m.timestep(m.sigmas[500:501])) == 500
    mid = float(m.sigma(torch.tensor(500.5)))
    assert mid == pytest.approx(math.exp((math.log(m.sigmas[500]) + math.log(m.sigmas[501])) / 2), rel=1e-5)
    x = torch.randn(1, 4, 2, 2)
    noise = torch.randn_like(x)
    s = torch.tensor([2.0])
    torch.testing.assert_close(m.noise_scaling(s, noise, x), x + 2.0 * noise)
    torch.testing.assert_close(m.noise_scaling(s, noise, x, max_denoise=True), x + 5 ** 0.5 * noise)
    torch.testing.assert_close(m.calculate_input(s, x), x / 5 ** 0.5)


def test_v_prediction_combination():
    v = ms.make_model_sampling(ms.ModelSamplingDiscrete, ms.V_PREDICTION)
    assert isinstance(v, ms.V_PREDICTION)
    x0 = torch.randn(1, 4, 2, 2)
    eps = torch.randn_like(x0)
    s = torch.tensor([1.5])
    x = x0 + s * eps  # VE space
    alpha, sig_vp = 1 / (1 + s ** 2) ** 0.5, s / (1 + s ** 2) ** 0.5
    v_target = alpha * eps - sig_vp * x0  # v of the VP-normalised latent
    torch.testing.assert_close(v.calculate_denoised(s, v_target, x), x0, atol=1e-5, rtol=1e-5)
