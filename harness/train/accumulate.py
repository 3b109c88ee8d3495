"""Gradient accumulation that adds negatives: the ``K`` micro batches of an optimizer step are contrasted with each
other, so the contrastive loss sees all ``K x micro x world`` samples of the step (``train.accum_negatives``).

Two passes over the step's micro batches (GradCache, Gao et al. 2021, arXiv 2101.06983, repository
``luyug/GradCache``; open_clip's ``open_clip_train --accum-freq K``, ``train_one_epoch`` in
``open_clip_train/train.py``, does the same with a loss per micro batch):

1. every micro batch is forwarded without gradients and its features are kept (``[K B, d]`` per tower on each rank,
   a few KiB per sample), with the random state it started from (CPU and CUDA generators: dropout, DTP-ViT's
   Gumbel noise);
2. the contrastive loss of this rank's ``K B`` cached rows against the ``W K B`` gathered columns (the configured
   loss, dense or tiled, with gather-with-grad) is computed once, and its gradient with respect to the cached
   features (and to ``logit_scale``, ``logit_bias``) is taken;
3. each micro batch is forwarded again with gradients from its saved random state, so the features equal pass 1's
   (GradCache's ``RandContext``), and back-propagates the surrogate ``K <f_k, g_k> + s_k g_s (+ b_k g_b)`` plus
   its own extra losses (DTP-ViT's boundary loss) through the engine, which divides by ``K`` as in plain
   accumulation: the sum over the ``K`` micro batches is the gradient of the step's loss plus the mean extra loss.

Unlike open_clip's, the loss and its gradient are computed once per step, not once per micro batch. The engine is
stepped after each micro batch as in plain accumulation (DDP's ``no_sync``, FSDP2's gradient-sync flag and
DeepSpeed's accumulation boundary are unchanged), so the ``K``-th micro batch's step is the optimizer step. Nothing
is read on the host: the step's scalars are returned as device tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

import models
from models.decatt import extra_losses as tower_extra_losses

RngState = Tuple[torch.Tensor, Optional[torch.Tensor]]


def rng_state(device: torch.device) -> RngState:
    """The CPU generator's state and ``device``'s CUDA generator's state (None off CUDA); host copies, no sync."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: RngState, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def model_inputs(batch: Mapping[str, Any], device: torch.device, image_stats: Tuple[Any, Any]
                 ) -> Tuple[Any, torch.Tensor]:
    """A micro batch on ``device``: images ``[B, 3, H, W]`` (uint8 from pinned memory normalised there with
    :func:`models.normalize_uint8` and ``image_stats``), tokens ``[B, L]``. With the data workers' quadtree
    selection (``quad [B, N]``, ``data.tokenizer=quadtree``) the image input is ``(images, quad)``
    (:mod:`models.mixed_res`)."""
    image = batch["image"].to(device, non_blocking=True)
    if image.dtype == torch.uint8:
        image = models.normalize_uint8(image, *image_stats)
    if "quad" in batch:
        image = (image, batch["quad"].to(device, non_blocking=True))
    return image, batch["text"].to(device, non_blocking=True)


