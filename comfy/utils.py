"""Small shared helpers: progress reporting and state-dict loading.

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

import torch

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


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str, crop: str) -> torch.Tensor:
    """Resize [B,C,H,W] to (height, width); crop="center" keeps the aspect ratio by cropping first."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic",
            "area": "area", "lanczos": "bicubic"}.get(upscale_method, "bilinear")
    kwargs = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["align_corners"] = False
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=mode, **kwargs)


logger = logging.getLogger(__name__)
