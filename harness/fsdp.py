"""FSDP2 engine: ``torch.distributed.fsdp.fully_shard`` applied by the harness, on GPUs and on CPU (gloo).

Accelerate's FSDP integration silently falls back to no sharding on a CPU-only machine
(``../shared/design/environment.md``), so the launch YAML (``ds_configs/fsdp*.yaml``) only says *that*
FSDP2 is wanted and whether parameters are resharded after forward; the sharding is applied here, in
torchtitan's order (``parallelize_llama``: activation checkpointing, compile, then ``fully_shard`` per
transformer block and finally on the whole model).

Mixed precision: the transformer blocks of both towers get ``MixedPrecisionPolicy(param_dtype=bf16|fp16,
reduce_dtype=fp32)`` (parameters all-gathered in half precision, gradients reduced and stored in fp32);
the root group (embeddings, projections, norms, CLIP's ``logit_scale``) keeps fp32 parameters, and the
forward runs under ``torch.autocast``, so ``logit_scale`` and the loss stay fp32. fp16 adds a dynamic
loss scale (``ShardedGradScaler``; its inf check is all-reduced, so every rank skips the same steps).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from harness.config import BatchLayout, JobConfig
from harness.engine import LocalEngine, autocast_dtype, make_grad_scaler

FSDP_DIR = "fsdp"  # DCP folder inside a checkpoint


def shard_model(model: nn.Module, dtype, reshard_after_forward: bool, world_size: int, device: torch.device
                ) -> Dict[str, int]:
    """Apply FSDP2 to ``model`` in place: each transformer block of both towers (mixed-precision policy
    with ``param_dtype=dtype``), then the root (fp32 parameters). Returns blocks sharded per tower."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from models.blocks import iter_blocks

    mesh = init_device_mesh(device.type, (world_size,))
    block_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    counts = {"image": 0, "text": 0}
    for tower, blk in iter_blocks(model):
        fully_shard(blk, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
        counts[tower] += 1
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return counts


class FSDPEngine(LocalEngine):
    """FSDP2 over all ranks (``ds_configs/fsdp.yaml``: full shard; ``fsdp_shard_grad_op.yaml``: parameters
    kept gathered from forward to backward). Same step semantics as :class:`harness.engine.LocalEngine`:
    accumulation (gradient reduce-scatter only on the last micro batch, ``set_requires_gradient_sync``),
    global-norm clipping over the sharded gradients, AdamW on the local shards, fp16 loss scaling.

    Checkpoints are ``torch.distributed.checkpoint`` folders (``fsdp/``: every rank writes its shards);
    :func:`harness.checkpoint.load_model_state` turns one into a full state dict.
    """

    kind = "fsdp"

    def __init__(self, model: nn.Module, cfg: JobConfig, layout: BatchLayout, scheduler_fn, device: torch.device,
                 reshard_after_forward: bool):
        self.reshard_after_forward = reshard_after_forward
        model = model.to(device)
        self.sharded_blocks = shard_model(model, autocast_dtype(cfg.train.precision), reshard_after_forward,
                                          dist.get_world_size(), device)
        super().__init__(model, cfg, layout, scheduler_fn, device)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module  # already sharded; no DDP

    def _make_scaler(self, cfg: JobConfig):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return make_grad_scaler(cfg, self.device.type, ShardedGradScaler)

    def _sync_context(self, sync: bool):
        self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_parameters(self):
        """Context in which the root group's parameters (embeddings, projections, ``logit_scale``) are
        gathered, for calls that bypass the root ``forward`` such as ``encode_text`` in zero-shot eval
        (no gradients: the blocks gather themselves through their own hooks). Registering those methods
        as FSDP forward methods instead would reshard the root in the middle of ``CLIP.forward``, which
        calls them."""
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its shards of model and optimizer (DCP, ``fsdp/``); rank 0 the scheduler (and scaler)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(directory) / FSDP_DIR))
        self._save_small_states(directory, rank)

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(Path(directory) / FSDP_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._load_small_states(directory)

