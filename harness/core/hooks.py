"""Test hooks: environment variables that inject a fault into a real run, so the tests can prove the harness
survives it. They are not user settings; every one is named ``HARNESS_TEST_*`` and read here, nowhere else.

=================================  ================  ==========================================================
variable                           value             effect
=================================  ================  ==========================================================
``HARNESS_TEST_KILL_IN_SAVE``      ``S`` / ``S@R``   inside the checkpoint save of step ``S``, after its files are
                                                     written and before it is complete: the process exits with
                                                     :attr:`ExitCode.KILLED_IN_SAVE` (17); with ``@R`` only rank
                                                     ``R`` dies, by SIGKILL
``HARNESS_TEST_NONFINITE_LOSS``    ``5,12+@1``       the loss of optimizer step 5 and of every step from 12 on is
                                                     NaN (``@R``: on rank ``R`` only)
``HARNESS_TEST_HANG_AFTER_STEP``   ``R:S``           rank ``R``'s main thread sleeps for an hour after step ``S``
``HARNESS_TEST_BUDGET_SCALE_RANK`` ``R:F``           rank ``R``'s ``train.memory_budget_gib`` is multiplied by
                                                     ``F`` (one rank with less memory, as on a cluster of mixed
                                                     16/32 GB cards)
=================================  ================  ==========================================================
"""
from __future__ import annotations

import os
import signal
from typing import List, Optional, Tuple

from harness.core.errors import ExitCode

KILL_IN_SAVE = "HARNESS_TEST_KILL_IN_SAVE"
NONFINITE_LOSS = "HARNESS_TEST_NONFINITE_LOSS"
HANG_AFTER_STEP = "HARNESS_TEST_HANG_AFTER_STEP"
BUDGET_SCALE_RANK = "HARNESS_TEST_BUDGET_SCALE_RANK"


def _rank_value(name: str, rank: int) -> Optional[str]:
    """The ``VALUE`` of a ``RANK:VALUE`` hook when it names ``rank``, else None."""
    target, _, value = os.environ.get(name, "").partition(":")
    return value if target and int(target) == rank else None


def kill_in_save(step: int, rank: int) -> None:
    """Die here if :data:`KILL_IN_SAVE` names this save (called between writing a checkpoint and completing it)."""
    at, _, only = os.environ.get(KILL_IN_SAVE, "").partition("@")
    if at != str(step):
        return
    if not only:
        os._exit(ExitCode.KILLED_IN_SAVE)
    if int(only) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


def nonfinite_loss_steps(rank: int, text: Optional[str] = None) -> List[Tuple[int, bool]]:
    """:data:`NONFINITE_LOSS` (or ``text``) as ``[(step, onwards)]`` for this rank; empty when unset or for another
    rank.

    Raises:
        ValueError: text that is not of the documented form.
    """
    text = os.environ.get(NONFINITE_LOSS, "") if text is None else text
    if not text:
        return []
    items, _, only = text.partition("@")
    if only and int(only) != rank:
        return []
    return [(int(i.rstrip("+")), i.endswith("+")) for i in items.split(",") if i]


def hang_after_step(rank: int) -> Optional[int]:
    """The optimizer step after which this rank hangs (:data:`HANG_AFTER_STEP`), or None."""
    value = _rank_value(HANG_AFTER_STEP, rank)
    return int(value) if value is not None else None


def budget_scale(rank: int) -> float:
    """The factor on this rank's memory budget (:data:`BUDGET_SCALE_RANK`), 1.0 when unset or for another rank."""
    value = _rank_value(BUDGET_SCALE_RANK, rank)
    return float(value) if value is not None else 1.0
