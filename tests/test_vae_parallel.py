"""VAE parallel (comfy/taco_dit/parallel/vae_parallel.py): a KL image decode split by latent rows over 2
and 3 gloo ranks gives the one-process decode on every rank: directly, through `comfy.vae.VAE.decode`
with the configuration read from YAML, and through the executor (VAEDecode -> SaveImage); with
`vae_parallel: false` the plain path runs.

Tolerance. In fp32 the split decode differs from one process only in the order of its sums: GroupNorm
statistics are merged from per-rank means and centred sums of squares instead of one pass over the
image, attention runs with a different number of queries per call, and the edge rows of each 3x3 conv
come from a separate 3-row convolution. Each of these moves a result by ~1e-7 relative; through the
~20 normalised layers of these random-weight decoders (outputs up to ~20) that grows to ~1e-5 absolute,
the same size as the one-process fp32 decode's own distance from a float64 decode. 1e-4 leaves room for
that. In float64 the split must agree to 1e-9: the split is the same maths, not an approximation that
happens to fit a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy.ldm.models.autoencoder import AutoencoderKL, kl_config_from_state_dict
from tests.parallel_helpers import run_on_ranks

FP32_TOL = 1e-4
FP64_TOL = 1e-9


def _state_dict(z: int, quant: bool, seed: int = 0) -> dict:
    """A small LDM-layout KL VAE (ch 32, ch_mult [1, 2, 2]) with random norms and biases too, so a
    swapped, dropped or misapplied tensor changes the output."""
    torch.manual_seed(seed)
    m = AutoencoderKL(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=z,
                      quant_conv=quant, post_quant_conv=quant)
    return {k: torch.randn_like(v) * (0.2 if v.ndim > 1 else 0.5) + (1.0 if "norm" in k and k.endswith("weight")
                                                                      else 0.0)
            for k, v in m.state_dict().items()}


def _model(z: int, quant: bool) -> AutoencoderKL:
    sd = _state_dict(z, quant)
    m = AutoencoderKL(**kl_config_from_state_dict(sd))  # the sizes the loader reads from a file
    m.load_state_dict(sd)
    return m.eval()


# (latent channels, quant convs, latent shape [B, C, H, W])
CASES = [
    (16, False, (2, 16, 13, 10)),  # Flux/SD3-like; batch 2; 13 rows: uneven on 2 (7+6) and 3 (5+4+4); not square
    (4, True, (1, 4, 7, 11)),  # SD-like with post_quant_conv; wider than tall; uneven on 2 and 3
    (16, False, (1, 16, 3, 5)),  # one row per rank on 3 ranks
    (16, False, (1, 16, 2, 6)),  # fewer rows than 3 ranks: every rank decodes the whole latent
]
# ch_mult [1, 2, 2], one resnet block per level: 2 mid + 3 levels x 2 resnet blocks, 2 upsamplings
RESNETS, UPSAMPLES = 8, 2


def _decode_cases(rank: int, world: int) -> list[dict]:
    from comfy.taco_dit.parallel import vae_parallel

    group = vae_parallel.world_group()
    out = []
    for z, quant, shape in CASES:
        model = _model(z, quant)
        latent = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model.decode(latent)
        vae_parallel.last_decode.clear()
        got = vae_parallel.decode(model, latent, group)
        info = dict(vae_parallel.last_decode)
        model64 = _model(z, quant).double()
        with torch.no_grad():
            want64 = model64.decode(latent.double())
        got64 = vae_parallel.decode(model64, latent.double(), group)
        out.append(dict(got=got, shape_ok=got.shape == want.shape, diff=(got - want).abs().max().item(),
                        exact=torch.equal(got, want), diff64=(got64 - want64).abs().max().item(), info=info))
    # bf16 (the GPU dtype): activations stay bf16, statistics fp32; as close to fp32 as the plain bf16 decode
    model, latent = _model(16, False), torch.randn(*CASES[0][2], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.decode(latent)
        plain = model.to(torch.bfloat16).decode(latent.bfloat16())
    got = vae_parallel.decode(model, latent.bfloat16(), group)
    out.append(dict(dtype=got.dtype, err=(got.float() - ref).abs().mean().item(),
                    plain_err=(plain.float() - ref).abs().mean().item()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_split_decode_matches_one_rank(world):
    from comfy.taco_dit.parallel.vae_parallel import RowSplit

    ranks = run_on_ranks(world, _decode_cases)
    for results in ranks:
        *cases, bf16 = results
        for (_, _, shape), r, first in zip(CASES, cases, ranks[0]):
            assert r["shape_ok"]
            assert torch.equal(r["got"], first["got"])  # every rank ends with the same full image
            if shape[2] < world:  # too few rows to split: the plain decode on every rank
                assert r["info"] == {} and r["exact"]
                continue
            assert r["info"]["latent_rows"] == RowSplit.balanced(shape[2], world).counts
            assert r["info"]["collectives"] == {"halo_exchange": 2 * RESNETS + UPSAMPLES + 1,
                                                "all_gather": 2 * RESNETS + 4}
            assert r["diff"] <= FP32_TOL, (world, shape, r["diff"])
            assert r["diff64"] <= FP64_TOL, (world, shape, r["diff64"])
        assert bf16["dtype"] == torch.bfloat16
        assert bf16["err"] <= 1.05 * bf16["plain_err"], bf16


def _statistics_pass_decode(rank: int, world: int) -> dict:
    from comfy.ldm.models import autoencoder
    from comfy.taco_dit.parallel import vae_parallel

    # the GPU path (fp16/bf16 on CUDA) taken here on CPU in fp32, by both the split and the one-rank decode
    autoencoder.statistics_pass_applies = lambda x: True
    calls = []
    sums = autoencoder.group_sums
    autoencoder.group_sums = lambda x, groups: calls.append(x.shape) or sums(x, groups)
    model = _model(16, False)
    latent = torch.randn(*CASES[0][2], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.decode(latent)
    vae_parallel.last_decode.clear()
    calls.clear()
    got = vae_parallel.decode(model, latent, vae_parallel.world_group())
    return dict(diff=(got - want).abs().max().item(), sums_calls=len(calls),
                collectives=dict(vae_parallel.last_decode.get("collectives", {})))


@pytest.mark.slow
def test_split_decode_with_the_statistics_pass_matches_one_rank():
    """Where one GPU's decode takes the GroupNorm statistics pass, the split decode takes it too: each rank's
    fp32 sums and sums of squares, gathered once per GroupNorm and added, give one rank's decode (to fp32
    summation order, FP32_TOL), with the same collectives as the merged-moments path."""
    for r in run_on_ranks(2, _statistics_pass_decode):
        assert r["sums_calls"] == 2 * RESNETS + 2  # every GroupNorm of the split decode took the pass
        assert r["collectives"] == {"halo_exchange": 2 * RESNETS + UPSAMPLES + 1, "all_gather": 2 * RESNETS + 4}
        assert r["diff"] <= FP32_TOL, r["diff"]


def _graph_cache(rank: int, world: int) -> dict:
    import comfy.taco_dit.utils.cuda_graph as cuda_graph
    from comfy.taco_dit.parallel import vae_parallel

    made = []

    class Recording:  # stands in for CUDAGraphCallable on CPU: calls straight through, counts graphs made
        def __init__(self, fn, max_graphs=4):
            self.fn, self.calls = fn, 0
            made.append(self)

        def __call__(self, *args):
            self.calls += 1
            return self.fn(*args)

    cuda_graph.CUDAGraphCallable = Recording
    vae_parallel.graph_applies = lambda z: True
    group = vae_parallel.world_group()
    model = _model(16, False)
    latent = torch.randn(*CASES[0][2], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, counts = vae_parallel._split_decode(model, latent, group, vae_parallel.RowSplit.balanced(13, world))
    outs, infos = [], []
    for step in range(3):
        if step == 2:  # the weights move (offloaded and loaded again): a graph of the old addresses must not run
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.clone()
        vae_parallel.last_decode.clear()
        outs.append(vae_parallel.decode(model, latent, group))
        infos.append(dict(vae_parallel.last_decode))
    return dict(calls=[m.calls for m in made], same=all(torch.equal(o, eager) for o in outs),
                infos_ok=all(i["collectives"] == counts and i["ranks"] == world for i in infos), cached=len(vae_parallel._graphs))


@pytest.mark.slow
def test_graphed_split_decode_is_kept_per_set_of_weights():
    """The split decode's CUDA graph (a stand-in that calls through, on CPU) is made once and replayed for the
    next decode of the same weights; weights at new addresses get a new one and the old is dropped. Outputs
    are the eager split decode's, and last_decode still reports the collectives."""
    for r in run_on_ranks(2, _graph_cache):
        assert r["calls"] == [2, 1] and r["cached"] == 1
        assert r["same"] and r["infos_ok"]


