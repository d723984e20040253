"""Prompt validation, graph execution and the prompt queue.

- `validate_prompt` checks a submitted prompt against the node registry and returns ComfyUI's error
  shapes (compat §1.5): prompt-level errors, per-node errors with the outputs that depend on them.
- `PromptExecutor` runs the ancestors of the requested outputs in dependency order, reusing cached
  outputs between prompts (comfy_execution/caching.py), and reports every step over the server's
  WebSocket (`send_sync`): execution_start/cached/success/error/interrupted, executing, executed,
  progress and progress_state. It implements the V1 node protocol: lists, lazy inputs, hidden inputs,
  ExecutionBlocker, IS_CHANGED/VALIDATE_INPUTS, and dynamic sub-graph expansion. Under torchrun it
  calls the `lockstep` object before each node so all ranks stay at the same point (docs/internals.md).
- `PromptQueue` holds pending prompts (lowest number first), running prompts and history, and can
  persist the pending queue to a file so queued prompts survive a restart.
"""

from __future__ import annotations

import copy
import heapq
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch

import comfy.model_management as mm
import comfy.utils
import nodes
from comfy_execution import progress
from comfy_execution.caching import CacheEntry, CacheSet
from comfy_execution.graph import DynamicPrompt, ExecutionList, get_input_info
from comfy_execution.graph_utils import ExecutionBlocker, GraphBuilder, is_link
from comfy_execution.validation import validate_node_input

logger = logging.getLogger(__name__)

MAXIMUM_HISTORY_SIZE = 10000
# server.BinaryEventTypes.UNENCODED_PREVIEW_IMAGE; fixed by docs/internals.md, so the executor does not
# have to import the web server.
UNENCODED_PREVIEW_IMAGE = 2

OOM_TIP = ("The GPU ran out of memory while running this node. "
           "Tips: lower the batch size or resolution, use fewer or smaller models, or start with "
           "--lowvram / more GPUs. All models were unloaded to free memory.")


class ExecutionResult(Enum):
    SUCCESS = 0
    FAILURE = 1
    PENDING = 2


class DuplicateNodeError(Exception):
    pass


def _oom_types() -> tuple[type, ...]:
    types: list[type] = [mm.OOM_EXCEPTION]
    for name in ("OutOfMemoryError",):
        for owner in (torch, torch.cuda):
            t = getattr(owner, name, None)
            if isinstance(t, type):
                types.append(t)
    return tuple(types)


def full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return f"{module}.{klass.__qualname__}"


def format_value(x: Any) -> Any:
    """How an input value appears in `execution_error.current_inputs`: JSON scalars as is, else str()."""
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


def unwrap_widget_value(value: Any) -> Any:
    """The frontend wraps array (and curve) widget values as {"__value__": v}; nodes receive v."""
    if isinstance(value, dict) and "__value__" in value:
        return value["__value__"]
    return value


# ---------------------------------------------------------------------------------------------------
# Inputs and outputs of one node
# ---------------------------------------------------------------------------------------------------

def _hidden_value(kind: Any, unique_id: str, dynprompt: DynamicPrompt | None, extra_data: dict) -> Any:
    if isinstance(kind, (list, tuple)):
        kind = kind[0] if kind else None
    if kind == "PROMPT":
        return dynprompt.get_original_prompt() if dynprompt is not None else {}
    if kind == "DYNPROMPT":
        return dynprompt
    if kind == "EXTRA_PNGINFO":
        return extra_data.get("extra_pnginfo")
    if kind == "UNIQUE_ID":
        return unique_id
    if kind == "AUTH_TOKEN_COMFY_ORG":
        return extra_data.get("auth_token_comfy_org")
    if kind == "API_KEY_COMFY_ORG":
        return extra_data.get("api_key_comfy_org")
    return None


def get_input_data(inputs: dict, class_def: type, unique_id: str, outputs: Any = None,
                   dynprompt: DynamicPrompt | None = None, extra_data: dict | None = None
                   ) -> tuple[dict[str, list], set[str], dict]:
    """Inputs of one node as {name: list of values}, the linked names whose source has no output yet,
    and the hidden values.

    With `outputs=None` (IS_CHANGED, VALIDATE_INPUTS) linked inputs are left out: their values do not
    exist yet. A linked input whose source has not run (a lazy input nobody asked for) is [None].
    """
    extra_data = extra_data or {}
    valid_inputs = class_def.INPUT_TYPES()
    data: dict[str, list] = {}
    missing: set[str] = set()
    for name, value in inputs.items():
        _, category, info = get_input_info(class_def, name, valid_inputs)
        if is_link(value) and not (info or {}).get("rawLink", False):
            if outputs is None:
                continue
            entry = outputs.get(value[0])
            if entry is None:
                data[name] = [None]
                missing.add(name)
                continue
            data[name] = entry.outputs[value[1]]
        elif category is not None:
            data[name] = [unwrap_widget_value(value)]
    hidden: dict[str, Any] = {}
    for name, kind in (valid_inputs.get("hidden") or {}).items():
        hidden[name] = _hidden_value(kind, unique_id, dynprompt, extra_data)
        data[name] = [hidden[name]]
    return data, missing, hidden


