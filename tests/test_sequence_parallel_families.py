"""Sequence parallel (Ulysses, Ring, USP) over gloo gives the one-process output, for every family.

One mixin, one subclass per family (tiny random model in its checkpoint layout + inputs whose token
counts do not divide the degrees, so padding is always exercised). Each case runs the family's
adapter from comfy/taco_dit/parallel/sequence_parallel.py on 2 or 4 processes and compares every
rank's output with the plain model.

Tolerance: fp32, 1e-4. Sequence parallel reorders the attention sums (blockwise log-sum-exp merging,
keys in another order), which moves fp32 results by ~1e-7 per op; a wrong split, a padding token used as
a key, cross-attention split by mistake or a misplaced chunk gives O(0.1..1) errors.
"""

from __future__ import annotations

import pytest
import torch

from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh
from comfy.taco_dit.parallel.sequence_parallel import ADAPTERS, TokenSplit
from tests.parallel_helpers import run_on_ranks

CONFIGS = [(2, 2, 1), (2, 1, 2), (4, 2, 2)]  # (world, ulysses, ring)


def _worker(rank, world, ulysses, ring, family_cls, case):
    family = family_cls()
    model, inputs = family.build(**case)
    mesh = ParallelMesh(MeshDims(world_size=world, ulysses=ulysses, ring=ring))
    method, factory = ADAPTERS[type(model).__name__]
    setattr(model, method, factory(mesh).__get__(model, type(model)))
    with torch.no_grad():
        return family.run(model, inputs)


class SequenceParallelCases:
    """Subclasses give `build(**case) -> (model, inputs)`, `run(model, inputs)` and `CASE`."""

    CASE: dict = {}

    def build(self, **case):
        raise NotImplementedError

    def run(self, model, inputs):
        raise NotImplementedError

    @pytest.mark.parametrize("world,ulysses,ring", CONFIGS)
    def test_matches_one_process(self, world, ulysses, ring):
        self.check(world, ulysses, ring, self.CASE)

    def check(self, world, ulysses, ring, case):
        model, inputs = self.build(**case)
        with torch.no_grad():
            ref = self.run(model, inputs)
        assert ref.abs().mean() > 1e-3  # a real signal, not two zero tensors agreeing
        for out in run_on_ranks(world, _worker, ulysses, ring, type(self), case):
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


