"""Process-group set-up and the control channel of a multi-rank job.

Owns: initialising `torch.distributed` (NCCL on GPUs, gloo on CPU), the CPU (gloo) control group with
its own timeout, the key-value store channel that hands work to followers, the heartbeat that detects a
dead rank within `--taco-follower-timeout` seconds (long before NCCL's 10-minute watchdog), the
agreement primitive (an all_reduce(MAX) of a status code) and, on CUDA only, xDiT's (xfuser) parallel
environment. One `DistributedManager` is built per process by `init_distributed` and passed explicitly.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Agreement codes: the MAX over ranks wins, so the most severe outcome is what everyone sees.
GO = 0
INTERRUPT = 1
ERROR = 2


class RankLostError(RuntimeError):
    """A rank stopped answering (killed, crashed or hung); the group must be restarted."""


def _store_key_prefix() -> str:
    # Under torchrun --max-restarts the agent's store may outlive a worker group; keys from an earlier
    # attempt (work items, heartbeats) must not be read by the next one.
    return f"taco/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


@dataclass
class DistributedManager:
    """This process's view of the job: rank, device, control group, store channel and heartbeat."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    control_group: object | None
    store: object | None
    follower_timeout: float
    collective_timeout: float
    store_address: tuple[str, int] | None = None
    heartbeat: Heartbeat | None = field(default=None, repr=False)
    _watch_store: object | None = field(default=None, repr=False)  # the work watcher's own store connection
    _watcher: threading.Thread | None = field(default=None, repr=False)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # -- agreement --------------------------------------------------------------------------------------

    def agree(self, code: int) -> int:
        """All ranks contribute a status code; all get the maximum. Raises RankLostError on a broken group."""
        if self.world_size == 1:
            return code
        t = torch.tensor([code], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        except RuntimeError as e:  # gloo reports a closed peer or its timeout as RuntimeError
            raise RankLostError(self._lost_message(e)) from e
        return int(t.item())

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.control_group)
        except RuntimeError as e:
            raise RankLostError(self._lost_message(e)) from e
        return out

    def band_share(self):
        """The ranks as a png_writer.BandShare (SaveImage encodes each PNG on every rank's CPUs together);
        None in a single process."""
        if self.world_size == 1:
            return None
        from comfy.png_writer import BandShare

        return BandShare(self.rank, self.world_size, self.all_gather_object)

    def _lost_message(self, e: Exception) -> str:
        dead = self.heartbeat.dead_ranks() if self.heartbeat is not None else []
        who = f"rank(s) {dead}" if dead else "another rank"
        return f"Lost contact with {who} during a control collective: {e}"

    # -- work channel (store) ---------------------------------------------------------------------------

    def publish(self, seq: int, obj) -> None:
        """Rank 0: make work item `seq` available to every follower."""
        self.store.set(f"work/{seq}", pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def retire(self, seq: int) -> None:
        """Rank 0: drop work item `seq` once every rank is past it (frees the store's memory)."""
        try:
            self.store.delete_key(f"work/{seq}")
        except RuntimeError:  # the store is best-effort cleanup only; a missing key is fine
            log.debug("could not delete work/%s", seq)

    def receive(self, seq: int, poll: float = 0.02, stop: Callable[[], bool] | None = None):
        """Follower: wait (as long as it takes, while rank 0 is alive) for work item `seq`.

        A watcher thread blocks in the store's `wait` for the item's key on a connection of its own, so the
        follower starts within a store round trip of rank 0 publishing (polling every `poll` s added up to
        that much to every prompt); the rank-0 liveness and `stop` checks run every 0.25 s meanwhile.
        Without a store address (no second connection possible), or once the watcher has ended without the
        item, it polls every `poll` s."""
        key = f"work/{seq}"
        arrived = self._watch(key)
        while True:
            try:
                if self.store.check([key]):
                    return pickle.loads(self.store.get(key))
            except RuntimeError as e:  # DistStoreError: the store's host (rank 0 or the agent) is gone
                raise RankLostError(f"The job's store is unreachable ({e}); rank 0 is gone, so this follower "
                                    "stops too") from e
            if self.heartbeat is not None and 0 in self.heartbeat.dead_ranks():
                raise RankLostError(f"Rank 0 has sent no heartbeat for {self.follower_timeout:.0f} s; "
                                    "it is gone, so this follower stops too")
            if stop is not None and stop():
                return None
            if arrived is None:
                time.sleep(poll)
            elif arrived.is_set():
                arrived = None  # the watcher ended without the key (a day passed, or its connection failed): poll
            else:
                arrived.wait(0.25)

    def _watch(self, key: str) -> threading.Event | None:
        """An event set once `key` exists in the store (or the watcher's wait ended otherwise), or None
        where no watcher can run."""
        if self.store_address is None:
            return None
        if self._watcher is not None:
            self._watcher.join(1.0)  # the previous item's watcher: its key exists, so it returns at once
            if self._watcher.is_alive():
                return None
        try:
            if self._watch_store is None:
                host, port = self.store_address
                self._watch_store = dist.PrefixStore(_store_key_prefix(), _connect_store(
                    host, port, self.world_size, self.collective_timeout))
        except RuntimeError as e:  # cannot open a second connection: poll instead
            log.debug("no work watcher (%s); polling", e)
            self.store_address = None
            return None
        event, store = threading.Event(), self._watch_store

        def watch():
            try:
                store.wait([key], timedelta(days=1))
            except RuntimeError:  # the store is gone or a day passed: receive's own checks decide
                pass
            event.set()

        self._watcher = threading.Thread(target=watch, name="taco-work-watcher", daemon=True)
        self._watcher.start()
        return event

    # -- failure notices (outside the collectives) -------------------------------------------------------

    def post_failure(self, tag: str, info: dict) -> None:
        """Announce through the store that this rank failed in `tag` (a prompt id). A rank stuck inside a
        compute collective never reaches the next agreement round; the notice lets rank 0 notice that."""
        if self.store is None:
            return
        try:
            self.store.set(f"failure/{tag}/{self.rank}", pickle.dumps(info))
        except RuntimeError:  # a notice is best effort; the agreement round still follows
            log.debug("could not post failure notice", exc_info=True)

    def failures(self, tag: str) -> dict[int, dict]:
        """Failure notices posted for `tag`, by rank."""
        if self.store is None:
            return {}
        out = {}
        for r in range(self.world_size):
            key = f"failure/{tag}/{r}"
            if self.store.check([key]):
                out[r] = pickle.loads(self.store.get(key))
        return out

    def clear_failures(self, tag: str) -> None:
        if self.store is None:
            return
        for r in range(self.world_size):
            try:
                self.store.delete_key(f"failure/{tag}/{r}")
            except RuntimeError:
                log.debug("could not delete failure notice", exc_info=True)

    # -- lifetime -----------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 20.0) -> bool:
        """Tear the process group down (symmetric-memory buffers first), giving up after `timeout` seconds:
        a teardown that blocks (a peer already gone, or the symmetric-memory teardown hang we saw on 4 GPUs,
        see benchmarks/RESULTS.md) must not keep the process alive. Returns whether it finished; callers
        exit with os._exit either way, so nothing waits on a half-torn-down group."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if not dist.is_initialized():
            return True
        done = threading.Event()

        def teardown():
            try:
                from comfy.taco_dit.parallel.exchange import release_all

                release_all()  # the captured CUDA graphs, then the symmetric buffers
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a lost rank can fail; the process is exiting
                log.debug("destroy_process_group failed", exc_info=True)
            finally:
                done.set()

        threading.Thread(target=teardown, name="taco-teardown", daemon=True).start()
        if done.wait(timeout):
            return True
        log.warning("TACO-DiT: the process group did not shut down within %.0f s; exiting without waiting "
                    "for it", timeout)
        return False


class Heartbeat:
    """Each rank bumps a counter in the store; watchers declare a rank dead when its counter stops.

    A counter rather than a timestamp, so clocks on different nodes need not agree. Runs on its own
    store connection so a blocking store call elsewhere cannot delay it.
    """

    def __init__(self, store, rank: int, world_size: int, timeout: float, watch: list[int],
                 on_dead: Callable[[list[int]], None] | None = None):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.interval = max(min(timeout / 6.0, 2.0), 0.05)
        self.watch = watch
        self.on_dead = on_dead
        now = time.monotonic()
        # A rank that has not started beating yet gets the same grace as one that stopped.
        self._seen: dict[int, tuple[int, float]] = {r: (-1, now) for r in watch}
        self._lock = threading.Lock()
        self._dead: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"taco-heartbeat-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def dead_ranks(self) -> list[int]:
        with self._lock:
            return list(self._dead)

    def _run(self) -> None:
        reported = False
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                now = time.monotonic()
                dead = []
                for r in self.watch:
                    value = self.store.add(f"hb/{r}", 0)
                    last, since = self._seen[r]
                    if value != last:
                        self._seen[r] = (value, now)
                    elif now - since > self.timeout:
                        dead.append(r)
            except (RuntimeError, OSError) as e:  # the store's host (rank 0 or the agent) is gone
                log.error("Heartbeat store unreachable: %s", e)
                dead = [0] if self.rank != 0 else [r for r in self.watch]
            with self._lock:
                self._dead = dead
            if dead and not reported:
                reported = True
                log.error("No heartbeat from rank(s) %s for more than %.1f s", dead, self.timeout)
                if self.on_dead is not None:
                    self.on_dead(dead)


def _connect_store(host: str, port: int, world_size: int, timeout: float):
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


def init_distributed(cpu: bool = False, follower_timeout: float = 60.0, collective_timeout: float | None = None,
                     parallel_config=None, start_heartbeat: bool = True,
                     on_dead: Callable[[list[int]], None] | None = None) -> DistributedManager:
    """Join the job described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Collective: every rank calls it. On CUDA also sets up xfuser's groups (see `_init_xfuser`).
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = not cpu and torch.cuda.is_available()
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    # The control group must outlast the slowest legitimate gap between two agreement points (one
    # rank still loading a model while another waits); death is the heartbeat's job, not this.
    if collective_timeout is None:
        collective_timeout = max(10.0 * follower_timeout, 600.0)
    if world_size == 1:
        return DistributedManager(rank, 1, local_rank, device, backend, None, None, follower_timeout,
                                  collective_timeout)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set: start the ranks with "
                               "torchrun --nproc_per_node=N main.py ...")
    if use_cuda:
        torch.cuda.set_device(device)
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                       timeout=timedelta(seconds=collective_timeout)))
    prefix = _store_key_prefix()
    # torchrun's agent store outlives a restarted group: without the per-attempt prefix the new group's
    # gloo/NCCL bootstrap would read the dead group's addresses.
    dist.init_process_group(backend, store=dist.PrefixStore(prefix + "pg/", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=collective_timeout))
    # A separate gloo group even on CPU: control traffic must never queue behind (or share a timeout
    # with) the compute collectives, and on GPUs it must not touch NCCL at all.
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    manager = DistributedManager(rank, world_size, local_rank, device, backend, control,
                                 dist.PrefixStore(prefix, store), follower_timeout, collective_timeout,
                                 store_address=(host, port))
    if start_heartbeat:
        hb_store = dist.PrefixStore(prefix, _connect_store(host, port, world_size, collective_timeout))
        watch = list(range(1, world_size)) if rank == 0 else [0]
        manager.heartbeat = Heartbeat(hb_store, rank, world_size, follower_timeout, watch, on_dead).start()
    if use_cuda:
        _init_xfuser(parallel_config, rank, world_size, local_rank)
    log.info("Rank %d of %d on %s (backend %s, control group gloo, heartbeat timeout %.0f s)",
             rank, world_size, device, backend, follower_timeout)
    return manager


