"""``harness boundaries``: where a trained DTP-ViT image tower puts its segment boundaries, drawn over the images.

For each image the tower's deterministic eval boundaries (:meth:`models.dtp_vit.DTPViT.boundaries` in eval mode:
each image keeps its expected number of boundaries at its highest logits) split the row-major sequence of
patches into contiguous segments; the grid shows each image as the model sees it (the eval transform, with the
normalisation undone), one colour per segment over its patches, white lines between patches of different
segments, and the image's segment count. Dynamic token pooling: Nawrot et al., ACL 2023.

    harness boundaries --checkpoint runs/dtp4-digits --images data/digits/val --num-images 16 --out results/b

``--checkpoint`` is a run folder (its newest complete checkpoint) or a checkpoint folder (``meta.json`` names
the model; any engine's layout, :func:`harness.components.checkpoint.load_model_state`). ``--images`` is an ImageFolder
(one sub-folder per class; images spread over the classes) or a folder of images. Writes ``boundaries.png`` and
``boundaries.json`` (per image: file, segment count, boundary patches) into ``--out``, refusing to overwrite.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from harness.components import checkpoint as ckpt_mod
from harness.core.errors import ConfigError, ExitCode, refuse

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def dtp_checkpoint(path: str) -> Tuple[Path, str]:
    """``(checkpoint folder, model name)`` for a run folder or a checkpoint folder of a DTP-ViT model.

    Raises:
        ConfigError: ``--checkpoint`` is missing, holds no complete checkpoint
            (:func:`harness.components.checkpoint.resolve_checkpoint`), or is not a DTP-ViT model's.
    """
    import models

    ckpt = ckpt_mod.resolve_checkpoint(path, "--checkpoint")
    name = ckpt_mod.read_meta(ckpt).get("config", {}).get("model", {}).get("name")
    try:
        family = models.get_spec(name).family
    except ValueError:
        family = None
    if family != "dtp-vit":
        dtp = [n for n in models.list_models() if models.get_spec(n).family == "dtp-vit" and models.get_spec(n).tiny]
        raise ConfigError(f"--checkpoint: {str(ckpt)!r} is a checkpoint of {name!r}, not of a DTP-ViT model "
                          f"(e.g. {', '.join(dtp)}): only DTP-ViT towers have learned segments")
    return ckpt, name


def find_images(folder: str, limit: int) -> List[Path]:
    """Up to ``limit`` image files of ``folder``: an ImageFolder (sorted classes, images spread over them
    round-robin) or the folder's own images, sorted.

    Raises:
        ConfigError: ``--images`` is not a folder or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--images: {folder!r} is not a folder")
    images = lambda d: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    classes = [images(d) for d in sorted(root.iterdir()) if d.is_dir()]
    classes = [c for c in classes if c]
    found: List[Path] = images(root)
    for i in range(max((len(c) for c in classes), default=0)):  # round-robin over classes
        found.extend(c[i] for c in classes if i < len(c))
    if not found:
        raise ConfigError(f"--images: no image ({', '.join(IMAGE_SUFFIXES)}) in {folder!r} or its sub-folders")
    return found[:limit]


