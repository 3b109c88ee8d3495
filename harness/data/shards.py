"""Shard lists: img2dataset output given as folders, brace patterns, globs or files; sample counts; truncation."""
from __future__ import annotations

import glob
import json
import tarfile
from pathlib import Path
from typing import List

from harness.core.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str, field_name: str = "data.train_data") -> List[str]:
    """Expand a shard spec into a sorted list of existing ``.tar`` paths.

    ``spec`` is one or more (joined by ``::``) of: a folder (its ``*.tar`` files, img2dataset
    output), a brace pattern ``dir/{00000..00099}.tar``, a glob, or a file.

    Raises:
        ConfigError: a path is missing or a folder holds no ``.tar``; the message names ``field_name``.
    """
    import braceexpand

    out: List[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            tars = sorted(str(x) for x in p.glob("*.tar"))
            if not tars:
                raise ConfigError(f"{field_name}: folder {part!r} holds no .tar shards")
            out.extend(tars)
            continue
        for item in braceexpand.braceexpand(part):
            if any(ch in item for ch in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise ConfigError(f"{field_name}: pattern {item!r} matches no file")
                out.extend(matches)
            elif Path(item).is_file():
                out.append(item)
            else:
                raise ConfigError(f"{field_name}: shard not found: {item!r} (from {spec!r})")
    if not out:
        raise ConfigError(f"{field_name}: no shards in {spec!r}")
    return out


def count_samples(shards: List[str]) -> int:
    """Number of samples (keys with an image) in ``shards``.

    Uses img2dataset's ``<shard>_stats.json`` (``successes``) when present, else lists the tar's
    members without decoding (a truncated tar counts what is readable).
    """
    total = 0
    for shard in shards:
        stats = Path(shard[: -len(".tar")] + "_stats.json")
        if stats.is_file():
            try:
                total += int(json.loads(stats.read_text())["successes"])
                continue
            except (ValueError, KeyError):
                pass
        keys = set()
        try:
            with tarfile.open(shard) as tf:
                for member in tf:
                    base, _, ext = member.name.rpartition(".")
                    if ext.lower() in IMAGE_EXTS:
                        keys.add(base)
        except (tarfile.TarError, OSError):
            pass
        total += len(keys)
    return total


def tar_is_complete(path: str) -> bool:
    """False when a local tar file lacks the end-of-archive marker (two zero 512-byte blocks after the
    last member, within a file whose size is a multiple of 512), i.e. it was cut short (e.g. a
    download or copy killed mid-file). Non-local URLs are assumed complete."""
    p = Path(path)
    if not p.is_file():
        return True
    size = p.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(p, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)
