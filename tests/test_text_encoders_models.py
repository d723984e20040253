"""Text encoders loaded from tiny random-weight files in ComfyUI's (HF) key layout, checked against
transformers' own forward on the same weights, plus the flux / sd3 / wan combinations' shapes."""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from safetensors.torch import save_file

import comfy.text_encoders as te
from comfy.text_encoders import tokenizers as tk
from comfy.text_encoders.encoders import detect_text_encoder


def _clip(hidden: int, layers: int = 2, proj: int | None = None, act: str = "quick_gelu", seed: int = 0):
    torch.manual_seed(seed)
    cfg = tr.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            projection_dim=proj or hidden, hidden_act=act, eos_token_id=49407)
    m = tr.CLIPTextModelWithProjection(cfg).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
    return m, sd


def _t5(d_model: int, heads: int, vocab: int = 160, layers: int = 2, umt5: bool = False, seed: int = 1):
    torch.manual_seed(seed)
    cls_cfg, cls = (tr.UMT5Config, tr.UMT5EncoderModel) if umt5 else (tr.T5Config, tr.T5EncoderModel)
    cfg = cls_cfg(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, num_heads=heads, d_ff=2 * d_model,
                  num_layers=layers, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    m = cls(cfg).eval()
    # ComfyUI's T5 files carry shared.weight, not the tied encoder.embed_tokens copy
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return m, sd


def _ids(chunks):
    return torch.tensor([[t for t, _ in c] for c in chunks])


def test_detection_and_wrong_file_error():
    _, sd = _clip(64)
    assert detect_text_encoder(sd) == "clip"
    _, t5 = _t5(32, 2)
    assert detect_text_encoder(t5) == "t5"
    _, u = _t5(32, 2, umt5=True)
    assert detect_text_encoder(u) == "umt5"
    with pytest.raises(ValueError, match=r"flux_vae\.safetensors.*VAELoader"):
        detect_text_encoder({"decoder.conv_in.weight": torch.zeros(1)}, "flux_vae.safetensors")


def test_clip_l_matches_transformers_and_weights():
    ref, sd = _clip(128, layers=3, proj=96)
    clip = te.load_text_encoders([sd], "stable_diffusion", ["clip_l.safetensors"])
    tokens = clip.tokenize("a photo of a cat")
    ids = _ids(tokens["l"])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, 128) and pooled.shape == (1, 96)
    assert torch.equal(cond, out.last_hidden_state)
    assert torch.equal(pooled, out.text_embeds)  # projected pooled at the first end token
    # CLIPSetLastLayer -2: the penultimate layer's output (SD1 applies the final norm to it)
    c2 = clip.clone()
    c2.clip_layer(-2)
    hidden = c2.encode_from_tokens(tokens)
    assert torch.allclose(hidden, ref.text_model.final_layer_norm(out.hidden_states[-2]), atol=0, rtol=0)
    assert torch.equal(clip.encode_from_tokens(tokens), cond)  # the clone's setting did not leak
    # weights: z_w = z_empty + (z - z_empty) * w on the weighted tokens only
    wt = clip.tokenize("a (photo:1.5) of a cat")
    zw = clip.encode_from_tokens(wt)
    empty_ids = torch.tensor([[49406] + [49407] * 76])
    with torch.no_grad():
        z_empty = ref(input_ids=empty_ids).last_hidden_state
    expect = cond.clone()
    expect[0, 2] = z_empty[0, 2] + (cond[0, 2] - z_empty[0, 2]) * 1.5
    assert torch.allclose(zw, expect, atol=1e-6)
    assert torch.equal(zw[0, 3:], cond[0, 3:])


def test_long_prompt_concatenates_chunks():
    _, sd = _clip(64)
    clip = te.load_text_encoders([sd], "stable_diffusion")
    tokens = clip.tokenize(" ".join(["cat"] * 80))
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 154, 64) and pooled.shape == (1, 64)


def _t5_file(tmp_path, name, sd):
    path = tmp_path / name
    save_file(sd, str(path))
    tk.write_small_tokenizer("t5", str(tmp_path / (path.stem + ".tokenizer")))
    return str(path)


def test_flux_combination(tmp_path):
    ref_l, sd_l = _clip(64, proj=32)
    ref_t5, sd_t5 = _t5(48, 4)
    t5_path = _t5_file(tmp_path, "t5xxl_tiny.safetensors", sd_t5)
    clip = te.load_text_encoders([sd_l, sd_t5], "flux", ["clip_l.safetensors", t5_path])
    tokens = clip.tokenize("a (red:1.2) fox")
    assert len(tokens["t5xxl"][0]) == 256 and len(tokens["l"][0]) == 77
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))
    assert len(cond) == 1
    c, extra = cond[0]
    assert c.shape == (1, 256, 48) and extra["pooled_output"].shape == (1, 64)  # unprojected pooled
    t = clip.tokenize("a red fox")
    with torch.no_grad():
        assert torch.equal(c, ref_t5(input_ids=_ids(t["t5xxl"])).last_hidden_state)  # no mask for Flux
        assert torch.equal(extra["pooled_output"], ref_l.text_model(input_ids=_ids(t["l"])).pooler_output)


