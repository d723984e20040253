"""HunyuanDiT's text encoder set (clip_type "hunyuan_dit"): a Chinese CLIP text tower (BERT,
transformers' BertModel) and mT5-XL (transformers' MT5EncoderModel), sizes read from the state dicts.

ComfyUI's checkpoint layout: ``text_encoders.hydit_clip.transformer.bert.*`` and
``text_encoders.mt5xl.transformer.{shared,encoder}.*``; token slots ``hydit_clip`` and ``mt5xl``.
As ComfyUI runs them: BERT ([CLS] ... [SEP], padded with 0 to at least 77 tokens) and mT5 (no start
token, '</s>', padded with 0 to at least 256) both see an attention mask through their end token and
return the last hidden state. The conditioning is BERT's states, plus ``attention_mask``,
``conditioning_mt5xl`` and ``attention_mask_mt5xl`` in the conditioning dict (what
`comfy.model_base.HunyuanDiT.extra_conds` reads); there is no pooled vector.

Tokenizers: BERT's ``vocab.txt`` (or ``tokenizer.json``) and mT5's ``spiece.model`` are looked up in
``<file stem>.tokenizer/<slot>/``, ``<file stem>.tokenizer/``, ``models/tokenizers/<bert|mt5>/`` and the
Hugging Face cache of Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers; an ``spiece_model`` tensor in the mT5
state dict also works. `write_small_bert_vocab` writes a tiny vocabulary for tests and demos.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import torch

from comfy.text_encoders import CLIP, _make_patcher, _Slot, _spiece_bytes
from comfy.text_encoders.encoders import T5_KEY, TextEncoder, _dequantize, t5_config
from comfy.text_encoders.tokenizers import (
    SentencePieceTokenizer,
    TokenChunker,
    find_sentencepiece,
    tokenizer_dirs,
)

logger = logging.getLogger(__name__)

BERT_KEY = "encoder.layer.0.attention.self.query.weight"
BERT_START, BERT_END, BERT_PAD = 101, 102, 0   # [CLS], [SEP], [PAD] in the Chinese BERT vocabulary
_HF_REPOS = {"bert": ("hfl--chinese-roberta-wwm-ext-large", ["", "tokenizer"]),
             "mt5": ("Tencent-Hunyuan--HunyuanDiT-v1.2-Diffusers", ["tokenizer_2"])}
_HF_REPOS_BERT_EXTRA = ("Tencent-Hunyuan--HunyuanDiT-v1.2-Diffusers", ["tokenizer"])


# ---------------------------------------------------------------------------------------------------
# Models


def _strip(sd: dict, key: str) -> dict:
    for k in sd:
        if k.endswith(key) and k != key:
            prefix = k[: -len(key)]
            out = {k2[len(prefix):]: v for k2, v in sd.items() if k2.startswith(prefix)}
            if "spiece_model" in sd:
                out["spiece_model"] = sd["spiece_model"]
            return out
    return sd


def _load_hf(cls, config, weights: dict, dtype, device, name: str):
    """transformers model `cls(config)` holding `weights`, built on the meta device (no init, no download)."""
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(weights) if not k.endswith("position_ids"))
    if missing:
        raise ValueError(f"'{name}': {cls.__name__} is missing {len(missing)} weights, e.g. {missing[:3]}; the "
                         "file is truncated or not this encoder")
    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=True)
    for buf_name, buf in list(model.named_buffers()):
        if buf.is_meta:
            mod_name, attr = buf_name.rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            if attr == "position_ids":
                mod.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            elif attr == "token_type_ids":
                mod.register_buffer(attr, torch.zeros(buf.shape, dtype=torch.long), persistent=False)
            else:
                raise RuntimeError(f"buffer {buf_name} of {cls.__name__} was not initialised")
    return model.to(device=device, dtype=dtype).eval()


def build_bert(sd: dict, dtype, device, name: str = "hydit_clip"):
    """BertModel (no pooler) from a state dict in the HF layout, optionally under ``bert.``."""
    from transformers import BertConfig, BertModel

    sd = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
    vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        # head count is not stored; the Chinese RoBERTa/BERT towers use 64-wide heads
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0], layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=BERT_PAD)
    return _load_hf(lambda c: BertModel(c, add_pooling_layer=False), config, _dequantize(sd, dtype), dtype,
                    device, name)


def build_mt5(sd: dict, dtype, device, name: str = "mt5xl"):
    from transformers import MT5Config, MT5EncoderModel

    t5 = t5_config(sd, "t5")
    config = MT5Config(vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=t5.d_kv, num_heads=t5.num_heads,
                       d_ff=t5.d_ff, num_layers=t5.num_layers,
                       relative_attention_num_buckets=t5.relative_attention_num_buckets,
                       feed_forward_proj=t5.feed_forward_proj, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                       is_encoder_decoder=False, use_cache=False)
    weights = _dequantize(sd, dtype)
    emb = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = emb
    return _load_hf(MT5EncoderModel, config, weights, dtype, device, name)


# ---------------------------------------------------------------------------------------------------
# Tokenizers


class BertWordTokenizer:
    """BERT WordPiece (lower-cased, CJK characters split) from a vocab.txt or tokenizer.json."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        tj = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(tj):
            self._tok = Tokenizer.from_file(tj)
        else:
            from tokenizers import BertWordPieceTokenizer

            self._tok = BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"), lowercase=True,
                                               handle_chinese_chars=True)
        self.start_token = self._tok.token_to_id("[CLS]")
        self.end_token = self._tok.token_to_id("[SEP]")
        self.pad_token = self._tok.token_to_id("[PAD]")
        if None in (self.start_token, self.end_token, self.pad_token):
            raise ValueError(f"'{folder}': the BERT vocabulary lacks [CLS], [SEP] or [PAD]")
        self.vocab_size = self._tok.get_vocab_size()
        self.source = folder

    def encode_word(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def _dirs(kind: str, slot: str, name: str) -> list[str]:
    dirs = []
    path = name
    if ":" in os.path.basename(name):   # "<checkpoint>:<slot>" from a single-file checkpoint
        path = name[: name.rfind(":")]
    stem = os.path.splitext(path)[0]
    dirs += [os.path.join(stem + ".tokenizer", slot), stem + ".tokenizer"]
    dirs += tokenizer_dirs(kind, path)[1:]
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    repos = [_HF_REPOS[kind]] + ([_HF_REPOS_BERT_EXTRA] if kind == "bert" else [])
    for repo, subdirs in repos:
        for snap in sorted(glob.glob(os.path.join(hf_home, "hub", "models--" + repo, "snapshots", "*"))):
            dirs += [os.path.join(snap, s) for s in subdirs]
    seen: set[str] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def load_bert_tokenizer(name: str) -> BertWordTokenizer:
    dirs = _dirs("bert", "hydit_clip", name)
    for d in dirs:
        if os.path.isfile(os.path.join(d, "vocab.txt")) or os.path.isfile(os.path.join(d, "tokenizer.json")):
            return BertWordTokenizer(d)
    raise FileNotFoundError(
        f"No BERT tokenizer found for '{name}'. Put the vocab.txt of hfl/chinese-roberta-wwm-ext-large (the "
        f"'tokenizer' folder of Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers) in one of: {', '.join(dirs[:3])}")


def load_mt5_tokenizer(name: str, spiece: bytes | None) -> SentencePieceTokenizer:
    if spiece is not None:
        return SentencePieceTokenizer.from_spiece_bytes(spiece, f"{name} (embedded spiece_model)")
    dirs = _dirs("mt5", "mt5xl", name)
    found = find_sentencepiece(dirs)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"No mT5 tokenizer found for '{name}'. Put the spiece.model of google/mt5-xl (the 'tokenizer_2' folder "
        f"of Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers) in one of: {', '.join(dirs[:3])}")


