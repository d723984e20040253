"""Helpers for multi-rank tests: spawn N processes that join through our own `init_distributed` (the
torchrun environment variables, gloo), and a miniature executor that calls `Lockstep` exactly as
`execution.PromptExecutor` does (before_node, node_failed, ProgressBar updates)."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, results, timeout):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from comfy.taco_dit.core.distributed_manager import init_distributed

    dm = None
    try:
        dm = init_distributed(cpu=True, follower_timeout=timeout, collective_timeout=600.0)
        results[rank] = ("ok", fn(dm, *args))
    except BaseException:  # reported to the parent test, which fails with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dm is not None and results[rank][0] == "ok":
            dm.shutdown()


def spawn(world: int, fn, *args, timeout: float = 3.0, allow_exit: tuple[int, ...] = ()):
    """Run fn(dm, *args) on `world` ranks; returns per-rank results (None for ranks in allow_exit that
    died without a result)."""
    manager = mp.Manager()
    try:
        results = manager.dict()
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results, timeout)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                raise AssertionError("a rank hung for 120 s")
        out = []
        for r in range(world):
            if r not in results:
                if r in allow_exit:
                    out.append(None)
                    continue
                raise AssertionError(f"rank {r} died (exit code {procs[r].exitcode}) without a result")
            status, value = results[r]
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            out.append(value)
        return out
    finally:
        manager.shutdown()


class MiniExecutor:
    """Runs a list of (node_id, fn) like PromptExecutor: agreement before each node, node_failed on error.

    Each fn gets a ProgressBar factory; it may raise. Records what happened in `events`.
    """

    def __init__(self, lockstep):
        self.lockstep = lockstep
        self.success = False
        self.status_messages = []
        self.events = []

    def execute(self, prompt_id, nodes):
        import comfy.model_management as mm
        import comfy.utils

        self.success = False
        self.status_messages = []
        comfy.utils.set_progress_bar_global_hook(lambda v, t, p, n: mm.throw_exception_if_processing_interrupted())
        for node_id, fn in nodes:
            try:
                self.lockstep.before_node(prompt_id, node_id)
                fn(node_id)
                self.events.append(("done", node_id))
            except mm.InterruptProcessingException as e:
                self.lockstep.node_failed(prompt_id, node_id, e)
                self.events.append(("interrupted", node_id))
                self.status_messages.append(["execution_interrupted", {"node_id": node_id}])
                return
            except Exception as e:
                self.lockstep.node_failed(prompt_id, node_id, e)
                self.events.append(("error", node_id, type(e).__name__, str(e)))
                self.status_messages.append(["execution_error", {"node_id": node_id,
                                                                 "exception_type": type(e).__name__,
                                                                 "exception_message": str(e)}])
                return
        self.success = True
        self.status_messages.append(["execution_success", {}])


def steps(n, fail_at=None, rank_to_fail=None, rank=None, interrupt_at=None, log=None):
    """A node function doing n ProgressBar steps; optionally fails or sets the interrupt flag at a step."""

    def fn(node_id):
        import comfy.model_management as mm
        import comfy.utils

        bar = comfy.utils.ProgressBar(n, node_id=node_id)
        for i in range(n):
            if log is not None:
                log.append((node_id, i))
            if fail_at == i and rank == rank_to_fail:
                raise ValueError(f"boom at step {i}")
            if interrupt_at == i and rank == 0:
                mm.interrupt_current_processing(True)
            bar.update(1)
        if fail_at == n and rank == rank_to_fail:
            raise ValueError("boom after the last step")

    return fn
