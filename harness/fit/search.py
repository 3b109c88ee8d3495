"""The fit probe's search: one probe as a fresh child job, its agreed outcome, and the search of a cell for the
largest micro batch that trains (see :mod:`harness.fit.probe` for the method)."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from harness.core.paths import REPO_ROOT
from harness.core.units import GIB
from harness.fit.cells import FAILURES, TERMINAL, Cell, ProbeOptions
from harness.fit.cuda_memory import UNKNOWN_GPU, CudaTerms, calibrated_terms
from harness.fit.memory_model import STAGES, MemoryModel, Setup
from harness.train.child_job import run_training, synthetic_train_args

ESTIMATE_UNCERTAINTY = 0.03  # relative batch error of the calibrated memory model across cells (measured on CPU)


def how_obtained(cell: Cell, local_slots: int, launcher: str, max_nodes: Optional[int]) -> str:
    """``measured`` | ``emulated`` | ``predicted`` | ``scheduler-limit`` for ``cell`` on this machine."""
    if max_nodes is not None and cell.nodes > max_nodes:
        return "scheduler-limit"
    if cell.nodes == 1 and cell.world <= local_slots:
        return "measured"
    if launcher == "slurm" and cell.gpus_per_node <= local_slots and STAGES[cell.stage] is not None:
        return "measured"
    if STAGES[cell.stage] is not None:
        return "emulated"
    return "predicted"


def probe_args(cell: Cell, batch: int, how: str, run_dir: Path, args: ProbeOptions) -> List[str]:
    """``train.py`` arguments of one probe: synthetic batches of the model's shapes, ``--steps`` steps, the cell's
    loss; for an accumulation cell (``cell.micro``) ``batch`` is the count ``K`` of micro batches accumulated
    with negatives per optimizer step (global batch ``K x micro x world``)."""
    micro, k, contrastive = cell.rows_cols(batch)
    out = synthetic_train_args(cell.model, micro, args.steps * k, cell.world, run_dir, warmup_steps=1)
    if cell.micro:
        out += ["--global-batch-size", str(contrastive), "train.accum_negatives=true"]
    if (cell.loss, cell.loss_impl) != ("clip", "dense"):
        out += [f"loss.kind={cell.loss}", f"loss.impl={cell.loss_impl}", f"loss.tile_size={cell.tile}"]
    out += [
        "--max-steps", str(args.steps), "--precision", cell.precision, "--attention", cell.attention,
        "--grad-checkpointing", str(cell.checkpointing), "checkpoint.every_steps=0",
        "checkpoint.save_final=false", "eval.zeroshot_data=null", "train.track_memory=true",
        "train.oom_snapshot=true"]  # a GPU probe that runs out of memory leaves the allocator's snapshot
    if args.budget_gib is not None:
        out.append(f"train.memory_budget_gib={args.budget_gib}")
    if how == "emulated":  # one process as rank 0 of the cell's world
        out.append(f"train.emulate_world_size={cell.world}")
    return out


def classify(res) -> Tuple[str, str]:
    """``(outcome, reason)`` of a finished child job (see :class:`harness.train.child_job.ChildRun`): all ranks'
    statuses agree into one outcome; an out-of-memory on any rank makes the probe OOM."""
    if res.timed_out:
        return "hang", f"no result within the timeout ({res.seconds:.0f} s); the job was killed"
    ooms = [st for st in res.statuses.values() if st["status"] == "oom"]
    if ooms:
        return "oom", f"rank {ooms[0]['rank']}: {ooms[0]['message']}"
    if res.returncode == 0 and res.summary is not None:
        return "fits", ""
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ") and "out of memory" not in ln]
    if lines:  # the trainer refused the configuration (exit status 2): this device/engine cannot run the cell
        return "unsupported", lines[-1][len("error: "):]
    errors = [st for st in res.statuses.values() if st["status"] == "error"]
    if errors:
        return "error", f"rank {errors[0]['rank']}: {errors[0]['message']}"
    tail = [ln for ln in res.output.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return "error", f"exit status {res.returncode}: {tail[0][:300]}"


def run_probe(cell: Cell, batch: int, how: str, args: ProbeOptions) -> Dict[str, Any]:
    """Run one probe as a fresh child job; returns the probe record (outcome, peak GiB, step time ...)."""
    run_dir = Path(args.out).resolve() / "runs" / f"{_slug(cell.key)}-b{batch}"
    launch = STAGES[cell.stage]
    launch_cfg = str(REPO_ROOT / "ds_configs" / f"{launch}.yaml") if launch else None
    ranks = 1 if how == "emulated" else cell.world
    res = run_training(probe_args(cell, batch, how, run_dir, args), run_dir, launch_cfg, ranks, args.timeout,
                       launcher=args.launcher if how == "measured" and cell.nodes > 1 else "local",
                       nodes=cell.nodes, env=args.probe_env)
    outcome, reason = classify(res)
    s = res.summary or {}
    return {"cell": cell.key, "batch": batch, "outcome": outcome, "reason": reason, "how": how,
            "peak_gib": s.get("peak_mem_gib"), "peak_kind": s.get("peak_mem_kind"),
            "reserved_gib": s.get("peak_reserved_gib"), "step_time_s": s.get("avg_step_time_s"),
            "cuda_overhead_gib": s.get("cuda_overhead_gib"), "device_peak_gib": s.get("peak_device_gib"),
            "samples_per_s": s.get("samples_per_s"), "device_memory_gib": s.get("device_memory_gib"),
            "ranks": {str(r): st["status"] for r, st in sorted(res.statuses.items())},
            "seconds": round(res.seconds, 1), "returncode": res.returncode}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def round_down(value: float, g: int) -> int:
    return int(value // g) * g


def search_cell(cell: Cell, how: str, model: MemoryModel, limit_bytes: float, g: int, cap: int,
                probe: Callable[[int], Dict[str, Any]], known: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Find the largest multiple of ``g`` (<= ``cap``) that fits, starting from the memory model's prediction: probe
    the batch :func:`next_batch` proposes until it proposes none or a probe ends the cell (an error, an unsupported
    configuration), calibrating the model on every fitting probe.

    ``known`` are probes of this cell from an earlier, interrupted sweep (reused, not re-run). Returns the
    cell record: ``max_batch`` (0 if even ``g`` does not fit), ``first_fail``, ``status``, ``reason``,
    ``probes`` (run now) and ``probes_total``.
    """
    setup = cell.setup()
    outcomes: Dict[int, Dict[str, Any]] = {p["batch"]: p for p in known}
    ran = 0
    while not any(p["outcome"] in TERMINAL for p in outcomes.values()):
        b = next_batch(outcomes, lambda: _estimate(model, cell, setup, limit_bytes, g, cap, outcomes), g, cap)
        if b is None:
            break
        outcomes[b] = probe(b)
        ran += 1
        calibrate(model, cell, outcomes[b])
    lo, hi = _bounds(outcomes)
    terminal = [p for p in outcomes.values() if p["outcome"] in TERMINAL]
    if terminal:
        status = (terminal[0]["outcome"], terminal[0]["reason"])
    elif lo is None:
        status = (outcomes[hi]["outcome"], outcomes[hi]["reason"])
    elif hi is None:
        status = ("fits", f"reached the --max-batch cap ({cap})")
    else:
        status = ("fits", f"{hi} does not: {outcomes[hi]['outcome']}")
    return _cell_record(cell, how, (lo, hi), status, (ran, len(outcomes)), outcomes)


