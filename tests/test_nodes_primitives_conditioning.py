"""Primitive / PreviewAny / string nodes, the conditioning combinators, and the sampler honouring what they set
(timestep ranges, areas with feathered edges, masks, strengths), on the fake models of tests/sampling_fakes.py."""

from __future__ import annotations

import sys

import pytest
import torch

import comfy.model_management as mm
import execution
import nodes
from comfy import model_sampling as ms
from comfy import samplers
from comfy_extras import nodes_primitives_conditioning as npc
from tests.fixtures.harness import FakeServer, install, run
from tests.sampling_fakes import conditioning, const_x0_fn, make_patcher

# ---------------------------------------------------------------------------------------------------
# Node interfaces and outputs
# ---------------------------------------------------------------------------------------------------


def test_primitives_interfaces_and_outputs():
    cases = {"PrimitiveInt": ("INT", 7), "PrimitiveFloat": ("FLOAT", 0.5), "PrimitiveString": ("STRING", "a"),
             "PrimitiveStringMultiline": ("STRING", "a\nb"), "PrimitiveBoolean": ("BOOLEAN", True)}
    for name, (typ, value) in cases.items():
        cls = npc.NODE_CLASS_MAPPINGS[name]
        spec = cls.INPUT_TYPES()["required"]["value"]
        assert spec[0] == typ and cls.RETURN_TYPES == (typ,) and cls.CATEGORY == "utils/primitive"
        assert getattr(cls(), cls.FUNCTION)(value=value) == (value,)
    assert npc.PrimitiveInt.INPUT_TYPES()["required"]["value"][1] == {
        "min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True}
    assert npc.PrimitiveStringMultiline.INPUT_TYPES()["required"]["value"][1] == {"multiline": True}


def test_preview_any_and_concatenate():
    assert npc.PreviewAny.OUTPUT_NODE and npc.PreviewAny.RETURN_TYPES == ()
    assert npc.PreviewAny.INPUT_TYPES()["required"]["source"][0] == "*"
    p = npc.PreviewAny()
    assert p.main("hi") == {"ui": {"text": ("hi",)}}
    assert p.main(3) == {"ui": {"text": ("3",)}}
    assert p.main(True) == {"ui": {"text": ("True",)}}
    assert p.main(None) == {"ui": {"text": ("None",)}}
    assert p.main({"a": [1, 2]}) == {"ui": {"text": ('{"a": [1, 2]}',)}}
    assert p.main(torch.zeros(1))["ui"]["text"][0].startswith("tensor(")  # not JSON: str()
    assert npc.StringConcatenate().execute("a", "b", ", ") == ("a, b",)
    assert npc.StringConcatenate.INPUT_TYPES()["required"]["delimiter"] == (
        "STRING", {"multiline": False, "default": ""})


def test_combine_average_concat():
    a = [[torch.ones(1, 2, 3), {"pooled_output": torch.ones(1, 4), "x": 1}]]
    b = [[torch.full((1, 3, 3), 3.0), {"pooled_output": torch.full((1, 4), 5.0)}]]
    (comb,) = npc.ConditioningCombine().combine(a, b)
    assert len(comb) == 2 and comb[0] is a[0] and comb[1] is b[0]

    (avg,) = npc.ConditioningAverage().addWeighted(a, b, 0.25)
    assert avg[0][0].shape == (1, 2, 3)  # cut to conditioning_to's tokens
    assert torch.allclose(avg[0][0], torch.full((1, 2, 3), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(avg[0][1]["pooled_output"], torch.full((1, 4), 0.25 * 1 + 0.75 * 5))
    assert avg[0][1]["x"] == 1 and "x" in a[0][1] and torch.equal(a[0][1]["pooled_output"], torch.ones(1, 4))
    (avg2,) = npc.ConditioningAverage().addWeighted(b, a, 0.5)  # from is shorter: zero-padded
    assert torch.allclose(avg2[0][0][:, :2], torch.full((1, 2, 3), 2.0))
    assert torch.allclose(avg2[0][0][:, 2], torch.full((1, 3), 1.5))

    (cat,) = npc.ConditioningConcat().concat(a, b)
    assert cat[0][0].shape == (1, 5, 3) and torch.equal(cat[0][0][:, 2:], b[0][0])
    assert cat[0][1] == {"pooled_output": a[0][1]["pooled_output"], "x": 1} and cat[0][1] is not a[0][1]


def test_setter_nodes_values_and_interfaces():
    c = conditioning(1)
    (r,) = npc.ConditioningSetTimestepRange().set_range(c, 0.2, 0.7)
    assert r[0][1] == {"start_percent": 0.2, "end_percent": 0.7} and c[0][1] == {}
    assert npc.ConditioningSetTimestepRange.CATEGORY == "advanced/conditioning"
    (r,) = npc.ConditioningSetArea().append(c, 256, 128, 64, 32, 0.5)
    assert r[0][1] == {"area": (16, 32, 4, 8), "strength": 0.5, "set_area_to_bounds": False}
    (r,) = npc.ConditioningSetAreaPercentage().append(c, 0.5, 0.25, 0.1, 0.2, 1.5)
    assert r[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1) and r[0][1]["strength"] == 1.5
    (r,) = npc.ConditioningSetAreaStrength().append(c, 2.0)
    assert r[0][1] == {"strength": 2.0}
    (r,) = npc.ConditioningSetMask().append(c, torch.ones(8, 8), "mask bounds", 0.3)
    assert r[0][1]["mask"].shape == (1, 8, 8) and r[0][1]["set_area_to_bounds"] is True
    assert r[0][1]["mask_strength"] == 0.3
    req = npc.ConditioningSetMask.INPUT_TYPES()["required"]
    assert list(req) == ["conditioning", "mask", "strength", "set_cond_area"]
    assert req["set_cond_area"] == (["default", "mask bounds"],)
    req = npc.ConditioningSetArea.INPUT_TYPES()["required"]
    assert req["width"] == ("INT", {"default": 64, "min": 64, "max": 16384, "step": 8})
    assert req["strength"] == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})


class _FakeClip:
    def __init__(self):
        self.layer = None

    def tokenize(self, text):
        return {k: [[(f"{k}:{text}", 1.0)]] * (2 if text == "long" and k == "g" else 1) for k in ("l", "g", "t5xxl")}

    def encode_from_tokens_scheduled(self, tokens):
        return tokens

    def clone(self):
        c = _FakeClip()
        c.layer = self.layer
        return c

    def clip_layer(self, idx):
        self.layer = idx


def test_clip_text_encode_sd3_tokens():
    enc = npc.CLIPTextEncodeSD3()
    (t,) = enc.encode(_FakeClip(), "L", "G", "T", "none")
    assert t == {"l": [[("l:L", 1.0)]], "g": [[("g:G", 1.0)]], "t5xxl": [[("t5xxl:T", 1.0)]]}
    (t,) = enc.encode(_FakeClip(), "L", "G", "", "none")
    assert t["t5xxl"] == []
    (t,) = enc.encode(_FakeClip(), "L", "G", "", "empty_prompt")
    assert t["t5xxl"] == [[("t5xxl:", 1.0)]]
    (t,) = enc.encode(_FakeClip(), "L", "long", "T", "none")  # G has 2 chunks: L padded with an empty one
    assert t["l"] == [[("l:L", 1.0)], [("l:", 1.0)]]
    clip = _FakeClip()
    (c2,) = npc.CLIPSetLastLayer().set_last_layer(clip, -2)
    assert c2.layer == -2 and clip.layer is None


def test_cfg_zero_star_matches_hand_formula():
    class Stub:
        def __init__(self):
            self.fns = []

        def clone(self):
            return self

        def set_model_sampler_post_cfg_function(self, fn):
            self.fns.append(fn)

    (m,) = npc.CFGZeroStar().patch(Stub())
    x, cond, uncond = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 1.5]])
    scale = 4.0
    denoised = uncond + (cond - uncond) * scale
    out = m.fns[0]({"input": x, "cond_denoised": cond, "uncond_denoised": uncond, "denoised": denoised,
                    "cond_scale": scale})
    ec, eu = x - cond, x - uncond  # (0.5, 1.0), (1.0, 0.5)
    alpha = float((ec * eu).sum() / (eu * eu).sum())  # 1.0 / 1.25
    expected = uncond * alpha + (cond - uncond * alpha) * scale
    assert torch.allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The sampler honours ranges, areas, masks, strengths
