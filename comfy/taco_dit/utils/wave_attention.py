"""Attention whose small last wave is run over parts of the keys (CUDA, cuDNN).

cuDNN's fused attention on Hopper runs tiles of 64 queries of one head, two tiles to an SM at a time, so a call
runs in waves of 2 x SMs tiles. At a rank's share of a sequence the tiles often fill a few whole waves and a small
last one that leaves most SMs idle: Flux 1024² under ring 2 gives a rank 2304 queries x 24 heads = 864 tiles, 3.27
waves of 264, and its call takes as long as 4 (0.233 ms on an H200, against 0.175 ms for 22 heads' 3 whole waves;
benchmarks/RESULTS.md, twelfth session, call s67).

Here the first `main` heads run as one cuDNN call through cuDNN's frontend (`nvidia-cudnn-frontend`, which
scripts/setup_env.sh multigpu installs without its dependencies), writing straight into their slots of the
token-major output, and the other heads as one batched call of `parts` parts of the keys each (the queries repeated
over the batch by a stride-0 view), whose outputs and log-sum-exps one Triton pass merges into the remaining slots
(`fused.lse_merge`). With 22 heads and 3 parts the tail is 216 tiles of a third of the keys each: one short wave.
s67 measured 0.2095 against 0.2331 ms, and a 38-block stack of a rank's GEMMs and attention at the power limit 40.21
against 40.99 ms. The result differs from the single call by float rounding (max. 0.001 at unit-scale inputs).

The split runs inside CUDA graphs only (see `sdpa`). Which split, if any, is decided per shape on first use outside
graph capture: the candidates whose tail fits in one wave are checked against the single call's output, then timed
against it, each replayed from a CUDA graph, in rotating rounds; the fastest wins if it beats the single call by
`TACO_WAVE_ATTN_GAIN` (default 3 %). Shapes of more than `MAX_WAVES` waves keep the single call untimed (their last wave is a small
part of the call), as do other devices, batch > 1, masks and other dtypes. One GPU's Flux 1024² call (6.5 waves:
a tail of 144 tiles, two heads, that no split fits into one wave) has no candidate and keeps the single call (s67
timed every split there 6-18 % slower). `TACO_WAVE_ATTN=0` turns it off.
Each rank decides alone; a rank whose timing falls the other way only rounds differently.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from comfy.ldm.modules.fused import lse_merge
from comfy.taco_dit.utils.lt_gemm import time_calls

log = logging.getLogger(__name__)

ENABLED = os.environ.get("TACO_WAVE_ATTN", "1").strip().lower() not in ("0", "off", "false", "no")
GAIN = float(os.environ.get("TACO_WAVE_ATTN_GAIN", "0.03"))
MAX_WAVES = 8
TILE_QUERIES = 64  # cuDNN's Hopper forward kernel: 64 queries a tile, two tiles an SM
TILES_PER_SM = 2
MAX_PARTS = 4
_REPS = 10  # calls per timed CUDA graph

_decisions: dict = {}  # shape key -> Split, or None for the single call
_state: dict = {"cudnn": None, "handles": {}}


class Split:
    """`main` heads in one frontend call written in place, the rest over `parts` parts of the keys, merged."""

    def __init__(self, main: int, parts: int, main_call=None):
        self.main, self.parts, self.main_call = main, parts, main_call

    def __repr__(self) -> str:
        return f"Split(main={self.main}, parts={self.parts})"


def waves(q: torch.Tensor, sm_count: int) -> float:
    """Waves of cuDNN tiles the attention of q ([B, H, Lq, D]) fills on `sm_count` SMs."""
    b, h, lq, _ = q.shape
    return b * h * math.ceil(lq / TILE_QUERIES) / (TILES_PER_SM * sm_count)


def candidates(heads: int, lq: int, lk: int, sm_count: int) -> list[tuple[int, int]]:
    """(main, parts) splits whose tail (the heads past `main`, each over `parts` parts of the keys) fits in one
    wave, with `main` heads' tiles rounding down to no more than the whole call's whole waves."""
    per_head = math.ceil(lq / TILE_QUERIES)
    slots = TILES_PER_SM * sm_count
    whole = (heads * per_head) // slots
    out = []
    for main in range(heads - 1, 0, -1):
        if per_head * main > max(whole, 1) * slots:
            continue
        tail = (heads - main) * per_head
        if tail > slots:
            break
        out += [(main, parts) for parts in range(2, MAX_PARTS + 1) if tail * parts <= slots and lk % parts == 0]
    return out


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the split is not considered for this call (None: it is)."""
    if not ENABLED:
        return "TACO_WAVE_ATTN=0"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        return f"dtype {q.dtype}"
    if q.dim() != 4 or q.shape[0] != 1 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return "not [1, H, L, D] with matching heads"
    if q.shape[3] not in (64, 128) or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return "head dim not 64/128 or not contiguous"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper GPU (measured on H200 only)"
    if waves(q, _sm_count(q.device)) > MAX_WAVES:
        return f"more than {MAX_WAVES} waves"
    if _cudnn() is None:
        return "cuDNN's frontend is not installed (pip install --no-deps nvidia-cudnn-frontend)"
    return None


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cudnn():
    if _state["cudnn"] is None:
        try:
            import cudnn
            _state["cudnn"] = cudnn
        except Exception as e:  # noqa: BLE001 - not installed, or no libcudnn it can load
            log.info("cuDNN frontend unavailable (%s): attention keeps one cuDNN call per shape", str(e)[:200])
            _state["cudnn"] = False
    return _state["cudnn"] or None


