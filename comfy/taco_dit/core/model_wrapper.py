"""Attaching a parallel plan to a MODEL at sampling time.

The sampler (comfy/samplers.py) calls `prepare_for_sampling(patcher, cfg, noise_shape)` once per
sampling run. With one rank, or parallelism off, it returns the patcher unchanged: the single-GPU path
is the same code. Otherwise it picks the degrees (`plan_parallel`: what the user fixed through the YAML
file, --taco-* flags or a `TACO-DiT Parallel Config` node, the rest automatic), builds the process groups
once per layout, and returns a clone of the patcher whose model options / object patches carry the
strategies (cfg_parallel.py, sequence_parallel.py). The choice is logged with its reasons.

The process-wide runtime (the validated ParallelConfig and world size) is set once by
`execution_engine.run` through `set_runtime`; it is the one piece of module state here, because the
node graph that reaches the sampler carries no handle to the process group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from comfy.taco_dit.parallel.mesh import MeshDims, ParallelMesh

log = logging.getLogger(__name__)

# model_options key a `TACO-DiT Parallel Config` node sets: a dict of ParallelConfig fields that override
# the process-wide configuration for that MODEL.
NODE_OPTIONS_KEY = "taco_parallel"

_runtime: dict = {"config": None, "last_plan": None}
_meshes: dict[MeshDims, ParallelMesh] = {}


def set_runtime(config) -> None:
    """Record the process's validated ParallelConfig (called once per process by the runtime)."""
    _runtime["config"] = config


