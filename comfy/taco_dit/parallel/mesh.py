"""The parallel layout: which ranks work together on what.

One `MeshDims` (validated degrees) and one `ParallelMesh` (the process groups) are built once per
process and passed explicitly. Rank layout follows xDiT's order with sequence-parallel ranks adjacent:
`arange(world).reshape(dp, cfg, ring, ulysses)`, so a Ulysses group is a run of consecutive ranks (the
all-to-all stays inside one NVLink island where it can), ring groups stride over Ulysses groups, and
the CFG pair sits outside the sequence group. Every group wrapper's collectives return at once when the
group has one rank, so the single-GPU path runs the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MeshDims:
    world_size: int
    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "cfg", "ring", "ulysses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 ({self.describe()})")
        if self.cfg not in (1, 2):
            raise ValueError(f"CFG parallel degree must be 1 or 2, got {self.cfg} ({self.describe()})")
        product = self.dp * self.cfg * self.ring * self.ulysses
        if product != self.world_size:
            raise ValueError(f"Parallel degrees multiply to {product} but there are {self.world_size} ranks "
                             f"({self.describe()}); make dp*cfg*ring*ulysses equal the number of GPUs")

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    def describe(self) -> str:
        return (f"world_size={self.world_size}, data_parallel={self.dp}, cfg_parallel={self.cfg}, "
                f"ring={self.ring}, ulysses={self.ulysses}")

    def groups(self) -> dict[str, list[list[int]]]:
        """Rank lists of every group kind (pure function of the degrees; tested without processes)."""
        grid = torch.arange(self.world_size).reshape(self.dp, self.cfg, self.ring, self.ulysses)

        def along(*dims: int) -> list[list[int]]:
            # Move the group's dims last, flatten the others: each row is one group.
            others = [d for d in range(4) if d not in dims]
            g = grid.permute(*others, *dims).reshape(-1, int(torch.tensor([grid.shape[d] for d in dims]).prod()))
            return [row.tolist() for row in g]

        return {
            "ulysses": along(3),
            "ring": along(2),
            "sp": along(2, 3),
            "cfg": along(1),
            "dp": along(0),
        }


class GroupHandle:
    """One process group seen from one rank; collectives are no-ops at size 1."""

    def __init__(self, ranks: list[int], group, rank: int):
        self.ranks = ranks
        self.group = group
        self.size = len(ranks)
        self.rank_in_group = ranks.index(rank) if rank in ranks else -1
        self._exchanges: dict = {}
        self._last_exchange = None  # the last symmetric-memory exchange started (reuse rule: exchange.py)
        self._symmetric_failed = False

    def exchange(self, name: str, block_shape: tuple, dtype: torch.dtype, device: torch.device,
                 measured: bool = False, arena: bool = False):
        """The all-to-all exchange `name` of equal `block_shape` blocks (see exchange.py), kept for reuse.
        Its first use is collective when the transport is symmetric memory. `measured`: symmetric memory
        was measured for this kind of exchange, so the automatic transport may pick it. `arena`: symmetric
        memory, where chosen, comes from the world's arena even for a group of every rank (exchanges built
        while others are in flight, as Wan's staged k and v: see sp_attention._ulysses_staged)."""
        from comfy.taco_dit.parallel.exchange import (
            ArenaExchange,
            ArenaFull,
            NcclExchange,
            SymmetricExchange,
            transport,
        )

        key = (name, tuple(block_shape), dtype, device)
        ex = self._exchanges.get(key)
        if ex is None:
            kind = "nccl" if self._symmetric_failed else transport(device, self, measured)
            if kind == "symm" and arena:
                kind = "arena"
            ex = None
            if kind in ("symm", "arena"):
                try:
                    cls = SymmetricExchange if kind == "symm" else ArenaExchange
                    ex = cls(self, tuple(block_shape), dtype, device, channel=0)
                    if not any(isinstance(e, SymmetricExchange) for e in self._exchanges.values()):
                        logging.info("Ulysses exchanges of ranks %s: direct NVLink writes (symmetric memory%s; "
                                     "TACO_A2A=nccl for NCCL's all-to-all)", self.ranks,
                                     "" if kind == "symm" else ", slices of the world's arena")
                except ArenaFull as e:  # this shape only; the members of the group agree (same requests)
                    logging.info("Exchange %s %s of ranks %s by NCCL: %s", name, tuple(block_shape), self.ranks, e)
                except Exception as e:  # noqa: BLE001 - every rank fails alike (same GPUs, same torch)
                    self._symmetric_failed = True
                    logging.warning("Symmetric-memory all-to-all unavailable (%s: %s); using NCCL's",
                                    type(e).__name__, e)
            if ex is None:
                ex = NcclExchange(self, tuple(block_shape), dtype, device)
            self._exchanges[key] = ex
        return ex

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all_single(self, output: torch.Tensor, tensor: torch.Tensor, async_op: bool = False):
        """`output` filled from every rank's slice of `tensor`; with async_op, the collective's Work (its
        `wait()` orders the current stream after it on GPUs)."""
        work = dist.all_to_all_single(output, tensor, group=self.group, async_op=async_op)
        return work if async_op else output

    def ring_exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send `tensor` to the next rank of the group, return the one from the previous rank."""
        if self.size == 1:
            return tensor
        nxt = self.ranks[(self.rank_in_group + 1) % self.size]
        prv = self.ranks[(self.rank_in_group - 1) % self.size]
        recv = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), nxt, group=self.group),
               dist.P2POp(dist.irecv, recv, prv, group=self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return recv


class ParallelMesh:
    """All strategy groups of this process. Building it is collective: every rank must call it."""

    def __init__(self, dims: MeshDims, rank: int | None = None, backend: str | None = None):
        self.dims = dims
        if dims.world_size == 1 or not dist.is_initialized():
            if dims.world_size != 1:
                raise RuntimeError(f"A mesh of {dims.world_size} ranks needs torch.distributed initialised")
            self.rank = 0
            self._groups = {k: GroupHandle([0], None, 0) for k in ("ulysses", "ring", "sp", "cfg", "dp")}
            return
        self.rank = dist.get_rank() if rank is None else rank
        self._groups = {}
        for kind, rank_lists in dims.groups().items():
            mine = None
            for ranks in rank_lists:
                # new_group is collective over the whole world, so every rank creates every group.
                g = dist.new_group(ranks, backend=backend) if len(ranks) > 1 else None
                if self.rank in ranks:
                    mine = GroupHandle(ranks, g, self.rank)
            self._groups[kind] = mine

    def group(self, kind: str) -> GroupHandle:
        return self._groups[kind]

    @property
    def ulysses(self) -> GroupHandle:
        return self._groups["ulysses"]

    @property
    def ring(self) -> GroupHandle:
        return self._groups["ring"]

    @property
    def sp(self) -> GroupHandle:
        return self._groups["sp"]

    @property
    def cfg(self) -> GroupHandle:
        return self._groups["cfg"]

    @property
    def dp(self) -> GroupHandle:
        return self._groups["dp"]
