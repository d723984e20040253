"""Uneven token shares for a ring of two (comfy/taco_dit/parallel/balance.py).

The rules (setting, shares from rates, token counts, row placement) are checked directly; the whole path over
gloo: Flux under ring 2 with the image tokens split unevenly gives the one-process output (fp32, 1e-4, as
tests/test_sequence_parallel_families.py), and each rank really ran its own count of tokens.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from comfy.taco_dit.parallel import balance
from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sequence_parallel import TokenSplit, gather_tokens
from comfy.taco_dit.parallel.sp_attention import ring_rows
from tests.parallel_helpers import run_on_ranks
from tests.test_sequence_parallel_families import TestFlux


def test_setting(monkeypatch):
    monkeypatch.delenv(balance.ENV, raising=False)
    assert balance.setting() == "auto"
    for raw, want in (("off", "off"), ("0", "off"), ("AUTO", "auto")):
        monkeypatch.setenv(balance.ENV, raw)
        assert balance.setting() == want
    monkeypatch.setenv(balance.ENV, "1,3")
    assert balance.setting() == (0.25, 0.75)
    for bad in ("0.5", "1,-1", "a,b", "1,0"):
        monkeypatch.setenv(balance.ENV, bad)
        with pytest.raises(ValueError, match=balance.ENV):
            balance.setting()


def test_shares_follow_rates_outside_the_dead_band():
    assert balance.shares_from_rates([100.0, 100.5]) is None  # 0.5 %: noise, the even split stays
    shares = balance.shares_from_rates([97.0, 100.0])
    assert shares == pytest.approx((97 / 197, 100 / 197))
    assert balance.shares_from_rates([0.0, 100.0]) is None
    assert balance.shares_from_rates([100.0]) is None


def test_split_sizes():
    # Flux 1024²'s 4096 image tokens, the second GPU 3 % faster: 32 tokens move, in steps of 16
    sizes = balance.split_sizes(4096, (97 / 197, 100 / 197))
    assert sum(sizes) == 4096 and sizes == (2016, 2080) and all(n % 16 == 0 for n in sizes)
    assert balance.split_sizes(4096, (0.5, 0.5)) is None  # even: nothing to do
    assert balance.split_sizes(4096, (0.501, 0.499)) is None  # under one step: rounds back to even
    assert balance.split_sizes(40, (0.3, 0.7)) is None  # too short to move a step of 16
    assert balance.split_sizes(12, (0.3, 0.7), quantum=1) == (4, 8)
    assert balance.split_sizes(100, (0.001, 0.999), quantum=16) == (16, 84)  # each rank keeps a step
    assert sum(balance.split_sizes(96, (0.2, 0.3, 0.5), quantum=1)) == 96


def test_token_split_with_sizes():
    s = TokenSplit(10, 2, (4, 6))
    assert (s.padded, s.chunk, s.count(0), s.count(1)) == (10, 6, 4, 6)
    x = torch.arange(10.0).reshape(1, 10)
    assert s.local(x, 0, 1).tolist() == [[0, 1, 2, 3]] and s.local(x, 1, 1).tolist() == [[4, 5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="do not split"):
        TokenSplit(10, 2, (4, 5))
    with pytest.raises(ValueError):
        s.keep()


def test_ring_rows_keep_the_keys_contiguous():
    # equal rows fill their blocks
    assert ring_rows(None, 1, 7) == (7, 0, None, None)
    # rank 0's 4 rows end block 0, rank 1's 6 start block 1: keys are rows 2..12 of the 12
    assert ring_rows((4, 6), 0, 4) == (6, 2, 2, 12)
    assert ring_rows((4, 6), 1, 6) == (6, 0, 2, 12)
    assert ring_rows((6, 4), 0, 6) == (6, 0, 0, 10)
    with pytest.raises(ValueError):
        ring_rows((4, 6), 0, 6)


def _gather_worker(rank, world):
    s = TokenSplit(7, 2, (3, 4))
    x = torch.arange(7.0).reshape(1, 7, 1) * 10
    mesh = ParallelMesh(MeshDims(world_size=2, ring=2))
    return gather_tokens(s.local(x, rank, 1), mesh.sp, s, dim=1).flatten().tolist()


def test_gather_of_uneven_chunks():
    for out in run_on_ranks(2, _gather_worker):
        assert out == [float(10 * i) for i in range(7)]


def _flux_worker(rank, world, shares, case):
    os.environ[balance.ENV] = shares
    import comfy.taco_dit.parallel.sequence_parallel as sp

    family = TestFlux()
    model, inputs = family.build(**case)
    mesh = ParallelMesh(MeshDims(world_size=world, ring=2))
    seen = []
    orig = sp.install_attention

    def spy(opts, mesh_, kv_keep, rows=None):
        seen.append(rows)
        return orig(opts, mesh_, kv_keep, rows)

    sp.install_attention = spy
    model.forward_orig = sp.flux_forward_orig(mesh).__get__(model, type(model))
    with torch.no_grad():
        out = family.run(model, inputs)
    return out, seen


@pytest.mark.parametrize("shares,rows", [("0.3,0.7", (2 + 4, 2 + 8)), ("0.7,0.3", (2 + 8, 2 + 4))])
def test_flux_ring2_with_uneven_image_shares_matches_one_process(shares, rows):
    case = dict(h=8, w=6, txt_len=4)  # 12 image tokens (4 + 8), text 2 + 2
    family = TestFlux()
    model, inputs = family.build(**case)
    with torch.no_grad():
        ref = family.run(model, inputs)
    for out, seen in run_on_ranks(2, _flux_worker, shares, case):
        assert seen == [rows]  # the uneven split was taken: each rank's local length
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_odd_text_keeps_the_even_split():
    case = dict(h=8, w=6, txt_len=5)  # text needs padding: balancing is left out
    for _, seen in run_on_ranks(2, _flux_worker, "0.3,0.7", case):
        assert seen == [None]


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("rows", [(5, 9), (9, 5)])
def test_in_place_ring_with_uneven_rows(monkeypatch, rows, early):
    """The GPU path of an uneven ring of two, on CPU over the fake world memory of tests/test_sp_attention.py:
    the supplier hands each rank its rows of a block of the longest length (`_supply_view`), the model writes
    q/k/v there (k/v first and the kv-ready hook when `early`), only those rows' k/v go to the peer, and each
    rank's attention over the gathered keys (one contiguous run, no padding) is full attention."""
    import torch.nn.functional as F

    from comfy.taco_dit.parallel import exchange
    from comfy.taco_dit.parallel.sp_attention import _supply_view, ring_gathered, ring_kv_ready
    from tests.test_sp_attention import _FakeWorldHandle, _inputs

    heads, dim = 4, 8
    q, k, v = _inputs(sum(rows), heads=heads, dim=dim, batch=1)
    ref = F.scaled_dot_product_attention(q, k, v)
    split = TokenSplit(sum(rows), 2, rows)
    handle = _FakeWorldHandle(2, 16384)
    groups, views = [], []
    for me in range(2):
        arena = object.__new__(exchange._Arena)
        arena.nbytes, arena.handle, arena.used = 16384, handle, {}
        monkeypatch.setitem(exchange._arenas, torch.device("cpu"), arena)
        group = SimpleNamespace(size=2, ranks=[0, 1], rank_in_group=me, _last_exchange=None, _exchanges={},
                                group=None)

        def make(name, shape, dtype, device, measured=False, arena=False, group=group):
            key = (name, shape, dtype, device)
            if key not in group._exchanges:
                group._exchanges[key] = exchange.ArenaExchange(group, shape, dtype, device, 0)
            return group._exchanges[key]

        group.exchange = make
        groups.append(group)
        group._ring_kv_parity = 0  # the exchange is built now, on this rank's arena
        views.append(_supply_view(group, rows, (1, rows[me], 3, heads, dim), torch.float32, torch.device("cpu")))
        assert views[me].shape[1] == rows[me]
    try:
        outs = [None, None]
        for first in (0, 1):
            for me in (1 - first, first):  # the other rank writes and sends first; `first` then attends
                own = views[me]
                own.zero_()
                for i in (1, 2, 0):
                    own[:, :, i].copy_(split.local((q, k, v)[i], me, 2).transpose(1, 2))
                    if early and i == 2:
                        ring_kv_ready(groups[me])(own)
                lq, lk, lv = own.permute(2, 0, 3, 1, 4).unbind(0)
                groups[me]._ring_kv_parity = 0
                out = ring_gathered(lq, lk, lv, groups[me], None, rows=rows)
                if me == first:
                    outs[me] = out
        for me in range(2):
            torch.testing.assert_close(outs[me], split.local(ref, me, 2), atol=1e-5, rtol=1e-5)
            # in place: no other exchange was built, and an early transfer was taken by the attention
            assert [key[0] for key in groups[me]._exchanges] == ["ring_qkv0"]
            assert getattr(groups[me], "_early_kv", None) is None
    finally:
        for g in groups:
            for ex in g._exchanges.values():
                exchange._live.remove(ex)
