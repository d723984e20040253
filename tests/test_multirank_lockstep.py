"""Agreement protocol over real gloo processes: errors and interrupts on any rank end the prompt on every
rank at the same point, the next prompt still runs in step, and a dead rank is detected by our own
heartbeat within the follower timeout."""

from __future__ import annotations

import os
import time

import pytest

from tests.multirank_helpers import MiniExecutor, spawn, steps

pytestmark = pytest.mark.slow


def _scenarios(dm):
    from comfy.taco_dit.core.execution_engine import Lockstep, RemoteRankError, install_step_agreement

    lockstep = Lockstep(dm)
    install_step_agreement(lockstep)
    ex = MiniExecutor(lockstep)
    rank = dm.rank
    out = {}

    def run(name, nodes):
        trace = []
        ex.events = []
        lockstep.begin(name)
        ex.execute(name, [(nid, fn(trace)) for nid, fn in nodes])
        outcome = lockstep.finish(ex.success, None)
        out[name] = {"events": ex.events, "trace": trace, "code": outcome.code,
                     "unanimous": outcome.unanimous_error if outcome.reports else None,
                     "reset": outcome.needs_cache_reset,
                     "reports": [(r["rank"], r["code"], r["node_id"]) for r in outcome.reports]}

    run("ok", [("1", lambda t: steps(3, log=t)), ("2", lambda t: steps(2, log=t))])
    # Rank 1 fails at step 1 of node 2 (node 2 has 4 steps): everyone stops there.
    run("follower_error", [("1", lambda t: steps(2, log=t)),
                           ("2", lambda t: steps(4, fail_at=1, rank_to_fail=dm.world_size - 1, rank=rank, log=t)),
                           ("3", lambda t: steps(2, log=t))])
    # Rank 1 fails after the last step of the last node: only the final round can tell rank 0.
    run("late_error", [("1", lambda t: steps(2, fail_at=2, rank_to_fail=1, rank=rank, log=t))])
    # Rank 0 (the UI) sets the interrupt flag at step 1 of node 1.
    run("interrupt", [("1", lambda t: steps(4, interrupt_at=1, rank=rank, log=t)), ("2", lambda t: steps(1, log=t))])
    # Same error everywhere (a deterministic bug): unanimous.
    run("all_error", [("1", lambda t: steps(3, fail_at=0, rank_to_fail=rank, rank=rank, log=t))])
    run("ok_again", [("1", lambda t: steps(2, log=t))])
    # RemoteRankError must name the failing rank and node for rank 0's execution_error.
    err = RemoteRankError(1, "2", "ValueError", "boom")
    out["message"] = str(err)
    return out


def _check_common(results, world):
    for rank, r in enumerate(results):
        assert r["ok"]["code"] == 0 and r["ok"]["events"] == [("done", "1"), ("done", "2")]
        assert r["ok_again"]["code"] == 0, f"rank {rank} out of step after failures"
        # Every rank stopped at the same step of node 2.
        assert r["follower_error"]["trace"] == [("1", 0), ("1", 1), ("2", 0), ("2", 1)], r["follower_error"]
        assert r["follower_error"]["code"] == 2 and r["follower_error"]["unanimous"] is False
        assert r["interrupt"]["trace"] == [("1", 0), ("1", 1)], (rank, r["interrupt"])
        assert r["interrupt"]["events"] == [("interrupted", "1")]
        assert r["interrupt"]["code"] == 1
        assert r["all_error"]["unanimous"] is True
        # Stopping at a step leaves every rank's caches alike; a late error (rank 0 finished the node,
        # rank 1 did not) does not, so every rank must drop its caches.
        assert r["follower_error"]["reset"] is False and r["interrupt"]["reset"] is False
        assert r["late_error"]["reset"] is True
    last = world - 1
    ev = results[0]["follower_error"]["events"][-1]
    assert ev[:3] == ("error", "2", "RemoteRankError") and f"Rank {last} failed in node 2" in ev[3]
    assert "boom at step 1" in ev[3]
    assert results[last]["follower_error"]["events"][-1] == ("error", "2", "ValueError", "boom at step 1")
    # Late error: rank 0 finished its graph, the final round reports rank 1's failure.
    assert results[0]["late_error"]["events"] == [("done", "1")] and results[0]["late_error"]["code"] == 2
    assert (1, 2, "1") in results[0]["late_error"]["reports"]
    assert results[0]["message"] == "Rank 1 failed in node 2: ValueError: boom"


def test_agreement_two_ranks():
    _check_common(spawn(2, _scenarios), 2)


def test_agreement_three_ranks():
    # A middle rank that did nothing wrong must stop at the same point too.
    _check_common(spawn(3, _scenarios), 3)


def _killed_mid_prompt(dm):
    from comfy.taco_dit.core.execution_engine import Lockstep, install_step_agreement

    lockstep = Lockstep(dm)
    install_step_agreement(lockstep)
    ex = MiniExecutor(lockstep)

    def node(node_id):
        import comfy.utils

        bar = comfy.utils.ProgressBar(100, node_id=node_id)
        for i in range(100):
            if dm.rank == 1 and i == 3:
                os._exit(9)  # a follower killed mid-prompt (no Python cleanup, like SIGKILL)
            time.sleep(0.01)
            bar.update(1)

    started = time.monotonic()
    lockstep.begin("p")
    ex.execute("p", [("1", node)])
    outcome = lockstep.finish(ex.success, None)
    elapsed = time.monotonic() - started
    # Afterwards the heartbeat must also name the dead rank, within the follower timeout.
    deadline = time.monotonic() + 10
    while 1 not in dm.heartbeat.dead_ranks() and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"events": ex.events, "lost": outcome.lost, "elapsed": elapsed, "dead": dm.heartbeat.dead_ranks()}


