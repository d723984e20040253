"""Find device -> host synchronisations on a CPU-only machine.

On a GPU, Python waits for the device whenever it reads a device tensor's value (`.item()`, `bool(t)`,
`float(t)`, `if t == 0:`, `.tolist()`, `.cpu()`, `torch.nonzero`, boolean-mask indexing, the error check
of `torch.linalg.solve`, ...) and whenever it copies a host tensor to the device without
`non_blocking=True` (PyTorch synchronises the stream after such a copy). On the CPU none of this costs
anything, so a test cannot time it; `HostSyncRecorder` instead tracks which tensors *would* live on
the GPU and records every such read or upload.

Which tensors are "device" tensors (tainted):

* the ones `mark_device` is given (a model's parameters and buffers);
* the result of `.to(<torch.device>)`, `.to(<device tensor>)`, and of a factory call (`torch.zeros`,
  `torch.tensor`, ...) with a `torch.device` object as `device=`: on a GPU run that object is the model's
  load device. Host-side code names the CPU as the string "cpu" (`torch.randn(..., device="cpu")`,
  `.to("cpu")`, `.cpu()`), which is how the two are told apart here;
* every tensor an operation produces from a device tensor.

Recorded events (`Event.kind`):

* "read": a device tensor's value reaches Python or the host (see `_READS`);
* "upload": Python data or a host tensor becomes a device tensor with a blocking copy.

The recorder knows nothing about sampling; tests set `phase` and `step` to say where an event happened.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tensor methods / torch functions that hand a device tensor's value to Python or the host.
_READS = {
    "item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "__array__",
    "cpu", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
    "is_nonzero", "__repr__", "__format__", "__str__",
    # error-checking linear algebra: reads `info` back to raise on a singular matrix (the *_ex forms don't)
    "linalg_solve", "linalg_inv", "linalg_cholesky", "cholesky", "inverse",
}
# factories that copy Python data (or a host array) into a new tensor
_FROM_DATA = {"tensor", "as_tensor", "asarray", "from_numpy"}
_SKIP = {"__get__", "__set__", "__len__", "__hash__", "dim", "size", "stride", "numel", "is_floating_point",
         "is_complex", "element_size", "data_ptr", "untyped_storage", "storage_offset", "is_contiguous",
         "__torch_function__"}


@dataclass
class Event:
    kind: str        # "read" or "upload"
    op: str          # the torch function / Tensor method
    phase: str       # what the test set as `recorder.phase`
    step: int        # what the test set as `recorder.step`
    where: str       # the innermost frame of the project's own code (file:line function)

    def __str__(self):
        return f"{self.kind} {self.op} [{self.phase}, step {self.step}] at {self.where}"


def _project_frame() -> str:
    """The innermost stack frame in the repository (not in tests/ or torch), as 'path:line function'."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = os.path.abspath(frame.filename)
        if not path.startswith(ROOT) or "/.venv/" in path or path.startswith(os.path.join(ROOT, "tests")):
            continue
        return f"{os.path.relpath(path, ROOT)}:{frame.lineno} {frame.name}"
    return "?"


def _device_arg(args, kwargs):
    """The `device` a `.to(...)` call names: a torch.device / str, a tensor (`.to(other)`), or None."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str, torch.Tensor)):
            return a
    return None


class HostSyncRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self._device = WeakIdKeyDictionary()
        self.events: list[Event] = []
        self.phase = "setup"
        self.step = 0

    # -- taint ----------------------------------------------------------------------------------------------

    def mark_device(self, tensors) -> None:
        for t in tensors:
            self._device[t] = True

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def _mark_outputs(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._device[t] = True

    def _record(self, kind: str, op: str) -> None:
        self.events.append(Event(kind, op, self.phase, self.step, _project_frame()))

    # -- the mode -------------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SKIP:
            return func(*args, **kwargs)
        flat = tree_flatten((args, kwargs))[0]
        tainted = any(self.on_device(a) for a in flat)
        if name == "to":
            return self._to(func, args, kwargs)
        if name in _READS:
            if not tainted:
                return func(*args, **kwargs)
            self._record("read", name)
            return self._host_result(args[0], func(*args, **kwargs))
        if name == "new_tensor" and tainted and not isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            self._record("upload", name)
        if name == "copy_" and len(args) > 1 and not kwargs.get("non_blocking", False):
            if self.on_device(args[0]) and not self.on_device(args[1]):
                self._record("upload", name)
            elif self.on_device(args[1]) and not self.on_device(args[0]):
                self._record("read", name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = tree_flatten(args[1])[0]
            if any(self.on_device(i) and i.dtype == torch.bool for i in index):
                self._record("read", f"{name}[bool mask]")  # the result's size depends on the mask
        out = func(*args, **kwargs)
        if tainted:
            self._mark_outputs(out)
        elif isinstance(kwargs.get("device"), torch.device):
            if name in _FROM_DATA and not kwargs.get("non_blocking", False):
                self._record("upload", name)
            self._mark_outputs(out)
        return out

    @staticmethod
    def _host_result(src, out):
        """On a GPU, `.cpu()` of a device tensor is a new host tensor; here it may be `src` itself (already on
        the CPU), which must stay a device tensor: give the host a copy."""
        return out.clone() if out is src else out

    def _to(self, func, args, kwargs):
        src = args[0]
        target = _device_arg(args, kwargs)
        out = func(*args, **kwargs)
        src_dev = self.on_device(src)
        if isinstance(target, torch.Tensor):
            dst_dev = self.on_device(target)
        elif isinstance(target, torch.device):
            dst_dev = True    # the model's load device (see the module docstring)
        elif isinstance(target, str):
            dst_dev = not target.startswith("cpu")
        else:
            dst_dev = src_dev  # dtype / memory-format change only
        if src_dev and not dst_dev:
            self._record("read", "to(cpu)")
            out = self._host_result(src, out)
        elif dst_dev and not src_dev and not kwargs.get("non_blocking", False):
            self._record("upload", "to(device)")
        if dst_dev:
            self._mark_outputs(out)
        return out
