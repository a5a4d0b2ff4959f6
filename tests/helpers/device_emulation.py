"""A model 'on a GPU', emulated on a CPU-only machine: where qcompile's own tensors would land on
the host while the model's are on the device.

Under `DeviceEmulation` (a TorchFunctionMode) every tensor qcompile's code makes with a factory
and no device (`torch.zeros(n)`, `torch.tensor(1.0)`, `torch.arange(n)`), or moves with
`.cpu()` / `.to("cpu")` (the string: `.to(x.device)` follows the model), is tagged *host*: on a GPU run it would be on the CPU. Everything else
(the model's parameters and activations, and what is computed from them) is *device*. An op that
mixes a host tensor of one or more dims with device tensors, or passes a host scalar to a q4 op,
or indexes a host tensor by device indices, would raise on a GPU ("Expected all tensors to be on
the same device"): each is recorded with the qcompile lines that made the call.

It is an emulation: it cannot see what only a GPU does (a kernel's launch, CUDA graphs), and it
takes tensors made at import time (module constants) for device ones.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_HOST = "_q4_emulated_host"
_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.rand,
              torch.randn, torch.randint, torch.randperm, torch.linspace, torch.as_tensor, torch.from_numpy,
              torch.scalar_tensor}
# ops that move or only read metadata: mixing hosts and devices in them is no error
_TRANSFERS = {"copy_", "to", "cpu", "cuda", "__setitem__", "__repr__", "__format__", "tolist", "item", "__bool__",
              "__float__", "__int__", "__index__", "size", "dim", "numel", "__len__", "shape", "dtype", "device",
              "data_ptr", "is_floating_point", "stride", "storage_offset", "__get__", "clone", "detach",
              "contiguous", "element_size", "requires_grad_", "_version", "untyped_storage", "__hash__", "__eq__"}
_QCOMPILE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + "/qcompile/"


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _tag(out, host: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _HOST, host)
            except (AttributeError, RuntimeError):  # a tensor that takes no attributes
                pass


def _caller_is_qcompile() -> bool:
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and "/site-packages/torch/" not in name:
            return name.startswith(_QCOMPILE)
        frame = frame.f_back
    return False


class DeviceEmulation(TorchFunctionMode):
    """Records in `reports` ({(kind, qcompile line): description}) every op that would mix devices."""

    def __init__(self):
        super().__init__()
        self.reports: dict[tuple[str, str], str] = {}

    def _report(self, kind: str, func, detail: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(_QCOMPILE)]
        where = [f"qcompile/{f.filename[len(_QCOMPILE):]}:{f.lineno}" for f in frames[-3:]]
        key = (kind, where[-1] if where else "?")
        self.reports.setdefault(key, f"{getattr(func, '__name__', func)}: {detail} at {' <- '.join(reversed(where))}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or str(func)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(type(t).__name__ in ("FakeTensor", "FunctionalTensor") or t.device.type == "meta" for t in tensors):
            return func(*args, **kwargs)  # tracing: no data moves
        hosts = [t for t in tensors if _is_host(t)]
        devices = [t for t in tensors if not _is_host(t)]
        if hosts and devices and name not in _TRANSFERS:
            if name == "__getitem__":
                if _is_host(args[0]) and any(t.dim() > 0 or not t.is_floating_point() for t in devices):
                    self._report("host-indexed-by-device", func, f"a host tensor {tuple(args[0].shape)}")
            elif any(t.dim() > 0 for t in hosts):
                self._report("mix", func, f"host {[tuple(t.shape) for t in hosts]}, device "
                                          f"{[tuple(t.shape) for t in devices][:3]}")
            elif "q4" in str(func):
                self._report("host-scalar-into-a-q4-op", func, f"host {[tuple(t.shape) for t in hosts]}")
        out = func(*args, **kwargs)
        explicit = kwargs.get("device") is not None
        if func in _FACTORIES:
            if not explicit and _caller_is_qcompile():
                _tag(out, True)
        elif name == "cpu":
            _tag(out, True)
        elif name == "to":
            device = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
            if device is not None:  # "cpu" written out: the host; a device object (`x.device`): the model's
                _tag(out, isinstance(device, str) and device == "cpu")
            elif args and isinstance(args[0], torch.Tensor):
                _tag(out, _is_host(other if other is not None else args[0]))
        elif name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
            _tag(out, _is_host(args[0]) and not explicit)
        elif tensors:
            if explicit:
                _tag(out, False)
            elif hosts and not devices:
                _tag(out, True)
            elif hosts and devices and name not in ("__setitem__", "copy_"):
                _tag(out, False)
        return out