def test_killed_follower_is_detected_quickly():
    res = spawn(2, _killed_mid_prompt, timeout=2.0, allow_exit=(1,))
    r0 = res[0]
    assert res[1] is None
    assert r0["lost"] is True
    kind, node, etype, message = r0["events"][-1]
    assert (kind, node, etype) == ("error", "1", "RemoteRankError")
    assert "Lost contact" in message
    assert r0["dead"] == [1]
    # The control group's own timeout is 600 s here; the requirement is an error within 60 s.
    assert r0["elapsed"] < 60, r0


def _idle_death(dm):
    if dm.rank == 1:
        os._exit(9)
    dead = []
    dm.heartbeat.on_dead = dead.extend
    deadline = time.monotonic() + 15
    while not dead and time.monotonic() < deadline:
        time.sleep(0.05)
    return dead


def test_heartbeat_detects_idle_follower_death():
    assert spawn(2, _idle_death, timeout=1.5, allow_exit=(1,))[0] == [1]


def _stuck_in_collective(dm):
    from comfy.taco_dit.core.execution_engine import FailureWatch, Lockstep, install_step_agreement

    lockstep = Lockstep(dm)
    install_step_agreement(lockstep)
    ex = MiniExecutor(lockstep)
    stuck: list = []
    running = {"id": None}
    if dm.rank == 0:
        FailureWatch(dm, 1.0, lambda: running["id"], lambda reason: stuck.append((time.monotonic(), reason)),
                     interval=0.1).start()

    def node(node_id):
        if dm.rank == 1:
            raise RuntimeError("CUDA error on rank 1")
        time.sleep(5)  # rank 0 stands in for a rank waiting in a compute collective that never completes

    running["id"] = "p"
    started = time.monotonic()
    lockstep.begin("p")
    ex.execute("p", [("7", node)])
    lockstep.finish(ex.success, None)
    running["id"] = None
    return {"stuck_after": [t - started for t, _ in stuck], "reasons": [r for _, r in stuck],
            "events": ex.events}


def test_failure_watch_sees_a_rank_stuck_outside_the_rounds():
    r0, r1 = spawn(2, _stuck_in_collective)
    assert len(r0["reasons"]) == 1, r0
    assert "rank 1 failed in node 7 (RuntimeError: CUDA error on rank 1)" in r0["reasons"][0]
    # Declared stuck while rank 0 was still inside its 5-second node, not after it came out.
    assert r0["stuck_after"][0] < 5, r0
    # Once rank 0 reaches the final round the prompt still ends cleanly on both ranks.
    assert r0["events"] == [("done", "7")] and r1["events"][-1][:2] == ("error", "7")


def _leader_dies(dm):
    from comfy.taco_dit.core.distributed_manager import RankLostError

    if dm.rank == 0:
        time.sleep(0.5)
        os._exit(9)
    try:
        dm.receive(1)
    except RankLostError as e:
        return str(e)
    return "received work from a dead rank 0?"


def _late_work(dm):
    if dm.rank == 0:
        time.sleep(0.5)
        dm.publish(1, {"kind": "test", "value": 41})
        dm.publish(2, {"kind": "test", "value": 42})
        dm.agree(0)  # until the follower has both
        return None
    t0 = time.monotonic()
    first = dm.receive(1, poll=30.0)  # a poll this long would take 30 s: the watcher must wake it
    second = dm.receive(2, poll=30.0)
    waited = time.monotonic() - t0
    dm.agree(0)
    return first["value"], second["value"], waited


def test_follower_wakes_when_work_is_published_not_at_its_next_poll():
    _, (first, second, waited) = spawn(2, _late_work, timeout=5.0)
    assert (first, second) == (41, 42)
    assert waited < 15.0  # far below one 30 s poll: the store's wait woke the follower


def test_follower_stops_when_rank0_dies():
    msg = spawn(2, _leader_dies, timeout=1.5, allow_exit=(0,))[1]
    assert "rank 0 is gone" in msg or "Rank 0 has sent no heartbeat" in msg, msg


def test_shutdown_gives_up_on_a_stuck_teardown(monkeypatch):
    """A process-group teardown that never returns (a lost peer, a stuck symmetric-memory free) must not keep
    the process alive: shutdown() returns after its timeout and says it did not finish."""
    import threading
    import time

    import torch
    import torch.distributed as dist

    from comfy.taco_dit.core.distributed_manager import DistributedManager

    release = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: release.wait(60))
    dm = DistributedManager(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo",
                            control_group=None, store=None, follower_timeout=1.0, collective_timeout=1.0)
    start = time.monotonic()
    assert dm.shutdown(timeout=0.5) is False
    assert time.monotonic() - start < 5
    release.set()
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: None)
    assert dm.shutdown(timeout=5) is True
