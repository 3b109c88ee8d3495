"""``harness classify``: how good a CLIP image tower is for classification on an ImageFolder dataset.

* **Linear probe** (CLIP, Radford et al. 2021, section 3.2; ``LAION-AI/CLIP_benchmark``'s ``linear_probe``): the
  frozen image tower's L2-normalised features of every image (eval transform), scikit-learn's
  ``LogisticRegression`` (L-BFGS, multinomial) with its inverse regularisation ``C`` chosen on a stratified
  held-out part of the training split (a log-spaced grid), refitted on the whole training split, top-1/top-5
  on the validation split.
* **Finetune** (:mod:`harness.eval.finetune`): a linear head on the image tower, trained end to end.

The model is a harness run or checkpoint folder, a folder from ``harness export``, or ``--model NAME``
(``--pretrained FILE``, or random weights: the baseline). The data is one ImageFolder split by
``--val-fraction`` (stratified) or ``--train-dir`` + ``--val-dir``. Bad input is ``error: <flag>: ...`` with exit
status 2 before anything is computed or written; the summary is printed as JSON and, with ``--out``, written to
a new file (an existing one is never overwritten).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from harness.core.errors import ConfigError, ExitCode, refuse
from harness.eval.finetune import FinetuneOptions, LabelledImages, finetune, topk_hits

Samples = List[Tuple[str, int]]  # (image path, class index)
C_GRID = np.logspace(-3, 4, 15)  # LogisticRegression C, every half decade
MODES = ("both", "linear-probe", "finetune")


def load_model(source: Optional[str], model_name: Optional[str], pretrained: Optional[str]
               ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The CLIP model to evaluate, in fp32 on the CPU, and a description of where it came from.

    Raises:
        ConfigError: naming ``SOURCE``, ``--model`` or ``--pretrained``.
    """
    import models
    from models.pretrained import PretrainedError, load_pretrained

    if source and (model_name or pretrained):
        raise ConfigError("--model: give either SOURCE or --model [--pretrained], not both")
    if source:
        if (Path(source) / "open_clip_config.json").is_file():
            try:
                model = models.load_exported(source)
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise ConfigError(f"SOURCE: {source!r} is not a loadable exported folder: {e}") from None
            name = json.loads((Path(source) / "open_clip_config.json").read_text()).get("harness", {}).get("model")
            return model, {"source": source, "kind": "exported", "model": name}
        from harness.components.checkpoint import read_checkpoint

        ckpt, meta, state = read_checkpoint(source, arg="SOURCE")
        name = meta["config"]["model"]["name"]
        model = models.create_model(name)
        model.load_state_dict(state)
        return model, {"source": source, "kind": "checkpoint", "checkpoint": str(ckpt), "step": meta.get("step"),
                       "model": name}
    if not model_name:
        raise ConfigError("SOURCE: give a run, checkpoint or exported folder, or --model NAME [--pretrained FILE]")
    try:
        model = models.create_model(model_name)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    info: Dict[str, Any] = {"source": None, "kind": "pretrained" if pretrained else "random init", "model": model_name}
    if pretrained:
        try:
            info["pretrained"] = load_pretrained(model, pretrained).as_dict()
        except PretrainedError as e:
            raise ConfigError(f"--pretrained: {e}") from None
    return model, info


def _folder(root: str, flag: str) -> Tuple[List[str], Samples]:
    """``(class names, samples)`` of the ImageFolder ``root`` (torchvision's reader).

    Raises:
        ConfigError: (naming ``flag``) not a folder, no images, or fewer than 2 classes.
    """
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise ConfigError(f"{flag}: {root!r} is not a directory (ImageFolder: one sub-folder of images per class)")
    try:
        folder = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"{flag}: {root!r} is not an ImageFolder dataset: {e}") from None
    if len(folder.classes) < 2:
        raise ConfigError(f"{flag}: {root!r} has {len(folder.classes)} class ({', '.join(folder.classes)}); "
                          "classification needs at least 2 class sub-folders")
    return folder.classes, list(folder.samples)


