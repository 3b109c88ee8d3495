"""``harness ablate``: every combination of a few config knobs, each trained with several seeds under one budget,
in one table and one plot.

    harness ablate --out results/ablation_cpu --seeds 3 \\
        --knob model.attention=math,sdpa --knob loss.decatt_weight=0,150 --knob data.tokenizer=grid,quadtree \\
        -- --config digits train.seed=0

The first value of each knob is the baseline. Rows run in the order baseline, each knob alone, each pair, ... all
knobs (the 2^k rows of a full ablation for two-valued knobs); ``--only KEY=VALUE[,KEY=VALUE]`` (repeatable) keeps
the combinations that agree with any of them. Each (combination, seed) is a fresh ``train.py`` child process
(:mod:`harness.train.child_job`: one process, or ``accelerate launch`` with ``--launch-config`` and
``--num-processes``, the same command on a GPU node), its run in ``<out>/runs/<row>-s<seed>``. Resumable: a run
whose ``summary.json`` is complete is read, not re-run. Every combination's config is built and validated before
the first run starts, so a bad knob fails at once with the field named.

Outputs in ``--out``: ``ablation.md`` (table: parameters, wall time per run, step time, samples/s, peak memory,
zero-shot top-1 / top-5 mean +- std over seeds, the top-1 gap and the time ratio against the baseline),
``ablation.json`` (every run's figures) and ``ablation.png``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness.core.errors import ConfigError, ExitCode, refuse
from harness.train.child_job import run_training

Combo = Tuple[Tuple[str, str], ...]  # ((key, value), ...) in knob order


def parse_knob(text: str) -> Tuple[str, List[str]]:
    """``"section.field=v1,v2"`` -> ``("section.field", ["v1", "v2"])``.

    Raises:
        ConfigError: no ``=``, or fewer than two values.
    """
    key, sep, values = text.partition("=")
    vals = [v for v in values.split(",") if v != ""]
    if not sep or "." not in key and key not in ("run_name", "output_dir") or len(vals) < 2:
        raise ConfigError(f"--knob: {text!r} is not section.field=value1,value2[,...] (at least two values; the "
                          "first is the baseline)")
    return key, vals


def combinations(knobs: List[Tuple[str, List[str]]], only: Optional[List[str]] = None) -> List[Combo]:
    """Every combination of the knobs' values, ordered by how many knobs differ from the baseline (first values),
    then in grid order; with ``only``, those agreeing with at least one ``KEY=VALUE[,KEY=VALUE]`` filter.

    Raises:
        ConfigError: a filter names a knob or value not in the grid.
    """
    grid = [tuple((key, v) for v in vals) for key, vals in knobs]
    combos = list(itertools.product(*grid))
    base = tuple(g[0] for g in grid)
    combos.sort(key=lambda c: sum(a != b for a, b in zip(c, base)))
    if not only:
        return combos
    values = {key: set(vals) for key, vals in knobs}
    filters = []
    for text in only:
        pairs = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
        for key, value in pairs.items():
            if value not in values.get(key, ()):
                raise ConfigError(f"--only: {key}={value} is not a value of a --knob (knobs: "
                                  f"{', '.join(f'{k}={chr(44).join(v)}' for k, v in knobs)})")
        filters.append(pairs)
    return [c for c in combos if any(all(dict(c)[k] == v for k, v in f.items()) for f in filters)]


def row_label(combo: Combo, knobs: List[Tuple[str, List[str]]]) -> str:
    """``baseline`` or the changed knobs, ``field=value`` joined by ``+``."""
    changed = [f"{key.split('.')[-1]}={v}" for (key, v), (_, vals) in zip(combo, knobs) if v != vals[0]]
    return "+".join(changed) or "baseline"


def build_configs(train_args: List[str], combos: List[Combo], seeds: int, world: int) -> None:
    """Build and validate the job config of every (combination, seed) before anything runs.

    Raises:
        ConfigError: the first invalid one, its knobs named.
    """
    from harness.config.overrides import from_dict, load_preset, merge, parse_override
    from harness.config.validate import validate

    preset, overrides = _split_train_args(train_args)
    for combo in combos:
        data = load_preset(preset)
        for text in overrides + [f"{k}={v}" for k, v in combo] + ["train.seed=0"]:
            data = merge(data, parse_override(text))
        try:
            validate(from_dict(data), world_size=world)
        except ConfigError as e:
            raise ConfigError(f"{e} (in the combination {', '.join(f'{k}={v}' for k, v in combo)})") from None


def _split_train_args(train_args: List[str]) -> Tuple[str, List[str]]:
    """``--config P`` (default ``digits``) and the ``section.field=value`` overrides of the trainer arguments.

    Raises:
        ConfigError: any other argument (ablate passes only a preset and overrides to every run).
    """
    preset, overrides, rest = "digits", [], list(train_args)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" and rest:
            preset = rest.pop(0)
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"ablate: trainer argument {arg!r}: give only --config PRESET and section.field=value "
                              "overrides after --")
    return preset, overrides


def run_grid(args: argparse.Namespace, knobs, combos: List[Combo], out: Path) -> List[Dict[str, Any]]:
    """Train every (combination, seed) not already complete in ``out/runs``; returns one record per run."""
    preset, overrides = _split_train_args(args.train_args)
    records = []
    for index, combo in enumerate(combos):
        for seed in range(args.seeds):
            run_dir = out / "runs" / f"row{index}-s{seed}"
            summary = _complete_summary(run_dir)
            seconds = None
            if summary is None:
                train_args = ["--config", preset, *overrides, *[f"{k}={v}" for k, v in combo], f"train.seed={seed}",
                              f"output_dir={run_dir.parent}", f"run_name={run_dir.name}", "train.progress_bar=false"]
                print(f"ablate: row {index} ({row_label(combo, knobs)}) seed {seed}", flush=True)
                child = run_training(train_args, run_dir, args.launch_config, args.num_processes, args.timeout_s)
                summary, seconds = child.summary, child.seconds
                if summary is None:
                    print(f"ablate: row {index} seed {seed} failed (exit {child.returncode}):\n{child.output[-3000:]}",
                          file=sys.stderr)
                else:
                    (run_dir / "wall_s.txt").write_text(f"{seconds:.2f}\n")
            elif (run_dir / "wall_s.txt").is_file():
                seconds = float((run_dir / "wall_s.txt").read_text())
            records.append({"row": index, "label": row_label(combo, knobs), "knobs": dict(combo), "seed": seed,
                            "wall_s": seconds, "summary": summary})
    return records


def _complete_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == summary.get("total_steps") else None


def _stat(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per combination: means (and stds) over its seeds; the gap and ratio against row 0 (the baseline)."""
    rows = []
    for index, group in itertools.groupby(records, key=lambda r: r["row"]):
        group = list(group)
        done = [r["summary"] for r in group if r["summary"]]
        row = {"row": index, "label": group[0]["label"], "knobs": group[0]["knobs"], "seeds": len(done),
               "parameters": done[0]["parameters"] if done else None}
        for key, name in [("zeroshot_top1", "top1"), ("zeroshot_top5", "top5"), ("avg_step_time_s", "step_s"),
                          ("samples_per_s", "samples_per_s"), ("peak_mem_gib", "peak_gib"),
                          ("zeroshot_images_per_s", "eval_images_per_s")]:
            row[name], row[name + "_std"] = _stat([s.get(key) for s in done])
        row["wall_s"], row["wall_s_std"] = _stat([r["wall_s"] for r in group if r["summary"]])
        rows.append(row)
    base = rows[0] if rows else {}
    for row in rows:
        ok = row["top1"] is not None and base.get("top1") is not None
        row["top1_gap_pp"] = 100 * (row["top1"] - base["top1"]) if ok else None
        row["step_time_ratio"] = row["step_s"] / base["step_s"] if row["step_s"] and base.get("step_s") else None
    return rows


