"""app/demo.py: when the first-run demo is written (and when not), what it writes, and that the UI-format
demo workflow is the same graph as demo/flux_demo_api.json."""

from __future__ import annotations

import json
import logging
import os

from app import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONNECTION_FREE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def test_empty_models_folder_gets_the_demo(base_dir, caplog):
    import folder_paths

    with caplog.at_level(logging.INFO):
        written = demo.offer_demo()
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["taco-demo-flux1-dev.safetensors", "taco-demo-flux1-schnell.safetensors",
                            "taco-demo-clip_l.safetensors", "taco-demo-t5xxl.safetensors",
                            "taco-demo-flux-ae.safetensors", "taco-demo-flux.json"])
    assert folder_paths.get_filename_list("diffusion_models") == ["taco-demo-flux1-dev.safetensors",
                                                                  "taco-demo-flux1-schnell.safetensors"]
    assert folder_paths.get_filename_list("vae") == ["taco-demo-flux-ae.safetensors"]
    with open(demo.demo_workflow_path()) as a, open(demo.DEMO_WORKFLOW_SOURCE) as b:
        assert json.load(a) == json.load(b)
    assert demo.demo_workflow_path() == os.path.join(base_dir, "user", "default", "workflows", "taco-demo-flux.json")
    # no staging folder is left among the model folders
    assert not [d for d in os.listdir(folder_paths.models_dir) if d.startswith(".taco-demo-")]
    # the log says what was written and how to turn it off
    assert "--no-demo-models" in caplog.text and all(p in caplog.text for p in written)
    # a second start finds the demo models and writes nothing
    assert demo.offer_demo() == []


def test_an_existing_model_or_the_flag_means_no_demo(base_dir):
    import folder_paths
    from comfy import cli_args

    ckpt = os.path.join(base_dir, "models", "checkpoints", "mine.safetensors")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    with open(ckpt, "wb") as f:
        f.write(b"x")
    folder_paths.filename_list_cache.clear()
    assert demo.offer_demo() == []
    os.remove(ckpt)
    folder_paths.filename_list_cache.clear()

    saved = dict(vars(cli_args.args))
    try:
        args = cli_args.parse_args(["--no-demo-models"])
        assert demo.offer_demo(enabled=not args.no_demo_models) == []
    finally:
        vars(cli_args.args).update(saved)
    assert folder_paths.get_filename_list("diffusion_models") == []
    assert not os.path.exists(demo.demo_workflow_path())


def test_a_users_edited_workflow_is_kept(base_dir):
    path = demo.demo_workflow_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"edited": true}')
    assert demo.install_demo_workflow() is None
    with open(path) as f:
        assert json.load(f) == {"edited": True}


def _ui_to_api(workflow: dict) -> dict:
    """The UI -> API conversion the frontend performs, for the node kinds the demo uses: linked inputs
    become [origin id, slot]; widget values are taken in INPUT_TYPES order, skipping the extra
    control_after_generate value that follows a seed."""
    import nodes

    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        inputs = {}
        for inp in node["inputs"]:
            link = links[inp["link"]]
            assert link[3] == node["id"], (node["type"], inp)
            inputs[inp["name"]] = [str(link[1]), link[2]]
        values = list(node["widgets_values"])
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind = entry[0]
                if name in inputs or not (isinstance(kind, list) or kind in _CONNECTION_FREE_TYPES):
                    continue
                inputs[name] = values.pop(0)
                if len(entry) > 1 and entry[1].get("control_after_generate"):
                    assert values.pop(0) == "fixed", "the demo seed stays fixed so reruns reproduce"
        assert values == [], (node["type"], values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflow_is_the_api_workflow(base_dir):
    import nodes

    nodes.init_extra_nodes(init_custom_nodes=False)
    with open(os.path.join(ROOT, "demo", "flux_demo_workflow.json")) as f:
        workflow = json.load(f)
    with open(os.path.join(ROOT, "demo", "flux_demo_api.json")) as f:
        api = json.load(f)
    assert workflow["version"] == 0.4
    assert workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    # every link is listed on both ends, with the output's type
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        src = next(n for n in workflow["nodes"] if n["id"] == origin)
        dst = next(n for n in workflow["nodes"] if n["id"] == target)
        assert link_id in src["outputs"][slot]["links"] and src["outputs"][slot]["type"] == kind
        assert dst["inputs"][target_slot]["link"] == link_id and dst["inputs"][target_slot]["type"] == kind
    converted = _ui_to_api(workflow)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
