"""Executor: run order, WebSocket messages, caching between prompts, errors, interrupt, progress."""

from __future__ import annotations

import pytest

import comfy.model_management as mm
import comfy.utils
import execution
from tests.fixtures import exec_nodes
from tests.fixtures.harness import FakeServer, install, run


@pytest.fixture
def ex(monkeypatch):
    install(monkeypatch)
    mm.interrupt_current_processing(False)
    return execution.PromptExecutor(FakeServer())


def chain(a=1, b=2):
    # 1,2 -> 3 (Add) -> 4 (Sink); 5 is a Const no output depends on.
    return {"1": {"class_type": "Const", "inputs": {"value": a}},
            "2": {"class_type": "Const", "inputs": {"value": b}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}},
            "5": {"class_type": "Const", "inputs": {"value": 7}}}


def ran():
    return [x[1] for x in exec_nodes.LOG if x[0] == "run"]


def test_runs_ancestors_of_outputs_in_dependency_order(ex):
    run(ex, chain())
    order = ran()
    assert sorted(order) == ["1", "2", "3", "4"]  # "5" is not an ancestor of an output
    assert order.index("3") > order.index("1") and order.index("3") > order.index("2")
    assert order[-1] == "4"
    assert ex.success
    assert ex.history_result["outputs"] == {"4": {"values": [3]}}
    assert ex.history_result["meta"]["4"] == {"node_id": "4", "display_node": "4", "parent_node": None,
                                              "real_node_id": "4"}


def test_message_sequence_and_shapes(ex):
    run(ex, chain())
    names = [e for e, _ in ex.server.events() if e not in ("progress_state",)]
    assert names[0] == "execution_start" and names[1] == "execution_cached"
    assert names[-1] == "execution_success"
    executing = ex.server.of("executing")
    assert [d["node"] for d in executing] == ran()
    assert all(d["prompt_id"] == "p1" and d["display_node"] == d["node"] for d in executing)
    executed = ex.server.of("executed")
    assert executed == [{"node": "4", "display_node": "4", "output": {"values": [3]}, "prompt_id": "p1"}]
    start = ex.server.of("execution_start")[0]
    assert set(start) == {"prompt_id", "timestamp"} and isinstance(start["timestamp"], int)
    assert all(sid == "c1" for _, _, sid in ex.server.messages)
    # status_messages feed history: the lifecycle events only, with timestamps
    assert [m[0] for m in ex.status_messages] == ["execution_start", "execution_cached", "execution_success"]
    state = ex.server.of("progress_state")[-1]
    assert state["prompt_id"] == "p1"
    assert {n: s["state"] for n, s in state["nodes"].items()} == {k: "finished" for k in "1234"}
    assert set(state["nodes"]["4"]) == {"value", "max", "state", "node_id", "prompt_id", "display_node_id",
                                        "parent_node_id", "real_node_id"}


def test_unchanged_prompt_is_fully_cached_but_output_still_reports(ex):
    run(ex, chain())
    exec_nodes.LOG.clear()
    run(ex, chain(), prompt_id="p2")
    assert ran() == []
    assert sorted(ex.server.of("execution_cached")[0]["nodes"]) == ["1", "2", "3", "4"]
    # a cached output node still sends `executed` with its cached ui, and history gets it
    assert ex.server.of("executed") == [{"node": "4", "display_node": "4", "output": {"values": [3]},
                                         "prompt_id": "p2"}]
    assert ex.history_result["outputs"] == {"4": {"values": [3]}}


def test_changed_input_reruns_descendants_only(ex):
    run(ex, chain(a=1, b=2))
    exec_nodes.LOG.clear()
    run(ex, chain(a=10, b=2), prompt_id="p2")
    assert sorted(ran()) == ["1", "3", "4"]
    assert sorted(ex.server.of("execution_cached")[0]["nodes"]) == ["2"]
    assert ex.history_result["outputs"]["4"] == {"values": [12]}


def test_one_node_instance_per_id(ex):
    run(ex, chain())
    obj = ex.caches.objects.get("3", "Add")
    run(ex, chain(a=5), prompt_id="p2")
    assert ex.caches.objects.get("3", "Add") is obj