def _handle(cudnn, device: torch.device):
    if device.index not in _state["handles"]:
        with torch.cuda.device(device):
            _state["handles"][device.index] = cudnn.create_handle()
    return _state["handles"][device.index]


class _MainCall:
    """The first `main` heads through cuDNN's frontend: one graph for fixed shapes and strides, run with any
    pointers, writing O where the caller's view says. It takes the first plan cuDNN's heuristics rank that is a
    cuDNN library engine (the frontend's own Python engines, present when the CuTe DSL is installed, are left
    out: they were not measured)."""

    def __init__(self, q, k, v, o):
        cudnn = _cudnn()
        self.cudnn, self.handle = cudnn, _handle(cudnn, q.device)
        dt = cudnn.data_type.BFLOAT16 if q.dtype == torch.bfloat16 else cudnn.data_type.HALF
        g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        self.q, self.k, self.v = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
        self.o, _ = g.sdpa(name="sdpa", q=self.q, k=self.k, v=self.v, generate_stats=False,
                           attn_scale=q.shape[-1] ** -0.5)
        self.o.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(dt)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.index = None
        for i in range(g.get_execution_plan_count()):
            try:
                engine = g.get_engine_and_knobs_at_index(i)[0]
            except Exception:  # noqa: BLE001 - an older frontend: every plan is a library engine
                engine = 0
            if not 0 <= engine < 20_000:
                continue
            try:
                g.build_plan_at_index(i)
            except Exception:  # noqa: BLE001 - this plan does not build here: the next one
                continue
            self.index, self.workspace = i, int(g.get_workspace_size_plan_at_index(i))
            break
        if self.index is None:
            raise RuntimeError("cuDNN's frontend built no library plan for this attention")
        self.g = g

    def __call__(self, q, k, v, o) -> None:
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(q.device).cuda_stream)
        ws = torch.empty(max(self.workspace, 1), device=q.device, dtype=torch.uint8)
        self.g.execute_plan_at_index({self.q: q, self.k: k, self.v: v, self.o: o}, ws, index=self.index,
                                     handle=self.handle)


def _single(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def tail_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, main: int, parts: int):
    """The heads past `main`: queries repeated over `parts` (a stride-0 batch) and keys/values cut into `parts`
    consecutive parts, as [parts, H - main, L, D] views."""
    ht, lq, d = q.shape[1] - main, q.shape[2], q.shape[3]
    n = k.shape[2] // parts
    qs = q.stride()
    qt = q[:, main:].as_strided((parts, ht, lq, d), (0, qs[1], qs[2], qs[3]))
    kt, vt = (t[:, main:].as_strided((parts, ht, n, d), (n * t.stride(2), t.stride(1), t.stride(2), t.stride(3)))
              for t in (k, v))
    return qt, kt, vt


