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
