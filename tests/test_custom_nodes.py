"""Custom node packs load as ComfyUI loads them and run through the executor."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

import execution
import nodes
from tests.fixtures.harness import FakeServer, install

PACKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "custom_node_packs")


@pytest.fixture
def packs(base_dir, monkeypatch):
    """Fresh registries and a custom_nodes/ folder holding copies of the fixture packs."""
    install(monkeypatch)
    for name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "EXTENSION_WEB_DIRS",
                 "LOADED_MODULE_DIRS", "FAILED_CUSTOM_NODES"):
        monkeypatch.setattr(nodes, name, dict(getattr(nodes, name)))
    target = base_dir / "custom_nodes"
    shutil.copytree(PACKS, target, dirs_exist_ok=True)
    yield target
    for mod in [m for m in sys.modules if m.startswith("custom_nodes.")]:
        del sys.modules[mod]


def test_packs_load_like_comfyui(packs):
    nodes.init_external_custom_nodes()
    assert nodes.NODE_CLASS_MAPPINGS["PackDouble"].__name__ == "Double"
    assert nodes.NODE_CLASS_MAPPINGS["SingleTriple"].__name__ == "Triple"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["PackDouble"] == "Double (pack)"
    assert nodes.NODE_CLASS_MAPPINGS["PackDouble"].RELATIVE_PYTHON_MODULE == "custom_nodes.pack_ok"
    # a pack may not replace a node that was registered before it
    assert nodes.NODE_CLASS_MAPPINGS["Const"].__name__ == "Const"
    assert nodes.EXTENSION_WEB_DIRS["pack_ok"] == os.path.join(str(packs), "pack_ok", "js")
    assert "broken_pack" in nodes.FAILED_CUSTOM_NODES
    assert "this_module_does_not_exist_anywhere" in nodes.FAILED_CUSTOM_NODES["broken_pack"]
    assert not any("disabled" in k for k in list(nodes.LOADED_MODULE_DIRS) + list(nodes.FAILED_CUSTOM_NODES))


def test_pack_nodes_run_through_executor(packs):
    nodes.init_external_custom_nodes()
    server = FakeServer()
    ex = execution.PromptExecutor(server)
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 3}},
              "2": {"class_type": "PackDouble", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "SingleTriple", "inputs": {"value": ["2", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}},
              "5": {"class_type": "PackMakeMany", "inputs": {"value": ["1", 0], "count": 3}},
              "6": {"class_type": "Sink", "inputs": {"value": ["5", 0]}}}
    ok, err, good, _ = execution.validate_prompt("p", prompt)
    assert ok, err
    ex.execute(prompt, "p", {"client_id": "c"}, good)
    assert ex.success, server.of("execution_error")
    assert ex.history_result["outputs"]["4"] == {"values": [18]}
    assert ex.history_result["outputs"]["6"] == {"values": [24]}
    assert {"value": 2, "max": 2, "prompt_id": "p", "node": "2"} in server.of("progress")


def test_disable_all_custom_nodes_and_whitelist(packs):
    nodes.init_external_custom_nodes(disable_all=True)
    assert "PackDouble" not in nodes.NODE_CLASS_MAPPINGS and "SingleTriple" not in nodes.NODE_CLASS_MAPPINGS
    assert nodes.FAILED_CUSTOM_NODES == {}
    nodes.init_external_custom_nodes(disable_all=True, whitelist=["single_file"])
    assert "SingleTriple" in nodes.NODE_CLASS_MAPPINGS and "PackDouble" not in nodes.NODE_CLASS_MAPPINGS


def test_init_extra_nodes_honours_flag(packs):
    nodes.init_extra_nodes(init_custom_nodes=True, disable_all_custom_nodes=True)
    assert "PackDouble" not in nodes.NODE_CLASS_MAPPINGS
    nodes.init_extra_nodes(init_custom_nodes=True)
    assert "PackDouble" in nodes.NODE_CLASS_MAPPINGS
