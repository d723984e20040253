"""Text-encoder models: what a state dict is, and transformers' model built from it.

Owns detection (`detect_text_encoder`), hyper-parameters read from tensor shapes (so tiny test encoders
load through the same code as CLIP-L/G, T5-XXL and umT5-XXL), and `TextEncoder`, the module that runs
one encoder on token ids with ComfyUI's semantics: which hidden layer is the output, which pooled
vector, attention masks and zeroing of padding (umT5 for Wan), and prompt weights applied against the
encoding of an empty prompt.

ComfyUI's text-encoder files use the Hugging Face key layout: `text_model.*` (+ `text_projection.weight`)
for CLIP, `encoder.block.N.*` + `shared.weight` for T5 / umT5.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

CLIP_KEY = "text_model.encoder.layers.0.self_attn.q_proj.weight"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
             "text_encoders.t5xxl.transformer.", "cond_stage_model.transformer.", "transformer.", "model.")


def strip_prefix(sd: dict) -> dict:
    """Drop a wrapper prefix (checkpoint or ComfyUI `transformer.`) in front of the HF key layout."""
    for key in (CLIP_KEY, T5_KEY):
        for k in sd:
            if k.endswith(key) and k != key:
                prefix = k[: -len(key)]
                return {k2[len(prefix):]: v for k2, v in sd.items() if k2.startswith(prefix)} | (
                    {"spiece_model": sd["spiece_model"]} if "spiece_model" in sd else {})
    return sd


def detect_text_encoder(sd: dict, name: str = "<state dict>") -> str:
    """'clip', 't5' or 'umt5' for a state dict in the HF layout; ValueError naming the file otherwise."""
    if CLIP_KEY in sd:
        return "clip"
    if T5_KEY in sd:
        # umT5 gives every block its own relative-position bias; T5 only the first
        return "umt5" if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd else "t5"
    hint = ""
    if any(k.startswith(("double_blocks.", "joint_blocks.", "blocks.0.", "model.diffusion_model.")) for k in sd):
        hint = " It looks like a diffusion model: load it with UNETLoader / Load Diffusion Model."
    elif any(k.startswith(("encoder.conv_in", "decoder.conv_in", "first_stage_model.")) for k in sd):
        hint = " It looks like a VAE: load it with VAELoader."
    elif any(k.startswith("model.layers.") for k in sd):
        hint = " It looks like an LLM text encoder (Llama/Qwen/Gemma), which is not supported yet."
    raise ValueError(
        f"'{name}' is not a supported text encoder: expected CLIP-L/G keys ('{CLIP_KEY}') or T5/umT5 keys "
        f"('{T5_KEY}', 'shared.weight').{hint}")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _dequantize(sd: dict, dtype: torch.dtype) -> dict:
    """fp8 'scaled' files store weight / scale_weight: multiply back and cast to the compute dtype."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight") or k in ("scaled_fp8", "spiece_model"):
            continue
        if k.endswith(".weight") and k[:-7] + ".scale_weight" in sd:
            v = v.to(torch.float32) * sd[k[:-7] + ".scale_weight"].to(torch.float32)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def clip_config(sd: dict, gelu: bool | None = None):
    from transformers import CLIPTextConfig

    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    proj = sd.get("text_projection.weight")
    if gelu is None:
        gelu = hidden == 1280  # OpenCLIP bigG (CLIP-G) uses exact gelu; OpenAI's CLIP-L quick_gelu
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        # head count is not stored; every CLIP text tower uses 64-wide heads
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=hidden if proj is None else proj.shape[0],
        hidden_act="gelu" if gelu else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def t5_config(sd: dict, kind: str):
    from transformers import T5Config, UMT5Config

    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is None:
        raise ValueError("T5 state dict has no token embedding ('shared.weight' / 'encoder.embed_tokens.weight')")
    vocab, d_model = emb.shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = sd[T5_KEY].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    cls = UMT5Config if kind == "umt5" else T5Config
    return cls(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
               d_ff=sd[ff_key].shape[0], num_layers=_count(sd, r"encoder\.block\.(\d+)\."),
               relative_attention_num_buckets=buckets,
               feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
               layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False)


