"""All-to-all bandwidth on this machine's GPUs at the message sizes Ulysses sends (NCCL, torch.distributed),
to compare NCCL settings. Each NCCL setting needs its own process group, so run once per setting:

    torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag default
    NCCL_PROTO=Simple torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag proto_simple
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

# (name, bytes each rank holds): Ulysses' q/k/v exchange per attention call
SIZES = {"flux1024_u4_qkv": 1152 * 9216 * 2, "flux1024_u2_qkv": 2304 * 9216 * 2,
         "flux2048_u4_qkv": 4224 * 9216 * 2, "wan14b_u4_qkv": 8190 * 15360 * 2}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="default")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "alltoall.jsonl"))
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    world, rank = dist.get_world_size(), dist.get_rank()
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    for name, nbytes in SIZES.items():
        n = nbytes // 2 // world * world
        send = torch.randn(n, device=dev, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        times = []
        for i in range(5 + args.iters):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_to_all_single(recv, send)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        moved = n * 2 * (world - 1) / world  # bytes each rank sends to the others
        if rank == 0:
            rec = {"probe": "all_to_all", "tag": args.tag, "nccl_env": env, "gpus": world, "message": name,
                   "mbytes_per_rank": round(n * 2 / 1e6, 1), "ms": round(ms, 3),
                   "send_gbps_per_rank": round(moved / ms / 1e6, 1), "card": torch.cuda.get_device_name(0),
                   "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
            print(json.dumps(rec), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
