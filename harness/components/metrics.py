"""Metrics: per-step scalars reduced over ranks at log steps, the JSON-lines log, the progress bar, step
timing with warm-up exclusion, peak memory, and the profiler trace of one step."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.distributed.collectives import is_distributed

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
        sinks: more destinations (:mod:`harness.components.sinks`: TensorBoard, W&B), each with ``write(step, scalars)``
            and ``close()``; give them on rank 0 only.
    """

    def __init__(self, path: Path, rank: int, world: int, device: torch.device, sinks: Sequence[Any] = ()):
        self.writer = JsonlWriter(path, enabled=rank == 0)
        self.world, self.device = world, device
        self.sinks = list(sinks)
        self.interval: Dict[str, List[torch.Tensor]] = {}

    def add(self, scalars: Mapping[str, torch.Tensor]) -> None:
        """One micro batch's (or optimizer step's) scalars: 0-dim device tensors, not read on the host here."""
        for k, v in scalars.items():
            self.interval.setdefault(k, []).append(v)

    def reduce(self, sums: Mapping[str, float]) -> Dict[str, float]:
        """Means / maxima of the interval's scalars over micro batches and ranks, plus ``sums`` summed over
        ranks; starts a new interval. The values are packed into one device tensor per reduction, so a log step
        reads the device once for the means and sums and once for the maxima."""
        maxes = [k for k in self.interval if k.endswith("_max")]
        means = [k for k in self.interval if k not in maxes]
        packed = torch.cat([self._stacked(means, "mean"),
                            torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)])
        reduced = self._all_reduce(packed, "sum")
        out = {k: r / self.world for k, r in zip(means, reduced)}
        out.update(zip(sums, reduced[len(means):]))
        if maxes:
            out.update(zip(maxes, self._all_reduce(self._stacked(maxes, "max"), "max")))
        self.interval = {}
        return out

    def _stacked(self, keys, how: str) -> torch.Tensor:
        """``[len(keys)]`` float64 on the device: each key's mean or max over the interval."""
        if not keys:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        per_key = [torch.stack([v.detach().reshape(()).float() for v in self.interval[k]]) for k in keys]
        return torch.stack([v.mean() if how == "mean" else v.max() for v in per_key]).double().to(self.device)

    def _all_reduce(self, t: torch.Tensor, op: str) -> List[float]:
        if is_distributed():
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()  # the host read of this log step

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


class StepTrace:
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
    """Optimizer-step wall times, measured between synchronisation points (the log steps, where the metric
    reduction reads device values anyway), so that in between the CPU can run ahead of the GPU and no step waits
    for the device just to be timed. The first ``warmup`` steps of this process (allocator growth, worker
    start-up, kernel selection) are excluded from the averages; the step that ends them, :attr:`boundary`, is
    made a log step by the trainer. Data wait is host time spent waiting for the next batch, per step.

    Args:
        warmup: steps to exclude (fewer when the run is shorter than ``warmup + 1`` steps).
        start_step: the step this process starts from (0, or the resumed step).
        stop_step: the step it will stop at.
    """

    def __init__(self, warmup: int, start_step: int, stop_step: int):
        self.start_step = start_step
        self.excluded = min(warmup, max(stop_step - start_step - 1, 0))
        self.boundary = start_step + self.excluded
        self.marks: List[tuple] = []
        self.waits: Dict[int, float] = {}

    def start(self) -> None:
        """The loop starts: the first mark."""
        self.marks = [(self.start_step, time.perf_counter())]

    def add_wait(self, step: int, wait_s: float) -> None:
        self.waits[step] = wait_s

    def mark(self, step: int) -> None:
        """``step`` ended and the host has waited for the device (call right after a sync)."""
        self.marks.append((step, time.perf_counter()))

    def interval(self) -> tuple:
        """``(mean step time s, mean data wait s)`` of the steps since the previous mark."""
        (s0, t0), (s1, t1) = self.marks[-2], self.marks[-1]
        n = max(s1 - s0, 1)
        return (t1 - t0) / n, sum(self.waits.get(s, 0.0) for s in range(s0 + 1, s1 + 1)) / n

    def _kept(self) -> Optional[tuple]:
        ref = next((m for m in self.marks if m[0] == self.boundary), None)
        last = self.marks[-1] if self.marks else None
        if ref is None or last is None or last[0] <= ref[0]:
            return None
        return ref, last

    def avg_step_time_s(self) -> Optional[float]:
        """Mean step time after the warm-up (None before two marks span a kept step)."""
        kept = self._kept()
        return None if kept is None else (kept[1][1] - kept[0][1]) / (kept[1][0] - kept[0][0])

    def data_wait_fraction(self) -> Optional[float]:
        kept = self._kept()
        if kept is None or kept[1][1] <= kept[0][1]:
            return None
        waits = sum(self.waits.get(s, 0.0) for s in range(kept[0][0] + 1, kept[1][0] + 1))
        return waits / (kept[1][1] - kept[0][1])


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``,
    ``if t:``): on a GPU each one waits for the device. The trainer counts them per optimizer step inside the step
    and the log (data loading excluded) with ``train.count_host_syncs``; only log steps may have any."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        """Do not count inside the block (host work such as data loading)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


class SyncWatch:
    """``train.count_host_syncs`` for the trainer: host reads (:class:`HostSyncCounter`) per optimizer step and its
    log in ``by_step`` (step -> count), data loading excluded (:meth:`paused`); with ``strict`` (CUDA under the
    plain or FSDP2 engine) the step itself, not its log, runs under ``torch.cuda.set_sync_debug_mode("error")``,
    so any synchronising call, counted or not, fails loudly (DeepSpeed's step synchronises by design: its
    gradient-norm and overflow checks). Disabled (``enabled=False``), every context is a no-op."""

    def __init__(self, enabled: bool, strict: bool):
        self.counter = HostSyncCounter() if enabled else None
        self.strict = enabled and strict
        self.by_step: Dict[int, int] = {}

    @contextlib.contextmanager
    def counting(self, step_after):
        """Count the block's reads under the step number ``step_after()`` returns after it."""
        if self.counter is None:
            yield
            return
        before = self.counter.count
        with self.counter:
            yield
        self.by_step[step_after()] = self.counter.count - before

    @contextlib.contextmanager
    def step(self):
        """The training step itself: under sync debug mode ``error`` when strict."""
        if not self.strict:
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def paused(self):
        """Host work (data loading) inside a counted block: not counted."""
        return self.counter.paused() if self.counter is not None else contextlib.nullcontext()


def peak_memory_gib(device: torch.device, tracker=None) -> tuple:
    """``(peak GiB, kind)``: CUDA ``max_memory_allocated`` on a GPU; on a CPU the tracked tensor peak when a
    :class:`harness.distributed.tensor_memory.TensorMemoryTracker` ran, else the process's peak RSS (``ru_maxrss``,
    which includes the Python runtime and libraries, not just tensors)."""
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
