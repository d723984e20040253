"""The ComfyUI samplers added after the first set: CFG++ variants, res_multistep, gradient_estimation, dpm_fast,
dpm_adaptive, heunpp2, ipndm_v, er_sde, seeds_2/3. Checked against their formulas on fake/analytic denoisers."""

from __future__ import annotations

import pytest
import torch

import comfy.sample
import comfy.samplers
import execution
import nodes
from comfy import model_sampling as ms
from comfy.k_diffusion import sampling as ks
from tests.fixtures.harness import FakeServer
from tests.sampling_fakes import conditioning, const_x0_fn, gaussian_fn, make_patcher

SHAPE = (2, 4, 3, 3)

CFG_PP_PAIRS = [("euler_cfg_pp", "euler"), ("euler_ancestral_cfg_pp", "euler_ancestral"),
                ("dpmpp_2m_cfg_pp", "dpmpp_2m"), ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral"),
                ("res_multistep_cfg_pp", "res_multistep"),
                ("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral"),
                ("gradient_estimation_cfg_pp", "gradient_estimation")]
NOISY = ["euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral",
         "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3"]
NEW = sorted({n for pair in CFG_PP_PAIRS for n in pair[:1]} | set(NOISY) | {"dpm_fast", "dpm_adaptive"}
             | {"res_multistep", "gradient_estimation", "heunpp2", "ipndm_v"})


def _model_sampling(flow):
    return ms.ModelSamplingDiscreteFlow(shift=3.0) if flow else ms.ModelSamplingDiscrete()


def _x0(v):
    return torch.full((4, 3, 3), v) + torch.arange(9.0).reshape(1, 3, 3) / 10


def _sample(patcher, name, sigmas, cfg=1.0, pos=1.0, neg=1.0, seed=7, options=None, shape=SHAPE):
    """Run sampler `name` (with extra options) over explicit sigmas through CFGGuider / KSAMPLER."""
    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = comfy.samplers.ksampler(name, options)
    out = comfy.samplers.sample(patcher, noise, conditioning(pos), conditioning(neg), cfg, "cpu", sampler,
                                sigmas, latent_image=latent, disable_pbar=True, seed=seed)
    return out, noise


def _ks_run(patcher, name, steps, cfg=1.0, pos=1.0, neg=1.0, seed=7, scheduler="karras", shape=SHAPE):
    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, name, scheduler, conditioning(pos), conditioning(neg),
                               latent, seed=seed, disable_pbar=True)


def test_names_registered_in_comfyui_order():
    names = comfy.samplers.KSAMPLER_NAMES
    for name in NEW:
        assert name in names and hasattr(ks, f"sample_{name}")
    comfy_order = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
                   "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                   "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
                   "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
                   "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                   "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                   "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3",
                   "sa_solver", "sa_solver_pece"]
    assert names == [n for n in comfy_order if n in names]  # a subsequence, in ComfyUI's order
    assert set(names) <= set(comfy_order)
    assert nodes.KSampler.INPUT_TYPES()["required"]["sampler_name"][0] == comfy.samplers.SAMPLER_NAMES


# ------------------------------------------------------------------------------------------------ CFG++


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
@pytest.mark.parametrize("pp,plain", CFG_PP_PAIRS)
def test_cfg_pp_equals_plain_sampler_when_uncond_equals_cond(pp, plain, flow):
    # positive == negative: the guided and unconditional predictions coincide, so CFG++ is the plain step
    model_sampling = _model_sampling(flow)
    fn, _ = gaussian_fn(model_sampling)
    if flow and plain == "euler_ancestral":
        pytest.skip("ComfyUI's euler_ancestral uses the RF split on flow models, the CFG++ form does not")
    a = _ks_run(make_patcher(model_sampling, fn), pp, 6, cfg=3.0, seed=4)
    b = _ks_run(make_patcher(model_sampling, fn), plain, 6, cfg=3.0, seed=4)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cfg_pp_evaluates_uncond_even_at_cfg_one():
    patcher = make_patcher(_model_sampling(False), const_x0_fn(_x0))
    _ks_run(patcher, "euler_cfg_pp", 3, cfg=1.0, pos=2.0, neg=-1.0)
    assert patcher.model.calls and all(c["cond_or_uncond"] == [0, 1] for c in patcher.model.calls)
    # the guider's own options are not left with the hook
    assert "sampler_post_cfg_function" not in patcher.model_options


