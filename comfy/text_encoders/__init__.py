"""Text encoders: the CLIP object that CLIPLoader / DualCLIPLoader / checkpoints hand to nodes.

Owns `load_text_encoders(state_dicts, clip_type, names) -> CLIP` and `CLIP` (docs/internals.md):
`tokenize`, `encode_from_tokens`, `encode_from_tokens_scheduled` -> CONDITIONING, `clone`, `clip_layer`,
`patcher`. The per-family combination of encoders (`clip_type`) lives here:

- stable_diffusion: CLIP-L; cond = last hidden state, pooled = projected pooled.
- flux: CLIP-L + T5-XXL; cond = T5 hidden states (padded to 256 tokens), pooled = CLIP-L's unprojected
  pooled vector.
- sd3: CLIP-L + CLIP-G (+ T5-XXL); the penultimate hidden states of L and G are concatenated on channels
  and zero-padded to T5's width, then the T5 tokens are appended; pooled = [L pooled, G pooled].
- wan: umT5-XXL; cond = last hidden state with padding zeroed (512 tokens).

Tokenizers and detection are in `tokenizers.py` and `encoders.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import torch

from comfy.text_encoders.encoders import TextEncoder, build_hf_model, detect_text_encoder, strip_prefix
from comfy.text_encoders.tokenizers import TokenChunker, load_tokenizer, write_small_tokenizer

__all__ = ["CLIP", "load_text_encoders", "detect_text_encoder", "write_small_tokenizer", "CLIP_TYPES"]

logger = logging.getLogger(__name__)

CLIP_TYPES = ("stable_diffusion", "flux", "sd3", "wan", "pixart", "hunyuan_dit")
_MODULE_NAMES = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl", "umt5xxl": "umt5xxl", "hydit_clip": "hydit_clip",
                 "mt5xl": "mt5xl"}


@dataclasses.dataclass
class _Slot:
    encoder: TextEncoder
    chunker: TokenChunker


def _slot_options(clip_type: str, slot: str) -> tuple[dict, dict]:
    """(TextEncoder options, TokenChunker options) for one encoder slot of a family, as ComfyUI runs it."""
    if slot == "l":
        if clip_type == "sd3":
            return dict(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                        return_projected_pooled=False), {}
        return dict(layer="last", return_projected_pooled=clip_type != "flux"), {}
    if slot == "g":  # CLIP-G pads with token 0, not the end token
        return dict(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False), dict(pad_token=0)
    if slot == "t5xxl":
        return {}, dict(max_length=None, pad_token=0, min_length=256 if clip_type == "flux" else 77)
    if slot == "umt5xxl":
        return dict(use_attention_mask=True, zero_out_masked=True), dict(max_length=None, pad_token=0,
                                                                         min_length=512)
    raise ValueError(f"unknown encoder slot '{slot}'")


def _make_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """A ModelPatcher over the encoders (LoRA on CLIP), when comfy.model_patcher is available."""
    try:
        from comfy.model_patcher import ModelPatcher
    except ImportError:
        logger.debug("comfy.model_patcher not available; CLIP has no patcher")
        return None
    return ModelPatcher(module, load_device=load_device, offload_device=offload_device)


class CLIP:
    """Tokenizers + encoders of one text-encoder set, combined the way `clip_type`'s model expects."""

    def __init__(self, slots: dict[str, _Slot], clip_type: str, patcher=None):
        self.slots = slots
        self.clip_type = clip_type
        # ComfyUI's module names, so text-encoder LoRA keys map to e.g.
        # "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
        self.cond_stage_model = torch.nn.ModuleDict({_MODULE_NAMES[k]: s.encoder for k, s in slots.items()})
        self.patcher = patcher
        self.layer_idx: int | None = None
        self.tokenizer_options: dict = {}

    # -- ComfyUI API --------------------------------------------------------------------------------
    def clone(self) -> CLIP:
        c = copy.copy(self)  # encoders are shared; per-clone settings (layer, patches) are not
        c.patcher = self.patcher.clone() if self.patcher is not None else None
        c.tokenizer_options = dict(self.tokenizer_options)
        return c

    def set_tokenizer_option(self, name: str, value) -> None:
        """T5TokenizerOptions: "<encoder>_min_length" / "<encoder>_min_padding", e.g. "t5xxl_min_length"."""
        self.tokenizer_options[name] = value

    def clip_layer(self, layer_idx: int | None) -> None:
        """CLIPSetLastLayer (applies to the CLIP encoders of the set)."""
        self.layer_idx = layer_idx

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        out = {}
        for k, s in self.slots.items():
            name = _MODULE_NAMES[k]
            out[k] = s.chunker.tokenize(text, min_length=self.tokenizer_options.get(f"{name}_min_length", -1),
                                        min_padding=self.tokenizer_options.get(f"{name}_min_padding"))
        return out

    def _encode_slot(self, key: str, tokens: dict):
        slot = self.slots[key]
        chunks = tokens[key]
        enc = slot.encoder
        if enc.kind == "clip":
            enc.clip_layer(self.layer_idx)
        try:
            return enc.encode_token_weights(chunks, slot.chunker.empty_chunk(len(chunks[0])))
        finally:
            enc.clip_layer(None)

    def encode_from_tokens(self, tokens: dict, return_pooled: bool | str = False, return_dict: bool = False):
        if self.patcher is not None:
            import comfy.model_management

            comfy.model_management.load_models_gpu([self.patcher])
        missing = [k for k in self.slots if k not in tokens]
        if missing:
            raise ValueError(f"tokens lack {missing}: tokenize with the same CLIP that encodes")
        cond, pooled = getattr(self, "_combine_" + self.clip_type)(tokens)
        if return_dict:
            out = {"cond": cond}
            if pooled is not None:
                out["pooled_output"] = pooled
            return out
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected_pooled_output: bool = False,
                                     add_dict: dict | None = None) -> list:
        out = self.encode_from_tokens(tokens, return_dict=True)
        extra = {k: v for k, v in out.items() if k != "cond"}
        extra.update(add_dict or {})
        return [[out["cond"], extra]]

    def encode(self, text: str):
        return self.encode_from_tokens(self.tokenize(text))

    def load_model(self):
        if self.patcher is not None:
            import comfy.model_management

            comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher

    def get_sd(self) -> dict:
        return self.cond_stage_model.state_dict()

    # -- per-family combinations --------------------------------------------------------------------
    def _combine_stable_diffusion(self, tokens):
        return self._encode_slot("l", tokens)

    def _combine_wan(self, tokens):
        return self._encode_slot("umt5xxl", tokens)

    def _combine_flux(self, tokens):
        cond, _ = self._encode_slot("t5xxl", tokens)
        _, pooled = self._encode_slot("l", tokens)
        return cond, pooled

    def _combine_sd3(self, tokens):
        width = self.slots["t5xxl"].encoder.width if "t5xxl" in self.slots else 4096
        l_w = self.slots["l"].encoder.width if "l" in self.slots else 768
        g_w = self.slots["g"].encoder.width if "g" in self.slots else 1280
        if l_w + g_w > width:
            raise ValueError(f"SD3 needs CLIP-L ({l_w}) + CLIP-G ({g_w}) channels to fit T5's width {width}")
        lg, pooled_parts = None, []
        # CLIPTextEncodeSD3 with empty_padding "none" gives an empty token list for an empty prompt: that
        # encoder is left out as if absent (all of them: 77 zero tokens)
        used = {k for k in self.slots if len(tokens.get(k, [])) > 0}
        if "l" in used:
            lg, l_pooled = self._encode_slot("l", tokens)
        else:
            l_pooled = torch.zeros(1, l_w)
        if "g" in used:
            g_out, g_pooled = self._encode_slot("g", tokens)
            if lg is None:
                lg = torch.nn.functional.pad(g_out, (l_w, 0))  # G's channels stay after L's
            else:
                n = min(lg.shape[1], g_out.shape[1])
                lg = torch.cat([lg[:, :n], g_out[:, :n]], dim=-1)
        else:
            g_pooled = torch.zeros(1, g_w)
            if lg is not None:
                lg = torch.nn.functional.pad(lg, (0, g_w))
        pooled_parts = [l_pooled, g_pooled]
        out = None if lg is None else torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))
        if "t5xxl" in used:
            t5_out, _ = self._encode_slot("t5xxl", tokens)
            out = t5_out if out is None else torch.cat([out, t5_out], dim=-2)
        if out is None:
            out = torch.zeros(1, 77, width)
        return out, torch.cat(pooled_parts, dim=-1)


