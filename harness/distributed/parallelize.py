"""Make a plain CLIP model ready for its engine, in one place and one fixed order (torchtitan's
``parallelize_llama``: ``apply_ac``, ``apply_compile``, ``apply_fsdp``):

1. activation checkpointing of every k-th transformer block of both towers
   (:func:`models.blocks.set_grad_checkpointing`);
2. ``torch.compile`` of every block, in place (:func:`models.blocks.compile_blocks`);
3. the model moved to its device;
4. data parallelism: FSDP2 ``fully_shard`` per transformer block of both towers and then the root, or DDP,
   or nothing (one process, or DeepSpeed, which wraps the model itself in ``deepspeed.initialize``).

Accelerate's own FSDP path silently does not shard on a CPU-only machine (with
``use_cpu: true`` Accelerate falls back to no sharding), so FSDP2 is applied here on GPUs and CPUs alike.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn

DataParallel = Literal["none", "ddp", "fsdp"]


def apply_fsdp(model: nn.Module, param_dtype: Optional[torch.dtype], reduce_dtype: torch.dtype,
               reshard_after_forward: bool, device: torch.device) -> Dict[str, int]:
    """``fully_shard`` each transformer block of both towers (``MixedPrecisionPolicy(param_dtype, reduce_dtype)``),
    then the root with fp32 parameters (embeddings, projections, norms, CLIP's ``logit_scale``), over all ranks of
    the default process group. The root is not resharded after forward: its parameters are gathered again at
    once for backward (torchtitan's choice for the root). Returns the blocks sharded per tower."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from models.blocks import iter_blocks

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) if param_dtype
                else MixedPrecisionPolicy())
    counts = {"image": 0, "text": 0}
    for tower, blk in iter_blocks(model):
        fully_shard(blk, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
        counts[tower] += 1
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return counts


def parallelize_clip(model: nn.Module, *, device: torch.device, grad_checkpointing: int = 0,
                     compile_blocks: bool = False, data_parallel: DataParallel = "none",
                     param_dtype: Optional[torch.dtype] = None, reduce_dtype: torch.dtype = torch.float32,
                     reshard_after_forward: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Apply checkpointing -> compile -> device -> FSDP2 or DDP to ``model`` (an open_clip ``CLIP``).

    Args:
        model: the plain model (modified in place).
        device: where this rank computes.
        grad_checkpointing: recompute every k-th block of each tower in backward (0 off).
        compile_blocks: ``torch.compile`` every transformer block.
        data_parallel: ``"fsdp"`` (FSDP2 over the default process group), ``"ddp"`` or ``"none"``.
        param_dtype: FSDP2's block parameter dtype under mixed precision (None: fp32).
        reduce_dtype: FSDP2's gradient reduce-scatter dtype under mixed precision.
        reshard_after_forward: FSDP2 full shard (True) or shard-grad-op (False) for the blocks.

    Returns:
        ``(model, applied)``: the model to forward (``DistributedDataParallel`` around it for DDP; the model
        itself, sharded in place, for FSDP2) and ``{"checkpointed_blocks": {"image": n, "text": m},
        "compiled_blocks": k, "sharded_blocks": {...} or None}``.
    """
    from models.blocks import compile_blocks as compile_all
    from models.blocks import set_grad_checkpointing

    applied: Dict[str, Any] = {
        "checkpointed_blocks": (set_grad_checkpointing(model, grad_checkpointing) if grad_checkpointing
                                else {"image": 0, "text": 0}),
        "compiled_blocks": compile_all(model) if compile_blocks else 0,
        "sharded_blocks": None,
    }
    model = model.to(device)
    if data_parallel == "fsdp":
        applied["sharded_blocks"] = apply_fsdp(model, param_dtype, reduce_dtype, reshard_after_forward, device)
    elif data_parallel == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    return model, applied