@pytest.mark.parametrize("name", ["euler_cfg_pp", "gradient_estimation_cfg_pp", "res_multistep_cfg_pp",
                                  "dpmpp_2m_cfg_pp"])
def test_cfg_pp_first_step_formula(name):
    # one step of every CFG++ Euler-type first step: x1 = D_cfg + (x0 - D_uncond) / s0 * s1
    patcher = make_patcher(_model_sampling(False), const_x0_fn(_x0))
    s0, s1 = 5.0, 2.0
    cfg = 3.0
    out, noise = _sample(patcher, name, torch.tensor([s0, s1]), cfg=cfg, pos=2.0, neg=-1.0)
    x_start = noise * s0
    d_cfg = _x0(-1.0) + (_x0(2.0) - _x0(-1.0)) * cfg
    expected = d_cfg + (x_start - _x0(-1.0)) / s0 * s1
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # and it differs from the plain sampler, which steps along x - D_cfg
    plain, _ = _sample(make_patcher(_model_sampling(False), const_x0_fn(_x0)), name.replace("_cfg_pp", ""),
                       torch.tensor([s0, s1]), cfg=cfg, pos=2.0, neg=-1.0)
    assert not torch.allclose(plain, out, atol=1e-2)


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_euler_ancestral_cfg_pp_formula(flow):
    # one ancestral CFG++ step in the model's (alpha, sigma): x1 = a1 D + a1 s_down d + a1 s_up z
    model_sampling = _model_sampling(flow)
    patcher = make_patcher(model_sampling, const_x0_fn(_x0))
    s0, s1 = (0.8, 0.5) if flow else (5.0, 2.0)
    seed = 3
    out, noise = _sample(patcher, "euler_ancestral_cfg_pp", torch.tensor([s0, s1]), cfg=2.0, pos=2.0, neg=-1.0,
                         seed=seed)
    a0, a1 = (1 - s0, 1 - s1) if flow else (1.0, 1.0)
    x_start = s0 * noise
    d_cfg = _x0(-1.0) + (_x0(2.0) - _x0(-1.0)) * 2.0
    r0, r1 = s0 / a0, s1 / a1
    up = (r1 ** 2 * (r0 ** 2 - r1 ** 2) / r0 ** 2) ** 0.5
    down = (r1 ** 2 - up ** 2) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(SHAPE, generator=gen)
    expected = a1 * d_cfg + a1 * down * (x_start - a0 * _x0(-1.0)) / s0 + a1 * up * z
    if flow:
        expected = expected / (1 - s1)  # KSAMPLER's inverse noise scaling at the last sigma (CONST)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ multistep


@pytest.mark.parametrize("name", ["res_multistep", "gradient_estimation", "ipndm_v", "heunpp2"])
def test_first_step_is_euler(name):
    # one step between two nonzero sigmas: every one of these is plain Euler there
    fn, _ = gaussian_fn(_model_sampling(False))
    sig = torch.tensor([6.0, 2.5])
    a, _ = _sample(make_patcher(_model_sampling(False), fn), name, sig)
    b, _ = _sample(make_patcher(_model_sampling(False), fn), "euler", sig)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ipndm_v_equals_ipndm_on_even_steps():
    fn, _ = gaussian_fn(_model_sampling(False))
    sig = torch.linspace(8.0, 0.5, 9)  # equal spacing: variable-step weights become 3/2 and 23/12
    opts = {"max_order": 3}  # ComfyUI's order-4 ipndm_v weights are not AB4's (see _ipndm_v_weights)
    a, _ = _sample(make_patcher(_model_sampling(False), fn), "ipndm_v", sig, options=opts)
    b, _ = _sample(make_patcher(_model_sampling(False), fn), "ipndm", sig, options=opts)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and they differ on an uneven (karras) spacing
    sig = ks.get_sigmas_karras(8, 0.5, 8.0)[:-1]
    a, _ = _sample(make_patcher(_model_sampling(False), fn), "ipndm_v", sig)
    b, _ = _sample(make_patcher(_model_sampling(False), fn), "ipndm", sig)
    assert not torch.allclose(a, b, atol=1e-3)


