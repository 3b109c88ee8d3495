"""Validation on held-out image-text shards, as open_clip's trainer does it (``open_clip_train/train.py``:
``evaluate`` and ``get_clip_metrics``): the contrastive validation loss and image-to-text / text-to-image
retrieval recall@1/5/10 with mean and median rank.

``data.val_data`` takes shards in the training layout (img2dataset tars, :func:`harness.data.shards.expand_shards`),
decoded by :func:`harness.data.loader.decode_sample` with the eval transform. Sample ``i`` of the shards (in sorted
shard order) is read by rank ``i % world``, so every rank holds a share. Sharded parameters (DeepSpeed ZeRO-3,
FSDP2) are gathered collectively in each forward, so every rank runs the same number of forwards (a rank
whose share has ended runs a filler batch that is not counted), inside ``engine.full_parameters()``.
The embeddings of all ranks are then gathered to every rank and put back in shard order, so the metrics do
not depend on the number of ranks:

* ``val_loss``: open_clip's, the symmetric cross-entropy of each batch of ``eval.batch_size`` consecutive
  samples against its own in-batch negatives, weighted by batch size (like open_clip's, it depends on the
  batch size); the logit scale is ``exp(logit_scale)`` clamped at 100, as in training;
* ``image_to_text_R@k`` / ``text_to_image_R@k`` (k = 1, 5, 10; fractions), ``*_mean_rank`` and
  ``*_median_rank`` over all ``N`` pairs, computed as ``get_clip_metrics`` does, in row chunks so the
  ``[N, N]`` similarity matrix is never held at once.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data.loader import decode_sample, is_complete
from harness.data.shards import expand_shards
from harness.data.workers import worker_init

log = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)


class ValSamples(IterableDataset):
    """``(index, image [3, H, W], tokens [L])`` of the validation samples this rank reads (index ``i`` with
    ``i % world == rank``, shared out again over DataLoader workers); incomplete or corrupt samples are
    skipped with a warning.

    Args:
        shards: tar paths (:func:`harness.data.shards.expand_shards`).
        transform: PIL image -> ``[3, H, W]`` (the eval transform).
        tokenizer: captions -> ``[n, L]``.
        rank, world: this process's data-parallel place.
    """

    def __init__(self, shards: List[str], transform: Callable, tokenizer: Callable, rank: int, world: int):
        super().__init__()
        self.shards, self.transform, self.tokenizer, self.rank, self.world = shards, transform, tokenizer, rank, world

    def __iter__(self) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)({"url": s} for s in self.shards)
        for i, sample in enumerate(samples):
            if i % self.world != self.rank or (i // self.world) % workers != worker:
                continue
            if not is_complete(sample):
                continue
            try:
                image, caption = decode_sample(sample, self.transform)
            except Exception as exn:  # PIL raises many types for corrupt files
                log.warning("validation: skipped corrupt sample %s: %s", sample.get("__key__"), exn)
                continue
            yield i, image, self.tokenizer([caption])[0]


def clip_retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                           chunk: int = 4096) -> Dict[str, float]:
    """open_clip's ``get_clip_metrics`` on ``image_features [N, D]`` and ``text_features [N, D]`` (pair ``i`` is
    image ``i`` with text ``i``), in chunks of ``chunk`` rows of the ``[N, N]`` logits.

    The rank of the true match is its position in the row sorted by decreasing logit (``torch.argsort`` as
    open_clip; equal logits may order differently from open_clip's sort, which is itself unspecified there).

    Returns:
        ``{direction}_mean_rank``, ``{direction}_median_rank`` (1 = first) and ``{direction}_R@k`` (fraction of
        true matches in the top k, k = 1, 5, 10) for ``image_to_text`` and ``text_to_image``.
    """
    out: Dict[str, float] = {}
    for name, queries, keys in (("image_to_text", image_features, text_features),
                                ("text_to_image", text_features, image_features)):
        preds = []
        for start in range(0, len(queries), chunk):
            logits = logit_scale * queries[start:start + chunk].float() @ keys.float().t()  # [c, N]
            ranking = torch.argsort(logits, dim=1, descending=True)  # [c, N] key indices, best first
            truth = torch.arange(start, start + len(logits), device=logits.device)[:, None]
            preds.append(torch.where(ranking == truth)[1].cpu())  # [c] 0-based rank of the true match
        p = torch.cat(preds).numpy()
        out[f"{name}_mean_rank"] = float(p.mean() + 1)
        out[f"{name}_median_rank"] = float(np.floor(np.median(p)) + 1)
        for k in RECALL_AT:
            out[f"{name}_R@{k}"] = float(np.mean(p < k))
    return out


def batched_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                      batch_size: int) -> float:
    """open_clip ``evaluate``'s validation loss: for each batch of ``batch_size`` consecutive pairs of
    ``image_features [N, D]`` / ``text_features [N, D]``, ``(CE(logits_per_image) + CE(logits_per_text)) / 2``
    with in-batch negatives, averaged over batches weighted by their size."""
    total, n = 0.0, len(image_features)
    for start in range(0, n, batch_size):
        img, txt = image_features[start:start + batch_size].float(), text_features[start:start + batch_size].float()
        logits = logit_scale * img @ txt.t()  # [b, b]
        labels = torch.arange(len(img), device=img.device)
        total += float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2) * len(img)
    return total / max(n, 1)


def _gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's ``x [n_r, ...]`` (``n_r`` may differ) into ``[sum n_r, ...]`` on every rank."""
    if world == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True if ``flag`` is True on any rank (one small all-reduce)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def validate_clip(model: torch.nn.Module, val_data: str, model_name: str, batch_size: int = 256,
                  device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
                  num_workers: int = 0) -> Dict[str, Any]:
    """Validation loss and retrieval metrics of CLIP ``model`` on the shards ``val_data``; collective (every
    rank calls it, inside ``engine.full_parameters()`` when parameters are sharded).

    Args:
        model: open_clip CLIP (``encode_image``, ``encode_text``, ``logit_scale``); put in eval mode for the call
            (DTP-ViT's deterministic boundaries).
        val_data: shard spec (``data.val_data``).
        model_name: registered model (eval transform, tokenizer, input shapes).
        batch_size: samples per rank per forward, and the loss's batch.
        device: where the model lives.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast, or None.
        num_workers: DataLoader workers decoding the shards.

    Returns:
        The same on every rank: ``val_loss``, the metrics of :func:`clip_retrieval_metrics`, ``val_samples``.

    Raises:
        ConfigError: ``val_data`` names no shards (checked before training by
            :func:`harness.config.validate.validate`).
        RuntimeError: no sample of ``val_data`` could be decoded.
    """
    import models

    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dataset = ValSamples(expand_shards(val_data, "data.val_data"), models.image_transform(model_name, is_train=False),
                         models.get_tokenizer(model_name), rank, world)
    loader = iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init,
                             pin_memory=device.type == "cuda"))
    size = models.image_size(model_name)
    filler = (torch.zeros(1, 3, size, size), torch.zeros(1, models.context_length(model_name), dtype=torch.long))
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    indices, image_feats, text_feats = [], [], []
    with ctx:
        while True:
            batch = next(loader, None)
            if not _any_rank(batch is not None, device, world):
                break
            index, images, texts = batch if batch is not None else (None, *filler)
            img = model.encode_image(images.to(device, non_blocking=True), normalize=True).float()  # [B, E]
            txt = model.encode_text(texts.to(device, non_blocking=True), normalize=True).float()  # [B, E]
            if batch is not None:
                indices.append(index.to(device))
                image_feats.append(img)
                text_feats.append(txt)
    model.train(was_training)
    dim = models.architecture(model_name)["embed_dim"]
    cat = lambda xs, shape, dtype: torch.cat(xs) if xs else torch.zeros(shape, dtype=dtype, device=device)
    index = _gather_rows(cat(indices, (0,), torch.long), world)
    order = index.argsort()  # back to shard order, whatever the number of ranks
    image_all = _gather_rows(cat(image_feats, (0, dim), torch.float32), world)[order]  # [N, E]
    text_all = _gather_rows(cat(text_feats, (0, dim), torch.float32), world)[order]  # [N, E]
    if len(image_all) == 0:
        raise RuntimeError(f"data.val_data: no sample of {val_data!r} could be decoded")
    scale = float(model.logit_scale.detach().float().exp().clamp(max=100.0).reshape(-1)[0])
    metrics = {"val_loss": batched_clip_loss(image_all, text_all, scale, batch_size)}
    metrics.update(clip_retrieval_metrics(image_all, text_all, scale))
    metrics["val_samples"] = len(image_all)
    return metrics
