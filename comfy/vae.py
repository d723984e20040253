"""The VAE object that VAELoader / checkpoints hand to VAEDecode and VAEEncode.

Owns `VAE(sd)`: family detection from keys and shapes (KL autoencoder: 4-channel SD, 16-channel
Flux/SD3; Wan 2.1 / 2.2 video VAEs, comfy/ldm/wan/vae.py), `decode(latent) -> IMAGE [B,H,W,C] 0..1 on the CPU`
(video: [B,T,H,W,C]), `encode(IMAGE) -> latent`, tiled decode
for large images, and the errors for files that are not a supported VAE. Latents here are the VAE's
raw space: the model's latent format applies scale/shift (Flux 0.3611/0.1159, SD3 1.5305/0.0609).
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
from comfy.ldm.models.autoencoder import AutoencoderKL, conform_attention_weights, kl_config_from_state_dict

logger = logging.getLogger(__name__)

_PREFIXES = ("first_stage_model.", "vae.")


def _strip_prefix(sd: dict) -> dict:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "decoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_vae_family(sd: dict, name: str = "<state dict>") -> str:
    """'kl_sd' (4 latent channels), 'kl_16' (Flux / SD3), 'kl' (other KL sizes), 'wan21' (Wan 2.1 video
    VAE) or 'wan22' (Wan 2.2 video VAE, 48 channels); ValueError otherwise."""
    from comfy.ldm.wan.vae import is_wan_vae, wan_vae_config_from_state_dict

    if is_wan_vae(sd):
        config = wan_vae_config_from_state_dict(sd, name)  # raises for incomplete files, naming the fix
        return "wan22" if config.get("residual") else "wan21"
    if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd and "encoder.mid.attn_1.q.weight" in sd:
        z = sd["decoder.conv_in.weight"].shape[1]
        if sd["decoder.conv_in.weight"].ndim != 4:
            raise ValueError(f"'{name}' is a video VAE with 3-D convolutions, which is not supported yet")
        return {4: "kl_sd", 16: "kl_16"}.get(z, "kl")
    hint = ""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        hint = (" It is in the diffusers layout; use the single-file (ComfyUI/LDM layout) VAE, e.g. "
                "ae.safetensors for Flux.")
    elif any(k.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.")) for k in sd):
        hint = " It looks like a diffusion model: load it with UNETLoader / Load Diffusion Model."
    elif any(k.startswith(("text_model.", "encoder.block.")) for k in sd):
        hint = " It looks like a text encoder: load it with CLIPLoader / DualCLIPLoader."
    raise ValueError(
        f"'{name}' is not a supported VAE: expected a KL autoencoder in the LDM layout "
        f"(encoder.conv_in, encoder.down.N.block.M.*, encoder.mid.attn_1.*, decoder.up.N.*).{hint}")


# what each VAE family is, and which models make latents of a given shape (for the wrong-VAE errors)
_FAMILY_NAMES = {"kl_sd": "an SD1.x/SDXL-style VAE", "kl_16": "a Flux / SD3 / SD3.5 VAE", "kl": "a KL VAE",
                 "wan21": "the Wan 2.1 video VAE", "wan22": "the Wan 2.2 video VAE"}
_LATENT_SOURCES = {(4, 4): "an SD1.x / SDXL / PixArt / HunyuanDiT model (4-channel image latent)",
                   (16, 4): "a Flux / SD3 / SD3.5 model (16-channel image latent)",
                   (16, 5): "a Wan 2.1 model (16-channel video latent [B,C,T,H,W])",
                   (48, 5): "a Wan 2.2 TI2V 5B model or Wan22ImageToVideoLatent (48-channel video latent)"}


def _join(chunks: list) -> torch.Tensor:
    """The batch chunks of a decode / encode as one tensor: a single chunk as it is (concatenating one 12 MB
    image copied it again on the host: 10 ms of the 4-GPU fork path's VAE.decode, its host profile)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class VAE:
    def __init__(self, sd: dict | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 name: str = "<state dict>"):
        if sd is None:
            raise ValueError("VAE needs a state dict (load the file with comfy.utils.load_torch_file)")
        sd = conform_attention_weights(_strip_prefix(sd))
        self.name = name  # the file, for errors that name it (VAELoader passes it)
        self.family = detect_vae_family(sd, name)
        self.device = device or mm.vae_device()
        self.vae_dtype = dtype or mm.vae_dtype(self.device)
        self.output_device = mm.intermediate_device()
        if self.family in ("wan21", "wan22"):
            self._init_wan(sd, name)
            return
        config = kl_config_from_state_dict(sd)
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = AutoencoderKL(**config)
        expected = set(model.state_dict())
        missing = sorted(expected - set(sd))
        if missing:
            raise ValueError(f"'{name}' is missing {len(missing)} VAE weights, e.g. {missing[:3]}: "
                             "the file is truncated or not a complete VAE")
        extra = sorted(set(sd) - expected)
        if extra:
            logger.debug("VAE '%s': ignoring %d extra keys (e.g. %s)", name, len(extra), extra[:3])
        model.load_state_dict({k: sd[k].to(self.vae_dtype) for k in expected}, assign=True)
        self.first_stage_model = model.to(self.device).eval()
        self.latent_channels = config["z_channels"]
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(config["ch_mult"]) - 1)
        self.latent_dim = 2
        self.patcher = self._make_patcher()
        self._fit_preview_map()

    def _init_wan(self, sd: dict, name: str) -> None:
        from comfy.ldm.wan.vae import WanVAE, check_wan_vae_keys, wan_vae_config_from_state_dict

        config = wan_vae_config_from_state_dict(sd, name)
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = WanVAE(**config)
        extra = check_wan_vae_keys(model, sd, name)
        if extra:
            logger.debug("VAE '%s': ignoring %d extra keys (e.g. %s)", name, len(extra), extra[:3])
        model.load_state_dict({k: sd[k].to(self.vae_dtype) for k in model.state_dict()}, assign=True)
        self.first_stage_model = model.to(self.device).eval()
        self.latent_channels = config["z_dim"]
        self.downscale_ratio = self.upscale_ratio = model.spatial_compression
        self.temporal_compression = model.temporal_compression
        self.latent_dim = 3
        self.patcher = self._make_patcher()
        self._fit_preview_map()

    def _fit_preview_map(self) -> None:
        # latent2rgb previews come from a map fitted on this VAE's own decodes (no copied tables); a
        # no-op unless --preview-method is on, and a failed fit only loses the preview (it logs why)
        from comfy.latent_preview_fit import maybe_fit_for_vae

        maybe_fit_for_vae(self)

    def _make_patcher(self):
        try:
            from comfy.model_patcher import ModelPatcher
        except ImportError:
            return None
        offload = getattr(mm, "vae_offload_device", lambda: torch.device("cpu"))()
        return ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=offload)

    # -- ComfyUI API --------------------------------------------------------------------------------
    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def temporal_compression_decode(self) -> int | None:
        return getattr(self, "temporal_compression", None)

    def temporal_compression_encode(self) -> int | None:
        return getattr(self, "temporal_compression", None)

    def get_sd(self) -> dict:
        return self.first_stage_model.state_dict()

    def check_latent(self, samples: torch.Tensor) -> None:
        """Refuse a latent this VAE cannot decode, naming the VAE file, what it expects and where the latent
        comes from: a VAE of another family would otherwise fail deep inside a convolution."""
        ndim = self.latent_dim + 2
        if samples.ndim == ndim and samples.shape[1] == self.latent_channels:
            return
        layout = "[B,C,T,H,W]" if self.latent_dim == 3 else "[B,C,H,W]"
        got = _LATENT_SOURCES.get((samples.shape[1] if samples.ndim > 1 else 0, samples.ndim),
                                  "a model of another family")
        raise ValueError(
            f"VAE '{self.name}' is {_FAMILY_NAMES.get(self.family, 'a VAE')} and decodes {self.latent_channels}-"
            f"channel latents {layout}, but this latent is {tuple(samples.shape)}, which comes from {got}. "
            "Load the VAE that belongs to the diffusion model (e.g. ae.safetensors for Flux, the checkpoint's "
            "own VAE for SD3.5, wan_2.1_vae.safetensors for Wan 2.1 and the Wan 2.2 14B models, "
            "wan2.2_vae.safetensors for Wan 2.2 TI2V 5B).")

    def _ensure_loaded(self) -> None:
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher])

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Latent [B,C,h,w] (raw VAE space) -> IMAGE [B, h*r, w*r, 3] float32 in 0..1 on the CPU.
        Video VAEs: [B,C,t,h,w] -> [B, 1+4(t-1), h*r, w*r, 3] (VAEDecode folds frames into the batch)."""
        self.check_latent(samples)
        if self.latent_dim == 3:
            return self._decode_video(samples)
        self._ensure_loaded()
        group = self._decode_group(samples)
        if group is not None:
            return self._decode_parallel(samples, batch_size, group)
        out = []
        for i in range(0, samples.shape[0], batch_size):
            mm.throw_exception_if_processing_interrupted()
            z = samples[i:i + batch_size].to(self.device, self.vae_dtype)
            out.append(self._to_image(self.first_stage_model.decode(z)))
        return _join(out)

    def _to_image(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder output [B, 3, H, W] in -1..1 -> IMAGE [B, H, W, 3] float32 in 0..1 (contiguous) on the output
        device. The scaling and the channels-last reorder run where the decode ran, then one copy moves the
        result: no CPU passes over a strided image. For a 1024² Flux decode on an H200 (93-95 ms on the GPU),
        the whole call took 139.9 ms with those passes on the CPU and 118.5 ms now
        (benchmarks/bench_vae_decode.py, RESULTS.md)."""
        img = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous()
        return img.to(self.output_device)

    def _decode_group(self, samples: torch.Tensor):
        """The ranks this decode is split over (TACO-DiT multi-rank runtime, `parallel.vae_parallel`), or None
        (always in one process: torch.distributed is not initialised). Decided from the configuration and
        the latent's shape only, so every rank takes the same branch."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from comfy.taco_dit.parallel.vae_parallel import decode_group

        return decode_group(tuple(samples.shape), self.device)

    def _decode_parallel(self, samples: torch.Tensor, batch_size: int, group) -> torch.Tensor:
        import comfy.utils
        from comfy.taco_dit.parallel import vae_parallel

        chunks = range(0, samples.shape[0], batch_size)
        pbar = comfy.utils.ProgressBar(len(chunks)) if len(chunks) > 1 else None
        out = []
        for n, i in enumerate(chunks):
            if n:
                # the ranks decode together: an interrupt must stop all of them at the same chunk, which the
                # runtime's ProgressBar agreement round gives; a rank-local check would strand the others
                # inside a collective
                pbar.update_absolute(n)
            z = samples[i:i + batch_size].to(self.device, self.vae_dtype)
            out.append(self._to_image(vae_parallel.decode(self.first_stage_model, z, group)))
        return _join(out)

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Center-crop H and W down to multiples of the compression ratio, as VAEEncode does."""
        r = self.downscale_ratio
        h, w = pixels.shape[1] // r * r, pixels.shape[2] // r * r
        if (h, w) == tuple(pixels.shape[1:3]):
            return pixels
        y, x = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
        return pixels[:, y:y + h, x:x + w]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """IMAGE [B,H,W,C] in 0..1 -> latent [B, C, H/r, W/r] (the distribution's mean) on the CPU.
        Video VAEs: the IMAGE batch is the frames of one video ([T,H,W,C], or [B,T,H,W,C] for several)
        -> [B, C, 1+(T-1)//4, H/r, W/r]; frames past the last 1+4k are dropped."""
        if pixels.ndim == 3:
            pixels = pixels[None]
        if self.latent_dim == 3:
            return self._encode_video(pixels)
        pixels = self._crop(pixels[..., :3])  # alpha is dropped
        self._ensure_loaded()
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            mm.throw_exception_if_processing_interrupted()
            x = pixels[i:i + batch_size].movedim(-1, 1).to(self.device, self.vae_dtype) * 2.0 - 1.0
            out.append(self.first_stage_model.encode(x).float().to(self.output_device))
        return _join(out)

    # -- video VAEs (Wan 2.1 / 2.2): latents [B,C,t,h,w], videos one at a time (memory), frames in temporal chunks --
    def _video_progress(self, total: int):
        import comfy.utils

        pbar = comfy.utils.ProgressBar(total)

        def step(_done: int, _n: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)
        return step

    def _decode_video(self, samples: torch.Tensor) -> torch.Tensor:
        self.check_latent(samples)
        self._ensure_loaded()
        step = self._video_progress(samples.shape[0] * samples.shape[2])
        out = []
        for i in range(samples.shape[0]):
            video = self.first_stage_model.decode(samples[i:i + 1].to(self.device, self.vae_dtype), callback=step)
            # 0..1 and channels-last on the device, so only the final frames cross to the CPU
            out.append(video.float().add_(1.0).mul_(0.5).clamp_(0.0, 1.0).permute(0, 2, 3, 4, 1)
                       .to(self.output_device))
        return _join(out)

    def _encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim == 4:
            pixels = pixels[None]  # the IMAGE batch is the frames of one video
        b, t, h, w, c = pixels.shape
        pixels = self._crop(pixels[..., :3].reshape(b * t, h, w, min(c, 3)))
        pixels = pixels.reshape(b, t, *pixels.shape[1:])
        self._ensure_loaded()
        r = self.temporal_compression
        step = self._video_progress(b * (1 + (t - 1) // r))
        out = []
        for i in range(b):
            x = pixels[i].to(self.device, self.vae_dtype).permute(3, 0, 1, 2)[None].contiguous() * 2.0 - 1.0
            out.append(self.first_stage_model.encode(x, callback=step).float().to(self.output_device))
        return _join(out)

    @torch.no_grad()
    def decode_tiled(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16
                     ) -> torch.Tensor:
        """Decode latent tiles of tile_y x tile_x (latent pixels) with `overlap`, blending the overlaps
        linearly: bounded memory for large images, at the cost of small seams differences."""
        self.check_latent(samples)
        b, _, h, w = samples.shape
        r = self.upscale_ratio
        if h <= tile_y and w <= tile_x:
            return self.decode(samples)
        self._ensure_loaded()
        acc = torch.zeros(b, 3, h * r, w * r)
        weight = torch.zeros(1, 1, h * r, w * r)
        step_y, step_x = max(1, tile_y - overlap), max(1, tile_x - overlap)
        ys = list(range(0, max(h - tile_y, 0) + 1, step_y))
        xs = list(range(0, max(w - tile_x, 0) + 1, step_x))
        if ys[-1] + tile_y < h:
            ys.append(h - tile_y)
        if xs[-1] + tile_x < w:
            xs.append(w - tile_x)
        for y in ys:
            for x in xs:
                mm.throw_exception_if_processing_interrupted()
                tile = samples[:, :, y:y + tile_y, x:x + tile_x].to(self.device, self.vae_dtype)
                img = self.first_stage_model.decode(tile).float().cpu()
                th, tw = img.shape[-2:]
                ramp = overlap * r
                wy = torch.ones(th)
                wx = torch.ones(tw)
                if ramp > 0:
                    ramp_t = torch.linspace(1.0 / ramp, 1.0, ramp)
                    if y > 0:
                        wy[:ramp] = ramp_t[:th]
                    if y + tile_y < h:
                        wy[-ramp:] = torch.minimum(wy[-ramp:], ramp_t.flip(0)[-th:])
                    if x > 0:
                        wx[:ramp] = ramp_t[:tw]
                    if x + tile_x < w:
                        wx[-ramp:] = torch.minimum(wx[-ramp:], ramp_t.flip(0)[-tw:])
                mask = (wy[:, None] * wx[None, :])[None, None]
                acc[:, :, y * r:y * r + th, x * r:x * r + tw] += img * mask
                weight[:, :, y * r:y * r + th, x * r:x * r + tw] += mask
        img = acc / weight
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
