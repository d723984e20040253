"""Where the time of the row-split (multi-GPU) Flux VAE decode goes: full-size random-weight Flux VAE loaded
through the real comfy.vae.VAE (BenchRandomFluxVAE), one seeded [1, 16, size/8, size/8] latent made on the CPU
(the same on every rank).

    torchrun --nproc_per_node=4 benchmarks/bench_vae_parallel.py --out FILE        # GPUs (NCCL)
    torchrun --nproc_per_node=2 benchmarks/bench_vae_parallel.py --size 128 --repeat 2 --out /tmp/x.jsonl  # CPU (gloo)
    python benchmarks/bench_vae_parallel.py --size 128                             # one process

Measurements (rank 0 prints one JSON line each and appends them to --out; ms are median and min over --repeat
after 2 warm-up runs, each repetition starting with a cuda synchronize + barrier on every rank):
  whole_1gpu       rank 0 alone runs first_stage_model.decode(z) (the others wait at a barrier), GPU-synced;
  split_decode     vae_parallel.decode(model, z, world_group()) on all ranks: wall ms (GPU-synced, rank 0), host
                   issue ms (until the call returns), last_decode, max abs diff to whole_1gpu (rank 0, fp32);
                   both of these with TACO_VAE_FAST_GN=0 and =1 (autoencoder.fast_group_norm_enabled reads the
                   variable at every GroupNorm, so setting os.environ between calls switches it); on GPUs with
                   the statistics pass the split decode replays a CUDA graph (vae_parallel.graph_applies;
                   TACO_VAE_GRAPH=0 in the environment measures it eagerly);
  to_image         vae._to_image(decoded) of the full decoded image (every rank at once, as _decode_parallel does);
  vae_decode_full  VAE.decode's path: vae._decode_parallel(latent_cpu, 4, world_group()) on world > 1 (what
                   VAE.decode dispatches to when decode_group splits), vae.decode(latent_cpu) on world 1;
  split_profile    (CUDA only) torch.profiler CUDA activity of one split decode on rank 0: device ms by
                   category, kernel count, top 12 kernels, host wall ms of the profiled run;
  save_image_uint8 the float -> uint8 step of the [1, H, W, 3] float32 CPU image, numpy vs one torch pass (rank 0;
                   SaveImage now runs it in row blocks on the PNG threads: nodes.image_to_uint8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WARMUP = 2


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_all() -> None:
    """Every rank's device idle and every rank at this point."""
    sync()
    if dist.is_initialized():
        dist.barrier()
    sync()


def timed(fn, repeat: int, active: bool = True):
    """(wall ms list, host issue ms list, last result) of `fn` on this rank; every rank calls this, those
    with `active` False only join the barriers (they wait while the others run)."""
    walls, issues, out = [], [], None
    for i in range(WARMUP + repeat):
        sync_all()
        if not active:
            continue
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        if i >= WARMUP:
            issues.append((t1 - t0) * 1e3)
            walls.append((t2 - t0) * 1e3)
    return walls, issues, out


def stats(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {f"{name}_median": round(statistics.median(values), 3), f"{name}_min": round(min(values), 3)}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("nchwtonhwc", "nhwctonchw")):  # cuDNN's layout transforms around a conv
        return "copy_memcpy"
    if any(s in n for s in ("conv", "implicit", "xmma", "cudnn", "sm90", "sm80", "gemm", "cutlass", "winograd")):
        return "conv"
    if any(s in n for s in ("norm", "reduce", "moments", "welford")):
        return "norm_reduce"
    if any(s in n for s in ("memcpy", "memset", "copy", "catarray", "pad")):
        return "copy_memcpy"
    return "elementwise_other"


