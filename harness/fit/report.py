"""The memory-fit table: Markdown, CSV and a plot, from fit-probe cell and probe records.

The first eight columns are the ones researchers keep by hand today (model, batch size, nodes, GPUs per
node, effective batch size, cluster, partition, fit?); the rest say how each cell was run and obtained:
ZeRO stage / FSDP, precision, checkpointing, attention, device and memory, peak allocated and reserved
GiB, step time, samples/s, status with its reason, and whether the number is *measured*, *emulated*
(rank 0 of the full world on a fake process group) or *predicted* (the calibrated memory model). Every
cell gets two rows: the largest micro batch that fits and the next granularity step, which does not.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.fit.cells import FAILURES, TERMINAL, Cell, stage_label
from harness.fit.heatmap import write_heatmap
from harness.fit.plan import beside_measurement
from harness.fit.store import ResultsStore

HEADER = ["model", "batch size", "# nodes", "# GPUs per node", "effective batch size", "contrastive batch", "cluster",
          "partition", "fit?", "stage", "precision", "checkpointing", "attention", "loss", "device (memory)",
          "peak alloc GiB", "reserved GiB", "step time (s)", "samples/s", "status", "how"]
FAIL_LABEL = {"oom": "OOM", "hang": "hang", "error": "error", "unsupported": "unsupported",
              "predicted": "OOM, predicted", "scheduler-limit": "scheduler limit"}


def loss_label(cell: Cell, searched: Optional[int] = None) -> str:
    """``"clip dense"``, ``"siglip tiled (t=1024)"``, with accumulation ``"clip tiled (t=1024), K=8 x micro 64 with
    negatives"`` (``searched`` = K; without it the micro batch alone)."""
    text = f"{cell.loss} {cell.loss_impl}" + (f" (t={cell.tile})" if cell.loss_impl == "tiled" else "")
    if cell.micro:
        text += f", {f'K={searched} x ' if searched else ''}micro {cell.micro} accumulated with negatives"
    return text


def _params_m(model: str) -> str:
    from harness.fit.model_shape import model_shape

    return f"{model} ({model_shape(model).params / 1e6:.0f}M)"


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table_rows(cells: List[Dict[str, Any]], probes: Dict[str, Dict[int, Dict]], device: str, cluster: str,
               partition: str) -> List[List[str]]:
    """Two rows per cell (fits / first that does not), as strings in :data:`HEADER` order."""
    rows = []
    for c in cells:
        cell = Cell.from_record(c)

        def base(batch, cell=cell):
            """batch size (micro), effective (global) and contrastive batch of searched value ``batch``."""
            if not isinstance(batch, int):
                return [_params_m(cell.model), "-", str(cell.nodes), str(cell.gpus_per_node), "-", "-",
                        cluster or "-", partition or "-"]
            micro, k, contrastive = cell.rows_cols(batch)
            return [_params_m(cell.model), str(micro), str(cell.nodes), str(cell.gpus_per_node),
                    str(micro * k * cell.world), str(contrastive), cluster or "-", partition or "-"]

        knobs = [stage_label(c["stage"]), c["precision"],
                 "off" if not c["checkpointing"] else ("every block" if c["checkpointing"] == 1
                                                      else f"every {c['checkpointing']} blocks"), c["attention"],
                 loss_label(cell), device_label(c["env"]) if c.get("env") else device]
        how = c["how"]
        if c["max_batch"]:
            p = probes.get(c["cell"], {}).get(c["max_batch"], {})
            peak = p.get("peak_gib", c.get("peak_gib"))
            predicted = how in ("predicted", "scheduler-limit")  # the memory model's answer, no probe
            k_knobs = knobs[:4] + [loss_label(cell, c["max_batch"] if cell.micro else None)] + knobs[5:]
            rows.append(base(c["max_batch"]) + ["✅ (predicted)" if predicted else "✅"]
                        + k_knobs + [_fmt(peak, ".2f"), _fmt(p.get("reserved_gib"), ".2f"),
                                   _fmt(p.get("step_time_s"), ".3f"), _fmt(p.get("samples_per_s"), ".1f"),
                                   "predicted fit" if predicted else "fits", how])
        fail = c.get("first_fail")
        if c["status"] in TERMINAL:
            label, reason = FAIL_LABEL[c["status"]], c["reason"]
            batch = fail or (c["max_batch"] + 1 if c["max_batch"] else "-")
        elif fail is not None:
            p = probes.get(c["cell"], {}).get(fail, {})
            kind = "scheduler-limit" if how == "scheduler-limit" else (p.get("outcome") or c["status"])
            label, reason, batch = FAIL_LABEL.get(kind, kind), p.get("reason") or c["reason"], fail
        else:
            continue
        f_knobs = knobs[:4] + [loss_label(cell, batch if cell.micro and isinstance(batch, int) else None)] + knobs[5:]
        rows.append(base(batch) + [f"❌ ({label})"] + f_knobs + ["-", "-", "-", "-", reason.replace("|", "/")[:200],
                                                                 how])
    return rows


