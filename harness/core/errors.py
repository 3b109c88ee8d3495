"""Errors the harness raises on bad input or a failed run, and every exit status it uses (:class:`ExitCode`)."""
from __future__ import annotations

import enum
import sys


class ConfigError(ValueError):
    """A config value or command-line argument is invalid; the message names the field (``section.field`` or the
    flag) and the allowed values."""


class NonFiniteError(RuntimeError):
    """Training cannot go on: too many optimizer steps in a row had a non-finite loss or gradient norm, or the
    parameters are not finite (no checkpoint is written then)."""


class ExitCode(enum.IntEnum):
    """Exit statuses of ``train.py`` and the ``harness`` commands (one table for all of them).

    A launcher (torchrun, ``accelerate launch``) reports its own status (1) when a rank fails or it was signalled;
    each rank's ``<run_dir>/status/rank_XXXXX.json`` keeps the reason (``ok``, ``preempted``, ``oom``, ``error``).
    """

    OK = 0
    ERROR = 1
    """An uncaught error (a traceback), or a launcher whose rank failed."""
    CONFIG = 2
    """Bad input: a config field, flag or path, refused before any process group exists or anything is written."""
    OOM = 3
    """The training process ran out of (GPU, or budgeted CPU) memory; its rank status says ``oom``."""
    NONFINITE = 4
    """Stopped by the non-finite guard: ``train.max_nonfinite_steps`` skipped steps in a row, or non-finite parameters
    at a checkpoint save (:mod:`harness.engines.nonfinite`)."""
    KILLED_IN_SAVE = 17
    """Test hook only: the process killed itself inside a checkpoint save (``HARNESS_TEST_KILL_IN_SAVE``,
    :mod:`harness.core.hooks`)."""
    PREEMPTED = 75
    """Stopped by SIGTERM/SIGUSR1 (preemption, time limit): checkpointed at the agreed step (or, after a second signal
    or ``train.preempt_grace_s``, the newest complete checkpoint left as it was); resume with ``--resume latest``.
    75 is ``EX_TEMPFAIL`` of sysexits.h ("try again later"); ``slurm/train.sbatch`` requeues on it."""
    HANG = 124
    """No training step completed within ``train.hang_timeout_s``: every thread's stack was dumped to
    ``<run_dir>/hang_rank_XXXXX.txt`` (124 as coreutils' ``timeout``)."""


def refuse(message: object) -> ExitCode:
    """Print ``error: <message>`` to stderr and return :attr:`ExitCode.CONFIG`: how every command ends on bad input."""
    print(f"error: {message}", file=sys.stderr)
    return ExitCode.CONFIG
