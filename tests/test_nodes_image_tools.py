"""comfy_extras/nodes_image_tools.py: ComfyUI's core image nodes (scale, batch, canvas, filters, Canny)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import execution
import nodes
from comfy_extras import nodes_image_tools as it
from tests.fixtures.harness import FakeServer

NEW_NODES = ["ImageScale", "ImageScaleBy", "ImageScaleToTotalPixels", "ImageInvert", "ImageBatch", "EmptyImage",
             "ImagePadForOutpaint", "ImageCrop", "RepeatImageBatch", "ImageFromBatch", "GetImageSize",
             "ImageBlur", "ImageSharpen", "ImageQuantize", "Canny"]


def ramp(b=1, h=4, w=8, c=3):
    """Every pixel distinct: value encodes (batch, row, column, channel)."""
    n = b * h * w * c
    return (torch.arange(n, dtype=torch.float32) / n).reshape(b, h, w, c)


# --- scaling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", it.UPSCALE_METHODS)
def test_image_scale_exact_sizes(method):
    (out,) = it.ImageScale().upscale(torch.rand(2, 10, 20, 3), method, 7, 13, "disabled")
    assert out.shape == (2, 13, 7, 3) and out.dtype == torch.float32


def test_image_scale_center_crop_picks_the_centre():
    img = ramp(h=4, w=8)
    (out,) = it.ImageScale().upscale(img, "nearest-exact", 4, 4, "center")
    assert torch.equal(out, img[:, :, 2:6])  # 8 wide -> 4 wide square: 2 columns trimmed each side
    (tall,) = it.ImageScale().upscale(ramp(h=8, w=4), "nearest-exact", 4, 4, "center")
    assert torch.equal(tall, ramp(h=8, w=4)[:, 2:6])
    (plain,) = it.ImageScale().upscale(img, "nearest-exact", 4, 4, "disabled")
    assert torch.equal(plain, img[:, :, 1::2])  # no crop: nearest-exact samples pixel centres 1, 3, 5, 7


def test_image_scale_zero_keeps_aspect_ratio():
    img = torch.rand(1, 30, 40, 3)
    assert it.ImageScale().upscale(img, "bilinear", 0, 15, "disabled")[0].shape == (1, 15, 20, 3)
    assert it.ImageScale().upscale(img, "bilinear", 100, 0, "disabled")[0].shape == (1, 75, 100, 3)
    assert it.ImageScale().upscale(img, "bilinear", 0, 0, "disabled")[0] is img
    # ComfyUI uses interpolate without antialias: bilinear halving averages 2x2 blocks exactly
    (half,) = it.ImageScale().upscale(img, "bilinear", 20, 0, "disabled")
    blocks = img.reshape(1, 15, 2, 20, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(half, blocks, atol=1e-6)


def test_image_scale_by_and_lanczos_through_pil():
    img = torch.rand(2, 10, 16, 3)
    (out,) = it.ImageScaleBy().upscale(img, "lanczos", 1.5)
    assert out.shape == (2, 15, 24, 3)
    pil = Image.fromarray((img[1].numpy() * 255).clip(0, 255).astype(np.uint8))
    ref = np.asarray(pil.resize((24, 15), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert torch.allclose(out[1], torch.from_numpy(ref), atol=1e-6)
    (flat,) = it.ImageScaleBy().upscale(torch.full((1, 8, 8, 4), 0.6), "lanczos", 0.5)  # RGBA too
    assert flat.shape == (1, 4, 4, 4) and torch.allclose(flat, torch.full_like(flat, 153 / 255))
    assert it.ImageScaleBy().upscale(img, "area", 0.25)[0].shape == (2, 2, 4, 3)  # round(2.5) = 2, round(4)


def test_scale_to_total_pixels_rounding():
    node = it.ImageScaleToTotalPixels()
    # 1 MP of 400x300: scale sqrt(1048576 / 120000) = 2.95603 -> 1182.41 x 886.81
    assert node.upscale(torch.rand(1, 300, 400, 3), "bilinear", 1.0, 1)[0].shape == (1, 887, 1182, 3)
    # multiples of 32: 0.5 MP of 200x100 -> exactly 1024x512
    assert node.upscale(torch.rand(1, 100, 200, 3), "area", 0.5, 32)[0].shape == (1, 512, 1024, 3)
    # 1 MP of 400x300 to multiples of 64: 1182.41 / 64 = 18.48 -> 18*64, 886.81 / 64 = 13.86 -> 14*64
    assert node.upscale(torch.rand(1, 300, 400, 3), "nearest-exact", 1.0, 64)[0].shape == (1, 896, 1152, 3)
    assert node.INPUT_TYPES()["required"]["resolution_steps"][1]["default"] == 1


# --- colour, batches, canvas ----------------------------------------------------------------------------


def test_invert_twice_is_identity():
    img = torch.rand(2, 5, 6, 3)
    (inv,) = it.ImageInvert().invert(img)
    assert torch.allclose(inv, 1 - img) and not torch.allclose(inv, img)
    assert torch.allclose(it.ImageInvert().invert(inv)[0], img, atol=1e-7)


def test_image_batch_matches_channels_and_size():
    a, b = torch.rand(2, 8, 8, 3), torch.rand(1, 8, 8, 3)
    assert torch.equal(it.ImageBatch().batch(a, b)[0], torch.cat([a, b]))
    (out,) = it.ImageBatch().batch(torch.rand(1, 8, 8, 4), b)  # RGB gets alpha 1
    assert out.shape == (2, 8, 8, 4) and torch.equal(out[1, ..., 3], torch.ones(8, 8))
    (out,) = it.ImageBatch().batch(a, torch.full((1, 4, 8, 3), 0.25))  # resized to image1's size
    assert out.shape == (3, 8, 8, 3) and torch.allclose(out[2], torch.full((8, 8, 3), 0.25))


def test_empty_image_colour():
    (out,) = it.EmptyImage().generate(5, 3, 2, 0xFF8000)
    assert out.shape == (2, 3, 5, 3)
    assert torch.allclose(out[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0]))


def test_pad_for_outpaint_sizes_and_feather():
    img = torch.rand(1, 10, 12, 3)
    out, mask = it.ImagePadForOutpaint().expand_image(img, 4, 2, 0, 6, 3)
    assert out.shape == (1, 18, 16, 3) and mask.shape == (1, 18, 16)
    assert torch.equal(out[:, 2:12, 4:16], img)
    assert torch.all(out[:, :2] == 0.5) and torch.all(out[:, :, :4] == 0.5) and torch.all(out[:, 12:] == 0.5)
    m = mask[0]
    assert torch.all(m[:2] == 1) and torch.all(m[:, :4] == 1) and torch.all(m[12:] == 1)
    # inside, distance d to the nearest padded side (left, top, bottom; right was not padded) gives
    # ((3 - d) / 3)^2 for d < 3: row 2+5 (middle), columns 4.. -> d = 0, 1, 2, 3
    assert torch.allclose(m[7, 4:8], torch.tensor([1.0, (2 / 3) ** 2, (1 / 3) ** 2, 0.0]))
    assert torch.allclose(m[7, 12:16], torch.zeros(4))  # right edge: not padded, no ramp
    assert torch.allclose(m[11, 10], torch.tensor((2 / 3) ** 2))  # last image row: bottom distance 1
    # the ramp is skipped when 2 * feathering is not below both sides
    _, m2 = it.ImagePadForOutpaint().expand_image(img, 8, 0, 0, 0, 5)
    assert torch.all(m2[0, :, 8:] == 0) and torch.all(m2[0, :, :8] == 1)


def test_crop_region_and_clamping():
    img = ramp(h=6, w=8)
    (out,) = it.ImageCrop().crop(img, 3, 2, 4, 1)
    assert torch.equal(out, img[:, 1:3, 4:7])
    (edge,) = it.ImageCrop().crop(img, 5, 5, 100, 100)  # origin clamped to the last pixel
    assert torch.equal(edge, img[:, 5:, 7:])


def test_from_batch_and_repeat():
    img = ramp(b=5, h=2, w=2)
    assert torch.equal(it.ImageFromBatch().frombatch(img, 1, 2)[0], img[1:3])
    assert torch.equal(it.ImageFromBatch().frombatch(img, -2, 10)[0], img[3:])  # negative: from the end
    assert torch.equal(it.ImageFromBatch().frombatch(img, 99, 3)[0], img[4:])   # clamped to the last
    (rep,) = it.RepeatImageBatch().repeat(img[:2], 3)
    assert rep.shape == (6, 2, 2, 3) and torch.equal(rep[4:], img[:2])


def test_get_image_size_outputs_and_text(monkeypatch):
    import server
    sent = []

    class Fake:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((text, node_id))

    monkeypatch.setattr(server.PromptServer, "instance", Fake(), raising=False)
    assert it.GetImageSize().get_size(torch.rand(3, 7, 11, 3), unique_id="9") == (11, 7, 3)
    assert sent == [("width: 11, height: 7\n batch size: 3", "9")]
    assert it.GetImageSize.RETURN_NAMES == ("width", "height", "batch_size")


# --- filters --------------------------------------------------------------------------------------------


def test_blur_kernel_and_flat_image():
    flat = torch.full((1, 9, 9, 3), 0.4)
    assert torch.allclose(it.ImageBlur().blur(flat, 3, 1.0)[0], flat, atol=1e-6)
    img = torch.zeros(1, 9, 9, 1)
    img[0, 4, 4, 0] = 1.0
    (out,) = it.ImageBlur().blur(img, 1, 1.0)
    # ComfyUI's kernel puts its 3 taps at -1, 0, 1: weights exp(-d^2 / 2) for d^2 = 0, 1, 2
    w = torch.tensor([[math.exp(-1.0), math.exp(-0.5), math.exp(-1.0)],
                      [math.exp(-0.5), 1.0, math.exp(-0.5)],
                      [math.exp(-1.0), math.exp(-0.5), math.exp(-1.0)]])
    assert torch.allclose(out[0, 3:6, 3:6, 0], w / w.sum(), atol=1e-6)
    assert out.shape == img.shape and abs(out.sum().item() - 1.0) < 1e-5


def test_sharpen_raises_contrast_and_keeps_flat():
    flat = torch.full((1, 8, 8, 3), 0.3)
    assert torch.allclose(it.ImageSharpen().sharpen(flat, 2, 1.0, 1.0)[0], flat, atol=1e-5)
    img = torch.full((1, 8, 8, 3), 0.4)
    img[:, :, 4:] = 0.6
    assert torch.allclose(it.ImageSharpen().sharpen(img, 1, 1.0, 0.0)[0], img, atol=1e-6)  # alpha 0: identity
    (out,) = it.ImageSharpen().sharpen(img, 1, 1.0, 0.5)
    assert out[0, 4, 3, 0] < 0.4 - 1e-3 and out[0, 4, 4, 0] > 0.6 + 1e-3  # overshoot on both sides of the step
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-4"])
def test_quantize_colours(dither):
    img = torch.rand(1, 16, 16, 4)
    (out,) = it.ImageQuantize().quantize(img, 3, dither)
    assert out.shape == img.shape and torch.equal(out[..., 3], img[..., 3])
    assert len({tuple(p) for p in out[0, ..., :3].reshape(-1, 3).tolist()}) <= 3


def test_bayer_matrix_is_centred_and_a_permutation():
    m = it._bayer(4)
    assert sorted(((m + 0.5) * 16 - 0.5).round().astype(int).ravel().tolist()) == list(range(16))
    assert np.allclose(it._bayer(2), [[-0.375, 0.125], [0.375, -0.125]])


def test_canny_finds_the_square_outline_only():
    img = torch.zeros(1, 32, 32, 3)
    img[:, 8:24, 8:24] = 1.0
    (edges,) = it.Canny().detect_edge(img, 0.4, 0.8)
    assert edges.shape == (1, 32, 32, 3) and torch.equal(edges[..., 0], edges[..., 2])
    e = edges[0, :, :, 0]
    assert set(e.unique().tolist()) <= {0.0, 1.0}
    ys, xs = torch.nonzero(e, as_tuple=True)
    # every edge pixel is within one pixel of the square's boundary (x or y at 7/8 or 23/24) ...
    near = lambda v: ((v - 7.5).abs() <= 1) | ((v - 23.5).abs() <= 1)  # noqa: E731
    assert len(ys) > 40 and torch.all(near(ys) | near(xs))
    # ... nothing deep inside or far outside, and all four sides are found, thin (NMS: one pixel wide)
    assert e[12:20, 12:20].sum() == 0 and e[:4].sum() == 0 and e[:, 28:].sum() == 0
    for row in (12, 16, 20):
        assert e[row].sum() == 2  # left and right side, one pixel each
    for col in (12, 16, 20):
        assert e[:, col].sum() == 2


def test_canny_flat_image_and_thresholds():
    assert it.Canny().detect_edge(torch.full((2, 16, 16, 3), 0.7), 0.01, 0.02)[0].sum() == 0
    img = torch.zeros(1, 24, 24, 3)
    img[:, :, 12:] = 0.1  # a faint step: Sobel magnitude on the blurred step is about 0.2
    assert it.Canny().detect_edge(img, 0.4, 0.8)[0].sum() == 0
    assert it.Canny().detect_edge(img, 0.05, 0.1)[0][0, :, :, 0].sum(1).eq(1).all()  # one pixel per row


def test_canny_hysteresis_keeps_weak_pixels_touching_strong_ones():
    # a vertical step whose height falls off down the image: strong at the top, weak further down
    gray = torch.zeros(1, 1, 20, 20)
    gray[..., 10:] = torch.linspace(1.0, 0.2, 20).view(1, 1, 20, 1)
    _, edges = it.canny(gray, 0.3, 0.9)
    _, no_hyst = it.canny(gray, 0.9, 0.9)
    assert no_hyst.sum() > 0 and edges.sum() > no_hyst.sum()
    assert torch.all(edges >= no_hyst)


# --- interface: /object_info and a workflow through the validator and executor --------------------------


class _Collect:
    """Test output node that keeps whatever IMAGE / MASK / INT reaches it."""
    GOT: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("IMAGE,MASK,INT",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, value, unique_id):
        _Collect.GOT[unique_id] = value
        return {}


@pytest.fixture
def registry(monkeypatch):
    nodes.init_extra_nodes(init_custom_nodes=False)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestCollect", _Collect)
    _Collect.GOT = {}
    return nodes.NODE_CLASS_MAPPINGS


def test_object_info_of_every_new_node(registry):
    import server
    for name in NEW_NODES:
        assert registry[name].__name__ == it.NODE_CLASS_MAPPINGS[name].__name__  # init_extra_nodes re-imports
        info = server._node_info(name)
        assert info["name"] == name and info["python_module"] == "comfy_extras.nodes_image_tools"
        assert info["display_name"] == it.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info["output"] == list(registry[name].RETURN_TYPES)
    assert server._node_info("GetImageSize")["output_name"] == ["width", "height", "batch_size"]
    assert server._node_info("ImagePadForOutpaint")["output"] == ["IMAGE", "MASK"]
    assert server._node_info("ImageScale")["input_order"]["required"] == ["image", "upscale_method", "width",
                                                                          "height", "crop"]
    assert server._node_info("ImageBatch").get("deprecated") is True


def _workflow():
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0x808080}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                      "width": 32, "height": 32, "crop": "center"}},
        "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                        "scale_by": 2.0}},
        "4": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["3", 0], "upscale_method": "area",
                                                                   "megapixels": 0.01, "resolution_steps": 8}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["2", 0]}},
        "7": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["6", 0], "left": 8, "top": 0, "right": 8,
                                                               "bottom": 16, "feathering": 4}},
        "8": {"class_type": "ImageCrop", "inputs": {"image": ["7", 0], "width": 40, "height": 40, "x": 4, "y": 4}},
        "9": {"class_type": "RepeatImageBatch", "inputs": {"image": ["8", 0], "amount": 2}},
        "10": {"class_type": "ImageFromBatch", "inputs": {"image": ["9", 0], "batch_index": -3, "length": 2}},
        "11": {"class_type": "ImageBlur", "inputs": {"image": ["10", 0], "blur_radius": 2, "sigma": 1.5}},
        "12": {"class_type": "ImageSharpen", "inputs": {"image": ["11", 0], "sharpen_radius": 1, "sigma": 1.0,
                                                        "alpha": 0.5}},
        "13": {"class_type": "ImageQuantize", "inputs": {"image": ["12", 0], "colors": 8, "dither": "bayer-2"}},
        "14": {"class_type": "Canny", "inputs": {"image": ["13", 0], "low_threshold": 0.2, "high_threshold": 0.5}},
        "15": {"class_type": "GetImageSize", "inputs": {"image": ["14", 0]}},
        "20": {"class_type": "TestCollect", "inputs": {"value": ["14", 0]}},
        "21": {"class_type": "TestCollect", "inputs": {"value": ["7", 1]}},
        "22": {"class_type": "TestCollect", "inputs": {"value": ["15", 0]}},
        "23": {"class_type": "TestCollect", "inputs": {"value": ["15", 2]}},
    }


def test_workflow_validates_and_runs(registry):
    prompt = _workflow()
    ok, err, good, node_errors = execution.validate_prompt("p", prompt)
    assert ok, (err, node_errors)
    assert sorted(good) == ["20", "21", "22", "23"]
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, "p", {"client_id": "c"}, good)
    assert ex.success, ex.status_messages
    got = _Collect.GOT
    # 2x 32x32 -> 64x64 -> 0.01 MP (10485 px) to multiples of 8: 104x104 ; batch with 2 more at 104x104
    # -> pad to 120x120 ; crop 40x40 ; x2 = 8 ; last-3..-2 -> 2 images
    assert got["20"].shape == (2, 40, 40, 3)
    assert got["21"].shape == (1, 120, 120)
    assert got["22"] == 40 and got["23"] == 2


def test_validation_rejects_bad_values(registry):
    for node, key, bad in (("2", "upscale_method", "sinc"), ("2", "crop", "top"), ("2", "width", -1),
                           ("13", "dither", "atkinson"), ("14", "low_threshold", 1.5), ("9", "amount", 0)):
        prompt = _workflow()
        prompt[node]["inputs"][key] = bad
        ok, _, good, node_errors = execution.validate_prompt("p", prompt)
        # ComfyUI semantics: outputs that do not depend on the bad node still validate (node 21 only needs
        # nodes 1-7), so `ok` may stay true, but the bad node is reported and its outputs are dropped
        assert node in node_errors and "20" not in good, (node, key, bad)
