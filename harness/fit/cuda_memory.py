"""What a CUDA device holds beyond the memory model's tensors (:mod:`harness.fit.memory_model`), by GPU and
world size, each term with its source. These are the defaults of an uncalibrated plan; a fit store that probed the
same GPU replaces the context + NCCL term and the allocator slack with what its probes measured
(:func:`calibrated_terms`).

Inside PyTorch's caching allocator (counted by ``torch.cuda.max_memory_allocated``):

* **cuBLAS workspace**: ATen gives each (handle, stream) an explicit workspace, ``:4096:2:16:8`` (8 MiB + 128 KiB)
  before Hopper and 32 MiB on Hopper and Blackwell (``aten/src/ATen/cuda/CublasHandlePool.cpp``); cuBLASLt 1 MiB
  (``CUBLASLT_WORKSPACE_SIZE``); one compute stream.
* **attention kernels**: the flash / memory-efficient / cuDNN kernels save the output and an fp32 ``[B, heads, s]``
  log-sum-exp for backward (``aten::_scaled_dot_product_flash_attention_backward`` takes ``out`` and
  ``logsumexp``), ``math`` the ``[B, heads, s, s]`` probabilities. The activation profile measures the CPU's SDPA
  kernel, which saves the same (output and log-sum-exp), so it maps one to one; ``math`` is measured as math.
* **autocast weight copies** and **the optimizer step** are terms of the memory model itself
  (:func:`harness.fit.memory_model.autocast_weight_bytes`; fused AdamW updates in place).

Outside it (what ``nvidia-smi`` adds):

* **CUDA context**: about 274 MiB with lazy module loading (PyTorch PR #86509: 287,047,680 bytes with
  ``CUDA_MODULE_LOADING=LAZY``, 666,632,192 without; PyTorch sets LAZY since 1.13 / CUDA 11.7; "around 400MB"
  said in pytorch#109888). Kernels loaded later (cuDNN, flash attention, NCCL, DeepSpeed's) add to it: 0.4 GiB here
  before Hopper, 0.5 GiB from Hopper on (larger kernel images).
* **NCCL**: per communicator, buffers of ``NCCL_BUFFSIZE`` (4 MiB) per channel, connection and protocol; measured
  544 MB for a 2-rank and 688 MB for a larger process group on 4 x A100 (NVIDIA/nccl#964); ring keeps two
  connections whatever the scale, and beyond 2 nodes it no longer grows (nccl#986). Here: none on one rank,
  0.5 GiB for 2 ranks, 0.65 GiB beyond, once per communicator (DeepSpeed opens a second one for its data-parallel
  group).
* **allocator slack**: reserved but unallocated memory; segments are rounded to 2 MiB and small tensors packed in
  2 MiB / 20 MiB segments (``kRoundLarge``, ``kSmallBuffer``, ``kLargeBuffer`` in ``CUDACachingAllocator.cpp``);
  the gap seen in OOM reports of steady training is 0.2-1.5 GiB, so the default is the larger of 5% of the peak and
  0.5 GiB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from harness.core.units import GIB
from harness.distributed.gpu_catalog import GPU

MIB = 2.0 ** 20
ALLOCATOR_SLACK = 0.05
"""Default reserved/allocated - 1 (see the module docstring); a measured probe replaces it."""
MIN_SLACK_GIB = 0.5


@dataclass(frozen=True)
class CudaTerms:
    """Bytes a rank holds beyond the memory model's tensors.

    Attributes:
        cublas_workspace: inside the allocator.
        context: CUDA context and loaded kernels (outside).
        nccl: NCCL communicators' buffers (outside).
        slack: allocator slack as a fraction of the allocated peak; ``min_slack`` its floor in bytes.
        source: ``"defaults"`` or the fit store the context/NCCL and slack terms were measured in.
    """

    cublas_workspace: float
    context: float
    nccl: float
    slack: float
    min_slack: float
    source: str = "defaults"

    def slack_bytes(self, allocated: float) -> float:
        """Reserved-but-unallocated bytes at an allocated peak of ``allocated`` bytes."""
        return max(self.slack * allocated, self.min_slack)

    def device_bytes(self, allocated: float) -> float:
        """What ``nvidia-smi`` shows at an allocated peak (memory-model tensors plus the cuBLAS workspace)."""
        return allocated + self.slack_bytes(allocated) + self.context + self.nccl

    def usable_bytes(self, limit_bytes: float) -> float:
        """The largest memory-model peak (tensors, without the cuBLAS workspace) whose :meth:`device_bytes`, the
        workspace added, stays within ``limit_bytes``."""
        room = limit_bytes - self.context - self.nccl
        return min(room / (1 + self.slack), room - self.min_slack) - self.cublas_workspace


UNKNOWN_GPU = CudaTerms(0.0, 1.0 * GIB, 0.0, ALLOCATOR_SLACK, 0.0, source="defaults of a GPU the catalog lacks")
"""A GPU not in the catalog, before any probe: 1 GiB of context and NCCL, 5% allocator slack."""


def default_terms(gpu: GPU, world: int, stage: str) -> CudaTerms:
    """The published defaults of the module docstring for ``gpu`` at ``world`` ranks under ``stage``."""
    cublas = (32 if gpu.generation >= 9 else 8.125) * MIB + 1 * MIB
    context = (0.5 if gpu.generation >= 9 else 0.4) * GIB
    communicators = 0 if world == 1 else (2 if stage not in ("ddp",) and not stage.startswith("fsdp") else 1)
    nccl = communicators * (0.5 if world == 2 else 0.65) * GIB
    return CudaTerms(cublas, context, nccl, ALLOCATOR_SLACK, MIN_SLACK_GIB * GIB)


def calibrated_terms(terms: CudaTerms, probes: List[Dict[str, Any]], store: str) -> CudaTerms:
    """``terms`` with the context + NCCL bytes and the allocator slack measured by the largest fitting probe of the
    same GPU (``cuda_overhead_gib``: device memory in use beyond what PyTorch reserved; ``reserved_gib /
    peak_gib``); ``terms`` unchanged when no probe measured them. The cuBLAS workspace is then 0: a measured peak
    (``max_memory_allocated``) holds it, and the memory model calibrated on such peaks already counts it."""
    measured = [p for p in probes if p.get("outcome") == "fits" and p.get("peak_gib") and p.get("reserved_gib")
                and p.get("cuda_overhead_gib") is not None]
    if not measured:
        return terms
    best = max(measured, key=lambda p: p["peak_gib"])
    return CudaTerms(0.0, best["cuda_overhead_gib"] * GIB, 0.0,
                     best["reserved_gib"] / best["peak_gib"] - 1.0, 0.0, source=store)


def breakdown_gib(terms: Optional[CudaTerms], allocated: float) -> Dict[str, float]:
    """The CUDA rows of a plan's breakdown in GiB (all zero on a CPU, ``terms`` None)."""
    if terms is None:
        return {"cuda_context_nccl": 0.0, "allocator_slack": 0.0}
    return {"cuda_context_nccl": (terms.context + terms.nccl) / GIB,
            "allocator_slack": terms.slack_bytes(allocated) / GIB}
