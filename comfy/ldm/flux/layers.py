"""Flux.1 building blocks, named as in the BFL / ComfyUI checkpoints (img_attn.qkv, img_mod.lin, ...)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from comfy.ldm.modules.attention import kv_ready_hook, optimized_attention, qkv_buffer
from comfy.ldm.modules.fused import layernorm_modulate, norm_rope
from comfy.ops import linear_cols, linear_gelu, linear_rows


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first; t in [0, 1] is scaled by time_factor (Flux convention)."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm with a learnt `scale` (the checkpoint's name).

    One fused F.rms_norm call: it accumulates in fp32 for half-precision inputs, so the explicit
    upcast / downcast / multiply sequence (four kernels per q and k) is not needed.
    """

    def __init__(self, dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale.dtype == x.dtype and self.scale.device == x.device \
            else self.scale.to(dtype=x.dtype, device=x.device)
        return F.rms_norm(x, (x.shape[-1],), scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the fused qkv projection, the qk-norm and the output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, dtype=None, device=None,
                 operations=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(head_dim, dtype=dtype, device=device, operations=operations)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def qkv_rope(self, x: torch.Tensor, pe: torch.Tensor | None, out: torch.Tensor | None = None):
        """x [B, L, dim] -> q, k (qk-normed and rotated by `pe`) and v, each a [B, H, L, D] view of one packed
        [B, L, 3, H, D] buffer: `out` (e.g. this stream's slice of a joint-sequence buffer) or, without it, the
        projection's own output, rewritten in place. The norm and RoPE are one fused pass each on CUDA
        (comfy/ldm/modules/fused.py). Packed q/k/v is the layout cuDNN's attention reads directly and gives
        its output back in token-major order, so no transpose copies follow."""
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if out is None:
            out = qkv
        else:
            out[:, :, 2].copy_(qkv[:, :, 2])
        q_out, k_out, v_out = out.permute(2, 0, 3, 1, 4).unbind(0)
        norm_rope(q, self.norm.query_norm.scale, 1e-6, pe, out=q_out)
        norm_rope(k, self.norm.key_norm.scale, 1e-6, pe, out=k_out)
        return q_out, k_out, v_out

    def kv_rope(self, x: torch.Tensor, pe: torch.Tensor | None, out: torch.Tensor) -> None:
        """k (qk-normed, rotated by `pe`) and v of x written into `out[:, :, 1:3]` ([B, L, 3, H, D]) by one GEMM
        over those rows of the projection's weight; q is left for `q_rope`. In between, an attention override
        can start moving k and v (attention.kv_ready_hook) while q is computed.

        The GEMM writes a new contiguous tensor, and the norm + RoPE pass carries k from it into its slots: into
        the pitched slots themselves cuBLAS cannot add the bias in its epilogue, so PyTorch would first fill
        them with the bias (an extra pass) and run the GEMM with beta = 1 (an extra read): 0.55 ms more per
        Flux 1024² step on 2 GPUs (benchmarks call s53)."""
        b, length, dim = x.shape
        kv = linear_rows(self.qkv, x, dim, 3 * dim).view(b, length, 2, self.num_heads, -1)
        norm_rope(kv[:, :, 0].transpose(1, 2), self.norm.key_norm.scale, 1e-6, pe, out=out[:, :, 1].transpose(1, 2))
        out[:, :, 2].copy_(kv[:, :, 1])

    def q_rope(self, x: torch.Tensor, pe: torch.Tensor | None, out: torch.Tensor) -> None:
        """q of x (qk-normed, rotated) written into `out[:, :, 0]`: the other half of `kv_rope` (likewise through
        a contiguous GEMM output)."""
        b, length, dim = x.shape
        q = linear_rows(self.qkv, x, 0, dim).view(b, length, self.num_heads, -1)
        norm_rope(q.transpose(1, 2), self.norm.query_norm.scale, 1e-6, pe, out=out[:, :, 0].transpose(1, 2))


# transformer_options key: a callable giving a Modulation's whole output lin(silu(vec)) ([B, multiplier * dim])
# already computed, or None. The blocks take their shift / scale / gate chunks from it instead of computing
# them. Every block's modulation depends on `vec` alone, so a sequence-parallel engine can compute them all
# at the start of a step, each rank a share, and gather them (sequence_parallel.shared_modulations).
MODULATION_KEY = "flux_modulation_supplier"


def supplied_modulation(transformer_options: dict | None, module: nn.Module) -> torch.Tensor | None:
    supply = transformer_options.get(MODULATION_KEY) if transformer_options else None
    return supply(module) if supply is not None else None


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, dtype=None, device=None, operations=None):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: torch.Tensor, supplied: torch.Tensor | None = None):
        """-> (shift, scale, gate) chunks, each [B, 1, dim] (two triples for a double block). `supplied`:
        lin(silu(vec)) computed already (MODULATION_KEY)."""
        out = (supplied if supplied is not None else self.lin(F.silu(vec)))[:, None, :].chunk(self.multiplier, dim=-1)
        if self.multiplier == 6:
            return out[:3], out[3:]
        return out, None

    def chunks(self, silu_vec: torch.Tensor, start: int, stop: int,
               supplied: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Chunks [start, stop) of (shift1, scale1, gate1, shift2, scale2, gate2), each [B, 1, dim], from
        silu(vec): only those rows of the weight are read (or sliced from `supplied`, see `forward`)."""
        dim = self.lin.weight.shape[1]
        if supplied is not None:
            out = supplied[:, None, start * dim:stop * dim]
        else:
            out = linear_rows(self.lin, silu_vec, start * dim, stop * dim)[:, None, :]
        return out.chunk(stop - start, dim=-1)


def _norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """shift + norm(x) * (1 + scale) for an affine-free LayerNorm, in one fused pass on CUDA
    (comfy/ldm/modules/fused.py; bit-for-bit the two ops elsewhere)."""
    return layernorm_modulate(x, shift, scale, norm.eps)


def _mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The Sequential(Linear, GELU(tanh), Linear) MLP with the GELU fused into the first GEMM."""
    return mlp[2](linear_gelu(mlp[0], x))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 dtype=None, device=None, operations=None):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        kw = dict(dtype=dtype, device=device)
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, double=True, operations=operations, **kw))
            setattr(self, f"{side}_norm1", operations.LayerNorm(hidden_size, elementwise_affine=False,
                                                                 eps=1e-6, **kw))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias,
                                                        operations=operations, **kw))
            setattr(self, f"{side}_norm2", operations.LayerNorm(hidden_size, elementwise_affine=False,
                                                                 eps=1e-6, **kw))
            setattr(self, f"{side}_mlp", nn.Sequential(
                operations.Linear(hidden_size, mlp_hidden_dim, bias=True, **kw),
                nn.GELU(approximate="tanh"),
                operations.Linear(mlp_hidden_dim, hidden_size, bias=True, **kw),
            ))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: torch.Tensor | None = None, transformer_options: dict | None = None):
        # the first shift and scale now; the other four modulation chunks (a GEMV reading two thirds of each
        # modulation weight) are side work of the attention: under sequence parallel they run while q/k/v are
        # exchanged
        img_all = supplied_modulation(transformer_options, self.img_mod)
        txt_all = supplied_modulation(transformer_options, self.txt_mod)
        silu_vec = F.silu(vec) if img_all is None or txt_all is None else None
        img_shift1, img_scale1 = self.img_mod.chunks(silu_vec, 0, 2, img_all)
        txt_shift1, txt_scale1 = self.txt_mod.chunks(silu_vec, 0, 2, txt_all)
        later: dict = {}

        def modulation_rest():
            later["img"] = self.img_mod.chunks(silu_vec, 2, 6, img_all)
            later["txt"] = self.txt_mod.chunks(silu_vec, 2, 6, txt_all)

        # joint attention over [txt, img] (the order the checkpoint's RoPE ids are laid out in): q, k and v
        # are written straight into their stream's half of one packed joint buffer, so no concatenation follows
        txt_len = txt.shape[1]
        b, joint = img.shape[0], txt_len + img.shape[1]
        heads, head_dim = self.num_heads, self.hidden_size // self.num_heads
        qkv = qkv_buffer(transformer_options, (b, joint, 3, heads, head_dim), img.dtype, img.device)
        txt_pe, img_pe = (pe[:, :, :txt_len], pe[:, :, txt_len:]) if pe is not None else (None, None)
        txt_in = _norm_modulate(self.txt_norm1, txt, txt_shift1, txt_scale1)
        img_in = _norm_modulate(self.img_norm1, img, img_shift1, img_scale1)
        kv_ready = kv_ready_hook(transformer_options)
        if kv_ready is None:
            self.txt_attn.qkv_rope(txt_in, txt_pe, qkv[:, :txt_len])
            self.img_attn.qkv_rope(img_in, img_pe, qkv[:, txt_len:])
        else:
            # k and v of both streams first, handed to the override (under the gathered ring they start for the
            # peers at once), then q while they travel: with the modulations shared over the ranks, q is the
            # only work left to hide that transfer (a double block's idle 86 µs waiting for it, call s47)
            self.txt_attn.kv_rope(txt_in, txt_pe, qkv[:, :txt_len])
            self.img_attn.kv_rope(img_in, img_pe, qkv[:, txt_len:])
            kv_ready(qkv)
            self.txt_attn.q_rope(txt_in, txt_pe, qkv[:, :txt_len])
            self.img_attn.q_rope(img_in, img_pe, qkv[:, txt_len:])
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if silu_vec is None:  # supplied modulations: only views to take, nothing worth running beside an exchange
            modulation_rest()
        attn = optimized_attention(q, k, v, heads, mask=attn_mask, skip_reshape=True,
                                   transformer_options=transformer_options,
                                   side_work=None if silu_vec is None else (modulation_rest,))
        txt_attn, img_attn = attn[:, :txt_len], attn[:, txt_len:]
        img_gate1, img_shift2, img_scale2, img_gate2 = later["img"]
        txt_gate1, txt_shift2, txt_scale2, txt_gate2 = later["txt"]

        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_gate2, _mlp(self.img_mlp, _norm_modulate(self.img_norm2, img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_gate2, _mlp(self.txt_mlp, _norm_modulate(self.txt_norm2, txt, txt_shift2, txt_scale2)))
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt, img]; qkv and the MLP input share linear1, attention out and MLP out linear2."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_scale: float | None = None,
                 dtype=None, device=None, operations=None):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        kw = dict(dtype=dtype, device=device)
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **kw)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **kw)
        self.norm = QKNorm(head_dim, operations=operations, **kw)
        self.pre_norm = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, **kw)
        self.modulation = Modulation(hidden_size, double=False, operations=operations, **kw)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: torch.Tensor | None = None, transformer_options: dict | None = None):
        (shift, scale, gate), _ = self.modulation(vec, supplied_modulation(transformer_options, self.modulation))
        b, length, _ = x.shape
        hidden, mlp_hidden = self.hidden_dim, self.mlp_hidden_dim
        h = _norm_modulate(self.pre_norm, x, shift, scale)
        # linear1 as two GEMMs over row slices of its weight: q/k/v, and the MLP input with its GELU fused
        # into the GEMM; linear2 as two GEMMs over column slices, accumulated: no split, GELU or concat pass.
        # The MLP branch does not depend on the attention, so it goes to the attention as side work: under
        # sequence parallel it runs while the all-to-alls are in flight.
        qkv = qkv_buffer(transformer_options, (b, length, 3, self.num_heads, hidden // self.num_heads), h.dtype,
                         h.device)
        linear_rows(self.linear1, h, 0, 3 * hidden, out=qkv)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        norm_rope(q, self.norm.query_norm.scale, 1e-6, pe, out=q)  # in place: q/k/v stay packed
        norm_rope(k, self.norm.key_norm.scale, 1e-6, pe, out=k)
        branch: dict = {}

        def mlp_in():
            branch["mlp"] = linear_rows(self.linear1, h, 3 * hidden, 3 * hidden + mlp_hidden, gelu=True)

        def mlp_out():
            branch["out"] = linear_cols(self.linear2, branch.pop("mlp"), hidden, hidden + mlp_hidden)

        attn = optimized_attention(q, k, v, self.num_heads, mask=attn_mask, skip_reshape=True,
                                   skip_output_reshape=True, transformer_options=transformer_options,
                                   side_work=(mlp_in, mlp_out))
        attn = attn.transpose(1, 2).reshape(b, length, hidden)  # a view when attention returned [B, L, H, D]
        out = linear_cols(self.linear2, attn, 0, hidden, accumulate_into=branch["out"])
        x = torch.addcmul(x, gate, out)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, dtype=None, device=None,
                 operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm_final = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, **kw)
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              operations.Linear(hidden_size, 2 * hidden_size, bias=True, **kw))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_norm_modulate(self.norm_final, x, shift, scale))
