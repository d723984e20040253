"""comfy.utils.common_upscale, the one resizer: each method against the definition it follows (ComfyUI's
`common_upscale`), centre crop, 3-D masks and 5-D video latents, and the nodes and helpers that resize
through it.

Expected values come from the definitions, never from earlier outputs: the torch modes are plain
F.interpolate calls; lanczos is PIL's LANCZOS on the uint8 image; bislerp is checked against a float64
per-pixel evaluation of its formula, hand-computed cases and properties that follow from it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import comfy.utils as cu

TORCH_MODES = ["nearest-exact", "bilinear", "area", "bicubic"]
ALL_MODES = TORCH_MODES + ["bislerp", "lanczos"]


# --- torch modes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize("size", [(7, 5), (24, 18), (12, 9)])  # (width, height): down, up, mixed
def test_torch_modes_are_plain_interpolate(mode, size):
    x = torch.rand(2, 3, 9, 13)
    w, h = size
    out = cu.common_upscale(x, w, h, mode, "disabled")
    assert torch.equal(out, F.interpolate(x, size=(h, w), mode=mode))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_no_antialias_when_downscaling(mode):
    # ComfyUI does not antialias: halving a checkerboard with bilinear lands between the four pixels of
    # each 2x2 cell and averages them (0.5 everywhere); an antialiased filter would mix wider
    board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    x = board.float().expand(1, 3, 16, 16)
    out = cu.common_upscale(x, 8, 8, mode, "disabled")
    assert not torch.equal(out, F.interpolate(x, size=(8, 8), mode=mode, antialias=True))
    if mode == "bilinear":
        assert torch.allclose(out, torch.full_like(out, 0.5))


def test_unknown_method_and_rank_raise():
    with pytest.raises(ValueError, match="unknown upscale_method 'lanczos3'"):
        cu.common_upscale(torch.rand(1, 3, 4, 4), 2, 2, "lanczos3", "disabled")
    with pytest.raises(ValueError, match="got shape"):
        cu.common_upscale(torch.rand(4, 4), 2, 2, "bilinear", "disabled")


# --- lanczos ------------------------------------------------------------------------------------------------


def _pil_lanczos(img_hwc: np.ndarray, mode: str, width: int, height: int) -> np.ndarray:
    """The definition: clip to 0..1, *255, truncate to uint8, PIL LANCZOS, /255."""
    u8 = np.clip(img_hwc * 255.0, 0, 255).astype(np.uint8)
    pil = Image.fromarray(u8[..., 0] if mode == "L" else u8, mode)
    res = np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    return res.reshape(height, width, -1)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_lanczos_is_pil_on_the_uint8_image(channels, mode):
    x = torch.rand(2, channels, 11, 17) * 1.4 - 0.2  # some values outside 0..1: clipped first
    out = cu.common_upscale(x, 23, 6, "lanczos", "disabled")
    assert out.shape == (2, channels, 6, 23) and out.dtype == x.dtype
    for i in range(2):
        ref = _pil_lanczos(x[i].movedim(0, -1).numpy(), mode, 23, 6)
        assert torch.equal(out[i], torch.from_numpy(ref).movedim(-1, 0))


def test_lanczos_truncates_and_keeps_dtype():
    # 0.3 * 255 = 76.5 -> uint8 76 (ComfyUI truncates, it does not round); a flat image stays flat
    x = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float16)
    out = cu.common_upscale(x, 5, 3, "lanczos", "disabled")
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.full((1, 3, 3, 5), 76 / 255, dtype=torch.float16))


def test_lanczos_masks_and_unsupported_channels():
    m = torch.rand(3, 10, 12)  # [N, H, W]: single-channel images, rank kept
    out = cu.common_upscale(m, 7, 4, "lanczos", "disabled")
    assert out.shape == (3, 4, 7)
    assert torch.equal(out, cu.common_upscale(m[:, None], 7, 4, "lanczos", "disabled")[:, 0])
    ref = _pil_lanczos(m[1].numpy()[..., None], "L", 7, 4)[..., 0]
    assert torch.equal(out[1], torch.from_numpy(ref))
    with pytest.raises(ValueError, match="use bicubic or bislerp for latents"):
        cu.common_upscale(torch.rand(1, 16, 8, 8), 4, 4, "lanczos", "disabled")


# --- centre crop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_center_crop_then_resize(mode):
    wide = torch.rand(1, 3, 10, 20)
    # 20x10 to a square: cut round((20 - 20 * (1 / 2)) / 2) = 5 columns each side
    assert torch.equal(cu.common_upscale(wide, 8, 8, mode, "center"),
                       cu.common_upscale(wide[..., 5:15], 8, 8, mode, "disabled"))
    tall = torch.rand(1, 3, 12, 6)
    # 6x12 (aspect 0.5) to 6x4 (aspect 1.5): cut round((12 - 12 * (0.5 / 1.5)) / 2) = 4 rows each side
    assert torch.equal(cu.common_upscale(tall, 6, 4, mode, "center"),
                       cu.common_upscale(tall[..., 4:8, :], 6, 4, mode, "disabled"))
    same = torch.rand(1, 3, 6, 9)
    assert torch.equal(cu.common_upscale(same, 12, 8, mode, "center"),
                       cu.common_upscale(same, 12, 8, mode, "disabled"))


# --- 5-D video latents ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("crop", ["disabled", "center"])
def test_video_latents_resize_frame_by_frame(mode, crop):
    # each frame [B, C, H, W] on its own, its channels together (bislerp slerps across them)
    c = 3 if mode == "lanczos" else 16
    v = torch.rand(2, c, 3, 6, 10)
    out = cu.common_upscale(v, 7, 5, mode, crop)
    assert out.shape == (2, c, 3, 5, 7)
    per_frame = torch.stack([cu.common_upscale(v[:, :, t], 7, 5, mode, crop) for t in range(3)], dim=2)
    assert torch.equal(out, per_frame)


# --- bislerp ------------------------------------------------------------------------------------------------


def _source_taps(old: int, new: int) -> list[tuple[int, int, float]]:
    """Bilinear (align_corners=False) source position per output, clamped to the edges, in float64."""
    taps = []
    for j in range(new):
        pos = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1)
        i0 = math.floor(pos)
        taps.append((i0, min(i0 + 1, old - 1), pos - i0))
    return taps


def _slerp_ref(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """The blend bislerp is defined by, for one pair of channel vectors, in float64."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na else np.zeros_like(a)
    ub = b / nb if nb else np.zeros_like(b)
    cos = float(ua @ ub)
    if cos > 1 - 1e-5:
        return a.copy()
    if cos < 1e-5 - 1:
        return (1 - r) * a + r * b
    om = math.acos(cos)
    unit = (math.sin((1 - r) * om) * ua + math.sin(r * om) * ub) / math.sin(om)
    return unit * ((1 - r) * na + r * nb)


