"""Errors and units shared across the harness (a module of its own so that every module can use them without
importing the config)."""

GIB = 2.0 ** 30  # bytes per GiB


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.field``)."""
