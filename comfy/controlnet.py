"""CONTROL_NET objects: loading ControlNet files and turning a hint image into per-block residuals.

- `load_controlnet(path)` / `load_controlnet_state_dict(sd, name)` (ControlNetLoader) detect the format:
  Flux XLabs, Flux InstantX / Union (diffusers layout), Flux BFL-named (`comfy.ldm.flux.controlnet`) and
  Stability's SD3.5 ControlNets (`comfy.ldm.mmdit.controlnet`, when that family is present).
- `ControlNet.set_cond_hint(image, strength, (start_percent, end_percent), vae)` returns the object that
  ControlNetApplyAdvanced stores in a conditioning entry under ``"control"``; several chain through
  `set_previous_controlnet` and their residuals add up.
- The sampler (`comfy.samplers.calc_cond_batch`) calls `get_control(x, sigma, cond, batched_number,
  transformer_options, model=)` per batched model call; the result is the diffusion model's ``control``
  argument: ``{"input": [residual per double/joint block], "output": [residual per single block]}``,
  already laid over the main model's blocks, scaled by strength, or None outside the step range.
"""

from __future__ import annotations

import logging

import torch

import comfy.utils

logger = logging.getLogger(__name__)


def _main_block_counts(diffusion_model) -> dict[str, int]:
    """How many blocks of the main model each residual list addresses."""
    if hasattr(diffusion_model, "double_blocks"):
        return {"input": len(diffusion_model.double_blocks), "output": len(diffusion_model.single_blocks)}
    if hasattr(diffusion_model, "joint_blocks"):  # MMDiT takes its residuals as control["output"]
        return {"input": 0, "output": len(diffusion_model.joint_blocks)}
    raise ValueError(f"{type(diffusion_model).__name__} takes no ControlNet residuals")


