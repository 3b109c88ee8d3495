"""Per-block wrappers shared by both towers: activation checkpointing of every k-th transformer block.

The harness applies distribution and memory knobs to a plain model afterwards (torchtitan's
``apply_ac``); the model side only lists its blocks (:func:`tower_block_lists`).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)


def tower_block_lists(model: nn.Module) -> Dict[str, List[nn.ModuleList]]:
    """The transformer blocks of an open_clip ``CLIP``, per tower, in forward order:
    ``{"image": [...], "text": [...]}``. open_clip towers have one list (``transformer.resblocks``);
    DTP-ViT has pre, shortened and post lists (``block_lists()``)."""
    visual = model.visual
    image = visual.block_lists() if hasattr(visual, "block_lists") else [visual.transformer.resblocks]
    return {"image": image, "text": [model.transformer.resblocks]}


def iter_blocks(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(tower, block)`` for every transformer block of :func:`tower_block_lists`, in forward order."""
    for tower, lists in tower_block_lists(model).items():
        for blocks in lists:
            for blk in blocks:
                yield tower, blk


def checkpoint_every(block_lists: List[nn.ModuleList], every: int) -> int:
    """Wrap every ``every``-th block (the k-th, 2k-th, ... counted over ``block_lists`` as one sequence,
    torchtitan's ``ac_freq`` convention) in a non-reentrant ``checkpoint_wrapper``; unwrap the others.
    ``every=0`` unwraps all, ``every=1`` checkpoints every block.

    The wrapper recomputes the block's forward in backward (its activations are not kept) and removes
    its own prefix from state-dict keys, so checkpoints load with or without it. Non-reentrant
    checkpointing is what DeepSpeed ZeRO-3 and FSDP2 support.

    Returns:
        The number of checkpointed blocks.

    Raises:
        ValueError: ``every`` < 0.
    """
    if every < 0:
        raise ValueError(f"checkpoint_every: every must be >= 0, got {every}")
    count, wrapped = 0, 0
    for blocks in block_lists:
        for i, blk in enumerate(blocks):
            count += 1
            inner = blk._checkpoint_wrapped_module if isinstance(blk, CheckpointWrapper) else blk
            if every and count % every == 0:
                blocks[i] = checkpoint_wrapper(inner, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                wrapped += 1
            else:
                blocks[i] = inner
    return wrapped


def set_grad_checkpointing(model: nn.Module, every: int) -> Dict[str, int]:
    """Checkpoint every ``every``-th transformer block of each tower of ``model`` (0: off).

    Returns:
        ``{"image": n, "text": m}``: checkpointed blocks per tower.
    """
    return {tower: checkpoint_every(lists, every) for tower, lists in tower_block_lists(model).items()}


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every transformer block of both towers in place (``nn.Module.compile``: the module
    keeps its class and state-dict keys; torchtitan compiles per block too, which keeps graphs small and
    lets FSDP2 / ZeRO hooks sit between blocks). Returns the number of compiled blocks."""
    n = 0
    for _, blk in iter_blocks(model):
        blk.compile(**compile_kwargs)
        n += 1
    return n