def last_plan() -> Plan | None:
    return _runtime["last_plan"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def runtime_config(world: int):
    from comfy.taco_dit.core.config_manager import ParallelConfig

    config = _runtime["config"]
    if config is None or config.world_size != world:
        config = ParallelConfig(world_size=world)
    return config


@dataclass
class Plan:
    dims: MeshDims
    reasons: list[str] = field(default_factory=list)

    @property
    def is_parallel(self) -> bool:
        d = self.dims
        return d.cfg > 1 or d.sp > 1 or d.dp > 1

    def describe(self) -> str:
        d = self.dims
        return (f"cfg_parallel={d.cfg} ulysses={d.ulysses} ring={d.ring} data_parallel={d.dp} "
                f"on {d.world_size} ranks")


def _largest_divisor_dividing(n: int, heads: int | None) -> int:
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and (heads is None or heads % d == 0):
            best = d
    return best


def plan_parallel(config, *, world: int, cfg_active: bool, batch: int, heads: int | None, sp_supported: bool,
                  model_name: str = "model", tokens: int | None = None, peer_access: bool = True,
                  sp_blocker: str | None = None, packed_qkv: bool = False) -> Plan:
    """Choose the degrees for one sampling run. Pure function of its inputs (tested without processes).

    `sp_blocker`: why this run's inputs rule sequence parallel out although the model has a plan (e.g. an
    attention mask in the conditioning): automatic choice falls back to data parallel / whole-image lockstep
    saying so, and a configured sequence-parallel degree is refused with that reason.

    `packed_qkv`: the model writes q/k/v into one packed buffer the attention may supply (its plan says so:
    Flux). On a job of exactly 2 ranks, automatic sequence parallel then takes ring 2 with the keys gathered
    in place (sp_attention.ring_gathered) rather than Ulysses 2: Flux 1024² on 2 x H200, 69.85 against 71.95
    ms per step (benchmarks/RESULTS.md). `TACO_RING=rotate` keeps Ulysses there."""
    from comfy.taco_dit.core.config_manager import AUTO, ConfigError
    from comfy.taco_dit.parallel.sp_attention import ring_mode

    reasons: list[str] = []
    if world == 1 or config.enabled is False or (config.cfg_parallel is False and config.sequence_parallel is False):
        # every rank computes the whole image (pure lockstep)
        return Plan(MeshDims(world_size=1), ["parallelism disabled" if world > 1 else "one rank"])
    # CFG: two ranks share the guidance pair when there is a negative to evaluate.
    if config.cfg_parallel is True:
        cfg = 2
        reasons.append("cfg_parallel on (configured)" + ("" if cfg_active else "; cfg == 1, so both halves "
                                                         "evaluate the positive"))
    elif config.cfg_parallel is AUTO and cfg_active and world % 2 == 0:
        cfg = 2
        reasons.append("cfg != 1: positive and negative on separate ranks (no communication but one gather)")
    else:
        cfg = 1
        if config.cfg_parallel is AUTO:
            reasons.append("cfg == 1: no negative to split" if not cfg_active else "odd world size: no CFG pair")
    rest = world // cfg
    u, r = config.ulysses_degree, config.ring_degree
    sp_fixed = isinstance(config.sequence_parallel_degree, int) or isinstance(u, int) or isinstance(r, int)
    if sp_fixed:
        if not sp_supported:
            raise ConfigError(f"Sequence parallel was configured but {model_name} has no sequence-parallel plan "
                              "yet; use cfg_parallel / data parallel or parallel.enabled: false")
        if sp_blocker:
            raise ConfigError(f"Sequence parallel was configured but {sp_blocker}; set sequence parallel off "
                              "(TACO-DiT Parallel Config or --taco-config) for this workflow")
        sp = config.sequence_parallel_degree if isinstance(config.sequence_parallel_degree, int) else \
            (u if isinstance(u, int) else 1) * (r if isinstance(r, int) else 1)
        if rest % sp:
            raise ConfigError(f"sequence_parallel_degree {sp} does not divide the {rest} ranks left after "
                              f"cfg_parallel={cfg} (world_size {world})")
        if not isinstance(u, int) and not isinstance(r, int):
            u = _largest_divisor_dividing(sp, heads)
        u = u if isinstance(u, int) else sp // r
        r = r if isinstance(r, int) else sp // u
        if heads is not None and heads % u:
            raise ConfigError(f"Ulysses degree {u} does not divide {model_name}'s {heads} heads; use ulysses in "
                              f"{[d for d in range(1, sp + 1) if sp % d == 0 and heads % d == 0]} and the rest "
                              "as ring degree")
        dp = rest // sp
        reasons.append(f"sequence parallel {sp} = ulysses {u} x ring {r} (configured)")
    elif rest == 1:
        u = r = dp = 1
    elif config.sequence_parallel is not True and batch % rest == 0 and batch >= rest:
        u = r = 1
        dp = rest
        reasons.append(f"batch {batch} splits evenly over {rest} ranks: data parallel (no communication)")
    elif sp_supported and not sp_blocker and config.sequence_parallel is not False:
        dp = 1
        u = _largest_divisor_dividing(rest, heads)
        if not peer_access and rest > 1:
            # without GPU peer access all-to-all crawls through host memory; ring overlaps its transfers
            u = 1
            reasons.append("GPUs without peer access: ring attention")
        if world == rest == 2 and packed_qkv and peer_access and ring_mode() == "gather":
            u, r = 1, 2
            reasons.append(f"sequence parallel over 2 ranks for {tokens or '?'} tokens: ring 2 with the keys "
                           "gathered where the model wrote its packed q/k/v (one exchange per layer; measured "
                           "faster than ulysses 2)")
        else:
            r = rest // u
            reasons.append(f"sequence parallel over {rest} ranks for {tokens or '?'} tokens: ulysses {u}"
                           + (f" (largest degree dividing {heads} heads)" if heads else "") + f" x ring {r}")
    else:
        u = r = 1
        dp = rest
        why = "sequence parallel is off" if config.sequence_parallel is False else \
            (sp_blocker if sp_supported and sp_blocker else f"{model_name} has no sequence-parallel plan yet")
        reasons.append(f"{why}: data parallel over {rest} ranks (whole batch on each rank if it does not split)")
    return Plan(MeshDims(world_size=world, dp=dp, cfg=cfg, ring=r, ulysses=u), reasons)


def effective_config(config, node_opts: dict | None):
    """The process configuration with a Parallel Config node's non-auto values on top.

    A node that sets Ulysses or Ring degrees (or switches sequence parallel) replaces the process's
    sequence-parallel degrees as a whole, so the two never mix into an inconsistent layout.
    """
    from comfy.taco_dit.core.config_manager import AUTO, ParallelConfig

    overrides = {k: v for k, v in (node_opts or {}).items() if v != AUTO}
    if not overrides:
        return config
    merged = config.to_dict()["parallel"]
    if {"ulysses_degree", "ring_degree", "sequence_parallel", "sequence_parallel_degree"} & set(overrides):
        for key in ("sequence_parallel_degree", "ulysses_degree", "ring_degree"):
            merged[key] = AUTO
    merged.update(overrides)
    return ParallelConfig(world_size=config.world_size, optimization=config.optimization, **merged)


def get_mesh(dims: MeshDims) -> ParallelMesh:
    """The process groups for one layout, built once (collectively: all ranks reach this in lockstep)."""
    mesh = _meshes.get(dims)
    if mesh is None:
        mesh = _meshes[dims] = ParallelMesh(dims)
    return mesh


def _peer_access() -> bool:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return True
    n = torch.cuda.device_count()
    return all(torch.cuda.can_device_access_peer(0, j) for j in range(1, n))


def prepare_for_sampling(patcher, cfg_scale: float, noise_shape, has_negative: bool = True,
                         attention_mask: bool = False):
    """Return `patcher`, or a clone carrying this run's parallel strategies (see module docstring).
    `attention_mask`: the run's conditioning carries an attention mask (e.g. StyleModelApply's attn_bias),
    which the sequence-parallel attention cannot apply, so sequence parallel is left out for this run."""
    world = world_size()
    node_opts = patcher.model_options.get(NODE_OPTIONS_KEY)
    if world == 1:
        config = _runtime["config"]
        return _apply_optimizations(patcher, config.optimization, None) if config is not None else patcher
    from comfy.taco_dit.parallel.cfg_parallel import make_cfg_parallel_calc, make_data_parallel_wrapper
    from comfy.taco_dit.parallel.sequence_parallel import apply_sequence_parallel, supports_sequence_parallel

    config = effective_config(runtime_config(world), node_opts)
    dm = patcher.model.diffusion_model
    cfg_active = has_negative and not math.isclose(cfg_scale, 1.0)
    tokens = None
    if len(noise_shape) >= 4:
        tokens = math.prod(noise_shape[2:]) // 4
    plan = plan_parallel(config, world=world, cfg_active=cfg_active, batch=int(noise_shape[0]),
                         heads=getattr(dm, "num_heads", None), sp_supported=supports_sequence_parallel(dm),
                         model_name=type(dm).__name__, tokens=tokens, peer_access=_peer_access(),
                         packed_qkv=bool(getattr(dm, "SEQUENCE_PARALLEL_PLAN", {}).get("packed_qkv")),
                         sp_blocker="the conditioning carries an attention mask (e.g. StyleModelApply attn_bias), "
                                    "which sequence-parallel attention cannot apply" if attention_mask else None)
    _runtime["last_plan"] = plan  # what the last sampling run used (console timing, tests)
    if not plan.is_parallel:
        return _apply_optimizations(patcher, config.optimization, plan)
    mesh = get_mesh(plan.dims)
    if dist.get_rank() == 0:
        log.info("TACO-DiT plan for %s: %s (%s)", type(dm).__name__, plan.describe(), "; ".join(plan.reasons))
    out = patcher.clone()
    if plan.dims.cfg > 1:
        if "sampler_calc_cond_batch_function" in out.model_options:
            log.warning("The MODEL already swaps calc_cond_batch (another patch); CFG parallel not applied")
        else:
            out.model_options["sampler_calc_cond_batch_function"] = make_cfg_parallel_calc(mesh.cfg)
    if plan.dims.dp > 1:
        out.model_options["model_function_wrapper"] = make_data_parallel_wrapper(
            mesh.dp, out.model_options.get("model_function_wrapper"))
    if plan.dims.sp > 1:
        out = apply_sequence_parallel(out, mesh)
    return _apply_optimizations(out, config.optimization, plan)


# Families whose forward was captured and replayed on GPUs under the parallel plans (benchmarks/RESULTS.md).
CUDA_GRAPH_VERIFIED = {"Flux"}

# (diffusion model, what the wrapped forward depends on) -> compiled / graphed forward, reused across
# prompts so compilation and capture happen once per model, layout and weights. Bounded: an entry holds
# its model (and a CUDA graph its buffers), so switching models must not keep old ones alive.
_wrapped_forwards: dict = {}
_MAX_WRAPPED = 2


def _apply_optimizations(patcher, optimization, plan: Plan | None):
    """torch.compile or CUDA-graph the diffusion model's forward, on top of any parallel plan.

    The wrapper calls the model's own `forward`, which reaches the (possibly sequence-parallel)
    `forward_orig` / `run_blocks` object patch, so both compose. A CUDA graph bakes in weight addresses
    and the parallel layout, hence its cache key holds both; torch.compile guards on them itself.
    """
    from comfy.taco_dit.core.config_manager import AUTO

    graph_setting = getattr(optimization, "use_cuda_graph", False)
    if graph_setting == AUTO:
        # automatic only where a GPU run has shown the forward captures cleanly (no host syncs or CPU
        # tensors created inside it); other families use it when asked explicitly
        graph_setting = (plan is not None and plan.is_parallel
                         and type(patcher.model.diffusion_model).__name__ in CUDA_GRAPH_VERIFIED)
    use_graph = graph_setting is True and patcher.load_device.type == "cuda"
    use_compile = bool(getattr(optimization, "use_torch_compile", False))
    if not (use_graph or use_compile):
        return patcher
    dm = patcher.model.diffusion_model
    layout = plan.dims if plan is not None else None
    weights = getattr(patcher, "patches_uuid", None)
    key = (id(dm), "graph" if use_graph else "compile", layout, weights if use_graph else None)
    wrapped = _wrapped_forwards.get(key)
    if wrapped is None:
        for stale in [k for k in _wrapped_forwards if k[0] == id(dm) and k[1] == key[1]]:
            del _wrapped_forwards[stale]  # old layout or weights: free its graph memory
        forward = type(dm).forward.__get__(dm, type(dm))
        if use_graph:
            from comfy.taco_dit.utils.cuda_graph import CUDAGraphCallable

            wrapped = CUDAGraphCallable(forward)
        else:
            wrapped = torch.compile(forward)
        while len(_wrapped_forwards) >= _MAX_WRAPPED:
            del _wrapped_forwards[next(iter(_wrapped_forwards))]
        _wrapped_forwards[key] = wrapped
        log.info("TACO-DiT: %s the %s forward", "CUDA-graphing" if use_graph else "compiling", type(dm).__name__)
    out = patcher.clone()
    out.add_object_patch("diffusion_model.forward", wrapped)
    return out
