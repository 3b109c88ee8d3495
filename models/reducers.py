"""Token-reduction image towers: ToMe, TokenLearner and DynamicViT on a registered ViT, named by their setting.

A reduced model's name is its ViT's name and the method's setting:

* ``<vit>-tome-r<R>``: ToMe, ``R`` tokens merged in every block (:mod:`models.tome`); ``-prop`` appended turns on
  proportional attention (``log size`` in the logits: SDPA's math / memory-efficient kernels, not flash).
* ``<vit>-tokenlearner-<S>-at<L>``: TokenLearner v1.1, ``S`` learned tokens after the first ``L`` blocks
  (:mod:`models.tokenlearner`).
* ``<vit>-dynamicvit-<rho>``: DynamicViT, keep ratios ``rho, rho^2, rho^3`` at its three stages
  (:mod:`models.dynamicvit`).

Any such name on a registered ViT builds (``models.get_spec`` parses it); :data:`CANONICAL` are the ones listed by
``harness models``: the papers' settings on ViT-B-32 / ViT-B-16 and, on the CPU models, the settings that match
DTP-ViT's image-tower GMACs (``harness compare-reducers --match``). The text tower, the weights of the ViT and their
state-dict keys are the ViT's own; ToMe adds no parameters, TokenLearner and DynamicViT add theirs under
``visual.token_learner`` / ``visual.predictors``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import nn

METHODS = ("tome", "tokenlearner", "dynamicvit")

_NAME = re.compile(r"^(?P<base>.+?)-(?:tome-r(?P<r>\d+)(?P<prop>-prop)?|tokenlearner-(?P<s>\d+)-at(?P<at>\d+)"
                   r"|dynamicvit-(?P<rho>0\.\d+))$")


@dataclass(frozen=True)
class Reduction:
    """A token-reduction setting on the ViT ``base``: ``method`` in :data:`METHODS` and its ``settings``
    (``tome``: ``r``, ``prop_attn``; ``tokenlearner``: ``tokens``, ``at``; ``dynamicvit``: ``keep_ratio``)."""

    base: str
    method: str
    settings: Tuple[Tuple[str, object], ...]

    @property
    def kwargs(self) -> Dict[str, object]:
        return dict(self.settings)

    def describe(self) -> str:
        s = self.kwargs
        if self.method == "tome":
            what = f"ToMe, {s['r']} tokens merged per block" + (", proportional attention" if s["prop_attn"] else "")
        elif self.method == "tokenlearner":
            what = f"TokenLearner v1.1, {s['tokens']} learned tokens after block {s['at']}"
        else:
            what = f"DynamicViT, keep ratio {s['keep_ratio']:g} at 3 stages"
        return f"{self.base} image tower with {what}"


def parse(name: str) -> Optional[Reduction]:
    """The :class:`Reduction` a model name spells, or None if it spells none (the base is not checked here)."""
    m = _NAME.match(name)
    if m is None:
        return None
    if m["r"] is not None:
        return Reduction(m["base"], "tome", (("r", int(m["r"])), ("prop_attn", m["prop"] is not None)))
    if m["s"] is not None:
        return Reduction(m["base"], "tokenlearner", (("tokens", int(m["s"])), ("at", int(m["at"]))))
    return Reduction(m["base"], "dynamicvit", (("keep_ratio", float(m["rho"])),))


def model_name(base: str, method: str, **settings) -> str:
    """The registry name of ``method`` with ``settings`` on ``base`` (the inverse of :func:`parse`)."""
    if method == "tome":
        return f"{base}-tome-r{settings['r']}" + ("-prop" if settings.get("prop_attn") else "")
    if method == "tokenlearner":
        return f"{base}-tokenlearner-{settings['tokens']}-at{settings['at']}"
    if method == "dynamicvit":
        return f"{base}-dynamicvit-{settings['keep_ratio']:g}"
    raise ValueError(f"token reduction method: {method!r} is not one of {', '.join(METHODS)}")


def apply(visual: nn.Module, reduction: Reduction) -> nn.Module:
    """Switch the open_clip ViT image tower ``visual`` (its attention already :class:`models.attention.SelfAttention`)
    to ``reduction`` in place; returns it.

    Raises:
        ValueError: a setting out of range for this tower (the message names the field and the allowed range).
    """
    kw = reduction.kwargs
    if reduction.method == "tome":
        from models.tome import apply_tome

        return apply_tome(visual, kw["r"], prop_attn=kw["prop_attn"])
    if reduction.method == "tokenlearner":
        from models.tokenlearner import apply_tokenlearner

        return apply_tokenlearner(visual, kw["tokens"], kw["at"])
    from models.dynamicvit import apply_dynamicvit

    return apply_dynamicvit(visual, kw["keep_ratio"])


# listed by `harness models`: the papers' settings on the B models (ToMe's ViT-B/16 r=16 and a B/32 r=6;
# TokenLearner's 8 tokens at 3/4 depth; DynamicViT's rho=0.7) and the CPU models' DTP-matched settings
CANONICAL: List[str] = [
    "ViT-B-32-tome-r6", "ViT-B-32-tokenlearner-8-at9", "ViT-B-32-dynamicvit-0.7",
    "ViT-B-16-tome-r16", "ViT-B-16-tokenlearner-8-at9", "ViT-B-16-dynamicvit-0.7",
    # ViT-tiny-8 matched to DTP-ViT-tiny-8-2x, then -4x (harness compare-reducers --match-only)
    "ViT-tiny-8-tome-r2", "ViT-tiny-8-tokenlearner-8-at2", "ViT-tiny-8-dynamicvit-0.75",
    "ViT-tiny-8-tome-r3", "ViT-tiny-8-tokenlearner-8-at1", "ViT-tiny-8-dynamicvit-0.63",
]
