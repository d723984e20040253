"""SD3.5 ControlNets in Stability's format (sd3.5_large_controlnet_{canny,depth,blur}.safetensors).

File keys: ``pos_embed_input.proj`` (patch embedding of the VAE-encoded hint, SD3 latent format),
``time_text_embed.{timestep,text}_embedder.linear_{1,2}``, ``transformer_blocks.N.{adaLN_modulation.1,
attn.qkv, attn.proj, mlp.fc1, mlp.fc2}`` (image-only self-attention blocks, no qk-norm, no text stream),
``controlnet_blocks.N`` and optionally ``control_type``. The network has no patch/position embedding of
its own: it starts from the main model's (``x_embedder`` + position table), as diffusers' pipeline does for
these files. Its N residuals are returned as ``{"output": [...]}``, one per controlnet block; the main
MMDiT's joint block i takes residual int(i / (depth / N)).
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.ops
from comfy.ldm.mmdit.model import DismantledBlock, Mlp2, PatchEmbed, timestep_embedding
from comfy.ldm.modules.attention import optimized_attention


class ControlNetSD35(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, depth: int, adm_in_channels: int = 2048,
                 in_channels: int = 16, patch_size: int = 2, mlp_ratio: float = 4.0, dtype=None, device=None,
                 operations=None):
        super().__init__()
        operations = operations or comfy.ops.disable_weight_init
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.t_embedder = Mlp2(256, hidden_size, **kw)
        self.y_embedder = Mlp2(adm_in_channels, hidden_size, **kw)
        self.pos_embed_input = PatchEmbed(patch_size, in_channels, hidden_size, **kw)
        self.transformer_blocks = nn.ModuleList(DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm=False, **kw)
                                                for _ in range(depth))
        self.controlnet_blocks = nn.ModuleList(operations.Linear(hidden_size, hidden_size, dtype=dtype, device=device)
                                               for _ in range(depth))

    def forward(self, x, hint, timesteps, context=None, y=None, main_model=None, transformer_options=None,
                **kwargs):
        if main_model is None or not hasattr(main_model, "x_embedder"):
            raise ValueError("The SD3.5 ControlNet works only with an SD3.5 (MMDiT) model: connect it to the "
                             "conditioning of an SD3.5 Large checkpoint")
        transformer_options = dict(transformer_options or {})
        ps = self.patch_size
        h_len, w_len = x.shape[-2] // ps, x.shape[-1] // ps
        # the main model's patch + position embedding (these files carry none of their own)
        h = main_model.x_embedder(x) + main_model.cropped_pos_embed(h_len, w_len, device=x.device, dtype=x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps, 256).to(h.dtype))
        if y is not None:
            c = c + self.y_embedder(y.to(h.dtype))
        h = h + self.pos_embed_input(hint.to(h.dtype))
        out = []
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            (q, k, v), mods, _ = block.pre_attention(h, c)
            # self-attention over the image tokens only (the sequence a parallel plan splits)
            attn = optimized_attention(q, k, v, self.num_heads, skip_reshape=True,
                                       transformer_options=transformer_options)
            h = block.post_attention(attn, h, mods)
            out.append(self.controlnet_blocks[i](h))
        return {"output": out}


_EMBED_KEYS = {"time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


def detect_sd35_controlnet(sd: dict) -> bool:
    return ("pos_embed_input.proj.weight" in sd and "controlnet_blocks.0.weight" in sd
            and "transformer_blocks.0.attn.qkv.weight" in sd)


def load_sd35_controlnet(sd: dict, dtype: torch.dtype | None = None, operations=None) -> ControlNetSD35:
    sd = dict(sd)
    sd.pop("control_type", None)
    for old, new in _EMBED_KEYS.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in sd:
                sd[f"{new}.{kind}"] = sd.pop(f"{old}.{kind}")
    hidden = sd["pos_embed_input.proj.weight"].shape[0]
    depth = 0
    while f"controlnet_blocks.{depth}.weight" in sd:
        depth += 1
    cfg = dict(hidden_size=hidden, num_heads=hidden // 64, depth=depth,
               adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1],
               in_channels=sd["pos_embed_input.proj.weight"].shape[1],
               patch_size=sd["pos_embed_input.proj.weight"].shape[-1],
               mlp_ratio=sd["transformer_blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    dtype = dtype or sd["pos_embed_input.proj.weight"].dtype
    model = ControlNetSD35(dtype=dtype, device=torch.device("meta"), operations=operations, **cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f"SD3.5 ControlNet: {len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
    model.load_state_dict({k: sd[k].to(dtype) for k in own}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_sd35_controlnet(sd: dict):
    """-> comfy.controlnet.ControlNet: latent hint (the main model's SD3 latent format), residuals by ratio."""
    import comfy.controlnet

    return comfy.controlnet.ControlNet(load_sd35_controlnet(sd), latent_input=True, latent_format=None,
                                       repeat_mode="ratio")
