"""``harness plan``: the memory-fit table, step time, MFU and cost of a run on a named GPU, without the GPU.

For every cell of the fit probe's grammar (:func:`harness.fit.cells.add_cell_arguments`) and every ``--gpu`` of the
catalog (:mod:`harness.distributed.gpu_catalog`), the memory model (:mod:`harness.fit.memory_model`, activations
measured once on this CPU and cached) plus the CUDA terms (:mod:`harness.fit.cuda_memory`) give the peak device
memory at any micro batch; the largest micro batch whose peak stays under ``(1 - --margin)`` of the GPU's memory is
the row's ``max_micro_batch``. The time model (:mod:`harness.fit.step_time`) gives step time, samples/s per GPU and
MFU at the row's batch, and ``--samples`` their GPU-hours. ``--calibrate-from STORE`` feeds the fit stores' probes of
the same device to the memory model and the CUDA terms, so a plan made after one real probe is calibrated for that
GPU. ``--gpu cpu --budget-gib G`` plans for this machine's CPU mode, as the fit probe measures it.

Outputs in ``--out``: ``plan.json`` (``rows`` and the assumptions), ``plan.csv``, ``plan.md`` and ``plan.png``.
No GPU, process group or download is used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.core.errors import ConfigError, ExitCode, refuse
from harness.core.units import FLOPS_PER_MAC, GIB
from harness.distributed.gpu_catalog import GPU, find_gpu, gpu_of_device
from harness.fit.activations import activation_profile, cache_file, profile_key, read_cache, write_cache
from harness.fit.cells import Cell, ProbeInputError, add_cell_arguments, build_cells
from harness.fit.cuda_memory import CudaTerms, breakdown_gib, calibrated_terms, default_terms
from harness.fit.memory_model import MemoryModel, autocast_weight_bytes, state_bytes
from harness.fit.model_shape import model_shape
from harness.fit.step_time import EFFICIENCY, StepTime, predict_step


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness plan", description=__doc__.split("\n\n")[0])
    add_cell_arguments(p)
    p.add_argument("--gpu", action="append", required=True, help="catalog GPU (repeatable), or 'cpu' with --budget-gib")
    p.add_argument("--gpu-catalog", help="YAML file of extra / replacing catalog entries (same fields)")
    p.add_argument("--margin", type=float, default=0.05, help="fraction of the GPU's memory kept free (default 0.05)")
    p.add_argument("--batch", type=int, help="evaluate this micro batch (accumulation count with --accum-search)")
    p.add_argument("--samples", type=float, help="samples of the job whose cost (GPU-hours) to state")
    p.add_argument("--granularity", type=int, default=8, help="micro batches are multiples of this")
    p.add_argument("--max-batch", type=int, default=1 << 16, help="largest micro batch considered")
    p.add_argument("--budget-gib", type=float, help="--gpu cpu: memory per process in GiB, as the fit probe's")
    p.add_argument("--calibrate-from", action="append", default=[], metavar="STORE",
                   help="fit-probe store folder whose probes of the same device calibrate the plan (repeatable)")
    p.add_argument("--efficiency", type=float, help=f"achievable fraction of the dense peak (default {EFFICIENCY})")
    p.add_argument("--fabric-gbps", type=float, help="inter-node bandwidth per GPU, GB/s (default: the catalog's)")
    p.add_argument("--out", required=True, help="output folder")
    return p


# --------------------------------------------------------------------------- inputs

def _validate(args: argparse.Namespace) -> List[Cell]:
    """Cells of the flags, every value checked before anything is measured. Raises ConfigError / ProbeInputError."""
    if not args.models:
        raise ProbeInputError("--models: required (comma-separated registered models)")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin: a fraction in [0, 1), got {args.margin}")
    for flag, v in (("--granularity", args.granularity), ("--max-batch", args.max_batch), ("--batch", args.batch),
                    ("--samples", args.samples), ("--efficiency", args.efficiency),
                    ("--fabric-gbps", args.fabric_gbps)):
        if v is not None and not v > 0:
            raise ConfigError(f"{flag}: must be > 0, got {v}")
    if args.efficiency is not None and args.efficiency > 1:
        raise ConfigError(f"--efficiency: a fraction of the peak in (0, 1], got {args.efficiency}")
    for gpu in args.gpu:
        if gpu.lower() == "cpu":
            if not args.budget_gib or args.budget_gib <= 0:
                raise ConfigError("--budget-gib: required (> 0) with --gpu cpu (each process's memory in GiB)")
        else:
            find_gpu(gpu, args.gpu_catalog)
    for store in args.calibrate_from:
        if not (Path(store) / "probes.jsonl").is_file():
            raise ConfigError(f"--calibrate-from: {store} has no probes.jsonl (not a fit-probe store)")
    return build_cells(args)


def forward_gflops(name: str) -> Dict[str, float]:
    """Forward GFLOPs per sample of ``name``'s towers (``{"image", "text"}``; 2 x fvcore's GMACs, attention
    counted), measured once and cached like the activation profiles."""
    path = cache_file("gflops", name)
    data = read_cache(path)
    if data is None:
        from harness.tools.flops import model_gmacs

        g = model_gmacs(name)
        data = {"image": FLOPS_PER_MAC * g["image_gmacs"], "text": FLOPS_PER_MAC * g["text_gmacs"]}
        write_cache(path, data)
    return data


def _measure_model(name: str, keys: List[tuple]) -> None:
    """Child-process body of :func:`measure_uncached`: measure and cache ``name``'s FLOPs and activation profiles."""
    forward_gflops(name)
    for precision, attention in keys:
        activation_profile(name, precision, attention)


