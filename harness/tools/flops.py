"""``harness flops``: forward cost of the image and text towers with fvcore, attention included, in GMACs.

fvcore counts one multiply-add as one "flop", i.e. it reports MACs; we keep that unit and call it
GMACs (GFLOPs = 2 x GMACs). By default fvcore skips ``aten::scaled_dot_product_attention`` and the
fused ``nn.MultiheadAttention`` kernel, so the ``Q K^T`` and ``A V`` products go missing (why the
DTP research table shows ViT-B/32 at 2.96 instead of ~4.4): we register handles for both.

DTP-ViT towers are counted two ways: *nominal* (fixed, evenly spaced boundaries every
``compression`` patches, DynamicViT style) and *measured* (the tower's own boundaries on real
images, one image per forward so padding to the batch's longest segment list is not counted).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from harness.core.errors import ExitCode, refuse


def _shape(value) -> Optional[List[int]]:
    try:
        return value.type().sizes()
    except Exception:  # not a tensor
        return None


def sdpa_mac_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """MACs of ``scaled_dot_product_attention(q [.., N, d], k [.., M, d], v [.., M, dv])``: ``Q K^T`` is
    ``N M d`` and ``A V`` is ``N M dv`` per batch x head."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_mac_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """MACs of ``aten::_native_multi_head_attention(query [B, N, E], key [B, M, E], value, E, heads, ...)``:
    input projections ``3 N E^2`` (as ``N E^2 + 2 M E^2``), attention ``2 N M E``, output projection ``N E^2``."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    *batch, n, e = q
    m = k[-2]
    b = math.prod(batch)
    return b * (n * e * e + 2 * m * e * e + 2 * n * m * e + n * e * e)


HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_mac_handle,
    "aten::_native_multi_head_attention": native_mha_mac_handle,
}


class _TextTower(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)


def count_gmacs(module: nn.Module, *inputs: torch.Tensor) -> float:
    """fvcore forward MACs of ``module(*inputs)`` in GMACs, attention handles registered.

    Raises:
        RuntimeError: fvcore met an operator with non-zero cost that it cannot count (listed), so a
            figure is never silently low.
    """
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = analysis.total()
    costly = {op: n for op, n in analysis.unsupported_ops().items()
              if any(key in op for key in ("attention", "bmm", "matmul", "linear", "conv", "einsum", "baddbmm"))}
    if costly:
        raise RuntimeError(f"fvcore cannot count these operators: {costly}")
    return total / 1e9


