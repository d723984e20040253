"""Flux under sequence parallel (Ulysses, Ring, USP) over gloo gives the single-process output.

fp32 on CPU. Tolerance 1e-4 absolute: attention sums are reordered (blockwise LSE merge, other key
order) which changes fp32 rounding (~1e-7 per op), and a few layers amplify it; a wrong split, a pad
token used as a key or a misplaced chunk shows up as O(0.1..1) differences.
"""

from __future__ import annotations

import pytest
import torch

from comfy.ldm.flux.model import Flux
from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sequence_parallel import TokenSplit, flux_forward_orig
from tests.parallel_helpers import run_on_ranks

CFG = dict(in_channels=4, out_channels=4, vec_in_dim=16, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
           num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], guidance_embed=True)


def _model_and_inputs(h=8, w=6, txt_len=5, with_ref=False):
    torch.manual_seed(0)
    model = Flux(**CFG).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, h, w, generator=g)
    ctx = torch.randn(1, txt_len, 32, generator=g)
    y = torch.randn(1, 16, generator=g)
    t = torch.tensor([0.7])
    guidance = torch.tensor([3.5])
    refs = [torch.randn(1, 4, 4, 4, generator=g)] if with_ref else None
    return model, (x, t, ctx, y, guidance, refs)


def _worker(rank, world, ulysses, ring, shape):
    model, (x, t, ctx, y, guidance, refs) = _model_and_inputs(**shape)
    mesh = ParallelMesh(MeshDims(world_size=world, ulysses=ulysses, ring=ring))
    model.forward_orig = flux_forward_orig(mesh).__get__(model, Flux)
    with torch.no_grad():
        return model(x, t, ctx, y=y, guidance=guidance, ref_latents=refs)


@pytest.mark.parametrize("world,ulysses,ring,shape", [
    (2, 2, 1, dict(h=8, w=6, txt_len=5)),               # 12 image tokens, 5 text tokens: text padded
    (2, 1, 2, dict(h=6, w=6, txt_len=4, with_ref=True)),  # Kontext reference tokens, ring
    (4, 2, 2, dict(h=10, w=6, txt_len=7)),              # USP 2x2, both streams padded
    (4, 4, 1, dict(h=8, w=8, txt_len=8)),               # divisible: no padding at all
])
def test_flux_sequence_parallel_matches_one_process(world, ulysses, ring, shape):
    model, (x, t, ctx, y, guidance, refs) = _model_and_inputs(**shape)
    with torch.no_grad():
        ref = model(x, t, ctx, y=y, guidance=guidance, ref_latents=refs)
    outs = run_on_ranks(world, _worker, ulysses, ring, shape)
    for out in outs:  # every rank ends with the whole gathered output
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_token_split_rules():
    s = TokenSplit(length=10, degree=4)
    assert (s.padded, s.chunk) == (12, 3)
    keep = s.keep()
    assert keep.sum() == 10 and not keep[3, 1:].any() and keep[3, 0]
    x = torch.arange(10.0).reshape(1, 10)
    assert s.local(x, 3, 1).tolist() == [[9.0, 0.0, 0.0]]
