"""The attention kernel choice (comfy/ldm/modules/attention.py): resolution from TACO_ATTENTION and the
CLI, and that every choice computes the same attention where its kernel cannot run (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from comfy.ldm.modules import attention


@pytest.fixture(autouse=True)
def _reset():
    attention.set_attention_backend(None)
    yield
    attention.set_attention_backend(None)


def test_auto_resolves_to_sdpa_without_hopper(monkeypatch):
    monkeypatch.setenv("TACO_ATTENTION", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.attention_backend() == "sdpa"


def test_auto_picks_cudnn_on_compute_capability_9(monkeypatch):
    monkeypatch.delenv("TACO_ATTENTION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert attention.attention_backend() == "cudnn"
    attention.set_attention_backend(None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert attention.attention_backend() == "sdpa"


def test_env_forces_a_backend_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("TACO_ATTENTION", "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert attention.attention_backend() == "sdpa"
    attention.set_attention_backend(None)
    monkeypatch.setenv("TACO_ATTENTION", "flashy")
    with pytest.raises(ValueError, match="auto, cudnn or sdpa"):
        attention.attention_backend()


def test_cudnn_choice_on_cpu_tensors_is_plain_sdpa():
    attention.set_attention_backend("cudnn")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    assert torch.equal(attention.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    out = attention.optimized_attention(q, k, v, 2, skip_reshape=True)
    assert out.shape == (1, 9, 32)
