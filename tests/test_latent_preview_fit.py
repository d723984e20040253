"""latent2rgb maps fitted from the loaded VAE: the fit predicts the pooled colours the VAE decodes for fresh
random latents (clearly better than the mean colour), loading a VAE with previews on registers the map, the
previewer uses it through the ProgressBar hook for a model-space Flux x0, and with previews off nothing
is fitted.

The VAEs are the tiny KL and Wan 2.1 VAEs of tests/test_vae_kl.py and tests/test_wan_vae_oracle.py (real key
layout, real loader) with their decoder convolutions re-drawn to behave like a trained decoder's: per-pixel
trunk (centre taps), near-identity residual and attention branches, unit-gain layers. The existing
random weights mix neighbouring latent pixels and saturate, so no per-pixel linear map (ours or anyone's)
describes them; that is checked too, so the "clear margin" below is a property of the VAE, not of the test.
"""

from __future__ import annotations

import re

import pytest
import torch

import comfy.latent_formats as lf
import comfy.latent_preview_fit as fit
import comfy.utils
import latent_preview
from comfy.cli_args import LatentPreviewMethod
from comfy.vae import VAE
from tests.test_vae_kl import _ldm_sd
from tests.test_wan_vae_oracle import wan_vae_sd

_RESIDUAL_OUT = re.compile(r"^decoder\..*(\.conv2\.|\.proj_out\.|\.residual\.6\.|\.middle\.1\.proj\.)")
_HEAD = ("decoder.conv_out.weight", "decoder.head.2.weight")
_FIRST_BIAS = ("decoder.conv_in.bias", "decoder.conv1.bias")
_OUT_NORM = ("decoder.norm_out.weight", "decoder.head.0.gamma")


def _trained_like(sd: dict, seed: int = 1, offset: float = 10.0, head_gain: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k, v in sd.items():
        if not (k.startswith("decoder.") and k.endswith("weight") and v.ndim >= 4):
            continue
        w = torch.randn(v.shape, generator=g)
        if v.shape[-1] == 3:  # spatial 3x3: centre tap only, so each latent pixel paints its own block
            mask = torch.zeros(v.shape[-2:])
            mask[1, 1] = 1.0
            w = w * mask
        w = w / w[0].norm()  # unit gain per layer: no blow-up into the -1..1 clamp
        if _RESIDUAL_OUT.match(k):
            w = w * 0.02  # residual / attention branches near identity, as after zero-init training
        if k in _HEAD:
            w = w * head_gain
        out[k] = w
    for k in _OUT_NORM:
        if k in out:
            out[k] = out[k] * 0.3  # the last norm + SiLU in their near-linear range
    for k in _FIRST_BIAS:
        if k in out:  # a constant activation offset keeps the norms' statistics steady across latents
            out[k] = out[k] + offset * torch.randn(out[k].shape, generator=g)
    return out


def _kl(trained=True):
    sd = _ldm_sd(16, False)
    return VAE(_trained_like(sd) if trained else sd, device=torch.device("cpu"), dtype=torch.float32,
               name="tiny-kl16.safetensors")


def _wan(trained=True):
    sd = wan_vae_sd(seed=5)
    # Wan normalises every pixel (RMS over channels): a smaller offset, and a head gain that brings the
    # colours that survive the normalisation back to a visible range
    return VAE(_trained_like(sd, offset=1.0, head_gain=5.0) if trained else sd, device=torch.device("cpu"),
               dtype=torch.float32, name="tiny-wan21.safetensors")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    fit.clear()
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.NoPreviews)
    yield
    fit.clear()
    comfy.utils.set_progress_bar_global_hook(None)


