"""``harness lr-find``: the learning-rate range test on the real trainer, under any engine and launch.

The LR grows exponentially from ``--start-lr`` to ``--end-lr`` over ``--steps`` optimizer steps (Smith,
"Cyclical Learning Rates for Training Neural Networks", 2017, section 3.3; the exponential form of fastai's
``lr_find`` and torch-lr-finder's ``LRFinder.range_test``, ``davidtvs/pytorch-lr-finder``). Each step's loss is
the trainer's own (reduced over ranks at every step), smoothed by a bias-corrected exponential moving average
(fastai's ``SmoothenValue``: ``avg = beta avg + (1 - beta) loss``, reported as ``avg / (1 - beta^(k+1))``); the
test stops early once the smoothed loss exceeds ``--diverge`` x its best (fastai: 4) or a loss is not finite.
The suggestion is torch-lr-finder's ``suggestion``: the LR of the steepest descent of the smoothed loss,
``argmin(np.gradient(smoothed))`` after trimming ``--skip-start`` / ``--skip-end`` points (its defaults 10 / 5).

It reuses :class:`harness.train.trainer.Trainer` with its LR schedule replaced (``scheduler_fn``) and stops the loop
itself, so the batch layout, engine (plain, DDP, DeepSpeed ZeRO 0-3, FSDP2), precision and data are those of
``train.py`` with the same flags; checkpoints and evaluation are off. Under a launcher::

    accelerate launch --config_file ds_configs/zero2.yaml -m harness.cli lr-find --out runs/lr_find

Outputs in ``--out`` (refused when it already holds anything): ``lr_find.json`` (suggestion, every step's LR,
loss and smoothed loss), ``lr_find.png`` (loss against LR, log x, suggestion marked) and the run folder ``run/``
(``metrics.jsonl``, ``train.log``, ``summary.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from harness.config.job_config import JobConfig
from harness.config.layout import batch_layout, launch_world_size
from harness.core.errors import ConfigError
from harness.train.job import run
from harness.train.trainer import RunContext, Trainer

log = logging.getLogger("harness")


@dataclass(frozen=True)
class LRSweep:
    """The range test's settings.

    Attributes:
        start_lr, end_lr: LR of the first and of the last planned optimizer step.
        steps: planned optimizer steps (the sweep may stop earlier on divergence).
        beta: smoothing of the loss's exponential moving average (fastai 0.98).
        diverge: stop when the smoothed loss exceeds this multiple of its best so far.
        skip_start, skip_end: points left out at either end when looking for the steepest descent.
    """

    start_lr: float = 1e-7
    end_lr: float = 1.0
    steps: int = 200
    beta: float = 0.98
    diverge: float = 4.0
    skip_start: int = 10
    skip_end: int = 5

    def lr(self, k: int) -> float:
        """LR of optimizer step ``k`` (0-based): ``start_lr * (end_lr / start_lr) ** (k / (steps - 1))``."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (k / max(self.steps - 1, 1))

    def check(self) -> None:
        """Raises ConfigError naming the flag of the first invalid setting."""
        checks = [("--start-lr", self.start_lr > 0, "must be > 0"),
                  ("--end-lr", self.end_lr > self.start_lr, f"must be greater than --start-lr ({self.start_lr:g})"),
                  ("--steps", self.steps >= self.skip_start + self.skip_end + 3,
                   f"must be at least --skip-start + --skip-end + 3 = {self.skip_start + self.skip_end + 3}"),
                  ("--beta", 0 <= self.beta < 1, "must be in [0, 1)"),
                  ("--diverge", self.diverge > 1, "must be > 1"),
                  ("--skip-start", self.skip_start >= 0, "must be >= 0"),
                  ("--skip-end", self.skip_end >= 0, "must be >= 0")]
        for flag, ok, need in checks:
            if not ok:
                raise ConfigError(f"{flag}: {need}")


def smoothed(losses: List[float], beta: float) -> List[float]:
    """Bias-corrected exponential moving average of ``losses`` (fastai's ``SmoothenValue``)."""
    out, avg = [], 0.0
    for k, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (k + 1)))
    return out


