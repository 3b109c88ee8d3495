"""Build a :class:`harness.config.job_config.JobConfig` from a YAML preset, named flags and ``section.field=value``
overrides, every value parsed by its field's declared type.

Text is never guessed at (YAML 1.1 would read ``12:30`` as 750, ``007`` as 7, ``yes`` as True and ``5e-4``
as a string): presets are read with YAML's base loader (every scalar a string) and each string is parsed by
the type the field declares:

* ``int``: a decimal integer (``64``, ``-1``, ``1_000``), or scientific notation that is a whole number
  (``1e6``); ``0x10`` or ``2.5`` are refused;
* ``float``: anything Python's ``float`` reads (``5e-4``, ``1e3``, ``inf``);
* ``bool``: ``true``/``false``, ``1``/``0``, ``yes``/``no`` (any case), and only for boolean fields;
* ``str`` (and ``Literal`` choices): the text verbatim;
* ``Optional[...]``: ``null``, ``none``, ``~`` or the empty text mean None (so no run can be named "none");
* ``List[...]``: comma-separated items, each parsed by the item type.

A value of the wrong type is ``error: section.field: expected <type>, got '<text>'``; a key that does not
exist names the keys that do. The idea of typed CLI overrides from the dataclass is tyro's (torchtitan's
choice); tyro is not used because it would replace the ``section.field=value`` syntax and error style.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal

import yaml

from harness.config.job_config import JobConfig
from harness.core.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
NULL_WORDS = ("null", "none", "~", "")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")
_INT = re.compile(r"[+-]?\d[\d_]*")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _parse_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if _INT.fullmatch(text):
        return int(text)
    number = float(text)  # scientific notation of a whole number: 1e6
    if "e" in text.lower() and math.isfinite(number) and number == int(number):
        return int(number)
    raise ValueError(value)


def _parse_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return float(value.strip())
    raise ValueError(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(value)
    return word in TRUE_WORDS


def _parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(value)


def _parse_literal(value: Any) -> str:
    if isinstance(value, str):
        return value  # membership is the section's own check (naming the choices)
    raise ValueError(value)


SCALAR_PARSERS = {int: _parse_int, float: _parse_float, bool: _parse_bool, str: _parse_str}
"""Declared field type -> parser of text (or a native value); a parser raises ``ValueError`` on a value it refuses."""


def parse_value(path: str, value: Any, tp: Any) -> Any:
    """``value`` (text from a preset, flag or override, or a native value from a dict) as type ``tp``: ``Optional``
    and ``List`` unwrap to their item type, ``Literal`` keeps the text, scalars use :data:`SCALAR_PARSERS`, any other
    type takes the value as it is.

    Raises:
        ConfigError: ``path: expected <type>, got <value>``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            return None
        return parse_value(path, value, next(a for a in args if a is not type(None)))
    wrong = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (str, list, tuple)):
            raise wrong
        items = value.split(",") if isinstance(value, str) else value
        return [parse_value(path, v.strip() if isinstance(v, str) else v, args[0]) for v in items if v != ""]
    parser = _parse_literal if origin is Literal else SCALAR_PARSERS.get(tp, lambda v: v)
    try:
        return parser(value)
    except ValueError:
        raise wrong from None


def _build(cls, data: Any, prefix: str = ""):
    """Instantiate dataclass ``cls`` from ``data`` (parsed by field type), running its own validation."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{path}: no such config key; valid keys here: {', '.join(names)}")
        tp = types[key]
        is_section = isinstance(tp, type) and dataclasses.is_dataclass(tp)
        kwargs[key] = _build(tp, value if value is not None else {}, path + ".") if is_section \
            else parse_value(path, value, tp)
    return cls(**kwargs)


def from_dict(data: Dict[str, Any]) -> JobConfig:
    """Build a :class:`JobConfig` from defaults updated by ``data`` (nested; text or native values).

    Raises:
        ConfigError: unknown key, wrongly typed value, or a value its section refuses (named ``section.field``).
    """
    return _build(JobConfig, data or {})


def load_preset(name_or_path: str) -> Dict[str, Any]:
    """Read a YAML preset (every scalar kept as text for :func:`parse_value`): a path, or the name of a file
    in ``harness/config/presets`` (``.yaml`` optional).

    Raises:
        ConfigError: the preset does not exist or is not a mapping.
    """
    path = Path(name_or_path)
    if not path.exists():
        candidate = PRESET_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
        if not candidate.exists():
            presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"config: preset {name_or_path!r} not found (a YAML path, or one of: "
                              f"{', '.join(presets)})")
        path = candidate
    data = yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: preset {path} must be a YAML mapping")
    return data


def parse_override(text: str) -> Dict[str, Any]:
    """``"train.micro_batch_size=64"`` -> ``{"train": {"micro_batch_size": "64"}}`` (the value stays text, parsed
    later by the field's type).

    Raises:
        ConfigError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    return nested(key.strip(), raw)


def nested(dotted_key: str, value: Any) -> Dict[str, Any]:
    """``("train.seed", 3)`` -> ``{"train": {"seed": 3}}``."""
    out: Dict[str, Any] = {}
    node = out
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge (``update`` wins); returns a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def get_dotted(d: Dict[str, Any], dotted: str) -> Any:
    """``d["train"]["seed"]`` for ``"train.seed"``."""
    for part in dotted.split("."):
        d = d[part]
    return d


def describe(cls=JobConfig, prefix: str = "") -> List[str]:
    """``section.field = default: docstring`` lines for every field (``--help-config``, ``harness config``)."""
    import ast
    import inspect
    import textwrap

    docs: Dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    lines = []
    types = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} = {getattr(inst, f.name)!r}: {docs.get(f.name, '')}")
    return lines
