"""Errors and units shared across the harness (a module of its own so that every module can use them without
importing the config)."""

GIB = 2.0 ** 30  # bytes per GiB


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.field``)."""


NONFINITE_EXIT = 4
"""Exit status of a training process stopped by the non-finite guard (``train.max_nonfinite_steps`` skipped steps in
a row, or non-finite parameters at a checkpoint save: :mod:`harness.guard`)."""


class NonFiniteError(RuntimeError):
    """Training cannot go on: too many optimizer steps in a row had a non-finite loss or gradient norm, or the
    parameters are not finite (no checkpoint is written then)."""


# Exit statuses of a training process (``train.py``; 2 is a config error, 3 an out-of-memory error,
# ``harness.cli.OOM_EXIT``). A launcher (torchrun, accelerate launch) reports its own status (1) when a rank
# fails or it was signalled; each rank's ``<run_dir>/status/rank_XXXXX.json`` keeps the reason.
PREEMPTED_EXIT = 75
"""Stopped by SIGTERM/SIGUSR1 (preemption, time limit): checkpointed at the agreed step (or, after a second signal
or ``train.preempt_grace_s``, the newest complete checkpoint left as it was); resume with ``--resume latest``.
75 is ``EX_TEMPFAIL`` of sysexits.h ("try again later"); ``slurm/train.sbatch`` requeues on it."""
HANG_EXIT = 124
"""No training step completed within ``train.hang_timeout_s``: every thread's stack was dumped to
``<run_dir>/hang_rank_XXXXX.txt`` (124 as coreutils' ``timeout``)."""
