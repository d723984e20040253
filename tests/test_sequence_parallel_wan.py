"""Wan 2.1 (t2v and i2v) under sequence parallel over gloo gives the single-process output.

fp32 on CPU; tolerance 1e-4 for the same reason as the Flux test (attention sums reordered; a wrong
split, a leaked pad key or cross-attention wrongly split would be O(0.1) off).
"""

from __future__ import annotations

import pytest
import torch

from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sequence_parallel import wan_forward_orig
from tests.parallel_helpers import run_on_ranks

TINY = dict(dim=256, ffn_dim=512, num_layers=2, text_dim=32, freq_dim=256, in_dim_img=48)


def _setup(model_type, frames, h, w):
    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel
    from tests.test_wan_model_oracle import random_wan_state_dict

    sd = random_wan_state_dict(model_type, seed=5, **TINY)
    model = WanModel(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16 if model_type == "t2v" else 36, frames, h, w, generator=g)
    ctx = torch.randn(1, 7, TINY["text_dim"], generator=g)
    clip = torch.randn(1, 5, TINY["in_dim_img"], generator=g) if model_type == "i2v" else None
    return model, (x, torch.tensor([600.0]), ctx, clip)


def _worker(rank, world, ulysses, ring, case):
    model, (x, t, ctx, clip) = _setup(*case)
    mesh = ParallelMesh(MeshDims(world_size=world, ulysses=ulysses, ring=ring))
    model.forward_orig = wan_forward_orig(mesh).__get__(model, type(model))
    with torch.no_grad():
        return model(x, t, ctx, clip_fea=clip)


@pytest.mark.parametrize("world,ulysses,ring,case", [
    (2, 2, 1, ("t2v", 3, 6, 8)),   # 3*3*4 = 36 tokens
    (2, 1, 2, ("i2v", 2, 6, 6)),   # 2*3*3 = 18 tokens, image cross-attention
    (4, 2, 2, ("t2v", 3, 6, 6)),   # 27 tokens: padded to 28
])
def test_wan_sequence_parallel_matches_one_process(world, ulysses, ring, case):
    model, (x, t, ctx, clip) = _setup(*case)
    with torch.no_grad():
        ref = model(x, t, ctx, clip_fea=clip)
    for out in run_on_ranks(world, _worker, ulysses, ring, case):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
