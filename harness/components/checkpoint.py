"""Atomic, resumable checkpoints.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holding the engine's files (``model.pt`` ... or
DeepSpeed's ``deepspeed/`` tag folder with per-rank ZeRO partitions), one ``rank_00000.pt`` per rank
(RNG states and data position) and ``meta.json`` (step, samples seen, world size, config).

Atomicity: every rank writes into ``step_XXXXXXXX.tmp``; after a barrier the ranks checksum the files
(:mod:`harness.components.checkpoint_verify`), rank 0 writes ``meta.json`` (with every file's size and CRC-32) and
renames the folder to its final name (a single ``rename``). A run killed at any point of a save leaves either the
complete new checkpoint or a ``.tmp`` folder that is ignored (and removed by the next save), so ``resume latest`` always
finds the last complete one. Before a restore the checkpoint is verified; ``resume latest`` falls back to the newest one
that verifies and moves the bad newer ones aside (``step_XXXXXXXX.corrupt``: ignored, never deleted). Parameters
are checked finite before a save (:mod:`harness.engines.nonfinite`): a checkpoint of non-finite weights is never
written.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from harness.components import checkpoint_verify
from harness.core import hooks
from harness.core.errors import ConfigError, NonFiniteError
from harness.distributed.collectives import barrier as _barrier
from harness.engines.nonfinite import parameters_finite

log = logging.getLogger("harness")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to ``<name>.corrupt`` (``.corrupt1``... if taken): out of every listing,
    nothing deleted. Returns the new path."""
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    return target


def checkpoint_root(run_dir: Path) -> Path:
    """``run_dir / "checkpoints"``."""
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoint folders under ``root``, oldest first (folder named ``step_N`` with ``meta.json``)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, meta: Dict[str, Any], rank_state: Dict[str, Any], rank: int,
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it). Returns the final folder.

    Args:
        engine: an :class:`harness.engines.Engine` (``save(directory, rank)``).
        root: checkpoints folder.
        step: optimizer steps taken.
        meta: JSON-serialisable run state written by rank 0 (``step``, ``samples_seen``, ``world_size``, ...).
        rank_state: this rank's private state (RNG, data position), ``torch.save``-able.
        rank: this process's rank.
        keep_last: complete checkpoints to keep; older ones are deleted after this one is complete.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if (final / "meta.json").is_file():  # already saved at this step (e.g. periodic save on the last step)
        return final
    engine.guard.check_now(step)  # a run of non-finite steps past the limit stops here, before any write
    if not parameters_finite(engine.module, engine.device):
        raise NonFiniteError(f"checkpoint at step {step} not written: the parameters are not finite (the older "
                             f"checkpoints in {root} are kept)")
    if rank == 0:
        if final.exists():  # a damaged folder of this step (no meta.json): kept aside, not overwritten
            log.warning("checkpoint folder %s has no meta.json: moved to %s", final, set_aside(final))
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save(tmp, rank)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    hooks.kill_in_save(step, rank)  # test hook: a kill between writing the files and completing the save
    _barrier()
    files = checkpoint_verify.manifest(tmp)  # collective: each rank checksums its share of the files
    if rank == 0:
        meta_tmp = tmp / "meta.json.tmp"
        meta_tmp.write_text(json.dumps({**meta, "checksum": "crc32", "files": files}, indent=2, default=str))
        os.replace(meta_tmp, tmp / "meta.json")
        os.replace(tmp, final)  # the commit point
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(ckpt: Path) -> Dict[str, Any]:
    """``meta.json`` of a checkpoint folder."""
    return json.loads((Path(ckpt) / "meta.json").read_text())


