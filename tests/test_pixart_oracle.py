"""Numerical oracle: our PixArt-Σ / α transformer (released checkpoint layout) vs diffusers'
PixArtTransformer2DModel on the same random weights; detection from the state dict.

diffusers has no single-file converter for PixArt, so `to_diffusers` below is the key mapping
(ours -> diffusers), written from the two layouts:

    x_embedder.proj                 -> pos_embed.proj
    t_embedder.mlp.{0,2}            -> adaln_single.emb.timestep_embedder.linear_{1,2}
    t_block.1                       -> adaln_single.linear
    csize_embedder.mlp.{0,2} (α)    -> adaln_single.emb.resolution_embedder.linear_{1,2}
    ar_embedder.mlp.{0,2} (α)       -> adaln_single.emb.aspect_ratio_embedder.linear_{1,2}
    y_embedder.y_proj.fc{1,2}       -> caption_projection.linear_{1,2}
    y_embedder.y_embedding, pos_embed  (no diffusers counterpart: training-only null caption, fixed table)
    blocks.N.scale_shift_table      -> transformer_blocks.N.scale_shift_table
    blocks.N.attn.qkv               -> transformer_blocks.N.attn1.to_{q,k,v}   (split in 3 on dim 0)
    blocks.N.attn.proj              -> transformer_blocks.N.attn1.to_out.0
    blocks.N.cross_attn.q_linear    -> transformer_blocks.N.attn2.to_q
    blocks.N.cross_attn.kv_linear   -> transformer_blocks.N.attn2.to_{k,v}     (split in 2 on dim 0)
    blocks.N.cross_attn.proj        -> transformer_blocks.N.attn2.to_out.0
    blocks.N.mlp.fc1 / fc2          -> transformer_blocks.N.ff.net.0.proj / ff.net.2
    final_layer.scale_shift_table   -> scale_shift_table
    final_layer.linear              -> proj_out
"""

from __future__ import annotations

import pytest
import torch

# tiny but real: hidden 144 = 2 heads of PixArt's 72-wide heads (detection derives heads as hidden // 72)
TINY = dict(hidden_size=144, depth=2, caption_channels=32, model_max_length=16, input_size=16)


