"""The parallel configuration: one validated dataclass, read from taco_dit_config.yaml, --taco-* flags or
defaults.

Owns the schema of `taco_dit_config.yaml`::

    parallel:
      enabled: auto            # true / false / auto
      cfg_parallel: auto       # true / false / auto (degree 2 when on)
      sequence_parallel: auto  # true / false / auto
      sequence_parallel_degree: auto
      ulysses_degree: auto
      ring_degree: auto
      pipeline_parallel: false          # refused for now (later release)
      pipeline_parallel_degree: auto
      tensor_parallel: false            # refused for now (later release)
      tensor_parallel_degree: auto
      vae_parallel: auto       # true / false / auto: split VAE decodes of images by rows over the ranks
                               # (auto: whenever there are several ranks)
    optimization:
      use_flash_attention: auto
      use_torch_compile: false
      use_cache: true
      use_cuda_graph: auto              # replay the model forward as one CUDA graph (auto: GPUs, when a
                                        # parallel plan splits the work; true: also on one GPU)

Precedence: flags over the YAML file over defaults. "auto" (or an unset value) leaves the choice to the
automatic planner; here it only means "not fixed by the user". Every rule that can be checked without a
model is checked in `ParallelConfig.__post_init__`, so bad degrees are refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Union

AUTO = "auto"
Tristate = Union[bool, str]  # True / False / "auto"
Degree = Union[int, str]  # positive int / "auto"

_LATER_RELEASE = ("{what} is not available yet: it comes in a later release of TACO-DiT. "
                  "Set parallel.{key}: false (or remove --taco-{flag}) and use cfg_parallel and/or "
                  "sequence_parallel (ulysses_degree, ring_degree) instead.")


class ConfigError(ValueError):
    """The parallel configuration cannot run; the message says what would."""


def _tristate(value: Any, name: str) -> Tristate:
    if value is None:
        return AUTO
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", ""):
            return AUTO
        if v in ("true", "on", "yes", "1"):
            return True
        if v in ("false", "off", "no", "0"):
            return False
    raise ConfigError(f"{name} must be true, false or auto, not {value!r}")


def _degree(value: Any, name: str) -> Degree:
    if value is None:
        return AUTO
    if isinstance(value, str) and value.strip().lower() in ("auto", ""):
        return AUTO
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive integer or auto, not {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive integer or auto, not {value!r}") from None
    if number != value and not (isinstance(value, str) and value.strip() == str(number)):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if number < 1:
        raise ConfigError(f"{name} must be at least 1, not {number}")
    return number


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class OptimizationConfig:
    use_flash_attention: Tristate = AUTO
    """Use flash attention kernels where the device has them ("auto": when available)."""
    use_torch_compile: bool = False
    """Compile the diffusion model's blocks with torch.compile."""
    use_cache: bool = True
    """Keep node outputs (and loaded models) between prompts, as ComfyUI does."""
    use_cuda_graph: Tristate = AUTO
    """Replay each diffusion-model forward as one CUDA graph (captured once per input shape, layout and
    weights): removes the per-kernel launch cost that bounds small per-GPU token counts. CUDA only.
    "auto": on when a parallel plan splits the work over GPUs, for the families whose capture was
    verified on GPUs (model_wrapper.CUDA_GRAPH_VERIFIED; faster in every configuration measured in
    benchmarks/RESULTS.md); off on a single GPU, where it gains ~1%."""

    def __post_init__(self) -> None:
        self.use_flash_attention = _tristate(self.use_flash_attention, "optimization.use_flash_attention")
        self.use_cuda_graph = _tristate(self.use_cuda_graph, "optimization.use_cuda_graph")
        for name in ("use_torch_compile", "use_cache"):
            value = _tristate(getattr(self, name), f"optimization.{name}")
            if value == AUTO:
                value = OptimizationConfig.__dataclass_fields__[name].default
            setattr(self, name, value)