def build_hf_model(sd: dict, kind: str, dtype: torch.dtype, device: torch.device, gelu: bool | None = None):
    """transformers' encoder for `kind`, with the state dict's weights (no random init, no download)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

    if kind == "clip":
        config = clip_config(sd, gelu)
        cls = CLIPTextModelWithProjection
    else:
        config = t5_config(sd, kind)
        cls = UMT5EncoderModel if kind == "umt5" else T5EncoderModel
    weights = _dequantize(sd, dtype)
    if kind == "clip" and "text_projection.weight" not in weights:
        # files without a projection (many CLIP-L) behave as an identity projection, as in ComfyUI
        weights["text_projection.weight"] = torch.eye(config.hidden_size, dtype=dtype)
    if kind != "clip":
        emb = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = emb
    # Built on the meta device: initialising a 4.7B-parameter T5 only to overwrite it would cost minutes.
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(weights))
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{kind} text encoder is missing {len(missing)} weights, e.g. {missing[:3]}: "
                         "the file is truncated or not a complete encoder")
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        logger.debug("Ignoring %d extra keys in %s text encoder: %s", len(unexpected), kind, unexpected[:5])
    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"buffer {name} of {cls.__name__} was not initialised")
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            mod.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.to(device).eval()


class TextEncoder(torch.nn.Module):
    """One encoder with ComfyUI's output conventions.

    layer: "last" (final hidden state, after the final layer norm), or "hidden" with `layer_idx` (the
    output of that transformer layer, e.g. -2 for CLIP's penultimate, without the final norm unless
    `layer_norm_hidden_state`). Pooled: CLIP's end-token vector, projected or not. T5: `use_attention_mask`
    masks positions after the first end token; `zero_out_masked` zeroes them in the output (umT5/Wan).
    """

    def __init__(self, model: torch.nn.Module, kind: str, layer: str = "last", layer_idx: int | None = None,
                 layer_norm_hidden_state: bool = True, return_projected_pooled: bool = True,
                 use_attention_mask: bool = False, zero_out_masked: bool = False, end_token: int = 49407):
        super().__init__()
        self.transformer = model
        self.kind = kind
        self.layer = layer
        self.layer_idx = layer_idx
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.return_projected_pooled = return_projected_pooled
        self.use_attention_mask = use_attention_mask
        self.zero_out_masked = zero_out_masked
        self.end_token = end_token
        self.default_layer = (layer, layer_idx)

    @property
    def width(self) -> int:
        cfg = self.transformer.config
        return cfg.hidden_size if self.kind == "clip" else cfg.d_model

    def clip_layer(self, layer_idx: int | None) -> None:
        """CLIPSetLastLayer: -1 is the last layer; -2 the penultimate ...; None restores the default."""
        if layer_idx is None:
            self.layer, self.layer_idx = self.default_layer
        elif layer_idx == -1 and self.default_layer[0] == "last":
            self.layer, self.layer_idx = "last", None
        else:
            self.layer, self.layer_idx = "hidden", layer_idx

    def _mask_through_end(self, ids: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first end token, 0 after: the padding mask ComfyUI gives T5."""
        is_end = (ids == self.end_token).int()
        seen_before = torch.cumsum(is_end, dim=1) - is_end
        return (seen_before == 0).to(torch.long)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(self.transformer.parameters()).device
        ids = ids.to(device)
        want_hidden = self.layer == "hidden"
        if self.kind == "clip":
            out = self.transformer(input_ids=ids, output_hidden_states=want_hidden)
            if want_hidden:
                z = out.hidden_states[self.layer_idx]
                if self.layer_norm_hidden_state:
                    z = self.transformer.text_model.final_layer_norm(z)
            else:
                z = out.last_hidden_state
            # the pooled vector is taken at the first end token, after the final norm
            end_pos = (ids == self.end_token).int().argmax(dim=-1)
            pooled = out.last_hidden_state[torch.arange(ids.shape[0], device=device), end_pos]
            if self.return_projected_pooled:
                pooled = self.transformer.text_projection(pooled)
            return z.float(), pooled.float()
        mask = self._mask_through_end(ids) if (self.use_attention_mask or self.zero_out_masked) else None
        out = self.transformer(input_ids=ids, attention_mask=mask if self.use_attention_mask else None,
                               output_hidden_states=want_hidden)
        z = out.hidden_states[self.layer_idx] if want_hidden else out.last_hidden_state
        if self.zero_out_masked:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        return z.float(), None

    @torch.no_grad()
    def encode_token_weights(self, chunks: list[list[tuple[int, float]]], empty: list[int] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode chunks of (token, weight); returns cond [1, sum(len), C] and the first chunk's pooled.

        A weight w on a token moves its vector away from the empty prompt's vector at that position:
        z = z_empty + (z - z_empty) * w (ComfyUI's formula), so weight 1 leaves the encoding unchanged.
        """
        length = max(len(c) for c in chunks)
        if any(len(c) != length for c in chunks):
            raise ValueError("all token chunks of one encoder must have the same length")
        ids = [[t for t, _ in c] for c in chunks]
        weighted = any(w != 1.0 for c in chunks for _, w in c)
        if weighted:
            if empty is None:
                raise ValueError("weighted tokens need the empty-prompt tokens as a reference")
            if len(empty) != length:
                raise ValueError(f"empty-prompt reference has {len(empty)} tokens, the chunks {length}")
            ids.append(list(empty))
        z, pooled = self(torch.tensor(ids, dtype=torch.long))
        outs = []
        for k, chunk in enumerate(chunks):
            zk = z[k]
            if weighted:
                w = torch.tensor([wt for _, wt in chunk], dtype=zk.dtype, device=zk.device).unsqueeze(-1)
                # unweighted tokens are kept bit-exact (the formula would round them)
                zk = torch.where(w != 1.0, z[-1] + (zk - z[-1]) * w, zk)
            outs.append(zk)
        cond = torch.cat(outs, dim=0).unsqueeze(0)
        return cond, (None if pooled is None else pooled[0:1])
