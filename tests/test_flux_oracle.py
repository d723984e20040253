"""Numerical oracle: our Flux (BFL layout) vs diffusers' FluxTransformer2DModel on the same random weights."""

from __future__ import annotations

import os

import pytest
import torch

from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CFG = dict(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=24, vec_in_dim=12)


def to_diffusers(sd: dict, hidden: int, guidance: bool):
    """Convert with diffusers' own single-file converter.

    The converter hard-codes Flux-size inner_dim=3072 when it splits single_blocks.N.linear1 into
    to_q/to_k/to_v/proj_mlp, so it is given a dummy linear1 of the full-size row count and that one
    split is redone here at the tiny size; every other key goes through diffusers' mapping unchanged.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    src = {k: v.clone() for k, v in sd.items()}
    real_linear1 = {k: src[k] for k in src if ".linear1." in k}
    for k in real_linear1:
        src[k] = torch.zeros(3072 * 3 + 3072 * 4, *src[k].shape[1:])
    out = convert_flux_transformer_checkpoint_to_diffusers(src)
    for k, t in real_linear1.items():
        i = int(k.split(".")[1])
        kind = k.rsplit(".", 1)[1]
        q, kk, v, mlp = torch.split(t, [hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)
        base = f"single_transformer_blocks.{i}"
        out[f"{base}.attn.to_q.{kind}"] = q
        out[f"{base}.attn.to_k.{kind}"] = kk
        out[f"{base}.attn.to_v.{kind}"] = v
        out[f"{base}.proj_mlp.{kind}"] = mlp
    return out


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_matches_diffusers(variant):
    from diffusers import FluxTransformer2DModel

    import comfy.model_detection
    from comfy.ldm.flux.model import Flux

    guidance = variant == "dev"
    sd = demo_script().random_flux_state_dict(**CFG, guidance_embed=guidance, seed=3)

    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg["image_model"] == "flux" and cfg["guidance_embed"] is guidance
    ours = Flux(**cfg).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=True), None
    del missing, unexpected
    head_dim = CFG["hidden_size"] // CFG["num_heads"]

    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=CFG["depth"], num_single_layers=CFG["depth_single_blocks"],
        attention_head_dim=head_dim, num_attention_heads=CFG["num_heads"],
        joint_attention_dim=CFG["context_in_dim"], pooled_projection_dim=CFG["vec_in_dim"],
        guidance_embeds=guidance, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
    dsd = to_diffusers(sd, CFG["hidden_size"], guidance)
    res = theirs.load_state_dict(dsd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys

    g = torch.Generator().manual_seed(0)
    b, h, w, t_len = 2, 8, 12, 7
    x = torch.randn(b, 16, h, w, generator=g)
    ctx = torch.randn(b, t_len, CFG["context_in_dim"], generator=g)
    y = torch.randn(b, CFG["vec_in_dim"], generator=g)
    t = torch.tensor([0.7, 0.25])
    gd = torch.tensor([3.5, 2.0]) if guidance else None

    with torch.no_grad():
        ours_out = ours(x, t, ctx, y=y, guidance=gd)
        # diffusers works on packed tokens; pack/unpack the way its pipeline does
        packed = x.view(b, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 64)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] = torch.arange(h // 2)[:, None]
        img_ids[..., 2] = torch.arange(w // 2)[None, :]
        d_out = theirs(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                       img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(t_len, 3), guidance=gd,
                       return_dict=False)[0]
        d_out = d_out.view(b, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, h, w)

    assert ours_out.shape == x.shape
    assert d_out.abs().mean() > 0.05  # a meaningful signal, not two zero tensors agreeing
    # fp32 on both sides; differences are summation order only
    torch.testing.assert_close(ours_out, d_out, rtol=1e-4, atol=1e-4)


def test_odd_latent_size_is_padded_and_cropped():
    import comfy.model_detection
    from comfy.ldm.flux.model import Flux
    sd = demo_script().random_flux_state_dict(**CFG, guidance_embed=False, seed=1)
    m = Flux(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    m.load_state_dict(sd)
    x = torch.randn(1, 16, 5, 7)
    with torch.no_grad():
        out = m(x, torch.tensor([0.5]), torch.randn(1, 3, CFG["context_in_dim"]), y=torch.randn(1, 12))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_kontext_reference_tokens_match_diffusers():
    """Kontext: reference latents become extra image tokens with RoPE index 1 (diffusers' Kontext layout)."""
    from diffusers import FluxTransformer2DModel

    import comfy.model_detection
    from comfy.ldm.flux.model import Flux

    sd = demo_script().random_flux_state_dict(**CFG, guidance_embed=True, seed=8)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    ours = Flux(**cfg).eval()
    ours.load_state_dict(sd)
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=CFG["depth"], num_single_layers=CFG["depth_single_blocks"],
        attention_head_dim=CFG["hidden_size"] // CFG["num_heads"], num_attention_heads=CFG["num_heads"],
        joint_attention_dim=CFG["context_in_dim"], pooled_projection_dim=CFG["vec_in_dim"],
        guidance_embeds=True, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
    theirs.load_state_dict(to_diffusers(sd, CFG["hidden_size"], True), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ref = torch.randn(1, 16, 6, 10, generator=g)
    ctx = torch.randn(1, 5, CFG["context_in_dim"], generator=g)
    y = torch.randn(1, CFG["vec_in_dim"], generator=g)
    t, gd = torch.tensor([0.4]), torch.tensor([2.5])

    def pack(z):
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    def ids(h, w, index):
        i = torch.zeros(h, w, 3)
        i[..., 0] = index
        i[..., 1] = torch.arange(h)[:, None]
        i[..., 2] = torch.arange(w)[None, :]
        return i.reshape(-1, 3)

    with torch.no_grad():
        ours_out = ours(x, t, ctx, y=y, guidance=gd, ref_latents=[ref])
        plain = ours(x, t, ctx, y=y, guidance=gd)
        d = theirs(hidden_states=torch.cat([pack(x), pack(ref)], dim=1), encoder_hidden_states=ctx,
                   pooled_projections=y, timestep=t, img_ids=torch.cat([ids(4, 4, 0), ids(3, 5, 1)]),
                   txt_ids=torch.zeros(5, 3), guidance=gd, return_dict=False)[0][:, :16]
        d = d.view(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)
    assert ours_out.shape == x.shape
    assert not torch.allclose(ours_out, plain, atol=1e-3)  # the reference really conditions the output
    torch.testing.assert_close(ours_out, d, rtol=1e-4, atol=1e-4)


def test_double_blocks_write_k_and_v_before_q_where_the_override_asks():
    """With a kv-ready hook in transformer_options (the gathered ring installs one), each double block writes k
    and v of both streams into the supplied packed buffer, calls the hook (q not written yet: the buffer still
    holds its NaN fill there), then writes q. The result is the plain forward's (the GEMM split by weight rows
    changes the summation order only)."""
    import comfy.model_detection
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.attention import KV_READY_KEY, QKV_BUFFER_KEY

    sd = demo_script().random_flux_state_dict(**CFG, guidance_embed=True, seed=5)
    m = Flux(**comfy.model_detection.detect_unet_config(sd, "")).eval()
    m.load_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 5, CFG["context_in_dim"], generator=g)
    y, t, gd = torch.randn(1, CFG["vec_in_dim"], generator=g), torch.tensor([0.6]), torch.tensor([3.5])
    seen = []

    def ready(buf):
        seen.append((bool(torch.isfinite(buf[:, :, 1:3]).all()), bool(torch.isnan(buf[:, :, 0]).all())))

    opts = {QKV_BUFFER_KEY: lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
            KV_READY_KEY: ready}
    with torch.no_grad():
        plain = m(x, t, ctx, y=y, guidance=gd)
        early = m(x, t, ctx, y=y, guidance=gd, transformer_options=opts)
    assert seen == [(True, True)] * CFG["depth"]
    assert plain.abs().mean() > 0.05
    torch.testing.assert_close(early, plain, rtol=1e-5, atol=1e-5)