@dataclass
class ParallelConfig:
    """How the ranks of one job divide the work. Validated on construction.

    With `enabled: false`, or with every strategy switched off, all ranks run the same work in lockstep
    (every rank computes the whole image; rank 0 serves the results). "auto" values leave the choice
    to the planner at sampling time (comfy/taco_dit/core/model_wrapper.py).
    """

    world_size: int = 1
    """Number of ranks (torchrun's WORLD_SIZE)."""
    enabled: Tristate = AUTO
    """Master switch: false forces pure lockstep whatever else is set."""
    cfg_parallel: Tristate = AUTO
    """Run the cond and uncond halves of classifier-free guidance on two rank groups (degree 2)."""
    sequence_parallel: Tristate = AUTO
    """Split image/text tokens across ranks inside the transformer (USP = Ulysses x Ring)."""
    sequence_parallel_degree: Degree = AUTO
    """Ranks per sequence-parallel group; equals ulysses_degree * ring_degree."""
    ulysses_degree: Degree = AUTO
    """All-to-all (head-split) part of sequence parallelism; must divide the model's head count."""
    ring_degree: Degree = AUTO
    """Ring-attention part of sequence parallelism."""
    pipeline_parallel: Tristate = False
    """PipeFusion-style patch pipeline. Not available yet."""
    pipeline_parallel_degree: Degree = AUTO
    tensor_parallel: Tristate = False
    """Weight sharding across ranks. Not available yet."""
    tensor_parallel_degree: Degree = AUTO
    vae_parallel: Tristate = AUTO
    """Split each KL image decode (VAEDecode) by latent rows over all ranks (comfy/taco_dit/parallel/
    vae_parallel.py); every rank ends with the whole image. "auto": on when there are several ranks."""
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, not {self.world_size!r}")
        for name in ("enabled", "cfg_parallel", "sequence_parallel", "pipeline_parallel", "tensor_parallel",
                     "vae_parallel"):
            setattr(self, name, _tristate(getattr(self, name), f"parallel.{name}"))
        for name in ("sequence_parallel_degree", "ulysses_degree", "ring_degree", "pipeline_parallel_degree",
                     "tensor_parallel_degree"):
            setattr(self, name, _degree(getattr(self, name), f"parallel.{name}"))
        if isinstance(self.optimization, dict):
            self.optimization = OptimizationConfig(**self.optimization)
        self._refuse_unreleased()
        if self.enabled is False:
            return  # pure lockstep: the other fields are kept but not used, so they cannot be wrong
        self._check_sequence_parallel()
        self._check_world_size()

    # -- validation rules -------------------------------------------------------------------------------

    def _refuse_unreleased(self) -> None:
        pp_on = self.pipeline_parallel is True or (isinstance(self.pipeline_parallel_degree, int)
                                                   and self.pipeline_parallel_degree > 1)
        tp_on = self.tensor_parallel is True or (isinstance(self.tensor_parallel_degree, int)
                                                 and self.tensor_parallel_degree > 1)
        if pp_on and self.enabled is not False:
            raise ConfigError(_LATER_RELEASE.format(what="Pipeline parallelism", key="pipeline_parallel",
                                                    flag="pipeline-parallel-degree"))
        if tp_on and self.enabled is not False:
            raise ConfigError(_LATER_RELEASE.format(what="Tensor parallelism", key="tensor_parallel",
                                                    flag="tensor-parallel-degree"))

    def _check_sequence_parallel(self) -> None:
        sp, u, r = self.sequence_parallel_degree, self.ulysses_degree, self.ring_degree
        if isinstance(u, int) and isinstance(r, int):
            if isinstance(sp, int) and sp != u * r:
                raise ConfigError(f"sequence_parallel_degree {sp} != ulysses_degree {u} * ring_degree {r} "
                                  f"= {u * r}; set sequence_parallel_degree: {u * r} or leave it auto")
            self.sequence_parallel_degree = sp = u * r
        elif isinstance(sp, int) and isinstance(u, int):
            if sp % u:
                raise ConfigError(f"ulysses_degree {u} does not divide sequence_parallel_degree {sp}; "
                                  f"use ulysses_degree in {_divisors(sp)}")
            self.ring_degree = sp // u
        elif isinstance(sp, int) and isinstance(r, int):
            if sp % r:
                raise ConfigError(f"ring_degree {r} does not divide sequence_parallel_degree {sp}; "
                                  f"use ring_degree in {_divisors(sp)}")
            self.ulysses_degree = sp // r
        if self.sequence_parallel is False and isinstance(self.sequence_parallel_degree, int) \
                and self.sequence_parallel_degree > 1:
            raise ConfigError(f"sequence_parallel is false but its degree is {self.sequence_parallel_degree} "
                              f"(ulysses {self.ulysses_degree}, ring {self.ring_degree}); set "
                              "sequence_parallel: true or drop the degrees")

    def _fixed_degrees(self) -> dict[str, int]:
        """Degrees the user fixed (auto ones left out)."""
        fixed = {}
        if self.cfg_parallel is not AUTO:
            fixed["cfg"] = 2 if self.cfg_parallel else 1
        if isinstance(self.sequence_parallel_degree, int):
            fixed["sequence"] = self.sequence_parallel_degree
        elif self.sequence_parallel is False:
            fixed["sequence"] = 1
        else:
            # Only one of ulysses/ring known: it still must divide the world.
            for name, value in (("ulysses", self.ulysses_degree), ("ring", self.ring_degree)):
                if isinstance(value, int):
                    fixed[name] = value
        return fixed

    def describe(self) -> str:
        return (f"world_size={self.world_size}, enabled={self.enabled}, cfg_parallel={self.cfg_parallel}, "
                f"sequence_parallel={self.sequence_parallel} (degree {self.sequence_parallel_degree} = "
                f"ulysses {self.ulysses_degree} x ring {self.ring_degree}), "
                f"pipeline_parallel_degree={self.pipeline_parallel_degree}, "
                f"tensor_parallel_degree={self.tensor_parallel_degree}, vae_parallel={self.vae_parallel}")

    def _suggestions(self) -> str:
        w = self.world_size
        options = [f"sequence_parallel_degree: {w} (ulysses_degree: {w})"] if w > 1 else []
        if w % 2 == 0:
            options.append("cfg_parallel: true" + (f" with sequence_parallel_degree: {w // 2}" if w > 2 else ""))
        options.append("parallel.enabled: false (every rank computes the whole image in lockstep)")
        return "; ".join(options)

    def _check_world_size(self) -> None:
        """The fixed degrees must divide the world size; the remaining factor runs as data parallel (or
        lockstep replicas), so cfg 2 on 4 ranks is two CFG pairs, not an error."""
        fixed = self._fixed_degrees()
        product = 1
        for value in fixed.values():
            product *= value
        shown = " * ".join(f"{k}={v}" for k, v in fixed.items()) or "1"
        if product > self.world_size or self.world_size % product:
            raise ConfigError(f"Parallel degrees {shown} = {product} do not fit world_size {self.world_size} "
                              f"({self.describe()}): their product must divide the number of ranks. With "
                              f"{self.world_size} rank(s) these would work: {self._suggestions()}; or launch "
                              f"with --nproc_per_node={product}.")

    # -- queries ------------------------------------------------------------------------------------------

    @property
    def cfg_degree(self) -> Degree:
        if self.enabled is False or self.cfg_parallel is False:
            return 1
        return 2 if self.cfg_parallel is True else AUTO

    def strategies_requested(self) -> list[str]:
        """Strategies the user switched on explicitly (the automatic planner may add others)."""
        if self.enabled is False:
            return []
        out = []
        if self.cfg_parallel is True:
            out.append("cfg_parallel")
        if self.sequence_parallel is True or (isinstance(self.sequence_parallel_degree, int)
                                              and self.sequence_parallel_degree > 1) \
                or any(isinstance(d, int) and d > 1 for d in (self.ulysses_degree, self.ring_degree)):
            out.append("sequence_parallel")
        if self.vae_parallel is True:
            out.append("vae_parallel")
        return out

    @property
    def vae_parallel_on(self) -> bool:
        """Whether VAE decodes are split over the ranks (a decode with fewer latent rows than ranks still
        runs whole on each rank; comfy/taco_dit/parallel/vae_parallel.py decides per decode)."""
        return self.world_size > 1 and self.enabled is not False and self.vae_parallel is not False

    @property
    def lockstep_only(self) -> bool:
        """True when every rank samples unsplit: parallelism off, or every sampling strategy switched off.
        "auto" is not lockstep: the sampler's planner may pick strategies per model. (The VAE decode may
        still be split, see `vae_parallel_on`.)"""
        if self.world_size == 1 or self.enabled is False:
            return True
        sp_off = self.sequence_parallel is False or self.sequence_parallel_degree == 1
        return self.cfg_parallel is False and sp_off

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        optimization = d.pop("optimization")
        d.pop("world_size")
        return {"parallel": d, "optimization": optimization}


