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
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.config import GIB, BatchLayout, ConfigError, JobConfig

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
        fsdp: True under an Accelerate FSDP launch config (FSDP2, applied by :mod:`harness.fsdp`).
        fsdp_reshard_after_forward: the YAML's ``fsdp_reshard_after_forward`` (True: full shard).
    """

    deepspeed: bool = False
    deepspeed_config_path: Optional[str] = None
    zero_stage: Optional[int] = None
    launcher_precision: Optional[str] = None
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True


def detect_launch(cfg: JobConfig) -> LaunchInfo:
    """Read the launcher's environment and check it against the job config (no process group needed).

    Raises:
        ConfigError: the launch YAML asks for FSDP version 1 or for FSDP features the job config owns
            (activation checkpointing) or that are not supported (parameter offload), its DeepSpeed JSON
            is missing or defines an optimizer/scheduler, its ``mixed_precision`` contradicts
            ``train.precision``, or ``train.emulate_world_size`` is set for several processes or without
            a DeepSpeed/FSDP launch config.
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
        info.fsdp = True
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(f"launch config: fsdp_config.fsdp_version {env.get('FSDP_VERSION', '1')!r} is not "
                              "supported; set fsdp_version: 2 (FSDP2, see ds_configs/fsdp.yaml)")
        if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise ConfigError("launch config: fsdp_config.fsdp_offload_params is not supported; use "
                              "ds_configs/zero3_offload.yaml for parameter offload to CPU")
        if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
            raise ConfigError("launch config: fsdp_config.fsdp_activation_checkpointing: set it to false and use "
                              "model.grad_checkpointing=K (both towers, every K-th block)")
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
        if reshard not in ("true", "false"):
            raise ConfigError(f"launch config: fsdp_config.fsdp_reshard_after_forward must be true or false, got "
                              f"{reshard!r}")
        info.fsdp_reshard_after_forward = reshard == "true"
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
    if cfg.train.emulate_world_size:
        if int(env.get("WORLD_SIZE", "1")) != 1:
            raise ConfigError(f"train.emulate_world_size: run a single process (the launcher started {env['WORLD_SIZE']})")
        if not (info.deepspeed or info.fsdp):
            raise ConfigError("train.emulate_world_size: needs a DeepSpeed or FSDP launch config (plain DDP's "
                              "gradient hooks fail on the fake process group)")
    return info


def select_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_device_support(cfg: JobConfig, device: torch.device, launch: LaunchInfo) -> None:
    """Check what needs the device itself, after it is chosen and before any process group exists:
    bf16 support (e.g. not on V100), fp16 under DeepSpeed on a CPU, the attention kernel (tried on a
    tiny input in the run's compute dtype, :func:`models.attention.check_backend`), and a memory budget
    against the GPU's memory (then applied as the caching allocator's per-process memory fraction).

    Raises:
        ConfigError: names the field, the reason and what this device can do instead.
    """
    from models.attention import AttentionBackendError, check_backend

    precision = cfg.train.precision
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)} "
                          f"(compute capability {major}.{minor} < 8.0); use fp16 (dynamic loss scaling) or fp32")
    if precision == "fp16" and device.type == "cpu" and launch.deepspeed:
        raise ConfigError("train.precision: DeepSpeed's fp16 mode needs a GPU (its CPU accelerator has no fp16); "
                          "on a CPU use fp16 without DeepSpeed (plain or FSDP launch: torch.autocast + "
                          "GradScaler), or bf16 / fp32")
    try:
        check_backend(cfg.model.attention, device, autocast_dtype(precision) or torch.float32)
    except AttentionBackendError as e:
        raise ConfigError(str(e)) from None
    budget = cfg.train.memory_budget_gib
    if budget is not None and device.type == "cuda":
        total = device_memory_gib(device)
        if budget > total:
            raise ConfigError(f"train.memory_budget_gib: {budget:g} GiB is more than the "
                              f"{torch.cuda.get_device_name(device)}'s {total:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(budget / total, device)


def device_memory_gib(device: torch.device) -> float:
    """Total memory of ``device`` in GiB (a GPU's, or this machine's for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    from harness.config import host_memory_gib

    return host_memory_gib()


def init_distributed(launch: LaunchInfo, device: torch.device, emulate_world_size: Optional[int] = None) -> tuple:
    """Create the process group if the launcher started several processes (always under FSDP); return
    ``(rank, world)``.

    Backend: NCCL on CUDA, gloo on CPU (DeepSpeed picks the same through ``deepspeed.init_distributed``).
    With ``emulate_world_size`` this single process is rank 0 of that many on PyTorch's fake process group
    (``torch.testing._internal.distributed.fake_pg``; see ``train.emulate_world_size``).
    """
    if emulate_world_size:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=emulate_world_size)
        if launch.deepspeed:
            import deepspeed

            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(emulate_world_size)})
            deepspeed.init_distributed(dist_backend="fake")
        return 0, emulate_world_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launch.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    elif (world > 1 or launch.fsdp) and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def build_optimizer(model: nn.Module, cfg: JobConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``optim.*`` hyper-parameters: ``torch.optim.AdamW``, or with
    ``cpu_offload`` (ZeRO-Offload: the step runs on the CPU where the offloaded states live) DeepSpeed's
    ``DeepSpeedCPUAdam`` in AdamW mode, whose C++ op is built on first use (about 50 s on a 2-core
    machine; cached in ``~/.cache/torch_extensions``)."""
    o = cfg.optim
    groups, hyper = param_groups(model, o.weight_decay), dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, weight_decay=o.weight_decay, adamw_mode=True, **hyper)
    return torch.optim.AdamW(groups, **hyper)


