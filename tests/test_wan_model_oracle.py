"""Numerical oracle: our Wan 2.1 DiT (checkpoint layout) vs diffusers' WanTransformer3DModel on the same
random weights, converted with diffusers' own `convert_wan_transformer_to_diffusers`; t2v and i2v."""

from __future__ import annotations

import pytest
import torch

# tiny but real: dim 256 = 2 heads of Wan's 128-wide heads (detection derives heads as dim // 128)
TINY = dict(dim=256, ffn_dim=512, num_layers=2, text_dim=32, freq_dim=256, in_dim_img=48)


def random_wan_state_dict(model_type: str = "t2v", dim: int = 256, ffn_dim: int = 512, num_layers: int = 2,
                          text_dim: int = 32, freq_dim: int = 256, in_dim: int | None = None, out_dim: int = 16,
                          in_dim_img: int = 48, flf_tokens: int | None = None, seed: int = 0) -> dict:
    """A Wan 2.1 state dict in the released checkpoint's key layout with seeded random weights.

    Weights are scaled like a trained network (fan-in) so activations stay O(1) through the blocks and
    a comparison tests real signal, not overflow or zeros.
    """
    from comfy.ldm.wan.model import WanModel

    in_dim = in_dim if in_dim is not None else (16 if model_type == "t2v" else 36)
    with torch.device("meta"):
        m = WanModel(model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, text_dim=text_dim,
                     freq_dim=freq_dim, in_dim=in_dim, out_dim=out_dim, num_heads=dim // 128,
                     in_dim_img=in_dim_img, flf_pos_embed_token_number=flf_tokens)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in m.state_dict().items():
        shape = p.shape
        if "modulation" in k:
            t = torch.randn(shape, generator=g) / dim ** 0.5
        elif k.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif p.ndim == 1:   # norm weights
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("emb_pos"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = p[0].numel()
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        sd[k] = t.contiguous()
    return sd


def diffusers_model(sd: dict, model_type: str, cfg: dict):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    heads = cfg["dim"] // 128
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=cfg["in_dim"],
        out_channels=16, text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=cfg["in_dim_img"] if model_type == "i2v" else None,
        # k_img / v_img read the projected, dim-wide image tokens (diffusers' released i2v configs: = dim)
        added_kv_proj_dim=cfg["dim"] if model_type == "i2v" else None).eval()
    dsd = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in sd.items()})
    res = m.load_state_dict(dsd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return m


def test_checkpoint_key_layout():
    sd = random_wan_state_dict("i2v", num_layers=1)
    expected = {
        "patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight", "text_embedding.2.weight",
        "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight", "head.head.weight",
        "head.modulation", "img_emb.proj.0.weight", "img_emb.proj.1.weight", "img_emb.proj.3.weight",
        "img_emb.proj.4.weight", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.weight", "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.v_img.weight",
        "blocks.0.cross_attn.norm_k_img.weight",
    } | {f"blocks.0.{a}.{p}.weight" for a in ("self_attn", "cross_attn") for p in "qkvo"} \
      | {f"blocks.0.{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"}
    assert expected <= set(sd), sorted(expected - set(sd))
    assert sd["patch_embedding.weight"].shape == (256, 36, 1, 2, 2)
    assert sd["head.modulation"].shape == (1, 2, 256) and sd["blocks.0.modulation"].shape == (1, 6, 256)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_wan_matches_diffusers(model_type):
    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel

    sd = random_wan_state_dict(model_type, seed=5, **TINY)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg["image_model"] == "wan2.1" and cfg["model_type"] == model_type
    assert cfg["in_dim"] == (16 if model_type == "t2v" else 36) and cfg["num_layers"] == TINY["num_layers"]
    assert cfg["dim"] == TINY["dim"] and cfg["num_heads"] == 2 and cfg["ffn_dim"] == TINY["ffn_dim"]
    ours = WanModel(**cfg).eval()
    ours.load_state_dict(sd, strict=True)
    theirs = diffusers_model(sd, model_type, cfg)

    g = torch.Generator().manual_seed(0)
    b, t, h, w = 2, 3, 6, 8
    x = torch.randn(b, cfg["in_dim"], t, h, w, generator=g)
    # diffusers' i2v processor assumes exactly 512 text tokens after the image tokens; use that for both
    txt_len = 512 if model_type == "i2v" else 9
    ctx = torch.randn(b, txt_len, TINY["text_dim"], generator=g)
    clip = torch.randn(b, 5, TINY["in_dim_img"], generator=g) if model_type == "i2v" else None
    ts = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        ours_out = ours(x, ts, ctx, clip_fea=clip)
        d_out = theirs(hidden_states=x, timestep=ts, encoder_hidden_states=ctx,
                       encoder_hidden_states_image=clip, return_dict=False)[0]
    assert ours_out.shape == (b, 16, t, h, w)
    assert d_out.abs().mean() > 0.05   # a meaningful signal, not two zero tensors agreeing
    # fp32 on both sides; differences are summation order only
    torch.testing.assert_close(ours_out, d_out, rtol=1e-4, atol=1e-4)
    if model_type == "i2v":
        # the image tokens matter: other CLIP features change the output
        with torch.no_grad():
            other = ours(x, ts, ctx, clip_fea=torch.randn(clip.shape, generator=g))
        assert (other - ours_out).abs().max() > 1e-3


def test_odd_latent_size_is_padded_and_cropped():
    import comfy.model_detection
    from comfy.ldm.wan.model import WanModel

    sd = random_wan_state_dict("t2v", seed=1, **{k: v for k, v in TINY.items() if k != "in_dim_img"})
    m = WanModel(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    m.load_state_dict(sd)
    x = torch.randn(1, 16, 2, 5, 7)
    with torch.no_grad():
        out = m(x, torch.tensor([500.0]), torch.randn(1, 4, TINY["text_dim"]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_context_keys_and_values_are_the_self_attentions_side_work(model_type, monkeypatch):
    """Each block projects the context's keys and values once, as side work of its self-attention (run while
    sequence-parallel exchanges are in flight), and the cross-attention uses them: the output is bit-identical
    to computing them inside the cross-attention."""
    import comfy.model_detection
    from comfy.ldm.wan.model import WanAttentionBlock, WanModel

    sd = random_wan_state_dict(model_type, seed=3, **TINY)
    m = WanModel(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    m.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16 if model_type == "t2v" else 36, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 7, TINY["text_dim"], generator=g)
    clip = torch.randn(1, 5, TINY["in_dim_img"], generator=g) if model_type == "i2v" else None
    names = ["k", "v"] + (["k_img", "v_img"] if model_type == "i2v" else [])
    calls = []
    for i, block in enumerate(m.blocks):
        for name in names:
            getattr(block.cross_attn, name).register_forward_hook(lambda *a, tag=(i, name): calls.append(tag))
    with torch.no_grad():
        out = m(x, torch.tensor([500.0]), ctx, clip_fea=clip)
    assert sorted(calls) == sorted((i, n) for i in range(len(m.blocks)) for n in names)  # once each
    # without the side work (context_kv doing nothing) the cross-attention computes them itself
    monkeypatch.setattr(type(m.blocks[0].cross_attn), "context_kv", lambda self, c, n, kv: None)
    assert isinstance(m.blocks[0], WanAttentionBlock)
    with torch.no_grad():
        again = m(x, torch.tensor([500.0]), ctx, clip_fea=clip)
    assert torch.equal(out, again)
