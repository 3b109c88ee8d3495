"""The training loop as a :class:`Trainer` whose ``train()`` reads like torchtitan's: load or initialise, then per
optimizer step ``train_step()``, ``log()``, ``maybe_eval()``, ``maybe_save()``, and the summary at the end.

The loop's state is a small :class:`TrainState` (open_clip's ``TrainState`` idea); metrics
(:class:`harness.components.metrics.MetricLogger`, :class:`harness.components.metrics.ProgressBar`), checkpoints
(:class:`harness.components.checkpoint.CheckpointManager`), timing (:class:`harness.components.metrics.StepTimer`) and
the step trace (:class:`harness.components.metrics.StepTrace`) are components with small interfaces. The model reports
its own extra losses and metrics (an image tower's ``extra_losses()``, ``last_stats`` and ``progress_metrics``, e.g.
DTP-ViT's boundary loss and shortening factor): the loop knows no model by name.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

import models
from harness.components import checkpoint as ckpt_mod
from harness.components.lr_schedule import build_scheduler
from harness.components.metrics import MetricLogger, ProgressBar, StepTimer, StepTrace, SyncWatch, peak_memory_gib
from harness.components.resilience import RunSupervisor
from harness.components.sinks import build_sinks
from harness.config.job_config import JobConfig, to_dict
from harness.config.layout import BatchLayout
from harness.core.units import GIB
from harness.data.loader import DataTracker, build_train_loader
from harness.distributed.collectives import all_reduce_floats, barrier
from harness.distributed.hardware import autocast_dtype, device_memory_gib
from harness.distributed.launch import LaunchInfo
from harness.distributed.parallelize import parallelize_clip
from harness.engines import SchedulerFn, build_engine
from harness.engines.common import local_parameter_elements
from harness.eval.validation import validate_clip
from harness.eval.zeroshot import zeroshot_eval
from harness.train.accumulate import NegativesAccumulation, loss_heads, model_inputs, tower_report
from harness.train.losses import build_loss
from models.decatt import enable_decatt
from models.decatt import extra_losses as tower_extra_losses
from models.distill import attach_teacher
from models.mixed_res import apply_mixed_resolution, model_quadtree_spec
from models.pretrained import describe_lock, load_pretrained, load_teacher, lock_towers

log = logging.getLogger("harness")


@dataclass(frozen=True)
class RunContext:
    """Everything a run is decided on before the trainer exists: the config, the batch layout, the launch,
    this rank's device and place in the world, the schedule's length, the checkpoint to resume, the CPU
    memory tracker (None on a GPU) and the GPU memory held outside PyTorch's allocator (context, NCCL)."""

    cfg: JobConfig
    layout: BatchLayout
    launch: LaunchInfo
    device: torch.device
    rank: int
    world: int
    total_samples: int
    resume_from: Optional[Path] = None
    mem: Any = None
    cuda_overhead_gib: float = 0.0
    supervisor: Optional[RunSupervisor] = None  # stop signals and hang watchdog; entered by harness.train.job.run


