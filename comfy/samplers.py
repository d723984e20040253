"""ComfyUI's sampling semantics: schedulers, classifier-free guidance, conditioning batching, KSampler.

What lives here (names match ComfyUI's `comfy.samplers`, which custom node packs import):

* `SCHEDULER_NAMES` / `calculate_sigmas(model_sampling, scheduler, steps)`: the sigma schedules;
* `SAMPLER_NAMES` / `sampler_object(name)` / `ksampler(name, extra_options)`: a `KSAMPLER` wraps one
  step loop of `comfy.k_diffusion.sampling` (or uni_pc) and does the noise scaling around it;
* `calc_cond_batch(model, conds, x, sigma, model_options)`: the ONE place that turns a list of
  conditionings into model outputs; cond and uncond share one batched `apply_model` call when their
  inputs can be concatenated. The multi-GPU engine swaps it through
  `model_options["sampler_calc_cond_batch_function"]` (CFG parallel: cond and uncond on different ranks);
* `sampling_function` / `cfg_function`: `uncond + (cond - uncond) * cfg`, skipping the uncond entirely at
  cfg == 1 (unless `model_options["disable_cfg1_optimization"]`);
* `CFGGuider` (set_conds / set_cfg / sample), `KSampler`, `sample(...)`.
"""

from __future__ import annotations

import logging
import math
import uuid

import numpy as np
import scipy.stats
import torch

import comfy.model_management
from comfy.k_diffusion import sampling as k_diffusion_sampling

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------------


def _sigma_table(model_sampling) -> torch.Tensor:
    """The model's sigma table on the CPU: one copy, where reading entries of a table on the GPU one by one
    would wait for the device once per entry."""
    return model_sampling.sigmas.detach().cpu()


