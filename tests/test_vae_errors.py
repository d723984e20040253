"""A VAE of the wrong family fails at VAEDecode with an error that names the VAE file, what it decodes and
where the latent came from, instead of a shape error deep inside a convolution; the right VAE still decodes."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import nodes
from comfy.ldm.models.autoencoder import AutoencoderKL
from tests.test_wan_vae_oracle import wan_vae_sd


def _kl_sd(z: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=z,
                      quant_conv=False, post_quant_conv=False)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


@pytest.fixture
def vae_files(base_dir):
    folder = os.path.join(base_dir, "models", "vae")
    os.makedirs(folder, exist_ok=True)
    save_file(_kl_sd(4), os.path.join(folder, "sd_vae.safetensors"))
    save_file(_kl_sd(16), os.path.join(folder, "ae.safetensors"))
    save_file(wan_vae_sd(), os.path.join(folder, "wan_2.1_vae.safetensors"))
    return folder


def _load(name):
    (vae,) = nodes.VAELoader().load_vae(name)
    return vae


def test_sd_vae_on_flux_latent_names_the_file(vae_files):
    vae = _load("sd_vae.safetensors")
    assert vae.name == "sd_vae.safetensors"
    with pytest.raises(ValueError) as e:
        nodes.VAEDecode().decode(vae, {"samples": torch.zeros(1, 16, 8, 8)})
    msg = str(e.value)
    assert "'sd_vae.safetensors'" in msg and "4-channel" in msg and "Flux / SD3" in msg, msg
    assert "(1, 16, 8, 8)" in msg and "ae.safetensors" in msg  # says which VAE to load instead


def test_image_vae_on_video_latent_and_back(vae_files):
    flux_vae = _load("ae.safetensors")
    with pytest.raises(ValueError, match=r"VAE 'ae\.safetensors'.*16-channel latents \[B,C,H,W\].*Wan 2\.1"):
        nodes.VAEDecode().decode(flux_vae, {"samples": torch.zeros(1, 16, 3, 4, 4)})
    wan_vae = _load("wan_2.1_vae.safetensors")
    with pytest.raises(ValueError, match=r"VAE 'wan_2\.1_vae\.safetensors'.*Wan 2\.1 video VAE.*Flux / SD3"):
        nodes.VAEDecode().decode(wan_vae, {"samples": torch.zeros(1, 16, 4, 4)})
    with pytest.raises(ValueError, match=r"VAE 'ae\.safetensors'.*SD1\.x"):
        flux_vae.decode_tiled(torch.zeros(1, 4, 80, 80))


def test_matching_vae_still_decodes(vae_files):
    (img,) = nodes.VAEDecode().decode(_load("ae.safetensors"), {"samples": torch.randn(1, 16, 4, 5)})
    assert img.shape == (1, 8, 10, 3) and torch.isfinite(img).all()
    (frames,) = nodes.VAEDecode().decode(_load("wan_2.1_vae.safetensors"), {"samples": torch.randn(1, 16, 2, 2, 2)})
    assert frames.shape == (5, 16, 16, 3)  # 1 + 4 (t - 1) frames folded into the batch


def test_wrong_vae_in_a_workflow_reports_the_file(vae_files):
    import execution
    from tests.fixtures.harness import FakeServer

    nodes.init_extra_nodes(init_custom_nodes=False)
    prompt = {
        "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "sd_vae.safetensors"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    ok, err, outputs, node_errors = execution.validate_prompt("p0", prompt)
    assert ok, (err, node_errors)
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, "wrong-vae", {}, outputs)
    assert not ex.success
    errors = [data for event, data in ex.status_messages if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "VAEDecode", ex.status_messages
    assert "sd_vae.safetensors" in errors[0]["exception_message"]