def test_ipndm_v_weights():
    nodes_ = [3.0, 3.7, 4.9, 5.5]
    t_next = 2.2
    # order k <= 3 integrates constant and (for k >= 2) linear slopes exactly over uneven steps
    for k, degrees in [(1, 1), (2, 2), (3, 2)]:
        w = ks._ipndm_v_weights(t_next, nodes_[:k])
        for p in range(degrees):
            exact = (t_next ** (p + 1) - nodes_[0] ** (p + 1)) / (p + 1)
            approx = (t_next - nodes_[0]) * sum(wi * ti ** p for wi, ti in zip(w, nodes_))
            assert approx == pytest.approx(exact, rel=1e-9), (k, p)
    # equal spacing (sigma decreasing by 1): AB2, AB3, and ComfyUI's order-4 numbers
    assert ks._ipndm_v_weights(1.0, [2.0, 3.0]) == pytest.approx([3 / 2, -1 / 2])
    assert ks._ipndm_v_weights(1.0, [2.0, 3.0, 4.0]) == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    assert ks._ipndm_v_weights(1.0, [2.0, 3.0, 4.0, 5.0]) == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24])


def test_gradient_estimation_gamma_one_is_euler():
    fn, _ = gaussian_fn(_model_sampling(False))
    sig = ks.get_sigmas_karras(6, 0.1, 10.0)
    a, _ = _sample(make_patcher(_model_sampling(False), fn), "gradient_estimation", sig, options={"ge_gamma": 1.0})
    b, _ = _sample(make_patcher(_model_sampling(False), fn), "euler", sig)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_res_multistep_second_step_formula():
    # two steps with a denoiser that is constant per call: check the phi-weighted second step directly
    values = iter([1.0, 3.0])
    seen = []

    def fn(x, sigma, c):
        v = next(values)
        seen.append(v)
        return torch.full_like(x, v)

    s = torch.tensor([6.0, 3.0, 1.0])
    out, noise = _sample(make_patcher(_model_sampling(False), fn), "res_multistep", s)
    x = noise * 6.0
    x = x + (x - 1.0) / 6.0 * (3.0 - 6.0)  # Euler first step
    h = torch.log(torch.tensor(3.0)) - torch.log(torch.tensor(1.0))
    h_last = torch.log(torch.tensor(6.0)) - torch.log(torch.tensor(3.0))
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1) / -h
    c2 = -h_last / h
    expected = torch.exp(-h) * x + h * ((phi1 - phi2 / c2) * 3.0 + (phi2 / c2) * 1.0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert seen == [1.0, 3.0]


# ------------------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_deterministic_samplers_follow_the_exact_ode(flow):
    model_sampling = _model_sampling(flow)
    fn, exact_end = gaussian_fn(model_sampling)
    latent = torch.zeros(SHAPE)
    noise = comfy.sample.prepare_noise(latent, 3)
    errors = {}
    runs = {"euler": {}, "res_multistep": {}, "heunpp2": {}, "ipndm_v": {}, "gradient_estimation": {},
            "seeds_2": {"eta": 0.0}, "seeds_3": {"eta": 0.0},
            # ER-SDE with the noise scale function f(r) = r is its probability-flow ODE (no noise term)
            "er_sde": {"noise_scaler": lambda r: r}}
    for name, options in runs.items():
        patcher = make_patcher(model_sampling, fn)
        if flow:
            sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", 12)
        else:  # start below sigma_max, so the start is plainly x = s0 * noise
            sigmas = ks.get_sigmas_karras(12, 0.03, 10.0)
        out, _ = _sample(patcher, name, sigmas, seed=3, options=options)
        x_start = model_sampling.noise_scaling(sigmas[0], noise, latent)
        expected = exact_end(x_start.double(), float(sigmas[0])).float()
        errors[name] = float((out - expected).abs().max())
    assert errors["euler"] < 0.5, errors
    better = ["ipndm_v", "seeds_2", "seeds_3", "er_sde"]
    if not flow:
        better.append("res_multistep")  # ComfyUI's RES works in -log(sigma), exact only for VE models
    for name in better:
        assert errors[name] < 0.5 * errors["euler"], (name, errors)
    # heunpp2's sigma-weighted blend and gradient estimation's correction give a smaller gain
    assert errors["heunpp2"] < errors["euler"] and errors["gradient_estimation"] < errors["euler"], errors


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
@pytest.mark.parametrize("name", NOISY)
def test_noisy_samplers_are_seeded_and_sample_the_data_distribution(name, flow):
    if flow and name.startswith("res_multistep"):
        pytest.skip("ComfyUI's res_multistep ancestral noise is VE-only (-log sigma); not a flow sampler")
    model_sampling = _model_sampling(flow)
    fn, _ = gaussian_fn(model_sampling, mu=0.5, s=0.8)
    patcher = make_patcher(model_sampling, fn)
    a = _ks_run(patcher, name, 4, seed=5)
    b = _ks_run(patcher, name, 4, seed=5)
    c = _ks_run(patcher, name, 4, seed=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3)
    # many pixels, enough steps: the samples have the data's mean and spread (first-order ancestral
    # samplers shrink the spread a little at 24 steps: plain euler_ancestral gives about 0.7 here)
    big = _ks_run(patcher, name, 24, seed=9, shape=(1, 4, 48, 48), scheduler="simple" if flow else "karras")
    assert float(big.mean()) == pytest.approx(0.5, abs=0.05), name
    assert float(big.std()) == pytest.approx(0.8, abs=0.13), name


# ------------------------------------------------------------------------------------------------ nodes


class _FakeModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "run"

    def run(self, value):
        patcher = make_patcher(ms.ModelSamplingFlux(), const_x0_fn(lambda v: torch.full((4, 4, 4), v)))
        return patcher, conditioning(value), conditioning(-1.0), {"samples": torch.zeros(1, 4, 4, 4)}


RESULTS = []


class _Keep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, samples):
        RESULTS.append(samples["samples"])
        return ()


