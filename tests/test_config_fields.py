"""Every field of every config section through the real command-line parser (``build_config``): valid text
parses as the field's declared type, invalid text is an ``error: section.field: ...`` naming the field.

The issue's examples (issue 14, item 1) are checked by name: numbers in scientific notation for float fields,
strings that YAML 1.1 would turn into numbers, booleans or dates kept verbatim for str fields."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, List, Literal

import pytest

from harness.cli import build_config
from harness.config.job_config import JobConfig
from harness.core.errors import ConfigError

# Text that YAML 1.1 guesses at (sexagesimal, octal, hex, boolean, date, float): a str field keeps it verbatim.
TRICKY_STRINGS = ("12:30", "007", "0x10", "yes", "off", "2024-01-01", "5e-4")
# str fields whose section checks the content (a registered model name): the text reaches that check unchanged.
CONTENT_CHECKED = {"model.name"}


def _fields(cls=JobConfig, prefix: str = ""):
    """``(dotted name, declared type, default)`` of every leaf field."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, getattr(cls(), f.name)


FIELDS = list(_fields())


def _value(cfg: JobConfig, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _parse(dotted: str, text: str):
    """The field's value after ``train.py <dotted>=<text>`` (the digits preset underneath), or the ConfigError."""
    try:
        return _value(build_config([f"{dotted}={text}"])[0], dotted), None
    except ConfigError as e:
        return None, str(e)


def _base(tp: Any):
    """``(base type, optional)`` of a declared type."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


# base type -> (valid text and the value it must become, invalid text)
CASES = {
    int: ([("7", 7), ("1e3", 1000), ("1_000", 1000), ("+12", 12)], ["2.5", "0x10", "twelve", "1e-3", "true"]),
    float: ([("5e-4", 5e-4), ("1e-8", 1e-8), ("1e3", 1000.0), ("1", 1.0), ("0.5", 0.5), ("inf", float("inf"))],
            ["fast", "1,5", "5e-4x", "true"]),
    bool: ([("true", True), ("False", False), ("yes", True), ("no", False), ("1", True), ("0", False)],
           ["on", "off", "2", "maybe"]),
}


def test_the_walk_covers_every_section_and_type():
    names = {name for name, _, _ in FIELDS}
    assert {n.split(".")[0] for n in names if "." in n} == {"model", "data", "train", "optim", "loss", "checkpoint",
                                                           "eval"}
    assert {"run_name", "output_dir"} <= names and len(names) > 50
    kinds = {_base(tp)[0] if typing.get_origin(_base(tp)[0]) not in (Literal, list) else typing.get_origin(_base(tp)[0])
             for _, tp, _ in FIELDS}
    assert kinds == {int, float, bool, str, Literal, list}


@pytest.mark.parametrize("dotted, tp, default", FIELDS, ids=[f[0] for f in FIELDS])
def test_every_field_parses_valid_text_as_its_type_and_names_itself_on_invalid_text(dotted, tp, default):
    base, optional = _base(tp)
    origin = typing.get_origin(base)
    if optional:
        for text in ("null", "None", "~", ""):
            value, err = _parse(dotted, text)
            assert err is None and value is None, (text, err)
    if origin is Literal:
        for choice in typing.get_args(base):
            value, err = _parse(dotted, choice)
            assert err is None and value == choice, (choice, err)
        value, err = _parse(dotted, "not-a-choice")
        assert err is not None and err.startswith(f"{dotted}: 'not-a-choice' is not one of"), err
        return
    if origin in (list, List):
        value, err = _parse(dotted, "")
        assert err is None and value == []
        value, err = _parse(dotted, "tensorboard")  # the only list field: train.report_to
        assert err is None and value == ["tensorboard"], err
        value, err = _parse(dotted, "tensorboard,tensorboard")
        assert err is not None and err.startswith(f"{dotted}:"), err
        return
    if base is str:
        texts = TRICKY_STRINGS if dotted not in CONTENT_CHECKED else ("ViT-micro-8",)
        for text in texts:
            value, err = _parse(dotted, text)
            assert err is None and value == text and type(value) is str, (text, value, err)
        if dotted in CONTENT_CHECKED:
            value, err = _parse(dotted, "007")
            assert err is not None and err.startswith(f"{dotted}: unknown model '007'"), err
        return
    valid, invalid = CASES[base]
    accepted = 0
    for text, expected in valid:
        value, err = _parse(dotted, text)
        if err is None:
            assert value == expected and type(value) is base, (text, value)
            accepted += 1
        else:  # a value of the right type that the section refuses on range: named, and not a type error
            assert err.startswith(f"{dotted}: ") and "expected" not in err, (text, err)
    assert accepted >= 1, f"{dotted}: no valid text was accepted"
    for text in invalid:
        value, err = _parse(dotted, text)
        assert err == f"{dotted}: expected {base.__name__}, got {text!r}", (text, value, err)


@pytest.mark.parametrize("override, dotted, expected", [
    ("optim.lr=5e-4", "optim.lr", 5e-4),
    ("optim.eps=1e-8", "optim.eps", 1e-8),
    ("train.epochs=1e3", "train.epochs", 1000.0),
    ("run_name=12:30", "run_name", "12:30"),
    ("run_name=007", "run_name", "007"),
    ("run_name=0x10", "run_name", "0x10"),
    ("run_name=yes", "run_name", "yes"),
    ("checkpoint.resume=off", "checkpoint.resume", "off"),
    ("data.train_data=2024-01-01", "data.train_data", "2024-01-01"),
])
def test_the_issues_examples(override, dotted, expected):
    value = _value(build_config([override])[0], dotted)
    assert value == expected and type(value) is type(expected)


def test_flags_and_presets_go_through_the_same_parser(tmp_path):
    cfg, _ = build_config(["--run-name", "007", "--epochs", "1e3", "--seed", "1e1"])
    assert (cfg.run_name, cfg.train.epochs, cfg.train.seed) == ("007", 1000.0, 10)
    preset = tmp_path / "p.yaml"
    preset.write_text("run_name: 12:30\noptim:\n  lr: 5e-4\ncheckpoint:\n  resume: off\n  save_final: no\n")
    cfg, _ = build_config(["--config", str(preset)])
    assert (cfg.run_name, cfg.optim.lr, cfg.checkpoint.resume, cfg.checkpoint.save_final) == ("12:30", 5e-4, "off",
                                                                                              False)
    with pytest.raises(ConfigError, match=r"^--seed|train.seed: expected int, got '2.5'$"):
        build_config(["--seed", "2.5"])
