"""SD3 / SD3.5 MMDiT: detection from shapes, and our network vs diffusers' SD3Transformer2DModel on the same
random weights (converted with diffusers' own single-file converter), fp32.

`random_mmdit_state_dict` builds tiny checkpoints in the real Stability key layout; the workflow tests
reuse it.
"""

from __future__ import annotations

import math

import pytest
import torch

# hidden = 64 x heads (every SD3 checkpoint); 2 heads keep it tiny
TINY = dict(hidden_size=128, depth=3, in_channels=16, adm_in_channels=48, context_in_dim=40, pos_embed_max_size=12)


def random_mmdit_state_dict(hidden_size: int = 128, depth: int = 3, in_channels: int = 16, patch_size: int = 2,
                            adm_in_channels: int = 48, context_in_dim: int = 40, pos_embed_max_size: int = 12,
                            mlp_ratio: float = 4.0, qk_norm: bool = False, attn2_layers: tuple[int, ...] = (),
                            seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random MMDiT state dict with the SD3 / SD3.5 checkpoint's key names and shape relations."""
    g = torch.Generator().manual_seed(seed)
    h = hidden_size
    mlp = int(h * mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    shapes["x_embedder.proj.weight"] = (h, in_channels, patch_size, patch_size)
    shapes["x_embedder.proj.bias"] = (h,)
    shapes["pos_embed"] = (1, pos_embed_max_size ** 2, h)
    linear("t_embedder.mlp.0", 256, h)
    linear("t_embedder.mlp.2", h, h)
    linear("y_embedder.mlp.0", adm_in_channels, h)
    linear("y_embedder.mlp.2", h, h)
    linear("context_embedder", context_in_dim, h)
    for i in range(depth):
        for side in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{side}"
            pre_only = side == "context_block" and i == depth - 1
            attns = ["attn"] + (["attn2"] if side == "x_block" and i in attn2_layers else [])
            for a in attns:
                linear(f"{p}.{a}.qkv", h, 3 * h)
                if not (pre_only and a == "attn"):
                    linear(f"{p}.{a}.proj", h, h)
                if qk_norm:
                    shapes[f"{p}.{a}.ln_q.weight"] = (64,)
                    shapes[f"{p}.{a}.ln_k.weight"] = (64,)
            n_mod = 2 if pre_only else (9 if len(attns) == 2 else 6)
            linear(f"{p}.adaLN_modulation.1", h, n_mod * h)
            if not pre_only:
                linear(f"{p}.mlp.fc1", h, mlp)
                linear(f"{p}.mlp.fc2", mlp, h)
    linear("final_layer.linear", h, patch_size * patch_size * in_channels)
    linear("final_layer.adaLN_modulation.1", h, 2 * h)

    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(("ln_q.weight", "ln_k.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name == "pos_embed":
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            # 1/sqrt(fan_in) keeps activations O(1) through the blocks
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if "adaLN" in name:
                t = t * 0.5
        sd[name] = t.to(dtype).contiguous()
    return sd


VARIANTS = {
    "sd3-medium": dict(qk_norm=False),                         # SD3.0: no qk-norm
    "sd3.5-large": dict(qk_norm=True),                         # RMS qk-norm on both streams
    "sd3.5-medium": dict(qk_norm=True, attn2_layers=(0, 1)),   # plus image-only attn2 in the first blocks
}


def _diffusers_model(sd: dict, cfg: dict):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    # the converter pops keys from its argument: give it a copy with the single-file prefix, as in a file
    dsd = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v.clone()
                                                           for k, v in sd.items()})
    model = SD3Transformer2DModel(
        sample_size=cfg["pos_embed_max_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
        num_layers=cfg["depth"], attention_head_dim=64, num_attention_heads=cfg["num_heads"],
        joint_attention_dim=cfg["context_in_dim"], caption_projection_dim=cfg["hidden_size"],
        pooled_projection_dim=cfg["adm_in_channels"], out_channels=cfg["out_channels"],
        pos_embed_max_size=cfg["pos_embed_max_size"], dual_attention_layers=tuple(cfg["x_block_self_attn_layers"]),
        qk_norm="rms_norm" if cfg["qk_norm"] else None).eval()
    res = model.load_state_dict(dsd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return model, dsd


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_detection_reads_sizes_from_shapes(variant):
    import comfy.model_detection
    import comfy.supported_models

    sd = random_mmdit_state_dict(**TINY, **VARIANTS[variant])
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(prefixed)
    assert prefix == "model.diffusion_model."
    cfg = comfy.model_detection.detect_unet_config(prefixed, prefix)
    assert cfg["image_model"] == "mmdit" and cfg["layout"] == "sd3"
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["depth"]) == (128, 2, 3)
    assert (cfg["in_channels"], cfg["out_channels"], cfg["patch_size"]) == (16, 16, 2)
    assert (cfg["adm_in_channels"], cfg["context_in_dim"], cfg["pos_embed_max_size"]) == (48, 40, 12)
    assert cfg["qk_norm"] is VARIANTS[variant]["qk_norm"]
    assert cfg["x_block_self_attn_layers"] == list(VARIANTS[variant].get("attn2_layers", ()))
    mc = comfy.supported_models.model_config_for(cfg)
    assert type(mc).__name__ == "SD3" and mc.sampling_settings["shift"] == 3.0 and mc.clip_type == "sd3"
    assert mc.latent_format.latent_channels == 16 and mc.latent_format.scale_factor == 1.5305
    assert mc.latent_format.shift_factor == 0.0609


def test_full_size_sd35_large_config_from_shapes():
    """Full SD3.5-large sizes, read from meta tensors (nothing allocated)."""
    from comfy.ldm.mmdit.detect import detect_sd3

    h = 64 * 38
    sd = {k: torch.empty(v.shape, device="meta") for k, v in random_mmdit_state_dict(
        hidden_size=64, depth=1, adm_in_channels=8, context_in_dim=8).items()}
    sd["x_embedder.proj.weight"] = torch.empty(h, 16, 2, 2, device="meta")
    sd["pos_embed"] = torch.empty(1, 192 * 192, h, device="meta")
    sd["y_embedder.mlp.0.weight"] = torch.empty(h, 2048, device="meta")
    sd["context_embedder.weight"] = torch.empty(h, 4096, device="meta")
    sd["joint_blocks.0.x_block.mlp.fc1.weight"] = torch.empty(4 * h, h, device="meta")
    sd["joint_blocks.0.x_block.attn.ln_q.weight"] = torch.empty(64, device="meta")
    for i in range(1, 38):
        sd[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = torch.empty(3 * h, h, device="meta")
    cfg = detect_sd3(sd)
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["depth"], cfg["pos_embed_max_size"]) == (2432, 38, 38, 192)
    assert (cfg["adm_in_channels"], cfg["context_in_dim"], cfg["qk_norm"]) == (2048, 4096, True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mmdit_matches_diffusers(variant):
    import comfy.model_detection
    from comfy.ldm.mmdit.model import MMDiT

    sd = random_mmdit_state_dict(**TINY, **VARIANTS[variant], seed=3)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    ours = MMDiT(**cfg).eval()
    ours.load_state_dict(sd, strict=True)
    theirs, _ = _diffusers_model(sd, cfg)

    g = torch.Generator().manual_seed(0)
    # an odd-sized latent (7 x 10 -> padded to 8 x 10 patches) checks the padding and the off-centre crop
    b, t_len = 2, 9
    x = torch.randn(b, 16, 8, 10, generator=g)
    ctx = torch.randn(b, t_len, TINY["context_in_dim"], generator=g)
    y = torch.randn(b, TINY["adm_in_channels"], generator=g)
    t = torch.tensor([999.0, 312.5])
    with torch.no_grad():
        out = ours(x, t, context=ctx, y=y)
        ref = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                     return_dict=False)[0]
    assert out.shape == ref.shape == x.shape
    # fp32 with the same maths; the joint attention orders keys differently ([txt, img] vs [img, txt]),
    # so sums differ in the last bits only
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert out.abs().mean() > 0.05  # a real signal, not a vanishing output


def test_odd_latent_is_padded_and_cropped():
    import comfy.model_detection
    from comfy.ldm.mmdit.model import MMDiT

    sd = random_mmdit_state_dict(**TINY, qk_norm=True, seed=1)
    model = MMDiT(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    model.load_state_dict(sd)
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), context=torch.randn(1, 5, 40), y=torch.randn(1, 48))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="position table"):
        model(torch.randn(1, 16, 26, 8), torch.tensor([1.0]), context=torch.randn(1, 5, 40), y=torch.randn(1, 48))


def test_diffusers_named_file_converts_back_exactly():
    """A diffusers-named SD3 transformer is detected and mapped back to the checkpoint layout bit-exactly."""
    import comfy.model_detection
    from comfy.ldm.mmdit.detect import diffusers_to_checkpoint

    sd = random_mmdit_state_dict(**TINY, qk_norm=True, attn2_layers=(0,), seed=5)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    _, dsd = _diffusers_model(sd, cfg)
    dcfg = comfy.model_detection.detect_unet_config(dsd, "")
    assert dcfg["layout"] == "diffusers"
    assert {k: v for k, v in dcfg.items() if k != "layout"} == {k: v for k, v in cfg.items() if k != "layout"}
    back = diffusers_to_checkpoint(dsd)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_block_replace_patch_and_attention_override_are_used():
    """patches_replace["dit"][("double_block", i)] and the attention override reach every joint block."""
    import comfy.model_detection
    from comfy.ldm.mmdit.model import MMDiT

    sd = random_mmdit_state_dict(**TINY, attn2_layers=(0,), seed=2)
    model = MMDiT(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    model.load_state_dict(sd)
    x, t, ctx, y = torch.randn(1, 16, 4, 4), torch.tensor([100.0]), torch.randn(1, 3, 40), torch.randn(1, 48)
    with torch.no_grad():
        base = model(x, t, context=ctx, y=y)
        seen, calls = [], []

        def replace(args, extra):
            seen.append(args["transformer_options"]["block_index"])
            return extra["original_block"](args)

        def override(default_fn, q, k, v, heads, **kw):
            calls.append((q.shape[2], k.shape[2]))
            return default_fn(q, k, v, heads, **kw)

        opts = {"patches_replace": {"dit": {("double_block", 1): replace}}, "optimized_attention_override": override}
        out = model(x, t, context=ctx, y=y, transformer_options=opts)
    assert seen == [1]
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    # 3 joint attentions over [3 txt + 4 img] keys, plus block 0's image-only attn2 over 4 keys
    assert sorted(calls) == sorted([(7, 7)] * 3 + [(4, 4)])


def test_incomplete_sd3_file_names_the_file(tmp_path):
    from safetensors.torch import save_file

    import comfy.sd

    sd = random_mmdit_state_dict(**TINY)
    del sd["x_embedder.proj.weight"]
    path = tmp_path / "sd3_medium_broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"sd3_medium_broken\.safetensors.*incomplete SD3"):
        comfy.sd.load_diffusion_model(str(path))
