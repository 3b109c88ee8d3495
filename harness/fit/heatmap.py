"""The memory-fit table as a heat map: the largest micro batch of every cell at a glance.

Rows are model x stage x precision x checkpointing (plus attention, loss and the accumulation's micro batch
where the sweep varies them), columns nodes x GPUs per node. Each cell shows its number (the largest micro
batch; for an accumulation cell, ``--accum-search``, the largest contrastive batch ``K x micro x world``) and
how it was obtained: **M** measured, **E** emulated (rank 0 of the full world on a fake process group),
**P** predicted by the calibrated memory model, **S** the scheduler's node limit (predicted), **!** a cell
that ended in an error or was unsupported (its reason is in the table). Colour is the number on a log
scale; the title names the device and the memory budget. The data drawn is written next to the picture
(``fit_heatmap.json``) so what the picture says can be checked without reading pixels.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.fit.cells import TERMINAL, Cell, stage_label

MARKS = {"measured": "M", "emulated": "E", "predicted": "P", "scheduler-limit": "S"}


def _row_label(cell: Cell, varied: Dict[str, bool]) -> str:
    parts = [cell.model, stage_label(cell.stage), cell.precision,
             "no ckpt" if not cell.checkpointing else f"ckpt {cell.checkpointing}"]
    if varied["attention"]:
        parts.append(cell.attention)
    if varied["loss"]:
        parts.append(f"{cell.loss}-{cell.loss_impl}")
    if cell.micro:
        parts.append(f"contrastive @ micro {cell.micro}")
    return " | ".join(parts)


def heatmap_data(cells: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The heat map's content from cell records: ``rows`` and ``columns`` labels (columns ``"NxG"``: nodes x
    GPUs per node, in increasing world size), ``values[r][c]`` (the largest micro batch, or contrastive batch
    for accumulation cells; None where the sweep has no such cell or nothing fitted) and ``marks[r][c]``
    (``M``/``E``/``P``/``S``, ``!`` for an error, ``""`` where there is no cell). The last record of a cell
    wins."""
    latest = {c["cell"]: c for c in cells}
    parsed = [(Cell.from_record(c), c) for c in latest.values()]
    varied = {"attention": len({p.attention for p, _ in parsed}) > 1,
              "loss": len({(p.loss, p.loss_impl) for p, _ in parsed}) > 1}
    rows: List[str] = []
    cols = sorted({(p.nodes, p.gpus_per_node) for p, _ in parsed}, key=lambda t: (t[0] * t[1], t))
    col_labels = [f"{n}x{g}" for n, g in cols]
    grid: Dict[tuple, Dict[str, Any]] = {}
    for cell, rec in parsed:
        label = _row_label(cell, varied)
        if label not in rows:
            rows.append(label)
        grid[label, (cell.nodes, cell.gpus_per_node)] = rec
    values, marks = [], []
    for r in rows:
        vrow, mrow = [], []
        for col in cols:
            rec = grid.get((r, col))
            if rec is None:
                vrow.append(None)
                mrow.append("")
                continue
            cell = Cell.from_record(rec)
            best = rec.get("max_batch") or 0
            vrow.append((cell.contrastive_batch(best) if cell.micro else best) or None)
            mrow.append("!" if rec["status"] in TERMINAL else MARKS.get(rec["how"], "?"))
        values.append(vrow)
        marks.append(mrow)
    return {"rows": rows, "columns": col_labels, "values": values, "marks": marks,
            "legend": {"M": "measured", "E": "emulated", "P": "predicted", "S": "scheduler limit (predicted)",
                       "!": "error or unsupported"}}


def write_heatmap(cells: List[Dict[str, Any]], path: Path, title: str) -> Optional[Dict[str, Any]]:
    """Draw :func:`heatmap_data` to ``path`` (PNG, matplotlib) and its data to ``path`` with ``.json``;
    returns the data (None when there are no cells)."""
    data = heatmap_data(cells)
    if not data["rows"]:
        return None
    data["title"] = title
    path.with_suffix(".json").write_text(json.dumps(data, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[math.log2(v) if v else np.nan for v in row] for row in data["values"]], dtype=float)
    n_rows, n_cols = vals.shape
    fig, ax = plt.subplots(figsize=(max(9.0, 3.2 + 1.3 * n_cols + 0.06 * max(len(r) for r in data["rows"])),
                                    1.4 + 0.42 * n_rows))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, aspect="auto")
    finite = vals[np.isfinite(vals)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            v, m = data["values"][i][j], data["marks"][i][j]
            if not m:
                continue
            dark = np.isfinite(vals[i, j]) and vals[i, j] < mid
            ax.text(j, i, f"{v if v else 0} {m}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black", fontweight="bold" if m == "M" else "normal")
    ax.set_xticks(range(n_cols), data["columns"])
    ax.set_yticks(range(n_rows), data["rows"], fontsize=7)
    ax.set_xlabel("nodes x GPUs per node")
    legend = ", ".join(f"{k}: {v}" for k, v in data["legend"].items())
    ax.set_title(f"{title}\n{legend}", fontsize=9)
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("log2 of the largest batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return data
