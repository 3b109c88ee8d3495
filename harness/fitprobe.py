"""``harness fit-probe``: the largest per-GPU micro batch that trains, for every cell of a sweep.

A cell is (model, ZeRO stage or FSDP, precision, activation checkpointing, attention backend, nodes, GPUs
per node). For each cell the search starts at the memory model's prediction (:mod:`harness.memmodel`),
(less the model's uncertainty, 3% of the batch, when that is a granularity step or more: the first probe
then most likely fits and gives a measured peak to anchor the next estimate on), grows geometrically
(at most x2 per probe, sooner to the anchored estimate) while probes fit, backs off below a failure
(by the uncertainty, doubling with each further failure), then bisects to the granularity (at the
anchored estimate where it falls inside the bracket): the answer is a batch that fits next to one, a granularity step larger, that
does not. Every probe is a fresh process group running the real trainer (``accelerate launch`` /
``torchrun`` / ``python train.py``) for ``--steps`` full optimizer steps (>= 2: AdamW allocates its state
at the first step) on synthetic batches of the model's exact shapes. Each rank writes its outcome
(``status/rank_*.json``); a rank that runs out of memory ends the job (the launcher stops the other
ranks), so all ranks end with one agreed outcome; a timeout kills the job's process group and records a
hang. Measured peaks calibrate the memory model as the sweep goes.

How each cell is obtained:

* **measured**: all its ranks run here (``nodes x GPUs per node`` <= the GPUs of this machine, or
  ``--cpu-processes`` in CPU mode; several nodes with ``--launcher slurm`` inside an allocation);
* **emulated**: more ranks than exist: one process is rank 0 of the full world on PyTorch's fake process
  group (``train.emulate_world_size``), so shards, buckets and logits have their real per-rank sizes;
  DeepSpeed stages and FSDP only (plain DDP cannot run on the fake group);
* **predicted**: the calibrated memory model alone (DDP beyond the local ranks, or beyond ``--max-nodes``,
  the scheduler's limit).

CPU mode (no GPU): ``--budget-gib`` is each process's memory; tensor bytes past it raise an out-of-memory
error in the probe (:mod:`harness.memory`), exactly as a GPU would. On a GPU, ``--budget-gib`` emulates a
smaller card (the caching allocator's memory fraction).

Outputs in ``--out``: ``probes.jsonl`` and ``cells.jsonl`` (the store: a killed sweep resumes; a changed
environment is noticed), ``table.md`` / ``table.csv`` (the memory-fit table), ``peak_memory_vs_batch.png``,
``memory_model.json`` (prediction errors against every measured probe).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from harness.config import GIB, PRECISIONS, host_memory_gib
from harness.memmodel import STAGES, MemoryModel, Setup

REPO_ROOT = Path(__file__).resolve().parent.parent
FAILURES = ("oom", "hang")  # outcomes that bound the search from above
ESTIMATE_UNCERTAINTY = 0.03  # relative batch error of the calibrated memory model across cells (measured on CPU)
TERMINAL = ("error", "unsupported")  # outcomes that end a cell: not a memory boundary


class ProbeInputError(ValueError):
    """Bad fit-probe input; the message names the flag and the allowed values."""


@dataclass(frozen=True)
class Cell:
    """One cell of the memory-fit table."""

    model: str
    stage: str
    precision: str
    checkpointing: int
    attention: str
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def key(self) -> str:
        return (f"{self.model}|stage={self.stage}|{self.precision}|ckpt={self.checkpointing}|{self.attention}|"
                f"{self.nodes}x{self.gpus_per_node}")

    @property
    def family(self) -> tuple:
        """Cells sharing the model's memory behaviour: the memory model's calibration family."""
        return MemoryModel.family(self.model, self.setup())

    def setup(self) -> Setup:
        return Setup(self.stage, self.precision, self.checkpointing, self.attention, self.world)

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "Cell":
        """The cell of a ``cells.jsonl`` record."""
        return cls(rec["model"], rec["stage"], rec["precision"], rec["checkpointing"], rec["attention"],
                   rec["nodes"], rec["gpus_per_node"])


# --------------------------------------------------------------------------- devices and environment

def local_device() -> Dict[str, Any]:
    """This machine's accelerator, read without creating a CUDA context in this (parent) process:
    ``nvidia-smi`` for GPUs, else the CPU and its memory."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            gpus = [ln.split(",") for ln in out.strip().splitlines() if ln.strip()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                gpus = [gpus[int(i)] for i in visible.split(",") if i.strip().isdigit() and int(i) < len(gpus)]
            if gpus:
                return {"type": "cuda", "name": gpus[0][0].strip(), "memory_gib": float(gpus[0][1]) / 1024,
                        "count": len(gpus)}
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass
    return {"type": "cpu", "name": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "memory_gib": host_memory_gib(), "count": 0}


