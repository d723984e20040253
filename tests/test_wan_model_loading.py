"""Wan 2.1 DiT files through the real loading path (comfy.sd / UNETLoader), detection of the released shapes,
the Wan21 latent format, and the i2v conditioning the sampler hands the model (c_concat, clip_fea)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.test_wan_model_oracle import TINY, random_wan_state_dict

T2V = {k: v for k, v in TINY.items() if k != "in_dim_img"}


def _meta_sd(**cfg) -> dict:
    """A full-size state dict of shapes only (meta tensors): detection reads nothing else."""
    from comfy.ldm.wan.model import WanModel

    with torch.device("meta"):
        return WanModel(**cfg).state_dict()


@pytest.mark.parametrize("name,cfg", [
    ("1.3B t2v", dict(model_type="t2v", dim=1536, ffn_dim=8960, num_layers=30, num_heads=12, text_dim=4096)),
    ("14B t2v", dict(model_type="t2v", dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, text_dim=4096)),
    ("14B i2v", dict(model_type="i2v", dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, text_dim=4096,
                     in_dim=36, in_dim_img=1280)),
])
def test_detects_released_shapes(name, cfg):
    import comfy.model_detection
    import comfy.supported_models

    sd = {f"model.diffusion_model.{k}": v for k, v in _meta_sd(**cfg).items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    assert prefix == "model.diffusion_model."
    got = comfy.model_detection.detect_unet_config(sd, prefix)
    for k, v in cfg.items():
        assert got[k] == v, (name, k, got[k], v)
    assert got["in_dim"] == cfg.get("in_dim", 16) and got["patch_size"] == (1, 2, 2) and got["out_dim"] == 16
    mc = comfy.model_detection.model_config_from_unet(sd, prefix)
    assert type(mc).__name__ == ("WAN21_I2V" if cfg["model_type"] == "i2v" else "WAN21_T2V")
    assert mc.sampling_settings["shift"] == 8.0 and mc.clip_type == "wan"


def test_unsupported_wan_variant_is_named():
    import comfy.sd

    sd = random_wan_state_dict("t2v", num_layers=1, **{k: v for k, v in T2V.items() if k != "num_layers"})
    sd["vace_patch_embedding.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Wan variant"):
        comfy.sd.load_diffusion_model_state_dict(sd)


def test_unet_loader_builds_wan_t2v(base_dir):
    import comfy.latent_formats
    import comfy.model_base
    import nodes

    sd = random_wan_state_dict("t2v", seed=2, **T2V)
    path = base_dir / "models" / "diffusion_models" / "wan2.1_t2v_tiny.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    (patcher,) = nodes.UNETLoader().load_unet("wan2.1_t2v_tiny.safetensors", "default")
    model = patcher.model
    assert isinstance(model, comfy.model_base.WAN21)
    assert isinstance(model.latent_format, comfy.latent_formats.Wan21)
    assert model.model_type == comfy.model_base.ModelType.FLOW
    ms = patcher.get_model_object("model_sampling")
    # shift 8: sigma(t) = 8t / (1 + 7t); at t = 0.5 -> 8/9
    assert abs(float(ms.sigma(torch.tensor(500.0))) - 8 / 9) < 1e-6
    torch.testing.assert_close(model.diffusion_model.state_dict()["blocks.1.ffn.2.weight"],
                               sd["blocks.1.ffn.2.weight"])

    # apply_model = timestep sigma*1000 into the network, x0 = x - sigma * v (CONST / flow)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 7, T2V["text_dim"], generator=g)
    sigma = torch.tensor([0.9, 0.4])
    conds = model.extra_conds(cross_attn=ctx, noise=x, device=x.device)
    assert set(conds) == {"c_crossattn"}     # t2v: no concat channels, no image tokens
    with torch.no_grad():
        out = model.apply_model(x, sigma, **conds)
        v = model.diffusion_model(x, sigma * 1000, ctx.expand(2, -1, -1))
    torch.testing.assert_close(out, x - sigma.view(2, 1, 1, 1, 1) * v)


def test_wan21_latent_format_matches_diffusers_normalisation():
    import inspect

    from diffusers import AutoencoderKLWan

    import comfy.latent_formats

    # diffusers' Wan VAE defaults carry the released statistics
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    mean = torch.tensor(params["latents_mean"].default).view(1, 16, 1, 1, 1)
    std = torch.tensor(params["latents_std"].default).view(1, 16, 1, 1, 1)
    fmt = comfy.latent_formats.Wan21()
    assert fmt.latent_channels == 16 and fmt.latent_dimensions == 3
    z = torch.randn(1, 16, 3, 4, 5)
    # diffusers' WanPipeline: model latents = (z - mean) / std, and back with z = x * std + mean
    torch.testing.assert_close(fmt.process_in(z), (z - mean) / std)
    torch.testing.assert_close(fmt.process_out(fmt.process_in(z)), z)


def test_i2v_concat_and_clip_conditioning():
    import comfy.model_base
    import comfy.model_detection
    from comfy.clip_vision import Output

    sd = random_wan_state_dict("i2v", seed=3, **TINY)
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(mc).__name__ == "WAN21_I2V"
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model(sd, "", device=torch.device("meta"))
    model.load_model_weights(sd, "")
    model.device = torch.device("cpu")
    assert isinstance(model, comfy.model_base.WAN21) and model.image_to_video

    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 16, 3, 4, 6, generator=g)
    image_latent = torch.randn(1, 16, 3, 4, 6, generator=g)
    mask = torch.ones(1, 1, 3, 4, 6)
    mask[:, :, :1] = 0.0          # first latent frame known (WanImageToVideo's convention)
    clip = Output(penultimate_hidden_states=torch.randn(1, 5, TINY["in_dim_img"], generator=g))
    conds = model.extra_conds(cross_attn=torch.randn(1, 7, TINY["text_dim"], generator=g), noise=noise,
                              device=torch.device("cpu"), concat_latent_image=image_latent, concat_mask=mask,
                              clip_vision_output=clip)
    cc = conds["c_concat"]
    assert cc.shape == (2, 20, 3, 4, 6)
    # 4 mask channels: 1 on the known frame, 0 elsewhere; then the latent in model space
    assert torch.all(cc[:, :4, 0] == 1) and torch.all(cc[:, :4, 1:] == 0)
    torch.testing.assert_close(cc[:, 4:], model.process_latent_in(image_latent).expand(2, -1, -1, -1, -1))
    assert conds["clip_fea"].shape == (1, 5, TINY["in_dim_img"])

    sigma = torch.tensor([0.8, 0.8])
    with torch.no_grad():
        out = model.apply_model(noise, sigma, **conds)
        direct = model.diffusion_model(torch.cat([noise, cc], dim=1), sigma * 1000,
                                       conds["c_crossattn"].expand(2, -1, -1),
                                       clip_fea=conds["clip_fea"].expand(2, -1, -1))
    torch.testing.assert_close(out, noise - 0.8 * direct)

    # without a start image the 20 extra channels are zeros (ComfyUI's behaviour)
    bare = model.extra_conds(cross_attn=torch.zeros(1, 7, TINY["text_dim"]), noise=noise,
                             device=torch.device("cpu"))
    assert bare["c_concat"].shape == (2, 20, 3, 4, 6) and not bare["c_concat"].any()
