"""The Wan 2.1 and Wan 2.2 video VAEs in the checkpoints' own key layout (`wan_2.1_vae.safetensors` /
`Wan2.1_VAE.pth`, `wan2.2_vae.safetensors` / `Wan2.2_VAE.pth`).

Owns the network (`WanVAE`: `encoder.conv1`, `encoder.downsamples.N.*`, `encoder.middle.{0,1,2}`,
`encoder.head.{0,2}`, `conv1`, `conv2`, `decoder.conv1`, `decoder.middle.*`, `decoder.upsamples.N.*`,
`decoder.head.*`), `wan_vae_config_from_state_dict` (every size read from the tensors, so tiny test
VAEs load through the same code as the real one) and `check_wan_vae_keys` (errors name what was
expected). Latents are the raw VAE space: the per-channel mean/std normalisation belongs to the
diffusion model's latent format.

Layout facts: 16 latent channels, 8x spatial and 4x temporal compression (frames 1 + 4k <-> latent
frames 1 + k). Every 3x3x3 conv is causal in time (two frames of zero padding in front). RMS norm over
channels (`gamma` only) + SiLU before each conv. Resnet blocks are `residual.{0 norm, 2 conv, 3 norm,
6 conv}` plus a 1x1x1 `shortcut` when the width changes. Down/up-sampling blocks are `resample.1` (a 2-D
conv applied per frame) plus, where time is resampled, `time_conv` (3x1x1 causal). One single-head
spatial attention block per middle (`norm`, fused `to_qkv`, `proj`).

Temporal chunking: the encoder sees pixel frame 0 alone, then chunks of 4 frames; the decoder sees latent
frame 0 alone, then one latent frame at a time. Each causal conv keeps the last two frames of its input
(`_FeatureCache`), so chunked stride-1 convs compute exactly what the whole sequence would. The time
resamplers are where chunking is part of the model's definition: frame 0 never passes through
`time_conv` (the encoder keeps it as is; the decoder does not double it), which is why the first frame is
always its own chunk. Larger later chunks give the same result (up to float rounding) with fewer, larger
kernels; `chunk` exposes that for fast GPUs.

Wan 2.2 (TI2V-5B's VAE): 48 latent channels, 16x spatial / 4x temporal. Pixels are patchified 2x2 into 12
channels before `encoder.conv1` (and the decoder head makes 12, unpatchified). Each encoder stage is
`encoder.downsamples.N.downsamples.{resnets..., resampler}` plus a weightless shortcut that averages
space-time neighbourhoods into channels; each decoder stage is `decoder.upsamples.N.upsamples.{...}` plus a
weightless shortcut that repeats channels out over them. Its up-sampling convs keep the width, and the
decoder has its own base width (256 vs the encoder's 160).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2  # frames of history a 3-tap causal conv needs

_MIDDLE_RES = (0, 2)  # middle.0 and middle.2 are resnet blocks, middle.1 the attention block


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding is all in front (zeros, or the previous chunk's cached frames)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        kernel_size, padding = _triple(kernel_size), _triple(padding)
        # spatial padding stays inside the conv kernel call (no extra copy); time padding is done here
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, padding[1], padding[2]))
        self.time_pad = 2 * padding[0]

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        if self.time_pad:
            have = 0 if cache is None else cache.shape[2]
            parts = []
            if have < self.time_pad:
                b, c, _, h, w = x.shape
                parts.append(x.new_zeros(b, c, self.time_pad - have, h, w))
            if have:
                parts.append(cache[:, :, -self.time_pad:].to(x.device, x.dtype))
            x = torch.cat(parts + [x], dim=2)
        return super().forward(x)


class _FeatureCache:
    """Per-conv history across temporal chunks. Slots are claimed in call order, which is the same for
    every chunk, so slot i always belongs to the same conv."""

    FIRST = "first"  # a time resampler has seen frame 0 (and nothing to remember)

    def __init__(self):
        self.slots: list = []
        self.i = 0

    def next_chunk(self) -> None:
        self.i = 0

    def claim(self):
        if self.i == len(self.slots):
            self.slots.append(None)
        self.i += 1
        return self.i - 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """Run a causal conv on this chunk with the previous chunk's frames, and remember this chunk's tail."""
        i = self.claim()
        prev = self.slots[i]
        if isinstance(prev, str):
            prev = None
        tail = x[:, :, -CACHE_T:]
        if tail.shape[2] < CACHE_T and prev is not None:
            tail = torch.cat([prev[:, :, -1:], tail], dim=2)
        # clone: a view would keep the whole chunk's activation alive until the next chunk
        self.slots[i] = tail.clone()
        return conv(x, prev)


def _rms(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    # F.normalize(x) * sqrt(C) == x / rms(x); gamma is [C,1,1,1] (or [C,1,1]) -> broadcast over T,H,W
    return F.normalize(x, dim=1) * (gamma.reshape(-1, 1, 1, 1) * (x.shape[1] ** 0.5)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        # checkpoint shapes: [C,1,1,1] for video norms, [C,1,1] for the per-frame attention norm
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.gamma)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices 1, 4, 5 are SiLU / SiLU / Dropout in the checkpoint's Sequential: no weights
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1)])
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        h = x if self.shortcut is None else self.shortcut(x)
        y = cache.conv(self.residual[2], F.silu(self.residual[0](x), inplace=True))
        y = cache.conv(self.residual[6], F.silu(self.residual[3](y), inplace=True))
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames do not attend to each other)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: _FeatureCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        n = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        # the 1x1 convs are per-pixel linear maps: run them on channels-last tokens
        qkv = F.linear(n, self.to_qkv.weight.reshape(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = F.linear(o, self.proj.weight.reshape(c, c), self.proj.bias)
        return x + o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling per frame, plus x2 in time for the '3d' modes."""

    def __init__(self, dim: int, mode: str, up_out: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            # resample.0 is the nearest x2 upsampling (no weights); the conv halves the width in 2.1 (2.2's
            # residual up blocks keep it: up_out)
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, up_out or dim // 2, 3, padding=1)])
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # resample.0 pads right/bottom by one (no weights) before the stride-2 conv
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        # the 2-D conv as a 1x3x3 3-D conv: no [B,C,T,H,W] <-> [B*T,C,H,W] permute copies
        weight = conv.weight.unsqueeze(2)
        if self.mode.startswith("up"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            return F.conv3d(x, weight, conv.bias, padding=(0, 1, 1))
        return F.conv3d(F.pad(x, (0, 1, 0, 1)), weight, conv.bias, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            i = cache.claim()
            if cache.slots[i] is None:
                cache.slots[i] = cache.FIRST  # frame 0 is not doubled in time
            else:
                cache.i -= 1  # let cache.conv use this slot
                b, c, t, h, w = x.shape
                y = cache.conv(self.time_conv, x)  # [B, 2C, T, H, W]: two output frames per input frame
                x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            i = cache.claim()
            prev = cache.slots[i]
            tail = x[:, :, -1:].clone()
            if prev is not None:
                # stride-2 windows (prev last, f1, f2), (f2, f3, f4), ...: frame 0 is kept as is
                x = self.time_conv(torch.cat([prev, x], dim=2))
            cache.slots[i] = tail
        return x


class _Middle(nn.ModuleList):
    def __init__(self, dim: int):
        super().__init__([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        for block in self:
            x = block(x, cache)
        return x


class _Head(nn.ModuleList):
    def __init__(self, dim: int, out: int):
        super().__init__([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1)])

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        return cache.conv(self[2], F.silu(self[0](x), inplace=True))


def _fold_shortcut(x: torch.Tensor, ft: int, fs: int, out: int) -> torch.Tensor:
    """Wan 2.2's weightless down shortcut: each ft x fs x fs neighbourhood goes into channels (channel
    c * ft*fs*fs + (t_off*fs + h_off)*fs + w_off), then runs of consecutive channels are averaged down to
    `out`. A chunk shorter than ft frames (the first, one-frame chunk) is zero-padded in front."""
    b, c, t, h, w = x.shape
    pad = -t % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
        t += pad
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out, -1, t // ft, h // fs, w // fs).mean(dim=2)


def _unfold_shortcut(x: torch.Tensor, ft: int, fs: int, out: int, first: bool) -> torch.Tensor:
    """Wan 2.2's weightless up shortcut, the inverse layout of `_fold_shortcut`: channels repeated, then
    spread over ft x fs x fs neighbourhoods. The first chunk keeps only the last of its ft frames (frame 0
    is not doubled in time, like the main path)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out * ft * fs * fs // c, dim=1).view(b, out, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first and ft > 1 else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder stage: `downsamples.{0..n-1}` resnets (+ `downsamples.n` resampler) plus the
    weightless averaging shortcut over the same down-sampling."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        blocks = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.factors = (2 if temporal else 1, 2 if spatial else 1)
        self.out = cout

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        short = _fold_shortcut(x, *self.factors, self.out)
        for block in self.downsamples:
            x = block(x, cache)
        return x + short


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder stage: `upsamples.{0..n}` resnets (+ `upsamples.n+1`, a resampler that keeps the
    width) plus the weightless repeating shortcut when the stage up-samples."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        blocks = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1)]
        if spatial:
            blocks.append(Resample(cout, "upsample3d" if temporal else "upsample2d", up_out=cout))
        self.upsamples = nn.ModuleList(blocks)
        self.factors = (2 if temporal else 1, 2) if spatial else None
        self.out = cout

    def forward(self, x: torch.Tensor, cache: _FeatureCache, first: bool = False) -> torch.Tensor:
        short = _unfold_shortcut(x, *self.factors, self.out, first) if self.factors else None
        for block in self.upsamples:
            x = block(x, cache)
        return x if short is None else x + short


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temperal_downsample: list[bool], in_channels: int = 3, residual: bool = False):
        super().__init__()
        dims = [dim * m for m in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            if residual:
                blocks.append(ResidualDownBlock(cin, cout, num_res_blocks, not last and temperal_downsample[i],
                                                not last))
                continue
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if not last:
                blocks.append(Resample(cout, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _Middle(dims[-1])
        self.head = _Head(dims[-1], z_dim)

    def forward(self, x: torch.Tensor, cache: _FeatureCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for block in self.downsamples:
            x = block(x, cache)
        return self.head(self.middle(x, cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temperal_upsample: list[bool], out_channels: int = 3, residual: bool = False):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1]] + list(dim_mult)[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _Middle(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            if residual:
                blocks.append(ResidualUpBlock(cin, cout, num_res_blocks, not last and temperal_upsample[i],
                                              not last))
                continue
            if i > 0:
                cin //= 2  # every upsampling conv halved the width
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if not last:
                blocks.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _Head(dims[-1], out_channels)

    def forward(self, z: torch.Tensor, cache: _FeatureCache, first: bool = False) -> torch.Tensor:
        x = self.middle(cache.conv(self.conv1, z), cache)
        for block in self.upsamples:
            x = block(x, cache, first) if isinstance(block, ResidualUpBlock) else block(x, cache)
        return self.head(x, cache)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel c*p*p + w_off*p + h_off (Wan 2.2's order)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


class WanVAE(nn.Module):
    """encode: video [B,3,T,H,W] in -1..1 -> latent mean [B,z,1+(T-1)//4,H/r,W/r];
    decode: latent [B,z,t,h,w] -> video [B,3,1+4(t-1),r*h,r*w] clamped to -1..1.

    Wan 2.1: r = 8. Wan 2.2 (`residual`, `patch_size` 2, z_dim 48): pixels are patchified 2x2 into 12
    channels first, the stages are `ResidualDownBlock` / `ResidualUpBlock`, the decoder has its own width
    (`decoder_dim`), r = 16."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temperal_downsample=(False, True, True), residual: bool = False, patch_size: int = 1,
                 decoder_dim: int | None = None):
        super().__init__()
        self.z_dim = z_dim
        self.patch_size = patch_size
        self.temporal_compression = 2 ** sum(bool(t) for t in temperal_downsample)
        self.spatial_compression = 2 ** (len(dim_mult) - 1) * patch_size
        pixel_ch = 3 * patch_size * patch_size
        self.encoder = Encoder3d(dim, z_dim * 2, list(dim_mult), num_res_blocks, list(temperal_downsample),
                                 in_channels=pixel_ch, residual=residual)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(decoder_dim or dim, z_dim, list(dim_mult), num_res_blocks,
                                 list(temperal_downsample)[::-1], out_channels=pixel_ch, residual=residual)

    def encode(self, x: torch.Tensor, chunk: int | None = None,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """`chunk` pixel frames per step after frame 0 (a multiple of the temporal compression; default
        that compression, the model's own schedule). Frames past 1 + k*compression are dropped."""
        r = self.temporal_compression
        chunk = chunk or r
        if chunk % r:
            raise ValueError(f"encode chunk must be a multiple of {r} frames, got {chunk}")
        t = 1 + (x.shape[2] - 1) // r * r
        x = _patchify(x[:, :, :t], self.patch_size)
        starts = [0] + list(range(1, t, chunk))
        cache, out = _FeatureCache(), []
        for n, s in enumerate(starts):
            cache.next_chunk()
            out.append(self.encoder(x[:, :, s:1 if s == 0 else min(s + chunk, t)], cache))
            if callback is not None:
                callback(n + 1, len(starts))
        mu = self.conv1(torch.cat(out, dim=2))[:, :self.z_dim]
        return mu

    def decode(self, z: torch.Tensor, chunk: int = 1,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """`chunk` latent frames per step after frame 0 (1 is the model's own schedule)."""
        x = self.conv2(z)
        starts = [0] + list(range(1, z.shape[2], chunk))
        cache, out = _FeatureCache(), []
        for n, s in enumerate(starts):
            cache.next_chunk()
            y = self.decoder(x[:, :, s:1 if s == 0 else s + chunk], cache, first=s == 0)
            out.append(_unpatchify(y, self.patch_size).clamp_(-1.0, 1.0))
            if callback is not None:
                callback(n + 1, len(starts))
        return torch.cat(out, dim=2)


# -- detection and config --------------------------------------------------------------------------------

def is_wan_vae(sd: dict) -> bool:
    return any(k in sd for k in ("decoder.middle.0.residual.0.gamma", "encoder.downsamples.0.residual.0.gamma",
                                 "decoder.head.0.gamma"))


def wan_vae_config_from_state_dict(sd: dict, name: str = "<state dict>") -> dict:
    """dim, z_dim, dim_mult, num_res_blocks and temperal_downsample from the tensors; for the Wan 2.2 layout
    (residual stages `encoder.downsamples.N.downsamples.M`) also residual, patch_size and decoder_dim."""
    for key in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"):
        if key not in sd:
            raise ValueError(f"'{name}' looks like a Wan 2.1 video VAE (or the Wan 2.2 one) but has no '{key}': "
                             "expected the Wan 2.1 / 2.2 VAE layout (encoder.conv1, encoder.downsamples.N, conv1, "
                             "conv2, decoder.*); the file is truncated or decoder-only")
    z_dim = sd["conv2.weight"].shape[0]
    dim = sd["encoder.conv1.weight"].shape[0]
    if "encoder.downsamples.0.downsamples.0.residual.0.gamma" in sd:
        return _wan22_config(sd, name, dim, z_dim)
    blocks: dict[int, str] = {}
    for k in sd:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(residual|resample|time_conv|shortcut)", k)
        if m:
            kind = "res" if m.group(2) in ("residual", "shortcut") else "resample"
            blocks[int(m.group(1))] = kind if blocks.get(int(m.group(1))) != "res" else "res"
    order = [blocks[i] for i in sorted(blocks)]
    if not order or order[0] != "res":
        raise ValueError(f"'{name}': no encoder.downsamples.0.residual.* weights; expected the Wan 2.1 VAE layout")
    num_res_blocks = order.index("resample") if "resample" in order else len(order)
    dim_mult, temporal = [], []
    for i, kind in enumerate(order):
        last_res = kind == "res" and (i + 1 == len(order) or order[i + 1] == "resample")
        if last_res:
            dim_mult.append(sd[f"encoder.downsamples.{sorted(blocks)[i]}.residual.6.weight"].shape[0] // dim)
        if kind == "resample":
            temporal.append(f"encoder.downsamples.{sorted(blocks)[i]}.time_conv.weight" in sd)
    return dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                temperal_downsample=temporal)


def _wan22_config(sd: dict, name: str, dim: int, z_dim: int) -> dict:
    stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.downsamples\.(\d+)\.", k)] if m})
    num_res_blocks = 0
    while f"encoder.downsamples.0.downsamples.{num_res_blocks}.residual.0.gamma" in sd:
        num_res_blocks += 1
    dim_mult = [sd[f"encoder.downsamples.{i}.downsamples.{num_res_blocks - 1}.residual.6.weight"].shape[0] // dim
                for i in stages]
    temporal = [f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.weight" in sd for i in stages[:-1]]
    in_ch = sd["encoder.conv1.weight"].shape[1]
    patch = int(round((in_ch / 3) ** 0.5))
    if 3 * patch * patch != in_ch:
        raise ValueError(f"'{name}': encoder.conv1 takes {in_ch} channels, not 3 x a square patch (Wan 2.2: 12 = "
                         "3 x 2 x 2); the file is damaged or not a Wan VAE")
    decoder_dim = sd["decoder.conv1.weight"].shape[0] // dim_mult[-1]
    return dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                temperal_downsample=temporal, residual=True, patch_size=patch, decoder_dim=decoder_dim)


def check_wan_vae_keys(model: nn.Module, sd: dict, name: str = "<state dict>") -> list[str]:
    """Raise if `sd` lacks a weight of `model` or has one of another shape; return the extra keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"'{name}' is missing {len(missing)} Wan VAE weights, e.g. {missing[:3]}: the file is "
                         "truncated or not a complete Wan VAE")
    wrong = [k for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"'{name}': {len(wrong)} Wan VAE weights have unexpected shapes, e.g. {k} is "
                         f"{tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}")
    return sorted(set(sd) - set(expected))
