"""Why a Wan 14B forward under Ulysses 2 costs more than half of one GPU's (sixth session profile: matmuls
+11 %, attention +6.5 % per unit of work on the same GPU). On one GPU, for the shapes of 1 and 2 GPUs:

- the block's GEMMs (x [M, 5120] by [5120, 5120] with bias; q, k and v as one [5120 -> 15360] GEMM; the FFN's
  [5120 -> 13824] with GELU) at the token counts M of one GPU (32760) and of Ulysses 2 (16380), with torch's
  default BLAS library and cuBLASLt, or (PROBE_TUNABLE=1) with TunableOp trying every solution it has;
- the self-attention (cuDNN via SDPA, q/k/v [1, H, 32760, 128] as token-major views) with 40 and 20 heads,
  from ordinary memory, from a symmetric-memory buffer (as the arena's receive buffers are), and copied
  from there into ordinary memory first (the copy timed with it); 20 heads three rounds, alternating.

    torchrun --nproc_per_node=1 benchmarks/probe_wan_kernels.py       (the symmetric buffer needs a group)

One JSON line per measurement, to stdout and $OUT/wan_kernels.jsonl.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe_alltoall import init_nccl  # noqa: E402
from probe_attention import bench  # noqa: E402

from comfy.ldm.modules.attention import optimized_attention  # noqa: E402
from comfy.ops import linear_gelu  # noqa: E402


def emit(out: str, rec: dict) -> None:
    rec["card"] = torch.cuda.get_device_name()
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main() -> None:
    dev = init_nccl()
    out = os.path.join(os.environ.get("OUT", "."), "wan_kernels.jsonl")
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    dim, ffn = 5120, 13824
    proj = torch.nn.Linear(dim, dim, device=dev, dtype=dt)
    up = torch.nn.Linear(dim, ffn, device=dev, dtype=dt)
    if os.environ.get("PROBE_TUNABLE") == "1":
        # the same GEMMs with torch's TunableOp: every cuBLAS / cuBLASLt solution it knows tried per shape
        import torch.cuda.tunable as tunable

        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_max_tuning_duration(200)
        tunable.set_filename(os.path.join(os.environ.get("OUT", "."), "tunableop_results%d.csv"))
    libraries = ["default"]
    if hasattr(torch.backends.cuda, "preferred_blas_library") and os.environ.get("PROBE_TUNABLE") != "1":
        libraries += ["cublaslt"]
    default_lib = torch.backends.cuda.preferred_blas_library() if len(libraries) > 1 else None
    qkv = torch.nn.Linear(dim, 3 * dim, device=dev, dtype=dt)
    for lib in libraries:
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        for m in (32760, 16380):
            x = torch.randn(m, dim, device=dev, dtype=dt, generator=g)
            with torch.no_grad():
                ms = bench(lambda: F.linear(x, proj.weight, proj.bias))
                ms_qkv = bench(lambda: F.linear(x, qkv.weight, qkv.bias))
                ms_ffn = bench(lambda: linear_gelu(up, x))
            emit(out, {"what": "gemm", "blas": lib, "tunable": os.environ.get("PROBE_TUNABLE") == "1", "rows": m,
                       "proj_ms": round(ms, 4), "proj_ms_per_16380_rows": round(ms * 16380 / m, 4),
                       "qkv_fused_ms_per_projection": round(ms_qkv / 3, 4),
                       "ffn_up_gelu_ms": round(ms_ffn, 4), "ffn_ms_per_16380_rows": round(ms_ffn * 16380 / m, 4)})
        if default_lib is not None:
            torch.backends.cuda.preferred_blas_library(default_lib)
    if os.environ.get("PROBE_TUNABLE") == "1":
        import torch.cuda.tunable as tunable

        tunable.enable(False)

    import torch.distributed._symmetric_memory as symm_mem

    seq, d = 32760, 128
    for heads in (40, 20):
        n = 3 * seq * heads * d
        plain = torch.randn(n, device=dev, dtype=dt, generator=g)
        symm = symm_mem.empty(n, dtype=dt, device=dev)
        symm_mem.rendezvous(symm, dist.group.WORLD.group_name)
        symm.copy_(plain)
        copied = torch.empty_like(plain)
        # alternating, three rounds each, so a drift of the clocks shows as such
        for round_ in range(3 if heads == 20 else 1):
            for where, buf in (("ordinary", plain), ("symmetric", symm), ("symmetric, copied first", symm)):
                def run(buf=buf, where=where):
                    if where.endswith("copied first"):
                        copied.copy_(buf)
                        buf = copied
                    # [3, 1, S, H, D] token-major: q, k, v as [1, H, S, D] views, the layout Ulysses hands over
                    q, k, v = buf.view(3, 1, seq, heads, d).transpose(2, 3).unbind(0)
                    return optimized_attention(q, k, v, heads, skip_reshape=True)
                with torch.no_grad():
                    ms = bench(run, iters=5)
                emit(out, {"what": "attention", "heads": heads, "tokens": seq, "memory": where, "round": round_,
                           "ms": round(ms, 3), "ms_per_20_heads": round(ms * 20 / heads, 3)})
        del symm
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
