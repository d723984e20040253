"""Flux Redux: SigLIP vision towers in ComfyUI's clip_vision layout, the Redux style model and StyleModelApply.

* a tiny random SigLIP (transformers' SiglipVisionModel weights under ``vision_model.*``, head included, as in
  sigclip_vision_patch14_384.safetensors) loaded by CLIPVisionLoader and encoded by CLIPVisionEncode equals
  transformers' forward on the same pixels; the so400m sizes are detected from the shapes alone;
* a tiny Redux file (bf16, like flux1-redux-dev) loaded by StyleModelLoader gives the formula's tokens and
  diffusers' ReduxImageEncoder's;
* StyleModelApply's multiply / attn_bias conditioning, the mask resize Flux applies and what the bias does
  inside the network;
* prompts through the executor shaped like the flux_redux_model_example template (SamplerCustomAdvanced) and
  with KSampler;
* wrong files fail naming the file and what was expected.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tr
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script, write_demo_models

CPU = torch.device("cpu")
SIGLIP = dict(hidden=128, layers=3, patch=14, grid=3)   # 42x42 input, 9 tokens, 2 heads of 64
TXT_WIDTH = 64                                          # the demo T5's width (Flux context_in_dim)


def tiny_siglip(seed: int = 0):
    """(reference model, state dict in the file layout)."""
    torch.manual_seed(seed)
    h = SIGLIP["hidden"]
    # ComfyUI runs SigLIP with LayerNorm eps 1e-5 (comfy.clip_vision.SIGLIP_LAYER_NORM_EPS); the reference
    # uses the same so the comparison is exact rather than within the eps difference
    cfg = tr.SiglipVisionConfig(hidden_size=h, intermediate_size=3 * h // 2, num_hidden_layers=SIGLIP["layers"],
                                num_attention_heads=h // 64, image_size=SIGLIP["patch"] * SIGLIP["grid"],
                                patch_size=SIGLIP["patch"], layer_norm_eps=1e-5, vision_use_head=True)
    ref = tr.SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # init leaves the biases and LayerNorms at 0 / 1: randomise them so they are checked
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sd = {f"vision_model.{k}": v.clone().contiguous() for k, v in ref.state_dict().items()
          if not k.endswith("position_ids")}
    assert any(k.startswith("vision_model.head.") for k in sd)
    return ref, sd


def tiny_redux(seed: int = 1, redux_dim: int = SIGLIP["hidden"], width: int = TXT_WIDTH) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = 3 * width
    return {"redux_up.weight": (torch.randn(hidden, redux_dim, generator=g) / math.sqrt(redux_dim)).bfloat16(),
            "redux_up.bias": (torch.randn(hidden, generator=g) * 0.1).bfloat16(),
            "redux_down.weight": (torch.randn(width, hidden, generator=g) / math.sqrt(hidden)).bfloat16(),
            "redux_down.bias": (torch.randn(width, generator=g) * 0.1).bfloat16()}


def write_models(base_dir) -> tuple:
    ref, sd = tiny_siglip()
    cv = base_dir / "models" / "clip_vision"
    sm = base_dir / "models" / "style_models"
    cv.mkdir(parents=True, exist_ok=True)
    sm.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(cv / "sigclip_vision_patch14_384.safetensors"))
    redux = tiny_redux()
    save_file(redux, str(sm / "flux1-redux-dev.safetensors"))
    return ref, redux


def redux_formula(redux: dict, x: torch.Tensor) -> torch.Tensor:
    w = {k: v.float() for k, v in redux.items()}
    return F.linear(F.silu(F.linear(x, w["redux_up.weight"], w["redux_up.bias"])), w["redux_down.weight"],
                    w["redux_down.bias"])


# -- SigLIP ------------------------------------------------------------------------------------------------


def test_siglip_loader_and_encode_match_transformers(base_dir):
    import comfy.clip_vision
    from comfy_extras.nodes_clip_vision import CLIPVisionEncode, CLIPVisionLoader

    ref = write_models(base_dir)[0]
    (cv,) = CLIPVisionLoader().load_clip("sigclip_vision_patch14_384.safetensors")
    assert cv.family == "siglip" and cv.image_size == 42 and cv.config.num_attention_heads == 2
    image = torch.rand(2, 50, 70, 3, generator=torch.Generator().manual_seed(2))
    for crop in ("center", "none"):
        (out,) = CLIPVisionEncode().encode(cv, image, crop=crop)
        pixels = comfy.clip_vision.clip_preprocess(image, size=42, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                   crop=crop == "center")
        with torch.no_grad():
            want = ref(pixel_values=pixels, output_hidden_states=True)
        tol = dict(rtol=1e-5, atol=1e-5)
        assert out.last_hidden_state.shape == (2, 9, 128)
        torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, **tol)
        torch.testing.assert_close(out.penultimate_hidden_states, want.hidden_states[-2], **tol)
        # ComfyUI's SigLIP image_embeds: the post-normed sequence itself (no pooling head, no projection)
        torch.testing.assert_close(out["image_embeds"], want.last_hidden_state, **tol)
        assert out.all_hidden_states.shape == (2, 3, 9, 128)
        torch.testing.assert_close(out.all_hidden_states[:, -2], out.penultimate_hidden_states)
        torch.testing.assert_close(out.all_hidden_states[:, -1], want.hidden_states[-1], **tol)
        assert out.mm_projected is None
    # the weights keep the file's key names (what ComfyUI's get_sd gives), head left out
    keys = set(cv.get_sd())
    assert "vision_model.embeddings.patch_embedding.bias" in keys and "vision_model.post_layernorm.weight" in keys
    assert not any(k.startswith("vision_model.head.") for k in keys)


def test_siglip_so400m_sizes_from_shapes():
    import comfy.clip_vision as cvm

    # shapes of sigclip_vision_patch14_384.safetensors (SigLIP so400m patch14 384), no memory needed
    meta = dict(device="meta")
    sd = {"vision_model.embeddings.patch_embedding.weight": torch.empty(1152, 3, 14, 14, **meta),
          "vision_model.embeddings.patch_embedding.bias": torch.empty(1152, **meta),
          "vision_model.embeddings.position_embedding.weight": torch.empty(729, 1152, **meta),
          "vision_model.post_layernorm.weight": torch.empty(1152, **meta)}
    for i in range(27):
        sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(4304, 1152, **meta)
    assert cvm._family(sd) == "siglip"
    cfg = cvm._siglip_config(sd)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == \
        (1152, 4304, 27, 16)
    # 384 pixels, not 27 * 14 = 378: the patch convolution leaves the last 6 rows and columns unused
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_act) == (384, 14, "gelu_pytorch_tanh")


def test_siglip_preprocess_normalises_to_minus_one_one():
    import comfy.clip_vision as cvm

    white = torch.ones(1, 42, 84, 3)
    px = cvm.clip_preprocess(white, size=42, mean=cvm.SIGLIP_MEAN, std=cvm.SIGLIP_STD)
    torch.testing.assert_close(px, torch.ones(1, 3, 42, 42), atol=1e-6, rtol=0)
    # an image already at the model's size is only quantised to 8 bits and normalised, never resampled
    img = torch.rand(1, 42, 42, 3, generator=torch.Generator().manual_seed(0))
    want = ((img * 255).round() / 255).movedim(-1, 1) * 2 - 1
    torch.testing.assert_close(cvm.clip_preprocess(img, 42, cvm.SIGLIP_MEAN, cvm.SIGLIP_STD), want)


# -- Redux style model ------------------------------------------------------------------------------------


def test_style_model_loader_matches_formula_and_diffusers(base_dir):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    import comfy.clip_vision
    from comfy_extras.nodes_redux import StyleModelLoader

    _, redux = write_models(base_dir)
    (sm,) = StyleModelLoader().load_style_model("flux1-redux-dev.safetensors")
    x = torch.randn(2, 9, SIGLIP["hidden"], generator=torch.Generator().manual_seed(3))
    got = sm.get_cond(comfy.clip_vision.Output(last_hidden_state=x))
    assert got.shape == (2, 9, TXT_WIDTH) and got.dtype == torch.float32
    torch.testing.assert_close(got, redux_formula(redux, x), rtol=1e-5, atol=1e-5)
    ref = ReduxImageEncoder(redux_dim=SIGLIP["hidden"], txt_in_features=TXT_WIDTH)
    ref.load_state_dict({k: v.float() for k, v in redux.items()})
    with torch.no_grad():
        torch.testing.assert_close(got, ref(x).image_embeds, rtol=1e-5, atol=1e-5)


# -- StyleModelApply --------------------------------------------------------------------------------------


class _FakeStyle:
    """A style model whose tokens are known: the vision output's last_hidden_state, unchanged."""

    def get_cond(self, out):
        return out.last_hidden_state


