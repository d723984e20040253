"""Per-rank timing and memory of sampling runs, for the console.

`SamplingMonitor` wraps a sampler's per-step callback and, when the run ends, logs one line per rank:
steps, median / first step time (the first includes warm-up), the parallel layout used, and the peak GPU
memory of this rank's device (process RSS on the CPU). On GPUs the step times come from CUDA events recorded
at each callback: the sampling loop never waits for the GPU, so the host's clock between callbacks would
only measure how fast steps are queued. On the CPU they are wall-clock times. Under torchrun
each rank logs its own line (main.py prefixes lines with the rank).
"""

from __future__ import annotations

import logging
import statistics
import time

import psutil
import torch

log = logging.getLogger(__name__)


class SamplingMonitor:
    def __init__(self, device: torch.device, description: str = ""):
        self.device = device
        self.description = description
        self.stamps: list = []
        self.started = self._mark()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.device.type == "cuda" else b - a

    def wrap(self, callback):
        def step(*args, **kwargs):
            self.stamps.append(self._mark())
            if callback is not None:
                return callback(*args, **kwargs)
        return step

    def summary(self) -> dict:
        marks = [self.started] + self.stamps
        if self.device.type == "cuda":
            marks[-1].synchronize()
        steps = [self._seconds(a, b) for a, b in zip(marks, marks[1:])]
        total = self._seconds(self.started, marks[-1] if self.device.type == "cuda" else time.perf_counter())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = psutil.Process().memory_info().rss
        return {"steps": len(steps), "first_ms": steps[0] * 1000 if steps else None,
                "median_ms": statistics.median(steps[1:] or steps) * 1000 if steps else None,
                "total_s": total, "peak_memory_bytes": peak}

    def log(self) -> dict:
        s = self.summary()
        if s["steps"]:
            where = "GPU" if self.device.type == "cuda" else "process RSS"
            log.info("Sampling: %d steps in %.2fs, %.1f ms/step (first %.1f ms)%s; peak %s memory %.2f GiB",
                     s["steps"], s["total_s"], s["median_ms"], s["first_ms"],
                     f", {self.description}" if self.description else "", where, s["peak_memory_bytes"] / 2**30)
        return s
