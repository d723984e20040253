"""Per-step cost of the Wan 2.1 14B t2v transformer (random weights, bf16) at 832x480, 81 frames
(21 x 30 x 52 = 32760 video tokens, 512 text tokens): ours vs diffusers on one GPU, and ours under
sequence parallel on N GPUs with the output checked against one GPU.

One GPU:  python benchmarks/bench_wan_step.py [--graph] [--diffusers]
N GPUs:   torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --configs u4 u2r2 [--graph]
With guidance (--cfg): one denoising step evaluates the positive and the negative prompt, as a Wan workflow
at cfg != 1 does. One GPU runs them as one batch of 2 (ComfyUI's calc_cond_batch) and as two batches of 1;
N GPUs add configs "c2uN" (CFG parallel 2: each half of the ranks runs one prompt under Ulysses N, then the
CFG pair all-gathers, as the sampler's CFG-parallel hook does) next to "uN" on the batch of 2:
          torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 u4
Smoke test on a CPU: python benchmarks/bench_wan_step.py --tiny --diffusers --device cpu

Timing and output format as benchmarks/bench_flux_step.py (whose helpers this reuses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_flux_step import (  # noqa: E402
    attention_backends,
    card,
    diffusers_attention,
    emit,
    fused_label,
    init_random_,
    parse_config,
    rel_l2,
    time_fn,
    use_variant,
    variants,
)

from comfy.ldm.modules.attention import set_attention_backend  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402
from comfy.taco_dit.parallel.exchange import release_all  # noqa: E402
from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh  # noqa: E402
from comfy.taco_dit.parallel.sequence_parallel import wan_forward_orig  # noqa: E402
from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable  # noqa: E402

WAN_14B = dict(model_type="t2v", dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, in_dim=16, out_dim=16,
               num_heads=40, num_layers=40)
TINY = dict(model_type="t2v", dim=256, ffn_dim=512, freq_dim=256, text_dim=64, in_dim=16, out_dim=16,
            num_heads=2, num_layers=2)


def inputs(cfg, latent_thw, device, dtype, seed=1, batch=1):
    """Latent, timestep and text context; batch 2 = [positive, negative] of one guided step (the latent and
    timestep repeated, two different contexts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, 16, *latent_thw, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(batch, 512, cfg["text_dim"], device=device, dtype=dtype, generator=g)
    t = torch.full((1,), 700.0, device=device, dtype=dtype)
    return x.expand(batch, *x.shape[1:]).contiguous(), t.expand(batch).contiguous(), ctx


def parse_wan_config(name: str) -> tuple[int, int, int]:
    """(cfg, ulysses, ring) of a config name: an optional "c2" in front of bench_flux_step's uN / rN / uNrM."""
    cfg = 2 if name.startswith("c2") else 1
    u, r = parse_config(name[2:] if cfg == 2 else name)
    return cfg, u, r


def diffusers_wan(cfg, device, dtype):
    from diffusers import WanTransformer3DModel

    # built directly in the target dtype: a 14B model in fp32 first would need 56 GB on the card
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = WanTransformer3DModel(num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["dim"] // cfg["num_heads"],
                                      in_channels=16, out_channels=16, text_dim=cfg["text_dim"],
                                      freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"],
                                      num_layers=cfg["num_layers"]).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    return m


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--graph", action="store_true")
    p.add_argument("--cfg", action="store_true", help="a guided step: positive + negative (see the docstring)")
    p.add_argument("--diffusers", action="store_true")
    p.add_argument("--attention", nargs="*", default=[], choices=["sdpa", "cudnn"],
                   help="attention kernels to time ours with (default: the automatic choice; N GPUs: the first)")
    p.add_argument("--fused", nargs="*", default=["on"], choices=["on", "off"])
    p.add_argument("--diffusers-attention", nargs="*", default=["default"], choices=["default", "cudnn", "flash"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--context-side-work", nargs="*", default=["on"], choices=["on", "off"],
                   help="N GPUs: the cross-attention's context k/v as the self-attention's side work (A/B)")
    p.add_argument("--ulysses-return", nargs="*", default=[None], choices=["slots", "blocks"],
                   help="N GPUs: TACO_ULYSSES_RETURN for each timing in turn (A/B of sp_attention._send_back)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "wan_step.jsonl"))
    args = p.parse_args()
    from comfy.taco_dit.utils import gemm_tuning

    gemm_tuning.configure()  # TACO_TUNE_GEMM=1: TunableOp (see there)
    cfg = TINY if args.tiny else WAN_14B
    latent = (3, 6, 8) if args.tiny else (21, 60, 104)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if world > 1 and on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(args.device)
        if world > 1:
            dist.init_process_group("gloo")

    def timed(fn):
        if on_gpu:
            return time_fn(fn, args.warmup, args.iters)
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    model = WanModel(**cfg, dtype=dtype, device=dev).eval()
    if on_gpu:
        init_random_(model)
    else:
        torch.manual_seed(0)  # identical weights on every rank
        for q in model.parameters():
            torch.nn.init.normal_(q, std=0.02)
    x, t, ctx = inputs(cfg, latent, dev, dtype, batch=2 if args.cfg else 1)
    name = "card" if on_gpu else "cpu"
    where = card() if on_gpu else name
    guided = {"cfg_step": True} if args.cfg else {}
    with torch.inference_mode():
        if world == 1:
            first = None
            for backend, fused in variants(args.attention if on_gpu else ["sdpa"], args.fused):
                use_variant(backend, fused)
                out = model(x, t, ctx)
                ms = timed(lambda: model(x, t, ctx))
                extra = {} if first is None else {"rel_l2_vs_first_attention": rel_l2(out, first)}
                first = out if first is None else first
                emit(args.out, {"impl": "taco-dit", "model": "wan2.1-t2v-14b", "mode": "eager", "attention": backend, "fused": fused_label(),
                                "gpus": 1, "step_ms": round(ms, 2), "card": where, **guided, **extra})
                if args.cfg:  # the guided pair as two batches of 1 (the faster of the two is the baseline)
                    ms = timed(lambda: [model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]) for i in range(2)])
                    emit(args.out, {"impl": "taco-dit", "model": "wan2.1-t2v-14b", "mode": "eager_two_batches",
                                    "attention": backend, "fused": fused_label(), "gpus": 1, "step_ms": round(ms, 2),
                                    "card": where, **guided})
                if args.graph and on_gpu:
                    graphed = CUDAGraphCallable(lambda a, b, c: model(a, b, c))
                    ms = timed(lambda: graphed(x, t, ctx))
                    emit(args.out, {"impl": "taco-dit", "model": "wan2.1-t2v-14b", "mode": "cuda_graph",
                                    "attention": backend, "fused": fused_label(), "gpus": 1, "step_ms": round(ms, 2),
                                    "card": where, **guided})
                    del graphed
            set_attention_backend(None)
            first = out = None
            if args.diffusers:
                model = None
                if on_gpu:
                    torch.cuda.empty_cache()
                ref = diffusers_wan(cfg, dev, dtype)
                if on_gpu:
                    init_random_(ref)
                for name in args.diffusers_attention if on_gpu else ["default"]:
                    with diffusers_attention(name):
                        ms = timed(lambda: ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                               return_dict=False))
                    emit(args.out, {"impl": "diffusers", "model": "wan2.1-t2v-14b", "mode": "eager", "attention": name,
                                    "gpus": 1, "step_ms": round(ms, 2), "card": where, **guided})
            return
        backend = attention_backends(args.attention if on_gpu else ["sdpa"])[0]
        use_variant(backend, args.fused[0])
        reference = model(x, t, ctx) if dist.get_rank() == 0 else None
        for name in args.configs:
            c, u, r = parse_wan_config(name)
            if c * u * r != world or (c == 2 and not args.cfg):
                continue
            mesh = ParallelMesh(MeshDims(world_size=world, cfg=c, ulysses=u, ring=r),
                                backend="nccl" if on_gpu else "gloo")
            model.forward_orig = wan_forward_orig(mesh).__get__(model, WanModel)
            # CFG parallel: this rank's half of the pair, then the pair's all-gather (the sampler hook's work)
            mine = slice(mesh.cfg.rank_in_group, mesh.cfg.rank_in_group + 1) if c == 2 else slice(None)
            xs, ts, cs = x[mine], t[mine], ctx[mine]
            cross = type(model.blocks[0].cross_attn)
            own_context_kv = cross.context_kv
            for side, mode, ret in [(v, m, r) for r in args.ulysses_return for v in args.context_side_work
                                    for m in ["eager"] + (["cuda_graph"] if args.graph else [])]:
                if ret is not None:
                    os.environ["TACO_ULYSSES_RETURN"] = ret
                if side == "off":  # the cross-attention computes its context k/v itself, after the self-attention
                    cross.context_kv = lambda self, *a: None
                run = (lambda: model(xs, ts, cs)) if mode == "eager" else \
                    (lambda g=CUDAGraphCallable(lambda a, b, c: model(a, b, c)): g(xs, ts, cs))
                fn = (lambda run=run: mesh.cfg.all_gather(run(), dim=0)) if c == 2 else run
                out = fn()
                ms = timed(fn)
                cross.context_kv = own_context_kv
                if dist.get_rank() == 0:
                    diff = (out.float() - reference.float()).abs()
                    emit(args.out, {"impl": "taco-dit", "model": "wan2.1-t2v-14b", "mode": mode, "gpus": world,
                                    "attention": backend, "fused": fused_label(), "config": name, "step_ms": round(ms, 2),
                                    "context_side_work": side, "ulysses_return": ret or "default",
                                    "max_abs_diff_vs_1gpu": round(diff.max().item(), 5),
                                    "rel_l2_vs_1gpu": round((diff.norm() / reference.float().norm()).item(), 5),
                                    "card": where, **guided})
            del model.forward_orig
    from comfy.taco_dit.utils import lt_gemm  # what each rank's GEMM tuning chose (they decide separately)

    print(json.dumps({"rank": dist.get_rank(), "lt_gemm": [[*key, s["lt_chosen"], s["tune_torch_ms"], s["tune_best_ms"]]
                                                           for key, s in lt_gemm.stats().items()]}), flush=True)
    release_all()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
