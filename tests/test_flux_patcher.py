"""ModelPatcher without LoRA files: clones, object patches, weight patches, options, wrappers."""

from __future__ import annotations

import os

import torch

import comfy.model_sampling
import comfy.sd
from tests.fixtures.demo_models import demo_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
demo = demo_script()


def _patcher():
    sd = demo.random_flux_state_dict(hidden_size=32, num_heads=2, context_in_dim=8, vec_in_dim=4, seed=9)
    return comfy.sd.load_diffusion_model_state_dict(sd)


def test_clone_shares_model_but_not_options():
    p = _patcher()
    c = p.clone()
    assert c.model is p.model and c.is_clone(p)
    c.model_options["transformer_options"]["foo"] = 1
    c.set_model_patch_replace("patch", "dit", "double_block", 0)
    assert "foo" not in p.model_options["transformer_options"]
    assert "patches_replace" not in p.model_options["transformer_options"]
    c2 = c.clone()
    c2.set_model_patch_replace("other", "dit", "double_block", 1)
    assert ("double_block", 1) not in c.model_options["transformer_options"]["patches_replace"]["dit"]


def test_object_patch_applies_and_unpatches():
    p = _patcher()
    original = p.model.model_sampling
    c = p.clone()
    new_ms = comfy.model_sampling.ModelSamplingFlux(shift=2.0)
    c.add_object_patch("model_sampling", new_ms)
    assert c.get_model_object("model_sampling") is new_ms
    assert p.get_model_object("model_sampling") is original
    c.patch_model(torch.device("cpu"))
    assert p.model.model_sampling is new_ms
    c.unpatch_model()
    assert p.model.model_sampling is original


def test_weight_patches_with_strength_and_switching_clones():
    p = _patcher()
    key = "diffusion_model.img_in.weight"
    w0 = p.model.diffusion_model.img_in.weight.detach().clone()
    diff = torch.ones_like(w0)
    a = p.clone()
    assert a.add_patches({key: diff, "not.a.key": diff}, strength_patch=0.5) == [key]
    b = p.clone()
    b.add_patches({key: ("diff", (diff,))}, strength_patch=2.0, strength_model=0.5)
    assert not p.patches  # the parent is untouched

    a.patch_model(torch.device("cpu"))
    torch.testing.assert_close(p.model.diffusion_model.img_in.weight, w0 + 0.5)
    # patching another clone first undoes a's patches (shared network)
    b.patch_model(torch.device("cpu"))
    torch.testing.assert_close(p.model.diffusion_model.img_in.weight, w0 * 0.5 + 2.0)
    b.unpatch_model()
    torch.testing.assert_close(p.model.diffusion_model.img_in.weight, w0)


def test_lora_patch_and_model_output_changes():
    p = _patcher()
    key = "diffusion_model.txt_in.weight"
    w = p.model.diffusion_model.txt_in.weight
    up, down = torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1])
    c = p.clone()
    c.add_patches({key: ("lora", (up, down, 4.0, None, None, None))}, strength_patch=0.25)
    x, ctx = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    kw = dict(c_crossattn=ctx, y=torch.zeros(1, 4), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        before = p.model.apply_model(x, torch.tensor([0.5]), **kw)
        w0 = w.detach().clone()
        c.patch_model(torch.device("cpu"))
        torch.testing.assert_close(p.model.diffusion_model.txt_in.weight, w0 + 0.25 * (4.0 / 2) * (up @ down))
        after = p.model.apply_model(x, torch.tensor([0.5]), **kw)
        c.unpatch_model()
        again = p.model.apply_model(x, torch.tensor([0.5]), **kw)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(before, again)


def test_attention_override_and_block_replace_reach_the_model():
    p = _patcher()
    calls = []

    def override(default, q, k, v, heads, **kw):
        calls.append(q.shape)
        return default(q, k, v, heads, **kw)

    c = p.clone()
    c.set_attention_override(override)
    replaced = []

    def replace(args, extra):
        replaced.append(True)
        return extra["original_block"](args)

    c.set_model_patch_replace(replace, "dit", "single_block", 0)
    x, ctx = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    kw = dict(c_crossattn=ctx, y=torch.zeros(1, 4), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        ref = p.model.apply_model(x, torch.tensor([0.5]), **kw)
        out = c.model.apply_model(x, torch.tensor([0.5]), transformer_options=c.model_options["transformer_options"],
                                  **kw)
    assert len(calls) == 2 and calls[0][2] == 3 + 4  # 1 double + 1 single block; txt + img tokens
    assert replaced == [True]
    torch.testing.assert_close(out, ref)
    wrapper_calls = []
    c.set_model_unet_function_wrapper(lambda f, a: wrapper_calls.append(1))
    assert c.model_options["model_function_wrapper"] is not None and "model_function_wrapper" not in p.model_options


def test_patch_model_moves_only_what_is_elsewhere_and_builds_no_state_dict_without_patches(monkeypatch):
    """patch_model before each sampling run: a model already on the device is not walked by `.to` again, and a
    clone without weight patches does not build the state dict (both cost ~10 ms of host time for Flux on a
    GPU host); a model elsewhere is still moved, and a clone with patches still gets them."""
    p = _patcher()
    moves, dicts = [], []
    to, state_dict = type(p.model).to, type(p.model).state_dict
    monkeypatch.setattr(type(p.model), "to", lambda self, *a, **k: moves.append(a) or to(self, *a, **k))
    monkeypatch.setattr(type(p.model), "state_dict", lambda self, *a, **k: dicts.append(1) or state_dict(self, *a, **k))
    c = p.clone()  # a clone has its own patches uuid, as the parallel plan's clone per run does
    c.patch_model(torch.device("cpu"))
    assert moves == [] and dicts == []
    c.unpatch_model()
    p.model.to(torch.float64)  # a dtype change leaves the device: still resident
    moves.clear()
    c.patch_model(torch.device("cpu"))
    assert moves == []
    c.unpatch_model()
    p.model.to(torch.float32)
    key = next(k for k in state_dict(p.model) if k.endswith("img_in.weight"))
    before = state_dict(p.model)[key].clone()
    w = p.clone()
    w.add_patches({key: torch.ones_like(before)}, strength_patch=0.5)
    dicts.clear()
    w.patch_model(torch.device("cpu"))
    assert dicts and torch.allclose(state_dict(p.model)[key], before + 0.5)
    w.unpatch_model()
    assert torch.equal(state_dict(p.model)[key], before)
    moves.clear()
    c.patch_model(torch.device("meta"))  # another device (the only other one a CPU machine has): moved
    assert moves and all(t.device.type == "meta" for t in p.model.parameters())