def steepest_descent(values: List[float], skip_start: int, skip_end: int) -> Optional[int]:
    """Index (into ``values``) of the most negative ``np.gradient`` of ``values[skip_start:len - skip_end]``
    (torch-lr-finder's suggestion; with an exponential sweep the gradient per step is the gradient per
    log-LR up to a constant), or None with fewer than 3 points left."""
    kept = values[skip_start:len(values) - skip_end]
    if len(kept) < 3:
        return None
    return skip_start + int(np.argmin(np.gradient(np.asarray(kept, dtype=np.float64))))


class LRFindTrainer(Trainer):
    """The trainer with the sweep's exponential LR schedule, recording each step's (LR, loss) and stopping when
    the smoothed loss diverges; rank 0 writes the results to ``out`` at the end.

    Every rank reaches the same stop decision: the recorded loss is the all-reduced mean over ranks.
    """

    def __init__(self, ctx: RunContext, sweep: LRSweep, out: Path, command: str):
        factor = lambda k: sweep.lr(k) / sweep.start_lr  # the optimizer's base LR is start_lr
        super().__init__(ctx, scheduler_fn=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.sweep, self.out, self.command = sweep, Path(out), command
        self.lrs: List[float] = []
        self.losses: List[float] = []
        self.stopped_early = False

    def log(self) -> None:
        super().log()  # train.log_every_steps is 1: every step's loss, reduced over ranks
        self.lrs.append(self.sweep.lr(self.state.step - 1))
        self.losses.append(self.state.last_loss)
        smooth = smoothed(self.losses, self.sweep.beta)
        if not math.isfinite(self.state.last_loss) or smooth[-1] > self.sweep.diverge * min(smooth):
            log.info("lr-find: the loss diverged at step %d (LR %.3g); stopping", self.state.step, self.lrs[-1])
            self.stopped_early = True
            self.stop_step = self.state.step

    def train(self):
        summary = super().train()
        if self.rank == 0:
            result = write_results(self, summary or {})
            log.info("lr-find: suggested LR %s (steepest descent of the smoothed loss); %s", result["suggested_lr"],
                     self.out / "lr_find.png")
        return summary


def write_results(trainer: LRFindTrainer, summary: dict) -> dict:
    """``lr_find.json`` and ``lr_find.png`` in ``trainer.out``; returns the JSON's content."""
    sweep = trainer.sweep
    smooth = smoothed(trainer.losses, sweep.beta)
    best = steepest_descent(smooth, sweep.skip_start, sweep.skip_end)
    finite = [i for i, v in enumerate(smooth) if math.isfinite(v)]
    result = {
        "suggested_lr": trainer.lrs[best] if best is not None else None,
        "suggestion": "steepest descent of the smoothed loss (torch-lr-finder's suggestion)",
        "min_smoothed_loss_lr": trainer.lrs[min(finite, key=lambda i: smooth[i])] if finite else None,
        "start_lr": sweep.start_lr, "end_lr": sweep.end_lr, "steps_planned": sweep.steps,
        "steps_run": len(trainer.losses), "stopped_early": trainer.stopped_early, "diverge_factor": sweep.diverge,
        "smoothing_beta": sweep.beta, "skip_start": sweep.skip_start, "skip_end": sweep.skip_end,
        **{k: summary.get(k) for k in ("model", "engine", "zero_stage", "precision", "world_size", "micro_batch_size",
                                       "global_batch_size", "contrastive_batch_size", "avg_step_time_s")},
        "command": trainer.command,
        "lrs": trainer.lrs, "losses": trainer.losses, "smoothed_losses": smooth,
    }
    (trainer.out / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, trainer.out / "lr_find.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Loss and smoothed loss against LR (log x), the suggestion marked, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, raw, smooth = result["lrs"], result["losses"], result["smoothed_losses"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, raw, color="tab:blue", alpha=0.3, lw=1, label="loss (each step)")
    ax.plot(lrs, smooth, color="tab:blue", lw=2, label=f"smoothed (EMA, beta {result['smoothing_beta']:g})")
    if result["suggested_lr"] is not None:
        i = lrs.index(result["suggested_lr"])
        ax.axvline(lrs[i], color="tab:red", ls="--", lw=1)
        ax.scatter([lrs[i]], [smooth[i]], color="tab:red", s=60, zorder=3,
                   label=f"suggestion {lrs[i]:.2e} (steepest descent)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("contrastive loss")
    finite = [v for v in raw if math.isfinite(v)]
    if finite:  # keep the diverging tail from squashing the curve
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 1.5 * max(smooth[:5] or finite)))
    stop = f", stopped early at step {result['steps_run']}" if result["stopped_early"] else ""
    ax.set_title(f"LR range test: {result['model']}, {result['engine']} x{result['world_size']}, "
                 f"global batch {result['global_batch_size']}{stop}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_find_config(cfg: JobConfig, sweep: LRSweep, out: Path) -> JobConfig:
    """``cfg`` set up for the sweep: ``steps`` optimizer steps of the configured global batch, the run folder
    ``out/run``, base LR ``start_lr``, every step logged, no checkpoints, evaluation or resume."""
    layout = batch_layout(cfg.train, cfg.train.emulate_world_size or launch_world_size())
    r = dataclasses.replace
    return r(cfg, output_dir=str(out), run_name="run",
             train=r(cfg.train, train_samples=sweep.steps * layout.global_batch_size, epochs=None, max_steps=None,
                     log_every_steps=1),
             optim=r(cfg.optim, lr=sweep.start_lr, warmup_samples=0),
             data=r(cfg.data, val_data=None),
             checkpoint=r(cfg.checkpoint, every_steps=0, save_final=False, resume=None, stop_file=None),
             eval=r(cfg.eval, zeroshot_data=None))


def run_lr_find(cfg: JobConfig, sweep: LRSweep, out: Path, command: str = "") -> Optional[dict]:
    """Run the sweep with the trainer of ``cfg`` (every rank calls it); returns rank 0's training summary.

    Raises:
        ConfigError: ``--out`` already holds something (nothing is overwritten), or the config is invalid;
            before any process group.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} already exists and is not an empty folder; choose a new one "
                          "(nothing was overwritten)")
    job = lr_find_config(cfg, sweep, out)
    return run(job, make_trainer=lambda ctx: LRFindTrainer(ctx, sweep, out, command))


def parse_args(argv: List[str]) -> Tuple[Callable[[JobConfig], Optional[dict]], List[str]]:
    """Split ``harness lr-find`` arguments into the sweep's own and the training flags (``train.py``'s).

    Returns:
        ``(runner, training arguments)``: ``runner(cfg)`` runs the sweep on the config built from the rest.

    Raises:
        ConfigError: a sweep setting is invalid (named by its flag).
    """
    d = LRSweep()
    p = argparse.ArgumentParser(
        prog="harness lr-find", allow_abbrev=False,
        description="LR range test on the real trainer: an exponential LR sweep, the smoothed loss, the LR of its "
        "steepest descent, a plot. Any train.py flag or section.field=value sets the job (model, data, batch, "
        "precision); run under `accelerate launch --config_file ds_configs/<cfg>.yaml -m harness.cli lr-find` "
        "for DeepSpeed/FSDP.")
    p.add_argument("--out", required=True, help="new folder for lr_find.json, lr_find.png and the run")
    p.add_argument("--start-lr", type=float, default=d.start_lr, help=f"LR of the first step (default {d.start_lr:g})")
    p.add_argument("--end-lr", type=float, default=d.end_lr, help=f"LR of the last step (default {d.end_lr:g})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps of the sweep (default {d.steps})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"loss smoothing (EMA) factor (default {d.beta:g})")
    p.add_argument("--diverge", type=float, default=d.diverge,
                   help=f"stop when the smoothed loss exceeds this x its best (default {d.diverge:g})")
    p.add_argument("--skip-start", type=int, default=d.skip_start, help="points ignored at the start for the "
                   f"suggestion (default {d.skip_start})")
    p.add_argument("--skip-end", type=int, default=d.skip_end, help="points ignored at the end for the suggestion "
                   f"(default {d.skip_end})")
    args, rest = p.parse_known_args(argv)
    sweep = LRSweep(args.start_lr, args.end_lr, args.steps, args.beta, args.diverge, args.skip_start, args.skip_end)
    sweep.check()
    command = " ".join(["harness", "lr-find", *argv])
    return (lambda cfg: run_lr_find(cfg, sweep, Path(args.out), command)), rest

