"""latent2rgb previews for the 16-channel families (Flux, SD3/SD3.5, Wan 2.1 video): each latent format
carries a [16][3] map (and bias where published), and the previewer applies row c of the map to channel c
of the model-space latent (the first frame of a video) through the sampler callback."""

from __future__ import annotations

import pytest
import torch

import comfy.latent_formats as lf
import comfy.utils
import latent_preview
from comfy.cli_args import LatentPreviewMethod


@pytest.mark.parametrize("fmt_cls", [lf.SD3, lf.Flux, lf.Wan21])
def test_sixteen_channel_formats_have_a_preview_map(fmt_cls):
    fmt = fmt_cls()
    f = torch.tensor(fmt.latent_rgb_factors)
    assert f.shape == (fmt.latent_channels, 3) == (16, 3)
    # a fitted map, not a placeholder: distinct rows, every colour column used
    assert len({tuple(r) for r in fmt.latent_rgb_factors}) == 16 and (f.abs().sum(0) > 0.3).all()
    if fmt.latent_rgb_factors_bias is not None:
        assert len(fmt.latent_rgb_factors_bias) == 3


def test_flux_does_not_inherit_sd3_map():
    assert lf.Flux.latent_rgb_factors != lf.SD3.latent_rgb_factors
    assert lf.SD3.latent_rgb_factors_bias is None and lf.Flux.latent_rgb_factors_bias is not None


def _expected_pixel(fmt, channel, value):
    bias = fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0]
    rgb = [value * fmt.latent_rgb_factors[channel][i] + bias[i] for i in range(3)]
    return tuple(round(min(max((c + 1) / 2, 0.0), 1.0) * 255) for c in rgb)


@pytest.mark.parametrize("fmt_cls,shape", [(lf.Flux, (1, 16, 3, 5)), (lf.SD3, (2, 16, 3, 5)),
                                           (lf.Wan21, (1, 16, 2, 3, 5))])
def test_previewer_maps_each_channel_by_its_row(fmt_cls, shape):
    fmt = fmt_cls()
    previewer = latent_preview.get_previewer(torch.device("cpu"), fmt, LatentPreviewMethod.Latent2RGB)
    assert previewer is not None
    for channel in (0, 6, 15):
        x0 = torch.zeros(shape)
        x0[:, channel] = 3.0
        if len(shape) == 5:
            x0[:, :, 1:] = -5.0  # later frames differ: only the first frame is previewed
        img = previewer.decode_latent_to_preview(x0)
        assert img.size == (shape[-1], shape[-2])
        assert img.getpixel((2, 1)) == _expected_pixel(fmt, channel, 3.0)


def test_flux_preview_reaches_the_progress_hook(monkeypatch):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append(preview))
    try:
        class _Model:
            load_device = torch.device("cpu")

            def get_model_object(self, name):
                assert name == "latent_format"
                return lf.Flux()

        cb = latent_preview.prepare_callback(_Model(), 2)
        cb(0, torch.zeros(1, 16, 4, 6), torch.zeros(1, 16, 4, 6), 2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    fmt, img, _size = calls[-1]
    assert fmt == "JPEG" and img.size == (6, 4)
    # a zero latent shows the bias colour
    assert img.getpixel((0, 0)) == tuple(round((b + 1) / 2 * 255) for b in lf.Flux.latent_rgb_factors_bias)
