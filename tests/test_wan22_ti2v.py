"""Wan 2.2 TI2V-5B: the DiT (48 latent channels) detected and loaded by UNETLoader, against diffusers'
WanTransformer3DModel with one timestep per sample and per token (the start frame at 0, diffusers'
`expand_timesteps`); Wan22ImageToVideoLatent against its formula; the denoise mask turned into per-frame
timesteps with the start frame kept; the video_wan2_2_5B_ti2v template's prompt through the executor on tiny
random-weight files; and a Wan 2.2 VAE latent given to a Wan 2.1 model refused, naming both."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_wan_model_oracle import TINY, random_wan_state_dict

T2V = {k: v for k, v in TINY.items() if k != "in_dim_img"}
W, H, LENGTH = 64, 32, 5     # -> latent [1, 48, 2, 2, 4]: 2 x 1 x 2 = 4 video tokens


def ti2v_sd(seed: int = 0) -> dict:
    return random_wan_state_dict("t2v", seed=seed, in_dim=48, out_dim=48, **T2V)


def test_detects_released_5b_shapes():
    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel

    with torch.device("meta"):
        sd = WanModel(model_type="t2v", dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_dim=48,
                      out_dim=48, text_dim=4096).state_dict()
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    cfg = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    assert (cfg["dim"], cfg["num_layers"], cfg["num_heads"], cfg["ffn_dim"]) == (3072, 30, 24, 14336)
    assert cfg["in_dim"] == cfg["out_dim"] == 48 and cfg["model_type"] == "t2v"
    mc = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(mc).__name__ == "WAN22_T2V" and mc.latent_format.latent_channels == 48
    assert mc.sampling_settings["shift"] == 8.0 and mc.clip_type == "wan"


def test_matches_diffusers_with_per_token_timesteps():
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel

    sd = ti2v_sd(seed=5)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    ours = WanModel(**cfg).eval()
    ours.load_state_dict(sd, strict=True)
    # diffusers' Wan2.2-TI2V-5B config, tiny widths
    theirs = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["dim"] // 128, attention_head_dim=128, in_channels=48,
        out_channels=48, text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    theirs.load_state_dict(convert_wan_transformer_to_diffusers({k: v.clone() for k, v in sd.items()}), strict=True)

    g = torch.Generator().manual_seed(0)
    b, t, h, w = 2, 3, 4, 6
    x = torch.randn(b, 48, t, h, w, generator=g)
    ctx = torch.randn(b, 7, TINY["text_dim"], generator=g)
    ts = torch.tensor([700.0, 250.0])
    # diffusers' expand_timesteps: the start frame's tokens at 0, every other token at t
    per_frame = ts[:, None] * torch.tensor([0.0, 1.0, 1.0])
    per_token = per_frame.repeat_interleave((h // 2) * (w // 2), dim=1)
    with torch.no_grad():
        for ours_t, their_t in ((ts, ts), (per_frame, per_token), (per_token, per_token)):
            out = ours(x, ours_t, ctx)
            expect = theirs(hidden_states=x, timestep=their_t, encoder_hidden_states=ctx, return_dict=False)[0]
            assert out.shape == expect.shape == (b, 48, t, h, w)
            assert expect.abs().mean() > 0.05  # real signal
            # fp32 on both sides (diffusers modulates in fp32): summation order only
            torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
        # the per-frame timestep matters: frame 0 at 0 differs from frame 0 at t, the others do not move much
        whole = ours(x, ts, ctx)
        masked = ours(x, per_frame, ctx)
    assert (whole - masked).abs().max() > 1e-3


def _vae(base_dir):
    import nodes
    from tests.test_wan22_vae import wan22_vae_sd

    path = base_dir / "models" / "vae" / "wan2.2_vae.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(wan22_vae_sd(seed=13), str(path))
    return nodes.VAELoader().load_vae("wan2.2_vae.safetensors")[0]


def test_image_to_video_latent_formula(base_dir):
    import comfy.latent_formats
    import comfy.utils
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    vae = _vae(base_dir)
    node = Wan22ImageToVideoLatent()
    (empty,) = node.execute(vae, W, H, 9, 2)
    # ComfyUI's documented behaviour: without a start image, one empty latent (batch_size not applied)
    assert set(empty) == {"samples"} and empty["samples"].shape == (1, 48, 3, 2, 4) and not empty["samples"].any()

    start = torch.rand(1, 40, 56, 3)
    (out,) = node.execute(vae, W, H, 9, 2, start_image=start)
    resized = comfy.utils.common_upscale(start.movedim(-1, 1), W, H, "bilinear", "center").movedim(1, -1)
    enc = vae.encode(resized)
    assert enc.shape == (1, 48, 1, 2, 4)
    fmt = comfy.latent_formats.Wan22()
    mean = torch.tensor(fmt.latents_mean).view(1, 48, 1, 1, 1)
    samples, mask = out["samples"], out["noise_mask"]
    assert samples.shape == (2, 48, 3, 2, 4) and mask.shape == (2, 1, 3, 2, 4)
    # first latent frame: the start image's raw latent, kept (mask 0); the rest: the latent mean (0 in the
    # model's space), generated (mask 1)
    torch.testing.assert_close(samples[:, :, :1], enc.expand(2, -1, -1, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(samples[:, :, 1:], mean.expand(2, 48, 2, 2, 4), rtol=0, atol=1e-7)
    assert not mask[:, :, 0].any() and mask[:, :, 1:].eq(1).all()
    assert fmt.process_in(samples[:, :, 1:]).abs().max() < 1e-5


def _write_models(base_dir):
    from tests.test_wan_model_workflow import write_umt5

    models = base_dir / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(ti2v_sd(seed=11), str(models / "diffusion_models" / "wan2.2_ti2v_tiny.safetensors"))
    save_file(random_wan_state_dict("t2v", seed=12, **T2V), str(models / "diffusion_models" / "wan_t2v.safetensors"))
    write_umt5(base_dir)
    _vae(base_dir)


def test_sampling_keeps_the_start_frame_and_feeds_per_frame_timesteps(base_dir):
    import nodes
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    _write_models(base_dir)
    (model,) = nodes.UNETLoader().load_unet("wan2.2_ti2v_tiny.safetensors", "default")
    assert type(model.model).__name__ == "WAN22"
    vae = nodes.VAELoader().load_vae("wan2.2_vae.safetensors")[0]
    (latent,) = Wan22ImageToVideoLatent().execute(vae, W, H, LENGTH, 1, start_image=torch.rand(1, H, W, 3))
    seen = []
    net = model.model.diffusion_model
    orig = net.forward

    def spy(x, timestep, *a, **k):
        seen.append(timestep.clone())
        return orig(x, timestep, *a, **k)

    net.forward = spy
    try:
        cond = [[torch.randn(1, 5, TINY["text_dim"]), {}]]
        (out,) = nodes.KSampler().sample(model, 3, 2, 1.0, "euler", "simple", cond, cond, latent)
    finally:
        del net.forward
    # the start frame comes back exactly (raw VAE space; process_in/out round-trip only)
    torch.testing.assert_close(out["samples"][:, :, :1], latent["samples"][:, :, :1], rtol=0, atol=1e-5)
    assert (out["samples"][:, :, 1:] - latent["samples"][:, :, 1:]).abs().max() > 1e-2
    # one timestep per latent frame: 0 on the start frame, the sampler's elsewhere
    assert seen and all(t.shape == (1, 2) for t in seen)
    assert all(t[0, 0] == 0 and t[0, 1] > 0 for t in seen)
    assert seen[0][0, 1] == pytest.approx(1000.0, rel=1e-3)


def ti2v_prompt(seed: int = 7, save: str = "SaveVideo") -> dict:
    p = {
        "37": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_ti2v_tiny.safetensors",
                                                      "weight_dtype": "default"}},
        "38": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_tiny.safetensors", "type": "wan",
                                                      "device": "default"}},
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": "wan2.2_vae.safetensors"}},
        "48": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["37", 0], "shift": 8.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "a street musician"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "blurry, static"}},
        "56": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "55": {"class_type": "Wan22ImageToVideoLatent", "inputs": {
            "vae": ["39", 0], "start_image": ["56", 0], "width": W, "height": H, "length": LENGTH,
            "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["48", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["55", 0],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "uni_pc", "scheduler": "simple",
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
    }
    if save == "SaveVideo":
        p["57"] = {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 24.0}}
        p["58"] = {"class_type": "SaveVideo", "inputs": {"video": ["57", 0], "filename_prefix": "video/ComfyUI",
                                                         "format": "auto", "codec": "auto"}}
    else:
        p["58"] = {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["8", 0], "filename_prefix": "ComfyUI", "fps": 24.0, "lossless": True, "quality": 90,
            "method": "default"}}
    return p


def test_ti2v_template_prompt_through_executor(base_dir):
    import av
    from PIL import Image

    import folder_paths
    import nodes
    from tests.test_wan_model_workflow import run_prompt

    _write_models(base_dir)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        os.path.join(folder_paths.get_input_directory(), "start.png"))
    nodes.init_extra_nodes(init_custom_nodes=False)
    with av.open(run_prompt(ti2v_prompt(), "wan22-ti2v-0", "58")) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert frames.shape == (LENGTH, H, W, 3) and len(np.unique(frames)) > 10
    with Image.open(run_prompt(ti2v_prompt(save="webp"), "wan22-ti2v-1", "58")) as im:
        assert im.n_frames == LENGTH and im.size == (W, H)


def test_wan22_latent_given_to_wan21_model_names_both(base_dir):
    import nodes
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    _write_models(base_dir)
    (model,) = nodes.UNETLoader().load_unet("wan_t2v.safetensors", "default")
    vae = nodes.VAELoader().load_vae("wan2.2_vae.safetensors")[0]
    (latent,) = Wan22ImageToVideoLatent().execute(vae, W, H, LENGTH, 1, start_image=torch.rand(1, H, W, 3))
    cond = [[torch.randn(1, 5, TINY["text_dim"]), {}]]
    with pytest.raises(ValueError, match=r"Wan 2\.1 / Wan 2\.2 14B model takes 16-channel latents.*48 channels.*"
                                         r"Wan 2\.2 VAE \(wan2\.2_vae\.safetensors\).*wan_2\.1_vae"):
        nodes.KSampler().sample(model, 3, 1, 1.0, "euler", "simple", cond, cond, latent)


def test_wan22_start_image_latent_given_to_wan21_i2v_model_names_both():
    import comfy.sd

    # WanImageToVideo with the Wan 2.2 VAE: its 48-channel start latent would otherwise be cut to 16 silently
    model = comfy.sd.load_diffusion_model_state_dict(random_wan_state_dict("i2v", seed=3, **TINY))
    with pytest.raises(ValueError, match=r"16-channel latents, but the start/end image latent.*48 channels.*"
                                         r"Wan 2\.2 VAE.*Use wan_2\.1_vae\.safetensors"):
        model.model.extra_conds(noise=torch.zeros(1, 16, 2, 2, 4), concat_latent_image=torch.zeros(1, 48, 2, 2, 4),
                                device=torch.device("cpu"))


def test_timestep_shapes_agree():
    """One timestep for the batch, one per sample, per latent frame and per token give the same output when
    they hold the same values (the modulation is broadcast, not copied per token)."""
    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel

    sd = ti2v_sd(seed=2)
    m = WanModel(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    m.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 48, 2, 4, 4, generator=g), torch.randn(2, 3, TINY["text_dim"], generator=g)
    with torch.no_grad():
        outs = [m(x, t, ctx) for t in (torch.tensor([500.0]), torch.full((2,), 500.0), torch.full((2, 2), 500.0),
                                       torch.full((2, 8), 500.0))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)
