"""The typed job config: nested dataclasses, one per section, each validating itself.

Every field has a one-line docstring (torchtitan's ``JobConfig`` habit) and a declared type; choices are
``Literal`` types. A section checks its own fields in ``__post_init__`` (so a bad value fails where the
section is built, with a message naming ``section.field`` and the allowed values); checks across sections
and against the filesystem are :func:`harness.config.validate.validate`. Hardware checks (which kernels this
machine runs, memory budgets against the device) live in :mod:`harness.distributed.hardware`; building a config
from presets, flags and ``section.field=value`` overrides, parsed by each field's declared type, in
:mod:`harness.config.overrides`.

Batch arithmetic lives in :func:`harness.config.layout.batch_layout`: ``global_batch = micro_batch *
grad_accum_steps * world_size``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, get_args

from harness.config.checks import check_choice, check_fields
from harness.core.errors import ConfigError
from models.attention import AttentionBackend

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = get_args(Precision)
REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.report_to value -> the package it needs


@dataclass
class ModelConfig:
    SECTION = "model."
    name: str = "ViT-tiny-8"
    """Registered model name (``harness models`` lists them)."""
    attention: AttentionBackend = "sdpa"
    """Attention kernel of both towers: ``sdpa`` (PyTorch picks), ``sdpa_flash``, ``sdpa_efficient``,
    ``sdpa_cudnn`` (SDPA forced to one kernel), ``math`` (unfused reference: "flash off"), ``flash_attn``
    (the flash-attn package; CUDA, bf16/fp16)."""
    grad_checkpointing: int = 0
    """Activation checkpointing: recompute every k-th transformer block of both towers in backward
    (non-reentrant); 0 off, 1 every block."""
    compile: bool = False
    """``torch.compile`` each transformer block (in place, so checkpoints keep their keys)."""
    pretrained: Optional[str] = None
    """Start a fresh run from this open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``, or a folder from
    ``harness export``); DTP-ViT models take a ViT checkpoint of the same width (:mod:`models.pretrained`).
    Not read on resume (the checkpoint has every weight)."""
    distill_teacher: Optional[str] = None
    """DynamicViT models only (``<vit>-dynamicvit-<rho>``): distil from a frozen full-token teacher, the plain
    ``<vit>`` image tower with its weights from this open_clip checkpoint (the files and folders
    ``model.pretrained`` reads), as DynamicViT does (:mod:`models.dynamicvit`; weights ``loss.distill_embed_weight``,
    ``loss.distill_token_weight``). Read on every start, resumes included (the teacher is not checkpointed)."""
    lock_image: bool = False
    """Freeze the image tower (open_clip's ``--lock-image``, LiT)."""
    lock_text: bool = False
    """Freeze the text tower (open_clip's ``--lock-text``)."""

    def __post_init__(self):
        import models

        try:
            models.get_spec(self.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_choice(self, "attention")
        check_fields(self, {"grad_checkpointing": (self.grad_checkpointing >= 0,
                                             "must be >= 0 (0 off, k: every k-th block)")})


@dataclass
class DataConfig:
    SECTION = "data."
    train_data: str = "data/digits/train"
    """Training shards: a folder of img2dataset output, a brace pattern (``shards/{00000..00099}.tar``),
    a glob, a single ``.tar``, several of those joined by ``::``, or ``synthetic`` (random images and
    tokens of the model's exact shapes)."""
    train_num_samples: Optional[int] = None
    """Samples in one epoch of ``train_data``; counted from img2dataset's ``*_stats.json`` or the tars if unset."""
    resampled: bool = False
    """Draw shards with replacement (open_clip's ``--dataset-resampled``) instead of epoch-wise passes."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per data worker (samples); 0 disables sample shuffling."""
    num_workers: int = 1
    """DataLoader worker processes per rank; 0 decodes in the training process."""
    prefetch_gib: float = 1.0
    """Decoded batches (uint8 images + tokens) one rank's DataLoader workers may hold ready, in GiB; sets the
    prefetch factor (1 to 4 batches per worker)."""
    tokenizer: Literal["grid", "quadtree"] = "grid"
    """Image tokens: ``grid`` (the ViT's patches) or ``quadtree`` (mixed-resolution tokens, Ronen et al. 2023: a
    quadtree of patches of ``quadtree_levels`` sizes chosen in the data workers, :mod:`models.mixed_res`)."""
    quadtree_tokens: int = 0
    """``quadtree``: image tokens per image (fixed: static shapes); 0: half the grid's, rounded down to a count the
    quadtree can reach (the coarsest grid + 3 per split)."""
    quadtree_levels: int = 2
    """``quadtree``: patch sizes ``p, 2p, ..., 2^(levels-1) p`` (``p`` the model's patch size)."""
    val_data: Optional[str] = None
    """Validation shards in the training layout (folder, brace pattern, glob, ``.tar``, ``::``-joined): contrastive
    validation loss and image/text retrieval recall@1/5/10 (open_clip's ``evaluate``) at the end and every
    ``eval.val_every_steps``; ``null``: none."""

    def __post_init__(self):
        check_fields(self, {
            "train_num_samples": (self.train_num_samples is None or self.train_num_samples >= 1,
                                  "must be a positive integer"),
            "shuffle_buffer": (self.shuffle_buffer >= 0, "must be >= 0"),
            "num_workers": (self.num_workers >= 0, "must be >= 0"),
            "prefetch_gib": (self.prefetch_gib > 0, "must be > 0"),
            "quadtree_tokens": (self.quadtree_tokens >= 0, "must be >= 0 (0: half the grid)"),
            "quadtree_levels": (self.quadtree_levels >= 1, "must be >= 1"),
        })
        check_choice(self, "tokenizer")


@dataclass
class TrainConfig:
    SECTION = "train."
    micro_batch_size: int = 32
    """Per-GPU (per-rank) batch of one forward/backward pass; the contrastive loss sees this many
    local samples per step (``micro_batch_size * world_size`` in total)."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; default ``micro_batch_size * world_size`` (no
    gradient accumulation). Must be a multiple of ``micro_batch_size * world_size``."""
    accum_negatives: Optional[bool] = None
    """With gradient accumulation (``K > 1`` micro batches per step): contrast every sample with all ``K x micro x
    world`` samples of the optimizer step (features cached without grad, each micro batch recomputed with its RNG
    replayed: GradCache, :mod:`harness.train.accumulate`) rather than with its own micro batch's ``micro x world``
    (false, the plain accumulation). Default (empty): on when ``K > 1``."""
    train_samples: Optional[int] = None
    """Training length in samples; sets the LR schedule. Exactly one of this and ``epochs``."""
    epochs: Optional[float] = None
    """Training length in epochs of ``data.train_data`` (converted to samples)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps without changing the schedule (a run stopped here and
    resumed behaves exactly like one killed at that step)."""
    precision: Precision = "fp32"
    """Numeric precision: ``fp32``, ``bf16`` or ``fp16`` (dynamic loss scaling); mapped onto DeepSpeed's
    bf16/fp16 modes, FSDP2's mixed-precision policy or ``torch.autocast``. CLIP's ``logit_scale`` and the
    loss stay fp32."""
    loss_scale_init: float = 65536.0
    """fp16: initial dynamic loss scale (a power of 2; DeepSpeed's ``initial_scale_power`` = log2 of it)."""
    loss_scale_window: int = 1000
    """fp16: overflow-free optimizer steps before the loss scale doubles (``GradScaler`` growth interval,
    DeepSpeed ``loss_scale_window``); an overflowing step is skipped and halves the scale."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    log_every_steps: int = 10
    """Write a metrics line (loss, LR, timing, DTP boundary stats: means over the steps since the last line) every
    this many steps, and at the first step, the end of the timing warm-up and the last step. Only log steps read
    device values on the host (one small all-reduce); the steps between let the CPU run ahead of the GPU."""
    max_nonfinite_steps: int = 10
    """Stop the run (exit status 4, ``harness.core.errors.ExitCode.NONFINITE``) after this many optimizer steps in a row
    were skipped for a non-finite loss or gradient norm (:mod:`harness.engines.nonfinite`; every such step is skipped on
    every rank and counted as ``nonfinite_steps``); checked at log steps and saves. 0: skip and count, never stop."""
    timing_warmup_steps: int = 5
    """Steps excluded from ``avg_step_time_s`` and ``samples_per_s`` as warm-up."""
    progress_bar: bool = True
    """Show progress on rank 0: a tqdm bar when stderr is a terminal, else one log line per log step (Slurm logs)."""
    tf32: bool = True
    """CUDA: let fp32 matmuls and convolutions use TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``); no effect on a CPU."""
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 with bf16/fp16: the dtype gradients are reduce-scattered in (``MixedPrecisionPolicy.reduce_dtype``);
    bf16 halves the traffic, fp32 keeps the sum exact to fp32."""
    count_host_syncs: bool = False
    """Count host reads of device values (``.item()`` and the like: host-device synchronisations on a GPU) in
    each optimizer step and its log (data loading excluded), written as ``host_syncs_by_step`` in
    ``summary.json``; only log steps should have any. A debugging aid: it slows every op a little."""
    report_to: List[str] = field(default_factory=list)
    """Also send the logged scalars to: ``tensorboard`` (event files in ``<run_dir>/tensorboard``), ``wandb``
    (Weights & Biases, when installed); comma-separated, empty for none (``metrics.jsonl`` is always written)."""
    wandb_project: str = "clip-scaling-harness"
    """Weights & Biases project of the run (with ``train.report_to=wandb``); the run is named ``run_name``."""
    track_memory: bool = False
    """CPU: count live tensor bytes (:mod:`harness.distributed.tensor_memory`) so ``peak_mem_gib`` is the tensor peak,
    the CPU analogue of ``torch.cuda.max_memory_allocated``, rather than process RSS. On by itself with a budget."""
    memory_budget_gib: Optional[float] = None
    """Per-process memory ceiling in GiB, failing like a GPU out-of-memory: on a CPU, live tensor bytes past
    it raise ``torch.OutOfMemoryError``; on a GPU, ``torch.cuda.set_per_process_memory_fraction`` caps the
    caching allocator (emulating a smaller card). Must not exceed the device's memory."""
    emulate_world_size: Optional[int] = None
    """Run one process as rank 0 of a world of this size on PyTorch's fake process group: shards, buckets and
    the contrastive logits have their real sizes, collectives return tensors of the right shape with
    meaningless values. Measures one rank's memory for a GPU count that is not present (fit probe); the
    losses it logs mean nothing."""
    hang_timeout_s: float = 1800.0
    """Hang watchdog: no optimizer step (or periodic evaluation / checkpoint) completed in this many seconds -> every
    thread's stack dumped to ``<run_dir>/hang_rank_XXXXX.txt`` and exit status 124
    (:mod:`harness.components.resilience`); 0 turns it off."""
    dist_timeout_s: float = 1800.0
    """Timeout of the process group's collectives (``init_process_group(timeout=...)``), seconds."""
    preempt_grace_s: float = 25.0
    """After SIGTERM/SIGUSR1 every rank checkpoints at the next log step and exits with status 75; if that has not
    happened this many seconds after the signal (Slurm kills 30 s after SIGTERM by default), exit at once, leaving
    the newest complete checkpoint as it is. 0: no limit."""
    profile_step: Optional[int] = None
    """Record a PyTorch profiler trace of this step (``trace_step<N>_rank<R>.json`` in the run directory)
    and, on CUDA, a memory snapshot (``memory_snapshot_step<N>_rank<R>.pickle``, for pytorch.org/memory_viz)."""
    oom_snapshot: bool = False
    """CUDA: record the allocator's history (as torchtitan's ``enable_memory_snapshot``); an out-of-memory error writes
    ``oom_snapshot_rank<R>.pickle`` (pytorch.org/memory_viz), named in the error. Costs host time: fit probes only."""

    def __post_init__(self):
        check_choice(self, "precision")
        check_choice(self, "fsdp_reduce_dtype")
        positive = "must be a positive integer"
        check_fields(self, {
            "micro_batch_size": (self.micro_batch_size >= 1, positive),
            "global_batch_size": (self.global_batch_size is None or self.global_batch_size >= 1, positive),
            "train_samples": (self.train_samples is None or self.train_samples >= 1, positive),
            "epochs": (self.epochs is None or self.epochs > 0, "must be > 0"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, positive),
            "loss_scale_init": (self.loss_scale_init >= 1 and math.log2(self.loss_scale_init).is_integer(),
                                "must be a power of 2 >= 1"),
            "loss_scale_window": (self.loss_scale_window >= 1, "must be >= 1"),
            "log_every_steps": (self.log_every_steps >= 1, "must be >= 1"),
            "timing_warmup_steps": (self.timing_warmup_steps >= 0, "must be >= 0"),
            "max_nonfinite_steps": (self.max_nonfinite_steps >= 0, "must be >= 0"),
            "memory_budget_gib": (self.memory_budget_gib is None or self.memory_budget_gib > 0, "must be > 0"),
            "emulate_world_size": (self.emulate_world_size is None or self.emulate_world_size >= 1, positive),
            "profile_step": (self.profile_step is None or self.profile_step >= 1, positive),
            "hang_timeout_s": (self.hang_timeout_s >= 0, "must be >= 0 (0: no watchdog)"),
            "dist_timeout_s": (self.dist_timeout_s > 0, "must be > 0"),
            "preempt_grace_s": (self.preempt_grace_s >= 0, "must be >= 0 (0: no limit)"),
            "report_to": (set(self.report_to) <= set(REPORT_TO) and len(set(self.report_to)) == len(self.report_to),
                          f"each of {', '.join(REPORT_TO)} at most once"),
        })


@dataclass
class OptimConfig:
    SECTION = "optim."
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.2
    """AdamW weight decay; biases, norm gains and ``logit_scale`` get none (as in open_clip)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_samples: int = 0
    """Linear LR warm-up length in samples."""
    min_lr_ratio: float = 0.0
    """Final LR of the cosine decay as a fraction of ``lr``."""
    grad_clip_norm: Optional[float] = 1.0
    """Clip the global gradient L2 norm to this; ``null`` disables clipping."""
    fused: bool = True
    """Fused AdamW (``torch.optim.AdamW(fused=True)``, CUDA and CPU): one kernel per step instead of a loop of
    small ones, and no host read of the step count (the for-loop and foreach implementations call ``.item()``
    on every parameter's step counter) nor of the fp16 overflow flag."""

    def __post_init__(self):
        check_fields(self, {
            "lr": (self.lr > 0, "must be > 0"),
            "warmup_samples": (self.warmup_samples >= 0, "must be >= 0"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            "grad_clip_norm": (self.grad_clip_norm is None or self.grad_clip_norm > 0, "must be > 0 or null"),
        })


@dataclass
class LossConfig:
    SECTION = "loss."
    kind: Literal["clip", "siglip"] = "clip"
    """Contrastive loss: ``clip`` (softmax cross-entropy, local loss + gather-with-grad) or ``siglip`` (sigmoid
    loss, Zhai et al. 2023; the model gets a learnable ``logit_bias``, init -10, and ``logit_scale`` init ln 10)."""
    impl: Literal["dense", "tiled"] = "dense"
    """``dense``: open_clip's ``ClipLoss`` / ``SigLipLoss`` (``[B, W B]`` fp32 logits per rank); ``tiled``: the same
    loss and gradients holding ``[B, loss.tile_size]`` logits at a time, recomputed in backward
    (:mod:`harness.train.losses`)."""
    tile_size: int = 1024
    """``tiled``: columns (gathered samples) per tile of the logits."""
    decatt_weight: float = 0.0
    """DeCAtt (:mod:`models.decatt`): weight of the image tower's head-decorrelation loss (``decatt_loss``); 0 off."""
    distill_embed_weight: float = 0.5
    """With ``model.distill_teacher``: weight of the image-embedding distillation term (``distill_embed_loss``,
    ``2 - 2 cos`` to the teacher's embedding; DynamicViT's class-token term, reference 0.5)."""
    distill_token_weight: float = 0.5
    """With ``model.distill_teacher``: weight of the token distillation term (``distill_token_loss``, MSE to the
    teacher's patch tokens over the kept ones; DynamicViT's ``distill_weight``, reference 0.5)."""

    def __post_init__(self):
        check_choice(self, "kind")
        check_choice(self, "impl")
        weight = lambda w: (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w), "must be a finite number >= 0")
        check_fields(self, {"tile_size": (self.tile_size >= 1, "must be a positive integer (columns per tile)"),
                            "distill_embed_weight": weight(self.distill_embed_weight),
                            "distill_token_weight": weight(self.distill_token_weight)})


@dataclass
class CheckpointConfig:
    SECTION = "checkpoint."
    every_steps: int = 100
    """Save a checkpoint every this many optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: Optional[str] = None
    """``latest`` (the newest complete checkpoint of this run; starts fresh if there is none) or a
    checkpoint directory."""
    save_final: bool = True
    """Save a checkpoint when training ends."""
    stop_file: Optional[str] = None
    """When this file exists (checked at each log step, agreed by all ranks), save a checkpoint and stop
    without evaluating; the Slurm template creates it before the time limit and requeues the job."""

    def __post_init__(self):
        check_fields(self, {"every_steps": (self.every_steps >= 0, "must be >= 0"),
                      "keep_last": (self.keep_last >= 1, "must be >= 1")})


@dataclass
class EvalConfig:
    SECTION = "eval."
    zeroshot_data: Optional[str] = "data/digits/val"
    """Labelled ImageFolder-style directory for zero-shot top-1/top-5 (``null``: no eval). Optional
    ``classnames.txt`` / ``templates.txt`` inside it; ImageNet synset folders get open_clip's ImageNet
    class names and templates."""
    every_steps: int = 0
    """Also evaluate every this many steps (0: only at the end)."""
    batch_size: int = 256
    """Images per rank per eval forward pass; also the batch of the validation loss (in-batch negatives)."""
    val_every_steps: int = 0
    """Also compute the validation metrics (``data.val_data``) every this many steps (0: only at the end)."""

    def __post_init__(self):
        check_fields(self, {"every_steps": (self.every_steps >= 0, "must be >= 0"),
                      "batch_size": (self.batch_size >= 1, "must be >= 1"),
                      "val_every_steps": (self.val_every_steps >= 0, "must be >= 0")})


@dataclass
class JobConfig:
    run_name: Optional[str] = None
    """Run directory name under ``output_dir``; default: the model name."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model selection."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, length, precision, logging."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive loss."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Zero-shot evaluation."""

    @property
    def run_dir(self) -> Path:
        """``output_dir / run_name``."""
        return Path(self.output_dir) / (self.run_name or self.model.name)


def to_dict(cfg: JobConfig) -> dict:
    """Plain nested dict of ``cfg`` (what is saved to ``config.yaml``)."""
    return dataclasses.asdict(cfg)
