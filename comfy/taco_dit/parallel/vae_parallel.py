"""VAE parallel: one KL image decode (Flux / SD3 / SD VAE) split by latent rows over the ranks of a group.

Every rank holds the whole latent (the ranks run in lockstep). Rank i decodes rows
`[start_i, start_i + count_i)` of it (a balanced split: counts differ by at most one, every rank gets at
least one row) through a functional copy of `comfy.ldm.models.autoencoder.Decoder.forward` that reads
the modules' weights and changes nothing on them, so the single-rank path is the model's own forward.
What the decoder needs from outside a rank's rows, and how it gets it:

- 3x3 convolutions (padding 1): one row above and one below from the neighbouring ranks (zeros at the
  image's top and bottom edge, which is what padding 1 gives one rank). Both rows travel in one batched
  point-to-point exchange per convolution, started before the convolution of the local rows (computed
  with zero padding) and waited for only to recompute the first and last output rows: on NCCL the
  transfer overlaps the convolution. Before an upsampling convolution the low-resolution edge rows are
  sent (half the bytes) and widened locally, since nearest x2 repeats them. `conv_in` needs no exchange:
  every rank already has the latent's neighbouring rows.
- GroupNorm(32): statistics over the whole image. Each rank computes, in fp32, its per-(sample, group)
  mean and centred sum of squares; one all-gather brings every rank's pair, and the pairs are merged
  exactly (Chan et al.: M2 = sum M2_i + sum n_i (mean_i - mean)^2), so no sum of squares is formed
  around zero. The affine and SiLU then run locally. Where one GPU's decode takes the GroupNorm statistics
  pass (fp16/bf16 on CUDA, comfy/ldm/models/autoencoder.py), the ranks gather fp32 sums and sums of squares
  instead and normalise as that pass does, so N GPUs use the same maths as one.
- The mid-block attention (one head over all pixels): local queries against the keys and values of
  all ranks, gathered in one all-gather (keys and values stacked, rows in image order).
- Nearest upsampling, 1x1 convolutions and the residual adds are local.
- At the end one all-gather of the decoded rows gives every rank the full image.

Communication per decoded chunk, with K = 2 + L*R resnet blocks (2 in the mid block, R per level, L
levels; the Flux/SD VAE: L=4, R=3, K=14): 2K + (L-1) + 1 halo exchanges (every 3x3 conv but conv_in)
and 2K + 4 all-gathers (each GroupNorm, keys/values, output rows): 32 + 32 for the Flux/SD VAE, each
halo exchange moving two rows and each statistics gather 2*B*32 floats per rank. Uneven heights work
(padding rows are added only for the all-gathers and dropped again); a latent with fewer rows than
ranks is decoded whole on every rank. Exact up to the summation order of the GroupNorm statistics and
of the attention (fp32: ~1e-6 relative; float64 agrees to ~1e-13), for any dtype (statistics in fp32
or wider, activations in the model's dtype) and batch size.

Which decodes are split is decided by `decode_group` from the process configuration
(`parallel.vae_parallel`), the latent's shape and the device type only: the same on every rank.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from comfy.ldm.models import autoencoder
from comfy.taco_dit.parallel.mesh import GroupHandle

log = logging.getLogger(__name__)

# what the last parallel decode on this process did (tests and the report read it)
last_decode: dict = {}
_logged: set = set()
_world_groups: dict[tuple[int, int], GroupHandle] = {}


@dataclass(frozen=True)
class RowSplit:
    """How the rows of one resolution are spread over the ranks (counts in rank order)."""

    counts: tuple[int, ...]

    @classmethod
    def balanced(cls, rows: int, parts: int) -> RowSplit:
        base, extra = divmod(rows, parts)
        return cls(tuple(base + (1 if i < extra else 0) for i in range(parts)))

    @property
    def rows(self) -> int:
        return sum(self.counts)

    @property
    def chunk(self) -> int:
        """Rows per rank in the all-gathers (the largest count; smaller ones are padded)."""
        return max(self.counts)

    def start(self, i: int) -> int:
        return sum(self.counts[:i])

    def scaled(self, factor: int) -> RowSplit:
        return RowSplit(tuple(c * factor for c in self.counts))


# -- collectives ----------------------------------------------------------------------------------------------


def _all_gather_stacked(group: GroupHandle, t: torch.Tensor) -> torch.Tensor:
    """[size, *t.shape]: every rank's `t`, in group order (one collective)."""
    t = t.contiguous().unsqueeze(0)
    out = t.new_empty((group.size, *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10+
    gather(out, t, group=group.group)
    return out


class _Halo:
    """The rows just above and below a rank's rows (None at the image's edge), possibly still in flight."""

    def __init__(self, top: torch.Tensor | None, bottom: torch.Tensor | None, works=(), keep=()):
        self.top, self.bottom, self._works, self._keep = top, bottom, list(works), keep

    def wait(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for work in self._works:
            work.wait()
        self._works, self._keep = [], ()
        return self.top, self.bottom


class _Rows:
    """One rank's part of one decode: its place in the group and the row split at the current resolution."""

    def __init__(self, group: GroupHandle, split: RowSplit):
        self.group = group
        self.index = group.rank_in_group
        self.split = split
        self.prev = group.ranks[self.index - 1] if self.index > 0 else None
        self.next = group.ranks[self.index + 1] if self.index < group.size - 1 else None
        self.collectives: Counter = Counter()
        self._fractions: dict = {}

    def fractions(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[ranks, 1, 1]: each rank's share of the rows (made once per decode: no host copy per GroupNorm)."""
        key = (dtype, device)
        if key not in self._fractions:
            total = self.split.rows
            self._fractions[key] = torch.tensor([c / total for c in self.split.counts], dtype=dtype,
                                                device=device).view(-1, 1, 1)
        return self._fractions[key]

    @property
    def count(self) -> int:
        return self.split.counts[self.index]

    def start_halo(self, x: torch.Tensor) -> _Halo:
        """Send this rank's first row up and last row down, receive the neighbours' (one batched exchange)."""
        b, c, _, w = x.shape
        ops, keep, top, bottom = [], [], None, None
        if self.prev is not None:
            top = x.new_empty((b, c, 1, w))
            keep.append(x[:, :, :1].contiguous())
            ops += [dist.P2POp(dist.isend, keep[-1], self.prev, group=self.group.group),
                    dist.P2POp(dist.irecv, top, self.prev, group=self.group.group)]
        if self.next is not None:
            bottom = x.new_empty((b, c, 1, w))
            keep.append(x[:, :, -1:].contiguous())
            ops += [dist.P2POp(dist.isend, keep[-1], self.next, group=self.group.group),
                    dist.P2POp(dist.irecv, bottom, self.next, group=self.group.group)]
        self.collectives["halo_exchange"] += 1
        return _Halo(top, bottom, dist.batch_isend_irecv(ops), keep)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows [B, C, h_i, W] -> the whole [B, C, H, W] on every rank (one all-gather)."""
        chunk = self.split.chunk
        if x.shape[2] < chunk:
            x = F.pad(x, (0, 0, 0, chunk - x.shape[2]))
        parts = _all_gather_stacked(self.group, x)
        self.collectives["all_gather"] += 1
        return torch.cat([parts[i, :, :, :n] for i, n in enumerate(self.split.counts)], dim=2)

    def gather_stats(self, stats: torch.Tensor) -> torch.Tensor:
        self.collectives["all_gather"] += 1
        return _all_gather_stacked(self.group, stats)


# -- the decoder's layers on a rank's rows ------------------------------------------------------------------


def _conv_params(conv, x: torch.Tensor, kernel: int):
    if conv.kernel_size != (kernel, kernel) or conv.stride != (1, 1) or conv.dilation != (1, 1) \
            or conv.groups != 1 or (kernel == 3 and (conv.padding != (1, 1) or conv.padding_mode != "zeros")):
        raise NotImplementedError(f"VAE parallel decode handles 3x3/pad-1 and 1x1 convolutions, not {conv}")
    weight, bias = conv.weight, conv.bias
    if weight.dtype != x.dtype or weight.device != x.device:
        weight = weight.to(x)
        bias = bias.to(x) if bias is not None else None
    return weight, bias


def _conv3x3(rows: _Rows, x: torch.Tensor, conv, halo: _Halo, widen: bool = False) -> torch.Tensor:
    """`conv` (3x3, padding 1) over this rank's rows as if the neighbours' rows were there.

    The local rows are convolved with zero padding while the halo rows travel; then only the output rows
    that see a halo row (the first and the last) are recomputed from 3-row windows. `widen`: the halo
    rows are at half the width of `x` (sent before a nearest x2 upsampling) and are repeated to match."""
    weight, bias = _conv_params(conv, x, 3)
    out = F.conv2d(x, weight, bias, padding=1)
    top, bottom = halo.wait()
    if top is None and bottom is None:
        return out
    if widen:
        top = top.repeat_interleave(2, dim=3) if top is not None else None
        bottom = bottom.repeat_interleave(2, dim=3) if bottom is not None else None
    if x.shape[2] == 1:  # one row: its output sees both halo rows (zeros at the image's edge)
        edge = x.new_zeros((x.shape[0], x.shape[1], 1, x.shape[3]))
        window = torch.cat([top if top is not None else edge, x, bottom if bottom is not None else edge], dim=2)
        return F.conv2d(window, weight, bias, padding=(0, 1))
    if top is not None:
        out[:, :, :1] = F.conv2d(torch.cat([top, x[:, :, :2]], dim=2), weight, bias, padding=(0, 1))
    if bottom is not None:
        out[:, :, -1:] = F.conv2d(torch.cat([x[:, :, -2:], bottom], dim=2), weight, bias, padding=(0, 1))
    return out


def _group_norm(rows: _Rows, x: torch.Tensor, norm, silu: bool) -> torch.Tensor:
    """GroupNorm with the whole image's statistics (fp32, merged exactly across ranks), then SiLU. Where one
    GPU's decode takes the statistics pass (autoencoder.statistics_pass_applies: fp16/bf16 on CUDA), so does
    this: each rank's fp32 sums and sums of squares, gathered and added, with the pass's own normalisation
    (torch's var_mean over an fp32 copy, below, reduces each (sample, group) on a few thread blocks)."""
    b, c, h, w = x.shape
    groups = norm.num_groups
    per = c // groups
    if autoencoder.statistics_pass_applies(x):
        sums = rows.gather_stats(torch.stack(autoencoder.group_sums(x, groups))).sum(0)  # [2, B, G]
        n = float(per * rows.split.rows * w)
        return autoencoder.norm_act_from_stats(norm, x, sums[0] / n, sums[1] / n, silu)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for bf16/fp16/fp32 activations
    x32 = x.to(acc)
    var, mean = torch.var_mean(x32.reshape(b, groups, -1), dim=-1, correction=0)
    local = torch.stack([mean, var * float(per * h * w)])  # [2, B, G]: mean and centred sum of squares
    stats = rows.gather_stats(local)  # [ranks, 2, B, G]
    means, m2s = stats[:, 0], stats[:, 1]
    frac = rows.fractions(acc, x.device)  # n_i / n, the same at every resolution
    g_mean = (frac * means).sum(0)
    # Var = (sum M2_i + sum n_i (mean_i - mean)^2) / n
    var = m2s.sum(0) / float(per * rows.split.rows * w) + (frac * (means - g_mean).square()).sum(0)
    rstd = torch.rsqrt(var + norm.eps)  # [B, G]
    scale = rstd[:, :, None].expand(b, groups, per)
    shift = -g_mean[:, :, None] * scale
    if norm.affine:
        weight = norm.weight.to(acc).view(1, groups, per)
        scale = scale * weight
        shift = shift * weight + norm.bias.to(acc).view(1, groups, per)
    y = torch.addcmul(shift.reshape(b, c, 1, 1), x32, scale.reshape(b, c, 1, 1)).to(x.dtype)
    return F.silu(y, inplace=True) if silu else y


def _resnet(rows: _Rows, x: torch.Tensor, block) -> torch.Tensor:
    h = _group_norm(rows, x, block.norm1, silu=True)
    h = _conv3x3(rows, h, block.conv1, rows.start_halo(h))
    h = _group_norm(rows, h, block.norm2, silu=True)
    h = _conv3x3(rows, h, block.conv2, rows.start_halo(h))
    return (x if block.nin_shortcut is None else block.nin_shortcut(x)) + h


def _attention(rows: _Rows, x: torch.Tensor, attn) -> torch.Tensor:
    b, c, h, w = x.shape
    n = _group_norm(rows, x, attn.norm, silu=False)
    q = attn.q(n).reshape(b, 1, c, h * w).transpose(2, 3)
    kv = rows.gather_rows(torch.cat([attn.k(n), attn.v(n)], dim=1))  # [B, 2C, H, W], rows in image order
    k, v = (t.reshape(b, 1, c, -1).transpose(2, 3) for t in kv.split(c, dim=1))
    o = F.scaled_dot_product_attention(q, k, v)
    return x + attn.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


def _decoder_rows(rows: _Rows, decoder, z_rows: torch.Tensor, z_top, z_bottom) -> torch.Tensor:
    """`Decoder.forward` on this rank's latent rows (with the latent's neighbouring rows, None at the edges)."""
    h = _conv3x3(rows, z_rows, decoder.conv_in, _Halo(z_top, z_bottom))
    h = _resnet(rows, h, decoder.mid.block_1)
    h = _attention(rows, h, decoder.mid.attn_1)
    h = _resnet(rows, h, decoder.mid.block_2)
    for level in reversed(decoder.up):
        for block in level.block:
            h = _resnet(rows, h, block)
        if hasattr(level, "upsample"):
            halo = rows.start_halo(h)  # the low-resolution edge rows; nearest x2 repeats them
            h = _conv3x3(rows, F.interpolate(h, scale_factor=2.0, mode="nearest"), level.upsample.conv, halo,
                         widen=True)
            rows.split = rows.split.scaled(2)
    h = _group_norm(rows, h, decoder.norm_out, silu=True)
    return _conv3x3(rows, h, decoder.conv_out, rows.start_halo(h))


@torch.no_grad()
def decode(autoencoder, z: torch.Tensor, group: GroupHandle) -> torch.Tensor:
    """`autoencoder.decode(z)` (an AutoencoderKL: optional post_quant_conv, then the Decoder) computed by
    the ranks of `group` together; every rank passes the same `z` [B, C, H, W] and gets the whole output.
    A group of one, or fewer latent rows than ranks, decodes whole on each rank. On GPUs the split decode
    is replayed as a CUDA graph where `graph_applies` (see there)."""
    height = z.shape[2]
    if group.size == 1 or height < group.size:
        return autoencoder.decode(z)
    split = RowSplit.balanced(height, group.size)
    if graph_applies(z):
        graphed, counts = _graphed(autoencoder, group)
        out = graphed(z)
    else:
        out, counts = _split_decode(autoencoder, z, group, split)
    last_decode.clear()
    last_decode.update(ranks=group.size, latent_rows=split.counts, collectives=dict(counts))
    return out


# At 1024² on 4 H200s the split decode issued its ~1300 kernels in 28-33 ms of host time while the GPU was busy
# for 19.5 ms of it (bench_vae_parallel.py, call s37): bound by the host, which a CUDA graph takes away.
_GRAPH_MAX_PIXELS = 2048 * 2048  # output pixels per decoded chunk: the graph's pool holds its activations
_graphs: dict = {}


def graph_applies(z: torch.Tensor) -> bool:
    """Whether the split decode of `z` runs as a CUDA graph: CUDA, the GroupNorm statistics pass (so nothing in
    it copies from the host: the merged-moments path makes a small host tensor per decode), at most
    `_GRAPH_MAX_PIXELS` output pixels, unless `TACO_VAE_GRAPH=0`. Decided from the latent and the environment
    only: the same on every rank, which capture needs (every rank captures the same collectives)."""
    if not z.is_cuda or os.environ.get("TACO_VAE_GRAPH", "1") == "0" or not autoencoder.statistics_pass_applies(z):
        return False
    return z.shape[0] * z.shape[2] * z.shape[3] * 64 <= _GRAPH_MAX_PIXELS


def _graphed(model, group: GroupHandle):
    """(graphed split decode, its collective counts) for `model` on `group`, one per set of weights: a graph
    reads the weights where they were when it was captured, so weights that moved (the VAE offloaded and
    loaded again) or changed get a new one, and the old one is dropped with its memory."""
    from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable

    key = (id(model), tuple(group.ranks), tuple(p.data_ptr() for p in model.parameters()))
    entry = _graphs.get(key)
    if entry is None:
        _graphs.clear()
        counts: dict = {}

        def run(z):
            out, seen = _split_decode(model, z, group, RowSplit.balanced(z.shape[2], group.size))
            counts.update(seen)
            return out

        entry = _graphs[key] = (CUDAGraphCallable(run, max_graphs=2), counts)
    return entry


def _split_decode(autoencoder, z: torch.Tensor, group: GroupHandle, split: RowSplit) -> tuple[torch.Tensor, dict]:
    """The split decode itself: (whole output, collectives used)."""
    height = z.shape[2]
    rows = _Rows(group, split)
    start, count = rows.split.start(rows.index), rows.count
    lo, hi = max(start - 1, 0), min(start + count + 1, height)
    zr = z[:, :, lo:hi]
    if autoencoder.post_quant_conv is not None:
        zr = autoencoder.post_quant_conv(zr)  # 1x1: per pixel, so on the rows and their neighbours alike
    z_top = zr[:, :, :1] if start > 0 else None
    z_bottom = zr[:, :, -1:] if start + count < height else None
    z_rows = zr[:, :, start - lo:start - lo + count].contiguous()
    local = _decoder_rows(rows, autoencoder.decoder, z_rows, z_top, z_bottom)
    return rows.gather_rows(local), dict(rows.collectives)


# -- when to split --------------------------------------------------------------------------------------------


def _backend_handles(backend: str, device_type: str) -> bool:
    """Whether the process group's backend can run collectives on tensors of `device_type`."""
    backend = str(backend).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        return any(part.split(":", 1)[0] == device_type for part in backend.split(","))
    return {"gloo": "cpu", "nccl": "cuda"}.get(backend, device_type) == device_type


def plan_vae_parallel(config, *, world: int, rows: int, backend: str, device_type: str) -> tuple[bool, str]:
    """(split?, why) for one decode. Pure function of the configuration, the world size, the latent's row
    count and the backend / device type, all of which are the same on every rank."""
    from comfy.taco_dit.core.config_manager import AUTO

    if world == 1:
        return False, "one rank"
    if config.enabled is False:
        return False, "parallelism disabled (parallel.enabled: false)"
    if config.vae_parallel is False:
        return False, "vae_parallel: false"
    if rows < world:
        return False, f"the latent has {rows} rows, fewer than the {world} ranks: each rank decodes it whole"
    if not _backend_handles(backend, device_type):
        return False, f"the process group's backend ({backend}) cannot exchange {device_type} tensors"
    how = "auto" if config.vae_parallel == AUTO else "true"
    return True, f"{rows} latent rows split over {world} ranks (vae_parallel: {how})"


def world_group() -> GroupHandle:
    """The default process group (all ranks) as a GroupHandle."""
    key = (dist.get_world_size(), dist.get_rank())
    handle = _world_groups.get(key)
    if handle is None:
        handle = _world_groups[key] = GroupHandle(list(range(key[0])), None, key[1])
    return handle


def decode_group(latent_shape, device: torch.device) -> GroupHandle | None:
    """The group a KL image decode of `latent_shape` is split over, or None for the plain decode.
    Logs each distinct choice once (rank 0)."""
    from comfy.taco_dit.core import model_wrapper

    world = model_wrapper.world_size()
    if world == 1:
        return None
    config = model_wrapper.runtime_config(world)
    on, why = plan_vae_parallel(config, world=world, rows=int(latent_shape[-2]), backend=dist.get_backend(),
                                device_type=torch.device(device).type)
    key = (on, why)
    if key not in _logged:
        _logged.add(key)
        if dist.get_rank() == 0:
            log.info("TACO-DiT VAE decode: %s", why if on else f"whole on every rank ({why})")
    return world_group() if on else None
