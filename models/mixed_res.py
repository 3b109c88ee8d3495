"""Mixed-resolution image tokens (Ronen et al. 2023, "Vision Transformers with Mixed-Resolution Tokenization",
the Quadformer; reference code ``TomerRonen34/mixed-resolution-vit``, ``mixed_res/quadtree_impl`` and
``mixed_res/patch_scorers/pixel_blur_patch_scorer.py``).

An image of side ``H`` is covered by a quadtree of square patches of sizes ``p, 2p, ..., 2^(L-1) p`` (``p`` the
tower's patch size, ``L`` the levels): it starts from the grid of the largest patches and splits, one at a time, the
patch the saliency scorer rates most in need of detail into its four children, until the fixed token budget is
reached (each split adds 3 tokens, so a budget is reachable when ``budget - (H / 2^(L-1) p)^2`` is a multiple of 3;
patches of size ``p`` are never split). Every patch is resized to ``p x p`` (bilinear, the whole image rescaled by
the patch's size over ``p``, as the reference does) and embedded by the tower's own patch embedding; it gets 2D
sinusoidal position embeddings at its centre (in units of ``p``; ``[x_sin, x_cos, y_sin, y_cos]``, as the reference)
plus the tower's learned grid table averaged the same way as the pixels, so the tower keeps exactly the grid
model's parameters (every one used) and checkpoints load either way.

Scorer: pixel blur (the reference's scorer needing no pretrained network): a patch of size ``s`` scores
``sqrt(s * mse)``, the mean squared difference over its pixels and channels between the image and the image
shrunk by ``s / p`` and enlarged back (bilinear). Higher = more detail lost at that size = split first.

Where it runs: the data loader's workers compute the selection for each training batch (:func:`quadtree_select`
on the normalised uint8 batch) and send it as ``quad [B, N]`` next to the images; a tower given plain images
(zero-shot, validation, fit probe, FLOP counts) runs the same function itself. Shapes are static (``N`` tokens
for every image), so flash kernels apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from models.dtp_vit import DTPViT
from models.segments import segment_bound


@dataclass(frozen=True)
class QuadtreeSpec:
    """A quadtree tokenization: square images of ``image_size`` px, patch sizes ``patch_size * 2^l`` for
    ``l < levels``, exactly ``tokens`` patches per image. Build with :func:`quadtree_spec` (checks it)."""

    image_size: int
    patch_size: int
    levels: int
    tokens: int

    def sizes(self) -> List[int]:
        """Patch sizes in px, largest first (the order of every candidate list here)."""
        return [self.patch_size << level for level in reversed(range(self.levels))]

    def grids(self) -> List[int]:
        """Patches per side at each size, largest size first."""
        return [self.image_size // s for s in self.sizes()]

    @property
    def splits(self) -> int:
        """Splits from the coarsest grid to ``tokens`` patches."""
        return (self.tokens - self.grids()[0] ** 2) // 3


def reachable_tokens(image_size: int, patch_size: int, levels: int) -> List[int]:
    """Token counts a quadtree of ``levels`` sizes can produce on ``image_size`` px images, ascending."""
    coarse = (image_size // (patch_size << (levels - 1))) ** 2
    return list(range(coarse, (image_size // patch_size) ** 2 + 1, 3))


def quadtree_spec(image_size: int, patch_size: int, levels: int, tokens: int = 0) -> QuadtreeSpec:
    """A checked :class:`QuadtreeSpec`; ``tokens=0`` picks the largest reachable count <= half the grid's.

    Raises:
        ValueError: the largest patch does not tile the image, or ``tokens`` is not reachable; the message names
            ``data.quadtree_levels`` / ``data.quadtree_tokens`` and the allowed values.
    """
    largest = patch_size << (levels - 1)
    if levels < 1 or image_size % largest:
        raise ValueError(f"data.quadtree_levels: {levels} levels make {largest} px patches, which do not tile "
                         f"{image_size} px images; allowed: 1 to {int(math.log2(image_size // patch_size)) + 1} "
                         "where the image side is a multiple of the largest patch")
    allowed = reachable_tokens(image_size, patch_size, levels)
    if tokens == 0:
        tokens = max([n for n in allowed if n <= (image_size // patch_size) ** 2 // 2] or allowed[:1])
    if tokens not in allowed:
        shown = ", ".join(map(str, allowed if len(allowed) <= 12 else allowed[:2])) + ("" if len(allowed) <= 12
                                                                                       else f", ..., {allowed[-1]}")
        raise ValueError(f"data.quadtree_tokens: {tokens} cannot be reached with {levels} levels on {image_size} px "
                         f"images with {patch_size} px patches (the coarsest grid + 3 per split); allowed: {shown}")
    return QuadtreeSpec(image_size, patch_size, levels, tokens)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """``x [B, C, H, H]`` -> ``[B, C, side, side]``, bilinear without antialiasing (the reference's resize)."""
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)


