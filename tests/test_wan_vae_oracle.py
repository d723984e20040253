"""Wan 2.1 video VAE in the checkpoint layout against diffusers' AutoencoderKLWan on the same weights,
converted by diffusers' own single-file converter (convert_wan_vae_to_diffusers): decode and encode, fp32,
through the raw network and through comfy.vae.VAE (IMAGE layout, 0..1)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from comfy.ldm.wan.vae import WanVAE, wan_vae_config_from_state_dict
from comfy.vae import VAE, detect_vae_family

DIM = 8  # base width; the real VAE has 96. dim_mult, depth and temporal layout are the real ones.


def wan_vae_sd(dim: int = DIM, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = WanVAE(dim=dim, z_dim=16)
    # random biases and gammas too, so a swapped or dropped tensor cannot go unnoticed; weights small
    # enough that the decoder output is mostly inside the -1..1 clamp (a saturated output hides errors)
    return {k: torch.randn_like(v) * (0.05 if v.ndim > 1 else 0.1) + (1.0 if k.endswith("gamma") else 0.0)
            for k, v in m.state_dict().items()}


def _diffusers(sd: dict, dim: int = DIM) -> AutoencoderKLWan:
    ref = AutoencoderKLWan(base_dim=dim, z_dim=16).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)), strict=True)  # every weight came from our keys
    return ref


@pytest.fixture(scope="module")
def pair():
    sd = wan_vae_sd()
    return sd, _diffusers(sd)


def _tol(expect: torch.Tensor) -> float:
    # same fp32 maths; conv algorithms and the fused attention projection reorder sums: rounding-level
    # agreement relative to the output's magnitude
    return 2e-5 * expect.abs().max().item()


def test_config_read_from_tensors(pair):
    sd, _ = pair
    assert wan_vae_config_from_state_dict(sd) == dict(dim=DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                     temperal_downsample=[False, True, True])
    assert detect_vae_family(sd) == "wan21"
    # the layout the real file has: 11 encoder blocks, 15 decoder blocks, fused qkv in the middles
    assert "encoder.downsamples.10.residual.6.weight" in sd and "encoder.downsamples.11.residual.0.gamma" not in sd
    assert "decoder.upsamples.14.residual.6.weight" in sd and "decoder.upsamples.3.time_conv.weight" in sd
    assert "decoder.upsamples.11.resample.1.weight" in sd and "decoder.upsamples.11.time_conv.weight" not in sd
    assert sd["decoder.middle.1.to_qkv.weight"].shape == (3 * 4 * DIM, 4 * DIM, 1, 1)
    assert sd["conv1.weight"].shape == (32, 32, 1, 1, 1) and sd["encoder.conv1.weight"].shape == (DIM, 3, 3, 3, 3)


def loaded_net(sd: dict) -> WanVAE:
    net = WanVAE(**wan_vae_config_from_state_dict(sd)).eval()
    net.load_state_dict(sd, strict=True)
    return net


def check_decode(net: WanVAE, ref, z: torch.Tensor, shape: tuple) -> None:
    """Our decode equals diffusers', also with larger chunks after frame 0 (the feature cache carries the
    causal history, so that is the same maths)."""
    with torch.no_grad():
        out = net.decode(z)
        expect = ref.decode(z).sample
        chunked = net.decode(z, chunk=2)
    assert out.shape == expect.shape == shape
    assert (expect.abs() < 1).float().mean() > 0.5  # most pixels unclamped: the comparison is informative
    torch.testing.assert_close(out, expect, rtol=0, atol=_tol(expect))
    torch.testing.assert_close(chunked, out, rtol=0, atol=_tol(expect))


def check_encode(net: WanVAE, ref, x: torch.Tensor, shape: tuple) -> None:
    """Our encode (mean) equals diffusers' mode, also with 8-frame chunks; frames past 1+4k are dropped."""
    with torch.no_grad():
        mu = net.encode(x)
        expect = ref.encode(x[:, :, :1 + (x.shape[2] - 1) // 4 * 4]).latent_dist.mode()
        big = net.encode(x, chunk=8)
    assert mu.shape == expect.shape == shape
    torch.testing.assert_close(mu, expect, rtol=0, atol=_tol(expect))
    torch.testing.assert_close(big, mu, rtol=0, atol=_tol(expect))


def test_decode_matches_diffusers(pair):
    sd, ref = pair
    torch.manual_seed(1)
    check_decode(loaded_net(sd), ref, torch.randn(1, 16, 3, 4, 5), (1, 3, 9, 32, 40))  # 1 + 4*(3-1), 8x


def test_encode_matches_diffusers(pair):
    sd, ref = pair
    torch.manual_seed(2)
    x = torch.rand(1, 3, 10, 32, 24) * 2 - 1  # 10 frames: the last one is past 1+4k and dropped
    check_encode(loaded_net(sd), ref, x, (1, 16, 3, 4, 3))
    with pytest.raises(ValueError, match="multiple of 4"):
        loaded_net(sd).encode(x, chunk=6)


def test_vae_object_decode_encode_image_layout(pair):
    sd, ref = pair
    vae = VAE(sd, device=torch.device("cpu"), dtype=torch.float32)
    assert vae.family == "wan21" and vae.latent_channels == 16 and vae.latent_dim == 3
    assert vae.spacial_compression_decode() == 8 and vae.temporal_compression_decode() == 4
    torch.manual_seed(3)
    z = torch.randn(2, 16, 2, 3, 4)
    frames = vae.decode(z)
    with torch.no_grad():
        expect = ref.decode(z).sample
    assert frames.shape == (2, 5, 24, 32, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    torch.testing.assert_close(frames, ((expect + 1) / 2).permute(0, 2, 3, 4, 1), rtol=0, atol=_tol(expect))

    # encode takes the frames of one video as the IMAGE batch, drops alpha and centre-crops to /8
    pixels = torch.rand(5, 26, 33, 4)
    lat = vae.encode(pixels)
    cropped = pixels[:, 1:25, :32, :3]
    with torch.no_grad():
        expect_lat = ref.encode(cropped.permute(3, 0, 1, 2)[None] * 2 - 1).latent_dist.mode()
    assert lat.shape == (1, 16, 2, 3, 4)
    torch.testing.assert_close(lat, expect_lat, rtol=0, atol=_tol(expect_lat))


def test_wrong_latent_is_rejected(pair):
    vae = VAE(pair[0], device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"16-channel latents \[B,C,T,H,W\]"):
        vae.decode(torch.zeros(1, 16, 4, 4))
