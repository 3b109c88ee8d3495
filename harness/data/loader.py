"""Training data: webdataset (1.x) shards in img2dataset's layout, and a synthetic source.

Pipeline per data *role* (one role per DataLoader worker per rank)::

    shard list (epoch-shuffled or resampled) -> this role's shards -> tar samples (webdataset,
    errors counted) -> shuffle buffer (seeded) -> skip samples already trained on (resume)
    -> decode image + caption (bad samples counted, skipped) -> open_clip preprocessing +
    tokenization -> batches of ``micro_batch_size``

Design points:

* Ranks come from ``torch.distributed`` (or the launcher's ``RANK``/``WORLD_SIZE``), never from
  Accelerate, whose process count is wrong on CPU under DeepSpeed (its backend
  detection has no CPU path for DeepSpeed: it reports one process where ``torch.distributed`` has several).
* With at least as many shards as roles, shards are split between roles; with fewer, every role
  reads all shards and keeps every ``n_roles``-th sample, so small datasets still give every rank data.
* Each role's stream is endless (epoch after epoch), so ranks never run out at different steps and
  deadlock in a collective; the trainer decides the length in samples.
* Exact resume: every batch carries its role's position (epoch, raw samples consumed). The trainer
  saves the position of the last batch it consumed per role; a resumed stream replays the role's
  shuffle from the epoch start without decoding, skips to the position, and the DataLoader's
  round-robin over workers is rotated so the next batch is the one the killed run would have seen.
  Augmentation randomness is seeded per sample, not per worker process.
"""
from __future__ import annotations

import io
import logging
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.core.units import GIB
from harness.data.shards import IMAGE_EXTS, count_samples, expand_shards, tar_is_complete
from harness.data.workers import NamedWorkerErrors, worker_init

log = logging.getLogger(__name__)

COUNTERS = ("read_errors", "truncated_shards", "corrupt", "incomplete")


# --------------------------------------------------------------------------- roles and seeds

