"""Distillation of a token-reducing image tower from a frozen full-token teacher: DynamicViT's
(``raoyongming/DynamicViT``, ``losses.py``, ``DistillDiffPruningLoss_dynamic``), for a CLIP image tower.

The teacher (:func:`models.pretrained.load_teacher`: the plain ViT the student is built on, from a checkpoint) is
attached to the student tower outside the module tree (:func:`attach_teacher`), so no state dict, optimizer,
``.to()`` or sharding sees it; the tower calls :func:`teacher_outputs` and :func:`distill_losses` in its training
forward (:class:`models.dynamicvit.DynamicViTVisionTransformer`, the only tower that takes one).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer


def distill_losses(embed: torch.Tensor, tokens: torch.Tensor, policy: torch.Tensor, teacher_embed: torch.Tensor,
                   teacher_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """DynamicViT's distillation terms against a full-token teacher (``raoyongming/DynamicViT``, ``losses.py``,
    ``DistillDiffPruningLoss_dynamic``), unweighted, for a CLIP image tower.

    Args:
        embed: ``[B, E]`` the student's image embedding (projected, before CLIP's L2 normalisation).
        tokens: ``[B, N0, D]`` the student's final ``ln_post``-normed patch tokens (dropped ones included: training).
        policy: ``[B, 1 + N0, 1]`` the last stage's keep decisions, class token first.
        teacher_embed, teacher_tokens: the teacher's, same shapes (no grad).

    Returns:
        ``(embed_term, token_term)``, 0-dim fp32: ``embed_term`` the batch mean of ``|normalize(embed) -
        normalize(teacher_embed)|^2`` (``2 - 2 cos``, in ``[0, 4]``; the reference's KL on class logits, which a CLIP
        tower has not); ``token_term`` the mean squared error over the channels of the kept tokens (the reference's
        ``token_distill``; 0 when the batch keeps none; the mask carries no gradient, as the reference's boolean
        one). Nothing is read on the host.
    """
    diff = F.normalize(embed.float(), dim=-1) - F.normalize(teacher_embed.float(), dim=-1)
    embed_term = diff.square().sum(dim=-1).mean()
    kept = (policy[:, 1:, 0] > 0.5).float().detach()  # [B, N0]
    err = (tokens.float() - teacher_tokens.float()).square().mean(dim=-1)  # [B, N0]
    token_term = (err * kept).sum() / kept.sum().clamp(min=1.0)
    return embed_term, token_term


def teacher_outputs(teacher: VisionTransformer, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's ``(embedding [B, E], patch tokens [B, N0, D])`` of ``images [B, 3, H, W]`` under
    ``no_grad`` and the caller's autocast. The teacher follows the images' device and dtype on first use (so it is
    sharded by nothing and cast as the engine casts the student's inputs: fp32 under autocast, bf16 / fp16 under
    DeepSpeed's pure precisions)."""
    w = teacher.conv1.weight
    if w.device != images.device or w.dtype != images.dtype:
        teacher.to(device=images.device, dtype=images.dtype)
    with torch.no_grad():
        return teacher(images)


def attach_teacher(visual: VisionTransformer, teacher: VisionTransformer, embed_weight: float = 0.5,
                   token_weight: float = 0.5) -> None:
    """Make the DynamicViT tower ``visual`` distil from ``teacher`` (a plain open_clip ``VisionTransformer``, e.g.
    :func:`models.pretrained.load_teacher`'s) in every training forward with grad (:func:`distill_losses`, weighted by
    ``embed_weight`` and ``token_weight``). The teacher is frozen (``requires_grad`` off, eval mode, tokens output)
    and held in the tower's ``__dict__``, outside the module tree: it is in no state dict, optimizer, ``.to()`` or
    sharding, and a resumed run attaches it again. Forwards without grad (evaluation; the first pass of
    accumulation with negatives) skip it.

    Raises:
        ValueError: ``visual`` is not a DynamicViT tower; the teacher has another patch grid, width or embedding size
            (the message names both); a weight negative or not finite.
    """
    if not getattr(type(visual), "takes_teacher", False):
        raise ValueError(f"distillation needs a DynamicViT image tower, not {type(visual).__name__}")
    if type(teacher) is not VisionTransformer:
        raise ValueError(f"distillation teacher: a plain open_clip VisionTransformer, not {type(teacher).__name__}")
    shapes = lambda v: {"positional_embedding": tuple(v.positional_embedding.shape),
                        "proj": None if v.proj is None else tuple(v.proj.shape)}
    if shapes(teacher) != shapes(visual):
        raise ValueError(f"distillation teacher: patch grid / width / embedding {shapes(teacher)} differ from the "
                         f"student's {shapes(visual)}")
    for field, w in (("loss.distill_embed_weight", embed_weight), ("loss.distill_token_weight", token_weight)):
        if not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)):
            raise ValueError(f"{field}: {w!r}; allowed: a finite number >= 0")
    teacher.requires_grad_(False).eval()
    teacher.output_tokens = True
    visual.__dict__["distill_teacher"] = teacher
    visual.__dict__["distill_weights"] = (float(embed_weight), float(token_weight))

