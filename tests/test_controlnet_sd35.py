"""SD3.5 ControlNet (Stability's sd3.5_large_controlnet_* layout) against diffusers' SD3ControlNetModel
(use_pos_embed=False, borrowing the main model's patch embedding, as diffusers' pipeline does for these
files), and the residuals fed to our MMDiT against diffusers' SD3Transformer2DModel."""

from __future__ import annotations

import math

import torch

import comfy.controlnet
import comfy.model_detection
from comfy.ldm.mmdit.model import MMDiT
from tests.test_sd3_oracle import _diffusers_model, random_mmdit_state_dict

MAIN = dict(hidden_size=128, depth=4, adm_in_channels=48, context_in_dim=40, pos_embed_max_size=12)


def _stability_file(seed=0):
    """A random SD3.5 ControlNet in diffusers' layout, written back to Stability's key names (the inverse of
    diffusers' scripts/convert_sd3_controlnet_to_diffusers.py), plus the diffusers model itself."""
    from diffusers import SD3ControlNetModel

    ref = SD3ControlNetModel(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                             joint_attention_dim=None, caption_projection_dim=128, pooled_projection_dim=48,
                             out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                             force_zeros_for_pooled_projection=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # diffusers zero-initialises the output layers; random values expose every path
        for p in ref.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
    d = ref.state_dict()
    sd = {"control_type": torch.tensor([1.0])}
    for k, v in d.items():
        if k.startswith(("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")):
            sd[k] = v.clone()
    for i in range(2):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"{b}attn.qkv.{kind}"] = torch.cat([d[f"{b}attn.to_{c}.{kind}"] for c in "qkv"])
            sd[f"{b}attn.proj.{kind}"] = d[f"{b}attn.to_out.0.{kind}"]
            sd[f"{b}mlp.fc1.{kind}"] = d[f"{b}ff.net.0.proj.{kind}"]
            sd[f"{b}mlp.fc2.{kind}"] = d[f"{b}ff.net.2.{kind}"]
            sd[f"{b}adaLN_modulation.1.{kind}"] = d[f"{b}norm1.linear.{kind}"]
    return sd, ref


def test_sd35_controlnet_and_injection_match_diffusers():
    main_sd = random_mmdit_state_dict(**MAIN, seed=2)
    cfg = comfy.model_detection.detect_unet_config(main_sd, "")
    ours_main = MMDiT(**cfg).eval()
    ours_main.load_state_dict(main_sd, strict=True)
    their_main, _ = _diffusers_model(main_sd, cfg)

    sd, ref_cn = _stability_file()
    ref_cn.pos_embed = ref_cn._get_pos_embed_from_transformer(their_main)
    cn = comfy.controlnet.load_controlnet_state_dict(sd, name="sd3.5_large_controlnet_canny.safetensors")
    assert cn.latent_input and cn.repeat_mode == "ratio"

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 10, generator=g)
    hint = torch.randn(2, 16, 8, 10, generator=g)
    ctx = torch.randn(2, 5, MAIN["context_in_dim"], generator=g)
    y = torch.randn(2, MAIN["adm_in_channels"], generator=g)
    t = torch.tensor([800.0, 250.0])
    with torch.no_grad():
        (samples,) = ref_cn(hidden_states=x, controlnet_cond=hint, conditioning_scale=1.0, pooled_projections=y,
                            timestep=t, return_dict=False)
        raw = cn.control_model(x, hint, t, None, y=y, main_model=ours_main)
    assert len(raw["output"]) == 2
    for a, b in zip(raw["output"], samples):
        assert b.abs().mean() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    expanded = comfy.controlnet._expand(samples, MAIN["depth"], "ratio")
    assert [id(r) for r in expanded] == [id(samples[0])] * 2 + [id(samples[1])] * 2
    # Stability's reference (and ComfyUI) add a residual after every joint block, the last included;
    # diffusers skips the last (context-pre-only) block. Compare with that one entry left out.
    control = {"output": expanded[:-1] + [None]}
    with torch.no_grad():
        ours = ours_main(x, t, context=ctx, y=y, control=control)
        plain = ours_main(x, t, context=ctx, y=y)
        theirs = their_main(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                            block_controlnet_hidden_states=list(samples), return_dict=False)[0]
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