def _inputs(n_img: int = 2, n_tok: int = 3, n_txt: int = 5, batch: int = 1):
    import comfy.clip_vision

    g = torch.Generator().manual_seed(4)
    vis = comfy.clip_vision.Output(last_hidden_state=torch.randn(n_img, n_tok, TXT_WIDTH, generator=g))
    txt = torch.randn(batch, n_txt, TXT_WIDTH, generator=g)
    opts = {"pooled_output": torch.randn(batch, 16, generator=g), "guidance": 3.5}
    return vis, [[txt, opts]]


def test_style_apply_multiply_appends_scaled_tokens():
    from comfy_extras.nodes_redux import StyleModelApply

    vis, cond = _inputs()
    (out,) = StyleModelApply().apply_stylemodel(cond, _FakeStyle(), vis, 0.7, "multiply")
    txt, opts = out[0]
    # both images' tokens, in order, after the text
    want = torch.cat((cond[0][0], 0.7 * vis.last_hidden_state.reshape(1, 6, TXT_WIDTH)), dim=1)
    torch.testing.assert_close(txt, want)
    assert "attention_mask" not in opts and opts["guidance"] == 3.5
    assert opts is not cond[0][1] and "attention_mask" not in cond[0][1]


def test_style_apply_attn_bias_builds_the_mask():
    from comfy_extras.nodes_redux import StyleModelApply

    vis, cond = _inputs()
    node = StyleModelApply()
    # strength 1: log(1) = 0, so no mask is made and the tokens are appended unscaled
    (same,) = node.apply_stylemodel(cond, _FakeStyle(), vis, 1.0, "attn_bias")
    assert "attention_mask" not in same[0][1]
    (out,) = node.apply_stylemodel(cond, _FakeStyle(), vis, 0.5, "attn_bias")
    txt, opts = out[0]
    torch.testing.assert_close(txt[:, 5:], vis.last_hidden_state.reshape(1, 6, TXT_WIDTH))  # not scaled
    mask = opts["attention_mask"]
    # [txt 5, style 6, image grid 1x1]
    assert mask.shape == (1, 12, 12) and mask.dtype == torch.float16 and opts["attention_mask_img_shape"] == (1, 1)
    bias = torch.tensor(math.log(0.5), dtype=torch.float16)
    want = torch.zeros(1, 12, 12, dtype=torch.float16)
    want[:, :5, 5:11] = bias     # text queries -> style keys
    want[:, 11:, 5:11] = bias    # image queries -> style keys
    assert torch.equal(mask, want)
    # strength 0: -inf, the style tokens are never attended to
    (zero,) = node.apply_stylemodel(cond, _FakeStyle(), vis, 0.0, "attn_bias")
    assert torch.isinf(zero[0][1]["attention_mask"][:, :5, 5:11]).all()
    # a second StyleModelApply widens the existing mask even in multiply mode: old blocks kept, 0 bias
    vis2 = type(vis)(last_hidden_state=torch.ones(1, 2, TXT_WIDTH))
    (chained,) = node.apply_stylemodel(out, _FakeStyle(), vis2, 2.0, "multiply")
    m2 = chained[0][1]["attention_mask"]
    assert m2.shape == (1, 14, 14) and chained[0][0].shape == (1, 13, TXT_WIDTH)
    assert torch.equal(m2[:, :11, :11], mask[:, :11, :11])
    assert torch.equal(m2[:, 13:, :11], mask[:, 11:, :11])
    assert not m2[:, :, 11:13].any()
    torch.testing.assert_close(chained[0][0][:, 11:], 2.0 * torch.ones(1, 2, TXT_WIDTH))