def measure_uncached(cells: List[Cell]) -> None:
    """Measure what the cells need and the cache lacks, one fresh process per full-size model (a ViT-H-14 profile
    peaks near 10 GiB of host memory, and a process does not give freed memory back to the system: measured in one
    process, four large models peaked at 19 GiB); the tiny models in this process."""
    import concurrent.futures
    import multiprocessing

    import models

    need: Dict[str, set] = {}
    for c in cells:
        key = profile_key(c.precision, c.attention)
        paths = (cache_file("activations", c.model, *key), cache_file("gflops", c.model))
        if any(read_cache(path) is None for path in paths):
            need.setdefault(c.model, set()).add(key)
    big = [m for m in need if not models.get_spec(m).tiny]
    for m in need:
        if m not in big:
            _measure_model(m, sorted(need[m]))
    if big:
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
            for done in [pool.submit(_measure_model, m, sorted(need[m])) for m in big]:
                done.result()


def store_probes(stores: List[str]) -> List[Dict[str, Any]]:
    """Every probe of the given fit stores with its cell record's fields (model, stage ...) attached."""
    out = []
    for store in stores:
        path = Path(store) / "cells.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        cells = {rec["cell"]: rec for rec in map(json.loads, lines)}
        for line in (Path(store) / "probes.jsonl").read_text().splitlines():
            p = json.loads(line)
            if p["cell"] in cells:
                out.append({**p, "record": cells[p["cell"]], "store": store})
    return out


class Device:
    """One ``--gpu`` of the plan: its memory limit, its calibrated memory model and CUDA terms.

    Args:
        name: a catalog GPU (see :func:`harness.distributed.gpu_catalog.find_gpu`) or ``"cpu"``.
        probes: fit-store probes (:func:`store_probes`); those of the same device calibrate the plan.
        margin: fraction of a GPU's memory kept free. budget_gib: a CPU's memory per process.
        catalog: extra catalog YAML.

    Attributes:
        gpu: the catalog entry (None for ``cpu``); ``name`` what the tables show.
        limit_bytes: the memory a rank may use, ``(1 - margin)`` of the GPU's (the budget on a CPU).
        model: :class:`MemoryModel` fed with the probes of this device.
    """

    def __init__(self, name: str, probes: List[Dict[str, Any]], margin: float = 0.05,
                 budget_gib: Optional[float] = None, catalog: Optional[str] = None):
        self.gpu: Optional[GPU] = None if name.lower() == "cpu" else find_gpu(name, catalog)
        self.name = self.gpu.name if self.gpu else "cpu"
        self.memory_gib = self.gpu.memory_gib if self.gpu else budget_gib
        self.limit_bytes = self.memory_gib * GIB * ((1 - margin) if self.gpu else 1.0)
        self.model = MemoryModel("cuda" if self.gpu else "cpu")
        self.probes = [p for p in probes if self._same_device(p.get("env", {}).get("device", ""))]
        for p in self.probes:
            if p["outcome"] == "fits" and p.get("peak_gib") and p.get("env") == p["record"].get("env"):
                self.model.add_measurement(p["record"]["model"], Cell.from_record(p["record"]).setup(), p["batch"],
                                           p["peak_gib"] * GIB)

    def _same_device(self, device: str) -> bool:
        if self.gpu is None:
            return device.startswith("cpu")
        found = gpu_of_device(device)
        return found is not None and found.name == self.gpu.name

    def terms(self, cell: Cell) -> Optional[CudaTerms]:
        """CUDA terms of ``cell`` on this GPU (None on a CPU), calibrated by the stores' probes when they measured."""
        if self.gpu is None:
            return None
        stores = sorted({p["store"] for p in self.probes})
        return calibrated_terms(default_terms(self.gpu, cell.world, cell.stage), self.probes, ", ".join(stores))

    def peak_bytes(self, cell: Cell, batch: int) -> float:
        """Predicted device bytes of one rank of ``cell`` at searched batch ``batch`` (what nvidia-smi would show)."""
        allocated = self.model.predict(cell.model, cell.setup(), batch)
        terms = self.terms(cell)
        return allocated if terms is None else terms.device_bytes(allocated + terms.cublas_workspace)

    def max_batch(self, cell: Cell, g: int, cap: int) -> int:
        """Largest multiple of ``g`` (at most ``cap``) whose predicted peak stays under the limit; 0 if none."""
        terms = self.terms(cell)
        limit = self.limit_bytes if terms is None else terms.usable_bytes(self.limit_bytes)
        return self.model.max_batch(cell.model, cell.setup(), limit, g, cap)


