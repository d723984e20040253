"""SD3.5 end to end: a tiny single-file checkpoint (MMDiT + CLIP-L/G + T5 + VAE, the layout of
sd3.5_large_fp8_scaled.safetensors) through the API form of the sd3.5_simple_example template, run by
execution.PromptExecutor; plus the loaders' errors for files of another family."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script
from tests.test_sd3_oracle import random_mmdit_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_L, CLIP_G, T5_WIDTH = 32, 48, 96   # L + G fit in T5's width, as 768 + 1280 fit in 4096


def _clip_g_state_dict(hidden: int, seed: int = 7) -> dict:
    """CLIP-G text tower (OpenCLIP bigG as ComfyUI stores it: HF layout, exact gelu, text_projection)."""
    import transformers as tr

    cfg = tr.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                            num_attention_heads=1, projection_dim=hidden, hidden_act="gelu",
                            max_position_embeddings=77, eos_token_id=49407)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = tr.CLIPTextModelWithProjection(cfg)
    return {k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("position_ids")}


def write_sd35_checkpoint(path: str, seed: int = 0) -> None:
    demo = demo_script()
    sd = {f"model.diffusion_model.{k}": v for k, v in random_mmdit_state_dict(
        hidden_size=128, depth=2, adm_in_channels=CLIP_L + CLIP_G, context_in_dim=T5_WIDTH, pos_embed_max_size=16,
        qk_norm=True, seed=seed).items()}
    parts = {"clip_l": demo.random_clip_l_state_dict(hidden=CLIP_L, layers=2, seed=seed),
             "clip_g": _clip_g_state_dict(CLIP_G, seed=seed + 7),
             "t5xxl": demo.random_t5_state_dict(d_model=T5_WIDTH, heads=2, layers=2, seed=seed + 1)}
    with tempfile.TemporaryDirectory() as tmp:
        parts["t5xxl"]["spiece_model"] = demo._spiece_tensor(tmp)   # the tokenizer travels in the file
    for name, part in parts.items():
        sd.update({f"text_encoders.{name}.transformer.{k}": v for k, v in part.items()})
    sd.update({f"first_stage_model.{k}": v for k, v in demo.random_flux_vae_state_dict(seed=seed + 2).items()})
    save_file(sd, path, metadata={"taco_demo": "random weights, for tests only"})


def sd35_prompt(ckpt: str, seed: int = 42) -> dict:
    """The sd3.5_simple_example template in API form (fewer steps, a small image)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "16": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat in a hat", "clip": ["4", 1]}},
        "40": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "53": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler",
              "inputs": {"model": ["4", 0], "seed": seed, "steps": 4, "cfg": 4.01, "sampler_name": "euler",
                         "scheduler": "sgm_uniform", "positive": ["16", 0], "negative": ["40", 0],
                         "latent_image": ["53", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sd3.5", "images": ["8", 0]}},
    }


def test_single_file_checkpoint_loads_every_part(base_dir):
    import comfy.model_sampling
    import comfy.sd

    path = os.path.join(base_dir, "models", "checkpoints", "tiny-sd3.5.safetensors")
    write_sd35_checkpoint(path)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    dm = model.model.diffusion_model
    assert type(dm).__name__ == "MMDiT" and dm.depth == 2 and dm.joint_blocks[0].x_block.attn.ln_q is not None
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow) and ms.shift == 3.0
    assert ms.multiplier == 1000
    assert model.model.latent_format.scale_factor == 1.5305
    assert set(clip.slots) == {"l", "g", "t5xxl"} and clip.clip_type == "sd3"
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    # the encoders' widths are the ones the MMDiT was built for
    assert cond[0][0].shape[-1] == T5_WIDTH and cond[0][1]["pooled_output"].shape[-1] == CLIP_L + CLIP_G
    assert vae.latent_channels == 16


def test_sd35_template_runs_and_is_reproducible(base_dir):
    import execution
    import folder_paths
    import nodes
    from tests.fixtures.harness import FakeServer

    write_sd35_checkpoint(os.path.join(base_dir, "models", "checkpoints", "tiny-sd3.5.safetensors"))
    nodes.init_extra_nodes(init_custom_nodes=False)
    prompt = sd35_prompt("tiny-sd3.5.safetensors")
    ok, err, outputs, node_errors = execution.validate_prompt("p0", prompt)
    assert ok, (err, node_errors)
    digests, pixels = [], []
    for run in range(2):
        ex = execution.PromptExecutor(FakeServer())   # fresh: the second run recomputes everything
        ex.execute(prompt, f"sd3-{run}", {}, outputs)
        assert ex.success, ex.status_messages
        images = ex.history_result["outputs"]["9"]["images"]
        path = os.path.join(folder_paths.get_output_directory(), images[0]["subfolder"], images[0]["filename"])
        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert json.loads(im.text["prompt"]) == prompt
            arr = np.asarray(im.convert("RGB"))
        assert len(np.unique(arr)) > 10   # random weights still give structure, not a flat colour
        pixels.append(arr)
        with open(path, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    assert digests[0] == digests[1]

    # another seed gives another picture: the sampler really drives the MMDiT from the seeded noise
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(sd35_prompt("tiny-sd3.5.safetensors", seed=7), "sd3-seed7", {}, outputs)
    assert ex.success, ex.status_messages
    images = ex.history_result["outputs"]["9"]["images"]
    with Image.open(os.path.join(folder_paths.get_output_directory(), images[0]["subfolder"],
                                 images[0]["filename"])) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), pixels[0])


