"""ModelPatcher: the MODEL that flows between nodes.

A patcher wraps a shared `BaseModel` and records what nodes changed about it without touching it:
object patches (replace an attribute such as ``model_sampling``), weight patches (LoRA, merges; folded
into the weights only by `patch_model`), ``model_options`` (``transformer_options`` for the DiT forward,
model wrappers, and the multi-GPU parallel plan). Nodes call `clone()` before changing anything, so an
upstream MODEL output stays valid for every other consumer.

Several clones share one network: `patch_model` first undoes the patches of whichever clone last
patched it, and re-patching with unchanged patches is free.
"""

from __future__ import annotations

import logging
import uuid

import torch

import comfy.lora
import comfy.model_management

logger = logging.getLogger(__name__)


def _get_attr(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(obj, name: str, value):
    parts = name.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    old = getattr(obj, parts[-1])
    setattr(obj, parts[-1], value)
    return old


def _set_param(model: torch.nn.Module, key: str, value: torch.Tensor):
    """Replace a parameter's data in place of the module tree (keeps it an nn.Parameter)."""
    parts = key.split(".")
    mod = model
    for part in parts[:-1]:
        mod = getattr(mod, part)
    old = getattr(mod, parts[-1])
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, parts[-1], torch.nn.Parameter(value, requires_grad=False))
    else:
        setattr(mod, parts[-1], value)