def _seed(*parts: Any) -> int:
    """Stable 63-bit seed from ``parts`` (Python's ``hash`` is salted per process; crc32 is not)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


def _initial_state() -> Dict[str, int]:
    return {"epoch": 0, "offset": 0, **{k: 0 for k in COUNTERS}}


@dataclass(frozen=True)
class Roles:
    """Where a stream's data roles sit: this process's data-parallel ``rank`` of ``world_size``, and its
    DataLoader ``workers`` (0: one role, in-process). Each worker of each rank is one role."""

    rank: int = 0
    world_size: int = 1
    workers: int = 0

    @property
    def per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def total(self) -> int:
        return self.per_rank * self.world_size


@dataclass(frozen=True)
class Sampling:
    """How a stream draws samples: the base ``seed`` of shard order, shuffle buffer and augmentation; shards
    ``resampled`` with replacement (open_clip's ``--dataset-resampled``) or in epoch-wise passes; the
    ``shuffle_buffer`` size in samples (0: off)."""

    seed: int = 0
    resampled: bool = False
    shuffle_buffer: int = 1000


def is_complete(sample: Dict[str, Any]) -> bool:
    """Whether a raw webdataset sample has an image (``jpg|jpeg|png|webp``) and a caption (``txt``)."""
    return "txt" in sample and any(k in sample for k in IMAGE_EXTS)


def decode_sample(sample: Dict[str, Any], transform: Callable) -> tuple:
    """``(transform(RGB image), caption)`` of a complete raw sample (:func:`is_complete`).

    Raises:
        Exception: whatever PIL raises for a corrupt or truncated image (callers skip and count the sample).
    """
    from PIL import Image

    img_key = next(k for k in IMAGE_EXTS if k in sample)
    with Image.open(io.BytesIO(sample[img_key])) as im:
        im = im.convert("RGB")
    caption = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
    return transform(im), caption


class ShardStream(IterableDataset):
    """Endless stream of training batches from webdataset shards, resumable exactly.

    Yields dicts: ``image`` ``[B, 3, H, W]`` (uint8 with the trainer's ``uint8`` transform; what ``transform``
    returns), ``text`` int64 ``[B, context_length]``,
    ``role`` (local role index), ``state`` (that role's position after this batch: ``epoch``,
    ``offset`` = raw samples consumed in the epoch, and cumulative counters ``read_errors``, ``truncated_shards``,
    ``corrupt``, ``incomplete``).

    Args:
        shards: shard paths (:func:`expand_shards`).
        batch_size: micro batch (samples per yielded batch).
        transform: PIL image -> ``[3, H, W]`` tensor (the trainer passes ``models.image_transform(..., uint8=True)``).
        tokenizer: list of ``B`` captions -> ``[B, context_length]``.
        roles: data-parallel position of this process and its DataLoader workers (:class:`Roles`).
        sampling: seed, resampling and shuffle buffer (:class:`Sampling`).
        resume: ``{"roles": {local_role: state}, "batches": consumed batches}`` from a checkpoint.
        image_tokens: uint8 ``[B, 3, H, W]`` -> ``[B, N]``, run in the worker on each batch and yielded as ``quad``
            (``data.tokenizer=quadtree``: :class:`models.mixed_res.QuadtreeSelector`), or None.
    """

    def __init__(self, shards: List[str], batch_size: int, transform: Callable, tokenizer: Callable, roles: Roles,
                 sampling: Sampling = Sampling(), resume: Optional[Dict[str, Any]] = None,
                 image_tokens: Optional[Callable] = None):
        super().__init__()
        self.image_tokens = image_tokens
        self.shards = list(shards)
        self.batch_size = batch_size
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = sampling.seed
        self.rank = roles.rank
        self.roles_per_rank = roles.per_rank
        self.n_roles = roles.total
        self.resampled = sampling.resampled
        self.shuffle_buffer = sampling.shuffle_buffer
        resume = resume or {}
        self.role_states = {int(k): dict(v) for k, v in resume.get("roles", {}).items()}
        # The DataLoader always starts with worker 0: rotate roles so worker 0 plays the role whose
        # batch comes next in the interrupted run's round-robin order.
        self.rotation = int(resume.get("batches", 0)) % self.roles_per_rank

    def _role(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.rotation) % self.roles_per_rank

    def worker_shards(self, worker: int, epoch: Optional[int] = None) -> List[str]:
        """The shards DataLoader worker ``worker`` of this rank reads in ``epoch`` (default: its resumed epoch)."""
        role = (worker + self.rotation) % self.roles_per_rank
        epoch = self.role_states.get(role, {}).get("epoch", 0) if epoch is None else epoch
        return self._epoch_shards(epoch, self.rank * self.roles_per_rank + role)[0]

    def _epoch_shards(self, epoch: int, global_role: int) -> tuple:
        """This role's shard list for ``epoch`` and the sample stride filter ``(keep_mod, keep_rem)``."""
        if self.resampled:
            rng = random.Random(_seed(self.seed, "resample", epoch, global_role))
            return [rng.choice(self.shards) for _ in self.shards], None
        order = list(self.shards)
        random.Random(_seed(self.seed, "shards", epoch)).shuffle(order)
        if len(order) >= self.n_roles:
            return order[global_role:: self.n_roles], None
        return order, (self.n_roles, global_role)

    def _raw_samples(self, epoch: int, global_role: int, state: Dict[str, int],
                     replaying: List[bool]) -> Iterator[Dict[str, Any]]:
        """Undecoded samples of one epoch for this role, after the shuffle buffer.

        ``replaying[0]`` is True while the trainer skips samples consumed before a resume."""
        import webdataset as wds

        shards, stride = self._epoch_shards(epoch, global_role)

        def handler(exn: Exception) -> bool:
            if not replaying[0]:  # counted once: the replay after a resume meets the same errors again
                state["read_errors"] += 1
                log.warning("data: skipped unreadable shard data: %s", exn)
            return True

        def urls():
            for shard in shards:
                if not replaying[0] and not tar_is_complete(shard):
                    # tarfile's stream reader ends silently at a cut header: count it here
                    state["truncated_shards"] += 1
                    log.warning("data: shard %s is truncated; using the samples before the cut", shard)
                yield {"url": shard}

        samples = wds.tarfile_to_samples(handler=handler)(urls())
        if stride is not None:
            mod, rem = stride
            samples = (s for i, s in enumerate(samples) if i % mod == rem)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  seed=_seed(self.seed, "buffer", epoch, global_role))(samples)
        return samples

    def _decode(self, sample: Dict[str, Any], state: Dict[str, int], aug_seed: int):
        if not is_complete(sample):
            state["incomplete"] += 1
            return None
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)
                image, caption = decode_sample(sample, self.transform)
        except Exception as exn:  # PIL raises many types for corrupt/truncated files
            state["corrupt"] += 1
            log.warning("data: skipped corrupt sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"),
                        exn)
            return None
        return image, caption

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        role = self._role()
        global_role = self.rank * self.roles_per_rank + role
        state = dict(self.role_states.get(role, _initial_state()))
        images: List[torch.Tensor] = []
        captions: List[str] = []
        while True:
            epoch, skip = state["epoch"], state["offset"]
            good_in_epoch = 0
            replaying = [skip > 0]
            for i, sample in enumerate(self._raw_samples(epoch, global_role, state, replaying)):
                if i < skip:
                    continue  # consumed before the checkpoint: replayed for the shuffle, not decoded
                replaying[0] = False
                state["offset"] = i + 1
                decoded = self._decode(sample, state, _seed(self.seed, "aug", epoch, global_role, i))
                if decoded is None:
                    continue
                good_in_epoch += 1
                images.append(decoded[0])
                captions.append(decoded[1])
                if len(images) == self.batch_size:
                    batch = {"image": torch.stack(images), "text": self.tokenizer(captions), "role": role,
                             "state": dict(state), "shard": sample.get("__url__"),
                             "worker": (role - self.rotation) % self.roles_per_rank}
                    if self.image_tokens is not None:
                        batch["quad"] = self.image_tokens(batch["image"])
                    yield batch
                    images, captions = [], []
            if good_in_epoch == 0 and skip == 0:
                shards = self._epoch_shards(epoch, global_role)[0]
                raise RuntimeError(f"data.train_data: data role {global_role} read a whole epoch of {len(shards)} "
                                   f"shard(s) without one valid sample (counters: {state}; shards: "
                                   f"{', '.join(shards[:8])}{' ...' if len(shards) > 8 else ''})")
            state = {**state, "epoch": epoch + 1, "offset": 0}


