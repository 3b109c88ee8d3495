"""Attention kernels chosen once, when the model is built, for both towers.

Backends (``ATTENTION_BACKENDS``):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, PyTorch picks the kernel.
* ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn``: SDPA forced to one kernel with
  ``torch.nn.attention.sdpa_kernel`` (FlashAttention-2, memory-efficient (xformers-style) or cuDNN);
  PyTorch raises instead of falling back when the kernel cannot run.
* ``math``: the unfused reference, ``softmax(q k^T * scale) v`` written out, so the ``[B, H, N, N]``
  score matrix is materialised and saved for backward. This is what "flash off" means in a memory-fit
  table (Korthikanti et al. 2022's ``5 a s / h`` activation term).
* ``flash_attn``: the ``flash-attn`` package (Dao, FlashAttention-2; ``flash_attn_func`` and, for
  DTP-ViT's packed segments, ``flash_attn_varlen_func``); CUDA with fp16/bf16 only.

How a backend reaches the towers (:func:`set_attention_backend`): open_clip's ``nn.MultiheadAttention``
in every ``ResidualAttentionBlock`` is replaced by :class:`SelfAttention`, which adopts the very same
parameter tensors (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so state-dict keys and
checkpoints are unchanged. The text tower's causal mask becomes ``is_causal=True`` (kernels such as
FlashAttention take no arbitrary mask but do take causality). DTP-ViT's timm blocks are built with
:class:`TimmSelfAttention` (timm's ``Attention`` itself, its kernel switched by timm's ``fused_attn`` and an
``sdpa_kernel`` context) and get the backend set. The idea of storing the kernel choice on the module at
construction is timm's (``fused_attn``).
"""
from __future__ import annotations

import contextlib
from typing import List, Literal, Optional, Tuple, get_args

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from models.decatt import decatt_loss

AttentionBackend = Literal["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "math", "flash_attn"]
ATTENTION_BACKENDS = get_args(AttentionBackend)
# backends that cannot take an arbitrary (key-padding) mask on CUDA: DTP-ViT packs its segments for them
MASKLESS_ON_CUDA = ("sdpa_flash", "sdpa_cudnn", "flash_attn")


class AttentionBackendError(ValueError):
    """The requested attention backend cannot run here; the message names those that can."""


def _sdpa_backend(backend: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[backend]


def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def flash_attn_available() -> bool:
    """True when the flash-attn package imports (it is built for CUDA only)."""
    return _flash_attn() is not None


def _require_flash_attn():
    """The flash-attn package; raises AttentionBackendError when it is not installed."""
    fa = _flash_attn()
    if fa is None:
        raise AttentionBackendError("attention backend flash_attn: the flash-attn package is not installed")
    return fa


def check_backend_name(backend: str) -> None:
    """Raises AttentionBackendError (naming :data:`ATTENTION_BACKENDS`) for an unknown backend."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"model.attention: {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *,
              mask: Optional[torch.Tensor] = None, causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention by ``backend``.

    Args:
        q, k, v: ``[B, H, N, d]``.
        backend: one of :data:`ATTENTION_BACKENDS`.
        mask: optional mask broadcastable to ``[B, H, N, N]``: bool, True = attend (SDPA convention), or float,
            added to the logits (ToMe's proportional attention; not for ``flash_attn`` or forced flash kernels).
        causal: attend only to keys at positions <= the query's.
        dropout_p: attention dropout probability (pass 0 at eval).
        scale: softmax scale, default ``d ** -0.5``.

    Returns:
        ``[B, H, N, d]`` in the dtype of ``q``.

    Raises:
        AttentionBackendError: ``flash_attn`` without the package, or with a mask (use the varlen path).
        RuntimeError: from PyTorch, when a forced SDPA kernel cannot run these inputs.
    """
    if backend == "math":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]: materialised, saved for backward
        if causal:
            n_q, n_k = scores.shape[-2:]
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v
    if backend == "flash_attn":
        fa = _require_flash_attn()
        if mask is not None:
            raise AttentionBackendError("attention backend flash_attn takes no padding mask; use the packed "
                                        "(varlen) path")
        out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                 softmax_scale=scale, causal=causal)  # [B, N, H, d]
        return out.transpose(1, 2)
    ctx = contextlib.nullcontext() if backend == "sdpa" else _sdpa_kernel(backend)
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                              scale=scale)


_FORCED_SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")


