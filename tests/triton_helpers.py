"""Running a test module's check function in Triton's CPU interpreter (kernel tests on machines without GPUs)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_interpreter(module_file: str, check: str) -> None:
    """Run `check` (a function of the test module at `module_file`, which dispatches on its first argument
    and prints "ok <check>") in a fresh Python with Triton's CPU interpreter on: the interpreter must be
    chosen before Triton is first imported, which the test process cannot promise."""
    pytest.importorskip("triton", reason="Triton is installed by requirements-test.txt on Linux x86-64")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, module_file, check], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"ok {check}" in res.stdout
