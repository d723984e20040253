"""Does the attention of a rank's share lose its last wave, and can that be won back?

Flux 1024² on 2 GPUs (ring 2) gives each rank 2304 queries over 4608 keys, 24 heads: cuDNN's kernel runs 64-query
tiles two to an SM, so 864 tiles make 3.27 waves of 264 and the fourth wave is a quarter full (RESULTS.md, tenth
session: 13 % less efficient than one GPU's call). Here the heads are split: the first `main` heads make whole
waves (22 heads = 792 tiles = 3 waves) and the rest attend over `parts` parts of the keys in one batched call,
merged by their log-sum-exps (`fused.lse_merge`). Three things are measured on one GPU:

1. kernels: PyTorch's single cuDNN call against the split (main heads by PyTorch + a copy into place, or by
   cuDNN's frontend writing in place), each in a CUDA graph of 20 calls;
2. every execution plan cuDNN's frontend offers for the rank shape and for one GPU's shape (is there a faster
   kernel than the one PyTorch's heuristic gets?);
3. a mini-step that runs like a power-capped Flux step: 38 single blocks at a rank's 2304 rows (q/k/v GEMM, the
   MLP GEMM with GELU, the attention, the output GEMM), 38 distinct weight sets, replayed for seconds so the
   card sits at its power limit, variants alternating, so a kernel-level gain is seen as it would survive.

    python3 benchmarks/probe_attention_tail.py --out $OUT/attention_tail.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy.ldm.modules.fused import lse_merge, lse_merge_reference  # noqa: E402
from comfy.taco_dit.utils import wave_attention  # noqa: E402
from comfy.taco_dit.utils.wave_attention import graph_of  # noqa: E402

H, D = 24, 128
OUT_PATH = None


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    if OUT_PATH:
        with open(OUT_PATH, "a") as f:
            f.write(json.dumps(rec) + "\n")


def packed(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, length, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=g)


def qkv_views(p: torch.Tensor):
    return p.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v as [1, H, L, D]


def torch_sdpa(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def graph_ms(fn, reps: int = 20, rounds: int = 7) -> float:
    """Median time per call of `fn` replayed in a CUDA graph of `reps` calls."""
    g = graph_of(fn, reps)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


class Frontend:
    """One cuDNN frontend SDPA graph for fixed shapes and strides; O (and the stats) written where the caller
    says, any strides."""

    def __init__(self, q, k, v, o, stats=None, heur=("A", "FALLBACK")):
        import cudnn
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        self.qt, self.kt, self.vt = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
        ot, st = g.sdpa(name="sdpa", q=self.qt, k=self.kt, v=self.vt, generate_stats=stats is not None,
                        attn_scale=q.shape[-1] ** -0.5)
        ot.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(
            cudnn.data_type.BFLOAT16)
        self.ot, self.st = ot, st
        if stats is not None:
            st.set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride())).set_data_type(
                cudnn.data_type.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([getattr(cudnn.heur_mode, h) for h in heur])
        self.g = g
        self.count = g.get_execution_plan_count()
        self.built: dict = {}
        self.index = None

    def build(self, i: int) -> dict:
        if i not in self.built:
            info = {"index": i}
            try:
                self.g.build_plan_at_index(i)
                info["name"] = str(self.g.get_plan_name_at_index(i))
                ws = self.g.get_workspace_size_plan_at_index(i)
                info["workspace"] = int(ws)
                info["ws"] = torch.empty(max(int(ws), 1), device="cuda", dtype=torch.uint8)
            except Exception as e:  # noqa: BLE001 - report and go on
                info["error"] = f"{type(e).__name__}: {e}"[:200]
            self.built[i] = info
        return self.built[i]

    def run(self, q, k, v, o, stats=None, index=None):
        i = self.index if index is None else index
        info = self.built[i]
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        pack = {self.qt: q, self.kt: k, self.vt: v, self.ot: o}
        if stats is not None:
            pack[self.st] = stats
        self.g.execute_plan_at_index(pack, info["ws"], index=i, handle=self.handle)
        return o


def tail_inputs(q, k, v, main: int, parts: int):
    """The tail heads' queries repeated over `parts` key parts (stride 0), and the keys/values cut into parts."""
    lq, lk = q.shape[2], k.shape[2]
    ht = H - main
    qs, ks = q.stride(), k.stride()
    qt = q[:, main:].as_strided((parts, ht, lq, D), (0, qs[1], qs[2], qs[3]))
    n = lk // parts
    kt = k[:, main:].as_strided((parts, ht, n, D), (n * ks[2], ks[1], ks[2], ks[3]))
    vt = v[:, main:].as_strided((parts, ht, n, D), (n * ks[2], ks[1], ks[2], ks[3]))
    return qt, kt, vt


