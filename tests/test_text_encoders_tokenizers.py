"""Tokenizers and ComfyUI's prompt syntax: weights, escapes, CLIP chunking/padding, T5 padding, lookup."""

from __future__ import annotations

import pytest

from comfy.text_encoders import tokenizers as tk


def test_prompt_weight_syntax():
    assert tk.parse_prompt_weights("a cat") == [("a cat", 1.0)]
    assert tk.parse_prompt_weights("a (cat:1.5) sat") == [("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]
    out = tk.parse_prompt_weights("((dog)) (bird)")
    assert [t for t, _ in out] == ["dog", " ", "bird"]
    assert out[0][1] == pytest.approx(1.21) and out[2][1] == pytest.approx(1.1)
    # explicit weight inside a group replaces the outer emphasis
    assert tk.parse_prompt_weights("((x:0.5))")[0] == ("x", 0.5)
    # escaped parentheses are literal text at weight 1
    assert tk.parse_prompt_weights(r"\(not weighted\)") == [("(not weighted)", 1.0)]
    # a colon that is not followed by a number keeps the text and the 1.1 emphasis
    t, w = tk.parse_prompt_weights("(a:b)")[0]
    assert t == "a:b" and w == pytest.approx(1.1)
    # an unclosed group is plain text
    assert tk.parse_prompt_weights("(open") == [("(open", 1.0)]


@pytest.fixture(scope="module")
def clip_tok():
    return tk.load_tokenizer("clip")


def test_clip_tokenizer_known_ids(clip_tok):
    # ids of CLIP's released vocabulary (same as openai/clip-vit-large-patch14's tokenizer)
    assert clip_tok.encode_word("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.start_token, clip_tok.end_token) == (49406, 49407)


def test_clip_tokenizer_matches_transformers(clip_tok):
    from transformers import CLIPTokenizer

    vocab, merges = tk.clip_vocab_from_bpe_file(tk.packaged_clip_bpe_path())
    try:
        ref = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    except TypeError:
        pytest.skip("this transformers version builds CLIPTokenizer from files only")
    for text in ["A Dog's 12 toys!!", "héllo   wörld\tnew\nline", "cinematic, 4k, (masterpiece)", "日本語 text"]:
        assert clip_tok.encode_word(text) == ref(text)["input_ids"][1:-1], text


def test_clip_chunks_pad_to_77(clip_tok):
    chunks = tk.TokenChunker(clip_tok).tokenize("a (photo:1.3) of a cat")
    assert len(chunks) == 1 and len(chunks[0]) == 77
    ids = [t for t, _ in chunks[0]]
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70  # CLIP-L pads with the end token
    assert chunks[0][2][1] == pytest.approx(1.3) and chunks[0][1][1] == 1.0
    g = tk.TokenChunker(clip_tok, pad_token=0).tokenize("a cat")[0]
    assert [t for t, _ in g][:5] == [49406, 320, 2368, 49407, 0]  # CLIP-G pads with 0


def test_clip_long_prompt_chunks(clip_tok):
    chunks = tk.TokenChunker(clip_tok).tokenize(" ".join(["cat"] * 100))
    assert [len(c) for c in chunks] == [77, 77]
    assert [t for t, _ in chunks[0]] == [49406] + [2368] * 75 + [49407]
    assert [t for t, _ in chunks[1]][:27] == [49406] + [2368] * 25 + [49407]


def test_clip_word_moves_whole_to_next_chunk(clip_tok):
    word = "photographically"  # several tokens, fewer than 8
    n = len(clip_tok.encode_word(word))
    assert 1 < n < 8
    chunks = tk.TokenChunker(clip_tok).tokenize(" ".join(["cat"] * 74 + [word]))
    first = [t for t, _ in chunks[0]]
    assert first[:75] == [49406] + [2368] * 74 and first[75:] == [49407, 49407]
    assert [t for t, _ in chunks[1]][1:1 + n] == clip_tok.encode_word(word)


def test_t5_tokenizer_written_and_found(tmp_path):
    model = tmp_path / "t5_tiny.safetensors"
    tk.write_small_tokenizer("t5", str(tmp_path / "t5_tiny.tokenizer"))
    tok = tk.load_tokenizer("t5", str(model))
    assert (tok.end_token, tok.pad_token) == (1, 0)
    ids = tok.encode_word("cat")
    assert ids and all(i > 2 for i in ids)
    chunks = tk.TokenChunker(tok, max_length=None, pad_token=0, min_length=16).tokenize("a (cat:2) " * 20)
    assert len(chunks) == 1  # T5 is never chunked
    c = chunks[0]
    assert len(c) > 16 and c[-1] == (1, 1.0)
    short = tk.TokenChunker(tok, max_length=None, pad_token=0, min_length=16).tokenize("a cat")[0]
    assert len(short) == 16 and [t for t, _ in short][-5:] == [0] * 5
    assert short[len(tok.encode_word("a")) + len(tok.encode_word("cat"))] == (1, 1.0)  # '</s>' then padding


def test_missing_t5_tokenizer_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as e:
        tk.load_tokenizer("umt5", str(tmp_path / "umt5.safetensors"))
    msg = str(e.value)
    assert "spiece.model" in msg and "umt5.tokenizer" in msg and "google/umt5-xxl" in msg
