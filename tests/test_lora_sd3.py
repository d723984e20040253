"""LoRA on SD3 / SD3.5 (MMDiT): kohya-named and diffusers/PEFT-named LoRAs patch exactly the weights a
by-hand merge changes (W + s * up @ down * alpha / r, diffusers' separate q/k/v landing on row slices of
the fused qkv), a diffusers-named LoRA agrees with diffusers' SD3Transformer2DModel holding the merged
weights, and a Flux LoRA given to an SD3 model is refused with an error naming the file."""

from __future__ import annotations

import pytest
import torch

import comfy.lora
import comfy.model_detection
import comfy.sd
from tests.test_sd3_oracle import TINY, random_mmdit_state_dict

H = TINY["hidden_size"]
MLP = 4 * H
DEPTH = TINY["depth"]
RANK = 3
ALPHA = 6.0  # alpha / rank = 2: a forgotten or doubled scale shows
STRENGTH = 0.7


def _updown(rows, cols, g, conv=False):
    up = torch.randn(rows, RANK, generator=g) * 0.3
    down = torch.randn(RANK, *cols, generator=g) * 0.3 if conv else torch.randn(RANK, cols, generator=g) * 0.3
    if conv:
        up = up[:, :, None, None]
    return up, down


def _delta(up, down):
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (ALPHA / RANK)


def _base(seed=2, **variant):
    return random_mmdit_state_dict(**TINY, seed=seed, **variant)


def _patched_weights(sd, lora, strength=STRENGTH, name="test.safetensors"):
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    patched, _ = comfy.lora.load_lora_for_models(model, None, lora, strength, 0.0, name=name)
    patched.patch_model(torch.device("cpu"))
    out = {k[len("diffusion_model."):]: v.detach().clone() for k, v in patched.model.state_dict().items()
           if k.startswith("diffusion_model.")}
    patched.unpatch_model()
    return model, patched, out


def _assert_merged(got: dict, sd: dict, expect_delta: dict):
    for k, w in sd.items():
        want = w + STRENGTH * expect_delta[k] if k in expect_delta else w
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# Stability-named modules a kohya SD3 LoRA (sd-scripts) trains: name -> (rows, cols / conv in-shape)
KOHYA_MODULES = {
    "joint_blocks.0.x_block.attn.qkv": (3 * H, H),
    "joint_blocks.0.context_block.attn.proj": (H, H),
    "joint_blocks.1.x_block.mlp.fc2": (H, MLP),
    "joint_blocks.2.context_block.adaLN_modulation.1": (2 * H, H),  # the pre-only last context block
    "context_embedder": (H, TINY["context_in_dim"]),
    "final_layer.linear": (2 * 2 * 16, H),
    "x_embedder.proj": (H, (16, 2, 2)),                            # the patch conv
}


def test_kohya_sd3_lora_equals_hand_merge():
    g = torch.Generator().manual_seed(11)
    sd = _base()
    lora, deltas = {}, {}
    for mod, (rows, cols) in KOHYA_MODULES.items():
        conv = isinstance(cols, tuple)
        up, down = _updown(rows, cols, g, conv=conv)
        name = "lora_unet_" + mod.replace(".", "_")
        lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"] = up, down
        lora[f"{name}.alpha"] = torch.tensor(ALPHA)
        deltas[f"{mod}.weight"] = _delta(up, down)
    base, patched, got = _patched_weights(sd, lora)
    assert len(patched.patches) == len(KOHYA_MODULES)
    _assert_merged(got, sd, deltas)
    # the input MODEL is untouched and unpatching restores the exact weights
    assert not base.patches
    after = {k[len("diffusion_model."):]: v for k, v in base.model.state_dict().items()}
    assert all(torch.equal(after[k], sd[k]) for k in sd)


