"""The per-rank sampling summary: step count and times from the wrapped callback, memory, log line."""

from __future__ import annotations

import logging
import time

import torch

from comfy.taco_dit.utils.performance_monitor import SamplingMonitor


def test_monitor_counts_steps_and_reports_memory(caplog):
    seen = []
    mon = SamplingMonitor(torch.device("cpu"), "cfg_parallel=2 ulysses=1 ring=1 data_parallel=1 on 2 ranks")
    cb = mon.wrap(lambda i, *a: seen.append(i))
    for i in range(3):
        time.sleep(0.01)
        cb(i, None, None, 3)
    with caplog.at_level(logging.INFO):
        s = mon.log()
    assert seen == [0, 1, 2]  # the wrapped callback still runs
    assert s["steps"] == 3 and s["median_ms"] >= 9 and s["peak_memory_bytes"] > 0
    assert "3 steps" in caplog.text and "cfg_parallel=2" in caplog.text and "peak process RSS memory" in caplog.text


def test_monitor_wraps_a_missing_callback():
    mon = SamplingMonitor(torch.device("cpu"))
    mon.wrap(None)(0, None, None, 1)
    assert mon.summary()["steps"] == 1