def _first_blocker(inputs: dict, input_is_list: bool) -> ExecutionBlocker | None:
    for value in inputs.values():
        values = value if input_is_list else [value]
        for v in values:
            if isinstance(v, ExecutionBlocker):
                return v
    return None


def map_node_over_list(obj: Any, input_data_all: dict[str, list], func: str, allow_interrupt: bool = False,
                       execution_block_cb: Callable[[ExecutionBlocker], Any] | None = None,
                       pre_execute_cb: Callable[[int], None] | None = None) -> list:
    """Call `obj.<func>` once per list index (shorter lists repeat their last item), or once with the
    whole lists when the node sets INPUT_IS_LIST. Returns one result per call; a call whose inputs hold
    an ExecutionBlocker is skipped and yields the blocker."""
    input_is_list = bool(getattr(obj, "INPUT_IS_LIST", False))
    results: list = []

    def call(inputs: dict, index: int) -> None:
        blocker = _first_blocker(inputs, input_is_list)
        if blocker is not None:
            results.append(execution_block_cb(blocker) if execution_block_cb else blocker)
            return
        if pre_execute_cb is not None:
            pre_execute_cb(index)
        if allow_interrupt:
            mm.throw_exception_if_processing_interrupted()
        results.append(getattr(obj, func)(**inputs))

    if input_is_list:
        call(input_data_all, 0)
    elif not input_data_all:
        call({}, 0)
    elif any(len(v) == 0 for v in input_data_all.values()):
        pass  # an empty list upstream means there is nothing to process
    else:
        longest = max(len(v) for v in input_data_all.values())
        for i in range(longest):
            call({k: v[i] if i < len(v) else v[-1] for k, v in input_data_all.items()}, i)
    return results


def _n_outputs(obj: Any) -> int:
    return len(getattr(obj, "RETURN_TYPES", ()) or ())


def merge_result_data(results: list[tuple], obj: Any) -> list[list]:
    n = max(_n_outputs(obj), max((len(r) for r in results), default=0))
    is_list = list(getattr(obj, "OUTPUT_IS_LIST", None) or [])
    is_list += [False] * (n - len(is_list))
    merged: list[list] = []
    for i in range(n):
        slot: list = []
        for r in results:
            if i >= len(r):
                continue
            if is_list[i] and not isinstance(r[i], ExecutionBlocker):
                slot.extend(r[i])
            else:
                slot.append(r[i])
        merged.append(slot)
    return merged


def _merge_ui(uis: list[dict]) -> dict:
    if not uis:
        return {}
    if len(uis) == 1:
        return uis[0]
    merged: dict[str, Any] = {}
    for ui in uis:
        for key, value in ui.items():
            merged.setdefault(key, [])
            if isinstance(value, (list, tuple)):
                merged[key].extend(value)
            else:
                merged[key].append(value)
    return merged


def get_output_from_returns(return_values: list, obj: Any) -> tuple[Any, dict, bool]:
    """(outputs per slot | per-call (graph, result) pairs when a call expanded, ui, has_subgraph)."""
    n = _n_outputs(obj)
    results: list[tuple] = []
    uis: list[dict] = []
    per_call: list[tuple[dict | None, tuple]] = []
    has_subgraph = False
    for r in return_values:
        if isinstance(r, dict):
            if r.get("ui") is not None:
                uis.append(r["ui"])
            result = r.get("result")
            if isinstance(result, ExecutionBlocker):
                result = (result,) * n
            if "expand" in r and r["expand"] is not None:
                has_subgraph = True
                graph = r["expand"]
                if hasattr(graph, "finalize"):
                    graph = graph.finalize()
                per_call.append((graph, tuple(result or ())))
            elif result is not None:
                results.append(tuple(result))
                per_call.append((None, tuple(result)))
        else:
            if isinstance(r, ExecutionBlocker):
                r = (r,) * n
            r = tuple(r) if r is not None else ()
            results.append(r)
            per_call.append((None, r))
    if has_subgraph:
        output: Any = per_call
    elif results:
        output = merge_result_data(results, obj)
    else:
        output = [[] for _ in range(n)]
    return output, _merge_ui(uis), has_subgraph


# ---------------------------------------------------------------------------------------------------
# IS_CHANGED
# ---------------------------------------------------------------------------------------------------