def loss_heads(out: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 ``logit_scale`` clamped at 100 (CLIP's bound on the inverse temperature, applied in the loss so it holds
    under any sharding) and SigLIP's ``logit_bias`` (None without one)."""
    bias = out["logit_bias"].float() if "logit_bias" in out else None
    return out["logit_scale"].float().clamp(max=100.0), bias


def tower_report(visual: Any, extras: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image tower's extra losses and its ``last_stats`` (DTP-ViT's shortening factor...), detached fp32."""
    report = {name: v.detach().float() for name, v in extras.items()}
    for name, v in getattr(visual, "last_stats", {}).items():
        report.setdefault(name, v.float())
    return report


class NegativesAccumulation:
    """Accumulation with negatives for one rank: collect an optimizer step's ``K`` micro batches, then run the two
    passes (see the module docstring).

    Args:
        engine: the :class:`harness.engines.Engine` (its ``forward``/``backward``/``step``).
        loss_fn: the contrastive loss, ``loss_fn(image [N, d], text [N, d], scale, bias) -> []`` with
            gather-with-grad over ranks and labels offset by ``N * rank`` (:func:`harness.train.losses.build_loss`).
        accum_steps: ``K``, micro batches per optimizer step.
        device: this rank's device.
        image_stats: ``(mean, std)`` for :func:`models.normalize_uint8` of uint8 images.
    """

    def __init__(self, engine: Any, loss_fn: Callable[..., torch.Tensor], accum_steps: int, device: torch.device,
                 image_stats: Tuple[Any, Any]):
        self.engine, self.loss_fn, self.K, self.device, self.image_stats = (
            engine, loss_fn, accum_steps, device, image_stats)
        self.batches: List[Mapping[str, Any]] = []

    def add(self, batch: Mapping[str, Any], report: Callable[[Dict[str, torch.Tensor]], None],
            watch: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> bool:
        """Keep one micro batch; at the ``K``-th run both passes and the optimizer step, hand each scalar dict to
        ``report`` and return True (False before). ``watch`` (the non-finite guard's ``watch_loss`` for this step,
        :mod:`harness.engines.nonfinite`) sees the step's loss before its gradients are taken: a non-finite loss comes
        back as NaN, so every gradient is NaN and the step is skipped.

        Raises:
            RuntimeError: the engine's accumulation boundary is not at the ``K``-th micro batch.
        """
        self.batches.append(batch)
        if len(self.batches) < self.K:
            return False
        batches, self.batches = self.batches, []
        cached, states, heads = self._cache(batches)
        loss, grads = self._loss_and_grads(cached, heads, watch)
        report({"loss": loss.detach(), "logit_scale": heads[0].detach().reshape(-1)[0],
                **({"logit_bias": heads[1].detach().reshape(-1)[0]} if heads[1] is not None else {})})
        after = rng_state(self.device)
        for k, batch in enumerate(batches):
            set_rng_state(states[k], self.device)  # the recomputed features equal pass 1's
            report(self._backward(batch, k, grads))
            if self.engine.step() != (k == self.K - 1):
                raise RuntimeError(f"accumulation with negatives: the engine's accumulation boundary is not at micro "
                                   f"batch {self.K} of {self.K} (micro batch {k + 1} disagreed)")
        set_rng_state(after, self.device)  # the stream goes on from where pass 1 left it
        return True

    def _inputs(self, batch: Mapping[str, Any]) -> Tuple[Any, torch.Tensor]:
        return model_inputs(batch, self.device, self.image_stats)  # normalised per pass: never K float copies

    def _cache(self, batches):
        """Pass 1: ``([K B, d] image, [K B, d] text)`` fp32 features without grad, each micro batch's starting random
        state, and (scale, bias)."""
        states, image_feats, text_feats = [], [], []
        with torch.no_grad():
            for batch in batches:
                states.append(rng_state(self.device))
                out = self.engine.forward(*self._inputs(batch))
                image_feats.append(out["image_features"].float())
                text_feats.append(out["text_features"].float())
                heads = loss_heads(out)
                del out
        return (torch.cat(image_feats), torch.cat(text_feats)), states, heads

    def _loss_and_grads(self, cached, heads, watch=None):
        """The loss of this rank's ``K B`` rows against all ``W K B`` columns, and its gradients (of ``watch(loss)``
        when given) with respect to the cached features (each split into ``K`` micro batches) and the heads (None
        where there is no bias)."""
        leaves = [t.detach().requires_grad_() for t in (*cached, *heads) if t is not None]
        with torch.enable_grad():
            bias = leaves[3] if heads[1] is not None else None
            loss = self.loss_fn(leaves[0], leaves[1], leaves[2], bias)
            grads = torch.autograd.grad(watch(loss) if watch is not None else loss, leaves)
        micro = cached[0].shape[0] // self.K
        return loss, (grads[0].split(micro), grads[1].split(micro), grads[2], grads[3] if bias is not None else None)

    def _backward(self, batch, k: int, grads) -> Dict[str, torch.Tensor]:
        """Pass 2 for micro batch ``k``: forward with grad, back-propagate its share of the step's loss and its extra
        losses; returns the extra losses and the image tower's stats (detached)."""
        g_image, g_text, g_scale, g_bias = grads
        out = self.engine.forward(*self._inputs(batch))
        scale, bias = loss_heads(out)
        # d/dθ of K <f_k, g_k>, divided by K in the engine: this micro batch's share of the step loss's gradient;
        # s_k g_s in every micro batch, divided by K: the scale's gradient once
        share = self.K * ((out["image_features"].float() * g_image[k]).sum()
                          + (out["text_features"].float() * g_text[k]).sum()) + (scale * g_scale).sum()
        if bias is not None:
            share = share + (bias * g_bias).sum()
        visual = self.engine.module.visual
        extras = tower_extra_losses(visual)
        self.engine.backward(share + sum(v.float() for v in extras.values()) if extras else share)
        return tower_report(visual, extras)
