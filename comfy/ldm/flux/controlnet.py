"""Flux ControlNets in the BFL block layout: XLabs, InstantX / Union (diffusers FluxControlNetModel) and BFL-named.

One network covers the public formats; `convert_flux_controlnet_state_dict` brings each file to its keys:

- XLabs (``input_hint_block.*``, ``pos_embed_input``, ``double_blocks.*``, ``controlnet_blocks.*``): the
  hint is an image in [-1, 1] at pixel resolution, encoded by a small conv stack (8x down) and patchified;
  its residuals repeat cyclically over the main model's double blocks (block i takes residual i % n).
- InstantX / Union (diffusers ``FluxControlNetModel`` keys: ``transformer_blocks.*``,
  ``single_transformer_blocks.*``, ``controlnet_x_embedder``, ``controlnet_single_blocks.*``, Union also
  ``controlnet_mode_embedder``): the hint is a VAE latent (process_in applied), patchified like the image;
  residual k serves ceil(depth / n) consecutive main blocks (block i takes residual i // interval).
  Union prepends a mode token to the text tokens.
- BFL-named InstantX-style files (``double_blocks.*`` + ``controlnet_x_embedder``): loaded directly.

`forward` returns ``{"input": [per double-block residual], "output": [per single-block residual]}`` for
the image tokens, raw (one per controlnet block); `comfy.controlnet` lays them over the main model's blocks.
The stages reuse `comfy.ldm.flux.model.Flux` (embed, blocks), so attention goes through the same entry point.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.ops
from comfy.ldm.common_dit import pad_to_patch_size, patchify_2d
from comfy.ldm.flux.model import Flux


class HintEncoder(nn.Sequential):
    """XLabs' pixel-hint encoder (``input_hint_block.{0,2,...,14}``): 8 convs with SiLU between them,
    stride 2 at the 3rd, 5th and 7th conv (8x down to the latent grid)."""

    def __init__(self, channels: int = 16, in_channels: int = 3, dtype=None, device=None, operations=None):
        layers = []
        for i in range(8):
            stride = 2 if i in (2, 4, 6) else 1
            layers.append(operations.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1,
                                            stride=stride, dtype=dtype, device=device))
            if i < 7:
                layers.append(nn.SiLU())
        super().__init__(*layers)


class ControlNetFlux(Flux):
    """Flux embedding + blocks, a hint embedding added to the image tokens, one zero-init linear per block."""

    def __init__(self, hint_mode: str = "latent", num_union_modes: int = 0, repeat_mode: str = "interval",
                 dtype=None, device=None, operations=None, **kwargs):
        operations = operations or comfy.ops.disable_weight_init
        super().__init__(final_layer=False, dtype=dtype, device=device, operations=operations, **kwargs)
        if hint_mode not in ("pixel", "latent"):
            raise ValueError(f"hint_mode must be 'pixel' (XLabs) or 'latent' (InstantX), not {hint_mode!r}")
        self.hint_mode = hint_mode
        self.repeat_mode = repeat_mode
        kw = dict(dtype=dtype, device=device)
        if hint_mode == "pixel":
            self.input_hint_block = HintEncoder(16, operations=operations, **kw)
        self.controlnet_x_embedder = operations.Linear(self.in_channels, self.hidden_size, **kw)
        self.controlnet_mode_embedder = (nn.Embedding(num_union_modes, self.hidden_size, **kw)
                                         if num_union_modes else None)
        self.controlnet_blocks = nn.ModuleList(operations.Linear(self.hidden_size, self.hidden_size, **kw)
                                               for _ in range(len(self.double_blocks)))
        self.controlnet_single_blocks = nn.ModuleList(operations.Linear(self.hidden_size, self.hidden_size, **kw)
                                                      for _ in range(len(self.single_blocks)))

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint -> tokens [B, L_img, hidden]. Pixel hints are [-1, 1] images at 8x the latent size."""
        ps = self.patch_size
        if self.hint_mode == "pixel":
            hint = self.input_hint_block(hint)
        hint = pad_to_patch_size(hint, (ps, ps))
        return self.controlnet_x_embedder(patchify_2d(hint, ps, ps))

    def forward(self, x, hint, timesteps, context, y=None, guidance=None, control_type=None,
                transformer_options=None, **kwargs):
        transformer_options = dict(transformer_options or {})
        bs = x.shape[0]
        img, img_ids = self.process_img(x)
        txt_len = context.shape[1]
        union = self.controlnet_mode_embedder is not None
        txt_ids = torch.zeros((bs, txt_len + (1 if union else 0), 3), device=x.device, dtype=torch.float32)
        if not self.params.guidance_embed:
            guidance = None
        # txt_ids has one more (zero) id for Union's mode token, so pe already covers it
        img, txt, vec, pe = self.embed(img, img_ids, context, txt_ids, timesteps, y, guidance)
        if union:
            # the mode token goes in front of the text tokens
            mode = torch.as_tensor(control_type if control_type is not None else [0], device=x.device).reshape(-1)
            mode_emb = self.controlnet_mode_embedder(mode.long()).to(txt.dtype)
            txt = torch.cat((mode_emb[:, None].expand(bs, -1, -1), txt), dim=1)
        img = img + self.embed_hint(hint.to(img.dtype))

        double_out = []
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            img, txt = block(img, txt, vec, pe, transformer_options=transformer_options)
            double_out.append(self.controlnet_blocks[i](img))
        single_out = []
        if len(self.single_blocks):
            n_txt = txt.shape[1]
            h = torch.cat((txt, img), dim=1)
            for i, block in enumerate(self.single_blocks):
                transformer_options["block_index"] = i
                h = block(h, vec, pe, transformer_options=transformer_options)
                single_out.append(self.controlnet_single_blocks[i](h[:, n_txt:]))
        return {"input": double_out, "output": single_out}


