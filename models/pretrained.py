"""Start a model from a pretrained open_clip checkpoint file (local files only, never a download), and lock towers.

A pretrained file is an open_clip CLIP state dict: ``.pt`` / ``.pth`` / ``.bin`` (a plain state dict or
``{"state_dict": ...}``, keys possibly prefixed ``module.``) or ``.safetensors``, read with open_clip's own
``load_state_dict``; a folder written by ``harness export`` (``open_clip_model.safetensors``) works too.

* ViT models load it key for key (the file's ``logit_scale`` may be open_clip's 0-dim one or our ``[1]``).
* DTP-ViT (:mod:`models.dtp_vit`) starts from a ViT checkpoint of the same width: patch embedding
  (``conv1``), class and position embeddings, ``ln_pre``, the ViT's first blocks as its pre layers, the
  following ones as its shortened layers (then post layers), ``ln_post``, ``proj`` and the whole text tower.
  Its blocks are timm ``Block``\\ s, the ViT's open_clip ``ResidualAttentionBlock``\\ s, so names are mapped
  (``norm1``/``ln_1``, ``attn.qkv``/``attn.in_proj_*``, ``attn.proj``/``attn.out_proj``, ``norm2``/``ln_2``,
  ``mlp.fc1``/``mlp.c_fc``, ``mlp.fc2``/``mlp.c_proj``); the tensors have the same layout (q, k, v stacked,
  heads contiguous, as in ``nn.MultiheadAttention``). The boundary predictor starts new.

DynamicViT's distillation teacher (:func:`load_teacher`, :mod:`models.distill`) is the plain ViT a DynamicViT model
is built on, every image-tower weight read from such a file.

Locking (:func:`lock_towers`) is open_clip's ``CLIP.lock_image_tower`` / ``lock_text_tower`` (``--lock-image``,
``--lock-text``; LiT, Zhai et al. 2022): every parameter of the tower stops requiring gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
EXPORTED_WEIGHTS = "open_clip_model.safetensors"  # the weights file of an exported (``local-dir:``) folder

# timm Block parameter names -> open_clip ResidualAttentionBlock names (suffixes after the block index)
TIMM_TO_OPEN_CLIP = (("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "attn.in_proj_weight"),
                     ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
                     ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
_DTP_BLOCK_LISTS = ("pre_blocks", "shortened_blocks", "post_blocks")  # in forward order, see DTPViT.block_lists


class PretrainedError(ValueError):
    """The pretrained file cannot initialise this model (missing, unreadable, another architecture)."""


@dataclass
class LoadReport:
    """What a pretrained file gave a model.

    Attributes:
        path: the file read.
        loaded: ``(model key, file key)`` pairs copied (the same name unless mapped).
        new: model keys the file has nothing for (they keep their initialisation).
        leftover: file keys nothing in the model used.
    """

    path: str
    loaded: List[Tuple[str, str]] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    leftover: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """Human-readable summary: counts, then the new and leftover keys (parameter names grouped by module)."""
        mapped = sum(1 for a, b in self.loaded if a != b)
        out = [f"pretrained {self.path}: loaded {len(self.loaded)} tensors ({mapped} under mapped names), "
               f"{len(self.new)} new, {len(self.leftover)} left over"]
        if self.new:
            out.append("  new (initialised, not in the file): " + ", ".join(_group(self.new)))
        if self.leftover:
            out.append("  left over (in the file, unused): " + ", ".join(_group(self.leftover)))
        return out

    def as_dict(self) -> Dict[str, object]:
        return {"path": self.path, "loaded": len(self.loaded), "new": self.new, "leftover": self.leftover}


def _group(keys: List[str]) -> List[str]:
    """``visual.boundary_predictor.0.weight, ...bias, ...`` -> ``visual.boundary_predictor.* (4)``; a key alone in
    its module is shown whole."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:2]), []).append(k)
    return [f"{head}.* ({len(ks)})" if len(ks) > 1 else ks[0] for head, ks in groups.items()]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` on the CPU (open_clip's ``load_state_dict``: ``.safetensors`` or ``torch.load``
    with ``weights_only``; ``{"state_dict": ...}`` unwrapped, ``module.`` prefixes removed), or the weights of an
    exported folder.

    Raises:
        PretrainedError: no such file, a suffix other than :data:`STATE_SUFFIXES`, or unreadable content.
    """
    from open_clip.factory import load_state_dict

    p = Path(path)
    if p.is_dir() and (p / EXPORTED_WEIGHTS).is_file():
        p = p / EXPORTED_WEIGHTS
    if not p.is_file():
        raise PretrainedError(f"{str(path)!r} is not a file (nor a folder written by harness export)")
    if p.suffix not in STATE_SUFFIXES:
        raise PretrainedError(f"{str(path)!r}: expected a {', '.join(STATE_SUFFIXES)} file")
    try:
        state = load_state_dict(str(p), device="cpu", weights_only=True)
    except Exception as e:  # torch.load / safetensors raise many types for a bad file
        raise PretrainedError(f"{str(path)!r} could not be read as a state dict: {type(e).__name__}: {e}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def source_key(key: str, visual: nn.Module) -> str:
    """The open_clip (ViT) state-dict key holding the weights for ``key`` of a model whose image tower is
    ``visual``. A ViT's keys are their own; a DTP-ViT block ``visual.<list>.<i>.<timm name>`` reads
    ``visual.transformer.resblocks.<offset + i>.<open_clip name>``, the offset counting the blocks of the
    earlier lists (pre, shortened, post)."""
    if not key.startswith("visual.") or not hasattr(visual, "block_lists"):
        return key
    offset = 0
    for name, blocks in zip(_DTP_BLOCK_LISTS, visual.block_lists()):
        prefix = f"visual.{name}."
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            for timm_name, oc_name in TIMM_TO_OPEN_CLIP:
                if rest.startswith(timm_name):
                    rest = oc_name + rest[len(timm_name):]
                    break
            return f"visual.transformer.resblocks.{offset + int(index)}.{rest}"
        offset += len(blocks)
    return key


def plan_pretrained(model: nn.Module, source: Mapping[str, torch.Tensor], path: str = "") -> LoadReport:
    """Match ``model``'s state-dict keys and shapes (a ``meta``-device model will do) against ``source``.

    A tensor loads when its source key (:func:`source_key`) is in ``source`` with the same shape (or both hold
    one element: open_clip's 0-dim ``logit_scale`` against our ``[1]``).

    Raises:
        PretrainedError: a mapped tensor's shape differs (another architecture or width; up to 5 named), or no
            key matches at all.
    """
    report = LoadReport(path=str(path))
    target = model.state_dict(keep_vars=True)
    mismatched = []
    for key, tensor in target.items():
        src = source_key(key, model.visual)
        if src not in source:
            report.new.append(key)
            continue
        have = source[src]
        if tuple(have.shape) != tuple(tensor.shape) and not (have.numel() == tensor.numel() == 1):
            mismatched.append(f"{key} {tuple(tensor.shape)} <- {src} {tuple(have.shape)}")
        report.loaded.append((key, src))
    used = {src for _, src in report.loaded}
    report.leftover = [k for k in source if k not in used]
    if mismatched:
        raise PretrainedError(f"{path!r} is another architecture: {len(mismatched)} tensors differ in shape "
                              f"(model <- file): " + "; ".join(mismatched[:5]))
    if not report.loaded:
        raise PretrainedError(f"{path!r} shares no parameter name with this model (file keys such as "
                              f"{', '.join(list(source)[:3])})")
    return report


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str) -> LoadReport:
    """Copy the weights of the pretrained file ``path`` into ``model`` (in place, before any sharding) as
    :func:`plan_pretrained` matched them; keys the file lacks keep their initialisation.

    Raises:
        PretrainedError: see :func:`read_state_dict` and :func:`plan_pretrained`.
    """
    source = read_state_dict(path)
    report = plan_pretrained(model, source, path)
    target = model.state_dict(keep_vars=True)
    for key, src in report.loaded:
        dst = target[key]
        dst.copy_(source[src].reshape(dst.shape))
    return report


def check_pretrained(model: nn.Module, path: str) -> LoadReport:
    """:func:`plan_pretrained` of the file ``path`` against ``model`` without copying (``model`` may be on ``meta``)."""
    return plan_pretrained(model, read_state_dict(path), path)


def lock_towers(model: nn.Module, image: bool = False, text: bool = False) -> Dict[str, int]:
    """Freeze whole towers as open_clip's ``--lock-image`` / ``--lock-text`` do (``CLIP.lock_image_tower()``:
    the image tower's ``lock()``, every parameter frozen; ``CLIP.lock_text_tower()``: token and position
    embeddings, transformer, ``ln_final``, ``text_projection``). ``logit_scale`` stays trainable.

    Returns:
        ``{"image": n, "text": m}``: parameter elements frozen per tower (0 for a tower not locked).
    """
    frozen_before = {id(p) for p in model.parameters() if not p.requires_grad}
    counts = {"image": 0, "text": 0}
    for tower, wanted, lock in (("image", image, model.lock_image_tower), ("text", text, model.lock_text_tower)):
        if not wanted:
            continue
        lock()
        newly = [p for p in model.parameters() if not p.requires_grad and id(p) not in frozen_before]
        counts[tower] = sum(p.numel() for p in newly)
        frozen_before |= {id(p) for p in newly}
    return counts


def describe_lock(counts: Dict[str, int]) -> Optional[str]:
    """One log line for :func:`lock_towers`'s counts, or None when nothing was locked."""
    parts = [f"{tower} tower ({n / 1e6:.2f}M parameters)" for tower, n in counts.items() if n]
    return "locked (frozen): " + ", ".join(parts) if parts else None


def load_teacher(name: str, path: str, device: str = "cpu", attention: str = "sdpa") -> nn.Module:
    """The teacher of the DynamicViT model ``name`` (``<vit>-dynamicvit-<rho>``): the image tower of ``<vit>``
    built by ``models.create_model`` on ``device`` (``"meta"``: checked, not loaded) with every ``visual.*`` weight
    from the open_clip checkpoint ``path`` (any file or folder ``model.pretrained`` reads,
    :func:`read_state_dict`). Text-tower keys in the file are ignored.

    Raises:
        ValueError: ``name`` is not a DynamicViT model.
        PretrainedError: unreadable file, another architecture, or ``visual.*`` weights missing
            (named).
    """
    import models

    base = teacher_base(name)
    model = models.create_model(base, device=device, attention=attention)
    report = (check_pretrained if device == "meta" else load_pretrained)(model, path)
    missing = [k for k in report.new if k.startswith("visual.")]
    if missing:
        raise PretrainedError(f"{path!r} lacks {len(missing)} image-tower weights of {base} (such as "
                              f"{', '.join(missing[:3])}): a teacher needs them all")
    return model.visual


def teacher_base(name: str) -> str:
    """The ViT the DynamicViT model ``name`` (``<vit>-dynamicvit-<rho>``) is built on: its teacher's architecture.

    Raises:
        ValueError: ``name`` is not a DynamicViT model (the message names ``model.distill_teacher``).
    """
    from models.reducers import parse

    red = parse(name)
    if red is None or red.method != "dynamicvit":
        raise ValueError(f"model.distill_teacher: only DynamicViT models (<vit>-dynamicvit-<rho>) distil from a "
                         f"teacher; model.name is {name!r}")
    return red.base
