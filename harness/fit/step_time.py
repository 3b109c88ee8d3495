"""Step time, throughput and MFU of a training cell on a catalog GPU, predicted without the GPU.

A step of micro batch ``b`` on one of ``N`` ranks takes

    compute + exposed communication + optimizer step

* **compute** = hardware FLOPs / (dense peak x achievable efficiency). Hardware FLOPs per sample are 3 x the
  forward FLOPs of both towers (forward, and backward at twice the forward: Kaplan et al. 2020, arXiv 2001.08361),
  plus one more forward of every checkpointed block (recompute). Forward FLOPs = 2 x the towers' GMACs counted by
  fvcore with attention (:mod:`harness.tools.flops`). The efficiency (:data:`EFFICIENCY`) is what large bf16/fp16
  transformer training reaches on a dense peak: Megatron-LM's GPT runs on A100 reached 138-163 TFLOP/s of 312, 44-52%
  (Narayanan et al. 2021, arXiv 2104.04473, table 1); 0.45 is used, and fp32 (TF32) takes the same fraction of its
  own peak. A profile measured on that GPU (``harness profile``) replaces it (``--efficiency``).
* **communication** per stage, ring costs as NCCL's performance notes give them (``doc/PERFORMANCE.md`` of
  nccl-tests): an all-reduce moves ``2 (N-1)/N`` of its bytes over each rank's bus bandwidth, a reduce-scatter or an
  all-gather ``(N-1)/N``. DDP all-reduces the fp32 gradients; ZeRO-1/2 reduce-scatter the gradients (in the
  compute dtype under autocast, fp32 otherwise) and all-gather the updated parameters; ZeRO-3 and FSDP2 all-gather
  every block's parameters in forward and again in backward and reduce-scatter the gradients. Inside a node the
  link is the GPU's NVLink/PCIe, across nodes the fabric (the slower one bounds a ring), at
  :data:`LINK_EFFICIENCY` of nominal. **Overlap**: gradient reduction runs in buckets during backward (DDP, DeepSpeed
  ``overlap_comm``, FSDP2) and the ZeRO-3/FSDP2 gathers are prefetched, so only what exceeds the compute it
  overlaps with (backward: 2/3 of the compute, forward: 1/3) is exposed; ZeRO-1/2's parameter all-gather after the
  step is not overlapped.
* **optimizer step**: a memory-bound pass of fused AdamW over this rank's fp32 states: read parameter, gradient and
  both moments, write parameter and moments (28 bytes per parameter) at the HBM bandwidth; under CPU offload the
  step runs on the host at :data:`HOST_ADAM_GBPS` and the gradients and parameters cross PCIe.

What it leaves out, stated: data loading (assumed hidden behind compute), kernel launch latency and collective
latency (small at these sizes), the contrastive loss's feature all-gather (``[N, d]``, negligible).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from harness.distributed.gpu_catalog import GPU
from harness.fit.memory_model import ZERO_PARTITIONED, Setup
from harness.fit.model_shape import ModelShape

EFFICIENCY = {"bf16": 0.45, "fp16": 0.45, "fp32": 0.45}
"""Achievable fraction of the dense peak per precision (module docstring)."""
LINK_EFFICIENCY = 0.8
"""Bus bandwidth NCCL reaches over nominal (nccl-tests all-reduce on DGX A100 / H100 reach about 80%)."""
HOST_ADAM_GBPS = 20.0
"""DeepSpeedCPUAdam's effective memory bandwidth on the host (offload stages), GB/s."""
PCIE_GBPS = 25.0
"""Host <-> GPU copies under offload, GB/s (PCIe 4.0 x16 achieved)."""


@dataclass(frozen=True)
class StepTime:
    """One predicted optimizer step (seconds) of one rank at one micro batch.

    Attributes:
        compute_s, comm_s (all collectives), exposed_comm_s (not hidden by compute), optimizer_s, step_s (the sum).
        samples_per_s_per_gpu: micro batch / step_s.
        mfu: model FLOPs (3 x forward, no recompute) per second over the dense peak.
        model_gflops_per_sample: 3 x the forward GFLOPs of both towers.
    """

    compute_s: float
    comm_s: float
    exposed_comm_s: float
    optimizer_s: float
    step_s: float
    samples_per_s_per_gpu: float
    mfu: float
    model_gflops_per_sample: float


