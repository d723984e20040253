"""Flux.1 Fill / Canny / Depth: checkpoints whose img_in takes more than the noisy latent, and the nodes
of their workflows (InpaintModelConditioning, InstructPixToPixConditioning, DifferentialDiffusion).

* detection and loading of tiny random checkpoints in the BFL layout with 128 / 384 img_in features;
* numerical equality with diffusers' FluxTransformer2DModel fed the way FluxFillPipeline /
  FluxControlPipeline feed it (their own packing code runs on the diffusers side);
* the extra channels' layout (8x8 mask packing, latent-format scaling, fallbacks);
* the nodes against their formulas, DifferentialDiffusion's per-step mask, and prompts through the
  executor shaped like the flux_fill_inpaint / flux_fill_outpaint / flux_canny templates.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script
from tests.test_flux_oracle import CFG, to_diffusers

CPU = torch.device("cpu")
# the FLUX.1 VAE's published latent normalisation (diffusers' AutoencoderKL config for FLUX.1), used on the
# diffusers side so our latent format is checked, not assumed
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611


def wide_flux_state_dict(in_features: int, seed: int = 3, **cfg) -> dict:
    """A Flux-dev state dict whose img_in takes `in_features` per patch (128 Canny/Depth, 384 Fill)."""
    cfg = cfg or CFG
    sd = demo_script().random_flux_state_dict(**cfg, guidance_embed=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    sd["img_in.weight"] = torch.randn(cfg["hidden_size"], in_features, generator=g) / math.sqrt(in_features)
    return sd


def load_base_model(sd: dict):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(sd).model


def pack(z: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxFillPipeline

    b, c, h, w = z.shape
    return FluxFillPipeline._pack_latents(z, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def diffusers_transformer(sd: dict, in_features: int):
    from diffusers import FluxTransformer2DModel

    import comfy.model_detection

    cfg = comfy.model_detection.detect_unet_config(sd, "")
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=in_features, out_channels=64, num_layers=CFG["depth"],
        num_single_layers=CFG["depth_single_blocks"], attention_head_dim=CFG["hidden_size"] // CFG["num_heads"],
        num_attention_heads=CFG["num_heads"], joint_attention_dim=CFG["context_in_dim"],
        pooled_projection_dim=CFG["vec_in_dim"], guidance_embeds=True, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
    res = m.load_state_dict(to_diffusers(sd, CFG["hidden_size"], True), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return m


def run_diffusers(model, hidden, ctx, y, t, gd, h, w):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    with torch.no_grad():
        out = model(hidden_states=hidden, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(ctx.shape[1], 3), guidance=gd,
                    return_dict=False)[0]
    return unpack(out, h, w)


# -- model side ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features,kind", [(128, "canny/depth"), (384, "fill")])
def test_wide_img_in_is_detected_and_loaded(in_features, kind):
    import comfy.model_base
    import comfy.model_detection

    sd = wide_flux_state_dict(in_features)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg["in_channels"] == in_features // 4 and cfg["out_channels"] == 16, kind
    model = load_base_model(sd)
    assert isinstance(model, comfy.model_base.Flux)
    assert model.input_channels() == in_features // 4
    assert model.diffusion_model.img_in.weight.shape == (CFG["hidden_size"], in_features)
    assert model.diffusion_model.final_layer.linear.weight.shape[0] == 64  # predicts the 16-channel latent only


def test_fill_matches_diffusers_fill_pipeline_inputs():
    """384 features: our concat_cond + patchify against FluxFillPipeline.prepare_mask_latents (diffusers'
    own packing and scaling) and its `cat((latents, masked_image_latents, mask))`; the whole BaseModel path
    (apply_model -> denoised) is compared."""
    from diffusers import FluxFillPipeline

    sd = wide_flux_state_dict(384, seed=4)
    ours = load_base_model(sd)
    theirs = diffusers_transformer(sd, 384)

    g = torch.Generator().manual_seed(0)
    b, h, w, t_len = 2, 4, 6, 7                       # latent 4 x 6 = pixels 32 x 48
    x = torch.randn(b, 16, h, w, generator=g)
    image = torch.randn(1, 16, h, w, generator=g)     # raw VAE latent of the masked image (batch 1 -> 2)
    mask = torch.rand(1, 1, 8 * h, 8 * w, generator=g)  # soft pixel mask: the layout, not a threshold, is tested
    ctx = torch.randn(b, t_len, CFG["context_in_dim"], generator=g)
    y = torch.randn(b, CFG["vec_in_dim"], generator=g)
    sigma, gd = torch.tensor([0.8, 0.3]), torch.tensor([30.0, 3.5])

    conds = ours.extra_conds(noise=x, device=CPU, cross_attn=ctx, pooled_output=y, guidance=30.0,
                             concat_latent_image=image, concat_mask=mask)
    assert conds["c_concat"].shape == (b, 16 + 64, h, w)
    with torch.no_grad():
        denoised = ours.apply_model(x, sigma, c_concat=conds["c_concat"], c_crossattn=ctx, y=y, guidance=gd)

    pipe = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxFillPipeline._pack_latents,
                           vae=SimpleNamespace(config=SimpleNamespace(shift_factor=FLUX_VAE_SHIFT,
                                                                      scaling_factor=FLUX_VAE_SCALE)))
    mask_tokens, image_tokens = FluxFillPipeline.prepare_mask_latents(
        pipe, mask, image, b, 16, 1, 8 * h, 8 * w, torch.float32, CPU, None)
    hidden = torch.cat((pack(x), torch.cat((image_tokens, mask_tokens), dim=-1)), dim=2)
    assert hidden.shape[-1] == 384
    v = run_diffusers(theirs, hidden, ctx, y, sigma, gd, h, w)
    expected = x - sigma.view(-1, 1, 1, 1) * v       # Flux predicts velocity: x0 = x - sigma * v

    assert v.abs().mean() > 0.05
    # fp32 on both sides; differences are summation order only
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)


def test_canny_depth_match_diffusers_control_pipeline_inputs():
    """128 features: the control image's latent, scaled like FluxControlPipeline scales it, after the noise."""
    from diffusers import FluxControlPipeline

    sd = wide_flux_state_dict(128, seed=5)
    ours = load_base_model(sd)
    theirs = diffusers_transformer(sd, 128)
    g = torch.Generator().manual_seed(1)
    b, h, w = 1, 6, 4
    x = torch.randn(b, 16, h, w, generator=g)
    control = torch.randn(b, 16, h, w, generator=g)
    ctx = torch.randn(b, 5, CFG["context_in_dim"], generator=g)
    y = torch.randn(b, CFG["vec_in_dim"], generator=g)
    sigma, gd = torch.tensor([0.6]), torch.tensor([10.0])

    conds = ours.extra_conds(noise=x, device=CPU, concat_latent_image=control)
    assert conds["c_concat"].shape == (b, 16, h, w)
    with torch.no_grad():
        denoised = ours.apply_model(x, sigma, c_concat=conds["c_concat"], c_crossattn=ctx, y=y, guidance=gd)
    scaled = (control - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE
    hidden = torch.cat((pack(x), FluxControlPipeline._pack_latents(scaled, b, 16, h, w)), dim=2)
    v = run_diffusers(theirs, hidden, ctx, y, sigma, gd, h, w)
    torch.testing.assert_close(denoised, x - sigma.view(-1, 1, 1, 1) * v, rtol=1e-4, atol=1e-4)


def test_fill_mask_packing_layout():
    """Pixel (r, c) of the mask lands at latent pixel (r // 8, c // 8), channel 16 + 8 * (r % 8) + c % 8."""
    model = load_base_model(wide_flux_state_dict(384))
    noise = torch.zeros(1, 16, 2, 3)
    image = torch.zeros(1, 16, 2, 3)
    for r, c in [(0, 0), (5, 2), (11, 19), (15, 23)]:
        mask = torch.zeros(1, 1, 16, 24)
        mask[0, 0, r, c] = 1.0
        cc = model.concat_cond(noise=noise, device=CPU, concat_latent_image=image, concat_mask=mask)
        hot = (cc[0, 16:] != 0).nonzero().tolist()
        assert hot == [[8 * (r % 8) + c % 8, r // 8, c // 8]]
    # the image channels are the latent in model space (process_latent_in), not the raw VAE latent
    torch.testing.assert_close(cc[:, :16], torch.full_like(image, -FLUX_VAE_SHIFT * FLUX_VAE_SCALE))


def test_fill_concat_fallbacks():
    model = load_base_model(wide_flux_state_dict(384))
    noise = torch.randn(2, 16, 2, 2)
    # nothing given: a zero image (in model space) and "paint everything"
    cc = model.concat_cond(noise=noise, device=CPU)
    assert cc.shape == (2, 80, 2, 2)
    torch.testing.assert_close(cc[:, :16], model.process_latent_in(torch.zeros(2, 16, 2, 2)))
    assert torch.equal(cc[:, 16:], torch.ones(2, 64, 2, 2))
    # no concat_mask: the sampler's noise mask (latent-sized, channels averaged) is upscaled 8x and packed
    dm = (torch.arange(16.0) / 15).reshape(1, 16, 1, 1).expand(1, 16, 2, 2)
    cc = model.concat_cond(noise=noise, device=CPU, denoise_mask=dm)
    torch.testing.assert_close(cc[:, 16:], torch.full((2, 64, 2, 2), 0.5))
    # a MASK-shaped [B, H, W] concat_mask and an image of another size are fitted to the latent
    cc = model.concat_cond(noise=noise, device=CPU, concat_mask=torch.ones(1, 16, 16),
                           concat_latent_image=torch.zeros(1, 16, 4, 4))
    assert cc.shape == (2, 80, 2, 2) and torch.equal(cc[:, 16:], torch.ones(2, 64, 2, 2))


def test_plain_flux_gets_no_concat_and_unknown_widths_fail():
    plain = load_base_model(demo_script().random_flux_state_dict(**CFG, guidance_embed=True, seed=1))
    assert "c_concat" not in plain.extra_conds(noise=torch.zeros(1, 16, 2, 2), device=CPU,
                                               concat_latent_image=torch.zeros(1, 16, 2, 2))
    odd = load_base_model(wide_flux_state_dict(4 * 40))
    with pytest.raises(ValueError, match="Canny/Depth"):
        odd.concat_cond(noise=torch.zeros(1, 16, 2, 2), device=CPU)


# -- nodes -----------------------------------------------------------------------------------------------


class RecordingVAE:
    """Stands in for a VAE: records what it encodes and returns the 8x8-block means as 16 channels."""

    def __init__(self):
        self.seen = []

    def encode(self, pixels):
        self.seen.append(pixels.clone())
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2  # the VAE's own centred crop
        x = pixels[:, top:top + h, left:left + w, :3].movedim(-1, 1)
        return torch.nn.functional.avg_pool2d(x, 8).mean(1, keepdim=True).repeat(1, 16, 1, 1)


def _cond(tag):
    return [[torch.full((1, 3, 4), float(tag)), {"pooled_output": torch.zeros(1, 4)}]]


def test_inpaint_model_conditioning_formula():
    from comfy_extras.nodes_flux_fill import InpaintModelConditioning

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 21, 19, 3, generator=g)     # crops to 16 x 16 at offset (2, 1)
    mask = torch.zeros(1, 21, 19)
    mask[:, 5:12, 3:9] = 1.0
    mask[:, 12, 3:9] = 0.4                              # rounds to 0: this row keeps its pixels
    vae = RecordingVAE()
    pos, neg = _cond(1), _cond(2)
    out_pos, out_neg, latent = InpaintModelConditioning().encode(pos, neg, pixels, vae, mask, noise_mask=True)

    cropped_mask = mask[:, 2:18, 1:17]
    expected = pixels[:, 2:18, 1:17].clone()
    expected[(cropped_mask.round() == 1).expand(2, -1, -1)] = 0.5
    torch.testing.assert_close(vae.seen[0], expected)
    torch.testing.assert_close(vae.seen[1], pixels)    # the start latent encodes the whole original image
    assert torch.equal(latent["samples"], vae.encode(pixels))
    torch.testing.assert_close(latent["noise_mask"], cropped_mask[:, None])  # [B, 1, H, W], values kept
    for out, src in ((out_pos, pos), (out_neg, neg)):
        assert out[0][0] is src[0][0] and "concat_mask" not in src[0][1]  # inputs are not mutated
        assert torch.equal(out[0][1]["concat_latent_image"], vae.encode(expected))
        assert out[0][1]["concat_mask"] is latent["noise_mask"]

    _, _, latent = InpaintModelConditioning().encode(pos, neg, pixels, RecordingVAE(), mask, noise_mask=False)
    assert "noise_mask" not in latent


def test_inpaint_model_conditioning_resizes_the_mask():
    from comfy_extras.nodes_flux_fill import InpaintModelConditioning

    pixels = torch.rand(1, 16, 16, 3)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :] = 1.0                                # top half, at a quarter of the image size
    _, _, latent = InpaintModelConditioning().encode(_cond(1), _cond(2), pixels, RecordingVAE(), mask)
    m = latent["noise_mask"][0, 0]
    assert m.shape == (16, 16)
    assert torch.equal(m[:6], torch.ones(6, 16)) and torch.equal(m[10:], torch.zeros(6, 16))


def test_instruct_pix_to_pix_conditioning_formula():
    from comfy_extras.nodes_flux_fill import InstructPixToPixConditioning

    pixels = torch.rand(1, 27, 16, 3)                   # crops rows 1..24
    vae = RecordingVAE()
    pos, neg, latent = InstructPixToPixConditioning().encode(_cond(1), _cond(2), pixels, vae)
    assert len(vae.seen) == 1 and torch.equal(vae.seen[0], pixels[:, 1:25])
    concat = pos[0][1]["concat_latent_image"]
    assert concat.shape == (1, 16, 3, 2) and neg[0][1]["concat_latent_image"] is concat
    assert torch.equal(latent["samples"], torch.zeros_like(concat)) and "noise_mask" not in latent


def test_node_interfaces_match_comfyui():
    import nodes

    nodes.init_extra_nodes(init_custom_nodes=False)
    reg = nodes.NODE_CLASS_MAPPINGS
    imc = reg["InpaintModelConditioning"]
    assert list(imc.INPUT_TYPES()["required"]) == ["positive", "negative", "vae", "pixels", "mask", "noise_mask"]
    assert imc.INPUT_TYPES()["required"]["noise_mask"][1]["default"] is True
    assert imc.RETURN_NAMES == ("positive", "negative", "latent")
    ip2p = reg["InstructPixToPixConditioning"]
    assert list(ip2p.INPUT_TYPES()["required"]) == ["positive", "negative", "vae", "pixels"]
    assert ip2p.RETURN_TYPES == ("CONDITIONING", "CONDITIONING", "LATENT")
    dd = reg["DifferentialDiffusion"].INPUT_TYPES()
    assert list(dd["required"]) == ["model"] and dd["optional"]["strength"][1]["default"] == 1.0
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["DifferentialDiffusion"] == "Differential Diffusion"


# -- DifferentialDiffusion -------------------------------------------------------------------------------


def test_differential_mask_thresholds_over_the_schedule():
    import comfy.model_sampling
    import comfy.samplers
    from comfy_extras.nodes_flux_fill import DifferentialMask

    ms = comfy.model_sampling.ModelSamplingFlux(None)
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 4)
    guider = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=ms))
    soft = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    end = max(float(sigmas[-1]), float(ms.sigma_min))
    last_active = 0
    for s in sigmas[:-1]:
        opts = {"model": guider, "sigmas": sigmas}
        threshold = (float(s) - end) / (float(sigmas[0]) - end)   # Flux: timestep(sigma) = sigma
        out = DifferentialMask()(s.reshape(1), soft, opts)
        assert torch.equal(out, (soft >= threshold).float())
        active = int(out.sum())
        assert active >= last_active                               # the painted area grows step by step
        last_active = active
        blended = DifferentialMask(0.25)(s.reshape(1), soft, opts)
        torch.testing.assert_close(blended, 0.25 * out + 0.75 * soft)
    assert DifferentialMask()(sigmas[:1], soft, {"model": guider, "sigmas": sigmas}).sum() == 1  # mask 1 only


