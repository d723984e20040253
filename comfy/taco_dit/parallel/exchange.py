"""Equal-block all-to-all exchanges for Ulysses attention, over one of two transports.

- `NcclExchange`: the sender fills one local send buffer, then `all_to_all_single` moves it (NCCL on GPUs,
  gloo on CPUs). It can run asynchronously, so independent work overlaps it.
- `SymmetricExchange` (GPUs with peer access; see `transport` for where it is used): every rank's receive buffer lives in torch's
  symmetric memory, mapped into the address space of every rank of the group, so the sender's copies
  write its blocks straight into the peers' buffers over NVLink; one device-side barrier then says every
  block has arrived. There is no send buffer, no collective kernel and no host involvement.

Both give the same interface: `start(blocks)` sends `blocks[r]` to group rank r (or `start(write=fn)`, where
`fn(targets)` writes each rank's block into `targets[r]`: a list of the peers' buffers, or NCCL's whole
local `[P, *block]` send buffer) and returns a `Pending` whose `wait()` gives the
received `[P, *block]` tensor, block r from group rank r. Work queued between the two overlaps the exchange.
With `background=True` a symmetric exchange moves contiguous blocks with device-to-device memcpys on side
streams, one per destination: the GPUs' copy engines carry them, several at once, leaving every SM to the
overlapped work (an NCCL all-to-all occupies SMs of its own).

Reuse of a symmetric receive buffer: a peer writes into it as soon as it has passed the barrier of the
group's previous exchange. So a rank must have read one exchange's data before it enters the group's next
barrier. Ulysses does (the q/k/v exchange is read by the attention before the output goes back, the output
is read by the interleave, or where it arrived in head order (`start(interleave=True)`) by the layer's output
projection, before the next layer's q/k/v go out). When one exchange object is used twice
in a row, it adds a barrier before the writes, which makes the reuse safe in every order.
`TACO_A2A=auto|nccl|symm` chooses the transport (see `transport`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os

import torch

from comfy.ops import pitched_rows

_warned: set[str] = set()
_live: list = []  # every SymmetricExchange built, so release_all() can free their buffers before teardown


def release_all() -> None:
    """Free every symmetric-memory buffer before the process group goes (destroy_process_group): processes
    that left them to interpreter teardown hung at exit in our 4-GPU runs. The captured CUDA graphs go first
    (`cuda_graph.release_all_graphs`): they hold captured NCCL work and these buffers, and with them alive the
    4-GPU fork runs still waited out the teardown timeout. A no-op without either.

    No barrier: once this GPU has finished its work, every write a peer made into these buffers has landed
    (each exchange's barrier follows the writes), and this rank's own writes have too."""
    from comfy.taco_dit.utils.cuda_graph import release_all_graphs

    release_all_graphs()
    if not _live:
        return
    torch.cuda.synchronize()
    for ex in _live:
        ex.group._exchanges = {k: v for k, v in ex.group._exchanges.items() if v is not ex}
        if ex.group._last_exchange is ex:
            ex.group._last_exchange = None
        ex.handle = ex.peers = None
    _live.clear()
    _arenas.clear()
    gc.collect()
    torch.cuda.synchronize()


def enable_group(group_name: str) -> None:
    """torch's `enable_symm_mem_for_group`, which older releases need before a rendezvous on a group (newer
    ones deprecate it or have none)."""
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        try:
            enable(group_name)
        except Exception:  # noqa: BLE001 - already enabled, or not needed
            pass


MAX_SYMMETRIC = 8  # symmetric exchanges kept per group (one per message shape); later shapes use NCCL


def whole_host(group) -> bool:
    """`group` is every rank of the job, and they all run on this host (peer-mapped memory)."""
    import torch.distributed as dist

    if group is None or group.group is None or not dist.is_initialized():
        return False
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return group.size == world == local and torch.cuda.device_count() >= world


def _peer_access(n: int) -> bool:
    return all(torch.cuda.can_device_access_peer(i, j) for i in range(n) for j in range(n) if i != j)


def _world_on_host() -> bool:
    """Every rank of the job runs on this host, one GPU each (so all of them can map each other's memory)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    world = dist.get_world_size()
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world and torch.cuda.device_count() >= world


def transport(device: torch.device, group=None, measured: bool = False) -> str:
    """The all-to-all transport for `group`'s exchanges of tensors on `device`: "nccl", "symm" (symmetric
    memory of the group itself) or "arena" (a slice of the world's symmetric arena, for a sub-group).

    `TACO_A2A=auto` (default): symmetric memory only where it was measured faster and seen to work
    (`measured`: the caller's exchange is one of those, i.e. Ulysses over packed q/k/v, Flux's layout) on
    GPUs, with every rank of the job on one host, peer access between all GPUs, and fewer than
    MAX_SYMMETRIC message shapes so far. On 4 x H200: Flux Ulysses 4 at 1024² 42.3 against 44.1 ms with
    NCCL, at 2048² 191.8 against 196.6 ms, Ulysses 2 75.1 against 79.6 ms (benchmarks/RESULTS.md).
    A group that is the whole world gets buffers of its own. A smaller group (e.g. the Ulysses pairs of
    CFG 2 x Ulysses 2) never rendezvouses on its own: symmetric memory on such pairs hung in two 4-GPU Wan
    runs (fourth and fifth session). It takes slices of one world-wide allocation instead and signals only
    its members (`ArenaExchange`). Everything else uses NCCL. `TACO_A2A=nccl` always uses NCCL; `symm`
    asks for symmetric memory for every exchange where the hardware allows it, measured or not."""
    want = os.environ.get("TACO_A2A", "auto").strip().lower() or "auto"
    if want not in ("auto", "nccl", "symm"):
        raise ValueError(f"TACO_A2A={want!r} is not a transport; use TACO_A2A=auto, nccl or symm")
    if want == "nccl" or group is None or group.size < 2 or (want == "auto" and not measured):
        return "nccl"
    why = None
    if device.type != "cuda":
        why = f"it needs GPUs (tensors on {device.type})"
    elif not _world_on_host():
        why = "the job's ranks are not all on this host"
    elif sum(isinstance(e, SymmetricExchange) for e in group._exchanges.values()) >= MAX_SYMMETRIC:
        why = f"{MAX_SYMMETRIC} message shapes already hold symmetric buffers"
    else:
        try:
            import torch.distributed._symmetric_memory  # noqa: F401
        except ImportError:
            why = "this torch has no symmetric memory"
        else:
            if not _peer_access(torch.cuda.device_count()):
                why = "the GPUs have no peer access"
    if why is None:
        return "symm" if whole_host(group) else "arena"
    if want == "symm" and why not in _warned:
        _warned.add(why)
        logging.warning("TACO_A2A=symm: using NCCL's all-to-all because %s", why)
    return "nccl"


_memcpy2d_fn: list = []  # [cudaMemcpy2DAsync or None], looked up once


def _memcpy2d():
    """cudaMemcpy2DAsync of the CUDA runtime this process already loaded (torch's), or None where there is
    none to find (e.g. a runtime linked statically): callers then copy through a contiguous buffer.
    `TACO_CE_2D=0` turns it off."""
    if not _memcpy2d_fn:
        fn = None
        if os.environ.get("TACO_CE_2D", "1") != "0":
            try:
                with open("/proc/self/maps") as maps:
                    paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line and "/" in line})
                if paths:
                    fn = ctypes.CDLL(paths[0]).cudaMemcpy2DAsync
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
                    fn.restype = ctypes.c_int
            except (OSError, AttributeError) as e:
                logging.info("No cudaMemcpy2DAsync (%s): strided exchange blocks go through a contiguous copy", e)
                fn = None
        _memcpy2d_fn.append(fn)
    return _memcpy2d_fn[0]


