"""DTP-ViT's segment arithmetic: the binomial boundary prior, the static segment bound, and segment pooling.

Ideas from Nawrot et al., "Efficient Transformers with Dynamic Token Pooling" (ACL 2023;
``PiotrNawrot/dynamic-pooling``, ``shortening.py``); our own code.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch


def binomial_boundary_loss(boundaries: torch.Tensor, rate: float) -> torch.Tensor:
    """Negative log-likelihood of the boundary count under Binomial(L, rate), per token.

    ``loss = -mean_b log Binomial(k_b; L, rate) / L`` with ``k_b = sum_t boundaries[b, t]``, in closed
    form with ``lgamma`` (``torch.distributions.Binomial`` validates integer counts, which a
    straight-through ``k`` is only in value). From Nawrot et al. 2023 (``dynamic-pooling``).

    Args:
        boundaries: ``[B, L]`` (straight-through) boundary indicators, fp32.
        rate: target boundary rate ``p`` in (0, 1].

    Returns:
        Scalar fp32 tensor; differentiable w.r.t. ``boundaries``.
    """
    L = boundaries.shape[1]
    k = boundaries.sum(dim=1)  # [B]
    p = min(max(rate, 1e-6), 1 - 1e-6)
    log_pmf = (math.lgamma(L + 1) - torch.lgamma(k + 1) - torch.lgamma(L - k + 1)
               + k * math.log(p) + (L - k) * math.log1p(-p))
    return -log_pmf.mean() / L


def segment_bound(num_patches: int, compression: float, max_segments: int = 0) -> int:
    """The static segment count ``S`` (see ``DTPConfig.max_segments``): ``max_segments`` if positive, else
    ``min(L, ceil(L p + 4 sqrt(L p (1 - p))))`` with ``p = 1 / compression``."""
    if max_segments > 0:
        return min(max_segments, num_patches)
    p = 1.0 / compression
    return min(num_patches, math.ceil(num_patches * p + 4 * math.sqrt(num_patches * p * (1 - p))))


def segment_pool(x: torch.Tensor, boundaries: torch.Tensor, n_segments: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average tokens into variable-length segments ending at boundaries, in a static number of slots.

    The segment id of token t is the number of boundaries strictly before t (``cumsum(b) - b``), at most
    ``n_segments - 1`` (an image with more boundaries has its last segments merged into the last slot).
    Membership weights are ``1 - (s - id_t)`` where ``s == id_t`` and 0 elsewhere: numerically 1,
    but differentiable in the straight-through boundaries, so the task loss reaches the boundary
    predictor (a plain ``==`` mask would cut that path; idea from ``dynamic-pooling``'s ``downsample``).

    Args:
        x: ``[B, L, D]`` token features (fp32).
        boundaries: ``[B, L]`` straight-through boundaries (values 0/1, gradients of the soft ones);
            the last token must be a boundary.
        n_segments: ``S``, the static slot count (shapes never depend on the data: no host sync).

    Returns:
        ``(segments [B, S, D], valid [B, S] bool, weights [B, L, S])``; unused slots are all-zero and
        ``valid`` False. Valid slots come first in each row.
    """
    seg_id = (boundaries.cumsum(dim=1) - boundaries).clamp(max=n_segments - 1)  # [B, L]
    offset = torch.arange(n_segments, device=x.device, dtype=x.dtype)[None, None, :] - seg_id[..., None]  # [B, L, S]
    member = offset == 0  # [B, L, S]
    weights = torch.where(member, 1.0 - offset, torch.zeros_like(offset))  # value 1 on members
    counts = member.sum(dim=1, keepdim=True).to(x.dtype)  # [B, 1, S] tokens per segment (no grad)
    weights_mean = weights / counts.clamp(min=1.0)
    segments = torch.einsum("bls,bld->bsd", weights_mean, x)  # [B, S, D]
    valid = counts.squeeze(1) > 0  # [B, S]
    return segments, valid, weights