def environment(device: Dict[str, Any], budget_gib: Optional[float], steps: int) -> Dict[str, Any]:
    """The fingerprint stored with every record: results from another device, budget, probe length or
    library versions are not reused."""
    versions = {}
    for pkg in ("torch", "deepspeed", "accelerate", "open_clip_torch", "timm"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"device": device["name"], "device_memory_gib": round(device["memory_gib"], 2), "budget_gib": budget_gib,
            "probe_steps": steps, **versions}


# --------------------------------------------------------------------------- input

def _int_list(flag: str, text: str, minimum: int) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProbeInputError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ProbeInputError(f"{flag}: expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def _choices(flag: str, text: str, allowed) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ProbeInputError(f"{flag}: {', '.join(map(repr, bad)) or 'nothing given'} not allowed; allowed: "
                              f"{', '.join(allowed)}")
    return values


def build_cells(args) -> List[Cell]:
    """Expand the flags into cells (in the order given).

    Raises:
        ProbeInputError: an unknown model, stage, precision or attention backend, a GPU or node count that
            is not a positive integer, a negative checkpointing interval.
    """
    import models
    from models.attention import ATTENTION_BACKENDS

    names = _choices("--models", args.models, models.list_models())
    stages = _choices("--stages", args.stages, list(STAGES))
    precisions = _choices("--precisions", args.precisions, PRECISIONS)
    checkpointing = _int_list("--checkpointing", args.checkpointing, 0)
    attention = _choices("--attention", args.attention, ATTENTION_BACKENDS)
    gpus = _int_list("--gpus-per-node", args.gpus_per_node, 1)
    nodes = _int_list("--nodes", args.nodes, 1)
    return [Cell(m, st, p, c, a, n, g) for m in names for st in stages for p in precisions for c in checkpointing
            for a in attention for n in nodes for g in gpus]


def check_budget(budget_gib: Optional[float], device: Dict[str, Any]) -> None:
    """Raises ProbeInputError: no budget in CPU mode, or a budget above the device's memory."""
    if budget_gib is None:
        if device["type"] == "cpu":
            raise ProbeInputError("--budget-gib: required without a GPU (each probe process's memory, in GiB)")
        return
    if not budget_gib > 0:
        raise ProbeInputError(f"--budget-gib: must be > 0, got {budget_gib}")
    if budget_gib > device["memory_gib"]:
        raise ProbeInputError(f"--budget-gib: {budget_gib:g} GiB is more than the {device['name']}'s "
                              f"{device['memory_gib']:.1f} GiB")


# --------------------------------------------------------------------------- one probe

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


def probe_args(cell: Cell, batch: int, how: str, run_dir: Path, args) -> List[str]:
    """``train.py`` arguments of one probe: synthetic batches of the model's shapes, ``--steps`` steps."""
    from harness.launch import synthetic_train_args

    out = synthetic_train_args(cell.model, batch, args.steps, cell.world, run_dir, warmup_steps=1) + [
        "--max-steps", str(args.steps), "--precision", cell.precision, "--attention", cell.attention,
        "--grad-checkpointing", str(cell.checkpointing), "train.log_every_steps=1", "checkpoint.every_steps=0",
        "checkpoint.save_final=false", "eval.zeroshot_data=null", "train.track_memory=true"]
    if args.budget_gib is not None:
        out.append(f"train.memory_budget_gib={args.budget_gib}")
    if how == "emulated":  # one process as rank 0 of the cell's world
        out.append(f"train.emulate_world_size={cell.world}")
    return out


