"""Large linear layers through cuBLASLt with the fastest algorithm that gives the heuristic's result bit for bit.

cuBLAS's heuristic picks one kernel per GEMM shape, and for the shapes a rank sees under sequence parallel
it can pick a slow one. On an H200 Wan 14B's 5120 x 5120 projection over one GPU's 32760 tokens runs a
256x152-tile kernel; over a Ulysses-2 rank's 16380 tokens the heuristic switches to a 192x192 one that costs
5-18 % more per row (benchmarks/RESULTS.md, calls s29, s38 and s61). TunableOp (`gemm_tuning`) found faster
kernels, but may change the rounding and gained nothing end to end (call s27).

Here, the first time a shape is seen outside graph capture, cuBLASLt is asked for its candidate algorithms
for the same GEMM with the same epilogue (bias, or bias + tanh GELU, as `torch.nn.functional.linear` and
`torch._addmm_activation` use). Each candidate runs once on the real inputs and is kept only when its output
equals PyTorch's own result bit for bit (so one GPU and N GPUs still agree exactly); the survivors and
PyTorch's path are timed in alternating rounds, and the fastest wins when it beats PyTorch by `TACO_LT_GEMM_GAIN`
(default 1 %). Later calls of that shape take the winner: one cublasLtMatmul, captured into CUDA graphs like any
other kernel launch. The library is reached with ctypes (the libcublasLt PyTorch already loaded), so nothing is
built. Each rank decides alone (no collective inside a GEMM).

Measured on 4 x H200 (benchmarks/RESULTS.md, calls s62-s65): Wan 14B under CFG 2 x Ulysses 2 (16380 rows a rank)
took 1434-1436 ms a guided step against 1497-1499 ms with PyTorch's choice (s65), bit-identical; one GPU's 32760
rows gained nothing. Flux 1024²'s GEMMs (at most 4608 rows) did not gain: the isolated timing, with the operands
warm in L2, did not carry over to the model (its 1-GPU step was 0.5-1.8 % slower, s63). Hence shapes below
`TACO_LT_GEMM_MIN_ROWS` rows (default 8192) or 2**22 weight elements keep PyTorch's path, as do torch.compile,
CPU tensors, other dtypes and layouts cuBLASLt cannot take directly. `TACO_LT_GEMM=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# cublasLt enums (cublasLt.h / library_types.h)
_COMPUTE_32F, _R_32F, _R_16F, _R_16BF = 68, 0, 2, 14
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_EPI_DEFAULT, _EPI_BIAS, _EPI_GELU_BIAS = 1, 4, 36
_PREF_MAX_WORKSPACE = 1
_PREF_MIN_ALIGN = (5, 6, 7, 8)  # A, B, C, D
_OP_N, _OP_T = 0, 1
_WORKSPACE = 32 << 20
_CANDIDATES = 16
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _settings() -> tuple[bool, int, float]:
    """(on, minimum rows, required gain) from TACO_LT_GEMM, TACO_LT_GEMM_MIN_ROWS and TACO_LT_GEMM_GAIN, read once at
    import: `refusal` runs before every CUDA linear layer, so it reads module constants, not the environment."""
    on = os.environ.get("TACO_LT_GEMM", "1").strip().lower() not in ("0", "off", "false", "no")
    return on, int(os.environ.get("TACO_LT_GEMM_MIN_ROWS", "8192")), float(os.environ.get("TACO_LT_GEMM_GAIN", "0.01"))


ENABLED, MIN_ROWS, GAIN = _settings()


class _Library:
    """libcublasLt as PyTorch loaded it, and one handle per device."""

    def __init__(self):
        self.lib = ctypes.CDLL(self._path())
        self.handles: dict[int, ctypes.c_void_p] = {}
        self.workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _path() -> str:
        torch.cuda.init()
        torch.empty(1, device="cuda") @ torch.empty(1, 1, device="cuda")[0]  # make sure cuBLAS is loaded
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    if "libcublasLt.so" in line:
                        return line.split(None, 5)[-1].strip()
        except OSError:
            pass
        return "libcublasLt.so"

    def check(self, status: int, what: str):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def handle(self, device: int) -> ctypes.c_void_p:
        if device not in self.handles:
            h = ctypes.c_void_p()
            with torch.cuda.device(device):
                self.check(self.lib.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            self.handles[device] = h
        return self.handles[device]

    def workspace(self, device: int, stream: int) -> torch.Tensor:
        """The stream's workspace: GEMMs on other streams may run at the same time. One first asked for inside a
        graph capture comes from the graph's memory pool and stays referenced here, so it is never handed out
        again."""
        key = (device, stream)
        if key not in self.workspaces:
            self.workspaces[key] = torch.empty(_WORKSPACE, dtype=torch.uint8, device=device)
        return self.workspaces[key]


_LIB: _Library | None = None
_BROKEN = False
_PLANS: dict[tuple, "_Plan | None"] = {}
_STATS: dict[tuple, dict] = {}


def _library() -> _Library | None:
    global _LIB, _BROKEN
    if _LIB is None and not _BROKEN:
        try:
            _LIB = _Library()
        except (OSError, AttributeError, RuntimeError) as e:
            _BROKEN = True
            log.info("cuBLASLt GEMM choice off: %s", e)
    return _LIB


def _align(ptr: int) -> int:
    return min(256, ptr & -ptr) if ptr else 256


class _Plan:
    """One GEMM shape's descriptors: D[N, M] (column major) = op(W)[N, K] @ X^T[K, M] (+ bias, GELU), which is
    the row-major y[M, N] = x[M, K] @ w[N, K]^T the model asks for."""

    def __init__(self, lib: _Library, m: int, n: int, k: int, ldx: int, ldw: int, dtype: int, epilogue: int,
                 aligns: tuple[int, int, int, int]):
        self.lib, self.epilogue = lib, epilogue
        L = lib.lib
        self.desc = ctypes.c_void_p()
        lib.check(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
        for attr, value in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N), (_DESC_EPILOGUE, epilogue)):
            v = ctypes.c_int32(value)
            lib.check(L.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "MatmulDescSetAttribute")
        self.layouts = []
        for rows, cols, ld in ((k, n, ldw), (k, m, ldx), (n, m, n)):
            lay = ctypes.c_void_p()
            lib.check(L.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, ctypes.c_uint64(rows),
                                                   ctypes.c_uint64(cols), ctypes.c_int64(ld)), "MatrixLayoutCreate")
            self.layouts.append(lay)
        self.aligns = aligns
        self.algo: _Heuristic | None = None
        self.bias_ptr = ctypes.c_void_p()

    def set_bias(self, ptr: int):
        if self.epilogue != _EPI_DEFAULT and ptr != self.bias_ptr.value:
            self.bias_ptr.value = ptr
            self.lib.check(self.lib.lib.cublasLtMatmulDescSetAttribute(
                self.desc, _DESC_BIAS_POINTER, ctypes.byref(self.bias_ptr), 8), "MatmulDescSetAttribute(bias)")

    def candidates(self, device: int, bias_ptr: int) -> list[_Heuristic]:
        L, lib = self.lib.lib, self.lib
        self.set_bias(bias_ptr)
        pref = ctypes.c_void_p()
        lib.check(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        try:
            ws = ctypes.c_uint64(_WORKSPACE)
            lib.check(L.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), 8),
                      "MatmulPreferenceSetAttribute")
            for attr, a in zip(_PREF_MIN_ALIGN, self.aligns):
                v = ctypes.c_uint32(a)
                lib.check(L.cublasLtMatmulPreferenceSetAttribute(pref, attr, ctypes.byref(v), 4),
                          "MatmulPreferenceSetAttribute(alignment)")
            results = (_Heuristic * _CANDIDATES)()
            count = ctypes.c_int(0)
            a, b, d = self.layouts
            lib.check(L.cublasLtMatmulAlgoGetHeuristic(lib.handle(device), self.desc, a, b, d, d, pref, _CANDIDATES,
                                                       results, ctypes.byref(count)), "MatmulAlgoGetHeuristic")
            return [results[i] for i in range(count.value) if results[i].state == 0]
        finally:
            L.cublasLtMatmulPreferenceDestroy(pref)

    def run(self, algo: _Heuristic, x: torch.Tensor, w: torch.Tensor, bias_ptr: int, out: torch.Tensor) -> None:
        device = out.device.index
        stream = torch.cuda.current_stream(device).cuda_stream
        ws = self.lib.workspace(device, stream)
        self.set_bias(bias_ptr)
        a, b, d = self.layouts
        self.lib.check(self.lib.lib.cublasLtMatmul(
            self.lib.handle(device), self.desc, ctypes.byref(self.lib._one), ctypes.c_void_p(w.data_ptr()), a,
            ctypes.c_void_p(x.data_ptr()), b, ctypes.byref(self.lib._zero), ctypes.c_void_p(out.data_ptr()), d,
            ctypes.c_void_p(out.data_ptr()), d, ctypes.byref(algo.algo), ctypes.c_void_p(ws.data_ptr()),
            ctypes.c_size_t(_WORKSPACE), ctypes.c_void_p(stream)), "cublasLtMatmul")


def _torch_path(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    if gelu:
        return torch._addmm_activation(b, x2, w.t(), use_gelu=True)
    return torch.nn.functional.linear(x2, w, b)


def time_calls(fns: list, rounds: int = 12, budget_s: float = 0.003) -> list[float]:
    """GPU time of one call of each of `fns`, in ms. A round runs each function `reps` times back to back between
    two events (the launch cost stays off the clock); the order rotates from round to round, so that no function
    is always measured first or last while the clock settles under the power cap, and each function's rounds are
    summed."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fns[0]()
    start.record()
    fns[0]()
    stop.record()
    stop.synchronize()
    reps = max(2, min(20, int(budget_s * 1e3 / max(start.elapsed_time(stop), 1e-3))))
    total = [0.0] * len(fns)
    for r in range(rounds):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            fns[i]()
            start.record()
            for _ in range(reps):
                fns[i]()
            stop.record()
            stop.synchronize()
            total[i] += start.elapsed_time(stop)
    return [t / (rounds * reps) for t in total]


