"""Core loader / latent / image nodes of the Flux slice: interfaces and behaviour."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
demo = demo_script()


@pytest.fixture
def nodes_mod(base_dir):
    import nodes

    return nodes


def test_registry_and_interfaces(nodes_mod):
    nodes = nodes_mod
    for name in ("UNETLoader", "CheckpointLoaderSimple", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader",
                 "VAELoader", "CLIPTextEncode", "ConditioningZeroOut", "EmptyLatentImage", "VAEDecode",
                 "VAEEncode", "SaveImage", "PreviewImage", "LoadImage"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name
    u = nodes.UNETLoader.INPUT_TYPES()["required"]
    assert list(u) == ["unet_name", "weight_dtype"]
    assert u["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert nodes.UNETLoader.CATEGORY == "advanced/loaders" and nodes.UNETLoader.FUNCTION == "load_unet"
    assert nodes.CheckpointLoaderSimple.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert "flux" in nodes.DualCLIPLoader.INPUT_TYPES()["required"]["type"][0]
    assert nodes.SaveImage.OUTPUT_NODE and nodes.SaveImage.INPUT_TYPES()["hidden"] == {
        "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert nodes.LoadImage.RETURN_TYPES == ("IMAGE", "MASK")
    assert nodes.EmptyLatentImage.INPUT_TYPES()["required"]["width"][1]["default"] == 512
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["UNETLoader"] == "Load Diffusion Model"


def test_extras_nodes(nodes_mod):
    from comfy_extras.nodes_flux import (
        FluxDisableGuidance,
        FluxGuidance,
        FluxKontextImageScale,
        ReferenceLatent,
    )
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    (lat,) = EmptySD3LatentImage().generate(96, 64, 2)
    assert lat["samples"].shape == (2, 16, 8, 12) and not lat["samples"].any()
    (lat4,) = nodes_mod.EmptyLatentImage().generate(64, 48, 1)
    assert lat4["samples"].shape == (1, 4, 6, 8)
    cond = [[torch.ones(1, 3, 4), {"pooled_output": torch.ones(1, 2)}]]
    (g,) = FluxGuidance().append(cond, 2.5)
    assert g[0][1]["guidance"] == 2.5 and "guidance" not in cond[0][1]  # input untouched
    (d,) = FluxDisableGuidance().append(g)
    assert "guidance" in d[0][1] and d[0][1]["guidance"] is None
    (z,) = nodes_mod.ConditioningZeroOut().zero_out(g)
    assert not z[0][0].any() and not z[0][1]["pooled_output"].any() and z[0][1]["guidance"] == 2.5
    (r,) = ReferenceLatent().append(cond, {"samples": torch.zeros(1, 16, 4, 4)})
    (r2,) = ReferenceLatent().append(r, {"samples": torch.ones(1, 16, 2, 2)})
    assert len(r2[0][1]["reference_latents"]) == 2 and len(r[0][1]["reference_latents"]) == 1
    (scaled,) = FluxKontextImageScale().scale(torch.rand(1, 100, 200, 3))
    assert scaled.shape == (1, 720, 1456, 3)  # 1456/720 = 2.02 is the closest Kontext aspect to 2:1


def test_unet_loader_node_with_fp8(nodes_mod, base_dir):
    import folder_paths

    sd = demo.random_flux_state_dict(hidden_size=32, num_heads=2, context_in_dim=8, vec_in_dim=4)
    d = os.path.join(base_dir, "models", "diffusion_models")
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "tiny-flux.safetensors"))
    assert "tiny-flux.safetensors" in nodes_mod.UNETLoader.INPUT_TYPES()["required"]["unet_name"][0]
    (m,) = nodes_mod.UNETLoader().load_unet("tiny-flux.safetensors", "fp8_e4m3fn")
    assert m.model.diffusion_model.img_in.weight.dtype == torch.float8_e4m3fn
    assert folder_paths.get_full_path("diffusion_models", "tiny-flux.safetensors")
    with pytest.raises(Exception, match="missing.safetensors"):
        nodes_mod.UNETLoader().load_unet("missing.safetensors", "default")


def test_image_to_uint8_gives_the_numpy_formula_bytes(nodes_mod):
    """SaveImage's float -> uint8 step (one torch pass) against ComfyUI's numpy formula, on values around every
    step boundary k/255, out of range, half precision and a non-contiguous view."""
    k = torch.arange(256, dtype=torch.float32) / 255.0
    edges = torch.cat([k, torch.nextafter(k, torch.tensor(2.0)), torch.nextafter(k, torch.tensor(-1.0)),
                       torch.tensor([-3.0, -1e-9, 0.0, 1.0, 1.0 + 1e-7, 7.5]), torch.rand(4000)])
    img = edges[: edges.numel() // 3 * 3].view(-1, 1, 3).expand(-1, 2, 3)
    big = torch.rand(700, 400, 3) * 1.2 - 0.1  # row blocks on several threads
    for image in (img, img.half(), img.transpose(0, 1), big):
        kept = image.clone()
        want = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
        got = nodes_mod.image_to_uint8(image)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert torch.equal(image, kept)  # the IMAGE is left as it was
        with torch.inference_mode():  # as the executor runs nodes (the pool threads are not in it)
            np.testing.assert_array_equal(nodes_mod.image_to_uint8(image.clone()), want)


def test_save_image_png_metadata_and_counter(nodes_mod, base_dir):
    import folder_paths

    img = torch.rand(2, 8, 12, 3)
    prompt = {"1": {"class_type": "SaveImage", "inputs": {}}}
    res = nodes_mod.SaveImage().save_images(img, "sub/test", prompt=prompt,
                                            extra_pnginfo={"workflow": {"nodes": [1]}})
    files = res["ui"]["images"]
    assert [f["filename"] for f in files] == ["test_00001_.png", "test_00002_.png"]
    assert files[0]["subfolder"] == "sub" and files[0]["type"] == "output"
    path = os.path.join(folder_paths.get_output_directory(), "sub", "test_00001_.png")
    with Image.open(path) as im:
        assert json.loads(im.text["prompt"]) == prompt and json.loads(im.text["workflow"]) == {"nodes": [1]}
        arr = np.array(im)
    assert arr.shape == (8, 12, 3)
    np.testing.assert_array_equal(arr, np.clip(255.0 * img[0].numpy(), 0, 255).astype(np.uint8))
    res2 = nodes_mod.SaveImage().save_images(img[:1], "sub/test")
    assert res2["ui"]["images"][0]["filename"] == "test_00003_.png"
    prev = nodes_mod.PreviewImage().save_images(img[:1])
    assert prev["ui"]["images"][0]["type"] == "temp"
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), prev["ui"]["images"][0]["filename"]))


def test_load_image_mask_hash_and_validation(nodes_mod, base_dir):
    import folder_paths

    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    path = os.path.join(folder_paths.get_input_directory(), "in.png")
    Image.fromarray(rgba, "RGBA").save(path)
    assert "in.png" in nodes_mod.LoadImage.INPUT_TYPES()["required"]["image"][0]
    assert nodes_mod.LoadImage.INPUT_TYPES()["required"]["image"][1] == {"image_upload": True}
    image, mask = nodes_mod.LoadImage().load_image("in.png")
    assert image.shape == (1, 6, 5, 3) and mask.shape == (1, 6, 5)
    assert abs(image[0, 0, 0, 0].item() - 200 / 255) < 1e-6
    assert mask[0, 0, 0] == 1.0 and mask[0, 1, 1] == 0.0  # mask = 1 - alpha
    h1 = nodes_mod.LoadImage.IS_CHANGED("in.png")
    rgba[1, 1, 0] = 7
    Image.fromarray(rgba, "RGBA").save(path)
    assert nodes_mod.LoadImage.IS_CHANGED("in.png") != h1
    assert nodes_mod.LoadImage.VALIDATE_INPUTS("in.png") is True
    assert "Invalid image file" in nodes_mod.LoadImage.VALIDATE_INPUTS("nope.png")
