"""DataLoader worker processes: how every worker the harness starts is set up, and a dead worker named.

* :func:`worker_init`: one intra-op thread per worker and SIGTERM/SIGUSR1 ignored, so a stop signal sent to every
  process of a job (Slurm) reaches the rank, which checkpoints (:mod:`harness.components.resilience`), instead of
  ending its workers mid-epoch.
* :class:`NamedWorkerErrors`: PyTorch reports ``DataLoader worker (pid X) is killed by signal``; the error is
  re-raised as :class:`DataWorkerError` naming the rank, the worker and the shards it was reading.
"""
from __future__ import annotations

import re
import signal
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals a scheduler sends to stop a job (Slurm: SIGTERM on preemption, ``scancel`` and the time limit)."""


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore SIGTERM/SIGUSR1. Slurm signals every process of a job; PyTorch's worker handler
    would end the worker (and the rank would fail on a dead worker) instead of letting the rank checkpoint. A worker
    still exits when its rank does (PyTorch's worker loop watches its parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader the harness starts (training, validation, zero-shot): one intra-op
    thread per worker (decoding is per sample and the rank owns the cores), and SIGTERM/SIGUSR1 ignored, so that a
    stop signal sent to every process of the job (Slurm) reaches the rank, which checkpoints, instead of ending its
    workers mid-epoch or mid-validation (:func:`ignore_stop_signals`)."""
    torch.set_num_threads(1)
    ignore_stop_signals()



def close_active_loaders() -> None:
    """Stop the workers of the training loader being iterated in this process (see :meth:`NamedWorkerErrors.close`)."""
    for loader in _ACTIVE:
        loader.close()


class DataWorkerError(RuntimeError):
    """A DataLoader worker process died (killed by a signal, out of host memory...); names the shards it read."""


TRANSFER_ERRORS = (EOFError, ConnectionError)
"""How a batch transfer cut by a worker's death surfaces in the rank (the worker's end of a pipe or of the socket
that passes a tensor's file descriptor closes)."""

DEATH_GRACE_S = 5.0
"""How long a transfer error waits for its worker to be seen dead. The kernel closes a killed process's files before
the process can be reaped, so the rank can read EOF while ``is_alive()`` still says True."""

_ACTIVE: List["NamedWorkerErrors"] = []  # the training loader being iterated in this process


def data_worker_error(error: BaseException) -> Optional[DataWorkerError]:
    """PyTorch's "DataLoader worker (pid X) is killed by signal" error (raised by its SIGCHLD handler wherever the
    main thread happens to be, e.g. in a forward pass) as a :class:`DataWorkerError` naming the shards of the
    training loader's dead worker; None for any other error."""
    return _ACTIVE[0].explain(error) if _ACTIVE else None


_WORKER_PIDS = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")


class NamedWorkerErrors:
    """Wrap a DataLoader so that a dead worker is a :class:`DataWorkerError` naming the rank, the worker, the shard
    of the last batch it delivered and the shards it was assigned, instead of PyTorch's bare pid.

    Args:
        loader: the DataLoader (batches carry ``role`` and ``shard``, :class:`harness.data.loader.ShardStream`).
        shards_of_worker: ``(worker index, epoch or None)`` -> that worker's shard list (for the message).
        rank: this process's rank.
    """

    def __init__(self, loader: Iterable[Dict[str, Any]], shards_of_worker: Callable[[int, Optional[int]], List[str]],
                 rank: int):
        self.loader, self.shards_of_worker, self.rank = loader, shards_of_worker, rank

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._it = iter(self.loader)
        self._last: Dict[int, tuple] = {}
        _ACTIVE[:] = [self]  # PyTorch's SIGCHLD handler raises wherever the main thread is: see data_worker_error
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - re-raised as it is unless a worker died
                named = self.explain(e) or self._dead_worker(e)
                if named is None:
                    raise
                raise named from e
            self._last[int(batch["worker"])] = (batch.get("shard"), batch["state"]["epoch"])
            yield batch

    def close(self) -> None:
        """Stop the DataLoader's workers now (PyTorch's ``_shutdown_workers``: done event, join). Workers ignore
        SIGTERM (:func:`ignore_stop_signals`), so they must not be left to multiprocessing's exit handler, which
        terminates daemonic children with SIGTERM and joins them."""
        shutdown = getattr(getattr(self, "_it", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def explain(self, error: BaseException) -> Optional[DataWorkerError]:
        """A :class:`DataWorkerError` for PyTorch's dead-worker ``RuntimeError``, else None."""
        found = _WORKER_PIDS.search(str(error))
        if found is None or isinstance(error, DataWorkerError):
            return None
        return DataWorkerError(self._describe(self._it, found.group(1), self._last, str(error)))

    def _dead_worker(self, error: BaseException) -> Optional[DataWorkerError]:
        """A :class:`DataWorkerError` for an error of the loader's own ``next()`` while one of its workers is dead (a
        worker killed while it hands a batch over surfaces as an ``EOFError`` or ``ConnectionResetError`` of the
        transfer, before PyTorch's own liveness check); None while every worker lives. A transfer error
        (:data:`TRANSFER_ERRORS`) waits up to :data:`DEATH_GRACE_S` for the worker's death to become visible."""
        if isinstance(error, DataWorkerError):
            return None
        workers = getattr(self._it, "_workers", None) or []
        deadline = time.monotonic() + (DEATH_GRACE_S if isinstance(error, TRANSFER_ERRORS) else 0.0)
        try:
            while True:
                dead = [str(w.pid) for w in workers if not w.is_alive()]
                if dead or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        except RuntimeError as e:  # PyTorch's SIGCHLD handler saw the death first, during the wait
            named = self.explain(e)
            if named is None:
                raise
            return named
        if not dead:
            return None
        return DataWorkerError(self._describe(self._it, ", ".join(dead), self._last,
                                              f"{type(error).__name__}: {error}"))

    def _describe(self, it, pids_text: str, last: Dict[int, tuple], original: str) -> str:
        pids = {int(p) for p in re.findall(r"\d+", pids_text)}
        procs = getattr(it, "_workers", None) or []
        workers = [i for i, w in enumerate(procs) if w.pid in pids] or sorted(last)
        parts = []
        for w in workers:
            shard, epoch = last.get(w, (None, None))
            shards = self.shards_of_worker(w, epoch)
            listed = ", ".join(shards[:8]) + (f" ... ({len(shards)} shards)" if len(shards) > 8 else "")
            pid = f"pid {procs[w].pid}, exit code {procs[w].exitcode}; " if w < len(procs) else ""
            parts.append(f"worker {w}: reading shard {shard or (shards[0] if shards else '?')} "
                         f"({pid}its shards in epoch {epoch or 0}: {listed})")
        return (f"data.train_data: rank {self.rank}: a DataLoader worker died ({original.strip()}); "
                + "; ".join(parts))
