"""KSampler / KSamplerAdvanced / custom-sampling / ModelSampling nodes on a fake model."""

from __future__ import annotations

import math

import pytest
import torch

import comfy.utils
import latent_preview
import nodes
from comfy import model_sampling as ms
from comfy.cli_args import LatentPreviewMethod
from comfy_extras import nodes_custom_sampler as ncs
from comfy_extras import nodes_model_advanced as nma
from tests.sampling_fakes import conditioning, const_x0_fn, gaussian_fn, make_patcher


def _x0(v):
    return torch.full((4, 4, 4), v)


@pytest.fixture
def hook_calls():
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id: calls.append((value, total,
                                                                                                  preview)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(None)


def test_ksampler_inputs_match_comfyui():
    req = nodes.KSampler.INPUT_TYPES()["required"]
    assert list(req) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                         "latent_image", "denoise"]
    assert req["seed"][1]["max"] == 0xffffffffffffffff and req["seed"][1]["control_after_generate"]
    assert req["steps"][1] == {"default": 20, "min": 1, "max": 10000, "tooltip": req["steps"][1]["tooltip"]}
    assert "euler" in req["sampler_name"][0] and "uni_pc" in req["sampler_name"][0]
    assert nodes.NODE_CLASS_MAPPINGS["KSampler"] is nodes.KSampler
    adv = nodes.KSamplerAdvanced.INPUT_TYPES()["required"]
    assert list(adv)[-3:] == ["start_at_step", "end_at_step", "return_with_leftover_noise"]


def test_ksampler_node_runs_with_progress(hook_calls):
    patcher = make_patcher(ms.ModelSamplingFlux(), const_x0_fn(_x0))
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    (out,) = nodes.KSampler().sample(patcher, 3, 5, 1.0, "euler", "simple", conditioning(0.5),
                                     conditioning(-1), latent)
    torch.testing.assert_close(out["samples"], _x0(0.5)[None], atol=1e-5, rtol=1e-5)
    assert [(v, t) for v, t, _ in hook_calls] == [(i, 5) for i in range(1, 6)]
    assert all(p is None for _, _, p in hook_calls)  # --preview-method none


def test_ksampler_seed_reproducible_and_batch_index():
    fn, _ = gaussian_fn(ms.ModelSamplingFlux())
    patcher = make_patcher(ms.ModelSamplingFlux(), fn)
    lat = {"samples": torch.zeros(2, 4, 4, 4)}
    a = nodes.KSampler().sample(patcher, 9, 3, 1.0, "euler", "simple", conditioning(1), conditioning(1), lat)[0]
    b = nodes.KSampler().sample(patcher, 9, 3, 1.0, "euler", "simple", conditioning(1), conditioning(1), lat)[0]
    torch.testing.assert_close(a["samples"], b["samples"], rtol=0, atol=0)
    # batch_index [1] reproduces the second image of the batch on its own
    one = {"samples": torch.zeros(1, 4, 4, 4), "batch_index": [1]}
    c = nodes.KSampler().sample(patcher, 9, 3, 1.0, "euler", "simple", conditioning(1), conditioning(1), one)[0]
    torch.testing.assert_close(c["samples"][0], a["samples"][1])
    assert c["batch_index"] == [1]


def test_ksampler_advanced_leftover_noise():
    patcher = make_patcher(ms.ModelSamplingDiscreteFlow(shift=3.0), const_x0_fn(_x0))
    lat = {"samples": torch.zeros(1, 4, 4, 4)}
    full = nodes.KSamplerAdvanced().sample(patcher, "enable", 1, 4, 1.0, "euler", "simple", conditioning(2),
                                           conditioning(2), lat, 0, 10000, "disable")[0]["samples"]
    torch.testing.assert_close(full, _x0(2.0)[None], atol=1e-5, rtol=1e-5)
    part = nodes.KSamplerAdvanced().sample(patcher, "enable", 1, 4, 1.0, "euler", "simple", conditioning(2),
                                           conditioning(2), lat, 0, 2, "enable")[0]["samples"]
    assert not torch.allclose(part, full, atol=1e-2)  # stopped at step 2 with noise left in


def test_latent2rgb_preview(hook_calls, monkeypatch):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    patcher = make_patcher(ms.ModelSamplingFlux(), const_x0_fn(_x0))
    nodes.KSampler().sample(patcher, 3, 2, 1.0, "euler", "simple", conditioning(0.5), conditioning(0.5),
                            {"samples": torch.zeros(1, 4, 4, 4)})
    fmt, img, size = hook_calls[-1][2]
    assert fmt == "JPEG" and img.size == (4, 4)
    # x0 = 0.5 everywhere: R = 0.5*(0.3+0.1+0.2+0.0) = 0.3 -> (0.3+1)/2*255
    assert img.getpixel((0, 0))[0] == round((0.3 + 1) / 2 * 255)


def test_custom_sampler_advanced_matches_ksampler():
    fn, _ = gaussian_fn(ms.ModelSamplingFlux())
    patcher = make_patcher(ms.ModelSamplingFlux(), fn)
    lat = {"samples": torch.zeros(1, 4, 4, 4)}
    ref = nodes.KSampler().sample(patcher, 5, 4, 3.0, "euler", "simple", conditioning(1), conditioning(-1), lat)[0]
    (noise,) = ncs.RandomNoise().get_noise(5)
    (guider,) = ncs.CFGGuider().get_guider(patcher, conditioning(1), conditioning(-1), 3.0)
    (sampler,) = ncs.KSamplerSelect().get_sampler("euler")
    (sigmas,) = ncs.BasicScheduler().get_sigmas(patcher, "simple", 4, 1.0)
    out, denoised = ncs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, lat)
    torch.testing.assert_close(out["samples"], ref["samples"])
    assert denoised["samples"].shape == out["samples"].shape
    # BasicGuider = positive only
    (bg,) = ncs.BasicGuider().get_guider(patcher, conditioning(1))
    out1, _ = ncs.SamplerCustomAdvanced().sample(ncs.DisableNoise().get_noise()[0], bg, sampler, sigmas, lat)
    assert torch.isfinite(out1["samples"]).all()


def test_model_sampling_nodes_patch_a_clone():
    base = ms.ModelSamplingFlux()
    patcher = make_patcher(base, None)
    (m,) = nma.ModelSamplingFlux().patch(patcher, 1.15, 0.5, 1024, 1024)
    mu = (1024 * 1024 / 256) * (0.65 / 3840) + (0.5 - 256 * 0.65 / 3840)
    assert m.get_model_object("model_sampling").shift == pytest.approx(mu)
    assert patcher.get_model_object("model_sampling") is base  # the original MODEL is untouched
    (sd3,) = nma.ModelSamplingSD3().patch(patcher, 8.0)
    s = sd3.get_model_object("model_sampling")
    assert isinstance(s, ms.CONST) and s.shift == 8.0 and s.multiplier == 1000
    (aura,) = nma.ModelSamplingAuraFlow().patch_aura(patcher, 3.1)
    assert aura.get_model_object("model_sampling").multiplier == 1.0
    (v,) = nma.ModelSamplingDiscrete().patch(patcher, "v_prediction", False)
    assert isinstance(v.get_model_object("model_sampling"), ms.V_PREDICTION)
    assert math.isclose(float(v.get_model_object("model_sampling").sigma_max), 14.6146, rel_tol=1e-4)
