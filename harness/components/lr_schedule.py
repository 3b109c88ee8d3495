"""Learning-rate schedule keyed on samples seen: linear warm-up, then cosine decay.

The schedule's length is the configured training length in samples (``train.train_samples`` or
``train.epochs`` x epoch size), never ``train.max_steps``, so a run stopped early and resumed follows
the same curve as an uninterrupted one. Keyed on samples (not steps) so warm-up means the same
amount of data whatever the global batch (open_clip keys on steps; torchtitan on steps too).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(samples_seen: int, total_samples: int, warmup_samples: int, global_batch_size: int,
              min_lr_ratio: float = 0.0) -> float:
    """LR multiplier (of the peak LR) for the optimizer step taken after ``samples_seen`` samples.

    Warm-up: ``(samples_seen + global_batch_size) / warmup_samples`` (the first step is not at LR 0),
    then cosine from 1 to ``min_lr_ratio`` over the remaining ``total_samples - warmup_samples``.
    """
    if samples_seen < warmup_samples:
        return min(1.0, (samples_seen + global_batch_size) / warmup_samples)
    decay = max(total_samples - warmup_samples, 1)
    progress = min(max((samples_seen - warmup_samples) / decay, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_samples: int, warmup_samples: int,
                    global_batch_size: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` whose ``k``-th step (k optimizer steps taken) uses ``lr_factor(k * global_batch_size, ...)``.

    Its ``state_dict`` (step count) is saved in checkpoints, so the LR continues exactly on resume.
    """
    fn: Callable[[int], float] = lambda k: lr_factor(k * global_batch_size, total_samples, warmup_samples,
                                                      global_batch_size, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
