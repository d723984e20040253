"""Two "nodes" on localhost under torchrun's c10d rendezvous (--nnodes=2 --rdzv-endpoint), each with its
own base directory, so the follower cannot read rank 0's input files: an uploaded image must reach it
with the work item, and the prompt must run in lockstep across the nodes."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request

import pytest

from tests.multirank_helpers import free_port, launch, make_base, stop, tail, wait_history, wait_ready

pytestmark = pytest.mark.slow


def _upload_png(port: int, name: str) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 30, 90)).save(buf, format="PNG")
    boundary = "tacoboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_two_node_rendezvous_ships_input_files(tmp_path):
    from tests.multirank_helpers import http, steps_prompt

    bases = [str(tmp_path / "nodeA"), str(tmp_path / "nodeB")]
    for b in bases:
        make_base(b)
    port, rdzv = free_port(), free_port()
    common = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv}", "--rdzv-id=taco-test"]
    procs = [launch(b, port, 1, extra_torchrun=common) for b in bases]
    logs = [os.path.join(b, "torchrun.log") for b in bases]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                wait_ready(port, procs[0], timeout=2, log=logs[0])
                break
            except AssertionError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise
        # Which node got rank 0 is the rendezvous' choice: ask the server.
        argv = http(port, "GET", "/system_stats")["system"]["argv"]
        leader_base = argv[argv.index("--base-directory") + 1]
        follower_base = [b for b in bases if b != leader_base][0]
        uploaded = _upload_png(port, "shipped.png")
        assert uploaded["name"] == "shipped.png"
        assert not os.path.exists(os.path.join(follower_base, "input", "shipped.png"))
        prompt = steps_prompt("twonode", steps=3, image_node={"class_type": "LoadImage",
                                                              "inputs": {"image": "shipped.png"}})
        pid = http(port, "POST", "/prompt", {"prompt": prompt, "client_id": "t"})["prompt_id"]
        result = wait_history(port, pid, 60)
    except BaseException as e:
        raise AssertionError(f"{e}\n--- node A ---\n{tail(logs[0])}\n--- node B ---\n{tail(logs[1])}") from e
    finally:
        for p in procs:
            stop(p)
    assert result["status"]["status_str"] == "success", (result, tail(logs[0]), tail(logs[1]))
    with open(os.path.join(leader_base, "input", "shipped.png"), "rb") as a, \
            open(os.path.join(follower_base, "input", "shipped.png"), "rb") as b:
        assert a.read() == b.read()  # the follower got the exact bytes rank 0 had
    assert [f for f in os.listdir(os.path.join(leader_base, "output")) if f.startswith("twonode")]
    assert not [f for f in os.listdir(os.path.join(follower_base, "output")) if f.endswith(".png")]
