"""Command-line flags: ComfyUI's names and meanings, plus TACO-DiT's --taco-* flags.

`args` is importable at any time (custom node packs do `from comfy.cli_args import args`). It holds the
defaults until `main.py` calls `parse_args(argv)`, which updates the same object in place so every
module that imported it sees the parsed values.
"""

from __future__ import annotations

import argparse
import enum


class LatentPreviewMethod(str, enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


def _listen_value(value: str) -> str:
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="TACO-DiT: ComfyUI with multi-GPU DiT inference")
    # Network
    p.add_argument("--listen", type=_listen_value, default="127.0.0.1", metavar="IP", nargs="?",
                   const="0.0.0.0,::", help="Address(es) to listen on, comma separated. Bare flag: all.")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--tls-keyfile", type=str)
    p.add_argument("--tls-certfile", type=str)
    p.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*")
    p.add_argument("--max-upload-size", type=float, default=100, help="Maximum upload size in MB.")
    # Directories
    p.add_argument("--base-directory", type=str, default=None)
    p.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+",
                   action="append")
    p.add_argument("--output-directory", type=str, default=None)
    p.add_argument("--temp-directory", type=str, default=None)
    p.add_argument("--input-directory", type=str, default=None)
    p.add_argument("--user-directory", type=str, default=None)
    # Frontend
    p.add_argument("--front-end-version", type=str, default=None)
    p.add_argument("--front-end-root", type=str, default=None)
    p.add_argument("--auto-launch", action="store_true")
    p.add_argument("--disable-auto-launch", action="store_true")
    # Devices and memory
    p.add_argument("--cpu", action="store_true", help="Run everything on the CPU.")
    p.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID")
    p.add_argument("--default-device", type=int, default=None)
    vram = p.add_mutually_exclusive_group()
    for flag in ("--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram"):
        vram.add_argument(flag, action="store_true")
    p.add_argument("--reserve-vram", type=float, default=None)
    p.add_argument("--disable-smart-memory", action="store_true")
    # Precision
    fp = p.add_mutually_exclusive_group()
    fp.add_argument("--force-fp32", action="store_true")
    fp.add_argument("--force-fp16", action="store_true")
    unet = p.add_mutually_exclusive_group()
    for flag in ("--fp32-unet", "--fp64-unet", "--bf16-unet", "--fp16-unet", "--fp8_e4m3fn-unet",
                 "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet"):
        unet.add_argument(flag, action="store_true")
    vae = p.add_mutually_exclusive_group()
    for flag in ("--fp16-vae", "--fp32-vae", "--bf16-vae"):
        vae.add_argument(flag, action="store_true")
    p.add_argument("--cpu-vae", action="store_true")
    te = p.add_mutually_exclusive_group()
    for flag in ("--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc",
                 "--bf16-text-enc"):
        te.add_argument(flag, action="store_true")
    p.add_argument("--force-channels-last", action="store_true")
    p.add_argument("--deterministic", action="store_true")
    # Attention
    attn = p.add_mutually_exclusive_group()
    for flag in ("--use-split-cross-attention", "--use-quad-cross-attention", "--use-pytorch-cross-attention",
                 "--use-sage-attention", "--use-flash-attention"):
        attn.add_argument(flag, action="store_true")
    # Previews
    p.add_argument("--preview-method", type=LatentPreviewMethod, default=LatentPreviewMethod.NoPreviews,
                   choices=list(LatentPreviewMethod))
    p.add_argument("--preview-size", type=int, default=512)
    # Caching
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action="store_true")
    cache.add_argument("--cache-lru", type=int, default=0)
    cache.add_argument("--cache-none", action="store_true")
    # Other
    p.add_argument("--multi-user", action="store_true")
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--disable-all-custom-nodes", action="store_true")
    p.add_argument("--no-demo-models", action="store_true",
                   help="With no model files present, do not write the small demo models and workflow.")
    p.add_argument("--whitelist-custom-nodes", type=str, nargs="+", default=[])
    p.add_argument("--dont-print-server", action="store_true")
    p.add_argument("--quick-test-for-ci", action="store_true")
    p.add_argument("--windows-standalone-build", action="store_true")
    p.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--log-stdout", action="store_true")
    p.add_argument("--dont-upcast-attention", action="store_true")
    # TACO-DiT (multi-GPU). Unset values mean "automatic"; see comfy/taco_dit/core/config_manager.py.
    t = p.add_argument_group("TACO-DiT multi-GPU")
    t.add_argument("--taco-config", type=str, default=None, metavar="FILE",
                   help="taco_dit_config.yaml with the parallel configuration.")
    t.add_argument("--taco-parallel", choices=["auto", "on", "off"], default=None)
    t.add_argument("--taco-cfg-parallel", choices=["auto", "on", "off"], default=None)
    t.add_argument("--taco-vae-parallel", choices=["auto", "on", "off"], default=None,
                   help="Split VAE decodes of images by rows over the ranks (auto: when there are several).")
    t.add_argument("--taco-ulysses-degree", type=int, default=None)
    t.add_argument("--taco-ring-degree", type=int, default=None)
    t.add_argument("--taco-sequence-parallel-degree", type=int, default=None)
    t.add_argument("--taco-pipeline-parallel-degree", type=int, default=None)
    t.add_argument("--taco-tensor-parallel-degree", type=int, default=None)
    t.add_argument("--taco-torch-compile", action="store_true", default=None,
                   help="Compile the diffusion model with torch.compile (composes with the parallel plans).")
    t.add_argument("--taco-cuda-graph", action="store_true", default=None,
                   help="Replay the diffusion model's forward as a CUDA graph (GPU only).")
    t.add_argument("--taco-follower-timeout", type=float, default=60.0,
                   help="Seconds without a heartbeat after which a rank is declared dead.")
    t.add_argument("--taco-queue-file", type=str, default=None,
                   help="Where rank 0 persists its pending queue (default: <user dir>/taco_queue.json).")
    return p


parser = build_parser()
args = parser.parse_args([])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (sys.argv[1:] when None) into the shared `args` object and return it."""
    parsed = parser.parse_args(argv)
    vars(args).clear()
    vars(args).update(vars(parsed))
    return args
