"""The training job: check everything that can fail on bad input, set up the process group, run the
:class:`harness.train.trainer.Trainer`, and record this rank's outcome.

``run(cfg)`` is what ``train.py`` and ``harness train`` call, under any launcher.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from harness.components import checkpoint as ckpt_mod
from harness.components.resilience import RunSupervisor
from harness.config.job_config import JobConfig, to_dict
from harness.config.layout import BatchLayout
from harness.config.overrides import get_dotted
from harness.config.validate import validate
from harness.core import hooks
from harness.core.errors import ConfigError, ExitCode
from harness.core.units import GIB
from harness.data.loader import epoch_samples
from harness.data.workers import data_worker_error
from harness.distributed.hardware import (
    apply_memory_budget,
    check_device_support,
    check_machine,
    configure_device_math,
    dump_oom_snapshot,
    is_out_of_memory,
    record_allocations,
)
from harness.distributed.launch import abort, detect_launch, init_distributed, select_device, shutdown
from harness.train.trainer import RunContext, Trainer

log = logging.getLogger("harness")

# Fields that define the optimisation trajectory: a resume with different values would not continue
# the same run, so it is refused.
TRAJECTORY_FIELDS = ("model.name", "train.micro_batch_size", "train.seed", "optim.lr", "optim.weight_decay",
                     "optim.beta1", "optim.beta2", "optim.eps", "optim.warmup_samples", "optim.min_lr_ratio",
                     "optim.grad_clip_norm", "train.precision", "data.train_data", "data.resampled",
                     "data.shuffle_buffer", "data.num_workers", "loss.kind", "model.pretrained",
                     "model.lock_image", "model.lock_text", "model.distill_teacher", "loss.distill_embed_weight",
                     "loss.distill_token_weight")



def total_train_samples(cfg: JobConfig) -> int:
    """Training length in samples: ``train.train_samples``, or ``ceil(epochs * samples per epoch)``."""
    if cfg.train.train_samples is not None:
        return cfg.train.train_samples
    per_epoch = epoch_samples(cfg.data)
    if not per_epoch:
        raise ConfigError(f"train.epochs: could not count samples in data.train_data={cfg.data.train_data!r}; "
                          "set data.train_num_samples or train.train_samples")
    return math.ceil(cfg.train.epochs * per_epoch)


def prepare_run_dir(cfg: JobConfig, rank: int) -> Optional[Path]:
    """Check the run directory before anything is written; return the checkpoint to resume from, or None.

    Raises:
        ConfigError: the run directory already holds checkpoints and no ``checkpoint.resume`` is given
            (nothing already written is overwritten), or ``checkpoint.resume`` is a folder without a
            complete checkpoint.
    """
    root = ckpt_mod.checkpoint_root(cfg.run_dir)
    resume = cfg.checkpoint.resume
    if resume is None:
        if ckpt_mod.latest_checkpoint(root) is not None:
            raise ConfigError(f"checkpoint.resume: {cfg.run_dir} already has checkpoints; pass --resume latest to "
                              "continue it or choose another --run-name (nothing was overwritten)")
        return None
    if resume == "latest":
        found = ckpt_mod.latest_checkpoint(root)
        if found is None and rank == 0:
            log.warning("checkpoint.resume=latest: no complete checkpoint in %s; starting from scratch", root)
        return found
    path = Path(resume)
    if ckpt_mod.checkpoint_verify.read_meta_or_none(path) is None:
        raise ConfigError(f"checkpoint.resume: {resume!r} is not a complete checkpoint ({path / 'meta.json'} is "
                          "missing or unreadable)")
    return path


def check_resume_compatible(meta: Dict[str, Any], cfg: JobConfig, layout: BatchLayout, total_samples: int) -> None:
    """Refuse to resume a checkpoint whose trajectory-defining settings differ from this run's.

    Raises:
        ConfigError: names every differing field with both values.
    """
    defaults, now = to_dict(JobConfig()), to_dict(cfg)
    saved = lambda f: get_dotted(meta["config"], f) if _has_dotted(meta["config"], f) else get_dotted(defaults, f)
    diffs = [f"{f}: checkpoint {saved(f)!r} vs now {get_dotted(now, f)!r}" for f in TRAJECTORY_FIELDS
             if saved(f) != get_dotted(now, f)]
    for key, value in (("world_size", layout.world_size), ("global_batch_size", layout.global_batch_size),
                       ("total_train_samples", total_samples)):
        if meta.get(key) != value:
            diffs.append(f"{key}: checkpoint {meta.get(key)!r} vs now {value!r}")
    if diffs:
        raise ConfigError("checkpoint.resume: the checkpoint was written by a different run setup; "
                          + "; ".join(diffs))


def _has_dotted(d: Dict[str, Any], dotted: str) -> bool:
    """Whether ``d`` has the key ``dotted`` (a checkpoint written before a field existed lacks it: its default)."""
    try:
        get_dotted(d, dotted)
        return True
    except (KeyError, TypeError):
        return False


def check_pretrained(cfg: JobConfig) -> None:
    """Check ``model.pretrained`` against the model's shapes (a ``meta``-device model; the file is read on the
    CPU), before any process group: a missing or unreadable file, or one of another architecture, is refused.

    Raises:
        ConfigError: ``model.pretrained: ...`` with the reason (:class:`models.pretrained.PretrainedError`).
    """
    import models
    from models.pretrained import PretrainedError
    from models.pretrained import check_pretrained as check

    try:
        check(models.create_model(cfg.model.name, device="meta"), cfg.model.pretrained)
    except PretrainedError as e:
        raise ConfigError(f"model.pretrained: {e} (model.name={cfg.model.name})") from None


def check_teacher(cfg: JobConfig) -> None:
    """Check ``model.distill_teacher`` (every start, resumes too: the teacher is not checkpointed) against the
    model's base ViT on ``meta`` (:func:`models.pretrained.load_teacher`), before any process group.

    Raises:
        ConfigError: ``model.distill_teacher: ...``: unreadable, another architecture, image-tower weights missing.
    """
    from models.pretrained import PretrainedError, load_teacher

    try:
        load_teacher(cfg.model.name, cfg.model.distill_teacher, device="meta")
    except PretrainedError as e:
        raise ConfigError(f"model.distill_teacher: {e} (model.name={cfg.model.name})") from None


def setup_logging(rank: int, run_dir: Optional[Path] = None) -> None:
    """Our INFO lines on rank 0 only; libraries (open_clip logs to the root logger) at WARNING. On rank 0 the same
    lines also go to ``run_dir/train.log`` (appended, so a resumed run continues its log)."""
    import warnings

    # open_clip's gather-with-grad uses torch.distributed.nn.all_gather, deprecated but correct
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    fmt = f"%(asctime)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, force=True)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / "train.log", mode="a")
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
    for name in ("harness", "harness.data.loader", "harness.eval.validation", "harness.engines.deepspeed"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def write_status(run_dir: Path, rank: int, status: str, message: str) -> None:
    """``run_dir/status/rank_XXXXX.json``: ``{"status": "ok"|"preempted"|"oom"|"error", "message": ...}`` of this
    rank."""
    folder = Path(run_dir) / "status"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "status": status, "message": message}))


def memory_tracker(cfg: JobConfig, device: torch.device, rank: int):
    """A :class:`harness.distributed.tensor_memory.TensorMemoryTracker` on a CPU when memory is tracked or budgeted,
    else None (on a GPU the budget is the allocator's memory fraction, set by ``check_device_support``)."""
    from harness.distributed.tensor_memory import TensorMemoryTracker

    budget = cfg.train.memory_budget_gib
    if device.type != "cpu" or not (cfg.train.track_memory or budget):
        return None
    if budget:
        budget *= hooks.budget_scale(rank)  # test hook: one rank with less memory
    return TensorMemoryTracker(int(budget * GIB) if budget else None)


def run(cfg: JobConfig, make_trainer: Callable[[RunContext], Trainer] = Trainer) -> Optional[Dict[str, Any]]:
    """Train ``cfg`` to the end (or ``train.max_steps``), evaluate, write ``summary.json``.

    ``make_trainer`` builds the trainer from the run's context (a :class:`Trainer` subclass such as the LR range
    test's, :mod:`harness.tools.lrfind`). Returns the summary dict on rank 0, None on other ranks.

    Raises:
        ConfigError: invalid config or resume mismatch, before any training step (config errors
            are raised before the process group is created).
        SystemExit: :attr:`ExitCode.PREEMPTED` (75) after every rank checkpointed on a stop signal (SIGTERM/SIGUSR1,
            :class:`harness.components.resilience.RunSupervisor`).
    """
    # ---- everything that can fail on bad input, before a process group exists
    layout = validate(cfg)
    check_machine(cfg)
    launch = detect_launch(cfg)
    total_samples = total_train_samples(cfg)
    resume_from = prepare_run_dir(cfg, int(os.environ.get("RANK", "0")))
    if resume_from is not None:
        check_resume_compatible(ckpt_mod.newest_meta(resume_from), cfg, layout, total_samples)
    elif cfg.model.pretrained:
        check_pretrained(cfg)
    if cfg.model.distill_teacher:
        check_teacher(cfg)

    device = select_device()
    check_device_support(cfg, device, launch)
    configure_device_math(cfg, device)
    rank, world = init_distributed(launch, device, cfg.train.emulate_world_size, cfg.train.dist_timeout_s)
    overhead = apply_memory_budget(cfg, device)
    recording = record_allocations(cfg, device)
    mem = memory_tracker(cfg, device, rank)
    supervisor = RunSupervisor(cfg.train, cfg.run_dir, rank)  # stop signals and the hang watchdog
    ctx = RunContext(cfg, layout, launch, device, rank, world, total_samples, resume_from, mem, overhead, supervisor)
    try:
        with mem or contextlib.nullcontext(), supervisor:
            setup_logging(rank, cfg.run_dir)
            if rank == 0:
                (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            summary = make_trainer(ctx).train()
    except Exception as e:
        # the outcome of this rank, for fit probes and for the user; peers blocked in a collective are released by
        # the aborted process group, and the launcher stops the other ranks
        e = data_worker_error(e) or e  # a dead DataLoader worker, named with its shards
        if is_out_of_memory(e):
            snapshot = dump_oom_snapshot(cfg.run_dir, rank) if recording else None
            note = f" (allocator snapshot: {snapshot})" if snapshot else ""
            write_status(cfg.run_dir, rank, "oom", str(e).strip().splitlines()[0][:500] + note)
            if snapshot:
                log.error("out of memory on rank %d; allocator snapshot written to %s", rank, snapshot)
        else:
            write_status(cfg.run_dir, rank, "error", f"{type(e).__name__}: {str(e).strip()[:500]}")
        abort()
        raise e
    write_status(cfg.run_dir, rank, "preempted" if supervisor.stopping else "ok", supervisor.signal_name)
    shutdown()
    if supervisor.stopping:  # checkpointed on a stop signal: the status a scheduler requeues on
        raise SystemExit(ExitCode.PREEMPTED)
    return summary
