"""SD3 / SD3.5 (MMDiT) under sequence parallel over gloo gives the single-process output, including
SD3.5-medium's second (image-only) attention and padding of both token streams.

fp32 on CPU; tolerance 1e-4 as in the Flux and Wan tests (reordered attention sums only).
"""

from __future__ import annotations

import pytest
import torch

from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sequence_parallel import mmdit_forward_orig
from tests.parallel_helpers import run_on_ranks


def _setup(variant, h, w, txt):
    import comfy.model_detection
    from comfy.ldm.mmdit.model import MMDiT
    from tests.test_sd3_oracle import TINY, VARIANTS, random_mmdit_state_dict

    sd = random_mmdit_state_dict(**TINY, **VARIANTS[variant], seed=3)
    model = MMDiT(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, h, w, generator=g)
    ctx = torch.randn(1, txt, TINY["context_in_dim"], generator=g)
    y = torch.randn(1, TINY["adm_in_channels"], generator=g)
    return model, (x, torch.tensor([500.0]), ctx, y)


def _worker(rank, world, ulysses, ring, case):
    model, (x, t, ctx, y) = _setup(*case)
    mesh = ParallelMesh(MeshDims(world_size=world, ulysses=ulysses, ring=ring))
    model.forward_orig = mmdit_forward_orig(mesh).__get__(model, type(model))
    with torch.no_grad():
        return model(x, t, context=ctx, y=y)


@pytest.mark.parametrize("world,ulysses,ring,case", [
    (2, 2, 1, ("sd3.5-large", 8, 10, 9)),   # 20 image tokens, 9 text tokens (padded)
    (2, 1, 2, ("sd3.5-medium", 6, 10, 7)),  # attn2 over image tokens only; 15 image tokens (padded)
    (4, 2, 2, ("sd3.5-medium", 8, 8, 6)),
])
def test_mmdit_sequence_parallel_matches_one_process(world, ulysses, ring, case):
    model, (x, t, ctx, y) = _setup(*case)
    with torch.no_grad():
        ref = model(x, t, context=ctx, y=y)
    for out in run_on_ranks(world, _worker, ulysses, ring, case):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
