"""CLIP vision: a tiny random CLIPVisionModelWithProjection saved in ComfyUI's clip_vision layout, loaded by
CLIPVisionLoader and encoded by CLIPVisionEncode, checked against transformers' forward on the same pixels."""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from safetensors.torch import save_file


def tiny_clip_vision(hidden: int = 64, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tr.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 64), image_size=28, patch_size=14,
                              projection_dim=32, hidden_act="gelu")
    m = tr.CLIPVisionModelWithProjection(cfg).eval()
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
    return m, sd


@pytest.fixture
def clip_file(base_dir):
    ref, sd = tiny_clip_vision()
    path = base_dir / "models" / "clip_vision" / "clip_vision_tiny.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return ref, sd


def test_loader_and_encode_match_transformers(clip_file):
    import comfy.clip_vision
    from comfy_extras.nodes_clip_vision import CLIPVisionEncode, CLIPVisionLoader

    ref, _ = clip_file
    (cv,) = CLIPVisionLoader().load_clip("clip_vision_tiny.safetensors")
    assert cv.image_size == 28
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 40, 56, 3, generator=g)
    (out,) = CLIPVisionEncode().encode(cv, image, crop="center")
    pixels = comfy.clip_vision.clip_preprocess(image, size=28, crop=True)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True)
    # Wan i2v reads the penultimate layer's tokens: [B, 1 + (28/14)^2, hidden]
    assert out.penultimate_hidden_states.shape == (2, 5, 64)
    torch.testing.assert_close(out.penultimate_hidden_states, want.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["image_embeds"], want.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.penultimate_hidden_states, out.last_hidden_state)


def test_preprocess_crop_modes():
    import comfy.clip_vision

    # a wide image whose left and right thirds differ: a centre crop sees only the middle
    img = torch.zeros(1, 30, 90, 3)
    img[:, :, :30] = 1.0
    img[:, :, 60:] = 1.0
    centre = comfy.clip_vision.clip_preprocess(img, size=30, crop=True)
    squash = comfy.clip_vision.clip_preprocess(img, size=30, crop=False)
    assert centre.shape == squash.shape == (1, 3, 30, 30)
    zero = (0.0 - torch.tensor(comfy.clip_vision.CLIP_MEAN)) / torch.tensor(comfy.clip_vision.CLIP_STD)
    torch.testing.assert_close(centre[0, :, 15, 15], zero, atol=1e-3, rtol=0)   # middle stays black
    assert (squash[0, :, 15, 2] > 1.0).all()                                      # left third is white


def test_wrong_file_names_the_fix(tmp_path):
    import comfy.clip_vision

    with pytest.raises(ValueError, match="clip_vision"):
        comfy.clip_vision.load_clipvision_from_sd({"decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="open_clip"):
        comfy.clip_vision.load_clipvision_from_sd({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)})