def make_grad_scaler(cfg: JobConfig, device_type: str, scaler_cls=None):
    """The fp16 dynamic loss scale of the job config: ``scaler_cls`` (default ``torch.amp.GradScaler``;
    FSDP2 passes ``ShardedGradScaler``) starting at ``train.loss_scale_init``, doubling after
    ``train.loss_scale_window`` overflow-free steps."""
    cls = scaler_cls or torch.amp.GradScaler
    return cls(device_type, init_scale=cfg.train.loss_scale_init, growth_interval=cfg.train.loss_scale_window)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """``torch.bfloat16`` / ``torch.float16`` for ``bf16`` / ``fp16``, None for ``fp32``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


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


class LocalEngine:
    """Plain PyTorch: single process, or DDP over the default process group.

    Gradient accumulation skips DDP's all-reduce (``no_sync``) on non-boundary micro batches;
    ``bf16``/``fp16`` run the forward under autocast (fp32 master weights; open_clip's ``logit_scale``
    stays an fp32 parameter and the loss is computed in fp32); ``fp16`` adds a dynamic loss scale
    (``GradScaler`` with ``train.loss_scale_init`` and growth every ``train.loss_scale_window`` overflow-free
    steps): a step whose gradients overflow is skipped, the scale halves, and the step is counted in
    ``skipped_steps``. Clipping is by global L2 norm (``torch.nn.utils.clip_grad_norm_``).
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
        self.scaler = self._make_scaler(cfg) if cfg.train.precision == "fp16" else None
        self.model = self._wrap(self.module)
        self.micro = 0
        self.grad_norm: Optional[float] = None
        self.skipped_steps = 0

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP when several ranks run, else the module itself."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            return nn.parallel.DistributedDataParallel(module)
        return module

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

    def loss_scale(self) -> Optional[float]:
        """The current fp16 loss scale, or None without loss scaling."""
        return float(self.scaler.get_scale()) if self.scaler else None

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


def deepspeed_config(base: Dict[str, Any], cfg: JobConfig, layout: BatchLayout) -> Dict[str, Any]:
    """The DeepSpeed config: ``base`` (the launch JSON) with the job's batch, clipping and precision
    (:func:`deepspeed_precision`).

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
        optimizer = build_optimizer(model, cfg, cpu_offload=uses_cpu_offload(self.ds_config))
        scheduler = scheduler_fn(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.module = self.engine.module
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        # native fp16 keeps half-precision weights, so inputs must be cast; torch_autocast keeps fp32 weights
        self.input_dtype = torch.float16 if self.ds_config["fp16"]["enabled"] else None
        self.grad_scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if self.grad_scaler is not None:  # DeepSpeed builds it with torch's defaults: use the job's loss scale
            self.grad_scaler = self.engine.torch_autocast_z0_gradscaler = make_grad_scaler(cfg, device.type)
        self.scaler_skips = 0
        self.grad_norm: Optional[float] = None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for overflowing fp16 gradients (DeepSpeed's count, or the ZeRO-0 scaler's)."""
        return int(getattr(self.engine, "skipped_steps", 0)) + self.scaler_skips

    def loss_scale(self) -> Optional[float]:
        """The current fp16 loss scale, or None without loss scaling."""
        if self.grad_scaler is not None:
            return float(self.grad_scaler.get_scale())
        if self.ds_config["fp16"]["enabled"]:
            return float(self.engine.optimizer.loss_scale)
        return None

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.input_dtype is not None:
            image = image.to(self.input_dtype)
        return self.engine(image, text)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        scale = self.grad_scaler.get_scale() if self.grad_scaler is not None and boundary else None
        self.engine.step()
        if scale is not None:
            self.scaler_skips += int(self.grad_scaler.get_scale() < scale)
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
    """:class:`DeepSpeedEngine` under a DeepSpeed launch, :class:`harness.fsdp.FSDPEngine` under an FSDP
    launch, else :class:`LocalEngine`."""
    if launch.deepspeed:
        return DeepSpeedEngine(model, cfg, layout, scheduler_fn, device, launch)
    if launch.fsdp:
        from harness.fsdp import FSDPEngine

        return FSDPEngine(model, cfg, layout, scheduler_fn, device, launch.fsdp_reshard_after_forward)
    return LocalEngine(model, cfg, layout, scheduler_fn, device)