def stratified_split(samples: Samples, fraction: float, seed: int, flag: str) -> Tuple[Samples, Samples]:
    """``(kept, held out)``: ``fraction`` of each class held out (scikit-learn's ``train_test_split``).

    Raises:
        ConfigError: (naming ``flag``) ``fraction`` outside (0, 1), or a class too small to split.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ConfigError(f"{flag}: must be in (0, 1), got {fraction}")
    labels = [y for _, y in samples]
    try:
        kept, held = train_test_split(np.arange(len(samples)), test_size=fraction, stratify=labels,
                                      random_state=seed)
    except ValueError as e:
        raise ConfigError(f"{flag}: cannot split {len(samples)} images by class: {e}") from None
    return [samples[i] for i in sorted(kept)], [samples[i] for i in sorted(held)]


def load_splits(args: argparse.Namespace) -> Tuple[List[str], Samples, Samples]:
    """``(class names, train samples, val samples)`` from ``--data`` + ``--val-fraction`` or ``--train-dir`` +
    ``--val-dir``.

    Raises:
        ConfigError: naming the flag (see :func:`_folder`, :func:`stratified_split`), or the two folders'
            classes differ.
    """
    if args.data and (args.train_dir or args.val_dir):
        raise ConfigError("--data: give --data (split by --val-fraction) or --train-dir and --val-dir, not both")
    if args.data:
        classes, samples = _folder(args.data, "--data")
        train, val = stratified_split(samples, args.val_fraction, args.seed, "--val-fraction")
        return classes, train, val
    if not (args.train_dir and args.val_dir):
        raise ConfigError("--data: give an ImageFolder (--data DIR) or both --train-dir and --val-dir")
    classes, train = _folder(args.train_dir, "--train-dir")
    val_classes, val = _folder(args.val_dir, "--val-dir")
    if val_classes != classes:
        raise ConfigError(f"--val-dir: its classes {val_classes} differ from --train-dir's {classes}")
    return classes, train, val


@torch.no_grad()
def image_features(visual: nn.Module, samples: Samples, transform: Callable, batch_size: int,
                   device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """``(features [N, embed_dim] float32, L2-normalised; labels [N])`` of the image tower in eval mode."""
    loader = torch.utils.data.DataLoader(LabelledImages(samples, transform), batch_size=batch_size)
    visual.eval()
    feats, labels = [], []
    for images, target in loader:
        f = visual(images.to(device)).float()  # [B, embed_dim]
        feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        labels.append(target)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def linear_probe(train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray], seed: int,
                 grid: Sequence[float] = tuple(C_GRID)) -> Dict[str, Any]:
    """Logistic regression on frozen features: ``C`` chosen on a stratified 25% of ``train`` held out (the
    smallest ``C`` of the best held-out top-1), refitted on all of ``train``, scored on ``val``.

    Args:
        train, val: ``(features [N, D], labels [N])``.
        seed: held-out split seed.
        grid: candidate ``C`` values.

    Returns:
        ``{"top1", "top5" (fractions; top-k over min(5, classes)), "C", "heldout_top1" per C}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = train
    fit_idx, held_idx = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    scores = {}
    for c in grid:
        clf = LogisticRegression(C=float(c), max_iter=2000).fit(x[fit_idx], y[fit_idx])
        scores[float(c)] = float((clf.predict(x[held_idx]) == y[held_idx]).mean())
    best = max(scores.values())
    c_best = min(c for c, s in scores.items() if s == best)
    clf = LogisticRegression(C=c_best, max_iter=2000).fit(x, y)
    proba = torch.from_numpy(clf.predict_proba(val[0]))  # [N, classes seen in training]
    target = torch.from_numpy(np.searchsorted(clf.classes_, val[1]))
    hits = topk_hits(proba, target)
    return {"top1": hits[0] / len(target), "top5": hits[1] / len(target), "C": c_best,
            "heldout_top1": {f"{c:.3g}": s for c, s in scores.items()}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness classify", description="Linear probe and finetune of a CLIP image "
                                "tower on an ImageFolder dataset; prints a JSON summary (--out writes it too).")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="run folder, checkpoint folder or exported folder")
    p.add_argument("--model", help="registered model name instead of SOURCE")
    p.add_argument("--pretrained", help="with --model: open_clip checkpoint file to start from (else random init)")
    p.add_argument("--data", help="ImageFolder directory, split by --val-fraction")
    p.add_argument("--val-fraction", type=float, default=0.5, help="held-out fraction per class of --data")
    p.add_argument("--train-dir", help="training ImageFolder (with --val-dir)")
    p.add_argument("--val-dir", help="validation ImageFolder (with --train-dir)")
    p.add_argument("--mode", default="both", help=" | ".join(MODES))
    p.add_argument("--batch-size", type=int, default=FinetuneOptions.batch_size,
                   help="images per forward (features, finetune, eval)")
    p.add_argument("--epochs", type=float, default=FinetuneOptions.epochs, help="finetune epochs")
    p.add_argument("--lr", type=float, default=FinetuneOptions.lr, help="finetune peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=FinetuneOptions.weight_decay, help="finetune weight decay")
    p.add_argument("--seed", type=int, default=0, help="split, head init and data order")
    p.add_argument("--out", help="write the JSON summary to this new file")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag checks that need no file.

    Raises:
        ConfigError: naming the flag.
    """
    if args.mode not in MODES:
        raise ConfigError(f"--mode: {args.mode!r} is not one of {', '.join(MODES)}")
    for flag, ok in (("--batch-size", args.batch_size >= 1), ("--epochs", args.epochs > 0), ("--lr", args.lr > 0)):
        if not ok:
            raise ConfigError(f"{flag}: must be positive")
    if args.out and Path(args.out).exists():
        raise ConfigError(f"--out: {args.out!r} already exists; nothing was overwritten")


def classify(args: argparse.Namespace) -> Dict[str, Any]:
    """Run what ``args`` asks for and return the summary (fractions in [0, 1]; seconds).

    Raises:
        ConfigError: bad flags, model source or data (before any computation).
    """
    import open_clip

    check_args(args)
    classes, train, val = load_splits(args)
    model, info = load_model(args.source, args.model, args.pretrained)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    visual = model.visual.to(device)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    eval_tf = open_clip.image_transform(size, is_train=False)
    summary: Dict[str, Any] = {**info, "classes": len(classes), "train_images": len(train), "val_images": len(val),
                               "chance_top1": 1.0 / len(classes)}
    if args.mode in ("both", "linear-probe"):
        t0 = time.perf_counter()
        feats = [image_features(visual, s, eval_tf, args.batch_size, device) for s in (train, val)]
        summary["linear_probe"] = {**linear_probe(feats[0], feats[1], args.seed), "time_s": time.perf_counter() - t0}
    if args.mode in ("both", "finetune"):
        opts = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, seed=args.seed)
        train_tf = open_clip.image_transform(size, is_train=True)
        t0 = time.perf_counter()
        result = finetune(visual, len(classes), (train, train_tf), (val, eval_tf), opts, device)
        summary["finetune"] = {**result, **asdict(opts), "time_s": time.perf_counter() - t0}
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """``harness classify`` entry point; returns the exit status."""
    import shlex

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        summary = {"command": "harness classify " + shlex.join(argv), **classify(args)}
    except ConfigError as e:
        return refuse(e)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("x") as f:  # exclusive create: never overwrite
            f.write(text + "\n")
    return ExitCode.OK
