"""Do Flux's bias GEMMs leave the SMs idle inside a CUDA graph, and which cuBLAS settings avoid it?

One Flux.1-dev block's GEMMs (1024²: 4608 tokens on one GPU, 2304 a rank on two), each after a small elementwise
kernel as in the model, repeated in one CUDA graph. For each variant: the graph's replay time, the sum of its
kernels' times, how many memsets the graph runs, and the SM idle time between kernels (torch.profiler).

    python benchmarks/probe_gemm_gaps.py --rows 4608 2304 --out $OUT/gemm_gaps.jsonl
    CUBLASLT_WORKSPACE_SIZE=1024 python benchmarks/probe_gemm_gaps.py ...   (a workspace size in KiB, read once)

Variants (in one process): `default`; `no_reduced_reduction` (allow_bf16_reduced_precision_reduction off);
`cublas` (preferred_blas_library("cublas")); `mm_then_bias` (GEMMs without the bias epilogue, the bias added
by a separate kernel: shows whether the memsets come with the epilogue). A variant name ending in `+kernels`
captures with the memset nodes turned into kernel nodes (comfy/taco_dit/utils/graph_memsets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_flux_step import idle_gaps  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy.taco_dit.utils import graph_memsets  # noqa: E402

HIDDEN, MLP = 3072, 12288


def block_ops(rows: int, dev: torch.device, variant: str):
    """The GEMMs of one double block's image stream and one single block, each preceded by a scale (the
    layernorm/modulate stand-in), as a callable."""
    g = torch.Generator(device=dev).manual_seed(0)

    def w(o, i):
        return (torch.randn(o, i, device=dev, dtype=torch.bfloat16, generator=g) * i ** -0.5)

    def b(o):
        return torch.randn(o, device=dev, dtype=torch.bfloat16, generator=g) * 0.02

    x = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16, generator=g)
    qkv_w, qkv_b, proj_w, proj_b = w(3 * HIDDEN, HIDDEN), b(3 * HIDDEN), w(HIDDEN, HIDDEN), b(HIDDEN)
    mlp0_w, mlp0_b, mlp2_w, mlp2_b = w(MLP, HIDDEN), b(MLP), w(HIDDEN, MLP), b(HIDDEN)
    l1_w, l1_b = w(3 * HIDDEN + MLP, HIDDEN), b(3 * HIDDEN + MLP)
    l2_w, l2_b = w(HIDDEN, HIDDEN + MLP), b(HIDDEN)
    plain = variant == "mm_then_bias"

    def lin(inp, wt, bias, gelu=False):
        if plain:
            out = torch.mm(inp, wt.t()).add_(bias)
            return F.gelu(out, approximate="tanh") if gelu else out
        if gelu:
            return torch._addmm_activation(bias, inp, wt.t(), use_gelu=True)
        return torch.addmm(bias, inp, wt.t())

    def run():
        h = x * 1.01  # double block, image stream
        qkv = lin(h, qkv_w, qkv_b)
        a = qkv[:, :HIDDEN] * 1.0
        h = h + lin(a, proj_w, proj_b)
        m = lin(h * 1.01, mlp0_w, mlp0_b, gelu=True)
        h = h + lin(m, mlp2_w, mlp2_b)
        s = h * 1.01  # single block: linear1 in its qkv and mlp parts, linear2 in its attention and mlp parts
        q = lin(s, l1_w[:3 * HIDDEN], l1_b[:3 * HIDDEN])
        m = lin(s, l1_w[3 * HIDDEN:], l1_b[3 * HIDDEN:], gelu=True)
        o = lin(q[:, :HIDDEN] * 1.0, l2_w[:, :HIDDEN], l2_b)
        o.addmm_(m, l2_w[:, HIDDEN:].t())
        return h + o

    return run


def measure(rows: int, variant: str, reps: int, dev: torch.device) -> dict:
    rewrite = variant.endswith("+kernels")
    variant = variant.removesuffix("+kernels")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = variant != "no_reduced_reduction"
    torch.backends.cuda.preferred_blas_library("cublas" if variant == "cublas" else "cublaslt")
    run = block_ops(rows, dev, variant)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = graph_memsets.new_graph() if rewrite else torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            res = run()
    replaced = graph_memsets.finish(graph) if rewrite else None
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    graph_ms = start.elapsed_time(end) / 20
    # the graph's result against the same variant's eager result (a rewrite that wrote the wrong bytes would
    # show here: cuBLAS's kernels rely on what the memsets clear)
    eager = run()
    diff = (res.float() - eager.float()).abs().max().item()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    memsets, kernel_us, sm_events, names = 0, 0.0, [], {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.startswith("Memset"):
            memsets += 1
        else:
            kernel_us += ev.device_time
            sm_events.append((ev.name, ev.time_range.start, ev.time_range.end))
            names[ev.name[:60]] = names.get(ev.name[:60], 0) + 1
    gaps = idle_gaps(sm_events, 6, min_us=1.0)
    del graph
    torch.cuda.synchronize()
    return {"rows": rows, "variant": variant + ("+kernels" if rewrite else ""), "memsets_replaced": replaced,
            "largest_memset_bytes": graph_memsets.largest_replaced() if rewrite else None,
            "workspace_env": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
            "graph_ms_per_block": round(graph_ms / reps, 4), "kernel_ms_per_block": round(kernel_us / 1000 / reps, 4),
            "max_abs_diff_vs_eager": diff, "memsets_per_block": memsets / reps, "sm_idle_ms_per_block":
                round(sum(g["ms"] for g in idle_gaps(sm_events, 10 ** 6, min_us=1.0)) / reps, 4),
            "gaps": gaps, "kernels": names}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[4608, 2304])
    p.add_argument("--variants", nargs="+", default=["default", "default+kernels"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemm_gaps.jsonl"))
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    with torch.inference_mode():
        for rows in args.rows:
            for variant in args.variants:
                rec = {"card": torch.cuda.get_device_name(dev), **measure(rows, variant, args.reps, dev)}
                print(json.dumps(rec), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
