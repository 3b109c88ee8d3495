"""Where the logged scalars also go (``train.report_to``): TensorBoard event files and Weights & Biases, as
sinks of :class:`harness.components.metrics.MetricLogger` on rank 0 (``metrics.jsonl`` is always written).

A sink receives each record :class:`~harness.components.metrics.MetricLogger` writes (a training log step, a zero-shot
or validation result) as its step and its numeric scalars; nested counters (``skipped_samples``) become
``skipped_samples/<kind>``. The TensorBoard sink is PyTorch's ``torch.utils.tensorboard.SummaryWriter``
(event files in ``<run_dir>/tensorboard``, flushed at each record); the W&B one is ``wandb.init`` /
``wandb.log(step=...)`` (the open_clip trainer's ``--report-to tensorboard,wandb`` idea).
"""
from __future__ import annotations

from typing import List, Mapping, Protocol

from harness.config.job_config import JobConfig, to_dict


class MetricSink(Protocol):
    """Receives the scalars of each logged record."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``log_dir`` (``SummaryWriter``; flushed at each record so a
    killed run keeps what it logged)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars to a Weights & Biases run named ``cfg.run_name`` in project ``train.wandb_project``, with the
    job config attached (``wandb.init``; ``WANDB_MODE=offline`` keeps it on disk under ``<run_dir>/wandb``)."""

    def __init__(self, cfg: JobConfig):
        import wandb

        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.train.wandb_project, name=cfg.run_dir.name, dir=str(cfg.run_dir),
                              config=to_dict(cfg))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: JobConfig, rank: int) -> List[MetricSink]:
    """The sinks ``train.report_to`` asks for, on rank 0 (none elsewhere). The packages were checked to be
    importable by :func:`harness.config.validate.validate`, before any process group."""
    if rank != 0:
        return []
    sinks: List[MetricSink] = []
    for name in cfg.train.report_to:
        sinks.append(TensorBoardSink(str(cfg.run_dir / "tensorboard")) if name == "tensorboard" else WandbSink(cfg))
    return sinks
