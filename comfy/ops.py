"""Layer classes the models are built from, and how their weights are stored vs. computed.

Two families, chosen per model by `pick_operations`:

- `disable_weight_init`: torch layers that skip random initialisation (weights always come from a
  checkpoint, and initialising a 12B-parameter model would cost seconds for nothing). Weights are used
  as stored: the fast path, no per-call casts.
- `manual_cast`: the same layers, but the weight (and bias) are cast to the input's dtype/device at each
  call. Used when the storage dtype differs from the compute dtype, e.g. fp8_e4m3fn storage with bf16
  compute (UNETLoader weight_dtype=fp8_e4m3fn) or bf16 weights on a CPU computing in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy.taco_dit.utils import lt_gemm


def cast_to(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype == dtype and t.device == device:
        return t
    return t.to(device=device, dtype=dtype, non_blocking=True)


def cast_bias_weight(layer: torch.nn.Module, x: torch.Tensor):
    dtype = getattr(layer, "compute_dtype", None) or x.dtype
    w = cast_to(layer.weight, dtype, x.device)
    b = cast_to(getattr(layer, "bias", None), dtype, x.device)
    return w, b


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear whose result for one row never depends on how many rows come with it (CPU).

    On the CPU a [1, C] input takes a matrix-vector kernel and a [2, C] input a matrix-matrix kernel,
    which sum in another order: the conditioning-vector layers (time/guidance embedders, adaLN
    modulation) would then give cond and uncond results that differ in the last bits depending on
    whether they were batched together (one process) or run on separate ranks (CFG / data parallel).
    Running such small 2-D inputs row by row makes N ranks bit-identical to one. Token inputs (3-D) are
    already batch-invariant. GPUs keep the batched kernel: bf16 results there are compared with a
    tolerance anyway, and the extra weight reads would cost time.
    """
    if x.ndim == 2 and 1 < x.shape[0] <= 64 and x.device.type == "cpu":
        return torch.cat([F.linear(x[i:i + 1], w, b) for i in range(x.shape[0])])
    y = lt_gemm.linear(x, w, b)  # large CUDA GEMMs: cuBLASLt's fastest bit-identical algorithm
    return F.linear(x, w, b) if y is None else y


def _layer_weight(layer: torch.nn.Module, x: torch.Tensor):
    """(weight, bias) as the layer computes with them: cast per call by manual_cast layers."""
    if getattr(layer, "compute_dtype", None) is not None or layer.weight.dtype != x.dtype \
            or layer.weight.device != x.device:
        return cast_bias_weight(layer, x)
    return layer.weight, layer.bias


def pitched_rows(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, row width, row pitch), in elements, when `t` is rows of one contiguous run each at one fixed
    stride (a 2-D pitched region, e.g. one destination's heads of a packed [S, 3, H, D] q/k/v buffer: 3*S
    rows of hp*D elements, H*D apart), else None (also for a contiguous tensor, or single-element rows)."""
    dims = [(n, st) for n, st in zip(t.shape, t.stride()) if n != 1]
    if not dims:
        return None
    width, expect = 1, 1
    while dims and dims[-1][1] == expect:  # the contiguous inner run
        n, _ = dims.pop()
        width *= n
        expect = width
    if not dims or width == 1:
        return None  # contiguous (a plain copy), or no contiguous run to move per row
    rows, pitch = dims[-1]
    for n, st in reversed(dims[:-1]):
        if st != pitch * rows:
            return None
        rows *= n
    return rows, width, pitch


def _matrix_rows(t: torch.Tensor, features: int) -> torch.Tensor | None:
    """`t` ([..., features] in any trailing shape) as a [rows, features] matrix view a GEMM can write directly
    (its leading dimension): contiguous, or rows of `features` contiguous elements at one pitch of at least
    `features` (`pitched_rows`). None otherwise (e.g. a column slice of a batched buffer)."""
    if t.is_contiguous():
        return t.view(-1, features)
    shape = pitched_rows(t)
    if shape is None or shape[1] != features or shape[2] < features:
        return None
    return t.as_strided((shape[0], features), (shape[2], 1))


def _linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b, then the tanh GELU when `gelu`: in one GEMM on CUDA half precision with a bias (cuBLASLt
    applies bias and GELU in the matmul's epilogue via `torch._addmm_activation`, so the result is written once
    instead of written, read and written again by a separate GELU pass); elsewhere the two ops.
    `out` (no GELU): a [..., out features] tensor the GEMM writes into, which is returned: contiguous, or rows
    of contiguous features at one pitch (e.g. k and v of a packed [1, L, 3, H, D] buffer: `out[:, :, 1:3]`).
    With a bias, a pitched `out` costs an extra pass on CUDA: cuBLAS adds a bias in its epilogue only into a
    contiguous output, so PyTorch fills the rows with the bias and runs the GEMM with beta = 1 (which is why
    Flux's `SelfAttention.kv_rope` computes into a new tensor instead)."""
    if out is not None:
        if gelu:
            raise ValueError("out= is for a plain linear layer, not one with the GELU fused")
        x2, o2 = x.reshape(-1, x.shape[-1]), _matrix_rows(out, w.shape[0])
        if o2 is None:  # a layout cuBLAS cannot write: compute, then copy in
            out.copy_(_linear_act(x, w, b, False).view(out.shape))
            return out
        if b is None:
            torch.mm(x2, w.t(), out=o2)
        else:
            torch.addmm(b, x2, w.t(), out=o2)
        return out
    if gelu and x.is_cuda and b is not None and x.dtype in (torch.bfloat16, torch.float16):
        y = lt_gemm.linear(x, w, b, gelu=True)
        if y is not None:
            return y
        return torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True) \
            .view(*x.shape[:-1], w.shape[0])
    out = linear(x, w, b)
    return F.gelu(out, approximate="tanh") if gelu else out


