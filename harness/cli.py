"""Command line: ``harness {train,data,models,config,flops,profile,fit-probe,export,classify}`` and ``train.py``.

``train.py`` (and ``harness train``) build the job config as: defaults <- preset YAML (``--config``,
default ``digits``) <- named flags (``--model``, ``--micro-batch-size`` ...) <- generic overrides
(``section.field=value`` positional or ``--set``). Config errors are printed as ``error: <field>: ...``
with exit status 2, before any process group exists.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, List, Optional

from harness.config_manager import describe, from_dict, load_preset, merge, nested, parse_override
from harness.errors import NONFINITE_EXIT, ConfigError, NonFiniteError

DEFAULT_PRESET = "digits"
OOM_EXIT = 3  # exit status of a training process that ran out of memory (status/rank_*.json says "oom")
DIGITS_DIR = "data/digits"

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
            :mod:`harness.config_manager`), missing preset.
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


def ensure_digits(out_dir: str = DIGITS_DIR) -> bool:
    """Write the digits shards to ``out_dir`` unless present; safe when several ranks race (each writes a
    private folder, one atomic rename wins). Returns True if this call wrote them."""
    from harness.digits import write_digits

    target = Path(out_dir)
    if (target / "train").is_dir() and (target / "val").is_dir():
        return False
    tmp = Path(f"{out_dir}.tmp-{os.getpid()}")
    write_digits(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def train_main(argv: Optional[List[str]] = None, prog: str = "train.py", runner: Optional[Callable] = None) -> int:
    """Entry of ``train.py`` / ``harness train`` (and ``harness lr-find``, whose ``runner`` replaces
    ``harness.train.run`` on the built config). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, args = build_config(argv, prog)
        if args.help_config:
            print("\n".join(describe()))
            return 0
        if args.print_config:
            import yaml

            from harness.config import to_dict
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        # the embedded default dataset is made on first use
        if cfg.data.train_data.rstrip("/") == f"{DIGITS_DIR}/train" or cfg.eval.zeroshot_data == f"{DIGITS_DIR}/val":
            ensure_digits(DIGITS_DIR)
        from harness.hardware import is_out_of_memory
        from harness.train import run

        try:
            (runner or run)(cfg)
        except NonFiniteError as e:
            print(f"error: non-finite: {e}", file=sys.stderr)
            return NONFINITE_EXIT
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            print(f"error: out of memory: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return OOM_EXIT
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _flops(args) -> int:
    import models
    from harness.checkpoint import load_model_state
    from harness.flops import load_images, model_gmacs

    for name in args.model:
        try:
            models.get_spec(name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.checkpoint and len(args.model) != 1:
        print("error: --checkpoint: give exactly one --model", file=sys.stderr)
        return 2
    if args.images and not Path(args.images).is_dir():
        print(f"error: --images: {args.images!r} is not a directory", file=sys.stderr)
        return 2
    rows = []
    for name in args.model:
        images = load_images(args.images, name, args.num_images) if args.images else None
        state = load_model_state(Path(args.checkpoint)) if args.checkpoint else None
        rows.append(model_gmacs(name, images, state))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("forward cost per sample, fvcore with attention counted; unit GMACs (1 multiply-add = 1; GFLOPs = 2 x GMACs)")
    print(f"{'model':<24} {'image GMACs':>12} {'measured':>9} {'SF nominal':>10} {'SF measured':>11} "
          f"{'text GMACs':>11}")
    for r in rows:
        meas = r.get("image_gmacs_measured")
        sfn, sfm = r.get("shortening_factor_nominal"), r.get("shortening_factor_measured")
        fmt = lambda v, width, prec: f"{v:>{width}.{prec}f}" if v is not None else f"{'-':>{width}}"
        print(f"{r['model']:<24} {r['image_gmacs']:>12.3f} {fmt(meas, 9, 3)} {fmt(sfn, 10, 2)} {fmt(sfm, 11, 2)} "
              f"{r['text_gmacs']:>11.3f}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``harness`` console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="harness", description="CLIP / ViT scaling harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train a model (same flags as train.py)", add_help=False)
    sub.add_parser("lr-find", help="LR range test on the real trainer: loss against an exponential LR sweep, "
                   "suggestion, plot", add_help=False)
    sub.add_parser("boundaries", help="draw a DTP-ViT checkpoint's learned segments over images", add_help=False)
    sub.add_parser("profile", help="per-model step time / memory / GFLOPs / MFU report", add_help=False)
    sub.add_parser("fit-probe", help="largest micro batch per (model, stage, precision, ...) cell: the memory-fit "
                   "table", add_help=False)
    sub.add_parser("export", help="a run's model as an open_clip local-dir folder (safetensors + config)",
                   add_help=False)
    sub.add_parser("classify", help="linear probe and finetune of the image tower on an ImageFolder dataset",
                   add_help=False)
    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dg = dsub.add_parser("digits", help="write the embedded digits dataset as img2dataset-style shards")
    dg.add_argument("--out", default=DIGITS_DIR)
    dg.add_argument("--num-shards", type=int, default=4)
    dg.add_argument("--val-fraction", type=float, default=0.2)
    dg.add_argument("--seed", type=int, default=0)
    dc = dsub.add_parser("count", help="count samples in shards")
    dc.add_argument("shards")
    m = sub.add_parser("models", help="list registered models")
    m.add_argument("--json", action="store_true")
    sub.add_parser("config", help="list every job config field with its doc")
    f = sub.add_parser("flops", help="forward GMACs of the image and text towers (fvcore, attention counted)")
    f.add_argument("--model", action="append", required=True, help="registered model (repeatable)")
    f.add_argument("--images", help="ImageFolder directory: DTP-ViT cost measured on these real images")
    f.add_argument("--num-images", type=int, default=16, help="images used for the measured cost")
    f.add_argument("--checkpoint", help="checkpoint folder whose weights to use (one --model)")
    f.add_argument("--json", action="store_true")
    if argv[:1] == ["train"]:
        return train_main(argv[1:], prog="harness train")
    if argv[:1] == ["fit-probe"]:
        from harness.fitprobe import main as fit_probe_main
        return fit_probe_main(argv[1:])
    if argv[:1] == ["lr-find"]:
        from harness.lrfind import parse_args as lr_find_args
        try:
            runner, rest = lr_find_args(argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return train_main(rest, prog="harness lr-find", runner=runner)
    if argv[:1] == ["boundaries"]:
        from harness.boundaries import main as boundaries_main
        return boundaries_main(argv[1:])
    if argv[:1] == ["profile"]:
        from harness.profile import main as profile_main
        return profile_main(argv[1:])
    if argv[:1] == ["export"]:
        from harness.export import main as export_main
        return export_main(argv[1:])
    if argv[:1] == ["classify"]:
        from harness.classify import main as classify_main
        return classify_main(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "data" and args.data_cmd == "digits":
        from harness.digits import write_digits
        try:
            info = write_digits(args.out, args.num_shards, args.val_fraction, args.seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {info['train']} training samples in {info['shards']} shards to {args.out}/train and "
              f"{info['val']} held-out images to {args.out}/val")
        return 0
    if args.cmd == "data" and args.data_cmd == "count":
        from harness.shards import count_samples, expand_shards
        try:
            shards = expand_shards(args.shards, "shards")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{count_samples(shards)} samples in {len(shards)} shards")
        return 0
    if args.cmd == "models":
        import models
        rows = [models.get_spec(n) for n in models.list_models()]
        if args.json:
            print(json.dumps([r.__dict__ for r in rows], indent=2))
        else:
            for r in rows:
                print(f"{r.name:<24} {'tiny' if r.tiny else '    '}  {r.description}")
        return 0
    if args.cmd == "config":
        print("\n".join(describe()))
        return 0
    if args.cmd == "flops":
        return _flops(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
