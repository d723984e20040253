"""How long a trivial prompt takes through the multi-rank server, from rank 0's `execution_start` to its
`execution_success` (history timestamps): the queue hand-off to the followers, the lockstep agreements and
the SaveImage of a small image, with no model work. CPU ranks over gloo (`main.py --cpu` under torchrun).

    python benchmarks/bench_prompt_latency.py [--ranks 2] [--prompts 20] [--repo DIR]

`--repo` runs another checkout's main.py (e.g. an older commit, for a before/after on the same machine).
Prints one JSON line: median and spread of the per-prompt times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import multirank_helpers as mh  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--repo", default=None, help="checkout whose main.py runs (default: this one)")
    args = p.parse_args()
    if args.repo:
        mh.ROOT = os.path.abspath(args.repo)
    with tempfile.TemporaryDirectory() as base:
        mh.make_base(base)
        port = mh.free_port()
        proc = mh.launch(base, port, args.ranks)
        try:
            mh.wait_ready(port, proc, log=os.path.join(base, "torchrun.log"))
            times = []
            for i in range(args.prompts + 2):  # the first two warm up (imports, caches)
                prompt = mh.steps_prompt(f"lat{i}", steps=1, seed=i + 1)
                pid = mh.http(port, "POST", "/prompt", {"prompt": prompt})["prompt_id"]
                entry = mh.wait_history(port, pid)
                stamps = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
                if i >= 2:
                    times.append((stamps["execution_success"] - stamps["execution_start"]) / 1000.0)
                time.sleep(0.05 + 0.013 * i)  # prompts arrive at unrelated moments, as a user's do
        finally:
            mh.stop(proc)
    print(json.dumps({"what": "prompt_latency", "ranks": args.ranks, "prompts": len(times),
                      "repo": args.repo or "this checkout", "median_ms": round(statistics.median(times) * 1e3, 1),
                      "min_ms": round(min(times) * 1e3, 1), "max_ms": round(max(times) * 1e3, 1)}))


if __name__ == "__main__":
    main()
