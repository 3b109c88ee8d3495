"""Metrics: per-step scalars reduced over ranks at log steps, the JSON-lines log, the progress bar, step
timing with warm-up exclusion, peak memory, and the profiler trace of one step."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch

from harness.distributed import all_reduce_floats

log = logging.getLogger("harness")


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


def flat_scalars(record: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """The numeric values of ``record`` (bools, None, text and ``step`` left out; nested dicts flattened to
    ``outer/inner``) as floats."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class MetricLogger:
    """Collects each micro batch's scalars (device tensors) and, at a log step, reduces them over the micro
    batches of the interval and then over ranks in one all-reduce: keys ending in ``_max`` by max, the others
    by mean; ``sums`` given to :meth:`reduce` (counters, flags that ranks vote on) ride in the same all-reduce,
    summed. Rank 0 writes each record as one JSON line, and hands its numeric scalars to each sink.

    Args:
        path: the ``metrics.jsonl`` file.
        rank: this process's rank (only rank 0 writes).
        world: ranks in the reduction.
        device: where the reduction runs (NCCL reduces CUDA tensors only).
        sinks: more destinations (:mod:`harness.reporting`: TensorBoard, W&B), each with ``write(step, scalars)``
            and ``close()``; give them on rank 0 only.
    """

    def __init__(self, path: Path, rank: int, world: int, device: torch.device, sinks: Sequence[Any] = ()):
        self.writer = JsonlWriter(path, enabled=rank == 0)
        self.world, self.device = world, device
        self.sinks = list(sinks)
        self.interval: Dict[str, List[torch.Tensor]] = {}

    def add(self, scalars: Mapping[str, torch.Tensor]) -> None:
        """One micro batch's scalars (0-dim tensors; not read on the host here)."""
        for k, v in scalars.items():
            self.interval.setdefault(k, []).append(v)

    def reduce(self, sums: Mapping[str, float]) -> Dict[str, float]:
        """Means / maxima of the interval's scalars over micro batches and ranks, plus ``sums`` summed over
        ranks; starts a new interval."""
        maxes = {k: torch.stack(v).max().item() for k, v in self.interval.items() if k.endswith("_max")}
        means = {k: torch.stack(v).mean().item() for k, v in self.interval.items() if k not in maxes}
        reduced = all_reduce_floats([*means.values(), *sums.values()], "sum", self.device)
        out = {k: r / self.world for k, r in zip(means, reduced)}
        out.update(zip(sums, reduced[len(means):]))
        if maxes:
            out.update(zip(maxes, all_reduce_floats(list(maxes.values()), "max", self.device)))
        self.interval = {}
        return out

    def write(self, record: Dict[str, Any]) -> None:
        self.writer.write(record)
        if self.sinks:
            scalars = flat_scalars(record)
            for sink in self.sinks:
                sink.write(int(record["step"]), scalars)

    def close(self) -> None:
        self.writer.close()
        for sink in self.sinks:
            sink.close()


class ProgressBar:
    """Progress of optimizer steps on rank 0 (nothing elsewhere or when not ``enabled``): a tqdm bar when stderr is
    a terminal, else (Slurm logs, pipes) one INFO log line per log step instead of a bar redrawn with ``\r``.
    Both show loss, LR, samples/s and the model's own keys (``progress_metrics`` of its image tower: metric ->
    short label)."""

    def __init__(self, total: int, initial: int, enabled: bool, extra_keys: Mapping[str, str]):
        from tqdm import tqdm

        self.total = total
        self.log_lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not enabled or self.log_lines, unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self.extra_keys = dict(extra_keys)

    def show(self, record: Mapping[str, Any]) -> None:
        postfix = dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                       samples_s=f"{record['samples_per_s']:.0f}")
        postfix.update({label: f"{record[k]:.2f}" for k, label in self.extra_keys.items() if k in record})
        if self.log_lines:
            log.info("step %d/%d %s", record["step"], self.total, " ".join(f"{k} {v}" for k, v in postfix.items()))
        else:
            self.bar.set_postfix(**postfix, refresh=False)

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class StepProfiler:
    """A PyTorch profiler trace (CPU + CUDA activity, shapes, memory) of one optimizer step, and on CUDA a memory
    snapshot (``memory_snapshot_step<N>_rank<R>.pickle``, for pytorch.org/memory_viz), written to ``run_dir``."""

    def __init__(self, step: Optional[int], run_dir: Path, rank: int, device: torch.device):
        self.step, self.run_dir, self.rank, self.device = step, Path(run_dir), rank, device

    @contextlib.contextmanager
    def maybe(self, step: int):
        """Profile the body when ``step`` is the profiled step, else run it as is."""
        if step != self.step:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            yield
        prof.export_chrome_trace(str(self.run_dir / f"trace_step{step}_rank{self.rank}.json"))
        if cuda:
            torch.cuda.memory._dump_snapshot(str(self.run_dir / f"memory_snapshot_step{step}_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profiler trace of step %d written to %s", step, self.run_dir)


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
