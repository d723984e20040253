"""Flux ControlNets against diffusers: InstantX / Union files (diffusers FluxControlNetModel layout) and XLabs
files (BFL layout, converted for diffusers with diffusers' own converter) give diffusers' block samples;
our Flux with a `control` argument equals diffusers' FluxTransformer2DModel fed the same samples; and the
sampler path (ControlNetLoader -> ControlNetApplyAdvanced -> calc_cond_batch) feeds the residuals, honours
strength and the step range, and refuses what it cannot load."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import comfy.controlnet
import comfy.model_detection
import comfy.sd
from comfy.ldm.flux.controlnet import ControlNetFlux, convert_flux_controlnet_state_dict
from tests.fixtures.demo_models import demo_script
from tests.test_flux_oracle import to_diffusers

H, HEADS, CTX, VEC = 32, 2, 8, 4
HEAD_DIM = H // HEADS


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # diffusers zero-initialises the controlnet output layers; random values make every path visible
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))


def _axes():
    return tuple(comfy.model_detection.flux_axes_dim(HEAD_DIM))


def _diffusers_cn(depth, single, num_mode=None, hint_channels=None, seed=0):
    from diffusers import FluxControlNetModel

    # patch_size only shapes diffusers' packing of the encoded pixel hint: 2 for XLabs (2x2 patches)
    m = FluxControlNetModel(patch_size=2 if hint_channels else 1, in_channels=64, num_layers=depth, num_single_layers=single,
                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
                            pooled_projection_dim=VEC, guidance_embeds=True, axes_dims_rope=_axes(),
                            num_mode=num_mode, conditioning_embedding_channels=hint_channels).eval()
    if hint_channels is not None:
        # XLabs' hint encoder is 16 channels throughout (diffusers' default widths differ)
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
        m.input_hint_block = ControlNetConditioningEmbedding(16, block_out_channels=(16, 16, 16, 16))
    _randomize(m, seed)
    return m


def _pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _ids(h, w):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _inputs(seed=0, b=2, h=4, w=6, t_len=3):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 16, h, w, generator=g), ctx=torch.randn(b, t_len, CTX, generator=g),
                y=torch.randn(b, VEC, generator=g), t=torch.tensor([0.7, 0.3]), gd=torch.tensor([3.5, 2.0]))


@pytest.mark.parametrize("union", [False, True])
def test_instantx_diffusers_layout_matches_diffusers(union):
    ref = _diffusers_cn(2, 2, num_mode=3 if union else None, seed=1)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    bfl, cfg = convert_flux_controlnet_state_dict(sd)
    ours = ControlNetFlux(**cfg).eval()
    ours.load_state_dict(bfl, strict=True)
    i = _inputs()
    hint = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(7))
    mode = torch.tensor([[2], [2]]) if union else None
    with torch.no_grad():
        d_double, d_single = ref(hidden_states=_pack(i["x"]), controlnet_cond=_pack(hint), controlnet_mode=mode,
                                 encoder_hidden_states=i["ctx"], pooled_projections=i["y"], timestep=i["t"],
                                 img_ids=_ids(4, 6), txt_ids=torch.zeros(3, 3), guidance=i["gd"],
                                 return_dict=False)
        out = ours(i["x"], hint, i["t"], i["ctx"], y=i["y"], guidance=i["gd"], control_type=[2] if union else None)
    assert len(out["input"]) == 2 and len(out["output"]) == 2
    for a, b in zip(out["input"] + out["output"], list(d_double) + list(d_single)):
        assert b.abs().mean() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _xlabs_file(seed=2):
    """An XLabs ControlNet in its own (BFL) layout: 2 double blocks, pixel hint encoder, pos_embed_input."""
    sd = demo_script().random_flux_state_dict(hidden_size=H, num_heads=HEADS, depth=2, depth_single_blocks=0,
                                               context_in_dim=CTX, vec_in_dim=VEC, seed=seed)
    del sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    del sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    g = torch.Generator().manual_seed(seed + 1)
    for j in range(8):
        c_in = 3 if j == 0 else 16
        sd[f"input_hint_block.{2 * j}.weight"] = torch.randn(16, c_in, 3, 3, generator=g) / math.sqrt(9 * c_in)
        sd[f"input_hint_block.{2 * j}.bias"] = 0.05 * torch.randn(16, generator=g)
    sd["pos_embed_input.weight"] = torch.randn(H, 64, generator=g) / 8
    sd["pos_embed_input.bias"] = 0.05 * torch.randn(H, generator=g)
    for i in range(2):
        sd[f"controlnet_blocks.{i}.weight"] = torch.randn(H, H, generator=g) / math.sqrt(H)
        sd[f"controlnet_blocks.{i}.bias"] = 0.05 * torch.randn(H, generator=g)
    return sd


def _xlabs_to_diffusers(sd):
    """Blocks and embedders through diffusers' own Flux converter; the hint encoder by its layer order."""
    src = {k: v for k, v in sd.items() if not k.startswith(("input_hint_block", "pos_embed_input", "controlnet_"))}
    src["final_layer.linear.weight"] = torch.zeros(64, H)
    src["final_layer.linear.bias"] = torch.zeros(64)
    src["final_layer.adaLN_modulation.1.weight"] = torch.zeros(2 * H, H)
    src["final_layer.adaLN_modulation.1.bias"] = torch.zeros(2 * H)
    # the converter needs at least one single block: a dummy one, dropped again below
    dummy = demo_script().random_flux_state_dict(hidden_size=H, num_heads=HEADS, depth=1, depth_single_blocks=1,
                                                  context_in_dim=CTX, vec_in_dim=VEC)
    src.update({k: v for k, v in dummy.items() if k.startswith("single_blocks.")})
    out = {k: v for k, v in to_diffusers(src, H, True).items()
           if not k.startswith(("proj_out", "norm_out", "single_transformer_blocks"))}
    names = ["conv_in"] + [f"blocks.{j}" for j in range(6)] + ["conv_out"]
    for j, n in enumerate(names):
        for s in ("weight", "bias"):
            out[f"input_hint_block.{n}.{s}"] = sd[f"input_hint_block.{2 * j}.{s}"]
    out["controlnet_x_embedder.weight"] = sd["pos_embed_input.weight"]
    out["controlnet_x_embedder.bias"] = sd["pos_embed_input.bias"]
    for k, v in sd.items():
        if k.startswith("controlnet_blocks."):
            out[k] = v
    return out