@torch.no_grad()
def eval_boundaries(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 boundaries ``[N, L]`` of a DTP-ViT tower for ``images [N, 3, H, W]``, in eval mode (deterministic);
    patch ``l`` ends a segment when ``hard[:, l] == 1`` (the last patch always does)."""
    visual.eval()
    return visual.boundaries(visual.pre_tokens(images)[:, 1:])[1]


def segment_ids(hard: torch.Tensor) -> torch.Tensor:
    """``hard [L]`` (1 where a segment ends) -> segment index of each patch ``[L]`` (0, 0, 1, 1, 1, 2 ...)."""
    return torch.cumsum(hard, 0) - hard


def render(pictures: torch.Tensor, hard: torch.Tensor, titles: List[str], path: Path) -> None:
    """The grid: ``pictures [N, 3, H, W]`` in [0, 1], each patch tinted by its segment (``hard [N, L]``, patches
    row-major over a ``g x g`` grid), white lines between segments, ``titles`` above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n, L = hard.shape
    g = math.isqrt(L)
    size = pictures.shape[-1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        seg = segment_ids(hard[i]).long().view(g, g).numpy()  # [g, g]
        ax.imshow(pictures[i].permute(1, 2, 0).numpy(), extent=(0, g, g, 0), interpolation="nearest")
        colours = np.array([cmap(s % 10) for s in seg.flat]).reshape(g, g, 4)
        colours[..., 3] = 0.4
        ax.imshow(colours, extent=(0, g, g, 0), interpolation="nearest")
        for r in range(g):  # a line wherever two neighbouring patches are in different segments
            for c in range(g):
                if c + 1 < g and seg[r, c] != seg[r, c + 1]:
                    ax.plot([c + 1, c + 1], [r, r + 1], color="white", lw=2)
                if r + 1 < g and seg[r, c] != seg[r + 1, c]:
                    ax.plot([c, c + 1], [r + 1, r + 1], color="white", lw=2)
        ax.set_xlim(0, g)
        ax.set_ylim(g, 0)
        ax.set_title(titles[i], fontsize=8)
    fig.suptitle(f"DTP-ViT segments over the {g}x{g} patch grid ({size} px), eval boundaries", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_boundaries(checkpoint: str, images: str, out: str, num_images: int = 16,
                    command: str = "") -> Dict[str, object]:
    """Load the DTP-ViT of ``checkpoint``, compute its eval boundaries on up to ``num_images`` images of
    ``images`` and write ``boundaries.png`` and ``boundaries.json`` into ``out``; returns the JSON's content.

    Raises:
        ConfigError: bad ``--checkpoint``, ``--images`` or ``--out`` (see :func:`dtp_checkpoint`,
            :func:`find_images`; ``out`` must not already hold results).
    """
    from PIL import Image
    from torchvision.transforms import Normalize

    import models

    out_dir = Path(out)
    if any((out_dir / f).exists() for f in ("boundaries.png", "boundaries.json")):
        raise ConfigError(f"--out: {out!r} already holds boundaries.png / boundaries.json; choose a new folder "
                          "(nothing was overwritten)")
    ckpt, name = dtp_checkpoint(checkpoint)
    files = find_images(images, num_images)
    model = models.create_model(name)
    model.load_state_dict(ckpt_mod.load_model_state(ckpt))
    transform = models.image_transform(name, is_train=False)
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])  # [N, 3, H, W]
    hard = eval_boundaries(model.visual, batch).cpu()  # [N, L]
    norm = next(t for t in transform.transforms if isinstance(t, Normalize))
    mean, std = torch.tensor(norm.mean)[:, None, None], torch.tensor(norm.std)[:, None, None]
    pictures = (batch * std + mean).clamp(0, 1)
    counts = [int(h.sum()) for h in hard]
    titles = [f"{f.parent.name}/{f.name}: {c} seg" if f.parent != Path(images) else f"{f.name}: {c} seg"
              for f, c in zip(files, counts)]
    out_dir.mkdir(parents=True, exist_ok=True)
    render(pictures, hard, titles, out_dir / "boundaries.png")
    L = hard.shape[1]
    result = {"command": command, "checkpoint": str(ckpt), "model": name, "patches": L,
              "segments_mean": sum(counts) / len(counts), "shortening_factor": L * len(counts) / sum(counts),
              "images": [{"file": str(f), "segments": c, "boundary_patches": h.nonzero().flatten().tolist()}
                         for f, c, h in zip(files, counts, hard)]}
    (out_dir / "boundaries.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """``harness boundaries``; returns the exit status (2 for bad input)."""
    p = argparse.ArgumentParser(prog="harness boundaries", description="Draw a DTP-ViT checkpoint's learned segments "
                                "over images (eval boundaries) and report each image's segment count.")
    p.add_argument("--checkpoint", required=True, help="run folder (newest checkpoint) or checkpoint folder")
    p.add_argument("--images", required=True, help="ImageFolder directory or a folder of images")
    p.add_argument("--out", required=True, help="folder for boundaries.png and boundaries.json (not overwritten)")
    p.add_argument("--num-images", type=int, default=16, help="images drawn (default 16)")
    args = p.parse_args(argv)
    try:
        if args.num_images < 1:
            raise ConfigError(f"--num-images: must be >= 1, got {args.num_images}")
        command = " ".join(["harness", "boundaries", *(sys.argv[1:] if argv is None else argv)])
        result = draw_boundaries(args.checkpoint, args.images, args.out, args.num_images, command)
    except ConfigError as e:
        return refuse(e)
    for item in result["images"]:
        print(f"{item['file']}: {item['segments']} segments")
    print(f"{result['model']}: {result['segments_mean']:.2f} segments of {result['patches']} patches on average "
          f"(shortening factor {result['shortening_factor']:.2f}); {Path(args.out) / 'boundaries.png'}")
    return ExitCode.OK
