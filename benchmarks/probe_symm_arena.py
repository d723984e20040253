"""Sub-group exchanges on the world's symmetric arena (exchange.ArenaExchange), on GPUs: correctness against
NCCL's all-to-all on the same pairs, then the time of one Wan-sized exchange both ways.

    torchrun --nproc_per_node=4 benchmarks/probe_symm_arena.py

The mesh is CFG 2 x Ulysses 2 (pairs [0, 1] and [2, 3]), built as the sampler builds it. Each step prints as
it completes, so a hang names its step. The blocks are the Wan layout: one destination's heads of this
rank's tokens, a strided [B, S/P, hp, D] view of [B, S/P, H, D] (sent by 2-D memcpy on copy engines with
`background=True`, by SM copies without). One JSON line per transport and block size.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe_alltoall import init_nccl  # noqa: E402
from probe_attention import bench  # noqa: E402

from comfy.taco_dit.parallel import exchange  # noqa: E402
from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh  # noqa: E402


def say(rank: int, what: str, t0: float) -> None:
    print(f"rank {rank} {time.perf_counter() - t0:7.2f}s {what}", flush=True)


def blocks_of(t: torch.Tensor, p: int) -> torch.Tensor:
    """[P, B, S/P, hp, D] strided view: destination r gets heads r*hp ... (as sp_attention._ulysses_staged)."""
    b, s, h, d = t.shape
    return t.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4)


def timed(fn) -> float:
    """probe_attention.bench, with the ranks lined up first."""
    torch.cuda.synchronize()
    dist.barrier()
    return bench(fn)


def main() -> None:
    dev = init_nccl()
    world, rank = dist.get_world_size(), dist.get_rank()
    t0 = time.perf_counter()
    mesh = ParallelMesh(MeshDims(world_size=world, cfg=2, ulysses=world // 2))
    pair = mesh.ulysses
    p = pair.size
    say(rank, f"mesh built, Ulysses group {pair.ranks}", t0)
    out = os.path.join(os.environ.get("OUT", "."), "symm_arena.jsonl")
    # rank-dependent token counts per CFG half would be legal too; the same here keeps the timing comparable
    for tokens, heads in ((4096, 40), (16380, 40)):
        shape = (1, tokens, heads, 128)
        t = torch.randn(shape, device=dev, dtype=torch.bfloat16) + rank
        blocks = blocks_of(t, p)
        recv_nccl = torch.empty((p, 1, tokens, heads // p, 128), device=dev, dtype=torch.bfloat16)
        pair.all_to_all_single(recv_nccl, blocks.contiguous())
        results = {}
        for transport in ("arena", "nccl"):
            os.environ["TACO_A2A"] = "symm" if transport == "arena" else "nccl"
            ex = pair.exchange(f"probe_{transport}", blocks.shape[1:], t.dtype, dev)
            kind = type(ex).__name__
            for background in (False, True):
                got = ex.start(blocks, background=background).wait().clone()
                torch.cuda.synchronize()
                same = torch.equal(got, recv_nccl)
                say(rank, f"{kind} background={background} {tokens} tokens: equals NCCL's all-to-all: {same}", t0)
                if not same:
                    raise SystemExit(f"rank {rank}: {kind} exchange differs from NCCL's")
                results[(transport, background)] = timed(lambda: ex.start(blocks, background=background).wait())
        if rank == 0:
            mb = blocks[0].numel() * 2 / 2**20
            for (transport, background), ms in results.items():
                line = {"what": "pair exchange", "card": torch.cuda.get_device_name(), "transport": transport,
                        "background": background, "block_mib": round(mb, 1), "ms": round(ms, 3)}
                print(json.dumps(line), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(line) + "\n")
    exchange.release_all()
    dist.destroy_process_group()
    say(rank, "done", t0)


if __name__ == "__main__":
    main()
