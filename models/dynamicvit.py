"""DynamicViT: dynamic token sparsification in the ViT image tower (Rao et al., "DynamicViT: Efficient Vision
Transformers with Dynamic Token Sparsification", NeurIPS 2021; reference code ``raoyongming/DynamicViT``,
``models/dyvit.py`` (``vit.py`` in early versions): ``PredictorLG``, ``Attention.softmax_with_policy``,
``batch_index_select``, ``VisionTransformerDiffPruning.forward``; ``losses.py``: the ratio term of
``DistillDiffPruningLoss_dynamic``). Our own code, following the reference's algorithm:

* Three pruning stages, before blocks ``L//4, L//2, 3L//4`` of an ``L``-block tower (3, 6, 9 of 12, the paper's;
  1, 2, 3 of ViT-tiny-8's 4). Stage ``s`` (1-based) keeps ``rho**s`` of the *initial* ``N0`` patch tokens; the
  class token is always kept.
* At each stage a :class:`DynamicViTPredictor` (the reference's ``PredictorLG``) scores the current patch tokens:
  ``[B, N, 2]`` log-probabilities, column 0 = keep. Its input is each token's own features (half the channels) and
  the policy-weighted mean of the tokens still kept (the other half).
* Training (static shapes): a straight-through hard Gumbel-softmax sample ``hard [B, N0, 1]`` (0/1 values, gradient
  of the soft sample) times the previous stage's decision, so a dropped token stays dropped. Dropped tokens stay in
  the sequence; every block from the first stage on runs :func:`softmax_with_policy` (fp32), in which every token
  attends to the kept keys and to itself (a dropped one too), so kept tokens never see dropped ones. The
  predictors learn through the policy in that softmax and through the ratio loss (:func:`ratio_loss`).
* Evaluation: the ``int(N0 * rho**s)`` best-scored tokens (a host int: static shapes) are gathered (class token
  first) and the remaining blocks run plain attention (:func:`models.attention.attention`, any kernel) on them.
* Ratio loss (training): per stage, ``(kept fraction of the N0 patches - rho**s)^2`` averaged over the batch, then
  over the stages, times ``ratio_weight`` (reference default 2.0); :meth:`DynamicViTVisionTransformer.extra_losses`
  hands it to the trainer, which adds it to the contrastive loss and logs it.

* Distillation (optional; the reference's ``DistillDiffPruningLoss_dynamic``; :mod:`models.distill`): a frozen
  full-token teacher, the plain ViT the student is built on (:func:`models.pretrained.load_teacher`), attached outside
  the module tree, sees the same images in each training forward with grad. Its two terms, image embedding (``2 -
  2 cos``, in place of the reference's KL on class logits) and kept tokens (MSE), join the extra losses.

The reference's variants for LV-ViT, Swin and ConvNeXt are not ported.

Differences from the reference, on purpose: blocks before the first stage run plain attention (the reference runs
them with an all-ones policy, equal up to its ``eps``); with ``pool_type="avg"`` the training mean is over the kept
patch tokens (the reference pools the class token only); predictors are initialised as the reference initialises its
whole model (truncated normal, std 0.02, zero biases).

The Gumbel noise is drawn in the tower's forward, outside the blocks, so an activation-checkpointed block's
recomputation in backward cannot draw a different sample; randomness inside blocks (attention dropout) is replayed by
``torch.utils.checkpoint``'s ``preserve_rng_state`` (tests check gradients with and without checkpointing).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import SelfAttention, attention
from models.distill import distill_losses, teacher_outputs

STAGES = 3  # pruning stages (the paper's)
MIN_BLOCKS = 4  # distinct stage positions L//4 < L//2 < 3L//4 need L >= 4


def stage_blocks(layers: int) -> List[int]:
    """Indices of the blocks the three pruning stages run before: ``[L//4, L//2, 3L//4]`` (0-indexed; ``[3, 6, 9]``
    for 12 blocks, ``[1, 2, 3]`` for 4)."""
    return [layers // 4, layers // 2, 3 * layers // 4]


def keep_count(patches: int, keep_ratio: float, stage: int) -> int:
    """Patch tokens kept at evaluation after stage ``stage`` (1-based): ``int(patches * keep_ratio**stage)``, as the
    reference's ``int(init_n * token_ratio[stage - 1])`` (a host int)."""
    return int(patches * keep_ratio ** stage)


