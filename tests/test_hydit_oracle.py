"""Numerical oracle: our HunyuanDiT (Tencent's checkpoint layout) vs diffusers' HunyuanDiT2DModel on the
same random weights, v1.1/v1.2 (no style/size conditions) and v1.0; detection from the state dict.

diffusers has no single-file converter for HunyuanDiT, so `to_diffusers` below is the key mapping
(ours -> diffusers), written from the two layouts:

    x_embedder.proj                  -> pos_embed.proj
    t_embedder.mlp.{0,2}             -> time_extra_emb.timestep_embedder.linear_{1,2}
    pooler.*                         -> time_extra_emb.pooler.*
    extra_embedder.{0,2}             -> time_extra_emb.extra_embedder.linear_{1,2}
    style_embedder (v1.0)            -> time_extra_emb.style_embedder
    mlp_t5.{0,2}                     -> text_embedder.linear_{1,2}
    text_embedding_padding           -> text_embedding_padding
    blocks.N.norm1                   -> blocks.N.norm1.norm
    blocks.N.default_modulation.1    -> blocks.N.norm1.linear
    blocks.N.attn1.Wqkv              -> blocks.N.attn1.to_{q,k,v}      (split in 3 on dim 0)
    blocks.N.attn{1,2}.{q,k}_norm    -> blocks.N.attn{1,2}.norm_{q,k}
    blocks.N.attn{1,2}.out_proj      -> blocks.N.attn{1,2}.to_out.0
    blocks.N.attn2.q_proj            -> blocks.N.attn2.to_q
    blocks.N.attn2.kv_proj           -> blocks.N.attn2.to_{k,v}        (split in 2 on dim 0)
    blocks.N.norm3 / norm2           -> blocks.N.norm2 / norm3         (diffusers numbers them in call order)
    blocks.N.mlp.fc1 / fc2           -> blocks.N.ff.net.0.proj / ff.net.2
    blocks.N.skip_norm / skip_linear -> same names
    final_layer.adaLN_modulation.1   -> norm_out.linear                (rows [shift; scale] -> [scale; shift])
    final_layer.linear               -> proj_out

The 2-D RoPE table is an input of diffusers' model (its pipeline computes it); the test checks ours against
diffusers' `get_2d_rotary_pos_embed` on square grids and feeds ours to both models. On non-square grids the
crop region starts off zero and diffusers' linspace rewrite no longer equals the original's endpoint-free
`np.linspace`; ours follows the original (start + (stop - start) * i / n), so only square grids are compared.
"""

from __future__ import annotations

import pytest
import torch

# tiny but real: 2 heads of 32, 6 blocks (blocks 4 and 5 take long skips from 1 and 0; depth is even in
# every release: an odd depth leaves a skip block without a partner)
TINY = dict(hidden_size=64, num_heads=2, depth=6, mlp_hidden=256, text_states_dim=32, text_states_dim_t5=48,
            t5_mlp_hidden=192, text_len=6, text_len_t5=8, pooled_dim=24)


def random_hydit_state_dict(v10: bool = False, seed: int = 0, **overrides) -> dict:
    """A HunyuanDiT state dict in the released checkpoint layout with seeded, fan-in scaled random weights."""
    from comfy.ldm.hydit.model import HunYuanDiT

    cfg = dict(TINY, **overrides)
    with torch.device("meta"):
        m = HunYuanDiT(**cfg, use_style_cond=v10)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in m.state_dict().items():
        if k.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:   # layer-norm weights
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif k.endswith(("text_embedding_padding", "positional_embedding", "style_embedder.weight")):
            t = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        else:
            t = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        sd[k] = t.contiguous()
    return sd


def to_diffusers(sd: dict) -> dict:
    top = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
           "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
           "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
           "style_embedder": "time_extra_emb.style_embedder", "mlp_t5.0": "text_embedder.linear_1",
           "mlp_t5.2": "text_embedder.linear_2", "final_layer.linear": "proj_out",
           "final_layer.adaLN_modulation.1": "norm_out.linear"}
    blk = {"norm1": "norm1.norm", "default_modulation.1": "norm1.linear", "norm3": "norm2", "norm2": "norm3",
           "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2", "skip_norm": "skip_norm", "skip_linear": "skip_linear",
           "attn2.q_proj": "attn2.to_q"}
    out = {}
    for k, v in sd.items():
        if k == "text_embedding_padding":
            out[k] = v
        elif k.startswith("pooler."):
            out["time_extra_emb." + k] = v
        elif k.startswith("blocks."):
            _, n, rest = k.split(".", 2)
            p = f"blocks.{n}."
            name, kind = rest.rsplit(".", 1)
            attn = name.split(".")[0]
            if name == "attn1.Wqkv":
                for part, t in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{p}attn1.to_{part}.{kind}"] = t
            elif name == "attn2.kv_proj":
                for part, t in zip("kv", v.chunk(2, dim=0)):
                    out[f"{p}attn2.to_{part}.{kind}"] = t
            elif name.endswith(("q_norm", "k_norm")):
                out[f"{p}{attn}.norm_{name[-6]}.{kind}"] = v
            elif name.endswith("out_proj"):
                out[f"{p}{attn}.to_out.0.{kind}"] = v
            else:
                out[f"{p}{blk[name]}.{kind}"] = v
        else:
            name, kind = k.rsplit(".", 1)
            if name == "final_layer.adaLN_modulation.1":
                shift, scale = v.chunk(2, dim=0)
                v = torch.cat([scale, shift], dim=0)
            out[f"{top[name]}.{kind}"] = v
    return out


