"""Checkpoint verification: every file's size and CRC-32 recorded in ``meta.json`` at save time, checked before a
resume, with the work split over ranks and the verdict shared by all of them.

A complete checkpoint's ``meta.json`` (written last, atomically, by rank 0) has ``"files": {relative path: {"size":
bytes, "crc32": hex}}`` for every other file in the folder, whatever the engine wrote: ``model.pt``/``optimizer.pt``
(plain, DDP), DeepSpeed's ``deepspeed/`` tag folder (``mp_rank_00_model_states.pt``, one
``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank, ZeRO-3's per-rank model states, ``zero_to_fp32.py``), FSDP2's
DCP folder (``fsdp/.metadata``, ``fsdp/__R_0.distcp``), ``scheduler.pt``/``scaler.pt`` and each ``rank_R.pt``.
A truncated, emptied, missing or altered file fails the check, named by its path; so does a ``meta.json`` that cannot
be read.

Checksum: ``zlib.crc32`` (an integrity check against torn writes and bad disks, not against tampering: the fastest
stdlib choice measured here, ``benchmarks/checkpoint_verify.py``). Each rank hashes every ``world``-th file, at save
(before ``meta.json`` exists) and at resume; the lists are merged with ``all_gather_object``, so the cost per rank is
the checkpoint's size / world size.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

CHUNK = 16 * 2 ** 20  # bytes read at a time
META = "meta.json"


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits, read in 16 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checkpoint_files(folder: Path) -> List[str]:
    """Every file under ``folder`` except ``meta.json`` (and its temporary), as sorted POSIX relative paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (META, META + ".tmp"))


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "fake":
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _merge(local: Any) -> List[Any]:
    """Every rank's ``local`` (all ranks call it), in rank order; ``[local]`` without a process group."""
    rank, world = _world()
    if world == 1:
        return [local]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, local)
    return out


def manifest(folder: Path) -> Dict[str, Dict[str, Any]]:
    """``{relative path: {"size", "crc32"}}`` of every file in ``folder`` (collective: each rank hashes every
    world-th file; every rank returns the whole manifest)."""
    rank, world = _world()
    files = checkpoint_files(folder)
    mine = {f: {"size": (Path(folder) / f).stat().st_size, "crc32": file_crc32(Path(folder) / f)}
            for f in files[rank::world]}
    merged: Dict[str, Dict[str, Any]] = {}
    for part in _merge(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def read_meta_or_none(ckpt: Path) -> Optional[Dict[str, Any]]:
    """``meta.json`` of ``ckpt``, or None when it is missing or does not parse."""
    try:
        meta = json.loads((Path(ckpt) / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_file(folder: Path, name: str, want: Dict[str, Any]) -> Optional[str]:
    path = Path(folder) / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"{path}: {size} bytes, {want['size']} expected (truncated or altered)"
    if file_crc32(path) != want["crc32"]:
        return f"{path}: CRC-32 {file_crc32(path)}, {want['crc32']} expected (altered)"
    return None


def verify(ckpt: Path) -> List[str]:
    """Problems of checkpoint ``ckpt``, each naming a file (empty when it verifies). Collective: each rank checks
    every world-th recorded file and every rank returns the same list. A checkpoint written before checksums were
    recorded (no ``"files"`` in its meta) verifies by the presence of its ``meta.json`` alone.
    """
    meta = read_meta_or_none(ckpt)
    if meta is None:
        return [f"{Path(ckpt) / META}: missing or unreadable"]
    recorded = meta.get("files")
    if recorded is None:
        return []
    rank, world = _world()
    names = sorted(recorded)
    mine = [p for p in (_check_file(ckpt, n, recorded[n]) for n in names[rank::world]) if p]
    return sorted(p for part in _merge(mine) for p in part)