_PARALLEL_KEYS = {f.name for f in dataclasses.fields(ParallelConfig)} - {"world_size", "optimization"}
_OPTIMIZATION_KEYS = {f.name for f in dataclasses.fields(OptimizationConfig)}


def read_yaml(path: str) -> dict:
    """Read taco_dit_config.yaml into {"parallel": {...}, "optimization": {...}}; unknown keys are errors."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"TACO-DiT config file '{path}' does not exist; fix the --taco-config path")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"'{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping with 'parallel' and/or 'optimization' sections")
    unknown = set(data) - {"parallel", "optimization"}
    if unknown:
        raise ConfigError(f"'{path}': unknown section(s) {sorted(unknown)}; known: parallel, optimization")
    out = {}
    for section, known in (("parallel", _PARALLEL_KEYS), ("optimization", _OPTIMIZATION_KEYS)):
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"'{path}': section '{section}' must be a mapping")
        bad = set(values) - known
        if bad:
            raise ConfigError(f"'{path}': unknown key(s) {sorted(bad)} in '{section}'; known: {sorted(known)}")
        out[section] = dict(values)
    return out


def values_from_args(args) -> dict:
    """The --taco-* flags that were given, as {"parallel": {...}, "optimization": {...}}."""
    parallel: dict[str, Any] = {}
    optimization: dict[str, Any] = {}
    onoff = {"on": True, "off": False, "auto": AUTO}
    if getattr(args, "taco_parallel", None) is not None:
        parallel["enabled"] = onoff[args.taco_parallel]
    if getattr(args, "taco_cfg_parallel", None) is not None:
        parallel["cfg_parallel"] = onoff[args.taco_cfg_parallel]
    if getattr(args, "taco_vae_parallel", None) is not None:
        parallel["vae_parallel"] = onoff[args.taco_vae_parallel]
    for flag, key in (("taco_ulysses_degree", "ulysses_degree"), ("taco_ring_degree", "ring_degree"),
                      ("taco_sequence_parallel_degree", "sequence_parallel_degree"),
                      ("taco_pipeline_parallel_degree", "pipeline_parallel_degree"),
                      ("taco_tensor_parallel_degree", "tensor_parallel_degree")):
        value = getattr(args, flag, None)
        if value is not None:
            parallel[key] = value
    if getattr(args, "taco_torch_compile", None) is not None:
        optimization["use_torch_compile"] = bool(args.taco_torch_compile)
    if getattr(args, "taco_cuda_graph", None) is not None:
        optimization["use_cuda_graph"] = bool(args.taco_cuda_graph)
    return {"parallel": parallel, "optimization": optimization}


def load_config(args=None, world_size: int | None = None, path: str | None = None) -> ParallelConfig:
    """Defaults, then the YAML file (`path` or --taco-config), then the flags; validated."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    path = path or (getattr(args, "taco_config", None) if args is not None else None)
    merged: dict[str, dict] = {"parallel": {}, "optimization": {}}
    sources = []
    if path:
        for section, values in read_yaml(path).items():
            merged[section].update(values)
        sources.append(path)
    if args is not None:
        flags = values_from_args(args)
        if flags["parallel"] or flags["optimization"]:
            sources.append("--taco-* flags")
        for section, values in flags.items():
            merged[section].update(values)
    config = ParallelConfig(world_size=world_size, optimization=OptimizationConfig(**merged["optimization"]),
                            **merged["parallel"])
    logging.getLogger(__name__).debug("TACO-DiT parallel config from %s: %s",
                                      ", ".join(sources) or "defaults", config.describe())
    return config
