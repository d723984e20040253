"""Do a rank's GEMMs lose under the power limit, and would cuBLASLt algorithms chosen by sustained timing help?

Timed in isolation (milliseconds of work, card below its power limit) Flux's GEMMs at a ring-2 rank's 2304 rows run
as fast per row as one GPU's at 4608 (RESULTS.md, s53 profile), yet the 2-GPU step at the power limit loses more
than its kernels' sum says. Smaller tiles move more operand bytes per FLOP, which costs energy, and under the limit
energy is time. Here, per GEMM shape of a Flux single block (bias; the MLP input with the tanh GELU fused) at 2304
and 4608 rows:

1. every cuBLASLt candidate that gives PyTorch's result bit for bit (`lt_gemm`) and PyTorch's own path are timed
   *sustained*: a CUDA graph of the shape's GEMM over 38 distinct weight sets, replayed for `--per` seconds after the
   card is warm (as `lt_gemm.time_calls` would time them in isolation, too, for comparison);
2. a 38-block stack at a rank's rows (2304, with the attention split of wave_attention) and at one GPU's (4608)
   runs with PyTorch's GEMMs, with the sustained-fastest candidates and with the isolated-fastest ones, alternating
   at the power limit.

    python3 benchmarks/probe_gemm_sustained.py --out $OUT/gemm_sustained.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import probe_attention_tail as pat  # noqa: E402
from probe_attention_tail import alternate, capture, emit  # noqa: E402

from comfy.taco_dit.utils import lt_gemm, wave_attention  # noqa: E402

HIDDEN, MLP, LAYERS, H, D = 3072, 12288, 38, 24, 128
# (name, in features, out features, gelu): linear1's q/k/v rows, its MLP rows (+ GELU), linear2's MLP columns
SHAPES = [("qkv", HIDDEN, 3 * HIDDEN, False), ("mlp_in", HIDDEN, MLP, True), ("mlp_out", MLP, HIDDEN, False)]


def weights(seed: int = 5) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(rows, cols):
        return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=g) * cols ** -0.5

    def b(n):
        return torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1

    out = {name: [(w(n, k), b(n)) for _ in range(LAYERS)] for name, k, n, _ in SHAPES}
    out["attn_out"] = [w(HIDDEN, HIDDEN) for _ in range(LAYERS)]
    return out


class Path:
    """One way to run a GEMM shape: PyTorch's, or a cuBLASLt plan with a fixed algorithm."""

    def __init__(self, plan=None, algo=None):
        self.plan, self.algo = plan, algo

    def __call__(self, x, w, b, gelu):
        if self.plan is None:
            return lt_gemm._torch_path(x, w, b, gelu)
        out = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
        self.plan.run(self.algo, x, w, b.data_ptr(), out)
        return out


def candidates(x, w, b, gelu, exact: bool = True) -> list[Path]:
    """PyTorch's path, then every cuBLASLt candidate bit-identical to it for this shape (with `exact` False: every
    candidate that runs, each path's `diff` its largest difference to PyTorch's result relative to the largest
    value)."""
    lib = lt_gemm._library()
    epi = lt_gemm._EPI_GELU_BIAS if gelu else lt_gemm._EPI_BIAS
    m, k = x.shape
    n = w.shape[0]
    aligns = (lt_gemm._align(w.data_ptr()), lt_gemm._align(x.data_ptr()), 256, 256)
    plan = lt_gemm._Plan(lib, m, n, k, x.stride(0), w.stride(0), lt_gemm._DTYPES[x.dtype], epi, aligns)
    ref = lt_gemm._torch_path(x, w, b, gelu)
    paths = [Path()]
    paths[0].diff = 0.0
    scale = ref.float().abs().max().item()
    for algo in plan.candidates(x.device.index, b.data_ptr()):
        path = Path(plan, algo)
        try:
            got = path(x, w, b, gelu)
        except RuntimeError:
            continue
        path.diff = (got.float() - ref.float()).abs().max().item() / scale
        if not exact or path.diff == 0.0:
            paths.append(path)
    return paths


def sustained(paths: list[Path], x, ws, gelu, per: float) -> list[float]:
    """ms of one GEMM per path, each replaying a graph of the GEMM over every weight set for `per` seconds."""
    out = []
    for path in paths:
        gr = capture(lambda path=path: [path(x, w, b, gelu) for w, b in ws])
        gr.replay()
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        while time.perf_counter() - t0 < per:
            gr.replay()
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize()
        e.record()
        e.synchronize()
        out.append(a.elapsed_time(e) / (n * len(ws)))
    return out


