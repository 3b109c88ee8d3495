"""``harness plan``'s files: ``plan.json`` (every row), ``plan.csv`` (the flat columns), ``plan.md`` (the table a
researcher reads) and ``plan.png`` (the largest micro batch per model and stage, one panel per GPU and cluster
shape). Written through a temporary file each, so an interrupted write leaves the previous plan whole."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List

from harness.fit.cells import stage_label

COLUMNS = ("gpu", "model", "stage", "precision", "checkpointing", "attention", "loss", "nodes", "gpus_per_node",
           "micro_batch", "accum_steps", "contrastive_batch", "fits", "max_micro_batch", "max_accum_steps", "peak_gib",
           "step_time_s", "samples_per_s_per_gpu", "mfu", "gpu_hours")


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(plan: Dict[str, Any]) -> str:
    """The plan as a Markdown table with its command, assumptions and the largest row's memory breakdown."""
    lines = [f"# Plan ({plan['date']})", "", f"`{plan['command']}`", "",
             f"Memory kept free: {plan['margin']:.0%} of each GPU's. Predicted, not measured: see docs/plan.md for "
             "the model and its error against published GPU figures.", "",
             "| GPU | model | engine | precision | ckpt | attention | loss | nodes x GPUs | micro batch | fits | "
             "max micro batch | peak GiB | step s | samples/s/GPU | MFU | GPU-hours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan["rows"]:
        accum = f" x {r['accum_steps']}" if r["accum_steps"] > 1 else ""
        best = r["max_micro_batch"]
        if r["max_accum_steps"] is not None:
            best = f"{best} x {r['max_accum_steps']}"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        cells = [r["gpu"], r["model"], stage_label(r["stage"]), r["precision"], r["checkpointing"], r["attention"],
                 r["loss"], f"{r['nodes']} x {r['gpus_per_node']}", f"{r['micro_batch']}{accum}",
                 "yes" if r["fits"] else "no", best, _f(r["peak_gib"], ".2f"), _f(r["step_time_s"], ".3f"),
                 _f(r["samples_per_s_per_gpu"], ".0f"), mfu, _f(r["gpu_hours"], ".4g")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    shown = [r for r in plan["rows"] if r["breakdown_gib"]]
    if shown:
        r = max(shown, key=lambda x: x["peak_gib"])
        lines += ["", f"Breakdown of the largest peak ({r['gpu']}, {r['model']}, {stage_label(r['stage'])}, "
                  f"micro batch {r['micro_batch']}), GiB:", "", "| part | GiB |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in r["breakdown_gib"].items() if v]
        lines += [f"| **total** | {r['peak_gib']:.3f} |"]
    lines += ["", "Assumptions: " + json.dumps(plan["assumptions"]), ""]
    return "\n".join(lines)


def _plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["gpu"], r["nodes"], r["gpus_per_node"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (gpu, n, g) in zip(axes[0], panels):
        sub = [r for r in rows if (r["gpu"], r["nodes"], r["gpus_per_node"]) == (gpu, n, g)]
        models = list(dict.fromkeys(r["model"] for r in sub))
        stages = list(dict.fromkeys(r["stage"] for r in sub))
        width = 0.8 / max(len(stages), 1)
        for j, st in enumerate(stages):
            ys = [max((r["max_micro_batch"] if r["max_accum_steps"] is None else r["max_accum_steps"]) or 0
                      for r in sub if r["model"] == m and r["stage"] == st) for m in models]
            ax.bar([i + j * width for i in range(len(models))], [max(y, 0.5) for y in ys], width,
                   label=stage_label(st))
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{gpu}, {n} x {g}", fontsize=9)
        ax.set_ylabel("largest micro batch (predicted)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_plan(plan: Dict[str, Any], out: Path) -> None:
    """``plan.json``, ``plan.csv``, ``plan.md`` and ``plan.png`` in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "plan.json", json.dumps(plan, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in plan["rows"]:
        w.writerow([r.get(c) for c in COLUMNS])
    _write(out / "plan.csv", buf.getvalue())
    _write(out / "plan.md", markdown(plan))
    _plot(plan["rows"], out / "plan.png")
