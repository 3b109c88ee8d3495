"""Zero-shot classification top-1 / top-5 on a labelled ImageFolder directory (CLIP, Radford et al. 2021).

Class names come from ``classnames.txt`` in the folder (one per line, in sorted sub-folder order), or
open_clip's ImageNet class names when the sub-folders are the 1,000 ImageNet synsets (``n01440764``
...), or else the sub-folder names (``_`` read as a space). Prompt templates come from
``templates.txt`` (one per line, ``{}`` for the class name), open_clip's OpenAI ImageNet templates for
ImageNet, or ``"a photo of a {}."``. The classifier is open_clip's ``build_zero_shot_classifier``.
Every rank scores a strided share of the images and the counts are summed, so the eval works when
parameters are sharded (all ranks run the forward).
"""
from __future__ import annotations

import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


def class_names_and_templates(root: str) -> Tuple[List[str], List[str], List[str]]:
    """``(folder names, class names, templates)`` for the ImageFolder ``root``.

    Raises:
        ValueError: ``root`` has no class sub-folders, or ``classnames.txt`` has the wrong length.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    rootp = Path(root)
    folders = sorted(p.name for p in rootp.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"eval.zeroshot_data: {root!r} has no class sub-folders")
    imagenet = len(folders) == 1000 and all(re.fullmatch(r"n\d{8}", f) for f in folders)
    if (rootp / "classnames.txt").is_file():
        names = [ln.strip() for ln in (rootp / "classnames.txt").read_text().splitlines() if ln.strip()]
        if len(names) != len(folders):
            raise ValueError(f"eval.zeroshot_data: classnames.txt has {len(names)} names for {len(folders)} folders")
    elif imagenet:
        names = list(IMAGENET_CLASSNAMES)
    else:
        names = [f.replace("_", " ") for f in folders]
    if (rootp / "templates.txt").is_file():
        templates = [ln.strip() for ln in (rootp / "templates.txt").read_text().splitlines() if ln.strip()]
    elif imagenet:
        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    else:
        templates = ["a photo of a {}."]
    return folders, names, templates


class _RankShare(torch.utils.data.Dataset):
    """This rank's strided share of ``dataset``, padded with repeats of its first image to ``length`` items so that
    every rank runs the same number of forwards (sharded parameters are gathered collectively); items are
    ``(image, label, counted)`` with ``counted`` False for the padding."""

    def __init__(self, dataset, rank: int, world: int, length: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        real = i < len(self.indices)
        image, label = self.dataset[self.indices[i] if real else (self.indices[:1] or [0])[0]]
        return image, label, real


@torch.no_grad()
def zeroshot_eval(model: torch.nn.Module, tokenizer: Callable, root: str, transform: Callable,
                  batch_size: int = 256, device: Optional[torch.device] = None,
                  autocast_dtype: torch.dtype = None, num_workers: int = 0) -> Dict[str, float]:
    """Zero-shot top-1 / top-5 accuracy (fractions in [0, 1]) of a CLIP ``model`` on ImageFolder ``root``.

    Images are decoded by ``num_workers`` DataLoader workers (pinned memory on CUDA) in batches of
    ``batch_size``; counts are summed on the device and read once at the end.

    Args:
        model: open_clip CLIP (``encode_image``, ``encode_text``); put in eval mode for the call.
        tokenizer: captions -> ``[N, context_length]`` tokens.
        root: ImageFolder directory.
        transform: PIL -> ``[3, H, W]`` eval preprocessing.
        batch_size: images per forward per rank.
        device: where the model lives (default CPU).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast, or None.
        num_workers: DataLoader workers decoding the images.

    Returns:
        ``{"zeroshot_top1": float, "zeroshot_top5": float, "zeroshot_images": int, "zeroshot_classes": int,
        "zeroshot_images_per_s": float}``; top-5 is over ``min(5, classes)``; images/s is the eval pass's
        throughput over all ranks (decoding, image tower and classifier; the class embeddings excluded).
    """
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from harness.data.workers import worker_init

    device = device or torch.device("cpu")
    folders, names, templates = class_names_and_templates(root)
    dataset = ImageFolder(root, transform=transform)
    assert dataset.classes == folders
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = _RankShare(dataset, rank, world, -(-len(dataset) // world))
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    k = min(5, len(folders))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    with ctx:
        classifier = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=10,
                                                device=device)  # [embed_dim, C]
        start = time.perf_counter()
        for images, target, counted in loader:
            images = images.to(device, non_blocking=True)  # [B, 3, H, W]
            target, counted = target.to(device, non_blocking=True), counted.to(device, non_blocking=True)
            feats = model.encode_image(images, normalize=True)  # [B, embed_dim]
            topk = (feats.float() @ classifier.float()).topk(k, dim=1).indices  # [B, k]
            counts[0] += ((topk[:, 0] == target) & counted).sum()
            counts[1] += ((topk == target[:, None]).any(dim=1) & counted).sum()
            counts[2] += counted.sum()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()  # the one host read, which also waits for the device
    seconds = time.perf_counter() - start
    n = max(n, 1.0)
    return {"zeroshot_top1": top1 / n, "zeroshot_top5": top5 / n, "zeroshot_images": int(n),
            "zeroshot_classes": len(folders), "zeroshot_images_per_s": n * world / seconds if seconds > 0 else None}