# diffusers module -> (Stability key, row offset, rows, cols, swap halves)
def _diffusers_modules(attn2: bool):
    last = DEPTH - 1
    m = {
        "transformer_blocks.0.attn.to_q": ("joint_blocks.0.x_block.attn.qkv", 0, H, H, False),
        "transformer_blocks.0.attn.to_k": ("joint_blocks.0.x_block.attn.qkv", H, H, H, False),
        "transformer_blocks.0.attn.to_v": ("joint_blocks.0.x_block.attn.qkv", 2 * H, H, H, False),
        "transformer_blocks.1.attn.add_k_proj": ("joint_blocks.1.context_block.attn.qkv", H, H, H, False),
        "transformer_blocks.1.attn.add_v_proj": ("joint_blocks.1.context_block.attn.qkv", 2 * H, H, H, False),
        "transformer_blocks.0.attn.to_out.0": ("joint_blocks.0.x_block.attn.proj", 0, H, H, False),
        "transformer_blocks.1.attn.to_add_out": ("joint_blocks.1.context_block.attn.proj", 0, H, H, False),
        "transformer_blocks.0.norm1.linear": ("joint_blocks.0.x_block.adaLN_modulation.1", 0,
                                              (9 if attn2 else 6) * H, H, False),
        "transformer_blocks.0.ff_context.net.0.proj": ("joint_blocks.0.context_block.mlp.fc1", 0, MLP, H, False),
        "transformer_blocks.1.ff.net.2": ("joint_blocks.1.x_block.mlp.fc2", 0, H, MLP, False),
        # the last context block is pre-only: diffusers' (scale, shift) rows are the checkpoint's (shift, scale)
        f"transformer_blocks.{last}.norm1_context.linear": (f"joint_blocks.{last}.context_block.adaLN_modulation.1",
                                                            0, 2 * H, H, True),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, 2 * H, H, True),
        "proj_out": ("final_layer.linear", 0, 2 * 2 * 16, H, False),
        "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", 0, H, TINY["adm_in_channels"], False),
    }
    if attn2:
        m["transformer_blocks.0.attn2.to_k"] = ("joint_blocks.0.x_block.attn2.qkv", H, H, H, False)
        m["transformer_blocks.0.attn2.to_out.0"] = ("joint_blocks.0.x_block.attn2.proj", 0, H, H, False)
    return m


def _diffusers_lora(modules, g, fmt):
    """(lora state dict, {stability key: delta on the whole weight}, {diffusers key: delta})."""
    lora, deltas, ddeltas = {}, {}, {}
    for dname, (skey, off, rows, cols, swap) in modules.items():
        up, down = _updown(rows, cols, g)
        if fmt == "peft":
            name, u, d = f"transformer.{dname}", ".lora_B.weight", ".lora_A.weight"
        else:  # kohya over diffusers module names
            name, u, d = "lora_transformer_" + dname.replace(".", "_"), ".lora_up.weight", ".lora_down.weight"
        lora[name + u], lora[name + d] = up, down
        lora[name + ".alpha"] = torch.tensor(ALPHA)
        delta = _delta(up, down)
        ddeltas[f"{dname}.weight"] = delta
        if swap:
            a, b = delta.chunk(2)
            delta = torch.cat([b, a])
        full = deltas.setdefault(f"{skey}.weight", None)
        if full is None:
            full = torch.zeros(3 * H if skey.endswith("qkv") else rows, cols)
            deltas[f"{skey}.weight"] = full
        full[off:off + rows] += delta
    return lora, deltas, ddeltas


