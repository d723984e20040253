"""POST /prompt (real execution.validate_prompt), the queue, history, interrupt, free and /api/jobs."""
# Fixtures are shared by importing them by name, which ruff reads as redefinitions:
# ruff: noqa: F811

from __future__ import annotations

import uuid

import pytest

from tests.test_server_common import server_args, srv, test_nodes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.asyncio


def graph(value=3):
    return {"1": {"class_type": "SrvConstInt", "inputs": {"value": value}},
            "2": {"class_type": "SrvShowInt", "inputs": {"value": ["1", 0]}}}


async def post(client, body):
    r = await client.post("/api/prompt", json=body)
    return r.status, await r.json()


async def test_prompt_accepted_and_queued(srv):
    server, client = srv
    status, body = await post(client, {"prompt": graph(), "client_id": "abc",
                                       "extra_data": {"extra_pnginfo": {"workflow": {"id": "wf-1"}},
                                                      "api_key_comfy_org": "SECRET",
                                                      "auth_token_comfy_org": "TOKEN"}})
    assert status == 200
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    assert str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]
    assert await (await client.get("/prompt")).json() == {"exec_info": {"queue_remaining": 1}}

    queue = await (await client.get("/api/queue")).json()
    assert queue["queue_running"] == []
    (item,) = queue["queue_pending"]
    assert len(item) == 5 and item[1] == body["prompt_id"] and item[4] == ["2"]
    extra = item[3]
    assert extra["client_id"] == "abc" and isinstance(extra["create_time"], int)
    assert "api_key_comfy_org" not in extra and "auth_token_comfy_org" not in extra
    # The secrets still travel to the executor, in the item's sensitive part.
    _, pending = server.prompt_queue.get_current_queue()
    assert pending[0][5] == {"api_key_comfy_org": "SECRET", "auth_token_comfy_org": "TOKEN"}


async def test_number_and_front(srv):
    _, client = srv
    _, a = await post(client, {"prompt": graph()})
    _, b = await post(client, {"prompt": graph(), "front": True})
    _, c = await post(client, {"prompt": graph(), "number": 7.5})
    assert b["number"] == -(a["number"] + 1) and c["number"] == 7.5
    server, _ = srv
    _, pending = server.prompt_queue.get_current_queue()
    # front=True jumps the queue: the heap hands out the lowest number first.
    assert min(pending)[1] == b["prompt_id"]


async def test_client_prompt_id_must_be_canonical_uuid(srv):
    _, client = srv
    pid = str(uuid.uuid4())
    status, body = await post(client, {"prompt": graph(), "prompt_id": pid})
    assert status == 200 and body["prompt_id"] == pid
    for bad in ("not-a-uuid", pid.upper(), pid.replace("-", "")):
        status, body = await post(client, {"prompt": graph(), "prompt_id": bad})
        assert status == 400 and body["error"]["type"] == "invalid_prompt_id", bad
        assert body["node_errors"] == {}