def _init_xfuser(parallel_config, rank: int, world_size: int, local_rank: int) -> bool:
    """Set up xDiT's environment on the already-initialised default group (CUDA only).

    xfuser cannot be imported without a GPU, hence this branch runs only on CUDA; lockstep needs none of
    it, so a missing xfuser is a warning, not an error.
    """
    try:
        import yunchang.ring.utils as ring_utils

        # xfuser 0.6/0.7 import `update_npu_out` (NPU-only code) that yunchang 0.6.4 lacks; without
        # this name, importing xfuser fails on CUDA machines (xdit-notes.md). It is never called there.
        if not hasattr(ring_utils, "update_npu_out"):
            def update_npu_out(*_a, **_k):
                raise NotImplementedError("NPU ring attention is not supported by TACO-DiT")
            ring_utils.update_npu_out = update_npu_out
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
    except ImportError as e:
        log.warning("xfuser is not importable (%s); GPU sequence parallelism will use TACO-DiT's own "
                    "torch.distributed path. Install requirements_taco_dit.txt for xDiT.", e)
        return False
    cfg = sp = ulysses = ring = 1
    if parallel_config is not None and not parallel_config.lockstep_only:
        cfg = parallel_config.cfg_degree if isinstance(parallel_config.cfg_degree, int) else 1
        ulysses = parallel_config.ulysses_degree if isinstance(parallel_config.ulysses_degree, int) else 1
        ring = parallel_config.ring_degree if isinstance(parallel_config.ring_degree, int) else 1
        sp = ulysses * ring
    dp = world_size // (cfg * sp)
    init_distributed_environment(world_size=world_size, rank=rank, local_rank=local_rank, backend="nccl")
    initialize_model_parallel(data_parallel_degree=dp, classifier_free_guidance_degree=cfg,
                              sequence_parallel_degree=sp, ulysses_degree=ulysses, ring_degree=ring)
    log.info("xfuser groups: dp=%d cfg=%d ulysses=%d ring=%d", dp, cfg, ulysses, ring)
    return True
