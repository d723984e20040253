"""Devices, dtypes, memory and the interrupt flag.

One process drives one device: the GPU named by LOCAL_RANK under torchrun (or --cuda-device), else
cuda:0, else the CPU (--cpu, or no GPU). Device choice happens on first use, never at import, so tests
and the CPU path import this freely.
"""

from __future__ import annotations

import logging
import os
import threading

import psutil
import torch

from comfy.cli_args import args


class InterruptProcessingException(Exception):
    """Raised inside a running prompt when the user pressed Cancel (or another rank was interrupted)."""


class OOM_EXCEPTION(torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else MemoryError):
    pass


_interrupt_lock = threading.Lock()
_interrupt_requested = False


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt_requested
    with _interrupt_lock:
        _interrupt_requested = value


def processing_interrupted() -> bool:
    with _interrupt_lock:
        return _interrupt_requested


def throw_exception_if_processing_interrupted() -> None:
    global _interrupt_requested
    with _interrupt_lock:
        if _interrupt_requested:
            _interrupt_requested = False
            raise InterruptProcessingException()


def cpu_mode() -> bool:
    return bool(args.cpu) or not torch.cuda.is_available()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_torch_device() -> torch.device:
    """This rank's compute device."""
    if cpu_mode():
        return torch.device("cpu")
    if args.cuda_device is not None and "LOCAL_RANK" not in os.environ:
        return torch.device("cuda", args.cuda_device)
    return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))


def intermediate_device() -> torch.device:
    """Where node outputs between nodes live (images, latents): the CPU, as in ComfyUI."""
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return get_torch_device()


def vae_device() -> torch.device:
    return torch.device("cpu") if args.cpu_vae else get_torch_device()


def supports_bf16(device: torch.device | None = None) -> bool:
    device = device or get_torch_device()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def unet_dtype(device: torch.device | None = None, weight_dtype: torch.dtype | None = None) -> torch.dtype:
    """Compute dtype for a diffusion model: flags first, then bf16 on capable GPUs, fp32 on CPU."""
    if args.fp32_unet:
        return torch.float32
    if args.bf16_unet:
        return torch.bfloat16
    if args.fp16_unet:
        return torch.float16
    device = device or get_torch_device()
    if device.type == "cpu":
        return torch.float32
    if weight_dtype in (torch.float16, torch.bfloat16):
        return weight_dtype if supports_bf16(device) or weight_dtype == torch.float16 else torch.float16
    return torch.bfloat16 if supports_bf16(device) else torch.float16


def vae_dtype(device: torch.device | None = None) -> torch.dtype:
    if args.fp32_vae:
        return torch.float32
    if args.fp16_vae:
        return torch.float16
    device = device or vae_device()
    if args.bf16_vae or (device.type == "cuda" and supports_bf16(device)):
        return torch.bfloat16
    return torch.float32


def text_encoder_dtype(device: torch.device | None = None) -> torch.dtype:
    if args.fp32_text_enc:
        return torch.float32
    device = device or text_encoder_device()
    if device.type == "cpu":
        return torch.float32
    if args.bf16_text_enc:
        return torch.bfloat16
    return torch.float16 if not supports_bf16(device) else torch.bfloat16


def get_total_memory(device: torch.device | None = None) -> int:
    device = device or get_torch_device()
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def get_free_memory(device: torch.device | None = None) -> int:
    device = device or get_torch_device()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + reserved
    return psutil.virtual_memory().available


def ranks_sharing_device(device: torch.device | None = None) -> int:
    """How many processes of this torchrun job on this node use the same device as this rank.

    Every rank holds its own copy of the models, so memory decisions divide what the device (or, on
    the CPU, the node's RAM) has by this number. 1 outside torchrun.
    """
    device = device or get_torch_device()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type != "cuda":
        return max(local_world, 1)
    n = max(torch.cuda.device_count(), 1)
    # LOCAL_RANK r uses device r % n (get_torch_device), so these local ranks share this one.
    return max(len(range(local_rank() % n, local_world, n)), 1)


_warned_shared_device = False


def rank_memory_budget(device: torch.device | None = None) -> int:
    """Bytes this rank may plan to use on `device`: its share of the free memory, less --reserve-vram."""
    global _warned_shared_device
    device = device or get_torch_device()
    sharing = ranks_sharing_device(device)
    if sharing > 1 and device.type == "cuda" and not _warned_shared_device:
        _warned_shared_device = True
        logging.warning("%d ranks share %s: each holds its own copy of the models. Start torchrun with "
                        "--nproc_per_node equal to the number of GPUs for full memory per rank.", sharing, device)
    reserve = int((args.reserve_vram or 0) * 1024 ** 3) if device.type == "cuda" else 0
    return max(get_free_memory(device) // sharing - reserve, 0)


def get_torch_device_name(device: torch.device | None = None) -> str:
    device = device or get_torch_device()
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return "cpu"


def soft_empty_cache(force: bool = False) -> None:
    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.empty_cache()


# Loaded models are tracked so /free and an OOM can release them. Model patchers register here.
current_loaded_models: list = []


def unload_all_models() -> None:
    for m in list(current_loaded_models):
        unload = getattr(m, "unpatch_model", None) or getattr(m, "detach", None)
        if unload is not None:
            try:
                unload()
            except Exception:  # unloading is best effort; a failure must not hide the caller's error
                logging.exception("Failed to unload a model")
    current_loaded_models.clear()
    soft_empty_cache(True)


def cleanup_models() -> None:
    pass


def load_models_gpu(models: list, memory_required: int = 0, force_full_load: bool = False) -> None:
    """Put each ModelPatcher's patched weights on its load device (one rank = one device)."""
    for m in models:
        if m is None:
            continue
        m.patch_model(getattr(m, "load_device", None) or get_torch_device())
        if m not in current_loaded_models:
            current_loaded_models.append(m)


def load_model_gpu(model) -> None:
    load_models_gpu([model])
