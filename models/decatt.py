"""DeCAtt: a loss that decorrelates the attention heads of the image tower (Bhattacharyya et al., "DeCAtt: Efficient
Vision Transformers with Decorrelated Attention Heads", CVPR 2023 workshops).

Per block, the per-head attention outputs ``softmax(q k^T) v`` of one sample, flattened to ``A [h, n*d]`` (h heads,
n tokens, d head width), give the head-correlation matrix ``C1 = A A^T / ||A||^2``; ``C2`` is the batch mean of the
element-wise square ``C1^2``; the block's loss is the sum of the off-diagonal entries of ``C2`` (0 when every pair of
heads is orthogonal). The tower's loss is the sum over its blocks, weighted by ``loss.decatt_weight``.

Where this follows the paper and where it differs (the paper's text was not available offline; the formula is the
one the research notes' code implements, with its two confounds removed):

* It uses the heads' *attention outputs* (``[B, h, n, d]``, what SDPA returns before the heads are concatenated and
  projected), not attention maps: SDPA and the flash kernels never materialise the ``[B, h, n, n]`` maps, so the
  term costs one ``[h, h]`` Gram matrix per sample and works with every backend of :mod:`models.attention`.
* ``||A||`` is the Frobenius norm of the sample's whole ``A`` (so ``C1`` has trace 1 and the loss is scale-free).
* The notes' code reshaped a block's hidden states ``[B, n, D]`` into head-sized chunks of tokens (which compares
  token groups, not heads) and stepped the first blocks with a second optimizer; here the per-head outputs of the
  attention itself are used and the term is simply added to the contrastive loss (one optimizer).
* The default weight when on, :data:`DECATT_PAPER_WEIGHT` = 150, is the notes' code value (``lam=150``): not
  checked against the paper.

The term is computed inside each attention module (:class:`models.attention.SelfAttention` and DTP-ViT's
:class:`models.attention.TimmSelfAttention`) during a training forward and kept on the module, so it is part of
the block's own forward: activation checkpointing recomputes it with the block, and FSDP2 / ZeRO hooks that run
around blocks see nothing new. :func:`extra_losses` collects it after the forward, as DTP-ViT's boundary loss is.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

DECATT_PAPER_WEIGHT = 150.0
"""The weight to use when DeCAtt is on (``loss.decatt_weight``'s documented value): the research notes' ``lam``."""


def decatt_loss(heads: torch.Tensor) -> torch.Tensor:
    """The DeCAtt term of one block.

    Args:
        heads: per-head attention outputs ``[B, h, n, d]`` (any float dtype; computed in fp32, autocast off).

    Returns:
        A 0-dim fp32 tensor: with ``A_b [h, n d]`` sample ``b``'s heads, ``C1_b = A_b A_b^T / ||A_b||_F^2`` and
        ``C2 = mean_b C1_b^2`` (element-wise square), the sum of ``C2``'s off-diagonal entries: 0 for pairwise
        orthogonal heads, positive otherwise, below 1 (``C1_b`` is positive semi-definite with trace 1).
    """
    with torch.autocast(heads.device.type, enabled=False):
        a = heads.float().flatten(2)  # [B, h, n d]
        c1 = (a @ a.transpose(1, 2)) / a.square().sum(dim=(1, 2)).clamp(min=1e-12)[:, None, None]  # [B, h, h]
        c2 = c1.square().mean(dim=0)  # [h, h]
        eye = torch.eye(c2.shape[0], dtype=torch.bool, device=c2.device)
        return c2.masked_fill(eye, 0.0).sum()


def _attention_modules(visual: nn.Module) -> List[nn.Module]:
    """The attention modules that can compute the term (:mod:`models.attention`'s, which carry ``decatt``)."""
    return [m for m in visual.modules() if hasattr(m, "decatt") and hasattr(m, "last_decatt")]


def enable_decatt(visual: nn.Module, weight: float) -> int:
    """Switch DeCAtt on (``weight > 0``) or off (0) for every self-attention of the image tower ``visual``.

    Returns:
        The number of attention modules that compute the term.

    Raises:
        ValueError: ``weight`` < 0.
    """
    if weight < 0:
        raise ValueError(f"loss.decatt_weight: must be >= 0 (0 = off), got {weight}")
    modules = _attention_modules(visual)
    for m in modules:
        m.decatt = weight > 0
        m.last_decatt = None
    visual.decatt_weight = float(weight)
    return len(modules) if weight > 0 else 0


def decatt_value(visual: nn.Module) -> torch.Tensor | None:
    """The unweighted DeCAtt sum over the blocks of the last training forward of ``visual`` (None if off or at
    eval). A device tensor: nothing is read on the host."""
    terms = [m.last_decatt for m in _attention_modules(visual) if getattr(m, "last_decatt", None) is not None]
    return torch.stack(terms).sum() if terms else None


def extra_losses(visual: nn.Module) -> Dict[str, torch.Tensor]:
    """Every auxiliary loss of the image tower's last training forward, weighted, for the trainer to add to the
    contrastive loss and log as its own metric: the tower's own ``extra_losses()`` (DTP-ViT's ``boundary_loss``)
    and ``decatt_loss`` (``loss.decatt_weight`` x the DeCAtt sum) when DeCAtt is on. Empty at eval."""
    extras = dict(visual.extra_losses()) if hasattr(visual, "extra_losses") else {}
    if getattr(visual, "decatt_weight", 0.0) > 0 and visual.training:
        value = decatt_value(visual)
        if value is not None:
            extras["decatt_loss"] = visual.decatt_weight * value
    return extras