def pm(mean, std, scale: float = 1.0, spec: str = ".1f") -> str:
    """A table cell ``mean +- std`` (both times ``scale``, formatted by ``spec``), ``n/a`` without a mean."""
    return "n/a" if mean is None else f"{scale * mean:{spec}} +- {scale * std:{spec}}"


def write_outputs(rows: List[Dict[str, Any]], records: List[Dict[str, Any]], out: Path, command: str) -> None:
    """``ablation.md``, ``ablation.json`` and ``ablation.png`` in ``out``."""
    lines = [f"# Ablation\n\nCommand: `{command}`\n",
             "| row | combination | params | seeds | wall s / run | step ms | samples/s | peak GiB | zero-shot top-1 % "
             "| top-5 % | top-1 gap (pp) | step time ratio |", "|" + "---|" * 12]
    for r in rows:
        gap = "n/a" if r["top1_gap_pp"] is None else f"{r['top1_gap_pp']:+.1f}"
        ratio = "n/a" if r["step_time_ratio"] is None else f"{r['step_time_ratio']:.2f}"
        cells = [str(r["row"]), r["label"], f"{r['parameters']:,}", str(r["seeds"]), pm(r["wall_s"], r["wall_s_std"]),
                 pm(r["step_s"], r["step_s_std"], 1000), pm(r["samples_per_s"], r["samples_per_s_std"], 1, ".0f"),
                 pm(r["peak_gib"], r["peak_gib_std"], 1, ".2f"), pm(r["top1"], r["top1_std"], 100),
                 pm(r["top5"], r["top5_std"], 100), gap, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    params = {r["parameters"] for r in rows if r["parameters"]}
    lines.append("\nParameters are equal in every row." if len(params) == 1 else
                 f"\nParameter counts differ between rows: {sorted(params)}.")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({"command": command, "rows": rows, "runs": records}, indent=1))
    _plot(rows, out / "ablation.png")