class IsChangedCache:
    """IS_CHANGED results of the current prompt, computed at most once per node."""

    def __init__(self, prompt_id: str, dynprompt: DynamicPrompt, extra_data: dict | None = None):
        self.prompt_id = prompt_id
        self.dynprompt = dynprompt
        self.extra_data = extra_data or {}
        self.values: dict[str, Any] = {}

    def __call__(self, node_id: str) -> Any:
        return self.get(node_id)

    def get(self, node_id: str) -> Any:
        if node_id in self.values:
            return self.values[node_id]
        node = self.dynprompt.get_node(node_id)
        class_def = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if class_def is None or not hasattr(class_def, "IS_CHANGED"):
            value: Any = False
        elif "is_changed" in node:
            value = node["is_changed"]  # an expansion may precompute it
        else:
            try:
                data, _, _ = get_input_data(node.get("inputs") or {}, class_def, node_id, None,
                                            self.dynprompt, self.extra_data)
                results = map_node_over_list(class_def, data, "IS_CHANGED")
                value = [None if isinstance(r, ExecutionBlocker) else r for r in results]
            except Exception as e:  # a failing IS_CHANGED means "unknown": re-run the node
                logger.warning("IS_CHANGED of node %s (%s) failed, the node will re-run: %s",
                               node_id, node["class_type"], e)
                value = float("nan")
        self.values[node_id] = value
        return value


# ---------------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------------

class PromptExecutor:
    def __init__(self, server: Any, cache_type: str = "classic", cache_args: dict | None = None,
                 lockstep: Any = None):
        self.server = server
        self.cache_type = cache_type
        self.cache_args = cache_args or {}
        self.lockstep = lockstep
        self.reset()

    def reset(self) -> None:
        """Drop every cached output and node instance."""
        self.caches = CacheSet(self.cache_type, self.cache_args)
        self.status_messages: list[list] = []
        self.success = True
        self.history_result: dict = {"outputs": {}, "meta": {}}

    # -- messages -----------------------------------------------------------------------------------

    def _send(self, event: Any, data: Any) -> None:
        self.server.send_sync(event, data, self.server.client_id)

    def add_message(self, event: str, data: dict, broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append([event, data])
        if self.server.client_id is not None or broadcast:
            self._send(event, data)

    def _handle_error(self, prompt_id: str, dynprompt: DynamicPrompt, executed: set, current_outputs: list,
                      error: dict, ex: BaseException) -> None:
        node_id = error["node_id"]
        class_type = dynprompt.get_node(node_id)["class_type"] if dynprompt.has_node(node_id) else None
        base = {"prompt_id": prompt_id, "node_id": node_id, "node_type": class_type,
                "executed": list(executed)}
        if isinstance(ex, mm.InterruptProcessingException):
            self.add_message("execution_interrupted", base, broadcast=True)
        else:
            mes = {**base, "exception_message": error["exception_message"],
                   "exception_type": error["exception_type"], "traceback": error["traceback"],
                   "current_inputs": error["current_inputs"], "current_outputs": list(current_outputs)}
            self.add_message("execution_error", mes, broadcast=False)

    # -- progress -----------------------------------------------------------------------------------

    def _make_progress_hook(self, prompt_id: str, node_id: str, registry: progress.ProgressRegistry):
        def hook(value: int, total: int, preview: Any, bar_node_id: str | None = None) -> None:
            # Every sampler step passes here: the cheapest place to notice Cancel.
            mm.throw_exception_if_processing_interrupted()
            node = bar_node_id or node_id
            registry.update_progress(node, value, total, preview)
            self._send("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node})
            if preview is not None:
                self._send(UNENCODED_PREVIEW_IMAGE, preview)

        return hook

    # -- one prompt ---------------------------------------------------------------------------------

    def execute(self, prompt: dict, prompt_id: str, extra_data: dict | None = None,
                execute_outputs: list | None = None) -> None:
        extra_data = extra_data or {}
        execute_outputs = list(execute_outputs or [])
        mm.interrupt_current_processing(False)
        self.server.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        run: _PromptRun | None = None
        self.history_result = {"outputs": {}, "meta": {}}
        try:
            with torch.inference_mode():
                dynprompt = DynamicPrompt(prompt)
                is_changed = IsChangedCache(prompt_id, dynprompt, extra_data)
                self.caches.set_prompt(dynprompt, list(prompt.keys()), is_changed)
                cached_nodes = [n for n in prompt if self.caches.outputs.get(n) is not None]
                self.add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id},
                                 broadcast=False)
                registry = progress.reset_progress_state(prompt_id, dynprompt, self._send)
                run = _PromptRun(self, prompt_id, dynprompt, extra_data, registry)
                try:
                    for node_id in execute_outputs:
                        run.execution_list.add_node(node_id)
                    failed = run.loop()
                finally:
                    self.caches.outputs.prompt_done()
                    self.server.last_node_id = None
                    self.history_result = {"outputs": run.ui_outputs, "meta": run.meta_outputs}
                if not failed:
                    self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
                run.log_timings()
        except Exception as e:
            # A malformed (unvalidated) prompt or a bug here must not kill the prompt worker: report it
            # like a node error and leave the executor ready for the next prompt.
            logger.exception("Prompt %s could not be executed", prompt_id)
            self.success = False
            self.add_message("execution_error", {
                "prompt_id": prompt_id, "node_id": None, "node_type": None,
                "executed": sorted(run.executed) if run is not None else [],
                "exception_message": f"{e}", "exception_type": full_type_name(type(e)),
                "traceback": traceback.format_tb(e.__traceback__), "current_inputs": {},
                "current_outputs": []}, broadcast=False)