def random_pixart_state_dict(hidden_size: int = 144, depth: int = 2, caption_channels: int = 32,
                             model_max_length: int = 16, input_size: int = 16, micro_condition: bool = False,
                             with_pos_embed: bool = True, seed: int = 0) -> dict:
    """A PixArt state dict in the released checkpoint layout with seeded, fan-in scaled random weights."""
    from comfy.ldm.pixart.model import PixArtMS

    with torch.device("meta"):
        m = PixArtMS(input_size=input_size, hidden_size=hidden_size, depth=depth, num_heads=hidden_size // 72,
                     caption_channels=caption_channels, model_max_length=model_max_length,
                     micro_condition=micro_condition)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in m.state_dict().items():
        if "scale_shift_table" in k:
            t = torch.randn(p.shape, generator=g) / hidden_size ** 0.5
        elif k.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=g)
        elif k.endswith("y_embedding"):
            t = torch.randn(p.shape, generator=g) / caption_channels ** 0.5
        else:
            t = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        sd[k] = t.contiguous()
    if with_pos_embed:   # the released files carry the base-size table as a buffer
        sd["pos_embed"] = torch.zeros(1, (input_size // 2) ** 2, hidden_size)
    return sd


def to_diffusers(sd: dict) -> dict:
    out = {}
    top = {"x_embedder.proj": "pos_embed.proj", "t_block.1": "adaln_single.linear",
           "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
           "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
           "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
           "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
           "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
           "y_embedder.y_proj.fc1": "caption_projection.linear_1",
           "y_embedder.y_proj.fc2": "caption_projection.linear_2",
           "final_layer.linear": "proj_out"}
    blk = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0",
           "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
    for k, v in sd.items():
        if k in ("pos_embed", "y_embedder.y_embedding"):
            continue
        if k == "final_layer.scale_shift_table":
            out["scale_shift_table"] = v
            continue
        if k.startswith("blocks."):
            _, n, rest = k.split(".", 2)
            p = f"transformer_blocks.{n}."
            if rest == "scale_shift_table":
                out[p + rest] = v
                continue
            name, kind = rest.rsplit(".", 1)
            if name == "attn.qkv":
                for part, t in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{p}attn1.to_{part}.{kind}"] = t
            elif name == "cross_attn.kv_linear":
                for part, t in zip("kv", v.chunk(2, dim=0)):
                    out[f"{p}attn2.to_{part}.{kind}"] = t
            else:
                out[f"{p}{blk[name]}.{kind}"] = v
            continue
        name, kind = k.rsplit(".", 1)
        out[f"{top[name]}.{kind}"] = v
    return out


def diffusers_pixart(sd: dict, cfg: dict, micro: bool):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=cfg["hidden_size"] // 72, attention_head_dim=72, in_channels=4, out_channels=8,
        num_layers=cfg["depth"], cross_attention_dim=cfg["hidden_size"], sample_size=cfg["input_size"],
        patch_size=2, caption_channels=cfg["caption_channels"], interpolation_scale=max(cfg["input_size"] // 64, 1),
        use_additional_conditions=micro).eval()
    res = m.load_state_dict(to_diffusers(sd), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return m


def _ours(sd: dict):
    from comfy.ldm.pixart.detect import detect_pixart
    from comfy.ldm.pixart.model import PixArtMS

    cfg = detect_pixart(sd)
    with torch.device("meta"):
        m = PixArtMS(**cfg)
    m.load_state_dict({k: v for k, v in sd.items() if k != "pos_embed"}, strict=True, assign=True)
    return m.eval(), cfg


def test_detection_reads_sigma_and_alpha_from_shapes():
    from comfy.ldm.pixart.detect import detect_pixart

    sd = random_pixart_state_dict(**TINY)
    cfg = detect_pixart(sd)
    assert cfg["image_model"] == "pixart_sigma" and not cfg["micro_condition"]
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["depth"]) == (144, 2, 2)
    assert cfg["caption_channels"] == 32 and cfg["model_max_length"] == 16 and cfg["input_size"] == 16
    assert cfg["pred_sigma"] and cfg["patch_size"] == 2 and cfg["in_channels"] == 4
    alpha = detect_pixart(random_pixart_state_dict(**TINY, micro_condition=True))
    assert alpha["image_model"] == "pixart_alpha" and alpha["micro_condition"]
    assert detect_pixart({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}) is None
    with pytest.raises(ValueError, match="72"):
        detect_pixart(random_pixart_state_dict(hidden_size=100, depth=1, caption_channels=8, with_pos_embed=False)
                      | {"x_embedder.proj.weight": torch.zeros(100, 4, 2, 2)})


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_sigma_matches_diffusers(hw):
    torch.manual_seed(0)
    sd = random_pixart_state_dict(**TINY)
    ours, cfg = _ours(sd)
    ref = diffusers_pixart(sd, cfg, micro=False)
    x = torch.randn(2, 4, *hw)
    t = torch.tensor([999.0, 250.0])
    ctx = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = ours(x, t, ctx)
        exp = ref(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None,
                                                                               "aspect_ratio": None}).sample
    assert out.shape == (2, 4, *hw) and exp.shape == (2, 8, *hw)
    # fp32, same maths up to summation order: 1e-4 relative to O(1) outputs
    torch.testing.assert_close(out, exp[:, :4], rtol=1e-4, atol=1e-4)
    assert out.abs().mean() > 0.1   # a real signal, not a vanishing one


def test_alpha_micro_conditions_match_diffusers():
    sd = random_pixart_state_dict(**TINY, micro_condition=True, seed=3)
    ours, cfg = _ours(sd)
    ref = diffusers_pixart(sd, cfg, micro=True)
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 5, 32)
    size, ar = torch.tensor([[128.0, 128.0]]), torch.tensor([[1.0]])
    with torch.no_grad():
        out = ours(x, t, ctx, c_size=size, c_ar=ar)
        other = ours(x, t, ctx, c_size=torch.tensor([[256.0, 128.0]]), c_ar=torch.tensor([[2.0]]))
        exp = ref(x, encoder_hidden_states=ctx, timestep=t,
                  added_cond_kwargs={"resolution": size, "aspect_ratio": ar}).sample
    torch.testing.assert_close(out, exp[:, :4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, other, atol=1e-3)   # the size conditioning is really used


def test_attention_override_sees_self_attention_and_marked_cross_attention():
    from comfy.ldm.modules.attention import CROSS_ATTENTION_KEY

    ours, _ = _ours(random_pixart_state_dict(**TINY))
    calls = []

    def spy(default, q, k, v, heads, **kw):
        calls.append((bool(kw["transformer_options"].get(CROSS_ATTENTION_KEY)), q.shape[-2], k.shape[-2]))
        return default(q, k, v, heads, mask=kw.get("mask"), skip_reshape=kw["skip_reshape"],
                       skip_output_reshape=kw["skip_output_reshape"])

    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        base = ours(x, torch.tensor([10.0]), ctx)
        out = ours(x, torch.tensor([10.0]), ctx, transformer_options={"optimized_attention_override": spy})
    torch.testing.assert_close(out, base)
    # per block: one self-attention over the 64 image tokens, one cross-attention to the 7 caption tokens
    assert calls == [(False, 64, 64), (True, 64, 7)] * 2


def test_fp8_weights_load_through_manual_cast():
    """UNETLoader's fp8 weight_dtype: weights stored in float8, computed in float32 on the CPU."""
    import comfy.sd

    sd = random_pixart_state_dict(**TINY, seed=4)
    fp32 = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()})
    fp8 = comfy.sd.load_diffusion_model_state_dict(sd, {"dtype": torch.float8_e4m3fn})
    assert fp8.model.diffusion_model.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32), torch.tensor([400.0])
    with torch.no_grad():
        a = fp32.model.diffusion_model(x, t, ctx)
        b = fp8.model.diffusion_model(x, t, ctx)
    # e4m3 keeps 3 mantissa bits (~6% per weight): the outputs agree to within that order, not bit-wise
    assert torch.isfinite(b).all() and (a - b).norm() / a.norm() < 0.15
