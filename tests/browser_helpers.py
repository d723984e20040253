"""Helpers for tests that run the real server as a subprocess (`python main.py --cpu ...`) and drive the
official frontend in Debian's headless chromium through Playwright. Never downloads a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's chromium, or None (test.sh installs it with apt-get when it is missing)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_main(base: str, port: int, extra: list[str] | None = None, log_name: str = "server.log"
               ) -> subprocess.Popen:
    """`python main.py --cpu --port <port> --base-directory <base>`, output to <base>/<log_name>."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    # A one-process server: torchrun variables inherited from a parent would make it a rank.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--cpu", "--port", str(port),
           "--base-directory", base] + (extra or [])
    log = open(os.path.join(base, log_name), "ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def http_json(port: int, path: str, body=None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def log_tail(base: str, log_name: str = "server.log", n: int = 6000) -> str:
    path = os.path.join(base, log_name)
    if not os.path.exists(path):
        return "(no server log)"
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def wait_ready(port: int, proc: subprocess.Popen, base: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"main.py exited with {proc.returncode}\n{log_tail(base)}")
        try:
            http_json(port, "/api/prompt", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout} s\n{log_tail(base)}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (main.py cleans temp/ on KeyboardInterrupt), then kill the process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def launch_chromium(playwright):
    """Debian's chromium through Playwright, headless; Playwright's own browser downloads are never used."""
    path = chromium_path()
    if path is None:
        raise FileNotFoundError("chromium not found: `apt-get install -y chromium` (test.sh does it when root)")
    return playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
