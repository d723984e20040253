"""Flux Redux image encoder (BFL's flux1-redux-dev): SigLIP image tokens -> tokens for Flux's text stream.

Two linear layers with a SiLU between them, ``redux_down(silu(redux_up(x)))``: ``redux_up`` widens the
1152-wide SigLIP so400m tokens to 3 x 4096 and ``redux_down`` narrows them to 4096, the width of Flux's T5
context. Sizes are read from the weights, so small test models load too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.ops


class ReduxImageEncoder(torch.nn.Module):
    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096, hidden: int | None = None,
                 dtype: torch.dtype | None = None, device=None, operations=comfy.ops.manual_cast):
        super().__init__()
        hidden = hidden if hidden is not None else 3 * txt_in_features
        self.redux_dim = redux_dim
        self.redux_up = operations.Linear(redux_dim, hidden, dtype=dtype, device=device)
        self.redux_down = operations.Linear(hidden, txt_in_features, dtype=dtype, device=device)

    def forward(self, sigclip_embeds: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(sigclip_embeds)))
