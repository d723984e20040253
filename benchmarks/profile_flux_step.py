"""Where one Flux.1-dev transformer step spends its GPU time (full size, random weights, bf16, one GPU):
torch.profiler over one forward, kernels grouped into matmul / attention / the rest, and the top kernels.

    python benchmarks/profile_flux_step.py --size 1024 --out $OUT/profile.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_flux_step import FLUX_DEV, card, init_random_, inputs  # noqa: E402

from comfy.ldm.flux.model import Flux  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "ampere_bf16", "cublas")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile.jsonl"))
    args = p.parse_args()
    dev = torch.device("cuda")
    model = Flux(**FLUX_DEV, dtype=torch.bfloat16, device=dev).eval()
    init_random_(model)
    for size in args.sizes:
        x, t, ctx, y, g = inputs(size, dev)
        with torch.inference_mode():
            for _ in range(3):
                model(x, t, ctx, y=y, guidance=g)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(x, t, ctx, y=y, guidance=g)
                torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kernels.setdefault(ev.name, [0.0, 0])
                kernels[ev.name][0] += ev.device_time / 1000.0
                kernels[ev.name][1] += 1
        totals: dict[str, float] = {}
        for name, (ms, _) in kernels.items():
            totals[category(name)] = totals.get(category(name), 0.0) + ms
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
        rec = {"size": size, "card": card(), "gpu_ms_by_category": {k: round(v, 2) for k, v in totals.items()},
               "gpu_ms_total": round(sum(totals.values()), 2),
               "top": [{"kernel": k[:120], "ms": round(v[0], 3), "calls": v[1]} for k, v in top]}
        print(json.dumps(rec, indent=1), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