def link_gbps(gpu: GPU, nodes: int, fabric_gbps: Optional[float] = None) -> float:
    """Bus bandwidth a ring gets per rank, GB/s: the intra-node link on one node, else the slower of it and the
    fabric (``fabric_gbps`` overrides the catalog's default), times :data:`LINK_EFFICIENCY`."""
    bw = gpu.intra_node.gbps if nodes == 1 else min(gpu.intra_node.gbps, fabric_gbps or gpu.inter_node.gbps)
    return bw * LINK_EFFICIENCY


def comm_bytes(shape: ModelShape, s: Setup) -> Dict[str, float]:
    """Bytes each rank sends per step by phase (``forward``, ``backward``, ``after``), ring factors included."""
    N, P = s.world, float(shape.params)
    if N == 1:
        return {"forward": 0.0, "backward": 0.0, "after": 0.0}
    ring, half = 2 * (N - 1) / N, (N - 1) / N
    low = 2 if s.precision != "fp32" else 4
    if s.stage == "ddp" or s.stage == "0":
        return {"forward": 0.0, "backward": ring * 4 * P, "after": 0.0}
    if s.stage in ("1", "2", "2-offload"):
        return {"forward": 0.0, "backward": half * low * P, "after": half * 4 * P}
    gathered = low if s.stage.startswith("fsdp") else 4  # FSDP2 gathers in the compute dtype, ZeRO-3 the module's
    return {"forward": half * gathered * P, "backward": half * gathered * P + half * 4 * P, "after": 0.0}


def predict_step(shape: ModelShape, s: Setup, micro: int, gpu: GPU, forward_gflops: Dict[str, float],
                 nodes: int = 1, efficiency: Optional[float] = None,
                 fabric_gbps: Optional[float] = None) -> Optional[StepTime]:
    """:class:`StepTime` of cell setup ``s`` at micro batch ``micro`` on ``gpu``; ``forward_gflops`` per sample by
    tower (``{"image": ..., "text": ...}``). None when the GPU lacks the precision (bf16 on a V100)."""
    peak = gpu.peak_tflops(s.precision)
    if peak is None:
        return None
    eff = efficiency or EFFICIENCY[s.precision]
    fwd = sum(forward_gflops.values())
    recompute = sum(_recomputed_share(shape, s, t) * g for t, g in forward_gflops.items()) if s.checkpointing else 0.0
    compute = (3 * fwd + recompute) * 1e9 * micro / (peak * 1e12 * eff)
    bw = link_gbps(gpu, nodes, fabric_gbps) * 1e9
    c = {k: v / bw for k, v in comm_bytes(shape, s).items()}
    exposed = max(0.0, c["forward"] - compute / 3) + max(0.0, c["backward"] - 2 * compute / 3) + c["after"]
    local = shape.params / (s.world if s.stage in ZERO_PARTITIONED or s.stage.startswith("fsdp") else 1)
    if s.stage.endswith("offload"):
        optimizer = 28 * local / (HOST_ADAM_GBPS * 1e9) + 8 * local / (PCIE_GBPS * 1e9)
    else:
        optimizer = 28 * local / (gpu.hbm_gbps * 1e9)
    step = compute + exposed + optimizer
    mfu = 3 * fwd * 1e9 * micro / step / (peak * 1e12)
    return StepTime(compute, sum(c.values()), exposed, optimizer, step, micro / step, mfu, 3 * fwd)


def _recomputed_share(shape: ModelShape, s: Setup, tower: str) -> float:
    """Fraction of ``tower``'s forward FLOPs recomputed in backward: its checkpointed blocks' share of its blocks'
    ``parameters x tokens`` (a block's matmul FLOPs); the embeddings outside the blocks, a small part, are counted
    in the same proportion."""
    blocks = shape.towers.get(tower, ())
    total = sum(b.params * b.tokens for b in blocks)
    done = sum(b.params * b.tokens for i, b in enumerate(blocks) if (i + 1) % s.checkpointing == 0)
    return done / total if total else 0.0
