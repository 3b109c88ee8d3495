"""Contrastive losses of CLIP-style training: open_clip's own (dense) or memory-bounded (tiled).

Two losses, each in two implementations behind one interface,
``loss_fn(image_features [B, d], text_features [B, d], logit_scale, logit_bias=None) -> scalar``:

* ``clip``: the softmax cross-entropy of CLIP (Radford et al. 2021, arXiv 2103.00020) with open_clip's
  local loss and gather-with-grad (``ClipLoss(local_loss=True, gather_with_grad=True)``): rank ``r`` of ``W``
  computes ``L_r = (CE(s I_r T_all^T, y) + CE(s T_r I_all^T, y)) / 2`` with ``y = arange(B) + B r`` and the
  gathered features keeping their gradients (``torch.distributed.nn.all_gather``).
* ``siglip``: the sigmoid loss of SigLIP (Zhai et al. 2023, arXiv 2303.15343), open_clip's ``SigLipLoss``:
  ``L_r = -sum_{i, j} log sigmoid(z_ij (s I_i . T_j + b)) / B`` over this rank's ``B`` images and all
  ``W B`` texts, ``z_ij = +1`` for the pair (``j = B r + i``) and ``-1`` otherwise. open_clip passes the
  texts between neighbouring ranks (``dist_impl="bidir"``); the tiled form gathers them with gradients
  instead, which gives the same sum and, through the gather's reduce-scatter backward, the same gradients.

``impl="dense"`` is open_clip's class: a rank holds ``[B, W B]`` fp32 logits per direction, their softmax
(or sigmoid) and gradients. ``impl="tiled"`` never holds more than ``[B, tile_size]`` of them: the columns
(gathered features) are visited in tiles, the row-wise log-sum-exp is accumulated online (the streaming
softmax of FlashAttention, Dao et al. 2022, applied to the contrastive loss as in Inf-CL, Cheng et al.
2024, arXiv 2410.17243, repository DAMO-NLP-SG/Inf-CLIP), and backward recomputes each tile from the
features. Both are custom ``torch.autograd.Function``\\ s in plain PyTorch, so they run on CPU, CUDA and any
``torch.distributed`` backend (Inf-CL's Triton kernels need CUDA).

The functions :func:`tiled_clip_loss` and :func:`tiled_siglip_loss` take the rows (this micro batch) and
the columns (all features the rows are contrasted with) separately, with the positives' place in the
columns given as ``label_offset``: a caller that gathers the features of several micro batches (gradient
accumulation with negatives, GradCache: Gao et al. 2021, arXiv 2101.06983) passes them as the columns and
the micro batch's own offset.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TiledClipLoss", "TiledSigLipLoss", "build_loss", "gather_with_grad", "tiled_clip_loss",
           "tiled_siglip_loss"]


def _check_inputs(rows: torch.Tensor, cols: torch.Tensor, label_offset: int, tile_size: int) -> None:
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"features must be [B, d] rows and [N, d] columns, got {tuple(rows.shape)} and "
                         f"{tuple(cols.shape)}")
    if not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(f"label_offset {label_offset}: the positives of {rows.shape[0]} rows must lie within the "
                         f"{cols.shape[0]} columns (0 <= label_offset <= {cols.shape[0] - rows.shape[0]})")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")


def _positives_in_tile(rows: int, label_offset: int, j0: int, j1: int,
                       device: torch.device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(row index, column index within the tile) of the positive pairs ``j = label_offset + i`` that fall in
    columns ``[j0, j1)``; None if there are none. Host arithmetic only (no device read)."""
    lo, hi = max(j0 - label_offset, 0), min(j1 - label_offset, rows)
    if lo >= hi:
        return None
    i = torch.arange(lo, hi, device=device)
    return i, i + (label_offset - j0)