@dataclass
class TrainState:
    """What changes as the loop runs."""

    step: int = 0
    start_step: int = 0
    last_loss: float = float("nan")
    evals: Dict[str, float] = field(default_factory=dict)
    validation: Dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One training run of ``ctx.cfg`` on this rank: model, engine, data, loss and the loop's components."""

    def __init__(self, ctx: RunContext, scheduler_fn: Optional[SchedulerFn] = None):
        """``scheduler_fn`` (optimizer -> LR scheduler stepped once per optimizer step) replaces the configured
        warm-up + cosine schedule (e.g. the LR range test's exponential sweep, :mod:`harness.tools.lrfind`)."""
        cfg, layout = ctx.cfg, ctx.layout
        self.ctx, self.cfg, self.layout, self.device, self.rank, self.world = (
            ctx, cfg, layout, ctx.device, ctx.rank, ctx.world)
        self.total_steps = math.ceil(ctx.total_samples / layout.global_batch_size)
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        seed_everything(cfg.train.seed)  # same init on every rank
        model = models.create_model(cfg.model.name, attention=cfg.model.attention, siglip=cfg.loss.kind == "siglip")
        if cfg.model.pretrained and ctx.resume_from is None:  # a resume restores every weight from its checkpoint
            for line in load_pretrained(model, cfg.model.pretrained).lines():
                log.info(line)
        enable_decatt(model.visual, cfg.loss.decatt_weight)
        if cfg.model.distill_teacher:  # DynamicViT's frozen teacher, outside the module tree (never sharded or saved)
            teacher = load_teacher(cfg.model.name, cfg.model.distill_teacher, attention=cfg.model.attention)
            attach_teacher(model.visual, teacher, cfg.loss.distill_embed_weight, cfg.loss.distill_token_weight)
            log.info("distillation teacher %s: frozen image tower, %.2fM params; weights embed %g, token %g",
                     cfg.model.distill_teacher, sum(p.numel() for p in teacher.parameters()) / 1e6,
                     cfg.loss.distill_embed_weight, cfg.loss.distill_token_weight)
        if cfg.data.tokenizer == "quadtree":
            apply_mixed_resolution(model.visual, model_quadtree_spec(cfg.model.name, cfg.data.quadtree_levels,
                                                                     cfg.data.quadtree_tokens))
        locked = describe_lock(lock_towers(model, cfg.model.lock_image, cfg.model.lock_text))
        if locked:
            log.info(locked)
        dtype = autocast_dtype(cfg.train.precision)
        data_parallel = "fsdp" if ctx.launch.fsdp else ("ddp" if ctx.world > 1 and not ctx.launch.deepspeed else "none")
        model, self.applied = parallelize_clip(
            model, device=self.device, grad_checkpointing=cfg.model.grad_checkpointing,
            compile_blocks=cfg.model.compile, data_parallel=data_parallel, param_dtype=dtype,
            reduce_dtype=torch.bfloat16 if cfg.train.fsdp_reduce_dtype == "bf16" else torch.float32,
            reshard_after_forward=ctx.launch.fsdp_reshard_after_forward)
        schedule = scheduler_fn or (lambda opt: build_scheduler(opt, ctx.total_samples, cfg.optim.warmup_samples,
                                                                layout.global_batch_size, cfg.optim.min_lr_ratio))
        self.engine = build_engine(model, cfg, layout, schedule, self.device, ctx.launch)
        self.state = TrainState()
        self.checkpoints = ckpt_mod.CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last, self.rank,
                                                      fallback=cfg.checkpoint.resume == "latest")
        self.data = DataTracker()
        self.trace = StepTrace(cfg.train.profile_step, cfg.run_dir, self.rank, self.device)
        # local loss, gather-with-grad (harness.train.losses)
        self.loss_fn = build_loss(cfg.loss, self.rank, self.world)
        self.image_stats = models.image_mean_std(cfg.model.name)  # uint8 images are normalised on the device
        self.accum = NegativesAccumulation(self.engine, self.loss_fn, layout.grad_accum_steps, self.device,
                                           self.image_stats) if layout.accum_negatives else None
        strict = self.device.type == "cuda" and self.engine.kind != "deepspeed"  # DeepSpeed syncs in its step
        self.syncs = SyncWatch(cfg.train.count_host_syncs, strict)
        self.supervisor = ctx.supervisor or RunSupervisor(enabled=False)

    # ------------------------------------------------------------------ the loop

    def train(self) -> Optional[Dict[str, Any]]:
        """Train to ``train.max_steps`` or the end of the schedule, evaluate, and return the summary (rank 0;
        None elsewhere)."""
        self.load_or_init()
        self.timer.start()
        while self.state.step < self.stop_step:
            with self.trace.maybe(self.state.step + 1), self.syncs.counting(lambda: self.state.step):
                with self.syncs.step():
                    self.train_step()
                self.log()
            self.progress.update()
            self.maybe_eval()
            self.maybe_save()
            self.supervisor.step_done(self.state.step)  # the hang watchdog's heartbeat
            if self.state.stop_requested:
                why = self.supervisor.signal_name if self.supervisor.stopping else \
                    f"stop file {self.cfg.checkpoint.stop_file} found"
                log.info("%s: checkpointing at step %d and stopping", why, self.state.step)
                break
        self.progress.close()
        self.maybe_save(final=True)
        self.maybe_eval(final=True)
        summary = self.summary()
        self.metrics.close()
        barrier()
        return summary

    def load_or_init(self) -> None:
        """Resume model, optimizer, schedule, RNG and data position from ``ctx.resume_from``, or seed this rank's
        runtime randomness; then build the data loader, the metric log and the progress bar."""
        ctx, cfg = self.ctx, self.cfg
        if ctx.resume_from is not None:
            self.state.step, rank_state = self.checkpoints.restore(self.engine, ctx.resume_from)
            self.data = DataTracker(rank_state["data"])
            log.info("resumed from %s at step %d (lr %.6g)", self.checkpoints.restored_from, self.state.step,
                     self.engine.lr())
        else:
            seed_everything(cfg.train.seed + self.rank)  # per-rank stream of any runtime randomness
        self.state.start_step = self.state.step
        self.timer = StepTimer(cfg.train.timing_warmup_steps, self.state.step, self.stop_step)
        self.loader = iter(build_train_loader(cfg.data, cfg.model.name, self.layout, cfg.train.seed, self.rank,
                                              self.device, self.data.state_dict()))
        self.metrics = MetricLogger(cfg.run_dir / "metrics.jsonl", self.rank, self.world, self.device,
                                    build_sinks(cfg, self.rank))
        self.progress = ProgressBar(self.stop_step, self.state.step, self.rank == 0 and cfg.train.progress_bar,
                                    getattr(self.engine.module.visual, "progress_metrics", {}))
        applied = self.applied
        log.info("model %s (%.2fM params) | engine %s | world %d | micro %d x accum %d -> global %d | steps %d of %d "
                 "(%d samples) | device %s | %s %s | attention %s | checkpointed blocks %s | compiled blocks %d",
                 cfg.model.name, self.engine.num_parameters() / 1e6, self.engine.kind, self.world,
                 self.layout.micro_batch_size, self.layout.grad_accum_steps, self.layout.global_batch_size,
                 self.stop_step, self.total_steps, ctx.total_samples, self.device, cfg.train.precision,
                 self.engine.precision_note, cfg.model.attention, applied["checkpointed_blocks"],
                 applied["compiled_blocks"])

    def train_step(self) -> None:
        """One optimizer step: forward and backward of micro batches until the engine steps. Nothing here reads a
        device value on the host: the step's scalars go to the metric logger as device tensors."""
        wait = 0.0
        stepped = False
        while not stepped:
            tw = time.perf_counter()
            with self.syncs.paused():  # data loading is host work, not the device's
                batch = next(self.loader)
            wait += time.perf_counter() - tw
            self.data.update(batch)
            if self.accum is not None:  # accumulation with negatives: both passes once the K micro batches are in
                watch = functools.partial(self.engine.guard.watch_loss, step=self.state.step + 1)  # non-finite guard
                stepped = self.accum.add(batch, self.metrics.add, watch)
            else:
                self.metrics.add(self.forward_backward(batch))
                stepped = self.engine.step()
        self.metrics.add(self.engine.step_metrics())
        self.state.step += 1
        self.timer.add_wait(self.state.step, wait)

    def forward_backward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """One micro batch: forward, contrastive loss (``loss.kind``/``loss.impl``, fp32) + the image tower's extra
        losses, backward.

        Features and ``logit_scale`` are cast to fp32 before the loss, and the scale is clamped at 100
        (CLIP's bound on the inverse temperature, applied in the loss so it holds under any sharding).
        An image tower with ``extra_losses()`` (DTP-ViT's weighted boundary loss) adds them to the loss;
        one with ``last_stats`` (DTP-ViT's shortening factor, boundary rate, segment counts) has them reported.

        Returns:
            Detached fp32 scalars: ``loss`` (contrastive), ``logit_scale`` (and ``logit_bias`` under SigLIP), each
            extra loss, and the tower's stats.
        """
        out = self.engine.forward(*model_inputs(batch, self.device, self.image_stats))
        scale, bias = loss_heads(out)
        loss = self.loss_fn(out["image_features"].float(), out["text_features"].float(), scale, bias)
        visual = self.engine.module.visual
        extras = tower_extra_losses(visual)
        total = loss + sum(v.float() for v in extras.values()) if extras else loss
        self.engine.backward(self.engine.guard.watch_loss(total, self.state.step + 1))  # NaN in, NaN grads
        report = {"loss": loss.detach(), "logit_scale": scale.detach().reshape(-1)[0]}
        if bias is not None:
            report["logit_bias"] = bias.detach().reshape(-1)[0]
        return {**report, **tower_report(visual, extras)}

    def is_log_step(self, step: int) -> bool:
        """Every ``train.log_every_steps``, the first step of this process, the end of the timing warm-up and
        the last step: the steps that read device values on the host."""
        return (step % self.cfg.train.log_every_steps == 0 or step == self.stop_step
                or step == self.state.start_step + 1 or step == self.timer.boundary)

    def log(self) -> None:
        """At a log step: one all-reduce of the interval's scalars (device tensors), the bad-sample counters
        and the stop-file vote (so every rank stops at the same step); the step timer's mark; a metrics line and
        the progress bar's postfix."""
        step, cfg = self.state.step, self.cfg
        if not self.is_log_step(step):
            return
        counters = self.data.counters()
        stop_file = cfg.checkpoint.stop_file
        stop_seen = float(bool(stop_file) and os.path.exists(stop_file))
        reduced = self.metrics.reduce({**{f"counter.{k}": v for k, v in counters.items()}, "stop_votes": stop_seen,
                                       "signal_votes": float(self.supervisor.signalled)})
        bad = {k: int(reduced.pop(f"counter.{k}")) for k in counters}
        # a stop signal on any rank (harness.components.resilience)
        signalled = self.supervisor.agree(reduced.pop("signal_votes"))
        self.state.stop_requested = reduced.pop("stop_votes") > 0 or signalled
        self.state.last_loss = reduced.pop("loss")
        status = self.engine.status()
        self.timer.mark(step)  # the host has waited for the device in the reduction
        step_time, wait = self.timer.interval()
        avg = self.timer.avg_step_time_s() or step_time
        record = {"step": step, "samples_seen": step * self.layout.global_batch_size, "loss": self.state.last_loss,
                  "lr": self.engine.lr(), "step_time_s": step_time, "data_wait_s": wait,
                  "samples_per_s": self.layout.global_batch_size / avg, "epoch": self.data.epoch(),
                  "skipped_samples": bad, **status, **reduced}
        self.metrics.write(record)
        self.progress.show(record)
        self.engine.guard.check(step, status)  # too many non-finite steps in a row: stop (harness.engines.nonfinite)

    def maybe_eval(self, final: bool = False) -> None:
        """Zero-shot evaluation every ``eval.every_steps`` and validation (:mod:`harness.eval.validation`) every
        ``eval.val_every_steps`` (not at the last step), both at the end of a run not stopped by the stop file."""
        cfg, step = self.cfg, self.state.step
        if final and self.state.stop_requested:
            return
        due = lambda every: final or bool(every and step % every == 0 and step < self.stop_step)
        if cfg.data.val_data and due(cfg.eval.val_every_steps):
            with self.engine.full_parameters():
                self.state.validation = validate_clip(
                    self.engine.module, cfg.data.val_data, cfg.model.name, cfg.eval.batch_size, self.device,
                    autocast_dtype(cfg.train.precision), cfg.data.num_workers)
            self.metrics.write({"step": step, **self.state.validation})
            log.info("step %d validation: %s", step, " ".join(f"{k} {v:.4g}" for k, v in self.state.validation.items()))
        if not cfg.eval.zeroshot_data or not due(cfg.eval.every_steps):
            return
        with self.engine.full_parameters():
            self.state.evals = zeroshot_eval(
                self.engine.module, models.get_tokenizer(cfg.model.name), cfg.eval.zeroshot_data,
                models.image_transform(cfg.model.name, is_train=False), cfg.eval.batch_size, self.device,
                autocast_dtype(cfg.train.precision), num_workers=cfg.data.num_workers)
        self.metrics.write({"step": step, **self.state.evals})
        e = self.state.evals
        log.info("step %d zero-shot top-1 %.4f top-5 %.4f on %d images", step, e["zeroshot_top1"],
                 e["zeroshot_top5"], e["zeroshot_images"])

    def maybe_save(self, final: bool = False) -> None:
        """A checkpoint every ``checkpoint.every_steps``; at the end (``checkpoint.save_final``, or a stop by the
        stop file) unless this process took no step or already saved this one."""
        cfg, step = self.cfg, self.state.step
        if final:
            wanted = (cfg.checkpoint.save_final or self.state.stop_requested) and step > self.state.start_step
            if not wanted or self.checkpoints.last_step == step:
                return
        elif not (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            return
        meta = {"step": step, "samples_seen": step * self.layout.global_batch_size, "world_size": self.world,
                "global_batch_size": self.layout.global_batch_size, "total_train_samples": self.ctx.total_samples,
                "engine": self.engine.kind, "config": to_dict(cfg)}
        rank_state = {"rng": ckpt_mod.rng_state(), "data": self.data.state_dict()}
        log.info("checkpoint %s", self.checkpoints.save(self.engine, step, meta, rank_state))

    # ------------------------------------------------------------------ the end

    def device_settings(self) -> Dict[str, Any]:
        """The GPU-relevant settings this run used, for ``summary.json``."""
        cfg, engine = self.cfg, self.engine
        out = {"tf32": bool(cfg.train.tf32 and self.device.type == "cuda"), "optimizer": engine.optimizer_note,
               "data_path": "synthetic on the device" if cfg.data.train_data == "synthetic"
               else f"uint8 via {'pinned' if self.device.type == 'cuda' else 'pageable'} memory"}
        if engine.kind == "fsdp":
            out["fsdp_reduce_dtype"] = cfg.train.fsdp_reduce_dtype if cfg.train.precision != "fp32" else "fp32"
        if engine.kind == "deepspeed":
            zero = engine.ds_config.get("zero_optimization", {})
            out["deepspeed_zero"] = {k: zero[k] for k in ("reduce_bucket_size", "allgather_bucket_size",
                                                          "overlap_comm", "stage3_prefetch_bucket_size",
                                                          "stage3_param_persistence_threshold") if k in zero}
        return out

    def summary(self) -> Optional[Dict[str, Any]]:
        """Reduce peak memory and bad-sample counts over ranks; rank 0 writes and returns ``summary.json``."""
        cfg, layout, device, engine, state = self.cfg, self.layout, self.device, self.engine, self.state
        local_params = local_parameter_elements(engine.module)
        peak, kind = peak_memory_gib(device, self.ctx.mem)
        reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else 0.0
        peak_t, reserved_t = all_reduce_floats([peak, reserved], "max", device)
        counters = self.data.counters()
        bad = {k: int(v) for k, v in zip(counters, all_reduce_floats(list(counters.values()), "sum", device))}
        status = engine.status()
        if self.rank != 0:
            return None
        avg = self.timer.avg_step_time_s()
        summary = {
            "model": cfg.model.name, "engine": engine.kind, "zero_stage": engine.zero_stage,
            "precision": cfg.train.precision, "attention": cfg.model.attention,
            "grad_checkpointing": cfg.model.grad_checkpointing, "compile": cfg.model.compile,
            "stopped_by_stop_file": state.stop_requested and not self.supervisor.stopping,
            "stopped_by_signal": self.supervisor.stopping,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": self.world, "micro_batch_size": layout.micro_batch_size,
            "parameters": engine.num_parameters(), "rank0_local_parameter_elements": local_params,
            "grad_accum_steps": layout.grad_accum_steps, "global_batch_size": layout.global_batch_size,
            "contrastive_batch_size": layout.contrastive_batch_size,
            "steps": state.step, "steps_this_process": state.step - state.start_step, "total_steps": self.total_steps,
            "samples_seen": state.step * layout.global_batch_size, "total_train_samples": self.ctx.total_samples,
            "final_loss": state.last_loss,
            "zeroshot_top1": state.evals.get("zeroshot_top1"), "zeroshot_top5": state.evals.get("zeroshot_top5"),
            "zeroshot_images_per_s": state.evals.get("zeroshot_images_per_s"),
            **state.validation,
            "avg_step_time_s": avg, "timing_warmup_steps_excluded": self.timer.excluded,
            "samples_per_s": layout.global_batch_size / avg if avg else None,
            "data_wait_fraction": self.timer.data_wait_fraction(),
            "peak_mem_gib": peak_t, "peak_mem_kind": kind,
            "peak_reserved_gib": reserved_t if device.type == "cuda" else None,
            "cuda_overhead_gib": self.ctx.cuda_overhead_gib if device.type == "cuda" else None,
            "peak_device_gib": reserved_t + self.ctx.cuda_overhead_gib if device.type == "cuda" else None,
            "device_memory_gib": device_memory_gib(device), "memory_budget_gib": cfg.train.memory_budget_gib,
            "skipped_samples": bad, "skipped_optimizer_steps": status["skipped_optimizer_steps"],
            "nonfinite_steps": status["nonfinite_steps"],
            "run_dir": str(cfg.run_dir), **self.device_settings(),
        }
        if self.syncs.counter is not None:
            summary["host_syncs_by_step"] = self.syncs.by_step
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        return summary