def test_style_apply_width_mismatch_names_the_fix():
    from comfy_extras.nodes_redux import StyleModelApply

    vis, cond = _inputs()
    cond[0][0] = cond[0][0][..., :32]
    with pytest.raises(ValueError, match="4096"):
        StyleModelApply().apply_stylemodel(cond, _FakeStyle(), vis, 1.0, "multiply")


def _kron_resize(n_in: int, n_out: int) -> torch.Tensor:
    """1-D linear-resize matrix [n_out, n_in] (align_corners=False), built from F.interpolate on an identity."""
    return F.interpolate(torch.eye(n_in)[:, None], size=n_out, mode="linear").squeeze(1).T


def test_upscale_dit_mask_is_separable_bilinear():
    import comfy.utils

    n_txt, (hi, wi), (ho, wo) = 3, (2, 3), (4, 5)
    n = n_txt + hi * wi
    mask = torch.randn(2, n, n, generator=torch.Generator().manual_seed(5))
    out = comfy.utils.upscale_dit_mask(mask, (hi, wi), (ho, wo))
    k = torch.kron(_kron_resize(hi, ho), _kron_resize(wi, wo))   # [ho*wo, hi*wi]
    t = slice(0, n_txt)
    i = slice(n_txt, n)
    assert out.shape == (2, n_txt + ho * wo, n_txt + ho * wo)
    torch.testing.assert_close(out[:, :n_txt, :n_txt], mask[:, t, t])
    torch.testing.assert_close(out[:, :n_txt, n_txt:], mask[:, t, i] @ k.T)
    torch.testing.assert_close(out[:, n_txt:, :n_txt], k @ mask[:, i, t])
    torch.testing.assert_close(out[:, n_txt:, n_txt:], k @ mask[:, i, i] @ k.T)
    assert comfy.utils.upscale_dit_mask(mask, (hi, wi), (hi, wi)) is mask
    # a 1x1 grid spreads over the whole image
    one = torch.zeros(1, 4, 4)
    one[:, :3, 3] = -2.0
    big = comfy.utils.upscale_dit_mask(one, (1, 1), (2, 2))
    assert torch.equal(big[:, :3, 3:], torch.full((1, 3, 4), -2.0))
    # -inf (strength 0) stays -inf wherever it has weight; plain bilinear resampling would give NaN
    one[:, :3, 3] = float("-inf")
    big = comfy.utils.upscale_dit_mask(one, (1, 1), (2, 2))
    assert torch.isneginf(big[:, :3, 3:]).all() and not big.isnan().any()
    grid = torch.zeros(1, 1 + 4, 1 + 4)
    grid[:, 0, 1] = float("-inf")                      # text query -> top-left image key only
    keys = comfy.utils.upscale_dit_mask(grid, (2, 2), (4, 4))[0, 0, 1:].reshape(4, 4)
    # output rows / columns 0-2 sample source pixel 0 with positive weight (row 2 at source 0.75), row 3 does not
    assert torch.isneginf(keys[:3, :3]).all() and (keys[3] == 0).all() and (keys[:, 3] == 0).all()