def keep_targets(keep_ratio: float) -> List[float]:
    """Target kept fractions of the initial patch tokens per stage: ``[rho, rho**2, rho**3]``."""
    return [keep_ratio ** s for s in range(1, STAGES + 1)]


def tokens_per_block(layers: int, patches: int, keep_ratio: float) -> List[int]:
    """Tokens entering each block at evaluation, class token included: ``1 + patches`` before the first stage, then
    ``1 + keep_count(patches, rho, s)`` from stage ``s``'s block on (ViT-tiny-8, rho 0.7: ``[17, 12, 8, 6]``)."""
    stages = stage_blocks(layers)
    counts, kept = [], patches
    for i in range(layers):
        if i in stages:
            kept = keep_count(patches, keep_ratio, stages.index(i) + 1)
        counts.append(1 + kept)
    return counts


def batch_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The reference's ``batch_index_select``: ``x [B, N, C]``, ``idx [B, K]`` int64 -> ``[B, K, C]``,
    ``out[b, k] = x[b, idx[b, k]]``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def softmax_with_policy(scores: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference's ``softmax_with_policy``: attention probabilities over the kept keys.

    Args:
        scores: ``[B, H, N, N]`` logits ``q k^T * scale`` (computed in fp32 by the caller).
        policy: ``[B, N, 1]`` keep decisions over the tokens (1 kept, 0 dropped; the straight-through sample, so
            it carries the predictor's gradient).
        eps: the reference's stabiliser: ``(e + eps / N) / (sum(e) + eps)``.

    Returns:
        ``[B, H, N, N]`` fp32: row ``i`` is the softmax over the keys ``j`` with ``policy[j] = 1`` and over ``j = i``
        (a dropped token attends to the kept tokens and to itself, so its row stays defined; a kept token never
        sees a dropped one), up to ``eps``. The row max over all keys is subtracted first, as the reference does.
    """
    B, N = policy.shape[:2]
    keys = policy.reshape(B, 1, 1, N).float()
    eye = torch.eye(N, dtype=torch.float32, device=policy.device).view(1, 1, N, N)
    attn_policy = keys + (1.0 - keys) * eye  # [B, 1, N, N]
    scores = scores.float()
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp() * attn_policy
    return (e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q, k, v [B, H, N, d]`` under ``policy [B, N, 1]`` (:func:`softmax_with_policy`): scores and
    probabilities in fp32 with autocast off, then ``probs @ v`` in ``v``'s dtype. Returns ``[B, H, N, d]``."""
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, N, N]
        probs = softmax_with_policy(scores, policy)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
    return probs.to(v.dtype) @ v


def ratio_loss(policies: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """The reference's ratio term, unweighted: ``mean over stages of mean over batch of
    (policy[b].mean() - target)^2``.

    Args:
        policies: one ``[B, N0, 1]`` (or ``[B, N0]``) hard keep decision per stage over all ``N0`` initial patch
            tokens (dropped ones 0), class token excluded.
        targets: the target kept fraction per stage (:func:`keep_targets`).

    Returns:
        A 0-dim fp32 tensor (0 when every sample keeps exactly the target fraction at every stage).
    """
    terms = [(p.float().flatten(1).mean(dim=1) - t).square().mean() for p, t in zip(policies, targets)]
    return torch.stack(terms).mean()


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, policy: Optional[torch.Tensor] = None,
               grad_checkpointing: bool = False) -> torch.Tensor:
    """Run ``blocks`` on ``x [B, N, D]``: with ``policy [B, N, 1]`` each as ``blk(x, policy=policy)`` (masked
    attention, training), without as ``blk(x)`` (plain attention; on gathered tokens at evaluation). Blocks wrapped
    by ``checkpoint_wrapper`` recompute with the same arguments; ``grad_checkpointing`` (open_clip's own switch,
    ``transformer.grad_checkpointing``) checkpoints each call here instead."""
    for blk in blocks:
        kwargs = {} if policy is None else {"policy": policy}
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False, **kwargs)
        else:
            x = blk(x, **kwargs)
    return x