def simple_scheduler(model_sampling, steps):
    table = _sigma_table(model_sampling)
    sigs = []
    ss = len(table) / steps
    for x in range(steps):
        sigs += [float(table[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def ddim_scheduler(model_sampling, steps):
    table = _sigma_table(model_sampling)
    x = 1
    if math.isclose(float(table[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(table) // steps, 1)
    while x < len(table):
        sigs += [float(table[x])]
        x += ss
    sigs = sigs[::-1]
    return torch.FloatTensor(sigs)


def normal_scheduler(model_sampling, steps, sgm=False, floor=False):
    """Uniform in the model's timestep; `sgm` drops the endpoint (SGM's "uniform" spacing)."""
    s = model_sampling
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)


def beta_scheduler(model_sampling, steps, alpha=0.6, beta=0.6):
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024)."""
    table = _sigma_table(model_sampling)
    total_timesteps = len(table) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs += [float(table[int(t)])]
        last_t = t
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def linear_quadratic_schedule(model_sampling, steps, threshold_noise=0.025, linear_steps=None):
    """Mochi's schedule: linear in noise for the first half, then quadratic up to full noise."""
    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic_sigma_schedule = [quadratic_coef * (i ** 2) + linear_coef * i + const
                                    for i in range(linear_steps, steps)]
        sigma_schedule = linear_sigma_schedule + quadratic_sigma_schedule + [1.0]
        sigma_schedule = [1.0 - x for x in sigma_schedule]
    return torch.FloatTensor(sigma_schedule) * model_sampling.sigma_max.cpu()


def kl_optimal_scheduler(n, sigma_min, sigma_max):
    """sigma_i = tan((i/(n-1)) * atan(sigma_min) + (1 - i/(n-1)) * atan(sigma_max)) (Align Your Steps)."""
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


class SchedulerHandler:
    def __init__(self, handler, use_ms=True):
        self.handler = handler
        self.use_ms = use_ms  # True: handler(model_sampling, steps); False: handler(n, sigma_min, sigma_max)


SCHEDULER_HANDLERS = {
    "simple": SchedulerHandler(simple_scheduler),
    "sgm_uniform": SchedulerHandler(lambda ms, steps: normal_scheduler(ms, steps, sgm=True)),
    "karras": SchedulerHandler(k_diffusion_sampling.get_sigmas_karras, use_ms=False),
    "exponential": SchedulerHandler(k_diffusion_sampling.get_sigmas_exponential, use_ms=False),
    "ddim_uniform": SchedulerHandler(ddim_scheduler),
    "beta": SchedulerHandler(beta_scheduler),
    "normal": SchedulerHandler(normal_scheduler),
    "linear_quadratic": SchedulerHandler(linear_quadratic_schedule),
    "kl_optimal": SchedulerHandler(kl_optimal_scheduler, use_ms=False),
}
SCHEDULER_NAMES = list(SCHEDULER_HANDLERS)


def calculate_sigmas(model_sampling, scheduler_name, steps):
    handler = SCHEDULER_HANDLERS.get(scheduler_name)
    if handler is None:
        raise ValueError(f"Unknown scheduler {scheduler_name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if handler.use_ms:
        return handler.handler(model_sampling, steps)
    return handler.handler(n=steps, sigma_min=float(model_sampling.sigma_min),
                           sigma_max=float(model_sampling.sigma_max))


# ---------------------------------------------------------------------------------------------------
# Conditioning -> model inputs
# ---------------------------------------------------------------------------------------------------


def convert_cond(cond):
    """CONDITIONING ([[tensor, {opts}], ...]) -> list of dicts with `cross_attn`, `model_conds`, `uuid`."""
    out = []
    for c in cond or []:
        temp = dict(c[1])
        temp["model_conds"] = dict(temp.get("model_conds", {}))
        if c[0] is not None:
            temp["cross_attn"] = c[0]
        temp["uuid"] = uuid.uuid4()
        out.append(temp)
    return out


def _model_sampling(model):
    patcher = getattr(model, "model_patcher", None)
    if patcher is not None:
        return patcher.get_model_object("model_sampling")
    return model.model_sampling


def _mask_bounds(mask: torch.Tensor):
    """(y0, x0, y1, x1) inclusive bounds of a [H, W] mask's nonzero pixels, or None when it is all zero."""
    ys = torch.nonzero(mask.abs().amax(dim=1) > 0).flatten()
    xs = torch.nonzero(mask.abs().amax(dim=0) > 0).flatten()
    if ys.numel() == 0 or xs.numel() == 0:
        return None
    return int(ys[0]), int(xs[0]), int(ys[-1]), int(xs[-1])


def resolve_area_and_mask(entry: dict, dims: tuple, device) -> dict:
    """Fix an entry's area and mask to the latent before the step loop (ComfyUI's semantics).

    `area` is (h, w, y, x) in latent units (more dims: sizes then offsets), or ("percentage", h, w, y, x) as
    fractions of the latent; `mask` ([B,]H,W) is resized (bilinear) to the latent's spatial size; with
    `set_area_to_bounds` the area becomes the mask's bounding box (at least 8 x 8).
    """
    area = entry.get("area")
    if area is not None and len(area) > 0 and area[0] == "percentage":
        frac = list(area[1:])
        n = len(frac) // 2
        sizes = tuple(max(1, round(frac[d] * dims[d - n + len(dims)])) for d in range(n))
        offsets = tuple(round(frac[n + d] * dims[d - n + len(dims)]) for d in range(n))
        entry["area"] = sizes + offsets
    mask = entry.get("mask")
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        spatial = tuple(dims[-2:])
        if tuple(mask.shape[-2:]) != spatial:
            mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=spatial,
                                                   mode="bilinear").reshape(mask.shape[0], *spatial)
        if entry.get("set_area_to_bounds", False):
            bounds = _mask_bounds(mask.abs().amax(dim=0))
            if bounds is None:  # an all-zero mask: the smallest area (the entry adds nothing anyway)
                entry["area"] = (8, 8, 0, 0)
            else:
                y0, x0, y1, x1 = bounds
                entry["area"] = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
        entry["mask"] = mask
    return entry


def _area_inside(inner, outer) -> bool:
    n = len(inner) // 2
    for d in range(n):
        if inner[n + d] < outer[n + d] or inner[n + d] + inner[d] > outer[n + d] + outer[d]:
            return False
    return True


def _add_same_area_entries(entries: list, other: dict) -> None:
    """ComfyUI's create_cond_with_same_area_if_none: for an area entry of one list, the other list gets an
    entry over the same area (the model conds of its smallest entry covering that area), so CFG compares
    like with like inside the area."""
    area = other.get("area")
    if area is None:
        return
    smallest = None
    for e in entries:
        a = e.get("area")
        if a is None:
            if smallest is None:
                smallest = e
        elif _area_inside(area, a):
            if smallest is None or "area" not in smallest or \
                    math.prod(smallest["area"][:len(a) // 2]) > math.prod(a[:len(a) // 2]):
                smallest = e
    if smallest is None or tuple(smallest.get("area", ())) == tuple(area):
        return
    new = dict(other)
    new["model_conds"] = dict(smallest["model_conds"])
    new["uuid"] = uuid.uuid4()
    entries.append(new)


def process_conds(model, noise, conds, device, latent_image=None, denoise_mask=None, seed=None,
                  model_sampling=None):
    """Resolve areas / masks to the latent, percent ranges to sigmas, and run `model.extra_conds` once per
    entry (not per step)."""
    model_sampling = model_sampling or model.model_sampling
    dims = tuple(noise.shape[2:])
    out = {}
    for k, entries in conds.items():
        resolved = []
        for entry in entries:
            entry = resolve_area_and_mask(dict(entry), dims, device)
            if "start_percent" in entry:
                entry["timestep_start"] = model_sampling.percent_to_sigma(entry["start_percent"])
            if "end_percent" in entry:
                entry["timestep_end"] = model_sampling.percent_to_sigma(entry["end_percent"])
            params = {n: v for n, v in entry.items() if n not in ("model_conds", "uuid")}
            params["device"] = device
            params["noise"] = noise
            if noise.ndim >= 4:
                params.setdefault("width", noise.shape[-1] * 8)
                params.setdefault("height", noise.shape[-2] * 8)
            params.setdefault("prompt_type", "positive" if k == "positive" else "negative")
            params["latent_image"] = latent_image
            params["denoise_mask"] = denoise_mask
            params["seed"] = seed
            if hasattr(model, "extra_conds"):
                produced = model.extra_conds(**params)
            else:
                produced = {"c_crossattn": entry.get("cross_attn")}
            model_conds = dict(entry.get("model_conds", {}))
            model_conds.update(produced)
            entry["model_conds"] = model_conds
            resolved.append(entry)
        out[k] = resolved
    for k in out:
        for entry in list(out[k]):
            for kk in out:
                if kk != k:
                    _add_same_area_entries(out[kk], entry)
    return out


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0] != 0 and t.shape[0] > batch:
        return t[:batch]
    reps = math.ceil(batch / t.shape[0])
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


def _prepare_value(value, batch):
    """Bring one model input to the sampler batch: tensors repeat to the batch, objects keep ComfyUI's
    CONDRegular protocol (`process_cond(batch_size)`), anything else passes through unchanged."""
    if isinstance(value, torch.Tensor):
        return _repeat_to_batch(value, batch) if value.ndim >= 1 else value
    if hasattr(value, "process_cond"):
        return value.process_cond(batch_size=batch)
    return value


def _same_value(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # objects without a usable equality
        return False


def _can_concat(c1: dict, c2: dict) -> bool:
    if c1.keys() != c2.keys():
        return False
    for k in c1:
        a, b = c1[k], c2[k]
        if hasattr(a, "can_concat"):
            if not a.can_concat(b):
                return False
        elif isinstance(a, torch.Tensor) and a.ndim >= 1:
            if not isinstance(b, torch.Tensor) or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                return False
        elif not _same_value(a, b):
            return False
    return True


def _concat(values: list):
    first = values[0]
    if hasattr(first, "concat"):
        return first.concat(values[1:])
    if isinstance(first, torch.Tensor) and first.ndim >= 1:
        return torch.cat(values)
    return first  # equal non-tensor values (checked by _can_concat)


class _CondInput:
    """One entry's share of a step: its model conds, the input crop it sees, and its weight there."""

    __slots__ = ("conds", "mult", "area", "uuid", "input_x")

    def __init__(self, conds, mult, area, uuid_, input_x):
        self.conds, self.mult, self.area, self.uuid, self.input_x = conds, mult, area, uuid_, input_x


def _crop(t: torch.Tensor, area, first_dim: int) -> torch.Tensor:
    """Narrow the trailing len(area)//2 dims of `t` (from `first_dim` on the latent's layout) to `area`."""
    n = len(area) // 2
    for d in range(n):
        t = t.narrow(first_dim + d, area[n + d], area[d])
    return t


def _feather(mult: torch.Tensor, area, full_shape, first_dim: int) -> torch.Tensor:
    """ComfyUI's area edge feathering: on each side of an area that is not at the latent's border, the last
    rr = min(8, size // 4) rows / columns ramp the weight linearly from 1/rr up to 1."""
    n = len(area) // 2
    for d in range(n):
        dim = first_dim + d
        rr = min(8, mult.shape[dim] // 4)
        if area[n + d] != 0:
            for t in range(rr):
                mult.narrow(dim, t, 1).mul_((t + 1) / rr)
        if area[d] + area[n + d] < full_shape[dim]:
            for t in range(rr):
                mult.narrow(dim, area[d] - 1 - t, 1).mul_((t + 1) / rr)
    return mult


def _prepare_area_value(value, batch, area, x_in):
    """A model input for an area entry: noise-shaped tensors (e.g. an inpainting model's c_concat) are cropped
    like x; CONDRegular-style objects get the area when their process_cond takes it."""
    if isinstance(value, torch.Tensor) and value.ndim == x_in.ndim and value.shape[2:] == x_in.shape[2:]:
        return _crop(_repeat_to_batch(value, batch), area, x_in.ndim - len(area) // 2)
    if hasattr(value, "process_cond"):
        try:
            return value.process_cond(batch_size=batch, area=area)
        except TypeError:
            return value.process_cond(batch_size=batch)
    return _prepare_value(value, batch)


def _cond_input(entry, x_in, timestep):
    """One entry -> _CondInput, or None when its sigma range excludes this step.

    Without area or mask the weight is the float `strength`; with them it is a tensor over the crop:
    mask * mask_strength * strength, feathered at the area's inner edges when there is no mask.
    """
    if "timestep_start" in entry and float(timestep[0]) > entry["timestep_start"]:
        return None
    if "timestep_end" in entry and float(timestep[0]) < entry["timestep_end"]:
        return None
    batch = x_in.shape[0]
    strength = float(entry.get("strength", 1.0))
    area = entry.get("area")
    mask = entry.get("mask")
    input_x = x_in
    if area is not None:
        n = len(area) // 2
        first = x_in.ndim - n
        area = list(area)
        for d in range(n):  # an area running past the latent is clipped to it
            area[d] = min(x_in.shape[first + d] - area[n + d], area[d])
        input_x = _crop(x_in, area, first)
    if mask is not None:
        m = mask.to(device=x_in.device, dtype=x_in.dtype)
        m = _repeat_to_batch(m, batch)  # [B, H, W]
        if x_in.ndim == 5:
            m = m.unsqueeze(1)  # broadcast over frames
        m = m.unsqueeze(1)  # channels
        if area is not None:
            m = _crop(m, area, m.ndim - len(area) // 2)
        mult = (m * float(entry.get("mask_strength", 1.0)) * strength).expand_as(input_x).clone()
    elif area is not None:
        mult = _feather(torch.full_like(input_x, strength), area, x_in.shape, x_in.ndim - len(area) // 2)
    else:
        mult = strength
    if area is None:
        conds = {k: _prepare_value(v, batch) for k, v in entry["model_conds"].items() if v is not None}
    else:
        conds = {k: _prepare_area_value(v, batch, area, x_in) for k, v in entry["model_conds"].items()
                 if v is not None}
    if entry.get("control") is not None:
        conds["control"] = entry["control"]  # CONTROL_NET: residuals are computed per batched call
    return _CondInput(conds, mult, area, entry.get("uuid"), input_x)


# model_options entry (set by CFGGuider for one sampling run) answering calc_cond_batch's free-memory question
FREE_MEMORY_OPTION = "sampler_free_memory"


class FreeMemoryOnce:
    """The device's free memory, measured at the first batched model call of a sampling run and reused for
    the run's other steps: a step needs the same memory every time, and the query (cudaMemGetInfo on a GPU)
    costs host time on every step."""

    def __init__(self):
        self.value = None

    def __call__(self, device) -> int:
        if self.value is None:
            self.value = comfy.model_management.get_free_memory(device)
        return self.value


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """Model outputs (denoised latents) for each conditioning list in `conds` (None entries give zeros).

    Entries whose inputs concatenate (same crop shape, concatenable model conds) run in one `apply_model`
    call (cond and uncond together in the usual CFG case). Each entry's output is added, times its weight,
    into its area of the list's output, and the sum is divided by the summed weights: several entries for
    one list average by strength / mask, as ComfyUI does.
    """
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    # tiny, not zero: a list with no active entry yields 0 instead of NaN
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = []
    for i, cond in enumerate(conds):
        if cond is None:
            continue
        for entry in cond:
            p = _cond_input(entry, x_in, timestep)
            if p is not None:
                to_run.append((p, i))

    transformer_options = dict(model_options.get("transformer_options", {}))
    free_memory = None
    query_free_memory = model_options.get(FREE_MEMORY_OPTION) or comfy.model_management.get_free_memory
    while to_run:
        first = to_run[0][0]
        batch_idx = [j for j, (p, _) in enumerate(to_run)
                     if p.input_x.shape == first.input_x.shape and _can_concat(first.conds, p.conds)]
        if hasattr(model, "memory_required") and len(batch_idx) > 1:
            # keep the batched call within memory (ComfyUI's 1.5 safety factor); one entry always runs
            free_memory = free_memory or query_free_memory(x_in.device)
            while len(batch_idx) > 1:
                shape = [first.input_x.shape[0] * len(batch_idx)] + list(first.input_x.shape[1:])
                if model.memory_required(shape) * 1.5 < free_memory:
                    break
                batch_idx = batch_idx[:-1]
        run = [to_run[j] for j in batch_idx]
        for j in reversed(batch_idx):
            to_run.pop(j)

        n = len(run)
        input_x = torch.cat([p.input_x for p, _ in run])
        timestep_ = torch.cat([timestep] * n)
        c = {k: _concat([p.conds[k] for p, _ in run]) for k in run[0][0].conds}
        cond_or_uncond = [i for _, i in run]
        opts = dict(transformer_options)
        opts["cond_or_uncond"] = cond_or_uncond
        opts["uuids"] = [p.uuid for p, _ in run]
        opts["sigmas"] = timestep
        c["transformer_options"] = opts
        control = c.pop("control", None)
        if control is not None:  # comfy.controlnet: residuals for this batch, the model's `control` argument
            c["control"] = control.get_control(input_x, timestep_, c, len(cond_or_uncond), opts, model=model)
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": timestep_, "c": c,
                                    "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for (p, i), chunk in zip(run, output.chunk(n)):
            out_c, out_n = out_conds[i], out_counts[i]
            if p.area is not None:
                first_dim = x_in.ndim - len(p.area) // 2
                out_c, out_n = _crop(out_c, p.area, first_dim), _crop(out_n, p.area, first_dim)
            out_c += chunk * p.mult
            out_n += p.mult
    return [o / c for o, c in zip(out_conds, out_counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options=None, cond=None,
                 uncond=None):
    model_options = model_options or {}
    if "sampler_cfg_function" in model_options:
        # the custom function works on noise predictions (x - denoised), as in ComfyUI
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale,
                "timestep": timestep, "input": x, "sigma": timestep, "cond_denoised": cond_pred,
                "uncond_denoised": uncond_pred, "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale,
                "model": model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None):
    """One guided model evaluation: the denoised latent for x at sigma `timestep`."""
    model_options = model_options or {}
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None  # cfg 1 ignores the negative: skip its model call entirely
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
        out = model_options["sampler_calc_cond_batch_function"](args)
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {"conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                "sigma": timestep, "model": model, "model_options": model_options}
        out = fn(args)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options,
                        cond=cond, uncond=uncond_)


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------


class KSamplerX0Inpaint:
    """The callable a step loop sees: applies the denoise mask (inpainting) around the guided model."""

    def __init__(self, model, sigmas):
        self.inner_model = model  # the guider
        self.sigmas = sigmas
        self.noise = None
        self.latent_image = None

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        ms = self.inner_model.model_sampling
        if denoise_mask is not None:
            mask_fn = (model_options or {}).get("denoise_mask_function")
            if mask_fn is not None:
                # per-step mask (DifferentialDiffusion); ComfyUI's signature, so custom nodes' functions work
                denoise_mask = mask_fn(sigma, denoise_mask, extra_options={"model": self.inner_model,
                                                                          "sigmas": self.sigmas})
            latent_mask = 1.0 - denoise_mask
            sig = sigma.reshape([sigma.shape[0]] + [1] * (len(self.noise.shape) - 1))
            # the known region, noised to this sigma; models that denoise it at t = 0 (Wan 2.2 TI2V's
            # per-frame timesteps) take it clean instead (ComfyUI's `scale_latent_inpaint` hook)
            base = getattr(self.inner_model, "inner_model", None)
            scale_known = getattr(base, "scale_latent_inpaint", None)
            known = scale_known(sigma=sig, noise=self.noise, latent_image=self.latent_image) \
                if scale_known is not None else ms.noise_scaling(sig, self.noise, self.latent_image)
            x = x * denoise_mask + known * latent_mask
        out = self.inner_model(x, sigma, model_options=model_options or {}, seed=seed)
        if denoise_mask is not None:
            out = out * denoise_mask + self.latent_image * latent_mask
        return out


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


KSAMPLER_NAMES = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
                  "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                  "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
                  "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                  "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                  "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                  "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                  "sa_solver_pece"]
SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options=None, inpaint_options=None):
        self.sampler_function = sampler_function
        self.extra_options = dict(extra_options or {})
        self.inpaint_options = dict(inpaint_options or {})

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        if self.inpaint_options.get("random", False):
            # ddim: the masked-out region is re-noised with its own (seed + 1) noise, as ComfyUI does
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            model_k.noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(
                noise.device)
        else:
            model_k.noise = noise
        ms = model_wrap.model_sampling
        noise = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        k_callback = None
        total_steps = len(sigmas) - 1
        if callback is not None:
            def k_callback(d):
                return callback(d["i"], d["denoised"], d["x"], total_steps)
        samples = self.sampler_function(model_k, noise, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


def _smallest_nonzero_sigma(sigmas):
    return sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]


def _dpm_fast(model, noise, sigmas, extra_args=None, callback=None, disable=None, **options):
    """dpm_fast over a schedule: as many model calls as steps, from sigmas[0] down to the last nonzero
    sigma (the result keeps that much noise, as in ComfyUI)."""
    if len(sigmas) <= 1:
        return noise
    return k_diffusion_sampling.sample_dpm_fast(model, noise, _smallest_nonzero_sigma(sigmas), sigmas[0],
                                                len(sigmas) - 1, extra_args=extra_args, callback=callback,
                                                disable=disable, **options)


def _dpm_adaptive(model, noise, sigmas, extra_args=None, callback=None, disable=None, **options):
    """dpm_adaptive over a schedule: only its end points are used; the solver picks its own steps."""
    if len(sigmas) <= 1:
        return noise
    return k_diffusion_sampling.sample_dpm_adaptive(model, noise, _smallest_nonzero_sigma(sigmas), sigmas[0],
                                                    extra_args=extra_args, callback=callback, disable=disable,
                                                    **options)


def ksampler(sampler_name, extra_options=None, inpaint_options=None):
    if sampler_name in ("dpm_fast", "dpm_adaptive"):
        fn = _dpm_fast if sampler_name == "dpm_fast" else _dpm_adaptive
        return KSAMPLER(fn, extra_options, inpaint_options)
    if sampler_name == "deis":
        from comfy.k_diffusion import deis

        return KSAMPLER(deis.sample_deis, extra_options, inpaint_options)
    if sampler_name in ("sa_solver", "sa_solver_pece"):
        from comfy.k_diffusion import sa_solver

        fn = sa_solver.sample_sa_solver if sampler_name == "sa_solver" else sa_solver.sample_sa_solver_pece
        return KSAMPLER(fn, extra_options, inpaint_options)
    fn = getattr(k_diffusion_sampling, f"sample_{sampler_name}", None)
    if fn is None:
        raise ValueError(f"Unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return KSAMPLER(fn, extra_options, inpaint_options)


def sampler_object(name):
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.k_diffusion import uni_pc

        fn = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
        return KSAMPLER(fn)
    if name == "ddim":
        return ksampler("euler", inpaint_options={"random": True})
    return ksampler(name)


# ---------------------------------------------------------------------------------------------------
# Guider and KSampler
# ---------------------------------------------------------------------------------------------------


def prepare_mask(noise_mask, shape, device):
    """A [B,H,W] or [B,1,H,W] mask -> the latent's shape (bilinear resize, channels and batch repeated).
    A video mask [B,C,T,H,W] (Wan22ImageToVideoLatent's, per latent frame) is resized in time too."""
    if noise_mask.ndim == 5 and len(shape) == 5:
        mask = noise_mask.float()
        if tuple(mask.shape[2:]) != tuple(shape[2:]):
            mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="trilinear")
        if mask.shape[1] != shape[1]:
            mask = mask.mean(dim=1, keepdim=True).expand(-1, shape[1], -1, -1, -1)
        return _repeat_to_batch(mask, shape[0]).to(device)
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]))
    spatial = tuple(shape[-2:])
    mask = torch.nn.functional.interpolate(mask.float(), size=spatial, mode="bilinear")
    mask = mask.expand(-1, shape[1], -1, -1)
    if len(shape) == 5:
        mask = mask.unsqueeze(2).expand(-1, -1, shape[2], -1, -1)
    return _repeat_to_batch(mask, shape[0]).to(device)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0
        self.inner_model = None
        self.conds = {}

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k, v in conds.items():
            self.original_conds[k] = convert_cond(v)

    @property
    def model_sampling(self):
        return self.model_patcher.get_model_object("model_sampling")

    def __call__(self, *args, **kwargs):
        return self.predict_noise(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                 self.conds.get("positive"), self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                     seed):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            # an all-zero (empty) latent is left alone so it stays zero after the format shift
            latent_image = self.inner_model.process_latent_in(latent_image)
        self.conds = process_conds(self.inner_model, noise, self.conds, device, latent_image, denoise_mask, seed,
                                   model_sampling=self.model_sampling)
        # a shallow copy: the same entries for every hook, plus this run's free-memory answer
        extra_args = {"model_options": {**self.model_options, FREE_MEMORY_OPTION: FreeMemoryOnce()}, "seed": seed}
        samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                 disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        from comfy.taco_dit.core.model_wrapper import prepare_for_sampling

        # Under several ranks this is a clone carrying the parallel plan (CFG / sequence / data parallel);
        # with one rank it is the same patcher.
        masked = any(c.get("attention_mask") is not None for conds in self.original_conds.values()
                     for c in (conds or []) if isinstance(c, dict))
        patcher = prepare_for_sampling(self.model_patcher, self.cfg, noise.shape,
                                       has_negative=bool(self.original_conds.get("negative")),
                                       attention_mask=masked)
        saved_options = self.model_options
        self.model_options = patcher.model_options
        comfy.model_management.load_models_gpu([patcher])
        self.inner_model = patcher.model
        device = patcher.load_device
        if denoise_mask is not None:
            denoise_mask = prepare_mask(denoise_mask, noise.shape, device)
        noise = noise.to(device)
        latent_image = latent_image.to(device)
        sigmas = sigmas.to(device)
        from comfy.taco_dit.core.model_wrapper import last_plan
        from comfy.taco_dit.utils.performance_monitor import SamplingMonitor

        plan = last_plan() if patcher is not self.model_patcher else None
        monitor = SamplingMonitor(device, plan.describe() if plan is not None else "")
        try:
            out = self.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask,
                                    monitor.wrap(callback), disable_pbar, seed)
            monitor.log()
            return out
        finally:
            self.inner_model = None
            self.model_options = saved_options

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {k: [dict(e) for e in v] for k, v in self.original_conds.items()}
        return self.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                 seed)


def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options=None,
           latent_image=None, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
    guider = CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES
    # these take two model calls per step near the end; ComfyUI computes one more step and drops the
    # penultimate sigma so the schedule still ends on a cheap final step
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}

    def __init__(self, model, steps, device, sampler=None, scheduler=None, denoise=None, model_options=None):
        self.model = model
        self.device = device
        if scheduler not in self.SCHEDULERS:
            scheduler = self.SCHEDULERS[0]
        if sampler not in self.SAMPLERS:
            sampler = self.SAMPLERS[0]
        self.scheduler = scheduler
        self.sampler = sampler
        self.model_options = model_options if model_options is not None else {}
        self.set_steps(steps, denoise)
        self.denoise = denoise

    def calculate_sigmas(self, steps):
        discard_penultimate_sigma = False
        if self.sampler in self.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            steps += 1
            discard_penultimate_sigma = True
        sigmas = calculate_sigmas(self.model.get_model_object("model_sampling"), self.scheduler, steps)
        if discard_penultimate_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def set_steps(self, steps, denoise=None):
        self.steps = steps
        if denoise is None or denoise > 0.9999:
            self.sigmas = self.calculate_sigmas(steps).to(self.device)
        elif denoise <= 0.0:
            self.sigmas = torch.FloatTensor([])
        else:
            # a partial denoise runs the last `steps` steps of a longer schedule
            new_steps = int(steps / denoise)
            sigmas = self.calculate_sigmas(new_steps).to(self.device)
            self.sigmas = sigmas[-(steps + 1):]

    def sample(self, noise, positive, negative, cfg, latent_image=None, start_step=None, last_step=None,
               force_full_denoise=False, denoise_mask=None, sigmas=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas is None:
            sigmas = self.sigmas
        if last_step is not None and last_step < (len(sigmas) - 1):
            sigmas = sigmas[:last_step + 1]
            if force_full_denoise:
                sigmas = sigmas.clone()
                sigmas[-1] = 0
        if start_step is not None:
            if start_step < (len(sigmas) - 1):
                sigmas = sigmas[start_step:]
            elif latent_image is not None:
                return latent_image
            else:
                return torch.zeros_like(noise)
        sampler = sampler_object(self.sampler)
        return sample(self.model, noise, positive, negative, cfg, self.device, sampler, sigmas,
                      self.model_options, latent_image=latent_image, denoise_mask=denoise_mask,
                      callback=callback, disable_pbar=disable_pbar, seed=seed)
