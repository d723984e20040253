"""cuBLASLt's fastest bit-identical algorithm (comfy/taco_dit/utils/lt_gemm.py) against PyTorch's own GEMM, for
the linear layers of Wan 2.1 14B and Flux.1 at one GPU's and one rank's token counts (bf16, with bias; the FFN's
first layer with the tanh GELU fused).

    python3 benchmarks/probe_lt_gemm.py [--out lt_gemm.jsonl]

One JSON line per shape: PyTorch's ms, the chosen path's ms (timed after tuning in rounds of rotating order, as
the tuning does: `lt_gemm.time_calls`), how many of cuBLASLt's candidates gave PyTorch's result bit for bit, and
whether cuBLASLt's algorithm was chosen. The Flux shapes are under the default 8192-row threshold: with
TACO_LT_GEMM_MIN_ROWS=2048 they are tuned too (call s62 ran with that threshold and three fixed-order rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy.taco_dit.utils import lt_gemm  # noqa: E402

# (model, rows, in features, out features, gelu)
SHAPES = [(model, rows, k, n, g) for model, rows_list, layers in (
    ("wan", (32760, 16380, 8190), ((5120, 5120, False), (5120, 13824, True), (13824, 5120, False))),
    ("flux", (4608, 2304, 4096, 2048),
     ((3072, 9216, False), (3072, 12288, True), (12288, 3072, False), (15360, 3072, False), (3072, 3072, False))),
) for rows in rows_list for k, n, g in layers]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lt_gemm.jsonl"))
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    with torch.inference_mode(), open(args.out, "a") as out:
        for model, rows, k, n, gelu in SHAPES:
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            b = torch.randn(n, device=dev, dtype=torch.bfloat16)

            def theirs():
                return torch._addmm_activation(b, x, w.t(), use_gelu=True) if gelu else F.linear(x, w, b)

            def ours():
                y = lt_gemm.linear(x, w, b, gelu=gelu)
                return theirs() if y is None else y

            ref = theirs()
            same = torch.equal(ours(), ref)
            stats = lt_gemm.stats().get((rows, n, k, gelu), {})
            t_theirs, t_ours = lt_gemm.time_calls([theirs, ours], rounds=args.rounds, budget_s=0.02)
            rec = dict(model=model, rows=rows, k=k, n=n, gelu=gelu, card=torch.cuda.get_device_name(),
                       torch_ms=round(t_theirs, 4), chosen_ms=round(t_ours, 4), ratio=round(t_ours / t_theirs, 4),
                       identical=same, **stats)
            print(json.dumps(rec), flush=True)
            out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