def next_batch(outcomes: Dict[int, Dict[str, Any]], estimate: Callable[[], int], g: int, cap: int) -> Optional[int]:
    """The search policy: the next batch (a multiple of ``g``) to probe given the ``outcomes`` so far, or None when
    the boundary is found (a fit next to a failure one step above, the cap reached, or ``g`` itself failing).

    ``estimate()`` is the memory model's largest fitting batch, sharpened by the cell's own measurements.
    """
    lo, hi = _bounds(outcomes)
    if lo is not None and ((hi is not None and hi - lo <= g) or lo >= cap):
        return None
    if lo is None and hi is not None and hi <= g:
        return None
    est = estimate()
    if lo is None and hi is None:
        # aim below the estimate by the model's uncertainty (when that is a granularity step or more), so
        # the first probe most likely fits and anchors the next estimate on a measured peak: a failure
        # carries no measurement. Where one step exceeds the uncertainty, aim at the estimate itself.
        b = est - round_down(est * ESTIMATE_UNCERTAINTY, g)
        b = b if b > 0 else g
    elif lo is None:  # only failures so far: back off below the smallest failure, by the uncertainty, doubling
        misses = sum(1 for p in outcomes.values() if p["outcome"] in FAILURES)
        b = hi - g * max(1, math.ceil(hi * ESTIMATE_UNCERTAINTY * 2 ** (misses - 1) / g))
    elif hi is None:  # only fits so far: grow, at most x2 per probe
        b = min(max(est, lo + g), 2 * lo, cap)
    else:  # bracketed: the model's estimate if it lies strictly inside, else bisect
        b = est if lo < est < hi else round_down((lo + hi) / 2, g)
        b = min(max(b, lo + g), hi - g)
    b = max(g, round_down(b, g))
    return None if b in outcomes else b  # (cannot happen with the bounds above; a guard against a loop)


def _bounds(outcomes: Dict[int, Dict[str, Any]]) -> Tuple[Optional[int], Optional[int]]:
    """``(largest batch that fit, smallest that ran out of memory or hung)``, None where there is none."""
    fits = [b for b, p in outcomes.items() if p["outcome"] == "fits"]
    fails = [b for b, p in outcomes.items() if p["outcome"] in FAILURES]
    return (max(fits) if fits else None), (min(fails) if fails else None)