def diffusers_hydit(sd: dict, v10: bool):
    from diffusers import HunyuanDiT2DModel

    c = TINY
    m = HunyuanDiT2DModel(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"], in_channels=4,
        patch_size=2, sample_size=32, hidden_size=c["hidden_size"], num_layers=c["depth"],
        mlp_ratio=c["mlp_hidden"] / c["hidden_size"], learn_sigma=True, cross_attention_dim=c["text_states_dim"],
        cross_attention_dim_t5=c["text_states_dim_t5"], pooled_projection_dim=c["pooled_dim"],
        text_len=c["text_len"], text_len_t5=c["text_len_t5"], use_style_cond_and_image_meta_size=v10).eval()
    res = m.load_state_dict(to_diffusers(sd), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return m


def _ours(sd: dict):
    from comfy.ldm.hydit.detect import detect_hydit
    from comfy.ldm.hydit.model import HunYuanDiT

    cfg = detect_hydit(sd)
    with torch.device("meta"):
        m = HunYuanDiT(**cfg)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval(), cfg


def _inputs(batch: int = 2, hw=(16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = TINY
    mask = torch.zeros(batch, c["text_len"], dtype=torch.long)
    mask[:, :3] = 1
    mask_t5 = torch.zeros(batch, c["text_len_t5"], dtype=torch.long)
    mask_t5[:, :5] = 1
    return dict(x=torch.randn(batch, 4, *hw, generator=g), t=torch.tensor([999.0, 300.0][:batch]),
                ctx=torch.randn(batch, c["text_len"], c["text_states_dim"], generator=g), mask=mask,
                ctx_t5=torch.randn(batch, c["text_len_t5"], c["text_states_dim_t5"], generator=g), mask_t5=mask_t5)


def test_detection_reads_versions_and_sizes():
    from comfy.ldm.hydit.detect import detect_hydit

    cfg = detect_hydit(random_hydit_state_dict())
    assert cfg["image_model"] == "hydit1" and not cfg["use_style_cond"]
    expect = dict(TINY)
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["learn_sigma"] and cfg["pooler_heads"] == 8
    v10 = detect_hydit(random_hydit_state_dict(v10=True))
    assert v10["image_model"] == "hydit" and v10["use_style_cond"]
    assert detect_hydit({"t_block.1.weight": torch.zeros(1)}) is None


def test_rope_matches_diffusers_on_square_grids():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    from comfy.ldm.hydit.model import resize_crop_region, rope_2d

    for grid, base in (((8, 8), 32), ((64, 64), 32), ((48, 48), 32)):
        crop = get_resize_crop_region_for_grid(grid, base)
        assert resize_crop_region(grid, base) == crop
        cos, sin = get_2d_rotary_pos_embed(88, crop, grid, use_real=True)
        ours = rope_2d(88, *grid, base)
        torch.testing.assert_close(ours[0], cos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], sin, rtol=1e-5, atol=1e-5)
    assert resize_crop_region((48, 64), 32) == get_resize_crop_region_for_grid((48, 64), 32)


@pytest.mark.parametrize("v10", [False, True])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_matches_diffusers(v10, hw):
    from comfy.ldm.hydit.model import rope_2d

    sd = random_hydit_state_dict(v10=v10, seed=5)
    ours, _ = _ours(sd)
    ref = diffusers_hydit(sd, v10)
    i = _inputs(hw=hw)
    meta = torch.tensor([[hw[0] * 8, hw[1] * 8, hw[0] * 8, hw[1] * 8, 0, 0]] * 2, dtype=torch.float32)
    style = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = ours(i["x"], i["t"], i["ctx"], text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"],
                   text_embedding_mask_t5=i["mask_t5"], image_meta_size=meta if v10 else None)
        exp = ref(i["x"], timestep=i["t"], encoder_hidden_states=i["ctx"], text_embedding_mask=i["mask"],
                  encoder_hidden_states_t5=i["ctx_t5"], text_embedding_mask_t5=i["mask_t5"],
                  image_meta_size=meta, style=style, image_rotary_emb=rope_2d(32, hw[0] // 2, hw[1] // 2, 32),
                  return_dict=False)[0]
    assert out.shape == (2, 4, *hw) and exp.shape == (2, 8, *hw)
    # fp32, same maths up to summation order: 1e-4 relative to O(1) outputs
    torch.testing.assert_close(out, exp[:, :4], rtol=1e-4, atol=1e-4)
    assert out.abs().mean() > 0.1


def test_padding_mask_and_t5_stream_change_the_output():
    """The masks select the learned padding and the mT5 tokens feed both cross-attention and the pool."""
    ours, _ = _ours(random_hydit_state_dict(seed=2))
    i = _inputs(batch=1)
    kw = dict(text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"], text_embedding_mask_t5=i["mask_t5"])
    with torch.no_grad():
        base = ours(i["x"], i["t"], i["ctx"], **kw)
        full_mask = ours(i["x"], i["t"], i["ctx"], **(kw | {"text_embedding_mask": torch.ones_like(i["mask"])}))
        other_t5 = ours(i["x"], i["t"], i["ctx"], **(kw | {"encoder_hidden_states_t5": i["ctx_t5"] * 0.5}))
        # masked positions are replaced, so their values cannot matter
        noise_in_pad = i["ctx"].clone()
        noise_in_pad[:, 3:] = 100.0
        same = ours(i["x"], i["t"], noise_in_pad, **kw)
    assert not torch.allclose(base, full_mask, atol=1e-4)
    assert not torch.allclose(base, other_t5, atol=1e-4)
    torch.testing.assert_close(same, base)


def test_attention_override_sees_self_attention_and_marked_cross_attention():
    from comfy.ldm.modules.attention import CROSS_ATTENTION_KEY

    ours, _ = _ours(random_hydit_state_dict())
    calls = []

    def spy(default, q, k, v, heads, **kw):
        calls.append((bool(kw["transformer_options"].get(CROSS_ATTENTION_KEY)), q.shape[-2], k.shape[-2]))
        return default(q, k, v, heads, mask=kw.get("mask"), skip_reshape=kw["skip_reshape"],
                       skip_output_reshape=kw["skip_output_reshape"])

    i = _inputs(batch=1)
    kw = dict(text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"], text_embedding_mask_t5=i["mask_t5"])
    with torch.no_grad():
        base = ours(i["x"], i["t"], i["ctx"], **kw)
        out = ours(i["x"], i["t"], i["ctx"], transformer_options={"optimized_attention_override": spy}, **kw)
    torch.testing.assert_close(out, base)
    text = TINY["text_len"] + TINY["text_len_t5"]
    # the mT5 pool (1 query over 9 keys), then per block self-attention (64 tokens) and cross-attention (14 keys)
    assert calls == [(True, 1, TINY["text_len_t5"] + 1)] + [(False, 64, 64), (True, 64, text)] * TINY["depth"]


def test_fp8_weights_load_through_manual_cast():
    """UNETLoader's fp8 weight_dtype: weights stored in float8, computed in float32 on the CPU."""
    import comfy.sd

    sd = random_hydit_state_dict(seed=4)
    fp32 = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()})
    fp8 = comfy.sd.load_diffusion_model_state_dict(sd, {"dtype": torch.float8_e4m3fn})
    assert fp8.model.diffusion_model.blocks[0].attn1.Wqkv.weight.dtype == torch.float8_e4m3fn
    i = _inputs(batch=1)
    kw = dict(text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"], text_embedding_mask_t5=i["mask_t5"])
    with torch.no_grad():
        a = fp32.model.diffusion_model(i["x"], i["t"], i["ctx"], **kw)
        b = fp8.model.diffusion_model(i["x"], i["t"], i["ctx"], **kw)
    # e4m3 keeps 3 mantissa bits (~6% per weight): the outputs agree to within that order, not bit-wise
    assert torch.isfinite(b).all() and (a - b).norm() / a.norm() < 0.15


def test_bf16_forward_stays_in_bf16():
    ours, _ = _ours(random_hydit_state_dict(seed=6))
    i = _inputs(batch=1)
    kw = dict(text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"], text_embedding_mask_t5=i["mask_t5"])
    with torch.no_grad():
        ref_out = ours(i["x"], i["t"], i["ctx"], **kw)
        ours = ours.to(torch.bfloat16)
        out = ours(i["x"].bfloat16(), i["t"], i["ctx"].bfloat16(), **(kw | {"encoder_hidden_states_t5":
                                                                         i["ctx_t5"].bfloat16()}))
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; through 6 blocks the output stays within a few percent of fp32
    assert (out.float() - ref_out).norm() / ref_out.norm() < 0.05
