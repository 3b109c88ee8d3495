"""``harness export RUN_OR_CHECKPOINT OUT [--dtype fp32|bf16]``: a training run's weights as an open_clip
``local-dir:`` folder (:mod:`models.exported`).

``RUN_OR_CHECKPOINT`` is a run folder (its newest complete checkpoint is used) or one checkpoint folder of any
engine: plain PyTorch / DDP, DeepSpeed ZeRO 0-3, FSDP2 (:func:`harness.components.checkpoint.load_model_state` gathers
the full state dict on the CPU). Bad input is ``error: RUN_OR_CHECKPOINT: ...`` or ``error: --out: ...`` with exit
status 2, before anything is written; an ``OUT`` that already holds files is never written into.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import models
from harness.components.checkpoint import read_checkpoint
from harness.core.errors import ConfigError, ExitCode, refuse

SOURCE_ARG = "RUN_OR_CHECKPOINT"  # how bad input names the source argument


def check_out(out: str) -> Path:
    """The export destination, which must be absent or an empty folder.

    Raises:
        ConfigError: ``--out: ...`` when ``out`` is a file or a folder holding files (nothing is overwritten).
    """
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out: {out!r} already exists and is not an empty folder; nothing was written "
                          "(choose a new folder)")
    return path


def export(source: str, out: str, dtype: str = "fp32") -> Dict[str, Any]:
    """Export the model of ``source`` (run or checkpoint folder) to ``out``; returns what was written.

    Raises:
        ConfigError: bad ``source``, ``out`` or ``dtype`` (before anything is written).
    """
    from models.exported import EXPORT_DTYPES, write_exported

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out_path = check_out(out)
    ckpt, meta, state = read_checkpoint(source, SOURCE_ARG)
    name = meta["config"]["model"]["name"]
    provenance = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "engine": meta.get("engine"),
                  "samples_seen": meta.get("samples_seen")}
    files = write_exported(state, name, out_path, dtype, provenance)
    return {"model": name, "checkpoint": str(ckpt), "step": meta.get("step"), "dtype": dtype,
            "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values())),
            **{k: str(v) for k, v in files.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    """``harness export`` entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="harness export", description="Write a run's (or checkpoint's) model as an "
                                "open_clip local-dir folder: open_clip_model.safetensors + open_clip_config.json. "
                                "ViT models load with open_clip.create_model_and_transforms('local-dir:OUT'); "
                                "DTP-ViT and token-reduced models (ToMe, TokenLearner, DynamicViT), which open_clip "
                                "cannot build, with models.load_exported(OUT).")
    p.add_argument("source", metavar=SOURCE_ARG, help="run folder (newest complete checkpoint) or checkpoint folder")
    p.add_argument("out", metavar="OUT", nargs="?", help="new (or empty) output folder")
    p.add_argument("--out", dest="out_flag", metavar="OUT", help="the output folder, as a flag")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (floating tensors)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out_flag or args.out
    try:
        if not out or (args.out and args.out_flag and args.out != args.out_flag):
            raise ConfigError("--out: give the output folder once (OUT or --out)")
        info = export(args.source, out, args.dtype)
    except ConfigError as e:
        return refuse(e)
    print(json.dumps(info, indent=2))
    if models.get_spec(info["model"]).family != "vit":
        print(f"note: open_clip cannot build {info['model']} (its image tower is ours); load it with "
              f"models.load_exported({out!r})", file=sys.stderr)
    return ExitCode.OK