def test_sd3_combination(tmp_path):
    ref_l, sd_l = _clip(64, layers=3)
    ref_g, sd_g = _clip(128, layers=3, proj=128, act="gelu", seed=5)
    _, sd_t5 = _t5(256, 4)
    t5_path = _t5_file(tmp_path, "t5_sd3.safetensors", sd_t5)
    # order does not matter: the wider CLIP is G
    clip = te.load_text_encoders([sd_g, sd_t5, sd_l], "sd3", ["clip_g.safetensors", t5_path, "clip_l.sft"])
    assert set(clip.slots) == {"l", "g", "t5xxl"}
    tokens = clip.tokenize("a cat")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77 + 77, 256) and pooled.shape == (1, 64 + 128)
    with torch.no_grad():
        l_h = ref_l(input_ids=_ids(tokens["l"]), output_hidden_states=True)
        g_h = ref_g(input_ids=_ids(tokens["g"]), output_hidden_states=True)
    assert torch.equal(cond[0, :77, :64], l_h.hidden_states[-2][0])  # penultimate, no final norm
    assert torch.equal(cond[0, :77, 64:192], g_h.hidden_states[-2][0])
    assert torch.count_nonzero(cond[0, :77, 192:]) == 0
    assert torch.equal(pooled[:, 64:], g_h.text_embeds)  # G pooled is projected
    # CLIP-only SD3 (no T5): padded to 4096 channels
    only = te.load_text_encoders([sd_l, sd_g], "sd3")
    assert only.encode_from_tokens(only.tokenize("x")).shape == (1, 77, 4096)


def test_wan_umt5_masks_padding_and_embedded_tokenizer(tmp_path):
    ref, sd = _t5(64, 4, umt5=True)
    spm = tk.write_small_tokenizer("umt5", str(tmp_path / "spm"))
    sd["spiece_model"] = torch.frombuffer(bytearray(open(spm, "rb").read()), dtype=torch.uint8)
    clip = te.load_text_encoders([sd], "wan", ["umt5_xxl.safetensors"])  # tokenizer comes from the file
    tokens = clip.tokenize("a dog in the snow")
    ids = _ids(tokens["umt5xxl"])
    assert ids.shape == (1, 512)
    end = int((ids[0] == 1).nonzero()[0])
    cond = clip.encode_from_tokens(tokens)
    mask = (torch.arange(512) <= end).long()[None]
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(cond[0, : end + 1], expect[0, : end + 1])
    assert torch.count_nonzero(cond[0, end + 1:]) == 0


def test_wrong_combination_names_files():
    _, sd_l = _clip(64)
    with pytest.raises(ValueError, match=r"flux.*CLIP-L and a T5-XXL.*clip_l\.safetensors \(clip\)"):
        te.load_text_encoders([sd_l], "flux", ["clip_l.safetensors"])
    with pytest.raises(ValueError, match="not supported"):
        te.load_text_encoders([sd_l], "hidream", ["x"])


def test_patcher_weight_keys_use_comfy_names():
    _, sd = _clip(64)
    clip = te.load_text_encoders([sd], "stable_diffusion")
    keys = clip.get_sd().keys()
    assert "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    if clip.patcher is not None:  # LoRA patches address the encoders through these names
        assert clip.patcher.model is clip.cond_stage_model
        assert clip.clone().patcher is not clip.patcher


def test_t5_tokenizer_options(tmp_path):
    _, sd_l = _clip(64)
    _, sd_t5 = _t5(48, 4)
    clip = te.load_text_encoders([sd_l, sd_t5], "flux", ["clip_l", _t5_file(tmp_path, "t5.safetensors", sd_t5)])
    n = len(clip.tokenize("a cat")["t5xxl"][0])
    assert n == 256
    c2 = clip.clone()  # T5TokenizerOptions(min_padding=3, min_length=0) on a clone
    c2.set_tokenizer_option("t5xxl_min_padding", 3)
    c2.set_tokenizer_option("t5xxl_min_length", 0)
    t = c2.tokenize("a cat")["t5xxl"][0]
    assert [x for x, _ in t][-4:] == [1, 0, 0, 0] and len(t) < 256
    assert len(clip.tokenize("a cat")["t5xxl"][0]) == 256  # the original is unchanged
    assert c2.encode_from_tokens(c2.tokenize("a cat")).shape == (1, len(t), 48)


def test_full_size_configs_from_shapes():
    """Real CLIP-G and T5-XXL shapes (meta tensors: nothing allocated) give the published sizes."""
    from comfy.text_encoders.encoders import clip_config, t5_config

    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    g = {"text_model.embeddings.token_embedding.weight": m(49408, 1280),
         "text_model.embeddings.position_embedding.weight": m(77, 1280),
         "text_model.encoder.layers.0.mlp.fc1.weight": m(5120, 1280), "text_projection.weight": m(1280, 1280)}
    g.update({f"text_model.encoder.layers.{i}.mlp.fc2.weight": m(1280, 5120) for i in range(32)})
    cfg = clip_config(g)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act) == (
        32, 20, 5120, "gelu")
    t5 = {"shared.weight": m(32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": m(4096, 4096),
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": m(32, 64),
          "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": m(10240, 4096)}
    t5.update({f"encoder.block.{i}.layer.0.layer_norm.weight": m(4096) for i in range(24)})
    cfg = t5_config(t5, "t5")
    assert (cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (24, 64, 64, 10240, 32128)
    assert cfg.is_gated_act