_WORDS = ("a photo of cat dog sitting on red chair in the sun painting running across green grass under blue sky "
          "with white clouds astronaut riding horse moon highly detailed , . 一 只 猫 狗 在 红 色 椅 子 上 "
          "的 照 片 画 蓝 天 白 云 草 地")


def write_small_bert_vocab(directory: str) -> str:
    """A tiny BERT vocabulary with the Chinese BERT's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103) as `<directory>/vocab.txt`. For tests and demos only."""
    os.makedirs(directory, exist_ok=True)
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(dict.fromkeys(_WORDS.split()))
    tokens += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    tokens = list(dict.fromkeys(tokens))
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# CLIP


class HunyuanDiTCLIP(CLIP):
    def _combine_hunyuan_dit(self, tokens):
        cond, _ = self._encode_slot("hydit_clip", tokens)
        return cond, None

    def _mask(self, key: str, tokens: dict) -> torch.Tensor:
        enc = self.slots[key].encoder
        ids = torch.tensor([[t for t, _ in c] for c in tokens[key]], dtype=torch.long)
        return enc._mask_through_end(ids).reshape(1, -1)

    def encode_from_tokens(self, tokens: dict, return_pooled: bool | str = False, return_dict: bool = False):
        out = super().encode_from_tokens(tokens, return_pooled=return_pooled, return_dict=return_dict)
        if not return_dict:
            return out
        t5, _ = self._encode_slot("mt5xl", tokens)
        out["attention_mask"] = self._mask("hydit_clip", tokens)
        out["conditioning_mt5xl"] = t5
        out["attention_mask_mt5xl"] = self._mask("mt5xl", tokens)
        return out


