"""PixArt-Σ end to end: a tiny transformer file (released layout) through UNETLoader, a tiny T5 through
CLIPLoader(type "pixart"), a 4-channel SDXL-style VAE through VAELoader, sampled by KSampler and decoded by
execution.PromptExecutor into a PNG; plus the sampling parameterisation and the text encoder's semantics."""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script
from tests.test_pixart_oracle import random_pixart_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5_WIDTH = 32


def random_sdxl_vae_state_dict(seed: int = 2) -> dict:
    """4-channel KL VAE in the LDM layout of the SDXL VAE (quant convs), narrow so it decodes fast."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = AutoencoderKL(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4,
                          quant_conv=True, post_quant_conv=True)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def write_pixart_files(models: str, seed: int = 0) -> None:
    demo = demo_script()
    sd = random_pixart_state_dict(hidden_size=144, depth=2, caption_channels=T5_WIDTH, model_max_length=300,
                                  input_size=16, seed=seed)
    os.makedirs(os.path.join(models, "diffusion_models"), exist_ok=True)
    save_file(sd, os.path.join(models, "diffusion_models", "tiny-pixart-sigma.safetensors"))
    t5 = demo.random_t5_state_dict(d_model=T5_WIDTH, heads=2, layers=2, seed=seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        t5["spiece_model"] = demo._spiece_tensor(tmp)   # the tokenizer travels in the file
    os.makedirs(os.path.join(models, "text_encoders"), exist_ok=True)
    save_file(t5, os.path.join(models, "text_encoders", "tiny-t5xxl.safetensors"))
    os.makedirs(os.path.join(models, "vae"), exist_ok=True)
    save_file(random_sdxl_vae_state_dict(seed + 2), os.path.join(models, "vae", "tiny-sdxl-vae.safetensors"))


def pixart_prompt(seed: int = 42) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-pixart-sigma.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny-t5xxl.safetensors", "type": "pixart"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-sdxl-vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat on a red chair", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 4.5, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0],
                         "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pixart", "images": ["8", 0]}},
    }


def test_loaded_model_is_eps_on_the_ddpm_schedule(base_dir):
    from diffusers import DDPMScheduler

    import comfy.model_base
    import comfy.sd

    write_pixart_files(os.path.join(base_dir, "models"))
    model = comfy.sd.load_diffusion_model(os.path.join(base_dir, "models", "diffusion_models",
                                                       "tiny-pixart-sigma.safetensors"))
    assert type(model.model).__name__ == "PixArt" and model.model.model_type == comfy.model_base.ModelType.EPS
    dm = model.model.diffusion_model
    assert type(dm).__name__ == "PixArtMS" and dm.depth == 2 and dm.num_heads == 2 and not dm.micro_condition
    assert model.model.latent_format.scale_factor == 0.13025 and model.model.latent_format.latent_channels == 4
    # PixArt's scheduler: linear betas 1e-4..0.02 over 1000 steps (diffusers calls it "linear")
    ref = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    ms = model.get_model_object("model_sampling")
    torch.testing.assert_close(ms.sigmas, sigmas.float(), rtol=1e-5, atol=1e-6)


def test_pixart_clip_is_unpadded_t5_without_pooled(base_dir):
    import comfy.sd

    write_pixart_files(os.path.join(base_dir, "models"))
    clip = comfy.sd.load_clip([os.path.join(base_dir, "models", "text_encoders", "tiny-t5xxl.safetensors")],
                              clip_type="pixart")
    tokens = clip.tokenize("a cat")
    assert list(tokens) == ["t5xxl"] and tokens["t5xxl"][0][-1][0] == 1   # ends with '</s>', no padding
    cond = clip.encode_from_tokens_scheduled(tokens)
    assert cond[0][0].shape == (1, len(tokens["t5xxl"][0]), T5_WIDTH)
    assert "pooled_output" not in cond[0][1]
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert empty[0][0].shape == (1, 1, T5_WIDTH)


def test_pixart_workflow_writes_reproducible_png(base_dir):
    import execution
    import nodes
    from tests.fixtures.harness import seeds_give_reproducible_distinct_pngs

    write_pixart_files(os.path.join(base_dir, "models"))
    nodes.init_extra_nodes(init_custom_nodes=False)
    ok, err, outputs, node_errors = execution.validate_prompt("p0", pixart_prompt())
    assert ok, (err, node_errors)
    seeds_give_reproducible_distinct_pngs(pixart_prompt, "9", (64, 64), "pixart")


def test_sampler_feeds_t5_tokens_to_the_transformer(base_dir):
    import comfy.sd
    import nodes

    models = os.path.join(base_dir, "models")
    write_pixart_files(models)
    model = comfy.sd.load_diffusion_model(os.path.join(models, "diffusion_models", "tiny-pixart-sigma.safetensors"))
    clip = comfy.sd.load_clip([os.path.join(models, "text_encoders", "tiny-t5xxl.safetensors")], clip_type="pixart")
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("a dog on grass"))
    dm = model.model.diffusion_model
    seen = []
    orig = dm.forward

    def spy(x, timestep, context, **kw):
        seen.append((x.shape[0], tuple(context.shape), timestep.tolist()))
        return orig(x, timestep, context, **kw)

    dm.forward = spy
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = nodes.common_ksampler(model, 1, 2, 3.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    # cond and uncond have different token counts, so each step runs them separately; timesteps are the
    # DDPM indices (999 at the first step of a full denoise)
    assert len(seen) == 4 and {s[1][1] for s in seen} == {pos[0][0].shape[1], neg[0][0].shape[1]}
    assert all(s[0] == 1 and s[1][2] == T5_WIDTH for s in seen) and seen[0][2] == [999.0]
