"""CFG parallel and data parallel, as swaps of the sampler's model-evaluation hooks.

- CFG parallel (degree 2) replaces `calc_cond_batch` through
  `model_options["sampler_calc_cond_batch_function"]`: rank 0 of the CFG pair evaluates the positive
  conditioning, rank 1 the negative, and both results are all-gathered before the guidance formula. At
  cfg == 1 there is no negative (the sampler passes None) and both ranks evaluate the positive.
- Data parallel wraps `apply_model` (`model_options["model_function_wrapper"]`): each rank of the data
  group runs its slice of the batch and the outputs are all-gathered. The sampler itself (noise, steps)
  runs on the whole batch on every rank, so seeded noise stays exactly ComfyUI's.
"""

from __future__ import annotations

import logging

import torch

from comfy.taco_dit.parallel.mesh import GroupHandle


def make_cfg_parallel_calc(group: GroupHandle):
    """A `sampler_calc_cond_batch_function` that splits [positive, negative] over a group of 2."""
    from comfy.samplers import calc_cond_batch

    def calc(args):
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        model, model_options = args["model"], args["model_options"]
        if len(conds) != 2 or conds[0] is None or conds[1] is None:
            return calc_cond_batch(model, conds, x, sigma, model_options)
        mine = conds[group.rank_in_group]
        out = calc_cond_batch(model, [mine], x, sigma, model_options)[0]
        both = group.all_gather(out.unsqueeze(0), dim=0)
        return [both[0], both[1]]

    return calc


def _slice_batch(value, batch: int, sl: slice):
    """This rank's slice of every tensor whose first dim is the batch, inside lists and dicts too
    (ControlNet residuals arrive as {"output": [tensor, ...]})."""
    if torch.is_tensor(value):
        return value[sl] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_batch(v, batch, sl) for v in value)
    if isinstance(value, dict) and not isinstance(value, type) and all(isinstance(k, str) for k in value):
        return {k: _slice_batch(v, batch, sl) for k, v in value.items()}
    return value


def make_data_parallel_wrapper(group: GroupHandle, inner=None):
    """A `model_function_wrapper` running each rank's slice of the batch, then all-gathering."""

    def wrapper(apply_model, args):
        call = inner or (lambda fn, a: fn(a["input"], a["timestep"], **a["c"]))
        x = args["input"]
        batch = x.shape[0]
        if batch % group.size != 0:
            logging.debug("Data parallel skipped for a batch of %d on %d ranks", batch, group.size)
            return call(apply_model, args)
        per = batch // group.size
        sl = slice(group.rank_in_group * per, (group.rank_in_group + 1) * per)
        local = {"input": x[sl], "timestep": _slice_batch(args["timestep"], batch, sl),
                 "c": {k: _slice_batch(v, batch, sl) for k, v in args["c"].items()},
                 "cond_or_uncond": args.get("cond_or_uncond")}
        return group.all_gather(call(apply_model, local), dim=0)

    return wrapper