# ---------------------------------------------------------------------------------------------------
# Formats


def _cat_slices(sd: dict, parts: list[str], suffix: str):
    tensors = [sd.get(f"{p}.{suffix}") for p in parts]
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=0)


def _diffusers_to_bfl(sd: dict) -> dict:
    """diffusers FluxControlNetModel keys -> BFL keys (fused qkv / linear1 rebuilt from their slices)."""
    from comfy.lora import flux_diffusers_key_map

    depth = _count(sd, "transformer_blocks.{}.")
    single = _count(sd, "single_transformer_blocks.{}.")
    hidden = sd["x_embedder.weight"].shape[0]
    mlp = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] if depth else 4 * hidden
    out: dict = {}
    by_target: dict[str, list] = {}
    for dname, (bname, offset, _fn) in flux_diffusers_key_map(depth, single, hidden, mlp, final_layer=False).items():
        by_target.setdefault(bname, []).append((offset[1] if offset else 0, dname))
    for bname, parts in by_target.items():
        names = [d for _, d in sorted(parts)]
        for suffix in ("weight", "bias"):
            t = _cat_slices(sd, names, suffix)
            if t is not None:
                out[f"{bname}.{suffix}"] = t
    norms = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
             "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
    for i in range(depth):
        for d, b in norms.items():
            out[f"double_blocks.{i}.{b}.scale"] = sd[f"transformer_blocks.{i}.attn.{d}.weight"]
    for i in range(single):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    # diffusers' ControlNetConditioningEmbedding (conv_in, blocks.0-5, conv_out) = XLabs' input_hint_block
    hint = ["conv_in"] + [f"blocks.{j}" for j in range(6)] + ["conv_out"]
    for j, name in enumerate(hint):
        for suffix in ("weight", "bias"):
            k = f"input_hint_block.{name}.{suffix}"
            if k in sd:
                out[f"input_hint_block.{2 * j}.{suffix}"] = sd[k]
    for k, v in sd.items():
        if k.startswith(("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.",
                         "controlnet_mode_embedder.")):
            out[k] = v
    return out


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n)) for k in sd):
        n += 1
    return n


def detect_flux_controlnet(sd: dict) -> str | None:
    """'xlabs', 'diffusers' or 'bfl' when `sd` is a Flux ControlNet, else None."""
    if "controlnet_blocks.0.weight" not in sd and "controlnet_single_blocks.0.weight" not in sd:
        return None
    if "transformer_blocks.0.attn.to_q.weight" in sd or "single_transformer_blocks.0.attn.to_q.weight" in sd:
        return "diffusers" if "x_embedder.weight" in sd else None
    if "double_blocks.0.img_attn.qkv.weight" in sd or "single_blocks.0.linear1.weight" in sd:
        return "xlabs" if "input_hint_block.0.weight" in sd else "bfl"
    return None


def convert_flux_controlnet_state_dict(sd: dict) -> tuple[dict, dict]:
    """-> (BFL-layout state dict, ControlNetFlux keyword config)."""
    import comfy.model_detection

    fmt = detect_flux_controlnet(sd)
    if fmt is None:
        raise ValueError("not a Flux ControlNet (no controlnet_blocks with Flux blocks)")
    if fmt == "diffusers":
        sd = _diffusers_to_bfl(sd)
    else:
        sd = dict(sd)
        if "pos_embed_input.weight" in sd:  # XLabs' name for the hint projection
            sd["controlnet_x_embedder.weight"] = sd.pop("pos_embed_input.weight")
            sd["controlnet_x_embedder.bias"] = sd.pop("pos_embed_input.bias")
    hidden = sd["img_in.weight"].shape[0]
    qk = "double_blocks.0.img_attn.norm.key_norm.scale"
    head_dim = (sd[qk] if qk in sd else sd["single_blocks.0.norm.key_norm.scale"]).shape[0]
    mlp_key = "double_blocks.0.img_mlp.0.weight"
    mlp_ratio = sd[mlp_key].shape[0] / hidden if mlp_key in sd else \
        (sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden) / hidden
    cfg = dict(
        in_channels=sd["img_in.weight"].shape[1] // 4, out_channels=sd["img_in.weight"].shape[1] // 4,
        hidden_size=hidden, num_heads=hidden // head_dim,
        context_in_dim=sd["txt_in.weight"].shape[1], vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        mlp_ratio=mlp_ratio, depth=_count(sd, "double_blocks.{}."), depth_single_blocks=_count(sd, "single_blocks.{}."),
        axes_dim=comfy.model_detection.flux_axes_dim(head_dim), theta=10000,
        qkv_bias=any(k.endswith("attn.qkv.bias") for k in sd) or "single_blocks.0.linear1.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
        hint_mode="pixel" if "input_hint_block.0.weight" in sd else "latent",
        num_union_modes=sd["controlnet_mode_embedder.weight"].shape[0] if "controlnet_mode_embedder.weight" in sd else 0,
        repeat_mode="cycle" if fmt == "xlabs" else "interval",
    )
    return sd, cfg


def load_flux_controlnet(sd: dict, dtype: torch.dtype | None = None, operations=None) -> ControlNetFlux:
    bfl, cfg = convert_flux_controlnet_state_dict(sd)
    dtype = dtype or next(iter(bfl.values())).dtype
    model = ControlNetFlux(dtype=dtype, device=torch.device("meta"), operations=operations, **cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in bfl]
    if missing:
        raise ValueError(f"Flux ControlNet: {len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
    model.load_state_dict({k: bfl[k].to(dtype) for k in own}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