class _PromptRun:
    """State of one execute() call: the execution list, sub-graph results, ui outputs, timings."""

    def __init__(self, executor: PromptExecutor, prompt_id: str, dynprompt: DynamicPrompt,
                 extra_data: dict, registry: progress.ProgressRegistry):
        self.ex = executor
        self.server = executor.server
        self.caches = executor.caches
        self.prompt_id = prompt_id
        self.dynprompt = dynprompt
        self.extra_data = extra_data
        self.registry = registry
        self.execution_list = ExecutionList(dynprompt, self.caches.outputs)
        self.pending_subgraph_results: dict[str, list] = {}
        self.executed: set[str] = set()
        self.ui_outputs: dict[str, dict] = {}
        self.meta_outputs: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    def loop(self) -> bool:
        """Run until the list is empty; True when the prompt failed (error or interrupt)."""
        lockstep = self.ex.lockstep
        while not self.execution_list.is_empty():
            node_id, error, ex = self.execution_list.stage_node_execution()
            if error is None:
                try:
                    if lockstep is not None:
                        lockstep.before_node(self.prompt_id, node_id)
                except Exception as e:  # another rank stopped: end here, like it did
                    error, ex = self._error_details(node_id, e, {}), e
                else:
                    result, error, ex = self.execute_node(node_id)
            else:
                result = ExecutionResult.FAILURE
            if error is not None:
                self.ex.success = False
                if node_id is not None:
                    self.registry.error_progress(node_id)
                self.ex._handle_error(self.prompt_id, self.dynprompt, self.executed,
                                      self.caches.outputs.all_node_ids(), error, ex)
                return True
            if result == ExecutionResult.PENDING:
                self.execution_list.unstage_node_execution()
            else:
                self.execution_list.complete_node_execution()
        return False

    def _error_details(self, node_id: str, e: BaseException, input_data_all: dict | None) -> dict:
        real = self.dynprompt.get_real_node_id(node_id) if self.dynprompt.has_node(node_id) else node_id
        if isinstance(e, mm.InterruptProcessingException):
            return {"node_id": real}
        message = str(e)
        if isinstance(e, _oom_types()):
            message = f"{message}\n\n{OOM_TIP}"
        current_inputs = {}
        for name, values in (input_data_all or {}).items():
            current_inputs[name] = [format_value(v) for v in values] if isinstance(values, list) \
                else format_value(values)
        return {"node_id": real, "exception_message": message, "exception_type": full_type_name(type(e)),
                "traceback": traceback.format_tb(e.__traceback__), "current_inputs": current_inputs}

    def _record_ui(self, unique_id: str, ui: dict) -> None:
        display = self.dynprompt.get_display_node_id(unique_id)
        self.ui_outputs[unique_id] = ui
        self.meta_outputs[unique_id] = {"node_id": unique_id, "display_node": display,
                                        "parent_node": self.dynprompt.get_parent_node_id(unique_id),
                                        "real_node_id": self.dynprompt.get_real_node_id(unique_id)}
        self.ex._send("executed", {"node": unique_id, "display_node": display, "output": ui,
                                   "prompt_id": self.prompt_id})

    def _get_object(self, unique_id: str, class_type: str, class_def: type) -> Any:
        obj = self.caches.objects.get(unique_id, class_type)
        if obj is None:
            obj = class_def()
            self.caches.objects.set(unique_id, class_type, obj)
        return obj

    def execute_node(self, unique_id: str) -> tuple[ExecutionResult, dict | None, BaseException | None]:
        dynprompt = self.dynprompt
        node = dynprompt.get_node(unique_id)
        class_type = node["class_type"]
        display_id = dynprompt.get_display_node_id(unique_id)
        cached = self.caches.outputs.get(unique_id)
        if cached is not None:
            if cached.ui:
                self._record_ui(unique_id, cached.ui)
            self.registry.finish_progress(unique_id)
            self.executed.add(unique_id)
            return ExecutionResult.SUCCESS, None, None

        input_data_all: dict | None = None
        hook_before = comfy.utils.PROGRESS_BAR_HOOK
        t0 = time.perf_counter()
        try:
            class_def = nodes.NODE_CLASS_MAPPINGS.get(class_type)
            if class_def is None:
                raise KeyError(f"Node type {class_type!r} (node {unique_id}) is not installed; install the "
                               f"custom node pack that provides it")
            if unique_id in self.pending_subgraph_results:
                output_data = self._resolve_subgraph(unique_id, class_def)
                output_ui: dict = {}
                has_subgraph = False
            else:
                self.registry.start_progress(unique_id)
                input_data_all, missing, _ = get_input_data(node.get("inputs") or {}, class_def, unique_id,
                                                            self.caches.outputs, dynprompt, self.extra_data)
                self.server.last_node_id = display_id
                self.ex._send("executing", {"node": unique_id, "display_node": display_id,
                                            "prompt_id": self.prompt_id})
                comfy.utils.set_progress_bar_global_hook(
                    self.ex._make_progress_hook(self.prompt_id, unique_id, self.registry))
                obj = self._get_object(unique_id, class_type, class_def)

                if hasattr(obj, "check_lazy_status"):
                    needed = self._lazy_inputs_needed(obj, input_data_all, missing)
                    if needed:
                        for name in needed:
                            self.execution_list.make_input_strong_link(unique_id, name)
                        return ExecutionResult.PENDING, None, None

                def on_block(block: ExecutionBlocker) -> ExecutionBlocker:
                    if block.message is not None:
                        self.ex.add_message("execution_error", {
                            "prompt_id": self.prompt_id, "node_id": unique_id, "node_type": class_type,
                            "executed": list(self.executed),
                            "exception_message": f"Execution Blocked: {block.message}",
                            "exception_type": "ExecutionBlocked", "traceback": [], "current_inputs": [],
                            "current_outputs": []}, broadcast=False)
                    # Reported once; everything further down is blocked silently.
                    return ExecutionBlocker(None)

                def pre_call(call_index: int) -> None:
                    GraphBuilder.set_default_prefix(unique_id, call_index, 0)

                returns = map_node_over_list(obj, input_data_all, obj.FUNCTION, allow_interrupt=True,
                                             execution_block_cb=on_block, pre_execute_cb=pre_call)
                output_data, output_ui, has_subgraph = get_output_from_returns(returns, obj)

            if output_ui:
                self._record_ui(unique_id, output_ui)
            if has_subgraph:
                self._expand(unique_id, output_data)
                return ExecutionResult.PENDING, None, None
            self.caches.outputs.set(unique_id, CacheEntry(output_data, output_ui or None))
        except Exception as e:
            details = self._error_details(unique_id, e, input_data_all)
            if isinstance(e, mm.InterruptProcessingException):
                logger.info("Processing interrupted")
            else:
                logger.error("!!! Exception during processing !!! %s", e)
                logger.error("%s", "".join(traceback.format_exception(e)))
                if isinstance(e, _oom_types()):
                    logger.error("Out of memory: unloading all models")
                    mm.unload_all_models()
            if self.ex.lockstep is not None:
                self.ex.lockstep.node_failed(self.prompt_id, unique_id, e)
            return ExecutionResult.FAILURE, details, e
        finally:
            # Restore the exact previous hook. Going through the setter again would let a wrapping setter
            # (the multi-rank runtime's step agreement) wrap it a second time.
            comfy.utils.PROGRESS_BAR_HOOK = hook_before
            self.timings[unique_id] = self.timings.get(unique_id, 0.0) + time.perf_counter() - t0

        self.registry.finish_progress(unique_id)
        self.executed.add(unique_id)
        return ExecutionResult.SUCCESS, None, None

    def _lazy_inputs_needed(self, obj: Any, input_data_all: dict, missing: set[str]) -> list[str]:
        asked = map_node_over_list(obj, input_data_all, "check_lazy_status", allow_interrupt=True)
        names: list[str] = []
        for r in asked:
            if isinstance(r, str):
                r = [r]
            for name in r or []:
                # Only links that have not produced a value yet can be made to run.
                if name in missing and name not in names:
                    names.append(name)
        return names

    def _expand(self, unique_id: str, per_call: list) -> None:
        new_outputs: list[str] = []
        links: list[tuple[str, int]] = []
        for graph, result in per_call:
            if graph is None:
                continue
            for node_id in graph:
                if self.dynprompt.has_node(node_id):
                    raise DuplicateNodeError(f"Node {node_id} expanded by node {unique_id} already exists; "
                                             f"build sub-graphs with GraphBuilder so ids get a unique prefix")
            for node_id, info in graph.items():
                display = info.get("override_display_id", unique_id)
                self.dynprompt.add_ephemeral_node(node_id, info, unique_id, display)
                class_def = nodes.NODE_CLASS_MAPPINGS.get(info["class_type"])
                if class_def is not None and getattr(class_def, "OUTPUT_NODE", False):
                    new_outputs.append(node_id)
            links.extend((r[0], r[1]) for r in result if is_link(r))
        for node_id in new_outputs:
            self.execution_list.add_node(node_id)
        for from_id, slot in links:
            self.execution_list.add_strong_link(from_id, slot, unique_id)
        self.pending_subgraph_results[unique_id] = per_call

    def _resolve_subgraph(self, unique_id: str, class_def: type) -> list[list]:
        per_call = self.pending_subgraph_results.pop(unique_id)
        n = max(_n_outputs(class_def), max((len(r) for _, r in per_call), default=0))
        is_list = list(getattr(class_def, "OUTPUT_IS_LIST", None) or []) + [False] * n
        out: list[list] = [[] for _ in range(n)]
        for graph, result in per_call:
            for i, value in enumerate(result):
                if graph is not None and is_link(value):
                    entry = self.caches.outputs.get(value[0])
                    if entry is None:
                        raise RuntimeError(f"Expanded node {value[0]} of node {unique_id} produced no output")
                    out[i].extend(entry.outputs[value[1]])
                elif is_list[i] and not isinstance(value, ExecutionBlocker):
                    out[i].extend(value)
                else:
                    out[i].append(value)
        return out

    def log_timings(self) -> None:
        total = time.perf_counter() - self.started
        if not self.timings:
            logger.info("Prompt %s: nothing to run (all outputs cached), %.2fs", self.prompt_id, total)
            return
        parts = []
        for node_id, seconds in sorted(self.timings.items(), key=lambda kv: -kv[1]):
            class_type = self.dynprompt.get_node(node_id)["class_type"]
            parts.append(f"{class_type} #{node_id} {seconds:.2f}s")
        logger.info("Prompt %s ran %d node(s) in %.2fs: %s", self.prompt_id, len(self.timings), total,
                    ", ".join(parts))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

