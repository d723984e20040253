"""TACO-DiT nodes: per-MODEL parallel configuration.

`TACO-DiT Parallel Config` patches a MODEL (a clone, as every ComfyUI patch) with parallel settings that
override the process-wide ones (taco_dit_config.yaml / --taco-* flags) for samplers using that MODEL.
With one process it changes nothing, so a workflow using it runs anywhere.
"""

from __future__ import annotations

import torch.distributed as dist

from comfy.taco_dit.core.config_manager import ConfigError, ParallelConfig
from comfy.taco_dit.core.model_wrapper import NODE_OPTIONS_KEY

_ONOFF = ["auto", "on", "off"]
_VALUE = {"auto": "auto", "on": True, "off": False}


class TacoDiTParallelConfig:
    @classmethod
    def INPUT_TYPES(cls):
        degree = {"default": 0, "min": 0, "max": 64, "step": 1,
                  "tooltip": "0 = automatic. Ulysses must divide the model's attention heads."}
        return {"required": {
            "model": ("MODEL",),
            "parallel": (_ONOFF, {"default": "auto", "tooltip": "off: every rank computes the whole image"}),
            "cfg_parallel": (_ONOFF, {"default": "auto",
                                      "tooltip": "positive and negative prompts on different GPUs (cfg > 1)"}),
            "sequence_parallel": (_ONOFF, {"default": "auto"}),
            "ulysses_degree": ("INT", dict(degree)),
            "ring_degree": ("INT", dict(degree)),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "TACO-DiT"
    DESCRIPTION = ("Sets how this model's sampling is split over the GPUs of a torchrun job (CFG parallel, "
                   "sequence parallel with Ulysses and Ring degrees). Automatic by default.")

    def patch(self, model, parallel, cfg_parallel, sequence_parallel, ulysses_degree, ring_degree):
        overrides = {"enabled": _VALUE[parallel], "cfg_parallel": _VALUE[cfg_parallel],
                     "sequence_parallel": _VALUE[sequence_parallel],
                     "ulysses_degree": ulysses_degree or "auto", "ring_degree": ring_degree or "auto"}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            try:  # refuse a layout that cannot run before any sampling starts
                ParallelConfig(world_size=world, **overrides)
            except ConfigError as e:
                raise ValueError(f"TACO-DiT Parallel Config: {e}") from e
        out = model.clone()
        out.model_options[NODE_OPTIONS_KEY] = overrides
        return (out,)


NODE_CLASS_MAPPINGS = {"TacoDiTParallelConfig": TacoDiTParallelConfig}
NODE_DISPLAY_NAME_MAPPINGS = {"TacoDiTParallelConfig": "TACO-DiT Parallel Config"}
