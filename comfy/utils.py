"""Small shared helpers: progress reporting, state-dict loading and the one image/latent resizer
(`common_upscale`, with ComfyUI's methods and pixels).

`ProgressBar` is ComfyUI's interface for long work inside a node: nodes (and custom packs) create one
with a total and call `update(n)` / `update_absolute(value)`. A process-wide hook set with
`set_progress_bar_global_hook` turns those calls into WebSocket `progress` messages (server) and
lockstep agreement points (multi-rank runtime); the console bar is tqdm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ProgressHook = Callable[[int, int, Any, "str | None"], None]  # (value, total, preview, node_id)
PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK: ProgressHook | None = None


def set_progress_bar_enabled(enabled: bool) -> None:
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function: ProgressHook | None) -> None:
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self.current = 0
        self.node_id = node_id
        self.hook = PROGRESS_BAR_HOOK

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, self.node_id)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def load_torch_file(path: str, safe_load: bool = True, device: torch.device | None = None,
                    return_metadata: bool = False):
    """Load a .safetensors / .sft file or a torch pickle into a state dict.

    Errors name the file: a truncated or non-checkpoint file raises ValueError saying so.
    """
    if device is None:
        device = torch.device("cpu")
    metadata = None
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".sft"):
        import safetensors

        try:
            with safetensors.safe_open(path, framework="pt", device=str(device)) as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() if return_metadata else None
        except Exception as e:  # safetensors raises several error types for damaged files
            raise ValueError(f"Could not read '{path}': not a valid safetensors file "
                             f"(truncated or corrupt?): {e}") from e
    else:
        try:
            obj = torch.load(path, map_location=device, weights_only=safe_load)
        except Exception as e:
            raise ValueError(f"Could not read '{path}' as a PyTorch checkpoint: {e}") from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"'{path}' does not hold a state dict (found {type(obj).__name__})")
        sd = obj
    if return_metadata:
        return sd, metadata
    return sd


def state_dict_prefix_replace(sd: dict, replace: dict[str, str], filter_keys: bool = False) -> dict:
    out = {} if filter_keys else sd
    for old, new in replace.items():
        for k in [k for k in sd if k.startswith(old)]:
            out[new + k[len(old):]] = sd.pop(k)
    return out


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Cut equal margins off [.., H, W] so its aspect ratio becomes width/height (ComfyUI's crop="center")."""
    old_w, old_h = samples.shape[-1], samples.shape[-2]
    old_aspect = old_w / old_h
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)


# --- resizing ----------------------------------------------------------------------------------------------
# The one resizer of images, masks and latents. Methods and results are ComfyUI's `common_upscale`: the
# torch modes are plain F.interpolate (no antialias, align_corners unset), "lanczos" is PIL on 8-bit images,
# "bislerp" is bilinear resampling whose blend of two neighbours is a slerp of their channel vectors.

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp", "lanczos")
_SLERP_PARALLEL_EPS = 1e-5  # |cos| within this of 1 counts as (anti)parallel: no slerp there