# ---------------------------------------------------------------------------------------------------


def _recording_fn(seen):
    base = const_x0_fn(lambda v: torch.tensor(v))

    def fn(x, sigma, c):
        seen.append((round(float(sigma[0]), 4), sorted(float(ci.flatten()[0]) for ci in c)))
        return base(x, sigma, c)
    return fn


def test_timestep_range_switches_the_conditioning():
    seen = []
    patcher = make_patcher(ms.ModelSamplingDiscreteFlow(shift=1.0), _recording_fn(seen))
    (early,) = npc.ConditioningSetTimestepRange().set_range(conditioning(1), 0.0, 0.5)
    (late,) = npc.ConditioningSetTimestepRange().set_range(conditioning(2), 0.5, 1.0)
    (pos,) = npc.ConditioningCombine().combine(early, late)
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    nodes.KSampler().sample(patcher, 1, 4, 1.0, "euler", "simple", pos, conditioning(0), lat)
    # sigmas 1, .75, .5, .25: the first half sees only cond 1, the second only cond 2 (both at the boundary)
    assert seen == [(1.0, [1.0]), (0.75, [1.0]), (0.5, [1.0, 2.0]), (0.25, [2.0])]


def _resolved(entries, noise, **more):
    model = make_patcher(ms.ModelSamplingDiscreteFlow(), None).model
    conds = {"positive": samplers.convert_cond(entries)}
    conds.update({k: samplers.convert_cond(v) for k, v in more.items()})
    return samplers.process_conds(model, noise, conds, torch.device("cpu"))


