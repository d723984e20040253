"""No device -> host synchronisation inside the sampling loop.

On a GPU every `.item()`, `if tensor == 0:`, `.cpu()`, blocking host-to-device copy or memory query a step
makes leaves the GPU idle while Python catches up, once per step. These tests run the real node path
(SamplerCustomAdvanced / KSampler -> CFGGuider -> calc_cond_batch -> BaseModel.apply_model -> the step
loop) on tiny random-weight Flux and Wan models on the CPU under `HostSyncRecorder`, which records every
such operation on a tensor that would live on the GPU (tests/host_sync_recorder.py says how it decides).

What is allowed: a fixed number of reads and copies outside the steps, the same for 3 steps as for 6:

* set-up: the inputs moving to the device (noise, latent, sigmas, conditioning: `to(device)` uploads);
  the empty-latent check (`count_nonzero(latent) > 0`); `max_denoise` reading sigmas[0] and sigma_max
  (ComfyUI's noise scaling decides on them); the scheduler's one copy of the model's sigma table; the
  sampler's one CPU copy of the schedule (`_host_copy`, its decisions per step come from it);
  uni_pc's check of the last sigma;
* tear-down: the result leaving the device for the node's output (and Wan's latent statistics).

Within the steps (from the first step's progress callback to the end of the loop) nothing may be recorded.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import nodes
from comfy import model_sampling as ms
from comfy_extras import nodes_custom_sampler as ncs
from comfy_extras import nodes_flux
from tests.fixtures.demo_models import demo_script
from tests.host_sync_recorder import Event, HostSyncRecorder
from tests.sampling_fakes import conditioning, gaussian_fn, make_patcher


def tiny_flux():
    sd = demo_script().random_flux_state_dict(hidden_size=32, num_heads=2, context_in_dim=8, vec_in_dim=4, seed=9)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 5, 8, generator=g), {"pooled_output": torch.randn(1, 4, generator=g)}]]
    return patcher, cond, {"samples": torch.zeros(1, 16, 8, 8)}


def tiny_wan():
    from tests.test_wan_model_oracle import TINY, random_wan_state_dict

    cfg = {k: v for k, v in TINY.items() if k != "in_dim_img"}
    patcher = comfy.sd.load_diffusion_model_state_dict(random_wan_state_dict("t2v", seed=11, **cfg))
    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(1, 6, TINY["text_dim"], generator=g), {}]]
    neg = [[torch.randn(1, 6, TINY["text_dim"], generator=g), {}]]
    return patcher, pos, neg, {"samples": torch.zeros(1, 16, 2, 4, 4)}


@contextlib.contextmanager
def recording(patcher, monkeypatch):
    """Record host syncs while sampling with `patcher`; `recorder.phase` is "setup" until the step loop
    starts, "loop" inside it and "teardown" after it; `recorder.step` is the last step reported done."""
    rec = HostSyncRecorder()
    model = patcher.model
    rec.mark_device(list(model.parameters()) + list(model.buffers()))
    rec.mark_device(list(patcher.get_model_object("model_sampling").buffers()))

    original_sample = comfy.samplers.KSAMPLER.sample

    def sample(self, *args, **kwargs):
        loop = self.sampler_function

        def phased(*a, **k):
            rec.phase = "loop"
            try:
                return loop(*a, **k)
            finally:
                rec.phase = "teardown"

        self.sampler_function = phased
        try:
            return original_sample(self, *args, **kwargs)
        finally:
            self.sampler_function = loop

    original_free = comfy.model_management.get_free_memory

    def get_free_memory(device=None):
        rec.events.append(Event("query", "get_free_memory", rec.phase, rec.step, "comfy/samplers.py"))
        return original_free(device)

    def progress(value, total, preview, node_id=None):
        rec.step = value

    with monkeypatch.context() as patch:  # undone on exit: a test may record several runs
        patch.setattr(comfy.samplers.KSAMPLER, "sample", sample)
        patch.setattr(comfy.model_management, "get_free_memory", get_free_memory)
        comfy.utils.set_progress_bar_global_hook(progress)
        try:
            with rec:
                yield rec
        finally:
            comfy.utils.set_progress_bar_global_hook(None)


def per_step(events):
    return [e for e in events if e.phase == "loop" and e.step >= 1]


def describe(events) -> str:
    counts = collections.Counter(str(e).split(" [")[0] + " at " + e.where for e in events)
    return "\n".join(f"  {n} x {what}" for what, n in counts.items())


def flux_custom_advanced(sampler_name: str, steps: int, monkeypatch):
    """The Flux template's path: SamplerCustomAdvanced(RandomNoise, BasicGuider(FluxGuidance), KSamplerSelect,
    BasicScheduler simple)."""
    patcher, cond, latent = tiny_flux()
    (cond,) = nodes_flux.FluxGuidance().append(cond, 3.5)
    with recording(patcher, monkeypatch) as rec:
        (noise,) = ncs.RandomNoise().get_noise(42)
        (guider,) = ncs.BasicGuider().get_guider(patcher, cond)
        (sampler,) = ncs.KSamplerSelect().get_sampler(sampler_name)
        (sigmas,) = ncs.BasicScheduler().get_sigmas(patcher, "simple", steps, 1.0)
        out, _ = ncs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    assert torch.isfinite(out["samples"]).all()
    return rec


def wan_ksampler(sampler_name: str, steps: int, monkeypatch, cfg: float = 5.0):
    """The Wan template's path: KSampler with a negative prompt and cfg != 1 (cond and uncond batched)."""
    patcher, pos, neg, latent = tiny_wan()
    with recording(patcher, monkeypatch) as rec:
        (out,) = nodes.KSampler().sample(patcher, 7, steps, cfg, sampler_name, "simple", pos, neg, latent)
    assert torch.isfinite(out["samples"]).all()
    return rec


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_2m", "res_multistep", "uni_pc"])
def test_flux_steps_do_not_sync(sampler_name, monkeypatch):
    rec = flux_custom_advanced(sampler_name, 4, monkeypatch)
    assert rec.events, "the recorder saw nothing: it is not tracking the device tensors"
    assert not per_step(rec.events), f"host syncs inside the steps:\n{describe(per_step(rec.events))}"


