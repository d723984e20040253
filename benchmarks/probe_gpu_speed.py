"""Are the GPUs of one machine equally fast? Under sequence parallel the ranks wait for each other at every
exchange, so a step takes as long as its slowest GPU needs for its share: a GPU that is a few per cent slower
(clocks, power) costs that much of the speedup, whatever the exchanges do.

Times the same fixed kernels on one GPU (the kernels a rank runs at Flux 1024² on 2 GPUs and Wan 14B under
CFG 2 x Ulysses 2), in rounds, and samples the SM clock and power through nvidia-smi meanwhile:

    CUDA_VISIBLE_DEVICES=2 python3 benchmarks/probe_gpu_speed.py --tag gpu2      # one GPU on its own
    for g in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$g python3 benchmarks/probe_gpu_speed.py --tag all$g & done; wait

One JSON line per (kernel, round) to stdout and $OUT/gpu_speed.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from probe_attention import bench  # noqa: E402


def smi(index: str) -> dict:
    """SM clock (MHz), power (W) and temperature (C) of the physical GPU `index` now."""
    try:
        line = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        clock, power, temp = (x.strip() for x in line.strip().split(","))
        return {"sm_mhz": float(clock), "power_w": float(power), "temp_c": float(temp)}
    except Exception as e:  # noqa: BLE001 - the timing matters more than the sample
        return {"smi_error": str(e)[:80]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="gpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="per kernel and round")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_speed.jsonl"))
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    physical = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    flux_x, flux_w = rnd(2304, 12288), rnd(3072, 12288)
    wan_x, wan_w = rnd(16380, 5120), rnd(5120, 5120)
    fq, fk = rnd(1, 24, 2304, 128), rnd(1, 24, 4608, 128)
    wq, wk = rnd(1, 20, 32760, 128), rnd(1, 20, 32760, 128)
    kernels = {
        "flux_linear2_mlp_2304": lambda: F.linear(flux_x, flux_w),
        "flux_attention_2304x4608": lambda: F.scaled_dot_product_attention(fq, fk, fk),
        "wan_proj_16380": lambda: F.linear(wan_x, wan_w),
        "wan_attention_20h": lambda: F.scaled_dot_product_attention(wq, wk, wk),
    }
    with open(args.out, "a") as f, torch.inference_mode():
        for rnd_i in range(args.rounds):
            for name, fn in kernels.items():
                t0 = time.time()
                iters = max(5, int(args.seconds * 1000 / bench(fn, iters=3)))  # about --seconds of this kernel
                ms = bench(fn, iters=iters)
                rec = {"what": "gpu_speed", "tag": args.tag, "gpu": physical, "round": rnd_i, "kernel": name,
                       "ms": round(ms, 4), "iters": iters, "wall_s": round(time.time() - t0, 2), **smi(physical),
                       "card": torch.cuda.get_device_name()}
                print(json.dumps(rec), flush=True)
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
