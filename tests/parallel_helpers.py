"""Running a function on N gloo processes from a test (torch.multiprocessing, file rendezvous)."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", fn(rank, world, *args))
    except Exception:  # reported to the parent test, which fails with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, fn, *args):
    """Run fn(rank, world, *args) on `world` gloo processes; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as d:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_entry, args=(world, os.path.join(d, "rdzv"), fn, args, results), nprocs=world, join=True)
        out = []
        for r in range(world):
            status, value = results[r]
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            out.append(value)
        manager.shutdown()
        return out