def test_graph_rule(monkeypatch):
    from types import SimpleNamespace

    from comfy.ldm.models import autoencoder
    from comfy.taco_dit.parallel import vae_parallel

    monkeypatch.setattr(autoencoder, "statistics_pass_applies", lambda x: True)
    assert not vae_parallel.graph_applies(torch.zeros(1, 16, 8, 8))  # a CPU tensor is never graphed
    on_gpu = lambda *shape: SimpleNamespace(is_cuda=True, shape=shape)  # noqa: E731
    assert vae_parallel.graph_applies(on_gpu(1, 16, 256, 256))  # 2048² pixels
    assert not vae_parallel.graph_applies(on_gpu(1, 16, 257, 256))
    assert not vae_parallel.graph_applies(on_gpu(2, 16, 256, 256))
    monkeypatch.setattr(autoencoder, "statistics_pass_applies", lambda x: False)  # e.g. an fp32 VAE
    assert not vae_parallel.graph_applies(on_gpu(1, 16, 8, 8))
    monkeypatch.setattr(autoencoder, "statistics_pass_applies", lambda x: True)
    monkeypatch.setenv("TACO_VAE_GRAPH", "0")
    assert not vae_parallel.graph_applies(on_gpu(1, 16, 8, 8))


def _row_split_rules():
    from comfy.taco_dit.parallel.vae_parallel import RowSplit

    s = RowSplit.balanced(13, 3)
    assert s.counts == (5, 4, 4) and s.chunk == 5 and s.rows == 13 and [s.start(i) for i in range(3)] == [0, 5, 9]
    assert s.scaled(2).counts == (10, 8, 8)
    assert RowSplit.balanced(3, 3).counts == (1, 1, 1)


