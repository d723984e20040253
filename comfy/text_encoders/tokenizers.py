"""Tokenizers for the text encoders, and ComfyUI's prompt syntax on top of them.

Owns:
- `parse_prompt_weights`: ComfyUI's `(text:1.2)` / `(text)` / `\\(` syntax -> [(text, weight)].
- `CLIPBPETokenizer`: the CLIP byte-level BPE (CLIP-L and CLIP-G share it), built from the vocabulary
  file OpenAI released, which the `open-clip-torch` wheel carries (read as data: open_clip itself is never
  imported, it needs torchvision).
- `SentencePieceTokenizer`: T5 / umT5 from a sentencepiece model (`spiece.model`), or a tokenizers
  `tokenizer.json`; found next to the model file, in `models/tokenizers/<kind>/`, in the Hugging Face
  cache, or inside the encoder file itself (ComfyUI stores umT5's as a `spiece_model` uint8 tensor).
- `TokenChunker`: word-wise tokenization, 75-token CLIP chunks with start/end and padding to 77, and
  T5's unchunked sequences padded to a minimum length.
- `write_small_tokenizer`: a tiny tokenizer of the right kind for demo and test models, written where
  the lookup finds it, so nothing is downloaded.

Tokens are ComfyUI's shape: per encoder, a list of chunks, each a list of (token_id, weight) pairs.
"""

from __future__ import annotations

import functools
import glob
import gzip
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

CLIP_START, CLIP_END = 49406, 49407

# ---------------------------------------------------------------------------------------------------
# Prompt weights


