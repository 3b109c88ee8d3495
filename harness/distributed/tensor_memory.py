"""Tensor memory on a CPU, measured like a GPU's allocator would, with an optional hard budget.

PyTorch's CPU allocator keeps no statistics, and process RSS mixes tensors with the Python runtime and
libraries. :class:`TensorMemoryTracker` is a ``TorchDispatchMode`` that counts the bytes of every live
tensor storage (each storage once; freed storages leave through a weak reference; ``resize_`` in place,
which FSDP2 and ZeRO-3 use to free gathered parameters, is followed), so ``peak_bytes`` is the CPU analogue
of ``torch.cuda.max_memory_allocated``. With ``budget_bytes`` it raises ``torch.OutOfMemoryError`` from
the operation whose result pushes live memory past the budget: a fit probe on a CPU machine then fails
the way a GPU runs out of memory, at a deterministic point (the same tensors, the same byte counts).

The mechanics follow PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` (weak references to
untyped storages, a patched ``UntypedStorage.resize_``, DTensors left to desugar into local tensors first);
what it lacks, and this adds, is the budget.
"""
from __future__ import annotations

import weakref
from functools import wraps
from typing import Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.core.units import GIB


class TensorMemoryTracker(TorchDispatchMode):
    """Count live tensor bytes on the CPU inside ``with tracker:``; keep the peak; enforce a budget.

    Args:
        budget_bytes: raise ``torch.OutOfMemoryError`` when live bytes exceed this (None: only measure).
        device_type: which device's tensors count (``"cpu"``).

    Attributes:
        live_bytes: bytes of storages alive now (of those seen).
        peak_bytes: the most ``live_bytes`` has been.

    Tensors made before the block (model parameters, a prepared optimizer) are added with :meth:`track`.
    Raises ``torch.OutOfMemoryError`` (a ``RuntimeError``) naming the op, the bytes and the budget.
    """

    def __init__(self, budget_bytes: Optional[int] = None, device_type: str = "cpu"):
        super().__init__()
        self.budget_bytes = budget_bytes
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: Dict[int, int] = {}  # id(storage object) -> bytes counted
        self._refs: Dict[int, weakref.ref] = {}
        self._orig_resize = None

    # ---- bookkeeping
    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._sizes or storage.device.type != self.device_type:
            return
        nbytes = storage.nbytes()
        self._sizes[key] = nbytes
        self._refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        self.live_bytes += nbytes

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, tensors: Iterable[torch.Tensor]) -> "TensorMemoryTracker":
        """Count already existing tensors (e.g. ``model.parameters()``, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                local = t.to_local() if hasattr(t, "to_local") else t
                self._add(local.untyped_storage())
        self._update_peak(None)
        return self

    def _update_peak(self, op) -> None:
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"CPU memory budget exceeded{f' in {op}' if op is not None else ''}: {self.live_bytes / GIB:.3f} GiB "
                f"of tensors live, budget {self.budget_bytes / GIB:.3f} GiB "
                "(harness.distributed.tensor_memory.TensorMemoryTracker)")

    # ---- interception
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(getattr(t, "__name__", "") == "DTensor" for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back through this mode
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.device.type == self.device_type:
                self._add(t.untyped_storage())
        self._update_peak(func)
        return out

    def __enter__(self):
        self._orig_resize = torch.UntypedStorage.resize_
        orig, tracker = self._orig_resize, self

        @wraps(orig)
        def resize_(storage, size):  # not seen by dispatch modes (FSDP2 frees gathered parameters this way)
            out = orig(storage, size)
            key = id(storage)
            if key in tracker._sizes:
                tracker.live_bytes += storage.nbytes() - tracker._sizes[key]
                tracker._sizes[key] = storage.nbytes()
                tracker._update_peak("UntypedStorage.resize_")
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak_bytes = self.live_bytes