def make_split(q, k, v, out, main: int, parts: int, fe: Frontend | None):
    """A callable writing attention of q over k/v into `out` ([1, Lq, H, D]) the split way."""
    qt, kt, vt = tail_inputs(q, k, v, main, parts)
    o_view = out[:, :, :main].transpose(1, 2)  # [1, main, Lq, D]
    tail_out = out[0, :, main:].transpose(0, 1)  # [H - main, Lq, D]

    def run():
        if fe is not None:
            fe.run(q[:, :main], k[:, :main], v[:, :main], o_view)
        else:
            o_view.copy_(torch_sdpa(q[:, :main], k[:, :main], v[:, :main]))
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)
        lse = res[1].reshape(parts, H - main, -1).float()
        lse_merge(res[0], lse, tail_out)
        return out

    return run


def kernels(lq: int, lk: int, label: str) -> dict:
    """Part 1 and 2 at one shape. Returns the frontend's best in-place main-call plan index per main count."""
    local, full = packed(lq, 1), packed(lk, 2)
    q = qkv_views(local)[0]
    _, k, v = qkv_views(full)
    ref = torch_sdpa(q, k, v)  # [1, H, Lq, D], token-major in memory
    base = graph_ms(lambda: torch_sdpa(q, k, v))
    emit({"part": "kernel", "shape": label, "variant": "torch_single", "ms": round(base, 4)})
    # every frontend plan for the whole call, in place into a token-major output
    out = torch.empty(1, lq, H, D, device="cuda", dtype=torch.bfloat16)
    o_all = out.transpose(1, 2)
    try:
        fe = Frontend(q, k, v, o_all, heur=("A", "B", "FALLBACK"))
        emit({"part": "plans", "shape": label, "count": fe.count})
        for i in range(fe.count):
            info = fe.build(i)
            rec = {"part": "plan", "shape": label, **{x: info[x] for x in ("index", "name", "workspace", "error")
                                                      if x in info}}
            if "error" not in info:
                try:
                    out.zero_()
                    fe.run(q, k, v, o_all, index=i)
                    torch.cuda.synchronize()
                    rec["max_diff"] = round((o_all.float() - ref.float()).abs().max().item(), 5)
                    rec["ms"] = round(graph_ms(lambda i=i: fe.run(q, k, v, o_all, index=i)), 4)
                    rec["vs_torch"] = round(rec["ms"] / base, 4)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {e}"[:200]
            emit(rec)
    except Exception as e:  # noqa: BLE001
        emit({"part": "plans", "shape": label, "error": f"{type(e).__name__}: {e}"[:300]})
    best = {}
    for main in (20, 21, 22, 23):
        if main >= H:
            continue
        fe_main = None
        o_view = out[:, :, :main].transpose(1, 2)
        try:
            fe_main = Frontend(q[:, :main], k[:, :main], v[:, :main], o_view)
            times = {}
            for i in range(min(fe_main.count, 6)):
                if "error" not in fe_main.build(i):
                    times[i] = graph_ms(lambda i=i: fe_main.run(q[:, :main], k[:, :main], v[:, :main], o_view,
                                                               index=i), rounds=3)
            fe_main.index = min(times, key=times.get)
            best[main] = fe_main
            emit({"part": "kernel", "shape": label, "variant": f"fe_main{main}", "plan": fe_main.index,
                  "ms": round(times[fe_main.index], 4),
                  "torch_main_ms": round(graph_ms(lambda: torch_sdpa(q[:, :main], k[:, :main], v[:, :main])), 4)})
        except Exception as e:  # noqa: BLE001
            emit({"part": "kernel", "shape": label, "variant": f"fe_main{main}",
                  "error": f"{type(e).__name__}: {e}"[:300]})
        for parts in (1, 2, 3, 4):
            if lk % parts:
                continue
            for how, fe in (("copy", None), ("fe", fe_main)):
                if how == "fe" and fe is None:
                    continue
                try:
                    run = make_split(q, k, v, out, main, parts, fe)
                    out.zero_()
                    run()
                    torch.cuda.synchronize()
                    diff = (out.transpose(1, 2).float() - ref.float()).abs().max().item()
                    ms = graph_ms(run)
                    emit({"part": "kernel", "shape": label, "variant": f"split_{how}", "main": main, "parts": parts,
                          "ms": round(ms, 4), "vs_torch": round(ms / base, 4), "max_diff": round(diff, 5)})
                except Exception as e:  # noqa: BLE001
                    emit({"part": "kernel", "shape": label, "variant": f"split_{how}", "main": main, "parts": parts,
                          "error": f"{type(e).__name__}: {e}"[:300]})
    # the production path (wave_attention.run_split) for each of its candidates
    for main, parts in wave_attention.candidates(H, lq, lk, torch.cuda.get_device_properties(0).multi_processor_count):
        try:
            mc = wave_attention._MainCall(q[:, :main], k[:, :main], v[:, :main], out[:, :, :main].transpose(1, 2))
            split = wave_attention.Split(main, parts, mc)
            diff = (wave_attention.run_split(split, q, k, v).float() - ref.float()).abs().max().item()
            ms = graph_ms(lambda split=split: wave_attention.run_split(split, q, k, v))
            emit({"part": "kernel", "shape": label, "variant": "run_split", "main": main, "parts": parts,
                  "ms": round(ms, 4), "vs_torch": round(ms / base, 4), "max_diff": round(diff, 5)})
        except Exception as e:  # noqa: BLE001
            emit({"part": "kernel", "shape": label, "variant": "run_split", "main": main, "parts": parts,
                  "error": f"{type(e).__name__}: {e}"[:300]})
    # the merge alone, against PyTorch ops
    parts, main = 3, 22
    qt, kt, vt = tail_inputs(q, k, v, main, parts)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)
    lse = res[1].reshape(parts, H - main, -1).float()
    tail_out = out[0, :, main:].transpose(0, 1)
    emit({"part": "kernel", "shape": label, "variant": "merge_triton",
          "ms": round(graph_ms(lambda: lse_merge(res[0], lse, tail_out)), 4),
          "torch_ops_ms": round(graph_ms(lambda: tail_out.copy_(lse_merge_reference(res[0], lse))), 4)})
    return best


