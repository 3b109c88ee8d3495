"""DTP-ViT: a Vision Transformer image tower with dynamic token pooling.

A boundary predictor marks where each segment of patch tokens ends; each segment is averaged into
one token; the middle ("shortened") layers run on those few tokens. Ideas from Nawrot et al.,
"Efficient Transformers with Dynamic Token Pooling" (ACL 2023; ``PiotrNawrot/dynamic-pooling``,
``shortening.py``: the differentiable membership matrix built from straight-through boundaries, and
the binomial boundary prior) and its CLIP adaptation (``Yusen-Peng/DRIP``, ``DTP_ViT.py``). Our own
code; see ``docs/dtp_vit.md`` for the forward pass and the pitfalls it avoids.

Shapes for ViT-B/32 at 224 px: image ``[B, 3, 224, 224]`` -> patches ``[B, 49, 768]`` -> + CLS
``[B, 50, 768]`` -> pre layers -> segments ``[B, S, 768]`` with ``valid [B, S]`` -> CLS + segments
``[B, 1+S, 768]`` -> shortened layers -> (optional upsampling to ``[B, 50, 768]`` + post layers) ->
pooled ``[B, 768]`` -> projection ``[B, embed_dim]``.

Numerics: the boundary predictor, the Gumbel-sigmoid sampling, the cumulative sums and the pooling
weights run in fp32 with autocast off; logits are clamped to [-20, 20]; noise is drawn from
``u`` clamped to [1e-6, 1 - 1e-6] and added to logits (no probabilities are formed); evaluation
uses deterministic boundaries (see ``DTPConfig.eval_boundaries``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from models.attention import MASKLESS_ON_CUDA, TimmSelfAttention
from models.segments import binomial_boundary_loss, segment_bound, segment_pool

POOLINGS = ("mean", "mean_no_cls", "cls", "last")
EVAL_BOUNDARIES = ("expected_count", "threshold")
NUMERICS = ("safe", "reference")
VARLEN = ("auto", "off", "torch")


BOUNDARY_LOSSES = ("binomial",)
_REJECTED_LOSSES = {
    "entropy": "entropy-spike supervision places boundaries where a language model's next-token entropy spikes; "
               "an image tower has no next-token distribution over patches",
    "unigram": "unigram supervision places boundaries at tokenizer word/sub-word ends; image patches have no "
               "tokenizer segmentation",
}


@dataclass
class DTPConfig:
    """Architecture and boundary settings of a DTP-ViT image tower.

    Attributes:
        image_size: input side in pixels.
        patch_size: patch side in pixels (``L = (image_size / patch_size)**2`` patch tokens).
        width: token width ``D``.
        heads: attention heads.
        mlp_ratio: MLP hidden width / ``D``.
        pre_layers: blocks on all ``1 + L`` tokens before pooling.
        shortened_layers: blocks on ``1 + S`` tokens (CLS + segments).
        post_layers: blocks after upsampling back to ``1 + L`` tokens (only with ``upsample``).
        upsample: scatter segment tokens back to patch positions (+ residual) before ``post_layers``.
        compression: target shortening factor; the boundary prior's rate is ``1 / compression``.
        temperature: Gumbel-sigmoid temperature tau.
        predictor_hidden: hidden width of the boundary predictor MLP (default ``D``).
        pooling: ``mean`` (valid tokens incl. CLS), ``mean_no_cls``, ``cls``, or ``last`` (last valid token).
        boundary_loss: ``binomial`` (prior for Gumbel-sigmoid boundaries).
        boundary_loss_weight: weight of the boundary loss added to the CLIP loss.
        eval_boundaries: deterministic boundaries at eval. ``expected_count`` (default): each image
            keeps its ``round(sum_t sigmoid(logit_t))`` highest-logit patches, i.e. the number of
            boundaries training samples on average, at the most likely places. ``threshold``:
            ``logit > 0`` per patch (the design note's rule); it collapses to one segment when the
            target rate is below 1/2, because the prior drives most logits negative and training
            boundaries then come from the Gumbel noise (measured on the digits 4x model: shortening
            factor 4.4 in training, 16 = one segment at eval).
        numerics: ``safe`` (default: fp32 island, clamped logits, sampling from logits) or
            ``reference``: the research code's path (predictor under autocast, probabilities formed
            in the autocast dtype, ``RelaxedBernoulli(probs=...)``, no clamp), kept only to reproduce
            its fp16 failures (``benchmarks/dtp_fp16_stress.py``).
        varlen: attention of the shortened layers as one variable-length call over each image's valid
            segments (:func:`models.attention.varlen_attention`): ``auto`` does so when the attention backend
            (:mod:`models.attention`) is ``flash_attn`` (``flash_attn_varlen_func``) or a kernel that takes no
            padding mask on this device (``sdpa_flash``/``sdpa_cudnn`` on CUDA: PyTorch's ``varlen_attn``),
            else one masked attention call per block (key-padding mask); ``off`` always masks; ``torch`` always
            takes the variable-length call (a dense block-diagonal reference on a CPU: tests).
        max_segments: the static segment count ``S`` of the shortened layers (shapes never depend on the
            data: no host sync, no recompilation under ``torch.compile``). 0 (default): ``min(L, ceil(L p + 4
            sqrt(L p (1 - p))))`` for the target rate ``p = 1 / compression``, four standard deviations above
            the binomial prior's mean count (49 patches: 39 / 25 / 14 segments at 2x / 4x / 10x). An image with
            more boundaries has its last segments merged into segment ``S``; the fraction of such images is
            reported as ``segments_clamped``. ``L`` never clamps.
        output_dim: CLIP embedding width.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    pre_layers: int = 2
    shortened_layers: int = 10
    post_layers: int = 0
    upsample: bool = False
    compression: float = 4.0
    temperature: float = 0.5
    predictor_hidden: Optional[int] = None
    pooling: str = "mean"
    boundary_loss: str = "binomial"
    boundary_loss_weight: float = 1.0
    eval_boundaries: str = "expected_count"
    numerics: str = "safe"
    varlen: str = "auto"
    max_segments: int = 0
    output_dim: int = 512

    def __post_init__(self):
        if self.boundary_loss in _REJECTED_LOSSES:
            raise ValueError(f"dtp_cfg.boundary_loss: {self.boundary_loss!r} is not supported for image towers: "
                             f"{_REJECTED_LOSSES[self.boundary_loss]}; allowed: {', '.join(BOUNDARY_LOSSES)}")
        if self.boundary_loss not in BOUNDARY_LOSSES:
            raise ValueError(f"dtp_cfg.boundary_loss: {self.boundary_loss!r} is not one of "
                             f"{', '.join(BOUNDARY_LOSSES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"dtp_cfg.pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.eval_boundaries not in EVAL_BOUNDARIES:
            raise ValueError(f"dtp_cfg.eval_boundaries: {self.eval_boundaries!r} is not one of "
                             f"{', '.join(EVAL_BOUNDARIES)}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"dtp_cfg.numerics: {self.numerics!r} is not one of {', '.join(NUMERICS)}")
        if self.varlen not in VARLEN:
            raise ValueError(f"dtp_cfg.varlen: {self.varlen!r} is not one of {', '.join(VARLEN)}")
        if not self.compression >= 1:
            raise ValueError(f"dtp_cfg.compression: must be >= 1, got {self.compression}")
        if self.max_segments < 0:
            raise ValueError(f"dtp_cfg.max_segments: must be >= 0 (0: from the target rate), got {self.max_segments}")
        if self.post_layers and not self.upsample:
            raise ValueError("dtp_cfg.post_layers: only used with upsample=true")


class DTPViT(nn.Module):
    """DTP-ViT image tower with open_clip's visual-tower interface: ``forward(image [B, 3, H, W]) ->
    [B, output_dim]``, ``set_grad_checkpointing``, ``image_size``, ``output_dim``.

    After each forward, ``last_stats`` holds detached fp32 scalars, device tensors never read on the host here
    (``shortening_factor`` = L / mean segments, ``boundary_rate``, ``segments_mean``, ``segments_max``,
    ``segments_clamped`` (fraction of images past ``max_segments``), ``boundary_loss``) and
    :meth:`extra_losses` returns the weighted boundary loss (training only) for the trainer to add.

    ``boundary_mode``: ``"learned"`` (default) or ``"nominal"`` (fixed evenly spaced boundaries every
    ``compression`` patches, for nominal FLOP counts, DynamicViT style).
    """

    attention_backend = "sdpa"  # set by models.attention.set_attention_backend
    progress_metrics = {"shortening_factor": "SF"}  # shown by the trainer's progress bar (metric -> label)

    def __init__(self, cfg: DTPConfig):
        super().__init__()
        self.cfg = cfg
        self.image_size = (cfg.image_size, cfg.image_size)
        self.output_dim = cfg.output_dim
        grid = cfg.image_size // cfg.patch_size
        self.num_patches = grid * grid
        D = cfg.width
        scale = D ** -0.5
        self.conv1 = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(D))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, D))
        self.ln_pre = nn.LayerNorm(D)
        make = lambda n: nn.ModuleList([DTPBlock(D, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                                 attn_layer=TimmSelfAttention) for _ in range(n)])
        self.pre_blocks = make(cfg.pre_layers)
        hidden = cfg.predictor_hidden or D
        self.max_segments = segment_bound(self.num_patches, cfg.compression, cfg.max_segments)
        self.boundary_predictor = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # start at the target rate: P(boundary) = sigmoid(bias) = 1 / compression,
            # the output layer zeroed so random features do not swamp it (it learns from step one)
            rate = min(1.0 / cfg.compression, 1 - 1e-3)
            self.boundary_predictor[2].weight.zero_()
            self.boundary_predictor[2].bias.fill_(math.log(rate / (1 - rate)))
        self.shortened_blocks = make(cfg.shortened_layers)
        self.post_blocks = make(cfg.post_layers if cfg.upsample else 0)
        self.ln_post = nn.LayerNorm(D)
        self.proj = nn.Parameter(scale * torch.randn(D, cfg.output_dim))
        self.boundary_mode = "learned"
        self.last_stats: Dict[str, torch.Tensor] = {}
        self._boundary_loss: Optional[torch.Tensor] = None

    def block_lists(self) -> List[nn.ModuleList]:
        """The tower's transformer blocks in forward order: pre, shortened, post (for per-block wrappers)."""
        return [self.pre_blocks, self.shortened_blocks, self.post_blocks]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (non-reentrant activation checkpointing; open_clip API)."""
        from models.blocks import checkpoint_every

        checkpoint_every(self.block_lists(), 1 if enable else 0)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze every parameter of the tower (open_clip's ``lock`` API, ``--lock-image``); the boundary predictor
        included. Partial unlocking (``unlocked_groups``) is not supported."""
        if unlocked_groups:
            raise ValueError("DTP-ViT lock: unlocked_groups is not supported (the whole tower is locked)")
        for p in self.parameters():
            p.requires_grad = False

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N] True = attend (SDPA)
        for blk in blocks:
            x = blk(x, attn_mask=attn_mask)
            if mask is not None:
                x = x * mask[..., None].to(x.dtype)  # keep padded rows at zero
        return x

    def boundaries(self, patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boundary indicators for ``patches [B, L, D]``, computed in fp32 with autocast off.

        Returns:
            ``(boundaries [B, L] straight-through fp32, hard [B, L] 0/1 fp32)``; the last patch is
            always a boundary.
        """
        B, L, _ = patches.shape
        if self.cfg.numerics == "reference" and self.training and self.boundary_mode == "learned":
            return self._reference_boundaries(patches)
        with torch.autocast(patches.device.type, enabled=False):
            if self.boundary_mode == "nominal":
                hard = torch.zeros(B, L, device=patches.device)
                step = max(int(round(self.cfg.compression)), 1)
                hard[:, step - 1::step] = 1.0
                hard[:, -1] = 1.0
                return hard, hard
            fc1, fc2 = self.boundary_predictor[0], self.boundary_predictor[2]
            # fp32 copies of the (maybe half-precision) weights; the module's own dtype is left alone
            h = F.gelu(F.linear(patches.float(), fc1.weight.float(), fc1.bias.float()))  # [B, L, hidden]
            logits = F.linear(h, fc2.weight.float(), fc2.bias.float()).squeeze(-1).clamp(-20.0, 20.0)  # [B, L]
            if self.training:
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.cfg.temperature)
                hard = (soft > 0.5).float()
                b = hard - soft.detach() + soft  # straight-through estimator
            elif self.cfg.eval_boundaries == "threshold":
                hard = (logits > 0).float()
                b = hard
            else:  # deterministic at eval (repeatable zero-shot), with training's expected boundary count
                k = torch.sigmoid(logits).sum(dim=1).round().clamp(min=1, max=self.max_segments)  # [B]
                rank = logits.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [B, L] 0 = top logit
                hard = (rank < k[:, None]).float()
                b = hard
            last = torch.ones_like(hard[:, -1:])
            return torch.cat([b[:, :-1], last], dim=1), torch.cat([hard[:, :-1], last], dim=1)

    def _reference_boundaries(self, patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The research code's sampling, for comparison only: half-precision probabilities, no clamp."""
        probs = torch.sigmoid(self.boundary_predictor(patches).squeeze(-1))  # autocast dtype
        probs = probs.clamp(max=1 - 1e-4)  # as in the notes: a no-op in fp16, where 1 - 1e-4 rounds to 1
        dist = torch.distributions.RelaxedBernoulli(torch.tensor(self.cfg.temperature, device=probs.device),
                                                    probs=probs, validate_args=False)
        soft = dist.rsample().float()
        hard = (soft > 0.5).float()
        b = hard - soft.detach() + soft
        last = torch.ones_like(hard[:, -1:])
        return torch.cat([b[:, :-1], last], dim=1), torch.cat([hard[:, :-1], last], dim=1)

    def _packs(self, tokens: torch.Tensor) -> bool:
        """Whether the shortened layers run on packed segments (see ``DTPConfig.varlen``)."""
        if self.cfg.varlen != "auto":
            return self.cfg.varlen == "torch"
        backend = self.attention_backend
        return backend == "flash_attn" or (tokens.is_cuda and backend in MASKLESS_ON_CUDA)

    def shortened_forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Shortened layers on ``tokens [B, N, D]`` (``N = 1 + S``, CLS first, valid tokens first in each row)
        with key-padding ``valid [B, N]``: one attention call per block either way.

        Variable-length (``DTPConfig.varlen``): the ``[B, N]`` rows are flattened to ``[B N, D]`` and described
        as ``2 B`` packed sequences, each image's valid tokens followed by its padding (``cu_seqlens [2 B + 1]``,
        static length, empty sequences where an image fills its row; ``max_seqlen = N``), so one
        :func:`models.attention.varlen_attention` call attends within each image; padding rows attend among
        themselves and are zeroed. No gather or host sync: every shape is static.
        """
        if not self._packs(tokens):
            return self._run(self.shortened_blocks, tokens, valid)
        B, N, D = tokens.shape
        lengths = valid.sum(dim=1, dtype=torch.int32)  # [B]
        starts = torch.arange(B, device=tokens.device, dtype=torch.int32) * N
        cu_seqlens = torch.cat([torch.stack([starts, starts + lengths], dim=1).flatten(),
                                starts.new_full((1,), B * N)])  # [2B + 1]
        x = tokens.reshape(B * N, D)
        for blk in self.shortened_blocks:
            x = blk(x, packed=(cu_seqlens, N))
        return x.view(B, N, D) * valid[..., None].to(x.dtype)

    def pre_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, H, W]`` -> tokens after the pre layers ``[B, 1+L, D]`` (CLS first, then the patches in
        row-major order of the ``g x g`` patch grid)."""
        x = self.conv1(image)  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, L, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+L, D]
        return self._run(self.pre_blocks, self.ln_pre(x))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pre_tokens(image)  # [B, 1+L, D]
        cls, patches = x[:, :1], x[:, 1:]  # [B, 1, D], [B, L, D]
        b, hard = self.boundaries(patches)
        with torch.autocast(x.device.type, enabled=False):
            segments, valid, weights = segment_pool(patches.float(), b, self.max_segments)  # [B,S,D] [B,S] [B,L,S]
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # CLS always valid: no empty row
        y = self.shortened_forward(torch.cat([cls, segments.to(x.dtype)], dim=1), valid)  # [B, 1+S, D]
        if self.cfg.upsample:
            with torch.autocast(x.device.type, enabled=False):
                up = torch.einsum("bls,bsd->bld", weights, y[:, 1:].float())  # [B, L, D] segment -> its patches
            y = torch.cat([y[:, :1], up.to(x.dtype) + patches], dim=1)  # residual from the pre-pooling patches
            y = self._run(self.post_blocks, y)
            valid = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        y = self.ln_post(y)
        pooled = self._pool(y, valid)  # [B, D]
        self._record(b, hard)
        return pooled @ self.proj.to(pooled.dtype)

    def _pool(self, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.pooling
        if mode == "cls":
            return y[:, 0]
        if mode == "last":
            last = valid.long().sum(dim=1) - 1  # index of the last valid token (segments are contiguous)
            return y[torch.arange(y.shape[0], device=y.device), last]
        m = valid.clone()
        if mode == "mean_no_cls":
            m[:, 0] = False
        m = m[..., None].to(y.dtype)
        return (y * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def _record(self, b: torch.Tensor, hard: torch.Tensor) -> None:
        raw = hard.sum(dim=1)  # [B] boundaries drawn
        segs = raw.clamp(max=self.max_segments)  # [B] segments the shortened layers ran on
        L = hard.shape[1]
        with torch.autocast(b.device.type, enabled=False):
            loss = binomial_boundary_loss(b, 1.0 / self.cfg.compression) if self.boundary_mode == "learned" \
                else torch.zeros((), device=b.device)
        self._boundary_loss = loss if self.training and self.boundary_mode == "learned" else None
        self.last_stats = {"shortening_factor": (L / segs.mean()).detach(), "boundary_rate": hard.mean().detach(),
                           "segments_mean": segs.mean().detach(), "segments_max": segs.max().detach(),
                           "segments_clamped": (raw > self.max_segments).float().mean().detach(),
                           "boundary_loss": loss.detach()}

    def extra_losses(self) -> Dict[str, torch.Tensor]:
        """``{"boundary_loss": weight x loss}`` of the last training forward (empty at eval)."""
        if self._boundary_loss is None:
            return {}
        return {"boundary_loss": self.cfg.boundary_loss_weight * self._boundary_loss}


class DTPBlock(Block):
    """timm's pre-norm ``Block`` (same parameters) whose forward also takes packed sequences:
    ``forward(x [B, N, D], attn_mask=None)`` as timm, or ``forward(x [T, D], packed=(cu_seqlens, max_len))``
    with per-sequence attention, so per-block wrappers (activation checkpointing) cover both paths."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                packed: Optional[Tuple[torch.Tensor, int]] = None) -> torch.Tensor:
        if packed is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn.forward_packed(self.norm1(x), *packed)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