def profile_split(decode_split, rank: int) -> dict | None:
    """CUDA-activity profile of one split decode on rank 0 (the other ranks run it unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    sync_all()
    if rank != 0:
        decode_split()
        sync()
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        decode_split()
        sync()
        host_ms = (time.perf_counter() - t0) * 1e3
    cats: dict[str, float] = {}
    top, kernels = [], 0
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us <= 0:
            continue
        cats[category(ev.key)] = cats.get(category(ev.key), 0.0) + us / 1e3
        if not ev.key.lower().startswith(("memcpy", "memset")):
            kernels += ev.count
        top.append((us / 1e3, ev.key[:100], ev.count))
    top.sort(reverse=True)
    return {"what": "split_profile", "host_wall_ms": round(host_ms, 3),
            "device_ms_total": round(sum(cats.values()), 3),
            "device_ms_by_category": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "kernels": kernels,
            "top": [{"kernel": k, "ms": round(ms, 3), "calls": n} for ms, k, n in top[:12]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side = size / 8)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON lines are appended here (rank 0)")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")

    from bench_fork_e2e import BenchRandomFluxVAE

    from comfy.ldm.models import autoencoder
    from comfy.taco_dit.parallel import vae_parallel
    from comfy.taco_dit.parallel.mesh import GroupHandle

    group = vae_parallel.world_group() if dist.is_initialized() else GroupHandle([0], None, 0)
    vae = BenchRandomFluxVAE().load(1)[0]
    model = vae.first_stage_model
    latent = torch.randn(1, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    z = latent.to(vae.device, vae.vae_dtype)
    common = {"card": torch.cuda.get_device_name() if cuda else "cpu", "world": world, "size": args.size,
              "dtype": str(vae.vae_dtype).replace("torch.", ""), "repeat": args.repeat, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    lines = []

    def emit(d: dict) -> None:
        if rank != 0:
            return
        d = {**d, **common}
        print(json.dumps(d), flush=True)
        lines.append(d)

    def decode_whole():
        with torch.no_grad():
            return model.decode(z)

    def decode_split():
        return vae_parallel.decode(model, z, group)

    # 1-3: whole (rank 0) vs split (all ranks), with torch's GroupNorm and with the statistics pass
    saved_env = os.environ.get("TACO_VAE_FAST_GN")
    split_out, wholes = None, {}
    for fast_gn in ("0", "1"):
        os.environ["TACO_VAE_FAST_GN"] = fast_gn
        applies = autoencoder.statistics_pass_applies(z)
        walls, _, whole = timed(decode_whole, args.repeat, active=rank == 0)
        wholes[fast_gn] = whole
        emit({"what": "whole_1gpu", "fast_gn_env": fast_gn, "statistics_pass": applies, **stats("ms", walls)})
        vae_parallel.last_decode.clear()
        walls, issues, split_out = timed(decode_split, args.repeat)
        rec = {"what": "split_decode", "fast_gn_env": fast_gn, "statistics_pass": applies, **stats("ms", walls),
               **stats("host_issue_ms", issues), "last_decode": dict(vae_parallel.last_decode)}
        if rank == 0:
            rec["max_abs_diff_vs_whole"] = max_abs_diff(split_out, whole)
        emit(rec)
    if rank == 0:
        emit({"what": "whole_fast_gn_1_vs_0", "max_abs_diff": max_abs_diff(wholes["1"], wholes["0"])})
    wholes.clear()
    if saved_env is None:
        os.environ.pop("TACO_VAE_FAST_GN")
    else:
        os.environ["TACO_VAE_FAST_GN"] = saved_env

    # 4: the decoded image to the CPU IMAGE (every rank does this in _decode_parallel)
    walls, issues, _ = timed(lambda: vae._to_image(split_out), args.repeat)
    emit({"what": "to_image", "shape": list(split_out.shape), "all_ranks": True, **stats("ms", walls),
          **stats("host_issue_ms", issues)})

    # 5: VAE.decode's whole path, latent on the CPU -> IMAGE on the CPU
    if world > 1:
        how = "vae._decode_parallel(latent_cpu, 4, world_group())"
        walls, _, image = timed(lambda: vae._decode_parallel(latent, 4, group), args.repeat)
    else:
        how = "vae.decode(latent_cpu)"
        walls, _, image = timed(lambda: vae.decode(latent), args.repeat)
    emit({"what": "vae_decode_full", "call": how, **stats("ms", walls)})

    # 6: kernel-level split of one split decode (rank 0)
    if cuda:
        rec = profile_split(decode_split, rank)
        if rec is not None:
            emit(rec)

    # 7: SaveImage's float -> uint8 on the CPU (rank 0; torch threads as the environment sets them)
    def to_u8_numpy():
        return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)

    def to_u8_torch():
        return (image * 255.0).clamp_(0, 255).to(torch.uint8)

    np_walls, _, a = timed(to_u8_numpy, args.repeat, active=rank == 0)
    t_walls, _, b = timed(to_u8_torch, args.repeat, active=rank == 0)
    if rank == 0:
        emit({"what": "save_image_uint8", "shape": list(image.shape), "torch_threads": torch.get_num_threads(),
              **stats("numpy_ms", np_walls), **stats("torch_ms", t_walls),
              "identical": bool(np.array_equal(a, b.numpy())),
              "max_abs_diff": int(np.abs(a.astype(np.int16) - b.numpy().astype(np.int16)).max())})

    if rank == 0 and args.out:
        with open(args.out, "a") as f:
            for d in lines:
                f.write(json.dumps(d) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