def newest_meta(ckpt: Path) -> Dict[str, Any]:
    """``meta.json`` of ``ckpt``, or, when it cannot be read, of the newest older complete checkpoint beside it
    whose ``meta.json`` can (the run's settings, for the resume compatibility check before any process group;
    the checkpoint itself is verified later, :meth:`CheckpointManager.verified`).

    Raises:
        ConfigError: no readable ``meta.json`` at all.
    """
    ckpt = Path(ckpt)
    for c in [ckpt, *reversed([c for c in complete_checkpoints(ckpt.parent) if c.name < ckpt.name])]:
        meta = checkpoint_verify.read_meta_or_none(c)
        if meta is not None:
            return meta
    raise ConfigError(f"checkpoint.resume: no readable meta.json in {ckpt} or the checkpoints before it")


def load_rank_state(ckpt: Path, rank: int) -> Dict[str, Any]:
    """This rank's private state from checkpoint ``ckpt``."""
    return torch.load(Path(ckpt) / f"rank_{rank:05d}.pt", weights_only=False)


def load_model_state(ckpt: Path) -> Dict[str, torch.Tensor]:
    """Full (unsharded) model ``state_dict`` from a checkpoint of any engine, on the CPU, in one process.

    Layouts: ``model.pt`` (plain PyTorch / DDP); DeepSpeed ZeRO 0-2 ``deepspeed/mp_rank_00_model_states.pt``;
    DeepSpeed ZeRO-3 partitions consolidated to fp32 with DeepSpeed's ``zero_to_fp32``; FSDP2
    ``fsdp/`` (``torch.distributed.checkpoint``) converted with ``dcp_to_torch_save``.

    Raises:
        FileNotFoundError: ``ckpt`` has no model weights of a known layout.
    """
    ckpt = Path(ckpt)
    if (ckpt / "model.pt").is_file():
        return torch.load(ckpt / "model.pt", map_location="cpu")
    ds = ckpt / "deepspeed"
    if (ds / "mp_rank_00_model_states.pt").is_file():  # ZeRO 0-2: full module weights in one file
        return torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    if (ds / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():  # ZeRO-3: per-rank partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    if (ckpt / "fsdp" / ".metadata").is_file():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(ckpt / "fsdp"), f"{tmp}/full.pt")
            return torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=False)["model"]
    raise FileNotFoundError(f"no model weights in checkpoint {ckpt}")



# --------------------------------------------------------------------------- a finished run's weights, for tools

def resolve_checkpoint(source: str, arg: str) -> Path:
    """The checkpoint folder ``source`` (a command's argument, named ``arg`` in errors) names: itself when it holds
    ``meta.json``, the newest complete checkpoint when it is a run folder (``checkpoints/step_*``).

    Raises:
        ConfigError: (naming ``arg``) ``source`` does not exist, is neither, or is a run without a complete checkpoint.
    """
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"{arg}: {source!r} is not a directory (a run folder or a checkpoint folder)")
    if (path / "meta.json").is_file():
        return path
    root = checkpoint_root(path)
    if root.is_dir():
        found = latest_checkpoint(root)
        if found is None:
            raise ConfigError(f"{arg}: run folder {source!r} has no complete checkpoint in {root} "
                              "(a folder ending in .tmp is an interrupted save)")
        return found
    raise ConfigError(f"{arg}: {source!r} is neither a checkpoint folder (no meta.json) nor a run folder "
                      "(no checkpoints/)")


