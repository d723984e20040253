"""comfy.ops' linear helpers used by the DiT blocks: GELU fused into the GEMM (linear_gelu), a slice of a Linear's
output features (linear_rows) and of its input features (linear_cols, with in-place accumulation). On the CPU
they are the plain ops; these tests pin that they compute exactly what the unfused layer computes, also for
manual_cast layers whose weights are stored in another dtype (UNETLoader weight_dtype)."""

import pytest
import torch
import torch.nn.functional as F

from comfy import ops


def _layer(kind, n_in, n_out, bias=True, storage=torch.float32, compute=None):
    g = torch.Generator().manual_seed(n_in * 31 + n_out)
    layer = kind.Linear(n_in, n_out, bias=bias, dtype=storage)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g).to(storage))
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=g).to(storage))
    if compute is not None:
        layer.compute_dtype = compute
    return layer


@pytest.mark.parametrize("kind,storage,compute", [(ops.disable_weight_init, torch.float32, None),
                                                  (ops.manual_cast, torch.bfloat16, torch.float32)])
def test_linear_gelu_rows_and_cols_equal_the_unfused_layer(kind, storage, compute):
    layer = _layer(kind, 12, 20, storage=storage, compute=compute)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    full = layer(x)
    torch.testing.assert_close(ops.linear_gelu(layer, x), F.gelu(full, approximate="tanh"), rtol=0, atol=0)
    torch.testing.assert_close(ops.linear_rows(layer, x, 4, 13), full[..., 4:13], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.linear_rows(layer, x, 4, 13, gelu=True),
                               F.gelu(full[..., 4:13], approximate="tanh"), rtol=1e-6, atol=1e-6)
    # input features split in two: bias once, second part accumulated into the first result in place
    a, b = x[..., :5], x[..., 5:]
    first = ops.linear_cols(layer, a, 0, 5)
    out = ops.linear_cols(layer, b, 5, 12, accumulate_into=first)
    assert out is first
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_linear_cols_refuses_a_slice_of_the_wrong_width():
    layer = _layer(ops.disable_weight_init, 6, 4)
    with pytest.raises(ValueError, match="column slice"):
        ops.linear_cols(layer, torch.randn(1, 2, 3), 0, 4)


@torch.no_grad()  # as the models run: out= takes no autograd
def test_linear_rows_writes_into_out_where_it_lies():
    """linear_rows(out=): into a contiguous tensor, into rows at a pitch (k and v of a packed [1, L, 3, H, D]
    buffer: the GEMM writes there directly, leaving q alone), and into a layout no GEMM can write (a column
    slice of a batched buffer: computed, then copied in). Each returns `out`, holding the layer's output."""
    layer = _layer(ops.disable_weight_init, 8, 24)
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2))
    full = layer(x)  # [1, 5, 24] = q, k, v of 2 heads x 4 dims
    flat = torch.empty(1, 5, 16)
    assert ops.linear_rows(layer, x, 8, 24, out=flat) is flat
    torch.testing.assert_close(flat, full[..., 8:], rtol=1e-6, atol=1e-6)
    packed = torch.full((1, 5, 3, 2, 4), -1.0)
    kv = packed[:, :, 1:3]
    assert ops._matrix_rows(kv, 16).data_ptr() == kv.data_ptr()  # written in place, not through a copy
    assert ops.linear_rows(layer, x, 8, 24, out=kv) is kv
    torch.testing.assert_close(kv.reshape(1, 5, 16), full[..., 8:], rtol=1e-6, atol=1e-6)
    assert bool((packed[:, :, 0] == -1).all())
    assert ops._matrix_rows(torch.full((5, 2, 16), -1.0)[:, 0], 16) is not None  # rows 32 apart
    cols = torch.full((5, 32), -1.0)[:, ::2]  # every other column: no matrix view
    assert ops._matrix_rows(cols, 16) is None
    assert ops.linear_rows(layer, x[0], 8, 24, out=cols) is cols
    torch.testing.assert_close(cols, full[0, :, 8:], rtol=1e-6, atol=1e-6)
    assert ops._matrix_rows(torch.zeros(16).expand(5, 16), 16) is None  # rows on top of each other
