"""DeepSpeed engine: ``deepspeed.initialize`` around the model, our AdamW and our sample-keyed LR schedule.

Under ``accelerate launch --config_file ds_configs/zero*.yaml`` Accelerate exports ``ACCELERATE_USE_DEEPSPEED``
and the DeepSpeed JSON path; the DeepSpeed config is that JSON with micro batch, accumulation, global batch,
clipping and precision filled in from the job config (so YAML, JSON and CLI never disagree). We do not go
through ``Accelerator.prepare``: on CPU Accelerate reports one process while ``torch.distributed`` has several
(its backend detection has no CPU path for DeepSpeed), which breaks its rank-dependent helpers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from harness.config.job_config import JobConfig
from harness.config.layout import BatchLayout
from harness.distributed.collectives import dist_info
from harness.distributed.launch import LaunchInfo
from harness.engines.common import ScaleWatch, build_optimizer, make_grad_scaler, num_parameters, optimizer_note
from harness.engines.nonfinite import NonfiniteGuard, total_grad_norm

log = logging.getLogger(__name__)


def deepspeed_precision(cfg: JobConfig, zero_stage: int, base: Dict[str, Any]) -> Dict[str, Any]:
    """``train.precision`` as DeepSpeed config sections (``bf16``, ``fp16``, ``torch_autocast``).

    * ``fp32``: all off.
    * ``bf16``: ``torch_autocast`` (bfloat16). The module keeps fp32 parameters (so CLIP's ``logit_scale``
      is fp32 in the forward), matmuls/convolutions run in bf16 and their gradients are reduced in bf16.
      DeepSpeed's native ``bf16`` mode would instead cast every parameter, ``logit_scale`` included, to a
      bf16 working copy.
    * ``fp16`` with ZeRO 1-3: DeepSpeed's native fp16 with dynamic loss scaling (``initial_scale_power`` =
      log2 ``train.loss_scale_init``, ``loss_scale_window`` = ``train.loss_scale_window``, ``hysteresis`` 1:
      every overflow halves the scale); overflowing steps are skipped and counted (``skipped_steps``). The
      module holds an fp16 working copy of every parameter (fp32 master weights in the optimizer); the
      loss is computed in fp32.
    * ``fp16`` with ZeRO-0: ``torch_autocast`` (float16) with DeepSpeed's ``GradScaler`` (DeepSpeed's native
      fp16 at stage 0 with a client optimizer does not scale the loss in ``backward`` but unscales in
      ``step``: checked with DeepSpeed 0.19.8).

    Explicit values in ``base`` for the loss-scale keys are kept; ``"auto"`` ones are filled.
    """
    precision = cfg.train.precision
    out: Dict[str, Any] = {"bf16": {"enabled": False}, "fp16": {"enabled": False},
                           "torch_autocast": {"enabled": False}}
    if precision == "bf16" or (precision == "fp16" and zero_stage == 0):
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    elif precision == "fp16":
        fp16 = {k: v for k, v in base.get("fp16", {}).items() if v != "auto"}
        out["fp16"] = {"initial_scale_power": int(math.log2(cfg.train.loss_scale_init)),
                       "loss_scale_window": cfg.train.loss_scale_window, "hysteresis": 1, "min_loss_scale": 1,
                       **fp16, "enabled": True}
    return out


def uses_cpu_offload(ds_config: Dict[str, Any]) -> bool:
    """True when the DeepSpeed config offloads the optimizer (``offload_optimizer.device`` cpu or nvme)."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


BUCKET_MIN, BUCKET_MAX = 2 ** 22, 5 * 10 ** 8  # elements: 16 MiB of fp32; DeepSpeed's own default