def _sdpa_kernel(backend: str):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_backend(backend))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     backend: str, dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """Attention within each of several packed sequences, in one call.

    Args:
        q, k, v: ``[T, H, d]`` (T = total tokens).
        cu_seqlens: ``[n + 1]`` int32 sequence offsets on the device; repeated entries (empty sequences) allowed.
        max_seqlen: the longest sequence, a host int (static: no device read).
        backend: ``flash_attn`` -> ``flash_attn_varlen_func`` (Dao); ``sdpa_flash`` / ``sdpa_cudnn`` on CUDA ->
            PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.11, fp16/bf16, no dropout) under that
            SDPA kernel; anything else (and every CPU) -> one SDPA call over all ``T`` tokens with a block-diagonal
            mask built from ``cu_seqlens`` (a dense ``[T, T]`` reference: tests, small batches).
        dropout_p, scale: attention dropout and softmax scale (default ``d ** -0.5``).

    Returns:
        ``[T, H, d]``.

    Raises:
        AttentionBackendError: a CUDA mask-less kernel without ``varlen_attn`` in this torch, or with dropout.
    """
    if backend == "flash_attn":
        return _require_flash_attn().flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                            dropout_p=dropout_p, softmax_scale=scale)
    if q.is_cuda and backend in MASKLESS_ON_CUDA:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            raise AttentionBackendError(f"attention backend {backend}: DTP-ViT's packed segments need "
                                        "torch.nn.attention.varlen (torch >= 2.11) or flash-attn") from None
        if dropout_p:
            raise AttentionBackendError(f"attention backend {backend}: varlen_attn has no attention dropout")
        with _sdpa_kernel(backend):
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    T = q.shape[0]
    positions = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)  # [T] sequence of each token
    mask = (seq[:, None] == seq[None, :])[None, None]  # [1, 1, T, T] block-diagonal, True = attend
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, d]
    return attention(qs, ks, vs, backend, mask=mask, dropout_p=dropout_p, scale=scale)[0].transpose(0, 1)


def available_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """The backends that really run forward and backward here: each is tried on a tiny input of ``dtype`` on
    ``device`` (a causal and a masked call), so the answer is measured, not assumed.

    Returns:
        Names from :data:`ATTENTION_BACKENDS`, in that order.
    """
    return [b for b in ATTENTION_BACKENDS if backend_error(b, device, dtype) is None]


def backend_error(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if ``backend`` runs a causal and an unmasked forward + backward on ``device`` in ``dtype``
    (and, where the backend takes masks on this device, a masked one), else the reason it does not."""
    if backend == "flash_attn":
        if _flash_attn() is None:
            return "the flash-attn package is not installed (pip install flash-attn; CUDA only)"
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn runs only on CUDA in fp16/bf16"
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(2, 2, 8, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    needs_mask = not (device.type == "cuda" and backend in MASKLESS_ON_CUDA)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool, device=device) if needs_mask else None
    try:
        for kw in ({"causal": True}, {"mask": mask}):
            attention(q, q, q, backend, **kw).float().sum().backward()
    except (RuntimeError, AttentionBackendError) as e:
        return str(e).strip().splitlines()[0][:200]
    return None


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise unless ``backend`` runs here.

    Raises:
        AttentionBackendError: unknown backend, or one that cannot run on ``device`` in ``dtype``; the
            message gives the reason and the backends that do run.
    """
    check_backend_name(backend)
    reason = backend_error(backend, device, dtype)
    if reason is not None:
        avail = available_backends(device, dtype)
        raise AttentionBackendError(f"model.attention: {backend!r} is not available on {device.type} with {dtype}: "
                                    f"{reason}; available here: {', '.join(avail)}")


class SelfAttention(nn.Module):
    """Drop-in for open_clip's self-attention ``nn.MultiheadAttention`` (``batch_first=True``) with a
    selectable kernel.

    Holds the same parameters under the same names (``in_proj_weight [3D, D]``, ``in_proj_bias [3D]``,
    ``out_proj``), so a state dict of the original module loads unchanged.

    ``forward(q_x [B, N, D], k_x=None, v_x=None, need_weights=False, attn_mask=None) -> (out [B, N, D], None)``;
    self-attention only: keys and values are computed from ``q_x`` (open_clip passes it as all three). A causal
    module ignores ``attn_mask``:
    :func:`set_attention_backend` checked that the mask its tower passes is exactly the causal one.
    """

    def __init__(self, mha: nn.MultiheadAttention, backend: str, causal: bool):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
            raise ValueError("SelfAttention replaces batch-first self-attention with a packed, biased in-projection")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.dropout = mha.dropout
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.backend, self.causal = backend, causal
        self.decatt, self.last_decatt = False, None  # DeCAtt (models.decatt.enable_decatt)

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, None]:
        # open_clip's blocks pass the same tensor as query, key and value (ZeRO-3's module hooks may hand
        # over distinct tensor objects for them, so identity is not checked): self-attention only
        if need_weights or any(t is not None and t.shape != q_x.shape for t in (k_x, v_x)):
            raise ValueError("SelfAttention: self-attention without attention weights only")
        q, k, v = self.qkv(q_x)
        mask = None
        if attn_mask is not None and not self.causal:
            mask = attn_mask == 0 if attn_mask.dtype != torch.bool else ~attn_mask  # additive / nn.MHA bool -> attend
        o = attention(q, k, v, self.backend, mask=mask, causal=self.causal,
                      dropout_p=self.dropout if self.training else 0.0)  # [B, H, N, d]
        return self.out(o), None

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, D]`` -> ``(q, k, v)``, each ``[B, H, N, d]``: the in-projection, for blocks that run their own
        attention on it (the token reducers, :mod:`models.tome`, :mod:`models.dynamicvit`)."""
        B, N, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3D]
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``o [B, H, N, d]`` -> ``[B, N, D]`` through ``out_proj``; records DeCAtt's term when on."""
        if self.decatt and self.training:
            self.last_decatt = decatt_loss(o)
        B, _, N, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, N, self.embed_dim))


