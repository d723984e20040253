"""Wan 2.2 VAE (TI2V-5B's: 48 channels, 2x2 pixel patchify, residual stages, 16x spatial / 4x temporal) in
ComfyUI's `wan2.2_vae.safetensors` key layout against diffusers' AutoencoderKLWan (is_residual, patch_size 2)
on the same random weights, renamed to diffusers' layout by `to_diffusers` below (the renaming of diffusers'
Wan 2.2 conversion script: stage N's resnets `downsamples.M` -> `down_blocks.N.resnets.M`, its resampler ->
`down_blocks.N.downsampler`, likewise for the decoder); then the real loading path (VAELoader)."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from comfy.ldm.wan.vae import WanVAE, wan_vae_config_from_state_dict
from comfy.vae import VAE, detect_vae_family
from tests.test_wan_vae_oracle import _tol, check_decode, check_encode, loaded_net

DIM, DEC_DIM = 8, 12  # base widths; the real VAE has 160 / 256. dim_mult, depth, temporal layout are real.


def wan22_vae_sd(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = WanVAE(dim=DIM, z_dim=48, residual=True, patch_size=2, decoder_dim=DEC_DIM)
    # random biases and gammas too; weights small enough that most decoded pixels stay inside the clamp
    return {k: torch.randn_like(v) * (0.05 if v.ndim > 1 else 0.1) + (1.0 if k.endswith("gamma") else 0.0)
            for k, v in m.state_dict().items()}


_RESNET = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}
_FIXED = {"encoder.conv1.": "encoder.conv_in.", "decoder.conv1.": "decoder.conv_in.",
          "encoder.head.0.": "encoder.norm_out.", "encoder.head.2.": "encoder.conv_out.",
          "decoder.head.0.": "decoder.norm_out.", "decoder.head.2.": "decoder.conv_out.",
          "conv1.": "quant_conv.", "conv2.": "post_quant_conv."}


def _resnet(rest: str) -> str:
    for a, b in _RESNET.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def to_diffusers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        nk = next((b + k[len(a):] for a, b in _FIXED.items() if k.startswith(a)), k)
        m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", k)
        if m:
            side, i, rest = m.groups()
            nk = f"{side}.mid_block.attentions.0.{rest}" if i == "1" else \
                f"{side}.mid_block.resnets.{int(i) // 2}.{_resnet(rest)}"
        m = re.match(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.\w+\.(\d+)\.(.*)", k)
        if m:
            stage, i, j, rest = m.groups()
            side, blocks, sampler = ("encoder", "down_blocks", "downsampler") if stage.startswith("encoder") \
                else ("decoder", "up_blocks", "upsampler")
            nk = f"{side}.{blocks}.{i}.{sampler}.{rest}" if rest.startswith(("resample", "time_conv")) \
                else f"{side}.{blocks}.{i}.resnets.{j}.{_resnet(rest)}"
        out[nk] = v
    return out


@pytest.fixture(scope="module")
def pair():
    sd = wan22_vae_sd()
    ref = AutoencoderKLWan(base_dim=DIM, decoder_base_dim=DEC_DIM, z_dim=48, is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16).eval()
    ref.load_state_dict(to_diffusers(sd), strict=True)  # every diffusers weight came from one of our keys
    return sd, ref


def test_layout_and_config(pair):
    sd, _ = pair
    assert wan_vae_config_from_state_dict(sd) == dict(
        dim=DIM, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
        residual=True, patch_size=2, decoder_dim=DEC_DIM)
    assert detect_vae_family(sd) == "wan22"
    # the real file's layout: 4 encoder stages of 2 resnets (+ resampler, time_conv on stages 1 and 2),
    # 4 decoder stages of 3 resnets (+ width-keeping resampler, time_conv on stages 0 and 1)
    assert sd["encoder.conv1.weight"].shape == (DIM, 12, 3, 3, 3)
    assert "encoder.downsamples.0.downsamples.2.resample.1.weight" in sd
    assert "encoder.downsamples.0.downsamples.2.time_conv.weight" not in sd
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in sd
    assert "encoder.downsamples.3.downsamples.1.residual.6.weight" in sd
    assert not any(k.startswith("encoder.downsamples.3.downsamples.2.") for k in sd)
    assert sd["decoder.upsamples.0.upsamples.3.resample.1.weight"].shape == (4 * DEC_DIM, 4 * DEC_DIM, 3, 3)
    assert "decoder.upsamples.1.upsamples.3.time_conv.weight" in sd
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in sd
    assert sd["decoder.upsamples.2.upsamples.0.shortcut.weight"].shape == (2 * DEC_DIM, 4 * DEC_DIM, 1, 1, 1)
    assert sd["decoder.head.2.weight"].shape == (12, DEC_DIM, 3, 3, 3)
    assert sd["conv1.weight"].shape == (96, 96, 1, 1, 1) and sd["conv2.weight"].shape == (48, 48, 1, 1, 1)


def test_encode_matches_diffusers(pair):
    sd, ref = pair
    torch.manual_seed(2)
    x = torch.rand(1, 3, 10, 32, 48) * 2 - 1  # 10 frames: the last one is past 1+4k and dropped
    check_encode(loaded_net(sd), ref, x, (1, 48, 3, 2, 3))


def test_decode_matches_diffusers(pair):
    sd, ref = pair
    torch.manual_seed(1)
    check_decode(loaded_net(sd), ref, torch.randn(1, 48, 3, 2, 3), (1, 3, 9, 32, 48))  # 1 + 4*(3-1), 16x


def test_vae_loader_and_nodes(base_dir, pair):
    import nodes

    sd, ref = pair
    path = base_dir / "models" / "vae" / "wan2.2_vae.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    (vae,) = nodes.VAELoader().load_vae("wan2.2_vae.safetensors")
    assert vae.family == "wan22" and vae.latent_channels == 48 and vae.latent_dim == 3
    assert vae.spacial_compression_encode() == 16 and vae.temporal_compression_decode() == 4

    torch.manual_seed(3)
    z = torch.randn(1, 48, 2, 2, 3)
    (images,) = nodes.VAEDecode().decode(vae, {"samples": z})
    with torch.no_grad():
        expect = ref.decode(z).sample
    assert images.shape == (5, 32, 48, 3)  # frames folded into the IMAGE batch
    torch.testing.assert_close(images, ((expect[0] + 1) / 2).permute(1, 2, 3, 0), rtol=0, atol=_tol(expect))
    # encode centre-crops to /16 and drops alpha
    pixels = torch.rand(5, 35, 50, 4)
    (enc,) = nodes.VAEEncode().encode(vae, pixels)
    with torch.no_grad():
        expect_lat = ref.encode(pixels[:, 1:33, 1:49, :3].permute(3, 0, 1, 2)[None] * 2 - 1).latent_dist.mode()
    assert enc["samples"].shape == (1, 48, 2, 2, 3)
    torch.testing.assert_close(enc["samples"], expect_lat, rtol=0, atol=_tol(expect_lat))


def test_wan21_latent_is_refused_naming_both(pair):
    vae = VAE(pair[0], device=torch.device("cpu"), dtype=torch.float32, name="wan2.2_vae.safetensors")
    with pytest.raises(ValueError, match=r"wan2\.2_vae\.safetensors.*Wan 2\.2 video VAE.*48-channel.*"
                                         r"Wan 2\.1 model \(16-channel"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))


def test_preview_map_fits_in_the_wan22_latent_space(pair):
    import comfy.latent_formats as lf
    import comfy.latent_preview_fit as fit

    vae = VAE(pair[0], device=torch.device("cpu"), dtype=torch.float32, name="wan2.2_vae.safetensors")
    # random latents for the fit are drawn with the spread Wan 2.2 TI2V's latents have in raw VAE space
    assert [type(f) for f in fit._model_space_formats(vae)] == [lf.Wan22]
    m = fit.fit_latent_rgb(vae)
    assert m.factors.shape == (48, 3) and (m.latent_channels, m.latent_dimensions) == (48, 3)
    assert torch.isfinite(m.factors).all()