class DynamicViTPredictor(nn.Module):
    """The reference's ``PredictorLG``: per-token keep / drop log-probabilities.

    ``in_conv = LayerNorm(C) -> Linear(C, C) -> GELU``; its output's first ``C // 2`` channels are the local
    feature, the policy-weighted mean of the last ``C - C // 2`` over the kept tokens the global one; ``out_conv =
    Linear(C, C // 2) -> GELU -> Linear(C // 2, C // 4) -> GELU -> Linear(C // 4, 2) -> LogSoftmax``.

    ``forward(x [B, N, C], policy [B, N, 1]) -> [B, N, 2]`` (column 0: log P(keep)). Linear weights initialised
    truncated normal (std 0.02), biases 0, as the reference's ``_init_weights``. Unlike the reference, the policy
    sum is clamped at 1e-6: with few patches (16 on ViT-tiny-8) a sample that drops all of them at a stage is
    common early in training, and the reference's ``0 / 0`` would turn the whole batch's loss into NaN.
    """

    def __init__(self, width: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2), nn.GELU(),
            nn.Linear(width // 2, width // 4), nn.GELU(),
            nn.Linear(width // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        B, N, C = x.shape
        policy = policy.to(x.dtype)
        local = x[..., :C // 2]
        kept = policy.sum(dim=1, keepdim=True).clamp(min=1e-6)  # every token dropped: a 0 global feature, no NaN
        glob = (x[..., C // 2:] * policy).sum(dim=1, keepdim=True) / kept  # [B, 1, C - C // 2]
        return self.out_conv(torch.cat([local, glob.expand(B, N, -1)], dim=-1))


class DynamicViTBlock(ResidualAttentionBlock):
    """open_clip's residual block (same parameters; class set by :func:`apply_dynamicvit`) whose attention takes a
    keep policy. ``forward(x [B, N, D], policy [B, N, 1] | None) -> [B, N, D]``: with a policy,
    :func:`policy_attention` (training: dropped tokens in the sequence, masked as keys); without,
    :func:`models.attention.attention` on the configured kernel (evaluation, gathered tokens; blocks before the
    first stage)."""

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        attn = self.attn
        q, k, v = attn.qkv(self.ln_1(x))  # [B, H, N, d]
        dropout_p = attn.dropout if self.training else 0.0
        if policy is None:
            o = attention(q, k, v, attn.backend, dropout_p=dropout_p)
        else:
            o = policy_attention(q, k, v, policy, dropout_p=dropout_p)
        x = x + self.ls_1(attn.out(o))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class DynamicViTVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer`` with DynamicViT's token sparsification (set by :func:`apply_dynamicvit`):
    ``forward(images [B, 3, H, W]) -> [B, embed_dim]`` (``(pooled, tokens)`` with ``output_tokens``; in training the
    tokens include the dropped ones).

    Attributes:
        predictors: ``nn.ModuleList`` of 3 :class:`DynamicViTPredictor`.
        keep_ratio: ``rho``; stage ``s`` keeps ``rho**s`` of the initial patch tokens.
        ratio_weight: weight of the ratio loss in :meth:`extra_losses`.
        dynamicvit_stages: the block indices the stages run before (:func:`stage_blocks`).
        tokens_per_block: tokens entering each block at evaluation, class token included (host ints);
            :attr:`train_tokens_per_block` the same in training (all of them).
        last_stats: after each forward, detached fp32 0-dim device tensors (nothing is read on the host):
            ``tokens_last_block`` (tokens the last block works on, class token included; in training the batch mean
            of the kept tokens, as the dropped ones stay in the sequence) and ``keep_ratio_last`` (kept fraction
            of the initial patch tokens at the last stage; target ``rho**3``).
    """

    predictors: nn.ModuleList
    takes_teacher = True  # models.distill.attach_teacher
    keep_ratio: float
    ratio_weight: float = 2.0
    dynamicvit_stages: List[int]
    tokens_per_block: List[int]
    progress_metrics = {"keep_ratio_last": "keep"}

    def forward(self, x: torch.Tensor):
        images = x
        x, policy = self.forward_blocks(self._embeds(x))
        pooled, tokens = self._pool_kept(x, policy)
        if self.proj is not None:
            pooled = pooled @ self.proj
        teacher = self.__dict__.get("distill_teacher")
        self._distill = {}
        if teacher is not None and policy is not None and torch.is_grad_enabled():  # a training forward with grad
            embed_term, token_term = distill_losses(pooled, tokens, policy, *teacher_outputs(teacher, images))
            embed_weight, token_weight = self.__dict__["distill_weights"]
            self._distill = {"distill_embed_loss": embed_weight * embed_term,
                             "distill_token_loss": token_weight * token_term}
        return (pooled, tokens) if self.output_tokens else pooled

    def forward_blocks(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The blocks with the three stages on ``x [B, 1 + N0, D]`` (after ``_embeds``). Returns, in training,
        ``(x [B, 1 + N0, D], policy [B, 1 + N0, 1])`` (the last stage's keep decisions, class token first); at
        evaluation ``(x [B, 1 + int(N0 rho^3), D], None)`` (the kept tokens, class token first). Sets
        ``last_stats`` and the ratio loss."""
        blocks = self.transformer.resblocks
        ckpt = bool(getattr(self.transformer, "grad_checkpointing", False))
        stages = self.dynamicvit_stages
        bounds = [*stages, len(blocks)]
        B, n0 = x.shape[0], x.shape[1] - 1
        x = run_blocks(blocks[:stages[0]], x, grad_checkpointing=ckpt)
        prev = torch.ones(B, n0, 1, dtype=torch.float32, device=x.device)  # previous keep decision
        if self.training:
            hards = []
            for s, predictor in enumerate(self.predictors):
                pred = predictor(x[:, 1:], prev)  # [B, N0, 2]
                hard = F.gumbel_softmax(pred.float(), hard=True)[:, :, 0:1] * prev  # [B, N0, 1], straight-through
                hards.append(hard)
                policy = torch.cat([torch.ones_like(hard[:, :1]), hard], dim=1)  # class token always kept
                x = run_blocks(blocks[bounds[s]:bounds[s + 1]], x, policy, grad_checkpointing=ckpt)
                prev = hard
            self._ratio_loss = ratio_loss(hards, keep_targets(self.keep_ratio))
            kept = hards[-1].sum(dim=(1, 2))  # [B]
            self.last_stats = {"tokens_last_block": (1 + kept.mean()).detach(),
                               "keep_ratio_last": (kept.mean() / n0).detach()}
            return x, policy
        num_keep = n0
        for s, predictor in enumerate(self.predictors):
            pred = predictor(x[:, 1:], prev)  # [B, N, 2] on the current (gathered) tokens
            num_keep = keep_count(n0, self.keep_ratio, s + 1)
            keep = pred[:, :, 0].argsort(dim=1, descending=True)[:, :num_keep]  # [B, K]
            idx = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)  # class token first
            x = batch_gather(x, idx)  # [B, 1 + K, D]
            prev = torch.ones(B, num_keep, 1, dtype=torch.float32, device=x.device)
            x = run_blocks(blocks[bounds[s]:bounds[s + 1]], x, grad_checkpointing=ckpt)
        self._ratio_loss = None
        f32 = {"dtype": torch.float32, "device": x.device}
        self.last_stats = {"tokens_last_block": torch.full((), 1.0 + num_keep, **f32),
                           "keep_ratio_last": torch.full((), num_keep / n0, **f32)}
        return x, None

    @property
    def train_tokens_per_block(self) -> List[int]:
        """Tokens entering each block in training: every token (dropped ones stay in the sequence, masked), class
        token included; the memory model reads it (:mod:`harness.fit.model_shape`)."""
        return [self.tokens_per_block[0]] * len(self.tokens_per_block)

    def _pool_kept(self, x: torch.Tensor, policy: Optional[torch.Tensor]):
        """open_clip's ``_pool``; with a training policy and ``pool_type="avg"`` the mean is over the kept patch
        tokens only (what evaluation's gathered tokens give)."""
        if policy is None or self.pool_type != "avg":
            return self._pool(x)
        w = policy[:, 1:].to(x.dtype)  # [B, N0, 1]
        mean = lambda t: (t[:, 1:] * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-6)  # all dropped: 0, not NaN
        if self.final_ln_after_pool:
            return self.ln_post(mean(x)), x[:, 1:]
        x = self.ln_post(x)
        return mean(x), x[:, 1:]

    def extra_losses(self) -> Dict[str, torch.Tensor]:
        """The weighted extra losses of the last training forward (empty at eval): ``ratio_loss`` (``ratio_weight``
        x :func:`ratio_loss`) and, with a teacher attached (:func:`models.distill.attach_teacher`) and grad enabled,
        ``distill_embed_loss`` and ``distill_token_loss`` (their weights x the terms of
        :func:`models.distill.distill_losses`)."""
        loss = getattr(self, "_ratio_loss", None)
        if loss is None or not self.training:
            return {}
        return {"ratio_loss": self.ratio_weight * loss, **getattr(self, "_distill", {})}


def apply_dynamicvit(visual: VisionTransformer, keep_ratio: float, ratio_weight: float = 2.0) -> VisionTransformer:
    """Make an open_clip ``VisionTransformer`` sparsify its tokens as DynamicViT, in place: the class becomes
    :class:`DynamicViTVisionTransformer`, every block's :class:`DynamicViTBlock` (through a ``checkpoint_wrapper`` if
    there is one), and ``visual.predictors`` three new :class:`DynamicViTPredictor` on the tower's parameter device
    and dtype (a meta tower gives meta predictors). The tower's parameters and state-dict keys stay;
    ``predictors.*`` keys are added. A tower already converted gets fresh predictors. The attention modules must be
    :class:`models.attention.SelfAttention` (``models.create_model`` installs them).

    Args:
        keep_ratio: ``rho``, ``0 < rho < 1``; stage ``s`` keeps ``int(N0 * rho**s)`` of the ``N0`` patch tokens at
            evaluation, and at least 1 must remain at the last stage.
        ratio_weight: weight of the ratio loss (reference default 2.0), ``>= 0``.

    Raises:
        ValueError: not a plain open_clip ViT, attentional pooling or ``pool_type`` other than ``tok`` / ``avg``,
            attention not :class:`SelfAttention`, fewer than 4 blocks, or ``dynamicvit keep_ratio`` /
            ``dynamicvit ratio_weight`` out of range (the message names the field and the allowed range).
    """
    if type(visual) not in (VisionTransformer, DynamicViTVisionTransformer):
        raise ValueError(f"DynamicViT needs a plain open_clip VisionTransformer image tower, not "
                         f"{type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise ValueError("DynamicViT needs an image tower pooled by its class token or the mean of its patch tokens "
                         f"(pool_type tok / avg, no attentional pooling), not pool_type {visual.pool_type!r}"
                         + (" with attentional pooling" if visual.attn_pool is not None else ""))
    blocks = visual.transformer.resblocks
    layers = len(blocks)
    if layers < MIN_BLOCKS:
        raise ValueError(f"dynamicvit blocks: the tower has {layers} blocks; DynamicViT's 3 stages need at least "
                         f"{MIN_BLOCKS}")
    patches = visual.positional_embedding.shape[0] - 1
    lowest = math.ceil((1.0 / patches) ** (1.0 / STAGES) * 1000) / 1000
    if not (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio < 1) \
            or keep_count(patches, keep_ratio, STAGES) < 1:
        raise ValueError(f"dynamicvit keep_ratio: {keep_ratio!r}; allowed: 0 < keep_ratio < 1 with at least 1 of the "
                         f"{patches} patches kept at the last stage (int({patches} * keep_ratio**3) >= 1, about "
                         f"keep_ratio >= {lowest:g})")
    if not (isinstance(ratio_weight, (int, float)) and ratio_weight >= 0 and math.isfinite(ratio_weight)):
        raise ValueError(f"dynamicvit ratio_weight: {ratio_weight!r}; allowed: a finite number >= 0")
    for blk in blocks:
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        if not isinstance(inner, ResidualAttentionBlock) or not isinstance(inner.attn, SelfAttention):
            raise ValueError("DynamicViT needs open_clip ResidualAttentionBlocks whose attention is "
                             "models.attention.SelfAttention (build the model with models.create_model)")
    weight = visual.conv1.weight
    with torch.device(weight.device):
        predictors = nn.ModuleList([DynamicViTPredictor(weight.shape[0]) for _ in range(STAGES)])
    visual.predictors = predictors.to(dtype=weight.dtype)
    visual.keep_ratio = float(keep_ratio)
    visual.ratio_weight = float(ratio_weight)
    visual.dynamicvit_stages = stage_blocks(layers)
    visual.tokens_per_block = tokens_per_block(layers, patches, float(keep_ratio))
    visual._ratio_loss = None
    visual.last_stats = {}
    for blk in blocks:
        getattr(blk, "_checkpoint_wrapped_module", blk).__class__ = DynamicViTBlock
    visual.__class__ = DynamicViTVisionTransformer
    return visual