def test_xlabs_matches_diffusers_with_hint_encoder():
    sd = _xlabs_file()
    ref = _diffusers_cn(2, 0, hint_channels=16)
    res = ref.load_state_dict(_xlabs_to_diffusers(sd), strict=True)
    assert not res.missing_keys
    cn = comfy.controlnet.load_controlnet_state_dict(sd, name="xlabs-canny.safetensors")
    assert cn.repeat_mode == "cycle" and not cn.latent_input
    i = _inputs()
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    hint = image * 2 - 1  # XLabs hints are [-1, 1]
    with torch.no_grad():
        d_double, _ = ref(hidden_states=_pack(i["x"]), controlnet_cond=hint, encoder_hidden_states=i["ctx"],
                          pooled_projections=i["y"], timestep=i["t"], img_ids=_ids(4, 6),
                          txt_ids=torch.zeros(3, 3), guidance=i["gd"], return_dict=False)
        out = cn.control_model(i["x"], hint, i["t"], i["ctx"], y=i["y"], guidance=i["gd"])
    for a, b in zip(out["input"], d_double):
        assert b.abs().mean() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _main_model(seed=4):
    sd = demo_script().random_flux_state_dict(hidden_size=H, num_heads=HEADS, depth=4, depth_single_blocks=2,
                                               context_in_dim=CTX, vec_in_dim=VEC, seed=seed)
    return sd


@pytest.mark.parametrize("repeat", ["interval", "cycle"])
def test_residual_injection_matches_diffusers_transformer(repeat):
    from diffusers import FluxTransformer2DModel

    sd = _main_model()
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    dm = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=2,
                                attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
                                pooled_projection_dim=VEC, guidance_embeds=True, axes_dims_rope=_axes()).eval()
    dm.load_state_dict(to_diffusers(sd, H, True), strict=True)
    i = _inputs()
    g = torch.Generator().manual_seed(9)
    double = [0.3 * torch.randn(2, 6, H, generator=g) for _ in range(2)]
    single = [0.3 * torch.randn(2, 6, H, generator=g)]
    control = {"input": comfy.controlnet._expand(double, 4, repeat),
               "output": comfy.controlnet._expand(single, 2, repeat) if repeat == "interval" else []}
    net = patcher.model.diffusion_model
    with torch.no_grad():
        ours = net(i["x"], i["t"], i["ctx"], y=i["y"], guidance=i["gd"], control=control)
        plain = net(i["x"], i["t"], i["ctx"], y=i["y"], guidance=i["gd"])
        theirs = dm(hidden_states=_pack(i["x"]), encoder_hidden_states=i["ctx"], pooled_projections=i["y"],
                    timestep=i["t"], img_ids=_ids(4, 6), txt_ids=torch.zeros(3, 3), guidance=i["gd"],
                    controlnet_block_samples=double,
                    controlnet_single_block_samples=single if repeat == "interval" else None,
                    controlnet_blocks_repeat=repeat == "cycle", return_dict=False)[0]
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(_pack(ours), theirs, rtol=1e-4, atol=1e-4)