def _calc(entries, x):
    model = make_patcher(ms.ModelSamplingDiscreteFlow(), const_x0_fn(lambda v: torch.tensor(v))).model
    conds = _resolved(entries, x)
    out = samplers.calc_cond_batch(model, [conds["positive"]], x, torch.tensor([0.5]), {})[0]
    return out, model.calls


def test_area_crop_and_feathered_weight_match_hand_computation():
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(1, 4, 1, 1)
    (area,) = npc.ConditioningSetArea().append(conditioning(3), 64, 64, 32, 32, 1.0)  # 8x8 at (4, 4)
    (both,) = npc.ConditioningCombine().combine(conditioning(1), area)
    out, calls = _calc(both, x)
    crops = [c["x"] for c in calls if c["x"].shape[-1] == 8]
    assert len(crops) == 1 and torch.equal(crops[0], x[:, :, 4:12, 4:12])  # the model ran on the crop
    f = torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 0.5])  # rr = min(8, 8 // 4) = 2 rows ramp at inner edges
    w = f[:, None] * f[None, :]
    expected = torch.ones(16, 16)
    expected[4:12, 4:12] = (1 + 3 * w) / (1 + w)
    assert torch.allclose(out[0, 0], expected, atol=1e-5) and torch.allclose(out[0, 3], expected, atol=1e-5)


def test_area_at_the_border_is_not_feathered_there_and_strength_weights():
    x = torch.zeros(1, 4, 16, 16)
    (area,) = npc.ConditioningSetArea().append(conditioning(3), 64, 128, 0, 0, 2.0)  # 16 rows x 8 cols at 0,0
    (both,) = npc.ConditioningCombine().combine(conditioning(1), area)
    out, _ = _calc(both, x)
    fx = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.5]) * 2.0  # only the inner (right) edge ramps
    expected = torch.ones(16, 16)
    expected[:, :8] = (1 + 3 * fx[None, :]) / (1 + fx[None, :])
    assert torch.allclose(out[0, 1], expected, atol=1e-5)


def test_mask_and_mask_strength_weighting():
    x = torch.zeros(1, 4, 8, 8)
    mask = torch.ones(1, 16, 16)
    mask[:, :, 8:] = 0.25  # right half (resized to the latent: exact halves)
    (masked,) = npc.ConditioningSetMask().append(conditioning(3), mask, "default", 2.0)
    (strong,) = npc.ConditioningSetAreaStrength().append(masked, 0.5)
    (both,) = npc.ConditioningCombine().combine(conditioning(1), strong)
    out, calls = _calc(both, x)
    m = torch.ones(8, 8)
    m[:, 4:] = 0.25
    w = m * 2.0 * 0.5
    assert torch.allclose(out[0, 2], (1 + 3 * w) / (1 + w), atol=1e-5)
    assert all(c["x"].shape[-1] == 8 for c in calls)  # no area: the whole latent


def test_mask_bounds_area_percentage_and_same_area_uncond():
    noise = torch.zeros(1, 4, 16, 16)
    mask = torch.zeros(16, 16)
    mask[2:5, 3:13] = 1
    (mb,) = npc.ConditioningSetMask().append(conditioning(3), mask, "mask bounds", 1.0)
    (pct,) = npc.ConditioningSetAreaPercentage().append(conditioning(2), 0.5, 0.25, 0.25, 0.5, 1.0)
    conds = _resolved(mb + pct, noise, negative=conditioning(0))
    pos = conds["positive"]
    assert pos[0]["area"] == (8, 10, 2, 3)  # bounding box, at least 8 high
    assert pos[1]["area"] == (4, 8, 8, 4)  # (h, w, y, x) from fractions of 16
    # the negative (no area) gets one entry per positive area, with its own model conds
    neg = conds["negative"]
    assert [e.get("area") for e in neg] == [None, (8, 10, 2, 3), (4, 8, 8, 4)]
    assert all(float(e["model_conds"]["c_crossattn"].flatten()[0]) == 0 for e in neg)


