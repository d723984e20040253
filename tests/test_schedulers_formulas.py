"""Schedulers against their closed forms (comfyui-compat.md §7), including denoise < 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import comfy.samplers as cs
from comfy import model_sampling as ms
from tests.sampling_fakes import make_patcher


def test_scheduler_names():
    assert cs.SCHEDULER_NAMES == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                  "normal", "linear_quadratic", "kl_optimal"]


def test_simple_on_flow_is_shifted_linear():
    m = ms.ModelSamplingDiscreteFlow(shift=3.0)
    s = cs.calculate_sigmas(m, "simple", 10)
    t = 1 - torch.arange(10) / 10
    torch.testing.assert_close(s, torch.cat([3 * t / (1 + 2 * t), torch.zeros(1)]))


def test_simple_indexing_rule_on_discrete():
    m = ms.ModelSamplingDiscrete()
    s = cs.calculate_sigmas(m, "simple", 7)
    expected = [float(m.sigmas[-(1 + int(i * 1000 / 7))]) for i in range(7)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expected))


def test_karras_and_exponential():
    m = ms.ModelSamplingDiscrete()
    lo, hi = float(m.sigma_min), float(m.sigma_max)
    k = cs.calculate_sigmas(m, "karras", 5)
    ramp = torch.linspace(0, 1, 5)
    exp_k = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    torch.testing.assert_close(k, torch.cat([exp_k, torch.zeros(1)]))
    e = cs.calculate_sigmas(m, "exponential", 5)
    torch.testing.assert_close(e[:-1], torch.linspace(math.log(hi), math.log(lo), 5).exp())
    assert e[-1] == 0


def test_normal_and_sgm_uniform():
    m = ms.ModelSamplingDiscreteFlow(shift=1.0)
    n = cs.calculate_sigmas(m, "normal", 4)
    # timesteps 1000 .. 1 evenly spaced, sigma = t/1000, then 0
    torch.testing.assert_close(n, torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]), atol=1e-6, rtol=0)
    sgm = cs.calculate_sigmas(m, "sgm_uniform", 4)
    expected = torch.linspace(1000, 1, 5)[:-1] / 1000
    torch.testing.assert_close(sgm, torch.cat([expected, torch.zeros(1)]))


def test_ddim_uniform():
    m = ms.ModelSamplingDiscrete()
    s = cs.calculate_sigmas(m, "ddim_uniform", 10)
    idx = list(range(1, 1000, 100))
    torch.testing.assert_close(s, torch.tensor([float(m.sigmas[i]) for i in idx][::-1] + [0.0]))


def test_beta():
    m = ms.ModelSamplingDiscreteFlow(shift=3.0)
    s = cs.calculate_sigmas(m, "beta", 8)
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, 8, endpoint=False), 0.6, 0.6) * 999)
    expected = []
    last = -1
    for t in ts:
        if t != last:
            expected.append(float(m.sigmas[int(t)]))
        last = t
    torch.testing.assert_close(s, torch.tensor(expected + [0.0]))
    assert s[0] == pytest.approx(1.0)


def test_linear_quadratic():
    m = ms.ModelSamplingDiscreteFlow(shift=1.0)
    s = cs.calculate_sigmas(m, "linear_quadratic", 4)
    # first half linear up to threshold 0.025; the rest quadratic reaching noise 1 exactly
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert float(s[1]) == pytest.approx(1 - 0.025 / 2)
    assert len(s) == 5 and bool(torch.all(s[:-1] > s[1:]))
    assert cs.calculate_sigmas(m, "linear_quadratic", 1).tolist() == [1.0, 0.0]


def test_kl_optimal():
    m = ms.ModelSamplingDiscrete()
    lo, hi = float(m.sigma_min), float(m.sigma_max)
    s = cs.calculate_sigmas(m, "kl_optimal", 6)
    i = torch.arange(6) / 5
    torch.testing.assert_close(s[:-1], torch.tan(i * math.atan(lo) + (1 - i) * math.atan(hi)))
    assert s[-1] == 0


def test_denoise_and_discard_penultimate():
    m = ms.ModelSamplingDiscreteFlow(shift=3.0)
    patcher = make_patcher(m, None)
    k = cs.KSampler(patcher, 10, "cpu", "euler", "simple", denoise=0.3)
    torch.testing.assert_close(k.sigmas, cs.calculate_sigmas(m, "simple", 33)[-11:])
    assert len(cs.KSampler(patcher, 10, "cpu", "euler", "simple", denoise=0.0).sigmas) == 0
    u = cs.KSampler(patcher, 10, "cpu", "uni_pc", "simple")
    full = cs.calculate_sigmas(m, "simple", 11)
    torch.testing.assert_close(u.sigmas, torch.cat([full[:-2], full[-1:]]))


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="karras"):
        cs.calculate_sigmas(ms.ModelSamplingFlux(), "nope", 4)
