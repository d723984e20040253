"""One rank's share of a sequence-parallel Flux step, run alone on one GPU: no exchange, no barrier, no peer.

`solo_forward_orig(degree)` replaces `Flux.forward_orig` like `sequence_parallel.flux_forward_orig` does for
ring `degree` gathered: the full inputs are embedded, rank 0's chunk of the text and image tokens goes through
the blocks, and its attention reads q from its own tokens and k/v over `degree` times as many keys, from one
packed buffer whose first block the blocks write (the peers' blocks hold whatever was there: the values do not
matter, the shapes and kernels do). The MLP and modulation side work runs where the real override runs it, the
shared modulations are this rank's share computed each step plus the rest from the first call, and the output
is this rank's tokens repeated to the full image (in place of the gather).

So a profile of it (`profile_flux_step.py --solo 2`) holds exactly a rank's kernels without communication:
set beside the 1-GPU step and the real 2-GPU step at the power limit, it tells whether a rank loses to half of
one GPU because of its own kernels or because of the exchanges and the peer.

`push`: also copy this rank's k/v (the region the ring gather sends) where the real step starts sending it, by
copy engine (one cudaMemcpy2DAsync on a side stream, joined before the attention as the real gather is): to
the other visible GPU ("peer": NVLink traffic, the peer idle) or to a buffer on this GPU ("local"). So the
traffic's own cost is seen without a barrier or a peer to wait for. (On an H200 the driver ran the local 2-D copy
as an SM kernel, `memcpyDtoD2D_aligned_smalldiffpitch`, so "local" is not the copy-engine twin of "peer".)

Measured in call s78 (benchmarks/RESULTS.md, thirteenth session): alone, a rank's share costs 3-4 % more than half
of its GPU's 1-GPU step; pushing its k/v to the peer costs 3 % more again (the clock drops at the same power).
"""

from __future__ import annotations

import torch

from comfy.ldm.flux.layers import MODULATION_KEY
from comfy.ldm.modules.attention import (
    KV_READY_KEY,
    OVERRIDE_KEY,
    QKV_BUFFER_KEY,
    run_side_work,
    sdpa,
)
from comfy.taco_dit.parallel.exchange import _copy2d, _memcpy2d, _side_stream
from comfy.taco_dit.parallel.sequence_parallel import TokenSplit, _balanced_runs


def solo_forward_orig(degree: int, push: str | None = None):
    state: dict = {}

    def start_push(buf):
        """buf: this rank's packed [1, S, 3, H, D] block; its k/v go to a [1, S, 2, H, D] buffer by copy engine."""
        if push is None:
            return
        b, s, three, h, d = buf.shape
        key = ("push", tuple(buf.shape))
        if key not in state:
            here = buf.device
            there = torch.device("cuda", 1 - here.index) if push == "peer" else here
            state[key] = torch.empty((b, s, 2, h, d), dtype=buf.dtype, device=there)
            if push == "peer":  # peer access on both ways, outside any capture
                torch.zeros(1, device=here).copy_(torch.zeros(1, device=there))
                torch.zeros(1, device=there).copy_(torch.zeros(1, device=here))
        dst = state[key]
        side = _side_stream(buf.device, 7)
        side.wait_stream(torch.cuda.current_stream(buf.device))
        _copy2d(_memcpy2d(), side, dst, 2 * h * d, buf[:, :, 1:3], 3 * h * d, 2 * h * d, s)
        state["pending"] = side

    def join_push():
        side = state.pop("pending", None)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    def supply(shape, dtype, device):
        key = (tuple(shape), dtype, device)
        if key not in state:
            b, s, three, h, d = shape
            state[key] = torch.randn((b, degree * s, three, h, d), dtype=dtype, device=device)
        state["last"] = state[key]
        return state[key][:, :shape[1]]

    def override(default_fn, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, side_work=None, **kwargs):
        if "pending" not in state:  # single blocks: the gather starts here (double blocks: at kv-ready)
            start_push(state["last"][:, :q.shape[2]])
        run_side_work(side_work)  # Flux passes k and v as tensors: nothing deferred to compute
        join_push()
        full = state["last"]  # [1, degree * S, 3, H, D]: this rank's block first
        k_all, v_all = full[:, :, 1].transpose(1, 2), full[:, :, 2].transpose(1, 2)
        out = sdpa(q, k_all, v_all)
        if skip_output_reshape:
            return out
        b, h, length, d = out.shape
        return out.transpose(1, 2).reshape(b, length, h * d)

    override.accepts_side_work = override.accepts_deferred = True

    def modulations(model, vec):
        mods = [m for block in model.double_blocks for m in (block.img_mod, block.txt_mod)]
        mods += [block.modulation for block in model.single_blocks]
        start, stop = _balanced_runs([m.lin.weight.shape[0] for m in mods], degree)[0]
        silu = torch.nn.functional.silu(vec)
        if "mods" not in state:
            with torch.inference_mode():
                state["mods"] = {id(m): m.lin(silu) for m in mods}
        table = dict(state["mods"])
        for m in mods[start:stop]:
            table[id(m)] = m.lin(silu)
        return lambda module: table.get(id(module))

    def forward_orig(model, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options=None, attn_mask=None):
        opts = dict(transformer_options or {})
        img, txt, vec, pe = model.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        txt_len = txt.shape[1]
        s_txt, s_img = TokenSplit(txt_len, degree), TokenSplit(img.shape[1], degree)
        img_l, txt_l = s_img.local(img, 0, 1), s_txt.local(txt, 0, 1)
        pe_l = torch.cat((s_txt.local(pe[:, :, :txt_len], 0, 2), s_img.local(pe[:, :, txt_len:], 0, 2)), dim=2)
        opts[OVERRIDE_KEY] = override
        opts[QKV_BUFFER_KEY] = supply
        opts[KV_READY_KEY] = start_push
        opts[MODULATION_KEY] = modulations(model, vec)
        img_l, txt_l = model.run_double_blocks(img_l, txt_l, vec, pe_l, attn_mask, opts, control)
        img_l = model.run_single_blocks(img_l, txt_l, vec, pe_l, attn_mask, opts, control)
        out_l = model.final(img_l, vec)
        return out_l.repeat(1, degree, 1)[:, :s_img.length]

    return forward_orig
