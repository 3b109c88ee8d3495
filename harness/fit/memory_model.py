"""Analytic predictor of one rank's peak memory for a fit-probe cell, calibrated from measured probes.

Peak = max(forward/backward peak, optimizer-step peak), with

* **model states** by engine and ZeRO stage (Rajbhandari et al., ZeRO, arXiv 1910.02054: parameters,
  gradients and AdamW state, sharded over N ranks from stage 1/2/3 on; FSDP2 full shard ~ stage 3,
  shard-grad-op keeps the transformer blocks gathered from forward to backward). This harness keeps fp32
  parameters in the module under bf16 (autocast / DeepSpeed ``torch_autocast``), so a parameter costs
  4 (module) + 4 (gradient) + 8 (AdamW) bytes before sharding; DeepSpeed's fp32 partition copy adds 4/N
  from stage 1 on; DeepSpeed's native fp16 (ZeRO 1-3) keeps a 2-byte module copy;
* **runtime buffers** read from the launch JSON (``"auto"`` sizes resolved as the engine does,
  :func:`harness.engines.deepspeed.bucket_sizes`), as DeepSpeed 0.19.8 allocates them: at ZeRO-1/2 one gradient
  bucket of ``reduce_bucket_size`` elements in the parameters' dtype per communication dtype (two under
  ``torch_autocast``: bf16 for Linear/Conv gradients, fp32 for the rest), doubled with ``overlap_comm``
  (``stage_1_and_2.py``); at ZeRO-3 one persistent bucket per communication dtype, in that dtype, and every
  parameter of at most ``stage3_param_persistence_threshold`` elements (default 1e5) held whole on every rank;
  DDP's gradient buckets (a copy of the gradients);
* **activations** per sample and per transformer block as the model's autograd graph keeps them
  (:mod:`harness.fit.activations`: tensors saved for backward, counted at two batch sizes under the precision's
  autocast; this replaces Korthikanti et al.'s ``9 s h + 2 s m`` formula, arXiv 2205.05198, which misses
  open_clip's fp32 text residual stream and DTP-ViT's pooling buffers); a checkpointed block keeps only its
  input. The forward/backward peak is the largest of the start of backward (every activation and the loss's
  buffers) and each block's backward (:func:`backward_points`), tower by tower in autograd's order, with the
  block recomputed if checkpointed, its gradients in flight, and the parameter gradients already made;
* **contrastive loss** per form (:func:`loss_bytes`): dense CLIP / SigLIP (``[B, N]`` fp32 matrices), tiled
  (``[B, tile]``), and accumulation with negatives (the cached features of ``K`` micro batches).

Calibration (:meth:`MemoryModel.add_measurement`): for each family of cells sharing model, precision,
attention and checkpointing, a multiplier on the activations is fitted to how measured peaks grow with
the batch within a cell (the loss term is exact and stays analytic), and each measured setup (stage,
world size) gets its additive offset; setups not measured yet borrow the offsets of the family's setups of
the same world size (else the same stage, else all), families
without measurements the analytic values. :meth:`MemoryModel.error_report` compares predictions with
every measured probe.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from harness.core.paths import REPO_ROOT
from harness.core.units import GIB
from harness.fit.activations import ActivationProfile, activation_profile
from harness.fit.model_shape import ModelShape, model_shape

# stage name -> launch YAML in ds_configs/ (None: plain PyTorch, torchrun for several ranks)
STAGES = {"ddp": None, "0": "zero0", "1": "zero1", "2": "zero2", "3": "zero3", "2-offload": "zero2_offload",
          "3-offload": "zero3_offload", "fsdp": "fsdp", "fsdp-sgo": "fsdp_shard_grad_op"}
# DeepSpeed stages whose optimizer states are partitioned (an fp32 flat partition per rank)
ZERO_PARTITIONED = ("1", "2", "3", "2-offload", "3-offload")


@dataclass(frozen=True)
class Setup:
    """The non-model part of a cell: engine/stage, precision, checkpointing, attention, world size."""

    stage: str
    precision: str
    checkpointing: int
    attention: str
    world: int
    loss: str = "clip"
    loss_impl: str = "dense"
    tile: int = 1024
    micro: int = 0
    """0: the searched batch is the micro batch (no accumulation). ``micro > 0``: the micro batch is fixed at this
    and the searched batch is the count ``K`` of micro batches accumulated with negatives (the contrastive batch
    is ``K x micro x world``)."""

    def rows_cols(self, batch: int) -> Tuple[int, int, int]:
        """``(micro batch, accumulation count K, contrastive batch N)`` of searched batch ``batch``."""
        if self.micro:
            return self.micro, batch, batch * self.micro * self.world
        return batch, 1, batch * self.world

    @property
    def launch_json(self) -> Dict:
        """The stage's DeepSpeed JSON (``{}`` for DDP and FSDP2); read once per stage."""
        return _launch_json(self.stage)