@pytest.mark.parametrize("fmt,variant", [("peft", "sd3.5-medium"), ("kohya_diffusers", "sd3-medium")])
def test_diffusers_named_sd3_lora_equals_hand_merge_and_diffusers(fmt, variant):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from tests.test_sd3_oracle import VARIANTS

    attn2 = bool(VARIANTS[variant].get("attn2_layers"))
    sd = _base(seed=4, **VARIANTS[variant])
    lora, deltas, ddeltas = _diffusers_lora(_diffusers_modules(attn2), torch.Generator().manual_seed(5), fmt)
    _, patched, got = _patched_weights(sd, lora)
    _assert_merged(got, sd, deltas)

    # oracle: diffusers' own model with the LoRA merged into its separate (unfused) weights by name
    dsd = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v.clone()
                                                           for k, v in sd.items()})
    for k, d in ddeltas.items():
        dsd[k] = dsd[k] + STRENGTH * d
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    theirs = SD3Transformer2DModel(
        sample_size=cfg["pos_embed_max_size"], patch_size=2, in_channels=16, num_layers=cfg["depth"],
        attention_head_dim=64, num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
        caption_projection_dim=H, pooled_projection_dim=cfg["adm_in_channels"], out_channels=16,
        pos_embed_max_size=cfg["pos_embed_max_size"], dual_attention_layers=tuple(cfg["x_block_self_attn_layers"]),
        qk_norm="rms_norm" if cfg["qk_norm"] else None).eval()
    theirs.load_state_dict(dsd, strict=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 5, TINY["context_in_dim"], generator=g)
    y = torch.randn(1, TINY["adm_in_channels"], generator=g)
    t = torch.tensor([420.0])
    patched.patch_model(torch.device("cpu"))
    try:
        with torch.no_grad():
            ours = patched.model.diffusion_model(x, t, context=ctx, y=y)
            ref = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                         return_dict=False)[0]
    finally:
        patched.unpatch_model()
    # fp32, same maths up to joint-attention key order (see test_sd3_oracle)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_flux_lora_on_sd3_is_refused_naming_the_file():
    model = comfy.sd.load_diffusion_model_state_dict(_base())
    # a diffusers-named Flux LoRA: its double-block names would also fit SD3's transformer_blocks
    flux_diffusers = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, H),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(H, RANK),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, H),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(H, RANK),
    }
    with pytest.raises(ValueError, match=r"'flux_style\.safetensors'.*Flux.*MMDiT"):
        comfy.lora.load_lora_for_models(model, None, flux_diffusers, 1.0, 1.0, name="flux_style.safetensors")
    bfl = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(RANK, H),
           "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(3 * H, RANK)}
    with pytest.raises(ValueError, match=r"'flux_bfl\.safetensors'.*Flux"):
        comfy.lora.load_lora_for_models(model, None, bfl, 1.0, 1.0, name="flux_bfl.safetensors")
    # an SD3 LoRA for a larger model (hidden 1536) is refused as another size
    big = {"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.zeros(RANK, 1536),
           "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.zeros(1536, RANK)}
    with pytest.raises(ValueError, match=r"'sd3_big\.safetensors' does not fit.*1536"):
        comfy.lora.load_lora_for_models(model, None, big, 1.0, 1.0, name="sd3_big.safetensors")


def test_sd3_key_map_covers_every_converted_weight():
    """Every weight diffusers' converter produces from an SD3.5-medium checkpoint has a LoRA name that lands
    on the checkpoint weight it came from (norms excepted: LoRAs do not train them)."""
    from comfy.ldm.mmdit.detect import diffusers_to_checkpoint

    sd = _base(qk_norm=True, attn2_layers=(0,))
    m = comfy.lora.sd3_diffusers_key_map(DEPTH, H, (0,))
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    dsd = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v.clone()
                                                           for k, v in sd.items()})
    assert diffusers_to_checkpoint(dsd).keys() == sd.keys()
    for k in dsd:
        if not k.endswith(".weight") or ".norm_" in k or k.startswith("pos_embed.pos_embed"):
            continue
        mod = k[:-len(".weight")]
        assert mod in m, f"no LoRA mapping for diffusers module {mod}"
        skey, off, fn = m[mod]
        w = sd[f"{skey}.weight"]
        if off is not None:
            w = w.narrow(off[0], off[1], off[2])
        if fn is not None:
            w = fn(w)
        assert torch.equal(w, dsd[k]), mod
