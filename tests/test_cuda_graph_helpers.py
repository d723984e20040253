"""The CPU-checkable parts of CUDAGraphCallable: the input signature and copying new inputs into the
captured buffers (the capture itself needs a GPU and ran on H200, see benchmarks/RESULTS.md)."""

from __future__ import annotations

import torch

from comfy.taco_dit.utils.cuda_graph import _clone_inputs, _copy_into, _signature


def test_signature_tracks_shapes_and_values_not_tensor_contents():
    a = {"x": torch.zeros(2, 3), "opts": {"cond_or_uncond": [0], "sigmas": torch.ones(1)}}
    b = {"x": torch.ones(2, 3), "opts": {"cond_or_uncond": [0], "sigmas": torch.zeros(1)}}
    assert _signature(a) == _signature(b)  # same shapes: replay the same graph
    b["x"] = torch.ones(2, 4)
    assert _signature(a) != _signature(b)  # another shape: another graph
    c = {"x": torch.zeros(2, 3), "opts": {"cond_or_uncond": [1], "sigmas": torch.ones(1)}}
    assert _signature(a) != _signature(c)  # other non-tensor values: another graph


def test_copy_into_static_buffers_tolerates_keys_the_model_added():
    call = {"x": torch.arange(3.0), "opts": {"sigmas": torch.tensor([0.5])}}
    static = _clone_inputs(call)
    static["opts"]["block_index"] = 18  # what a model's forward writes into transformer_options
    new = {"x": torch.tensor([7.0, 8.0, 9.0]), "opts": {"sigmas": torch.tensor([0.25])}}
    buffer = static["x"]
    _copy_into(static, new)
    assert static["x"] is buffer and buffer.tolist() == [7.0, 8.0, 9.0]  # in place: the graph reads it
    assert static["opts"]["sigmas"].item() == 0.25
