"""fp8 "scaled" diffusion-model files (the official templates use flux1-dev-kontext_fp8_scaled and
sd3.5_large_fp8_scaled): weights stored as fp8(w / s) with `.scale_weight` = s must load as s * fp8 value,
through UNETLoader's path and CheckpointLoaderSimple's."""

from __future__ import annotations

import os

import torch

from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quantize(sd: dict, prefix: str = "") -> tuple[dict, dict]:
    """-> (fp8-scaled file content, the weights it really encodes)."""
    scaled, real = {}, {}
    for k, w in sd.items():
        if k.endswith(".weight") and w.ndim == 2:
            s = w.abs().max() / 448.0
            q = (w / s).to(torch.float8_e4m3fn)
            scaled[prefix + k] = q
            scaled[prefix + k[:-len(".weight")] + ".scale_weight"] = s.reshape(1)
            real[k] = (q.to(torch.float32) * s).to(torch.bfloat16)
        else:
            scaled[prefix + k] = w
            real[k] = w
    scaled[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return scaled, real


def _out(patcher):
    dm = patcher.model.diffusion_model.float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 5, dm.params.context_in_dim, generator=g)
    y = torch.randn(1, dm.params.vec_in_dim, generator=g)
    with torch.no_grad():
        return dm(x, torch.tensor([0.5]), ctx, y=y, guidance=torch.tensor([3.5]))


def test_scaled_fp8_unet_loads_the_real_weights():
    import comfy.sd

    demo = demo_script()
    sd = demo.random_flux_state_dict(**demo.DEMO_FLUX, seed=3)
    scaled, real = _quantize(sd)
    got = _out(comfy.sd.load_diffusion_model_state_dict(dict(scaled), source="scaled"))
    want = _out(comfy.sd.load_diffusion_model_state_dict(dict(real), source="real"))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the scales matter: reading the fp8 values as the weights would give another model
    naive = {k: v for k, v in scaled.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    wrong = _out(comfy.sd.load_diffusion_model_state_dict(naive, source="naive"))
    assert not torch.allclose(wrong, want, atol=1e-2)  # (with weights up to 448 it even overflows)


def test_scaled_fp8_checkpoint_path():
    import comfy.sd

    demo = demo_script()
    sd = demo.random_flux_state_dict(**demo.DEMO_FLUX, seed=4)
    scaled, real = _quantize(sd, prefix="model.diffusion_model.")
    model, _, _, _ = comfy.sd.load_state_dict_guess_config(scaled, output_vae=False, output_clip=False,
                                                          source="scaled checkpoint")
    want = _out(comfy.sd.load_diffusion_model_state_dict(dict(real), source="real"))
    torch.testing.assert_close(_out(model), want, rtol=0, atol=0)


def test_checkpoint_bundled_vae_is_named_after_the_file(tmp_path):
    """A decode error for a checkpoint's own VAE names the checkpoint file (CheckpointLoaderSimple path)."""
    from safetensors.torch import save_file

    import comfy.sd

    demo = demo_script()
    sd = {"model.diffusion_model." + k: v for k, v in demo.random_flux_state_dict(**demo.DEMO_FLUX).items()}
    sd.update({"vae." + k: v for k, v in demo.random_flux_vae_state_dict().items()})
    path = tmp_path / "my-flux-checkpoint.safetensors"
    save_file(sd, str(path))
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_clip=False)
    assert vae.name == "my-flux-checkpoint.safetensors (bundled VAE)"