def test_ksampler_node_with_new_sampler_through_the_executor(monkeypatch):
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "ExtraFakeModel", _FakeModel)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "ExtraKeep", _Keep)
    RESULTS.clear()
    prompt = {"1": {"class_type": "ExtraFakeModel", "inputs": {"value": 0.5}},
              "2": {"class_type": "KSampler", "inputs": {
                  "model": ["1", 0], "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "res_multistep_cfg_pp",
                  "scheduler": "simple", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3],
                  "denoise": 1.0}},
              "3": {"class_type": "ExtraKeep", "inputs": {"samples": ["2", 0]}}}
    ok, err, good, node_errors = execution.validate_prompt("p", prompt)
    assert ok, (err, node_errors)
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, "p", {}, good)
    assert ex.success, ex.status_messages
    torch.testing.assert_close(RESULTS[0], torch.full((1, 4, 4, 4), 0.5), atol=1e-4, rtol=1e-4)
    bad = {**prompt, "2": {**prompt["2"], "inputs": {**prompt["2"]["inputs"], "sampler_name": "no_such"}}}
    assert not execution.validate_prompt("p", bad)[0]


# ------------------------------------------------------------------------------------------------ DPM-Solver


DPM_SIGMAS = torch.tensor([10.0, 6.0, 3.0, 1.5, 0.8, 0.4, 0.2, 0.0])  # below sigma_max: x_start = 10 * noise


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_solvers_end_at_the_last_nonzero_sigma(name):
    # constant x0 makes eps constant: the exact solution is x0 + sigma * eps, and DPM-Solver is exact on it
    patcher = make_patcher(_model_sampling(False), const_x0_fn(_x0))
    out, noise = _sample(patcher, name, DPM_SIGMAS)
    eps = (10.0 * noise - _x0(1.0)) / 10.0
    torch.testing.assert_close(out, _x0(1.0) + 0.2 * eps, atol=1e-4, rtol=1e-4)
    assert min(float(c["sigma"][0]) for c in patcher.model.calls) >= 0.2 - 1e-5  # never evaluated below it


@pytest.mark.parametrize("steps,orders", [(5, [3, 2]), (6, [3, 2, 1]), (7, [3, 3, 1])])
def test_dpm_fast_spends_one_call_per_step(steps, orders):
    fn, _ = gaussian_fn(_model_sampling(False))
    patcher = make_patcher(_model_sampling(False), fn)
    sigmas = ks.get_sigmas_karras(steps, 0.1, 10.0)
    _sample(patcher, "dpm_fast", sigmas)
    assert len(patcher.model.calls) == steps == sum(orders)
    # steps are equal in t = -log(sigma); each starts with an evaluation at its own start
    starts = [float(c["sigma"][0]) for c in patcher.model.calls]
    t = torch.linspace(-torch.log(torch.tensor(10.0)), -torch.log(torch.as_tensor(sigmas[-2]).float()), len(orders) + 1)
    step_starts = [starts[sum(orders[:k])] for k in range(len(orders))]
    assert step_starts == pytest.approx([float(v) for v in torch.exp(-t[:-1])], rel=1e-5)


