"""The KL autoencoder (image VAE of SD1/SDXL, SD3 and Flux) in the LDM checkpoint key layout.

Owns the network (`AutoencoderKL`: `encoder.*`, `decoder.*`, optional `quant_conv` / `post_quant_conv`)
and `kl_config_from_state_dict`, which reads every size from the tensors so small test VAEs load
through the same code as the 16-channel Flux/SD3 and 4-channel SD VAEs. Scale and shift of latents
belong to the diffusion model's latent format, not to this module.

Layout facts: GroupNorm(32, eps 1e-6) + SiLU before each conv; resnet blocks `norm1, conv1, norm2,
conv2, nin_shortcut`; one single-head attention block in the middle (`q, k, v, proj_out` as 1x1 convs);
downsampling is a stride-2 conv after padding right/bottom by one; upsampling is nearest x2 then conv.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def fast_group_norm_enabled() -> bool:
    """GroupNorm of half-precision CUDA activations through `group_norm_act`'s own statistics pass (default;
    `TACO_VAE_FAST_GN=0` gives torch's GroupNorm). torch's statistics kernel took 45.9 ms of a 95.4 ms Flux
    VAE decode at 1024² on an H200 (30 calls, 32 blocks each); with this pass, two full-GPU reductions, the
    decode took 61.7 ms, within 0.062 of torch's on a [-1, 1] image (channels-last reordering alone gives
    0.055): benchmarks/RESULTS.md, sixth session."""
    return os.environ.get("TACO_VAE_FAST_GN", "1") != "0"


def statistics_pass_applies(x: torch.Tensor) -> bool:
    """Whether GroupNorm of `x` takes the statistics pass (`group_norm_act`): fp16/bf16 CUDA tensors, unless
    `TACO_VAE_FAST_GN=0`. The row-split decode (comfy/taco_dit/parallel/vae_parallel.py) asks the same."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and fast_group_norm_enabled()


def group_norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """silu(norm(x)) (or norm(x)). With `statistics_pass_applies(x)`, the per-(sample, group) mean and mean
    square come from two reductions accumulated in fp32 over all of the GPU (no fp32 copy of x), and the
    normalisation, affine and SiLU run in fp32 with one cast back; the variance is E[x²] - E[x]², so it
    agrees with torch's GroupNorm to fp32 rounding for activations whose mean is not many times their
    spread. Everywhere else: torch's GroupNorm (and SiLU)."""
    if statistics_pass_applies(x):
        return _stats_norm_act(norm, x, silu)
    return _torch_norm_act(norm, x, silu)


def _torch_norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    y = norm(x)
    return F.silu(y) if silu else y


def group_sums(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) sum and sum of squares of `x` [B, C, ...], each [B, G] in fp32: two reductions
    accumulated in fp32 (no fp32 copy of x)."""
    xv = x.reshape(x.shape[0], groups, -1)
    return (xv.sum(-1, dtype=torch.float32),
            torch.linalg.vector_norm(xv, 2, dim=-1, dtype=torch.float32).square())


def norm_act_from_stats(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, mean_sq: torch.Tensor,
                        silu: bool) -> torch.Tensor:
    """silu(norm(x)) (or norm(x)) from the per-(sample, group) mean and mean square ([B, G], fp32):
    normalisation, affine and SiLU in fp32, one cast back to x's dtype."""
    b, c = x.shape[:2]
    groups = norm.num_groups
    rstd = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + norm.eps)  # [B, G]
    scale = rstd.repeat_interleave(c // groups, dim=1)  # [B, C]
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.float()
        shift = shift * norm.weight.float() + norm.bias.float()
    view = (b, c) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift.view(view), x, scale.view(view))  # fp32
    return (F.silu(y, inplace=True) if silu else y).to(x.dtype)


def _stats_norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    total, total_sq = group_sums(x, norm.num_groups)
    n = x[0].numel() // norm.num_groups
    return norm_act_from_stats(norm, x, total / n, total_sq / n, silu)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_act(self.norm1, x, silu=True))
        h = self.conv2(group_norm_act(self.norm2, h, silu=True))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (only used at the lowest resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = group_norm_act(self.norm, x, silu=False)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: the LDM weights were trained this way


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    pass


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, z_channels: int,
                 double_z: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, ch * mult))
                c_in = ch * mult
            level.attn = nn.ModuleList()
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _Mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(group_norm_act(self.norm_out, h, silu=True))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, out_ch: int, z_channels: int):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, ch * ch_mult[i]))
                c_in = ch * ch_mult[i]
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)  # up.0 is the full-resolution level, as in the checkpoints
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(group_norm_act(self.norm_out, h, silu=True))


class AutoencoderKL(nn.Module):
    """encode(x in -1..1) -> latent mean (deterministic, as ComfyUI's VAEEncode); decode(z) -> -1..1."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, out_ch: int,
                 z_channels: int, quant_conv: bool, post_quant_conv: bool):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, in_channels=in_channels,
                           out_ch=out_ch, z_channels=z_channels, quant_conv=quant_conv,
                           post_quant_conv=post_quant_conv)
        self.z_channels = z_channels
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, out_ch, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1) if quant_conv else None
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1) if post_quant_conv else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.z_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def kl_config_from_state_dict(sd: dict) -> dict:
    """AutoencoderKL keyword arguments from an LDM-layout VAE state dict (no prefix)."""
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    ch_mult = [sd[f"encoder.down.{i}.block.{len(blocks) - 1}.conv2.weight"].shape[0] // ch for i in levels]
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks), in_channels=in_channels,
                out_ch=sd["decoder.conv_out.weight"].shape[0], z_channels=sd["decoder.conv_in.weight"].shape[1],
                quant_conv="quant_conv.weight" in sd, post_quant_conv="post_quant_conv.weight" in sd)


def conform_attention_weights(sd: dict) -> dict:
    """Some converted files store the mid-block attention q/k/v/proj_out as Linear [C, C]; the network
    uses 1x1 convs [C, C, 1, 1]. Same numbers, other shape."""
    out = dict(sd)
    for k, v in sd.items():
        if ".attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            out[k] = v[:, :, None, None]
    return out