def stack(rows: int, ws: dict, linear: dict, attention) -> callable:
    """38 single blocks at `rows` rows; `linear[name]` runs each GEMM shape; `attention(q)` the attention."""
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def fwd():
        h = x
        for i in range(LAYERS):
            qkv = linear["qkv"](h, *ws["qkv"][i], False)
            m = linear["mlp_in"](h, *ws["mlp_in"][i], True)
            part = linear["mlp_out"](m, *ws["mlp_out"][i], False)
            q = qkv.view(1, rows, 3, H, D).permute(2, 0, 3, 1, 4)[0]
            a = attention(q).transpose(1, 2).reshape(rows, HIDDEN)
            h = torch.addmm(part, a, ws["attn_out"][i].t())
        return h
    return fwd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--per", type=float, default=0.3, help="seconds of sustained timing per candidate")
    ap.add_argument("--seconds", type=float, default=12.0, help="seconds of alternating stack timing")
    ap.add_argument("--inexact", action="store_true",
                    help="every candidate, not only bit-identical ones, at a rank's rows of the single and double "
                         "blocks (2304, 2048), each GEMM timed sustained with its difference to PyTorch's result")
    args = ap.parse_args()
    pat.OUT_PATH = args.out
    torch.manual_seed(0)
    ws = weights()
    # warm the card to its power limit before the first sustained timing
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        warm @ warm
    torch.cuda.synchronize()
    if args.inexact:
        with torch.inference_mode():
            for rows in (2304, 2048):
                for name, kin, _n, gelu in SHAPES:
                    x = torch.randn(rows, kin, device="cuda", dtype=torch.bfloat16)
                    paths = candidates(x, *ws[name][0], gelu, exact=False)
                    sus = sustained(paths, x, ws[name], gelu, args.per)
                    emit({"part": "gemm_inexact", "rows": rows, "shape": name, "torch_sustained_ms": round(sus[0], 4),
                          "candidates": [{"ms": round(t, 4), "vs_torch": round(t / sus[0], 4),
                                          "rel_diff": float(f"{p.diff:.3g}"), "waves": round(p.algo.waves, 3)}
                                         for p, t in zip(paths[1:], sus[1:])]})
        return
    with torch.inference_mode():
        for rows in (2304, 4608):
            full = pat.packed(4608, 7)
            _, k, v = pat.qkv_views(full)
            chosen = {"torch": {}, "sustained": {}, "isolated": {}}
            for name, kin, _n, gelu in SHAPES:
                x = torch.randn(rows, kin, device="cuda", dtype=torch.bfloat16)
                paths = candidates(x, *ws[name][0], gelu)
                sus = sustained(paths, x, ws[name], gelu, args.per)
                iso = lt_gemm.time_calls([lambda p=p: p(x, *ws[name][0], gelu) for p in paths])
                best_s = min(range(len(paths)), key=sus.__getitem__)
                best_i = min(range(len(paths)), key=iso.__getitem__)
                emit({"part": "gemm", "rows": rows, "shape": name, "identical": len(paths) - 1,
                      "torch_sustained_ms": round(sus[0], 4), "best_sustained_ms": round(sus[best_s], 4),
                      "best_sustained": best_s, "torch_isolated_ms": round(iso[0], 4),
                      "best_isolated_ms": round(iso[best_i], 4), "best_isolated": best_i,
                      "sustained_of_isolated_best": round(sus[best_i], 4),
                      "all_sustained": [round(t, 4) for t in sus], "all_isolated": [round(t, 4) for t in iso]})
                chosen["torch"][name] = paths[0]
                chosen["sustained"][name] = paths[best_s]
                chosen["isolated"][name] = paths[best_i]
            if rows == 2304:
                q0 = pat.qkv_views(pat.packed(rows, 1))[0]
                wave_attention.sdpa(q0, k, v)  # decide this shape's split (eager)
                split = wave_attention.decisions().get(wave_attention._key(q0, k, v))

                def attention(q, split=split):
                    return wave_attention.run_split(split, q, k, v) if split else pat.torch_sdpa(q, k, v)
            else:
                def attention(q):
                    return pat.torch_sdpa(q, k, v)
            graphs = {how: capture(stack(rows, ws, chosen[how], attention)) for how in chosen}
            alternate(graphs, args.seconds, "torch", {"part": "stack", "rows": rows})


if __name__ == "__main__":
    main()
