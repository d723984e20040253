"""Style model nodes (Flux Redux): StyleModelLoader (models/style_models) and StyleModelApply, which appends the
style model's tokens for a CLIP_VISION_OUTPUT to every conditioning's text tokens.

strength_type "multiply" scales those tokens; "attn_bias" leaves them as they are and instead adds
log(strength) to the attention scores of every text and image query for them, through the conditioning's
``attention_mask`` (an additive [batch, txt + style + img, txt + style + img] float16 bias, with
``attention_mask_img_shape`` the image grid it was made for; Flux resizes it to the latent's token grid).
A mask already on the conditioning is widened for the new tokens, as in ComfyUI.
"""

from __future__ import annotations

import torch

import comfy.style_model
import folder_paths


class StyleModelLoader:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"style_model_name": (folder_paths.get_filename_list("style_models"),)}}

    RETURN_TYPES = ("STYLE_MODEL",)
    FUNCTION = "load_style_model"
    CATEGORY = "loaders"

    def load_style_model(self, style_model_name):
        path = folder_paths.get_full_path_or_raise("style_models", style_model_name)
        return (comfy.style_model.load_style_model(path),)


def widen_attention_mask(mask: torch.Tensor | None, batch: int, n_txt: int, n_style: int,
                         img_shape: tuple[int, int], bias: float) -> torch.Tensor:
    """The additive mask over [txt, img] -> over [txt, style, img]: the old blocks are kept, text and image
    queries get `bias` on the style keys, and the style queries attend everywhere without bias."""
    n_img = img_shape[0] * img_shape[1]
    if mask is None:
        mask = torch.zeros((batch, n_txt + n_img, n_txt + n_img), dtype=torch.float16)
    elif mask.dtype == torch.bool:
        mask = torch.log(mask.to(torch.float16))  # keep -> 0, drop -> -inf
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    n = n_txt + n_style + n_img
    txt, style, img = slice(0, n_txt), slice(n_txt, n_txt + n_style), slice(n_txt + n_style, n)
    old_txt, old_img = slice(0, n_txt), slice(n_txt, None)
    out = torch.zeros((batch, n, n), dtype=torch.float16, device=mask.device)
    out[:, txt, txt] = mask[:, old_txt, old_txt]
    out[:, txt, img] = mask[:, old_txt, old_img]
    out[:, img, txt] = mask[:, old_img, old_txt]
    out[:, img, img] = mask[:, old_img, old_img]
    out[:, txt, style] = bias
    out[:, img, style] = bias
    return out


class StyleModelApply:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"conditioning": ("CONDITIONING",),
                             "style_model": ("STYLE_MODEL",),
                             "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}),
                             "strength_type": (["multiply", "attn_bias"],)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_stylemodel"
    CATEGORY = "conditioning/style_model"

    def apply_stylemodel(self, conditioning, style_model, clip_vision_output, strength=1.0,
                         strength_type="multiply"):
        tokens = style_model.get_cond(clip_vision_output)
        # every image of the batch becomes part of one token sequence
        tokens = tokens.reshape(1, -1, tokens.shape[-1])
        if strength_type == "multiply":
            tokens = tokens * strength
        # torch.log: strength 0 gives -inf (the style tokens are never attended to); math.log would raise
        bias = float(torch.log(torch.tensor(strength if strength_type == "attn_bias" else 1.0)))
        out = []
        for txt, opts in conditioning:
            if txt.shape[-1] != tokens.shape[-1]:
                raise ValueError(f"The style model gives {tokens.shape[-1]}-wide tokens but the conditioning's "
                                 f"text tokens are {txt.shape[-1]} wide; Flux Redux goes with Flux's T5 "
                                 "conditioning (4096)")
            opts = dict(opts)
            if "attention_mask" in opts or (strength_type == "attn_bias" and strength != 1.0):
                img_shape = tuple(opts.get("attention_mask_img_shape", (1, 1)))
                opts["attention_mask"] = widen_attention_mask(
                    opts.get("attention_mask"), txt.shape[0], txt.shape[1], tokens.shape[1], img_shape,
                    bias).to(txt.device)
                opts["attention_mask_img_shape"] = img_shape
            style = tokens.to(device=txt.device, dtype=txt.dtype).expand(txt.shape[0], -1, -1)
            out.append([torch.cat((txt, style), dim=1), opts])
        return (out,)


NODE_CLASS_MAPPINGS = {"StyleModelLoader": StyleModelLoader, "StyleModelApply": StyleModelApply}
NODE_DISPLAY_NAME_MAPPINGS = {"StyleModelLoader": "Load Style Model", "StyleModelApply": "Apply Style Model"}
