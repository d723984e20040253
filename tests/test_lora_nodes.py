"""LoraLoader / LoraLoaderModelOnly nodes: the file is read once across strength changes, text-encoder LoRA
keys patch the CLIP (same output as a CLIP built from hand-merged weights), inputs stay untouched."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

import comfy.lora
import comfy.sd
import comfy.text_encoders as te
import comfy.utils
import nodes
from tests.test_lora_flux import _base_sd, _bfl_format_lora, _run


def _clip_sd(seed=0):
    from tests.test_lora_flux import demo

    return demo.random_clip_l_state_dict(hidden=64, layers=2, seed=seed)


def _encode(clip):
    tokens = clip.tokenize("a red cube")
    with torch.no_grad():
        return clip.encode_from_tokens(tokens, return_pooled=True)


def test_lora_loader_patches_model_and_clip_and_reads_file_once(base_dir, monkeypatch):
    sd = _base_sd()
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    clip_sd = _clip_sd()
    clip = te.load_text_encoders([clip_sd], "stable_diffusion", ["clip_l.safetensors"])
    g = torch.Generator().manual_seed(8)
    lora, deltas = _bfl_format_lora("kohya", g)
    # kohya text-encoder key: lora_te1_ = CLIP-L
    te_mod = "text_model.encoder.layers.1.self_attn.v_proj"
    up, down = torch.randn(64, 2, generator=g) * 0.3, torch.randn(2, 64, generator=g) * 0.3
    name = "lora_te1_" + te_mod.replace(".", "_")
    lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"] = up, down
    lora[f"{name}.alpha"] = torch.tensor(1.0)
    (base_dir / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(base_dir / "models" / "loras" / "style.safetensors"))

    reads = []
    real_load = comfy.utils.load_torch_file
    monkeypatch.setattr(comfy.utils, "load_torch_file", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    node = nodes.NODE_CLASS_MAPPINGS["LoraLoader"]()
    m1, c1 = node.load_lora(model, clip, "style.safetensors", 1.0, 0.5)
    m2, c2 = node.load_lora(model, clip, "style.safetensors", 0.3, 0.5)
    assert len(reads) == 1  # the strength change re-used the cached file
    assert m1 is not model and not model.patches and clip.patcher.patches == {}

    # CLIP: same as a CLIP built from weights merged by hand
    merged = {k: v.clone() for k, v in clip_sd.items()}
    merged[f"{te_mod}.weight"] += 0.5 * (up @ down) * 0.5
    ref_clip = te.load_text_encoders([merged], "stable_diffusion", ["clip_l.safetensors"])
    cond, pooled = _encode(c1)
    rcond, rpooled = _encode(ref_clip)
    torch.testing.assert_close(cond, rcond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, rpooled, rtol=1e-5, atol=1e-5)
    base_cond, _ = _encode(clip)  # the input CLIP is unchanged (its patcher unpatches c1's weights)
    assert not torch.allclose(base_cond, cond, atol=1e-4)

    # model at strength 0.3 equals the hand merge at 0.3
    merged_m = {k: v.clone() for k, v in sd.items()}
    for mod, d in deltas.items():
        merged_m[f"{mod}.weight"] += 0.3 * d
    ref = _run(comfy.sd.load_diffusion_model_state_dict(merged_m))
    m2.patch_model(torch.device("cpu"))
    torch.testing.assert_close(_run(m2), ref, rtol=1e-5, atol=1e-5)
    m2.unpatch_model()

    only = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    (m3,) = only.load_lora_model_only(model, "style.safetensors", 0.3)
    m3.patch_model(torch.device("cpu"))
    torch.testing.assert_close(_run(m3), ref, rtol=1e-5, atol=1e-5)
    m3.unpatch_model()
    assert node.load_lora(model, clip, "style.safetensors", 0.0, 0.0) == (model, clip)


def test_clip_key_map_names_t5_as_second_encoder_for_flux():
    class Enc(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            self.transformer = torch.nn.Module()
            for n in names:
                parent = self.transformer
                parts = n.split(".")
                for p in parts[:-1]:
                    if not hasattr(parent, p):
                        parent.add_module(p, torch.nn.Module())
                    parent = getattr(parent, p)
                parent.add_module(parts[-1], torch.nn.Linear(2, 2))

    flux_clip = torch.nn.ModuleDict({"clip_l": Enc(["text_model.encoder.layers.0.self_attn.q_proj"]),
                                     "t5xxl": Enc(["encoder.block.0.layer.0.SelfAttention.q"])})
    m = comfy.lora.model_lora_keys_clip(flux_clip)
    t5_key = "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert m["lora_te2_encoder_block_0_layer_0_SelfAttention_q"] == t5_key
    assert m["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"] == t5_key
    assert m["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].startswith("clip_l.transformer.")
    sd3_clip = torch.nn.ModuleDict({"clip_g": Enc(["text_model.encoder.layers.0.self_attn.q_proj"]),
                                    "t5xxl": Enc(["encoder.block.0.layer.0.SelfAttention.q"])})
    m3 = comfy.lora.model_lora_keys_clip(sd3_clip)
    assert m3["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == t5_key
    assert "lora_te2_encoder_block_0_layer_0_SelfAttention_q" not in m3
