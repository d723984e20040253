"""The pieces of the prompt worker loop that rank 0 shares between one process (main.prompt_worker) and the
multi-rank leader (comfy.taco_dit.core.execution_engine.Leader.worker)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass


@dataclass
class QueuedPrompt:
    """One item taken off the PromptQueue: (number, prompt_id, prompt, extra_data, outputs[, sensitive])."""
    item_id: int
    number: int
    prompt_id: str
    prompt: dict
    extra_data: dict  # the item's extra_data with its sensitive part merged back in
    outputs: list
    started: float


def next_prompt(queue, timeout: float = 1000.0) -> QueuedPrompt | None:
    """Wait for the next queue item (None when the wait timed out)."""
    queue_item = queue.get(timeout=timeout)
    if queue_item is None:
        return None
    item, item_id = queue_item
    extra_data = dict(item[3])
    extra_data.update((item[5] if len(item) > 5 else None) or {})
    return QueuedPrompt(item_id, item[0], item[1], item[2], extra_data, item[4], time.perf_counter())


def announce_done(server, job: QueuedPrompt) -> None:
    """The frontend's end-of-prompt signal ("executing" with node None) and the console line."""
    if server.client_id is not None:
        server.send_sync("executing", {"node": None, "prompt_id": job.prompt_id}, server.client_id)
    logging.info("Prompt executed in %.2f seconds", time.perf_counter() - job.started)


def apply_memory_flags(flags: dict, executor) -> None:
    """Honour the /free route's flags once the prompt is done: unload models, drop caches."""
    import comfy.model_management as mm

    if flags.get("unload_models"):
        mm.unload_all_models()
    if flags.get("free_memory"):
        executor.reset()
        mm.soft_empty_cache()
