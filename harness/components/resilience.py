"""Preemption, hangs and dead data workers, per rank: what a long job on a shared cluster meets.

* **Preemption** (:class:`RunSupervisor`): SIGTERM (what Slurm sends on preemption, ``scancel`` and the time limit,
  ``KillWait`` seconds, 30 by default, before SIGKILL) or SIGUSR1 sets a flag on the rank that receives it. The
  flag is folded into the all-reduce the trainer already does at each log step (as the stop-file vote), so every
  rank stops at the same step without any per-step host synchronisation: within ``train.log_every_steps`` steps
  (10 by default) of the signal, every rank saves a checkpoint and the process exits with
  :attr:`harness.core.errors.ExitCode.PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"), which ``slurm/train.sbatch``
  requeues on. A second signal (more than :data:`DUPLICATE_WINDOW_S` after the first: Slurm signals every
  process of a job step and the launcher forwards the same signal to its ranks, so copies arrive together) or
  ``train.preempt_grace_s`` running out exits at once with the same status; checkpoints are committed by one
  atomic rename (:mod:`harness.components.checkpoint`), so an exit at any point leaves the newest complete one
  untouched.
* **Hangs** (:class:`Watchdog`): a daemon thread per rank; no step completed within ``train.hang_timeout_s`` ->
  the stacks of every thread go to ``<run_dir>/hang_rank_XXXXX.txt`` (``faulthandler``, which works while the
  main thread is blocked inside a C call such as a collective) and to stderr, and the process exits with
  :attr:`harness.core.errors.ExitCode.HANG`. The idea is PyTorch's NCCL flight recorder / torchelastic watchdog, made
  backend-independent.
* **Dead DataLoader workers**: :mod:`harness.data.workers` names the rank, the worker and the shards it was reading.

Test hook: ``HARNESS_TEST_HANG_AFTER_STEP`` (:mod:`harness.core.hooks`).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from harness.core import hooks
from harness.core.errors import ExitCode
from harness.data.workers import STOP_SIGNALS, close_active_loaders

log = logging.getLogger("harness")

DUPLICATE_WINDOW_S = 2.0
"""Seconds after a stop signal during which another one is the same request (Slurm signals every process of the
step, and ``torchrun``/``accelerate launch`` forward the signal they received to their ranks)."""


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
    stderr, then ``os._exit(ExitCode.HANG)``; the launcher stops the other ranks (or their own watchdogs fire).

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
        os._exit(ExitCode.HANG)


class RunSupervisor:
    """One rank's stop signals and hang watchdog for the duration of a run (a context manager).

    Args:
        train_cfg: :class:`harness.config.job_config.TrainConfig` (``hang_timeout_s``, ``preempt_grace_s``; 0 turns
            either off).
        run_dir: the run folder (stack dumps go there).
        rank: this process's rank.
        enabled: False gives an inert guard (a trainer built outside :func:`harness.train.job.run`).

    Attributes:
        signalled: this process received a stop signal (its vote at the next log step).
        stopping: every rank agreed to stop on a signal (:meth:`agree`); the run then exits with ``ExitCode.PREEMPTED``.
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
        self._hang_after = hooks.hang_after_step(rank)

    def __enter__(self) -> "RunSupervisor":
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
        # before interpreter exit, where multiprocessing would SIGTERM (ignored) workers and wait
        close_active_loaders()
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
                 f"{ExitCode.PREEMPTED}" + (f" (at most {self.grace_s:g} s from now)" if self.grace_s else ""))
            if self.grace_s > 0:
                self._grace = threading.Timer(self.grace_s, self._exit_now, (f"train.preempt_grace_s={self.grace_s:g}"
                                                                           " ran out",))
                self._grace.daemon = True
                self._grace.start()
        elif now - self._first > DUPLICATE_WINDOW_S:
            self._exit_now(f"a second {name}")

    def _exit_now(self, why: str) -> None:
        _say(f"rank {self.rank}: {why}: exiting now with status {ExitCode.PREEMPTED}; the newest complete checkpoint "
             "is untouched")
        os._exit(ExitCode.PREEMPTED)

    def agree(self, votes: float) -> bool:
        """``votes``: the number of ranks that received a stop signal (summed in the log-step all-reduce).
        Returns whether to stop now (the same answer on every rank)."""
        if votes > 0 and not self.stopping:
            self.stopping = True
            self.signal_name = self.signal_name or "a stop signal on another rank"
        return self.stopping

    def step_done(self, step: int) -> None:
        """A step (or periodic evaluation / checkpoint) completed: the watchdog's heartbeat."""
        if self._hang_after == step:
            _say(f"rank {self.rank}: test hook {hooks.HANG_AFTER_STEP}: hanging after step {step}")
            time.sleep(3600)
        if self.watchdog is not None:
            self.watchdog.beat(step)