def set_model_options_post_cfg_function(model_options: dict, post_cfg_function,
                                        disable_cfg1_optimization: bool = False) -> dict:
    """Add a post-CFG hook to a model_options dict (ComfyUI's module-level helper, used by CFG++ samplers).

    The hook list is rebuilt, not appended to, so a shallow copy of the options leaves the original alone.
    """
    model_options["sampler_post_cfg_function"] = list(model_options.get("sampler_post_cfg_function", [])) + [
        post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def _copy_options(options: dict) -> dict:
    """Copy model_options deep enough that a clone's edits never leak into its parent."""
    out = dict(options)
    to = dict(options.get("transformer_options", {}))
    for k, v in list(to.items()):
        if isinstance(v, dict):
            to[k] = {kk: (dict(vv) if isinstance(vv, dict) else (list(vv) if isinstance(vv, list) else vv))
                     for kk, vv in v.items()}
        elif isinstance(v, list):
            to[k] = list(v)
    out["transformer_options"] = to
    return out


def _resident(module: torch.nn.Module, device) -> bool:
    """Whether every parameter and buffer of `module` is on `device` already, so `.to(device)` would change
    nothing: checking is a fraction of `.to`'s walk over every module (for Flux, ~10 ms of host time before
    each sampling run on GPU hosts, the fork path's host profile)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    for m in module.modules():  # the modules' own dicts: named_parameters' prefixes and memo sets cost 3x more
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.device != device:
                return False
    return True


class ModelPatcher:
    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                 size: int = 0, weight_inplace_update: bool = False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.patches: dict[str, list] = {}
        self.object_patches: dict = {}
        self.object_patches_backup: dict = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.model_options: dict = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        self.parent: ModelPatcher | None = None

    # -- identity and cloning ------------------------------------------------------------------------

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size,
                         self.weight_inplace_update)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = dict(self.object_patches)
        n.model_options = _copy_options(self.model_options)
        n.parent = self
        return n

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    def model_size(self) -> int:
        if self.size == 0:
            self.size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def model_dtype(self) -> torch.dtype:
        return self.model.get_dtype() if hasattr(self.model, "get_dtype") else \
            next(self.model.parameters()).dtype

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return _get_attr(self.model, name)

    def current_loaded_device(self) -> torch.device:
        return getattr(self.model, "device", None) or self.offload_device

    # -- patches -------------------------------------------------------------------------------------

    def add_object_patch(self, name: str, obj) -> None:
        self.object_patches[name] = obj

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        """Queue weight patches; keys are state-dict keys of `self.model` (or (key, offset, fn) tuples)."""
        model_sd = self.model.state_dict()
        added = []
        for k, value in patches.items():
            offset = function = None
            key = k
            if isinstance(k, tuple):
                key = k[0]
                offset = k[1] if len(k) > 1 else None
                function = k[2] if len(k) > 2 else None
            if key in model_sd:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, offset, function))
                added.append(k)
        if added:
            self.patches_uuid = uuid.uuid4()
        return added

    def get_key_patches(self, filter_prefix: str | None = None) -> dict:
        sd = self.model.state_dict()
        return {k: [(sd[k],)] + self.patches.get(k, []) for k in sd
                if filter_prefix is None or k.startswith(filter_prefix)}

    def model_state_dict(self, filter_prefix: str | None = None) -> dict:
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    # -- model_options: wrappers and transformer_options ---------------------------------------------

    def set_model_unet_function_wrapper(self, fn) -> None:
        self.model_options["model_function_wrapper"] = fn

    def set_model_denoise_mask_function(self, fn) -> None:
        self.model_options["denoise_mask_function"] = fn

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization: bool = False) -> None:
        self.model_options.setdefault("sampler_post_cfg_function", []).append(fn)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_patch(self, patch, name: str) -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {}).setdefault(name, []).append(patch)

    def set_model_patch_replace(self, patch, name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        to = self.model_options["transformer_options"]
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to.setdefault("patches_replace", {}).setdefault(name, {})[key] = patch

    def set_attention_override(self, fn) -> None:
        """Replace the attention op of every DiT block (see comfy.ldm.modules.attention)."""
        self.model_options["transformer_options"]["optimized_attention_override"] = fn

    def add_wrapper(self, wrapper_type: str, fn, key: str = "default") -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("wrappers", {}).setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def get_wrappers(self, wrapper_type: str) -> list:
        per_key = self.model_options["transformer_options"].get("wrappers", {}).get(wrapper_type, {})
        return [fn for fns in per_key.values() for fn in fns]

    # -- applying ------------------------------------------------------------------------------------

    def patch_model(self, device_to: torch.device | None = None, lowvram_model_memory: int = 0,
                    load_weights: bool = True, force_patch_weights: bool = False):
        """Apply object and weight patches to the shared network and move it to device_to."""
        current = getattr(self.model, "_taco_patched_by", None)
        if current is not None and current is not self and current.model is self.model:
            current.unpatch_model()
        for name, obj in self.object_patches.items():
            old = _set_attr(self.model, name, obj)
            if name not in self.object_patches_backup:
                self.object_patches_backup[name] = old
        if device_to is not None:
            if not _resident(self.model, device_to):
                self.model.to(device_to)
            self.model.device = device_to
        if load_weights and getattr(self.model, "_taco_weights_uuid", None) != self.patches_uuid:
            self._patch_weights(device_to)
            self.model._taco_weights_uuid = self.patches_uuid
        self.model._taco_patched_by = self
        return self.model

    def _patch_weights(self, device_to: torch.device | None) -> None:
        if not self.patches:
            return  # (building the state dict walks every module: ~10 ms for Flux, per sampling run)
        sd = self.model.state_dict()
        for key, patches in self.patches.items():
            weight = sd[key]
            if key not in self.backup:
                # the unpatched weight is kept on the offload device; unpatch restores it
                self.backup[key] = weight.to(self.offload_device, copy=True)
            work = self.backup[key].to(device_to or weight.device, dtype=torch.float32, copy=True)
            out = comfy.lora.calculate_weight(patches, work, key)
            _set_param(self.model, key, out.to(weight.dtype))

    def unpatch_model(self, device_to: torch.device | None = None, unpatch_weights: bool = True) -> None:
        if unpatch_weights:
            for key, weight in self.backup.items():
                current = self.model.state_dict()[key]
                _set_param(self.model, key, weight.to(current.device))
            self.backup.clear()
            self.model._taco_weights_uuid = None
        for name, old in self.object_patches_backup.items():
            _set_attr(self.model, name, old)
        self.object_patches_backup.clear()
        if getattr(self.model, "_taco_patched_by", None) is self:
            self.model._taco_patched_by = None
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to

    def detach(self, unpatch_all: bool = True):
        if unpatch_all:
            self.unpatch_model(self.offload_device)
        return self.model

    def model_patches_to(self, device) -> None:
        pass

    def __deepcopy__(self, memo):
        # a MODEL is never deep-copied (that would duplicate the weights); copies are clones
        return self.clone()


def load_device_for_models() -> tuple[torch.device, torch.device]:
    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()

