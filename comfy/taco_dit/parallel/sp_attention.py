"""Sequence-parallel attention: Ulysses (all-to-all over heads), Ring (every rank's K/V gathered in one
exchange, or K/V blocks rotated with log-sum-exp merging: `ring_mode`) and their product USP (rotating), on
plain torch.distributed.

Tensors are `[B, H, S_local, D]` (SDPA layout). Every rank of the sequence group holds one chunk of the
sequence; the result for its own queries comes back in the same layout. Padding added to make chunks
equal is excluded from the keys (`kv_keep`), never masked by value, so it cannot act as a key.

The same code runs over gloo on CPU (tests, --cpu) and NCCL on GPUs.
"""

from __future__ import annotations

import os

import torch

from comfy.ldm.modules.attention import materialize, run_side_work, sdpa
from comfy.taco_dit.parallel.exchange import whole_host
from comfy.taco_dit.parallel.mesh import GroupHandle


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its log-sum-exp per query ([B,H,S]), fp32 LSE."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse.float()
    if q.device.type == "cuda":
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
            return res[0], res[1].float()
        except RuntimeError:
            # Flash may not support this dtype/shape; the memory-efficient kernel returns an LSE too.
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
            return res[0], res[1][..., : q.shape[2]].float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse


def _merge(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out.float() * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: GroupHandle,
                   kv_keep: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Attention of local queries over the keys of every rank in `group`.

    `kv_keep[r]`: indices of the real (non-padding) key positions in rank r's block, or None for all.
    """
    if group.size == 1:
        keep = kv_keep[0] if kv_keep else None
        if keep is not None:
            k, v = k.index_select(2, keep), v.index_select(2, keep)
        return sdpa(q, k, v)
    out = lse = None
    kv = torch.stack((k, v))
    for step in range(group.size):
        source = (group.rank_in_group - step) % group.size
        bk, bv = kv[0], kv[1]
        keep = kv_keep[source] if kv_keep else None
        if keep is not None:
            bk, bv = bk.index_select(2, keep), bv.index_select(2, keep)
        nxt = group.ring_exchange(kv) if step + 1 < group.size else None
        if bk.shape[2] > 0:
            block_out, block_lse = _attention_with_lse(q, bk, bv)
            out, lse = _merge(out, lse, block_out, block_lse)
        if nxt is not None:
            kv = nxt
    return out.to(q.dtype)


def ring_mode() -> str:
    """How a Ring group (with no Ulysses inside it) attends: "gather" (every rank gets every rank's k/v in one
    exchange, then one attention over all keys) or "rotate" (k/v blocks passed round the ring, one attention
    per block, merged by log-sum-exp). `TACO_RING=auto|gather|rotate`; auto gathers: one exchange and one
    attention call per layer, no merge passes, and the side work of the block hides the exchange."""
    want = os.environ.get("TACO_RING", "auto").strip().lower() or "auto"
    if want not in ("auto", "gather", "rotate"):
        raise ValueError(f"TACO_RING={want!r} is not a ring mode; use TACO_RING=auto, gather or rotate")
    return "rotate" if want == "rotate" else "gather"


def ring_qkv_supplier(ring: GroupHandle):
    """For `transformer_options[QKV_BUFFER_KEY]` (attention.py): under the gathered ring, a model writing packed
    q/k/v ([1, S, 3, H, D], batch 1) writes them straight into its own block of the next exchange's symmetric
    buffer, so only k and v are copied, to the peers, and this rank's part is never copied at all (it was a
    40 µs 2-D copy on the SMs per layer at Flux 1024² on 2 GPUs, call s31). None where that exchange does
    not go through symmetric memory: the model then allocates as usual."""

    def supply(shape: tuple, dtype: torch.dtype, device: torch.device):
        if device.type != "cuda" or shape[0] != 1 or len(shape) != 5 or shape[2] != 3:
            return None
        parity = getattr(ring, "_ring_kv_parity", 0)
        ex = ring.exchange(f"ring_qkv{parity}", shape, dtype, device, measured=whole_host(ring),
                           arena=not whole_host(ring))
        return ex.own_block() if hasattr(ex, "own_block") else None

    return supply


def _kv_region(block: torch.Tensor) -> torch.Tensor:
    """k and v of a packed [B, S, 3, H, D] block."""
    return block[:, :, 1:3]


def _supplied_block_exchange(ring: GroupHandle, buf: torch.Tensor, parity: int):
    """The exchange whose own block `buf` is (handed out by `ring_qkv_supplier` for this call parity), or None."""
    ex = ring._exchanges.get((f"ring_qkv{parity}", tuple(buf.shape), buf.dtype, buf.device))
    return ex if hasattr(ex, "own_block") and ex.own_block().data_ptr() == buf.data_ptr() else None


def ring_kv_ready(ring: GroupHandle):
    """For `transformer_options[KV_READY_KEY]` (attention.py), beside `ring_qkv_supplier`: a model that wrote k
    and v into the supplied block before q calls this, and their gather to the peers starts at once, by copy
    engine, while q is computed (q's bytes are not part of the copy, so writing them meanwhile is safe).
    `ring_gathered` then takes that transfer instead of starting its own. A buffer that is not the supplied
    block (e.g. no symmetric memory) is left alone: the attention call moves it as usual."""

    def ready(buf: torch.Tensor) -> None:
        ex = _supplied_block_exchange(ring, buf, getattr(ring, "_ring_kv_parity", 0))
        if ex is not None:
            ring._early_kv = (ex, ex.start_gather(_kv_region))

    return ready


def ring_gathered(q: torch.Tensor, k, v, ring: GroupHandle, keep=None, side_work=None) -> torch.Tensor:
    """Ring attention with the keys gathered: this rank's k and v go to every rank of `ring` in one exchange
    while `side_work` runs; then one attention of the local queries over every rank's keys, in rank order.
    `keep`: the real keys' indices per rank block (sequence_parallel.ring_blocks), None where all are real.

    Where q/k/v were written into this rank's block of a symmetric buffer (`ring_qkv_supplier`), k and v go
    from there to the same place in the peers' buffers and nothing else moves. Otherwise k and v ([B, S, 2, H,
    D] per rank, a 2-D pitched region of packed q/k/v, sent without a copy) go by `GroupHandle.exchange`.
    Two exchange buffers alternate from call to call: a peer writes the next layer's k/v into the other one,
    so it never overwrites keys this rank's attention may still be reading (exchange.py, reuse rule)."""
    p = ring.size
    k, v = materialize(k), materialize(v)
    b, h, s, d = q.shape
    packed = _packed(q, k, v)
    parity = getattr(ring, "_ring_kv_parity", 0)
    ring._ring_kv_parity = parity ^ 1
    in_place = _supplied_block_exchange(ring, packed, parity) if packed is not None and b == 1 else None
    if in_place is not None:
        early, ring._early_kv = getattr(ring, "_early_kv", None), None
        if early is not None and early[0] is in_place:
            pending = early[1]  # started by the model's kv-ready call (ring_kv_ready)
        else:
            pending = in_place.start_gather(_kv_region)
        cols = 3
    else:
        kv = packed[:, :, 1:3] if packed is not None else torch.stack((k.transpose(1, 2), v.transpose(1, 2)), dim=2)
        ex = ring.exchange(f"ring_kv{parity}", (b, s, 2, h, d), kv.dtype, kv.device,
                           measured=b == 1 and whole_host(ring), arena=not whole_host(ring))
        pending = ex.start(kv.unsqueeze(0).expand(p, *kv.shape), background=bool(side_work) and b == 1)
        cols = 2
    run_side_work([step for part in _split_side_work(side_work) for step in part])
    recv = pending.wait()  # [P, B, S, cols, H, D], rank r's block r
    full = recv.view(1, p * s, cols, h, d) if b == 1 else recv.transpose(0, 1).reshape(b, p * s, cols, h, d)
    k_all, v_all = full[:, :, cols - 2:].permute(2, 0, 3, 1, 4).unbind(0)
    if keep is not None and any(idx is not None for idx in keep):
        every = torch.arange(s, device=q.device)
        idx = torch.cat([(every if blk is None else blk) + r * s for r, blk in enumerate(keep)])
        k_all, v_all = k_all.index_select(2, idx), v_all.index_select(2, idx)
    return sdpa(q, k_all, v_all)