# --------------------------------------------------------------------------- one row

def breakdown(device: Device, cell: Cell, batch: int) -> Dict[str, float]:
    """Where the predicted peak of ``cell`` at ``batch`` goes, GiB; the values sum to the row's ``peak_gib``.
    Keys: parameters, gradients, optimizer_states, engine_buffers, autocast_weight_copies, optimizer_step_temporaries,
    activations_image, activations_text, contrastive_loss, calibration_offset, cublas_workspace, cuda_context_nccl,
    allocator_slack."""
    mm, s, model = device.model, cell.setup(), cell.model
    shape = model_shape(model)
    states = state_bytes(shape, s, mm.device_type)
    parts = {"parameters": states.get("params", 0.0), "gradients": 0.0,
             "optimizer_states": states.get("optimizer", 0.0),
             "engine_buffers": states.get("buffers", 0.0) + states.get("gathered", 0.0), "autocast_weight_copies": 0.0,
             "optimizer_step_temporaries": 0.0, "activations_image": 0.0, "activations_text": 0.0,
             "contrastive_loss": 0.0, "calibration_offset": 0.0}
    if mm.forward_peak(model, s, batch) >= mm.step_peak(model, s):
        _, pts = mm.forward_parts(model, s, batch)
        alpha, beta = mm.calibration(model, s)
        i, (u, acts) = max(enumerate(pts), key=lambda p: p[1][0] + alpha * sum(p[1][1].values()))
        parts.update(gradients=0.0 if i == 0 else u, contrastive_loss=u if i == 0 else 0.0,
                     autocast_weight_copies=autocast_weight_bytes(shape, s), calibration_offset=beta,
                     activations_image=alpha * acts["image"], activations_text=alpha * acts["text"])
    else:
        comps = mm.components(model, s, batch)
        parts.update(gradients=states.get("grads", 0.0), optimizer_step_temporaries=comps["step_extra"])
    out = {k: v / GIB for k, v in parts.items()}
    terms = device.terms(cell)
    allocated = sum(parts.values()) + (terms.cublas_workspace if terms else 0.0)
    out["cublas_workspace"] = terms.cublas_workspace / GIB if terms else 0.0
    out.update(breakdown_gib(terms, allocated))
    return out