@functools.lru_cache(maxsize=None)
def _launch_json(stage: str) -> Dict:
    name = STAGES[stage]
    if name is None or name.startswith("fsdp"):
        return {}
    return json.loads((REPO_ROOT / "ds_configs" / f"{name}.json").read_text())


def _elem_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def state_bytes(shape: ModelShape, s: Setup, device_type: str) -> Dict[str, float]:
    """Model states and runtime buffers of one rank, in bytes, by component (see the module docstring).
    ``device_type`` "cpu" counts CPU-offloaded states too (they live in the same memory)."""
    from harness.engines.deepspeed import bucket_sizes

    P, N = shape.params, s.world
    zero = s.launch_json.get("zero_optimization", {})
    native_fp16 = s.precision == "fp16" and s.stage in ZERO_PARTITIONED
    module = 2 if native_fp16 else 4
    bucket_elems = zero.get("reduce_bucket_size", 5e8)
    bucket_elems = float(bucket_sizes(P)["reduce_bucket_size"] if bucket_elems == "auto" else bucket_elems)
    autocast = s.precision != "fp32" and not native_fp16  # DeepSpeed's torch_autocast mode
    out: Dict[str, float] = {}
    stage = s.stage
    if stage in ("ddp", "0"):
        out.update(params=4 * P, grads=4 * P, optimizer=8 * P)
        if N > 1 and stage == "ddp":
            out["buffers"] = 4 * P  # DDP's gradient buckets (DeepSpeed's stage 0 flattens only inside the step)
    elif stage in ("1", "2", "2-offload"):
        sharded_grads = stage != "1"
        out.update(params=module * P, grads=(4 * P / N if sharded_grads else module * P),
                   optimizer=12 * P / N)  # fp32 partition copy + AdamW state
        # gradient staging buckets (contiguous_gradients), allocated when backward starts, in the parameters'
        # dtype: one per communication dtype (two under torch_autocast), doubled with overlap_comm
        if zero.get("contiguous_gradients", True) or stage == "2-offload":
            out["buffers"] = (bucket_elems * module * (2 if autocast else 1)
                              * (2 if zero.get("overlap_comm") else 1))
        if stage == "2-offload" and device_type != "cpu":
            out["optimizer"] = 0.0
            out["grads"] = 0.0
    elif stage in ("3", "3-offload"):
        persistent = sum(n for n in shape.param_numels if n <= zero.get("stage3_param_persistence_threshold", 1e5))
        out.update(params=module * P / N + module * persistent * (1 - 1 / N), grads=4 * P / N,
                   optimizer=12 * P / N, gathered=2 * module * shape.largest_block,
                   buffers=bucket_elems * ((2 + 4) if autocast else module))
        if stage == "3-offload" and device_type != "cpu":
            out.update(params=0.0, grads=0.0, optimizer=0.0)
    else:  # FSDP2: fp32 shards; blocks gathered in the compute dtype, the root group in fp32
        e = _elem_bytes(s.precision)
        # the root group (embeddings, norms, projections, logit scale) stays gathered from forward to backward
        # (reshard_after_forward=False): its fp32 copy is held on one rank too (the CPU test sweep's ViT-tiny-8
        # FSDP2 cell was 9.6% under-predicted without it: its 24 MiB text root); a block's all-gather of a
        # single shard is the shard itself (measured: no unsharded copy on one rank)
        out.update(params=4 * P / N, grads=4 * P / N, optimizer=8 * P / N,
                   gathered=4 * shape.root_params + (2 * e * shape.largest_block if N > 1 else 0.0))
        if stage == "fsdp-sgo" and N > 1:
            out["gathered"] += e * shape.block_params
    return out