def candidate_patches(x: torch.Tensor, spec: QuadtreeSpec, patch: int) -> torch.Tensor:
    """Every patch of every size (the candidates), each resized to ``patch x patch`` cells of ``x``.

    Args:
        x: ``[B, C, S, S]`` with ``S = patch * (image_size / patch_size)`` (the image: ``patch = patch_size``; the
            learned position table as a ``[1, D, g, g]`` image: ``patch = 1``).

    Returns:
        ``[B, Q, C, patch, patch]``: the largest patches in raster order, then the next size's, ... down to the
        finest (``Q = sum of grids^2``; the order of :func:`candidate_centres`).
    """
    B, C, S, _ = x.shape
    out = []
    for g in spec.grids():
        y = _resize(x, g * patch)  # [B, C, g p, g p]
        out.append(y.view(B, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, patch, patch))
    return torch.cat(out, dim=1)


def candidate_centres(spec: QuadtreeSpec, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(centres [Q, 2] (y, x) in units of the finest patch, parent [Q] index of the enclosing patch one size up,
    -1 for the largest)`` in :func:`candidate_patches` order."""
    centres, parents, offset, parent_offset = [], [], 0, 0
    for level, g in zip(reversed(range(spec.levels)), spec.grids()):
        i = torch.arange(g, device=device)
        yy, xx = torch.meshgrid(i, i, indexing="ij")
        centres.append(torch.stack([yy, xx], -1).reshape(-1, 2).float().add(0.5).mul(1 << level))
        if offset == 0:
            parents.append(torch.full((g * g,), -1, device=device))
        else:
            parents.append(parent_offset + (yy // 2 * (g // 2) + xx // 2).reshape(-1))
        parent_offset, offset = offset, offset + g * g
    return torch.cat(centres), torch.cat(parents)


def pixel_blur_scores(images: torch.Tensor, spec: QuadtreeSpec) -> torch.Tensor:
    """``images [B, C, H, H]`` (float) -> ``[B, Q]`` split priority of every candidate patch (module docstring);
    ``-inf`` for the finest patches (never split)."""
    B, C, H, _ = images.shape
    scores = []
    for s, g in zip(spec.sizes(), spec.grids()):
        if s == spec.patch_size:
            scores.append(images.new_full((B, g * g), float("-inf")))
            continue
        blurry = _resize(_resize(images, H * spec.patch_size // s), H)
        mse = (blurry - images).square().mean(dim=1).view(B, g, s, g, s).mean(dim=(2, 4))  # [B, g, g]
        scores.append((mse * s).sqrt().reshape(B, g * g))
    return torch.cat(scores, dim=1)


@torch.no_grad()
def quadtree_select(images: torch.Tensor, spec: QuadtreeSpec) -> torch.Tensor:
    """The quadtree's patches for each image.

    Args:
        images: ``[B, C, H, H]`` float (the normalised image the tower sees).

    Returns:
        ``[B, tokens]`` int64 indices into :func:`candidate_patches` order, ascending; the selected patches cover
        every pixel exactly once. Ties split the larger patch first, then in raster order (a flat image is split
        level by level, uniformly). No host synchronisation (a fixed number of splits, argmax and sort on device).
    """
    scores = pixel_blur_scores(images.float(), spec)  # [B, Q]
    _, parent = candidate_centres(spec, images.device)
    B, Q = scores.shape
    top = parent < 0
    split = torch.zeros(B, Q, dtype=torch.bool, device=images.device)
    for _ in range(spec.splits):
        parent_split = torch.where(top, True, split[:, parent.clamp(min=0)])
        open_ = parent_split & ~split
        pick = torch.where(open_, scores, float("-inf")).argmax(dim=1, keepdim=True)  # [B, 1]
        split.scatter_(1, pick, True)
    leaf = torch.where(top, True, split[:, parent.clamp(min=0)]) & ~split  # [B, Q], exactly `tokens` per row
    return torch.argsort((~leaf).to(torch.uint8), dim=1, stable=True)[:, :spec.tokens]


def sincos_2d(centres: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sinusoidal position embeddings ``[..., dim]`` of ``centres [..., 2]`` (y, x): ``[x_sin, x_cos, y_sin,
    y_cos]``, each ``dim / 4`` wide (zero-padded to ``dim``), frequencies ``10000^(-i / (dim/4 - 1))``."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=centres.device) / max(quarter - 1, 1))
    parts = []
    for axis in (1, 0):  # x then y
        angle = centres[..., axis:axis + 1].float() * freq
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


def quadtree_embed(tower, images: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                   spec: QuadtreeSpec) -> torch.Tensor:
    """Tokens of ``tower`` (open_clip ViT or DTP-ViT: ``conv1``, ``class_embedding``, ``positional_embedding``)
    for ``images [B, 3, H, H]`` or ``(images, quad [B, N])`` (the data workers' selection), before ``ln_pre``:
    ``[B, 1 + N, D]``, the class token first (its learned position added), then the patches."""
    if isinstance(images, (tuple, list)):
        images, quad = images
        quad = quad.long()
    else:
        quad = quadtree_select(images, spec)
    p = spec.patch_size
    B, D = images.shape[0], tower.class_embedding.shape[-1]
    patches = candidate_patches(images, spec, p)  # [B, Q, 3, p, p]
    picked = patches.gather(1, quad[:, :, None, None, None].expand(-1, -1, *patches.shape[2:]))  # [B, N, 3, p, p]
    x = tower.conv1(picked.flatten(0, 1).to(tower.conv1.weight.dtype)).view(B, -1, D)  # [B, N, D]
    pos = tower.positional_embedding  # [1 + g^2, D]
    g = spec.grids()[-1]
    table = candidate_patches(pos[1:].T.reshape(1, D, g, g), spec, 1)[0, :, :, 0, 0]  # [Q, D] averaged learned
    centres, _ = candidate_centres(spec, images.device)
    table = table + sincos_2d(centres, D).to(table.dtype)
    x = x + table[quad].to(x.dtype)
    cls = (tower.class_embedding + pos[0]).to(x.dtype).expand(B, 1, D)
    return torch.cat([cls, x], dim=1)


def model_quadtree_spec(name: str, levels: int, tokens: int = 0) -> QuadtreeSpec:
    """:func:`quadtree_spec` for the registered model ``name``'s image and patch size (``data.quadtree_levels``,
    ``data.quadtree_tokens``). Raises ValueError as :func:`quadtree_spec`."""
    import models

    if models.get_spec(name).family == "reduced":
        raise ValueError(f"data.tokenizer: quadtree tokens need a plain ViT or DTP-ViT image tower; {name} reduces its "
                         "tokens itself (ToMe / TokenLearner / DynamicViT): use data.tokenizer=grid")
    return quadtree_spec(models.image_size(name), models.architecture(name)["vision_cfg"]["patch_size"], levels, tokens)


class QuadtreeSelector:
    """The data workers' step (picklable): uint8 images ``[B, 3, H, H]`` -> ``quad [B, N]`` int16, the
    :func:`quadtree_select` of the images normalised exactly as the trainer normalises them on the device."""

    def __init__(self, spec: QuadtreeSpec, image_stats: Tuple):
        self.spec, self.image_stats = spec, image_stats

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from models import normalize_uint8

        return quadtree_select(normalize_uint8(images, *self.image_stats), self.spec).to(torch.int16)


class MixedResVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer`` on quadtree tokens (same parameters; ``quadtree`` set by
    :func:`apply_mixed_resolution`). ``forward(images [B, 3, H, H] | (images, quad [B, N])) -> [B, embed_dim]``."""

    quadtree: QuadtreeSpec

    def _embeds(self, x) -> torch.Tensor:
        return self.ln_pre(self.patch_dropout(quadtree_embed(self, x, self.quadtree)))


class MixedResDTPViT(DTPViT):
    """DTP-ViT on quadtree tokens: the boundary predictor runs over the ``N`` patches in the order of
    :func:`candidate_patches` (largest size first, raster order within a size)."""

    quadtree: QuadtreeSpec

    def pre_tokens(self, image) -> torch.Tensor:
        return self._run(self.pre_blocks, self.ln_pre(quadtree_embed(self, image, self.quadtree)))


def apply_mixed_resolution(visual, spec: QuadtreeSpec):
    """Switch an image tower (open_clip ``VisionTransformer`` or :class:`models.dtp_vit.DTPViT`, built for
    ``spec.image_size`` px with ``spec.patch_size`` px patches) to quadtree tokens in place (its class changes, as
    FSDP2's ``fully_shard`` changes a module's class; parameters and state-dict keys stay). Returns ``visual``.

    Raises:
        ValueError: a tower of another class, or one whose image or patch size differs from ``spec``'s.
    """
    size, patch = visual.conv1.kernel_size[0], visual.image_size
    if (patch if isinstance(patch, int) else patch[0]) != spec.image_size or size != spec.patch_size:
        raise ValueError(f"data.tokenizer: quadtree spec for {spec.image_size} px / {spec.patch_size} px patches does "
                         "not match the image tower")
    if isinstance(visual, DTPViT):
        visual.__class__ = MixedResDTPViT
        visual.num_patches = spec.tokens
        visual.max_segments = segment_bound(spec.tokens, visual.cfg.compression, visual.cfg.max_segments)
    elif type(visual) in (VisionTransformer, MixedResVisionTransformer):  # not a token reducer's subclass
        visual.__class__ = MixedResVisionTransformer
    else:
        raise ValueError(f"data.tokenizer: quadtree needs a ViT or DTP-ViT image tower, not {type(visual).__name__}")
    visual.quadtree = spec
    return visual
