"""Activation bytes per sample, read from the model's own autograd graph rather than from a formula.

The memory model needs, per transformer block, the bytes a sample keeps alive for backward (and its input,
all a checkpointed block keeps), plus what the towers keep outside their blocks (patch and token embeddings,
norms, DTP-ViT's boundary predictor and segment pooling, pooling and projections). A closed formula such as
Korthikanti et al.'s (arXiv 2205.05198) misses what a concrete model does under autocast: open_clip's text
tower runs its residual stream in fp32 (the token embedding is fp32), layer norms save fp32 statistics, the
attention kernel saves its log-sum-exp, DTP-ViT's pooling keeps fp32 copies of the patches and ``[B, L, S]``
weights. So the model is run once on the CPU at two batch sizes under the precision's autocast, with
``torch.autograd.graph.saved_tensors_hooks`` recording every tensor saved for backward (each storage once,
parameters excluded, attributed to the block running when it was saved); the difference between the two
batches is the per-sample cost (the autocast weight copies, which do not grow with the batch, cancel).
The idea of counting saved tensors through these hooks is PyTorch's (``torch.utils.checkpoint`` and the
"saved tensors hooks" tutorial).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

PROFILE_VERSION = 1
"""Bumped whenever what :func:`activation_profile` measures changes: older cached profiles are then not read."""


@dataclass(frozen=True)
class BlockActivations:
    """One transformer block, per sample: ``saved`` bytes kept for backward without checkpointing, ``input``
    bytes of its input (what a checkpointed block keeps), ``working`` bytes of the gradients in flight while
    its backward runs (``s m + 2 s h`` elements in the block's dtype at the MLP's activation backward, where its
    peak is: the hidden-width gradient of the GELU's output and its input (``2 s m``), less the GELU's output,
    already freed by the second linear layer's backward (``- s m``), and the residual stream's gradient and
    its copy (``2 s h``))."""

    saved: float
    input: float
    working: float


@dataclass(frozen=True)
class ActivationProfile:
    """Per-sample activation bytes of a model under one precision and attention backend.

    Attributes:
        blocks: ``{"image": (BlockActivations, ...), "text": (...)}`` in forward order.
        outside: ``{"image": bytes, "text": bytes}`` saved outside the transformer blocks, per sample.
        inputs: bytes of one sample's input batch while the step runs (uint8 image, its normalised fp32 copy,
            int64 tokens).
    """

    blocks: Dict[str, Tuple[BlockActivations, ...]]
    outside: Dict[str, float]
    inputs: float


def _measure(model, batch: int, image_size: int, context: int,
             dtype) -> Tuple[Dict[tuple, int], Dict[tuple, Tuple[int, int]]]:
    """``(saved, inputs)`` of one forward at batch ``batch``: ``saved`` maps ``(tower, block index)`` and
    ``("outside", tower)`` to the bytes saved for backward there; ``inputs`` maps ``(tower, block index)`` to the
    ``(bytes, elements)`` of that block's input."""
    from models.blocks import tower_block_lists

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()
    current = {"where": None}
    saved: Dict = {}
    inputs: Dict = {}
    handles = []

    def enter(where):
        def pre(module, args, kwargs=None):
            current["where"] = where
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                inputs[where] = (x.numel() * x.element_size(), x.numel())
        return pre

    def leave(tower):
        def post(module, args, out):
            current["where"] = ("outside", tower)
        return post

    for tower, lists in tower_block_lists(model).items():
        i = 0
        for blocks in lists:
            for blk in blocks:
                handles.append(blk.register_forward_pre_hook(enter((tower, i))))
                handles.append(blk.register_forward_hook(leave(tower)))
                i += 1

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen and ptr != 0:
                seen.add(ptr)
                where = current["where"]
                saved[where] = saved.get(where, 0) + t.untyped_storage().nbytes()
        return t

    image = torch.zeros(batch, 3, image_size, image_size)
    text = torch.zeros(batch, context, dtype=torch.long)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            current["where"] = ("outside", "image")
            img = model.encode_image(image)
            current["where"] = ("outside", "text")
            txt = model.encode_text(text)
            del img, txt
    finally:
        for h in handles:
            h.remove()
    return saved, inputs