def _plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Points with error bars on a shared row axis (labels read horizontally, one row per line): the accuracy
    # differences are a point or two, which bars starting at 0 would hide.
    labels = [f"{r['row']}: {r['label']}" for r in rows]
    y = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.2 + 0.45 * len(rows)))
    ax1.errorbar([100 * (r["top1"] or 0) for r in rows], y, xerr=[100 * (r["top1_std"] or 0) for r in rows],
                 fmt="o", capsize=3)
    ax1.set_xlabel("zero-shot top-1 (%), mean +- std over seeds")
    ax2.errorbar([1000 * (r["step_s"] or 0) for r in rows], y, xerr=[1000 * (r["step_s_std"] or 0) for r in rows],
                 fmt="o", capsize=3, color="tab:orange")
    ax2.set_xlabel("step time (ms), mean +- std over seeds")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="harness ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--knob", action="append", required=True, metavar="KEY=V1,V2",
                   help="a config field and its values (first = baseline); repeat per knob")
    p.add_argument("--only", action="append", default=None, metavar="KEY=V[,KEY=V]",
                   help="run only the combinations agreeing with one of these (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per combination (train.seed = 0 .. seeds-1)")
    p.add_argument("--out", required=True, help="output folder (runs, table, plot); re-running resumes")
    p.add_argument("--launch-config", default=None, help="accelerate launch config (e.g. ds_configs/zero2.yaml)")
    p.add_argument("--num-processes", type=int, default=1, help="processes per run (with --launch-config)")
    p.add_argument("--timeout-s", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: --config PRESET section.field=value ...")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
        knobs = [parse_knob(k) for k in args.knob]
        combos = combinations(knobs, args.only)
        if not combos:
            raise ConfigError("--only: no combination of the knobs matches")
        build_configs(args.train_args, combos, args.seeds, args.num_processes)
    except ConfigError as e:
        return refuse(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = run_grid(args, knobs, combos, out)
    write_outputs(aggregate(records), records, out, "harness ablate " + " ".join(argv))
    print((out / "ablation.md").read_text())
    return ExitCode.OK if all(r["summary"] for r in records) else ExitCode.ERROR