def _linear_taps(old: int, new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of `new` outputs along an axis of `old` samples reads: (left index, right index, weight of
    the right one). The source position is bilinear resampling's (align_corners=False, clamped to the edges).
    It is found by resampling the index ramp itself rather than by formula, as ComfyUI does, so positions carry
    the same float rounding and pick the same neighbours (e.g. 3 -> 19 puts output 9 a hair below 1.0)."""
    ramp = torch.arange(old, dtype=torch.float32, device=device)
    # right neighbours: the ramp shifted by one, its last entry repeated (the edge has no right neighbour)
    shifted = torch.cat((ramp[1:], ramp[-1:]))
    both = F.interpolate(torch.stack((ramp, shifted)).view(1, 2, 1, old), size=(1, new), mode="bilinear")
    pos, right = both.view(2, new)
    return pos.to(torch.int64), right.to(torch.int64), pos - pos.floor()


def _slerp_channels(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Blend the channel vectors (last dim) of a and b by weight t of b: the direction is slerped, the length
    interpolated linearly. ComfyUI's edge cases: a zero vector has no direction (it contributes a zero unit
    vector, so the blend is taken as if the two were orthogonal); nearly parallel vectors give `a` itself
    (not a lerp: their lengths may differ), nearly opposite ones a plain lerp."""
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    ua = torch.where(na == 0, 0.0, a / na)
    ub = torch.where(nb == 0, 0.0, b / nb)
    cos = (ua * ub).sum(-1, keepdim=True)
    omega = torch.acos(cos)  # NaN past +-1 from rounding; those entries are replaced below
    sin = torch.sin(omega)
    out = (torch.sin((1.0 - t) * omega) / sin) * ua + (torch.sin(t * omega) / sin) * ub
    out = out * (na * (1.0 - t) + nb * t)
    out = torch.where(cos < _SLERP_PARALLEL_EPS - 1, a * (1.0 - t) + b * t, out)
    return torch.where(cos > 1 - _SLERP_PARALLEL_EPS, a, out)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's "bislerp" resize of [N, C, H, W]: bilinear resampling, first along W then along H, where each
    blend of two neighbouring pixels is `_slerp_channels` of their C-vectors. Computed in float32, returned
    in the input dtype. With C = 1 every pair is parallel or opposite, so it degenerates (as in ComfyUI).

    Channels are moved last (contiguous) so the norms and dot products reduce over a contiguous run as in
    ComfyUI; reducing over a strided dim 1 instead differs from it by an ulp or so for many channels."""
    dtype = samples.dtype
    x = samples.float().movedim(1, -1).contiguous()  # [N, H, W, C]
    left, right, t = _linear_taps(x.shape[2], width, x.device)
    x = _slerp_channels(x[:, :, left], x[:, :, right], t[:, None])
    left, right, t = _linear_taps(x.shape[1], height, x.device)
    x = _slerp_channels(x[:, left], x[:, right], t[:, None, None])
    return x.movedim(-1, 1).to(dtype)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's "lanczos": each image through PIL's LANCZOS filter at 8 bits. [N, C, H, W] with C = 1 (L),
    2 (LA), 3 (RGB) or 4 (RGBA) -> [N, C, height, width]; [N, H, W] (masks) -> [N, height, width].

    Values are clipped to 0..1, scaled by 255 and truncated to uint8 (not rounded, as ComfyUI does), and come
    back as k/255. PIL premultiplies alpha while resampling LA/RGBA, so those channels are not independent.
    Other channel counts (latents) have no 8-bit image mode and raise. ComfyUI itself drops the channel dim
    of a [N, 1, H, W] input; here the rank is kept, which is what every caller indexes by."""
    squeeze = samples.ndim == 3
    x = samples.unsqueeze(1) if squeeze else samples
    if x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"lanczos resizes 8-bit images: [N, C, H, W] with C in 1..4 or [N, H, W], got shape "
                         f"{tuple(samples.shape)}; use bicubic or bislerp for latents")
    c = x.shape[1]
    pixels = np.clip(x.detach().movedim(1, -1).to("cpu", torch.float32).numpy() * 255.0, 0, 255).astype(np.uint8)
    out = np.empty((len(pixels), height, width, c), dtype=np.float32)
    for i, img in enumerate(pixels):
        resized = Image.fromarray(img[..., 0] if c == 1 else img).resize((width, height), Image.Resampling.LANCZOS)
        out[i] = np.asarray(resized, dtype=np.float32).reshape(height, width, c) / 255.0
    res = torch.from_numpy(out).movedim(-1, 1).to(samples.device, samples.dtype)
    return res.squeeze(1) if squeeze else res


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str, crop: str) -> torch.Tensor:
    """Resize the last two dims of `samples` to (height, width) with one of UPSCALE_METHODS; crop="center"
    first cuts the input to the target aspect ratio (any other crop value: none).

    [N, C, H, W] is resized as is; [N, H, W] as N single-channel images; [B, C, T, ..., H, W] (video
    latents) frame by frame, each frame's C channels together (this matters for bislerp and lanczos)."""
    if upscale_method not in UPSCALE_METHODS:
        raise ValueError(f"unknown upscale_method {upscale_method!r}; expected one of {', '.join(UPSCALE_METHODS)}")
    if samples.ndim == 3:
        return common_upscale(samples.unsqueeze(1), width, height, upscale_method, crop).squeeze(1)
    if samples.ndim > 4:
        b, c, h, w = samples.shape[0], samples.shape[1], samples.shape[-2], samples.shape[-1]
        frames = samples.reshape(b, c, -1, h, w).movedim(2, 1).reshape(-1, c, h, w)
        out = common_upscale(frames, width, height, upscale_method, crop)
        return out.reshape(b, -1, c, height, width).movedim(1, 2).reshape(samples.shape[:-2] + (height, width))
    if samples.ndim != 4:
        raise ValueError(f"common_upscale takes [N, H, W], [N, C, H, W] or [B, C, T, H, W]; got shape "
                         f"{tuple(samples.shape)}")
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if upscale_method == "bislerp":
        return bislerp(samples, width, height)
    if upscale_method == "lanczos":
        return lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=upscale_method)