def backward_points(shape: ModelShape, prof: ActivationProfile, s: Setup, batch: int,
                    grad_bytes: float) -> List[Tuple[float, Dict[str, float]]]:
    """The memory of the forward/backward above the states without gradients at each point where a peak can come,
    as ``(unscaled bytes, {"image": activation bytes, "text": ...})`` (the calibration scales the second): the start
    of backward (every activation kept, the loss's buffers) and, tower by tower in backward order (text first:
    open_clip encodes it last, and autograd runs the later nodes first), each block's backward (the activations
    still kept, the block recomputed if checkpointed, its gradients in flight, the parameter gradients already
    made). Input batches count with their tower. ``grad_bytes``: gradient bytes per parameter on this rank."""
    text_in = 8.0 * shape.context_length
    kept_blocks = {t: [b.input if _checkpointed(s, i, t, shape) else b.saved for i, b in enumerate(bl)]
                   for t, bl in prof.blocks.items()}
    live = {t: prof.outside.get(t, 0.0) + sum(kept_blocks.get(t, ())) for t in ("image", "text")}
    live["image"] += prof.inputs - text_in
    live["text"] += text_in
    points = [(0.0, {t: v * batch for t, v in live.items()})]  # the loss's own buffers: added by the caller
    grads = 0.0
    for tower in ("text", "image"):
        blocks, shapes = prof.blocks.get(tower, ()), shape.towers.get(tower, ())
        for i in reversed(range(len(blocks))):
            b = blocks[i]
            extra = (b.saved - b.input if kept_blocks[tower][i] == b.input else 0.0) + b.working
            now = {t: v * batch for t, v in live.items()}
            now[tower] += extra * batch
            points.append((grads, now))
            live[tower] -= kept_blocks[tower][i]
            grads += grad_bytes * shapes[i].params
        live[tower] -= prof.outside.get(tower, 0.0)
        grads += grad_bytes * shape.tower_root_params.get(tower, 0)
    return points


def autocast_weight_bytes(shape: ModelShape, s: Setup) -> float:
    """Autocast's low-precision copies of the transformer blocks' weights, made in the forward and kept for the
    backward (``torch.autocast`` casts each fp32 leaf weight once per forward and caches it; the matmul saves the
    copy): ``2 x`` the block parameters under bf16/fp16 autocast. None under fp32, DeepSpeed's native fp16 (a
    half-precision module) or FSDP2 (its blocks are gathered in the compute dtype: nothing to cast). The
    activation profile cannot see them (they do not grow with the batch)."""
    if s.precision == "fp32" or s.stage.startswith("fsdp") or (s.precision == "fp16" and s.stage in ZERO_PARTITIONED):
        return 0.0
    return 2.0 * shape.block_params


def _checkpointed(s: Setup, i: int, tower: str, shape: ModelShape) -> bool:
    """Whether block ``i`` of ``tower`` is checkpointed: every ``s.checkpointing``-th block, counted over
    each tower's blocks in forward order (:func:`models.blocks.checkpoint_every`)."""
    return bool(s.checkpointing) and (i + 1) % s.checkpointing == 0


