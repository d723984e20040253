"""Where does torch's symmetric memory hang on sub-groups? A CFG 2 x Ulysses 2 run with symmetric-memory
exchanges on its two Ulysses pairs hung at 4 GPUs (benchmarks/RESULTS.md, fourth session). This walks the
same steps one at a time and prints each as it completes, so the last line printed names the step that
hangs:

    torchrun --nproc_per_node=4 benchmarks/probe_symm_subgroups.py [--world-first]

1. every rank builds both pair groups ([0, 1] and [2, 3]) with new_group, as ParallelMesh does;
2. (--world-first) a rendezvous on the whole world first;
3. each rank allocates a symmetric buffer and rendezvouses on its own pair;
4. a device barrier on the pair, then one exchange checked against NCCL's all-to-all on the pair.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe_alltoall import init_nccl  # noqa: E402

from comfy.taco_dit.parallel.exchange import enable_group  # noqa: E402


def say(rank: int, what: str, t0: float) -> None:
    print(f"rank {rank} {time.perf_counter() - t0:7.2f}s {what}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world-first", action="store_true")
    args = p.parse_args()
    import torch.distributed._symmetric_memory as symm_mem

    dev = init_nccl()
    world, rank = dist.get_world_size(), dist.get_rank()
    t0 = time.perf_counter()
    pairs = [list(range(i, min(i + 2, world))) for i in range(0, world, 2)]
    groups = [dist.new_group(ranks) for ranks in pairs]
    mine = groups[rank // 2]
    say(rank, f"groups built: {pairs}", t0)
    if args.world_first:
        w = symm_mem.empty(1024, dtype=torch.bfloat16, device=dev)
        symm_mem.rendezvous(w, dist.group.WORLD.group_name)
        say(rank, "world rendezvous done", t0)
    enable_group(mine.group_name)
    n = 1 << 20
    buf = symm_mem.empty(2 * n, dtype=torch.bfloat16, device=dev)
    say(rank, "symmetric buffer allocated", t0)
    handle = symm_mem.rendezvous(buf, mine.group_name)
    say(rank, "pair rendezvous done", t0)
    handle.barrier(channel=0)
    torch.cuda.synchronize()
    say(rank, "pair device barrier done", t0)
    me = dist.get_rank(mine)
    send = torch.randn(2 * n, device=dev, dtype=torch.bfloat16)
    peers = [handle.get_buffer(r, (2, n), torch.bfloat16) for r in range(2)]
    for r in range(2):
        peers[r][me].copy_(send[r * n:(r + 1) * n])
    handle.barrier(channel=0)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=mine)
    same = torch.equal(peers[me].reshape(-1), recv)
    say(rank, f"pair exchange equals NCCL's: {same}", t0)
    del peers, handle, buf
    torch.cuda.synchronize()
    dist.destroy_process_group()
    say(rank, "process group destroyed", t0)


if __name__ == "__main__":
    main()