def upscale_dit_mask(mask: torch.Tensor, img_size_in: tuple[int, int], img_size_out: tuple[int, int]) -> torch.Tensor:
    """Additive attention mask over [text tokens, image tokens] (queries x keys) whose image part is an
    hi x wi token grid -> the same mask for an ho x wo grid (ComfyUI's DiT mask resize).

    The text x text block is kept; every image axis, as query and as key, is resized bilinearly as a 2-D
    grid. A 1 x 1 grid (what StyleModelApply writes when no image shape is known) spreads its single value
    over the whole image. Finite values resample exactly as in ComfyUI; -inf entries stay -inf wherever they
    carry weight (ComfyUI's plain interpolation turns them into NaN)."""
    (hi, wi), (ho, wo) = tuple(img_size_in), tuple(img_size_out)
    if (hi, wi) == (ho, wo):
        return mask
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"an attention mask is [batch, queries, keys] or [queries, keys]; got shape "
                         f"{tuple(mask.shape)}")
    b, n = mask.shape[0], mask.shape[1]
    n_txt = n - hi * wi
    if n_txt < 0 or mask.shape[2] != n:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} cannot hold a {hi}x{wi} image grid")
    if mask.dtype == torch.bool:  # keep / drop -> additive bias (0 / -inf)
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    work = mask.float()  # bilinear resampling of half tensors is not implemented on every CPU build

    def keys(m):  # [b, q, hi*wi] -> [b, q, ho*wo]
        grid = m.reshape(b, m.shape[1], hi, wi)
        # -inf (a key never attended to, e.g. strength 0) would meet zero interpolation weights and give NaN
        # (0 * -inf); resample it separately: any positive weight on a -inf sample keeps the result -inf
        masked = torch.isneginf(grid)
        out = F.interpolate(grid.masked_fill(masked, 0.0), size=(ho, wo), mode="bilinear")
        if masked.any():
            hit = F.interpolate(masked.float(), size=(ho, wo), mode="bilinear") > 0
            out = out.masked_fill(hit, float("-inf"))
        return out.flatten(2)

    def queries(m):  # [b, hi*wi, k] -> [b, ho*wo, k]
        return keys(m.transpose(1, 2)).transpose(1, 2)

    txt, img = slice(0, n_txt), slice(n_txt, n)
    top = torch.cat((work[:, txt, txt], keys(work[:, txt, img])), dim=2)
    bottom = torch.cat((queries(work[:, img, txt]), queries(keys(work[:, img, img]))), dim=2)
    return torch.cat((top, bottom), dim=1).to(mask.dtype)


logger = logging.getLogger(__name__)