def _error(type_: str, message: str, details: str, extra_info: dict | None = None) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


def _coerce(input_type: Any, value: Any) -> Any:
    if input_type == "INT":
        return int(value)
    if input_type == "FLOAT":
        return float(value)
    if input_type == "STRING":
        return str(value)
    if input_type == "BOOLEAN":
        return bool(value)
    return value


def validate_inputs(prompt_id: str, prompt: dict, node_id: str, validated: dict) -> tuple[bool, list, str]:
    """Validate one node and (recursively) its ancestors; results are memoised in `validated`.

    Constants are coerced in place (the executor then sees the coerced values).
    """
    if node_id in validated:
        return validated[node_id]
    # Mark in progress so a cycle does not recurse forever; the executor reports cycles.
    validated[node_id] = (True, [], node_id)
    node = prompt[node_id]
    inputs = node.setdefault("inputs", {})
    class_type = node["class_type"]
    class_def = nodes.NODE_CLASS_MAPPINGS[class_type]
    valid_inputs = class_def.INPUT_TYPES()

    validate_args: list[str] = []
    validate_kwargs = False
    if hasattr(class_def, "VALIDATE_INPUTS"):
        spec = inspect.getfullargspec(class_def.VALIDATE_INPUTS)
        validate_args = spec.args
        validate_kwargs = spec.varkw is not None

    errors: list[dict] = []
    valid = True
    received_types: dict[str, Any] = {}
    declared = list((valid_inputs.get("required") or {}).keys()) + \
        [k for k in (valid_inputs.get("optional") or {}) if k not in (valid_inputs.get("required") or {})]

    for name in declared:
        input_type, category, info = get_input_info(class_def, name, valid_inputs)
        info = info or {}
        config = [input_type, info]
        if name not in inputs:
            if category == "required":
                errors.append(_error("required_input_missing", "Required input is missing", name,
                                     {"input_name": name}))
            continue
        value = inputs[name]

        if isinstance(value, list):
            if not is_link(value):
                errors.append(_error("bad_linked_input",
                                     "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                     name, {"input_name": name, "input_config": config, "received_value": value}))
                continue
            from_id, slot = value
            if from_id not in prompt or "class_type" not in prompt[from_id]:
                errors.append(_error("bad_linked_input", "Linked node does not exist in the prompt",
                                     f"{name}: node {from_id}",
                                     {"input_name": name, "input_config": config, "linked_node": value}))
                continue
            source_def = nodes.NODE_CLASS_MAPPINGS.get(prompt[from_id]["class_type"])
            return_types = getattr(source_def, "RETURN_TYPES", ()) if source_def is not None else ()
            if slot < 0 or slot >= len(return_types):
                errors.append(_error("bad_linked_input", "Linked output slot does not exist",
                                     f"{name}: node {from_id} has {len(return_types)} output(s), "
                                     f"slot {slot} requested",
                                     {"input_name": name, "input_config": config, "linked_node": value}))
                continue
            received = return_types[slot]
            received_types[name] = received
            if "input_types" not in validate_args and not validate_node_input(received, input_type):
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                     f"{name}, received_type({received}) mismatch input_type({input_type})",
                                     {"input_name": name, "input_config": config, "received_type": received,
                                      "linked_node": value}))
                continue
            try:
                ok, _, _ = validate_inputs(prompt_id, prompt, from_id, validated)
            except Exception as e:
                validated[from_id] = (False, [_error(
                    "exception_during_inner_validation", "Exception when validating inner node", str(e),
                    {"input_name": name, "input_config": config, "exception_message": str(e),
                     "exception_type": full_type_name(type(e)),
                     "traceback": traceback.format_tb(e.__traceback__), "linked_node": value})], from_id)
                valid = False
                continue
            if not ok:
                valid = False
            continue

        # A constant.
        raw = unwrap_widget_value(value)
        try:
            coerced = _coerce(input_type, raw)
        except Exception as e:
            errors.append(_error("invalid_input_type",
                                 f"Failed to convert an input value to a {input_type} value",
                                 f"{name}, {raw}, {e}",
                                 {"input_name": name, "input_config": config, "received_value": raw,
                                  "exception_message": str(e)}))
            continue
        if coerced is not raw and not isinstance(value, dict):
            inputs[name] = coerced
        value = coerced
        if name in validate_args or validate_kwargs:
            continue  # VALIDATE_INPUTS takes over range and list checks for this input
        if "min" in info and isinstance(value, (int, float)) and value < info["min"]:
            errors.append(_error("value_smaller_than_min", f"Value {value} smaller than min of {info['min']}",
                                 name, {"input_name": name, "input_config": config, "received_value": value}))
            continue
        if "max" in info and isinstance(value, (int, float)) and value > info["max"]:
            errors.append(_error("value_bigger_than_max", f"Value {value} bigger than max of {info['max']}",
                                 name, {"input_name": name, "input_config": config, "received_value": value}))
            continue
        if isinstance(input_type, (list, tuple)) or input_type == "COMBO":
            options = list(input_type) if isinstance(input_type, (list, tuple)) else list(info.get("options", []))
            if info.get("multiselect") and isinstance(value, list):
                bad = [v for v in value if v not in options]
            else:
                bad = [] if value in options else [value]
            if bad:
                shown = options if len(options) <= 20 else options[:20] + [f"... ({len(options) - 20} more)"]
                errors.append(_error("value_not_in_list", "Value not in list",
                                     f"{name}: '{bad[0] if len(bad) == 1 else bad}' not in {shown}",
                                     {"input_name": name, "input_config": config, "received_value": value}))
                continue

    if validate_args or validate_kwargs:
        data, _, _ = get_input_data(inputs, class_def, node_id)
        filtered = {k: v for k, v in data.items() if validate_kwargs or k in validate_args}
        if "input_types" in validate_args:
            filtered["input_types"] = [received_types]
        for r in map_node_over_list(class_def, filtered, "VALIDATE_INPUTS"):
            if r is not True:
                errors.append(_error("custom_validation_failed", "Custom validation failed for node",
                                     str(r), {"input_name": "", "input_config": {}, "received_value": None}))

    result = (valid and not errors, errors, node_id)
    validated[node_id] = result
    return result


