"""The training job: validate, set up, loop, checkpoint, evaluate, summarise.

``run(cfg)`` is what ``train.py`` and ``harness train`` call, under any launcher. The step itself is
:func:`train_step`; setup and the loop are separate functions so each stays small.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

import models
from harness import checkpoint as ckpt_mod
from harness.config import GIB, BatchLayout, ConfigError, JobConfig, to_dict, validate
from harness.data import DataTracker, build_train_loader, epoch_samples
from harness.engine import (autocast_dtype, build_engine, check_device_support, detect_launch, device_memory_gib,
                            init_distributed, local_parameter_elements, select_device)
from harness.metrics import JsonlWriter, StepTimer, peak_memory_gib
from harness.schedule import build_scheduler
from harness.zeroshot import zeroshot_eval

log = logging.getLogger("harness")

# Fields that define the optimisation trajectory: a resume with different values would not continue
# the same run, so it is refused.
TRAJECTORY_FIELDS = ("model.name", "train.micro_batch_size", "train.seed", "optim.lr", "optim.weight_decay",
                     "optim.beta1", "optim.beta2", "optim.eps", "optim.warmup_samples", "optim.min_lr_ratio",
                     "optim.grad_clip_norm", "train.precision", "data.train_data", "data.resampled",
                     "data.shuffle_buffer", "data.num_workers")


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


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
    if not (path / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: {resume!r} is not a complete checkpoint (no meta.json)")
    return path


def check_resume_compatible(meta: Dict[str, Any], cfg: JobConfig, layout: BatchLayout, total_samples: int) -> None:
    """Refuse to resume a checkpoint whose trajectory-defining settings differ from this run's.

    Raises:
        ConfigError: names every differing field with both values.
    """
    saved = meta["config"]
    now = to_dict(cfg)
    diffs = [f"{f}: checkpoint {_get(saved, f)!r} vs now {_get(now, f)!r}" for f in TRAJECTORY_FIELDS
             if _get(saved, f) != _get(now, f)]
    for key, value in (("world_size", layout.world_size), ("global_batch_size", layout.global_batch_size),
                       ("total_train_samples", total_samples)):
        if meta.get(key) != value:
            diffs.append(f"{key}: checkpoint {meta.get(key)!r} vs now {value!r}")
    if diffs:
        raise ConfigError("checkpoint.resume: the checkpoint was written by a different run setup; "
                          + "; ".join(diffs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def clip_loss_fn(rank: int, world: int):
    """open_clip's ``ClipLoss`` with a local loss and gather-with-grad: each rank holds ``[B_local, B_global]``
    logits instead of ``[B_global, B_global]`` (open_clip ``--local-loss --gather-with-grad``)."""
    from open_clip import ClipLoss

    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)


def train_step(engine, loss_fn, batch: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    """One micro batch: forward, contrastive loss (fp32) + the image tower's extra losses, backward.

    Features and ``logit_scale`` are cast to fp32 before the loss, and the scale is clamped at 100
    (CLIP's bound on the inverse temperature, applied in the loss so it holds under any sharding).
    An image tower with ``extra_losses()`` (DTP-ViT's weighted boundary loss) adds them to the loss;
    one with ``last_stats`` (DTP-ViT's shortening factor, boundary rate, segment counts) has them
    reported.

    Returns:
        Detached fp32 scalars: ``loss`` (contrastive), each extra loss, and the tower's stats.
    """
    out = engine.forward(batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True))
    scale = out["logit_scale"].float().clamp(max=100.0)
    loss = loss_fn(out["image_features"].float(), out["text_features"].float(), scale)
    visual = engine.module.visual
    extras = visual.extra_losses() if hasattr(visual, "extra_losses") else {}
    total = loss + sum(v.float() for v in extras.values()) if extras else loss
    engine.backward(total)
    report = {"loss": loss.detach(), "logit_scale": scale.detach().reshape(-1)[0]}
    report.update({k: v.detach().float() for k, v in extras.items()})
    for k, v in getattr(visual, "last_stats", {}).items():
        report.setdefault(k, v.float())
    return report


def _evaluate(cfg: JobConfig, engine, device: torch.device) -> Dict[str, float]:
    with engine.full_parameters():
        return zeroshot_eval(engine.module, models.get_tokenizer(cfg.model.name), cfg.eval.zeroshot_data,
                             models.image_transform(cfg.model.name, is_train=False), cfg.eval.batch_size, device,
                             autocast_dtype(cfg.train.precision))


def setup_logging(rank: int) -> None:
    """Our INFO lines on rank 0 only; libraries (open_clip logs to the root logger) at WARNING."""
    import warnings

    # open_clip's gather-with-grad uses torch.distributed.nn.all_gather, deprecated but correct
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", force=True)
    for name in ("harness", "harness.data", "harness.engine"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(cfg: JobConfig) -> Optional[Dict[str, Any]]:
    """Train ``cfg`` to the end (or ``train.max_steps``), evaluate, write ``summary.json``.

    Returns the summary dict on rank 0, None on other ranks.

    Raises:
        ConfigError: invalid config or resume mismatch, before any training step (config errors
            are raised before the process group is created).
    """
    # ---- everything that can fail on bad input, before a process group exists
    layout = validate(cfg)
    launch = detect_launch(cfg)
    total_samples = total_train_samples(cfg)
    env_rank = int(os.environ.get("RANK", "0"))
    resume_from = prepare_run_dir(cfg, env_rank)
    if resume_from is not None:
        check_resume_compatible(ckpt_mod.read_meta(resume_from), cfg, layout, total_samples)

    device = select_device()
    check_device_support(cfg, device, launch)
    rank, world = init_distributed(launch, device, cfg.train.emulate_world_size)
    mem = memory_tracker(cfg, device, rank)
    try:
        with mem or contextlib.nullcontext():
            summary = _run(cfg, layout, launch, total_samples, resume_from, device, rank, world, mem)
    except torch.OutOfMemoryError as e:
        # the outcome of this rank, for fit probes and for the user; the launcher stops the other ranks
        write_status(cfg.run_dir, rank, "oom", str(e).strip().splitlines()[0][:500])
        raise
    except Exception as e:
        write_status(cfg.run_dir, rank, "error", f"{type(e).__name__}: {str(e).strip()[:500]}")
        raise
    write_status(cfg.run_dir, rank, "ok", "")
    if dist.is_initialized():
        dist.destroy_process_group()  # an orderly exit: gloo's threads otherwise may abort the process at exit
    return summary


def write_status(run_dir: Path, rank: int, status: str, message: str) -> None:
    """``run_dir/status/rank_XXXXX.json``: ``{"status": "ok"|"oom"|"error", "message": ...}`` of this rank."""
    folder = Path(run_dir) / "status"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "status": status, "message": message}))


RANK_BUDGET_SCALE_ENV = "HARNESS_MEMORY_BUDGET_SCALE_RANK"
"""Test hook: ``"R:F"`` multiplies rank R's ``train.memory_budget_gib`` by F (one rank with less memory, as
on a cluster with mixed 16/32 GB cards), so a probe where only one rank runs out of memory can be made."""


def memory_tracker(cfg: JobConfig, device: torch.device, rank: int):
    """A :class:`harness.memory.TensorMemoryTracker` on a CPU when memory is tracked or budgeted, else None
    (on a GPU the budget is the allocator's memory fraction, set by ``check_device_support``)."""
    from harness.memory import TensorMemoryTracker

    budget = cfg.train.memory_budget_gib
    if device.type != "cpu" or not (cfg.train.track_memory or budget):
        return None
    hook = os.environ.get(RANK_BUDGET_SCALE_ENV, "")
    if budget and hook.split(":")[0] == str(rank):
        budget *= float(hook.split(":")[1])
    return TensorMemoryTracker(int(budget * GIB) if budget else None)


def _run(cfg: JobConfig, layout: BatchLayout, launch, total_samples: int, resume_from: Optional[Path],
         device: torch.device, rank: int, world: int, mem) -> Optional[Dict[str, Any]]:
    setup_logging(rank)
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    total_steps = math.ceil(total_samples / layout.global_batch_size)
    stop_step = min(total_steps, cfg.train.max_steps or total_steps)

    seed_everything(cfg.train.seed)  # same init on every rank
    model = models.create_model(cfg.model.name, attention=cfg.model.attention)
    knobs = apply_model_knobs(model, cfg)
    sched_fn = lambda opt: build_scheduler(opt, total_samples, cfg.optim.warmup_samples, layout.global_batch_size,
                                           cfg.optim.min_lr_ratio)
    engine = build_engine(model, cfg, layout, sched_fn, device, launch)

    step, tracker = 0, DataTracker()
    if resume_from is not None:
        engine.load(resume_from)
        state = ckpt_mod.load_rank_state(resume_from, rank)
        ckpt_mod.set_rng_state(state["rng"])
        tracker = DataTracker(state["data"])
        step = ckpt_mod.read_meta(resume_from)["step"]
        log.info("resumed from %s at step %d (lr %.6g)", resume_from, step, engine.lr())
    else:
        seed_everything(cfg.train.seed + rank)  # per-rank stream of any runtime randomness

    loader = build_train_loader(cfg.data, cfg.model.name, layout.micro_batch_size, cfg.train.seed, rank, world,
                                tracker.state_dict())
    loss_fn = clip_loss_fn(rank, world)
    writer = JsonlWriter(run_dir / "metrics.jsonl", enabled=rank == 0)
    timer = StepTimer(cfg.train.timing_warmup_steps)
    log.info("model %s (%.2fM params) | engine %s | world %d | micro %d x accum %d -> global %d | steps %d of %d "
             "(%d samples) | device %s | %s %s | attention %s | checkpointed blocks %s | compiled blocks %d",
             cfg.model.name, engine.num_parameters() / 1e6, engine.kind, world, layout.micro_batch_size,
             layout.grad_accum_steps, layout.global_batch_size, stop_step, total_steps, total_samples, device,
             cfg.train.precision, _precision_note(engine), cfg.model.attention, knobs["checkpointed_blocks"],
             knobs["compiled_blocks"])

    summary = _loop(cfg, engine, loader, loss_fn, tracker, writer, timer, layout, device, rank, world, step,
                    stop_step, total_steps, total_samples, mem)
    writer.close()
    if dist.is_initialized():
        dist.barrier()
    return summary


def apply_model_knobs(model, cfg: JobConfig) -> Dict[str, Any]:
    """Activation checkpointing, then ``torch.compile``, on the plain model, before the engine shards it
    (torchtitan's order: ``apply_ac``, ``apply_compile``, ``apply_fsdp``). Returns what was applied."""
    from models.blocks import compile_blocks, set_grad_checkpointing

    every = cfg.model.grad_checkpointing
    checkpointed = set_grad_checkpointing(model, every) if every else {"image": 0, "text": 0}
    compiled = compile_blocks(model) if cfg.model.compile else 0
    return {"checkpointed_blocks": checkpointed, "compiled_blocks": compiled}


def _precision_note(engine) -> str:
    return {"deepspeed": "(DeepSpeed native)", "fsdp": "(FSDP2 mixed precision + autocast)"}.get(
        engine.kind, "(autocast)")


def _rank_state(tracker: DataTracker) -> Dict[str, Any]:
    return {"rng": ckpt_mod.rng_state(), "data": tracker.state_dict()}


def _loop(cfg, engine, loader, loss_fn, tracker, writer, timer, layout, device, rank, world, step, stop_step,
          total_steps, total_samples, mem) -> Optional[Dict[str, Any]]:
    from tqdm import tqdm

    root = ckpt_mod.checkpoint_root(cfg.run_dir)

    def meta(step_: int) -> Dict[str, Any]:
        return {"step": step_, "samples_seen": step_ * layout.global_batch_size, "world_size": world,
                "global_batch_size": layout.global_batch_size, "total_train_samples": total_samples,
                "engine": engine.kind, "config": to_dict(cfg)}

    def save(step_: int) -> None:
        path = ckpt_mod.save_checkpoint(engine, root, step_, meta(step_), _rank_state(tracker), rank,
                                        cfg.checkpoint.keep_last)
        log.info("checkpoint %s", path)

    bar = tqdm(total=stop_step, initial=step, disable=rank != 0 or not cfg.train.progress_bar, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    it = iter(loader)
    start_step = step
    last_loss = float("nan")
    evals: Dict[str, float] = {}
    interval: Dict[str, list] = {}  # per-micro-batch scalars since the last log line
    saved_at = step  # step of the last checkpoint written by this process (or resumed from)
    stop_file, stop_requested = cfg.checkpoint.stop_file, False
    while step < stop_step:
        profiler = _start_profile(cfg, device) if cfg.train.profile_step == step + 1 else None
        t0 = time.perf_counter()
        wait = 0.0
        stepped = False
        while not stepped:
            tw = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tw
            tracker.update(batch)
            for k, v in train_step(engine, loss_fn, batch, device).items():
                interval.setdefault(k, []).append(v)
            stepped = engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest step time: wait for the GPU
        step += 1
        timer.add(time.perf_counter() - t0, wait)
        if profiler is not None:
            _stop_profile(profiler, cfg.run_dir, step, rank, device)
        if step % cfg.train.log_every_steps == 0 or step == stop_step:
            counters = tracker.counters()
            # over the micro batches since the last log line, then over ranks: "*_max" keys by max,
            # the others by mean; the bad-sample counters are summed in the same reduction as the means
            # (the stop-file flag rides in the same sum: every rank stops at the same step)
            maxes = {k: torch.stack(v).max().item() for k, v in interval.items() if k.endswith("_max")}
            means = {k: torch.stack(v).mean().item() for k, v in interval.items() if k not in maxes}
            stop_seen = float(bool(stop_file) and os.path.exists(stop_file))
            reduced = _reduce([*means.values(), *counters.values(), stop_seen], "sum", device)
            means = {k: r / world for k, r in zip(means, reduced)}
            bad = {k: int(v) for k, v in zip(counters, reduced[len(means):-1])}
            stop_requested = reduced[-1] > 0
            if maxes:
                means.update(zip(maxes, _reduce(list(maxes.values()), "max", device)))
            interval = {}
            last_loss = means.pop("loss")
            avg = timer.avg_step_time_s() or timer.times[-1]
            record = {"step": step, "samples_seen": step * layout.global_batch_size, "loss": last_loss,
                      "lr": engine.lr(), "grad_norm": engine.grad_norm,
                      "step_time_s": timer.times[-1], "data_wait_s": wait,
                      "samples_per_s": layout.global_batch_size / avg, "epoch": tracker.epoch(),
                      "skipped_samples": bad, "skipped_optimizer_steps": engine.skipped_steps,
                      "loss_scale": engine.loss_scale(), **means}
            writer.write(record)
            postfix = dict(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.0f}")
            if "shortening_factor" in means:
                postfix["SF"] = f"{means['shortening_factor']:.2f}"
            bar.set_postfix(**postfix, refresh=False)
        bar.update(1)
        if cfg.eval.every_steps and cfg.eval.zeroshot_data and step % cfg.eval.every_steps == 0 and step < stop_step:
            evals = _evaluate(cfg, engine, device)
            writer.write({"step": step, **evals})
            log.info("step %d zero-shot top-1 %.4f top-5 %.4f", step, evals["zeroshot_top1"], evals["zeroshot_top5"])
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            save(step)
            saved_at = step
        if stop_requested:
            log.info("stop file %s found: checkpointing at step %d and stopping", stop_file, step)
            break
    bar.close()
    if (cfg.checkpoint.save_final or stop_requested) and step > start_step and saved_at != step:
        save(step)
    if cfg.eval.zeroshot_data and not stop_requested:
        evals = _evaluate(cfg, engine, device)
        writer.write({"step": step, **evals})
        log.info("zero-shot top-1 %.4f top-5 %.4f on %d images", evals["zeroshot_top1"], evals["zeroshot_top5"],
                 evals["zeroshot_images"])

    local_params = local_parameter_elements(engine.module)
    peak, kind = peak_memory_gib(device, mem)
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else 0.0
    peak_t, reserved_t = _reduce([peak, reserved], "max", device)
    counters = tracker.counters()
    bad = {k: int(v) for k, v in zip(counters, _reduce(list(counters.values()), "sum", device))}
    if rank != 0:
        return None
    avg = timer.avg_step_time_s()
    summary = {
        "model": cfg.model.name, "engine": engine.kind,
        "zero_stage": getattr(engine, "zero_stage", None), "precision": cfg.train.precision,
        "attention": cfg.model.attention, "grad_checkpointing": cfg.model.grad_checkpointing,
        "compile": cfg.model.compile, "stopped_by_stop_file": stop_requested,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world, "micro_batch_size": layout.micro_batch_size,
        "parameters": engine.num_parameters(), "rank0_local_parameter_elements": local_params,
        "grad_accum_steps": layout.grad_accum_steps, "global_batch_size": layout.global_batch_size,
        "contrastive_batch_size": layout.contrastive_batch_size,
        "steps": step, "steps_this_process": step - start_step, "total_steps": total_steps,
        "samples_seen": step * layout.global_batch_size, "total_train_samples": total_samples,
        "final_loss": last_loss,
        "zeroshot_top1": evals.get("zeroshot_top1"), "zeroshot_top5": evals.get("zeroshot_top5"),
        "avg_step_time_s": avg, "timing_warmup_steps_excluded": timer.excluded,
        "samples_per_s": layout.global_batch_size / avg if avg else None,
        "data_wait_fraction": timer.data_wait_fraction(),
        "peak_mem_gib": peak_t, "peak_mem_kind": kind,
        "peak_reserved_gib": reserved_t if device.type == "cuda" else None,
        "device_memory_gib": device_memory_gib(device), "memory_budget_gib": cfg.train.memory_budget_gib,
        "skipped_samples": bad, "skipped_optimizer_steps": engine.skipped_steps,
        "run_dir": str(cfg.run_dir),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("summary: %s", json.dumps(summary))
    return summary


def _start_profile(cfg: JobConfig, device: torch.device):
    """Start a PyTorch profiler (CPU + CUDA activity, shapes, memory) and CUDA memory-history recording."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    prof = profile(activities=activities, record_shapes=True, profile_memory=True)
    prof.__enter__()
    return prof


def _stop_profile(prof, run_dir: Path, step: int, rank: int, device: torch.device) -> None:
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(str(run_dir / f"trace_step{step}_rank{rank}.json"))
    if device.type == "cuda":
        torch.cuda.memory._dump_snapshot(str(run_dir / f"memory_snapshot_step{step}_rank{rank}.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
    log.info("profiler trace of step %d written to %s", step, run_dir)


def _reduce(values, op: str, device: torch.device) -> list:
    """All-reduce a list of floats over ranks (``op``: ``sum`` | ``max``); identity without a process group.
    The tensor goes to ``device`` because NCCL reduces only CUDA tensors."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()