def _tiny_flux():
    import comfy.sd

    d = demo_script()
    sd = d.random_flux_state_dict(**d.DEMO_FLUX, guidance_embed=True, seed=6)
    return comfy.sd.load_diffusion_model_state_dict(sd).model


def test_attn_bias_reaches_the_flux_attention():
    """Through Flux.extra_conds and the network: bias log(0) hides the style tokens completely (as if they were
    not there), bias 0 is no bias, and any other strength changes the result."""
    from comfy_extras.nodes_redux import StyleModelApply

    model = _tiny_flux()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 6, 8, generator=g)
    sigma = torch.tensor([0.7])
    txt = torch.randn(1, 5, TXT_WIDTH, generator=g)
    pooled = torch.randn(1, 64, generator=g)
    vis = type("V", (), {"last_hidden_state": torch.randn(2, 3, TXT_WIDTH, generator=g)})()

    def denoise(cond):
        (c, opts), = cond
        conds = model.extra_conds(noise=x, device=CPU, cross_attn=c, pooled_output=pooled, **opts)
        conds.pop("c_crossattn", None)
        with torch.no_grad():
            return model.apply_model(x, sigma, c_crossattn=c, **conds), conds

    plain, _ = denoise([[txt, {}]])
    node = StyleModelApply()
    (hidden,) = node.apply_stylemodel([[txt, {}]], _FakeStyle(), vis, 0.0, "attn_bias")
    out, conds = denoise(hidden)
    assert conds["attention_mask"].shape == (1, 5 + 6 + 12, 5 + 6 + 12)  # 6x8 latent -> 3x4 tokens
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    (multiply,) = node.apply_stylemodel([[txt, {}]], _FakeStyle(), vis, 1.0, "multiply")
    unbiased, _ = denoise(multiply)
    zero_bias = [[multiply[0][0], {"attention_mask": torch.zeros(1, 12, 12), "attention_mask_img_shape": (1, 1)}]]
    torch.testing.assert_close(denoise(zero_bias)[0], unbiased, rtol=1e-5, atol=1e-6)
    (half,) = node.apply_stylemodel([[txt, {}]], _FakeStyle(), vis, 0.5, "attn_bias")
    assert not torch.allclose(denoise(half)[0], unbiased, atol=1e-4)
    assert not torch.allclose(unbiased, plain, atol=1e-4)


