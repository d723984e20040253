"""Wan 2.1 VAE files through the real loading path: VAELoader on a safetensors file in models/vae, VAEDecode /
VAEEncode node shapes, and the errors for files that are not a complete Wan VAE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy.vae import VAE, detect_vae_family
from tests.test_wan_vae_oracle import wan_vae_sd


@pytest.fixture(scope="module")
def sd():
    return wan_vae_sd(seed=5)


def test_vae_loader_and_nodes(base_dir, sd):
    import nodes

    path = base_dir / "models" / "vae" / "wan_2.1_vae.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    (vae,) = nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")
    assert vae.family == "wan21"
    # the weights are the file's, in the VAE's dtype (fp32 on the CPU)
    got = vae.first_stage_model.state_dict()["decoder.upsamples.7.time_conv.weight"]
    torch.testing.assert_close(got.float(), sd["decoder.upsamples.7.time_conv.weight"])

    latent = {"samples": torch.randn(1, 16, 3, 2, 3)}
    (images,) = nodes.VAEDecode().decode(vae, latent)
    assert images.shape == (9, 16, 24, 3)  # frames folded into the IMAGE batch: 1 + 4*(3-1)
    assert 0.0 <= images.min() and images.max() <= 1.0
    (enc,) = nodes.VAEEncode().encode(vae, images)
    assert enc["samples"].shape == (1, 16, 3, 2, 3)
    # a one-frame "video" (an image) encodes to one latent frame
    (one,) = nodes.VAEEncode().encode(vae, images[:1])
    assert one["samples"].shape == (1, 16, 1, 2, 3)


def test_decode_matches_itself_framewise(sd):
    # causality: the first frames of a longer decode equal the decode of the shorter latent
    vae = VAE(sd, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    z = torch.randn(1, 16, 3, 2, 2)
    long, short = vae.decode(z), vae.decode(z[:, :, :2])
    assert long.shape[1] == 9 and short.shape[1] == 5
    torch.testing.assert_close(long[:, :5], short, rtol=0, atol=1e-5)  # conv algorithms vary with length
    assert (long[:, 5:] - long[:, 4:5]).abs().max() > 1e-3  # later frames are not copies


def test_prefixed_checkpoint_keys(sd):
    vae = VAE({"vae." + k: v for k, v in sd.items()}, device=torch.device("cpu"), dtype=torch.float32)
    assert vae.family == "wan21"


def test_missing_weight_is_named(sd):
    broken = dict(sd)
    del broken["decoder.upsamples.3.time_conv.bias"]
    with pytest.raises(ValueError, match=r"missing 1 Wan VAE weights.*decoder\.upsamples\.3\.time_conv\.bias"):
        VAE(broken, device=torch.device("cpu"), name="x.safetensors")


def test_wrong_shape_is_named(sd):
    broken = dict(sd)
    broken["decoder.middle.1.proj.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"decoder\.middle\.1\.proj\.weight is \(3, 3, 1, 1\)"):
        VAE(broken, device=torch.device("cpu"))


def test_decoder_only_and_mixed_files_are_refused(sd):
    dec_only = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "conv1."))}
    with pytest.raises(ValueError, match="encoder.conv1.weight"):
        detect_vae_family(dec_only, "dec.safetensors")
    # the Wan 2.1 layout with a 48-channel conv2 is neither VAE (Wan 2.2 has residual stages): shapes named
    mixed = dict(sd)
    mixed["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    with pytest.raises(ValueError, match=r"unexpected shapes"):
        VAE(mixed, device=torch.device("cpu"), name="mixed.safetensors")