def test_sampler_applies_the_per_step_mask():
    """Through KSampler's path: the hook is called once per step with the step's sigma, and where the
    returned mask is 0 the latent stays the input latent."""
    import nodes
    from comfy.model_patcher import ModelPatcher
    from comfy_extras.nodes_flux_fill import DifferentialDiffusion

    base = load_base_model(wide_flux_state_dict(384, seed=6))
    model = DifferentialDiffusion().apply(ModelPatcher(base, CPU, CPU), strength=1.0)[0]
    inner = model.model_options["denoise_mask_function"]
    calls = []

    def recording(sigma, denoise_mask, extra_options):
        out = inner(sigma, denoise_mask, extra_options)
        calls.append((float(sigma[0]), denoise_mask.clone(), out.clone()))
        return out

    model.model_options["denoise_mask_function"] = recording
    g = torch.Generator().manual_seed(2)
    start = torch.randn(1, 16, 4, 4, generator=g)
    soft = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)          # latent-sized soft mask
    cond = [[torch.randn(1, 3, CFG["context_in_dim"], generator=g),
             {"pooled_output": torch.randn(1, CFG["vec_in_dim"], generator=g), "guidance": 30.0}]]
    (out,) = nodes.common_ksampler(model, 0, 4, 1.0, "euler", "normal", cond, cond,
                                   {"samples": start, "noise_mask": soft})
    assert len(calls) == 4
    assert [c[0] for c in calls] == sorted((c[0] for c in calls), reverse=True)
    for _, given, used in calls:
        assert torch.equal(given, soft.expand(1, 16, 4, 4))      # the sampler's mask, every step
        assert set(used.unique().tolist()) <= {0.0, 1.0}
    never = calls[-1][2][0, 0] == 0                               # pixels no step painted
    assert never.any() and (~never).any()
    torch.testing.assert_close(out["samples"][:, :, never], start[:, :, never], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["samples"][:, :, ~never], start[:, :, ~never], atol=1e-3)


