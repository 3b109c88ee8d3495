"""Training engines behind one typed protocol: how a micro batch is forwarded, back-propagated and stepped.

* :class:`harness.engines.local.LocalEngine`: plain PyTorch, one process or DDP (autocast for bf16,
  ``GradScaler`` for fp16);
* :class:`harness.engines.fsdp.FSDPEngine`: FSDP2 (``fully_shard``) with the same step semantics;
* :class:`harness.engines.deepspeed.DeepSpeedEngine`: ``deepspeed.initialize`` with the job's batch, clipping
  and precision filled into the launch JSON.

Engines receive a model that :func:`harness.distributed.parallelize.parallelize_clip` has made ready (checkpointing,
compile, FSDP2 or DDP, in torchtitan's order); DeepSpeed wraps its own. The trainer only talks to the
:class:`Engine` protocol, never to an engine's kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from harness.config.job_config import JobConfig
from harness.config.layout import BatchLayout
from harness.distributed.launch import LaunchInfo


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs of an engine.

    Attributes:
        kind: ``"local"``, ``"fsdp"`` or ``"deepspeed"`` (reported in ``summary.json``).
        precision_note: how the precision is applied, for the start-up log line.
        zero_stage: the DeepSpeed ZeRO stage, None for the other engines.
        module: the unwrapped ``nn.Module`` (parameters, ``visual``, state dicts).
        optimizer_note: the optimizer and its implementation (``"AdamW (fused)"``), for the summary.
        guard: the :class:`harness.engines.nonfinite.NonfiniteGuard` that skips and counts non-finite steps in
        :meth:`step`.

    The step reads no device value on the host: what it measures stays on the device (:meth:`step_metrics`)
    until a log step asks for it (:meth:`status`).
    """

    kind: str
    precision_note: str
    zero_stage: Optional[int]
    module: nn.Module
    optimizer_note: str
    guard: Any

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``image [B, 3, H, W]``, ``text [B, L]`` -> open_clip's output dict (features, ``logit_scale``)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro batch's loss (scaled for accumulation and fp16 by the engine)."""

    def step(self) -> bool:
        """Count a micro batch; at the accumulation boundary clip, step the optimizer and the LR schedule.
        Returns True when an optimizer step was taken (or skipped for overflow)."""

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        """Device scalars of the last optimizer step (``grad_norm``: the global gradient L2 norm), not read on
        the host; empty where the engine does not compute them."""

    def status(self) -> Dict[str, Any]:
        """``{"skipped_optimizer_steps": int, "loss_scale": float or None, "nonfinite_steps": int,
        "nonfinite_in_a_row": int}``: reads device values and all-reduces, so only at log steps, saves and the end
        (on every rank)."""

    def lr(self) -> float:
        """The LR of the next optimizer step."""

    def num_parameters(self) -> int:
        """Trainable parameters, full size even when sharded."""

    def full_parameters(self) -> ContextManager:
        """A context in which every rank holds the full parameters (for calls that bypass ``forward``)."""

    def save(self, directory: Path, rank: int) -> None:
        """Write this rank's share of model, optimizer and schedule state into ``directory`` (collective)."""

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote."""


SchedulerFn = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def build_engine(model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn: SchedulerFn,
                 device: torch.device, launch: LaunchInfo) -> Engine:
    """The engine of this launch around a model prepared by :func:`harness.distributed.parallelize.parallelize_clip`:
    DeepSpeed under a DeepSpeed launch config, FSDP2 under an FSDP one, else plain PyTorch / DDP."""
    if launch.deepspeed:
        from harness.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, layout, scheduler_fn, device, launch)
    if launch.fsdp:
        from harness.engines.fsdp import FSDPEngine

        return FSDPEngine(model, cfg, layout, scheduler_fn, device)
    from harness.engines.local import LocalEngine

    return LocalEngine(model, cfg, layout, scheduler_fn, device)
