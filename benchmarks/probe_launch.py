"""Host-side cost of one q/k norm + RoPE call: the fused kernel's launch vs the PyTorch ops it replaces, on
tensors small enough that the GPU is idle most of the time (what a rank sees under Ulysses at 1024²).

    python benchmarks/probe_launch.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy.ldm.flux.math import rope  # noqa: E402
from comfy.ldm.modules import fused  # noqa: E402


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    for length in (64, 1152):
        qkv = torch.randn(1, length, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
        q = qkv.permute(2, 0, 3, 1, 4)[0]
        freqs = rope(torch.arange(length, device="cuda")[None], 128, 10000.0)[:, None]
        w = torch.ones(128, device="cuda", dtype=torch.bfloat16)
        os.environ["TACO_FUSED_KERNELS"] = "1"
        f = per_call_us(lambda: fused.norm_rope(q, w, 1e-6, freqs))
        os.environ["TACO_FUSED_KERNELS"] = "0"
        r = per_call_us(lambda: fused.norm_rope(q, w, 1e-6, freqs))
        print(json.dumps({"probe": "norm_rope_call_us", "tokens": length, "fused_us": round(f, 1),
                          "pytorch_us": round(r, 1),
                          "card": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
