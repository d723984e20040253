"""Attention kernels on this card at the DiTs' shapes: torch SDPA's default choice (FlashAttention-2 on
Hopper), SDPA's memory-efficient kernel and cuDNN's fused attention, each checked against the default.

    python benchmarks/probe_attention.py --out $OUT/attention.jsonl

Shapes are [B, H, L, D] with D = 128: Flux.1 at 1024² / 2048² (24 heads, 4096 / 16384 image tokens + 512
text), Wan 2.1 14B at 832x480x81 (40 heads, 32760 tokens), and the per-rank shapes of Ulysses 4 (a
quarter of the heads over the whole sequence). "strided" is the layout a fused qkv projection produces
(q, k, v views into one [B, L, 3, H, D] tensor), which is what the models pass for v.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {
    "flux-1024": (1, 24, 4608, 128),
    "flux-2048": (1, 24, 16896, 128),
    "flux-1024-u4": (1, 6, 4608, 128),
    "flux-2048-u4": (1, 6, 16896, 128),
    "wan14b-832x480x81": (1, 40, 32760, 128),
    "wan14b-u4": (1, 10, 32760, 128),
}
KERNELS = {
    "flash": lambda q, k, v: _with(SDPBackend.FLASH_ATTENTION, q, k, v),
    "efficient": lambda q, k, v: _with(SDPBackend.EFFICIENT_ATTENTION, q, k, v),
    "cudnn_sdpa": lambda q, k, v: _with(SDPBackend.CUDNN_ATTENTION, q, k, v),
    "cudnn_op": lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0],
}


def _with(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def tensors(shape, layout: str, seed: int = 0):
    b, h, length, d = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "strided":
        qkv = torch.randn(b, length, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        return tuple(t for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    return tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention.jsonl"))
    p.add_argument("--model-check", action="store_true",
                   help="only check that the models' attention calls take the cuDNN path (1-block Flux / Wan)")
    p.add_argument("--rank-shapes", action="store_true",
                   help="only cuDNN's attention at the per-rank shapes of Flux 1024² on 1, 2 (ring / Ulysses) and "
                        "4 GPUs, as the models lay them out (views of packed q/k/v), with its TFLOP/s")
    args = p.parse_args()
    if args.model_check:
        return model_check()
    if args.rank_shapes:
        return rank_shapes(args.out)
    info = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version()}
    print(json.dumps(info), flush=True)
    with open(args.out, "a") as f, torch.inference_mode():
        for name, shape in SHAPES.items():
            b, h, length, d = shape
            flops = 4 * b * h * length * length * d
            for layout in ("contiguous", "strided"):
                q, k, v = tensors(shape, layout)
                ref = KERNELS["flash"](q, k, v).float()
                for kname, fn in KERNELS.items():
                    rec = {"shape": name, "layout": layout, "kernel": kname, **info}
                    try:
                        out = fn(q, k, v)
                        rec["max_abs_diff_vs_flash"] = round((out.float() - ref).abs().max().item(), 5)
                        ms = bench(lambda fn=fn: fn(q, k, v))
                        rec.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
                    except Exception as e:  # noqa: BLE001 - record what a kernel refuses and go on
                        rec["error"] = f"{type(e).__name__}: {e}"[:200]
                    print(json.dumps(rec), flush=True)
                    f.write(json.dumps(rec) + "\n")


def rank_shapes(out_path: str) -> None:
    """How efficiently cuDNN's attention runs at each rank's share of Flux 1024² (4608 tokens, 24 heads): one GPU
    (all queries, all keys), the gathered ring (half the queries, all keys), Ulysses (all queries and keys, a
    share of the heads). q/k/v are views of packed [1, L, 3, H, D] buffers, as the models write them."""
    cases = {"1gpu": (4608, 4608, 24), "ring2": (2304, 4608, 24), "ulysses2": (4608, 4608, 12),
             "ring4": (1152, 4608, 24), "ulysses4": (4608, 4608, 6)}
    op = KERNELS["cudnn_op"]
    with open(out_path, "a") as f, torch.inference_mode():
        for name, (lq, lk, h) in cases.items():
            q_all, k, v = tensors((1, h, lk, 128), "strided")
            q = q_all[:, :, :lq]  # this rank's queries: its rows of the packed buffer
            ms = bench(lambda: op(q, k, v), iters=50)
            rec = {"rank_shape": name, "queries": lq, "keys": lk, "heads": h, "ms": round(ms, 4),
                   "tflops": round(4 * h * lq * lk * 128 / ms / 1e9, 1), "card": torch.cuda.get_device_name(0)}
            print(json.dumps(rec), flush=True)
            f.write(json.dumps(rec) + "\n")
        # ring 2's attention as one call over a batch of 2 (the same queries against each rank's half of the
        # keys: 1728 tiles, as on one GPU) with the log-sum-exps, then merged by one lerp
        q_all, k, v = tensors((1, 24, 4608, 128), "strided")
        whole = op(q_all[:, :, :2304], k, v)
        for how in ("stride0", "copied"):
            q2 = q_all[:, :, :2304].expand(2, -1, -1, -1)
            if how == "copied":
                q2 = q2.contiguous()
            k2 = k.as_strided((2, 24, 2304, 128), (2304 * k.stride(2), *k.stride()[1:]))
            v2 = v.as_strided((2, 24, 2304, 128), (2304 * v.stride(2), *v.stride()[1:]))

            def split_merge(q2=q2, k2=k2, v2=v2, copy=how == "copied"):
                qq = q_all[:, :, :2304].expand(2, -1, -1, -1).contiguous() if copy else q2
                o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, k2, v2, None, True)[:2]
                lse = lse.reshape(2, 24, 2304)
                w = torch.sigmoid(lse[1] - lse[0]).to(o.dtype)[None, :, :, None]  # weight of the second half
                return torch.lerp(o[0:1], o[1:2], w)
            rec = {"rank_shape": f"ring2 split over the keys, q {how}", "queries": 2304, "keys": 4608, "heads": 24,
                   "card": torch.cuda.get_device_name(0)}
            try:
                merged = split_merge()
                rec["max_abs_diff_vs_one_call"] = round((merged.float() - whole.float()).abs().max().item(), 5)
                rec["ms"] = round(bench(split_merge, iters=50), 4)
                o_only = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q2, k2, v2, None, True)  # noqa: E731
                rec["attention_only_ms"] = round(bench(o_only, iters=50), 4)
            except Exception as e:  # noqa: BLE001 - record what cuDNN refuses
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(rec), flush=True)
            f.write(json.dumps(rec) + "\n")


def model_check() -> None:
    """One-block full-width Flux and Wan at full token counts: output with cuDNN vs SDPA, and refusals."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_flux_step import FLUX_DEV, init_random_, inputs
    from bench_wan_step import WAN_14B
    from bench_wan_step import inputs as wan_inputs

    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules import attention
    from comfy.ldm.wan.model import WanModel

    dev = torch.device("cuda")
    flux = Flux(**dict(FLUX_DEV, depth=1, depth_single_blocks=1), dtype=torch.bfloat16, device=dev).eval()
    init_random_(flux)
    wan_cfg = dict(WAN_14B, num_layers=1)
    wan = WanModel(**wan_cfg, dtype=torch.bfloat16, device=dev).eval()
    init_random_(wan)
    runs = {"flux-1024": (lambda a: flux(a[0], a[1], a[2], y=a[3], guidance=a[4]), inputs(1024, dev)),
            "wan14b": (lambda a: wan(*a), wan_inputs(wan_cfg, (21, 60, 104), dev, torch.bfloat16))}
    with torch.inference_mode():
        for name, (fn, batch) in runs.items():
            outs = {}
            for backend in ("sdpa", "cudnn"):
                attention.set_attention_backend(backend)
                outs[backend] = fn(batch).float()
                outs[backend + "_ms"] = bench(lambda: fn(batch), iters=5)
            diff = (outs["cudnn"] - outs["sdpa"]).norm() / outs["sdpa"].norm()
            print(json.dumps({"model_check": name, "rel_l2_cudnn_vs_sdpa": round(diff.item(), 6),
                              "sdpa_ms": round(outs["sdpa_ms"], 2), "cudnn_ms": round(outs["cudnn_ms"], 2),
                              "cudnn_refusals": {str(k): v for k, v in attention.cudnn_refusals().items()}}),
                  flush=True)


if __name__ == "__main__":
    main()
