"""FSDP2 engine: the step of :class:`harness.engines.local.LocalEngine` over a model that
:func:`harness.distributed.parallelize.parallelize_clip` sharded with ``torch.distributed.fsdp.fully_shard``.

Mixed precision (applied when sharding): the transformer blocks of both towers get
``MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)`` (parameters all-gathered in half
precision, gradients reduced and stored in fp32); the root group (embeddings, projections, norms, CLIP's
``logit_scale``) keeps fp32 parameters, and the forward runs under ``torch.autocast``, so ``logit_scale`` and
the loss stay fp32. fp16 adds a dynamic loss scale (``ShardedGradScaler``; its inf check is all-reduced, so
every rank skips the same steps).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from harness.config.job_config import JobConfig
from harness.engines.common import make_grad_scaler
from harness.engines.local import LocalEngine

FSDP_DIR = "fsdp"  # DCP folder inside a checkpoint


class FSDPEngine(LocalEngine):
    """FSDP2 over all ranks (``ds_configs/fsdp.yaml``: full shard; ``fsdp_shard_grad_op.yaml``: parameters
    kept gathered from forward to backward). Same step semantics as :class:`LocalEngine`: accumulation
    (gradient reduce-scatter only on the last micro batch, ``set_requires_gradient_sync``), global-norm
    clipping over the sharded gradients, AdamW on the local shards, fp16 loss scaling.

    Checkpoints are ``torch.distributed.checkpoint`` folders (``fsdp/``: every rank writes its shards);
    :func:`harness.components.checkpoint.load_model_state` turns one into a full state dict.
    """

    kind = "fsdp"
    precision_note = "(FSDP2 mixed precision + autocast)"
    # fused AdamW over DTensor parameters ignores the scaler's overflow flag (torch 2.15, CPU: the overflowing
    # step was applied, NaN weights): with fp16 the foreach AdamW steps, and GradScaler reads the flag on the host
    fused_with_loss_scale = False

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