@pytest.mark.parametrize("sampler_name", ["uni_pc", "euler", "dpmpp_2m"])
def test_wan_cfg_steps_do_not_sync(sampler_name, monkeypatch):
    rec = wan_ksampler(sampler_name, 4, monkeypatch)
    # cond and uncond ran as one batch: calc_cond_batch asked for free memory, once for the whole run
    queries = [e for e in rec.events if e.kind == "query"]
    assert len(queries) == 1, describe(queries)
    assert not per_step(rec.events), f"host syncs inside the steps:\n{describe(per_step(rec.events))}"


def test_flux_ksampler_node_steps_do_not_sync(monkeypatch):
    patcher, cond, latent = tiny_flux()
    with recording(patcher, monkeypatch) as rec:
        nodes.KSampler().sample(patcher, 3, 4, 1.0, "euler", "simple", cond, cond, latent)
    assert not per_step(rec.events), f"host syncs inside the steps:\n{describe(per_step(rec.events))}"


@pytest.mark.parametrize("run", ["flux_euler", "wan_uni_pc"])
def test_syncs_outside_the_steps_do_not_grow_with_steps(run, monkeypatch):
    def events(steps):
        if run == "flux_euler":
            return flux_custom_advanced("euler", steps, monkeypatch).events
        return wan_ksampler("uni_pc", steps, monkeypatch).events

    short, long = events(3), events(6)
    assert len(short) == len(long), f"3 steps:\n{describe(short)}\n6 steps:\n{describe(long)}"


# Every sampler whose loop takes its decisions from the host copy of the schedule, on a VE (EPS) model too:
# the ancestral samplers branch on the derived sigma_down there. Not listed, because the per-step work
# reads values back by design: dpm_adaptive (its error estimate picks the next step size), the SDE samplers'
# Brownian tree (torchsde builds it from host values), sa_solver (host-side coefficient integrals).
NO_SYNC_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m",
    "dpmpp_2m_cfg_pp", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
]


@pytest.mark.parametrize("model_sampling", [ms.ModelSamplingDiscrete, ms.ModelSamplingFlux], ids=["eps", "flow"])
@pytest.mark.parametrize("sampler_name", NO_SYNC_SAMPLERS)
def test_sampler_loops_do_not_sync(sampler_name, model_sampling, monkeypatch):
    sampling = model_sampling()
    fn, _ = gaussian_fn(sampling)
    patcher = make_patcher(sampling, fn)
    with recording(patcher, monkeypatch) as rec:
        nodes.KSampler().sample(patcher, 5, 5, 2.0, sampler_name, "karras", conditioning(1), conditioning(-1),
                                {"samples": torch.zeros(1, 4, 4, 4)})
    assert not per_step(rec.events), f"host syncs inside the steps:\n{describe(per_step(rec.events))}"


def test_inpainting_with_differential_diffusion_does_not_sync(monkeypatch):
    """The denoise-mask path (KSamplerX0Inpaint) with DifferentialDiffusion's per-step mask function."""
    from comfy_extras.nodes_flux_fill import DifferentialMask

    sampling = ms.ModelSamplingFlux()
    fn, _ = gaussian_fn(sampling)
    patcher = make_patcher(sampling, fn)
    patcher.model_options["denoise_mask_function"] = DifferentialMask(1.0)
    mask = torch.linspace(0, 1, 16).reshape(1, 4, 4)
    with recording(patcher, monkeypatch) as rec:
        nodes.KSampler().sample(patcher, 5, 5, 2.0, "euler", "simple", conditioning(1), conditioning(-1),
                                {"samples": torch.ones(1, 4, 4, 4), "noise_mask": mask})
    assert not per_step(rec.events), f"host syncs inside the steps:\n{describe(per_step(rec.events))}"


def test_recorder_sees_reads_and_uploads():
    """The recorder itself: device tensors come from marked tensors, `.to(<torch.device>)` and factories with
    a torch.device; host tensors are what "cpu" names."""
    dev = torch.device("cpu")
    rec = HostSyncRecorder()
    with rec:
        sigmas = torch.linspace(1, 0, 4).to(dev)                    # upload 1
        host = sigmas.cpu()                                          # read 1
        assert host[1] > 0 and not rec.on_device(host)               # host compare: nothing
        if sigmas[1] > 0:                                            # read 2 (__bool__)
            float(sigmas[2] * 2)                                     # read 3
        torch.tensor([0.5], device=sigmas.device)                    # upload 2
        torch.full((1,), 0.5, device=sigmas.device)                  # a fill: nothing
        torch.linalg.solve_ex(torch.eye(2, device=dev), torch.ones(2, device=dev))  # nothing
        torch.linalg.solve(torch.eye(2, device=dev), torch.ones(2, device=dev))     # read 4
        sigmas[sigmas > 0.5]                                         # read 5 (boolean mask)
    kinds = [(e.kind, e.op) for e in rec.events]
    assert kinds == [("upload", "to(device)"), ("read", "cpu"), ("read", "__bool__"), ("read", "__float__"),
                     ("upload", "tensor"), ("read", "linalg_solve"), ("read", "__getitem__[bool mask]")]
