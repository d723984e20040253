"""The same lockstep checks on GPUs (NCCL default group, gloo control group): run on the GPU machines
with `pytest -m gpu tests/test_multirank_gpu.py`."""

from __future__ import annotations

import os

import pytest

from tests.multirank_helpers import (
    free_port,
    http,
    launch,
    make_base,
    steps_prompt,
    stop,
    tail,
    wait_history,
    wait_ready,
)
from tests.test_multirank_demo import _run_demo

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def _frontend_flags(tmp_path) -> list[str]:
    """The GPU machines' image lacks the frontend package; the API needs no UI, so serve a stub."""
    try:
        import comfyui_frontend_package  # noqa: F401

        return []
    except ImportError:
        root = tmp_path / "frontend"
        root.mkdir(exist_ok=True)
        (root / "index.html").write_text("<html></html>")
        return ["--front-end-root", str(root)]


def test_demo_byte_identical_on_gpus(tmp_path):
    flags = _frontend_flags(tmp_path)
    one, _ = _run_demo(str(tmp_path / "g1"), 0, cpu=False, extra_main=flags)
    two, _ = _run_demo(str(tmp_path / "g2"), 2, cpu=False, extra_main=flags + ["--taco-parallel", "off"])
    assert two == one


def test_follower_error_and_next_prompt_on_gpus(tmp_path):
    base = str(tmp_path)
    make_base(base)
    port = free_port()
    proc = launch(base, port, 2, cpu=False, extra_main=_frontend_flags(tmp_path))
    log = os.path.join(base, "torchrun.log")
    try:
        wait_ready(port, proc, log=log)
        pid = http(port, "POST", "/prompt", {"prompt": steps_prompt("gerr", steps=5, fail_rank=1, fail_step=2),
                                             "client_id": "t"})["prompt_id"]
        failed = wait_history(port, pid, 60)
        pid = http(port, "POST", "/prompt", {"prompt": steps_prompt("gok", steps=3), "client_id": "t"})["prompt_id"]
        ok = wait_history(port, pid, 60)
        text = tail(log, 100000)
    finally:
        stop(proc)
    assert failed["status"]["status_str"] == "error"
    assert any("Rank 1 failed in node 1" in m[1].get("exception_message", "")
               for m in failed["status"]["messages"] if m[0] == "execution_error")
    assert ok["status"]["status_str"] == "success", ok
    assert "backend nccl" in text, text[-3000:]