def _fresh_errors(vae, m, seed=123):
    """RMS error of the map and of the mean colour on latents the fit never saw (interior latent pixels)."""
    raw = fit._sample_raw_latents(vae, torch.Generator().manual_seed(seed))
    rgb = fit._decode_pooled(vae, raw)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    pred = m.apply(raw)
    err = (pred[inner] - rgb[inner]).pow(2).mean().sqrt().item()
    base = (rgb[inner] - rgb[inner].mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().sqrt().item()
    return err, base, rgb


@pytest.mark.parametrize("make,dims", [(_kl, 2), (_wan, 3)])
def test_fit_predicts_decoded_colours_of_fresh_latents(make, dims):
    vae = make()
    m = fit.fit_latent_rgb(vae)
    assert m.factors.shape == (16, 3) and m.bias.shape == (3,)
    assert (m.latent_channels, m.latent_dimensions) == (16, dims)
    err, base, rgb = _fresh_errors(vae, m)
    assert base > 0.015  # the decoded colours do vary with the latent (2 of 255 levels and more)
    assert err < 0.75 * base, (err, base)
    # the pooled target is what the VAE's public decode shows, block-averaged (no off-by-one in pooling)
    raw = fit._sample_raw_latents(vae, torch.Generator().manual_seed(123))[:1]
    shown = vae.decode(raw[:, :, None] if dims == 3 else raw)
    shown = shown[:, 0] if dims == 3 else shown
    pooled = torch.nn.functional.avg_pool2d(shown.movedim(-1, 1) * 2 - 1, vae.spacial_compression_decode())
    torch.testing.assert_close(pooled, rgb[:1], rtol=0, atol=1e-5)


def test_random_weight_vae_has_no_per_pixel_linear_colour():
    # the reason the VAEs above are re-drawn: on the existing random weights even the best linear map only
    # matches the mean colour, so a test on them could not tell a working fit from a broken one
    vae = _kl(trained=False)
    m = fit.fit_latent_rgb(vae)
    err, base, _ = _fresh_errors(vae, m)
    assert err > 0.9 * base


def test_fit_recovers_a_known_linear_decoder():
    # least squares on exactly linear data returns the generating map (rows per channel, bias separate)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 16, 8, 8, generator=g)
    true_f, true_b = torch.randn(16, 3, generator=g) * 0.1, torch.tensor([0.1, -0.2, 0.3])
    rgb = torch.einsum("nchw,cd->ndhw", raw, true_f) + true_b[None, :, None, None]
    f, b = fit.fit_from_samples(raw, rgb)
    torch.testing.assert_close(f, true_f, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, true_b, rtol=0, atol=1e-5)


def test_loading_with_previews_on_registers_once_per_vae(monkeypatch, caplog):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    with caplog.at_level("INFO", logger="comfy.latent_preview_fit"):
        kl = _kl()
    assert "fitted from VAE 'tiny-kl16.safetensors'" in caplog.text and "residual" in caplog.text
    m = fit.lookup(16, 2)
    assert m is not None and m.source == "tiny-kl16.safetensors"
    assert fit.maybe_fit_for_vae(kl) is m  # cached by VAE object: no second fit
    assert fit.lookup(16, 3) is None
    wan = _wan()
    assert fit.lookup(16, 3).source == wan.name and fit.lookup(16, 2) is m


def test_previews_off_fits_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(fit, "fit_latent_rgb", lambda vae: calls.append(vae))
    _kl()
    _wan()
    assert calls == [] and fit.lookup(16, 2) is None and fit.lookup(16, 3) is None
    assert latent_preview.get_previewer(torch.device("cpu"), lf.Flux(), LatentPreviewMethod.Latent2RGB) is None


class _Model:
    load_device = torch.device("cpu")

    def __init__(self, fmt):
        self.fmt = fmt

    def get_model_object(self, name):
        assert name == "latent_format"
        return self.fmt


def _run_callback(fmt, x0, steps=2):
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append((v, t, preview)))
    cb = latent_preview.prepare_callback(_Model(fmt), steps)
    cb(0, x0, x0, steps)
    return cb, calls


def test_previewer_through_progress_hook_for_flux_x0(monkeypatch):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    _kl()
    m = fit.lookup(16, 2)
    fmt = lf.Flux()
    x0 = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(4))
    _cb, calls = _run_callback(fmt, x0)
    value, total, (kind, img, size) = calls[-1]
    assert (value, total, kind, size) == (1, 2, "JPEG", latent_preview.MAX_PREVIEW_RESOLUTION)
    assert img.size == (7, 5)
    # the pixel is the map applied to the RAW latent (process_out), not to the model-space x0
    rgb = m.apply(fmt.process_out(x0))[0, :, 3, 2]
    expect = tuple(round(min(max((c + 1) / 2, 0.0), 1.0) * 255) for c in rgb.tolist())
    assert img.getpixel((2, 3)) == expect
    wrong = m.apply(x0)[0, :, 3, 2]
    assert expect != tuple(round(min(max((c + 1) / 2, 0.0), 1.0) * 255) for c in wrong.tolist())


def test_video_preview_is_first_frame_and_late_vae_is_picked_up(monkeypatch):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Auto)
    fmt = lf.Wan21()
    x0 = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    cb, calls = _run_callback(fmt, x0)
    assert calls[-1][2] is None  # no VAE loaded yet: no preview, progress still reported
    _wan()  # the VAE loads while sampling runs (graph order)
    cb(1, x0, x0, 2)
    _value, _total, (_kind, img, _size) = calls[-1]
    assert img.size == (6, 4)
    other = x0.clone()
    other[:, :, 1:] = -x0[:, :, 1:]  # later frames differ: only the first frame is shown
    cb(1, other, other, 2)
    assert calls[-1][2][1].tobytes() == img.tobytes()
    m = fit.lookup(16, 3)
    rgb = m.apply(fmt.process_out(x0)[:, :, 0])[0, :, 1, 4]
    assert img.getpixel((4, 1)) == tuple(round(min(max((c + 1) / 2, 0.0), 1.0) * 255) for c in rgb.tolist())


def test_fit_is_cheap_and_reports_its_quality():
    m = fit.fit_latent_rgb(_kl())
    assert m.residual_rms < m.baseline_rms and m.seconds > 0.0
    assert m.source == "tiny-kl16.safetensors"
