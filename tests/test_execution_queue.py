"""PromptQueue: ordering, running/history bookkeeping, flags, and persistence across a restart."""

from __future__ import annotations

import json
import os
import threading

import execution
from tests.fixtures.harness import FakeServer, install


def item(number, pid, sensitive=None):
    prompt = {"1": {"class_type": "Const", "inputs": {"value": number}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    return (number, pid, prompt, {"client_id": "c"}, ["2"], sensitive or {})


def test_heap_order_running_and_history():
    server = FakeServer()
    q = execution.PromptQueue(server)
    q.put(item(5, "b"))
    q.put(item(-1, "front"))
    q.put(item(7, "c", {"auth_token_comfy_org": "secret"}))
    assert server.queue_updates == 3
    assert q.get_tasks_remaining() == 3
    got, item_id = q.get()
    assert got[1] == "front"
    running, pending = q.get_current_queue()
    assert [r[1] for r in running] == ["front"] and sorted(p[1] for p in pending) == ["b", "c"]
    assert q.get_tasks_remaining() == 3
    status = {"status_str": "success", "completed": True, "messages": [["execution_start", {}]]}
    q.task_done(item_id, {"outputs": {"2": {"values": [1]}}, "meta": {"2": {"node_id": "2"}}}, status)
    h = q.get_history("front")["front"]
    assert h["prompt"] == tuple(got[:5]) and h["outputs"] == {"2": {"values": [1]}}
    assert h["status"] == status and h["meta"] == {"2": {"node_id": "2"}}
    assert q.get_tasks_remaining() == 2
    got, item_id = q.get()
    got, item_id = q.get()
    assert got[1] == "c" and got[5] == {"auth_token_comfy_org": "secret"}  # the worker still gets it
    q.task_done(item_id, {"outputs": {}, "meta": {}}, status)
    assert len(q.get_history("c")["c"]["prompt"]) == 5  # history never keeps the sensitive part
    assert q.get(timeout=0.01) is None


def test_history_paging_delete_wipe_and_limit(monkeypatch):
    monkeypatch.setattr(execution, "MAXIMUM_HISTORY_SIZE", 3)
    q = execution.PromptQueue(FakeServer())
    for n in range(5):
        q.put(item(n, f"p{n}"))
        _, i = q.get()
        q.task_done(i, {"outputs": {}, "meta": {}}, {"status_str": "success", "completed": True, "messages": []})
    assert list(q.get_history()) == ["p2", "p3", "p4"]  # oldest dropped at the limit
    assert list(q.get_history(max_items=2)) == ["p3", "p4"]
    assert list(q.get_history(max_items=1, offset=0)) == ["p2"]
    assert q.get_history("nope") == {}
    q.delete_history_item("p3")
    assert list(q.get_history()) == ["p2", "p4"]
    q.wipe_history()
    assert q.get_history() == {}


def test_delete_wipe_and_flags():
    q = execution.PromptQueue(FakeServer())
    for n in range(3):
        q.put(item(n, f"p{n}"))
    assert q.delete_queue_item(lambda x: x[1] == "p1")
    assert not q.delete_queue_item(lambda x: x[1] == "p1")
    assert [x[1] for x in q.get_current_queue()[1]] == ["p0", "p2"]
    q.wipe_queue()
    assert q.get_tasks_remaining() == 0
    q.set_flag("unload_models", True)
    assert q.get_flags(reset=False) == {"unload_models": True}
    assert q.get_flags() == {"unload_models": True} and q.get_flags() == {}


def test_get_blocks_until_put():
    q = execution.PromptQueue(FakeServer())
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    q.put(item(1, "late"))
    t.join(5)
    assert got and got[0][0][1] == "late"


def test_persistence_survives_restart(tmp_path):
    path = str(tmp_path / "state" / "queue.json")
    q = execution.PromptQueue(FakeServer(), persist_path=path)
    q.put(item(1, "a"))
    q.put(item(2, "b"))
    q.put(item(3, "c"))
    running, _ = q.get()  # "a" is running when the process dies
    assert json.load(open(path))[0][1] == "a"
    assert [f for f in os.listdir(os.path.dirname(path)) if f != "queue.json"] == []  # no temp files left

    q2 = execution.PromptQueue(FakeServer(), persist_path=path)
    assert [x[1] for x in sorted(q2.get_current_queue()[1])] == ["a", "b", "c"]
    got, i = q2.get()
    assert got == running  # restored item is identical (tuple, prompt, extra data, outputs)
    q2.task_done(i, {"outputs": {}, "meta": {}}, None)
    q2.delete_queue_item(lambda x: x[1] == "c")
    q3 = execution.PromptQueue(FakeServer(), persist_path=path)
    assert [x[1] for x in q3.get_current_queue()[1]] == ["b"]
    q3.wipe_queue()
    assert json.load(open(path)) == []


def test_corrupt_persist_file_starts_empty(tmp_path, caplog):
    path = tmp_path / "queue.json"
    path.write_text("{not json")
    q = execution.PromptQueue(FakeServer(), persist_path=str(path))
    assert q.get_tasks_remaining() == 0
    assert "Could not reload the saved queue" in caplog.text
    q.put(item(1, "a"))
    assert json.loads(path.read_text())[0][1] == "a"


def test_worker_round_trip(monkeypatch):
    """What the prompt worker does: queue -> executor -> task_done -> history item."""
    install(monkeypatch)
    server = FakeServer()
    q = execution.PromptQueue(server)
    ex = execution.PromptExecutor(server)
    prompt = item(1, "p")[2]
    ok, _, good, _ = execution.validate_prompt("p", prompt)
    assert ok
    q.put((1, "p", prompt, {"client_id": "c"}, good, {}))
    (number, pid, prompt, extra, outputs, _), i = q.get()
    ex.execute(prompt, pid, extra, outputs)
    q.task_done(i, ex.history_result, {"status_str": "success" if ex.success else "error",
                                       "completed": ex.success, "messages": ex.status_messages})
    h = q.get_history("p")["p"]
    assert h["outputs"] == {"2": {"values": [1]}}
    assert h["meta"]["2"]["display_node"] == "2"
    assert [m[0] for m in h["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]


def test_unserialisable_item_is_kept_in_memory(tmp_path, caplog):
    path = tmp_path / "queue.json"
    q = execution.PromptQueue(FakeServer(), persist_path=str(path))
    q.put((1, "x", {}, {"obj": object()}, [], {}))
    assert q.get_tasks_remaining() == 1 and "Could not save the queue" in caplog.text