def loss_bytes(s: Setup, embed_dim: int, batch: int) -> float:
    """Bytes of the contrastive loss of one rank at searched batch ``batch`` (``B`` micro batch rows, ``N``
    contrastive-batch columns, ``d`` embedding width, fp32), per form (measured against :mod:`harness.train.losses`
    with the CPU tensor tracker, ``tests/test_memmodel_loss.py``):

    * **dense CLIP** (open_clip ``ClipLoss``, local loss, gather-with-grad): two ``[B, N]`` log-softmax outputs
      kept for backward and, in backward, a ``[B, N]`` gradient and its log-softmax input gradient: ``16 B N``;
      the scaled rows kept for backward and the rows' feature gradients ``16 B d``; with other ranks, the
      gathered ``[N, d]`` image and text features and their gradients ``16 N d``;
    * **dense SigLIP** (open_clip ``SigLipLoss``): five ``[B, N]`` fp32 matrices (logits, signed logits, their
      log-sigmoid and gradients) ``20 B N``, ``8 B d``, the received texts and their gradients ``8 N d``;
    * **tiled CLIP** (:mod:`harness.train.losses`, Inf-CL): one ``[B, t]`` tile and its product ``8 B min(t, N)``, the
      scaled rows, gradient accumulators and row gradients of both directions ``16 B d``, the columns'
      gradients ``12 N d``; the gathered columns ``8 N d``;
    * **tiled SigLIP**: the larger of the forward (a tile, its signed copy and the log-sigmoid's buffer,
      ``12 B t``, and ``8 B d``) and the backward (``8 B t``, ``8 B d`` and the columns and their gradients
      ``8 N d``); the gathered texts ``4 N d``;
    * **accumulated with negatives** (GradCache, Gao et al. 2021; ``s.micro > 0``): the features of all ``K``
      micro batches, computed without gradients and gathered over the ranks, are cached (``8 N d``, image and
      text, plus this rank's own ``8 K B d``) while each micro batch is recomputed with gradients against them:
      the loss above with ``B`` rows and ``N`` columns, whose gathered columns are the cache.
    """
    B, K, N = s.rows_cols(batch)
    d = float(embed_dim)
    cached = s.micro > 0
    gathered = N > B
    cache = 8 * N * d + 8 * K * B * d if cached else 0.0
    if s.loss_impl == "tiled":
        t = float(min(s.tile, N))
        if s.loss == "siglip":
            core = max(12 * B * t + 8 * B * d, 8 * B * t + 8 * B * d + 8 * N * d)
            return cache + core + (4 * N * d if gathered and not cached else 0.0)
        return cache + 8 * B * t + 4 * d * (4 * B + 3 * N) + (8 * N * d if gathered and not cached else 0.0)
    if s.loss == "siglip":
        return cache + 20.0 * B * N + 8 * B * d + (8 * N * d if gathered and not cached else 0.0)
    return cache + 16.0 * B * N + 16 * B * d + (16 * N * d if gathered and not cached else 0.0)


