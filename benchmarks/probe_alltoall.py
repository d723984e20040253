"""All-to-all bandwidth on this machine's GPUs at the message sizes Ulysses sends, to compare transports.

`--transport nccl` (default): torch.distributed's all_to_all_single on NCCL. Each NCCL setting needs its own
process group, so run once per setting:

    torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag default
    NCCL_PROTO=Simple torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag proto_simple

`--transport symm`: every rank writes its blocks straight into the peers' receive buffers over NVLink
(torch's symmetric memory: buffers mapped into every rank's address space, one multi-tensor copy kernel,
then a device-side barrier), double-buffered so one barrier per exchange suffices. `--transport symm_ce`:
the same, but each block goes by its own device-to-device memcpy (the GPUs' copy engines, leaving the SMs to
compute). Results are checked against NCCL's before they are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy.taco_dit.parallel.exchange import enable_group  # noqa: E402

# (name, bytes each rank holds): Ulysses' q/k/v exchange per attention call
SIZES = {"flux1024_u4_out": 1152 * 3072 * 2, "flux1024_u4_qkv": 1152 * 9216 * 2, "flux1024_u2_qkv": 2304 * 9216 * 2,
         "flux2048_u4_qkv": 4224 * 9216 * 2, "wan14b_u4_qkv": 8190 * 15360 * 2}


def init_nccl() -> torch.device:
    """This torchrun rank's GPU, made current, with the NCCL process group up."""
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    return dev


def symm_all_to_all(n: int, dtype, dev, copy_engine: bool = False):
    """An all-to-all over symmetric memory for messages of `n` elements per rank (see the module docstring):
    returns fn(send) -> the received [n] tensor (valid until the exchange after next)."""
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    enable_group(group.group_name)
    buf = symm_mem.empty(2 * n, dtype=dtype, device=dev)
    handle = symm_mem.rendezvous(buf, group.group_name)
    peers = [handle.get_buffer(p, (2, n), dtype) for p in range(world)]
    chunk = n // world
    phase = [0]

    def exchange(send: torch.Tensor) -> torch.Tensor:
        ph = phase[0]
        phase[0] ^= 1
        dst = [peers[p][ph, rank * chunk:(rank + 1) * chunk] for p in range(world)]
        src = [send[p * chunk:(p + 1) * chunk] for p in range(world)]
        if copy_engine:
            for p in range(world):  # own block first (local), then the peers in ring order
                q = (rank + p) % world
                dst[q].copy_(src[q])
        else:
            torch._foreach_copy_(dst, src)
        handle.barrier(channel=ph)
        return peers[rank][ph]

    return exchange


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="default")
    p.add_argument("--transport", choices=["nccl", "symm", "symm_ce"], default="nccl")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "alltoall.jsonl"))
    args = p.parse_args()
    dev = init_nccl()
    world, rank = dist.get_world_size(), dist.get_rank()
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    for name, nbytes in SIZES.items():
        n = nbytes // 2 // world * world
        send = torch.randn(n, device=dev, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        if args.transport.startswith("symm"):
            try:
                exchange = symm_all_to_all(n, torch.bfloat16, dev, copy_engine=args.transport == "symm_ce")
                same = torch.equal(exchange(send), recv)
            except Exception as e:  # noqa: BLE001 - report and go on
                if rank == 0:
                    print(json.dumps({"probe": "all_to_all", "transport": args.transport, "message": name,
                                      "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
                continue
            fn = lambda: exchange(send)  # noqa: E731
        else:
            same = True
            fn = lambda: dist.all_to_all_single(recv, send)  # noqa: E731
        times = []
        for i in range(5 + args.iters):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        moved = n * 2 * (world - 1) / world  # bytes each rank sends to the others
        if rank == 0:
            rec = {"probe": "all_to_all", "transport": args.transport, "equals_nccl": same, "tag": args.tag,
                   "nccl_env": env, "gpus": world, "message": name,
                   "mbytes_per_rank": round(n * 2 / 1e6, 1), "ms": round(ms, 3),
                   "send_gbps_per_rank": round(moved / ms / 1e6, 1), "card": torch.cuda.get_device_name(0),
                   "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
            print(json.dumps(rec), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