def _seq_to_heads(x: torch.Tensor, group: GroupHandle) -> torch.Tensor:
    """[B, H, S/P, D] on each rank -> [B, H/P, S, D] (sequence in rank order)."""
    p = group.size
    b, h, s, d = x.shape
    send = x.reshape(b, p, h // p, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    group.all_to_all_single(recv, send)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)


def ulysses_chunks(heads_per_rank: int) -> int:
    """Head groups the Ulysses all-to-alls are pipelined over: `TACO_ULYSSES_CHUNKS` (default 1 = one exchange
    each way), used where it divides this rank's heads. On 4 x H200 two groups measured slower, not faster
    (Flux 1024² 46.5 vs 45.1 ms, Wan 14B 811 vs 797 ms: NCCL's kernels take SMs from the overlapped
    attention and each half-size attention runs less efficiently), so pipelining is opt-in."""
    value = os.environ.get("TACO_ULYSSES_CHUNKS", "1").strip().lower()
    n = 1 if value in ("", "auto") else int(value)
    return n if n >= 1 and heads_per_rank % n == 0 else 1


def _split_side_work(side_work) -> tuple[list, list]:
    """(before, after) lists from `side_work` = (before[, after]) or None."""
    return (list(side_work)[:1], list(side_work)[1:]) if side_work else ([], [])


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The [B, S, 3, H, D] buffer q, k and v ([B, H, S, D]) are views of, or None (e.g. separate tensors)."""
    b, h, s, d = q.shape
    stride = (s * 3 * h * d, d, 3 * h * d, 1)
    if not (q.stride() == k.stride() == v.stride() == stride and q.dtype == k.dtype == v.dtype):
        return None
    step = h * d * q.element_size()
    if k.data_ptr() != q.data_ptr() + step or v.data_ptr() != q.data_ptr() + 2 * step:
        return None
    return q.as_strided((b, s, 3, h, d), (s * 3 * h * d, 3 * h * d, h * d, d, 1))


def _ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses: GroupHandle,
                       ring: GroupHandle, keep, side_work=None) -> torch.Tensor:
    """Ulysses with q, k and v in one all-to-all per head group, pipelined over `ulysses_chunks` groups: the
    all-to-all of group c+1 and the return of group c run on the communication stream while group c's (or
    c+1's) attention computes, so only the first exchange and the last return are exposed.

    Layouts are chosen so nothing arriving needs reordering: each destination's block is [B, S/P, 3, h, D],
    token-major with q/k/v packed per token, and blocks arrive in sequence order, so for B == 1 the received
    buffer already is a packed [1, S, 3, h, D] sequence (the layout cuDNN's attention reads directly) and
    its token-major output is sent back as it is. The one reordering copy is the final interleave of the
    returning head groups into [B, S/P, H, D], returned as a [B, H, S/P, D] view. The exchanges go through
    `GroupHandle.exchange` (NCCL's all-to-all, or direct NVLink writes: exchange.py).

    `side_work` (before, after): work independent of this attention, run while the first exchange and the
    last return are in flight, which hides them behind it (Flux's single blocks: the MLP GEMMs)."""
    p = ulysses.size
    b, h, s, d = q.shape
    hp = h // p
    n = ulysses_chunks(hp)
    hc = hp // n
    packed = _packed(q, k, v)
    # per head group c and destination r: q/k/v of heads r*hp + c*hc ... as [B, S/P, 3, hc, D]
    source = packed.unflatten(3, (p, n, hc)).permute(4, 3, 0, 1, 2, 5, 6) if packed is not None else None
    # with independent work to hide them behind, symmetric-memory exchanges go by copy engine (exchange.py)
    background = bool(side_work) and b == 1
    # the layout symmetric memory was measured with on GPUs (Flux: packed q/k/v, batch 1, one head group, on a
    # group of every GPU; a sub-group's arena was measured for Wan's staged exchanges only)
    measured = packed is not None and b == 1 and n == 1 and whole_host(ulysses)

    def writer(c):
        def write(targets):
            if torch.is_tensor(targets):  # one local [P, ...] send buffer: one copy each for q, k and v
                for i, t in enumerate((q, k, v)):
                    targets[:, :, :, i].copy_(t.unflatten(1, (p, n, hc))[:, :, c].permute(1, 0, 3, 2, 4))
                return
            for r, target in enumerate(targets):  # the peers' buffers
                for i, t in enumerate((q, k, v)):
                    target[:, :, i].copy_(t[:, r * hp + c * hc:r * hp + (c + 1) * hc].transpose(1, 2))
        return write

    arriving = []
    for c in range(n):
        ex = ulysses.exchange(f"ulysses_qkv{c}", (b, s, 3, hc, d), q.dtype, q.device, measured=measured)
        if source is not None:
            arriving.append(ex.start(source[c], background=background))
        else:
            arriving.append(ex.start(write=writer(c)))
    before, after = _split_side_work(side_work)
    run_side_work(before)
    returning = []
    for c in range(n):
        recv = arriving[c].wait()
        packed_c = recv.view(p * s, 3, hc, d)[None] if b == 1 else recv.transpose(0, 1).reshape(b, p * s, 3, hc, d)
        qc, kc, vc = packed_c.permute(2, 0, 3, 1, 4).unbind(0)
        returning.append(_send_back(ring_attention(qc, kc, vc, ring, keep), ulysses, f"ulysses_out{c}", measured,
                                    background, interleave=n == 1))
    run_side_work(after)
    return _interleave(returning, b, s, h, d)


def _send_back(out: torch.Tensor, ulysses: GroupHandle, name: str, measured: bool, background: bool,
               arena: bool = False, interleave: bool = False):
    """Start returning attention output [B, hc, S, D] (one head group, the whole sequence) to the ranks whose
    tokens they are."""
    p = ulysses.size
    b, hc, length, d = out.shape
    s = length // p
    # [P, B, S/P, hc, D]: for B == 1 cuDNN's token-major output already is this layout, sent as it is
    out = out.transpose(1, 2).reshape(b, p, s, hc, d).transpose(0, 1)
    ex = ulysses.exchange(name, (b, s, hc, d), out.dtype, out.device, measured=measured, arena=arena)
    # one head group: each block goes straight to its slot among the heads of the receiving rank (exchange.py),
    # so nothing is interleaved on arrival; several groups still interleave (their heads alternate)
    return ex.start(out, background=background, interleave=interleave and _return_interleaved())


def _return_interleaved() -> bool:
    """`TACO_ULYSSES_RETURN=slots` (default) lets returning output land in head order (no interleaving copy);
    `blocks` keeps the [P, ...] blocks and the copy (for measuring)."""
    want = os.environ.get("TACO_ULYSSES_RETURN", "slots").strip().lower() or "slots"
    if want not in ("slots", "blocks"):
        raise ValueError(f"TACO_ULYSSES_RETURN={want!r}: use slots or blocks")
    return want == "slots"


def _interleave(returning: list, b: int, s: int, h: int, d: int) -> torch.Tensor:
    """This rank's tokens with every head, [B, H, S/P, D] (token-major in memory), from the returning
    exchanges of each head group: back[c][r] holds heads r*hp + c*hc ... ."""
    back = [pending.wait() for pending in returning]
    if len(back) == 1 and returning[0].interleaved:  # arrived as [B, S/P, P, hp, D]: heads in order already
        return back[0].view(b, s, h, d).transpose(1, 2)
    back = back[0][None] if len(back) == 1 else torch.stack(back)
    return back.permute(2, 3, 1, 0, 4, 5).reshape(b, s, h, d).transpose(1, 2)


def _ulysses_staged(q: torch.Tensor, k, v, ulysses: GroupHandle, ring: GroupHandle, keep,
                    side_work=None) -> torch.Tensor:
    """Ulysses with q, k and v in separate exchanges, for inputs that are separate tensors (Wan): q's exchange
    starts first, and k and v, when deferred (callables, attention.py), are computed while the exchanges
    before them are in flight, so only v's exchange and the return are exposed. Each block is
    [B, S/P, hc, D] (token-major for one destination's heads), so the arriving q/k/v of B == 1 are read in
    place as [1, hc, S, D] views.

    Over `ulysses_chunks` head groups (TACO_ULYSSES_CHUNKS), group c's attention waits only for group c's
    q/k/v, so the later groups' exchanges and the earlier groups' returns run beside an attention.

    Symmetric memory was measured for this layout at batch 1 on groups of 2 (the world's arena; on H200s: the
    Wan 14B guided step under CFG 2 x Ulysses 2, 1542.5 against 1570.3 ms with NCCL; one forward under
    Ulysses 2 on 2 GPUs, 1509.3 against 1553.7 ms; benchmarks/RESULTS.md), so there the automatic transport
    takes it; larger groups are not measured yet. Two head groups measured slower (1532.4 ms). Where
    symmetric memory is used (also with TACO_A2A=symm), it always comes from the arena: k's and v's
    exchanges are built while q's is in flight, and Wan under Ulysses 2 with a rendezvous per exchange
    (a group of the whole world) hung on 2 x H200 (sixth session), as it had on the pairs before."""
    p = ulysses.size
    background = q.shape[0] == 1  # symmetric memory: copy-engine memcpys (2-D where strided), beside the GEMMs
    measured = background and p == 2
    arriving: list[list] = []  # per head group: the pending q, k and v
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = materialize(t)
        b, h, s, d = t.shape
        hp = h // p
        if not arriving:
            n = ulysses_chunks(hp)
            hc = hp // n
            arriving = [[] for _ in range(n)]
        # [n, P, B, S/P, hc, D]: head group c for destination r is heads r*hp + c*hc ... of this rank's tokens
        blocks = t.transpose(1, 2).reshape(b, s, p, n, hc, d).permute(3, 2, 0, 1, 4, 5)
        for c in range(n):
            ex = ulysses.exchange(f"ulysses_{name}{c if n > 1 else ''}", (b, s, hc, d), t.dtype, t.device,
                                  measured=measured, arena=True)
            arriving[c].append(ex.start(blocks[c], background=background))
    before, after = _split_side_work(side_work)
    run_side_work(before)
    returning = []
    for c in range(n):
        qkv = []
        for pending in arriving[c]:
            recv = pending.wait()  # [P, B, S/P, hc, D], sequence in rank order
            qkv.append(recv.view(1, p * s, hc, d).transpose(1, 2) if b == 1
                       else recv.transpose(0, 1).reshape(b, p * s, hc, d).transpose(1, 2))
        returning.append(_send_back(ring_attention(*qkv, ring, keep), ulysses, f"ulysses_out{c}", measured,
                                    background, arena=True, interleave=n == 1))
    run_side_work(after)
    return _interleave(returning, b, s, h, d)


def _heads_to_seq(x: torch.Tensor, group: GroupHandle) -> torch.Tensor:
    """Inverse of _seq_to_heads: [B, H/P, S, D] -> [B, H, S/P, D], returned token-major ([B, S/P, H, D] in
    memory, so the caller's [B, S/P, H*D] view is free). Attention output that is token-major already
    (cuDNN's, for packed inputs) is sent as it is; the one copy is the arriving head groups' interleave."""
    p = group.size
    b, hp, s, d = x.shape
    send = x.transpose(1, 2).reshape(b, p, s // p, hp, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    group.all_to_all_single(recv, send)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * hp, d).transpose(1, 2)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses: GroupHandle, ring: GroupHandle,
                  kv_keep_global: torch.Tensor | None = None, side_work=None, kv_keep_blocks=None) -> torch.Tensor:
    """Ulysses inside, Ring outside. `kv_keep_global`: bool [S_total] over the sequence-group order
    (chunk of sp-rank 0, chunk of sp-rank 1, ...), True for real tokens; or `kv_keep_blocks`, the real
    keys' indices per ring block found beforehand (sequence_parallel.ring_blocks: no read-back from the GPU
    here). `side_work`: (before, after) callables independent of this attention, run while the Ulysses
    exchanges are in flight (else first)."""
    heads = q.shape[1]
    if heads % ulysses.size != 0:
        raise ValueError(f"Ulysses degree {ulysses.size} does not divide the {heads} attention heads; "
                         f"use a Ulysses degree that divides {heads} and put the rest in ring degree")
    keep = kv_keep_blocks
    if keep is None and kv_keep_global is not None:
        # After the all-to-all this rank holds the ring slot `ring.rank_in_group`: its keys are the
        # chunks of sp ranks [slot*U, (slot+1)*U). Each ring block is one such slot.
        blocks = kv_keep_global.reshape(ring.size, -1)
        keep = [None if bool(b.all()) else b.nonzero().squeeze(1).to(q.device) for b in blocks]
    if callable(k) or callable(v):  # deferred k/v (attention.py)
        if ulysses.size > 1:
            return _ulysses_staged(q, k, v, ulysses, ring, keep, side_work)
        k, v = materialize(k), materialize(v)
    if ulysses.size > 1 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype:
        return _ulysses_attention(q, k, v, ulysses, ring, keep, side_work)
    if ulysses.size == 1 and ring.size > 1 and ring_mode() == "gather":
        return ring_gathered(q, k, v, ring, keep, side_work)
    run_side_work(side_work)
    if ulysses.size == 1:
        return ring_attention(q, k, v, ring, keep)
    q, k, v = (_seq_to_heads(t, ulysses) for t in (q, k, v))
    out = _heads_to_seq(ring_attention(q, k, v, ring, keep), ulysses)
    return out
