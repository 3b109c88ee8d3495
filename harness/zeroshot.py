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


@torch.no_grad()
def zeroshot_eval(model: torch.nn.Module, tokenizer: Callable, root: str, transform: Callable,
                  batch_size: int = 256, device: Optional[torch.device] = None,
                  autocast_dtype: torch.dtype = None) -> Dict[str, float]:
    """Zero-shot top-1 / top-5 accuracy (fractions in [0, 1]) of a CLIP ``model`` on ImageFolder ``root``.

    Args:
        model: open_clip CLIP (``encode_image``, ``encode_text``); put in eval mode for the call.
        tokenizer: captions -> ``[N, context_length]`` tokens.
        root: ImageFolder directory.
        transform: PIL -> ``[3, H, W]`` eval preprocessing.
        batch_size: images per forward per rank.
        device: where the model lives.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast, or None.

    Returns:
        ``{"zeroshot_top1": float, "zeroshot_top5": float, "zeroshot_images": int, "zeroshot_classes": int}``;
        top-5 is over ``min(5, classes)``.
    """
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from torchvision.datasets import ImageFolder

    device = device or torch.device("cpu")
    folders, names, templates = class_names_and_templates(root)
    dataset = ImageFolder(root, transform=transform)
    assert dataset.classes == folders
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    # every rank runs the same number of forwards: sharded parameters (ZeRO-3 / FSDP) are gathered
    # collectively, so a rank with one image fewer must still join the last batch (its extra is not counted)
    per_rank = -(-len(dataset) // world)
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    k = min(5, len(folders))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    with ctx:
        classifier = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=10,
                                                device=device)  # [embed_dim, C]
        for start in range(0, per_rank, batch_size):
            chunk = indices[start:start + batch_size]
            n_real = len(chunk)
            chunk = chunk or indices[:1] or [0]  # a filler forward, not counted
            items = [dataset[i] for i in chunk]
            images = torch.stack([x for x, _ in items]).to(device)  # [B, 3, H, W]
            target = torch.tensor([y for _, y in items], device=device)[:n_real]
            feats = model.encode_image(images, normalize=True)[:n_real]  # [B, embed_dim]
            logits = feats.float() @ classifier.float()  # [B, C]
            topk = logits.topk(k, dim=1).indices  # [B, k]
            counts[0] += (topk[:, 0] == target).sum().item()
            counts[1] += (topk == target[:, None]).any(dim=1).sum().item()
            counts[2] += n_real
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(counts[2].item(), 1.0)
    return {"zeroshot_top1": counts[0].item() / n, "zeroshot_top5": counts[1].item() / n,
            "zeroshot_images": int(counts[2].item()), "zeroshot_classes": len(folders)}
