"""The official workflow templates of the supported families (from the installed comfyui-workflow-templates
package, as server.py serves them under /templates/) only use node types we register, and every widget
value they store lands on an input our node declares, in ComfyUI's widget order."""

from __future__ import annotations

import json

import pytest
import torch

import nodes

core = pytest.importorskip("comfyui_workflow_templates_core",
                           reason="pip install comfyui-workflow-templates (requirements.txt)")

TEMPLATES = ["flux_dev_full_text_to_image", "flux_dev_checkpoint_example", "flux_schnell",
             "flux_schnell_full_text_to_image", "flux_kontext_dev_basic", "sd3.5_simple_example",
             "text_to_video_wan", "image_to_video_wan"]

# Every other official local (non-"api_") template of the supported families (Flux.1 dev/schnell/krea/kontext/
# fill/canny/redux, SD3/SD3.5, PixArt, HunyuanDiT, Wan 2.1, Wan 2.2 14B and TI2V 5B) whose node types, subgraph definitions
# included, are all registered here: found by scanning the installed templates package (templates-core
# 0.3.388) and all of them pass the widget checks below. None of the family's fully registered templates
# failed those checks.
# Flux Fill (inpaint, outpaint, OneReward) and Canny joined once InpaintModelConditioning,
# InstructPixToPixConditioning and DifferentialDiffusion existed (comfy_extras/nodes_flux_fill.py) and Flux
# took the extra input channels (comfy/model_base.py Flux.concat_cond).
# Flux Redux (flux_redux_model_example) joined once CLIPVisionLoader took SigLIP files and StyleModelLoader /
# StyleModelApply existed (comfy/clip_vision.py, comfy/style_model.py, comfy_extras/nodes_redux.py).
# Wan 2.2 TI2V 5B (video_wan2_2_5B_ti2v) joined once the Wan 2.2 VAE, the 48-channel DiT with per-frame
# timesteps and Wan22ImageToVideoLatent existed (comfy/ldm/wan/vae.py, comfy/model_base.py WAN22,
# comfy_extras/nodes_wan.py).
# Left out because they use node types we do not register, mostly for model variants we do not support:
#   Flux Depth via a Lotus depth map (flux_depth_lora_example: LotusConditioning and the SD-2 based Lotus
#   UNet), Flux USO (flux1_dev_uso_reference_image_gen), SD3.5 depth via
#   Lotus (sd3.5_large_depth), Wan Fun control/inpaint/camera, VACE, ATI, Move, S2V, HuMo, InfiniteTalk,
#   Animate, SCAIL (wan2.1_fun_*, video_wan*_fun_*, video_wan_vace_*, video_wan_ati, video_wanmove_480p,
#   video_wan2_2_14B_s2v, video_humo, video_wan2_1_infinitetalk, video_wan_animate2*, video_wan21_scail2_*),
#   and the Wan 2.2 Fun 5B models (video_wan2_2_5B_fun_control: Wan22FunControlToVideo,
#   video_wan2_2_5B_fun_inpaint: WanFunInpaintToVideo). Wan 2.2 14B t2v joined once ComfyMathExpression and ComfySwitchNode
#   existed (comfy_extras/nodes_logic.py); its i2v sibling stores two widget values on a CreateVideo whose
#   saved inputs declare one widget (fps), which this check cannot place. No PixArt or HunyuanDiT template
#   is shipped.
LOCAL_FAMILY_TEMPLATES = ["flux1_krea_dev", "sd3.5_large_blur", "sd3.5_large_canny_controlnet_example",
                          "wan2.1_flf2v_720_f16", "video_wan2.1_alpha_t2v_14B", "video_wan2_2_14B_flf2v",
                          "video_wan2_2_14B_t2v", "flux_fill_inpaint_example", "flux_fill_outpaint_example",
                          "image_flux.1_fill_dev_OneReward", "flux_canny_model_example",
                          "flux_redux_model_example", "video_wan2_2_5B_ti2v"]