def read_checkpoint(source: str, arg: str) -> Tuple[Path, Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(checkpoint folder, meta.json, full model state dict)`` of a run or checkpoint folder.

    Raises:
        ConfigError: (naming ``arg``) see :func:`resolve_checkpoint`; an unreadable ``meta.json``, an unknown model,
            no model weights of a known layout, or weights that do not fit the model named in ``meta.json``.
    """
    import models

    ckpt = resolve_checkpoint(source, arg)
    try:
        meta = read_meta(ckpt)
        name = meta["config"]["model"]["name"]
        model = models.create_model(name, device="meta")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{arg}: {ckpt}/meta.json does not name a registered model: {e}") from None
    try:
        state = load_model_state(ckpt)
    except FileNotFoundError as e:
        raise ConfigError(f"{arg}: {e} (expected model.pt, deepspeed/ or fsdp/)") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise ConfigError(f"{arg}: the weights in {ckpt} do not fit model {name}: {', '.join(bad[:5])}")
    return ckpt, meta, state


class CheckpointManager:
    """One run's checkpoints: atomic saves every ``checkpoint.every_steps``, pruning to ``keep_last``, and
    restoring engine state, this rank's RNG and data position (torchtitan's ``CheckpointManager`` role).

    Args:
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``).
        keep_last: complete checkpoints kept.
        rank: this process's rank.
        fallback: a restore may fall back to an older checkpoint of the run (``checkpoint.resume=latest``).
    """

    def __init__(self, run_dir: Path, keep_last: int, rank: int, fallback: bool = False):
        self.root = checkpoint_root(run_dir)
        self.fallback = fallback
        self.keep_last = keep_last
        self.rank = rank
        self.last_step: Optional[int] = None  # step of the last checkpoint saved or restored by this process
        self.restored_from: Optional[Path] = None  # the checkpoint restore() loaded (after verification)

    def save(self, engine, step: int, meta: Dict[str, Any], rank_state: Dict[str, Any]) -> Path:
        """Save checkpoint ``step`` (collective); see :func:`save_checkpoint`."""
        path = save_checkpoint(engine, self.root, step, meta, rank_state, self.rank, self.keep_last)
        self.last_step = step
        return path

    def verified(self, ckpt: Path) -> Path:
        """The checkpoint to restore (collective; every rank gets the same): ``ckpt`` if it verifies
        (:func:`harness.components.checkpoint_verify.verify`); else, when ``ckpt`` is in this run's checkpoints folder
        and ``fallback`` (``resume latest``), the newest one there that verifies, each bad file named in the log and
        the bad newer checkpoints moved aside (:func:`set_aside`) so that the resumed run can write those steps
        again.

        Raises:
            ConfigError: ``checkpoint.resume``: an explicit checkpoint that does not verify, or no checkpoint that
                does (naming the bad files).
        """
        ckpt = Path(ckpt)
        in_run = self.fallback and ckpt.parent.resolve() == self.root.resolve()
        bad: List[Path] = []
        for candidate in list(reversed(complete_checkpoints(self.root))) if in_run else [ckpt]:
            problems = checkpoint_verify.verify(candidate)
            if not problems:
                break
            if self.rank == 0:
                log.warning("checkpoint %s does not verify: %s", candidate, "; ".join(problems))
            if not in_run:
                raise ConfigError(f"checkpoint.resume: {candidate} does not verify: {'; '.join(problems)}")
            bad.append(candidate)
        else:
            raise ConfigError(f"checkpoint.resume: no checkpoint in {self.root} verifies (see the log above)")
        # later folders without meta.json (never made complete by a save, or that file lost): not candidates
        headless = sorted(p for p in self.root.glob("step_*") if _STEP_DIR.match(p.name)
                          and p.name > candidate.name and not (p / "meta.json").is_file()) if in_run else []
        if self.rank == 0:
            for h in headless:
                log.warning("checkpoint %s does not verify: %s: missing", h, h / "meta.json")
            if bad or headless:
                log.warning("falling back to %s", candidate)
            for b in bad + headless:
                log.warning("moved %s aside to %s", b, set_aside(b))
        _barrier()
        return candidate

    def restore(self, engine, ckpt: Path) -> Tuple[int, Dict[str, Any]]:
        """Verify ``ckpt`` (falling back as :meth:`verified` says), load engine state from the checkpoint chosen
        (``restored_from``) and set this rank's RNG; returns ``(step, rank state)``."""
        ckpt = self.restored_from = self.verified(ckpt)
        engine.load(ckpt)
        state = load_rank_state(ckpt, self.rank)
        set_rng_state(state["rng"])
        self.last_step = read_meta(ckpt)["step"]
        return self.last_step, state
