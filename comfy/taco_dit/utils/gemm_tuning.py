"""GEMM algorithm tuning through torch's TunableOp (`TACO_TUNE_GEMM=1`).

cuBLAS's heuristic picks one kernel per GEMM shape. For the shapes a rank sees under sequence parallel it
can pick a slow one: on an H200, Wan 14B's 5120 x 5120 projections over the 16380 tokens of a Ulysses-2
rank ran 1.23 ms with the heuristic's kernel and 1.10 ms with the fastest one TunableOp found, while the
32760 tokens of one GPU gain nothing (benchmarks/RESULTS.md, sixth session). With tuning on, the first
GEMM of each new shape tries every solution torch knows (at most `TACO_TUNE_GEMM_MS` ms per shape, default
100) and keeps the fastest for the rest of the process; the results go to a CSV per GPU in `cache_dir`
(or the system's temporary folder) and are read back by the next process on the same GPU and software.

Off by default until measured end to end. Another kernel may sum in another order, so results can differ
from the untuned ones by rounding.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import torch


def enabled() -> bool:
    return os.environ.get("TACO_TUNE_GEMM", "0").strip().lower() in ("1", "on", "true")


def configure(cache_dir: str | None = None) -> bool:
    """Turn TunableOp on for this process when asked and possible; True when it is on. Call it before the
    first GEMM (model loading does none on the GPU)."""
    if not enabled() or not torch.cuda.is_available():
        return False
    import torch.cuda.tunable as tunable

    budget = int(os.environ.get("TACO_TUNE_GEMM_MS", "100"))
    folder = cache_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    tunable.set_filename(os.path.join(folder, f"taco_gemm_{card}.csv"), insert_device_ordinal=True)
    tunable.set_max_tuning_duration(budget)
    tunable.enable(True)
    tunable.tuning_enable(True)
    logging.info("GEMM tuning on (TunableOp, up to %d ms per new shape; results in %s)", budget, folder)
    return True
