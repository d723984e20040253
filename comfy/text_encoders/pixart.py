"""PixArt's text encoder set (clip_type "pixart"): T5-XXL alone, no pooled vector.

As ComfyUI runs it: the prompt is not padded (one sequence ending with '</s>', minimum length 1), the
encoder sees an attention mask through the end token, and the conditioning is T5's last hidden state.
"""

from __future__ import annotations

import logging

from comfy.text_encoders import CLIP, _resolve_path, _Slot, _spiece_bytes
from comfy.text_encoders.encoders import TextEncoder, build_hf_model, detect_text_encoder, strip_prefix
from comfy.text_encoders.tokenizers import TokenChunker, load_tokenizer

logger = logging.getLogger(__name__)


class PixArtCLIP(CLIP):
    def _combine_pixart(self, tokens):
        cond, _ = self._encode_slot("t5xxl", tokens)
        return cond, None


def load_pixart_clip(state_dicts: list[dict], names: list[str], device, dtype) -> CLIP:
    found = []
    for sd, name in zip(state_dicts, names):
        sd = strip_prefix(sd)
        found.append((detect_text_encoder(sd, name), sd, name))
    if [k for k, _, _ in found] != ["t5"]:
        got = ", ".join(f"{n} ({k})" for k, _, n in found) or "no files"
        raise ValueError(f"clip type 'pixart' needs one T5-XXL text encoder (CLIPLoader); got {got}")
    _, sd, name = found[0]
    path = _resolve_path(name)
    tokenizer = load_tokenizer("t5", path or name, _spiece_bytes(sd))
    model = build_hf_model(sd, "t5", dtype, device)
    encoder = TextEncoder(model, "t5", use_attention_mask=True, end_token=tokenizer.end_token)
    chunker = TokenChunker(tokenizer, max_length=None, pad_token=0, min_length=1)
    clip = PixArtCLIP({"t5xxl": _Slot(encoder, chunker)}, "pixart")
    import comfy.model_management as mm
    from comfy.text_encoders import _make_patcher

    clip.patcher = _make_patcher(clip.cond_stage_model, device, mm.unet_offload_device())
    logger.info("Loaded T5 text encoder '%s' for PixArt", name)
    return clip