def mini_step(best: dict, seconds: float) -> None:
    """Part 3: 38 single blocks at a rank's rows, in a graph, variants alternating at the power limit."""
    lq, lk, hidden, mlp, layers = 2304, 4608, 3072, 12288, 38
    g = torch.Generator(device="cuda").manual_seed(5)

    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=g) * cols ** -0.5)

    weights = [(w(3 * hidden, hidden), w(mlp, hidden), w(hidden, hidden + mlp)) for _ in range(layers)]
    x = torch.randn(lq, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    full = packed(lk, 7)  # the gathered keys: this rank's block is its first half
    local = full[:, :lq]
    q, _, _ = qkv_views(local)
    _, k, v = qkv_views(full)
    out = torch.empty(1, lq, H, D, device="cuda", dtype=torch.bfloat16)

    def attention_single():
        return torch_sdpa(q, k, v).transpose(1, 2)

    variants = {"single": attention_single}
    if 22 in best:  # the production path
        mc = wave_attention._MainCall(q[:, :22], k[:, :22], v[:, :22], out[:, :, :22].transpose(1, 2))
        split = wave_attention.Split(22, 3, mc)
        variants["run_split"] = lambda: wave_attention.run_split(split, q, k, v).transpose(1, 2)
    for main, parts, how in ((22, 3, "fe"), (22, 2, "fe"), (22, 3, "copy")):
        fe = best.get(main) if how == "fe" else None
        if how == "fe" and fe is None:
            continue
        run = make_split(q, k, v, out, main, parts, fe)
        variants[f"split_{how}_{main}_{parts}"] = (lambda run=run: run())

    def block_stack(attn_fn):
        def fwd():
            h = x
            for wqkv, wmlp, w2 in weights:
                torch.mm(h, wqkv.t(), out=local.view(lq, 3 * hidden))
                m = torch.nn.functional.gelu(torch.mm(h, wmlp.t()), approximate="tanh")
                part = torch.mm(m, w2[:, hidden:].t())
                a = attn_fn().reshape(lq, hidden)
                h = torch.addmm(part, a, w2[:, :hidden].t())
            return h
        return fwd

    graphs = {}
    for name, fn in variants.items():
        try:
            graphs[name] = capture(block_stack(fn))
        except Exception as e:  # noqa: BLE001
            emit({"part": "mini_step", "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
    alternate(graphs, seconds, "single", {"part": "mini_step"})


def capture(fwd) -> torch.cuda.CUDAGraph:
    """`fwd` run once on a side stream, then captured into a CUDA graph."""
    return graph_of(fwd, reps=1)


def alternate(graphs: dict, seconds: float, base: str, tags: dict) -> dict:
    """Replay the graphs in turn for `seconds` after 3 s of warming to the power limit; emit and return each one's
    median replay time (ms), against `base`'s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        for gr in graphs.values():
            gr.replay()
        torch.cuda.synchronize()
    times: dict = {n: [] for n in graphs}
    t0 = time.perf_counter()
    rounds = 0
    while time.perf_counter() - t0 < seconds:
        rounds += 1
        for name, gr in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(2):  # the first replay of a round pays the switch; the second is timed
                a.record()
                gr.replay()
                b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b))
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    for name, ts in times.items():
        emit({**tags, "variant": name, "ms": round(medians[name], 3), "vs_base": round(medians[name] / medians[base], 4),
              "rounds": rounds, "spread": round((max(ts) - min(ts)) / medians[name], 4)})
    return medians


def main() -> None:
    global OUT_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    OUT_PATH = args.out
    emit({"part": "env", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
          "cudnn": torch.backends.cudnn.version()})
    best = kernels(2304, 4608, "ring2")
    kernels(4608, 4608, "1gpu")
    mini_step(best, args.seconds)


if __name__ == "__main__":
    main()
