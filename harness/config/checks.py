"""Field checks shared by the config sections: each failure is a :class:`ConfigError` naming ``section.field``, what
it must be and the value given."""
from __future__ import annotations

from typing import Literal, get_args

from harness.core.errors import ConfigError


def check_fields(section: object, ok_when: dict) -> None:
    """Raise :class:`ConfigError` for the first ``"field": (condition, requirement)`` whose condition is False."""
    prefix = getattr(section, "SECTION", "")
    for name, (ok, requirement) in ok_when.items():
        if not ok:
            raise ConfigError(f"{prefix}{name}: {requirement}, got {getattr(section, name)!r}")


def check_choice(section: object, name: str) -> None:
    """Raise :class:`ConfigError` when ``section.name`` is not one of its ``Literal`` type's choices."""
    import typing

    tp = typing.get_type_hints(type(section))[name]
    choices = get_args(tp)
    if typing.get_origin(tp) is Literal and getattr(section, name) not in choices:
        raise ConfigError(f"{getattr(section, 'SECTION', '')}{name}: {getattr(section, name)!r} is not one of "
                          f"{', '.join(map(str, choices))}")
