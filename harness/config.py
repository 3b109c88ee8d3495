"""The typed job config: nested dataclasses, loaded from a YAML preset, overridden from the command line.

Every field has a one-line docstring (torchtitan's ``JobConfig`` habit). The config is validated by
:func:`validate` before any process group is created, so bad input fails with a message that names
the field (``section.field``) and the allowed values, and nothing already on disk is touched.

Batch arithmetic lives in one place, :func:`batch_layout`:
``global_batch = micro_batch * grad_accum_steps * world_size``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

GIB = 2.0 ** 30  # bytes per GiB

PRECISIONS = ("fp32", "bf16", "fp16")
PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.field``)."""


@dataclass
class ModelConfig:
    name: str = "ViT-tiny-8"
    """Registered model name (``harness models`` lists them)."""
    attention: str = "sdpa"
    """Attention kernel of both towers: ``sdpa`` (PyTorch picks), ``sdpa_flash``, ``sdpa_efficient``,
    ``sdpa_cudnn`` (SDPA forced to one kernel), ``math`` (unfused reference: "flash off"), ``flash_attn``
    (the flash-attn package; CUDA, bf16/fp16)."""
    grad_checkpointing: int = 0
    """Activation checkpointing: recompute every k-th transformer block of both towers in backward
    (non-reentrant); 0 off, 1 every block."""
    compile: bool = False
    """``torch.compile`` each transformer block (in place, so checkpoints keep their keys)."""


@dataclass
class DataConfig:
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


@dataclass
class TrainConfig:
    micro_batch_size: int = 32
    """Per-GPU (per-rank) batch of one forward/backward pass; the contrastive loss sees this many
    local samples per step (``micro_batch_size * world_size`` in total)."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; default ``micro_batch_size * world_size`` (no
    gradient accumulation). Must be a multiple of ``micro_batch_size * world_size``."""
    train_samples: Optional[int] = None
    """Training length in samples; sets the LR schedule. Exactly one of this and ``epochs``."""
    epochs: Optional[float] = None
    """Training length in epochs of ``data.train_data`` (converted to samples)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps without changing the schedule (a run stopped here and
    resumed behaves exactly like one killed at that step)."""
    precision: str = "fp32"
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
    log_every_steps: int = 1
    """Write a metrics line (loss, LR, timing, DTP boundary stats; one small all-reduce) every this many steps."""
    timing_warmup_steps: int = 5
    """Steps excluded from ``avg_step_time_s`` and ``samples_per_s`` as warm-up."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    track_memory: bool = False
    """CPU: count live tensor bytes (:mod:`harness.memory`) so ``peak_mem_gib`` is the tensor peak, the CPU
    analogue of ``torch.cuda.max_memory_allocated``, rather than process RSS. On by itself with a budget."""
    memory_budget_gib: Optional[float] = None
    """Per-process memory ceiling in GiB, failing like a GPU out-of-memory: on a CPU, live tensor bytes past
    it raise ``torch.OutOfMemoryError``; on a GPU, ``torch.cuda.set_per_process_memory_fraction`` caps the
    caching allocator (emulating a smaller card). Must not exceed the device's memory."""
    emulate_world_size: Optional[int] = None
    """Run one process as rank 0 of a world of this size on PyTorch's fake process group: shards, buckets and
    the contrastive logits have their real sizes, collectives return tensors of the right shape with
    meaningless values. Measures one rank's memory for a GPU count that is not present (fit probe); the
    losses it logs mean nothing."""
    profile_step: Optional[int] = None
    """Record a PyTorch profiler trace of this step (``trace_step<N>_rank<R>.json`` in the run directory)
    and, on CUDA, a memory snapshot (``memory_snapshot_step<N>_rank<R>.pickle``, for pytorch.org/memory_viz)."""


@dataclass
class OptimConfig:
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


@dataclass
class CheckpointConfig:
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


