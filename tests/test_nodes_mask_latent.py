"""comfy_extras/nodes_mask_latent.py: ComfyUI's mask and latent nodes (interfaces, exact values, shapes,
noise_mask / batch_index bookkeeping), the sampler honouring SetLatentNoiseMask, and a prompt through
validate_prompt + the executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import execution
import nodes
from comfy import model_sampling as ms
from comfy_extras import nodes_mask_latent as nml
from tests.fixtures.harness import FakeServer
from tests.sampling_fakes import conditioning, const_x0_fn, make_patcher


def _lat(*shape, fill=None):
    x = torch.arange(float(np.prod(shape))).reshape(shape) if fill is None else torch.full(shape, float(fill))
    return {"samples": x}


# -- interfaces -----------------------------------------------------------------------------------------


def test_interfaces_match_comfyui():
    m = nml.NODE_CLASS_MAPPINGS
    req = {name: cls.INPUT_TYPES()["required"] for name, cls in m.items()}
    assert req["ImageToMask"]["channel"][0] == ["red", "green", "blue", "alpha"]
    assert req["GrowMask"]["expand"][1]["min"] == -nodes.MAX_RESOLUTION
    assert req["GrowMask"]["tapered_corners"] == ("BOOLEAN", {"default": True})
    assert req["MaskComposite"]["operation"][0] == ["multiply", "add", "subtract", "and", "or", "xor"]
    assert list(req["FeatherMask"]) == ["mask", "left", "top", "right", "bottom"]
    assert list(req["LatentUpscale"]) == ["samples", "upscale_method", "width", "height", "crop"]
    assert req["LatentUpscale"]["upscale_method"][0] == ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
    assert req["LatentUpscaleBy"]["scale_by"][1] == {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}
    assert list(req["LatentComposite"]) == ["samples_to", "samples_from", "x", "y", "feather"]
    assert req["LatentConcat"]["dim"][0] == ["x", "-x", "y", "-y", "t", "-t"]
    assert list(req["LatentCut"]) == ["samples", "dim", "index", "amount"]
    assert req["LatentCut"]["index"][1]["min"] == -nodes.MAX_RESOLUTION
    assert req["TrimVideoLatent"]["trim_amount"][1] == {"default": 0, "min": 0, "max": 99999}
    assert list(req["LatentFromBatch"]) == ["samples", "batch_index", "length"]
    assert list(req["SetLatentNoiseMask"]) == ["samples", "mask"]
    assert req["LoadImageMask"]["channel"][0] == ["alpha", "red", "green", "blue"]
    assert m["SplitImageWithAlpha"].RETURN_TYPES == ("IMAGE", "MASK")
    assert m["JoinImageWithAlpha"].CATEGORY == "mask/compositing"
    assert m["LatentBlend"].CATEGORY == "_for_testing" and m["LatentAdd"].CATEGORY == "latent/advanced"
    assert m["SetLatentNoiseMask"].CATEGORY == "latent/inpaint"
    for name, cls in m.items():
        assert callable(getattr(cls(), cls.FUNCTION)), name
    # loaded automatically with the other comfy_extras modules
    assert "nodes_mask_latent.py" not in nodes.init_builtin_extra_nodes()
    assert nodes.NODE_CLASS_MAPPINGS["LatentCut"].__name__ == "LatentCut"


# -- masks ----------------------------------------------------------------------------------------------


def test_image_mask_conversions_and_invert():
    img = torch.rand(2, 3, 5, 4)
    (mask,) = nml.ImageToMask().image_to_mask(img, "green")
    assert torch.equal(mask, img[..., 1]) and mask.shape == (2, 3, 5)
    (back,) = nml.MaskToImage().mask_to_image(mask)
    assert back.shape == (2, 3, 5, 3) and torch.equal(back[..., 2], mask)
    (inv,) = nml.InvertMask().invert(torch.tensor([[[0.0, 0.25, 1.0]]]))
    assert inv.tolist() == [[[1.0, 0.75, 0.0]]]
    (solid,) = nml.SolidMask().solid(0.5, 3, 2)
    assert solid.shape == (1, 2, 3) and bool((solid == 0.5).all())
    (thr,) = nml.ThresholdMask().image_to_mask(torch.tensor([[0.2, 0.5, 0.51]]), 0.5)
    assert thr.tolist() == [[0.0, 0.0, 1.0]]
    (crop,) = nml.CropMask().crop(torch.arange(20.0).reshape(4, 5), 1, 2, 2, 5)
    assert crop.tolist() == [[[11.0, 12.0], [16.0, 17.0]]]


def test_mask_composite_operations_exact():
    dst = torch.tensor([[[0.2, 0.6, 0.9],
                         [0.4, 0.4, 0.4]]])
    src = torch.tensor([[[0.5, 0.7],
                         [0.3, 0.1]]])
    mc = nml.MaskComposite()

    def at(op, x=1, y=0):
        return mc.combine(dst, src, x, y, op)[0][0]

    # only columns 1..2 are covered (source clipped to the destination); column 0 keeps the destination
    torch.testing.assert_close(at("multiply"), torch.tensor([[0.2, 0.3, 0.63], [0.4, 0.12, 0.04]]))
    torch.testing.assert_close(at("add"), torch.tensor([[0.2, 1.0, 1.0], [0.4, 0.7, 0.5]]))  # clamped
    torch.testing.assert_close(at("subtract"), torch.tensor([[0.2, 0.1, 0.2], [0.4, 0.1, 0.3]]))
    # boolean operations round both masks to 0/1 first (torch.round: 0.5 -> 0, half to even)
    assert at("and").tolist() == [[pytest.approx(0.2), 0.0, 1.0], [pytest.approx(0.4), 0.0, 0.0]]
    assert at("or").tolist() == [[pytest.approx(0.2), 1.0, 1.0], [pytest.approx(0.4), 0.0, 0.0]]
    assert at("xor").tolist() == [[pytest.approx(0.2), 1.0, 0.0], [pytest.approx(0.4), 0.0, 0.0]]
    assert torch.equal(mc.combine(dst, src, 7, 0, "add")[0], dst)  # placed outside: unchanged


def test_feather_mask_edges_exact():
    ones = torch.ones(1, 4, 6)
    (left,) = nml.FeatherMask().feather(ones, 3, 0, 0, 0)
    torch.testing.assert_close(left[0, 0], torch.tensor([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(left[0, 0], left[0, 3])
    # ComfyUI's right/bottom ramps index column/row -i: step 0 hits column 0, the last column gets 2/n
    (right,) = nml.FeatherMask().feather(ones, 0, 0, 2, 0)
    torch.testing.assert_close(right[0, 0], torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, 1.0]))
    (right3,) = nml.FeatherMask().feather(ones, 0, 0, 3, 0)
    torch.testing.assert_close(right3[0, 0], torch.tensor([1 / 3, 1, 1, 1, 1.0, 2 / 3]))
    (top,) = nml.FeatherMask().feather(ones, 0, 2, 0, 0)
    torch.testing.assert_close(top[0, :, 0], torch.tensor([0.5, 1.0, 1.0, 1.0]))
    (big,) = nml.FeatherMask().feather(ones, 100, 0, 0, 0)  # clamped to the width
    torch.testing.assert_close(big[0, 0], torch.arange(1.0, 7.0) / 6)


def test_grow_mask_exact():
    dot = torch.zeros(1, 5, 5)
    dot[0, 2, 2] = 1.0
    (cross,) = nml.GrowMask().expand_mask(dot, 1, True)
    assert cross[0].tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0],
                                 [0, 0, 0, 0, 0]]
    (square,) = nml.GrowMask().expand_mask(dot, 1, False)
    assert square[0].sum() == 9 and square[0, 1:4, 1:4].min() == 1
    (diamond,) = nml.GrowMask().expand_mask(dot, 2, True)
    assert diamond[0].sum() == 13 and diamond[0, 0, 2] == 1 and diamond[0, 0, 1] == 0
    # erosion: the 3x3 square shrinks back to its centre; grey values take the max/min of the footprint
    (shrunk,) = nml.GrowMask().expand_mask(square, -1, False)
    assert torch.equal(shrunk, dot)
    grey = torch.tensor([[[0.1, 0.7, 0.3]]])
    assert nml.GrowMask().expand_mask(grey, 1, True)[0].tolist() == [[[pytest.approx(0.7)] * 3]]
    assert torch.equal(nml.GrowMask().expand_mask(grey, 0, True)[0], grey)


def test_join_and_split_image_with_alpha():
    rgb = torch.rand(2, 4, 4, 3)
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0
    (rgba,) = nml.JoinImageWithAlpha().join_image_with_alpha(rgb, mask)
    assert rgba.shape == (1, 4, 4, 4)  # batch = the shorter of image and mask
    assert torch.equal(rgba[0, ..., :3], rgb[0])
    assert rgba[0, 0, 0, 3] == 0.0 and rgba[0, 3, 3, 3] == 1.0  # alpha = 1 - mask (resized)
    img, m = nml.SplitImageWithAlpha().split_image_with_alpha(rgba)
    assert torch.equal(img, rgba[..., :3]) and torch.allclose(m, 1.0 - rgba[..., 3])
    img3, m3 = nml.SplitImageWithAlpha().split_image_with_alpha(rgb)
    assert torch.equal(img3, rgb) and m3.shape == (2, 4, 4) and m3.abs().sum() == 0


def test_load_image_mask(base_dir):
    from PIL import Image

    import folder_paths

    arr = np.zeros((3, 2, 4), dtype=np.uint8)
    arr[..., 0] = 255
    arr[..., 3] = 51  # alpha 0.2 -> mask 0.8
    Image.fromarray(arr, "RGBA").save(f"{folder_paths.get_input_directory()}/m.png")
    assert "m.png" in nml.LoadImageMask.INPUT_TYPES()["required"]["image"][0]
    (alpha,) = nml.LoadImageMask().load_image("m.png", "alpha")
    assert alpha.shape == (1, 3, 2)
    torch.testing.assert_close(alpha, torch.full((1, 3, 2), 0.8))
    assert nml.LoadImageMask().load_image("m.png", "red")[0].min() == 1.0
    assert nml.LoadImageMask().load_image("m.png", "blue")[0].max() == 0.0
    assert nml.LoadImageMask.VALIDATE_INPUTS("nope.png") != True  # noqa: E712
    assert nml.LoadImageMask.IS_CHANGED("m.png", "alpha") == nodes.LoadImage.IS_CHANGED("m.png")


# -- latents --------------------------------------------------------------------------------------------


def test_latent_upscale_shapes_image_and_video():
    img = _lat(2, 4, 8, 8)
    assert nml.LatentUpscale().upscale(img, "nearest-exact", 128, 96, "disabled")[0]["samples"].shape \
        == (2, 4, 12, 16)
    # a 0 side keeps the aspect ratio; sizes below 64 px are raised to 64
    assert nml.LatentUpscale().upscale(img, "bilinear", 0, 128, "disabled")[0]["samples"].shape == (2, 4, 16, 16)
    assert nml.LatentUpscale().upscale(img, "bilinear", 8, 0, "disabled")[0]["samples"].shape == (2, 4, 8, 8)
    assert nml.LatentUpscale().upscale(img, "bilinear", 0, 0, "center")[0] is img
    vid = _lat(1, 16, 3, 4, 6)
    (up,) = nml.LatentUpscaleBy().upscale(vid, "nearest-exact", 2.0)
    assert up["samples"].shape == (1, 16, 3, 8, 12)
    # nearest x2 on each frame: every source value is repeated in a 2x2 block, frames stay apart
    torch.testing.assert_close(up["samples"][:, :, :, ::2, ::2], vid["samples"])
    assert nml.LatentUpscaleBy().upscale(img, "area", 0.5)[0]["samples"].shape == (2, 4, 4, 4)
    masked = {**img, "noise_mask": torch.ones(1, 1, 64, 64)}
    assert nml.LatentUpscaleBy().upscale(masked, "bilinear", 1.5)[0]["noise_mask"] is masked["noise_mask"]


def test_latent_from_batch_and_repeat_keep_masks_and_indices():
    lat = _lat(4, 1, 2, 2)
    masks = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    lat["noise_mask"] = masks
    (part,) = nml.LatentFromBatch().frombatch(lat, 2, 5)
    assert torch.equal(part["samples"], lat["samples"][2:4])
    assert part["batch_index"] == [2, 3]
    assert part["noise_mask"][:, 0, 0, 0].tolist() == [0.0, 1.0]  # the two masks cycled over the batch
    (last,) = nml.LatentFromBatch().frombatch(lat, 63, 1)
    assert last["batch_index"] == [3]
    (again,) = nml.LatentFromBatch().frombatch(part, 1, 1)
    assert again["batch_index"] == [3]  # indices of the sub-batch are kept
    single = {"samples": torch.zeros(3, 4, 2, 2), "noise_mask": torch.ones(1, 1, 2, 2)}
    assert nml.LatentFromBatch().frombatch(single, 1, 1)[0]["noise_mask"].shape == (1, 1, 2, 2)

    (rep,) = nml.RepeatLatentBatch().repeat({"samples": torch.zeros(2, 4, 3, 2, 2), "batch_index": [5, 6],
                                             "noise_mask": torch.rand(2, 1, 2, 2)}, 3)
    assert rep["samples"].shape == (6, 4, 3, 2, 2)
    assert rep["batch_index"] == [5, 6, 7, 8, 9, 10]
    assert rep["noise_mask"].shape == (6, 1, 2, 2)
    assert "batch_index" not in nml.RepeatLatentBatch().repeat(_lat(1, 4, 2, 2), 2)[0]


def test_latent_batch_resizes_and_indexes():
    a = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [3, 4]}
    b = {"samples": torch.ones(1, 4, 4, 4)}
    (out,) = nml.LatentBatch().batch(a, b)
    assert out["samples"].shape == (3, 4, 8, 8)
    torch.testing.assert_close(out["samples"][2], torch.ones(4, 8, 8))
    assert out["batch_index"] == [3, 4, 0]
    v = nml.LatentBatch().batch(_lat(1, 16, 2, 4, 4), _lat(2, 16, 2, 4, 4))[0]
    assert v["samples"].shape == (3, 16, 2, 4, 4) and v["batch_index"] == [0, 0, 1]


def test_latent_composite_exact_and_feathered():
    to = {"samples": torch.zeros(1, 1, 4, 6)}
    frm = {"samples": torch.ones(1, 1, 2, 8)}
    (plain,) = nml.LatentComposite().composite(to, frm, 16, 8)  # (x, y) = (2, 1) latent pixels
    expect = torch.zeros(4, 6)
    expect[1:3, 2:6] = 1.0  # the source is clipped at the right edge
    assert torch.equal(plain["samples"][0, 0], expect)
    assert to["samples"].abs().sum() == 0  # input untouched
    (soft,) = nml.LatentComposite().composite({"samples": torch.zeros(1, 1, 6, 6)},
                                              {"samples": torch.ones(1, 1, 2, 2)}, 16, 16, feather=16)
    # the pasted 2x2 block fades in on all four sides (inside the target): rates 0.5 and 1.0 multiply
    torch.testing.assert_close(soft["samples"][0, 0, 2:4, 2:4], torch.tensor([[0.25, 0.25], [0.25, 0.25]]))
    assert soft["samples"][0, 0].sum() == pytest.approx(1.0)
    (edge,) = nml.LatentComposite().composite({"samples": torch.zeros(1, 1, 4, 4)},
                                              {"samples": torch.ones(1, 1, 2, 2)}, 0, 0, feather=16)
    # at the top-left corner only the bottom/right sides are inside the target
    torch.testing.assert_close(edge["samples"][0, 0, :2, :2], torch.tensor([[1.0, 0.5], [0.5, 0.25]]))
    vid = nml.LatentComposite().composite(_lat(1, 2, 3, 4, 4, fill=0), _lat(1, 2, 3, 2, 2, fill=1), 8, 8)[0]
    assert vid["samples"].sum() == 2 * 3 * 4 and vid["samples"][0, 1, 2, 1:3, 1:3].min() == 1


def test_latent_blend_and_arithmetic():
    a = _lat(2, 4, 4, 4, fill=2.0)
    b = _lat(1, 4, 4, 4, fill=1.0)
    assert nml.LatentBlend().blend(a, _lat(2, 4, 4, 4, fill=0.0), 0.25)[0]["samples"].unique().tolist() == [0.5]
    (add,) = nml.LatentAdd().op(a, b)
    assert add["samples"].shape == (2, 4, 4, 4) and add["samples"].unique().tolist() == [3.0]  # batch repeated
    assert nml.LatentSubtract().op(a, b)[0]["samples"].unique().tolist() == [1.0]
    (resized,) = nml.LatentAdd().op(a, _lat(1, 4, 2, 2, fill=1.0))  # other size: resized to samples1
    assert resized["samples"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(resized["samples"], torch.full((2, 4, 4, 4), 3.0))
    (mul,) = nml.LatentMultiply().op({**a, "noise_mask": torch.ones(1, 1, 4, 4)}, -0.5)
    assert mul["samples"].unique().tolist() == [-1.0] and "noise_mask" in mul


def test_latent_concat_and_cut_image_and_video():
    img = _lat(1, 4, 2, 3)
    other = _lat(2, 4, 2, 5, fill=-1)
    assert nml.LatentConcat().execute(img, other, "x")[0]["samples"].shape == (1, 4, 2, 8)  # batch cut to 1
    (before,) = nml.LatentConcat().execute(img, other, "-x")
    assert before["samples"][0, 0, 0, :5].unique().tolist() == [-1.0]
    assert nml.LatentConcat().execute(img, _lat(1, 4, 3, 3), "y")[0]["samples"].shape == (1, 4, 5, 3)
    vid = _lat(2, 16, 5, 2, 2)
    assert nml.LatentConcat().execute(vid, _lat(1, 16, 3, 2, 2), "t")[0]["samples"].shape == (2, 16, 8, 2, 2)

    cut = nml.LatentCut()
    (t,) = cut.execute(vid, "t", 1, 3)
    assert torch.equal(t["samples"], vid["samples"][:, :, 1:4])
    assert cut.execute(vid, "t", 3, 10)[0]["samples"].shape == (2, 16, 2, 2, 2)  # clamped at the end
    assert torch.equal(cut.execute(vid, "t", -2, 5)[0]["samples"], vid["samples"][:, :, 3:5])
    assert torch.equal(cut.execute(vid, "t", -9, 1)[0]["samples"], vid["samples"][:, :, :1])
    assert torch.equal(cut.execute(vid, "t", 99, 4)[0]["samples"], vid["samples"][:, :, 4:])
    assert torch.equal(cut.execute(img, "x", 1, 1)[0]["samples"], img["samples"][..., 1:2])
    assert cut.execute(img, "y", 0, 1)[0]["samples"].shape == (1, 4, 1, 3)


def test_trim_video_latent():
    vid = _lat(1, 16, 6, 2, 2)
    (out,) = nml.TrimVideoLatent().execute(vid, 2)
    assert torch.equal(out["samples"], vid["samples"][:, :, 2:])
    assert nml.TrimVideoLatent().execute(vid, 0)[0]["samples"].shape == (1, 16, 6, 2, 2)
    assert nml.TrimVideoLatent().execute(vid, 10)[0]["samples"].shape == (1, 16, 0, 2, 2)


def test_set_latent_noise_mask_is_honoured_by_ksampler():
    (lat,) = nml.SetLatentNoiseMask().set_mask(_lat(1, 4, 4, 4, fill=2.0), torch.tensor([[1.0, 1, 0, 0]] * 4))
    assert lat["noise_mask"].shape == (1, 1, 4, 4)
    patcher = make_patcher(ms.ModelSamplingFlux(), const_x0_fn(lambda v: torch.full((4, 4, 4), v)))
    (out,) = nodes.KSampler().sample(patcher, 1, 4, 1.0, "euler", "simple", conditioning(0.5),
                                     conditioning(0.5), lat, 1.0)
    assert torch.equal(out["noise_mask"], lat["noise_mask"])  # the mask rides along
    torch.testing.assert_close(out["samples"][..., :2], torch.full((1, 4, 4, 2), 0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["samples"][..., 2:], torch.full((1, 4, 4, 2), 2.0), atol=1e-6, rtol=0)


# -- a prompt through validation and the executor -------------------------------------------------------


class _Probe:
    SEEN: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "mask": ("MASK",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, latent, mask, unique_id=None):
        _Probe.SEEN[unique_id] = (latent, mask)
        return {"ui": {"shape": list(latent["samples"].shape)}}


@pytest.fixture
def registered(monkeypatch):
    for name, cls in nml.NODE_CLASS_MAPPINGS.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "MaskLatentProbe", _Probe)
    _Probe.SEEN.clear()


def _prompt(operation="subtract"):
    return {
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 2, "height": 2}},
        "3": {"class_type": "MaskComposite", "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 3,
                                                        "y": 3, "operation": operation}},
        "4": {"class_type": "InvertMask", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "GrowMask", "inputs": {"mask": ["4", 0], "expand": 1, "tapered_corners": False}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "7": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["6", 0], "amount": 2}},
        "8": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["7", 0], "upscale_method": "bislerp",
                                                          "scale_by": 1.5}},
        "9": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["8", 0], "mask": ["5", 0]}},
        "10": {"class_type": "LatentFromBatch", "inputs": {"samples": ["9", 0], "batch_index": 1, "length": 2}},
        "11": {"class_type": "LatentCut", "inputs": {"samples": ["10", 0], "dim": "x", "index": -4,
                                                     "amount": 3}},
        "12": {"class_type": "MaskLatentProbe", "inputs": {"latent": ["11", 0], "mask": ["5", 0]}},
    }


def test_prompt_validates_and_runs(registered):
    ok, error, good, node_errors = execution.validate_prompt("p", _prompt())
    assert ok, (error, node_errors)
    assert good == ["12"]
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(_prompt(), "p1", {"client_id": "c1"}, good)
    assert ex.success, ex.status_messages
    assert ex.history_result["outputs"]["12"] == {"shape": [2, 4, 12, 3]}
    latent, mask = _Probe.SEEN["12"]
    assert latent["batch_index"] == [1, 2]
    assert latent["noise_mask"].shape == (1, 1, 8, 8)
    # 8x8 ones minus a 2x2 hole at (3, 3), inverted (a 2x2 spot), grown by one pixel with square corners
    expect = torch.zeros(1, 8, 8)
    expect[0, 2:6, 2:6] = 1.0
    assert torch.equal(mask, expect) and torch.equal(latent["noise_mask"][:, 0], expect)


def test_prompt_validation_rejects_bad_inputs(registered):
    ok, _, _, node_errors = execution.validate_prompt("p", _prompt(operation="nand"))
    assert not ok
    assert any(e["type"] == "value_not_in_list" for e in node_errors["3"]["errors"])
    bad = _prompt()
    bad["11"]["inputs"]["amount"] = 0  # below min
    ok, _, _, node_errors = execution.validate_prompt("p", bad)
    assert not ok and any(e["type"] == "value_smaller_than_min" for e in node_errors["11"]["errors"])
    wrong_type = _prompt()
    wrong_type["9"]["inputs"]["mask"] = ["6", 0]  # a LATENT into a MASK input
    ok, _, _, node_errors = execution.validate_prompt("p", wrong_type)
    assert not ok and "9" in node_errors
