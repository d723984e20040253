"""Helpers for multi-rank tests: spawn N processes that join through our own `init_distributed` (the
torchrun environment variables, gloo), and a miniature executor that calls `Lockstep` exactly as
`execution.PromptExecutor` does (before_node, node_failed, ProgressBar updates); and launching
`torchrun ... main.py` on CPU with a tiny custom node pack for the server tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

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


# ---------------------------------------------------------------------------------------------------
# torchrun + server
# ---------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A custom node pack the test writes into <base>/custom_nodes: a step loop that reports progress through
# ComfyUI's ProgressBar (so every step is an agreement point), fails on a chosen rank and step, and
# writes its pid per rank so the test can kill a follower.
TEST_PACK = '''
import os, time
import torch
import comfy.utils

class TacoTestSteps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
                             "delay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                             "fail_rank": ("INT", {"default": -1, "min": -1, "max": 64}),
                             "fail_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})},
                "optional": {"image": ("IMAGE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, steps, delay, fail_rank, fail_step, seed, image=None):
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(os.environ["TACO_TEST_MARKERS"], f"{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        g = torch.Generator().manual_seed(seed)
        out = torch.rand(1, 8, 8, 3, generator=g) if image is None else image[:, :8, :8, :3].clone()
        bar = comfy.utils.ProgressBar(steps)
        for i in range(steps):
            if rank == fail_rank and i == fail_step:
                raise ValueError(f"injected failure on rank {rank} at step {i}")
            out = out * 0.5 + torch.rand(out.shape, generator=g) * 0.5
            if delay:
                time.sleep(delay)
            bar.update(1)
        return (out,)

NODE_CLASS_MAPPINGS = {"TacoTestSteps": TacoTestSteps}
'''


def make_base(base: str) -> str:
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    with open(os.path.join(base, "custom_nodes", "taco_test_pack.py"), "w") as f:
        f.write(TEST_PACK)
    markers = os.path.join(base, "markers")
    os.makedirs(markers, exist_ok=True)
    return markers


def launch(base: str, port: int, nproc: int, extra_torchrun: list[str] | None = None,
           extra_main: list[str] | None = None, log_name: str = "torchrun.log",
           env_extra: dict | None = None, cpu: bool = True) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TACO_TEST_MARKERS=os.path.join(base, "markers"),
               PYTHONUNBUFFERED="1", **(env_extra or {}))
    if cpu:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    if nproc == 0:  # plain `python main.py`: the one-process path
        torchrun = [sys.executable]
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--monitor-interval=0.5"] + (extra_torchrun if extra_torchrun is not None else ["--standalone"])
    cmd = torchrun + [os.path.join(ROOT, "main.py")] + (["--cpu"] if cpu else []) + [
                      "--port", str(port), "--base-directory", base,
                      "--taco-follower-timeout", "3", "--dont-print-server"] + (extra_main or [])
    log = open(os.path.join(base, log_name), "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def http(port: int, method: str, path: str, body=None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited with {proc.returncode}\n{tail(log)}")
        try:
            http(port, "GET", "/prompt", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout} s\n{tail(log)}")


def wait_history(port: int, prompt_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = http(port, "GET", f"/history/{prompt_id}", timeout=5)
            if h and prompt_id in h:
                return h[prompt_id]
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} not in history after {timeout} s")


def tail(path: str | None, n: int = 6000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def steps_prompt(prefix: str, steps: int = 3, delay: float = 0.0, fail_rank: int = -1, fail_step: int = 0,
                 seed: int = 1, image_node: dict | None = None) -> dict:
    prompt = {"1": {"class_type": "TacoTestSteps", "inputs": {"steps": steps, "delay": delay,
                                                              "fail_rank": fail_rank, "fail_step": fail_step,
                                                              "seed": seed}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}
    if image_node is not None:
        prompt["3"] = image_node
        prompt["1"]["inputs"]["image"] = ["3", 0]
    return prompt