class TestFlux(SequenceParallelCases):
    CASE = dict(h=8, w=6, txt_len=5)  # 12 image tokens, 5 text tokens

    def build(self, h, w, txt_len, with_ref=False, hidden_size=64, num_heads=4, depth=2, std=0.2,
              with_control=False, extra_channels=0):
        from comfy.ldm.flux.model import Flux

        torch.manual_seed(0)
        model = Flux(in_channels=4 + extra_channels, out_channels=4, vec_in_dim=16, context_in_dim=32,
                     hidden_size=hidden_size, mlp_ratio=2.0, num_heads=num_heads, depth=depth, depth_single_blocks=depth,
                     axes_dim=[4, 6, 6], guidance_embed=True).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
        g = torch.Generator().manual_seed(1)
        refs = [torch.randn(1, 4, 4, 4, generator=g)] if with_ref else None
        control = None
        if with_control:
            n = (h // 2) * (w // 2)
            control = {"input": [torch.randn(1, n, hidden_size, generator=g) for _ in range(depth)],
                       "output": [None] + [torch.randn(1, n, hidden_size, generator=g) for _ in range(depth - 1)]}
        return model, dict(x=torch.randn(1, 4 + extra_channels, h, w, generator=g),
                           ctx=torch.randn(1, txt_len, 32, generator=g), y=torch.randn(1, 16, generator=g), refs=refs, control=control)

    def run(self, model, i):
        return model(i["x"], torch.tensor([0.7]), i["ctx"], y=i["y"], guidance=torch.tensor([3.5]),
                     ref_latents=i["refs"], control=i.get("control"))

    def test_controlnet_residuals_are_split_with_the_tokens(self):
        # residuals over the main image tokens only (Kontext reference tokens come after them)
        self.check(2, 2, 1, dict(h=6, w=6, txt_len=5, with_ref=True, with_control=True))

    def test_kontext_reference_tokens(self):
        self.check(2, 1, 2, dict(h=6, w=6, txt_len=4, with_ref=True))

    def test_divisible_lengths_need_no_padding(self):
        self.check(4, 4, 1, dict(h=8, w=8, txt_len=8))

    def test_fill_extra_input_channels(self):
        # Fill / Canny / Depth checkpoints: the image (and packed mask) channels are concatenated to the
        # noise before patchifying, so `embed` consumes them before the split
        self.check(2, 2, 1, dict(h=6, w=6, txt_len=5, extra_channels=4 + 64))


class TestSD3(SequenceParallelCases):
    CASE = dict(variant="sd3.5-medium", h=6, w=10, txt=7)  # image-only attn2 too; 15 image tokens

    def build(self, variant, h, w, txt):
        import comfy.model_detection
        from comfy.ldm.mmdit.model import MMDiT
        from tests.test_sd3_oracle import TINY, VARIANTS, random_mmdit_state_dict

        sd = random_mmdit_state_dict(**TINY, **VARIANTS[variant], seed=3)
        model = MMDiT(**comfy.model_detection.detect_unet_config(sd, "")).eval()
        model.load_state_dict(sd)
        g = torch.Generator().manual_seed(0)
        return model, dict(x=torch.randn(1, 16, h, w, generator=g),
                           ctx=torch.randn(1, txt, TINY["context_in_dim"], generator=g),
                           y=torch.randn(1, TINY["adm_in_channels"], generator=g))

    def run(self, model, i):
        return model(i["x"], torch.tensor([500.0]), context=i["ctx"], y=i["y"])

    def test_sd35_large_joint_attention_only(self):
        self.check(2, 2, 1, dict(variant="sd3.5-large", h=8, w=10, txt=9))


class TestWan(SequenceParallelCases):
    CASE = dict(model_type="t2v", frames=3, h=6, w=6)  # 27 video tokens

    def build(self, model_type, frames, h, w):
        import comfy.model_detection
        from comfy.ldm.wan.model import WanModel
        from tests.test_wan_model_oracle import TINY, random_wan_state_dict

        ti2v = model_type == "ti2v"  # Wan 2.2 TI2V-5B: 48 channels, one timestep per latent frame
        sd = random_wan_state_dict("t2v" if ti2v else model_type, seed=5, **TINY,
                                   **(dict(in_dim=48, out_dim=48) if ti2v else {}))
        model = WanModel(**comfy.model_detection.detect_unet_config(sd, "")).eval()
        model.load_state_dict(sd)
        g = torch.Generator().manual_seed(0)
        ch = {"t2v": 16, "ti2v": 48}.get(model_type, 36)
        return model, dict(x=torch.randn(1, ch, frames, h, w, generator=g),
                           ctx=torch.randn(1, 7, TINY["text_dim"], generator=g),
                           clip=torch.randn(1, 5, TINY["in_dim_img"], generator=g) if model_type == "i2v" else None)

    def run(self, model, i):
        t = torch.tensor([600.0])
        if model.out_dim == 48:  # the start frame at 0, the others at 600
            t = torch.full((1, i["x"].shape[2]), 600.0).index_fill_(1, torch.tensor([0]), 0.0)
        return model(i["x"], t, i["ctx"], clip_fea=i["clip"])

    def test_ti2v_per_frame_timesteps(self):
        # 27 tokens, 9 a frame: 2 or 4 ranks' chunks start and end inside frames
        self.check(2, 2, 1, dict(model_type="ti2v", frames=3, h=6, w=6))
        self.check(4, 2, 2, dict(model_type="ti2v", frames=3, h=6, w=6))

    def test_i2v_image_cross_attention_stays_local(self):
        self.check(2, 1, 2, dict(model_type="i2v", frames=2, h=6, w=6))


class TestPixArt(SequenceParallelCases):
    CASE = dict(h=10, w=6)  # 15 image tokens

    def build(self, h, w):
        from tests.test_pixart_oracle import TINY, _ours, random_pixart_state_dict

        torch.manual_seed(0)
        model, _ = _ours(random_pixart_state_dict(**TINY))
        g = torch.Generator().manual_seed(1)
        return model, dict(x=torch.randn(1, 4, h, w, generator=g), ctx=torch.randn(1, 7, 32, generator=g))

    def run(self, model, i):
        return model(i["x"], torch.tensor([600.0]), i["ctx"])


class TestHunyuanDiT(SequenceParallelCases):
    CASE = dict(h=10, w=6)

    def build(self, h, w):
        from tests.test_hydit_oracle import _inputs, _ours, random_hydit_state_dict

        model, _ = _ours(random_hydit_state_dict(seed=5))
        return model, _inputs(batch=1, hw=(h, w))

    def run(self, model, i):
        return model(i["x"], i["t"], i["ctx"], text_embedding_mask=i["mask"], encoder_hidden_states_t5=i["ctx_t5"],
                     text_embedding_mask_t5=i["mask_t5"])


def _shared_modulations(rank, world):
    import torch.nn.functional as F

    from comfy.taco_dit.parallel.sequence_parallel import shared_modulations

    model, _ = TestFlux().build(h=4, w=4, txt_len=3, depth=3)
    mesh = ParallelMesh(MeshDims(world_size=world, ulysses=world, ring=1))
    vec = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    mods = [m for b in model.double_blocks for m in (b.img_mod, b.txt_mod)] + [b.modulation for b in model.single_blocks]
    with torch.no_grad():
        supply = shared_modulations(model, vec, mesh.sp)
        return [bool(torch.equal(supply(m), m.lin(F.silu(vec)))) for m in mods], supply(model.final_layer)


@pytest.mark.parametrize("world", [2, 3])
def test_flux_modulations_are_computed_once_over_the_ranks(world):
    """shared_modulations: each rank computes a share of the blocks' lin(silu(vec)) and every rank ends with
    all of them, equal to computing each itself (the same per-module computation); 9 modules of two sizes on
    3 ranks give uneven shares. What it does not hold (the final layer) is left to the model."""
    for same, other in run_on_ranks(world, _shared_modulations):
        assert same == [True] * 9 and other is None


def test_balanced_runs_cut_by_size():
    from comfy.taco_dit.parallel.sequence_parallel import _balanced_runs

    assert _balanced_runs([2, 2, 1, 1, 1, 1], 2) == [(0, 2), (2, 6)]
    runs = _balanced_runs([18432] * 38 + [9216] * 38, 4)  # Flux.1: 19 double blocks x 2 streams, 38 single
    assert runs[0][0] == 0 and runs[-1][1] == 76 and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    loads = [sum(([18432] * 38 + [9216] * 38)[a:b]) for a, b in runs]
    assert max(loads) - min(loads) <= 18432
    assert _balanced_runs([1, 1], 4) == [(0, 1), (1, 1), (1, 2), (2, 2)]  # more ranks than modules


def test_token_split_rules():
    s = TokenSplit(length=10, degree=4)
    assert (s.padded, s.chunk) == (12, 3)
    keep = s.keep()
    assert keep.sum() == 10 and not keep[3, 1:].any() and keep[3, 0]
    x = torch.arange(10.0).reshape(1, 10)
    assert s.local(x, 3, 1).tolist() == [[9.0, 0.0, 0.0]]


def test_every_family_with_a_plan_has_an_adapter():
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hydit.model import HunYuanDiT
    from comfy.ldm.mmdit.model import MMDiT
    from comfy.ldm.pixart.model import PixArtMS
    from comfy.ldm.wan.model import WanModel

    for cls in (Flux, MMDiT, WanModel, PixArtMS, HunYuanDiT):
        assert hasattr(cls, "SEQUENCE_PARALLEL_PLAN") or hasattr(__import__(cls.__module__, fromlist=["x"]),
                                                                "SEQUENCE_PARALLEL_PLAN")
        assert cls.__name__ in ADAPTERS
