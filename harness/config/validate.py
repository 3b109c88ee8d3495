"""Checks of a job config across its sections and against the filesystem (each section checks its own fields when
it is built, :mod:`harness.config.job_config`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from harness.config.job_config import REPORT_TO, JobConfig
from harness.config.layout import BatchLayout, batch_layout, launch_world_size
from harness.core.errors import ConfigError
from harness.data.shards import expand_shards
from models.mixed_res import model_quadtree_spec
from models.pretrained import teacher_base


def validate(cfg: JobConfig, world_size: Optional[int] = None, check_paths: bool = True) -> BatchLayout:
    """Check what involves several sections or the filesystem (each section checked its own fields).

    Args:
        cfg: the job config.
        world_size: data-parallel ranks; default ``train.emulate_world_size`` or the launcher's ``WORLD_SIZE``.
        check_paths: also check that data paths exist (shards, eval folder, checkpoint to resume).

    Returns:
        The run's :class:`BatchLayout`.

    Raises:
        ConfigError: the first invalid field, named.
    """
    t, d, c, e = cfg.train, cfg.data, cfg.checkpoint, cfg.eval
    layout = batch_layout(t, world_size or t.emulate_world_size or launch_world_size())
    if (t.train_samples is None) == (t.epochs is None):
        raise ConfigError("train.train_samples / train.epochs: set exactly one of them")
    if t.train_samples is not None and t.train_samples < layout.global_batch_size:
        raise ConfigError(f"train.train_samples: {t.train_samples} is less than one global batch "
                          f"({layout.global_batch_size})")
    for name in t.report_to:
        if importlib.util.find_spec(REPORT_TO[name]) is None:
            raise ConfigError(f"train.report_to: {name} is asked for but the {REPORT_TO[name]!r} package is not "
                              f"installed (pip install {REPORT_TO[name]}, or drop it from train.report_to)")
    if cfg.model.distill_teacher:
        try:
            teacher_base(cfg.model.name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if d.tokenizer == "quadtree":
        try:
            model_quadtree_spec(cfg.model.name, d.quadtree_levels, d.quadtree_tokens)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if not check_paths:
        return layout
    if c.resume is not None and c.resume != "latest" and not Path(c.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: {c.resume!r} is neither 'latest' nor an existing checkpoint directory")
    if d.train_data != "synthetic":
        expand_shards(d.train_data)  # raises ConfigError naming data.train_data
    elif t.epochs is not None and d.train_num_samples is None:
        raise ConfigError("train.epochs: synthetic data has no epoch; set train.train_samples or "
                          "data.train_num_samples")
    if d.val_data is not None:
        expand_shards(d.val_data, "data.val_data")  # raises ConfigError naming data.val_data
    if e.zeroshot_data is not None and not Path(e.zeroshot_data).is_dir():
        raise ConfigError(f"eval.zeroshot_data: {e.zeroshot_data!r} is not a directory (ImageFolder layout: one "
                          "sub-folder of images per class); set it to null to skip zero-shot eval")
    return layout
