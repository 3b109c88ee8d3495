"""Plain PyTorch engine: one process, or DDP over the default process group."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from harness.config.job_config import JobConfig
from harness.config.layout import BatchLayout
from harness.distributed.collectives import dist_info
from harness.distributed.hardware import autocast_dtype
from harness.engines.common import ScaleWatch, build_optimizer, make_grad_scaler, num_parameters, optimizer_note
from harness.engines.nonfinite import NonfiniteGuard, total_grad_norm


class LocalEngine:
    """Plain PyTorch: single process, or DDP (the model arrives wrapped by
    :func:`harness.distributed.parallelize.parallelize_clip`).

    Gradient accumulation skips DDP's all-reduce (``no_sync``) on non-boundary micro batches;
    ``bf16``/``fp16`` run the forward under autocast (fp32 master weights; open_clip's ``logit_scale``
    stays an fp32 parameter and the loss is computed in fp32); ``fp16`` adds a dynamic loss scale
    (``GradScaler`` with ``train.loss_scale_init`` and growth every ``train.loss_scale_window`` overflow-free
    steps): a step whose gradients overflow is skipped, the scale halves, and the step is counted in
    ``skipped_optimizer_steps``. Clipping is by global L2 norm (``torch.nn.utils.clip_grad_norm_``). A step whose
    loss or global gradient norm is not finite is skipped on every rank (:mod:`harness.engines.nonfinite`).

    No device value is read on the host in the step: the gradient norm and the overflow count stay on the
    device (with a fused AdamW, ``GradScaler.step`` decides an overflow skip on the device too; a non-fused
    optimizer makes it read one flag).
    """

    kind = "local"
    precision_note = "(autocast)"
    zero_stage = None
    fused_with_loss_scale = True  # fused AdamW honours GradScaler's on-device overflow flag here

    def __init__(self, model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device):
        self.device = device
        self.model = model
        self.module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        fp16 = cfg.train.precision == "fp16"
        self.optimizer = build_optimizer(self.module, cfg, device,
                                         fused=None if self.fused_with_loss_scale or not fp16 else False)
        self.optimizer_note = optimizer_note(self.optimizer)
        self.scheduler = scheduler_fn(self.optimizer)
        self.accum = layout.grad_accum_steps
        self.clip = cfg.optim.grad_clip_norm
        self.dtype = autocast_dtype(cfg.train.precision)
        self.scaler = self._make_scaler(cfg) if fp16 else None
        self.scale_watch = ScaleWatch(self.scaler, device) if self.scaler else None
        self.micro = 0
        self.grad_norm: Optional[torch.Tensor] = None
        self.guard = NonfiniteGuard(device, cfg.train.max_nonfinite_steps, fp16, dist_info()[0])

    def _make_scaler(self, cfg: JobConfig):
        return make_grad_scaler(cfg, self.device.type)

    def _sync_context(self, sync: bool):
        """Context for a micro batch's forward: its backward all-reduces gradients only when ``sync``."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward ``image [B, 3, H, W]``, ``text [B, L]`` -> open_clip output dict."""
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with self._sync_context(self.micro + 1 == self.accum), amp:  # DDP decides on the sync in forward
            return self.model(image, text)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        """Count a micro batch; at the accumulation boundary clip, step optimizer and LR. Returns True then."""
        self.micro += 1
        if self.micro < self.accum:
            return False
        self.micro = 0
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        else:  # the non-finite guard needs the global norm
            self.grad_norm = total_grad_norm(self.module.parameters(), self.device)
        if self.scaler:
            self.scale_watch.before()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scale_watch.after()
            self.guard.count_scaled_step(self.grad_norm)
        else:  # skipped on the device when the global gradient norm is not finite (harness.engines.nonfinite)
            self.guard.optimizer_step(self.optimizer, self.grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        return {"grad_norm": self.grad_norm.detach()} if self.grad_norm is not None else {}

    def status(self) -> Dict[str, Any]:
        """Skipped steps and the fp16 loss scale (reads the device: log steps only)."""
        if not self.scaler:
            return {"skipped_optimizer_steps": 0, "loss_scale": None, **self.guard.status()}
        return {"skipped_optimizer_steps": self.scale_watch.count(), "loss_scale": float(self.scaler.get_scale()),
                **self.guard.status()}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def num_parameters(self) -> int:
        return num_parameters(self.module)

    def full_parameters(self):
        """No sharding here: a no-op context (see :meth:`DeepSpeedEngine.full_parameters`)."""
        return contextlib.nullcontext()

    def save(self, directory: Path, rank: int) -> None:
        """Rank 0 writes ``model.pt``, ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt``) into ``directory``."""
        if rank == 0:
            torch.save(self.module.state_dict(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        self._save_small_states(directory, rank)

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / "model.pt", map_location=self.device))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device))
        self._load_small_states(directory)

    def _save_small_states(self, directory: Path, rank: int) -> None:
        if rank != 0:
            return
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.scaler:
            torch.save(self.scaler.state_dict(), directory / "scaler.pt")

    def _load_small_states(self, directory: Path) -> None:
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))
        if self.scaler and (directory / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(directory / "scaler.pt"))