# ---------------------------------------------------------------------------------------------------
# Through the executor
# ---------------------------------------------------------------------------------------------------


class _FloatCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 0.0, "min": -100.0, "max": 100.0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "test"

    def make(self, value):
        return (conditioning(value),)


class _CondProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def probe(self, conditioning):
        return {"ui": {"values": [float(t.flatten()[0]) for t, _ in conditioning],
                       "ranges": [[o.get("start_percent"), o.get("end_percent")] for _, o in conditioning]}}


def test_prompt_with_primitives_and_combine(monkeypatch):
    install(monkeypatch)
    for name, cls in npc.NODE_CLASS_MAPPINGS.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestFloatCond", _FloatCond)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestCondProbe", _CondProbe)
    mm.interrupt_current_processing(False)
    ex = execution.PromptExecutor(FakeServer())
    prompt = {
        "1": {"class_type": "PrimitiveFloat", "inputs": {"value": 1.5}},
        "2": {"class_type": "PrimitiveFloat", "inputs": {"value": -2.0}},
        "3": {"class_type": "TestFloatCond", "inputs": {"value": ["1", 0]}},
        "4": {"class_type": "TestFloatCond", "inputs": {"value": ["2", 0]}},
        "5": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["4", 0], "start": 0.3,
                                                                        "end": 1.0}},
        "6": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0],
                                                               "conditioning_2": ["5", 0]}},
        "7": {"class_type": "TestCondProbe", "inputs": {"conditioning": ["6", 0]}},
        "8": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a\nb"}},
        "9": {"class_type": "StringConcatenate", "inputs": {"string_a": ["8", 0], "string_b": "c",
                                                             "delimiter": "-"}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
    }
    run(ex, prompt)
    assert ex.success
    outs = ex.history_result["outputs"]
    assert outs["7"] == {"values": [1.5, -2.0], "ranges": [[None, None], [0.3, 1.0]]}
    assert list(outs["10"]["text"]) == ["a\nb-c"]  # a tuple here; JSON makes it a list


@pytest.mark.parametrize("name", sorted(npc.NODE_CLASS_MAPPINGS))
def test_every_node_declares_the_protocol(name):
    cls = npc.NODE_CLASS_MAPPINGS[name]
    assert isinstance(cls.INPUT_TYPES(), dict) and callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and isinstance(cls.CATEGORY, str)


def test_clip_text_encode_sd3_on_tiny_encoders(tmp_path):
    import comfy.text_encoders as te
    from tests.test_text_encoders_models import _clip, _t5, _t5_file

    _, sd_l = _clip(64, layers=3)
    _, sd_g = _clip(128, layers=3, proj=128, act="gelu", seed=5)
    _, sd_t5 = _t5(256, 4)
    clip = te.load_text_encoders([sd_g, sd_t5, sd_l], "sd3",
                                 ["clip_g.safetensors", _t5_file(tmp_path, "t5.safetensors", sd_t5), "clip_l.sft"])
    enc = npc.CLIPTextEncodeSD3()
    (full,) = enc.encode(clip, "a cat", "a cat", "a cat", "none")
    assert full[0][0].shape == (1, 154, 256) and full[0][1]["pooled_output"].shape == (1, 192)
    (no_t5,) = enc.encode(clip, "a cat", "a cat", "", "none")  # T5 left out entirely
    assert no_t5[0][0].shape == (1, 77, 256) and torch.equal(no_t5[0][0], full[0][0][:, :77])
    (pad_t5,) = enc.encode(clip, "a cat", "a cat", "", "empty_prompt")  # T5 encodes ""
    assert pad_t5[0][0].shape == (1, 154, 256) and not torch.equal(pad_t5[0][0][:, 77:], full[0][0][:, 77:])
    (nothing,) = enc.encode(clip, "", "", "", "none")
    assert nothing[0][0].shape == (1, 77, 256) and torch.count_nonzero(nothing[0][0]) == 0
    assert torch.count_nonzero(nothing[0][1]["pooled_output"]) == 0


def test_node_helpers_conditioning_set_values_copies_and_appends():
    import node_helpers

    t = torch.zeros(1, 2, 3)
    cond = [[t, {"guidance": 1.0, "reference_latents": [1]}]]
    out = node_helpers.conditioning_set_values(cond, {"guidance": 2.0})
    assert out[0][1]["guidance"] == 2.0 and cond[0][1]["guidance"] == 1.0 and out[0][0] is t
    out = node_helpers.conditioning_set_values(cond, {"reference_latents": [2]}, append=True)
    assert out[0][1]["reference_latents"] == [1, 2] and cond[0][1]["reference_latents"] == [1]