def cache_dir() -> Path:
    """Where measured profiles are kept between runs: ``$HARNESS_CACHE_DIR``, else ``~/.cache/harness``."""
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "harness")


def cache_file(kind: str, *key: str) -> Path:
    """The cache file of one measurement, keyed on ``key`` and the torch version (and :data:`PROFILE_VERSION`)."""
    name = "-".join((*key, f"torch{torch.__version__}", f"v{PROFILE_VERSION}")).replace("/", "_")
    return cache_dir() / kind / f"{name}.json"


def read_cache(path: Path) -> Optional[dict]:
    """A cached measurement, or None when it is absent or damaged (then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(path: Path, data: dict) -> None:
    """Write a measurement to the cache through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a reader sees the old file or the whole new one


def profile_key(precision: str, attention: str) -> Tuple[str, str]:
    """What a profile depends on of a precision and an attention backend: ``("fp32" | "bf16", "math" | "sdpa")``
    (fp16 has bf16's element sizes; every fused kernel saves what the CPU's SDPA kernel saves)."""
    return ("fp32" if precision == "fp32" else "bf16", "math" if attention == "math" else "sdpa")


@functools.lru_cache(maxsize=None)
def activation_profile(name: str, precision: str, attention: str) -> ActivationProfile:
    """:class:`ActivationProfile` of registered model ``name`` (random weights, on the CPU, in training mode)
    under ``precision`` (``fp32``, ``bf16``; ``fp16`` counted as ``bf16``: the same element sizes) and
    ``attention`` (``math`` keeps the ``[a, s, s]`` probabilities; any fused kernel is counted as the CPU's
    flash kernel, which keeps ``O(s)``, as CUDA's flash / memory-efficient / cuDNN kernels do: the output and an
    fp32 log-sum-exp). Costs one forward of the model at batch 1 and 2 on the CPU the first time; then read from
    :func:`cache_dir` (keyed on model, precision, attention kind and torch version)."""
    key = (name, *profile_key(precision, attention))
    path = cache_file("activations", *key)
    data = read_cache(path)
    if data is not None:
        blocks = {t: tuple(BlockActivations(**b) for b in bl) for t, bl in data["blocks"].items()}
        return ActivationProfile(blocks, data["outside"], data["inputs"])
    prof = _measure_profile(*key)
    write_cache(path, dataclasses.asdict(prof))
    return prof


def _measure_profile(name: str, precision: str, attention: str) -> ActivationProfile:
    import models
    from models.blocks import tower_block_lists

    cpu_attention = "math" if attention == "math" else "sdpa"
    model = models.create_model(name, attention=cpu_attention)
    model.train()
    arch = models.architecture(name)
    vis, txt = arch["vision_cfg"], arch["text_cfg"]
    size = vis["image_size"] if isinstance(vis["image_size"], int) else vis["image_size"][0]
    context = txt.get("context_length", 77)
    dtype = None if precision == "fp32" else torch.bfloat16
    (s1, i1), (s2, i2) = (_measure(model, b, size, context, dtype) for b in (1, 2))
    e = 4 if dtype is None else 2  # the backward's gradients run in the compute dtype
    blocks: Dict[str, Tuple[BlockActivations, ...]] = {}
    for tower, lists in tower_block_lists(model).items():
        out = []
        i = 0
        for blk_list in lists:
            for blk in blk_list:
                w = ((tower, i),)
                sv = s2.get(w[0], 0) - s1.get(w[0], 0)
                inp = i2.get(w[0], (0, 0))[0] - i1.get(w[0], (0, 0))[0]
                numel = i2.get(w[0], (0, 0))[1] - i1.get(w[0], (0, 0))[1]  # s h elements per sample
                fc1 = blk.mlp.fc1 if hasattr(blk.mlp, "fc1") else blk.mlp.c_fc
                m_over_h = fc1.out_features / fc1.in_features
                out.append(BlockActivations(float(sv), float(inp), float(numel * (m_over_h + 2) * e)))
                i += 1
        blocks[tower] = tuple(out)
    outside = {t: float(s2.get(("outside", t), 0) - s1.get(("outside", t), 0)) for t in ("image", "text")}
    inputs = float(3 * size * size * (1 + 4) + 8 * context)
    return ActivationProfile(blocks, outside, inputs)

