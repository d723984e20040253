"""latent2rgb previews: the previewer applies row c of a format's [C][3] map to channel c of the
model-space latent (the first frame of a video) and reaches the progress hook; formats without a map
(Flux, SD3, Wan 2.1 have no fixed table) give no preview until a VAE fit is registered.

The maps here are synthetic: they test the mechanism, not any published table.
"""

from __future__ import annotations

import pytest
import torch

import comfy.latent_formats as lf
import comfy.utils
import latent_preview
from comfy.cli_args import LatentPreviewMethod


def _with_map(base, bias=True):
    g = torch.Generator().manual_seed(0)
    factors = (torch.rand(base.latent_channels, 3, generator=g) * 0.4 - 0.2).tolist()

    class Mapped(base):
        latent_rgb_factors = factors
        latent_rgb_factors_bias = [0.05, -0.1, 0.02] if bias else None

    return Mapped()


def _expected_pixel(fmt, channel, value):
    bias = fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0]
    rgb = [value * fmt.latent_rgb_factors[channel][i] + bias[i] for i in range(3)]
    return tuple(round(min(max((c + 1) / 2, 0.0), 1.0) * 255) for c in rgb)


@pytest.mark.parametrize("base,shape,bias", [(lf.Flux, (1, 16, 3, 5), True), (lf.SD3, (2, 16, 3, 5), False),
                                             (lf.Wan21, (1, 16, 2, 3, 5), True)])
def test_previewer_maps_each_channel_by_its_row(base, shape, bias):
    fmt = _with_map(base, bias)
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


@pytest.mark.parametrize("fmt_cls", [lf.Flux, lf.SD3, lf.Wan21])
def test_formats_without_a_map_give_no_preview(fmt_cls):
    assert fmt_cls.latent_rgb_factors is None
    assert latent_preview.get_previewer(torch.device("cpu"), fmt_cls(), LatentPreviewMethod.Latent2RGB) is None


def test_preview_reaches_the_progress_hook(monkeypatch):
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    fmt = _with_map(lf.Flux)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append(preview))
    try:
        class _Model:
            load_device = torch.device("cpu")

            def get_model_object(self, name):
                assert name == "latent_format"
                return fmt

        cb = latent_preview.prepare_callback(_Model(), 2)
        cb(0, torch.zeros(1, 16, 4, 6), torch.zeros(1, 16, 4, 6), 2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    kind, img, _size = calls[-1]
    assert kind == "JPEG" and img.size == (6, 4)
    # a zero latent shows the bias colour
    assert img.getpixel((0, 0)) == tuple(round((b + 1) / 2 * 255) for b in fmt.latent_rgb_factors_bias)