def test_is_changed(ex):
    prompt = {"1": {"class_type": "Changing", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    run(ex, prompt)
    exec_nodes.LOG.clear()
    run(ex, prompt, prompt_id="p2")
    assert ran() == []  # same IS_CHANGED value: cached
    exec_nodes.CHANGED["value"] = 1
    run(ex, prompt, prompt_id="p3")
    assert sorted(ran()) == ["1", "2"]
    exec_nodes.LOG.clear()
    exec_nodes.CHANGED["value"] = float("nan")  # NaN: always re-run
    run(ex, prompt, prompt_id="p4")
    run(ex, prompt, prompt_id="p5")
    assert ran().count("1") == 2
    exec_nodes.LOG.clear()
    exec_nodes.CHANGED["value"] = "raise"  # an exception counts as NaN
    run(ex, prompt, prompt_id="p6")
    run(ex, prompt, prompt_id="p7")
    assert ran().count("1") == 2 and ex.success


def test_not_idempotent_is_keyed_by_node_id(ex):
    # Two identical idempotent nodes share one cache entry; NOT_IDEMPOTENT ones do not.
    prompt = {"1": {"class_type": "Random", "inputs": {"value": 1}},
              "2": {"class_type": "Random", "inputs": {"value": 1}},
              "3": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert sorted(ran()) == ["1", "2", "3", "4"]
    same = {"1": {"class_type": "Const", "inputs": {"value": 1}},
            "2": {"class_type": "Const", "inputs": {"value": 1}},
            "3": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
            "4": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    exec_nodes.LOG.clear()
    run(ex, same, prompt_id="p2")
    assert sorted(n for n in ran() if n in "12") == ["1"]


def test_cache_none_and_lru(monkeypatch):
    install(monkeypatch)
    none = execution.PromptExecutor(FakeServer(), cache_type="none")
    run(none, chain())
    exec_nodes.LOG.clear()
    run(none, chain(), prompt_id="p2")
    assert sorted(ran()) == ["1", "2", "3", "4"]
    assert none.server.of("execution_cached")[0]["nodes"] == []

    lru = execution.PromptExecutor(FakeServer(), cache_type="lru", cache_args={"lru": 100})
    run(lru, chain(a=1))
    run(lru, chain(a=2), prompt_id="p2")
    exec_nodes.LOG.clear()
    run(lru, chain(a=1), prompt_id="p3")  # classic would have dropped a=1's entries; LRU keeps them
    assert ran() == []
    classic = execution.PromptExecutor(FakeServer())
    run(classic, chain(a=1))
    run(classic, chain(a=2), prompt_id="p2")
    exec_nodes.LOG.clear()
    run(classic, chain(a=1), prompt_id="p3")
    assert sorted(ran()) == ["1", "3", "4"]
    with pytest.raises(ValueError, match="cache"):
        execution.PromptExecutor(FakeServer(), cache_type="bogus")


def test_error_shape_and_executor_keeps_working(ex):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "text": "hello"}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert not ex.success
    err = ex.server.of("execution_error")
    assert len(err) == 1
    err = err[0]
    assert set(err) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                        "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert err["node_id"] == "2" and err["node_type"] == "Fail" and err["exception_type"] == "ValueError"
    assert err["exception_message"] == "boom 4"
    assert err["current_inputs"] == {"value": [4], "text": ["hello"]}
    assert "1" in err["executed"] and "1" in err["current_outputs"]
    assert any("boom" in line or "raise ValueError" in line for line in err["traceback"])
    assert ex.status_messages[-1][0] == "execution_error"
    assert "execution_success" not in [e for e, _ in ex.server.events()]
    assert ex.server.of("progress_state")[-1]["nodes"]["2"]["state"] == "error"
    # the executor serves the next prompt normally
    run(ex, chain(), prompt_id="p2")
    assert ex.success and ex.history_result["outputs"]["4"] == {"values": [3]}


def test_oom_adds_tip_and_unloads_models(ex, monkeypatch):
    unloaded = []
    monkeypatch.setattr(mm, "unload_all_models", lambda: unloaded.append(True))

    class OOM(exec_nodes.Fail):
        def run(self, value, text):
            raise mm.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setitem(execution.nodes.NODE_CLASS_MAPPINGS, "OOM", OOM)
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "OOM", "inputs": {"value": ["1", 0], "text": "x"}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    err = ex.server.of("execution_error")[0]
    assert err["exception_message"].startswith("CUDA out of memory")
    assert execution.OOM_TIP in err["exception_message"]
    assert unloaded == [True]


def test_progress_hook_previews_and_restores_hook(ex):
    before = comfy.utils.PROGRESS_BAR_HOOK
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 3}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert ex.server.of("progress") == [{"value": i, "max": 3, "prompt_id": "p1", "node": "2"} for i in (1, 2, 3)]
    previews = [(e, d) for e, d in ex.server.events() if e == execution.UNENCODED_PREVIEW_IMAGE]
    assert previews == [(2, ("JPEG", "preview0", 512))]
    running = [s["nodes"]["2"] for s in ex.server.of("progress_state") if s["nodes"].get("2", {}).get("state") == "running"]
    assert running[-1]["value"] == 3 and running[-1]["max"] == 3
    assert comfy.utils.PROGRESS_BAR_HOOK is before


def test_interrupt_at_progress_step(ex):
    exec_nodes.EVENTS["steps"] = True  # the node presses Cancel after its first step
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 5}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert not ex.success
    assert len(ex.server.of("progress")) == 1  # the second step noticed the interrupt
    msg = ex.server.of("execution_interrupted")
    assert len(msg) == 1 and msg[0]["node_id"] == "2" and msg[0]["node_type"] == "Steps"
    assert set(msg[0]) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert ex.status_messages[-1][0] == "execution_interrupted"
    assert not ex.server.of("execution_error")
    exec_nodes.EVENTS.clear()
    run(ex, prompt, prompt_id="p2")  # the flag was consumed; the next prompt runs
    assert ex.success


def test_interrupt_before_node(ex, monkeypatch):
    calls = []

    def interrupt_after_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            mm.interrupt_current_processing(True)

    class Trigger(exec_nodes.Const):
        def run(self, value, unique_id):
            interrupt_after_first()
            return (value,)

    monkeypatch.setitem(execution.nodes.NODE_CLASS_MAPPINGS, "Trigger", Trigger)
    prompt = {"1": {"class_type": "Trigger", "inputs": {"value": 4}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt)
    assert ran() == []  # Add never ran: the flag is checked before each node
    msg = ex.server.of("execution_interrupted")[0]
    assert msg["node_id"] == "2" and msg["executed"] == ["1"]


def test_execute_clears_stale_interrupt_flag(ex):
    mm.interrupt_current_processing(True)
    run(ex, chain())
    assert ex.success


def test_lockstep_hooks(monkeypatch):
    install(monkeypatch)

    class Lockstep:
        def __init__(self):
            self.before, self.failed = [], []

        def before_node(self, prompt_id, node_id):
            self.before.append((prompt_id, node_id))

        def node_failed(self, prompt_id, node_id, exc):
            self.failed.append((prompt_id, node_id, type(exc).__name__))

    ls = Lockstep()
    ex = execution.PromptExecutor(FakeServer(), lockstep=ls)
    run(ex, chain())
    assert [n for _, n in ls.before] == ran() and all(p == "p1" for p, _ in ls.before)
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "text": "x"}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    run(ex, prompt, prompt_id="p2")
    assert ls.failed == [("p2", "2", "ValueError")]

    class RemoteRankError(Exception):
        pass

    class Stopping(Lockstep):
        def before_node(self, prompt_id, node_id):
            if node_id == "3":
                raise RemoteRankError("rank 1 failed in node 3")

    stopping = Stopping()
    ex2 = execution.PromptExecutor(FakeServer(), lockstep=stopping)
    exec_nodes.LOG.clear()
    run(ex2, chain())
    assert "3" not in ran() and not ex2.success
    err = ex2.server.of("execution_error")[0]
    assert err["node_id"] == "3" and "rank 1 failed" in err["exception_message"]
    assert stopping.failed == []  # the other rank already knows; no second notice


def test_dependency_cycle_reported(ex):
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    ex.execute(prompt, "p1", {"client_id": "c1"}, ["3"])
    err = ex.server.of("execution_error")[0]
    assert err["exception_type"] == "graph.DependencyCycleError" and err["node_id"] in ("1", "2")
    assert not ex.success


def test_malformed_prompt_reports_error_and_executor_survives(ex):
    ex.execute({"1": {"class_type": "Const", "inputs": {"value": 1}}}, "bad", {"client_id": "c1"}, ["9"])
    assert not ex.success
    err = ex.server.of("execution_error")[0]
    assert err["prompt_id"] == "bad" and "9" in err["exception_message"]
    assert ex.history_result == {"outputs": {}, "meta": {}}
    run(ex, chain(), prompt_id="p2")
    assert ex.success and ex.history_result["outputs"]["4"] == {"values": [3]}


def test_unknown_class_at_execution_names_the_fix(ex):
    ex.execute({"1": {"class_type": "Missing", "inputs": {}},
                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}, "p", {"client_id": "c1"}, ["2"])
    err = ex.server.of("execution_error")[0]
    assert err["node_id"] == "1" and "custom node pack" in err["exception_message"]
