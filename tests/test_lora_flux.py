"""LoRA on Flux: every key format patches the same weights a by-hand merge (W + s * up @ down * alpha / r)
changes, diffusers-named LoRAs agree with diffusers' own model holding the merged weights, unpatching
restores the exact weights, strength changes need no reload, and foreign LoRAs are refused."""

from __future__ import annotations

import os

import pytest
import torch

import comfy.lora
import comfy.model_detection
import comfy.sd
from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
demo = demo_script()

CFG = dict(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=8, vec_in_dim=4)
H = CFG["hidden_size"]
MLP = 4 * H
RANK = 3
ALPHA = 6.0  # scale alpha / rank = 2: a mistaken scale shows


def _base_sd(seed=5):
    return demo.random_flux_state_dict(**CFG, seed=seed)


def _run(patcher_or_model, seed=0):
    model = getattr(patcher_or_model, "model", patcher_or_model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 4, 6, generator=g)
    kw = dict(c_crossattn=torch.randn(2, 3, CFG["context_in_dim"], generator=g),
              y=torch.randn(2, CFG["vec_in_dim"], generator=g), guidance=torch.tensor([3.5, 2.0]))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([0.6, 0.3]), **kw)


def _updown(rows, cols, g):
    return torch.randn(rows, RANK, generator=g) * 0.3, torch.randn(RANK, cols, generator=g) * 0.3


def _delta(up, down, alpha=ALPHA):
    return up @ down * (alpha / RANK if alpha is not None else 1.0)


# BFL module -> (rows, cols, row slice) for the modules the BFL-named formats patch
BFL_MODULES = {
    "double_blocks.0.img_attn.qkv": (3 * H, H),
    "double_blocks.1.txt_attn.proj": (H, H),
    "double_blocks.0.txt_mlp.0": (MLP, H),
    "single_blocks.1.linear1": (3 * H + MLP, H),
    "single_blocks.0.linear2": (H, H + MLP),
    "img_in": (H, 64),
    "final_layer.adaLN_modulation.1": (2 * H, H),
}


def _bfl_format_lora(fmt, g):
    """(lora state dict, {bfl module: delta at strength 1})."""
    lora, deltas = {}, {}
    for mod, (rows, cols) in BFL_MODULES.items():
        up, down = _updown(rows, cols, g)
        if fmt == "comfy":
            name, u, d, alpha = f"diffusion_model.{mod}", ".lora_up.weight", ".lora_down.weight", ALPHA
        elif fmt == "kohya":
            name, u, d, alpha = "lora_unet_" + mod.replace(".", "_"), ".lora_up.weight", ".lora_down.weight", ALPHA
        elif fmt == "comfy_peft":
            name, u, d, alpha = f"diffusion_model.{mod}", ".lora_B.weight", ".lora_A.weight", ALPHA
        elif fmt == "bfl":  # BFL's own LoRA files (flux1-*-lora): bare module names, lora_A/lora_B, no alpha
            name, u, d, alpha = mod, ".lora_B.weight", ".lora_A.weight", None
        else:
            raise AssertionError(fmt)
        lora[name + u], lora[name + d] = up, down
        if alpha is not None:
            lora[name + ".alpha"] = torch.tensor(alpha)
        deltas[mod] = _delta(up, down, alpha)
    return lora, deltas


def _merged_patcher(sd, deltas, strength=1.0):
    merged = {k: v.clone() for k, v in sd.items()}
    for mod, d in deltas.items():
        merged[f"{mod}.weight"] += strength * d
    return comfy.sd.load_diffusion_model_state_dict(merged)


@pytest.mark.parametrize("fmt", ["comfy", "kohya", "comfy_peft", "bfl"])
def test_bfl_named_formats_equal_hand_merge(fmt):
    sd = _base_sd()
    base = comfy.sd.load_diffusion_model_state_dict(sd)
    lora, deltas = _bfl_format_lora(fmt, torch.Generator().manual_seed(1))
    patched, _ = comfy.lora.load_lora_for_models(base, None, lora, 0.7, 0.0, name=f"{fmt}.safetensors")
    assert len(patched.patches) == len(BFL_MODULES)
    ref = _run(_merged_patcher(sd, deltas, 0.7))
    patched.patch_model(torch.device("cpu"))
    out = _run(patched)
    patched.unpatch_model()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _run(base), atol=1e-3)  # the LoRA did change the output