class _FakeVAE:
    """Stands in for the VAE: 'encodes' by average-pooling 8x8 and tiling to 16 channels (deterministic)."""

    def encode(self, image):
        x = image.movedim(-1, 1)
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([x] * 6, dim=1)[:, :16]


def test_sampler_path_feeds_residuals_with_strength_and_range(base_dir):
    import comfy.latent_formats
    import comfy.samplers
    import nodes

    patcher = comfy.sd.load_diffusion_model_state_dict(_main_model())
    ref = _diffusers_cn(2, 1, seed=5)
    path = base_dir / "models" / "controlnet" / "instantx-union.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    (cn,) = nodes.NODE_CLASS_MAPPINGS["ControlNetLoader"]().load_controlnet("instantx-union.safetensors")
    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 32, 48, 3, generator=g)
    ctx, y = torch.randn(1, 3, CTX, generator=g), torch.randn(1, VEC, generator=g)
    pos = [[ctx, {"pooled_output": y}]]
    neg = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(y)}]]
    apply = nodes.NODE_CLASS_MAPPINGS["ControlNetApplyAdvanced"]()
    with pytest.raises(ValueError, match="needs a VAE"):
        p, n = apply.apply_controlnet(pos, neg, cn, image, 0.8, 0.0, 1.0)
        _calc(patcher, p, n, 0.5)
    vae = _FakeVAE()
    p, n = apply.apply_controlnet(pos, neg, cn, image, 0.8, 0.0, 1.0, vae=vae)
    assert p[0][1]["control"] is n[0][1]["control"]  # shared, so cond and uncond batch together
    assert apply.apply_controlnet(pos, neg, cn, image, 0.0, 0.0, 1.0) == (pos, neg)  # strength 0: unchanged

    x = torch.randn(1, 16, 4, 6, generator=g)
    sigma = torch.tensor([0.5])
    got = _calc(patcher, p, n, sigma, x)
    # by hand: the controlnet on the VAE-encoded hint, residuals x strength, fed to apply_model
    model = patcher.model
    hint = comfy.latent_formats.Flux().process_in(vae.encode(image))
    hint = hint.expand(2, -1, -1, -1)
    conds = {"c_crossattn": torch.cat([ctx, torch.zeros_like(ctx)]), "y": torch.cat([y, torch.zeros_like(y)]),
             "guidance": torch.tensor([3.5, 3.5])}
    with torch.no_grad():
        raw = cn.control_model(torch.cat([x, x]), hint, sigma.expand(2), conds["c_crossattn"], y=conds["y"],
                               guidance=conds["guidance"])
        control = {"input": [r * 0.8 for r in comfy.controlnet._expand(raw["input"], 4, "interval")],
                   "output": [r * 0.8 for r in comfy.controlnet._expand(raw["output"], 2, "interval")]}
        want = model.apply_model(torch.cat([x, x]), sigma.expand(2), control=control, **conds)
        plain = model.apply_model(torch.cat([x, x]), sigma.expand(2), **conds)
    torch.testing.assert_close(got[0], want[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1:], rtol=1e-5, atol=1e-5)
    assert (got[0] - plain[:1]).abs().max() > 1e-3

    # end_percent 0.3: the controlnet stops once sigma falls below percent_to_sigma(0.3)
    p2, n2 = apply.apply_controlnet(pos, neg, cn, image, 0.8, 0.0, 0.3, vae=vae)
    late = _calc(patcher, p2, n2, torch.tensor([0.2]), x)
    none = _calc(patcher, pos, neg, torch.tensor([0.2]), x)
    torch.testing.assert_close(late[0], none[0])


def _calc(patcher, pos, neg, sigma, x=None):
    import comfy.samplers

    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor([sigma])
    x = x if x is not None else torch.zeros(1, 16, 4, 6)
    model = patcher.model
    conds = comfy.samplers.process_conds(model, torch.zeros_like(x), {"positive": comfy.samplers.convert_cond(pos),
                                                                      "negative": comfy.samplers.convert_cond(neg)},
                                         "cpu")
    with torch.no_grad():
        return comfy.samplers.calc_cond_batch(model, [conds["positive"], conds["negative"]], x, sigma, {})


def test_loader_refuses_unknown_files(base_dir):
    sd = {"input_blocks.1.0.weight": torch.zeros(1), "zero_convs.0.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"'sd15_canny\.pth'.*SD1\.x / SDXL"):
        comfy.controlnet.load_controlnet_state_dict(sd, name="sd15_canny.pth")
