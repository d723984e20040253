"""Where one Flux.1-dev (or, with --model wan, Wan 2.1 14B 832x480x81) transformer step spends its GPU time
(full size, random weights, bf16): torch.profiler
over one forward, kernels grouped into matmul / attention / collectives / copies / the rest, the top kernels,
and how long the GPU sat idle inside the step (wall time of the step minus the union of kernel intervals).

One GPU:  python benchmarks/profile_flux_step.py --sizes 1024 2048 --out $OUT/profile.jsonl
N GPUs:   torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 [--graph]
          (every rank profiles its own step; each rank writes one record)
Wan's guided step under CFG 2 x Ulysses 2 (each rank one prompt of the pair, then the pair's all-gather):
          torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --model wan --config c2u2
At the power limit: --sustain S runs S seconds of back-to-back steps before the profiled window and --steps N
profiles N steps back to back (figures per step), as the sampler runs them. --solo N (one GPU, Flux) runs one
rank's share of ring N alone, without exchanges (benchmarks/solo_rank.py); --solo-push peer|local adds its k/v
traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_flux_step import FLUX_DEV, card, init_random_, inputs, parse_config  # noqa: E402

from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "collective"
    if any(s in n for s in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "ampere_bf16", "cublas")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("memcpy", "copy", "cat", "memset")):
        return "copy"
    return "other"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1000.0


def idle_gaps(events: list[tuple[str, float, float]], top: int, min_us: float = 2.0) -> list[dict]:
    """Where the SMs sat idle inside the step: stretches with no kernel running (copy-engine copies and memsets
    do not count as busy), each put down to the kernel that ended last before it and the one that started
    after it, summed per pair (µs in, ms out), largest first."""
    pairs: dict[tuple[str, str], list[float]] = {}
    last_name, last_end = None, None
    for name, start, end in sorted(events, key=lambda e: e[1]):
        if last_end is not None and start - last_end >= min_us:
            key = (last_name[:70], name[:70])
            pairs.setdefault(key, [0.0, 0])
            pairs[key][0] += (start - last_end) / 1000.0
            pairs[key][1] += 1
        if last_end is None or end >= last_end:
            last_name, last_end = name, end
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"after": a, "before": b, "ms": round(v[0], 3), "count": v[1]} for (a, b), v in ranked]


def timeline(events: list[tuple[str, float, float, int]], around: list[int]) -> list[list[dict]]:
    """Every GPU event (kernels, memcpys, memsets) from the start of attention call a-1 to the start of attention
    call a, for each a in `around` (0-based: for Flux, the 19 double blocks' attentions come first): one layer in
    order, with start and duration in µs from that window's start and the stream, to see what sits in the gaps."""
    events = sorted(events, key=lambda e: e[1])
    starts = [e[1] for e in events if category(e[0]) == "attention"]
    windows = []
    for a in around:
        if not 1 <= a < len(starts):
            continue
        t0, t1 = starts[a - 1], starts[a]
        windows.append([{"name": n[:60], "start_us": round(st - t0, 1), "us": round(en - st, 1), "stream": sid}
                        for n, st, en, sid in events if t0 <= st < t1])
    return windows


def sustain_(fn, seconds: float) -> int:
    """Replay `fn` back to back for about `seconds`, so the GPU settles at its power limit. Every rank runs the
    same count (rank 0's, from two timed calls), since each call holds collectives. -> the count."""
    fn()  # the first call after the profiler's warm-up began can be slow (call s77: 0.86 s): not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    count = torch.tensor([max(1, int(seconds / max((time.perf_counter() - t0) / 2, 1e-3)))], device="cuda")
    if dist.is_initialized():
        dist.broadcast(count, 0)
    for i in range(int(count.item())):
        fn()
        if i % 8 == 7:
            torch.cuda.synchronize()  # a bounded queue: the window starts right after the last of these
    torch.cuda.synchronize()
    return int(count.item()) + 3


def profile_once(fn, top: int, around: list[int] | None = None, sustain: float = 0.0, steps: int = 1) -> dict:
    """One profiled window of `steps` forwards back to back (no host sync between them, as the sampler runs
    them); after 3 warm-up calls, or after `sustain` seconds of back-to-back calls. Kernel sums are per step."""
    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        # the sustained calls run in the profiler's warm-up phase (tracer prepared, not recording), so starting
        # the recording costs the GPU only a short pause
        recorded: list = []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA],
                                    schedule=torch.profiler.schedule(wait=0, warmup=1, active=1),
                                    on_trace_ready=lambda p: recorded.append(list(p.events()))) as prof:
            sustained = sustain_(fn, sustain) if sustain > 0 else 0
            prof.step()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            marks[0].record()
            for i in range(steps):
                fn()
                marks[i + 1].record()
            torch.cuda.synchronize()
            prof.step()
    start, end = marks[0], marks[-1]
    kernels: dict[str, list[float]] = {}
    spans: list[tuple[float, float]] = []
    compute_spans: list[tuple[float, float]] = []
    sm_events: list[tuple[str, float, float]] = []
    all_events: list[tuple[str, float, float, int]] = []
    for ev in recorded[0]:
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, [0.0, 0])
            kernels[ev.name][0] += ev.device_time / 1000.0
            kernels[ev.name][1] += 1
            span = (ev.time_range.start, ev.time_range.end)
            spans.append(span)
            if category(ev.name) != "collective":
                compute_spans.append(span)
            if not ev.name.startswith(("Memcpy", "Memset")):
                sm_events.append((ev.name, *span))
            all_events.append((ev.name, *span, int(getattr(ev, "device_resource_id", -1) or -1)))
    totals: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        totals[category(name)] = totals.get(category(name), 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    n = steps
    return {"step_ms": round(start.elapsed_time(end) / n, 2),
            **({"steps_ms": [round(a.elapsed_time(b), 2) for a, b in zip(marks, marks[1:])],
                "sustained_calls": sustained} if steps > 1 or sustained else {}),
            "gpu_ms_by_category": {k: round(v / n, 2) for k, v in sorted(totals.items())},
            "gpu_ms_total": round(sum(totals.values()) / n, 2),
            "gpu_busy_ms": round(busy_ms(spans) / n, 2),
            "compute_busy_ms": round(busy_ms(compute_spans) / n, 2),
            "kernels": sum(int(v[1]) for v in kernels.values()) // n,
            "sm_idle_ms": round(sum(g["ms"] for g in idle_gaps(sm_events, 10 ** 6)) / n, 2),
            "idle_gaps": idle_gaps(sm_events, top),
            **({"timeline": timeline(all_events, around)} if around else {}),
            "top": [{"kernel": k[:120], "ms": round(v[0] / n, 3), "calls": v[1] // n,
                     "mean_us": round(1000 * v[0] / v[1], 2)} for k, v in ranked]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["flux", "wan"], default="flux")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024], help="Flux image sizes")
    p.add_argument("--config", default="", help="uN / rN / uNrM under torchrun; c2uN etc. (CFG 2 x ...) for Wan")
    p.add_argument("--graph", action="store_true", help="profile a CUDA-graph replay instead of eager")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--timeline", type=int, nargs="*", default=[],
                   help="attention call numbers: list every GPU event of the layer before each (see `timeline`)")
    p.add_argument("--solo", type=int, default=0,
                   help="one GPU runs one rank's share of ring N alone, no exchanges (benchmarks/solo_rank.py)")
    p.add_argument("--solo-push", choices=["peer", "local"], default=None,
                   help="with --solo: also copy the k/v the real step sends, to the other GPU or locally")
    p.add_argument("--sustain", type=float, default=0.0,
                   help="seconds of back-to-back forwards before the profiled window (power limit reached)")
    p.add_argument("--steps", type=int, default=1, help="forwards in the profiled window, back to back; "
                   "the figures are per step")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile.jsonl"))
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    if args.model == "wan":
        from bench_wan_step import WAN_14B
        from bench_wan_step import inputs as wan_inputs

        from comfy.ldm.wan.model import WanModel
        model = WanModel(**WAN_14B, dtype=torch.bfloat16, device=dev).eval()
    else:
        model = Flux(**FLUX_DEV, dtype=torch.bfloat16, device=dev).eval()
    init_random_(model)
    if args.solo:
        if args.model != "flux" or world > 1 or args.solo < 2:
            raise SystemExit("--solo N (N >= 2) is one process's Flux step: no torchrun, no --model wan")
        from solo_rank import solo_forward_orig
        model.forward_orig = solo_forward_orig(args.solo, args.solo_push).__get__(model, type(model))
    cfg_parallel = args.config.startswith("c2")
    if cfg_parallel and (args.model != "wan" or world < 2):
        raise SystemExit("c2... configs (CFG parallel) are for --model wan under torchrun")
    if world > 1:
        from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
        from comfy.taco_dit.parallel.sequence_parallel import flux_forward_orig, wan_forward_orig

        dist.init_process_group("nccl", device_id=dev)
        u, r = parse_config((args.config[2:] if cfg_parallel else args.config) or f"u{world}")
        mesh = ParallelMesh(MeshDims(world_size=world, cfg=2 if cfg_parallel else 1, ulysses=u, ring=r),
                            backend="nccl")
        adapter = wan_forward_orig if args.model == "wan" else flux_forward_orig
        model.forward_orig = adapter(mesh).__get__(model, type(model))
    for size in ([0] if args.model == "wan" else args.sizes):
        if args.model == "wan":
            batch = wan_inputs(WAN_14B, (21, 60, 104), dev, torch.bfloat16)
            call = lambda a, b, c: model(a, b, c)  # noqa: E731
            if cfg_parallel:  # a guided step: this rank's prompt of the pair, then the pair's all-gather
                pair = wan_inputs(WAN_14B, (21, 60, 104), dev, torch.bfloat16, batch=2)
                mine = slice(mesh.cfg.rank_in_group, mesh.cfg.rank_in_group + 1)
                batch = tuple(t[mine] for t in pair)
                call = lambda a, b, c: mesh.cfg.all_gather(model(a, b, c), dim=0)  # noqa: E731
        else:
            x, t, ctx, y, g = inputs(size, dev)
            batch = (x, t, ctx, y, g)
            call = lambda a, b, c, d, e: model(a, b, c, y=d, guidance=e)  # noqa: E731
        if args.graph:
            graphed = CUDAGraphCallable(call)
            fn = lambda: graphed(*batch)  # noqa: E731
        else:
            fn = lambda: call(*batch)  # noqa: E731
        rec = {"model": args.model, "size": size or "832x480x81", "card": card(), "gpus": world, "rank": rank,
               "config": args.config or (f"solo{args.solo}" + (f"+{args.solo_push}" if args.solo_push else "")
                                         if args.solo else None), "mode": "cuda_graph" if args.graph else "eager",
               **profile_once(fn, args.top, args.timeline, args.sustain, args.steps)}
        if rank != 0:
            rec["top"] = rec["top"][:8]
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if dist.is_initialized():
        from comfy.taco_dit.parallel.exchange import release_all

        release_all()  # graphs, then symmetric buffers, or the exit hangs (call s46: 200 s)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