class DataTracker:
    """Trainer-side record of data positions and bad-sample counters of consumed batches.

    ``update(batch)`` after each consumed batch; ``state_dict()`` is what a checkpoint stores per rank
    and what :class:`ShardStream` takes as ``resume``.
    """

    def __init__(self, resume: Optional[Dict[str, Any]] = None):
        resume = resume or {}
        self.roles: Dict[int, Dict[str, int]] = {int(k): dict(v) for k, v in resume.get("roles", {}).items()}
        self.batches = int(resume.get("batches", 0))

    def update(self, batch: Dict[str, Any]) -> None:
        self.roles[int(batch["role"])] = dict(batch["state"])
        self.batches += 1

    def counters(self) -> Dict[str, int]:
        """Bad data met so far on this rank, by kind (``read_errors``, ``truncated_shards``, ``corrupt``,
        ``incomplete``)."""
        return {k: sum(s.get(k, 0) for s in self.roles.values()) for k in COUNTERS}

    def epoch(self) -> int:
        """Lowest epoch any role of this rank is in."""
        return min((s["epoch"] for s in self.roles.values()), default=0)

    def state_dict(self) -> Dict[str, Any]:
        return {"roles": {str(k): v for k, v in self.roles.items()}, "batches": self.batches}


def prefetch_factor(data_cfg, micro_batch_size: int, image_size: int, context_length: int) -> int:
    """Batches each DataLoader worker keeps ready, so that all workers of a rank hold at most
    ``data.prefetch_gib`` of decoded batches (uint8 images + int64 tokens): between 1 and 4."""
    batch_bytes = micro_batch_size * (3 * image_size * image_size + 8 * context_length)
    budget = data_cfg.prefetch_gib * GIB
    return max(1, min(4, int(budget // (batch_bytes * max(1, data_cfg.num_workers)))))


def image_tokens(data_cfg, model_name: str) -> Optional[Callable]:
    """The workers' per-batch image tokenization for ``data.tokenizer`` (None for ``grid``)."""
    import models
    from models.mixed_res import QuadtreeSelector, model_quadtree_spec

    if data_cfg.tokenizer == "grid":
        return None
    return QuadtreeSelector(model_quadtree_spec(model_name, data_cfg.quadtree_levels, data_cfg.quadtree_tokens),
                            models.image_mean_std(model_name))


def build_train_loader(data_cfg, model_name: str, layout, seed: int, rank: int, device: torch.device,
                       resume: Optional[Dict[str, Any]] = None) -> Iterable[Dict[str, Any]]:
    """The rank's endless stream of micro batches: :class:`harness.data.synthetic.SyntheticSource` on ``device`` for
    ``train_data: synthetic``, else a DataLoader over :class:`ShardStream` whose workers decode to ``uint8``
    (pinned memory on CUDA, so the copy to the device is asynchronous; persistent workers; prefetch bounded by
    ``data.prefetch_gib``).

    Args:
        data_cfg: :class:`harness.config.job_config.DataConfig`.
        model_name: registered model (sets image size, transform, tokenizer).
        layout: the run's :class:`harness.config.job_config.BatchLayout` (micro batch, accumulation, world size).
        seed: base seed.
        rank: data-parallel rank (from ``torch.distributed``).
        device: the training device.
        resume: :meth:`DataTracker.state_dict` of the checkpoint, or None.
    """
    import models
    from harness.data.synthetic import SyntheticShapes, SyntheticSource

    size, ctx = models.image_size(model_name), models.context_length(model_name)
    micro = layout.micro_batch_size
    if data_cfg.train_data == "synthetic":
        vocab = models.architecture(model_name)["text_cfg"].get("vocab_size", 49408)
        return SyntheticSource(SyntheticShapes(size, ctx, vocab), micro, layout.grad_accum_steps, rank,
                               layout.world_size, seed, device, resume)
    ds = ShardStream(expand_shards(data_cfg.train_data), micro,
                     models.image_transform(model_name, is_train=True, uint8=True), models.get_tokenizer(model_name),
                     Roles(rank, layout.world_size, data_cfg.num_workers),
                     Sampling(seed, data_cfg.resampled, data_cfg.shuffle_buffer), resume,
                     image_tokens(data_cfg, model_name))
    # the loader's own generator: starting its iterator (a draw for the workers' base seed) must not advance the
    # global torch stream, which the model's runtime randomness (dropout, DynamicViT's Gumbel noise) follows and a
    # resume restores from the checkpoint; the data's own randomness is seeded per sample by ShardStream
    kwargs: Dict[str, Any] = {"pin_memory": device.type == "cuda",
                              "generator": torch.Generator().manual_seed(seed * 1_000_003 + rank)}
    if data_cfg.num_workers > 0:
        kwargs.update(num_workers=data_cfg.num_workers, worker_init_fn=worker_init, persistent_workers=True,
                      prefetch_factor=prefetch_factor(data_cfg, micro, size, ctx))
    loader = DataLoader(ds, batch_size=None, **kwargs)
    return NamedWorkerErrors(loader, ds.worker_shards, rank) if data_cfg.num_workers > 0 else loader


def epoch_samples(data_cfg) -> Optional[int]:
    """Samples in one epoch of the training data (``data.train_num_samples`` or counted); None for synthetic
    data without ``train_num_samples``."""
    if data_cfg.train_num_samples is not None:
        return data_cfg.train_num_samples
    if data_cfg.train_data == "synthetic":
        return None
    return count_samples(expand_shards(data_cfg.train_data))