def test_plan_rules_and_config():
    from comfy.cli_args import build_parser
    from comfy.taco_dit.core.config_manager import (
        AUTO,
        ConfigError,
        ParallelConfig,
        load_config,
        values_from_args,
    )
    from comfy.taco_dit.parallel.vae_parallel import plan_vae_parallel

    _row_split_rules()

    def plan(world=2, rows=16, backend="gloo", device="cpu", **kw):
        return plan_vae_parallel(ParallelConfig(world_size=world, **kw), world=world, rows=rows, backend=backend,
                                 device_type=device)

    assert plan() == (True, "16 latent rows split over 2 ranks (vae_parallel: auto)")
    assert plan(vae_parallel=True)[0] and plan(backend="nccl", device="cuda")[0]
    assert plan(backend="cpu:gloo,cuda:nccl", device="cuda")[0]
    assert plan(world=1) == (False, "one rank")
    assert plan(vae_parallel=False) == (False, "vae_parallel: false")
    assert not plan(enabled=False, vae_parallel=True)[0]  # the master switch wins
    assert "fewer than the 4 ranks" in plan(world=4, rows=3)[1]
    assert "cannot exchange cpu tensors" in plan(backend="nccl", device="cpu")[1]  # e.g. --cpu-vae on GPUs
    c = ParallelConfig(world_size=2)
    assert c.vae_parallel == AUTO and c.vae_parallel_on and c.strategies_requested() == []
    assert not ParallelConfig(world_size=1).vae_parallel_on
    assert "vae_parallel" in ParallelConfig(world_size=2, vae_parallel="on").strategies_requested()
    with pytest.raises(ConfigError, match="parallel.vae_parallel must be true, false or auto"):
        ParallelConfig(world_size=2, vae_parallel="sometimes")
    for flag, value in (("on", True), ("off", False), ("auto", AUTO)):
        args = build_parser().parse_args(["--taco-vae-parallel", flag])
        assert values_from_args(args)["parallel"] == {"vae_parallel": value}
        assert load_config(args, world_size=2).vae_parallel == value


