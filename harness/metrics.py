"""Metrics: JSON-lines log, step timing with warm-up exclusion, peak memory."""
from __future__ import annotations

import json
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch


class JsonlWriter:
    """Append one JSON object per line to ``path`` (rank 0 only; other ranks pass ``enabled=False``)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        self._f = open(self.path, "a", buffering=1) if enabled else None

    def write(self, record: Dict[str, Any]) -> None:
        if self._f:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f:
            self._f.close()


class StepTimer:
    """Optimizer-step wall times in seconds; the first ``warmup`` steps of this process are excluded
    from averages (first steps include allocator growth, worker start-up, kernel selection)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: List[float] = []
        self.data_wait: List[float] = []

    def add(self, step_time_s: float, data_wait_s: float) -> None:
        self.times.append(step_time_s)
        self.data_wait.append(data_wait_s)

    @property
    def excluded(self) -> int:
        """Steps actually excluded (fewer than ``warmup`` if the run was shorter than warm-up + 1 steps)."""
        return min(self.warmup, max(len(self.times) - 1, 0))

    def avg_step_time_s(self) -> Optional[float]:
        kept = self.times[self.excluded:]
        return sum(kept) / len(kept) if kept else None

    def data_wait_fraction(self) -> Optional[float]:
        kept_t, kept_w = self.times[self.excluded:], self.data_wait[self.excluded:]
        return sum(kept_w) / sum(kept_t) if kept_t and sum(kept_t) > 0 else None


def peak_memory_gib(device: torch.device, tracker=None) -> tuple:
    """``(peak GiB, kind)``: CUDA ``max_memory_allocated`` on a GPU; on a CPU the tracked tensor peak when a
    :class:`harness.memory.TensorMemoryTracker` ran, else the process's peak RSS (``ru_maxrss``, which
    includes the Python runtime and libraries, not just tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    if tracker is not None:
        return tracker.peak_bytes / 2**30, "cpu_tensor_peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss * scale / 2**30, "cpu_max_rss"


@contextmanager
def saved_activation_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[Dict[str, int]]:
    """Count the bytes autograd saves for backward inside the block (the activation memory of a forward).

    Each distinct storage counts once; storages of ``exclude`` (pass the model's parameters) do not.
    Yields a dict whose ``"bytes"`` is filled in when the block exits.
    """
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    result = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(n for ptr, n in seen.items() if ptr not in skip)


def dump_result(result: Dict[str, Any], out: Optional[str]) -> None:
    """Print ``result`` as JSON and, if ``out`` is given, write it there (benchmark scripts' output)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
