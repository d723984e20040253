"""Flux.1-dev through the full fork path on 1 and N GPUs: API-format prompt -> executor (with the
multi-rank lockstep) -> KSampler -> parallel plan -> model -> VAEDecode -> SaveImage PNG.

    python benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu            # baseline
    torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --config u4 --tag u4

The models are full-size with random weights: the diffusion model is a Flux.1-dev state dict in the BFL
checkpoint layout generated on the GPU and loaded by the real loader (comfy.sd.load_diffusion_model_
state_dict: detection, dtype choice, ModelPatcher); the VAE is a full-size Flux AE state dict loaded by
comfy.vae.VAE. Text encoding is replaced by random conditioning of T5-XXL / CLIP-L shape (it is a few
milliseconds of a multi-second run and needs tokenizer files these machines cannot fetch). The HTTP hop
is left out: each rank runs execution.PromptExecutor on the same prompt with the real Lockstep agreement
points, exactly what the follower loop does after rank 0 hands it the prompt.

Rank 0 appends a JSON line per run to --out with the median step time (CUDA events recorded at each sampler
step's progress callback, without synchronising, so the host runs ahead as it does in service), the end-to-end time (execute() start -> PNG on disk) and, if --reference names a 1-GPU
PNG, the largest 8-bit pixel difference to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, qkv_bias=True, guidance_embed=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_like_shapes(shapes: dict, device, dtype, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if len(shape) == 1 and ("norm" in k or k.endswith(".scale")):
            out[k] = torch.ones(shape, device=device, dtype=dtype)
        else:
            out[k] = torch.randn(shape, device=device, dtype=dtype, generator=g) * 0.02
    return out


class BenchRandomFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "benchmark"

    def load(self, seed):
        import comfy.model_management as mm
        import comfy.sd
        from comfy.ldm.flux.model import Flux

        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Flux(**FLUX_DEV).state_dict().items()}
        sd = random_like_shapes(shapes, mm.get_torch_device(), torch.bfloat16, seed)
        return (comfy.sd.load_diffusion_model_state_dict(sd, source="random full-size Flux.1-dev"),)


class BenchRandomFluxVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "benchmark"

    def load(self, seed):
        import comfy.vae
        from comfy.ldm.models.autoencoder import AutoencoderKL

        with torch.device("meta"):
            m = AutoencoderKL(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, in_channels=3, out_ch=3,
                              z_channels=16, quant_conv=False, post_quant_conv=False)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        sd = random_like_shapes(shapes, "cpu", torch.float32, seed)
        return (comfy.vae.VAE(sd),)


class BenchRandomCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 2, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "benchmark"

    def encode(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 512, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]],)


NODES = {"BenchRandomFlux": BenchRandomFlux, "BenchRandomFluxVAE": BenchRandomFluxVAE,
         "BenchRandomCond": BenchRandomCond}


def prompt(size: int, steps: int) -> dict:
    return {
        "1": {"class_type": "BenchRandomFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "BenchRandomFluxVAE", "inputs": {"seed": 1}},
        "3": {"class_type": "BenchRandomCond", "inputs": {"seed": 2}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["7", 0]}},
    }


def parse_config(name: str) -> dict:
    import re

    m = re.fullmatch(r"(?:cfg(\d))?(?:u(\d+))?(?:r(\d+))?", name or "")
    if not m:
        raise SystemExit(f"bad --config {name!r}")
    out = {}
    if m.group(1):
        out["cfg_parallel"] = True
    if m.group(2):
        out["ulysses_degree"] = int(m.group(2))
    if m.group(3):
        out["ring_degree"] = int(m.group(3))
    if not m.group(1):
        out["cfg_parallel"] = False
    return out


def profile_host(args, rank: int, nodes, model_base, vae_module) -> None:
    """--profile-host: Python profiles (cProfile) of the host's work in the run before the last (so the reported
    last run carries no profiler overhead; use --runs 3 or more), from the KSampler node's entry to the model's
    first call, and of VAE.decode and SaveImage, written as text beside --out as host_<tag>_rank<r>.txt."""
    import cProfile
    import io
    import pstats

    state: dict = {"runs": 0, "prof": None}
    out = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"host_{args.tag}_rank{rank}.txt")

    def dump(title: str, prof) -> None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        with open(out, "a") as f:
            f.write(f"== {title}\n{text.getvalue()}\n")

    ksampler, apply_model = nodes.common_ksampler, model_base.BaseModel.apply_model

    def k(*a, **kw):
        state["runs"] += 1
        if state["runs"] == args.runs - 1:
            state["prof"] = cProfile.Profile()
            state["prof"].enable()
        return ksampler(*a, **kw)

    def first_call(self, *a, **kw):
        if state["prof"] is not None:
            state["prof"].disable()
            dump("KSampler entry -> first model call", state["prof"])
            state["prof"] = None
        return apply_model(self, *a, **kw)

    def whole(title: str, inner):
        def wrapper(*a, **kw):
            if state["runs"] != args.runs - 1:
                return inner(*a, **kw)
            prof = cProfile.Profile()
            prof.enable()
            try:
                return inner(*a, **kw)
            finally:
                prof.disable()
                dump(title, prof)
        return wrapper

    nodes.common_ksampler, model_base.BaseModel.apply_model = k, first_call
    vae_module.VAE.decode = whole("VAE.decode", vae_module.VAE.decode)
    nodes.SaveImage.save_images = whole("SaveImage.save_images", nodes.SaveImage.save_images)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--config", default="", help="'' (auto), uN, rN, uNrM, cfg2uN ...")
    p.add_argument("--tag", default="run")
    p.add_argument("--runs", type=int, default=2, help="the first run includes loading; the last is reported")
    p.add_argument("--reference", default=None, help="1-GPU PNG to compare with")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fork_e2e.jsonl"))
    p.add_argument("--workdir", default="/tmp/taco-bench")
    p.add_argument("--profile-host", action="store_true",
                   help="cProfile the last run's KSampler set-up and VAE.decode (host_<tag>_rank<r>.txt)")
    p.add_argument("--tiny", action="store_true", help="smoke test on CPU with a tiny Flux")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="optimization.use_cuda_graph (auto: on when the model is split over GPUs)")
    args = p.parse_args()
    from comfy.taco_dit.utils import gemm_tuning

    gemm_tuning.configure()  # TACO_TUNE_GEMM=1: TunableOp (see there)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the console's per-rank "Sampling:" lines
    graph_setting = {"auto": "auto", "on": True, "off": False}[args.cuda_graph]
    if args.tiny:
        FLUX_DEV.update(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)

    import comfy.cli_args

    comfy.cli_args.parse_args([])
    import comfy.utils
    import execution
    import folder_paths
    import nodes
    from comfy.taco_dit.core import model_wrapper
    from comfy.taco_dit.core.config_manager import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    folder_paths.set_base_path(os.path.join(args.workdir, f"{args.tag}-rank{rank}"))
    folder_paths.create_directories()
    nodes.init_extra_nodes(init_custom_nodes=False)
    nodes.NODE_CLASS_MAPPINGS.update(NODES)

    lockstep = None
    if world > 1:
        from comfy.taco_dit.core.distributed_manager import init_distributed
        from comfy.taco_dit.core.execution_engine import (
            FollowerServer,
            Lockstep,
            install_runtime,
            install_step_agreement,
        )

        config = ParallelConfig(world_size=world, optimization={"use_cuda_graph": graph_setting},
                                **parse_config(args.config))
        dm = init_distributed(cpu=not torch.cuda.is_available(), follower_timeout=120.0, parallel_config=config, start_heartbeat=False)
        lockstep = Lockstep(dm)
        install_step_agreement(lockstep)
        install_runtime(dm, config, lockstep)  # as main.py's run() does (SaveImage's shared PNG encode)
        model_wrapper.set_runtime(config)
        server = FollowerServer()
    else:
        from comfy.taco_dit.core.execution_engine import FollowerServer

        server = FollowerServer()
        model_wrapper.set_runtime(ParallelConfig(world_size=1, optimization={"use_cuda_graph": graph_setting}))

    # step timing: the sampler's ProgressBar passes every step through the global hook, which records a CUDA
    # event there (no synchronisation: the host runs ahead as it does without the benchmark); on CPUs the
    # host clock
    stamps: list = []
    inner_setter = comfy.utils.set_progress_bar_global_hook

    def mark():
        if torch.cuda.is_available():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(a, b) -> float:
        return a.elapsed_time(b) / 1000 if torch.cuda.is_available() else b - a

    def timing_hook(inner):
        def hook(value, total, preview=None, node_id=None):
            stamps.append(mark())
            if inner is not None:
                return inner(value, total, preview, node_id)
        return hook

    def set_hook(function):
        inner_setter(timing_hook(function))

    comfy.utils.set_progress_bar_global_hook = set_hook

    # the phase after sampling, split: VAE decode (GPU synchronised) and the PNG written by SaveImage
    import comfy.vae

    phases: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            _sync()
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                _sync()
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)

    if args.profile_host:
        import comfy.model_base

        profile_host(args, rank, nodes, comfy.model_base, comfy.vae)
    timed(comfy.vae.VAE, "decode", "vae_decode_s")
    timed(nodes.SaveImage, "save_images", "save_image_s")

    # the phase before the first step, split (host clock, no synchronisation): execute() start -> KSampler
    # node entered -> the model's first call (the GPU then runs the first step)
    import comfy.model_base

    host: dict[str, float] = {}

    def stamp_entry(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            host.setdefault(label, time.perf_counter())
            return inner(*a, **k)
        setattr(owner, name, wrapper)

    stamp_entry(nodes, "common_ksampler", "ksampler")
    stamp_entry(comfy.model_base.BaseModel, "apply_model", "first_model_call")

    def graphed() -> bool:  # did the sampler run the model as a CUDA graph?
        return any(key[1] == "graph" for key in model_wrapper._wrapped_forwards)

    ex = execution.PromptExecutor(server, lockstep=lockstep)
    record = None
    for run in range(args.runs):
        # a new seed each run: the loaders stay cached (as between a user's prompts), the sampler,
        # VAE decode and save run again
        pr = prompt(args.size, args.steps)
        pr["6"]["inputs"]["seed"] = 42 + run
        stamps.clear()
        phases.clear()
        host.clear()
        if lockstep is not None:
            lockstep.begin(f"bench-{run}")
        _sync()
        t0 = time.perf_counter()
        start = mark()
        ex.execute(pr, f"bench-{run}", {}, ["8"])
        if lockstep is not None:
            lockstep.finish(ex.success)
        _sync()
        t1 = time.perf_counter()
        if not ex.success:
            raise SystemExit(f"rank {rank}: prompt failed: {ex.status_messages[-1]}")
        steps = [seconds(a, b) for a, b in zip(stamps, stamps[1:])]
        img = ex.history_result["outputs"]["8"]["images"][0]
        png = os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"])
        plan = model_wrapper.last_plan()
        record = {"date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "gpus": world,
                  "model": "flux1-dev", "width": args.size, "height": args.size, "frames": 1,
                  "config": (plan.describe() if plan and world > 1 else "1 GPU")
                  + (" + CUDA graph" if graphed() else ""), "path": "fork", "run": run,
                  "steps": args.steps, "step_ms": round(statistics.median(steps) * 1000, 2) if steps else None,
                  "end_to_end_s": round(t1 - t0, 3), "png": png, "tag": args.tag}
        if len(stamps) >= 2:
            # phases: before the first step (loaders, text, noise, plan), the steps, after the last step
            # (VAE decode, image to CPU, PNG written); the first step's time is estimated by the median
            step = statistics.median(steps)
            first, last = seconds(start, stamps[0]), seconds(start, stamps[-1])
            record.update(pre_sampling_s=round(first - step, 3), sampling_s=round(last - first + step, 3),
                          post_sampling_s=round(t1 - t0 - last, 3))
        record.update({k: round(v, 3) for k, v in phases.items()})
        if "ksampler" in host and "first_model_call" in host:
            record.update(to_ksampler_s=round(host["ksampler"] - t0, 4),
                          ksampler_to_first_call_s=round(host["first_model_call"] - host["ksampler"], 4))
        from comfy.ldm.modules.attention import attention_backend

        record["attention"] = attention_backend()
    if rank == 0:
        if args.reference and os.path.isfile(args.reference):
            import numpy as np
            from PIL import Image

            a = np.asarray(Image.open(record["png"]).convert("RGB")).astype(int)
            b = np.asarray(Image.open(args.reference).convert("RGB")).astype(int)
            record["max_abs_diff_vs_1gpu"] = int(np.abs(a - b).max())
            record["mean_abs_diff_vs_1gpu"] = round(float(np.abs(a - b).mean()), 4)
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    if world > 1:
        dm.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as the fork's ranks do: no interpreter teardown on the torn-down group


if __name__ == "__main__":
    main()