def bucket_sizes(num_params: int) -> Dict[str, int]:
    """``"auto"`` ZeRO communication sizes from the model's parameter count ``P`` (elements):
    ``reduce_bucket_size`` = ``allgather_bucket_size`` = P / 16 within [4M, 5e8] (about 16 reductions per backward,
    so they overlap with it, and a few hundred MB of buckets at most: DeepSpeed's fixed 5e8 is 1.86 GiB per fp32
    buffer, and ZeRO-1/2 under ``torch_autocast`` keep two per communication dtype, 7.45 GiB, whatever the model);
    ``stage3_prefetch_bucket_size`` = P / 32 (about one transformer block ahead). Accelerate and transformers fill
    the same keys from ``hidden_size`` squared."""
    bucket = int(min(BUCKET_MAX, max(BUCKET_MIN, num_params // 16)))
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": int(min(BUCKET_MAX, max(BUCKET_MIN // 4, num_params // 32)))}


def deepspeed_config(base: Dict[str, Any], cfg: JobConfig, layout: BatchLayout, num_params: int) -> Dict[str, Any]:
    """The DeepSpeed config: ``base`` (the launch JSON) with the job's batch, clipping and precision
    (:func:`deepspeed_precision`), and ``"auto"`` bucket sizes from the parameter count (:func:`bucket_sizes`).

    Values in ``base`` for batch and clipping are replaced (``"auto"`` or not); a differing explicit
    value is logged so the user sees which one wins (the job config).
    """
    out = json.loads(json.dumps(base))
    job = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
    }
    for key, value in job.items():
        if key in out and out[key] not in ("auto", value):
            log.warning("deepspeed config: %s=%r replaced by the job config's %r", key, out[key], value)
        out[key] = value
    out.update(deepspeed_precision(cfg, out.get("zero_optimization", {}).get("stage", 0), out))
    zero = out.setdefault("zero_optimization", {})
    for key, value in bucket_sizes(num_params).items():
        if zero.get(key) == "auto":
            zero[key] = value
    out["zero_allow_untested_optimizer"] = True  # our client AdamW (torch.optim) under ZeRO
    # DeepSpeed's throughput timer synchronises the device at every forward and step: off unless asked for
    out.setdefault("timers", {"throughput": {"enabled": False}})
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("wall_clock_breakdown", False)
    return out


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the model, our AdamW and our sample-keyed LR schedule.

    DeepSpeed performs accumulation (``gradient_accumulation_steps``), clipping, loss scaling and
    the ZeRO partitioning given by the launch JSON's ``zero_optimization``.
    """

    kind = "deepspeed"
    precision_note = "(DeepSpeed native)"

    def __init__(self, model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device,
                 launch: LaunchInfo):
        import deepspeed

        base: Dict[str, Any] = {"zero_optimization": {"stage": launch.zero_stage or 0}}
        if launch.deepspeed_config_path:
            base = json.loads(Path(launch.deepspeed_config_path).read_text())
        self.ds_config = deepspeed_config(base, cfg, layout, num_parameters(model))
        self.device = device
        optimizer = build_optimizer(model, cfg, device, cpu_offload=uses_cpu_offload(self.ds_config))
        self.optimizer_note = optimizer_note(optimizer)
        scheduler = scheduler_fn(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.module = self.engine.module
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        # native fp16 keeps half-precision weights, so inputs must be cast; torch_autocast keeps fp32 weights
        self.input_dtype = torch.float16 if self.ds_config["fp16"]["enabled"] else None
        self.grad_scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        self.scale_watch = None
        if self.grad_scaler is not None:  # DeepSpeed builds it with torch's defaults: use the job's loss scale
            self.grad_scaler = self.engine.torch_autocast_z0_gradscaler = make_grad_scaler(cfg, device.type)
            self.scale_watch = ScaleWatch(self.grad_scaler, device)
        self.grad_norm: Optional[torch.Tensor] = None
        fp16 = cfg.train.precision == "fp16"
        self.guard = NonfiniteGuard(device, cfg.train.max_nonfinite_steps, fp16, dist_info()[0])

    def status(self) -> Dict[str, Any]:
        """Skipped steps (DeepSpeed's count, or the ZeRO-0 scaler's) and the fp16 loss scale (log steps only)."""
        skipped = int(getattr(self.engine, "skipped_steps", 0))
        if self.scale_watch is not None:
            return {"skipped_optimizer_steps": skipped + self.scale_watch.count(),
                    "loss_scale": float(self.grad_scaler.get_scale()), **self.guard.status()}
        scale = float(self.engine.optimizer.loss_scale) if self.ds_config["fp16"]["enabled"] else None
        return {"skipped_optimizer_steps": skipped, "loss_scale": scale, **self.guard.status()}

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        return {"grad_norm": self.grad_norm} if self.grad_norm is not None else {}

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.input_dtype is not None:
            image = image.to(self.input_dtype)
        return self.engine(image, text)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """DeepSpeed's step. Its own host reads per step (ZeRO 1-3 check the gradient norm for inf/nan; native
        fp16 checks overflow) remain; the throughput timer's synchronisations are switched off in the config."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        watch = self.scale_watch if boundary else None
        if watch is not None:
            watch.before()
        skipped_before, zero0_norm = self.engine.skipped_steps, None
        if boundary and self.zero_stage == 0 and watch is None:  # ZeRO-0 does not skip by itself: our AdamW does
            zero0_norm = total_grad_norm(self.module.parameters(), self.device)
            self.guard.optimizer_step(self.engine.optimizer, zero0_norm, self.engine.step)
        else:
            self.engine.step()
        if watch is not None:
            watch.after()
        if boundary:
            skipped = self.engine.skipped_steps > skipped_before
            # DeepSpeed does not advance the LR schedule on a skip; the harness does (harness.engines.nonfinite)
            if skipped:
                self.scheduler.step()
            norm = self.engine.get_global_grad_norm()  # a device tensor at ZeRO 1-3, the float inf after a skip
            if isinstance(norm, torch.Tensor):
                self.grad_norm = norm.detach().float().reshape(())
            elif norm is not None:  # a device fill from a host float: no sync
                self.grad_norm = torch.full((), float(norm), device=self.device)
            if zero0_norm is None:
                self.guard.count_external_step(skipped, self.grad_norm)
            else:  # ZeRO-0 reports no norm: the one the guard computed (before clipping, as the others)
                self.grad_norm = zero0_norm.detach().float().reshape(())
        return boundary

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def num_parameters(self) -> int:
        return num_parameters(self.module)

    def full_parameters(self):
        """Context in which every rank holds the full parameters (ZeRO-3 gathers them; a no-op below
        stage 3). For calls that bypass the root module's forward, e.g. ``encode_text`` in zero-shot
        eval, which reads root-level parameters such as ``positional_embedding``."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def save(self, directory: Path, rank: int) -> None:
        """All ranks write their ZeRO partitions under ``directory/deepspeed`` (collective)."""
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint.resume: DeepSpeed found no checkpoint in {directory}")