class MemoryModel:
    """Peak-memory predictor (bytes per rank) with per-family calibration from measured probes.

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (offloaded states count on a CPU).
    """

    def __init__(self, device_type: str = "cuda"):
        self.device_type = device_type
        self.points: List[Tuple[str, Setup, int, float]] = []  # (model, setup, batch, measured peak bytes)
        self._fit: Dict[Tuple, Tuple[float, Dict[Setup, float]]] = {}  # family -> (alpha, offset per setup)

    @staticmethod
    def family(model: str, s: Setup) -> Tuple:
        return (model, s.precision, s.attention, s.checkpointing)

    def components(self, model: str, s: Setup, batch: int) -> Dict[str, float]:
        """Analytic (uncalibrated) components in bytes: states, buffers, ``activations`` (kept from the forward
        to the loss), ``logits`` (the contrastive loss per form, :func:`loss_bytes`), ``step_extra``."""
        shape = model_shape(model)
        out = state_bytes(shape, s, self.device_type)
        micro = s.rows_cols(batch)[0]
        pts = backward_points(shape, activation_profile(model, s.precision, s.attention), s, micro, 0.0)
        out["activations"] = sum(pts[0][1].values())
        out["autocast_weights"] = autocast_weight_bytes(shape, s)
        out["logits"] = loss_bytes(s, shape.embed_dim, batch)
        # the optimizer step's temporaries: the harness's fused AdamW (``optim.fused``, default) updates in place on
        # CUDA (``torch._fused_adamw_``: no temporaries); on a CPU, two copies of the largest local tensor
        # (DeepSpeed steps one flat fp32 partition, FSDP2 and DDP per parameter)
        if self.device_type == "cuda":
            out["step_extra"] = 0.0
        elif s.stage in ZERO_PARTITIONED:
            out["step_extra"] = 2 * 4.0 * shape.params / s.world
        else:
            out["step_extra"] = 2 * 4.0 * shape.largest_param / (s.world if s.stage.startswith("fsdp") else 1)
        return out

    def forward_parts(self, model: str, s: Setup, batch: int) -> Tuple[float, List[Tuple[float, Dict[str, float]]]]:
        """``(constant, points)`` of the forward/backward branch, uncalibrated: the states without the gradients
        (freed by the previous step's ``zero_grad``, allocated again during backward), and per point where the
        peak can come (:func:`backward_points`) the ``(unscaled, {tower: activation})`` bytes above them, the
        loss's buffers at the start of backward."""
        shape = model_shape(model)
        c = state_bytes(shape, s, self.device_type)
        const = sum(c.values()) - c.get("grads", 0.0) + autocast_weight_bytes(shape, s)
        micro = s.rows_cols(batch)[0]
        grad_per_param = c.get("grads", 0.0) / shape.params
        pts = backward_points(shape, activation_profile(model, s.precision, s.attention), s, micro, grad_per_param)
        pts[0] = (loss_bytes(s, shape.embed_dim, batch), pts[0][1])
        return const, pts

    def predict(self, model: str, s: Setup, batch: int, calibrated: bool = True) -> float:
        """Predicted peak bytes of one rank at searched batch ``batch`` (the micro batch, or with ``s.micro``
        the accumulation count)."""
        return max(self.forward_peak(model, s, batch, calibrated), self.step_peak(model, s))

    def forward_peak(self, model: str, s: Setup, batch: int, calibrated: bool = True) -> float:
        """The forward/backward branch of the peak: the states without gradients, plus the largest over the
        points of :func:`backward_points` of the analytic part and the calibrated activations."""
        const, pts = self.forward_parts(model, s, batch)
        alpha, beta = self.calibration(model, s) if calibrated else (1.0, 0.0)
        return const + beta + max(u + alpha * sum(a.values()) for u, a in pts)

    def step_peak(self, model: str, s: Setup) -> float:
        """The optimizer-step branch of the peak (all states and the step's temporaries), batch-independent."""
        c = self.components(model, s, 1)
        return sum(v for k, v in c.items() if k not in ("activations", "logits", "autocast_weights"))

    def is_forward_dominated(self, model: str, s: Setup, peak_bytes: float) -> bool:
        """A measured peak clearly above the optimizer-step branch: it tells how memory grows with the batch."""
        return peak_bytes > 1.02 * self.step_peak(model, s)

    def calibration(self, model: str, s: Setup) -> Tuple[float, float]:
        """(alpha, offset) for ``s``: its own offset if measured, else the mean offset of the family's setups of
        the same world size, else of the same stage, else of the whole family."""
        fam = self._fit.get(self.family(model, s))
        if fam is None:
            return 1.0, 0.0
        alpha, offsets = fam
        if s in offsets:
            return alpha, offsets[s]
        # what the analytic constant part misses is set mostly by how the states are sharded: prefer setups of the
        # same world size, then of the same stage, then any
        near = ([v for k, v in offsets.items() if k.world == s.world] or
                [v for k, v in offsets.items() if k.stage == s.stage] or list(offsets.values()))
        return alpha, (sum(near) / len(near) if near else 0.0)

    def max_batch(self, model: str, s: Setup, limit_bytes: float, granularity: int, cap: int,
                  anchor: Optional[Tuple[int, float, float]] = None) -> int:
        """Largest multiple of ``granularity`` (at most ``cap``) predicted to fit in ``limit_bytes``; 0 if none.

        ``anchor = (batch, measured peak bytes, scale)``: predict from a measured point instead, the forward
        branch's growth from that batch multiplied by ``scale`` (1: the model's own growth).
        """
        if self.step_peak(model, s) > limit_bytes:
            return 0
        if anchor is None:
            fits = lambda b: self.forward_peak(model, s, b) <= limit_bytes
        else:
            b0, m0, k = anchor
            f0 = self.forward_peak(model, s, b0)
            fits = lambda b: m0 + k * (self.forward_peak(model, s, b) - f0) <= limit_bytes
        if not fits(granularity):
            return 0
        lo, hi = 1, cap // granularity
        while lo < hi:  # predicted peak grows with the batch: bisect on multiples of the granularity
            mid = (lo + hi + 1) // 2
            if fits(mid * granularity):
                lo = mid
            else:
                hi = mid - 1
        return lo * granularity

    def add_measurement(self, model: str, s: Setup, batch: int, peak_bytes: float) -> None:
        """Record a measured peak and refit the family's calibration."""
        self.points.append((model, s, batch, peak_bytes))
        self._refit(self.family(model, s))

    def _refit(self, fam: Tuple) -> None:
        """The family's activation multiplier ``alpha`` comes from how the measured peak grows between batch
        sizes of the same cell (pooled least squares over such pairs; a single point's ratio when no cell has
        two); each measured setup's constant offset is its mean residual (cells not measured yet get the
        family's mean offset). Only points above the optimizer-step branch count."""
        by_setup: Dict[Setup, List[Tuple[float, float]]] = {}
        for model, s, batch, peak in self.points:
            if self.family(model, s) != fam:
                continue
            const, pts = self.forward_parts(model, s, batch)
            u, acts = max(((u, sum(a.values())) for u, a in pts), key=sum)  # the analytic peak's point
            if self.is_forward_dominated(model, s, peak) and acts > 0:
                by_setup.setdefault(s, []).append((acts, peak - const - u))
        if not by_setup:
            return
        sxy = sxx = 0.0
        for rows in by_setup.values():
            rows.sort()
            for (x1, y1), (x2, y2) in zip(rows, rows[1:]):
                sxy += (x2 - x1) * (y2 - y1)
                sxx += (x2 - x1) ** 2
        if sxx > 0:
            alpha = max(sxy / sxx, 0.05)
            offsets = {s: sum(y - alpha * x for x, y in rows) / len(rows) for s, rows in by_setup.items()}
        else:  # one batch size per setup: scale the per-batch part only
            ratios = [y / x for rows in by_setup.values() for x, y in rows]
            alpha, offsets = max(sum(ratios) / len(ratios), 0.05), {}
        self._fit[fam] = (alpha, offsets)

    def error_report(self) -> List[Dict]:
        """Per measured probe: measured peak GiB and the relative error of three predictions:
        ``analytic_error`` (no calibration), ``cross_error`` (calibrated on every *other* cell's probes:
        what the model predicts for a cell it has not seen) and ``error`` (calibrated on all probes)."""
        out = []
        held_out: Dict[Tuple[str, Setup], MemoryModel] = {}  # per cell: calibrated on the other cells
        for model, s, batch, peak in self.points:
            if (model, s) not in held_out:
                held_out[model, s] = MemoryModel(self.device_type)
                for m2, s2, b2, p2 in self.points:
                    if (m2, s2) != (model, s):
                        held_out[model, s].add_measurement(m2, s2, b2, p2)
            cal, ana = self.predict(model, s, batch), self.predict(model, s, batch, calibrated=False)
            cross = held_out[model, s].predict(model, s, batch)
            out.append({"model": model, "stage": s.stage, "precision": s.precision, "checkpointing": s.checkpointing,
                        "attention": s.attention, "world": s.world, "batch": batch, "measured_gib": peak / GIB,
                        "predicted_gib": cal / GIB, "cross_predicted_gib": cross / GIB, "analytic_gib": ana / GIB,
                        "error": (cal - peak) / peak, "cross_error": (cross - peak) / peak,
                        "analytic_error": (ana - peak) / peak})
        return out
