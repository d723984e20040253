"""Per-rank device and memory decisions in comfy.model_management (process-free: env and torch.cuda
are stubbed)."""

from __future__ import annotations

import torch

import comfy.model_management as mm


def _fake_gpus(monkeypatch, count: int, free: int):
    monkeypatch.setattr(mm.args, "cpu", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_each_local_rank_gets_its_own_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 4, 1000)
    monkeypatch.setattr(mm.args, "cuda_device", 3)  # ignored under torchrun: LOCAL_RANK decides
    for rank in range(4):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert mm.get_torch_device() == torch.device("cuda", rank)
        assert mm.ranks_sharing_device() == 1
        assert mm.rank_memory_budget() == 1000


def test_ranks_sharing_a_gpu_split_its_memory(monkeypatch):
    _fake_gpus(monkeypatch, 2, 900)
    monkeypatch.setattr(mm.args, "reserve_vram", None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")  # ranks 0,2,4 on cuda:0; 1,3 on cuda:1
    monkeypatch.setenv("LOCAL_RANK", "4")
    assert mm.get_torch_device() == torch.device("cuda", 0)
    assert mm.ranks_sharing_device() == 3 and mm.rank_memory_budget() == 300
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert mm.ranks_sharing_device() == 2 and mm.rank_memory_budget() == 450


def test_reserve_vram_comes_off_each_rank_budget(monkeypatch):
    _fake_gpus(monkeypatch, 1, 3 * 1024 ** 3)
    monkeypatch.setattr(mm.args, "reserve_vram", 1.0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert mm.rank_memory_budget() == 2 * 1024 ** 3


def test_cpu_ranks_share_the_node_ram(monkeypatch):
    monkeypatch.setattr(mm.args, "cpu", True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(mm.psutil, "virtual_memory", lambda: type("VM", (), {"available": 4000, "total": 8000})())
    assert mm.get_torch_device() == torch.device("cpu")
    assert mm.ranks_sharing_device() == 4
    assert mm.rank_memory_budget() == 1000