@dataclass
class EvalConfig:
    zeroshot_data: Optional[str] = "data/digits/val"
    """Labelled ImageFolder-style directory for zero-shot top-1/top-5 (``null``: no eval). Optional
    ``classnames.txt`` / ``templates.txt`` inside it; ImageNet synset folders get open_clip's ImageNet
    class names and templates."""
    every_steps: int = 0
    """Also evaluate every this many steps (0: only at the end)."""
    batch_size: int = 256
    """Images per rank per eval forward pass."""


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Zero-shot evaluation."""

    @property
    def run_dir(self) -> Path:
        """``output_dir / run_name``."""
        return Path(self.output_dir) / (self.run_name or self.model.name)


# --------------------------------------------------------------------------- dict <-> dataclass

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp`` (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(obj, data: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{path}: no such config key; valid keys here: {', '.join(names)}")
        tp = types[key]
        if _is_dataclass_type(tp):
            _apply(getattr(obj, key), value, path + ".")
        else:
            setattr(obj, key, _coerce(path, value, tp))


def to_dict(cfg: JobConfig) -> Dict[str, Any]:
    """Plain nested dict of ``cfg`` (what is saved to ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def from_dict(data: Dict[str, Any]) -> JobConfig:
    """Build a :class:`JobConfig` from defaults updated by ``data``.

    Raises:
        ConfigError: unknown key or wrongly typed value (message names ``section.field``).
    """
    cfg = JobConfig()
    _apply(cfg, data or {})
    return cfg


def load_preset(name_or_path: str) -> Dict[str, Any]:
    """Read a YAML preset: a path, or the name of a file in ``harness/presets`` (``.yaml`` optional).

    Raises:
        ConfigError: the preset does not exist or is not a mapping.
    """
    path = Path(name_or_path)
    if not path.exists():
        candidate = PRESET_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
        if not candidate.exists():
            presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"config: preset {name_or_path!r} not found (a YAML path, or one of: {', '.join(presets)})")
        path = candidate
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: preset {path} must be a YAML mapping")
    return data


