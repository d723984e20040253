"""KL VAE in the LDM layout against diffusers' AutoencoderKL on the same weights, converted by diffusers'
own single-file converter (convert_ldm_vae_checkpoint): decode and encode, fp32."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.vae import VAE, detect_vae_family


def _ldm_sd(z: int, quant: bool, mult=(1, 2, 2), blocks: int = 1, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = AutoencoderKL(ch=32, ch_mult=list(mult), num_res_blocks=blocks, in_channels=3, out_ch=3, z_channels=z,
                      quant_conv=quant, post_quant_conv=quant)
    # random norms and biases too, so a swapped or dropped tensor cannot go unnoticed
    return {k: torch.randn_like(v) * (0.2 if v.ndim > 1 else 0.5) + (1.0 if "norm" in k and k.endswith("weight")
                                                                      else 0.0)
            for k, v in m.state_dict().items()}


def _diffusers(sd: dict, z: int, quant: bool, mult=(1, 2, 2), blocks: int = 1) -> DiffusersKL:
    n = len(mult)
    ref = DiffusersKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                      up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[32 * m for m in mult],
                      layers_per_block=blocks, latent_channels=z, norm_num_groups=32,
                      use_quant_conv=quant, use_post_quant_conv=quant).eval()
    converted = convert_ldm_vae_checkpoint(sd, ref.config)
    ref.load_state_dict(converted, strict=True)  # every diffusers weight came from our LDM keys
    return ref


@pytest.mark.parametrize("z,quant,family", [(16, False, "kl_16"), (4, True, "kl_sd")])
def test_decode_encode_match_diffusers(z, quant, family):
    sd = _ldm_sd(z, quant)
    ref = _diffusers(sd, z, quant)
    vae = VAE({"first_stage_model." + k: v for k, v in sd.items()} if quant else sd,
              device=torch.device("cpu"), dtype=torch.float32)
    assert vae.family == family and vae.latent_channels == z and vae.spacial_compression_decode() == 4
    torch.manual_seed(3)
    latent = torch.randn(2, z, 6, 5)
    img = vae.decode(latent)
    with torch.no_grad():
        raw = vae.first_stage_model.decode(latent)
        expect = ref.decode(latent).sample
    # Same fp32 maths; diffusers runs the attention projections as Linear instead of 1x1 conv, which
    # reorders the sums: agreement to fp32 rounding relative to the output's magnitude.
    tol = 1e-5 * expect.abs().max().item()
    torch.testing.assert_close(raw, expect, rtol=0, atol=tol)
    assert img.shape == (2, 24, 20, 3) and img.dtype == torch.float32 and img.device.type == "cpu"
    torch.testing.assert_close(img, ((expect + 1) / 2).clamp(0, 1).movedim(1, -1), rtol=0, atol=tol)
    pixels = torch.rand(1, 24, 20, 4)  # alpha channel is dropped
    lat = vae.encode(pixels)
    with torch.no_grad():
        expect_lat = ref.encode(pixels[..., :3].movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert lat.shape == (1, z, 6, 5)
    torch.testing.assert_close(lat, expect_lat, rtol=0, atol=1e-5 * expect_lat.abs().max().item())


def test_encode_crops_to_multiple_of_ratio():
    sd = _ldm_sd(16, False)
    vae = VAE(sd, device=torch.device("cpu"), dtype=torch.float32)
    pixels = torch.rand(1, 26, 23, 3)
    lat = vae.encode(pixels)
    assert lat.shape == (1, 16, 6, 5)
    # center crop: 26 -> 24 from row 1, 23 -> 20 from column 1
    assert torch.equal(lat, vae.encode(pixels[:, 1:25, 1:21]))


def test_linear_attention_weights_and_tiled_decode():
    sd = _ldm_sd(16, False)
    lin = {k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in sd.items()}
    a = VAE(sd, device=torch.device("cpu"), dtype=torch.float32)
    b = VAE(lin, device=torch.device("cpu"), dtype=torch.float32)
    latent = torch.randn(1, 16, 12, 12)
    full = a.decode(latent)
    assert torch.equal(full, b.decode(latent))
    # a tile as large as the latent is the plain decode
    assert torch.equal(a.decode_tiled(latent, tile_x=12, tile_y=12), full)
    tiled = a.decode_tiled(latent, tile_x=8, tile_y=8, overlap=4)
    assert tiled.shape == full.shape and 0 <= tiled.min() and tiled.max() <= 1
    # tiles see less context (mid-block attention, borders), so tiled != full; but it must be far closer
    # to the full decode of this latent than the decode of another latent is
    other = a.decode(torch.randn(1, 16, 12, 12))
    assert (tiled - full).abs().mean() < 0.6 * (other - full).abs().mean()


def test_wrong_family_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"wan_2\.1_vae.*Wan 2\.1 video VAE"):
        detect_vae_family({"decoder.middle.0.residual.0.gamma": torch.zeros(1)}, "wan_2.1_vae.safetensors")
    with pytest.raises(ValueError, match=r"clip_l\.safetensors.*expected a KL autoencoder.*text encoder"):
        VAE({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, name="clip_l.safetensors")
    with pytest.raises(ValueError, match="diffusers layout"):
        detect_vae_family({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)})
    vae = VAE(_ldm_sd(16, False), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="16-channel"):
        vae.decode(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_statistics_pass_matches_torch_group_norm(dtype, atol, silu):
    """The statistics pass behind TACO_VAE_FAST_GN (CUDA half precision only; here run directly on CPU)
    against torch's GroupNorm: fp32 rounding in fp32, one bf16 rounding step in bf16."""
    from comfy.ldm.models import autoencoder

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(2, 64, 12, 10, generator=g) * 3 + 1.5).to(dtype)
    ref = autoencoder._torch_norm_act(norm.to(dtype), x, silu).float()
    out = autoencoder._stats_norm_act(norm.to(dtype), x, silu)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_group_norm_act_uses_torch_group_norm_off_gpu(monkeypatch):
    from comfy.ldm.models import autoencoder

    monkeypatch.setenv("TACO_VAE_FAST_GN", "1")  # only CUDA half-precision tensors take the other pass
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    x = torch.randn(1, 64, 4, 4)
    assert torch.equal(autoencoder.group_norm_act(norm, x, True), torch.nn.functional.silu(norm(x)))
