"""``harness fit-probe``: the largest per-GPU micro batch that trains, for every cell of a sweep. A cell is
(model, ZeRO stage or FSDP, precision, activation checkpointing, attention backend, nodes, GPUs per node). For
each cell the search starts at the memory model's prediction (:mod:`harness.fit.memory_model`), (less the model's
uncertainty, 3% of the batch, when that is a granularity step or more: the first probe then most likely fits
and gives a measured peak to anchor the next estimate on), grows geometrically (at most x2 per probe, sooner
to the anchored estimate) while probes fit, backs off below a failure (by the uncertainty, doubling with each
further failure), then bisects to the granularity (at the anchored estimate where it falls inside the
bracket): the answer is a batch that fits next to one, a granularity step larger, that does not. Every probe
is a fresh process group running the real trainer (``accelerate launch`` / ``torchrun`` / ``python train.py``)
for ``--steps`` full optimizer steps (>= 2: AdamW allocates its state at the first step) on synthetic batches
of the model's exact shapes. Each rank writes its outcome (``status/rank_*.json``); a rank that runs out of
memory ends the job (the launcher stops the other ranks), so all ranks end with one agreed outcome; a timeout
kills the job's process group and records a hang. Measured peaks calibrate the memory model as the sweep goes.

How each cell is obtained:

* **measured**: all its ranks run here (``nodes x GPUs per node`` <= the GPUs of this machine, or
  ``--cpu-processes`` in CPU mode; several nodes with ``--launcher slurm`` inside an allocation);
* **emulated**: more ranks than exist: one process is rank 0 of the full world on PyTorch's fake process
  group (``train.emulate_world_size``), so shards, buckets and logits have their real per-rank sizes;
  DeepSpeed stages and FSDP only (plain DDP cannot run on the fake group);
* **predicted**: the calibrated memory model alone (DDP beyond the local ranks, or beyond ``--max-nodes``,
  the scheduler's limit).

CPU mode (no GPU): ``--budget-gib`` is each process's memory; tensor bytes past it raise an out-of-memory
error in the probe (:mod:`harness.distributed.tensor_memory`), exactly as a GPU would. On a GPU, ``--budget-gib``
emulates a smaller card (the caching allocator's memory fraction).

Outputs in ``--out``: ``probes.jsonl`` and ``cells.jsonl`` (the store: a killed sweep resumes; a changed
environment is noticed), ``table.md`` / ``table.csv`` (the memory-fit table), ``peak_memory_vs_batch.png``,
``memory_model.json`` (prediction errors against every measured probe).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.core.errors import ExitCode, refuse
from harness.core.units import GIB
from harness.distributed.gpu_catalog import gpu_of_device
from harness.fit.cells import (
    TERMINAL,
    Cell,
    ProbeInputError,
    ProbeOptions,
    environment,
    probe_parser,
    validate_args,
)
from harness.fit.cuda_memory import default_terms
from harness.fit.memory_model import MemoryModel
from harness.fit.report import merge_stores, write_reports
from harness.fit.search import (
    calibrate,
    doubling_probes,
    how_obtained,
    predicted_record,
    run_probe,
    search_cell,
    usable_limit_bytes,
)
from harness.fit.store import ResultsStore

__all__ = ["main", "parse_args", "render_store", "sweep", "Cell", "ProbeOptions"]


def parse_args(argv: List[str]) -> ProbeOptions:
    """``harness fit-probe`` arguments as :class:`ProbeOptions` (the command line kept in ``command``)."""
    args = vars(probe_parser(__doc__).parse_args(argv))
    return ProbeOptions(**args, command="harness fit-probe " + " ".join(argv))


def main(argv: Optional[List[str]] = None) -> int:
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
        return ExitCode.OK
    try:
        cells, device = validate_args(args)
    except ProbeInputError as e:
        return refuse(e)
    return sweep(cells, device, args)


def render_store(out: Path, args: ProbeOptions) -> int:
    """Render the reports of the store in ``out`` again (its last record per cell), with the memory model
    calibrated on the store's measured probes of each cell's environment."""
    probes, cells = ResultsStore(out, {}).all_records()
    latest = {c["cell"]: c for c in cells}
    if not latest:
        return refuse(f"--report: no cells in {out}/cells.jsonl")
    records = list(latest.values())
    env = records[0].get("env", {})
    model = MemoryModel("cpu" if env.get("device", "").startswith("cpu") else "cuda")
    for p in probes:
        rec = latest.get(p["cell"])
        if rec is not None and p.get("env") == rec.get("env"):
            calibrate(model, Cell.from_record(rec), p)
    granularity = max((r.get("granularity", 0) for r in records if not r.get("micro")), default=0)
    args = args.replace(granularity=granularity or args.granularity, rerendered_with=args.command,
                        command=records[0].get("command"))
    write_reports(records, out, args, model, env)
    print((out / "table.md").read_text())
    return ExitCode.OK


def _probe_and_store(cell: Cell, how: str, args: ProbeOptions, store: ResultsStore, added: List[Dict[str, Any]],
                     batch: int) -> Dict[str, Any]:
    """Run one probe of ``cell`` at ``batch``, append it to the store and to ``added``, print one line; returns it."""
    r = run_probe(cell, batch, how, args)
    store.add_probe(r)
    added.append(r)
    peak = f"{r['peak_gib']:.3f} GiB" if r.get("peak_gib") is not None else "-"
    print(f"  {cell.key} batch {batch}: {r['outcome']} (peak {peak}, {r['seconds']:.0f} s)"
          f"{'  ' + r['reason'][:160] if r['reason'] else ''}", flush=True)
    return r


def sweep(cells: List[Cell], device: Dict[str, Any], args: ProbeOptions) -> int:
    """Run (or resume) the sweep over ``cells`` and write the store and the reports."""
    if not cells:
        print("fit probe: no cells to probe (check --select / --shard)")
        return ExitCode.OK
    out = Path(args.out).resolve()
    args = args.replace(out=str(out))
    env = environment(device, args.budget_gib, args.steps)
    store = ResultsStore(out, env)
    probes, finished, notes = store.load()
    for note in notes:
        print(f"note: {note}", flush=True)
    if device["type"] == "cpu":
        args = args.replace(probe_env={"CUDA_VISIBLE_DEVICES": "",
                                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    card = (args.budget_gib or device["memory_gib"]) * GIB  # what a device of this size holds
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
    records, added = [], []  # cell records; probes run by this sweep
    for cell in cells:
        if cell.key in finished:
            records.append(finished[cell.key])
            continue
        how = how_obtained(cell, slots, args.launcher, args.max_nodes)
        # the searched variable: the micro batch in steps of --granularity, or the accumulation count K in steps of 1
        g, cap = (1, args.max_accum) if cell.micro else (args.granularity, args.max_batch)
        calibrated = cell.family in calibrated_families
        measured = [p for recs in probes.values() for p in recs] + added
        gpu = gpu_of_device(device["name"]) if device["type"] == "cuda" else None
        limit = usable_limit_bytes(card, device["type"], measured,
                                   default_terms(gpu, cell.world, cell.stage) if gpu else None)
        if how == "scheduler-limit":
            rec = predicted_record(cell, how, model, limit, g, cap,
                                   f"scheduler limit: the partition allows {args.max_nodes} nodes")
        elif how == "predicted":
            rec = predicted_record(cell, how, model, limit, g, cap,
                                   f"{cell.world} ranks of plain DDP cannot run or be emulated here")
        else:
            probe = functools.partial(_probe_and_store, cell, how, args, store, added)
            rec = search_cell(cell, how, model, limit, g, cap, probe, probes.get(cell.key, []))
        rec.update(calibrated_start=calibrated, granularity=g, command=args.command)
        if rec["status"] not in TERMINAL and rec["max_batch"]:
            rec["doubling_probes"] = doubling_probes(rec["max_batch"], rec["first_fail"], g, cap)
        store.add_cell(rec)
        calibrated_families.add(cell.family)
        records.append(rec)
        print(f"{cell.key}: {rec['status']} max micro batch {rec['max_batch']} ({how}, {rec['probes_total']} probes)"
              f"{'  ' + rec['reason'] if rec['reason'] else ''}", flush=True)
    write_reports(records, out, args, model, env)
    print((out / "table.md").read_text(), flush=True)
    return ExitCode.OK
