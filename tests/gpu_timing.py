"""Wall-clock timing for the GPU-only tests (tests/test_*_gpu.py): mean seconds per call after warm-ups."""

from __future__ import annotations

import time

import torch


def mean_seconds(fn, iters: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters
