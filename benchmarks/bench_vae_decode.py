"""Where the phase after sampling goes: the Flux VAE decode of one 1024² image (full-size random weights, the
real comfy.vae.VAE path) and the SaveImage work on its output (float IMAGE -> uint8 -> PNG), on one GPU.

    python3 benchmarks/bench_vae_decode.py [--size 1024] [--out FILE]

Variants of the decode: with torch's GroupNorm (`TACO_VAE_FAST_GN=0`); that with cuDNN's autotuner
(`torch.backends.cudnn.benchmark`); with the decoder in channels-last memory format; both; with our GroupNorm
statistics pass (the default since the sixth session). One JSON line per variant (best of --repeat,
GPU-synced, differences against the first), then one with the profiler's kernel-time split of the default
decode, then one with the SaveImage parts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from bench_fork_e2e import BenchRandomFluxVAE

    from comfy.png_writer import encode_png

    vae = BenchRandomFluxVAE().load(1)[0]
    model = vae.first_stage_model
    latent = torch.randn(1, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    card = torch.cuda.get_device_name()
    lines = []

    def emit(d):
        d.update(card=card, size=args.size, torch=torch.__version__)
        print(json.dumps(d), flush=True)
        lines.append(d)

    reference = None
    variants = [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
                (False, False, True)]
    for benchmark, channels_last, fast_gn in variants:
        os.environ["TACO_VAE_FAST_GN"] = "1" if fast_gn else "0"
        torch.backends.cudnn.benchmark = benchmark
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        z = latent.to("cuda", vae.vae_dtype)

        def decode():
            zz = z.contiguous(memory_format=torch.channels_last) if channels_last else z
            with torch.no_grad():
                return model.decode(zz)

        out = decode()
        ms = best_ms(decode, args.repeat)
        out = decode().float()
        if reference is None:
            reference = out
        emit({"what": "vae_decode", "cudnn_benchmark": benchmark, "channels_last": channels_last,
              "fast_group_norm": fast_gn, "decode_ms": round(ms, 2),
              "max_abs_diff_vs_default": float((out - reference).abs().max()),
              "mean_abs_diff_vs_default": round(float((out - reference).abs().mean()), 6)})
        full_ms = best_ms(lambda: vae.decode(latent), args.repeat) if not (benchmark or channels_last) else None
        if full_ms is not None:
            emit({"what": "VAE.decode (to CPU IMAGE)", "ms": round(full_ms, 2)})
    torch.backends.cudnn.benchmark = False
    os.environ.pop("TACO_VAE_FAST_GN")  # the profile is of the default decode
    model.to(memory_format=torch.contiguous_format)

    from torch.profiler import ProfilerActivity, profile

    z = latent.to("cuda", vae.vae_dtype)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            model.decode(z)
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us <= 0:
            continue
        name = ev.key.lower()
        cat = ("conv" if any(s in name for s in ("conv", "implicit", "xmma", "cudnn", "sm90")) else
               "norm" if "norm" in name else "copy" if "copy" in name or "memcpy" in name else "other")
        cats[cat] = cats.get(cat, 0.0) + us / 1e3
        top.append((us / 1e3, ev.key[:100], ev.count))
    top.sort(reverse=True)
    emit({"what": "vae_decode_profile", "ms_by_category": {k: round(v, 2) for k, v in cats.items()},
          "top": [{"kernel": k, "ms": round(ms, 3), "calls": n} for ms, k, n in top[:12]]})

    image = vae.decode(latent)  # [1, H, W, 3] float32 CPU, as VAEDecode gives SaveImage
    conv_ms = best_ms(lambda: np.clip(255.0 * image[0].float().cpu().numpy(), 0, 255).astype(np.uint8), args.repeat)
    arr = np.clip(255.0 * image[0].float().cpu().numpy(), 0, 255).astype(np.uint8)
    enc_ms = best_ms(lambda: encode_png(arr, compress_level=4), args.repeat)
    emit({"what": "save_image_parts", "to_uint8_ms": round(conv_ms, 2), "png_encode_ms": round(enc_ms, 2),
          "png_bytes": len(encode_png(arr, compress_level=4)), "image_contiguous": image.is_contiguous(),
          "threads": os.cpu_count()})
    if args.out:
        with open(args.out, "a") as f:
            for d in lines:
                f.write(json.dumps(d) + "\n")


if __name__ == "__main__":
    main()