def _ancestors(prompt: dict, node_id: str) -> set[str]:
    seen = {node_id}
    stack = [node_id]
    while stack:
        for value in (prompt.get(stack.pop(), {}).get("inputs") or {}).values():
            if is_link(value) and value[0] in prompt and value[0] not in seen:
                seen.add(value[0])
                stack.append(value[0])
    return seen


def validate_prompt(prompt_id: str, prompt: Any, partial_execution_targets: list | None = None
                    ) -> tuple[bool, dict | None, list, dict]:
    """(ok, error, good_outputs, node_errors) in ComfyUI's shapes; ok when at least one output validates."""
    if not isinstance(prompt, dict):
        return False, _error("no_prompt", "No prompt provided", "No prompt provided"), [], {}
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return False, _error("invalid_prompt",
                                 "Cannot execute because a node is missing the class_type property.",
                                 f"Node ID '#{node_id}'"), [], {}
        class_def = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if class_def is None:
            return False, _error("invalid_prompt",
                                 f"Cannot execute because node {node['class_type']} does not exist.",
                                 f"Node ID '#{node_id}'"), [], {}
        if getattr(class_def, "OUTPUT_NODE", False) is True and \
                (partial_execution_targets is None or node_id in partial_execution_targets):
            outputs.append(node_id)
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    good: list[str] = []
    failed: list[tuple[str, list]] = []
    node_errors: dict[str, dict] = {}
    validated: dict[str, tuple] = {}
    for out in outputs:
        try:
            ok, reasons, _ = validate_inputs(prompt_id, prompt, out, validated)
        except Exception as e:
            ok = False
            reasons = [_error("exception_during_validation", "Exception when validating node", str(e),
                              {"exception_type": full_type_name(type(e)),
                               "traceback": traceback.format_tb(e.__traceback__)})]
            validated[out] = (False, reasons, out)
        if ok:
            good.append(out)
            continue
        failed.append((out, reasons))
        ancestry = _ancestors(prompt, out)
        for node_id, (node_ok, node_reasons, _) in validated.items():
            if node_ok or not node_reasons or node_id not in ancestry:
                continue
            entry = node_errors.setdefault(node_id, {"errors": node_reasons, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]})
            if out not in entry["dependent_outputs"]:
                entry["dependent_outputs"].append(out)
        logger.warning("Output node %s failed validation: %s", out,
                       "; ".join(f"{r['message']}: {r['details']}" for r in reasons) or "an input failed")
    if not good:
        # Every error that made an output fail, its own or an ancestor's, so the message names the cause.
        lines: list[str] = []
        for reasons in [r for _, r in failed] + [e["errors"] for e in node_errors.values()]:
            for r in reasons:
                line = f"{r['message']}: {r['details']}"
                if line not in lines:
                    lines.append(line)
        details = "\n".join(lines)
        return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                             details), [], node_errors
    return True, None, good, node_errors