def _gaussian_end(sigma_end, x_start, s0=10.0, mu=0.5, s=0.8):
    return mu + ((s ** 2 + sigma_end ** 2) / (s ** 2 + s0 ** 2)) ** 0.5 * (x_start - mu)


def test_dpm_solvers_follow_the_exact_ode_to_sigma_min():
    fn, _ = gaussian_fn(_model_sampling(False))
    sigmas = ks.get_sigmas_karras(12, 0.05, 10.0)
    errors = {}
    for name, options in [("dpm_fast", None), ("dpm_adaptive", None), ("dpm_adaptive", {"order": 2}),
                          ("dpm_adaptive", {"rtol": 0.005})]:
        patcher = make_patcher(_model_sampling(False), fn)
        out, noise = _sample(patcher, name, sigmas, options=options)
        errors[(name, str(options))] = (float((out - _gaussian_end(0.05, 10.0 * noise)).abs().max()),
                                        len(patcher.model.calls))
    euler, noise = _sample(make_patcher(_model_sampling(False), fn), "euler", sigmas[:-1])
    euler_err = float((euler - _gaussian_end(0.05, 10.0 * noise)).abs().max())
    assert errors[("dpm_fast", "None")][0] < 0.1 * euler_err, (errors, euler_err)
    # default tolerances (rtol 0.05) are loose: still well under Euler with fewer than 2x its calls
    assert errors[("dpm_adaptive", "None")][0] < 0.5 * euler_err, (errors, euler_err)
    assert errors[("dpm_adaptive", "{'order': 2}")][0] < 0.5 * euler_err, (errors, euler_err)
    # a tighter tolerance costs more evaluations and buys accuracy
    tight, loose = errors[("dpm_adaptive", "{'rtol': 0.005}")], errors[("dpm_adaptive", "None")]
    assert tight[1] > loose[1] and tight[0] < loose[0], errors


def test_dpm_adaptive_reports_its_work():
    fn, _ = gaussian_fn(_model_sampling(False))
    calls = []

    def model(x, sigma, **kwargs):
        calls.append(1)
        return fn(x, sigma, None)

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 10.0
    out, info = ks.sample_dpm_adaptive(model, x, torch.tensor(0.05), torch.tensor(10.0), disable=True,
                                       return_info=True)
    assert info["nfe"] == len(calls) and info["n_accept"] > 0
    assert info["steps"] == info["n_accept"] + info["n_reject"]
    with pytest.raises(ValueError):
        ks.sample_dpm_adaptive(model, x, torch.tensor(0.0), torch.tensor(10.0), disable=True)


def test_dpm_fast_ancestral_is_seeded():
    fn, _ = gaussian_fn(_model_sampling(False))
    opts = {"eta": 1.0}
    a, _ = _sample(make_patcher(_model_sampling(False), fn), "dpm_fast", DPM_SIGMAS, options=opts, seed=1)
    b, _ = _sample(make_patcher(_model_sampling(False), fn), "dpm_fast", DPM_SIGMAS, options=opts, seed=1)
    c, _ = _sample(make_patcher(_model_sampling(False), fn), "dpm_fast", DPM_SIGMAS, options=opts, seed=2)
    d, _ = _sample(make_patcher(_model_sampling(False), fn), "dpm_fast", DPM_SIGMAS, seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3) and not torch.allclose(a, d, atol=1e-3)


def test_every_listed_sampler_resolves_to_a_step_function():
    # what KSampler / KSamplerSelect offer must all be runnable: the complete ComfyUI list, each name bound
    from comfy.k_diffusion import deis, sa_solver

    assert len(comfy.samplers.KSAMPLER_NAMES) == 39  # all of ComfyUI's k-diffusion-style names
    for name in comfy.samplers.SAMPLER_NAMES:
        assert callable(comfy.samplers.sampler_object(name).sampler_function), name
    assert comfy.samplers.sampler_object("deis").sampler_function is deis.sample_deis
    assert comfy.samplers.sampler_object("sa_solver_pece").sampler_function is sa_solver.sample_sa_solver_pece
