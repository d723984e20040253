"""The multi-rank runtime: every rank runs the same prompts in lockstep; rank 0 alone has side effects.

Owns `run(args, start_server)` (main.py calls it when WORLD_SIZE > 1), the leader's prompt worker (rank 0:
hands each queue item to the followers, then executes it), the follower loop (ranks 1..N-1), the
`Lockstep` agreement object that `execution.PromptExecutor` calls before each node and that sits in the
ProgressBar hook at each sampler step, and the recovery from a dead rank (report, persist the queue,
exit non-zero so torchrun --max-restarts restarts the group).

Agreement protocol. Per prompt, every rank goes through the same sequence of rounds (one all_reduce(MAX)
of a status code on the gloo control group): one before each node, one at each ProgressBar update, and a
final round after the graph. A rank whose node raised contributes ERROR from `node_failed` (that is its
final round); a rank that saw an interrupt contributes INTERRUPT. The first round with a non-GO result
ends the prompt on every rank at the same point; its details (which rank, which node, what error) are
then all-gathered so rank 0 can report them, and the exception raised from that round is marked as
agreed so no second round is attempted for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

from comfy.taco_dit.core.distributed_manager import ERROR, GO, INTERRUPT, DistributedManager, RankLostError

log = logging.getLogger(__name__)

# Input files bigger than this in total are not shipped with a work item; followers must read them
# from a shared filesystem (the error they get names the file).
MAX_SHIPPED_INPUT_BYTES = 1 << 30


class RemoteRankError(Exception):
    """Another rank failed (or vanished) while running this prompt; raised on the ranks that did not."""

    def __init__(self, rank: int | None, node_id: str | None, exception_type: str, message: str,
                 remote_traceback: str = "", lost: bool = False):
        self.rank = rank
        self.node_id = node_id
        self.exception_type = exception_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        self.lost = lost
        where = f" in node {node_id}" if node_id is not None else ""
        who = f"Rank {rank}" if rank is not None else "A rank"
        super().__init__(f"{who} failed{where}: {exception_type}: {message}" if not lost else message)
        self._taco_agreed = True


@dataclass
class Runtime:
    """What a multi-rank process was started with; `current_runtime()` hands it to parallel code."""

    dm: DistributedManager
    config: object  # config_manager.ParallelConfig
    lockstep: Lockstep


# The one piece of process state of our own: set once by run(), read by parallel strategies and nodes
# that cannot be handed it through ComfyUI's node interface.
_RUNTIME: Runtime | None = None


def current_runtime() -> Runtime | None:
    """The multi-rank runtime of this process, or None in a single process."""
    return _RUNTIME


def install_runtime(dm: DistributedManager, config, lockstep: Lockstep) -> Runtime:
    """Make `current_runtime()` return this process's runtime (run() does; so do benchmarks that build one)."""
    global _RUNTIME
    _RUNTIME = Runtime(dm, config, lockstep)
    return _RUNTIME


def png_share():
    """The ranks that encode a saved PNG together (png_writer.BandShare), or None in a single process. Only
    for nodes every rank runs at the same point (SaveImage, PreviewImage): encoding is a collective."""
    return _RUNTIME.dm.band_share() if _RUNTIME is not None else None


