"""Pieces every engine shares: AdamW with open_clip's parameter groups, the fp16 loss scale, parameter counts."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from harness.config.job_config import JobConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups as in open_clip: no weight decay for biases, norm gains, embeddings' scalars and
    ``logit_scale`` (parameters with fewer than 2 dims or named ``*bn*``/``*ln*``/``*bias*``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device, cpu_offload: bool = False,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``optim.*`` hyper-parameters: ``torch.optim.AdamW`` (fused with
    ``optim.fused``: one kernel, no host reads of step counters or of the fp16 overflow flag), or with
    ``cpu_offload`` (ZeRO-Offload: the step runs on the CPU where the offloaded
    states live) DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode, whose C++ op is built on first use (about 50 s
    on a 2-core machine; cached in ``~/.cache/torch_extensions``). ``fused`` overrides ``optim.fused``."""
    o = cfg.optim
    groups, hyper = param_groups(model, o.weight_decay), dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, weight_decay=o.weight_decay, adamw_mode=True, **hyper)
    return torch.optim.AdamW(groups, fused=(cfg.optim.fused if fused is None else fused) or None, **hyper)


def optimizer_note(optimizer: torch.optim.Optimizer) -> str:
    """``"AdamW (fused)"``, ``"AdamW (foreach)"``, ``"DeepSpeedCPUAdam"``...: what steps the parameters."""
    name = type(optimizer).__name__
    impl = next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), None)
    return f"{name} ({impl})" if impl else name


class ScaleWatch:
    """Counts optimizer steps skipped by a dynamic loss scale on the device: a step whose scale went down was an
    overflow (``GradScaler`` halves the scale then). Call :meth:`before` before ``scaler.step`` and :meth:`after`
    after ``scaler.update``; :meth:`count` reads the device (log steps only)."""

    def __init__(self, scaler, device: torch.device):
        self.scaler = scaler
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._prev: Optional[torch.Tensor] = None

    def before(self) -> None:
        self._prev = self.scaler._get_scale_async().detach().clone()

    def after(self) -> None:
        self.skipped += (self.scaler._get_scale_async() < self._prev).to(torch.int64).reshape(())

    def count(self) -> int:
        return int(self.skipped.item())


def make_grad_scaler(cfg: JobConfig, device_type: str, scaler_cls=None):
    """The fp16 dynamic loss scale of the job config: ``scaler_cls`` (default ``torch.amp.GradScaler``;
    FSDP2 passes ``ShardedGradScaler``) starting at ``train.loss_scale_init``, doubling after
    ``train.loss_scale_window`` overflow-free steps."""
    cls = scaler_cls or torch.amp.GradScaler
    return cls(device_type, init_scale=cfg.train.loss_scale_init, growth_interval=cfg.train.loss_scale_window)


def num_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``, full size even when ZeRO-3 (``ds_numel``) or FSDP2 (a DTensor's
    ``numel()`` is the global size) has sharded them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)


def local_parameter_elements(module: nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (``ds_tensor``), its FSDP2 shards
    (``to_local()``), else every parameter."""
    def local(p):
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return sum(local(p) for p in module.parameters())