def usable_limit_bytes(limit_bytes: float, device_type: str, probes: List[Dict[str, Any]],
                       terms: Optional[CudaTerms] = None) -> float:
    """What the memory model's prediction (peak *allocated* bytes) may reach on a device of ``limit_bytes``.

    A CPU's budget is the tracked tensor bytes themselves. A GPU holds more than PyTorch allocates: the CUDA
    context and NCCL buffers outside the caching allocator, its cuBLAS workspace, and the allocator's
    reserved-but-unallocated slack. They are taken from the largest fitting probe measured so far
    (:func:`harness.fit.cuda_memory.calibrated_terms`), else from ``terms``, the published defaults of a catalog
    GPU (:func:`harness.fit.cuda_memory.default_terms`: what ``harness plan`` uses, so a GPU cell's first probe is
    the plan's batch), else :data:`harness.fit.cuda_memory.UNKNOWN_GPU` (1 GiB, 5%).
    """
    if device_type != "cuda":
        return limit_bytes
    return calibrated_terms(terms or UNKNOWN_GPU, probes, "this sweep").usable_bytes(limit_bytes)


def calibrate(model: MemoryModel, cell: Cell, probe_record: Dict[str, Any]) -> None:
    """Feed a probe of ``cell`` that fitted and measured a peak to the memory model's calibration."""
    if probe_record["outcome"] == "fits" and probe_record.get("peak_gib"):
        model.add_measurement(cell.model, cell.setup(), probe_record["batch"], probe_record["peak_gib"] * GIB)


def _estimate(model: MemoryModel, cell: Cell, setup: Setup, limit_bytes: float, g: int, cap: int,
              outcomes: Dict[int, Dict[str, Any]]) -> int:
    """The memory model's largest fitting batch for ``cell``, sharpened by this cell's own measurements:
    with one fitting probe whose peak grows with the batch, the model only predicts the increase from that
    measured peak (constant offsets the model misses cancel); with two or more, the increase is rescaled
    to the measured growth between the two largest (a secant through the real curve, shaped by the model)."""
    measured = sorted((b, p["peak_gib"] * GIB) for b, p in outcomes.items()
                      if p["outcome"] == "fits" and p.get("peak_gib")
                      and model.is_forward_dominated(cell.model, setup, p["peak_gib"] * GIB))
    if not measured:
        return model.max_batch(cell.model, setup, limit_bytes, g, cap)
    b2, m2 = measured[-1]
    scale = 1.0
    if len(measured) >= 2:
        b1, m1 = measured[-2]
        growth = model.forward_peak(cell.model, setup, b2) - model.forward_peak(cell.model, setup, b1)
        if growth > 0 and m2 > m1:
            scale = (m2 - m1) / growth
    return model.max_batch(cell.model, setup, limit_bytes, g, cap, anchor=(b2, m2, scale))


def _cell_record(cell: Cell, how: str, bounds: Tuple[Optional[int], Optional[int]], status: Tuple[str, str],
                 probes: Tuple[int, int], outcomes: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """The cell record: ``bounds`` = (largest fitting batch, first failing), ``status`` = (status, reason),
    ``probes`` = (run now, in all)."""
    (lo, hi), (status, reason), (ran, total) = bounds, status, probes
    best = outcomes.get(lo, {}) if lo is not None else {}
    micro, k, contrastive = cell.rows_cols(lo or 0)
    return {"cell": cell.key, **asdict(cell), "world": cell.world, "how": how, "status": status, "reason": reason,
            "max_batch": lo or 0, "first_fail": hi, "probes": ran, "probes_total": total,
            "micro_batch": micro, "accum_steps": k if cell.micro else 1, "contrastive_batch": contrastive,
            "peak_gib": best.get("peak_gib"), "reserved_gib": best.get("reserved_gib"),
            "step_time_s": best.get("step_time_s"), "samples_per_s": best.get("samples_per_s")}


def doubling_probes(max_batch: int, first_fail: Optional[int], g: int, cap: int) -> int:
    """Probes a plain doubling search (g, 2g, 4g, ... until a failure, then bisection to ``g``) needs for a
    cell whose boundary is known: replayed against the found boundary, not run."""
    n, b, lo = 0, g, 0
    while True:
        n += 1
        if b <= max_batch:
            lo = b
            if b >= cap:
                return n
            b = min(2 * b, cap)
        else:
            break
    hi = b
    while hi - lo > g:
        mid = round_down((lo + hi) / 2, g)
        n += 1
        lo, hi = (mid, hi) if mid <= max_batch else (lo, mid)
    return n


def predicted_record(cell: Cell, how: str, model: MemoryModel, limit_bytes: float, g: int, cap: int,
                     reason: str) -> Dict[str, Any]:
    """A cell no probe can run here: the calibrated memory model's answer."""
    b = model.max_batch(cell.model, cell.setup(), limit_bytes, g, cap)
    rec = _cell_record(cell, how, (b or None, (b + g) if b < cap else None), ("predicted", reason), (0, 0), {})
    rec["peak_gib"] = model.predict(cell.model, cell.setup(), b) / GIB if b else None
    return rec
