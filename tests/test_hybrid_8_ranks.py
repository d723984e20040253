"""The 8-GPU hybrid layouts of the 8-GPU issue, checked for correctness on 8 gloo processes (CPU):
Ulysses 8, Ulysses 4 x Ring 2, Ulysses 2 x Ring 4 at the model level (Flux with 8 heads, Wan), and
CFG 2 x Ulysses 4 through the whole fork path (executor, KSampler, VAE, PNG) on the demo models.

Tolerances as in test_sequence_parallel_families.py (fp32, 1e-4: reordered attention sums) and
test_parallel_strategies.py (at most 1 level in a few pixels of the 8-bit PNG).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tests.test_parallel_strategies as strategies
import tests.test_sequence_parallel_families as families
from tests.parallel_helpers import run_on_ranks


@pytest.mark.slow
@pytest.mark.parametrize("ulysses,ring", [(8, 1), (4, 2), (2, 4)])
def test_flux_8_rank_sequence_layouts(ulysses, ring):
    # 8 heads of 16 dims so Ulysses 8 divides them; 12 image + 5 text tokens (padded)
    families.TestFlux().check(8, ulysses, ring, dict(h=8, w=6, txt_len=5, hidden_size=128, num_heads=8, depth=1,
                                                     std=0.15))


@pytest.mark.slow
def test_wan_ulysses2_ring4():
    families.TestWan().check(8, 2, 4, dict(model_type="t2v", frames=3, h=6, w=6))


@pytest.mark.slow
def test_cfg2_ulysses4_through_the_fork_path(base_dir, tmp_path, models_dir):
    prompt = strategies._prompt(3.0, 1, "blurry")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, ref = strategies._render(0, 1, models_dir, str(tmp_path / "one"), prompt, {})
    finally:
        torch.set_num_threads(threads)
    outs = run_on_ranks(8, strategies._render, models_dir, str(tmp_path / "many"), prompt,
                        dict(cfg_parallel=True, ulysses_degree=4))
    for plan, got in outs:
        assert plan == (2, 4, 1, 1)
        diff = np.abs(strategies._pixels(got) - strategies._pixels(ref))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02