def linear_gelu(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(layer(x)) for a Linear layer, the GELU fused into the GEMM on CUDA (see `_linear_act`)."""
    w, b = _layer_weight(layer, x)
    return _linear_act(x, w, b, gelu=True)


def linear_rows(layer: torch.nn.Module, x: torch.Tensor, start: int, stop: int, gelu: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Output features [start, stop) of a Linear layer (a row slice of its weight: no copy), optionally
    through the tanh GELU fused as in `linear_gelu`, or written into `out` (see `_linear_act`)."""
    w, b = _layer_weight(layer, x)
    return _linear_act(x, w[start:stop], b[start:stop] if b is not None else None, gelu, out)


def linear_cols(layer: torch.nn.Module, x: torch.Tensor, start: int, stop: int,
                accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
    """The layer applied to input features [start, stop) only: x @ W[:, start:stop]^T (a column slice of the
    weight, no copy). Without `accumulate_into` the bias is added and a new tensor returned; with it, the
    product is added into that tensor in place (one GEMM with beta = 1), which is returned. Together these
    compute layer(cat(parts, -1)) without building the concatenation."""
    w, b = _layer_weight(layer, x)
    cols = w[:, start:stop]
    if x.shape[-1] != stop - start:
        raise ValueError(f"input has {x.shape[-1]} features, the column slice [{start}, {stop}) takes {stop - start}")
    if accumulate_into is None:
        return linear(x, cols, b)
    accumulate_into.view(-1, accumulate_into.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), cols.t())
    return accumulate_into


class disable_weight_init:
    class Linear(torch.nn.Linear):
        def reset_parameters(self):
            return None

        def forward(self, x):
            return linear(x, self.weight, self.bias)

    class Conv2d(torch.nn.Conv2d):
        def reset_parameters(self):
            return None

    class Conv3d(torch.nn.Conv3d):
        def reset_parameters(self):
            return None

    class LayerNorm(torch.nn.LayerNorm):
        def reset_parameters(self):
            return None

    class GroupNorm(torch.nn.GroupNorm):
        def reset_parameters(self):
            return None

    class Embedding(torch.nn.Embedding):
        def reset_parameters(self):
            return None


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        def forward(self, x):
            w, b = cast_bias_weight(self, x)
            return linear(x, w, b)

    class Conv2d(disable_weight_init.Conv2d):
        def forward(self, x):
            w, b = cast_bias_weight(self, x)
            return self._conv_forward(x, w, b)

    class Conv3d(disable_weight_init.Conv3d):
        def forward(self, x):
            w, b = cast_bias_weight(self, x)
            return self._conv_forward(x, w, b)

    class LayerNorm(disable_weight_init.LayerNorm):
        def forward(self, x):
            if self.weight is None:
                return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
            w, b = cast_bias_weight(self, x)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class GroupNorm(disable_weight_init.GroupNorm):
        def forward(self, x):
            w, b = cast_bias_weight(self, x)
            return F.group_norm(x, self.num_groups, w, b, self.eps)

    class Embedding(disable_weight_init.Embedding):
        def forward(self, x, out_dtype=None):
            w = cast_to(self.weight, out_dtype or self.weight.dtype, x.device)
            return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def pick_operations(weight_dtype: torch.dtype | None, compute_dtype: torch.dtype | None):
    """`manual_cast` when weights are stored in another dtype than the model computes in."""
    if compute_dtype is None or weight_dtype is None or weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast
