"""Uneven token shares for a ring of two GPUs that do not run at the same speed.

Under the gathered ring every layer waits for the peer's keys, so a step goes at the slower GPU's pace. Two GPUs
of one machine, both at their power limit, can differ by several per cent: in call s78 (benchmarks/RESULTS.md,
thirteenth session) one H200 ran the 1-GPU Flux step 3.4 % slower than its neighbour, and in the 2-GPU step the
faster rank spent 2.6 ms of its 69 ms waiting for the other at the exchanges. Giving the faster GPU
proportionally more image tokens evens that out.

`image_sizes(mesh, ...)` gives the per-rank image token counts for Flux's ring 2 (None: the even split). The
shares come from `TACO_SP_BALANCE`:

* `auto` (default): on CUDA, once per process at the first eligible forward outside graph capture, every rank
  of the pair times the same GEMM loop at the same moment (`measure_rate`); the shares follow the measured
  rates when they differ by more than `DEAD_BAND`, else the split stays even;
* `off`: always even;
* explicit shares, e.g. `0.49,0.51` (rank order; normalised).

Only the image stream is shifted, by multiples of `QUANTUM` tokens; the text stays split evenly, and a text
stream that would need padding keeps the even split. The placement of the uneven rows in the exchange buffers,
which keeps every real key contiguous, is `sp_attention.ring_rows`.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

ENV = "TACO_SP_BALANCE"
DEAD_BAND = 0.01  # rates closer than this stay on the even split (the measurement's noise)
QUANTUM = 16  # image tokens are moved in steps of this many
_GEMM_SHAPE = (2304, 3072, 12288)  # a Flux single block's MLP input GEMM at a ring-2 rank's rows
_REPS = 20  # GEMMs per captured graph


def setting() -> str | tuple[float, ...]:
    """"auto", "off", or explicit shares (positive, normalised to sum 1)."""
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw in ("auto", "off"):
        return raw
    if raw in ("0", "false", "no", "even"):
        return "off"
    try:
        shares = tuple(float(x) for x in raw.split(","))
    except ValueError:
        shares = ()
    if len(shares) < 2 or any(not s > 0 for s in shares):
        raise ValueError(f"{ENV}={raw!r}: use auto, off, or one positive share per rank, e.g. {ENV}=0.49,0.51")
    total = sum(shares)
    return tuple(s / total for s in shares)


def shares_from_rates(rates: list[float], dead_band: float = DEAD_BAND) -> tuple[float, ...] | None:
    """Shares proportional to `rates`, or None where they are within `dead_band` of each other (or unusable)."""
    if len(rates) < 2 or any(not r > 0 for r in rates):
        return None
    if max(rates) / min(rates) - 1 < dead_band:
        return None
    total = sum(rates)
    return tuple(r / total for r in rates)


def split_sizes(length: int, shares: tuple[float, ...], quantum: int = QUANTUM) -> tuple[int, ...] | None:
    """Token counts per rank for `shares` of `length`: every cut on a multiple of `quantum`, each rank at least
    one quantum; None where that leaves the even split (or `length` is too short to move anything)."""
    p = len(shares)
    if length < 2 * p * quantum:
        return None
    cuts, acc = [0], 0.0
    for s in shares[:-1]:
        acc += s
        cut = int(round(acc * length / quantum)) * quantum
        cuts.append(min(max(cut, cuts[-1] + quantum), length - (p - len(cuts)) * quantum))
    cuts.append(length)
    sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]))
    even = length // p
    return None if length % p == 0 and all(n == even for n in sizes) else sizes


def measure_rate(device: torch.device, seconds: float = 1.0, warm_s: float = 0.5) -> float:
    """GEMMs per second of `_GEMM_SHAPE` (bf16) on `device`, replayed back to back from a CUDA graph for `warm_s`
    and then timed for about `seconds` (by CUDA events), so the GPU runs at its sustained, power-limited pace."""
    m, k, n = _GEMM_SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        torch.matmul(a, b.t(), out=out)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(_REPS):
            torch.matmul(a, b.t(), out=out)

    def run_for(duration: float) -> int:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            for _ in range(4):
                graph.replay()
            done += 4
            torch.cuda.synchronize(device)
        return done

    run_for(warm_s)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replays = run_for(seconds)
    stop.record()
    stop.synchronize()
    return replays * _REPS / (start.elapsed_time(stop) / 1000.0)


def decided_shares(group, device: torch.device) -> tuple[float, ...] | None:
    """This group's shares (see the module docstring), decided once and kept on the group. Collective over
    `group` the first time under `auto` on CUDA: every rank must call it at the same point (they run the same
    forward). None: the even split. Inside a CUDA-graph capture nothing is measured (even split, not kept)."""
    if hasattr(group, "_balance_shares"):
        return group._balance_shares
    want = setting()
    if want == "off":
        shares = None
    elif isinstance(want, tuple):
        if len(want) != group.size:
            raise ValueError(f"{ENV} gives {len(want)} shares for a sequence group of {group.size} ranks")
        shares = want
    elif device.type != "cuda" or group.size < 2:
        shares = None
    elif torch.cuda.is_current_stream_capturing():
        return None
    else:
        import torch.distributed as dist

        dist.barrier(group=group.group, device_ids=[device.index])
        rate = measure_rate(device)
        rates = group.all_gather(torch.tensor([rate], device=device, dtype=torch.float64)).tolist()
        shares = shares_from_rates(rates)
        group._balance_rates = rates
        log.info("Sequence-parallel balance (%s=auto): GEMM rates %s per s on ranks %s -> %s", ENV,
                 [round(r) for r in rates], group.ranks,
                 "even split" if shares is None else "token shares " + ", ".join(f"{s:.4f}" for s in shares))
    group._balance_shares = shares
    return shares


def describe(group) -> str:
    """What the group runs with, for logs and benchmark records: "even" or the shares, and the measured rates."""
    shares = getattr(group, "_balance_shares", None)
    rates = getattr(group, "_balance_rates", None)
    text = "even" if shares is None else "/".join(f"{s:.4f}" for s in shares)
    return text + (f" (GEMM/s {', '.join(f'{r:.0f}' for r in rates)})" if rates else "")