def test_xlabs_format():
    """XLabs processors: qkv_lora1/proj_lora1 = image stream, *2 = text stream; single qkv_lora = linear1[:3h]."""
    sd = _base_sd()
    base = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    lora, deltas = {}, {}
    spec = {"double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", 3 * H, H, None),
            "double_blocks.1.processor.proj_lora2": ("double_blocks.1.txt_attn.proj", H, H, None),
            "double_blocks.1.processor.qkv_lora2": ("double_blocks.1.txt_attn.qkv", 3 * H, H, None),
            "single_blocks.0.processor.qkv_lora": ("single_blocks.0.linear1", 3 * H, H, 3 * H),
            "single_blocks.1.processor.proj_lora": ("single_blocks.1.linear2", H, H + MLP, None)}
    for name, (mod, rows, cols, n_rows) in spec.items():
        up, down = _updown(rows, cols, g)
        lora[f"{name}.up.weight"], lora[f"{name}.down.weight"] = up, down
        d = _delta(up, down, None)  # XLabs files carry no alpha: scale 1
        if n_rows is not None:
            d = torch.cat([d, torch.zeros(3 * H + MLP - n_rows, cols)])
        deltas[mod] = d
    patched, _ = comfy.lora.load_lora_for_models(base, None, lora, 1.0, 1.0, name="xlabs.safetensors")
    ref = _run(_merged_patcher(sd, deltas))
    patched.patch_model(torch.device("cpu"))
    out = _run(patched)
    patched.unpatch_model()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# diffusers module names (as diffusers' Flux model names them) covered by the diffusers-format test,
# including the ones that land on slices of fused BFL weights and the swapped norm_out
DIFFUSERS_MODULES = {
    "transformer_blocks.0.attn.to_q": (H, H),
    "transformer_blocks.0.attn.to_k": (H, H),
    "transformer_blocks.1.attn.add_v_proj": (H, H),
    "transformer_blocks.1.attn.to_add_out": (H, H),
    "transformer_blocks.0.ff.net.0.proj": (MLP, H),
    "transformer_blocks.1.norm1_context.linear": (6 * H, H),
    "single_transformer_blocks.0.attn.to_v": (H, H),
    "single_transformer_blocks.0.proj_mlp": (MLP, H),
    "single_transformer_blocks.1.attn.to_q": (H, H),
    "single_transformer_blocks.1.proj_out": (H, H + MLP),
    "x_embedder": (H, 64),
    "time_text_embed.text_embedder.linear_1": (H, CFG["vec_in_dim"]),
    "norm_out.linear": (2 * H, H),
}


def _diffusers_model(sd):
    from diffusers import FluxTransformer2DModel

    from tests.test_flux_oracle import to_diffusers

    cfg = comfy.model_detection.detect_unet_config(sd, "")
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=CFG["depth"], num_single_layers=CFG["depth_single_blocks"],
        attention_head_dim=H // CFG["num_heads"], num_attention_heads=CFG["num_heads"],
        joint_attention_dim=CFG["context_in_dim"], pooled_projection_dim=CFG["vec_in_dim"],
        guidance_embeds=True, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
    return m, to_diffusers(sd, H, True)


def _run_diffusers(m):
    # same inputs as _run, in diffusers' packed-token form and its timestep convention (sigma)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 6, generator=g)
    ctx = torch.randn(2, 3, CFG["context_in_dim"], generator=g)
    y = torch.randn(2, CFG["vec_in_dim"], generator=g)
    sigma = torch.tensor([0.6, 0.3])
    b, h, w = 2, 4, 6
    packed = x.view(b, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 64)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    with torch.no_grad():
        v = m(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=y, timestep=sigma,
              img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5, 2.0]),
              return_dict=False)[0]
    v = v.view(b, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, h, w)
    return x - sigma.view(-1, 1, 1, 1) * v  # flow: denoised = x - sigma * v


