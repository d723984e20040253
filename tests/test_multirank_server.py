"""End to end under torchrun on CPU (gloo): rank 0 serves the HTTP/WebSocket API, followers run in
lockstep. One launch covers a normal prompt, an exception on a follower, an interrupt from the UI and a
killed follower (error seen within 60 s, group restarted by torchrun, queued prompt survives)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.multirank_helpers import free_port, launch, make_base, stop, tail, wait_history, wait_ready

pytestmark = pytest.mark.slow


def _messages_of(status: dict) -> list[str]:
    return [m[0] for m in (status or {}).get("messages", [])]


async def _scenario(port: int, base: str, markers: str, proc) -> dict:
    import aiohttp

    from tests.multirank_helpers import steps_prompt

    url = f"http://127.0.0.1:{port}"
    seen: list[dict] = []
    out: dict = {}
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{url}/ws?clientId=tester")

        async def reader():
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    seen.append(json.loads(msg.data))

        reader_task = asyncio.create_task(reader())

        async def submit(prompt):
            async with s.post(f"{url}/prompt", json={"prompt": prompt, "client_id": "tester"}) as r:
                body = await r.json()
                assert r.status == 200, body
                return body["prompt_id"]

        async def history(pid, timeout=60):
            return await asyncio.to_thread(wait_history, port, pid, timeout)

        async def wait_msg(pred, timeout):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for m in seen:
                    if pred(m):
                        return m
                await asyncio.sleep(0.05)
            return None

        # 1. A normal prompt: rank 0 writes the output, followers only into their scratch dir.
        pid = await submit(steps_prompt("ok", steps=3))
        out["ok"] = await history(pid)

        # 2. An exception on the follower at step 2: every rank stops, rank 0 reports it (naming the
        # rank and the node) and keeps serving.
        pid = await submit(steps_prompt("ferr", steps=5, fail_rank=1, fail_step=2, seed=2))
        out["follower_error"] = await history(pid)
        pid = await submit(steps_prompt("after_err", steps=2, seed=3))
        out["after_error"] = await history(pid)

        # 3. Interrupt from the UI while the sampler-like loop runs.
        pid = await submit(steps_prompt("intr", steps=400, delay=0.02, seed=4))
        progress = await wait_msg(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == pid, 60)
        assert progress is not None, "no progress message before interrupt"
        async with s.post(f"{url}/interrupt", json={}) as r:
            assert r.status == 200
        out["interrupt"] = await history(pid)
        pid = await submit(steps_prompt("after_intr", steps=2, seed=5))
        out["after_interrupt"] = await history(pid)

        # /free is applied after the next prompt on every rank (followers get it as a work item); the
        # prompt after that must still run in step with caches dropped everywhere.
        async with s.post(f"{url}/free", json={"unload_models": True, "free_memory": True}) as r:
            assert r.status == 200
        pid = await submit(steps_prompt("before_free", steps=2, seed=8))
        out["before_free"] = await history(pid)
        pid = await submit(steps_prompt("after_free", steps=2, seed=8))
        out["after_free"] = await history(pid)

        # 4. Kill the follower mid-prompt, with another prompt queued behind.
        for name in os.listdir(markers):
            os.remove(os.path.join(markers, name))
        slow = await submit(steps_prompt("killed", steps=2000, delay=0.02, seed=6))
        queued = await submit(steps_prompt("survivor", steps=2, seed=7))
        progress = await wait_msg(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == slow, 60)
        assert progress is not None
        with open(os.path.join(markers, "1.pid")) as f:
            follower_pid = int(f.read())
        killed_at = time.monotonic()
        os.kill(follower_pid, signal.SIGKILL)
        err = await wait_msg(lambda m: m["type"] == "execution_error" and m["data"]["prompt_id"] == slow, 60)
        out["kill_error"] = err
        out["kill_error_after"] = time.monotonic() - killed_at
        reader_task.cancel()
    # The group restarts under torchrun --max-restarts; the queued prompt runs on the new group.
    await asyncio.to_thread(wait_ready, port, proc, 120, os.path.join(base, "torchrun.log"))
    out["survivor"] = await history(queued, 120)
    return out


def test_server_two_ranks_errors_interrupt_and_killed_follower(tmp_path):
    base = str(tmp_path)
    markers = make_base(base)
    port = free_port()
    proc = launch(base, port, 2, extra_torchrun=["--standalone", "--max-restarts=1"])
    log = os.path.join(base, "torchrun.log")
    try:
        wait_ready(port, proc, log=log)
        out = asyncio.run(_scenario(port, base, markers, proc))
    except BaseException as e:
        # The torchrun log is the only place rank failures show; put it in the failure report.
        raise AssertionError(f"{e}\n--- torchrun log ---\n{tail(log, 20000)}") from e
    finally:
        stop(proc)

    assert out["ok"]["status"]["status_str"] == "success", out["ok"]
    assert out["ok"]["outputs"]["2"]["images"][0]["filename"].startswith("ok_")

    ferr = out["follower_error"]["status"]
    assert ferr["status_str"] == "error"
    error = [m[1] for m in ferr["messages"] if m[0] == "execution_error"][0]
    assert error["node_id"] == "1"
    assert "Rank 1 failed in node 1" in error["exception_message"]
    assert "injected failure on rank 1 at step 2" in error["exception_message"]
    assert error["exception_type"].endswith("RemoteRankError")
    assert out["after_error"]["status"]["status_str"] == "success"

    assert "execution_interrupted" in _messages_of(out["interrupt"]["status"]), out["interrupt"]
    assert out["after_interrupt"]["status"]["status_str"] == "success"

    assert out["before_free"]["status"]["status_str"] == "success"
    assert out["after_free"]["status"]["status_str"] == "success"
    # Same inputs as the prompt before /free, but the caches were dropped: it ran again (not cached).
    assert "execution_cached" in _messages_of(out["after_free"]["status"])
    cached = [m[1]["nodes"] for m in out["after_free"]["status"]["messages"] if m[0] == "execution_cached"][0]
    assert cached == [], cached

    assert out["kill_error"] is not None, "no execution_error after killing the follower"
    assert out["kill_error_after"] < 60
    assert out["survivor"]["status"]["status_str"] == "success", out["survivor"]

    # Side effects once: the real output dir has exactly rank 0's images of the successful prompts.
    files = sorted(os.listdir(os.path.join(base, "output")))
    prefixes = sorted(f.split("_")[0] for f in files if f.endswith(".png"))
    assert prefixes == ["after", "after", "after", "before", "ok", "survivor"], files