def _bislerp_ref(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Separable: along W on every input row, then along H on that result."""
    a = x.double().numpy()
    n, c, h, w = a.shape
    rows = np.zeros((n, c, h, width))
    for j, (i0, i1, r) in enumerate(_source_taps(w, width)):
        for b in range(n):
            for y in range(h):
                rows[b, :, y, j] = _slerp_ref(a[b, :, y, i0], a[b, :, y, i1], r)
    out = np.zeros((n, c, height, width))
    for i, (i0, i1, r) in enumerate(_source_taps(h, height)):
        for b in range(n):
            for xx in range(width):
                out[b, :, i, xx] = _slerp_ref(rows[b, :, i0, xx], rows[b, :, i1, xx], r)
    return torch.from_numpy(out)


@pytest.mark.parametrize("size", [(4, 8, 8, 16), (6, 5, 4, 2), (3, 4, 12, 6)])  # (w, h, new w, new h)
def test_bislerp_matches_its_formula(size):
    # scale factors (old/new) exact in binary, so float32 source positions equal the float64 ones
    w, h, nw, nh = size
    x = torch.randn(2, 4, h, w)
    out = cu.common_upscale(x, nw, nh, "bislerp", "disabled")
    assert out.shape == (2, 4, nh, nw) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _bislerp_ref(x, nw, nh), atol=2e-5, rtol=2e-5)


def test_bislerp_hand_computed_row():
    # one row, C=2, width 2 -> 4: source positions 0, 0.25, 0.75, 1 (the outer two clamped to the edges)
    def row(a, b):
        x = torch.tensor([a, b], dtype=torch.float32).T.reshape(1, 2, 1, 2)
        return cu.common_upscale(x, 4, 1, "bislerp", "disabled")[0, :, 0].T

    s, c = math.sin(math.pi / 8), math.cos(math.pi / 8)
    # orthogonal (1,0) and (0,2): the direction turns by r * 90 degrees, the length goes 1 -> 2 linearly
    expect = [[1, 0], [1.25 * c, 1.25 * s], [1.75 * s, 1.75 * c], [0, 2]]
    torch.testing.assert_close(row([1, 0], [0, 2]), torch.tensor(expect), atol=1e-6, rtol=0)
    # a zero vector has no direction: its unit vector is taken as 0, so the pair counts as orthogonal and
    # the result is sin(r * 90deg) * (0,1) * (r * 2), not the lerp (0, 2r)
    expect = [[0, 0], [0, 0.5 * s], [0, 1.5 * c], [0, 2]]
    torch.testing.assert_close(row([0, 0], [0, 2]), torch.tensor(expect), atol=1e-6, rtol=0)
    # opposite vectors: plain lerp
    torch.testing.assert_close(row([1, 0], [-3, 0]), torch.tensor([[1.0, 0], [0, 0], [-2, 0], [-3, 0]]))
    # parallel vectors of different lengths: the first one, unchanged, up to the last tap
    torch.testing.assert_close(row([1, 1], [2, 2]), torch.tensor([[1.0, 1], [1, 1], [1, 1], [2, 2]]))


def test_bislerp_properties():
    x = torch.randn(2, 4, 7, 9)
    # same size: every source position is a pixel centre (weight 0), so each pixel comes back (up to the
    # rounding of a / |a| * |a|)
    torch.testing.assert_close(cu.common_upscale(x, 9, 7, "bislerp", "disabled"), x, atol=1e-6, rtol=1e-6)
    # identical neighbours (a flat image): any blend of a vector with itself is that vector
    flat = torch.randn(1, 4, 1, 1).expand(1, 4, 5, 6)
    assert torch.equal(cu.common_upscale(flat, 11, 3, "bislerp", "disabled"), flat[:, :, :3, :1].expand(1, 4, 3, 11))
    # one shared direction, positive lengths: every pair is parallel, so bislerp picks the upper-left tap
    # of each output (a nearest-floor resample), which F.interpolate(bilinear) would not
    lengths = torch.rand(1, 1, 4, 4) + 0.5
    u = torch.tensor([0.6, 0.8]).view(1, 2, 1, 1)
    out = cu.common_upscale(u * lengths, 8, 8, "bislerp", "disabled")
    left = [i0 for i0, _, _ in _source_taps(4, 8)]
    torch.testing.assert_close(out, (u * lengths)[:, :, left][:, :, :, left])
    # source positions are float32 bilinear positions, as F.interpolate computes them: for 3 -> 19 columns,
    # output 9 sits at (9.5 * 3 / 19 - 0.5) = 1 exactly in real numbers but a hair below 1 in float32, so
    # its upper-left tap is column 0, not 1
    pos = F.interpolate(torch.arange(3.0).view(1, 1, 1, 3), size=(1, 19), mode="bilinear").view(-1)
    assert pos[9] < 1
    row = u * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    out = cu.common_upscale(row, 19, 1, "bislerp", "disabled")
    assert torch.equal(out[..., 9], row[..., 0]) and torch.equal(out[..., 10], row[..., 1])
    # orthogonal-ish general vectors: the output length is the linear blend of the two input lengths
    a, b = torch.randn(3), torch.randn(3)
    x = torch.stack([a, b], dim=1).reshape(1, 3, 1, 2)
    out = cu.common_upscale(x, 4, 1, "bislerp", "disabled")[0, :, 0]
    norms = [a.norm(), 0.75 * a.norm() + 0.25 * b.norm(), 0.25 * a.norm() + 0.75 * b.norm(), b.norm()]
    torch.testing.assert_close(out.norm(dim=0), torch.stack(norms))


def test_bislerp_dtype_and_device_roundtrip():
    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16)
    out = cu.common_upscale(x, 3, 3, "bislerp", "disabled")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cu.common_upscale(x.float(), 3, 3, "bislerp", "disabled").to(torch.bfloat16))


# --- the nodes and helpers that resize through common_upscale ----------------------------------------------


def _image_via(method, w, h, image, crop="disabled"):
    return cu.common_upscale(image.movedim(-1, 1), w, h, method, crop).movedim(1, -1)


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_image_nodes_use_common_upscale(method):
    from comfy_extras import nodes_image_tools as it

    img = torch.rand(2, 30, 40, 3)
    assert torch.equal(it.ImageScale().upscale(img, method, 25, 20, "center")[0],
                       _image_via(method, 25, 20, img, "center"))
    assert torch.equal(it.ImageScaleBy().upscale(img, method, 0.55)[0], _image_via(method, 22, 16, img))
    # 0.01 MP: scale sqrt(10485.76 / 1200) = 2.956 -> 118.2 x 88.7 -> 118 x 89
    assert torch.equal(it.ImageScaleToTotalPixels().upscale(img, method, 0.01, 1)[0],
                       _image_via(method, 118, 89, img))


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_nodes_use_common_upscale(method):
    from comfy_extras import nodes_mask_latent as nml

    for x in (torch.randn(2, 4, 8, 8), torch.randn(1, 16, 3, 8, 6)):
        (up,) = nml.LatentUpscale().upscale({"samples": x}, method, 96, 80, "center")
        assert torch.equal(up["samples"], cu.common_upscale(x, 12, 10, method, "center"))
        (by,) = nml.LatentUpscaleBy().upscale({"samples": x}, method, 1.5)
        assert torch.equal(by["samples"], cu.common_upscale(x, round(x.shape[-1] * 1.5), 12, method, "disabled"))


def test_kontext_stitch_and_latent_fit_use_common_upscale():
    from comfy.model_base import _fit_latent_hw
    from comfy_extras.nodes_flux import FluxKontextImageScale
    from comfy_extras.nodes_images import ImageStitch

    img = torch.rand(1, 100, 200, 3)
    # closest Kontext aspect to 2:1 is 1456x720; lanczos after a centre crop
    assert torch.equal(FluxKontextImageScale().scale(img)[0], _image_via("lanczos", 1456, 720, img, "center"))
    a, b = torch.rand(1, 8, 8, 3), torch.rand(1, 4, 6, 3)
    (out,) = ImageStitch().stitch(a, "right", True, 0, "white", b)
    assert torch.equal(out[:, :, 8:], _image_via("lanczos", 12, 8, b))  # height 8 at b's 3:2 aspect
    # model_base folds video frames itself; it must agree with common_upscale's 5-D handling
    v = torch.randn(1, 16, 3, 6, 10)
    assert torch.equal(_fit_latent_hw(v, 4, 4), cu.common_upscale(v, 4, 4, "bilinear", "center"))
