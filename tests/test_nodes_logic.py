"""ComfySwitchNode and ComfyMathExpression (comfy_extras/nodes_logic.py): the lazy switch through the real
executor, the expression evaluator's maths and its refusal of anything that is not arithmetic."""

from __future__ import annotations

import math

import pytest

import comfy.model_management as mm
import execution
import nodes
from comfy_extras import nodes_logic
from tests.fixtures import exec_nodes
from tests.fixtures.harness import FakeServer, install, run


@pytest.fixture
def ex(monkeypatch):
    install(monkeypatch)
    nodes.init_extra_nodes(init_custom_nodes=False)
    mm.interrupt_current_processing(False)
    return execution.PromptExecutor(FakeServer())


def _prompt(switch: bool, expression="floor(a * b) + 1"):
    return {"1": {"class_type": "Const", "inputs": {"value": 3}},
            "2": {"class_type": "Const", "inputs": {"value": 5}},
            "3": {"class_type": "ComfySwitchNode", "inputs": {"switch": switch, "on_false": ["1", 0],
                                                                "on_true": ["2", 0]}},
            "4": {"class_type": "ComfyMathExpression", "inputs": {"expression": expression,
                                                                   "values.a": ["3", 0], "values.b": ["1", 0]}},
            "5": {"class_type": "Sink", "inputs": {"value": ["4", 1]}}}


@pytest.mark.parametrize("switch,chosen,skipped,expected", [(False, "1", "2", 3 * 3 + 1), (True, "2", None, 5 * 3 + 1)])
def test_switch_computes_only_the_chosen_branch(ex, switch, chosen, skipped, expected):
    run(ex, _prompt(switch))
    assert ex.success, ex.status_messages
    assert ex.history_result["outputs"]["5"]["values"] == [expected]
    assert exec_nodes.CALLS.get(chosen) == 1
    if skipped is not None:  # node 1 also feeds the math node, so only node 2 can be left out
        assert skipped not in exec_nodes.CALLS


def test_math_outputs_float_and_int_and_reports_unconnected_names(ex):
    node = nodes_logic.ComfyMathExpression()
    assert node.evaluate("a / b", **{"values.a": 7, "values.b": 2}) == (3.5, 3)
    assert node.evaluate("a > b and not c", **{"values.a": 2, "values.b": 1, "values.c": 0}) == (1.0, 1)
    with pytest.raises(ValueError, match="'c', which is not connected"):
        node.evaluate("a + c", **{"values.a": 1})
    prompt = _prompt(False, expression="a + z")
    ok, _, _, node_errors = execution.validate_prompt("p", prompt)
    assert ok  # the expression is only read when the node runs
    ex.execute(prompt, "p2", {}, ["5"])
    assert not ex.success and "not connected" in str(ex.status_messages)


def test_evaluator_maths():
    ev = nodes_logic.evaluate_expression
    assert ev("2 ** 10 - 1", {}) == 1023
    assert ev("round(pi, 3)", {}) == 3.142
    assert ev("clamp(a, 0, 1)", {"a": 1.7}) == 1
    assert ev("a if a < b else b", {"a": 4, "b": 2}) == 2
    assert ev("1 < a < 3", {"a": 2}) is True and ev("1 < a < 3", {"a": 3}) is False
    assert math.isclose(ev("sqrt(a) * log(e)", {"a": 16.0}), 4.0)
    assert ev("max(a, b, 10) // 3 % 2", {"a": 1, "b": 2}) == 1


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "a.__class__", "(lambda: 1)()",
                                        "[1, 2]", "open('x')", "a[0]", "9 ** 9 ** 9", "'text'"])
def test_evaluator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        nodes_logic.evaluate_expression(expression, {"a": 1})


def test_interfaces_match_the_saved_workflows():
    spec = nodes_logic.ComfyMathExpression.INPUT_TYPES()
    assert list(spec["required"]) == ["expression", "values.a"]
    assert list(spec["optional"])[:2] == ["values.b", "values.c"]
    assert nodes_logic.ComfyMathExpression.RETURN_TYPES == ("FLOAT", "INT")
    switch = nodes_logic.ComfySwitchNode.INPUT_TYPES()["required"]
    assert switch["switch"][0] == "BOOLEAN" and switch["on_true"][1]["lazy"] and switch["on_false"][1]["lazy"]