def parse_override(text: str) -> Dict[str, Any]:
    """``"train.micro_batch_size=64"`` -> ``{"train": {"micro_batch_size": 64}}`` (value parsed as YAML).

    Raises:
        ConfigError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    return nested(key.strip(), yaml.safe_load(raw) if raw != "" else None)


def nested(dotted_key: str, value: Any) -> Dict[str, Any]:
    """``("train.seed", 3)`` -> ``{"train": {"seed": 3}}``."""
    out: Dict[str, Any] = {}
    node = out
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge (``update`` wins); returns a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class BatchLayout:
    """Batch arithmetic for one run.

    Attributes:
        micro_batch_size: samples per rank per forward/backward.
        grad_accum_steps: micro batches per optimizer step on each rank.
        world_size: data-parallel ranks.
        global_batch_size: samples per optimizer step, ``micro * accum * world``.
        contrastive_batch_size: samples one contrastive loss sees (``micro * world``); gradient
            accumulation does not add negatives.
    """

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int

    @property
    def contrastive_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Derive gradient accumulation from micro batch, global batch and world size.

    Raises:
        ConfigError: the global batch is not a positive multiple of ``micro_batch_size * world_size``.
    """
    micro = train.micro_batch_size
    if micro < 1:
        raise ConfigError(f"train.micro_batch_size: must be a positive integer, got {micro}")
    per_step = micro * world_size
    glob = train.global_batch_size if train.global_batch_size is not None else per_step
    if glob < 1 or glob % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size: {glob} is not a multiple of train.micro_batch_size ({micro}) x "
            f"world size ({world_size}) = {per_step}; allowed: {per_step}, {2 * per_step}, {3 * per_step}, ...")
    return BatchLayout(micro, glob // per_step, world_size, glob)


def launch_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE`` from torchrun / accelerate launch), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: JobConfig, world_size: Optional[int] = None, check_paths: bool = True) -> BatchLayout:
    """Check every field that can be checked before a process group exists.

    Args:
        cfg: the job config.
        world_size: data-parallel ranks; default from the launcher's ``WORLD_SIZE``.
        check_paths: also check that data paths exist (shards, eval folder).

    Returns:
        The run's :class:`BatchLayout`.

    Raises:
        ConfigError: the first invalid field, named.
    """
    import models  # local: keep config importable without torch for tooling

    if cfg.train.emulate_world_size is not None and cfg.train.emulate_world_size < 1:
        raise ConfigError(f"train.emulate_world_size: must be a positive integer, got {cfg.train.emulate_world_size}")
    world_size = world_size or cfg.train.emulate_world_size or launch_world_size()
    try:
        models.get_spec(cfg.model.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, o, c, d, e = cfg.train, cfg.optim, cfg.checkpoint, cfg.data, cfg.eval
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    check_model_knobs(cfg)
    if not (t.loss_scale_init >= 1 and math.log2(t.loss_scale_init).is_integer()):
        raise ConfigError(f"train.loss_scale_init: must be a power of 2 >= 1, got {t.loss_scale_init}")
    if t.memory_budget_gib is not None:
        total = host_memory_gib()
        if not t.memory_budget_gib > 0:
            raise ConfigError(f"train.memory_budget_gib: must be > 0, got {t.memory_budget_gib}")
        if not _cuda_available() and t.memory_budget_gib > total:
            raise ConfigError(f"train.memory_budget_gib: {t.memory_budget_gib:g} GiB is more than this machine's "
                              f"{total:.1f} GiB of memory")
    if t.loss_scale_window < 1:
        raise ConfigError(f"train.loss_scale_window: must be >= 1, got {t.loss_scale_window}")
    layout = batch_layout(t, world_size)
    if (t.train_samples is None) == (t.epochs is None):
        raise ConfigError("train.train_samples / train.epochs: set exactly one of them")
    if t.train_samples is not None and t.train_samples < layout.global_batch_size:
        raise ConfigError(f"train.train_samples: {t.train_samples} is less than one global batch "
                          f"({layout.global_batch_size})")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs: must be > 0, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps: must be a positive integer, got {t.max_steps}")
    for name, val in [("train.log_every_steps", t.log_every_steps), ("eval.batch_size", e.batch_size),
                      ("checkpoint.keep_last", c.keep_last)]:
        if val < 1:
            raise ConfigError(f"{name}: must be >= 1, got {val}")
    for name, val in [("train.timing_warmup_steps", t.timing_warmup_steps), ("data.num_workers", d.num_workers),
                      ("data.shuffle_buffer", d.shuffle_buffer), ("checkpoint.every_steps", c.every_steps),
                      ("eval.every_steps", e.every_steps), ("optim.warmup_samples", o.warmup_samples)]:
        if val < 0:
            raise ConfigError(f"{name}: must be >= 0, got {val}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if o.grad_clip_norm is not None and o.grad_clip_norm <= 0:
        raise ConfigError(f"optim.grad_clip_norm: must be > 0 or null, got {o.grad_clip_norm}")
    if d.train_num_samples is not None and d.train_num_samples < 1:
        raise ConfigError(f"data.train_num_samples: must be a positive integer, got {d.train_num_samples}")
    if c.resume is not None and c.resume != "latest" and check_paths and not Path(c.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: {c.resume!r} is neither 'latest' nor an existing checkpoint directory")
    if check_paths:
        from harness import data as data_mod
        if d.train_data != "synthetic":
            data_mod.expand_shards(d.train_data)  # raises ConfigError naming data.train_data
        elif t.epochs is not None and d.train_num_samples is None:
            raise ConfigError("train.epochs: synthetic data has no epoch; set train.train_samples or data.train_num_samples")
        if e.zeroshot_data is not None and not Path(e.zeroshot_data).is_dir():
            raise ConfigError(f"eval.zeroshot_data: {e.zeroshot_data!r} is not a directory (ImageFolder layout: one "
                              "sub-folder of images per class); set it to null to skip zero-shot eval")
    return layout


def host_memory_gib() -> float:
    """Physical memory of this machine in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_knobs(cfg: JobConfig) -> None:
    """Check attention backend, checkpointing and precision against this machine without touching a GPU
    (no CUDA context is created: ranks have not picked their device yet). The kernels themselves are
    tried once the device is set (:func:`models.attention.check_backend`).

    Raises:
        ConfigError: unknown value, or one this machine cannot run (named, with what it can).
    """
    import torch

    from models.attention import AttentionBackendError, available_backends, check_backend_name, flash_attn_available

    m, t = cfg.model, cfg.train
    try:
        check_backend_name(m.attention)
    except AttentionBackendError as e:
        raise ConfigError(str(e)) from None
    cuda = _cuda_available()
    if not cuda and m.attention in ("sdpa_efficient", "sdpa_cudnn", "flash_attn"):
        cpu = available_backends(torch.device("cpu"), torch.float32)  # tried on tiny CPU tensors
        raise ConfigError(f"model.attention: {m.attention!r} needs a CUDA GPU; available on this CPU machine: "
                          f"{', '.join(cpu)}")
    if m.attention == "flash_attn":
        if not flash_attn_available():
            raise ConfigError("model.attention: 'flash_attn' needs the flash-attn package (pip install "
                              "'.[flash]' on a CUDA machine); available without it: sdpa, sdpa_flash, "
                              "sdpa_efficient, sdpa_cudnn, math")
        if t.precision == "fp32":
            raise ConfigError("model.attention: 'flash_attn' runs in bf16/fp16 only; set train.precision to bf16 "
                              "or fp16, or use sdpa / math with fp32")
    if m.grad_checkpointing < 0:
        raise ConfigError(f"model.grad_checkpointing: must be >= 0 (0 off, k: every k-th block), got "
                          f"{m.grad_checkpointing}")


def describe(cls=JobConfig, prefix: str = "") -> List[str]:
    """``section.field (type, default): docstring`` lines for every field (used by ``--help-config``)."""
    import ast
    import inspect
    import textwrap

    docs: Dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    lines = []
    types = _field_types(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if _is_dataclass_type(tp):
            lines.extend(describe(tp, prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} = {getattr(inst, f.name)!r}: {docs.get(f.name, '')}")
    return lines
