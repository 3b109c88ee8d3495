"""Preemption, hangs and dead data workers, per rank: what a long job on a shared cluster meets.

* **Preemption** (:class:`RunGuard`): SIGTERM (what Slurm sends on preemption, ``scancel`` and the time limit,
  ``KillWait`` seconds, 30 by default, before SIGKILL) or SIGUSR1 sets a flag on the rank that receives it. The
  flag is folded into the all-reduce the trainer already does at each log step (as the stop-file vote), so every
  rank stops at the same step without any per-step host synchronisation: within ``train.log_every_steps`` steps
  (10 by default) of the signal, every rank saves a checkpoint and the process exits with
  :data:`harness.errors.PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``: "try again"), which ``slurm/train.sbatch``
  requeues on. A second signal (more than :data:`DUPLICATE_WINDOW_S` after the first: Slurm signals every
  process of a job step and the launcher forwards the same signal to its ranks, so copies arrive together) or
  ``train.preempt_grace_s`` running out exits at once with the same status; checkpoints are committed by one
  atomic rename (:mod:`harness.checkpoint`), so an exit at any point leaves the newest complete one untouched.
* **Hangs** (:class:`Watchdog`): a daemon thread per rank; no step completed within ``train.hang_timeout_s`` ->
  the stacks of every thread go to ``<run_dir>/hang_rank_XXXXX.txt`` (``faulthandler``, which works while the
  main thread is blocked inside a C call such as a collective) and to stderr, and the process exits with
  :data:`harness.errors.HANG_EXIT`. The idea is PyTorch's NCCL flight recorder / torchelastic watchdog, made
  backend-independent.
* **Dead DataLoader workers** (:class:`NamedWorkerErrors`): PyTorch reports ``DataLoader worker (pid X) is killed
  by signal``; the error is re-raised as :class:`DataWorkerError` naming the rank, the worker and the shards it
  was reading.

Test hooks (environment variables, used by ``tests/test_preemption.py`` only): :data:`FAULT_HANG_ENV`.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from harness.errors import HANG_EXIT, PREEMPTED_EXIT

log = logging.getLogger("harness")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0
"""Seconds after a stop signal during which another one is the same request (Slurm signals every process of the
step, and ``torchrun``/``accelerate launch`` forward the signal they received to their ranks)."""
FAULT_HANG_ENV = "HARNESS_FAULT_HANG_AFTER_STEP"
"""Test hook: ``"R:S"`` makes rank R's main thread sleep for an hour right after optimizer step S (a hang)."""


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore SIGTERM/SIGUSR1. Slurm signals every process of a job; PyTorch's worker handler
    would end the worker (and the rank would fail on a dead worker) instead of letting the rank checkpoint. A worker
    still exits when its rank does (PyTorch's worker loop watches its parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _say(text: str) -> None:
    """Write a line to stderr without the logging module (safe inside a signal handler or a dying thread)."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode())
    except OSError:
        pass


class Watchdog(threading.Thread):
    """Exit this process when no training step completes within ``timeout_s`` seconds.

    ``beat(step)`` after each optimizer step (and after a periodic evaluation or checkpoint, which are progress
    too). On a timeout: a header and ``faulthandler.dump_traceback(all_threads=True)`` into ``path`` and onto
    stderr, then ``os._exit(HANG_EXIT)``; the launcher stops the other ranks (or their own watchdogs fire).

    Args:
        timeout_s: seconds without a completed step (> 0).
        path: the stack dump file (``<run_dir>/hang_rank_XXXXX.txt``).
        rank: this process's rank (for the message).
    """

    def __init__(self, timeout_s: float, path: Path, rank: int):
        super().__init__(name="harness-hang-watchdog", daemon=True)
        self.timeout_s, self.path, self.rank = float(timeout_s), Path(path), rank
        self.last_beat, self.step = time.monotonic(), None
        self._stopped = threading.Event()

    def beat(self, step: int) -> None:
        self.last_beat, self.step = time.monotonic(), step

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        poll = max(0.05, min(5.0, self.timeout_s / 10))
        while not self._stopped.wait(poll):
            idle = time.monotonic() - self.last_beat
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        after = f"after step {self.step}" if self.step is not None else "before the first step"
        header = (f"error: rank {self.rank}: no training step completed for {idle:.0f} s (train.hang_timeout_s="
                  f"{self.timeout_s:g}) {after}; stacks of every thread follow (also in {self.path})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(header + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            header += f" [could not write {self.path}: {e}]"
        _say(header)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(HANG_EXIT)


class RunGuard:
    """One rank's stop signals and hang watchdog for the duration of a run (a context manager).

    Args:
        train_cfg: :class:`harness.config.TrainConfig` (``hang_timeout_s``, ``preempt_grace_s``; 0 turns either off).
        run_dir: the run folder (stack dumps go there).
        rank: this process's rank.
        enabled: False gives an inert guard (a trainer built outside :func:`harness.train.run`).

    Attributes:
        signalled: this process received a stop signal (its vote at the next log step).
        stopping: every rank agreed to stop on a signal (:meth:`agree`); the run then exits with ``PREEMPTED_EXIT``.
    """

    def __init__(self, train_cfg: Any = None, run_dir: Optional[Path] = None, rank: int = 0, enabled: bool = True):
        self.enabled = enabled and train_cfg is not None
        self.hang_timeout_s = float(getattr(train_cfg, "hang_timeout_s", 0) or 0)
        self.grace_s = float(getattr(train_cfg, "preempt_grace_s", 0) or 0)
        self.run_dir, self.rank, self.pid = Path(run_dir or "."), rank, os.getpid()
        self.signalled, self.stopping, self.signal_name = False, False, ""
        self._first: Optional[float] = None
        self._previous: Dict[int, Any] = {}
        self._grace: Optional[threading.Timer] = None
        self.watchdog: Optional[Watchdog] = None
        hook = os.environ.get(FAULT_HANG_ENV, "")
        self._hang_at = tuple(int(x) for x in hook.split(":")) if hook else None

    def __enter__(self) -> "RunGuard":
        if not self.enabled:
            return self
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.hang_timeout_s > 0:
            self.watchdog = Watchdog(self.hang_timeout_s, self.run_dir / f"hang_rank_{self.rank:05d}.txt", self.rank)
            self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        for loader in _ACTIVE:
            loader.close()  # before interpreter exit, where multiprocessing would SIGTERM (ignored) workers and wait
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._grace is not None:
            self._grace.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker: the rank decides, the worker carries on
            return
        now, name = time.monotonic(), signal.Signals(signum).name
        if self._first is None:
            self._first, self.signalled, self.signal_name = now, True, name
            _say(f"rank {self.rank}: {name} received: checkpointing at the next log step, then exiting with status "
                 f"{PREEMPTED_EXIT}" + (f" (at most {self.grace_s:g} s from now)" if self.grace_s else ""))
            if self.grace_s > 0:
                self._grace = threading.Timer(self.grace_s, self._exit_now, (f"train.preempt_grace_s={self.grace_s:g}"
                                                                           " ran out",))
                self._grace.daemon = True
                self._grace.start()
        elif now - self._first > DUPLICATE_WINDOW_S:
            self._exit_now(f"a second {name}")

    def _exit_now(self, why: str) -> None:
        _say(f"rank {self.rank}: {why}: exiting now with status {PREEMPTED_EXIT}; the newest complete checkpoint "
             "is untouched")
        os._exit(PREEMPTED_EXIT)

    def agree(self, votes: float) -> bool:
        """``votes``: the number of ranks that received a stop signal (summed in the log-step all-reduce).
        Returns whether to stop now (the same answer on every rank)."""
        if votes > 0 and not self.stopping:
            self.stopping = True
            self.signal_name = self.signal_name or "a stop signal on another rank"
        return self.stopping

    def step_done(self, step: int) -> None:
        """A step (or periodic evaluation / checkpoint) completed: the watchdog's heartbeat."""
        if self._hang_at is not None and self._hang_at == (self.rank, step):
            _say(f"rank {self.rank}: test hook {FAULT_HANG_ENV}: hanging after step {step}")
            time.sleep(3600)
        if self.watchdog is not None:
            self.watchdog.beat(step)


class DataWorkerError(RuntimeError):
    """A DataLoader worker process died (killed by a signal, out of host memory...); names the shards it read."""


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
        loader: the DataLoader (batches carry ``role`` and ``shard``, :class:`harness.data.ShardStream`).
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
            except RuntimeError as e:
                named = self.explain(e)
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

    def _describe(self, it, pids_text: str, last: Dict[int, tuple], original: str) -> str:
        pids = {int(p) for p in re.findall(r"\d+", pids_text)}
        workers = [i for i, w in enumerate(getattr(it, "_workers", None) or []) if w.pid in pids] or sorted(last)
        parts = []
        for w in workers:
            shard, epoch = last.get(w, (None, None))
            shards = self.shards_of_worker(w, epoch)
            listed = ", ".join(shards[:8]) + (f" ... ({len(shards)} shards)" if len(shards) > 8 else "")
            parts.append(f"worker {w}: reading shard {shard or (shards[0] if shards else '?')} "
                         f"(its shards in epoch {epoch or 0}: {listed})")
        return (f"data.train_data: rank {self.rank}: a DataLoader worker died ({original.strip()}); "
                + "; ".join(parts))