def classify(res) -> Tuple[str, str]:
    """``(outcome, reason)`` of a finished child job (see :class:`harness.launch.ChildRun`): all ranks'
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


def run_probe(cell: Cell, batch: int, how: str, args) -> Dict[str, Any]:
    """Run one probe as a fresh child job; returns the probe record (outcome, peak GiB, step time ...)."""
    from harness.launch import run_training

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
            "samples_per_s": s.get("samples_per_s"), "device_memory_gib": s.get("device_memory_gib"),
            "ranks": {str(r): st["status"] for r, st in sorted(res.statuses.items())},
            "seconds": round(res.seconds, 1), "returncode": res.returncode}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


# --------------------------------------------------------------------------- search

def round_down(value: float, g: int) -> int:
    return int(value // g) * g


def search_cell(cell: Cell, how: str, model: MemoryModel, limit_bytes: float, g: int, cap: int,
                probe: Callable[[int], Dict[str, Any]], known: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Find the largest multiple of ``g`` (<= ``cap``) that fits, starting from the memory model's prediction.

    ``known`` are probes of this cell from an earlier, interrupted sweep (reused, not re-run). Returns the
    cell record: ``max_batch`` (0 if even ``g`` does not fit), ``first_fail``, ``status``, ``reason``,
    ``probes`` (run now) and ``probes_total``.
    """
    setup = cell.setup()
    outcomes: Dict[int, Dict[str, Any]] = {p["batch"]: p for p in known}
    ran = 0
    while True:
        terminal = [p for p in outcomes.values() if p["outcome"] in TERMINAL]
        lo, hi = _bounds(outcomes)
        if terminal:
            t = terminal[0]
            return _cell_record(cell, how, lo, hi, t["outcome"], t["reason"], ran, len(outcomes), outcomes)
        if lo is not None and ((hi is not None and hi - lo <= g) or lo >= cap):
            break
        if lo is None and hi is not None and hi <= g:
            break
        est = _estimate(model, cell, setup, limit_bytes, g, cap, outcomes)
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
        if b in outcomes:  # cannot happen with the bounds above; guard against a loop
            break
        rec = probe(b)
        ran += 1
        outcomes[b] = rec
        calibrate(model, cell, rec)
    lo, hi = _bounds(outcomes)
    if lo is None:
        return _cell_record(cell, how, None, hi, outcomes[hi]["outcome"], outcomes[hi]["reason"], ran,
                            len(outcomes), outcomes)
    if hi is None:
        return _cell_record(cell, how, lo, None, "fits", f"reached the --max-batch cap ({cap})", ran, len(outcomes),
                            outcomes)
    return _cell_record(cell, how, lo, hi, "fits", f"{hi} does not: {outcomes[hi]['outcome']}", ran, len(outcomes),
                        outcomes)


def _bounds(outcomes: Dict[int, Dict[str, Any]]) -> Tuple[Optional[int], Optional[int]]:
    """``(largest batch that fit, smallest that ran out of memory or hung)``, None where there is none."""
    fits = [b for b, p in outcomes.items() if p["outcome"] == "fits"]
    fails = [b for b, p in outcomes.items() if p["outcome"] in FAILURES]
    return (max(fits) if fits else None), (min(fails) if fails else None)


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