def test_mask_with_reference_latents_fails_clearly():
    model = _tiny_flux()
    x = torch.zeros(1, 16, 4, 4)
    ctx = torch.zeros(1, 3, TXT_WIDTH)
    mask = torch.zeros(1, 3 + 4, 3 + 4)
    with pytest.raises(ValueError, match="reference latents"):
        model.diffusion_model(x, torch.tensor([0.5]), ctx, y=torch.zeros(1, 64), guidance=torch.tensor([3.5]),
                              ref_latents=[torch.zeros(1, 16, 4, 4)], attention_mask=mask)


# -- wrong files ------------------------------------------------------------------------------------------


def test_wrong_files_name_the_file_and_what_was_expected(base_dir):
    from comfy_extras.nodes_clip_vision import CLIPVisionLoader
    from comfy_extras.nodes_redux import StyleModelLoader

    _, redux = write_models(base_dir)
    cv = base_dir / "models" / "clip_vision"
    sm = base_dir / "models" / "style_models"
    # the Redux file in clip_vision, the SigLIP file in style_models
    save_file(redux, str(cv / "redux-by-mistake.safetensors"))
    with pytest.raises(ValueError, match=r"redux-by-mistake\.safetensors.*StyleModelLoader"):
        CLIPVisionLoader().load_clip("redux-by-mistake.safetensors")
    save_file(tiny_siglip()[1], str(sm / "siglip-by-mistake.safetensors"))
    with pytest.raises(ValueError, match=r"siglip-by-mistake\.safetensors.*CLIPVisionLoader"):
        StyleModelLoader().load_style_model("siglip-by-mistake.safetensors")
    # another image-encoder family, and a style model of another layout
    save_file({"encoder.layer.0.layer_scale1.lambda1": torch.zeros(8)}, str(cv / "dino.safetensors"))
    with pytest.raises(ValueError, match=r"dino\.safetensors.*DINOv2.*SigLIP"):
        CLIPVisionLoader().load_clip("dino.safetensors")
    save_file({"style_embedding": torch.zeros(1, 8, 768)}, str(sm / "t2i_style.safetensors"))
    with pytest.raises(ValueError, match=r"t2i_style\.safetensors.*T2I-Adapter.*redux_up"):
        StyleModelLoader().load_style_model("t2i_style.safetensors")
    bad = dict(redux)
    bad["redux_down.weight"] = bad["redux_down.weight"][:, :10].contiguous()
    save_file(bad, str(sm / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"broken\.safetensors.*do not chain"):
        StyleModelLoader().load_style_model("broken.safetensors")


def test_clip_vision_width_mismatch_names_sigclip(base_dir):
    import comfy.clip_vision
    from comfy_extras.nodes_redux import StyleModelLoader

    write_models(base_dir)
    (sm,) = StyleModelLoader().load_style_model("flux1-redux-dev.safetensors")
    wrong = comfy.clip_vision.Output(last_hidden_state=torch.zeros(1, 5, 1280))  # e.g. CLIP ViT-H tokens
    with pytest.raises(ValueError, match="sigclip_vision_patch14_384"):
        sm.get_cond(wrong)


# -- prompts through the executor -------------------------------------------------------------------------


def _write_inputs(seed: int):
    from PIL import Image

    import folder_paths

    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(((40, 56), (48, 48))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(folder_paths.get_input_directory(), f"flux_redux_model_example_reference_image_{i + 1}.png"))


def template_prompt() -> dict:
    """flux_redux_model_example's graph (two reference images, SamplerCustomAdvanced) on the demo models."""
    return {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "taco-demo-flux1-dev.safetensors",
                                                      "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "taco-demo-t5xxl.safetensors",
                                                          "clip_name2": "taco-demo-clip_l.safetensors",
                                                          "type": "flux", "device": "default"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "taco-demo-flux-ae.safetensors"}},
        "42": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "flux1-redux-dev.safetensors"}},
        "38": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "sigclip_vision_patch14_384.safetensors"}},
        "40": {"class_type": "LoadImage", "inputs": {"image": "flux_redux_model_example_reference_image_1.png"}},
        "47": {"class_type": "LoadImage", "inputs": {"image": "flux_redux_model_example_reference_image_2.png"}},
        "39": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["38", 0], "image": ["40", 0],
                                                            "crop": "center"}},
        "46": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["38", 0], "image": ["47", 0],
                                                            "crop": "center"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0],
                                                         "text": "A girl is walking in the natural wilderness."}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "41": {"class_type": "StyleModelApply", "inputs": {"conditioning": ["26", 0], "style_model": ["42", 0],
                                                           "clip_vision_output": ["39", 0], "strength": 1.0,
                                                           "strength_type": "multiply"}},
        "45": {"class_type": "StyleModelApply", "inputs": {"conditioning": ["41", 0], "style_model": ["42", 0],
                                                           "clip_vision_output": ["46", 0], "strength": 1.0,
                                                           "strength_type": "multiply"}},
        "30": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["12", 0], "max_shift": 1.15,
                                                             "base_shift": 0.5, "width": 64, "height": 48}},
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["45", 0]}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "BasicScheduler", "inputs": {"model": ["30", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["27", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def ksampler_prompt(strength_type: str = "multiply", strength: float = 1.0) -> dict:
    """CLIPVisionEncode -> StyleModelApply -> KSampler -> VAEDecode, CFG with a zeroed negative."""
    p = {k: v for k, v in template_prompt().items() if k in ("12", "11", "10", "42", "38", "40", "39", "6", "26",
                                                              "41", "27", "8", "9")}
    p["41"]["inputs"].update({"strength": strength, "strength_type": strength_type})
    p["33"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["26", 0]}}
    p["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["12", 0], "positive": ["41", 0], "negative": ["33", 0], "latent_image": ["27", 0], "seed": 2,
        "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    p["8"]["inputs"]["samples"] = ["3", 0]
    return p


def _run(prompt: dict, pid: str) -> np.ndarray:
    from PIL import Image

    import execution
    from tests.fixtures.harness import render_png

    ok, err, outputs, node_errors = execution.validate_prompt(pid, prompt)
    assert ok, (err, node_errors)
    with Image.open(render_png(prompt, "9", pid, outputs)[1]) as im:
        return np.asarray(im.convert("RGB"))


def test_redux_prompts_run_through_the_executor(base_dir):
    import nodes

    write_demo_models(str(base_dir / "models"), seed=0)
    write_models(base_dir)
    nodes.init_extra_nodes(init_custom_nodes=False)
    _write_inputs(0)
    first = _run(template_prompt(), "redux-template")
    assert first.shape == (48, 64, 3) and len(np.unique(first)) > 10
    _write_inputs(1)  # other reference images: the Redux tokens reach the model
    assert not np.array_equal(first, _run(template_prompt(), "redux-template-2"))
    multiply = _run(ksampler_prompt(), "redux-ksampler")
    assert multiply.shape == (48, 64, 3)
    assert not np.array_equal(multiply, _run(ksampler_prompt("attn_bias", 0.3), "redux-attn-bias"))
