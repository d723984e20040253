"""Per-step cost of the Flux.1-dev transformer (full size, random weights, bf16): ours vs diffusers on one
GPU, and ours under sequence parallel on N GPUs, with the N-GPU output checked against one GPU.

One GPU (baselines):   python benchmarks/bench_flux_step.py --sizes 1024 2048 [--compile] [--diffusers]
N GPUs (one config each): torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 \
                             --configs u4 u2r2 r4
Config names: uN = Ulysses N, rN = Ring N, uNrM = both. Results are appended as JSON lines to --out.
Timing: CUDA events around one transformer forward (= one denoising step at cfg 1), median of --iters
after --warmup runs. Weights are random (normal, std 0.02) and identical on every rank (same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.ldm.modules.attention import attention_backend, set_attention_backend  # noqa: E402
from comfy.taco_dit.parallel.exchange import release_all  # noqa: E402
from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh  # noqa: E402
from comfy.taco_dit.parallel.sequence_parallel import flux_forward_orig  # noqa: E402
from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable  # noqa: E402

FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, qkv_bias=True, guidance_embed=True)
TXT_TOKENS = 512


def init_random_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def inputs(size: int, device, dtype=torch.bfloat16, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    lat = size // 8
    x = torch.randn(1, 16, lat, lat, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, TXT_TOKENS, 4096, device=device, dtype=dtype, generator=g)
    y = torch.randn(1, 768, device=device, dtype=dtype, generator=g)
    t = torch.full((1,), 0.6, device=device, dtype=dtype)
    guidance = torch.full((1,), 3.5, device=device, dtype=dtype)
    return x, t, ctx, y, guidance


def time_fn(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def parse_config(name: str) -> tuple[int, int]:
    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?", name)
    if not m or not (m.group(1) or m.group(2)):
        raise SystemExit(f"bad config name {name!r}: use uN, rN or uNrM")
    return int(m.group(1) or 1), int(m.group(2) or 1)


def emit(out_path: str, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def wave_label() -> str:
    """The attention splits this rank chose (comfy/taco_dit/utils/wave_attention.py), e.g. "22/3", or "off"."""
    from comfy.taco_dit.utils import wave_attention
    if not wave_attention.ENABLED:
        return "off"
    chosen = sorted({f"{s.main}/{s.parts}" for s in wave_attention.decisions().values() if s is not None})
    return ",".join(chosen) or "none chosen"


def card() -> str:
    return torch.cuda.get_device_name(0)


def attention_backends(names: list[str]) -> list[str]:
    """The --attention choices to loop over ("sdpa": torch's default kernel, "cudnn": cuDNN's fused one)."""
    return names or [attention_backend()]


def variants(attention: list[str], fused: list[str]) -> list[tuple[str, str]]:
    """(attention kernel, fused q/k kernels "on"/"off") pairs to time; sets nothing yet (see use_variant)."""
    return [(a, f) for f in fused for a in attention_backends(attention)]


def use_variant(backend: str, fused: str) -> None:
    set_attention_backend(backend)
    os.environ["TACO_FUSED_KERNELS"] = {"on": "1", "off": "0"}[fused]


def fused_label():
    """What results record as "fused": true / false."""
    return os.environ.get("TACO_FUSED_KERNELS", "1") != "0"


def diffusers_attention(name: str):
    """Context for timing diffusers: its own default ("default"), or SDPA forced to cuDNN / FlashAttention-2."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "cudnn":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)
    if name == "flash":  # FlashAttention-2, SDPA's choice on builds that do not prefer cuDNN
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True)
    return contextlib.nullcontext()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def run_single(args) -> None:
    dev = torch.device("cuda", 0)
    model = Flux(**FLUX_DEV, dtype=torch.bfloat16, device=dev).eval()
    init_random_(model)
    for size in args.sizes:
        x, t, ctx, y, g = inputs(size, dev)
        first = None
        for backend, fused in variants(args.attention, args.fused):
            use_variant(backend, fused)
            with torch.inference_mode():
                out = model(x, t, ctx, y=y, guidance=g)
                ms = time_fn(lambda: model(x, t, ctx, y=y, guidance=g), args.warmup, args.iters)
            extra = {} if first is None else {"rel_l2_vs_first_attention": rel_l2(out, first)}
            first = out if first is None else first
            emit(args.out, {"impl": "taco-dit", "mode": "eager", "attention": backend, "fused": fused_label(), "gpus": 1, "size": size,
                            "step_ms": round(ms, 2), "card": card(), "torch": torch.__version__, **extra})
            if args.graph:
                graphed = CUDAGraphCallable(lambda a, b, c, d, e: model(a, b, c, y=d, guidance=e))
                with torch.inference_mode():
                    ms = time_fn(lambda: graphed(x, t, ctx, y, g), args.warmup, args.iters)
                    vs_eager = (graphed(x, t, ctx, y, g).float() - out.float()).abs().max().item()
                emit(args.out, {"impl": "taco-dit", "mode": "cuda_graph", "attention": backend, "fused": fused_label(), "gpus": 1,
                                "size": size, "step_ms": round(ms, 2), "max_abs_diff_vs_eager": vs_eager,
                                "graph_memsets": os.environ.get("TACO_GRAPH_MEMSETS", "kernel"), "card": card()})
                del graphed
            if args.compile:
                compiled = torch.compile(model)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    compiled(x, t, ctx, y=y, guidance=g)
                    torch.cuda.synchronize()
                    ctime = time.perf_counter() - t0
                    ms = time_fn(lambda: compiled(x, t, ctx, y=y, guidance=g), args.warmup, args.iters)
                emit(args.out, {"impl": "taco-dit", "mode": "compile", "attention": backend, "fused": fused_label(), "gpus": 1,
                                "size": size, "step_ms": round(ms, 2), "compile_s": round(ctime, 1),
                                "card": card()})
        set_attention_backend(None)
    model = None  # free the weights before the diffusers model is built
    torch.cuda.empty_cache()
    if args.diffusers:
        from diffusers import FluxTransformer2DModel

        with torch.device(dev):
            ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True,
                                         axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).eval()
        init_random_(ref)
        for size in args.sizes:
            lat = size // 8
            tokens = (lat // 2) ** 2
            gen = torch.Generator(device=dev).manual_seed(1)
            hs = torch.randn(1, tokens, 64, device=dev, dtype=torch.bfloat16, generator=gen)
            ehs = torch.randn(1, TXT_TOKENS, 4096, device=dev, dtype=torch.bfloat16, generator=gen)
            pooled = torch.randn(1, 768, device=dev, dtype=torch.bfloat16, generator=gen)
            img_ids = torch.zeros(tokens, 3, device=dev)
            img_ids[:, 1] = torch.arange(lat // 2, device=dev).repeat_interleave(lat // 2)
            img_ids[:, 2] = torch.arange(lat // 2, device=dev).repeat(lat // 2)
            txt_ids = torch.zeros(TXT_TOKENS, 3, device=dev)
            ts = torch.full((1,), 0.6, device=dev, dtype=torch.bfloat16)
            gd = torch.full((1,), 3.5, device=dev, dtype=torch.bfloat16)

            def step():
                return ref(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=ts,
                           img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)

            for name in args.diffusers_attention:
                with torch.inference_mode(), diffusers_attention(name):
                    ms = time_fn(step, args.warmup, args.iters)
                emit(args.out, {"impl": "diffusers", "mode": "eager", "attention": name, "gpus": 1, "size": size,
                                "step_ms": round(ms, 2), "card": card()})


def run_parallel(args) -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    model = Flux(**FLUX_DEV, dtype=torch.bfloat16, device=dev).eval()
    init_random_(model)
    original = model.forward_orig
    meshes = {}
    for size in args.sizes:
        x, t, ctx, y, g = inputs(size, dev)
        for backend, fused in variants(args.attention, args.fused):
            use_variant(backend, fused)
            run_parallel_configs(args, model, original, meshes, size, (x, t, ctx, y, g), backend, rank, world)
    print(json.dumps({"rank": rank, "wave_attention": wave_label()}), flush=True)
    release_all()
    dist.destroy_process_group()


def run_parallel_configs(args, model, original, meshes, size, batch, backend, rank, world) -> None:
    x, t, ctx, y, g = batch
    with torch.inference_mode():
        reference = model(x, t, ctx, y=y, guidance=g) if rank == 0 else None
    for cfg_name in args.configs:
        u, r = parse_config(cfg_name)
        if u * r != world:
            if rank == 0:
                print(f"skip {cfg_name}: needs {u * r} ranks, have {world}", flush=True)
            continue
        mesh = meshes.get((u, r))
        if mesh is None:
            mesh = meshes[(u, r)] = ParallelMesh(MeshDims(world_size=world, ulysses=u, ring=r), backend="nccl")
        model.forward_orig = flux_forward_orig(mesh).__get__(model, Flux)
        for mode in ["eager"] + (["cuda_graph"] if args.graph else []):
            try:
                if mode == "eager":
                    fn = lambda: model(x, t, ctx, y=y, guidance=g)  # noqa: E731
                else:
                    graphed = CUDAGraphCallable(lambda a, b, c, d, e: model(a, b, c, y=d, guidance=e))
                    fn = lambda: graphed(x, t, ctx, y, g)  # noqa: E731
                with torch.inference_mode():
                    out = fn()
                    ms = time_fn(fn, args.warmup, args.iters)
            except Exception as e:  # report and go on with the next configuration
                if rank == 0:
                    emit(args.out, {"gpus": world, "size": size, "config": cfg_name, "mode": mode,
                                    "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            if rank == 0:
                diff = (out.float() - reference.float()).abs()
                rel = (diff.norm() / reference.float().norm()).item()
                emit(args.out, {"impl": "taco-dit", "mode": mode, "attention": backend, "fused": fused_label(), "gpus": world,
                                "size": size, "config": cfg_name, "step_ms": round(ms, 2), "max_abs_diff_vs_1gpu":
                                round(diff.max().item(), 5), "rel_l2_vs_1gpu": round(rel, 5), "card": card(),
                                "wave_attention": wave_label()})
        model.forward_orig = original


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--diffusers", action="store_true")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replay of the forward")
    p.add_argument("--attention", nargs="*", default=[], choices=["sdpa", "cudnn"],
                   help="attention kernels to time ours with (default: the automatic choice)")
    p.add_argument("--fused", nargs="*", default=["on"], choices=["on", "off"],
                   help="with / without the fused q/k norm + RoPE kernels (comfy/ldm/modules/fused.py)")
    p.add_argument("--diffusers-attention", nargs="*", default=["default"], choices=["default", "cudnn", "flash"],
                   help="diffusers as shipped ('default') and/or with SDPA forced to cuDNN")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "flux_step.jsonl"))
    args = p.parse_args()
    from comfy.taco_dit.utils import gemm_tuning

    gemm_tuning.configure()  # TACO_TUNE_GEMM=1: TunableOp (see there)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_parallel(args)
    else:
        run_single(args)


if __name__ == "__main__":
    main()
