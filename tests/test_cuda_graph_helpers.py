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


def test_cuda_graph_auto_means_multi_gpu_plans_only():
    from comfy.taco_dit.core import model_wrapper
    from comfy.taco_dit.core.config_manager import OptimizationConfig
    from comfy.taco_dit.parallel.mesh import MeshDims
    from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable

    class Flux(torch.nn.Linear):  # stands for a family whose capture was verified on GPUs
        def __init__(self):
            super().__init__(2, 2)

    class OtherFamily(torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 2)

    class Patcher:
        load_device = torch.device("cuda")  # never touched: capture happens on the first call only
        patches_uuid = "w0"

        def __init__(self, family=None):
            self.model = torch.nn.Module()
            self.model.diffusion_model = (family or Flux)()
            self.object_patches = {}

        def clone(self):
            c = Patcher()
            c.model = self.model
            c.object_patches = dict(self.object_patches)
            return c

        def add_object_patch(self, name, obj):
            self.object_patches[name] = obj

    parallel = model_wrapper.Plan(MeshDims(world_size=2, ulysses=2))
    single = model_wrapper.Plan(MeshDims(world_size=1))

    def wrapped(setting, plan, family=None):
        out = model_wrapper._apply_optimizations(Patcher(family), OptimizationConfig(use_cuda_graph=setting),
                                                 plan)
        return isinstance(out.object_patches.get("diffusion_model.forward"), CUDAGraphCallable)

    assert "Flux" in model_wrapper.CUDA_GRAPH_VERIFIED
    assert wrapped("auto", parallel) and not wrapped("auto", single) and not wrapped("auto", None)
    assert wrapped(True, None) and not wrapped(False, parallel)
    # a family not yet captured on GPUs: only when asked for explicitly
    assert not wrapped("auto", parallel, OtherFamily) and wrapped(True, parallel, OtherFamily)
    cpu = Patcher()
    cpu.load_device = torch.device("cpu")
    out = model_wrapper._apply_optimizations(cpu, OptimizationConfig(use_cuda_graph=True), parallel)
    assert "diffusion_model.forward" not in out.object_patches  # CUDA only


def test_a_failed_capture_falls_back_to_eager():
    from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable

    calls = []
    g = CUDAGraphCallable(lambda x: calls.append(x) or x + 1)
    g.failed = True  # what a capture error sets (the capture itself needs a GPU)
    assert g(torch.tensor(1.0)).item() == 2.0 and len(calls) == 1 and not g.graphs


def test_signature_ignores_the_per_prompt_conditioning_uuids():
    import uuid

    def call(ids, cond_or_uncond):
        return ((torch.zeros(1, 4),), {"transformer_options": {"uuids": ids, "cond_or_uncond": cond_or_uncond,
                                                               "sigmas": torch.ones(1)}})

    # a new prompt brings new uuids but the same graph; a different batch layout is another graph
    assert _signature(call([uuid.uuid4()], [0])) == _signature(call([uuid.uuid4()], [0]))
    assert _signature(call([uuid.uuid4()], [0])) != _signature(call([uuid.uuid4()], [1]))
    assert _signature(call([uuid.uuid4()], [0])) != _signature(call([uuid.uuid4(), uuid.uuid4()], [0, 1]))


def test_release_all_graphs_drops_every_live_wrappers_graphs():
    """Before the process group is torn down, every captured graph goes (they hold captured NCCL work); the
    wrappers stay usable. Entries stand in for captured graphs on CPU."""
    from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable, release_all_graphs

    a, b = CUDAGraphCallable(lambda x: x), CUDAGraphCallable(lambda x: x)
    a.graphs.update(one=object(), two=object())
    b.graphs.update(three=object())
    assert release_all_graphs() >= 3
    assert a.graphs == {} and b.graphs == {} and not a.failed
    assert release_all_graphs() == 0


def test_exchange_release_all_drops_the_graphs_first(monkeypatch):
    """exchange.release_all (what teardown and the benchmarks call) drops captured graphs before any symmetric
    buffer, with or without symmetric exchanges: graphs hold captured NCCL work and those buffers."""
    from comfy.taco_dit.parallel import exchange
    from comfy.taco_dit.utils import cuda_graph

    calls = []
    monkeypatch.setattr(cuda_graph, "release_all_graphs", lambda: calls.append("graphs") or 0)
    monkeypatch.setattr(exchange, "_live", [])
    exchange.release_all()
    assert calls == ["graphs"]
