"""Batch arithmetic in one place: ``global_batch = micro_batch * grad_accum_steps * world_size``."""
from __future__ import annotations

import os
from dataclasses import dataclass

from harness.core.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """Batch arithmetic for one run.

    Attributes:
        micro_batch_size: samples per rank per forward/backward.
        grad_accum_steps: micro batches per optimizer step on each rank.
        world_size: data-parallel ranks.
        global_batch_size: samples per optimizer step, ``micro * accum * world``.
        accum_negatives: the accumulated micro batches are each other's negatives (GradCache,
            :mod:`harness.train.accumulate`); only with ``grad_accum_steps > 1``.
        contrastive_batch_size: samples one contrastive loss sees: the global batch ``micro * accum * world``
            with ``accum_negatives``, else ``micro * world`` (plain accumulation adds no negatives).
    """

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int
    accum_negatives: bool = False

    @property
    def contrastive_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size * (self.grad_accum_steps if self.accum_negatives else 1)


def batch_layout(train, world_size: int) -> BatchLayout:
    """Derive gradient accumulation from micro batch, global batch and world size (``train``: the job's
    :class:`harness.config.job_config.TrainConfig`), and whether it adds negatives (``train.accum_negatives``).

    Raises:
        ConfigError: the global batch is not a positive multiple of ``micro_batch_size * world_size``.
    """
    micro = train.micro_batch_size
    per_step = micro * world_size
    glob = train.global_batch_size if train.global_batch_size is not None else per_step
    if glob < 1 or glob % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size: {glob} is not a multiple of train.micro_batch_size ({micro}) x "
            f"world size ({world_size}) = {per_step}; allowed: {per_step}, {2 * per_step}, {3 * per_step}, ...")
    accum = glob // per_step
    negatives = getattr(train, "accum_negatives", None)  # None: on whenever there is accumulation
    return BatchLayout(micro, accum, world_size, glob, accum > 1 and negatives is not False)


def launch_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE`` from torchrun / accelerate launch), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))
