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
