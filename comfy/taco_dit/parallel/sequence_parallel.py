"""Sequence parallelism applied to a MODEL: split tokens after embedding, swap the attention op for
Ulysses/Ring/USP, gather after the last layer.

Model files stay free of distributed code. Each family exposes stages (Flux: `embed`,
`run_double_blocks`, `run_single_blocks`, `final`) and a `SEQUENCE_PARALLEL_PLAN`; the adapters here
(one small function per family, as ParaAttention does) drive those stages on a local token chunk. They
are installed as an object patch on a clone of the ModelPatcher (`diffusion_model.forward_orig`), so
the original MODEL and its other clones are untouched.

Layout of a rank's local sequence: `[txt chunk, img chunk]`, each stream padded to a multiple of the
sequence degree and split evenly. Because every rank concatenates its chunks the same way, the order
of keys seen by attention after the all-to-all is `[txt_0, img_0, txt_1, img_1, ...]`: attention does
not care about key order, and each query's output returns to its own rank. Padding tokens are removed
from the keys (never masked by value) and their outputs dropped at the gather.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comfy.ldm.flux.layers import MODULATION_KEY
from comfy.ldm.modules.attention import (
    CROSS_ATTENTION_KEY,
    KV_READY_KEY,
    OVERRIDE_KEY,
    QKV_BUFFER_KEY,
    materialize,
    run_side_work,
)
from comfy.taco_dit.parallel.mesh import GroupHandle, ParallelMesh
from comfy.taco_dit.parallel.sp_attention import ring_kv_ready, ring_mode, ring_qkv_supplier, usp_attention


@dataclass
class TokenSplit:
    """How one stream of `length` tokens is spread over `degree` ranks."""

    length: int
    degree: int

    @property
    def padded(self) -> int:
        return -(-self.length // self.degree) * self.degree

    @property
    def chunk(self) -> int:
        return self.padded // self.degree

    def keep(self, device=None) -> torch.Tensor:
        """bool [degree, chunk]: True where a rank's chunk holds a real token. Built where it is used (a
        fill on the device, not a host-to-device copy, which would make the forward wait for the GPU)."""
        k = torch.zeros(self.padded, dtype=torch.bool, device=device)
        k[: self.length] = True
        return k.reshape(self.degree, self.chunk)

    def local(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        pad = self.padded - self.length
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat((x, x.new_zeros(shape)), dim=dim)
        return x.narrow(dim, rank * self.chunk, self.chunk)


def gather_tokens(x: torch.Tensor, group: GroupHandle, split: TokenSplit, dim: int = 1) -> torch.Tensor:
    return group.all_gather(x, dim=dim).narrow(dim, 0, split.length)


def real_tokens(*splits: TokenSplit, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which keys are real over the sequence group's order, where each rank's local sequence is its chunks
    of `splits` in turn: (mask on `device`, the same mask on the host), or None when nothing is padded.
    The host copy gives the counts, so no attention call has to read the mask back from the GPU."""
    if all(s.padded == s.length for s in splits):
        return None
    return (torch.cat([s.keep(device) for s in splits], dim=1).reshape(-1),
            torch.cat([s.keep() for s in splits], dim=1).reshape(-1))


def ring_blocks(keep: tuple[torch.Tensor, torch.Tensor] | None, ring_size: int) -> list | None:
    """Per ring block (one ring slot's keys after the Ulysses exchange): the device indices of the real
    keys, or None where all are real. Sizes come from the host mask, so `nonzero_static` needs no read-back
    from the GPU and can run inside a CUDA-graph capture."""
    if keep is None:
        return None
    device_mask, host_mask = keep
    out = []
    for d, h in zip(device_mask.reshape(ring_size, -1), host_mask.reshape(ring_size, -1)):
        n = int(h.sum())
        if n == h.numel():
            out.append(None)
            continue
        try:
            out.append(torch.nonzero_static(d, size=n).squeeze(1))
        except (NotImplementedError, RuntimeError):  # a build without it: one read-back per forward
            out.append(d.nonzero().squeeze(1))
    return out


