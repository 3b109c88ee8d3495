"""TokenLearner v1.1 in the ViT image tower (Ryoo et al., "TokenLearner: Adaptive Space-Time Tokenization for
Videos", NeurIPS 2021; reference code ``google-research/scenic``, ``scenic/projects/token_learner/model.py:
TokenLearnerModuleV11``). Our own code, following the reference's algorithm:

After the first ``at`` blocks, the ``N`` patch tokens ``x [B, N, C]`` are replaced by ``S`` learned tokens: an MLP
on the layer-normed tokens (``C -> 64 -> S``, GELU) gives one logit per patch and learned token, a softmax over the
``N`` patches turns them into ``S`` spatial attention maps (each sums to 1), and each learned token is its map's
weighted sum of the (un-normalised) input tokens. No TokenFuser. The class token is never touched, so the remaining
blocks see ``1 + S`` tokens. The paper's ViT-B/16 setting: ``S`` = 8 or 16 after block 9 of 12.
"""
from __future__ import annotations

from typing import List

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


class TokenLearnerV11(nn.Module):
    """``forward(x [B, N, C]) -> [B, S, C]`` (``S = tokens``), with ``return_weights=True`` also the spatial weights
    ``[B, S, N]`` (:meth:`weights`). Parameters: ``norm`` (LayerNorm C), ``fc1`` (C -> bottleneck), ``fc2``
    (bottleneck -> S); initialised as the reference's MLP (Xavier-uniform weights, biases ~ N(0, 1e-6))."""

    def __init__(self, width: int, tokens: int, bottleneck: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(bottleneck, tokens)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, S, N]``: non-negative, each learned token's weights sum to 1 over the ``N``
        tokens (softmax in fp32, returned in ``x``'s dtype)."""
        logits = self.fc2(self.act(self.fc1(self.norm(x))))  # [B, N, S]
        return logits.transpose(1, 2).float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        w = self.weights(x)  # [B, S, N]
        out = w @ x  # [B, S, C]: weighted sums of the input tokens
        return (out, w) if return_weights else out


class TokenLearnerVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer`` with a :class:`TokenLearnerV11` (``token_learner``) after the first
    ``token_learner_at`` blocks (set by :func:`apply_tokenlearner`): ``forward(x [B, 3, H, W]) -> [B, embed_dim]``.
    ``tokens_per_block``: tokens entering each block (class token included, host ints). After each forward,
    ``last_stats["tokens_last_block"]`` is the token count entering the last block (a scalar tensor made from the
    static shape; nothing is read from the device)."""

    token_learner: TokenLearnerV11
    token_learner_at: int
    tokens_per_block: List[int]
    progress_metrics = {"tokens_last_block": "T"}

    def forward(self, x: torch.Tensor):
        x = self._embeds(x)  # [B, 1 + N, C]
        last = x.shape[1]
        for i, blk in enumerate(self.transformer.resblocks):
            if i == self.token_learner_at:  # after `at` blocks: [B, 1 + N, C] -> [B, 1 + S, C]
                x = torch.cat([x[:, :1], self.token_learner(x[:, 1:])], dim=1)
            last = x.shape[1]
            x = blk(x)
        pooled, tokens = self._pool(x)
        self.last_stats = {"tokens_last_block": torch.tensor(float(last))}
        if self.proj is not None:
            pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled


def apply_tokenlearner(visual: VisionTransformer, tokens: int, at: int, bottleneck: int = 64) -> VisionTransformer:
    """Make an open_clip ``VisionTransformer`` learn ``tokens`` (``S``) tokens from its patch tokens after its first
    ``at`` blocks, in place: the class becomes :class:`TokenLearnerVisionTransformer` and ``visual.token_learner``
    a new :class:`TokenLearnerV11` on the tower's device and dtype (the tower's parameters and state-dict keys stay;
    ``token_learner.*`` keys are added). A tower already converted gets a fresh learner.

    Raises:
        ValueError: not a plain open_clip ViT (a subclass such as ToMe's or mixed resolution's would lose its own
            forward), ``tokenlearner tokens`` not in ``[1, N - 1]`` (``N`` patches) or ``tokenlearner at`` not in
            ``[1, layers - 1]``.
    """
    if type(visual) not in (VisionTransformer, TokenLearnerVisionTransformer):
        raise ValueError(f"TokenLearner needs a plain open_clip VisionTransformer image tower, not "
                         f"{type(visual).__name__}")
    patches = visual.positional_embedding.shape[0] - 1
    layers = len(visual.transformer.resblocks)
    if not 1 <= tokens < patches:
        raise ValueError(f"tokenlearner tokens: {tokens} learned tokens; allowed: 1 to {patches - 1} (fewer than the "
                         f"tower's {patches} patches)")
    if not 1 <= at < layers:
        raise ValueError(f"tokenlearner at: insertion after {at} blocks; allowed: 1 to {layers - 1} (the tower has "
                         f"{layers} blocks)")
    weight = visual.conv1.weight
    with torch.device(weight.device):
        learner = TokenLearnerV11(weight.shape[0], tokens, bottleneck)
    visual.token_learner = learner.to(dtype=weight.dtype)
    visual.token_learner_at = at
    visual.tokens_per_block = [1 + patches] * at + [1 + tokens] * (layers - at)
    visual.__class__ = TokenLearnerVisionTransformer
    return visual
