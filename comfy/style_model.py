"""Style models of ComfyUI's `style_models` folder (StyleModelLoader -> STYLE_MODEL): Flux Redux.

`load_style_model(path)` reads a Flux Redux file (``redux_up.weight/bias``, ``redux_down.weight/bias``, e.g.
flux1-redux-dev.safetensors) into a `StyleModel`, whose `get_cond(clip_vision_output)` maps the image
encoder's ``last_hidden_state`` [B, tokens, 1152] to tokens for Flux's text stream [B, tokens, 4096]
(StyleModelApply appends them to the conditioning). Weights stay in the file's dtype and are cast to float32
per call, so the tokens are what ComfyUI's float32 Redux encoder gives. The SD1.x T2I-Adapter style model
(``style_embedding``) is not supported.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils

_EXPECTED = ("a Flux Redux style model (redux_up.weight/bias, redux_down.weight/bias, e.g. "
             "flux1-redux-dev.safetensors)")


class StyleModel:
    def __init__(self, model: torch.nn.Module, source: str = "style model"):
        self.model = model
        self.source = source
        self.load_device = comfy.model_management.text_encoder_device()
        self.patcher = comfy.model_patcher.ModelPatcher(model, load_device=self.load_device,
                                                        offload_device=torch.device("cpu"))

    def get_cond(self, clip_vision_output) -> torch.Tensor:
        """CLIP_VISION_OUTPUT -> Redux tokens [B, tokens, width] (float32, on the intermediate device)."""
        tokens = clip_vision_output.last_hidden_state
        if tokens.shape[-1] != self.model.redux_dim:
            raise ValueError(f"{self.source} takes {self.model.redux_dim}-wide image tokens; the CLIP vision "
                             f"output has {tokens.shape[-1]}-wide ones. Flux Redux needs the SigLIP encoder "
                             "sigclip_vision_patch14_384.safetensors (CLIPVisionLoader)")
        comfy.model_management.load_models_gpu([self.patcher])
        with torch.no_grad():
            out = self.model(tokens.to(device=self.load_device, dtype=torch.float32))
        return out.to(comfy.model_management.intermediate_device())


def _redux_sizes(sd: dict) -> tuple[int, int, int]:
    """(redux_dim, hidden, txt_in_features) from the weights, checking they chain."""
    up, down = sd["redux_up.weight"], sd["redux_down.weight"]
    shapes = {k: tuple(sd[k].shape) for k in ("redux_up.weight", "redux_up.bias", "redux_down.weight",
                                                "redux_down.bias") if k in sd}
    if len(shapes) != 4 or up.ndim != 2 or down.ndim != 2 or down.shape[1] != up.shape[0] \
            or shapes["redux_up.bias"] != (up.shape[0],) or shapes["redux_down.bias"] != (down.shape[0],):
        raise ValueError(f"Redux weights do not chain (shapes {shapes}); expected {_EXPECTED}: up "
                         "[hidden, 1152] + [hidden], down [4096, hidden] + [4096]")
    return up.shape[1], up.shape[0], down.shape[0]


def load_style_model_state_dict(sd: dict, source: str = "style model") -> StyleModel:
    from comfy.ldm.flux.redux import ReduxImageEncoder

    if "redux_up.weight" not in sd or "redux_down.weight" not in sd:
        if "style_embedding" in sd:
            raise ValueError(f"{source}: T2I-Adapter style models (style_embedding, SD1.x) are not supported; "
                             f"expected {_EXPECTED}")
        if any(k.startswith("vision_model.") for k in sd):
            raise ValueError(f"{source} is an image encoder: load it with CLIPVisionLoader from "
                             f"models/clip_vision; StyleModelLoader expects {_EXPECTED}")
        raise ValueError(f"{source}: not a style model; expected {_EXPECTED}")
    try:
        redux_dim, hidden, width = _redux_sizes(sd)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    with torch.device("meta"):
        model = ReduxImageEncoder(redux_dim, width, hidden=hidden)
    model.load_state_dict({k: sd[k] for k in model.state_dict()}, strict=True, assign=True)
    return StyleModel(model.eval().requires_grad_(False), source=source)


def load_style_model(ckpt_path: str) -> StyleModel:
    return load_style_model_state_dict(comfy.utils.load_torch_file(ckpt_path), source=f"'{ckpt_path}'")