# -- workflows through the executor ----------------------------------------------------------------------


def _write_models(base_dir):
    d = demo_script()
    models = base_dir / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    d.write_demo_text_encoders_and_vae(str(models), seed=0)
    for name, features in (("flux1-fill-dev.safetensors", 384), ("flux1-canny-dev.safetensors", 128)):
        save_file(wide_flux_state_dict(features, seed=7, **d.DEMO_FLUX),
                  str(models / "diffusion_models" / name))


def _common(unet: str) -> dict:
    return {
        "31": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "34": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "taco-demo-clip_l.safetensors",
                                                          "clip_name2": "taco-demo-t5xxl.safetensors",
                                                          "type": "flux", "device": "default"}},
        "32": {"class_type": "VAELoader", "inputs": {"vae_name": "taco-demo-flux-ae.safetensors"}},
        "17": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["34", 0], "text": "a fox"}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["23", 0], "guidance": 30.0}},
        "46": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["23", 0]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["31", 0], "positive": ["38", 0], "negative": ["38", 1], "latent_image": ["38", 2],
            "seed": 1, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["32", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def inpaint_prompt() -> dict:
    """flux_fill_inpaint_example: the mask comes from the image's alpha; DifferentialDiffusion on the model."""
    p = _common("flux1-fill-dev.safetensors")
    p["39"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["31", 0], "strength": 1.0}}
    p["38"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["26", 0], "negative": ["46", 0], "vae": ["32", 0], "pixels": ["17", 0], "mask": ["17", 1],
        "noise_mask": True}}
    p["3"]["inputs"]["model"] = ["39", 0]
    return p