def _split_parentheses(text: str) -> list[str]:
    """Top-level split into plain runs and balanced '(...)' groups; an unclosed '(' stays plain text."""
    out: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                if i > start:
                    out.append(text[start:i])
                start = i
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start:i + 1])
                start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            inner_weight = weight * 1.1  # a bare group emphasises by 1.1 per level
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    # an explicit weight replaces (does not multiply) the enclosing one, as in ComfyUI
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass  # "(a:b)" is text with a colon in it, emphasised by 1.1
            out += _weights(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


_ESC_OPEN, _ESC_CLOSE = "\0\1", "\0\2"


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """ComfyUI prompt weights: "a (b:1.2) ((c)) \\(d\\)" -> [("a ", 1.0), ("b", 1.2), (" ", 1.0),
    ("c", 1.21), (" (d)", 1.0)]. Escaped parentheses are literal text."""
    text = text.replace("\\(", _ESC_OPEN).replace("\\)", _ESC_CLOSE)
    return [(t.replace(_ESC_OPEN, "(").replace(_ESC_CLOSE, ")"), w) for t, w in _weights(text, 1.0)]


# ---------------------------------------------------------------------------------------------------
# CLIP BPE


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to code points
    from 256 up, so every byte is a visible character in the vocabulary. The dict's order (printable
    bytes first, then the rest) is the order of the first 256 vocabulary entries."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def packaged_clip_bpe_path() -> str | None:
    """The CLIP BPE merges file shipped in the open-clip-torch wheel (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def clip_vocab_from_bpe_file(path: str) -> tuple[dict[str, int], list[str]]:
    """Rebuild CLIP's 49408-entry vocabulary and its 48894 merges from OpenAI's merges file."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is the version header; CLIP used the first 48894
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPBPETokenizer:
    """CLIP's tokenizer (lower-cased, byte-level BPE with '</w>' word ends) on the `tokenizers` library,
    from the vocabulary rebuilt from the packaged merges file or a vocab.json/merges.txt folder."""

    start_token = CLIP_START
    end_token = CLIP_END

    def __init__(self, vocab: dict[str, int], merges: list[str]):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        pairs = [tuple(m.split()) for m in merges]
        tok = Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token="<|endoftext|>", end_of_word_suffix="</w>",
                            continuing_subword_prefix="", fuse_unk=False, dropout=None))
        # CLIP's text cleaning: NFC, whitespace runs to one space, lower case; then CLIP's word pattern
        # (letters runs, single digits, punctuation runs, English contractions) before byte-level BPE.
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                       r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self._tok = tok
        self.start_token = vocab["<|startoftext|>"]
        self.end_token = vocab["<|endoftext|>"]
        self.vocab_size = len(vocab)

    def encode_word(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    @classmethod
    def from_folder(cls, folder: str) -> CLIPBPETokenizer:
        import json

        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        return cls(vocab, merges)


@functools.lru_cache(maxsize=1)
def _packaged_clip_tokenizer() -> CLIPBPETokenizer:
    path = packaged_clip_bpe_path()
    if path is None:
        raise FileNotFoundError(
            "The CLIP tokenizer vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found. Install it with "
            "`pip install --no-deps open-clip-torch` (scripts/setup_env.sh does this), or put vocab.json and "
            "merges.txt in models/tokenizers/clip/.")
    return CLIPBPETokenizer(*clip_vocab_from_bpe_file(path))


# ---------------------------------------------------------------------------------------------------
# T5 / umT5 sentencepiece


class SentencePieceTokenizer:
    """T5 / umT5 tokenizer: a sentencepiece model (the one the encoder was trained with) or a tokenizers
    `tokenizer.json` converted from it. T5 has no start token; every sequence ends with '</s>'."""

    start_token = None

    def __init__(self, encode: Callable[[str], list[int]], end_token: int, pad_token: int, vocab_size: int,
                 source: str):
        self._encode = encode
        self.end_token = end_token
        self.pad_token = pad_token
        self.vocab_size = vocab_size
        self.source = source

    def encode_word(self, text: str) -> list[int]:
        return list(self._encode(text))

    @classmethod
    def from_spiece_bytes(cls, data: bytes, source: str) -> SentencePieceTokenizer:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        eos = sp.eos_id() if sp.eos_id() >= 0 else 1
        pad = sp.pad_id() if sp.pad_id() >= 0 else 0
        return cls(lambda t: sp.encode(t, add_bos=False, add_eos=False), eos, pad, sp.get_piece_size(), source)

    @classmethod
    def from_tokenizer_json(cls, path: str) -> SentencePieceTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        eos = tok.token_to_id("</s>")
        pad = tok.token_to_id("<pad>")
        return cls(lambda t: tok.encode(t, add_special_tokens=False).ids, 1 if eos is None else eos,
                   0 if pad is None else pad, tok.get_vocab_size(), path)


# Where the Hugging Face cache keeps the original repositories' tokenizer files, per kind.
_HF_CACHE_REPOS = {
    "t5": ["google--t5-v1_1-xxl", "black-forest-labs--FLUX.1-dev", "black-forest-labs--FLUX.1-schnell",
           "stabilityai--stable-diffusion-3-medium-diffusers", "stabilityai--stable-diffusion-3.5-large"],
    "umt5": ["google--umt5-xxl", "Wan-AI--Wan2.1-T2V-1.3B-Diffusers", "Wan-AI--Wan2.1-T2V-14B-Diffusers"],
}
_HF_CACHE_SUBDIRS = ["", "tokenizer", "tokenizer_2", "tokenizer_3", "google/umt5-xxl"]


def tokenizer_dirs(kind: str, model_path: str | None) -> list[str]:
    """Folders searched, in order, for a `kind` ("t5", "umt5", "clip") tokenizer of a model file."""
    dirs: list[str] = []
    if model_path:
        stem = os.path.splitext(model_path)[0]
        dirs += [stem + ".tokenizer", os.path.join(os.path.dirname(model_path), "tokenizers", kind)]
    try:
        import folder_paths

        for d in folder_paths.get_folder_paths("text_encoders"):
            dirs.append(os.path.join(os.path.dirname(d.rstrip(os.sep)), "tokenizers", kind))
    except (ImportError, KeyError):
        pass  # folder_paths is not configured (library use): the other places still work
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    for repo in _HF_CACHE_REPOS.get(kind, []):
        for snap in sorted(glob.glob(os.path.join(hf_home, "hub", "models--" + repo, "snapshots", "*"))):
            dirs += [os.path.join(snap, s) for s in _HF_CACHE_SUBDIRS]
    seen: set[str] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def find_sentencepiece(dirs: list[str]) -> SentencePieceTokenizer | None:
    """The first spiece.model (or tokenizer.json) in `dirs`, in order; None when there is none."""
    for d in dirs:
        sp = os.path.join(d, "spiece.model")
        if os.path.isfile(sp):
            with open(sp, "rb") as f:
                return SentencePieceTokenizer.from_spiece_bytes(f.read(), sp)
        tj = os.path.join(d, "tokenizer.json")
        if os.path.isfile(tj):
            return SentencePieceTokenizer.from_tokenizer_json(tj)
    return None


def load_tokenizer(kind: str, model_path: str | None = None, spiece_bytes: bytes | None = None):
    """The tokenizer for an encoder of `kind`; raises FileNotFoundError naming where to put the files."""
    if kind == "clip":
        for d in tokenizer_dirs("clip", model_path)[:2]:  # an explicit folder beside the model wins
            if os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")):
                return CLIPBPETokenizer.from_folder(d)
        return _packaged_clip_tokenizer()
    if spiece_bytes is not None:
        return SentencePieceTokenizer.from_spiece_bytes(spiece_bytes, f"{model_path} (embedded spiece_model)")
    dirs = tokenizer_dirs(kind, model_path)
    found = find_sentencepiece(dirs)
    if found is not None:
        return found
    repo = "google/t5-v1_1-xxl" if kind == "t5" else "google/umt5-xxl"
    raise FileNotFoundError(
        f"No {kind} tokenizer found for '{model_path}'. Put the tokenizer's spiece.model (or tokenizer.json) "
        f"from {repo} in one of: " + ", ".join(dirs[:3] or ["models/tokenizers/" + kind])
        + "; or place the Hugging Face cache of that repository under $HF_HOME.")


# ---------------------------------------------------------------------------------------------------
# Chunking


class TokenChunker:
    """Turns a prompt into chunks of (token, weight) for one encoder.

    CLIP: words are tokenized one by one; a chunk holds 75 tokens between start and end and is padded to
    77. A word that would cross a chunk boundary moves whole to the next chunk unless it is 8 tokens or
    longer, in which case it is split. T5/umT5: one unbounded sequence, ended with '</s>' and padded to
    `min_length`.
    """

    max_word_length = 8

    def __init__(self, tokenizer, max_length: int | None = 77, pad_token: int | None = None,
                 pad_to_max_length: bool = True, min_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.start_token = tokenizer.start_token
        self.end_token = tokenizer.end_token
        self.pad_token = tokenizer.end_token if pad_token is None else pad_token
        self.pad_to_max_length = pad_to_max_length and max_length is not None
        self.min_length = min_length

    def _new_chunk(self) -> list[tuple[int, float]]:
        return [] if self.start_token is None else [(self.start_token, 1.0)]

    def _close(self, chunk: list[tuple[int, float]], fill_to: int | None) -> None:
        chunk.append((self.end_token, 1.0))
        if fill_to is not None and len(chunk) < fill_to:
            chunk.extend([(self.pad_token, 1.0)] * (fill_to - len(chunk)))

    def tokenize(self, text: str, min_length: int | None = -1, min_padding: int | None = None
                 ) -> list[list[tuple[int, float]]]:
        """`min_length` (-1: this chunker's own) and `min_padding` (pad tokens always added after the end
        token) are T5TokenizerOptions' per-prompt overrides."""
        if min_length == -1:
            min_length = self.min_length
        words: list[list[tuple[int, float]]] = []
        for segment, weight in parse_prompt_weights(text):
            for word in segment.replace("\n", " ").split(" "):
                if word:
                    words.append([(t, weight) for t in self.tokenizer.encode_word(word)])
        chunks = [self._new_chunk()]
        limit = None if self.max_length is None else self.max_length - 1  # room left for the end token
        for group in words:
            large = len(group) >= self.max_word_length
            while group:
                chunk = chunks[-1]
                if limit is not None and len(chunk) + len(group) > limit:
                    room = limit - len(chunk)
                    if large:
                        chunk.extend(group[:room])
                        group = group[room:]
                        self._close(chunk, None)
                    else:
                        self._close(chunk, self.max_length if self.pad_to_max_length else None)
                    chunks.append(self._new_chunk())
                else:
                    chunk.extend(group)
                    group = []
        last = chunks[-1]
        self._close(last, self.max_length if self.pad_to_max_length else None)
        if min_padding:
            last.extend([(self.pad_token, 1.0)] * min_padding)
        if min_length is not None and len(last) < min_length:
            last.extend([(self.pad_token, 1.0)] * (min_length - len(last)))
        return chunks

    def empty_chunk(self, length: int) -> list[int]:
        """The token ids of an empty prompt padded to `length` (the reference for weighted tokens)."""
        ids = ([] if self.start_token is None else [self.start_token]) + [self.end_token]
        return ids + [self.pad_token] * max(0, length - len(ids))


# ---------------------------------------------------------------------------------------------------
# Small tokenizers for demo and test models

_SAMPLE_TEXT = (
    "a photo of a cat sitting on a red chair in the sun . a painting of a dog running across green grass "
    "under a blue sky with white clouds . an astronaut riding a horse on the moon , highly detailed , "
    "cinematic lighting , 4k . the quick brown fox jumps over the lazy dog . beautiful landscape with "
    "mountains , rivers , trees and a small wooden house at sunset . portrait of a woman wearing a hat ."
)


def write_small_tokenizer(kind: str, directory: str, vocab_size: int = 128) -> str:
    """Train a tiny sentencepiece model with T5's special ids (pad 0, eos 1, unk 2) and write it as
    `<directory>/spiece.model`; put `directory` where `tokenizer_dirs` looks (e.g. `<model stem>.tokenizer`).
    For tests and demos only: it is not the tokenizer any real T5/umT5 was trained with."""
    if kind not in ("t5", "umt5"):
        raise ValueError(f"write_small_tokenizer makes 't5' or 'umt5' tokenizers, not '{kind}' "
                         "(CLIP's real tokenizer is packaged with open-clip-torch)")
    import io

    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_SAMPLE_TEXT.split(" . ") * 4), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    path = os.path.join(directory, "spiece.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def token_ids(chunks: Sequence[Sequence[tuple[int, float]]]) -> list[list[int]]:
    return [[t for t, _ in c] for c in chunks]
