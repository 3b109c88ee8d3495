"""Training engines: how one micro batch is forwarded, back-propagated and stepped, per launch mode.

The launch mode comes from the launcher, the job (batch, precision, clipping, schedule) from the
job config:

* ``accelerate launch --config_file ds_configs/zero*.yaml``: Accelerate exports
  ``ACCELERATE_USE_DEEPSPEED`` and the DeepSpeed JSON path; :class:`DeepSpeedEngine` builds the
  DeepSpeed config from that JSON with micro batch, accumulation, global batch, clipping and
  precision filled in from the job config (so YAML, JSON and CLI never disagree) and calls
  ``deepspeed.initialize``. We do not go through ``Accelerator.prepare``: on CPU Accelerate reports
  one process while ``torch.distributed`` has several (``../shared/design/environment.md``), which
  breaks its rank-dependent helpers (sharded data, RNG files, main-process checks).
* ``python train.py`` / ``torchrun`` / ``accelerate launch`` without DeepSpeed: :class:`LocalEngine`,
  plain PyTorch (DDP when the world size is > 1; autocast for bf16; GradScaler for fp16).

Models stay plain ``nn.Module``s; the engine owns the wrapping (torchtitan's order of concerns).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.config import BatchLayout, ConfigError, JobConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
_PRECISION_ENV = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class LaunchInfo:
    """What the launcher asked for.

    Attributes:
        deepspeed: True under an Accelerate DeepSpeed launch config.
        deepspeed_config_path: the JSON named by the launch YAML (``deepspeed_config_file``), or None.
        zero_stage: ZeRO stage from the YAML when it has no JSON, else None.
        launcher_precision: ``mixed_precision`` of the launch YAML mapped to ``fp32|bf16|fp16``, or None.
    """

    deepspeed: bool = False
    deepspeed_config_path: Optional[str] = None
    zero_stage: Optional[int] = None
    launcher_precision: Optional[str] = None


def detect_launch(cfg: JobConfig) -> LaunchInfo:
    """Read the launcher's environment and check it against the job config (no process group needed).

    Raises:
        ConfigError: the launch YAML asks for FSDP (not yet supported), its DeepSpeed JSON is missing
            or defines an optimizer/scheduler, or its ``mixed_precision`` contradicts ``train.precision``.
    """
    env = os.environ
    info = LaunchInfo()
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    if mp and mp != "no":
        info.launcher_precision = _PRECISION_ENV.get(mp, mp)
        if info.launcher_precision != cfg.train.precision:
            raise ConfigError(f"train.precision: the launch config asks for mixed_precision={mp!r} but the job has "
                              f"train.precision={cfg.train.precision!r}; set mixed_precision: 'no' in the launch "
                              "YAML (the job config owns precision) or make them agree")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("launch config: distributed_type FSDP is not supported by this version of the harness; "
                          "use a ds_configs/zero*.yaml launch config")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        info.deepspeed = True
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if path and path != "none":
            resolved = next((p for p in (Path(path), REPO_ROOT / path) if p.is_file()), None)
            if resolved is None:
                raise ConfigError(f"launch config: deepspeed_config_file {path!r} not found (relative paths are "
                                  f"tried from the working directory and from {REPO_ROOT})")
            info.deepspeed_config_path = str(resolved)
            base = json.loads(resolved.read_text())
            for key in ("optimizer", "scheduler"):
                if key in base:
                    raise ConfigError(f"launch config: {resolved} defines {key!r}; the job config owns the optimizer "
                                      "and LR schedule (optim.*), remove that section")
        else:
            info.zero_stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return info


def init_distributed(launch: LaunchInfo) -> tuple:
    """Create the process group if the launcher started several processes; return ``(rank, world, device)``.

    Backend: NCCL on CUDA, gloo on CPU (DeepSpeed picks the same through ``deepspeed.init_distributed``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launch.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=timedelta(minutes=30))
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


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