def _copy2d(memcpy2d, stream, dst: torch.Tensor, dst_pitch: int, src: torch.Tensor, src_pitch: int, width: int,
            rows: int) -> None:
    """`rows` runs of `width` elements from `src` (runs `src_pitch` apart) to `dst` (`dst_pitch` apart), one
    cudaMemcpy2DAsync (`_memcpy2d()`) on `stream`: carried by a copy engine. Sizes in elements."""
    size = src.element_size()
    err = memcpy2d(dst.data_ptr(), dst_pitch * size, src.data_ptr(), src_pitch * size, width * size, rows, 3,
                   stream.cuda_stream if stream is not None else None)  # 3: cudaMemcpyDeviceToDevice
    if err:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}; set TACO_CE_2D=0")


_side_streams: dict = {}


def _side_stream(device: torch.device, lane: int = 0):
    """Side stream `lane` of `device` (one per destination, so the copies to different peers run at once)."""
    stream = _side_streams.get((device, lane))
    if stream is None:
        stream = _side_streams[(device, lane)] = torch.cuda.Stream(device=device)
    return stream


def _on_side_streams(device: torch.device, ranks, copy) -> list:
    """`copy(r, stream)` for each destination r of `ranks`, the i-th on side stream lane i after what the current
    stream queued so far, so the copies to different peers run at once on several copy engines instead of one
    after another. Returns the side streams (for `Pending`). Host tensors (tests): `copy(r, None)` in order."""
    if device.type != "cuda":
        for r in ranks:
            copy(r, None)
        return []
    main = torch.cuda.current_stream(device)
    streams = []
    for lane, r in enumerate(ranks):
        side = _side_stream(device, lane)
        side.wait_stream(main)
        copy(r, side)
        streams.append(side)
    return streams