# ---------------------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------------------

class PromptQueue:
    """Pending prompts (a heap: lowest number first), running prompts, history and worker flags.

    With `persist_path`, pending and running items are written there (atomically) on every change and
    loaded back at construction: prompts that were queued or running when the process stopped run again.
    """

    def __init__(self, server: Any, persist_path: str | None = None):
        self.server = server
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[tuple] = []
        self.currently_running: dict[int, tuple] = {}
        self.history: dict[str, dict] = {}
        self.flags: dict[str, Any] = {}
        self.persist_path = persist_path
        if persist_path:
            self._load()

    # -- persistence --------------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.persist_path
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
            restored = [tuple(item) for item in items]
        except (OSError, ValueError, TypeError) as e:
            logger.error("Could not reload the saved queue from %s (%s); starting with an empty queue. "
                         "Delete or fix the file to silence this.", path, e)
            return
        for item in restored:
            heapq.heappush(self.queue, item)
        if restored:
            logger.info("Restored %d queued prompt(s) from %s", len(restored), path)

    def _persist(self) -> None:
        if not self.persist_path:
            return
        items = sorted(list(self.currently_running.values()) + list(self.queue), key=lambda it: it[0])
        directory = os.path.dirname(os.path.abspath(self.persist_path))
        try:
            os.makedirs(directory, exist_ok=True)
            payload = json.dumps([list(item) for item in items])
            fd, tmp = tempfile.mkstemp(prefix=".queue-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.persist_path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        except (OSError, TypeError, ValueError) as e:
            logger.error("Could not save the queue to %s: %s (queued prompts will not survive a restart)",
                         self.persist_path, e)

    def _changed(self) -> None:
        self._persist()
        self.server.queue_updated()

    # -- queue --------------------------------------------------------------------------------------

    def put(self, item: tuple) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self._changed()
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[tuple, int] | None:
        with self.not_empty:
            while len(self.queue) == 0:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and len(self.queue) == 0:
                    return None
            item = heapq.heappop(self.queue)
            item_id = self.task_counter
            self.currently_running[item_id] = copy.deepcopy(item)
            self.task_counter += 1
            self._changed()
            return item, item_id

    def task_done(self, item_id: int, history_result: dict, status: Any = None,
                  process_item: Callable[[tuple], tuple] | None = None) -> None:
        with self.mutex:
            item = self.currently_running.pop(item_id)
            while len(self.history) >= MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            if status is not None and hasattr(status, "_asdict"):
                status = status._asdict()
            if process_item is not None:
                item = process_item(item)
            # History never keeps the sensitive extra_data (6th element).
            self.history[item[1]] = {"prompt": tuple(item[:5]), "outputs": {},
                                     "status": copy.deepcopy(status) if status is not None else None}
            self.history[item[1]].update(history_result or {})
            self._changed()

    def get_current_queue(self) -> tuple[list, list]:
        with self.mutex:
            return copy.deepcopy(list(self.currently_running.values())), copy.deepcopy(self.queue)

    def get_current_queue_volatile(self) -> tuple[list, list]:
        with self.mutex:
            return list(self.currently_running.values()), list(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []
            self._changed()

    def delete_queue_item(self, function: Callable[[tuple], bool]) -> bool:
        with self.mutex:
            for i, item in enumerate(self.queue):
                if function(item):
                    self.queue.pop(i)
                    heapq.heapify(self.queue)
                    self._changed()
                    return True
            return False

    # -- history ------------------------------------------------------------------------------------

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None,
                    offset: int = -1) -> dict:
        with self.mutex:
            if prompt_id is not None:
                if prompt_id in self.history:
                    return {prompt_id: copy.deepcopy(self.history[prompt_id])}
                return {}
            keys = list(self.history)
            if offset < 0:
                offset = max(len(keys) - max_items, 0) if max_items is not None else 0
            selected = keys[offset:] if max_items is None else keys[offset:offset + max_items]
            return {k: copy.deepcopy(self.history[k]) for k in selected}

    def wipe_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history_item(self, id_to_delete: str) -> None:
        with self.mutex:
            self.history.pop(id_to_delete, None)

    # -- flags --------------------------------------------------------------------------------------

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self, reset: bool = True) -> dict:
        with self.mutex:
            if reset:
                flags, self.flags = self.flags, {}
                return flags
            return dict(self.flags)
