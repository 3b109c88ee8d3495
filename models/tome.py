"""ToMe: token merging in the ViT image tower (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023;
reference code ``facebookresearch/ToMe``, ``tome/merge.py: bipartite_soft_matching, merge_wavg`` and
``tome/patch/timm.py``). Our own code, following the reference's algorithm:

In every block, between attention and MLP, ``r`` tokens are merged away: the tokens are split alternately into sets
A and B; each token of A is matched to its most similar token of B by the cosine similarity of the attention's keys
averaged over heads; the ``r`` most similar pairs are merged (size-weighted average, the merged token's size the sum);
the class token is never merged. Token sizes are carried from block to block, so merges stay size-weighted, and
optionally enter the attention as proportional attention (``log size`` added to the logits: a float mask, so it
runs on SDPA's math / memory-efficient kernels, not flash; off by default). ``r = 0`` in every block is the plain
ViT bit for bit. Usable training-free on a trained ViT (same parameters) and trained with merging.

The sizes and the matching are block inputs and outputs, not state kept on the tower: an activation-checkpointed
block recomputes the same matching from the same inputs in backward (tests check gradients with and without
checkpointing).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from models.attention import attention


def tome_schedule(layers: int, r: Union[int, Sequence[int]], tokens: int) -> List[int]:
    """Tokens merged per block: a constant ``r`` or one value per block, each capped so that at least the class token
    and one other token remain ((``t - 1) // 2`` at most, ``t`` the block's input tokens).

    Raises:
        ValueError: a negative ``r``, or a list whose length is not ``layers``.
    """
    rs = [int(r)] * layers if isinstance(r, int) else [int(v) for v in r]
    if len(rs) != layers or min(rs, default=0) < 0:
        raise ValueError(f"tome r: a non-negative int or {layers} non-negative ints (one per block), got {r!r}")
    out = []
    for v in rs:
        v = min(v, (tokens - 1) // 2)
        out.append(v)
        tokens -= v
    return out


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ToMe's matching (reference ``bipartite_soft_matching`` with ``class_token=True``).

    Args:
        metric: ``[B, N, c]`` per-token keys (averaged over heads); token 0 is the class token, never merged.
        r: tokens to merge away, ``<= (N - 1) // 2``.

    Returns:
        ``merge(x [B, N, C], reduce) -> [B, N - r, C]``: the unmerged A tokens (class token first, original order),
        then B with the merged A tokens reduced into their matches (``reduce`` as ``Tensor.scatter_reduce``).
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        scores[:, 0, :] = -math.inf  # the class token (first of A) is never merged
        node_max, node_idx = scores.max(dim=-1)  # [B, Na]
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # [B, Na, 1]
        unm_idx = edge_idx[:, r:].sort(dim=1)[0]  # kept A tokens, in order (class token first)
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, t1 - r, c))
        moved = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), moved, reduce=reduce)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (reference ``merge_wavg``): ``x [B, N, C]``, ``size [B, N, 1]`` (None: all 1) ->
    ``(x [B, N - r, C], size [B, N - r, 1])``; computed in fp32 so sizes stay exact integers."""
    size = torch.ones_like(x[..., :1], dtype=torch.float32) if size is None else size
    merged = merge(x.float() * size, "sum")
    size = merge(size, "sum")
    return (merged / size).to(x.dtype), size


class ToMeBlock(ResidualAttentionBlock):
    """open_clip's residual block with a merge between attention and MLP (same parameters; class set by
    :func:`apply_tome`). ``forward(x [B, N, D], size [B, N, 1] | None, r, prop_attn) -> (x [B, N - r, D], size)``."""

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None, r: int = 0,  # type: ignore[override]
                prop_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn = self.attn
        q, k, v = attn.qkv(self.ln_1(x))  # [B, H, N, d]
        bias = size.log().to(q.dtype)[:, None, None, :, 0] if prop_attn and size is not None else None  # [B,1,1,N]
        o = attention(q, k, v, attn.backend, mask=bias, dropout_p=attn.dropout if self.training else 0.0)
        x = x + self.ls_1(attn.out(o))
        if r > 0:
            x, size = merge_wavg(bipartite_soft_matching(k.mean(dim=1), r), x, size)  # keys averaged over heads
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x, size


class ToMeVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer`` whose blocks merge tokens (``tome_r`` per block, ``tome_prop_attn``; set by
    :func:`apply_tome`). ``tokens_per_block``: the tokens entering each block (host ints: shapes are static given
    ``r``); after each forward ``last_stats["tokens_last_block"]`` is the last block's (a detached tensor).
    Average pooling (``pool_type="avg"``) is size-weighted over the merged patch tokens."""

    tome_r: List[int]
    tome_prop_attn: bool = False
    tokens_per_block: List[int]
    progress_metrics = {"tokens_last_block": "T"}

    def forward(self, x: torch.Tensor):
        x = self._embeds(x)
        size = None
        for blk, r in zip(self.transformer.resblocks, self.tome_r):
            last = x.shape[1]
            x, size = blk(x, size=size, r=r, prop_attn=self.tome_prop_attn)
        self.last_stats = {"tokens_last_block": torch.tensor(float(last))}
        if self.pool_type == "avg" and self.attn_pool is None and size is not None:
            x = self.ln_post(x) if not self.final_ln_after_pool else x
            w = size[:, 1:].to(x.dtype)  # [B, N - 1, 1]
            pooled = (x[:, 1:] * w).sum(1) / w.sum(1)
            pooled = self.ln_post(pooled) if self.final_ln_after_pool else pooled
        else:
            pooled, _ = self._pool(x)
        return pooled @ self.proj if self.proj is not None else pooled


def apply_tome(visual: VisionTransformer, r: Union[int, Sequence[int]], prop_attn: bool = False) -> VisionTransformer:
    """Make an open_clip ``VisionTransformer`` merge ``r`` tokens per block (an int, or one per block; capped by
    :func:`tome_schedule`), in place (classes change as ToMe's timm patch does; parameters and state-dict keys stay).
    The attention modules must be :class:`models.attention.SelfAttention` (``models.create_model`` installs them).

    Raises:
        ValueError: not a plain open_clip ViT (another reducer or quadtree tokens already applied), or a bad ``r``.
    """
    if not isinstance(visual, VisionTransformer) or type(visual) not in (VisionTransformer, ToMeVisionTransformer):
        raise ValueError(f"ToMe needs an open_clip VisionTransformer image tower, not {type(visual).__name__}")
    blocks = visual.transformer.resblocks
    tokens = visual.positional_embedding.shape[0]
    visual.tome_r = tome_schedule(len(blocks), r, tokens)
    visual.tome_prop_attn = prop_attn
    visual.tokens_per_block = token_counts(tokens, visual.tome_r)
    for blk in blocks:
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        inner.__class__ = ToMeBlock
    visual.__class__ = ToMeVisionTransformer
    return visual


def token_counts(tokens: int, schedule: Sequence[int]) -> List[int]:
    """Tokens entering each block: ``tokens`` (class token included), then minus each block's ``r``."""
    counts = [tokens]
    for r in schedule[:-1]:
        counts.append(counts[-1] - r)
    return counts