@torch.no_grad()
def model_gmacs(name: str, images: Optional[torch.Tensor] = None,
                state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Forward GMACs per sample of model ``name``'s image and text towers (eval mode).

    Args:
        name: registered model.
        images: optional ``[N, 3, H, W]`` preprocessed real images for DTP's measured cost.
        state_dict: trained weights (e.g. :func:`harness.components.checkpoint.load_model_state`); random init if None.

    Returns:
        ``{"model", "image_gmacs", "text_gmacs", "unit": "GMACs (1 multiply-add = 1)", ...}``; for DTP-ViT
        ``image_gmacs`` is the nominal figure and ``image_gmacs_measured`` / ``shortening_factor_measured``
        are added when ``images`` is given.
    """
    import models

    siglip = state_dict is not None and "logit_bias" in state_dict  # a checkpoint trained with loss.kind=siglip
    model = models.create_model(name, siglip=siglip).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    size, ctx = models.image_size(name), models.context_length(name)
    text = models.get_tokenizer(name)(["a photo of a cat"])  # [1, ctx]; cost does not depend on the words
    result: Dict[str, Any] = {"model": name, "unit": "GMACs (1 multiply-add = 1; GFLOPs = 2 x GMACs)"}
    visual = model.visual
    dtp = hasattr(visual, "boundary_mode")
    if dtp:
        visual.boundary_mode = "nominal"
        _fit_slots(visual, torch.zeros(1, 3, size, size))
    result["image_gmacs"] = count_gmacs(visual, torch.zeros(1, 3, size, size))
    if dtp:
        result["image_gmacs_kind"] = f"nominal (boundaries every {visual.cfg.compression:g} patches)"
        result["shortening_factor_nominal"] = float(visual.last_stats["shortening_factor"])
        visual.boundary_mode = "learned"
        if images is not None:
            costs, sfs = [], []
            for img in images:
                _fit_slots(visual, img[None])
                costs.append(count_gmacs(visual, img[None]))
                sfs.append(float(visual.last_stats["shortening_factor"]))
            result["image_gmacs_measured"] = sum(costs) / len(costs)
            result["shortening_factor_measured"] = sum(sfs) / len(sfs)
            result["measured_images"] = len(costs)
    result["text_gmacs"] = count_gmacs(_TextTower(model), text)
    result["context_length"] = ctx
    return result


def _fit_slots(visual: nn.Module, image: torch.Tensor) -> None:
    """Give a DTP-ViT tower exactly as many segment slots as ``image`` ``[1, 3, H, W]`` has segments, so the count
    is of the work its segments need, not of the static padding the training shapes carry."""
    visual.max_segments = visual.num_patches
    visual(image)
    visual.max_segments = max(1, int(visual.last_stats["segments_max"]))


def load_images(folder: str, name: str, limit: int) -> torch.Tensor:
    """Up to ``limit`` images of an ImageFolder directory, preprocessed for ``name``: ``[N, 3, H, W]``."""
    from torchvision.datasets import ImageFolder

    import models

    ds = ImageFolder(folder, transform=models.image_transform(name, is_train=False))
    step = max(len(ds) // limit, 1)  # spread over classes (ImageFolder is sorted by class)
    return torch.stack([ds[i][0] for i in range(0, len(ds), step)][:limit])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness flops", description="forward GMACs of the image and text towers "
                                "(fvcore, attention counted)")
    p.add_argument("--model", action="append", required=True, help="registered model (repeatable)")
    p.add_argument("--images", help="ImageFolder directory: DTP-ViT cost measured on these real images")
    p.add_argument("--num-images", type=int, default=16, help="images used for the measured cost")
    p.add_argument("--checkpoint", help="checkpoint folder whose weights to use (one --model)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: List[str]) -> int:
    """``harness flops``: a table (or ``--json`` rows of :func:`model_gmacs`) for every ``--model``; exit status 2 on
    an unknown model, a missing ``--images`` folder or ``--checkpoint`` with several models."""
    import models
    from harness.components.checkpoint import load_model_state

    args = _parser().parse_args(argv)
    for name in args.model:
        try:
            models.get_spec(name)
        except ValueError as e:
            return refuse(e)
    if args.checkpoint and len(args.model) != 1:
        return refuse("--checkpoint: give exactly one --model")
    if args.images and not Path(args.images).is_dir():
        return refuse(f"--images: {args.images!r} is not a directory")
    rows = []
    for name in args.model:
        images = load_images(args.images, name, args.num_images) if args.images else None
        state = load_model_state(Path(args.checkpoint)) if args.checkpoint else None
        rows.append(model_gmacs(name, images, state))
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    print("forward cost per sample, fvcore with attention counted; unit GMACs (1 multiply-add = 1; GFLOPs = 2 x GMACs)")
    print(f"{'model':<24} {'image GMACs':>12} {'measured':>9} {'SF nominal':>10} {'SF measured':>11} "
          f"{'text GMACs':>11}")
    for r in rows:
        meas = r.get("image_gmacs_measured")
        sfn, sfm = r.get("shortening_factor_nominal"), r.get("shortening_factor_measured")
        fmt = lambda v, width, prec: f"{v:>{width}.{prec}f}" if v is not None else f"{'-':>{width}}"
        print(f"{r['model']:<24} {r['image_gmacs']:>12.3f} {fmt(meas, 9, 3)} {fmt(sfn, 10, 2)} {fmt(sfm, 11, 2)} "
              f"{r['text_gmacs']:>11.3f}")
    return ExitCode.OK