def _resolve_path(name: str) -> str | None:
    if os.path.isfile(name):
        return name
    try:
        import folder_paths

        return folder_paths.get_full_path("text_encoders", name)
    except (ImportError, KeyError):
        return None


def _spiece_bytes(sd: dict) -> bytes | None:
    t = sd.get("spiece_model")
    if t is None:
        return None
    return t.cpu().numpy().tobytes() if isinstance(t, torch.Tensor) else bytes(t)


def load_text_encoders(state_dicts: list[dict], clip_type: str = "stable_diffusion",
                       names: list[str] | None = None, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> CLIP:
    """Build a CLIP from one or more text-encoder state dicts (ComfyUI / HF key layout).

    `names` are the files' names or paths (for tokenizer lookup beside the file and for error messages).
    """
    import comfy.model_management as mm

    clip_type = {"sd1": "stable_diffusion", "stable_diffusion3": "sd3", "wan21": "wan"}.get(clip_type, clip_type)
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"clip type '{clip_type}' is not supported; use one of {', '.join(CLIP_TYPES)}")
    names = list(names or [f"text encoder {i}" for i in range(len(state_dicts))])
    device = device or mm.text_encoder_device()
    dtype = dtype or mm.text_encoder_dtype(device)
    if clip_type in ("pixart", "hunyuan_dit"):
        # their encoder sets (T5 with a mask and no pooled; BERT + mT5-XL) live in their own modules
        if clip_type == "pixart":
            from comfy.text_encoders.pixart import load_pixart_clip as family_loader
        else:
            from comfy.text_encoders.hydit import load_hydit_clip as family_loader
        return family_loader(state_dicts, names, device, dtype)

    found = []  # (kind, sd, name)
    for sd, name in zip(state_dicts, names):
        sd = strip_prefix(sd)
        found.append((detect_text_encoder(sd, name), sd, name))
    kinds = [k for k, _, _ in found]
    desc = ", ".join(f"{n} ({k})" for k, _, n in found)
    clips = [f for f in found if f[0] == "clip"]
    t5s = [f for f in found if f[0] == "t5"]
    umt5s = [f for f in found if f[0] == "umt5"]

    assign: dict[str, tuple] = {}
    if clip_type == "stable_diffusion" and kinds == ["clip"]:
        assign["l"] = clips[0]
    elif clip_type == "flux" and len(clips) == 1 and len(t5s) == 1 and len(found) == 2:
        assign["l"], assign["t5xxl"] = clips[0], t5s[0]
    elif clip_type == "sd3" and 1 <= len(found) <= 3 and len(clips) <= 2 and len(t5s) <= 1 and not umt5s:
        width = lambda f: f[1]["text_model.embeddings.token_embedding.weight"].shape[1]  # noqa: E731
        ordered = sorted(clips, key=width)
        if len(ordered) == 2:
            assign["l"], assign["g"] = ordered
        elif len(ordered) == 1:
            assign["g" if width(ordered[0]) == 1280 else "l"] = ordered[0]
        if t5s:
            assign["t5xxl"] = t5s[0]
    elif clip_type == "wan" and kinds == ["umt5"]:
        assign["umt5xxl"] = umt5s[0]
    else:
        need = {"stable_diffusion": "one CLIP-L", "flux": "a CLIP-L and a T5-XXL (DualCLIPLoader)",
                "sd3": "CLIP-L and/or CLIP-G and/or T5-XXL", "wan": "one umT5-XXL"}[clip_type]
        raise ValueError(f"clip type '{clip_type}' needs {need}; got {desc or 'no files'}")

    slots = {}
    for key, (kind, sd, name) in assign.items():
        enc_opts, tok_opts = _slot_options(clip_type, key)
        path = _resolve_path(name)
        tokenizer = load_tokenizer("clip" if kind == "clip" else kind, path or name, _spiece_bytes(sd))
        vocab = (sd["text_model.embeddings.token_embedding.weight"] if kind == "clip"
                 else sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))).shape[0]
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"'{name}': its tokenizer has {tokenizer.vocab_size} tokens but the encoder only "
                             f"{vocab} embeddings; put the matching tokenizer beside the file")
        model = build_hf_model(sd, kind, dtype, device, gelu=(key == "g") if kind == "clip" else None)
        encoder = TextEncoder(model, kind, end_token=tokenizer.end_token, **enc_opts)
        slots[key] = _Slot(encoder, TokenChunker(tokenizer, **tok_opts))
        logger.info("Loaded %s text encoder '%s' as '%s' (%s)", kind, name, key, clip_type)
    clip = CLIP(slots, clip_type)
    clip.patcher = _make_patcher(clip.cond_stage_model, device, mm.unet_offload_device())
    return clip
