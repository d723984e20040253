"""Executor: list semantics, lazy inputs, dynamic expansion, ExecutionBlocker, hidden inputs, rawLink."""

from __future__ import annotations

import pytest

import comfy.model_management as mm
import execution
from tests.fixtures import exec_nodes
from tests.fixtures.harness import FakeServer, install, run


@pytest.fixture
def ex(monkeypatch):
    install(monkeypatch)
    mm.interrupt_current_processing(False)
    return execution.PromptExecutor(FakeServer())


def test_output_is_list_and_input_is_list(ex):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": 4}},
              "2": {"class_type": "SumList", "inputs": {"values": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}},
              "4": {"class_type": "ListSink", "inputs": {"values": ["1", 0]}},
              "5": {"class_type": "ListSink", "inputs": {"values": ["1", 1]}}}
    run(ex, prompt)
    out = ex.history_result["outputs"]
    assert out["3"] == {"values": [10]}           # INPUT_IS_LIST: one call with the whole list
    assert out["4"] == {"values": [1, 2, 3, 4]}   # OUTPUT_IS_LIST slot flattened
    assert out["5"] == {"values": [4]}            # the non-list slot holds one value


def test_per_index_calls_broadcast_shorter_lists(ex):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": 3}},
              "2": {"class_type": "Const", "inputs": {"value": 10}},
              "3": {"class_type": "Mul", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
              "4": {"class_type": "ListSink", "inputs": {"values": ["3", 0]}},
              "5": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
    run(ex, prompt)
    assert [x[1:] for x in exec_nodes.LOG if x[0] == "mul"] == [(1, 10), (2, 10), (3, 10)]
    assert ex.history_result["outputs"]["4"] == {"values": [10, 20, 30]}
    # A per-index output node runs once per item and its ui lists are concatenated.
    assert ex.history_result["outputs"]["5"] == {"values": [10, 20, 30]}


@pytest.mark.parametrize("cond,expected,skipped", [(True, 1, "3"), (False, 2, "2")])
def test_lazy_input_only_evaluates_needed_branch(ex, cond, expected, skipped):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 0}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 2}},
              "4": {"class_type": "LazySwitch", "inputs": {"cond": cond, "on_true": ["2", 0],
                                                           "on_false": ["3", 0]}},
              "5": {"class_type": "Sink", "inputs": {"value": ["4", 0]}}}
    run(ex, prompt)
    ran = [x[1] for x in exec_nodes.LOG if x[0] == "run"]
    assert skipped not in ran and "4" in ran
    assert ex.history_result["outputs"]["5"] == {"values": [expected]}
    lazy_calls = [x for x in exec_nodes.LOG if x[0] == "lazy"]
    assert lazy_calls[0][2:] == (None, None)  # first asked with nothing evaluated
    args = [x for x in exec_nodes.LOG if x[0] == "switch_args"][0]
    assert (args[1] is None) == (not cond) and (args[2] is None) == cond  # never evaluated -> None
    assert ran.count("4") == 1  # the switch itself runs once


def test_expansion_runs_ephemeral_subgraph(ex):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 5}},
              "2": {"class_type": "ExpandSum", "inputs": {"value": ["1", 0], "times": 3}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert ex.success, ex.server.of("execution_error")
    assert ex.history_result["outputs"]["3"] == {"values": [15]}
    ran = [x[1] for x in exec_nodes.LOG if x[0] == "run"]
    ephemeral = [n for n in ran if n not in ("1", "2", "3")]
    # Two Adds ran under prefixed ids; the inner Const(5) has the same signature as node 1, so its
    # output came from the cache instead of running again.
    assert len(ephemeral) == 2 and all(n.startswith("2.") for n in ephemeral)
    executing = {d["node"]: d["display_node"] for d in ex.server.of("executing")}
    assert all(executing[n] == "2" for n in ephemeral)  # shown as the node that expanded
    state = ex.server.of("progress_state")[-1]["nodes"]
    assert state[ephemeral[0]]["parent_node_id"] == "2" and state[ephemeral[0]]["real_node_id"] == "2"
    # second run: the expanding node's resolved output is cached, nothing expands again
    exec_nodes.LOG.clear()
    run(ex, prompt, prompt_id="p2")
    assert [x for x in exec_nodes.LOG if x[0] == "run"] == []
    assert ex.history_result["outputs"]["3"] == {"values": [15]}
    # changing the input re-expands
    prompt["1"]["inputs"]["value"] = 2
    run(ex, prompt, prompt_id="p3")
    assert ex.history_result["outputs"]["3"] == {"values": [6]}


def test_execution_blocker_silent_and_with_message(ex):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 5}},
              "2": {"class_type": "Block", "inputs": {"value": ["1", 0], "block": True, "message": ""}},
              "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}},
              "5": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    run(ex, prompt)
    ran = [x[1] for x in exec_nodes.LOG if x[0] == "run"]
    assert "3" not in ran and "4" not in ran and "5" in ran
    assert ex.success and not ex.server.of("execution_error")
    assert "4" not in ex.history_result["outputs"]

    prompt["2"]["inputs"]["message"] = "no input image"
    run(ex, prompt, prompt_id="p2")
    errors = ex.server.of("execution_error")
    assert len(errors) == 1  # reported by the first blocked node only
    assert errors[0]["exception_message"] == "Execution Blocked: no input image"
    assert errors[0]["exception_type"] == "ExecutionBlocked" and errors[0]["node_id"] == "3"
    prompt["2"]["inputs"]["block"] = False
    run(ex, prompt, prompt_id="p3")
    assert ex.history_result["outputs"]["4"] == {"values": [6]}


def test_hidden_inputs(ex):
    prompt = {"7": {"class_type": "Hidden", "inputs": {}}}
    run(ex, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}, "auth_token_comfy_org": "tok",
                                "api_key_comfy_org": "key"})
    seen = ex.history_result["outputs"]["7"]["seen"]
    assert seen == [["7"], "DynamicPrompt", {"workflow": {"nodes": []}}, "7", "tok", "key"]


def test_raw_link_and_wrapped_array_values(ex):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 5}},
              "2": {"class_type": "RawLink", "inputs": {"link": ["1", 0]}},
              "3": {"class_type": "Strings", "inputs": {"values": {"__value__": ["a", "b"]}}}}
    run(ex, prompt)
    assert ex.history_result["outputs"]["2"] == {"link": [["1", 0]]}
    assert ex.history_result["outputs"]["3"] == {"values": [["a", "b"]]}
    assert "1" not in [x[1] for x in exec_nodes.LOG if x[0] == "run"]  # a raw link is not a dependency


def test_wildcard_type_accepts_anything(ex):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": 2}},
              "2": {"class_type": "AnySink", "inputs": {"value": ["1", 1]}}}
    run(ex, prompt)
    assert ex.history_result["outputs"]["2"] == {"values": ["2"]}


def test_partial_outputs_only_run_requested(ex):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Const", "inputs": {"value": 2}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
    ok, _, good, _ = execution.validate_prompt("p", prompt, partial_execution_targets=["4"])
    assert ok and good == ["4"]
    ex.execute(prompt, "p", {"client_id": "c"}, good)
    assert sorted(x[1] for x in exec_nodes.LOG if x[0] == "run") == ["3", "4"]