class _RowLogSumExp(torch.autograd.Function):
    """``lse_i = logsumexp_j (scale * rows_i . cols_j)`` over column tiles; backward recomputes each tile.

    Forward holds one ``[B, tile]`` tile; backward one ``[B, tile]`` tile plus the ``[B, d]`` and ``[N, d]``
    gradients. Autocast is off inside: the loss runs in the features' dtype (fp32 in the trainer).
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, tile_size):  # rows [B, d], cols [N, d], scale [] or [1]
        with torch.autocast(rows.device.type, enabled=False):
            q = rows * scale  # [B, d]: the scale folded into the rows once, not into every tile
            lse = rows.new_full((rows.shape[0],), float("-inf"))  # [B]
            for j0 in range(0, cols.shape[0], tile_size):
                x = q @ cols[j0:j0 + tile_size].T  # [B, t] logits
                m = x.amax(dim=1)  # [B]
                tile_lse = m + x.sub_(m[:, None]).exp_().sum(dim=1).log_()  # in place: one [B, t] buffer
                lse = torch.logaddexp(lse, tile_lse)
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.tile_size = tile_size
        return lse

    @staticmethod
    def backward(ctx, grad_lse):  # grad_lse [B]
        rows, cols, scale, lse = ctx.saved_tensors
        need_rows, need_cols, need_scale, _ = ctx.needs_input_grad
        with torch.autocast(rows.device.type, enabled=False):
            q = rows * scale  # [B, d]
            acc = torch.zeros_like(rows)  # [B, d]: sum_j g_i p_ij cols_j (the rows' gradient over the scale)
            d_cols = torch.empty_like(cols) if need_cols else None  # [N, d]
            for j0 in range(0, cols.shape[0], ctx.tile_size):
                k = cols[j0:j0 + ctx.tile_size]  # [t, d]
                p = (q @ k.T).sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])  # [B, t]: g_i softmax_ij
                acc.addmm_(p, k)
                if need_cols:
                    torch.mm(p.T, q, out=d_cols[j0:j0 + k.shape[0]])
            # d lse_i / d scale = sum_j p_ij rows_i . cols_j = rows_i . acc_i / g_i
            d_scale = torch.dot(acc.reshape(-1), rows.reshape(-1)).reshape(scale.shape) if need_scale else None
            d_rows = acc.mul_(scale) if need_rows else None
        return d_rows, d_cols, d_scale, None


class _SigmoidLossSum(torch.autograd.Function):
    """``sum_ij -log sigmoid(z_ij (scale * rows_i . cols_j + bias))`` over column tiles, ``z_ij = +1`` for
    ``j = label_offset + i`` and ``-1`` elsewhere; backward recomputes each tile. Memory as
    :class:`_RowLogSumExp`."""

    @staticmethod
    def _signed_logits(q, k, bias, label_offset, j0):
        """``z * logits`` of columns ``[j0, j0 + t)`` from the scaled rows ``q``: ``[B, t]``, and the positives."""
        w = q @ k.T  # [B, t]
        if bias is not None:
            w.add_(bias)
        w.neg_()
        pos = _positives_in_tile(q.shape[0], label_offset, j0, j0 + k.shape[0], q.device)
        if pos is not None:
            w[pos] = -w[pos]
        return w, pos

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, label_offset, tile_size):  # rows [B, d], cols [N, d]
        with torch.autocast(rows.device.type, enabled=False):
            q = rows * scale  # [B, d]
            total = rows.new_zeros(())
            for j0 in range(0, cols.shape[0], tile_size):
                w, _ = _SigmoidLossSum._signed_logits(q, cols[j0:j0 + tile_size], bias, label_offset, j0)
                total = total - F.logsigmoid(w).sum()
        ctx.save_for_backward(rows, cols, scale, bias)
        ctx.label_offset, ctx.tile_size = label_offset, tile_size
        return total

    @staticmethod
    def backward(ctx, grad_total):  # grad_total [] (scalar)
        rows, cols, scale, bias = ctx.saved_tensors
        need_rows, need_cols, need_scale, need_bias, _, _ = ctx.needs_input_grad
        with torch.autocast(rows.device.type, enabled=False):
            q = rows * scale  # [B, d]
            acc = torch.zeros_like(rows)  # [B, d]: sum_j dlogit_ij cols_j
            d_cols = torch.empty_like(cols) if need_cols else None
            d_bias = rows.new_zeros(())
            for j0 in range(0, cols.shape[0], ctx.tile_size):
                k = cols[j0:j0 + ctx.tile_size]
                w, pos = _SigmoidLossSum._signed_logits(q, k, bias, ctx.label_offset, j0)
                # d(-log sigmoid(z x))/dx = -z sigmoid(-z x): sigmoid(-w) on negatives, -sigmoid(-w) on positives
                g = w.neg_().sigmoid_()
                if pos is not None:
                    g[pos] = -g[pos]
                g.mul_(grad_total)  # [B, t] d loss / d logit
                acc.addmm_(g, k)
                if need_cols:
                    torch.mm(g.T, q, out=d_cols[j0:j0 + k.shape[0]])
                if need_bias:
                    d_bias += g.sum()
            d_scale = torch.dot(acc.reshape(-1), rows.reshape(-1)).reshape(scale.shape) if need_scale else None
            d_rows = acc.mul_(scale) if need_rows else None
        return d_rows, d_cols, d_scale, d_bias.reshape(bias.shape) if need_bias else None, None, None


def tiled_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, all_image_features: torch.Tensor,
                    all_text_features: torch.Tensor, logit_scale: torch.Tensor, label_offset: int = 0,
                    tile_size: int = 1024) -> torch.Tensor:
    """CLIP's symmetric softmax cross-entropy of ``B`` rows against ``N`` columns, in ``[B, tile_size]`` tiles.

    ``(CE(s I T_all^T, y) + CE(s T I_all^T, y)) / 2`` with ``y_i = label_offset + i``: open_clip's ``ClipLoss``
    with a local loss when the columns are the gathered features and ``label_offset = B * rank``.

    Args:
        image_features, text_features: ``[B, d]`` this rank's (micro batch's) features, the rows.
        all_image_features, all_text_features: ``[N, d]`` the columns (gathered with gradients, or cached).
        logit_scale: ``s``, the inverse temperature, already exponentiated (and clamped), shape ``[]`` or ``[1]``.
        label_offset: column of row 0's positive; row ``i``'s is ``label_offset + i``.
        tile_size: columns per tile; memory of the logits is ``B * tile_size`` elements per direction.

    Returns:
        The loss, a 0-dim tensor (mean over the ``B`` rows and the two directions).

    Raises:
        ValueError: shapes that do not match, positives outside the columns, ``tile_size < 1``.
    """
    for rows, cols in ((image_features, all_text_features), (text_features, all_image_features)):
        _check_inputs(rows, cols, label_offset, tile_size)
    b = image_features.shape[0]
    # positive logits s I_i . T_{off+i}, taken from the columns as the dense loss does
    pos_i = (image_features * all_text_features[label_offset:label_offset + b]).sum(-1)  # [B]
    pos_t = (text_features * all_image_features[label_offset:label_offset + b]).sum(-1)  # [B]
    lse_i = _RowLogSumExp.apply(image_features, all_text_features, logit_scale, tile_size)  # [B]
    lse_t = _RowLogSumExp.apply(text_features, all_image_features, logit_scale, tile_size)  # [B]
    return ((lse_i - logit_scale * pos_i).mean() + (lse_t - logit_scale * pos_t).mean()) / 2


def tiled_siglip_loss(image_features: torch.Tensor, all_text_features: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: Optional[torch.Tensor] = None, label_offset: int = 0,
                      tile_size: int = 1024) -> torch.Tensor:
    """SigLIP's sigmoid loss of ``B`` image rows against ``N`` text columns, in ``[B, tile_size]`` tiles.

    ``-sum_ij log sigmoid(z_ij (s I_i . T_j + b)) / B``, ``z_ij = +1`` for ``j = label_offset + i`` else ``-1``
    (Zhai et al. 2023): open_clip's ``SigLipLoss`` on rank ``r`` when the columns are all ranks' texts and
    ``label_offset = B * r``.

    Args:
        image_features: ``[B, d]`` the rows.
        all_text_features: ``[N, d]`` the columns.
        logit_scale: ``s``, already exponentiated (and clamped), shape ``[]`` or ``[1]``.
        logit_bias: ``b``, shape ``[]`` or ``[1]`` (SigLIP initialises it at -10), or None for no bias.
        label_offset: column of row 0's positive.
        tile_size: columns per tile.

    Returns:
        The loss, a 0-dim tensor (summed over pairs, divided by ``B``, as open_clip does).

    Raises:
        ValueError: as :func:`tiled_clip_loss`.
    """
    _check_inputs(image_features, all_text_features, label_offset, tile_size)
    total = _SigmoidLossSum.apply(image_features, all_text_features, logit_scale, logit_bias, label_offset,
                                  tile_size)
    return total / image_features.shape[0]


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """``[B, d]`` on each of ``world_size`` ranks -> ``[world_size * B, d]`` in rank order, keeping gradients
    (``torch.distributed.nn.all_gather``, whose backward sums each rank's share back to it, as open_clip's
    gather-with-grad). Identity for one rank."""
    if world_size == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class TiledClipLoss(nn.Module):
    """Memory-bounded drop-in for ``open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)``.

    ``forward(image_features [B, d], text_features [B, d], logit_scale [] or [1], logit_bias=None) -> []``:
    the same value and gradients (w.r.t. both features and ``logit_scale``) up to fp rounding, holding
    ``[B, tile_size]`` logits instead of ``[B, W B]``. A ``logit_bias`` is accepted for the common interface
    and ignored: a constant added to every logit cancels in the softmax cross-entropy.
    """

    def __init__(self, tile_size: int = 1024, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.tile_size, self.rank, self.world_size = tile_size, rank, world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        all_image = gather_with_grad(image_features, self.world_size)
        all_text = gather_with_grad(text_features, self.world_size)
        return tiled_clip_loss(image_features, text_features, all_image, all_text, logit_scale,
                               label_offset=image_features.shape[0] * self.rank, tile_size=self.tile_size)


class TiledSigLipLoss(nn.Module):
    """Memory-bounded equivalent of ``open_clip.SigLipLoss(rank, world_size)`` (any ``dist_impl``).

    ``forward(image_features [B, d], text_features [B, d], logit_scale, logit_bias) -> []``: texts are gathered
    with gradients (one all-gather instead of open_clip's ``W - 1`` neighbour exchanges) and the loss is taken
    over ``[B, tile_size]`` tiles; value and gradients (features, scale, bias) equal open_clip's up to rounding.
    """

    def __init__(self, tile_size: int = 1024, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.tile_size, self.rank, self.world_size = tile_size, rank, world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        all_text = gather_with_grad(text_features, self.world_size)
        return tiled_siglip_loss(image_features, all_text, logit_scale, logit_bias,
                                 label_offset=image_features.shape[0] * self.rank, tile_size=self.tile_size)


def build_loss(cfg, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The contrastive loss of ``cfg`` (a :class:`harness.config.job_config.LossConfig`: ``kind``, ``impl``,
    ``tile_size``) for this rank.

    ``dense``: open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)`` or
    ``SigLipLoss()`` (neighbour exchange); ``tiled``: :class:`TiledClipLoss` or :class:`TiledSigLipLoss`.
    Every one is called as ``loss(image_features, text_features, logit_scale, logit_bias=None)``.

    Raises:
        ValueError: an unknown ``kind`` or ``impl`` (the config refuses them earlier).
    """
    kind, impl = cfg.kind, cfg.impl
    if kind not in ("clip", "siglip") or impl not in ("dense", "tiled"):
        raise ValueError(f"loss: kind {kind!r} / impl {impl!r}; allowed kinds clip, siglip and impls dense, tiled")
    if impl == "tiled":
        cls = TiledClipLoss if kind == "clip" else TiledSigLipLoss
        return cls(cfg.tile_size, rank, world_size)
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    return SigLipLoss(rank=rank, world_size=world_size)