def _tune(plan: _Plan, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> bool:
    """Pick `plan.algo` (see the module's docstring); True when one beats PyTorch's path."""
    bias_ptr = b.data_ptr() if b is not None else 0
    reference = _torch_path(x2, w, b, gelu)
    out = torch.empty_like(reference)
    same, tried = [], plan.candidates(x2.device.index, bias_ptr)
    for cand in tried:
        try:
            plan.run(cand, x2, w, bias_ptr, out)
            if torch.equal(out, reference):
                same.append(cand)
        except RuntimeError:
            continue
    if not same:
        return False
    times = time_calls([lambda: _torch_path(x2, w, b, gelu)]
                      + [lambda c=c: plan.run(c, x2, w, bias_ptr, out) for c in same])
    base = times[0]
    best_ms, best = min(zip(times[1:], same), key=lambda t: t[0])
    chosen = best_ms < base * (1.0 - GAIN)
    _STATS[(x2.shape[0], w.shape[0], w.shape[1], gelu)] = dict(
        candidates=len(tried), identical_candidates=len(same), tune_torch_ms=round(base, 4),
        tune_best_ms=round(best_ms, 4), best_waves=round(best.waves, 3), lt_chosen=chosen)
    if chosen:
        plan.algo = best
    return chosen


def refusal(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> str | None:
    """Why this GEMM keeps PyTorch's path without being tuned ("off", "device", "dtype", "size", "layout",
    "bias", "autograd"), or None when it is a candidate for a cuBLASLt algorithm."""
    if not x.is_cuda:
        return "device"
    k, n = x.shape[-1], w.shape[0]
    if x.numel() < MIN_ROWS * k or n * k < (1 << 22):
        return "size"
    if not ENABLED:
        return "off"
    if w.device != x.device:
        return "device"
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        return "dtype"
    if w.shape[1] != k or w.stride(1) != 1 or w.stride(0) < k:
        return "layout"
    if (gelu and b is None) or (b is not None and (b.dtype != x.dtype or b.stride(0) != 1 or b.numel() != n)):
        return "bias"
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return "autograd"
    return None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor | None:
    """x @ w^T (+ b, then the tanh GELU when `gelu`) through the shape's chosen cuBLASLt algorithm, or None when
    the caller should take PyTorch's path (`refusal`, or no candidate faster than it)."""
    if refusal(x, w, b, gelu) is not None:
        return None
    k, n = x.shape[-1], w.shape[0]
    m = x.numel() // k
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1 or x2.stride(0) < k:
        return None
    aligns = (_align(w.data_ptr()), _align(x2.data_ptr()), 256, 256)
    bias_align = _align(b.data_ptr()) if b is not None else 0
    key = (x.device.index, x.dtype, m, n, k, x2.stride(0), w.stride(0), b is not None, gelu, aligns, bias_align)
    plan = _PLANS.get(key, False)
    if plan is False:
        if torch.cuda.is_current_stream_capturing():
            return None  # tuning synchronises: only outside a capture
        lib = _library()
        if lib is None:
            return None
        epilogue = _EPI_GELU_BIAS if gelu else (_EPI_BIAS if b is not None else _EPI_DEFAULT)
        t0 = time.perf_counter()
        _STATS.pop((m, n, k, gelu), None)  # the log below reports this tuning only
        try:
            plan = _Plan(lib, m, n, k, x2.stride(0), w.stride(0), _DTYPES[x.dtype], epilogue, aligns)
            if not _tune(plan, x2, w, b, gelu):
                plan = None
        except RuntimeError as e:
            log.info("cuBLASLt GEMM choice for %dx%dx%d failed (%s): PyTorch's path kept", m, n, k, e)
            plan = None
        _PLANS[key] = plan
        found = _STATS.get((m, n, k, gelu), {})
        log.info("GEMM %d x %d -> %d%s timed in %.1f s (PyTorch %s ms, best bit-identical cuBLASLt %s ms): %s", m, k,
                 n, " + GELU" if gelu else "", time.perf_counter() - t0, found.get("tune_torch_ms", "-"),
                 found.get("tune_best_ms", "-"), "cuBLASLt's algorithm" if plan is not None else "PyTorch's kept")
    if plan is None:
        return None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    plan.run(plan.algo, x2, w, b.data_ptr() if b is not None else 0, out)
    return out.view(*x.shape[:-1], n)


def stats() -> dict[tuple, dict]:
    """What tuning found per (rows, out features, in features, gelu): candidates, how many were bit-identical,
    PyTorch's and the best one's time, and whether cuBLASLt's was chosen (for benchmarks and tests)."""
    return dict(_STATS)
