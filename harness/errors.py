"""Errors shared across the harness (a module of its own so that every module can raise them without
importing the config)."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.field``)."""