class ControlBase:
    def __init__(self):
        self.cond_hint_original: torch.Tensor | None = None
        self.cond_hint: torch.Tensor | None = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range: tuple[float, float] | None = None
        self.previous_controlnet: ControlBase | None = None
        self.vae = None
        self.extra_args: dict = {}

    def set_cond_hint(self, cond_hint: torch.Tensor, strength: float = 1.0,
                      timestep_percent_range: tuple[float, float] = (0.0, 1.0), vae=None, extra_concat=None):
        """cond_hint: IMAGE channels-first [B, 3, H, W] in 0..1."""
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = tuple(timestep_percent_range)
        self.vae = vae
        self.cond_hint = None
        return self

    def set_previous_controlnet(self, controlnet):
        self.previous_controlnet = controlnet
        return self

    def set_extra_arg(self, name: str, value) -> None:
        self.extra_args[name] = value

    def pre_run(self, model, percent_to_sigma) -> None:
        self.timestep_range = (percent_to_sigma(self.timestep_percent_range[0]),
                               percent_to_sigma(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_sigma)

    def cleanup(self) -> None:
        self.cond_hint = None
        self.timestep_range = None
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()

    def get_models(self) -> list:
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def copy_to(self, c) -> None:
        c.cond_hint_original = self.cond_hint_original
        c.strength = self.strength
        c.timestep_percent_range = self.timestep_percent_range
        c.vae = self.vae
        c.extra_args = dict(self.extra_args)

    @staticmethod
    def merge(a: dict | None, b: dict | None) -> dict | None:
        """Element-wise sum of two control dicts (either may be None; entries may be None)."""
        if a is None:
            return b
        if b is None:
            return a
        out = {}
        for key in set(a) | set(b):
            la, lb = a.get(key) or [], b.get(key) or []
            merged = []
            for i in range(max(len(la), len(lb))):
                x = la[i] if i < len(la) else None
                y = lb[i] if i < len(lb) else None
                merged.append(y if x is None else (x if y is None else x + y))
            out[key] = merged
        return out


class ControlNet(ControlBase):
    """A ControlNet network plus how its hint is prepared.

    latent_input: the hint is VAE-encoded (needs `vae`), then `latent_format.process_in`; otherwise it is an
    image at the latent size x `compression` in [-1, 1]. `preprocess_image` maps the 0..1 image first.
    """

    def __init__(self, control_model: torch.nn.Module, latent_input: bool, compression: int = 8,
                 latent_format=None, preprocess_image=None, repeat_mode: str = "interval",
                 extra_hint_kwargs: dict | None = None):
        super().__init__()
        self.control_model = control_model
        self.latent_input = latent_input
        self.compression = compression
        self.latent_format = latent_format
        self.preprocess_image = preprocess_image
        self.repeat_mode = repeat_mode
        self.extra_hint_kwargs = dict(extra_hint_kwargs or {})

    def copy(self) -> ControlNet:
        c = ControlNet(self.control_model, self.latent_input, self.compression, self.latent_format,
                       self.preprocess_image, self.repeat_mode, self.extra_hint_kwargs)
        self.copy_to(c)
        return c

    def get_models(self) -> list:
        return super().get_models() + [self.control_model]

    def _prepare_hint(self, x: torch.Tensor, model) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        img = self.cond_hint_original
        if self.preprocess_image is not None:
            img = self.preprocess_image(img)
        img = comfy.utils.common_upscale(img, w * 8, h * 8, "nearest-exact", "center")
        if self.latent_input:
            if self.vae is None:
                raise ValueError("This ControlNet works on latents and needs a VAE: connect the VAE input of "
                                 "ControlNetApplyAdvanced (Apply ControlNet) to the model's VAE.")
            lat = self.vae.encode(img.movedim(1, -1)[..., :3])
            fmt = self.latent_format or model.latent_format
            hint = fmt.process_in(lat)
            hint = hint[..., :h, :w]
        else:
            hint = img * 2.0 - 1.0
        return hint

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict | None = None, model=None):
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options,
                                                        model=model)
        if model is None:
            raise ValueError("ControlNet.get_control needs the BaseModel (model=) for timestep conversion")
        ms = model.model_sampling
        # percent -> sigma depends on the model sampling in force (ModelSampling* nodes patch it)
        if self.timestep_range is None or getattr(self, "_ranges_for", None) is not ms:
            self.pre_run(model, ms.percent_to_sigma)
            self._ranges_for = ms
        sigma = float(t[0])
        if sigma > self.timestep_range[0] or sigma < self.timestep_range[1]:
            return prev
        net = self.control_model
        param = next(net.parameters())
        dtype = model.compute_dtype() if hasattr(model, "compute_dtype") else param.dtype
        if param.device != x_noisy.device or param.dtype != dtype:
            net.to(device=x_noisy.device, dtype=dtype)
        if self.cond_hint is None or self.cond_hint.shape[-2:] != self._hint_size(x_noisy):
            self.cond_hint = self._prepare_hint(x_noisy, model).to(x_noisy.device, dtype)
        hint = self.cond_hint
        if hint.shape[0] != x_noisy.shape[0]:
            reps = -(-x_noisy.shape[0] // hint.shape[0])
            hint = hint.repeat(reps, *([1] * (hint.ndim - 1)))[:x_noisy.shape[0]]
        xin = ms.calculate_input(t, x_noisy).to(dtype)  # as BaseModel.apply_model scales the main model's input
        timestep = ms.timestep(t).float()
        context = cond.get("c_crossattn")
        kwargs = dict(self.extra_hint_kwargs)
        kwargs["main_model"] = model.diffusion_model  # SD3.5 ControlNets start from its patch embedding
        for name in ("y", "guidance"):
            if cond.get(name) is not None:
                kwargs[name] = cond[name] if name == "guidance" else cond[name].to(dtype)
        with torch.no_grad():
            raw = net(xin, hint, timestep, context.to(dtype) if context is not None else None,
                      transformer_options=transformer_options or {}, **kwargs)
        counts = _main_block_counts(model.diffusion_model)
        out = {}
        for key, residuals in raw.items():
            expanded = _expand(residuals, counts.get(key, 0), self.repeat_mode)
            out[key] = [r * self.strength if r is not None else None for r in expanded]
        return self.merge(prev, out)

    def _hint_size(self, x):
        if self.latent_input:
            return tuple(x.shape[-2:])
        return (x.shape[-2] * 8, x.shape[-1] * 8)


def _expand(residuals, n_main: int, repeat_mode: str) -> list:
    """Lay n controlnet residuals over n_main main-model blocks: 'cycle' gives block i residual i % n
    (XLabs), 'interval' residual i // ceil(n_main / n) (Flux InstantX), 'ratio' int(i / (n_main / n)) (SD3)."""
    residuals = list(residuals)
    if not residuals or n_main == 0:
        return []
    n = len(residuals)
    if repeat_mode == "cycle":
        return [residuals[i % n] for i in range(n_main)]
    if repeat_mode == "ratio":
        step = n_main / n
        return [residuals[int(i / step)] if int(i / step) < n else None for i in range(n_main)]
    interval = -(-n_main // n)
    return [residuals[i // interval] if i // interval < n else None for i in range(n_main)]


# ---------------------------------------------------------------------------------------------------
# Loading


def _loaders():
    """(name, detect(sd) -> bool, build(sd) -> ControlNet) per supported format family."""
    from comfy.ldm.flux import controlnet as flux_cn

    def build_flux(sd):
        fmt = flux_cn.detect_flux_controlnet(sd)
        net = flux_cn.load_flux_controlnet(sd)
        import comfy.latent_formats
        return ControlNet(net, latent_input=net.hint_mode == "latent", latent_format=comfy.latent_formats.Flux(),
                          repeat_mode="cycle" if fmt == "xlabs" else "interval")

    out = [("Flux", lambda sd: flux_cn.detect_flux_controlnet(sd) is not None, build_flux)]
    try:
        from comfy.ldm.mmdit import controlnet as mmdit_cn
    except ImportError:  # the SD3 family is optional in this build
        mmdit_cn = None
    if mmdit_cn is not None:
        out.append(("SD3.5", mmdit_cn.detect_sd35_controlnet, mmdit_cn.build_sd35_controlnet))
    return out


def describe_controlnet(sd: dict) -> str:
    keys = list(sd)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    if has("input_blocks", "zero_convs", "middle_block_out", "down_blocks"):
        return "an SD1.x / SDXL UNet ControlNet"
    if has("controlnet_blocks") and has("joint_blocks", "pos_embed_input.proj"):
        return "an SD3 / SD3.5 ControlNet"
    if has("double_blocks", "single_blocks", "transformer_blocks"):
        return "a DiT ControlNet of an unsupported layout"
    return "not a ControlNet (first keys: " + ", ".join(sorted(keys)[:3]) + ")"


def load_controlnet_state_dict(sd: dict, name: str = "ControlNet", model=None) -> ControlNet:
    for family, detect, build in _loaders():
        if detect(sd):
            cn = build(sd)
            logger.info("Loaded %s ControlNet '%s'", family, name)
            return cn
    raise ValueError(f"ControlNet '{name}' is not a format this build can load ({describe_controlnet(sd)}). "
                     "Supported: Flux XLabs, Flux InstantX / Union (diffusers layout), Flux BFL-named, "
                     "SD3.5 (Stability sd3.5_large_controlnet_*).")


def load_controlnet(path: str, model=None) -> ControlNet:
    sd = comfy.utils.load_torch_file(path)
    return load_controlnet_state_dict(sd, name=path, model=model)