def _probe_index(probes: List[Dict[str, Any]]) -> Dict[str, Dict[int, Dict]]:
    out: Dict[str, Dict[int, Dict]] = {}
    for p in probes:
        out.setdefault(p["cell"], {})[p["batch"]] = p
    return out


def write_reports(cells: List[Dict[str, Any]], out: Path, args, model=None, env: Optional[Dict] = None) -> None:
    """``table.md``, ``table.csv``, ``peak_memory_vs_batch.png``, ``fit_heatmap.png`` (+ ``.json``) and (with a
    memory model) ``memory_model.json``. ``env`` is the sweep's environment fingerprint (default: the first cell
    record's)."""
    out = Path(out)
    all_probes = ResultsStore(out, {}).all_records()[0]
    env = env or (cells[0].get("env", {}) if cells else {})
    cell_env = {c["cell"]: c.get("env", env) for c in cells}  # merged sweeps: each cell with its node's device
    probes = _probe_index([p for p in all_probes if p["cell"] in cell_env and p.get("env") == cell_env[p["cell"]]])
    mem, budget = env.get("device_memory_gib"), env.get("budget_gib")
    device = device_label(env)
    rows = table_rows(cells, probes, device, getattr(args, "cluster", ""), getattr(args, "partition", ""))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    summary = probe_summary(cells)
    command = f"`{args.command}`" if getattr(args, "command", None) else "(the sweep's command is not in its store)"
    if getattr(args, "rerendered_with", None):
        command += f", re-rendered with `{args.rerendered_with}`"
    text = ["# Memory-fit table", "", command, "",
            f"Device: {device}. Peak alloc: CUDA max allocated on a GPU, tracked tensor peak on a CPU "
            "(max over ranks). Granularity: "
            f"{getattr(args, 'granularity', '?')}; each probe ran {env.get('probe_steps', '?')} optimizer steps "
            "(the first excluded from the step time).", ""] + lines + ["", summary]
    text += beside_measurement(cells, out, getattr(args, "margin", 0.05))
    model_lines = []
    if model is not None and model.points:
        report = model.error_report()
        worst = {k: max(abs(r[k]) for r in report) for k in ("analytic_error", "cross_error", "error")}
        model_lines = [f"Memory model against {len(report)} measured probes, max |predicted - measured| / measured: "
                       f"{worst['analytic_error']:.1%} analytic (uncalibrated), {worst['cross_error']:.1%} for a cell "
                       f"calibrated on the other cells only, {worst['error']:.1%} calibrated on all probes."]
        (out / "memory_model.json").write_text(json.dumps({"max_abs_analytic_error": worst["analytic_error"],
                                                            "max_abs_cross_error": worst["cross_error"],
                                                            "max_abs_error": worst["error"], "probes": report},
                                                           indent=2))
    (out / "table.md").write_text("\n".join(text + model_lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    _plot(cells, probes, out / "peak_memory_vs_batch.png", (budget or mem), device)
    write_heatmap(cells, out / "fit_heatmap.png", "Largest micro batch per cell (contrastive batch for accumulation "
                  f"rows)\n{device}")


def device_label(env: Dict[str, Any]) -> str:
    """``"NVIDIA H100 80GB HBM3 (79.6 GiB)"``, or with a budget ``"cpu (...) (budget 0.5 GiB of 23.5 GiB)"``."""
    budget, mem = env.get("budget_gib"), env.get("device_memory_gib")
    return f"{env.get('device', '?')} ({f'budget {budget:g} GiB of ' if budget else ''}{_fmt(mem, '.1f')} GiB)"


def probe_summary(cells: List[Dict[str, Any]]) -> str:
    """Probes per searched cell, for cells that started with a calibrated memory model, against a plain
    doubling search replayed on the same boundaries."""
    searched = [c for c in cells if c["how"] in ("measured", "emulated") and c["status"] not in TERMINAL]
    if not searched:
        return "No cell was searched by probes."
    avg = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    cal = [c for c in searched if c.get("calibrated_start")]
    dbl = [c["doubling_probes"] for c in searched if c.get("doubling_probes")]
    parts = [f"Probes per cell: {avg([c['probes_total'] for c in searched]):.2f} on average over {len(searched)} "
             "searched cells"]
    if cal:
        parts.append(f"{avg([c['probes_total'] for c in cal]):.2f} over the {len(cal)} that started from a "
                     "calibrated memory model")
    if dbl:
        parts.append(f"a plain doubling search from the granularity would need {avg(dbl):.2f} (replayed on the "
                     "found boundaries)")
    return "; ".join(parts) + "."


def _plot(cells, probes, path: Path, limit_gib: Optional[float], device_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    colours, styles = plt.get_cmap("tab20").colors, ("-", "--", ":", "-.")  # 80 distinct lines before a repeat
    for i, c in enumerate(cells):
        pts = sorted((b, p["peak_gib"]) for b, p in probes.get(c["cell"], {}).items()
                     if p["outcome"] == "fits" and p.get("peak_gib") is not None)
        fails = sorted(b for b, p in probes.get(c["cell"], {}).items() if p["outcome"] in FAILURES)
        if not pts and not fails:
            continue
        label = c["cell"].replace("|", " ")
        line = ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=label,
                       color=colours[i % len(colours)], linestyle=styles[i // len(colours) % len(styles)])[0] \
            if pts else None
        if fails and limit_gib:
            ax.scatter(fails, [limit_gib] * len(fails), marker="x", color=line.get_color() if line else None)
    if limit_gib:
        ax.axhline(limit_gib, color="red", linestyle="--", label=f"limit {limit_gib:.2f} GiB")
    ax.set_xlabel("micro batch per rank")
    ax.set_ylabel("peak memory per rank (GiB)")
    ax.set_title(f"Peak memory against micro batch, per cell (x: did not fit)\n{device_label}", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_stores(folders: List[Path], out: Path) -> List[Dict[str, Any]]:
    """Copy the records of several sweep folders (e.g. one per Slurm node) into ``out``'s store and return
    the merged cells (the last record of each cell wins). Nothing in the source folders is changed."""
    out.mkdir(parents=True, exist_ok=True)
    cells: Dict[str, Dict] = {}
    with open(out / "probes.jsonl", "a") as fp, open(out / "cells.jsonl", "a") as fc:
        for folder in folders:
            probes, cell_recs = ResultsStore(folder, {}).all_records()
            for p in probes:
                fp.write(json.dumps(p) + "\n")
            for c in cell_recs:
                fc.write(json.dumps(c) + "\n")
                cells[c["cell"]] = c
    return list(cells.values())
