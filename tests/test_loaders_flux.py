"""Flux detection and loading through comfy.sd on tiny random checkpoints in the real key layout."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_base
import comfy.model_detection
import comfy.sd
from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
demo = demo_script()

CFG = dict(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3, context_in_dim=24, vec_in_dim=12)


def _inputs(batch=1):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 4, 24, generator=g),
            torch.randn(batch, 12, generator=g))


@pytest.mark.parametrize("guidance", [True, False])
def test_detection_reads_sizes_from_shapes(guidance):
    sd = demo.random_flux_state_dict(**CFG, guidance_embed=guidance)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg["hidden_size"] == 64 and cfg["num_heads"] == 2 and cfg["depth"] == 2
    assert cfg["depth_single_blocks"] == 3 and cfg["context_in_dim"] == 24 and cfg["vec_in_dim"] == 12
    assert cfg["in_channels"] == 16 and cfg["mlp_ratio"] == 4.0 and cfg["guidance_embed"] is guidance
    assert sum(cfg["axes_dim"]) == 32 and all(a % 2 == 0 for a in cfg["axes_dim"])
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(mc).__name__ == ("Flux" if guidance else "FluxSchnell")
    # the same weights under a checkpoint prefix are found by the prefix rule
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
    assert comfy.model_detection.unet_prefix_from_state_dict(prefixed) == "model.diffusion_model."


def test_full_size_axes_dim_is_flux():
    assert comfy.model_detection.flux_axes_dim(128) == [16, 56, 56]


def test_load_diffusion_model_dev_and_schnell(tmp_path):
    for guidance, mtype, ms in ((True, comfy.model_base.ModelType.FLUX, "ModelSamplingFlux"),
                                (False, comfy.model_base.ModelType.FLOW, "ModelSamplingDiscreteFlow")):
        sd = demo.random_flux_state_dict(**CFG, guidance_embed=guidance, seed=2)
        path = str(tmp_path / f"flux_{guidance}.safetensors")
        save_file(sd, path)
        patcher = comfy.sd.load_diffusion_model(path)
        model = patcher.model
        assert model.model_type == mtype and type(model.model_sampling).__name__ == ms
        assert model.latent_format.scale_factor == 0.3611 and model.latent_format.shift_factor == 0.1159
        assert model.latent_format.latent_channels == 16
        # weights are the file's, not an init
        torch.testing.assert_close(model.diffusion_model.img_in.weight, sd["img_in.weight"])
        if not guidance:
            assert model.model_sampling.multiplier == 1.0 and model.model_sampling.shift == 1.0
        extra = model.extra_conds(cross_attn=torch.zeros(1, 4, 24), pooled_output=torch.zeros(1, 12))
        assert ("guidance" in extra) is guidance
        if guidance:
            assert extra["guidance"].tolist() == [3.5]  # Flux-dev default without FluxGuidance


def test_apply_model_is_flow_denoise(tmp_path):
    """apply_model returns x0 = x - sigma * v for flow models, v being the network output."""
    sd = demo.random_flux_state_dict(**CFG, guidance_embed=False, seed=4)
    path = str(tmp_path / "s.safetensors")
    save_file(sd, path)
    model = comfy.sd.load_diffusion_model(path).model
    x, ctx, y = _inputs()
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        v = model.diffusion_model(x, sigma, ctx, y=y)  # schnell: timestep == sigma (multiplier 1)
        x0 = model.apply_model(x, sigma, c_crossattn=ctx, y=y)
    torch.testing.assert_close(x0, x - 0.6 * v)


def test_checkpoint_prefix_and_fp8_storage(tmp_path):
    sd = demo.random_flux_state_dict(**CFG, seed=6)
    path = str(tmp_path / "ckpt_unet.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, path)
    ref = comfy.sd.load_diffusion_model(path).model
    fp8 = comfy.sd.load_diffusion_model(path, {"dtype": torch.float8_e4m3fn}).model
    assert fp8.diffusion_model.img_in.weight.dtype == torch.float8_e4m3fn
    assert fp8.manual_cast_dtype == torch.float32  # CPU computes in fp32
    x, ctx, y = _inputs()
    kw = dict(c_crossattn=ctx, y=y, guidance=torch.tensor([3.5]))
    with torch.no_grad():
        a = ref.apply_model(x, torch.tensor([0.5]), **kw)
        b = fp8.apply_model(x, torch.tensor([0.5]), **kw)
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # fp8 rounding is really applied
    # e4m3 keeps ~2 significant digits per weight; the output stays close in relative terms
    assert (a - b).norm() / a.norm() < 0.2


def test_bad_files_name_the_file_and_the_fix(tmp_path):
    sd = demo.random_flux_state_dict(**CFG)
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        comfy.sd.load_diffusion_model(str(truncated))

    te = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
               "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)}, str(te))
    with pytest.raises(ValueError, match=r"clip_l\.safetensors.*CLIPLoader"):
        comfy.sd.load_diffusion_model(str(te))

    sd3 = tmp_path / "sd3.safetensors"
    save_file({"joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2)}, str(sd3))
    with pytest.raises(ValueError, match=r"sd3\.safetensors.*SD3"):
        comfy.sd.load_diffusion_model(str(sd3))

    # a Flux file with a block missing: detected as Flux, refused with the missing keys named
    broken = dict(sd)
    broken.pop("single_blocks.0.linear2.weight")
    bpath = tmp_path / "broken.safetensors"
    save_file(broken, str(bpath))
    with pytest.raises(ValueError, match=r"broken\.safetensors.*missing.*single_blocks\.0\.linear2\.weight"):
        comfy.sd.load_diffusion_model(str(bpath))

    # a bare diffusion model given to the checkpoint loader: told to use UNETLoader
    with pytest.raises(ValueError, match=r"good\.safetensors.*UNETLoader"):
        comfy.sd.load_checkpoint_guess_config(str(good))
