"""Full finetune of a CLIP image tower with a linear classification head (``harness classify``'s second half).

A plain single-process loop (one device), not the training engines: the engines and ``parallelize_clip`` are
built around the two-tower contrastive model (``forward(image, text)``, both towers' blocks sharded) and a
classifier on a few hundred images does not need sharding. What the trainer has that applies here is reused:
AdamW with open_clip's weight-decay groups (:func:`harness.engines.common.param_groups`) and the sample-keyed
warm-up + cosine schedule (:func:`harness.components.lr_schedule.build_scheduler`). The recipe (AdamW, cosine, a few
epochs, head on the projected image features) follows open_clip / timm finetuning practice at toy scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.components.lr_schedule import build_scheduler
from harness.engines.common import param_groups
from models.decatt import extra_losses as tower_extra_losses


@dataclass(frozen=True)
class FinetuneOptions:
    """Finetuning hyper-parameters.

    Attributes:
        epochs: passes over the training split (fractions allowed; the schedule's length).
        batch_size: images per optimizer step.
        lr: peak AdamW learning rate (head and tower alike).
        weight_decay: AdamW weight decay (none on biases, norms, embeddings' 1-d parameters).
        warmup_fraction: linear warm-up, as a fraction of the training samples.
        seed: head initialisation and data order.
    """

    epochs: float = 10.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    seed: int = 0


class LabelledImages(torch.utils.data.Dataset):
    """``(image tensor [3, H, W], label)`` for ``(path, label)`` samples, read as RGB with PIL (torchvision's
    ImageFolder loader) and passed through ``transform``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


class ImageClassifier(nn.Module):
    """A CLIP image tower and a linear head: ``forward(image [B, 3, H, W]) -> logits [B, num_classes]``, the head
    on the tower's projected ``[B, embed_dim]`` features. ``extra_losses()`` passes on the tower's own (DTP-ViT's
    boundary loss)."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(image))

    def extra_losses(self) -> Dict[str, torch.Tensor]:
        return tower_extra_losses(self.visual)


def topk_hits(scores: torch.Tensor, target: torch.Tensor, k: int = 5) -> Tuple[int, int]:
    """``(top-1 hits, top-k hits)`` of ``scores [N, C]`` against ``target [N]``, k capped at C."""
    topk = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [N, k]
    return int((topk[:, 0] == target).sum()), int((topk == target[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, samples: Sequence[Tuple[str, int]], transform: Callable, batch_size: int,
             device: torch.device) -> Dict[str, float]:
    """``{"top1", "top5"}`` fractions of ``model`` (eval mode) on ``samples``."""
    loader = torch.utils.data.DataLoader(LabelledImages(samples, transform), batch_size=batch_size)
    model.eval()
    hits = [0, 0]
    for images, target in loader:
        h = topk_hits(model(images.to(device)).float(), target.to(device))
        hits = [hits[0] + h[0], hits[1] + h[1]]
    return {"top1": hits[0] / len(samples), "top5": hits[1] / len(samples)}


def finetune(visual: nn.Module, num_classes: int, train: Tuple[List, Callable], val: Tuple[List, Callable],
             opts: FinetuneOptions, device: torch.device) -> Dict[str, Any]:
    """Train ``visual`` (in place; its parameters are made trainable) and a new linear head on ``train``, then score
    ``val``.

    Args:
        visual: CLIP image tower: ``[B, 3, H, W] -> [B, embed_dim]``.
        num_classes: classes of the head.
        train, val: ``(samples [(path, label)], transform)``: training transform with augmentation, eval transform.
        opts: hyper-parameters.
        device: where to train.

    Returns:
        ``{"top1", "top5"}`` on ``val`` (fractions), ``"steps"``, ``"final_train_loss"`` (mean cross-entropy of the
        last epoch's batches).
    """
    torch.manual_seed(opts.seed)
    for p in visual.parameters():
        p.requires_grad_(True)
    embed_dim = getattr(visual, "output_dim", None) or visual.proj.shape[1]
    model = ImageClassifier(visual, embed_dim, num_classes).to(device)
    samples, transform = train
    generator = torch.Generator().manual_seed(opts.seed)
    loader = torch.utils.data.DataLoader(LabelledImages(samples, transform), batch_size=opts.batch_size,
                                         shuffle=True, drop_last=len(samples) > opts.batch_size, generator=generator)
    total_steps = max(math.ceil(opts.epochs * len(loader)), 1)
    total = total_steps * opts.batch_size  # the schedule's length in samples
    optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=opts.lr)
    scheduler = build_scheduler(optimizer, total, int(opts.warmup_fraction * total), opts.batch_size)
    steps, losses = 0, []
    for _ in range(math.ceil(opts.epochs)):
        model.train()
        losses = []
        for images, target in loader:
            if steps >= total_steps:
                break
            logits = model(images.to(device))  # [B, num_classes]
            loss = F.cross_entropy(logits.float(), target.to(device))
            total_loss = loss + sum(v.float() for v in model.extra_losses().values())
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            losses.append(loss.detach())
    final = float(torch.stack(losses).mean()) if losses else float("nan")  # one host sync, after training
    return {**evaluate(model, val[0], val[1], opts.batch_size, device), "steps": steps, "final_train_loss": final}