def is_leader() -> bool:
    """True on the rank that owns side effects (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _interrupt_exception():
    import comfy.model_management as mm

    exc = mm.InterruptProcessingException()
    exc._taco_agreed = True
    return exc


@dataclass
class Outcome:
    """How a prompt ended, as every rank agreed."""

    code: int = GO
    reports: list = field(default_factory=list)  # one dict per rank: rank, code, node_id, type, message, traceback
    lost: bool = False

    @property
    def unanimous_error(self) -> bool:
        return bool(self.reports) and all(r["code"] == ERROR for r in self.reports)

    @property
    def needs_cache_reset(self) -> bool:
        """True when ranks may have cached different nodes: some failed inside a node while others had
        already finished it (they were at the next node's agreement or at the final round). Rounds at a
        sampler step stop every rank inside the same node, so those leave caches identical."""
        kinds = {r.get("kind") for r in self.reports}
        return self.lost or ("failed" in kinds and bool(kinds & {"node", "finish"}))

    def first_error(self, exclude_rank: int | None = None) -> dict | None:
        errors = [r for r in self.reports if r["code"] == ERROR and r["rank"] != exclude_rank]
        return errors[0] if errors else None


class Lockstep:
    """The agreement points of one process. Passed to `PromptExecutor(..., lockstep=)`.

    Call order per prompt: `begin(prompt_id)`, then any number of `before_node` / steps (via the
    wrapped ProgressBar hook) / one `node_failed`, then `finish(success, exc)`, which runs the final
    round only if no earlier round ended the prompt.
    """

    def __init__(self, dm: DistributedManager):
        self.dm = dm
        self.active = False
        self.prompt_id: str | None = None
        self.outcome: Outcome | None = None
        self._ended_exc: BaseException | None = None

    # -- called by the executor ----------------------------------------------------------------------------

    def before_node(self, prompt_id: str, node_id: str) -> None:
        self._checkpoint(node_id, None, "node")

    def node_failed(self, prompt_id: str, node_id: str, exc: BaseException) -> None:
        """A node raised on this rank: tell the others at their next agreement point, then return."""
        if not self.active or self.outcome is not None or getattr(exc, "_taco_agreed", False):
            return
        import comfy.model_management as mm

        code = INTERRUPT if isinstance(exc, mm.InterruptProcessingException) else ERROR
        if code == ERROR:
            self.dm.post_failure(prompt_id, {"rank": self.dm.rank, "node_id": node_id,
                                             "type": type(exc).__name__, "message": str(exc)})
        # The executor is already handling this rank's own exception: only the round matters here.
        self._round(code, node_id, exc, "failed")

    # -- called by the engine -------------------------------------------------------------------------------

    def begin(self, prompt_id: str) -> None:
        self.active = True
        self.prompt_id = prompt_id
        self.outcome = None
        self._ended_exc = None

    def finish(self, success: bool, message: str | None = None) -> Outcome:
        """Final round (unless an earlier one ended the prompt); returns what all ranks agreed."""
        try:
            if self.outcome is None:
                local = None if success else RuntimeError(message or "prompt failed on this rank")
                self._round(GO if success else ERROR, None, local, "finish")
            return self.outcome or Outcome(GO, [])
        finally:
            self.active = False

    def wrap_progress_hook(self, inner):
        """Wrap a ProgressBar hook so every update is also an agreement point (the executor calls this
        for the hook it installs per node)."""
        if getattr(inner, "_taco_lockstep", None) is self:
            return inner

        def hook(value, total, preview=None, node_id=None):
            if not self.active:
                if inner is not None:
                    inner(value, total, preview, node_id)
                return
            local: BaseException | None = None
            try:
                if inner is not None:
                    inner(value, total, preview, node_id)
            except Exception as e:  # an interrupt (or a failing preview) must be agreed before raising
                local = e
            self._checkpoint(node_id, local, "step")

        hook._taco_lockstep = self
        hook._taco_inner = inner
        return hook

    # -- internals -------------------------------------------------------------------------------------------

    def _checkpoint(self, node_id, local: BaseException | None, kind: str) -> None:
        if not self.active:
            if local is not None:
                raise local
            return
        if self._ended_exc is not None:
            raise self._ended_exc  # the prompt is over on every rank; keep refusing without a collective
        import comfy.model_management as mm

        if local is None:
            try:
                mm.throw_exception_if_processing_interrupted()  # consumes the flag, as ComfyUI does
            except mm.InterruptProcessingException as e:
                local = e
        code = GO
        if local is not None:
            code = INTERRUPT if isinstance(local, mm.InterruptProcessingException) else ERROR
        stop = self._round(code, node_id, local, kind)
        if stop is not None:
            raise stop

    def _round(self, code: int, node_id, local: BaseException | None, kind: str) -> BaseException | None:
        """One agreement round; returns the exception that ends the prompt on this rank, or None."""
        try:
            result = self.dm.agree(code)
            if result == GO:
                return None
            reports = self.dm.all_gather_object(self._report(code, node_id, local, kind))
        except RankLostError as e:
            self.outcome = Outcome(ERROR, [], lost=True)
            self._ended_exc = RemoteRankError(None, node_id, "RankLostError", str(e), lost=True)
            return self._ended_exc
        self.outcome = Outcome(result, reports)
        if local is not None:
            local._taco_agreed = True
        if result == INTERRUPT:
            self._ended_exc = local if local is not None else _interrupt_exception()
        else:
            first = self.outcome.first_error(exclude_rank=self.dm.rank)
            if first is None or (local is not None and code == ERROR):
                self._ended_exc = local if local is not None else RuntimeError("error on this rank")
            else:
                self._ended_exc = RemoteRankError(first["rank"], first["node_id"], first["type"],
                                                  first["message"], first["traceback"])
        return self._ended_exc

    def _report(self, code: int, node_id, local: BaseException | None, kind: str) -> dict:
        return {"rank": self.dm.rank, "code": code, "node_id": node_id, "kind": kind,
                "type": type(local).__name__ if local is not None else None,
                "message": str(local) if local is not None else "",
                "traceback": "".join(traceback.format_exception(local)) if local is not None else ""}


def install_step_agreement(lockstep: Lockstep) -> None:
    """Route every hook the executor installs through `lockstep.wrap_progress_hook`.

    `PromptExecutor` already wraps the hook it installs per node with `wrap_progress_hook`; this also
    covers hooks set by anything else through `comfy.utils.set_progress_bar_global_hook` (and the one
    installed now), so every ProgressBar update, which every sampler step makes, is an agreement point.
    Wrapping is idempotent.
    """
    import comfy.utils

    original = getattr(comfy.utils.set_progress_bar_global_hook, "_taco_original",
                       comfy.utils.set_progress_bar_global_hook)

    def set_progress_bar_global_hook(function):
        original(lockstep.wrap_progress_hook(function))

    set_progress_bar_global_hook._taco_original = original
    comfy.utils.set_progress_bar_global_hook = set_progress_bar_global_hook
    original(lockstep.wrap_progress_hook(comfy.utils.PROGRESS_BAR_HOOK))


# ---------------------------------------------------------------------------------------------------------
# Input files: rank 0 ships the ones a prompt names, followers write what they lack
# ---------------------------------------------------------------------------------------------------------


def collect_input_files(prompt: dict) -> list[dict]:
    """Files (input/, or annotated [output]/[temp]) the prompt's widget values name, with their bytes."""
    import folder_paths

    files, seen, total = [], set(), 0
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values():
            if not isinstance(value, str) or not value or value in seen:
                continue
            seen.add(value)
            try:
                name, kind = folder_paths.annotated_filepath(value)
                path = folder_paths.get_annotated_filepath(value)
            except (ValueError, TypeError, OSError):
                continue
            if not os.path.isfile(path):
                continue
            kind = kind or "input"
            root = folder_paths.get_directory_by_type(kind) or folder_paths.get_input_directory()
            rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
            if rel.startswith(".."):
                continue
            size = os.path.getsize(path)
            if total + size > MAX_SHIPPED_INPUT_BYTES:
                log.warning("Not shipping %s to followers (over %d bytes in total); they must read it "
                            "from a shared filesystem", path, MAX_SHIPPED_INPUT_BYTES)
                continue
            with open(path, "rb") as f:
                data = f.read()
            total += size
            files.append({"type": kind, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "data": data})
    return files


def write_input_files(files: list[dict]) -> int:
    """Follower: write the shipped files this rank lacks (or has with other content). Returns how many."""
    import folder_paths

    written = 0
    for f in files:
        root = folder_paths.get_directory_by_type(f["type"])
        if root is None:
            continue
        target = os.path.realpath(os.path.join(root, f["path"]))
        if not target.startswith(os.path.realpath(root) + os.sep):
            log.warning("Ignoring shipped file outside %s: %s", root, f["path"])
            continue
        if os.path.isfile(target):
            with open(target, "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() == f["sha256"]:
                    continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.taco-{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(f["data"])
        os.replace(tmp, target)
        written += 1
    return written


# ---------------------------------------------------------------------------------------------------------
# Followers
# ---------------------------------------------------------------------------------------------------------


class FollowerServer:
    """What a follower's nodes and executor see as `PromptServer`: every message goes nowhere.

    Custom node packs register routes on `PromptServer.instance.routes` at import time, so that exists
    too (never served).
    """

    def __init__(self):
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.prompt_queue = None
        self.loop = None
        self.app = None
        self.sockets: dict = {}
        self.sockets_metadata: dict = {}
        self.supports = set()

    def send_sync(self, event, data, sid=None) -> None:
        pass

    async def send(self, event, data, sid=None) -> None:
        pass

    async def send_json(self, event, data, sid=None) -> None:
        pass

    def send_progress_text(self, text, node_id, sid=None) -> None:
        pass

    def queue_updated(self) -> None:
        pass

    def add_on_prompt_handler(self, handler) -> None:
        pass


def _make_scratch_dirs(rank: int) -> str:
    """Followers write outputs and temp files here, never into the real output dir."""
    import folder_paths

    scratch = tempfile.mkdtemp(prefix=f"taco-rank{rank}-")
    for sub in ("output", "temp"):
        os.makedirs(os.path.join(scratch, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(scratch, "output"))
    folder_paths.set_temp_directory(os.path.join(scratch, "temp"))
    return scratch


def _empty_dir(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.remove(p)
            except OSError:
                log.debug("could not remove %s", p)


def _make_executor(server, cache, lockstep):
    import execution

    cache_type, cache_args = cache
    return execution.PromptExecutor(server, cache_type=cache_type, cache_args=cache_args, lockstep=lockstep)


def follower_loop(args, dm: DistributedManager, lockstep: Lockstep, executor=None,
                  cache: tuple[str, dict] = ("classic", {})) -> int:
    """Ranks 1..N-1: execute every work item rank 0 publishes, until it says stop. Returns an exit code."""
    import folder_paths
    import nodes
    from comfy_execution.worker import apply_memory_flags

    scratch = _make_scratch_dirs(dm.rank)
    stand_in = FollowerServer()
    try:
        import server as server_module

        # Custom packs reach the server through PromptServer.instance; on a follower that is the sink.
        server_module.PromptServer.instance = stand_in
    except ImportError:
        log.debug("server module not importable on follower; custom nodes see no PromptServer")
    if executor is None:
        nodes.init_extra_nodes(init_custom_nodes=True, disable_all_custom_nodes=args.disable_all_custom_nodes,
                               whitelist=args.whitelist_custom_nodes)
        executor = _make_executor(stand_in, cache, lockstep)
    log.info("Follower rank %d ready (scratch output %s)", dm.rank, scratch)
    seq = 0
    try:
        while True:
            seq += 1
            work = dm.receive(seq)
            kind = work.get("kind")
            if kind == "stop":
                log.info("Rank 0 stopped; follower rank %d exits", dm.rank)
                return 0
            if kind == "flags":
                apply_memory_flags(work["flags"], executor)
                continue
            number, prompt_id, prompt, extra_data, outputs = work["item"]
            write_input_files(work.get("files", []))
            lockstep.begin(prompt_id)
            try:
                executor.execute(prompt, prompt_id, extra_data, outputs)
            finally:
                outcome = lockstep.finish(bool(getattr(executor, "success", False)),
                                          _last_error_message(executor))
            if outcome.lost:
                log.error("Lost contact with the group during prompt %s; exiting so it can restart", prompt_id)
                return 1
            if outcome.needs_cache_reset:
                # Ranks stopped at the same agreement point but may have cached different nodes; the
                # executor stages only uncached nodes, so dropping caches everywhere keeps the next
                # prompt's node sequence (and so its agreement rounds) identical on every rank.
                executor.reset()
            _empty_dir(folder_paths.get_output_directory())
            _empty_dir(folder_paths.get_temp_directory())
    except RankLostError as e:
        log.error("%s", e)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _last_error_message(executor) -> str | None:
    for event, data in reversed(getattr(executor, "status_messages", None) or []):
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
        if event == "execution_interrupted":
            return "interrupted"
    return None


# ---------------------------------------------------------------------------------------------------------
# Rank 0
# ---------------------------------------------------------------------------------------------------------


class FailureWatch:
    """Rank 0's watchdog for a rank that failed while the others are stuck outside any agreement round.

    Agreement rounds only happen between nodes and at steps; inside a parallel forward the ranks meet in
    compute collectives (NCCL), where a rank that raised never arrives and the others would wait for
    the collective timeout. A failed rank posts a notice in the store first; if the prompt is still
    unresolved `timeout` seconds after the notice, the group is declared stuck (`on_stuck(reason)`).
    """

    def __init__(self, dm: DistributedManager, timeout: float, running, on_stuck, interval: float = 0.5):
        self.dm = dm
        self.timeout = timeout
        self.running = running  # () -> prompt id being executed, or None
        self.on_stuck = on_stuck
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taco-failure-watch", daemon=True)

    def start(self) -> FailureWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        first_seen: tuple[str, float] | None = None
        reported: str | None = None
        while not self._stop.wait(self.interval):
            prompt_id = self.running()
            if prompt_id is None or prompt_id == reported:
                first_seen = None
                continue
            try:
                notices = self.dm.failures(prompt_id)
            except RuntimeError:  # the store is gone: the heartbeat reports that case
                continue
            if not notices:
                continue
            if first_seen is None or first_seen[0] != prompt_id:
                first_seen = (prompt_id, time.monotonic())
                continue
            if time.monotonic() - first_seen[1] > self.timeout:
                rank, info = sorted(notices.items())[0]
                self.on_stuck(f"rank {rank} failed in node {info.get('node_id')} ({info.get('type')}: "
                              f"{info.get('message')}) and the other ranks did not reach an agreement point "
                              f"within {self.timeout:g} s (stuck in a collective?)")
                reported, first_seen = prompt_id, None


class Leader:
    """Rank 0's prompt worker and its recovery path."""

    def __init__(self, dm: DistributedManager | None, lockstep: Lockstep | None, args):
        self.dm = dm
        self.lockstep = lockstep
        self.args = args
        self.queue = None
        self.server = None
        self.executor = None
        self.seq = 0
        self.running: tuple | None = None  # (item_id, prompt_id, client_id)
        self._abort_lock = threading.Lock()
        self._aborting = False

    def running_prompt_id(self) -> str | None:
        running = self.running
        return running[1] if running is not None else None

    def _publish(self, work: dict) -> int:
        self.seq += 1
        self.dm.publish(self.seq, work)
        return self.seq

    def stop_followers(self) -> None:
        try:
            self._publish({"kind": "stop"})
        except RuntimeError:  # the store may be gone already when the whole group is going down
            log.debug("could not publish stop", exc_info=True)

    def worker(self, queue, server, executor) -> None:
        """Like main.prompt_worker, plus: publish each item to the followers and agree on the outcome."""
        from comfy_execution.worker import announce_done, apply_memory_flags, next_prompt

        self.queue, self.server, self.executor = queue, server, executor
        while True:
            job = next_prompt(queue)
            if job is None:
                continue
            prompt_id, extra_data = job.prompt_id, job.extra_data
            server.last_prompt_id = prompt_id
            self.running = (job.item_id, prompt_id, extra_data.get("client_id"))
            first_seq = self.seq + 1
            self._publish({"kind": "prompt", "item": (job.number, prompt_id, job.prompt, extra_data, job.outputs),
                           "files": collect_input_files(job.prompt)})
            self.lockstep.begin(prompt_id)
            try:
                executor.execute(job.prompt, prompt_id, extra_data, job.outputs)
            finally:
                outcome = self.lockstep.finish(bool(getattr(executor, "success", False)),
                                               _last_error_message(executor))
            success = bool(executor.success)
            messages = list(executor.status_messages)
            if success and outcome.code == ERROR:
                # A follower failed after rank 0's last agreement point (in the last node): rank 0 ran
                # clean, but the prompt did not.
                success = False
                messages.append(self._error_message(prompt_id, outcome, extra_data.get("client_id")))
            if self.running is not None:  # None when the abort path recorded this prompt already
                queue.task_done(job.item_id, executor.history_result,
                                status={"status_str": "success" if success else "error",
                                        "completed": success, "messages": messages})
            self.running = None
            for seq in range(first_seq, self.seq + 1):
                self.dm.retire(seq)
            self.dm.clear_failures(prompt_id)
            announce_done(server, job)
            if outcome.lost:
                self.abort("lost contact with a rank during the prompt", report=False)
                return
            if outcome.needs_cache_reset:
                executor.reset()  # see follower_loop: keep every rank's caches identical
            flags = queue.get_flags()
            if flags.get("unload_models") or flags.get("free_memory"):
                self._publish({"kind": "flags", "flags": dict(flags)})
            apply_memory_flags(flags, executor)

    def _error_message(self, prompt_id, outcome: Outcome, client_id) -> list:
        first = outcome.first_error() or {}
        data = {"prompt_id": prompt_id, "node_id": first.get("node_id"), "node_type": None, "executed": [],
                "exception_message": f"Rank {first.get('rank')} failed: {first.get('message')}",
                "exception_type": first.get("type") or "RemoteRankError",
                "traceback": (first.get("traceback") or "").splitlines(True), "current_inputs": {},
                "current_outputs": [], "timestamp": int(time.time() * 1000)}
        if self.server is not None:
            self.server.send_sync("execution_error", data, client_id)
        return ["execution_error", data]

    def abort(self, reason: str, report: bool = True) -> None:
        """A rank is gone: report the running prompt as failed, exit non-zero.

        The queue persists itself on every change (PromptQueue(persist_path=)), so recording the running
        prompt in history (task_done) is also what keeps it from being re-run after the restart.
        """
        with self._abort_lock:
            if self._aborting:
                return
            self._aborting = True
        log.error("Multi-rank group failed: %s. Rank 0 exits so torchrun --max-restarts can restart the "
                  "group; pending prompts are kept in the queue file.", reason)
        running = self.running
        self.running = None
        if report and running is not None and self.queue is not None:
            item_id, prompt_id, client_id = running
            data = {"prompt_id": prompt_id, "node_id": getattr(self.server, "last_node_id", None),
                    "node_type": None, "executed": [], "exception_message": reason,
                    "exception_type": "RemoteRankError", "traceback": [], "current_inputs": {},
                    "current_outputs": [], "timestamp": int(time.time() * 1000)}
            try:
                self.server.send_sync("execution_error", data, client_id)
                self.queue.task_done(item_id, {"outputs": {}, "meta": {}},
                                     status={"status_str": "error", "completed": False,
                                             "messages": [["execution_error", data]]})
            except Exception:  # reporting is best effort: the exit below must happen regardless
                log.exception("Could not record the failed prompt")
        time.sleep(0.5)  # let the event loop flush the WebSocket message before the process ends
        logging.shutdown()
        os._exit(1)


def queue_file(args) -> str:
    import folder_paths

    return args.taco_queue_file or os.path.join(folder_paths.get_user_directory(), "taco_queue.json")


def run(args, start_server, cache_settings=None) -> None:
    """Entry point for WORLD_SIZE > 1: validate the config, join the group, then serve or follow."""
    from comfy.taco_dit.core.config_manager import ConfigError, load_config
    from comfy.taco_dit.core.distributed_manager import init_distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = load_config(args, world_size=world_size)
    except ConfigError as e:
        log.error("TACO-DiT configuration refused: %s", e)
        sys.exit(2)
    if config.lockstep_only and not config.vae_parallel_on:
        log.info("TACO-DiT: %d ranks in pure lockstep (parallel strategies off)", world_size)
    elif config.lockstep_only:
        log.info("TACO-DiT: %d ranks sample in lockstep (sampling strategies off); VAE decodes split over "
                 "the ranks (vae_parallel)", world_size)
    else:
        log.info("TACO-DiT: %d ranks; parallel strategies chosen at sampling time (%s)", world_size,
                 config.describe())
    leader = Leader(None, None, args)
    rank = int(os.environ.get("RANK", "0"))

    def on_dead(ranks):
        if rank == 0:
            leader.abort(f"rank(s) {ranks} sent no heartbeat for {args.taco_follower_timeout:g} s")

    dm = init_distributed(cpu=args.cpu, follower_timeout=args.taco_follower_timeout, parallel_config=config,
                          on_dead=on_dead)
    lockstep = Lockstep(dm)
    install_step_agreement(lockstep)
    install_runtime(dm, config, lockstep)
    from comfy.taco_dit.core import model_wrapper

    model_wrapper.set_runtime(config)  # the sampler's parallel plan starts from this validated config
    if dm.rank != 0:
        cache = cache_settings(args) if cache_settings is not None else ("classic", {})
        code = follower_loop(args, dm, lockstep, cache=cache)
        if code == 0:
            dm.shutdown()
        logging.shutdown()
        os._exit(code)  # a follower never lingers on half-torn-down groups
    leader.dm, leader.lockstep = dm, lockstep
    FailureWatch(dm, args.taco_follower_timeout, leader.running_prompt_id, leader.abort).start()

    def on_sigterm(signum, frame):
        # torchrun stops every worker when one fails; record the running prompt before going.
        if leader.running is None:
            log.info("Rank 0 stopping (SIGTERM)")
            logging.shutdown()
            os._exit(0)
        threading.Thread(target=leader.abort, args=("the multi-rank group is stopping (SIGTERM)",),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)

    def executor_factory(server, cache_type, cache_args):
        import execution

        return execution.PromptExecutor(server, cache_type=cache_type, cache_args=cache_args, lockstep=lockstep)

    code = 1
    try:
        start_server(args, executor_factory=executor_factory, worker=leader.worker,
                     queue_kwargs={"persist_path": queue_file(args)})
        code = 0
    except KeyboardInterrupt:
        code = 0
    except SystemExit as e:  # keep the status the server exited with
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        log.exception("Rank 0 stopped on an error")
    finally:
        leader.stop_followers()
        dm.shutdown()
        # like the followers: never linger in interpreter teardown on a torn-down (or stuck) group
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