def _kind(sd: dict) -> str | None:
    if any(k.endswith(BERT_KEY) for k in sd):
        return "bert"
    if any(k.endswith(T5_KEY) for k in sd):
        return "mt5"
    return None


def load_hydit_clip(state_dicts: list[dict], names: list[str], device, dtype) -> CLIP:
    found = {}
    for sd, name in zip(state_dicts, names):
        kind = _kind(sd)
        if kind is None or kind in found:
            got = ", ".join(f"{n} ({_kind(s) or 'unknown'})" for s, n in zip(state_dicts, names))
            raise ValueError(f"clip type 'hunyuan_dit' needs a BERT (Chinese CLIP) and an mT5-XL text encoder, "
                             f"one each; got {got}")
        found[kind] = (_strip(sd, BERT_KEY if kind == "bert" else T5_KEY), name)
    if set(found) != {"bert", "mt5"}:
        raise ValueError("clip type 'hunyuan_dit' needs both a BERT (Chinese CLIP) and an mT5-XL text encoder; "
                         f"got only {', '.join(n for _, n in found.values())}")
    bert_sd, bert_name = found["bert"]
    mt5_sd, mt5_name = found["mt5"]
    bert_tok = load_bert_tokenizer(bert_name)
    mt5_tok = load_mt5_tokenizer(mt5_name, _spiece_bytes(mt5_sd))
    bert = build_bert({k: v for k, v in bert_sd.items() if k != "spiece_model"}, dtype, device, bert_name)
    mt5 = build_mt5({k: v for k, v in mt5_sd.items() if k != "spiece_model"}, dtype, device, mt5_name)
    for tok, model, name in ((bert_tok, bert, bert_name), (mt5_tok, mt5, mt5_name)):
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"'{name}': its tokenizer has {tok.vocab_size} tokens but the encoder only "
                             f"{model.config.vocab_size} embeddings; put the matching tokenizer beside the file")
    slots = {
        "hydit_clip": _Slot(TextEncoder(bert, "bert", use_attention_mask=True, end_token=bert_tok.end_token),
                            TokenChunker(bert_tok, max_length=512, pad_token=bert_tok.pad_token,
                                         pad_to_max_length=False, min_length=77)),
        "mt5xl": _Slot(TextEncoder(mt5, "t5", use_attention_mask=True, end_token=mt5_tok.end_token),
                       TokenChunker(mt5_tok, max_length=None, pad_token=0, min_length=256)),
    }
    clip = HunyuanDiTCLIP(slots, "hunyuan_dit")
    import comfy.model_management as mm

    clip.patcher = _make_patcher(clip.cond_stage_model, device, mm.unet_offload_device())
    logger.info("Loaded HunyuanDiT text encoders: BERT '%s', mT5 '%s'", bert_name, mt5_name)
    return clip
