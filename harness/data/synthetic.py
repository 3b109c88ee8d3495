"""Synthetic batches of a model's exact shapes, made on the training device: for fit probes, profiles and
benchmarks, so that they measure the model and not a CPU random number generator feeding it.

Each sample is drawn from its own generator, seeded by a hash of ``(seed, global sample index)`` computed on
the host (no device value is read), so sample ``p`` of optimizer step ``s`` is the same whatever the split of
the step into ranks and micro batches. With micro batch ``B``, gradient accumulation ``K`` and world size ``W``
(global batch ``G = B K W``), rank ``r``'s ``m``-th micro batch of step ``s`` holds the samples
``s G + m B W + r B + k`` for ``k < B``; one process with micro batch ``G`` holds the same samples. Images are
``uint8`` like decoded ones (the trainer normalises them on the device). The generator is the device's own
(Philox on CUDA, Mersenne twister on CPU), so a CPU batch and a CUDA batch of the same samples differ; runs on
one kind of device agree.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import torch


def sample_seed(seed: int, sample: int) -> int:
    """A 63-bit generator seed for global sample ``sample`` (crc32-based: stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr((seed, "synthetic", sample)).encode()) * 2654435761 % (2**63)


@dataclass(frozen=True)
class SyntheticShapes:
    """A model's input shapes: square image side in pixels, text context length, vocabulary size."""

    image_size: int
    context_length: int
    vocab_size: int


class SyntheticSource:
    """Endless synthetic micro batches for one rank, made on ``device`` (see the module docstring for which samples).

    Yields dicts like :class:`harness.data.loader.ShardStream`: ``image`` uint8 ``[B, 3, H, W]``, ``text`` int64
    ``[B, context_length]`` token ids in ``[1, vocab_size)`` (both already on ``device``), ``role`` 0, ``state``
    ``{"offset": micro batches produced}``. ``resume`` is a :class:`harness.data.loader.DataTracker` state (its
    ``batches``).

    Args:
        shapes: the model's input shapes.
        micro_batch_size: ``B``.
        grad_accum_steps: ``K``.
        rank, world_size: this rank ``r`` of ``W``.
        seed: base seed.
        device: where batches are made.
    """

    def __init__(self, shapes: SyntheticShapes, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int, device: torch.device, resume: Optional[Dict[str, Any]] = None):
        self.shapes, self.B, self.K, self.rank, self.W = shapes, micro_batch_size, grad_accum_steps, rank, world_size
        self.seed, self.device = seed, torch.device(device)
        self.start = int((resume or {}).get("batches", 0))
        self.generator = torch.Generator(device=self.device)

    def first_sample(self, micro: int) -> int:
        """Global index of the first sample of this rank's ``micro``-th micro batch (counted from 0)."""
        step, m = divmod(micro, self.K)
        return step * self.B * self.K * self.W + m * self.B * self.W + self.rank * self.B

    def batch(self, micro: int) -> Dict[str, torch.Tensor]:
        """This rank's ``micro``-th micro batch: ``{"image": uint8 [B, 3, H, W], "text": int64 [B, L]}``."""
        s, g = self.shapes, self.generator
        image = torch.empty(self.B, 3, s.image_size, s.image_size, dtype=torch.uint8, device=self.device)
        text = torch.empty(self.B, s.context_length, dtype=torch.int64, device=self.device)
        first = self.first_sample(micro)
        for k in range(self.B):
            g.manual_seed(sample_seed(self.seed, first + k))
            torch.randint(0, 256, image.shape[1:], generator=g, dtype=torch.uint8, device=self.device, out=image[k])
            torch.randint(1, s.vocab_size, text.shape[1:], generator=g, device=self.device, out=text[k])
        return {"image": image, "text": text}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        i = self.start
        while True:
            batch = self.batch(i)
            i += 1
            yield {**batch, "role": 0, "state": {"epoch": 0, "offset": i}}
