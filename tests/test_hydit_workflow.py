"""HunyuanDiT v1.2 end to end: a tiny single-file checkpoint in ComfyUI's layout (transformer under
model.diffusion_model., BERT under text_encoders.hydit_clip.transformer.bert., mT5-XL under
text_encoders.mt5xl.transformer., the SDXL-style VAE under vae.) through CheckpointLoaderSimple, KSampler and
VAEDecode in execution.PromptExecutor, PNG written; plus the text encoders' conditioning and V prediction."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.demo_models import demo_script
from tests.test_hydit_oracle import random_hydit_state_dict
from tests.test_pixart_workflow import random_sdxl_vae_state_dict

BERT_WIDTH, MT5_WIDTH = 32, 48
# the released text lengths (77 CLIP + 256 mT5 tokens): the tokenizers pad to them and the mT5 pool's
# positions are sized for them
HYDIT = dict(text_len=77, text_len_t5=256, text_states_dim=BERT_WIDTH, text_states_dim_t5=MT5_WIDTH,
             t5_mlp_hidden=4 * MT5_WIDTH, depth=4)


def random_bert_state_dict(vocab: int, hidden: int = BERT_WIDTH, layers: int = 2, seed: int = 3) -> dict:
    import transformers as tr

    cfg = tr.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=1,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = tr.BertModel(cfg, add_pooling_layer=False)
    return {f"bert.{k}": v.contiguous() for k, v in m.state_dict().items() if not k.endswith("_ids")}


def write_hydit_checkpoint(path: str, seed: int = 0) -> None:
    from comfy.text_encoders.hydit import write_small_bert_vocab

    demo = demo_script()
    tok_dir = os.path.join(os.path.splitext(path)[0] + ".tokenizer", "hydit_clip")
    vocab_size = sum(1 for _ in open(write_small_bert_vocab(tok_dir), encoding="utf-8"))
    sd = {f"model.diffusion_model.{k}": v for k, v in random_hydit_state_dict(seed=seed, **HYDIT).items()}
    mt5 = demo.random_t5_state_dict(d_model=MT5_WIDTH, heads=2, layers=2, seed=seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        mt5["spiece_model"] = demo._spiece_tensor(tmp)
    sd.update({f"text_encoders.mt5xl.transformer.{k}": v for k, v in mt5.items()})
    sd.update({f"text_encoders.hydit_clip.transformer.{k}": v
               for k, v in random_bert_state_dict(vocab_size, seed=seed + 3).items()})
    sd.update({f"vae.{k}": v for k, v in random_sdxl_vae_state_dict(seed + 2).items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)


def hydit_prompt(seed: int = 42) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-hunyuan-dit-1.2.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "一只猫 a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 6.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hydit", "images": ["6", 0]}},
    }


@pytest.fixture
def ckpt(base_dir):
    path = os.path.join(base_dir, "models", "checkpoints", "tiny-hunyuan-dit-1.2.safetensors")
    write_hydit_checkpoint(path)
    return path


def test_checkpoint_loads_every_part(ckpt):
    from diffusers import DDPMScheduler

    import comfy.model_base
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
    assert type(model.model).__name__ == "HunyuanDiT"
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    dm = model.model.diffusion_model
    assert dm.depth == 4 and not dm.use_style_cond and dm.text_len_t5 == 256
    assert model.model.latent_format.scale_factor == 0.13025
    # HunyuanDiT v1.1+'s scheduler: scaled-linear betas 0.00085..0.03
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear")
    sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    torch.testing.assert_close(model.get_model_object("model_sampling").sigmas, sigmas.float(), rtol=1e-5,
                               atol=1e-6)
    assert clip.clip_type == "hunyuan_dit" and set(clip.slots) == {"hydit_clip", "mt5xl"}
    assert vae.latent_channels == 4


def test_text_encoders_give_the_conditioning_hunyuan_dit_reads(ckpt):
    import comfy.sd

    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_model=False)
    tokens = clip.tokenize("一只猫 a cat")
    bert = [t for t, _ in tokens["hydit_clip"][0]]
    assert bert[0] == 101 and 102 in bert and len(bert) == 77 and bert[-1] == 0   # [CLS] ... [SEP] [PAD]...
    assert len(tokens["mt5xl"][0]) == 256 and tokens["mt5xl"][0][0][0] != 1
    cond, extra = clip.encode_from_tokens_scheduled(tokens)[0]
    assert cond.shape == (1, 77, BERT_WIDTH) and "pooled_output" not in extra
    assert extra["conditioning_mt5xl"].shape == (1, 256, MT5_WIDTH)
    mask = extra["attention_mask"]
    assert mask.shape == (1, 77) and mask[0].sum() == bert.index(102) + 1 and mask[0, -1] == 0
    m5 = extra["attention_mask_mt5xl"]
    assert m5.shape == (1, 256) and 1 < m5[0].sum() < 256
    # the masked (padding) encoder run matches transformers' BertModel given the same mask
    enc = clip.slots["hydit_clip"].encoder.transformer
    ids = torch.tensor([bert])
    with torch.no_grad():
        ref = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(cond, ref.float())


def test_wrong_encoder_set_names_the_fix(base_dir):
    from comfy.text_encoders import load_text_encoders

    demo = demo_script()
    t5 = demo.random_t5_state_dict(d_model=MT5_WIDTH, heads=2, layers=1)
    with pytest.raises(ValueError, match="BERT"):
        load_text_encoders([t5], "hunyuan_dit", names=["only-mt5.safetensors"])


def test_hydit_workflow_writes_reproducible_png(ckpt, base_dir):
    import execution
    import nodes
    from tests.fixtures.harness import seeds_give_reproducible_distinct_pngs

    nodes.init_extra_nodes(init_custom_nodes=False)
    ok, err, outputs, node_errors = execution.validate_prompt("p0", hydit_prompt())
    assert ok, (err, node_errors)
    seeds_give_reproducible_distinct_pngs(hydit_prompt, "7", (64, 64), "hydit")


def test_sampler_batches_cond_and_uncond_with_masks_and_t5(ckpt):
    import comfy.sd
    import nodes

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    dm = model.model.diffusion_model
    seen = []
    orig = dm.forward

    def spy(x, timestep, context, **kw):
        seen.append((x.shape[0], tuple(context.shape), tuple(kw["encoder_hidden_states_t5"].shape),
                     kw["text_embedding_mask"].sum(dim=1).tolist()))
        return orig(x, timestep, context, **kw)

    dm.forward = spy
    out = nodes.common_ksampler(model, 1, 2, 5.0, "euler", "normal", pos, neg,
                                {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    # both prompts pad to 77 / 256 tokens, so cond and uncond run together in one call per step
    assert len(seen) == 2 and all(s[0] == 2 and s[1] == (2, 77, BERT_WIDTH) and s[2] == (2, 256, MT5_WIDTH)
                                  for s in seen)
    assert sorted(seen[0][3]) == [2, int(pos[0][1]["attention_mask"].sum())]   # "" is [CLS] [SEP]