def make_attention_override(mesh: ParallelMesh, kv_keep):
    """An `optimized_attention_override` running USP over the mesh's Ulysses and Ring groups.

    `kv_keep`: `real_tokens(...)` over the sequence group's key order (None: no padding), or a dict
    from a call's local sequence length to such a value, for models whose blocks attend over different
    token sets (SD3.5-medium's second, image-only attention next to the joint one). The real keys of
    each ring block are found once here, per forward, not in every attention call.
    """
    if isinstance(kv_keep, dict):
        kv_keep = {length: ring_blocks(keep, mesh.ring.size) for length, keep in kv_keep.items()}
    else:
        kv_keep = ring_blocks(kv_keep, mesh.ring.size)

    def override(default_fn, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, side_work=None, **kwargs):
        if transformer_options and transformer_options.get(CROSS_ATTENTION_KEY):
            # keys are the text, whole on every rank: local attention is already exact
            run_side_work(side_work)
            k, v = materialize(k), materialize(v)
            return default_fn(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                              skip_output_reshape=skip_output_reshape)
        if mask is not None:
            raise NotImplementedError("Sequence parallel attention with an attention mask is not supported; "
                                      "disable sequence parallel for this model (TACO-DiT Parallel Config)")
        if not skip_reshape:
            b, _, inner = q.shape

            def heads_view(t):
                return t.view(b, -1, heads, inner // heads).transpose(1, 2)

            q = heads_view(q)
            k, v = ((lambda t=t: heads_view(t())) if callable(t) else heads_view(t) for t in (k, v))
        keep = kv_keep.get(q.shape[2]) if isinstance(kv_keep, dict) else kv_keep
        out = usp_attention(q, k, v, mesh.ulysses, mesh.ring, kv_keep_blocks=keep, side_work=side_work)
        if skip_output_reshape:
            return out
        b, h, length, d = out.shape
        return out.transpose(1, 2).reshape(b, length, h * d)

    # independent work (Flux blocks' MLP, modulation) runs while the exchanges are in flight, and deferred k/v
    # (Wan) compute while q is exchanged; TACO_SP_OVERLAP=0 runs both first instead (for measuring the overlap)
    override.accepts_side_work = override.accepts_deferred = os.environ.get("TACO_SP_OVERLAP", "1") != "0"
    return override


def install_attention(opts: dict, mesh: ParallelMesh, kv_keep) -> None:
    """Put the sequence-parallel attention into a forward's transformer options: the override, and under the
    gathered ring (no Ulysses) the supplier of packed q/k/v buffers its exchange sends from in place, and the
    hook that starts sending k/v before q is written (TACO_KV_EARLY=0 leaves it out, for measuring it)."""
    opts[OVERRIDE_KEY] = make_attention_override(mesh, kv_keep)
    if mesh.ulysses.size == 1 and mesh.ring.size > 1 and ring_mode() == "gather":
        opts[QKV_BUFFER_KEY] = ring_qkv_supplier(mesh.ring)
        if os.environ.get("TACO_KV_EARLY", "1") != "0":
            opts[KV_READY_KEY] = ring_kv_ready(mesh.ring)


def _split_control(control, split: TokenSplit, rank: int):
    """ControlNet residuals ({"input": [...], "output": [...]}, each [B, n, C] over the first n image
    tokens) cut like the image tokens: zero-extended to the whole image stream, then this rank's chunk."""
    if not isinstance(control, dict):
        return control

    def cut(t):
        if t is None:
            return None
        if t.shape[1] < split.length:
            t = torch.cat((t, t.new_zeros((t.shape[0], split.length - t.shape[1]) + tuple(t.shape[2:]))), dim=1)
        return split.local(t, rank, 1)

    return {k: [cut(t) for t in v] if k in ("input", "output") and v is not None else v for k, v in control.items()}


def _balanced_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous runs (start, stop) of the items, cut where the running size first reaches each k/parts
    of the total (some runs may be empty)."""
    total, cuts, acc = sum(sizes), [0], 0
    for i, n in enumerate(sizes):
        acc += n
        while len(cuts) < parts and acc * parts >= total * len(cuts):
            cuts.append(i + 1)
    cuts += [len(sizes)] * (parts + 1 - len(cuts))
    return list(zip(cuts[:-1], cuts[1:]))


def shared_modulations(model, vec: torch.Tensor, group: GroupHandle):
    """Every Flux block's modulation lin(silu(vec)) for this step, each rank of `group` computing a contiguous
    share and one all-gather giving all of them to every rank; returns the MODULATION_KEY supplier.

    They depend on `vec` alone, yet each rank computed all of them: GEMVs reading 6.5 GB of weights per step
    (2.5 ms a step on each of 2 H200s, call s31's profile), which more GPUs did not shorten."""
    mods = [m for block in model.double_blocks for m in (block.img_mod, block.txt_mod)]
    mods += [block.modulation for block in model.single_blocks]
    sizes = [m.lin.weight.shape[0] for m in mods]
    runs = _balanced_runs(sizes, group.size)
    width = max(sum(sizes[a:b]) for a, b in runs)
    start, stop = runs[group.rank_in_group]
    silu_vec = F.silu(vec)
    local = vec.new_zeros((vec.shape[0], width))
    at = 0
    for m in mods[start:stop]:
        out = m.lin(silu_vec)
        local[:, at:at + out.shape[1]] = out
        at += out.shape[1]
    gathered = group.all_gather(local.unsqueeze(0), dim=0)  # [P, B, width]
    table = {}
    for r, (a, b) in enumerate(runs):
        at = 0
        for m, n in zip(mods[a:b], sizes[a:b]):
            table[id(m)] = gathered[r, :, at:at + n]
            at += n
    return lambda module: table.get(id(module))


def flux_forward_orig(mesh: ParallelMesh):
    """Sequence-parallel replacement for `Flux.forward_orig` (bound to the diffusion model)."""

    def forward_orig(model, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options=None, attn_mask=None):
        sp = mesh.sp
        opts = dict(transformer_options or {})
        img, txt, vec, pe = model.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        txt_len = txt.shape[1]
        s_txt, s_img = TokenSplit(txt_len, sp.size), TokenSplit(img.shape[1], sp.size)
        r = sp.rank_in_group
        img_l = s_img.local(img, r, 1)
        txt_l = s_txt.local(txt, r, 1)
        pe_l = torch.cat((s_txt.local(pe[:, :, :txt_len], r, 2), s_img.local(pe[:, :, txt_len:], r, 2)), dim=2)
        install_attention(opts, mesh, real_tokens(s_txt, s_img, device=img.device))
        if sp.size > 1 and os.environ.get("TACO_SHARED_MODULATION", "1") != "0":  # 0: each rank all (measuring)
            opts[MODULATION_KEY] = shared_modulations(model, vec, sp)
        control = _split_control(control, s_img, r)
        img_l, txt_l = model.run_double_blocks(img_l, txt_l, vec, pe_l, attn_mask, opts, control)
        img_l = model.run_single_blocks(img_l, txt_l, vec, pe_l, attn_mask, opts, control)
        # The final layer is per token, so gathering its (narrower) output equals gathering before it.
        out_l = model.final(img_l, vec)
        return gather_tokens(out_l, sp, s_img, dim=1)

    return forward_orig


def wan_forward_orig(mesh: ParallelMesh):
    """Sequence-parallel replacement for `WanModel.forward_orig`: video tokens split after embedding,
    self-attention through USP, text/image cross-attention local (keys are the whole context); per-frame
    time modulation (Wan 2.2 TI2V) goes per local token."""

    def forward_orig(model, x, t, context, clip_fea=None, freqs=None, transformer_options=None, **kwargs):
        sp = mesh.sp
        opts = dict(transformer_options or {})
        tokens, e, e0, context, context_img_len, grid = model.embed(x, t, context, clip_fea)
        if freqs is None:
            freqs = model.rope_encode(*grid, device=x.device)
        split = TokenSplit(tokens.shape[1], sp.size)
        r = sp.rank_in_group
        tokens_l = split.local(tokens, r, 1)
        freqs_l = split.local(freqs, r, 1)
        install_attention(opts, mesh, real_tokens(split, device=x.device))
        if e0.ndim == 4 and e0.shape[1] > 1:
            # one time modulation per latent frame (Wan 2.2 TI2V): a rank's chunk need not start or end on
            # a frame, so each local token takes its frame's row (padding tokens read frame 0's)
            frame = torch.arange(tokens.shape[1], device=x.device) // (tokens.shape[1] // e0.shape[1])
            frame_l = split.local(frame, r, 0)
            e0, e = e0[:, frame_l], e[:, frame_l]
        tokens_l = model.run_blocks(tokens_l, e0, context, freqs_l, context_img_len, opts)
        out = gather_tokens(model.final(tokens_l, e), sp, split, dim=1)
        return model.unpatchify(out, grid)

    return forward_orig


def mmdit_forward_orig(mesh: ParallelMesh):
    """Sequence-parallel replacement for `MMDiT.forward_orig` (SD3 / SD3.5): image and text tokens split
    after embedding, joint attention (and 3.5-medium's image-only attention) through USP, ControlNet
    residuals split like the image tokens, final-layer tokens gathered."""

    def forward_orig(model, x, timesteps, context=None, y=None, control=None, transformer_options=None):
        sp = mesh.sp
        r = sp.rank_in_group
        opts = dict(transformer_options or {})
        x, context, c = model.embed(x, timesteps, context, y)
        s_img = TokenSplit(x.shape[1], sp.size)
        x_l = s_img.local(x, r, 1)
        keep = {s_img.chunk: real_tokens(s_img, device=x.device)}
        ctx_l = None
        if context is not None:
            s_txt = TokenSplit(context.shape[1], sp.size)
            ctx_l = s_txt.local(context, r, 1)
            keep[s_txt.chunk + s_img.chunk] = real_tokens(s_txt, s_img, device=x.device)
        install_attention(opts, mesh, keep)
        if isinstance(control, dict) and control.get("output") is not None:
            control = dict(control)
            control["output"] = [None if t is None else s_img.local(t, r, 1) for t in control["output"]]
        x_l = model.run_joint_blocks(x_l, ctx_l, c, control, opts)
        return gather_tokens(model.final(x_l, c), sp, s_img, dim=1)

    return forward_orig


def _run_split(mesh: ParallelMesh, model, x, run, transformer_options):
    """Split the image tokens, call `run(x_chunk, split, rank, options)` with the USP override, gather.
    Used where gathering before the (cheap) final layer costs nothing that matters."""
    sp = mesh.sp
    r = sp.rank_in_group
    split = TokenSplit(x.shape[1], sp.size)
    opts = dict(transformer_options or {})
    install_attention(opts, mesh, real_tokens(split, device=x.device))
    return gather_tokens(run(split.local(x, r, 1), split, r, opts), sp, split, dim=1)


def pixart_run_blocks(mesh: ParallelMesh):
    """PixArt `run_blocks(x, y, t0, mask, transformer_options)`: caption y, adaLN t0 and the caption
    mask stay whole on every rank (cross-attention is local)."""

    def run_blocks(model, x, y, t0, mask=None, transformer_options=None):
        return _run_split(mesh, model, x, lambda x_l, split, r, opts: type(model).run_blocks(
            model, x_l, y, t0, mask, opts), transformer_options)

    return run_blocks


def hydit_run_blocks(mesh: ParallelMesh):
    """HunyuanDiT `run_blocks(x, c, text_states, rope, transformer_options)`: rope = (cos, sin) has one
    row per image token and is split with them; the long skips stay within each rank's tokens."""

    def run_blocks(model, x, c, text_states, rope, transformer_options=None):
        cos, sin = rope
        return _run_split(mesh, model, x, lambda x_l, split, r, opts: type(model).run_blocks(
            model, x_l, c, text_states, (split.local(cos, r, 0), split.local(sin, r, 0)), opts),
            transformer_options)

    return run_blocks


# Family adapters, by diffusion-model class name: (the method they replace, factory).
ADAPTERS = {
    "Flux": ("forward_orig", flux_forward_orig),
    "WanModel": ("forward_orig", wan_forward_orig),
    "MMDiT": ("forward_orig", mmdit_forward_orig),
    "PixArtMS": ("run_blocks", pixart_run_blocks),
    "HunYuanDiT": ("run_blocks", hydit_run_blocks),
}


def supports_sequence_parallel(diffusion_model: torch.nn.Module) -> bool:
    return type(diffusion_model).__name__ in ADAPTERS


def head_count(diffusion_model: torch.nn.Module) -> int | None:
    return getattr(diffusion_model, "num_heads", None)


_adapter_fns: dict = {}


def apply_sequence_parallel(model_patcher, mesh: ParallelMesh):
    """Return a clone of `model_patcher` whose diffusion model runs sequence parallel over `mesh`."""
    dm = model_patcher.model.diffusion_model
    name = type(dm).__name__
    if name not in ADAPTERS:
        raise ValueError(f"Sequence parallel is not available for {name} models yet "
                         f"(supported: {', '.join(sorted(ADAPTERS))}); use CFG or data parallel instead")
    heads = head_count(dm)
    if heads is not None and heads % mesh.ulysses.size != 0:
        raise ValueError(f"Ulysses degree {mesh.ulysses.size} does not divide {name}'s {heads} heads; "
                         f"use a Ulysses degree that divides {heads} and put the rest in ring degree")
    patched = model_patcher.clone()
    method, factory = ADAPTERS[name]
    # One bound adapter per (model, layout), reused by later prompts: torch.compile guards on the
    # patched method's identity and would otherwise recompile for every prompt.
    # The function is cached, not the bound method, so the cache never keeps a model alive.
    key = (id(dm), mesh.dims)
    fn = _adapter_fns.get(key)
    if fn is None:
        fn = _adapter_fns[key] = factory(mesh)
    patched.add_object_patch(f"diffusion_model.{method}", fn.__get__(dm, type(dm)))
    logging.debug("Sequence parallel on %s: ulysses=%d ring=%d", name, mesh.ulysses.size, mesh.ring.size)
    return patched