def _plain_copy(stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) queued on `stream` (None: the current one); contiguous on both sides, it is a memcpy that a
    copy engine carries."""
    if stream is None:
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):
        dst.copy_(src)


class Pending:
    """An exchange in flight; `wait()` orders the current stream after it and returns what arrived."""

    def __init__(self, recv: torch.Tensor, work=None, streams=(), barrier=None, keep=None):
        self.recv, self.work, self.streams, self.barrier = recv, work, streams, barrier
        self.keep = keep  # the sent tensor, alive until the exchange is waited for
        # True where what arrives is [*lead, P, *tail] (SymmetricExchange.start(interleave=True)), not [P, *block]
        self.interleaved = False

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        for stream in self.streams:
            torch.cuda.current_stream(self.recv.device).wait_stream(stream)
        if self.barrier is not None:
            self.barrier()
        self.keep = None
        return self.recv


class NcclExchange:
    """All-to-all through the process group (NCCL on GPUs, gloo on CPUs), asynchronous."""

    def __init__(self, group, block_shape: tuple, dtype: torch.dtype, device: torch.device):
        self.group = group
        self.shape = (group.size, *block_shape)
        self.dtype, self.device = dtype, device

    def start(self, blocks: torch.Tensor | None = None, *, write=None, background: bool = False,
              interleave: bool = False) -> Pending:
        """`interleave` is a wish only symmetric exchanges grant: what arrives here is always [P, *block]."""
        if blocks is None:
            blocks = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            write(blocks)
        send = blocks if blocks.is_contiguous() else blocks.contiguous()  # sent as it is when laid out already
        recv = torch.empty_like(send)
        work = self.group.all_to_all_single(recv, send, async_op=True)
        return Pending(recv, work=work, keep=send)


class SymmetricExchange:
    """All-to-all by direct writes into the peers' symmetric-memory buffers, then a device barrier.
    Building one is collective over the group (rendezvous): every rank must build it at the same point."""

    def __init__(self, group, block_shape: tuple, dtype: torch.dtype, device: torch.device, channel: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group
        p = group.size
        shape = (p, *block_shape)
        name = group.group.group_name
        enable_group(name)
        buf = symm_mem.empty(math.prod(shape), dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(buf, name)
        self.peers = [self.handle.get_buffer(r, shape, dtype) for r in range(p)]
        self.rank = group.rank_in_group
        self.channel = channel
        _live.append(self)

    def _barrier(self) -> None:
        self.handle.barrier(channel=self.channel)

    def start(self, blocks: torch.Tensor | None = None, *, write=None, background: bool = False,
              interleave: bool = False) -> Pending:
        if self.group._last_exchange is self:
            # this buffer's previous contents may still be unread by a peer: wait for everyone first
            self._barrier()
        self.group._last_exchange = self
        if interleave and blocks is not None and background:
            pending = self._start_interleaved(blocks)
            if pending is not None:
                return pending
        targets = [self.peers[r][self.rank] for r in range(self.group.size)]
        recv = self.peers[self.rank]
        if blocks is None:
            write(targets)  # the caller's copies write straight into the peers' buffers
            return Pending(recv, barrier=self._barrier)
        if not background:
            for r, target in enumerate(targets):
                target.copy_(blocks[r])
            return Pending(recv, barrier=self._barrier)
        # strided blocks that are 2-D pitched regions (Flux's packed q/k/v) go by 2-D memcpy straight from where
        # they lie; other strided blocks through one contiguous copy first
        pitched = _memcpy2d() if not blocks.is_contiguous() else None
        shape = pitched and pitched_rows(blocks[0])
        if pitched is None or shape is None or any(pitched_rows(blocks[r]) != shape for r in range(len(targets))):
            pitched, src = None, (blocks if blocks.is_contiguous() else blocks.contiguous())
        else:
            src = blocks
        def copy(r, side):
            if pitched is None:
                _plain_copy(side, targets[r], src[r])
            else:
                rows, width, pitch = shape
                _copy2d(pitched, side, targets[r], width, src[r], pitch, width, rows)

        # the peers' blocks first, this rank's own last
        streams = _on_side_streams(recv.device, sorted(range(len(targets)), key=lambda r: r == self.rank), copy)
        return Pending(recv, streams=streams, barrier=self._barrier, keep=src)

    def _start_interleaved(self, blocks: torch.Tensor) -> Pending | None:
        """`start(blocks, background=True, interleave=True)`: block r ([*lead, hc, D]) lands in peer r's buffer
        laid out as [*lead, P, hc, D], in this rank's slot of the P axis, by one 2-D memcpy per destination
        (copy engines). So what arrives is already [*lead, P * hc, D]: for returning Ulysses output, this
        rank's tokens with every head in order, which the next GEMM reads as it is, with no interleaving copy
        on the SMs (0.26 ms per layer for Wan 14B under Ulysses 2, call s25). None where the blocks cannot go
        that way (no 2-D memcpy, or rows that are not one run each): the caller then sends them as blocks."""
        memcpy2d = _memcpy2d()
        p = self.group.size
        block = tuple(blocks.shape[1:])
        if memcpy2d is None or len(block) < 3:
            return None
        lead, tail = block[:-2], block[-2:]
        rows, width = math.prod(lead), tail[0] * tail[1]
        src_rows = []  # each block's row pitch
        for r in range(p):
            src = blocks[r]
            if src.is_contiguous():
                src_rows.append(width)
                continue
            shape = pitched_rows(src)
            if shape is None or shape[:2] != (rows, width):
                return None
            src_rows.append(shape[2])
        def copy(r, side):
            dst = self.peers[r].view(*lead, p, *tail)[..., self.rank, :, :]
            _copy2d(memcpy2d, side, dst, p * width, blocks[r], src_rows[r], width, rows)

        streams = _on_side_streams(blocks.device, sorted(range(p), key=lambda r: r == self.rank), copy)  # peers first
        recv = self.peers[self.rank].view(*lead, p, *tail)
        pending = Pending(recv, streams=streams, barrier=self._barrier, keep=blocks)
        pending.interleaved = True
        return pending

    def own_block(self) -> torch.Tensor:
        """This rank's block of its own receive buffer. A sender that writes its data here first (e.g. a model
        computing its q/k/v straight into it) gathers with `start_gather`, with no copy of its own part."""
        return self.peers[self.rank][self.rank]

    def start_gather(self, region=None) -> Pending:
        """All-gather in place: `region(block)` (a view; default the whole block) of `own_block()`, already
        written, goes into the same region of this rank's block of every peer's buffer, by copy engine (one
        memcpy, 2-D where the region is pitched, per peer, each on its own side stream; splitting it over two
        streams measured no faster, call s34). `wait()` gives the whole `[P, *block]` buffer: block r from
        group rank r (this rank's own where it wrote it)."""
        if self.group._last_exchange is self:
            self._barrier()  # reuse rule (module docstring)
        self.group._last_exchange = self
        region = region or (lambda block: block)
        src = region(self.own_block())
        shape = pitched_rows(src)
        copy2d = _memcpy2d() if shape is not None else None
        def copy(r, side):
            dst = region(self.peers[r][self.rank])
            if copy2d is None or side is None:  # contiguous (a memcpy), or host memory (tests)
                _plain_copy(side, dst, src)
            else:
                rows, width, pitch = shape
                _copy2d(copy2d, side, dst, pitch, src, pitch, width, rows)

        streams = _on_side_streams(src.device, [r for r in range(self.group.size) if r != self.rank], copy)
        return Pending(self.peers[self.rank], streams=streams, barrier=self._barrier)


class ArenaFull(RuntimeError):
    """The world's symmetric arena has no room left for this group's exchange (the caller uses NCCL's)."""


class _Arena:
    """One symmetric-memory allocation over the whole world, per device, carved into the receive buffers of
    sub-group exchanges: the only rendezvous is the world's, which the 4-GPU runs showed working.

    Its size is agreed (a MAX all-reduce over the world) when the first sub-group exchange asks for it:
    `TACO_SYMM_ARENA_MB`, else 16 x that exchange's receive buffer. Every rank of the world reaches that
    point together, since every rank runs the same model, layer for layer; only the shapes may differ between
    groups (e.g. CFG 2's positive and negative prompts), hence the MAX. Afterwards each group takes slices
    by its own count, which its members keep alike (they run the same exchanges in the same order), so no
    further collective is needed; when the arena is full, the group's further shapes go by NCCL."""

    ALIGN = 512

    def __init__(self, device: torch.device, need: int):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        mb = os.environ.get("TACO_SYMM_ARENA_MB", "").strip()
        want = torch.tensor([int(mb) << 20 if mb else 16 * need], dtype=torch.int64, device=device)
        dist.all_reduce(want, op=dist.ReduceOp.MAX)
        self.nbytes = int(want.item())
        name = dist.group.WORLD.group_name
        enable_group(name)
        self.buf = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buf, name)
        self.used: dict[tuple, int] = {}  # group ranks -> bytes taken by that group
        logging.info("Symmetric arena of %.0f MiB for sub-group exchanges (TACO_SYMM_ARENA_MB sets it)",
                     self.nbytes / 2**20)

    def take(self, ranks: tuple, nbytes: int) -> int:
        """The byte offset of `nbytes` for group `ranks`. Groups of different ranks may overlap: each rank
        belongs to one group of a kind, and only that group's members write into its slices."""
        start = -(-self.used.get(ranks, 0) // self.ALIGN) * self.ALIGN
        if start + nbytes > self.nbytes:
            raise ArenaFull(f"{self.nbytes / 2**20:.0f} MiB arena full")
        self.used[ranks] = start + nbytes
        return start


_arenas: dict = {}  # device -> _Arena


class ArenaExchange(SymmetricExchange):
    """A symmetric exchange for a sub-group of the world: its buffers are slices of the world's arena and its
    barrier signals the group's members only (put_signal / wait_signal on the world handle). Building one
    is collective over the world only when the arena does not exist yet."""

    def __init__(self, group, block_shape: tuple, dtype: torch.dtype, device: torch.device, channel: int):
        self.group = group
        shape = (group.size, *block_shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        arena = _arenas.get(device)
        if arena is None:
            arena = _arenas[device] = _Arena(device, nbytes)
        offset = arena.take(tuple(group.ranks), nbytes)
        self.handle = arena.handle
        elem = offset // torch.empty((), dtype=dtype).element_size()
        self.peers = [self.handle.get_buffer(w, shape, dtype, elem) for w in group.ranks]
        self.rank = group.rank_in_group
        self.others = [w for i, w in enumerate(group.ranks) if i != self.rank]
        self.channel = channel
        _live.append(self)

    def _barrier(self) -> None:
        for w in self.others:
            self.handle.put_signal(w, channel=self.channel)
        for w in self.others:
            self.handle.wait_signal(w, channel=self.channel)
