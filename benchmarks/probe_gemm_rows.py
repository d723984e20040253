"""Does cuBLAS's kernel choice depend on the token count a rank holds? (Wan 14B's 5120 -> 5120 projection ran
16-19 % slower per row at Ulysses 2's 16380 rows than at one GPU's 32760, call s25's kernel probe.)

Times the transformer GEMMs of Wan 2.1 14B and Flux.1-dev (bf16, with bias, as the models call them) at row
counts around the ones sequence parallel gives each rank, on one GPU:

    python3 benchmarks/probe_gemm_rows.py [--model wan flux] [--rows ...] [--orientation linear transposed ...]

`--orientation` (GEMMs without GELU): `linear` is F.linear(x, W, b), [rows, out]; `transposed` computes the
same numbers as W x^T + b, [out, rows] (cuBLAS sees the problem with its m and n swapped, so its heuristic
may choose another kernel); `transposed_copy` adds the copy back to [rows, out] that a model would need.

One JSON line per (model, GEMM, rows) to stdout and $OUT/gemm_rows.jsonl, with the time per 1000 rows so
that counts compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe_attention import bench  # noqa: E402

from comfy.ops import linear_gelu  # noqa: E402

# (name, in features, out features, GELU fused)
GEMMS = {
    "wan": [("proj 5120->5120", 5120, 5120, False), ("ffn up 5120->13824 gelu", 5120, 13824, True),
            ("ffn down 13824->5120", 13824, 5120, False)],
    "flux": [("qkv 3072->9216", 3072, 9216, False), ("single mlp in 3072->12288 gelu", 3072, 12288, True),
             ("single linear2 attn 3072->3072", 3072, 3072, False),
             ("single linear2 mlp 12288->3072", 12288, 3072, False)],
}
# one GPU's tokens and the per-rank counts of 2 and 4 ranks, with the nearby multiples of 8, 64 and 128
ROWS = {
    "wan": [32760, 16380, 16376, 16384, 16448, 8190, 8192],
    "flux": [4608, 2304, 2240, 2368, 1152, 1216],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["wan", "flux"], choices=sorted(GEMMS))
    p.add_argument("--rows", nargs="+", type=int, help="row counts (default: per model)")
    p.add_argument("--orientation", nargs="+", default=["linear"], choices=["linear", "transposed", "transposed_copy"])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemm_rows.jsonl"))
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    with open(args.out, "a") as f, torch.inference_mode():
        for model in args.model:
            for name, k, n, gelu in GEMMS[model]:
                layer = torch.nn.Linear(k, n, device=dev, dtype=dt)
                bias_col = layer.bias[:, None]
                for m in args.rows or ROWS[model]:
                    x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                    variants = {
                        "linear": (lambda: linear_gelu(layer, x)) if gelu
                        else (lambda: F.linear(x, layer.weight, layer.bias)),
                        "transposed": lambda: torch.addmm(bias_col, layer.weight, x.t()),
                        "transposed_copy": lambda: torch.addmm(bias_col, layer.weight, x.t()).t().contiguous(),
                    }
                    for orientation in args.orientation:
                        if gelu and orientation != "linear":
                            continue
                        ms = bench(variants[orientation], iters=30)
                        rec = {"what": "gemm_rows", "model": model, "gemm": name, "rows": m, "ms": round(ms, 4),
                               "ms_per_1000_rows": round(ms * 1000 / m, 5), "orientation": orientation,
                               "card": torch.cuda.get_device_name()}
                        print(json.dumps(rec), flush=True)
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