async def test_prompt_errors_in_comfyui_shapes(srv):
    server, client = srv
    r = await client.post("/api/prompt", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and set((await r.json())["error"]) == {"type", "message", "details", "extra_info"}

    status, body = await post(client, {"client_id": "x"})
    assert status == 400 and body["error"]["type"] == "no_prompt" and body["node_errors"] == {}

    status, body = await post(client, {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in body["error"]["message"]

    status, body = await post(client, {"prompt": {"1": {"class_type": "SrvConstInt", "inputs": {"value": 1}}}})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"

    status, body = await post(client, {"prompt": graph(value=1000)})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["1"]
    assert err["class_type"] == "SrvConstInt" and err["dependent_outputs"] == ["2"]
    (e,) = err["errors"]
    assert e["type"] == "value_bigger_than_max" and e["extra_info"]["input_name"] == "value"
    assert set(e) == {"type", "message", "details", "extra_info"}
    assert server.prompt_queue.get_tasks_remaining() == 0  # nothing invalid was queued


async def test_queue_delete_and_clear(srv):
    server, client = srv
    ids = [(await post(client, {"prompt": graph()}))[1]["prompt_id"] for _ in range(3)]
    r = await client.post("/api/queue", json={"delete": [ids[1]]})
    assert r.status == 200
    pending = (await (await client.get("/queue")).json())["queue_pending"]
    assert sorted(i[1] for i in pending) == sorted([ids[0], ids[2]])
    await client.post("/queue", json={"clear": True})
    assert (await (await client.get("/queue")).json())["queue_pending"] == []
    assert (await client.post("/api/queue", data="oops")).status == 400


def run_synthetic(queue, status_str="success", messages=None, outputs=None):
    """Take one item off the queue and record it as done, the way the prompt worker does."""
    item, item_id = queue.get(timeout=1)
    queue.task_done(item_id, {"outputs": outputs or {}, "meta": {}},
                    {"status_str": status_str, "completed": status_str == "success", "messages": messages or []})
    return item[1]


async def test_history_get_delete_clear(srv):
    server, client = srv
    ids = [(await post(client, {"prompt": graph(), "number": n}))[1]["prompt_id"] for n in range(3)]
    for _ in ids:
        run_synthetic(server.prompt_queue)
    history = await (await client.get("/api/history")).json()
    assert list(history) == ids
    entry = history[ids[0]]
    assert entry["prompt"][1] == ids[0] and entry["status"]["status_str"] == "success"
    assert list(await (await client.get("/api/history?max_items=1")).json()) == [ids[2]]
    assert list(await (await client.get(f"/history/{ids[1]}")).json()) == [ids[1]]
    assert await (await client.get("/history/unknown")).json() == {}
    await client.post("/api/history", json={"delete": [ids[0]]})
    assert list(await (await client.get("/api/history")).json()) == ids[1:]
    await client.post("/api/history", json={"clear": True})
    assert await (await client.get("/api/history")).json() == {}


async def test_interrupt_targets_only_the_running_prompt(srv):
    import comfy.model_management as mm

    server, client = srv
    mm.interrupt_current_processing(False)
    _, body = await post(client, {"prompt": graph()})
    # Not running yet: an interrupt naming it must not stop whatever else runs.
    await client.post("/api/interrupt", json={"prompt_id": body["prompt_id"]})
    assert not mm.processing_interrupted()
    server.prompt_queue.get(timeout=1)  # now it is running
    await client.post("/api/interrupt", json={"prompt_id": "someone-else"})
    assert not mm.processing_interrupted()
    await client.post("/api/interrupt", json={"prompt_id": body["prompt_id"]})
    assert mm.processing_interrupted()
    mm.interrupt_current_processing(False)
    r = await client.post("/api/interrupt")  # no body: interrupt unconditionally
    assert r.status == 200 and mm.processing_interrupted()
    mm.interrupt_current_processing(False)


async def test_free_sets_worker_flags(srv):
    server, client = srv
    r = await client.post("/api/free", json={"unload_models": True, "free_memory": True})
    assert r.status == 200
    assert server.prompt_queue.get_flags() == {"unload_models": True, "free_memory": True}
    await client.post("/api/free", json={"unload_models": False})
    assert server.prompt_queue.get_flags() == {}


async def test_jobs_listing_status_mapping_and_pagination(srv):
    server, client = srv
    q = server.prompt_queue
    ids = [(await post(client, {"prompt": graph(), "number": n,
                                "extra_data": {"extra_pnginfo": {"workflow": {"id": f"wf{n % 2}"}}}}))[1]["prompt_id"]
           for n in range(5)]
    done_ok = run_synthetic(q, "success", [["execution_start", {"timestamp": 1000}],
                                           ["execution_success", {"timestamp": 1500}]],
                            outputs={"9": {"images": [{"filename": "t.png", "subfolder": "", "type": "temp"},
                                                      {"filename": "o.png", "subfolder": "", "type": "output"}],
                                           "animated": [False]}, "8": {"text": ["hi"]}})
    failed = run_synthetic(q, "error", [["execution_start", {"timestamp": 1000}],
                                        ["execution_error", {"timestamp": 1100, "exception_message": "bad"}]])
    cancelled = run_synthetic(q, "error", [["execution_start", {"timestamp": 1000}],
                                           ["execution_interrupted", {"timestamp": 4000}]])
    running, _ = q.get(timeout=1)
    pending = ids[4]

    body = await (await client.get("/api/jobs")).json()
    by_id = {j["id"]: j for j in body["jobs"]}
    assert by_id[done_ok]["status"] == "completed" and by_id[failed]["status"] == "failed"
    assert by_id[cancelled]["status"] == "cancelled" and by_id[running[1]]["status"] == "in_progress"
    assert by_id[pending]["status"] == "pending"
    ok = by_id[done_ok]
    assert ok["execution_start_time"] == 1000 and ok["execution_end_time"] == 1500
    assert ok["outputs_count"] == 3 and ok["workflow_id"] == "wf0"
    assert ok["preview_output"] == {"filename": "o.png", "subfolder": "", "type": "output",
                                    "nodeId": "9", "mediaType": "images"}
    assert by_id[failed]["execution_error"]["exception_message"] == "bad"
    assert "execution_error" not in ok and "preview_output" not in by_id[pending]  # nulls pruned
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 5, "has_more": False}

    queue_view = await (await client.get("/api/jobs?status=in_progress,pending&limit=200&offset=0")).json()
    assert {j["id"] for j in queue_view["jobs"]} == {running[1], pending}
    page = await (await client.get("/api/jobs?status=completed,failed,cancelled&limit=2&offset=1"
                                   "&sort_by=execution_duration&sort_order=desc")).json()
    assert [j["id"] for j in page["jobs"]] == [done_ok, failed]  # 3000 ms, 500 ms, 100 ms -> skip first
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 3, "has_more": False}
    wf = await (await client.get("/api/jobs?workflow_id=wf1")).json()
    assert {j["id"] for j in wf["jobs"]} == {ids[1], ids[3]}
    for bad in ("status=done", "sort_by=name", "sort_order=up", "limit=0", "limit=x"):
        assert (await client.get(f"/api/jobs?{bad}")).status == 400, bad

    detail = await (await client.get(f"/api/jobs/{done_ok}")).json()
    assert detail["outputs"]["9"]["images"][1]["filename"] == "o.png"
    assert detail["execution_status"]["status_str"] == "success"
    assert detail["workflow"]["prompt"] == graph()
    pending_detail = await (await client.get(f"/api/jobs/{pending}")).json()
    assert pending_detail["status"] == "pending" and pending_detail["workflow"]["prompt"] == graph()
    r = await client.get("/api/jobs/unknown")
    assert r.status == 404 and "error" in await r.json()


async def test_job_cancel_routes(srv):
    import comfy.model_management as mm

    server, client = srv
    mm.interrupt_current_processing(False)
    ids = [(await post(client, {"prompt": graph(), "number": n}))[1]["prompt_id"] for n in range(3)]
    server.prompt_queue.get(timeout=1)  # ids[0] runs
    assert await (await client.post(f"/api/jobs/{ids[1]}/cancel")).json() == {"cancelled": True}
    assert not mm.processing_interrupted()
    assert await (await client.post("/api/jobs/cancel", json={"job_ids": [ids[0], ids[2]]})).json() == \
        {"cancelled": True}
    assert mm.processing_interrupted()  # the running one was interrupted
    mm.interrupt_current_processing(False)
    _, pending = server.prompt_queue.get_current_queue()
    assert pending == []
    assert await (await client.post("/api/jobs/unknown/cancel")).json() == {"cancelled": False}
    assert (await client.post("/api/jobs/cancel", json={"ids": []})).status == 400
