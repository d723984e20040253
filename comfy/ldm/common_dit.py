"""Helpers shared by the DiT families: padding to the patch grid, patchify/unpatchify to token rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_patch_size(x: torch.Tensor, patch_size: tuple[int, ...] = (2, 2),
                      padding_mode: str = "circular") -> torch.Tensor:
    """Pad the trailing spatial dims of x up to a multiple of patch_size (circular, as ComfyUI pads)."""
    pad = []
    for dim, p in zip(reversed(x.shape[-len(patch_size):]), reversed(patch_size)):
        pad += [0, (p - dim % p) % p]
    if not any(pad):
        return x
    if padding_mode == "circular" and (torch.jit.is_tracing() or torch.jit.is_scripting()):
        padding_mode = "reflect"
    return F.pad(x, pad, mode=padding_mode)


def patchify_2d(x: torch.Tensor, ph: int = 2, pw: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/ph)(W/pw), C*ph*pw], channel-major within a patch ("b (h w) (c ph pw)")."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def unpatchify_2d(x: torch.Tensor, h_len: int, w_len: int, ph: int = 2, pw: int = 2) -> torch.Tensor:
    """Inverse of patchify_2d: [B, h_len*w_len, C*ph*pw] -> [B, C, h_len*ph, w_len*pw]."""
    b = x.shape[0]
    c = x.shape[-1] // (ph * pw)
    x = x.view(b, h_len, w_len, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h_len * ph, w_len * pw)
