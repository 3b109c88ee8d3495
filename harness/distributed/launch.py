"""Launch detection, device choice and process groups: what the launcher asked for and where this rank runs.

The launch mode comes from the launcher's environment (``accelerate launch --config_file ds_configs/*.yaml``
exports ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP`` and their settings; ``torchrun`` exports
``RANK`` / ``WORLD_SIZE``). Ranks and world size always come from ``torch.distributed``, never from
Accelerate, whose process count is wrong on CPU under DeepSpeed (Accelerate's backend detection has no CPU
path for DeepSpeed or FSDP: it reports one process while ``torch.distributed`` has the launcher's world size).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from harness.config.job_config import JobConfig
from harness.core.errors import ConfigError
from harness.core.paths import REPO_ROOT

_PRECISION_ENV = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class LaunchInfo:
    """What the launcher asked for.

    Attributes:
        deepspeed: True under an Accelerate DeepSpeed launch config.
        deepspeed_config_path: the JSON named by the launch YAML (``deepspeed_config_file``), or None.
        zero_stage: ZeRO stage from the YAML when it has no JSON, else None.
        launcher_precision: ``mixed_precision`` of the launch YAML mapped to ``fp32|bf16|fp16``, or None.
        fsdp: True under an Accelerate FSDP launch config (FSDP2, applied by :mod:`harness.distributed.parallelize`).
        fsdp_reshard_after_forward: the YAML's ``fsdp_reshard_after_forward`` (True: full shard).
    """

    deepspeed: bool = False
    deepspeed_config_path: Optional[str] = None
    zero_stage: Optional[int] = None
    launcher_precision: Optional[str] = None
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True


def _detect_fsdp(env, info: LaunchInfo) -> None:
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


def _detect_deepspeed(env, info: LaunchInfo) -> None:
    info.deepspeed = True
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        info.zero_stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        return
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
        _detect_fsdp(env, info)
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _detect_deepspeed(env, info)
    if cfg.train.emulate_world_size:
        if int(env.get("WORLD_SIZE", "1")) != 1:
            raise ConfigError("train.emulate_world_size: run a single process (the launcher started "
                              f"{env['WORLD_SIZE']})")
        if not (info.deepspeed or info.fsdp):
            raise ConfigError("train.emulate_world_size: needs a DeepSpeed or FSDP launch config (plain DDP's "
                              "gradient hooks fail on the fake process group)")
    return info


def select_device() -> torch.device:
    """This rank's device: ``cuda:(LOCAL_RANK mod visible GPUs)`` (made current) when CUDA is available, else the
    CPU. The modulo covers schedulers that give each task one GPU (``CUDA_VISIBLE_DEVICES`` of one device while
    ``LOCAL_RANK`` counts the node's tasks)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(launch: LaunchInfo, device: torch.device, emulate_world_size: Optional[int] = None,
                     timeout_s: float = 1800.0) -> Tuple[int, int]:
    """Create the process group if the launcher started several processes (always under FSDP); return
    ``(rank, world)``.

    Backend: NCCL on CUDA, gloo on CPU (DeepSpeed picks the same through ``deepspeed.init_distributed``).
    ``timeout_s`` bounds every collective (``train.dist_timeout_s``). With ``emulate_world_size`` this single
    process is rank 0 of that many on PyTorch's fake process group (``torch.testing._internal.distributed.fake_pg``;
    see ``train.emulate_world_size``).
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

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    elif (world > 1 or launch.fsdp) and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def abort() -> None:
    """Tear the process group down after a failure without waiting for peers: NCCL's communicators are aborted
    (``distributed_c10d._abort_process_group``) so a peer blocked in a collective errors out instead of waiting
    for the timeout; other backends are destroyed. Never raises: the original error is what matters."""
    if not dist.is_initialized():
        return
    try:
        aborter = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if aborter is not None and dist.get_backend() == "nccl":
            aborter()
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a best effort on the way out
        pass


def shutdown() -> None:
    """Destroy the process group: an orderly exit (gloo's threads otherwise may abort the process at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