# nodes that live only in the frontend (never sent to the backend)
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# COMBO inputs whose choices are fixed option lists (sampler, scheduler, clip type ...), not file names
# found on disk, so a template value outside our list means a missing option
FIXED_CHOICE_INPUTS = {"sampler_name", "scheduler", "type", "weight_dtype", "device", "direction",
                       "spacing_color", "crop", "format", "codec"}


@pytest.fixture(scope="module")
def registry():
    nodes.init_extra_nodes(init_custom_nodes=False)
    return nodes.NODE_CLASS_MAPPINGS


def _load(name: str) -> dict:
    with open(core.get_asset_path(name, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _backend_nodes(workflow: dict) -> list[dict]:
    """Every node of the workflow and of its subgraph definitions, less frontend-only and subgraph instances."""
    subgraphs = workflow.get("definitions", {}).get("subgraphs", [])
    subgraph_ids = {s["id"] for s in subgraphs}
    out = []
    for node in list(workflow["nodes"]) + [n for s in subgraphs for n in s.get("nodes", [])]:
        if node["type"] in FRONTEND_ONLY or node["type"] in subgraph_ids:
            continue
        out.append(node)
    return out


def widget_slots(cls) -> list[tuple[str, str, object, dict]]:
    """(input name, widget type, choices or None, options) per widget value, in the order the frontend
    stores them: declared required then optional inputs that are widgets, with the frontend's extra
    control_after_generate value after a seed and the upload button's value after an image_upload combo."""
    spec = cls.INPUT_TYPES()
    slots = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind = decl[0]
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            if isinstance(kind, (list, tuple)):
                slots.append((name, "COMBO", list(kind), opts))
            elif kind == "COMBO":
                slots.append((name, "COMBO", list(opts.get("options", [])), opts))
            elif kind in WIDGET_TYPES and not opts.get("forceInput"):
                slots.append((name, kind, None, opts))
            else:
                continue
            if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                slots.append((name, "control_after_generate", None, {}))
            if opts.get("image_upload"):
                slots.append((name, "upload", None, {}))
    return slots


def check_widgets(node_type: str, cls, values: list, linked_widgets: list[str]) -> list[str]:
    """Problems with one template node's widget values against our class (empty list: it fits)."""
    problems = []
    slots = widget_slots(cls)
    declared = {s[0] for s in slots}
    for w in linked_widgets:
        if w not in declared:
            problems.append(f"{node_type}: template links widget input {w!r}, which we do not declare")
    if len(values) != len(slots):
        problems.append(f"{node_type}: template stores {len(values)} widget values {values!r}, our inputs give "
                        f"{len(slots)} widgets {[s[0] + ':' + s[1] for s in slots]}")
        return problems
    for value, (name, kind, choices, opts) in zip(values, slots):
        where = f"{node_type}.{name} ({kind}) = {value!r}"
        if kind == "INT":
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and opts.get("min", value) <= value <= opts.get("max", value)
        elif kind == "FLOAT":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and opts.get("min", value) <= value <= opts.get("max", value)
        elif kind == "STRING":
            ok = isinstance(value, str)
        elif kind == "BOOLEAN":
            ok = isinstance(value, bool)
        elif kind == "COMBO":
            ok = isinstance(value, str) and (name not in FIXED_CHOICE_INPUTS or value in choices)
        elif kind == "control_after_generate":
            ok = value in CONTROL_VALUES
        else:  # "upload": the button's value names what it uploads
            ok = value in ("image", "video", "audio")
        if not ok:
            problems.append(f"{where} does not fit our input {opts or choices}")
    return problems


@pytest.mark.parametrize("template", TEMPLATES + LOCAL_FAMILY_TEMPLATES)
def test_template_nodes_exist_with_their_widgets(registry, template):
    workflow = _load(template)
    found = _backend_nodes(workflow)
    assert found, f"{template}: no backend nodes found (template format changed?)"
    problems = []
    for node in found:
        cls = registry.get(node["type"])
        if cls is None:
            problems.append(f"{node['type']}: not in NODE_CLASS_MAPPINGS")
            continue
        values = node.get("widgets_values", [])
        assert isinstance(values, list), f"{template}: {node['type']} stores widgets as {type(values)}"
        linked = [i["widget"]["name"] for i in node.get("inputs", []) if isinstance(i.get("widget"), dict)]
        problems += check_widgets(node["type"], cls, values, linked)
    assert not problems, f"{template}:\n" + "\n".join(problems)


def test_checker_catches_misfits(registry):
    """The checker itself fails on a missing option, a wrong count and a wrong type."""
    ks = registry["KSampler"]
    good = [0, "randomize", 20, 1.0, "euler", "simple", 1.0]
    assert check_widgets("KSampler", ks, good, []) == []
    assert check_widgets("KSampler", ks, good[:4] + ["no_such_sampler"] + good[5:], [])
    assert check_widgets("KSampler", ks, good[:1] + good[2:], [])         # control value missing
    assert check_widgets("KSampler", ks, good[:2] + ["20"] + good[3:], [])  # STRING where INT goes
    assert check_widgets("KSampler", ks, good, ["no_such_input"])
    # an upload button adds a value after LoadImage's image combo
    assert [s[1] for s in widget_slots(registry["LoadImage"])] == ["COMBO", "upload"]


def test_every_template_listed_is_installed():
    assert not set(TEMPLATES) & set(LOCAL_FAMILY_TEMPLATES)
    for name in TEMPLATES + LOCAL_FAMILY_TEMPLATES:
        workflow = _load(name)
        assert workflow.get("nodes"), name


# --- ImageStitch (added for flux_kontext_dev_basic) ----------------------------------------------------


def _img(b, h, w, value):
    return torch.full((b, h, w, 3), value)


def test_image_stitch_right_and_left_without_resize(registry):
    node = registry["ImageStitch"]()
    a, b = _img(1, 4, 6, 0.2), _img(1, 4, 3, 0.8)
    (out,) = node.stitch(a, "right", False, 0, "white", b)
    assert out.shape == (1, 4, 9, 3)
    assert torch.equal(out[:, :, :6], a) and torch.equal(out[:, :, 6:], b)
    (out,) = node.stitch(a, "left", False, 2, "black", b)
    assert out.shape == (1, 4, 11, 3)
    assert torch.equal(out[:, :, :3], b) and torch.equal(out[:, :, 3:5], torch.zeros(1, 4, 2, 3))
    assert torch.equal(out[:, :, 5:], a)


def test_image_stitch_down_pads_and_spaces(registry):
    node = registry["ImageStitch"]()
    a, b = _img(1, 2, 6, 0.5), _img(1, 3, 4, 0.9)
    (out,) = node.stitch(a, "down", False, 2, "red", b)
    assert out.shape == (1, 7, 6, 3)
    assert torch.equal(out[0, 2, 0], torch.tensor([1.0, 0.0, 0.0]))  # spacing strip in red
    assert torch.equal(out[0, 4:, 0], torch.zeros(3, 3))              # b centred: one zero column each side
    assert torch.allclose(out[0, 4:, 1:5], torch.full((3, 4, 3), 0.9))


def test_image_stitch_match_size_and_batches(registry):
    node = registry["ImageStitch"]()
    a = torch.rand(2, 8, 8, 3)
    b = _img(1, 4, 8, 0.3)  # aspect 2:1, resized to height 8 -> width 16
    (out,) = node.stitch(a, "right", True, 0, "white", b)
    assert out.shape == (2, 8, 24, 3)
    assert torch.equal(out[:, :, :8], a)
    # match_image_size resizes with ComfyUI's "lanczos": PIL on the 8-bit image. 0.3 * 255 = 76.5 is
    # truncated to 76 (not rounded), and Lanczos keeps a flat image flat, so the result is exactly 76/255
    assert torch.equal(out[:, :, 8:], torch.full((2, 8, 16, 3), 76 / 255))
    (same,) = node.stitch(a, "up", True, 0, "white", None)
    assert same is a
