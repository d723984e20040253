"""GPU check of the full-size SD3.5-large MMDiT (random bf16 weights) against diffusers at 1024x1024.

Marked `gpu` (excluded from CPU runs). Asserts that our bf16 output is about as close to an fp32
reference as diffusers' is, and logs both forward times; speed targets belong to the benchmarks.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.gpu_timing import mean_seconds

pytestmark = pytest.mark.gpu
logger = logging.getLogger(__name__)

# SD3.5-large: depth 38 -> hidden 2432, 38 heads, RMS qk-norm, 192x192 position table
FULL = dict(in_channels=16, patch_size=2, hidden_size=64 * 38, num_heads=38, depth=38, adm_in_channels=2048,
            context_in_dim=4096, pos_embed_max_size=192, qk_norm=True)


def _random_full_sd35(device) -> dict:
    from comfy.ldm.mmdit.model import MMDiT

    with torch.device("meta"):
        m = MMDiT(**FULL)
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for k, p in m.state_dict().items():
        if k.endswith(("ln_q.weight", "ln_k.weight")):
            t = 1 + 0.1 * torch.randn(p.shape, generator=g, device=device)
        elif p.ndim == 1:
            t = 0.02 * torch.randn(p.shape, generator=g, device=device)
        elif k == "pos_embed":
            t = 0.5 * torch.randn(p.shape, generator=g, device=device)
        else:
            fan_in = p[0].numel()
            t = ((0.5 if "adaLN" in k else 1.0) / fan_in ** 0.5) * torch.randn(p.shape, generator=g, device=device)
        sd[k] = t.to(torch.bfloat16)
    return sd


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_sd35_large_matches_diffusers_bf16_and_times():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from comfy.ldm.mmdit.model import MMDiT

    dev = torch.device("cuda")
    sd = _random_full_sd35(dev)
    with torch.device("meta"):
        ours = MMDiT(**FULL, dtype=torch.bfloat16)
    ours.load_state_dict(sd, assign=True)
    ours.eval()
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                       attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                       caption_projection_dim=64 * 38, pooled_projection_dim=2048, out_channels=16,
                                       pos_embed_max_size=192, qk_norm="rms_norm")
    theirs.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), assign=True, strict=True)
    theirs.eval()

    g = torch.Generator(device=dev).manual_seed(1)
    b, h, w, t_len = 1, 128, 128, 77 + 256   # CLIP 77 + T5 256 tokens, as ComfyUI's SD3 encoders give
    x = torch.randn(b, 16, h, w, generator=g, device=dev, dtype=torch.bfloat16)
    ctx = torch.randn(b, t_len, 4096, generator=g, device=dev, dtype=torch.bfloat16)
    y = torch.randn(b, 2048, generator=g, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=dev)   # exact in bf16

    def run_ours():
        return ours(x, t, context=ctx, y=y)

    def run_theirs():
        return theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                      return_dict=False)[0]

    with torch.inference_mode():
        a = run_ours().float()
        d = run_theirs().float()
        t_ours = mean_seconds(run_ours)
        t_theirs = mean_seconds(run_theirs)
        theirs = None  # free its 16 GB before the fp32 reference
        with torch.device("meta"):
            ref_model = MMDiT(**FULL, dtype=torch.float32)
        ref_model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
        ref = ref_model(x.float(), t, context=ctx.float(), y=y.float()).float()
        del ref_model
        err_ours = ((a - ref).norm() / ref.norm()).item()
        err_theirs = ((d - ref).norm() / ref.norm()).item()
        rel = ((a - d).norm() / d.norm()).item()
    msg = (f"SD3.5-large 1024x1024 forward on {torch.cuda.get_device_name()}: ours {t_ours * 1000:.1f} ms, "
           f"diffusers {t_theirs * 1000:.1f} ms, speed-up {t_theirs / t_ours:.3f}x; rel. error vs fp32: ours "
           f"{err_ours:.4f}, diffusers {err_theirs:.4f}; ours vs diffusers {rel:.4f}")
    logger.warning(msg)
    assert err_ours < 1.25 * err_theirs + 0.02, msg
