"""TACO_TUNE_GEMM: TunableOp only when asked and on GPUs (the GPU effect is measured in benchmarks/)."""

from __future__ import annotations

import torch


def test_gemm_tuning_needs_the_setting_and_a_gpu(monkeypatch, tmp_path):
    from comfy.taco_dit.utils import gemm_tuning

    calls = []
    import torch.cuda.tunable as tunable

    monkeypatch.setattr(tunable, "enable", lambda val=True: calls.append(("enable", val)))
    monkeypatch.setattr(tunable, "tuning_enable", lambda val=True: calls.append(("tuning", val)))
    monkeypatch.setattr(tunable, "set_max_tuning_duration", lambda ms: calls.append(("ms", ms)))
    monkeypatch.setattr(tunable, "set_filename", lambda f, insert_device_ordinal=False: calls.append(("file", f)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.delenv("TACO_TUNE_GEMM", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not gemm_tuning.configure(str(tmp_path)) and calls == []  # off by default
    monkeypatch.setenv("TACO_TUNE_GEMM", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not gemm_tuning.configure(str(tmp_path)) and calls == []  # no GPU: nothing to tune
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TACO_TUNE_GEMM_MS", "40")
    assert gemm_tuning.configure(str(tmp_path / "cache"))
    assert ("enable", True) in calls and ("tuning", True) in calls and ("ms", 40) in calls
    assert ("file", str(tmp_path / "cache" / "taco_gemm_nvidia-h200.csv")) in calls
    assert (tmp_path / "cache").is_dir()