def _cell_record(cell: Cell, how: str, lo, hi, status: str, reason: str, ran: int, total: int,
                 outcomes: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    best = outcomes.get(lo, {}) if lo is not None else {}
    return {"cell": cell.key, **asdict(cell), "world": cell.world, "how": how, "status": status, "reason": reason,
            "max_batch": lo or 0, "first_fail": hi, "probes": ran, "probes_total": total,
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
    rec = _cell_record(cell, how, b or None, (b + g) if b < cap else None, "predicted", reason, 0, 0, {})
    rec["peak_gib"] = model.predict(cell.model, cell.setup(), b) / GIB if b else None
    return rec


# --------------------------------------------------------------------------- CLI

def parse_args(argv: List[str]):
    p = argparse.ArgumentParser(prog="harness fit-probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated registered models (required unless --merge)")
    p.add_argument("--stages", default="2", help=f"comma-separated, of: {', '.join(STAGES)} (ddp: plain PyTorch "
                   "DDP; 0-3: DeepSpeed ZeRO; fsdp / fsdp-sgo: FSDP2 full shard / shard-grad-op)")
    p.add_argument("--precisions", default="bf16", help="comma-separated, of: fp32, bf16, fp16")
    p.add_argument("--checkpointing", default="0", help="comma-separated: 0 off, k = every k-th block")
    p.add_argument("--attention", default="sdpa", help="comma-separated attention backends (math = flash off)")
    p.add_argument("--gpus-per-node", default="1", help="comma-separated positive integers")
    p.add_argument("--nodes", default="1", help="comma-separated positive integers")
    p.add_argument("--budget-gib", type=float, help="memory per process in GiB (required in CPU mode; on a GPU it "
                   "emulates a smaller card)")
    p.add_argument("--granularity", type=int, default=8, help="micro batches are multiples of this")
    p.add_argument("--max-batch", type=int, default=1 << 16, help="largest micro batch tried")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per probe (>= 2; the first is warm-up)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a probe counts as a hang")
    p.add_argument("--cpu-processes", type=int, default=2, help="CPU mode: ranks that may run at once here")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="slurm: multi-node cells run with srun across the allocation's nodes")
    p.add_argument("--max-nodes", type=int, help="the partition's node limit: larger cells are 'scheduler limit'")
    p.add_argument("--cluster", default=os.environ.get("SLURM_CLUSTER_NAME", ""), help="for the table")
    p.add_argument("--partition", default=os.environ.get("SLURM_JOB_PARTITION", ""), help="for the table")
    p.add_argument("--select", choices=("all", "single-node", "multi-node"), default="all",
                   help="probe only single-node or only multi-node cells (the phases of slurm/fit_probe.sbatch)")
    p.add_argument("--shard", help="I/K: probe only every K-th cell starting at I (one node of a Slurm sweep)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge these sweep folders into --out and render")
    p.add_argument("--report", action="store_true", help="only render the table of the store in --out again")
    p.add_argument("--out", required=True, help="output folder (the store; resumable)")
    args = p.parse_args(argv)
    args.command = "harness fit-probe " + " ".join(argv)
    args.probe_env = {}
    return args


def validate_args(args) -> Tuple[List[Cell], Dict[str, Any]]:
    """Everything checked before any probe runs. Raises ProbeInputError."""
    if not args.models:
        raise ProbeInputError("--models: required (comma-separated registered models)")
    cells = build_cells(args)
    if args.select != "all":
        cells = [c for c in cells if (c.nodes == 1) == (args.select == "single-node")]
    device = local_device()
    check_budget(args.budget_gib, device)
    if args.granularity < 1:
        raise ProbeInputError(f"--granularity: must be a positive integer, got {args.granularity}")
    if args.max_batch < args.granularity:
        raise ProbeInputError(f"--max-batch: must be >= --granularity ({args.granularity}), got {args.max_batch}")
    if args.steps < 2:
        raise ProbeInputError(f"--steps: must be >= 2 (AdamW allocates its state at the first step), got {args.steps}")
    if args.cpu_processes < 1:
        raise ProbeInputError(f"--cpu-processes: must be a positive integer, got {args.cpu_processes}")
    if args.max_nodes is not None and args.max_nodes < 1:
        raise ProbeInputError(f"--max-nodes: must be a positive integer, got {args.max_nodes}")
    if args.shard:
        bad = ProbeInputError(f"--shard: expected I/K with 0 <= I < K, got {args.shard!r}")
        try:
            i, k = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise bad from None
        if not 0 <= i < k:
            raise bad
        cells = cells[i::k]
    return cells, device


def main(argv: Optional[List[str]] = None) -> int:
    from harness.fitreport import merge_stores, write_reports

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        return render_store(Path(args.out), args)
    if args.merge:
        merged = merge_stores([Path(d) for d in args.merge], Path(args.out))
        if merged:
            write_reports(merged, Path(args.out), args)
            print((Path(args.out) / "table.md").read_text())
        else:
            print(f"fit probe: nothing to merge in {', '.join(args.merge)}")
        return 0
    try:
        cells, device = validate_args(args)
    except ProbeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return sweep(cells, device, args)


def render_store(out: Path, args) -> int:
    """Render the reports of the store in ``out`` again (its last record per cell), with the memory model
    calibrated on the store's measured probes of each cell's environment."""
    from harness.fitreport import write_reports
    from harness.fitstore import ResultsStore

    probes, cells = ResultsStore(out, {}).all_records()
    latest = {c["cell"]: c for c in cells}
    if not latest:
        print(f"error: --report: no cells in {out}/cells.jsonl", file=sys.stderr)
        return 2
    records = list(latest.values())
    env = records[0].get("env", {})
    model = MemoryModel("cpu" if env.get("device", "").startswith("cpu") else "cuda")
    for p in probes:
        rec = latest.get(p["cell"])
        if rec is not None and p.get("env") == rec.get("env"):
            calibrate(model, Cell.from_record(rec), p)
    args.granularity = records[0].get("granularity", args.granularity)
    args.rerendered_with, args.command = args.command, records[0].get("command")
    write_reports(records, out, args, model, env)
    print((out / "table.md").read_text())
    return 0


def sweep(cells: List[Cell], device: Dict[str, Any], args) -> int:
    """Run (or resume) the sweep over ``cells`` and write the store and the reports."""
    if not cells:
        print("fit probe: no cells to probe (check --select / --shard)")
        return 0
    from harness.fitreport import write_reports
    from harness.fitstore import ResultsStore

    out = Path(args.out).resolve()
    args.out = str(out)
    env = environment(device, args.budget_gib, args.steps)
    store = ResultsStore(out, env)
    probes, finished, notes = store.load()
    for note in notes:
        print(f"note: {note}", flush=True)
    if device["type"] == "cpu":
        args.probe_env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    limit = (args.budget_gib or device["memory_gib"]) * GIB
    slots = device["count"] or args.cpu_processes
    model = MemoryModel("cuda" if device["type"] == "cuda" else "cpu")
    by_key = {c.key: c for c in cells}
    for key, recs in probes.items():  # calibrate from everything already measured in this environment
        for r in recs if key in by_key else []:
            calibrate(model, by_key[key], r)
    calibrated_families = {by_key[k].family for k in probes if k in by_key}
    print(f"fit probe: {len(cells)} cells on {device['name']} ({device['memory_gib']:.1f} GiB"
          f"{f', budget {args.budget_gib:g} GiB' if args.budget_gib else ''}); {len(finished)} already done; "
          f"store {out}", flush=True)
    records = []
    for cell in cells:
        if cell.key in finished:
            records.append(finished[cell.key])
            continue
        how = how_obtained(cell, slots, args.launcher, args.max_nodes)
        calibrated = cell.family in calibrated_families
        if how == "scheduler-limit":
            rec = predicted_record(cell, how, model, limit, args.granularity, args.max_batch,
                                   f"scheduler limit: the partition allows {args.max_nodes} nodes")
        elif how == "predicted":
            rec = predicted_record(cell, how, model, limit, args.granularity, args.max_batch,
                                   f"{cell.world} ranks of plain DDP cannot run or be emulated here")
        else:
            def probe(b, cell=cell, how=how):
                r = run_probe(cell, b, how, args)
                store.add_probe(r)
                peak = f"{r['peak_gib']:.3f} GiB" if r.get("peak_gib") is not None else "-"
                print(f"  {cell.key} batch {b}: {r['outcome']} (peak {peak}, {r['seconds']:.0f} s)"
                      f"{'  ' + r['reason'][:160] if r['reason'] else ''}", flush=True)
                return r

            rec = search_cell(cell, how, model, limit, args.granularity, args.max_batch, probe,
                              probes.get(cell.key, []))
        rec.update(calibrated_start=calibrated, granularity=args.granularity, command=args.command)
        if rec["status"] not in TERMINAL and rec["max_batch"]:
            rec["doubling_probes"] = doubling_probes(rec["max_batch"], rec["first_fail"], args.granularity,
                                                     args.max_batch)
        store.add_cell(rec)
        calibrated_families.add(cell.family)
        records.append(rec)
        print(f"{cell.key}: {rec['status']} max micro batch {rec['max_batch']} ({how}, {rec['probes_total']} probes)"
              f"{'  ' + rec['reason'] if rec['reason'] else ''}", flush=True)
    write_reports(records, out, args, model, env)
    print((out / "table.md").read_text(), flush=True)
    return 0