def outpaint_prompt() -> dict:
    """flux_fill_outpaint_example: ImagePadForOutpaint's image and mask, noise_mask off."""
    p = inpaint_prompt()
    p["44"] = {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["17", 0], "left": 16, "top": 0,
                                                               "right": 8, "bottom": 8, "feathering": 8}}
    p["38"]["inputs"].update({"pixels": ["44", 0], "mask": ["44", 1], "noise_mask": False})
    return p


def canny_prompt() -> dict:
    """flux_canny_model_example: Canny edges of the image through InstructPixToPixConditioning."""
    p = _common("flux1-canny-dev.safetensors")
    p["18"] = {"class_type": "Canny", "inputs": {"image": ["17", 0], "low_threshold": 0.15,
                                                 "high_threshold": 0.3}}
    p["38"] = {"class_type": "InstructPixToPixConditioning", "inputs": {
        "positive": ["26", 0], "negative": ["46", 0], "vae": ["32", 0], "pixels": ["18", 0]}}
    return p


def _run(prompt: dict, pid: str) -> np.ndarray:
    from PIL import Image

    import execution
    import folder_paths
    from tests.fixtures.harness import FakeServer

    ok, err, outputs, node_errors = execution.validate_prompt(pid, prompt)
    assert ok, (err, node_errors)
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, pid, {}, outputs)
    assert ex.success, ex.status_messages
    (img,) = ex.history_result["outputs"]["9"]["images"]
    with Image.open(os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"])) as im:
        return np.asarray(im.convert("RGB"))


def _write_input(alpha_hole: tuple[slice, slice]):
    from PIL import Image

    import folder_paths

    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 255, (40, 48, 3), dtype=np.uint8),
                           np.full((40, 48, 1), 255, dtype=np.uint8)], axis=-1)
    rgba[alpha_hole + (3,)] = 0                         # LoadImage's MASK is 1 - alpha: paint here
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder_paths.get_input_directory(), "input.png"))


def test_fill_and_canny_workflows_run(base_dir):
    import nodes

    _write_models(base_dir)
    nodes.init_extra_nodes(init_custom_nodes=False)
    _write_input((slice(8, 24), slice(16, 40)))
    inpaint = _run(inpaint_prompt(), "fill-inpaint")
    assert inpaint.shape == (40, 48, 3) and len(np.unique(inpaint)) > 10
    # the mask reaches the model (concat channels and noise mask): another hole, another picture
    _write_input((slice(0, 16), slice(0, 16)))
    assert not np.array_equal(inpaint, _run(inpaint_prompt(), "fill-inpaint-2"))
    outpaint = _run(outpaint_prompt(), "fill-outpaint")
    assert outpaint.shape == (48, 72, 3)
    canny = _run(canny_prompt(), "canny")
    assert canny.shape == (40, 48, 3) and len(np.unique(canny)) > 10
