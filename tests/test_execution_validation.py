"""validate_prompt: prompt-level and node-level error types and shapes, coercion, combos, VALIDATE_INPUTS."""

from __future__ import annotations

import pytest

import execution
from tests.fixtures.harness import install


@pytest.fixture(autouse=True)
def _nodes(monkeypatch):
    install(monkeypatch)


def combos(**over):
    # array widget values arrive wrapped as {"__value__": [...]}; a bare list would be a link
    inputs = {"legacy": "a", "modern": "x", "multi": {"__value__": ["p", "r"]}, "ratio": 0.5, "flag": True, "text": "t"}
    inputs.update(over)
    return {"1": {"class_type": "Combos", "inputs": inputs}}


def node_error_types(node_errors, node_id):
    return [e["type"] for e in node_errors[node_id]["errors"]]


def test_prompt_level_errors():
    ok, err, good, ne = execution.validate_prompt("p", None)
    assert not ok and err["type"] == "no_prompt" and good == [] and ne == {}
    ok, err, _, _ = execution.validate_prompt("p", {"1": {"inputs": {}}})
    assert err["type"] == "invalid_prompt" and "class_type" in err["message"] and err["details"] == "Node ID '#1'"
    ok, err, _, _ = execution.validate_prompt("p", {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert err["type"] == "invalid_prompt" and "NoSuchNode" in err["message"]
    ok, err, _, _ = execution.validate_prompt("p", {"1": {"class_type": "Const", "inputs": {"value": 1}}})
    assert err == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                   "extra_info": {}}


def test_valid_prompt_and_coercion():
    prompt = {"1": {"class_type": "Const", "inputs": {"value": "7"}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    ok, err, good, ne = execution.validate_prompt("p", prompt)
    assert ok and err is None and good == ["2"] and ne == {}
    assert prompt["1"]["inputs"]["value"] == 7  # coerced in place for the executor
    p2 = combos(ratio="0.25", text=5)
    assert execution.validate_prompt("p", p2)[0]
    assert p2["1"]["inputs"]["ratio"] == 0.25 and p2["1"]["inputs"]["text"] == "5"


def test_node_level_error_types_and_shapes():
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 5000}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    ok, err, good, ne = execution.validate_prompt("p", prompt)
    assert not ok and err["type"] == "prompt_outputs_failed_validation"
    assert "bigger than max" in err["details"]
    assert ne["1"]["class_type"] == "Const" and ne["1"]["dependent_outputs"] == ["2"]
    e = ne["1"]["errors"][0]
    assert e["type"] == "value_bigger_than_max"
    assert set(e) == {"type", "message", "details", "extra_info"}
    assert e["extra_info"]["input_name"] == "value" and e["extra_info"]["received_value"] == 5000
    assert e["extra_info"]["input_config"][0] == "INT"

    prompt["1"]["inputs"]["value"] = -5000
    assert node_error_types(execution.validate_prompt("p", prompt)[3], "1") == ["value_smaller_than_min"]
    prompt["1"]["inputs"]["value"] = "abc"
    ne = execution.validate_prompt("p", prompt)[3]
    assert node_error_types(ne, "1") == ["invalid_input_type"]
    assert ne["1"]["errors"][0]["extra_info"]["received_value"] == "abc"
    prompt["1"]["inputs"] = {}
    ne = execution.validate_prompt("p", prompt)[3]
    assert ne["1"]["errors"][0] == {"type": "required_input_missing", "message": "Required input is missing",
                                    "details": "value", "extra_info": {"input_name": "value"}}


def test_link_errors():
    bad_shape = {"1": {"class_type": "Sink", "inputs": {"value": ["x", 0, 1]}}}
    assert node_error_types(execution.validate_prompt("p", bad_shape)[3], "1") == ["bad_linked_input"]
    missing = {"1": {"class_type": "Sink", "inputs": {"value": ["9", 0]}}}
    assert node_error_types(execution.validate_prompt("p", missing)[3], "1") == ["bad_linked_input"]
    mismatch = {"1": {"class_type": "Hidden", "inputs": {}},
                "2": {"class_type": "Strings", "inputs": {"values": ["3", 0]}},
                "3": {"class_type": "Const", "inputs": {"value": 1}}}
    ok, err, good, ne = execution.validate_prompt("p", mismatch)
    assert ok and good == ["1"]  # one good output is enough; the bad one is dropped
    assert node_error_types(ne, "2") == ["return_type_mismatch"]
    info = ne["2"]["errors"][0]["extra_info"]
    assert info["received_type"] == "INT" and info["linked_node"] == ["3", 0]
    assert ne["2"]["dependent_outputs"] == ["2"]


def test_type_sets_and_wildcards():
    # "INT,FLOAT" input accepts INT; a str-subclass wildcard accepts anything
    ok = execution.validate_prompt("p", {"1": {"class_type": "Const", "inputs": {"value": 1}},
                                         "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
                                         "3": {"class_type": "AnySink", "inputs": {"value": ["1", 0]}}})
    assert ok[0] and sorted(ok[2]) == ["2", "3"]
    from comfy_execution.validation import validate_node_input
    assert validate_node_input("INT", "FLOAT,INT")
    assert not validate_node_input("INT", "FLOAT")
    assert validate_node_input("*", "IMAGE") and validate_node_input("LATENT", "*")
    assert validate_node_input("INT,FLOAT", "INT") and not validate_node_input("INT,FLOAT", "INT", strict=True)


def test_combos_legacy_modern_multiselect():
    assert execution.validate_prompt("p", combos())[0]
    ne = execution.validate_prompt("p", combos(legacy="zz"))[3]
    e = ne["1"]["errors"][0]
    assert e["type"] == "value_not_in_list" and "zz" in e["details"]
    assert node_error_types(execution.validate_prompt("p", combos(modern="zz"))[3], "1") == ["value_not_in_list"]
    assert node_error_types(execution.validate_prompt("p", combos(multi={"__value__": ["p", "zz"]}))[3], "1") == \
        ["value_not_in_list"]
    assert execution.validate_prompt("p", combos(multi={"__value__": ["q"]}))[0]
    assert node_error_types(execution.validate_prompt("p", combos(multi=["q", "r", "p"]))[3], "1") == \
        ["bad_linked_input"]
    assert node_error_types(execution.validate_prompt("p", combos(maybe=-1))[3], "1") == ["value_smaller_than_min"]


def test_validate_inputs_semantics():
    def prompt(value, other=1):
        return {"1": {"class_type": "Validated", "inputs": {"value": value, "other": other}}}

    # `value` is a VALIDATE_INPUTS argument: its max is not checked by the executor
    assert execution.validate_prompt("p", prompt(50))[0]
    ne = execution.validate_prompt("p", prompt(13))[3]
    assert ne["1"]["errors"][0]["type"] == "custom_validation_failed"
    assert ne["1"]["errors"][0]["details"] == "13 is unlucky"
    # `other` is not: its min still applies
    assert node_error_types(execution.validate_prompt("p", prompt(1, -1))[3], "1") == ["value_smaller_than_min"]
    ok, err, _, ne = execution.validate_prompt("p", prompt(99))
    assert ne["1"]["errors"][0]["type"] == "exception_during_validation"
    assert ne["1"]["errors"][0]["details"] == "validator crashed"
    assert ne["1"]["errors"][0]["extra_info"]["exception_type"] == "RuntimeError"


def test_exception_during_inner_validation(monkeypatch):
    import nodes

    class Source:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT",)}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"

        @classmethod
        def VALIDATE_INPUTS(cls, value):
            raise RuntimeError("inner crash")

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "Source", Source)
    prompt = {"1": {"class_type": "Source", "inputs": {"value": 1}},
              "2": {"class_type": "AnySink", "inputs": {"value": ["1", 0]}}}
    ok, err, _, ne = execution.validate_prompt("p", prompt)
    assert not ok and "inner crash" in err["details"]
    e = ne["1"]["errors"][0]
    assert e["type"] == "exception_during_inner_validation" and e["details"] == "inner crash"
    assert e["extra_info"]["linked_node"] == ["1", 0]
    assert ne["1"]["dependent_outputs"] == ["2"]


def test_input_types_argument_replaces_type_check():
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}},
              "2": {"class_type": "TypesValidated", "inputs": {"value": ["1", 0]}}}
    assert execution.validate_prompt("p", prompt)[0]  # INT into STRING allowed by the node itself
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": 1}},
              "2": {"class_type": "TypesValidated", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Hidden", "inputs": {}}}
    prompt["1"]["class_type"] = "Combos"  # Combos has no outputs: slot 0 does not exist
    ne = execution.validate_prompt("p", prompt)[3]
    assert node_error_types(ne, "2")[0] == "bad_linked_input"


def test_dependent_outputs_lists_every_affected_output():
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 5000}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
              "4": {"class_type": "Hidden", "inputs": {}}}
    ok, err, good, ne = execution.validate_prompt("p", prompt)
    assert ok and good == ["4"]
    assert sorted(ne["1"]["dependent_outputs"]) == ["2", "3"]
    assert "2" not in ne and "3" not in ne  # outputs invalid only through an ancestor carry no errors
