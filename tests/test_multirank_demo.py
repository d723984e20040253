"""The demo workflow (Flux demo models, demo/flux_demo_api.json) through the real server: 2 and 4 ranks
in pure lockstep write a PNG byte-identical to the one a single process writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.fixtures.demo_models import write_demo_models
from tests.multirank_helpers import (
    ROOT,
    free_port,
    http,
    launch,
    make_base,
    stop,
    tail,
    wait_history,
    wait_ready,
)

pytestmark = pytest.mark.slow


def _run_demo(base: str, nproc: int, extra_main: list[str] | None = None, cpu: bool = True) -> tuple[str, dict]:
    make_base(base)
    write_demo_models(os.path.join(base, "models"))
    with open(os.path.join(ROOT, "demo", "flux_demo_api.json")) as f:
        prompt = json.load(f)
    port = free_port()
    proc = launch(base, port, nproc, extra_main=extra_main, cpu=cpu)
    log = os.path.join(base, "torchrun.log")
    try:
        wait_ready(port, proc, log=log)
        pid = http(port, "POST", "/prompt", {"prompt": prompt, "client_id": "t"})["prompt_id"]
        result = wait_history(port, pid, 120)
        assert result["status"]["status_str"] == "success", result["status"]
        image = result["outputs"]["9"]["images"][0]
        with open(os.path.join(base, "output", image["subfolder"], image["filename"]), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        outputs = sorted(os.listdir(os.path.join(base, "output")))
        # Lockstep means every follower ran the whole graph too (into its scratch dir).
        with open(log, errors="replace") as f:
            text = f.read()
        ran = [r for r in range(1, nproc) if f"[rank {r}] " in text and f"Prompt {pid} ran 9 node(s)" in
               "\n".join(line for line in text.splitlines() if line.startswith(f"[rank {r}] "))]
        assert ran == list(range(1, nproc)), f"followers that ran the prompt: {ran}"
        assert "TACO-DiT plan for" not in text  # no parallel plan was applied: pure lockstep
    except BaseException as e:
        raise AssertionError(f"{nproc} rank(s): {e}\n--- log ---\n{tail(log, 12000)}") from e
    finally:
        stop(proc)
    return digest, {"outputs": outputs}


def test_demo_workflow_byte_identical_on_1_2_4_ranks(tmp_path):
    one, info1 = _run_demo(str(tmp_path / "r1"), 0)
    # Pure lockstep, through both ways of asking for it: the flag, and the YAML file.
    two, info2 = _run_demo(str(tmp_path / "r2"), 2, extra_main=["--taco-parallel", "off"])
    yaml_path = tmp_path / "taco_dit_config.yaml"
    yaml_path.write_text("parallel:\n  enabled: false\n")
    four, info4 = _run_demo(str(tmp_path / "r4"), 4, extra_main=["--taco-config", str(yaml_path)])
    assert two == one and four == one
    # One image per run: followers wrote only into their scratch dirs.
    assert info1["outputs"] == info2["outputs"] == info4["outputs"] == ["taco-demo-flux_00001_.png"]