def _vae_decode_with_yaml(rank: int, world: int, paths: dict) -> dict:
    from comfy.taco_dit.core import model_wrapper
    from comfy.taco_dit.core.config_manager import load_config
    from comfy.taco_dit.parallel import vae_parallel
    from comfy.vae import VAE

    vae = VAE(_state_dict(16, False), device=torch.device("cpu"), dtype=torch.float32)
    latent = torch.randn(3, 16, 9, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the model's own forward, chunked as decode(batch_size=2) chunks the batch
        raw = torch.cat([vae.first_stage_model.decode(latent[:2]), vae.first_stage_model.decode(latent[2:])])
        plain = ((raw + 1) / 2).clamp(0, 1).movedim(1, -1)
    out = {}
    for setting in ("auto", "false"):  # auto first: the split decode must leave the model as it was
        model_wrapper.set_runtime(load_config(None, world_size=world, path=paths[setting]))
        vae_parallel.last_decode.clear()
        img = vae.decode(latent, batch_size=2)  # two chunks of the batch
        out[setting] = dict(split=dict(vae_parallel.last_decode), exact=torch.equal(img, plain),
                            diff=(img - plain).abs().max().item(), shape=tuple(img.shape))
    return out


@pytest.mark.slow
def test_vae_decode_follows_the_config(tmp_path):
    paths = {}
    for setting in ("auto", "false"):
        paths[setting] = str(tmp_path / f"{setting}.yaml")
        with open(paths[setting], "w") as f:
            f.write(f"parallel:\n  vae_parallel: {setting}\n")
    for r in run_on_ranks(2, _vae_decode_with_yaml, paths):
        on, off = r["auto"], r["false"]
        assert on["shape"] == off["shape"] == (3, 36, 28, 3)
        assert on["split"]["latent_rows"] == (5, 4) and on["diff"] <= FP32_TOL  # 9 rows: 5 + 4
        assert off["split"] == {} and off["exact"]  # vae_parallel: false -> the model's own forward, bit for bit


def _render_recording(rank, world, models_dir, out_root, prompt, parallel):
    from comfy.taco_dit.parallel import vae_parallel
    from tests.test_parallel_strategies import _render

    vae_parallel.last_decode.clear()
    out = _render(rank, world, models_dir, out_root, prompt, parallel)
    return dict(vae_parallel.last_decode), out


@pytest.mark.slow
def test_vae_decode_node_on_two_ranks_gives_the_one_rank_png(base_dir, tmp_path, models_dir):
    from tests.test_parallel_strategies import _pixels, _prompt, _render

    prompt = _prompt(1.0, 1, None)
    prompt["6"]["inputs"].update(width=96, height=104)  # latent 13 x 12: an uneven split over 2 ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded; so must the reference
    try:
        _, ref = _render(0, 1, models_dir, str(tmp_path / "one"), prompt, {})
    finally:
        torch.set_num_threads(threads)
    # sampling in lockstep (no sampling strategy), so the only split work is the decode
    outs = run_on_ranks(2, _render_recording, models_dir, str(tmp_path / "many"), prompt,
                        dict(cfg_parallel=False, sequence_parallel=False, vae_parallel=True))
    for split, (plan, png) in outs:
        assert plan == (1, 1, 1, 1) and split["latent_rows"] == (7, 6)
        a, b = _pixels(png), _pixels(ref)
        assert a.shape == b.shape == (104, 96, 3)
        diff = np.abs(a - b)
        assert diff.max() <= 1, diff.max()  # an fp32 rounding may move a pixel across an 8-bit boundary
        assert (diff > 0).mean() < 0.02