def test_sampler_calls_the_mmdit_with_text_and_pooled(base_dir):
    """KSampler feeds c_crossattn and the pooled vector (y) to the MMDiT, cond and uncond batched."""
    import comfy.sd
    import nodes

    path = os.path.join(base_dir, "models", "checkpoints", "tiny-sd3.5.safetensors")
    write_sd35_checkpoint(path)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    dm = model.model.diffusion_model
    seen = []
    orig = dm.forward

    def spy(x, timesteps, context=None, y=None, **kw):
        seen.append((x.shape[0], None if context is None else context.shape, None if y is None else y.shape,
                     timesteps.tolist()))
        return orig(x, timesteps, context=context, y=y, **kw)

    dm.forward = spy
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    nodes.common_ksampler(model, 1, 2, 4.01, "euler", "sgm_uniform", pos, neg, latent)
    assert len(seen) == 2
    batch, ctx_shape, y_shape, ts = seen[0]
    assert batch == 2 and ctx_shape[0] == 2 and ctx_shape[-1] == T5_WIDTH and y_shape == (2, CLIP_L + CLIP_G)
    assert ts[0] == pytest.approx(1000.0, abs=1e-3)   # sigma_max 1 at the first step, x1000 multiplier


def test_wrong_family_files_name_the_file(base_dir):
    import nodes

    demo = demo_script()
    te_dir = os.path.join(base_dir, "models", "text_encoders")
    os.makedirs(te_dir, exist_ok=True)
    save_file(demo.random_clip_l_state_dict(hidden=CLIP_L), os.path.join(te_dir, "clip_l.safetensors"))
    save_file(_clip_g_state_dict(CLIP_G), os.path.join(te_dir, "clip_g.safetensors"))
    flux = demo.random_flux_state_dict(hidden_size=64, num_heads=2)
    save_file(flux, os.path.join(te_dir, "flux1-dev.safetensors"))
    # a diffusion model of another family where SD3's T5 should be
    with pytest.raises(ValueError, match=r"flux1-dev\.safetensors.*diffusion model"):
        nodes.TripleCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "flux1-dev.safetensors")
    # a Flux diffusion model in the checkpoints folder is not a single-file SD3 checkpoint
    ck_dir = os.path.join(base_dir, "models", "checkpoints")
    save_file(flux, os.path.join(ck_dir, "flux-only.safetensors"))
    with pytest.raises(ValueError, match=r"flux-only\.safetensors.*UNETLoader"):
        nodes.CheckpointLoaderSimple().load_checkpoint("flux-only.safetensors")


def test_separate_files_triple_clip_and_diffusers_named_unet(base_dir):
    """The same model split into files: TripleCLIPLoader gives the checkpoint's conditioning, and UNETLoader
    takes the DiT both in the checkpoint layout and diffusers-named, with identical outputs."""
    from safetensors.torch import load_file

    import comfy.model_detection
    import comfy.sd
    import nodes
    from tests.test_sd3_oracle import _diffusers_model

    models = os.path.join(base_dir, "models")
    ckpt = os.path.join(models, "checkpoints", "tiny-sd3.5.safetensors")
    write_sd35_checkpoint(ckpt)
    sd = load_file(ckpt)
    te_dir, dm_dir = os.path.join(models, "text_encoders"), os.path.join(models, "diffusion_models")
    os.makedirs(te_dir, exist_ok=True)
    os.makedirs(dm_dir, exist_ok=True)
    for name in ("clip_l", "clip_g", "t5xxl"):
        p = f"text_encoders.{name}.transformer."
        save_file({k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, os.path.join(te_dir, f"{name}.sft"))
    dit = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    save_file(dit, os.path.join(dm_dir, "sd3.5-dit.safetensors"))
    _, dsd = _diffusers_model(dit, comfy.model_detection.detect_unet_config(dit, ""))
    save_file({k: v.contiguous() for k, v in dsd.items()}, os.path.join(dm_dir, "sd3.5-diffusers.safetensors"))

    ck_model, ck_clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)
    # file order does not matter: the loader sorts the CLIPs by width and finds T5 by its keys
    (clip,) = nodes.TripleCLIPLoader().load_clip("t5xxl.sft", "clip_g.sft", "clip_l.sft")
    a = clip.encode_from_tokens_scheduled(clip.tokenize("a cat in a hat"))
    b = ck_clip.encode_from_tokens_scheduled(ck_clip.tokenize("a cat in a hat"))
    assert torch.equal(a[0][0], b[0][0])
    # same weights; the projected pooled vector may differ in the last bit (matmul over another memory layout)
    torch.testing.assert_close(a[0][1]["pooled_output"], b[0][1]["pooled_output"], rtol=1e-6, atol=1e-6)

    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    conds = {"c_crossattn": a[0][0], "y": a[0][1]["pooled_output"]}
    with torch.no_grad():
        ref = ck_model.model.apply_model(x, sigma, **conds)
        for name in ("sd3.5-dit.safetensors", "sd3.5-diffusers.safetensors"):
            (m,) = nodes.UNETLoader().load_unet(name, "default")
            assert type(m.model.diffusion_model).__name__ == "MMDiT"
            torch.testing.assert_close(m.model.apply_model(x, sigma, **conds), ref, rtol=0, atol=0)