class TimmSelfAttention(TimmAttention):
    """timm's ``Attention``, used as it is, with the kernel chosen once by :func:`set_attention_backend`: timm's own
    ``fused_attn`` switch (False: timm's explicit softmax, the ``math`` reference) and, for the forced SDPA
    kernels, a ``torch.nn.attention.sdpa_kernel`` context around timm's forward. Only ``flash_attn`` and the
    packed path (:meth:`forward_packed`) are our code. DTP-ViT builds its timm blocks with it
    (``Block(..., attn_layer=TimmSelfAttention)``).

    ``forward(x [B, N, D], attn_mask=None (bool, True = attend), is_causal=False) -> [B, N, D]``;
    :meth:`forward_packed` runs the same layer on packed sequences ``[T, D]``.
    """

    backend: str = "sdpa"
    decatt: bool = False  # DeCAtt on the unmasked (full-sequence) calls: models.decatt.enable_decatt
    last_decatt: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if self.backend == "flash_attn" or (self.decatt and self.training and attn_mask is None):
            return self._explicit_forward(x, attn_mask, is_causal)
        ctx = _sdpa_kernel(self.backend) if self.backend in _FORCED_SDPA else contextlib.nullcontext()
        with ctx:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def _explicit_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        """timm's forward with the per-head outputs in hand: for ``flash_attn`` and for DeCAtt."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, N, d]
        o = attention(q, k, v, self.backend, mask=attn_mask, causal=is_causal, scale=self.scale,
                      dropout_p=self.attn_drop.p if self.training else 0.0)
        if self.decatt and self.training and attn_mask is None:
            self.last_decatt = decatt_loss(o)
        return self._out(o.transpose(1, 2).reshape(B, N, self.attn_dim), gate)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """``x [T, D]`` packed sequences with offsets ``cu_seqlens [B + 1]`` (int32) -> ``[T, D]``."""
        T = x.shape[0]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, d]
        q, k = self.q_norm(q), self.k_norm(k)
        o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.backend, scale=self.scale,
                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return self._out(o.reshape(T, self.attn_dim), gate)

    def _out(self, o: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """True if ``mask`` is an additive ``[N, N]`` mask with -inf strictly above the diagonal and 0 elsewhere."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every self-attention of ``model`` (an open_clip ``CLIP``, image and text towers) through
    ``backend``; returns ``model`` (modified in place).

    The text tower (open_clip: ``model.transformer``, masked by ``model.attn_mask``) becomes causal
    attention; the image tower's attention is unmasked (DTP-ViT's shortened layers pass a key-padding
    mask, or pack their segments).

    Raises:
        AttentionBackendError: ``backend`` is not one of :data:`ATTENTION_BACKENDS`.
        ValueError: the text tower's mask is not a plain causal mask (a variant this harness does not build).
    """
    check_backend_name(backend)
    text_mask = getattr(model, "attn_mask", None)
    if text_mask is not None and not text_mask.is_meta and not _is_causal_mask(text_mask):  # meta: no values
        raise ValueError("set_attention_backend: the text tower's attention mask is not causal")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                causal = f"{name}.".startswith("transformer.") and text_mask is not None
                setattr(module, child_name, SelfAttention(child, backend, causal))
            elif isinstance(child, TimmSelfAttention):
                child.backend = backend
                child.fused_attn = backend != "math"  # timm's own switch: False = its explicit softmax
    for tower in (model, getattr(model, "visual", None)):
        if tower is not None:
            tower.attention_backend = backend
    return model