def build_optimizer(model: nn.Module, cfg: JobConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``optim.*`` hyper-parameters."""
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """``torch.bfloat16`` / ``torch.float16`` for ``bf16`` / ``fp16``, None for ``fp32``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def num_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``, full size even when ZeRO-3 has partitioned them (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)


def local_parameter_elements(module: nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (``ds_tensor``), else every parameter."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


class LocalEngine:
    """Plain PyTorch: single process, or DDP over the default process group.

    Gradient accumulation skips DDP's all-reduce (``no_sync``) on non-boundary micro batches;
    ``bf16`` runs the forward under autocast (fp32 master weights); ``fp16`` adds a dynamic
    ``GradScaler`` (CUDA only). Clipping is by global L2 norm (``torch.nn.utils.clip_grad_norm_``).
    """

    kind = "local"

    def __init__(self, model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device):
        self.device = device
        self.module = model.to(device)
        self.optimizer = build_optimizer(self.module, cfg)
        self.scheduler = scheduler_fn(self.optimizer)
        self.accum = layout.grad_accum_steps
        self.clip = cfg.optim.grad_clip_norm
        self.dtype = autocast_dtype(cfg.train.precision)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.ddp = dist.is_initialized() and dist.get_world_size() > 1
        self.model = nn.parallel.DistributedDataParallel(self.module) if self.ddp else self.module
        self.micro = 0
        self.grad_norm: Optional[float] = None
        self.skipped_steps = 0

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward ``image [B, 3, H, W]``, ``text [B, L]`` -> open_clip output dict."""
        sync = self.micro + 1 == self.accum
        ctx = self.model.no_sync() if (self.ddp and not sync) else contextlib.nullcontext()
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx, amp:
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
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def num_parameters(self) -> int:
        return num_parameters(self.module)

    def full_parameters(self):
        """No sharding here: a no-op context (see :meth:`DeepSpeedEngine.full_parameters`)."""
        return contextlib.nullcontext()

    def save(self, directory: Path, rank: int) -> None:
        """Rank 0 writes ``model.pt``, ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt``) into ``directory``."""
        if rank != 0:
            return
        torch.save(self.module.state_dict(), directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.scaler:
            torch.save(self.scaler.state_dict(), directory / "scaler.pt")

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / "model.pt", map_location=self.device))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))
        if self.scaler and (directory / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(directory / "scaler.pt"))


def deepspeed_config(base: Dict[str, Any], cfg: JobConfig, layout: BatchLayout) -> Dict[str, Any]:
    """The DeepSpeed config: ``base`` (the launch JSON) with the job's batch, clipping and precision.

    Values in ``base`` for these keys are replaced (``"auto"`` or not); a differing explicit value is
    logged so the user sees which one wins (the job config).
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
    out["bf16"] = {**out.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    fp16 = {k: v for k, v in out.get("fp16", {}).items() if v != "auto"}
    out["fp16"] = {**fp16, "enabled": cfg.train.precision == "fp16"}
    out["zero_allow_untested_optimizer"] = True  # our client AdamW (torch.optim) under ZeRO
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("wall_clock_breakdown", False)
    return out


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the model, our AdamW and our sample-keyed LR schedule.

    DeepSpeed performs accumulation (``gradient_accumulation_steps``), clipping, loss scaling and
    the ZeRO partitioning given by the launch JSON's ``zero_optimization``.
    """

    kind = "deepspeed"

    def __init__(self, model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device,
                 launch: LaunchInfo):
        import deepspeed

        base: Dict[str, Any] = {}
        if launch.deepspeed_config_path:
            base = json.loads(Path(launch.deepspeed_config_path).read_text())
        else:
            base = {"zero_optimization": {"stage": launch.zero_stage or 0}}
        self.ds_config = deepspeed_config(base, cfg, layout)
        self.device = device
        model = model.to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = scheduler_fn(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.module = self.engine.module
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.dtype = autocast_dtype(cfg.train.precision)
        self.grad_norm: Optional[float] = None

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.dtype is not None:
            image = image.to(self.dtype)  # DeepSpeed keeps half-precision weights; inputs must match
        return self.engine(image, text)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else None
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


def build_engine(model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device,
                 launch: LaunchInfo):
    """:class:`DeepSpeedEngine` under a DeepSpeed launch, else :class:`LocalEngine`."""
    if launch.deepspeed:
        return DeepSpeedEngine(model, cfg, layout, scheduler_fn, device, launch)
    return LocalEngine(model, cfg, layout, scheduler_fn, device)
