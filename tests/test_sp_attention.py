"""Sequence-parallel attention over gloo equals full attention (fp32, CPU).

Tolerance: the distributed result reorders the softmax sums (blockwise log-sum-exp merging, keys in
another order), so it matches full attention to fp32 rounding, not bit for bit; 1e-5 absolute on O(1)
values is far below any real difference and far above fp32 noise (~1e-7).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sp_attention import usp_attention
from tests.parallel_helpers import run_on_ranks


def _inputs(seq: int, heads: int = 4, dim: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3))
    return q, k, v


def _worker(rank, world, ulysses, ring, seq, pad, batch=2, chunks=1, packed=False, ring_mode="auto", calls=1):
    os.environ["TACO_ULYSSES_CHUNKS"] = str(chunks)
    os.environ["TACO_RING"] = ring_mode
    dims = MeshDims(world_size=world, ulysses=ulysses, ring=ring)
    mesh = ParallelMesh(dims)
    q, k, v = _inputs(seq, batch=batch)
    p = dims.sp
    padded = seq + pad
    keep = torch.ones(padded, dtype=torch.bool)
    if pad:
        keep[seq:] = False
        # padding values are large on purpose: if they leaked in as keys the result would be far off
        q, k, v = (torch.cat([t, torch.full((batch, t.shape[1], pad, t.shape[3]), 50.0)], dim=2) for t in (q, k, v))
    chunk = padded // p
    idx = mesh.sp.rank_in_group
    local = [t[:, :, idx * chunk:(idx + 1) * chunk] for t in (q, k, v)]
    if packed:  # q/k/v as views of one [B, S, 3, H, D] buffer, as the models' qkv_rope gives them
        buf = torch.stack([t.transpose(1, 2) for t in local], dim=2).contiguous()
        local = list(buf.permute(2, 0, 3, 1, 4).unbind(0))
    for _ in range(calls):  # repeated calls alternate the gathered ring's two exchange buffers
        out = usp_attention(*local, mesh.ulysses, mesh.ring, kv_keep_global=keep if pad else None)
    return idx, out


@pytest.mark.parametrize("world,ulysses,ring,seq,pad", [
    (2, 2, 1, 16, 0),
    (2, 1, 2, 16, 0),
    (2, 2, 1, 15, 1),
    (2, 1, 2, 13, 3),
    (4, 2, 2, 29, 3),
])
def test_usp_matches_full_attention(world, ulysses, ring, seq, pad):
    q, k, v = _inputs(seq)
    ref = F.scaled_dot_product_attention(q, k, v)
    results = run_on_ranks(world, _worker, ulysses, ring, seq, pad)
    out = torch.cat([o for _, o in sorted(results, key=lambda r: r[0])], dim=2)[:, :, :seq]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world,ulysses,ring,seq,pad,batch,chunks,packed", [
    (2, 2, 1, 16, 0, 1, 1, False),  # batch 1: the received buffer is used as packed q/k/v views, no copy
    (2, 2, 1, 15, 1, 1, 2, False),  # exchanges pipelined over two head groups (TACO_ULYSSES_CHUNKS=2)
    (2, 2, 1, 16, 0, 2, 2, False),
    (4, 2, 2, 29, 3, 1, 2, False),
    (2, 2, 1, 15, 1, 1, 1, True),   # q/k/v views of one packed buffer: sent with one copy
    (4, 4, 1, 30, 2, 2, 1, True),
    (4, 2, 2, 29, 3, 1, 2, True),
])
def test_ulysses_layouts_and_pipelining_match_full_attention(world, ulysses, ring, seq, pad, batch, chunks, packed):
    q, k, v = _inputs(seq, batch=batch)
    ref = F.scaled_dot_product_attention(q, k, v)
    results = run_on_ranks(world, _worker, ulysses, ring, seq, pad, batch, chunks, packed)
    out = torch.cat([o for _, o in sorted(results, key=lambda r: r[0])], dim=2)[:, :, :seq]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world,ring,seq,pad,batch,packed,mode", [
    (2, 2, 16, 0, 1, True, "gather"),   # Flux's case: k/v sent straight from the packed q/k/v buffer
    (2, 2, 13, 3, 1, True, "gather"),   # padding keys left out of the gathered keys
    (2, 2, 13, 3, 2, False, "gather"),
    (4, 4, 29, 3, 1, True, "gather"),
    (4, 4, 29, 3, 2, False, "rotate"),  # TACO_RING=rotate: blocks passed round, log-sum-exp merged
])
def test_ring_modes_match_full_attention(world, ring, seq, pad, batch, packed, mode):
    q, k, v = _inputs(seq, batch=batch)
    ref = F.scaled_dot_product_attention(q, k, v)
    results = run_on_ranks(world, _worker, 1, ring, seq, pad, batch, 1, packed, mode, 3)
    out = torch.cat([o for _, o in sorted(results, key=lambda r: r[0])], dim=2)[:, :, :seq]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ring_mode_setting(monkeypatch):
    from comfy.taco_dit.parallel.sp_attention import ring_mode

    for value, want in (("", "gather"), ("auto", "gather"), ("gather", "gather"), ("rotate", "rotate")):
        monkeypatch.setenv("TACO_RING", value)
        assert ring_mode() == want
    monkeypatch.setenv("TACO_RING", "spiral")
    with pytest.raises(ValueError, match="TACO_RING=auto, gather or rotate"):
        ring_mode()


def test_ulysses_return_setting(monkeypatch):
    from comfy.taco_dit.parallel.sp_attention import _return_interleaved

    for value, want in (("", True), ("slots", True), ("blocks", False)):
        monkeypatch.setenv("TACO_ULYSSES_RETURN", value)
        assert _return_interleaved() is want
    monkeypatch.setenv("TACO_ULYSSES_RETURN", "heads")
    with pytest.raises(ValueError, match="use slots or blocks"):
        _return_interleaved()


def _deferred_worker(rank, world, ulysses, ring, seq, pad, batch, chunks=1):
    """q as a tensor, k and v deferred (callables), as Wan's self-attention passes them; records the order of
    exchanges started and deferred inputs computed."""
    os.environ["TACO_ULYSSES_CHUNKS"] = str(chunks)
    dims = MeshDims(world_size=world, ulysses=ulysses, ring=ring)
    mesh = ParallelMesh(dims)
    q, k, v = _inputs(seq, batch=batch)
    padded = seq + pad
    keep = torch.ones(padded, dtype=torch.bool)
    if pad:
        keep[seq:] = False
        q, k, v = (torch.cat([t, torch.full((batch, t.shape[1], pad, t.shape[3]), 50.0)], dim=2) for t in (q, k, v))
    chunk = padded // dims.sp
    idx = mesh.sp.rank_in_group
    lq, lk, lv = (t[:, :, idx * chunk:(idx + 1) * chunk] for t in (q, k, v))
    events = []
    exchange = mesh.ulysses.exchange

    def recording_exchange(name, *args, **kwargs):
        events.append(f"exchange {name}")
        return exchange(name, *args, **kwargs)

    mesh.ulysses.exchange = recording_exchange

    def deferred(name, t):
        def compute():
            events.append(f"compute {name}")
            return t
        return compute

    out = usp_attention(lq, deferred("k", lk), deferred("v", lv), mesh.ulysses, mesh.ring,
                        kv_keep_global=keep if pad else None)
    return idx, out, events


@pytest.mark.parametrize("world,ulysses,ring,seq,pad,batch,chunks", [
    (2, 2, 1, 16, 0, 1, 1),
    (2, 2, 1, 15, 1, 2, 1),
    (4, 2, 2, 29, 3, 1, 1),
    (4, 4, 1, 30, 2, 1, 1),
    (2, 2, 1, 15, 1, 1, 2),  # two head groups: group 0's attention needs only group 0's q/k/v
    (4, 2, 2, 29, 3, 2, 2),
])
def test_deferred_k_and_v_are_computed_while_q_is_exchanged(world, ulysses, ring, seq, pad, batch, chunks):
    q, k, v = _inputs(seq, batch=batch)
    ref = F.scaled_dot_product_attention(q, k, v)
    results = sorted(run_on_ranks(world, _deferred_worker, ulysses, ring, seq, pad, batch, chunks),
                     key=lambda r: r[0])
    out = torch.cat([o for _, o, _ in results], dim=2)[:, :, :seq]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    groups = [str(c) for c in range(chunks)] if chunks > 1 else [""]
    expected = [f"exchange ulysses_q{c}" for c in groups]
    for name in ("k", "v"):
        expected += [f"compute {name}"] + [f"exchange ulysses_{name}{c}" for c in groups]
    expected += [f"exchange ulysses_out{c}" for c in range(chunks)]
    for _, _, events in results:
        assert events == expected


def test_deferred_inputs_are_computed_first_without_an_override_that_takes_them():
    from comfy.ldm.modules.attention import OVERRIDE_KEY, optimized_attention

    q, k, v = _inputs(8, batch=1)
    ref = F.scaled_dot_product_attention(q, k, v)
    seen = []

    def plain_override(default_fn, q, k, v, heads, **kwargs):
        seen.append((torch.is_tensor(k), torch.is_tensor(v)))
        return default_fn(q, k, v, heads, **kwargs)

    kw = dict(skip_reshape=True, skip_output_reshape=True)
    out = optimized_attention(q, lambda: k, lambda: v, 4, transformer_options={OVERRIDE_KEY: plain_override}, **kw)
    assert seen == [(True, True)]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(optimized_attention(q, lambda: k, lambda: v, 4, **kw), ref)


def test_mesh_layout_rules():
    dims = MeshDims(world_size=8, cfg=2, ring=2, ulysses=2)
    g = dims.groups()
    assert g["ulysses"][:2] == [[0, 1], [2, 3]]  # Ulysses ranks adjacent
    assert g["ring"][0] == [0, 2]
    assert g["sp"][0] == [0, 1, 2, 3]
    assert g["cfg"][0] == [0, 4]
    assert sorted(r for grp in g["cfg"] for r in grp) == list(range(8))
    with pytest.raises(ValueError, match="multiply to 6 but there are 8 ranks"):
        MeshDims(world_size=8, cfg=2, ulysses=3)
    with pytest.raises(ValueError, match="CFG parallel degree must be 1 or 2"):
        MeshDims(world_size=4, cfg=4)


def test_ulysses_degree_must_divide_heads():
    class One:
        size = 3
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        usp_attention(q, q, q, One(), One())


def _side_work_worker(rank, world, ring=False):
    os.environ["TACO_RING"] = "gather"
    dims = MeshDims(world_size=world, ring=world) if ring else MeshDims(world_size=world, ulysses=world)
    mesh = ParallelMesh(dims)
    q, k, v = _inputs(16, batch=1)
    chunk = 16 // world
    local = [t[:, :, rank * chunk:(rank + 1) * chunk] for t in (q, k, v)]
    calls = []
    out = usp_attention(*local, mesh.ulysses, mesh.ring,
                        side_work=(lambda: calls.append("before"), lambda: calls.append("after")))
    return rank, out, calls


@pytest.mark.parametrize("ring", [False, True])
def test_side_work_runs_once_each_around_the_exchanges(ring):
    q, k, v = _inputs(16, batch=1)
    ref = F.scaled_dot_product_attention(q, k, v)
    results = sorted(run_on_ranks(2, _side_work_worker, ring), key=lambda r: r[0])
    torch.testing.assert_close(torch.cat([o for _, o, _ in results], dim=2), ref, atol=1e-5, rtol=1e-5)
    assert all(calls == ["before", "after"] for _, _, calls in results)


def test_side_work_runs_first_for_overrides_that_do_not_take_it():
    from comfy.ldm.modules.attention import OVERRIDE_KEY, optimized_attention

    order = []

    def plain_override(default_fn, q, k, v, heads, **kwargs):
        assert "side_work" not in kwargs
        order.append("attention")
        return default_fn(q, k, v, heads, **kwargs)

    q, k, v = _inputs(8, batch=1)
    out = optimized_attention(q, k, v, 4, skip_reshape=True, skip_output_reshape=True,
                              transformer_options={OVERRIDE_KEY: plain_override},
                              side_work=(lambda: order.append("a"), lambda: order.append("b")))
    assert order == ["a", "b", "attention"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    order.clear()
    optimized_attention(q, k, v, 4, skip_reshape=True, side_work=(lambda: order.append("a"),))
    assert order == ["a"]


def test_exchange_transport_choice(monkeypatch):
    from types import SimpleNamespace

    from comfy.taco_dit.parallel.exchange import transport

    pair = SimpleNamespace(size=2, group=object(), _exchanges={})
    monkeypatch.setenv("TACO_A2A", "carrier-pigeon")
    with pytest.raises(ValueError, match="TACO_A2A=auto, nccl or symm"):
        transport(torch.device("cpu"), pair)
    for setting in ("auto", "symm", "nccl"):  # direct NVLink writes need GPUs: CPU ranks keep gloo's all-to-all
        monkeypatch.setenv("TACO_A2A", setting)
        assert transport(torch.device("cpu"), pair, measured=True) == "nccl"
        assert transport(torch.device("cuda", 0), None, measured=True) == "nccl"  # one rank: nothing to exchange
    monkeypatch.setenv("TACO_A2A", "auto")  # auto never picks symmetric memory for an unmeasured exchange
    assert transport(torch.device("cuda", 0), pair, measured=False) == "nccl"


def test_symmetric_memory_groups_one_host(monkeypatch):
    """Symmetric memory only where every rank of the job is on one host (others have no mapped memory). A
    group of all of them rendezvouses on its own; a sub-group (e.g. the Ulysses pairs of CFG 2 x Ulysses 2,
    whose own rendezvous hung on GPUs) takes slices of the world's arena."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from comfy.taco_dit.parallel import exchange

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    pair, world = (SimpleNamespace(size=n, group=object(), _exchanges={}) for n in (2, 4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert exchange.whole_host(world)
    assert not exchange.whole_host(pair)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts of two GPUs: peers' memory is not mapped
    assert not exchange.whole_host(pair)
    assert not exchange.whole_host(world)
    monkeypatch.setattr(exchange, "_peer_access", lambda n: True)
    cuda = torch.device("cuda", 0)
    assert exchange.transport(cuda, pair, measured=True) == exchange.transport(cuda, world, measured=True) == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert exchange.transport(cuda, world, measured=True) == "symm"
    assert exchange.transport(cuda, pair, measured=True) == "arena"
    assert exchange.transport(cuda, pair, measured=False) == "nccl"  # auto: only where measured
    monkeypatch.setenv("TACO_A2A", "symm")
    assert exchange.transport(cuda, pair, measured=False) == "arena"


class _FakeWorldHandle:
    """Stands in for the world's symmetric-memory handle on CPU: one byte buffer per world rank, and a log
    of the signals."""

    def __init__(self, world: int, nbytes: int):
        self.mem = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        self.signals = []

    def get_buffer(self, rank, shape, dtype, offset):
        n = math.prod(shape)
        return self.mem[rank].view(dtype)[offset:offset + n].view(shape)

    def put_signal(self, dst, channel=0):
        self.signals.append(("put", dst))

    def wait_signal(self, src, channel=0):
        self.signals.append(("wait", src))


def test_arena_exchange_slices_and_pair_signals(monkeypatch):
    """Sub-group exchanges on the world's arena: each group's slices are counted on its own (the two pairs
    of a CFG 2 x Ulysses 2 mesh reuse the same offsets, in different ranks' memory), a block written for a
    peer lands in that peer's receive buffer, the barrier signals the pair's other member only, and an
    arena without room says so (the group then uses NCCL for that shape)."""
    from types import SimpleNamespace

    from comfy.taco_dit.parallel import exchange

    handle = _FakeWorldHandle(4, 4096)
    device = torch.device("cpu")
    arenas = []  # each world rank's own arena object (one per process), all on the same world memory
    for _ in range(4):
        arena = object.__new__(exchange._Arena)
        arena.nbytes, arena.handle, arena.used = 4096, handle, {}
        arenas.append(arena)

    def on_rank(me, ranks, block):
        monkeypatch.setitem(exchange._arenas, device, arenas[me])
        group = SimpleNamespace(size=len(ranks), ranks=ranks, rank_in_group=ranks.index(me), _last_exchange=None,
                                _exchanges={})
        return exchange.ArenaExchange(group, block, torch.float32, device, 0)

    block = (1, 3, 2, 4)  # [B, S/P, hp, D] float32: 96 bytes, 192 for the pair's [2, ...] buffer
    a0, a1, b2 = on_rank(0, [0, 1], block), on_rank(1, [0, 1], block), on_rank(2, [2, 3], block)
    second = on_rank(0, [0, 1], block)
    try:
        offsets = [ex.peers[ex.rank].data_ptr() - handle.mem[ex.group.ranks[ex.rank]].data_ptr()
                   for ex in (a0, a1, b2, second)]
        assert offsets == [0, 0, 0, 512]  # pair (2, 3) counts its own; the next shape is 512-byte aligned
        sent = torch.arange(2 * 24, dtype=torch.float32).view(2, *block)  # blocks[r] goes to pair member r
        pending = a0.start(sent)
        assert torch.equal(a1.peers[1][0], sent[1]) and torch.equal(a0.peers[0][0], sent[0])
        pending.wait()
        assert handle.signals == [("put", 1), ("wait", 1)]
        with pytest.raises(exchange.ArenaFull, match="arena full"):
            on_rank(0, [0, 1], (1, 3, 2, 100))
    finally:
        for ex in (a0, a1, b2, second):
            exchange._live.remove(ex)


def test_in_place_gather_sends_only_the_region_to_every_peer(monkeypatch):
    """The gathered ring's in-place exchange: what this rank wrote into its own block stays where it is, the
    region (k and v of packed q/k/v) lands in the same place of every peer's buffer, the rest of the peer's
    block (q) is left alone, and waiting signals the other members only."""
    from types import SimpleNamespace

    from comfy.taco_dit.parallel import exchange

    handle = _FakeWorldHandle(3, 4096)
    device = torch.device("cpu")
    exs = []
    for me in range(3):
        arena = object.__new__(exchange._Arena)
        arena.nbytes, arena.handle, arena.used = 4096, handle, {}
        monkeypatch.setitem(exchange._arenas, device, arena)
        group = SimpleNamespace(size=3, ranks=[0, 1, 2], rank_in_group=me, _last_exchange=None, _exchanges={})
        exs.append(exchange.ArenaExchange(group, (1, 2, 3, 2, 4), torch.float32, device, 0))  # [B, S, 3, H, D]
    try:
        for ex in exs:
            ex.peers[ex.rank].fill_(-1.0)
        own = exs[1].own_block()
        assert own.data_ptr() == exs[1].peers[1][1].data_ptr()
        own.copy_(torch.arange(own.numel(), dtype=torch.float32).view(own.shape))
        pending = exs[1].start_gather(lambda block: block[:, :, 1:3])
        for r in (0, 2):
            got = exs[r].peers[r][1]  # rank r's buffer, block of rank 1
            assert torch.equal(got[:, :, 1:3], own[:, :, 1:3])
            assert bool((got[:, :, 0] == -1).all())
        whole = pending.wait()
        assert whole.data_ptr() == exs[1].peers[1].data_ptr() and torch.equal(whole[1], own)
        assert sorted(handle.signals) == [("put", 0), ("put", 2), ("wait", 0), ("wait", 2)]
    finally:
        for ex in exs:
            exchange._live.remove(ex)


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_gathered_ring_attends_from_q_k_v_written_in_place(monkeypatch, pad, early):
    """ring_gathered's in-place path (what ring_qkv_supplier sets up on GPUs): q/k/v written by the model into
    this rank's block of the exchange buffer are used where they lie, the peers' k/v arrive beside them, and
    the attention over them (padding keys left out) is full attention. Two ranks simulated in one process
    over the fake world memory: the rank that sends first is checked after the other has sent.
    `early`: the model writes k and v, calls the kv-ready hook (ring_kv_ready), then writes q, as Flux's double
    blocks do: k/v are at the peer before q is written, q never goes there, and the attention call takes that
    transfer instead of starting another (one gather per call either way)."""
    from types import SimpleNamespace

    from comfy.taco_dit.parallel import exchange
    from comfy.taco_dit.parallel.sequence_parallel import TokenSplit, real_tokens, ring_blocks
    from comfy.taco_dit.parallel.sp_attention import ring_gathered, ring_kv_ready

    gathers = []
    start_gather = exchange.SymmetricExchange.start_gather

    def counted(self, region=None):
        gathers.append(self)
        return start_gather(self, region)

    monkeypatch.setattr(exchange.SymmetricExchange, "start_gather", counted)

    heads, dim = 4, 8
    real = 16 - pad  # 13 tokens: 7 per rank, the last one padding
    q, k, v = _inputs(real, heads=heads, dim=dim, batch=1)
    ref = F.scaled_dot_product_attention(q, k, v)
    split = TokenSplit(real, 2)
    keep = ring_blocks(real_tokens(split), 2)
    s = split.chunk
    handle = _FakeWorldHandle(2, 8192)
    key = ("ring_qkv0", (1, s, 3, heads, dim), torch.float32, torch.device("cpu"))
    groups = []
    for me in range(2):
        arena = object.__new__(exchange._Arena)
        arena.nbytes, arena.handle, arena.used = 8192, handle, {}
        monkeypatch.setitem(exchange._arenas, torch.device("cpu"), arena)
        group = SimpleNamespace(size=2, ranks=[0, 1], rank_in_group=me, _last_exchange=None, _exchanges={})
        group._exchanges[key] = exchange.ArenaExchange(group, key[1], torch.float32, key[3], 0)
        groups.append(group)
    try:
        for first in (0, 1):
            for me in (1 - first, first):  # the other rank writes and sends first; `first` then attends
                own = groups[me]._exchanges[key].own_block()
                peer = groups[1 - me]._exchanges[key].peers[1 - me][me]  # my block in the peer's buffer
                peer.fill_(-1.0)
                groups[me]._ring_kv_parity = 0
                for i in (1, 2, 0):
                    local = split.local((q, k, v)[i], me, 2)  # [1, H, s, D], zero-padded
                    own[:, :, i].copy_(local.transpose(1, 2))
                    if early and i == 2:
                        ring_kv_ready(groups[me])(own)
                        assert torch.equal(peer[:, :, 1:3], own[:, :, 1:3])
                if early:
                    assert bool((peer[:, :, 0] == -1).all())  # q was written after the transfer began
                lq, lk, lv = own.permute(2, 0, 3, 1, 4).unbind(0)
                out = ring_gathered(lq, lk, lv, groups[me], keep)
            want = split.local(ref, first, 2)[:, :, : min(s, real - first * s)]
            torch.testing.assert_close(out[:, :, : want.shape[2]], want, atol=1e-5, rtol=1e-5)
        assert len(gathers) == 4 and all(getattr(g, "_early_kv", None) is None for g in groups)
    finally:
        for g in groups:
            exchange._live.remove(g._exchanges[key])


def test_ring_blocks_find_the_real_keys_once_from_the_host_counts():
    from comfy.taco_dit.parallel.sequence_parallel import TokenSplit, real_tokens, ring_blocks

    txt, img = TokenSplit(5, 4), TokenSplit(13, 4)  # 5 -> 8 and 13 -> 16 tokens: both streams padded
    assert real_tokens(TokenSplit(8, 4), TokenSplit(16, 4)) is None  # nothing padded: nothing to find
    device_mask, host_mask = real_tokens(txt, img)
    assert device_mask.tolist() == host_mask.tolist()
    assert int(host_mask.sum()) == 18  # every real token, none of the padding
    for ring in (1, 2, 4):
        blocks = ring_blocks((device_mask, host_mask), ring)
        expect = [b.nonzero().squeeze(1) for b in host_mask.reshape(ring, -1)]
        assert len(blocks) == ring
        for got, want, block in zip(blocks, expect, host_mask.reshape(ring, -1)):
            if bool(block.all()):
                assert got is None
            else:
                assert torch.equal(got, want)


def test_exchange_falls_back_to_nccl_when_symmetric_memory_fails(monkeypatch, caplog):
    import comfy.taco_dit.parallel.exchange as exchange
    from comfy.taco_dit.parallel.mesh import GroupHandle

    def broken(*a, **k):
        raise RuntimeError("no multicast here")

    monkeypatch.setattr(exchange, "transport", lambda *a, **k: "symm")
    monkeypatch.setattr(exchange, "SymmetricExchange", broken)
    group = GroupHandle([0, 1], None, 0)
    ex = group.exchange("ulysses_qkv0", (1, 4, 3, 2, 8), torch.float32, torch.device("cpu"), measured=True)
    assert isinstance(ex, exchange.NcclExchange)
    assert "no multicast here" in caplog.text
    # later shapes do not try again
    assert isinstance(group.exchange("ulysses_out0", (1, 4, 2, 8), torch.float32, torch.device("cpu")),
                      exchange.NcclExchange)


def test_staged_exchanges_take_the_arena_on_a_whole_world_group(monkeypatch):
    """Where symmetric memory is chosen for a group of every rank, an exchange asked with arena=True (Wan's
    staged q/k/v, built while others are in flight) gets a slice of the world's arena, not a rendezvous of
    its own; the others keep the group's own buffers; a full arena leaves that shape to NCCL."""
    import comfy.taco_dit.parallel.exchange as exchange
    from comfy.taco_dit.parallel.mesh import GroupHandle

    built = []

    def fake(kind):
        class Fake(exchange.SymmetricExchange):
            def __init__(self, group, shape, *a, **k):  # records instead of allocating GPU memory
                if shape[-1] == 99:
                    raise exchange.ArenaFull("arena full")
                built.append(kind)
        return Fake

    monkeypatch.setattr(exchange, "transport", lambda *a, **k: "symm")
    monkeypatch.setattr(exchange, "ArenaExchange", fake("arena"))
    monkeypatch.setattr(exchange, "SymmetricExchange", fake("own"))
    group = GroupHandle([0, 1], None, 0)
    cpu = torch.device("cpu")
    group.exchange("ulysses_q", (1, 4, 2, 8), torch.float32, cpu, measured=True, arena=True)
    group.exchange("ulysses_qkv0", (1, 4, 3, 2, 8), torch.float32, cpu, measured=True)
    assert built == ["arena", "own"]
    assert isinstance(group.exchange("ulysses_k", (1, 4, 2, 99), torch.float32, cpu, arena=True),
                      exchange.NcclExchange)


def test_pitched_rows_finds_the_2d_regions_copied_by_one_memcpy():
    from comfy.taco_dit.parallel.exchange import pitched_rows

    s, h, d, p = 5, 8, 4, 4
    hp = h // p
    packed = torch.arange(s * 3 * h * d).reshape(1, s, 3, h, d)
    # one destination's heads of packed q/k/v, as the Ulysses exchange sends them: 3*S rows of hp*D, H*D apart
    blocks = packed.unflatten(3, (p, 1, hp)).permute(4, 3, 0, 1, 2, 5, 6)[0]
    for r in range(p):
        rows, width, pitch = pitched_rows(blocks[r])
        assert (rows, width, pitch) == (3 * s, hp * d, h * d)
        # the region those numbers describe holds exactly the block's elements, in order
        flat = packed.reshape(-1)[blocks[r].storage_offset():]
        region = torch.stack([flat[i * pitch:i * pitch + width] for i in range(rows)])
        assert torch.equal(region.reshape(-1), blocks[r].reshape(-1))
    assert pitched_rows(torch.zeros(4, 5)) is None  # contiguous: a plain memcpy
    assert pitched_rows(torch.zeros(4, 6, 2)[:, :3]) == (4, 6, 12)
    assert pitched_rows(torch.zeros(4, 6, 2)[::2, :3]) == (2, 6, 24)
    assert pitched_rows(torch.zeros(6, 4).t()) is None  # no contiguous run
    assert pitched_rows(torch.zeros(3, 4, 6)[:, :2, :2]) is None  # rows 6 apart in pairs 24 apart: not one pitch


def test_copy2d_moves_the_pitched_region_in_bytes():
    """`exchange._copy2d` hands cudaMemcpy2DAsync byte pitches and widths: here a stand-in that does the copy
    on host memory, as the CUDA runtime does it, must move exactly the strided region (k and v of packed q/k/v
    into the same place of another buffer, and one destination's heads into a contiguous block)."""
    import ctypes
    from types import SimpleNamespace

    from comfy.taco_dit.parallel.exchange import _copy2d, pitched_rows

    def memcpy2d(dst, dpitch, src, spitch, width, height, kind, stream):
        assert kind == 3 and stream == 7
        for i in range(height):
            ctypes.memmove(dst + i * dpitch, src + i * spitch, width)
        return 0

    stream = SimpleNamespace(cuda_stream=7)
    packed = torch.arange(5 * 3 * 4 * 2, dtype=torch.float32).view(5, 3, 4, 2)  # [S, 3, H, D]
    target = torch.zeros_like(packed)
    rows, width, pitch = pitched_rows(packed[:, 1:3])
    _copy2d(memcpy2d, stream, target[:, 1:3], pitch, packed[:, 1:3], pitch, width, rows)
    assert torch.equal(target[:, 1:3], packed[:, 1:3]) and not target[:, 0].any()
    heads = packed[:, :, 2:4]  # one destination's heads: a pitched region
    block = torch.zeros(heads.shape)
    rows, width, pitch = pitched_rows(heads)
    _copy2d(memcpy2d, stream, block, width, heads, pitch, width, rows)
    assert torch.equal(block, heads)
    with pytest.raises(RuntimeError, match="CUDA error 1; set TACO_CE_2D=0"):
        _copy2d(lambda *a: 1, stream, block, width, heads, pitch, width, rows)


def _host_memcpy2d(dst, dpitch, src, spitch, width, height, kind, stream):
    """cudaMemcpy2DAsync's semantics on host memory (bytes), for exchanges simulated on CPU."""
    import ctypes

    assert kind == 3
    for i in range(height):
        ctypes.memmove(dst + i * dpitch, src + i * spitch, width)
    return 0


@pytest.mark.parametrize("strided", [False, True])
def test_returning_output_lands_in_head_order(monkeypatch, strided):
    """Ulysses' returning output with `interleave`: every rank's block for rank r lands in rank r's buffer in
    its own slot among the heads, so rank r receives its tokens with all heads in order ([B, S/P, P*hp, D]),
    and sp_attention._interleave returns it as a view, equal to what the interleaving copy of the blocks
    layout gives. Three ranks simulated in one process over the fake world memory; the sent blocks are
    contiguous, or pitched regions of a wider tensor (one 2-D copy each either way)."""
    from types import SimpleNamespace

    from comfy.taco_dit.parallel import exchange
    from comfy.taco_dit.parallel.sp_attention import _interleave

    monkeypatch.setattr(exchange, "_memcpy2d", lambda: _host_memcpy2d)
    p, b, s, hp, d = 3, 1, 4, 2, 5
    handle = _FakeWorldHandle(p, 8192)
    exs = []
    for me in range(p):
        arena = object.__new__(exchange._Arena)
        arena.nbytes, arena.handle, arena.used = 8192, handle, {}
        monkeypatch.setitem(exchange._arenas, torch.device("cpu"), arena)
        group = SimpleNamespace(size=p, ranks=list(range(p)), rank_in_group=me, _last_exchange=None, _exchanges={})
        exs.append(exchange.ArenaExchange(group, (b, s, hp, d), torch.float32, torch.device("cpu"), 0))
    # rank j's attention output: every token of the sequence (P*s) for its heads j*hp ... (j+1)*hp
    full = torch.randn(b, p * s, p * hp, d)  # [B, S, H, D]: what one rank would hold without sequence parallel
    try:
        pendings = []
        for j in range(p):
            mine = full[:, :, j * hp:(j + 1) * hp]  # [B, S, hp, D]
            if not strided:
                mine = mine.contiguous()
            blocks = mine.reshape(b, p, s, hp, d).transpose(0, 1)  # [P, B, s, hp, D]: block r = rank r's tokens
            assert blocks[1].is_contiguous() != strided
            pendings.append(exs[j].start(blocks, background=True, interleave=True))
        for r in range(p):
            assert pendings[r].interleaved
            got = _interleave([pendings[r]], b, s, p * hp, d)  # [B, H, s, D]
            want = full[:, r * s:(r + 1) * s].transpose(1, 2)
            assert torch.equal(got, want)
            assert got.data_ptr() == exs[r].peers[r].data_ptr()  # a view of the buffer: no interleaving copy
        # blocks whose rows are not one run each, or no 2-D memcpy: start() sends them as blocks instead
        blocks = full[:, :, :hp].contiguous().reshape(b, p, s, hp, d).transpose(0, 1)
        assert exs[0]._start_interleaved(blocks.transpose(3, 4)) is None
        monkeypatch.setattr(exchange, "_memcpy2d", lambda: None)
        assert exs[0]._start_interleaved(blocks) is None
    finally:
        for ex in exs:
            exchange._live.remove(ex)