def plan_row(device: Device, cell: Cell, args: argparse.Namespace) -> Dict[str, Any]:
    """One row of ``plan.json`` (see the issue's field list; ``None`` where a value does not apply)."""
    cap = args.max_accum if cell.micro else args.max_batch
    g = 1 if cell.micro else args.granularity
    best = device.max_batch(cell, g, cap)
    batch = args.batch or best
    micro, k, contrastive = cell.rows_cols(batch)
    row: Dict[str, Any] = {
        "gpu": device.name, "model": cell.model, "stage": cell.stage, "precision": cell.precision,
        "checkpointing": cell.checkpointing, "attention": cell.attention, "loss": f"{cell.loss}-{cell.loss_impl}",
        "nodes": cell.nodes, "gpus_per_node": cell.gpus_per_node, "micro_batch": micro, "accum_steps": k,
        "contrastive_batch": contrastive, "fits": (batch <= best) if args.batch else best > 0,
        "max_micro_batch": best if not cell.micro else cell.micro, "max_accum_steps": best if cell.micro else None,
        "memory_gib": device.memory_gib,
        "peak_gib": device.peak_bytes(cell, batch) / GIB if batch else None,
        "breakdown_gib": breakdown(device, cell, batch) if batch else None,
        "step_time_s": None, "samples_per_s_per_gpu": None, "mfu": None, "gpu_hours": None,
        "calibrated_by": sorted({p["store"] for p in device.probes}) or None}
    step: Optional[StepTime] = None
    if batch and device.gpu is not None:
        step = predict_step(model_shape(cell.model), cell.setup(), batch, device.gpu, forward_gflops(cell.model),
                            cell.nodes, args.efficiency, args.fabric_gbps)
    if step is not None:
        row.update(step_time_s=step.step_s, samples_per_s_per_gpu=step.samples_per_s_per_gpu, mfu=step.mfu,
                   time_breakdown_s={"compute": step.compute_s, "exposed_communication": step.exposed_comm_s,
                                     "communication_total": step.comm_s, "optimizer": step.optimizer_s})
        if args.samples:
            row["gpu_hours"] = args.samples / step.samples_per_s_per_gpu / 3600
            row["wall_hours"] = row["gpu_hours"] / cell.world
    return row


def make_plan(args: argparse.Namespace) -> Dict[str, Any]:
    """``plan.json``'s content for parsed arguments (checked by :func:`_validate` first)."""
    cells = _validate(args)
    measure_uncached(cells)
    probes = store_probes(args.calibrate_from)
    rows = []
    for name in args.gpu:
        device = Device(name, probes, args.margin, args.budget_gib, args.gpu_catalog)
        rows += [plan_row(device, cell, args) for cell in cells]
    gpus = {r["gpu"]: find_gpu(r["gpu"], args.gpu_catalog) for r in rows if r["gpu"] != "cpu"}
    return {"command": "harness plan " + " ".join(shlex.quote(a) for a in args.argv),
            "date": datetime.date.today().isoformat(), "margin": args.margin, "samples": args.samples,
            "catalog": {n: {"memory_gib": g.memory_gib, "tflops": g.tflops, "hbm_gbps": g.hbm_gbps,
                            "intra_node": g.intra_node.__dict__, "inter_node": g.inter_node.__dict__,
                            "source": g.source, "memory_source": g.memory_source} for n, g in gpus.items()},
            "assumptions": {"efficiency": args.efficiency or EFFICIENCY, "fabric_gbps": args.fabric_gbps},
            "rows": rows}


def beside_measurement(records: List[Dict[str, Any]], store: Path, margin: float) -> List[str]:
    """Markdown lines for a GPU fit store's table: per measured cell, the largest measured fit, what the plan predicts
    for it without any probe (the catalog's defaults) and its error, and the batch recommended with ``margin`` kept
    free (the plan calibrated on the store). Empty for a CPU or a GPU the catalog does not know."""
    env = records[0].get("env", {}) if records else {}
    gpu = gpu_of_device(env.get("device", ""))
    if gpu is None:
        return []
    fresh = Device(gpu.name, [], margin)
    calibrated = Device(gpu.name, store_probes([str(store)]), margin)
    lines = ["", f"Plan beside measurement on {gpu.name} (`harness plan`; recommended: {margin:.0%} of memory kept "
             "free, calibrated on this store):", "", "| cell | largest measured fit | plan without probes | error | "
             "recommended |", "|---|---|---|---|---|"]
    for r in records:
        if r["how"] in ("measured", "emulated") and r["max_batch"] and not r.get("micro"):
            cell = Cell.from_record(r)
            g = r.get("granularity") or 8
            ahead = fresh.max_batch(cell, g, 1 << 16)
            error = (ahead - r["max_batch"]) / r["max_batch"]
            lines.append(f"| {r['cell']} | {r['max_batch']} | {ahead} | {error:+.0%} "
                         f"| {calibrated.max_batch(cell, g, r['max_batch'])} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """``harness plan``; returns the exit status (2 on bad input, naming the flag)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        plan = make_plan(args)
    except (ConfigError, ProbeInputError) as e:
        return refuse(e)
    from harness.fit.plan_report import write_plan

    out = Path(args.out)
    write_plan(plan, out)
    print((out / "plan.md").read_text())
    return ExitCode.OK
