"""Weight patches: how a list of patches for one weight is folded into that weight.

`calculate_weight(patches, weight, key)` is what `ModelPatcher.patch_model` calls per weight. A patch is
``(strength_patch, value, strength_model, offset, function)``; ``value`` is a tensor (a "diff", as
model-merge nodes produce) or ``(kind, data)`` with kind "diff", "set" or "lora"
(``data = (up, down, alpha, mid, dora_scale, reshape)``, the layout LoRA loaders produce).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _lora_delta(data, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    up, down, alpha = data[0], data[1], data[2]
    mid = data[3] if len(data) > 3 else None
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    up = up.to(weight.device, dtype).flatten(1)
    down = down.to(weight.device, dtype)
    if mid is not None:
        down = torch.mm(mid.to(weight.device, dtype).transpose(0, 1).flatten(1), down.flatten(1))
    return (torch.mm(up, down.flatten(1)) * scale).reshape(weight.shape)


def calculate_weight(patches: list, weight: torch.Tensor, key: str,
                     intermediate_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Apply every patch to `weight` (already in intermediate_dtype) and return it."""
    for p in patches:
        strength, value, strength_model = p[0], p[1], p[2]
        offset = p[3] if len(p) > 3 else None
        function = p[4] if len(p) > 4 else None
        target = weight
        if offset is not None:
            target = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            target *= strength_model
        if isinstance(value, torch.Tensor):
            kind, data = "diff", (value,)
        else:
            kind, data = value[0], value[1]
        if kind == "diff":
            diff = data[0]
            if diff.shape != target.shape:
                logger.warning("patch for %s has shape %s, weight is %s: skipped", key, tuple(diff.shape),
                               tuple(target.shape))
                continue
            delta = strength * diff.to(target.device, intermediate_dtype)
        elif kind == "set":
            target.copy_(data[0].to(target.device, intermediate_dtype))
            continue
        elif kind == "lora":
            delta = strength * _lora_delta(data, target, intermediate_dtype)
        else:
            logger.warning("unknown patch type %r for %s: skipped", kind, key)
            continue
        if function is not None:
            delta = function(delta)
        target += delta
    return weight
