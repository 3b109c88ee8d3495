"""What this machine can run, checked before any process group exists: attention kernels, precisions and
memory budgets against the device. Config sections check their own values (:mod:`harness.config.job_config`); these
checks need the machine.

Two moments: :func:`check_machine` before a rank has chosen its device (no CUDA context is created), and
:func:`check_device_support` once it has (the attention kernel is tried on the device in the run's dtype).
"""
from __future__ import annotations

import os
import platform
import re
from typing import TYPE_CHECKING, Optional

import torch

from harness.config.job_config import JobConfig
from harness.core.errors import ConfigError
from harness.core.units import GIB

if TYPE_CHECKING:  # pragma: no cover
    from harness.distributed.launch import LaunchInfo


def cpu_label() -> str:
    """``"cpu (x86_64 AVX2, 2 cores)"``: architecture, the vector ISA torch's CPU kernels use
    (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...) and cores. CPU step times compare only between
    CPUs of the same capability: on an AVX2-only CPU bf16 autocast ran 8.5x (a ViT-tiny-8 training step) to 14x (the
    knob benchmark) slower than fp32 (README, fit-probe and knob sections)."""
    return f"cpu ({platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def host_memory_gib() -> float:
    """Physical memory of this machine in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def device_memory_gib(device: torch.device) -> float:
    """Total memory of ``device`` in GiB (a GPU's, or this machine's for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return host_memory_gib()


def autocast_dtype(precision: str):
    """``torch.bfloat16`` / ``torch.float16`` for ``bf16`` / ``fp16``, None for ``fp32``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def configure_device_math(cfg: JobConfig, device: torch.device) -> None:
    """On CUDA: TF32 tensor cores for fp32 matmuls and convolutions per ``train.tf32`` (PyTorch's default leaves
    matmuls in full fp32). Nothing on a CPU, whose fp32 numerics stay as they are."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32


# What CUDA, cuBLAS, cuDNN and NCCL say when device memory runs out (not all raise torch.OutOfMemoryError)
_OOM_PATTERNS = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|"
                           r"cudaErrorMemoryAllocation|Failed to CUDA calloc|ncclSystemError.*alloc", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """True for every form a device running out of memory takes: ``torch.OutOfMemoryError`` (the caching allocator,
    and :class:`harness.distributed.tensor_memory.TensorMemoryTracker`'s CPU budget), and ``RuntimeError``s from CUDA
    ("CUDA error: out of memory"), cuBLAS (``CUBLAS_STATUS_ALLOC_FAILED``), cuDNN (``CUDNN_STATUS_ALLOC_FAILED``) and
    NCCL."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and bool(_OOM_PATTERNS.search(str(error))))


def record_allocations(cfg: JobConfig, device: torch.device) -> bool:
    """Start recording the CUDA caching allocator's history when ``train.oom_snapshot`` asks for it on a GPU (at most
    100,000 events, Python stacks); returns whether it records."""
    if device.type != "cuda" or not cfg.train.oom_snapshot:
        return False
    torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    return True


def dump_oom_snapshot(run_dir, rank: int) -> Optional[str]:
    """Write the recorded allocator history to ``run_dir/oom_snapshot_rank<R>.pickle`` after an out-of-memory error
    (load it at pytorch.org/memory_viz); returns the path, or None when it could not be written."""
    path = f"{run_dir}/oom_snapshot_rank{rank:05d}.pickle"
    try:
        torch.cuda.memory._dump_snapshot(path)
    except Exception:  # noqa: BLE001 - evidence is best effort: the OOM itself is what gets reported
        return None
    return path


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on ``device``: compute capability 8.0 or newer on CUDA (``torch.cuda.is_bf16_supported()`` also
    answers yes where bf16 is only emulated, e.g. V100 and T4), any CPU."""
    if device.type != "cuda":
        return True
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


def apply_memory_budget(cfg: JobConfig, device: torch.device) -> float:
    """On CUDA, after the process group exists: measure the memory this process holds outside PyTorch's caching
    allocator (CUDA context, cuBLAS/NCCL buffers; ``total - free - reserved``, after a first collective so NCCL's
    communicator is built) and, with ``train.memory_budget_gib``, cap the caching allocator at the budget minus
    that overhead, so that a run fits in the budget the way it would fit on a card of that size. Returns the
    overhead in GiB (0 on a CPU)."""
    if device.type != "cuda":
        return 0.0
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(torch.zeros(1, device=device))
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    overhead = max(total - free - torch.cuda.memory_reserved(device), 0) / GIB
    budget = cfg.train.memory_budget_gib
    if budget is not None:
        usable = budget - overhead
        if usable <= 0:
            raise ConfigError(f"train.memory_budget_gib: {budget:g} GiB leaves nothing beside the {overhead:.2f} GiB "
                              "of CUDA context and communication buffers this process already holds")
        torch.cuda.set_per_process_memory_fraction(min(usable * GIB / total, 1.0), device)
    return overhead


def check_machine(cfg: JobConfig) -> None:
    """Check the attention backend and the memory budget against this machine without touching a GPU (no CUDA
    context is created: ranks have not picked their device yet).

    Raises:
        ConfigError: a value this machine cannot run (named, with what it can run instead).
    """
    from models.attention import available_backends, flash_attn_available

    m, t = cfg.model, cfg.train
    cuda = torch.cuda.is_available()
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
    if t.memory_budget_gib is not None and not cuda and t.memory_budget_gib > host_memory_gib():
        raise ConfigError(f"train.memory_budget_gib: {t.memory_budget_gib:g} GiB is more than this machine's "
                          f"{host_memory_gib():.1f} GiB of memory")


def check_device_support(cfg: JobConfig, device: torch.device, launch: "LaunchInfo") -> None:
    """Check what needs the device itself, after it is chosen and before any process group exists:
    bf16 support (e.g. not on V100), fp16 under DeepSpeed on a CPU, the attention kernel (tried on a
    tiny input in the run's compute dtype, :func:`models.attention.check_backend`), and a memory budget
    against the GPU's memory (applied, net of the CUDA context, by :func:`apply_memory_budget`).

    Raises:
        ConfigError: names the field, the reason and what this device can do instead.
    """
    from models.attention import AttentionBackendError, check_backend

    precision = cfg.train.precision
    if precision == "bf16" and not bf16_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)} "
                          f"(compute capability {major}.{minor} < 8.0); use fp16 (dynamic loss scaling) or fp32")
    if precision == "fp16" and device.type == "cpu" and launch.deepspeed:
        raise ConfigError("train.precision: DeepSpeed's fp16 mode needs a GPU (its CPU accelerator has no fp16); "
                          "on a CPU use fp16 without DeepSpeed (plain or FSDP launch: torch.autocast + "
                          "GradScaler), or bf16 / fp32")
    try:
        check_backend(cfg.model.attention, device, autocast_dtype(precision) or torch.float32)
    except AttentionBackendError as e:
        raise ConfigError(str(e)) from None
    budget = cfg.train.memory_budget_gib
    if budget is not None and device.type == "cuda":
        total = device_memory_gib(device)
        if budget > total:
            raise ConfigError(f"train.memory_budget_gib: {budget:g} GiB is more than the "
                              f"{torch.cuda.get_device_name(device)}'s {total:.1f} GiB")
