"""Every parallel strategy on 2 and 4 gloo ranks gives the one-process image, through the real fork
path (API prompt -> loaders -> CLIPTextEncode -> KSampler -> model -> VAEDecode -> SaveImage).

CFG parallel and data parallel do the same arithmetic as one process (each rank evaluates whole
samples; small conditioning-vector linears are batch-invariant on CPU, see comfy/ops.py), so the PNG
bytes must be identical; those cases switch VAE parallel off, whose split decode reorders the GroupNorm
sums (tests/test_vae_parallel.py), while the other cases keep it on (auto). Sequence parallel reorders
the attention sums (blockwise LSE merging, keys in another order): fp32 results differ around 1e-6
relative, which after 4 steps and the VAE can move an 8-bit pixel across a rounding boundary, so there
the PNG may differ by at most 1 level in a few pixels.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.parallel_helpers import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt(cfg: float, batch: int, negative: str | None) -> dict:
    with open(os.path.join(ROOT, "demo", "flux_demo_api.json")) as f:
        prompt = json.load(f)
    prompt["6"]["inputs"].update(width=128, height=128, batch_size=batch)
    prompt["7"]["inputs"].update(steps=4, cfg=cfg)
    if negative is not None:
        prompt["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["2", 0]}}
    return prompt


def _render(rank, world, models_dir, out_root, prompt, parallel):
    import execution
    import folder_paths
    import nodes
    from comfy.taco_dit.core import model_wrapper
    from comfy.taco_dit.core.config_manager import ParallelConfig
    from tests.fixtures.harness import FakeServer

    folder_paths.set_base_path(out_root)
    folder_paths.folder_names_and_paths.clear()
    folder_paths.models_dir = models_dir
    folder_paths._reset_model_folders()
    folder_paths.set_output_directory(os.path.join(out_root, f"output-{rank}"))
    nodes.init_extra_nodes(init_custom_nodes=False)
    model_wrapper.set_runtime(ParallelConfig(world_size=world, **parallel))
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, f"p-{world}", {}, ["9"])
    assert ex.success, ex.status_messages
    plan = model_wrapper.last_plan()
    out = [(plan.dims.cfg, plan.dims.ulysses, plan.dims.ring, plan.dims.dp) if plan else None]
    for img in ex.history_result["outputs"]["9"]["images"]:
        with open(os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"]), "rb") as f:
            out.append(f.read())
    return out


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


CASES = [
    # (world, parallel config, cfg, batch, negative, exact, expected (cfg, ulysses, ring, dp))
    (2, dict(cfg_parallel=True, vae_parallel=False), 3.0, 1, "blurry", True, (2, 1, 1, 1)),
    # auto: a batch of 2 goes data parallel
    (2, dict(cfg_parallel=False, vae_parallel=False), 1.0, 2, None, True, (1, 1, 1, 2)),
    (2, dict(ulysses_degree=2, cfg_parallel=False), 1.0, 1, None, False, (1, 2, 1, 1)),
    (2, dict(ring_degree=2, cfg_parallel=False), 1.0, 1, None, False, (1, 1, 2, 1)),
    (4, dict(cfg_parallel=True, ulysses_degree=2), 3.0, 1, "blurry", False, (2, 2, 1, 1)),
    (4, dict(ulysses_degree=2, ring_degree=2, cfg_parallel=False), 1.0, 1, None, False, (1, 2, 2, 1)),
    (4, dict(), 3.0, 1, "blurry", False, (2, 2, 1, 1)),  # automatic: CFG pair x Ulysses 2
]


@pytest.mark.slow
@pytest.mark.parametrize("world,parallel,cfg,batch,negative,exact,expected", CASES)
def test_n_ranks_give_the_one_rank_image(base_dir, tmp_path, models_dir, world, parallel, cfg, batch, negative,
                                         exact, expected):
    # base_dir restores folder_paths after the in-process reference render below
    prompt = _prompt(cfg, batch, negative)
    # the ranks run single-threaded (parallel_helpers); so must the reference, since a CPU kernel's
    # summation order can depend on how many threads split it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_plan, *ref = _render(0, 1, models_dir, str(tmp_path / "one"), prompt, {})
    finally:
        torch.set_num_threads(threads)
    assert ref_plan is None  # one process: no plan at all, the plain path
    outs = run_on_ranks(world, _render, models_dir, str(tmp_path / "many"), prompt, parallel)
    assert len(outs[0]) == batch + 1
    for plan, *rank_out in outs:  # every rank used the expected layout and ends with the same images
        assert plan == expected
        for got, want in zip(rank_out, ref):
            if exact:
                assert got == want
            else:
                diff = np.abs(_pixels(got) - _pixels(want))
                assert diff.max() <= 1, diff.max()
                assert (diff > 0).mean() < 0.02


def test_auto_plan_rules(monkeypatch):
    from comfy.taco_dit.core.config_manager import ConfigError, ParallelConfig
    from comfy.taco_dit.core.model_wrapper import plan_parallel

    def plan(world, **kw):
        config = ParallelConfig(world_size=world, **kw.pop("config", {}))
        args = dict(cfg_active=False, batch=1, heads=24, sp_supported=True, model_name="Flux")
        args.update(kw)
        return plan_parallel(config, world=world, **args)

    d = plan(4).dims  # Flux-dev, cfg 1, batch 1: all four ranks on the sequence, Ulysses first
    assert (d.cfg, d.ulysses, d.ring, d.dp) == (1, 4, 1, 1)
    d = plan(4, cfg_active=True).dims  # cfg > 1: CFG pair x Ulysses 2
    assert (d.cfg, d.ulysses, d.ring, d.dp) == (2, 2, 1, 1)
    d = plan(4, batch=4).dims  # a batch that splits evenly goes data parallel
    assert (d.cfg, d.sp, d.dp) == (1, 1, 4)
    # an attention mask in the conditioning (Redux attn_bias) rules sequence parallel out for that run:
    # automatic plans fall back and say why; a configured degree is refused naming the reason
    masked = plan(4, cfg_active=True, sp_blocker="the conditioning carries an attention mask")
    assert (masked.dims.cfg, masked.dims.sp) == (2, 1)
    assert any("attention mask" in r for r in masked.reasons)
    with pytest.raises(ConfigError, match="attention mask"):
        plan(4, config={"ulysses_degree": 4}, sp_blocker="the conditioning carries an attention mask")
    # 2 ranks of a model writing packed q/k/v (Flux): ring 2 gathering the keys in place, saying so; Ulysses 2
    # for other models, with TACO_RING=rotate, or when 2 ranks are what is left after a CFG pair
    two = plan(2, packed_qkv=True)
    assert (two.dims.ulysses, two.dims.ring) == (1, 2) and any("gathered" in r for r in two.reasons)
    assert (plan(2).dims.ulysses, plan(2).dims.ring) == (2, 1)
    assert (plan(4, cfg_active=True, packed_qkv=True).dims.ulysses, plan(4, packed_qkv=True).dims.ulysses) == (2, 4)
    monkeypatch.setenv("TACO_RING", "rotate")
    assert plan(2, packed_qkv=True).dims.ulysses == 2
    monkeypatch.delenv("TACO_RING")
    d = plan(5, heads=24).dims  # 5 does not divide 24 heads: ring takes it
    assert (d.ulysses, d.ring) == (1, 5)
    d = plan(6, heads=24).dims
    assert (d.ulysses, d.ring) == (6, 1)
    d = plan(4, peer_access=False).dims  # PCIe without P2P: ring
    assert (d.ulysses, d.ring) == (1, 4)
    d = plan(4, sp_supported=False).dims  # no plan for the model: data parallel (falls back per batch)
    assert (d.sp, d.dp) == (1, 4)
    assert not plan(4, config=dict(enabled=False)).is_parallel
    d = plan(4, config=dict(ulysses_degree=2, ring_degree=2)).dims
    assert (d.ulysses, d.ring, d.cfg) == (2, 2, 1)
    with pytest.raises(ConfigError, match="does not divide Flux's 24 heads"):
        plan(5, config=dict(ulysses_degree=5))
    with pytest.raises(ConfigError, match="has no sequence-parallel plan"):
        plan(2, sp_supported=False, config=dict(ulysses_degree=2))
    assert torch is not None


def test_parallel_config_node_and_overrides():
    from comfy.taco_dit.core.config_manager import ParallelConfig
    from comfy.taco_dit.core.model_wrapper import NODE_OPTIONS_KEY, effective_config
    from comfy_extras.nodes_taco_dit import TacoDiTParallelConfig

    class FakePatcher:
        def __init__(self):
            self.model_options = {"transformer_options": {}}

        def clone(self):
            c = FakePatcher()
            c.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
            return c

    base = FakePatcher()
    (patched,) = TacoDiTParallelConfig().patch(base, "auto", "off", "auto", 4, 0)
    assert NODE_OPTIONS_KEY not in base.model_options  # the input MODEL is untouched
    opts = patched.model_options[NODE_OPTIONS_KEY]
    # the process said ulysses 2 x ring 2; the node's Ulysses 4 replaces that layout as a whole
    process = ParallelConfig(world_size=4, ulysses_degree=2, ring_degree=2)
    eff = effective_config(process, opts)
    assert (eff.ulysses_degree, eff.ring_degree, eff.cfg_parallel) == (4, "auto", False)
    from comfy.taco_dit.core.model_wrapper import plan_parallel
    d = plan_parallel(eff, world=4, cfg_active=True, batch=1, heads=24, sp_supported=True).dims
    assert (d.cfg, d.ulysses, d.ring) == (1, 4, 1)
    # "auto" on the node inherits the process's explicit choice
    assert effective_config(process, {"ulysses_degree": "auto"}) is process


def _render_compiled(rank, world, models_dir, out_root, prompt, parallel):
    # dynamo's tracing with the "eager" backend: the same graph capture and guards as a real compile,
    # without inductor's C++ build (minutes on this CPU); what is checked is that compilation composes
    # with the parallel plan (collectives inside the traced forward), not inductor's kernels
    calls = []
    real_compile = torch.compile

    def counting_compile(fn, **kw):
        calls.append(fn)
        return real_compile(fn, backend="eager")

    torch.compile = counting_compile
    out = _render(rank, world, models_dir, out_root, prompt, parallel)
    from comfy.taco_dit.core import model_wrapper

    assert len(calls) == 1 and any(k[1] == "compile" for k in model_wrapper._wrapped_forwards)
    return out


@pytest.mark.slow
def test_torch_compile_composes_with_sequence_parallel(base_dir, tmp_path, models_dir):
    prompt = _prompt(1.0, 1, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, ref = _render(0, 1, models_dir, str(tmp_path / "one"), prompt, {})
    finally:
        torch.set_num_threads(threads)
    outs = run_on_ranks(2, _render_compiled, models_dir, str(tmp_path / "many"), prompt,
                        dict(ulysses_degree=2, cfg_parallel=False, optimization={"use_torch_compile": True}))
    for plan, got in outs:
        assert plan == (1, 2, 1, 1)
        diff = np.abs(_pixels(got) - _pixels(ref))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_data_parallel_wrapper_slices_nested_inputs():
    from comfy.taco_dit.parallel.cfg_parallel import make_data_parallel_wrapper

    class Group:  # rank 1 of 2; all_gather stands in for the other rank with zeros
        size, rank_in_group = 2, 1

        def all_gather(self, t, dim=0):
            return torch.cat([torch.zeros_like(t), t], dim=dim)

    seen = {}

    def apply_model(x, t, **c):
        seen.update(x=x, t=t, **c)
        return x * 2

    x = torch.arange(4.0).reshape(4, 1)
    args = {"input": x, "timestep": torch.arange(4.0), "cond_or_uncond": [0],
            "c": {"c_crossattn": torch.arange(8.0).reshape(4, 2), "guidance": torch.tensor([3.5]),
                  "control": {"output": [torch.arange(4.0).reshape(4, 1), None]},
                  "transformer_options": {"patches_replace": {"dit": {("double_block", 0): print}}}}}
    out = make_data_parallel_wrapper(Group())(apply_model, args)
    assert seen["x"].tolist() == [[2.0], [3.0]] and seen["t"].tolist() == [2.0, 3.0]
    assert seen["c_crossattn"].shape == (2, 2) and seen["guidance"].tolist() == [3.5]  # not a batch tensor
    assert seen["control"]["output"][0].tolist() == [[2.0], [3.0]] and seen["control"]["output"][1] is None
    assert ("double_block", 0) in seen["transformer_options"]["patches_replace"]["dit"]
    assert out.tolist() == [[0.0], [0.0], [4.0], [6.0]]
