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
# context_in_dim is the demo T5's width, vec_in_dim the demo CLIP-L's (Flux takes CLIP-L's unprojected pooled).
DEMO_T5 = dict(d_model=64, heads=2, layers=2, vocab=160)
DEMO_CLIP_L = dict(hidden=64, layers=2)
DEMO_FLUX = dict(hidden_size=128, num_heads=4, depth=2, depth_single_blocks=2, context_in_dim=DEMO_T5["d_model"],
                 vec_in_dim=DEMO_CLIP_L["hidden"], in_channels=16, mlp_ratio=4.0, qkv_bias=True)


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


def random_clip_l_state_dict(hidden: int = 64, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP-L text tower in the Hugging Face layout ComfyUI's clip_l files use (real 49408-token vocab,
    77 positions, so the packaged CLIP tokenizer fits)."""
    import transformers as tr

    cfg = tr.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            projection_dim=hidden, hidden_act="quick_gelu", max_position_embeddings=77,
                            eos_token_id=49407)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = tr.CLIPTextModelWithProjection(cfg)
    return {k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("position_ids")}


def random_t5_state_dict(d_model: int = 64, heads: int = 2, layers: int = 2, vocab: int = 160,
                         seed: int = 1) -> dict[str, torch.Tensor]:
    """T5 v1.1 encoder (gated-gelu) in the Hugging Face layout of ComfyUI's t5xxl files."""
    import transformers as tr

    cfg = tr.T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, num_heads=heads,
                      d_ff=2 * d_model, num_layers=layers, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = tr.T5EncoderModel(cfg)
    # ComfyUI's T5 files carry shared.weight, not the tied encoder.embed_tokens copy
    return {k: v.contiguous() for k, v in m.state_dict().items() if k != "encoder.embed_tokens.weight"}


def random_flux_vae_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """16-channel KL VAE in the LDM layout of Flux's ae.safetensors: 8x downscale, no quant convs,
    narrow channels (32) so it decodes fast on a CPU."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = AutoencoderKL(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=16,
                          quant_conv=False, post_quant_conv=False)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def _spiece_tensor(tmp_dir: str) -> torch.Tensor:
    """A tiny sentencepiece model (T5 special ids), embedded in the T5 file as ComfyUI's `spiece_model`."""
    from comfy.text_encoders.tokenizers import write_small_tokenizer

    path = write_small_tokenizer("t5", tmp_dir)
    with open(path, "rb") as f:
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def write_demo_text_encoders_and_vae(models_dir: str, seed: int = 0) -> list[str]:
    """CLIP-L, T5 (with its tokenizer embedded) and the VAE, in the layouts comfy.text_encoders / comfy.vae read."""
    import tempfile

    from safetensors.torch import save_file

    meta = {"taco_demo": "random weights, for tests and demos only"}
    te_dir = os.path.join(models_dir, "text_encoders")
    vae_dir = os.path.join(models_dir, "vae")
    os.makedirs(te_dir, exist_ok=True)
    os.makedirs(vae_dir, exist_ok=True)
    written = []
    clip_path = os.path.join(te_dir, "taco-demo-clip_l.safetensors")
    save_file(random_clip_l_state_dict(**DEMO_CLIP_L, seed=seed), clip_path, metadata=meta)
    written.append(clip_path)
    t5 = random_t5_state_dict(**DEMO_T5, seed=seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        t5["spiece_model"] = _spiece_tensor(tmp)
    t5_path = os.path.join(te_dir, "taco-demo-t5xxl.safetensors")
    save_file(t5, t5_path, metadata=meta)
    written.append(t5_path)
    vae_path = os.path.join(vae_dir, "taco-demo-flux-ae.safetensors")
    save_file(random_flux_vae_state_dict(seed=seed + 2), vae_path, metadata=meta)
    written.append(vae_path)
    return written


if __name__ == "__main__":
    sys.exit(main())