@pytest.mark.parametrize("fmt", ["peft", "kohya_diffusers"])
def test_diffusers_named_lora_matches_diffusers_model_with_merged_weights(fmt):
    """The oracle is diffusers itself: its Flux model with the LoRA merged by hand into ITS weights (no
    slicing needed in diffusers' layout) must give what our BFL model patched with the LoRA gives."""
    sd = _base_sd()
    dm, dsd = _diffusers_model(sd)
    base = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(3)
    lora = {}
    strength = 0.8
    for mod, (rows, cols) in DIFFUSERS_MODULES.items():
        up, down = _updown(rows, cols, g)
        if fmt == "peft":
            lora[f"transformer.{mod}.lora_A.weight"], lora[f"transformer.{mod}.lora_B.weight"] = down, up
            d = _delta(up, down, None)
        else:
            name = "lora_transformer_" + mod.replace(".", "_")
            lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
            lora[f"{name}.alpha"] = torch.tensor(ALPHA)
            d = _delta(up, down)
        dsd[f"{mod}.weight"] = dsd[f"{mod}.weight"] + strength * d
    assert not dm.load_state_dict(dsd, strict=True).missing_keys
    patched, _ = comfy.lora.load_lora_for_models(base, None, lora, strength, 1.0, name=f"{fmt}.safetensors")
    assert sum(len(v) for v in patched.patches.values()) == len(DIFFUSERS_MODULES)  # one patch per module
    patched.patch_model(torch.device("cpu"))
    out = _run(patched)
    patched.unpatch_model()
    ref = _run_diffusers(dm)
    assert (out - _run(base)).abs().max() > 1e-2  # the LoRA matters at this size
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def test_loha_and_lokr_and_diff():
    sd = _base_sd()
    base = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(4)
    lora, deltas = {}, {}
    # LoHa on img_attn.proj: (w1a @ w1b) * (w2a @ w2b) * alpha / rank
    n = "lora_unet_double_blocks_0_img_attn_proj"
    w = [torch.randn(s, generator=g) * 0.3 for s in ((H, 2), (2, H), (H, 2), (2, H))]
    lora.update({f"{n}.hada_w1_a": w[0], f"{n}.hada_w1_b": w[1], f"{n}.hada_w2_a": w[2], f"{n}.hada_w2_b": w[3],
                 f"{n}.alpha": torch.tensor(1.0)})
    deltas["double_blocks.0.img_attn.proj"] = (w[0] @ w[1]) * (w[2] @ w[3]) * (1.0 / 2)
    # LoKr on txt_mlp.2 (H x MLP): kron(w1, w2a @ w2b) * alpha / rank(w2)
    n = "lora_unet_double_blocks_1_txt_mlp_2"
    w1 = torch.randn(4, 8, generator=g) * 0.3
    w2a, w2b = torch.randn(H // 4, 2, generator=g) * 0.3, torch.randn(2, MLP // 8, generator=g) * 0.3
    lora.update({f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": torch.tensor(4.0)})
    deltas["double_blocks.1.txt_mlp.2"] = torch.kron(w1, w2a @ w2b) * 2.0
    # full diff (and bias diff) on txt_in
    lora["diffusion_model.txt_in.diff"] = torch.randn(H, CFG["context_in_dim"], generator=g) * 0.1
    lora["diffusion_model.txt_in.diff_b"] = torch.randn(H, generator=g) * 0.1
    deltas["txt_in"] = lora["diffusion_model.txt_in.diff"]
    patched, _ = comfy.lora.load_lora_for_models(base, None, lora, 0.5, 1.0, name="lycoris.safetensors")
    merged = {k: v.clone() for k, v in sd.items()}
    for mod, d in deltas.items():
        merged[f"{mod}.weight"] += 0.5 * d
    merged["txt_in.bias"] += 0.5 * lora["diffusion_model.txt_in.diff_b"]
    ref = _run(comfy.sd.load_diffusion_model_state_dict(merged))
    patched.patch_model(torch.device("cpu"))
    out = _run(patched)
    patched.unpatch_model()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_exact_weights_and_strength_change_without_reload():
    sd = _base_sd()
    base = comfy.sd.load_diffusion_model_state_dict(sd)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    lora, deltas = _bfl_format_lora("kohya", torch.Generator().manual_seed(6))
    weak, _ = comfy.lora.load_lora_for_models(base, None, lora, 0.25, 1.0, name="a.safetensors")
    strong, _ = comfy.lora.load_lora_for_models(base, None, lora, 1.5, 1.0, name="a.safetensors")
    net = base.model.diffusion_model
    key = "double_blocks.0.img_attn.qkv"
    w0 = sd[f"{key}.weight"]
    weak.patch_model(torch.device("cpu"))
    torch.testing.assert_close(net.double_blocks[0].img_attn.qkv.weight, w0 + 0.25 * deltas[key])
    # the other clone patches the same shared network from the backed-up originals, no reload
    strong.patch_model(torch.device("cpu"))
    torch.testing.assert_close(net.double_blocks[0].img_attn.qkv.weight, w0 + 1.5 * deltas[key])
    strong.unpatch_model()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact restore
    assert not base.patches  # the input MODEL is untouched


def test_foreign_lora_is_refused_with_the_file_and_its_target():
    base = comfy.sd.load_diffusion_model_state_dict(_base_sd())
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}
    with pytest.raises(ValueError, match=r"'sdxl_style\.safetensors'.*SDXL"):
        comfy.lora.load_lora_for_models(base, None, sdxl, 1.0, 1.0, name="sdxl_style.safetensors")
    # a Flux LoRA for the full-size model (hidden 3072) on this small Flux: refused, not mis-applied
    big = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
           "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4)}
    with pytest.raises(ValueError, match=r"'flux_big\.safetensors' does not fit.*3072"):
        comfy.lora.load_lora_for_models(base, None, big, 1.0, 1.0, name="flux_big.safetensors")