def run_split(split: Split, q, k, v) -> torch.Tensor:
    """Attention of q over k/v ([1, H, L, D]) the split way: [1, H, Lq, D], token-major in memory."""
    b, h, lq, d = q.shape
    out = torch.empty(b, lq, h, d, device=q.device, dtype=q.dtype)
    main, parts = split.main, split.parts
    split.main_call(q[:, :main], k[:, :main], v[:, :main], out[:, :, :main].transpose(1, 2))
    qt, kt, vt = tail_views(q, k, v, main, parts)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)
    lse_merge(res[0], res[1].reshape(parts, h - main, lq).float(), out[0, :, main:].transpose(0, 1))
    return out.transpose(1, 2)


def choose(times: list[float], gain: float) -> int | None:
    """Index into `times` (times[0]: the single call, then one per split) of the fastest split, when it beats the
    single call by the fraction `gain`; else None."""
    if len(times) < 2:
        return None
    best = min(range(1, len(times)), key=times.__getitem__)
    return best if times[best] < times[0] * (1 - gain) else None


def graph_of(fn, reps: int = _REPS) -> torch.cuda.CUDAGraph:
    """`fn` run once on a side stream, then called `reps` times in one captured CUDA graph (timed by its replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(reps):
            fn()
    return graph


def decide(q, k, v) -> Split | None:
    """Time the candidates for this shape against the single call (see the module's docstring)."""
    splits = candidates(q.shape[1], q.shape[2], k.shape[2], _sm_count(q.device))
    if not splits:
        return None
    reference = _single(q, k, v)
    scale = reference.abs().max().float().clamp_min(1e-6)
    tried, main_calls = [], {}
    for main, parts in splits:
        try:
            if main not in main_calls:
                o = torch.empty(1, q.shape[2], q.shape[1], q.shape[3], device=q.device, dtype=q.dtype)
                main_calls[main] = _MainCall(q[:, :main], k[:, :main], v[:, :main], o[:, :, :main].transpose(1, 2))
            split = Split(main, parts, main_calls[main])
            err = ((run_split(split, q, k, v).float() - reference.float()).abs().max() / scale).item()
            if err > 1 / 64:  # several bf16 roundings at the largest value: anything more is a wrong result
                log.warning("attention split %s disagrees with one cuDNN call (%.4f of the largest value); "
                            "not used", split, err)
                continue
            tried.append(split)
        except Exception as e:  # noqa: BLE001 - a frontend or kernel that does not take it: not a candidate
            log.info("attention split (%d heads, %d parts) unavailable: %s", main, parts, str(e)[:200])
    if not tried:
        return None
    timers = [graph_of(lambda: _single(q, k, v))]
    timers += [graph_of(lambda s=s: run_split(s, q, k, v)) for s in tried]
    times = [t / _REPS for t in time_calls([g.replay for g in timers], rounds=6)]
    del timers
    best = choose(times, GAIN)
    chosen = tried[best - 1] if best is not None else None
    log.info("attention q%s k%s: one call %.4f ms; %s -> %s", tuple(q.shape), tuple(k.shape), times[0],
             ", ".join(f"{s.main}/{s.parts} {t:.4f} ms" for s, t in zip(tried, times[1:])),
             chosen or "one call")
    return chosen


def _key(q, k, v) -> tuple:
    return (q.device.index, q.dtype, tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride())


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Attention through the chosen split of this shape while a CUDA graph is captured, or None where the
    caller's single call should run: refused, decided against, first seen under capture, or eager. Eager calls
    decide (the warm-up before a capture) but keep the single call: the frontend's execute is Python work on every
    call, which a graph pays once; eager 2-GPU Flux steps measured 117.0 and 119.2 ms with the split against 103.0
    and 86.5 ms without (call s68), their GPU work starved by the host."""
    if refusal(q, k, v) is not None:
        return None
    key = _key(q, k, v)
    capturing = torch.cuda.is_current_stream_capturing()
    if key not in _decisions:
        if capturing:
            return None
        try:
            _decisions[key] = decide(q, k, v)
        except Exception as e:  # noqa: BLE001 - never let the split break attention
            log.warning("attention split tuning failed (%s); one cuDNN call per layer", str(e)[:300])
            _decisions[key] = None
    split = _decisions[key]
    return run_split(split, q, k, v) if split is not None and capturing else None


def decisions() -> dict:
    """Shape key -> the chosen Split or None, for benchmarks and tests."""
    return dict(_decisions)
