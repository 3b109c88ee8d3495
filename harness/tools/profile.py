"""``harness profile``: the per-model table researchers keep by hand, measured.

For every (model, micro batch) the real trainer runs as a fresh child process (``train.py``, under
``accelerate launch --config_file <launch config>`` when one is given) on synthetic batches of the
exact shapes (or given shards), and its ``summary.json`` gives step time, samples/s, peak memory and
the data-wait fraction with warm-up steps excluded. Added per model:

* forward GFLOPs of the image tower (fvcore with attention counted, :mod:`harness.tools.flops`; GFLOPs =
  2 x GMACs) and of the text tower;
* MFU = training model FLOPs per second / the device's dense peak (3 x forward FLOPs of both towers
  per sample, no recompute counted), from the GPU catalog (:mod:`harness.distributed.gpu_catalog`); unknown devices
  (any CPU) get no MFU and say so;
* a memory breakdown (parameters, gradients, optimizer state, activations saved for backward),
  measured on the tensors of one real single-process AdamW step at the same micro batch and precision;
* zero-shot top-1/top-5 when ``--zeroshot-data`` is given, else "not measured".

Outputs in ``--out``: ``report.md``, ``report.csv``, ``report.json``, ``step_time_vs_batch.png``,
``peak_memory_vs_batch.png`` and, with DTP-ViT models, ``dtp_vs_compression.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from harness.core.errors import ExitCode, refuse
from harness.distributed.gpu_catalog import peak_tflops
from harness.train.child_job import run_training, synthetic_train_args


def memory_breakdown(name: str, micro_batch_size: int, precision: str = "fp32") -> Dict[str, float]:
    """Measured per-process memory of one AdamW training step of ``name`` (no sharding), in GiB.

    Parameters and gradients are the bytes of ``p`` and ``p.grad``; optimizer state the bytes of the
    AdamW state tensors after the step; activations the distinct storages autograd saved for backward
    during the forward (``saved_tensors_hooks``), parameters excluded.
    """
    from open_clip import ClipLoss

    import models
    from harness.components.metrics import saved_activation_bytes
    from harness.config.job_config import JobConfig
    from harness.distributed.hardware import autocast_dtype
    from harness.engines.common import build_optimizer

    torch.manual_seed(0)
    model = models.create_model(name).train()
    size, ctx = models.image_size(name), models.context_length(name)
    images = torch.randn(micro_batch_size, 3, size, size)
    text = torch.randint(1, 49408, (micro_batch_size, ctx))
    dtype = autocast_dtype(precision)
    with saved_activation_bytes(exclude=model.parameters()) as saved:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(images, text)
            loss = ClipLoss()(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
    loss.backward()
    opt = build_optimizer(model, JobConfig(), torch.device("cpu"))
    opt.step()
    gib = 2.0 ** 30
    return {
        "params_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / gib,
        "grads_gib": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                         if p.grad is not None) / gib,
        "optimizer_gib": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                             if torch.is_tensor(t)) / gib,
        "activations_gib": saved["bytes"] / gib,
    }


def run_one(model: str, batch: int, args, out: Path) -> Dict[str, Any]:
    """One child training run; returns its summary.json (raises with the child's output on failure)."""
    world = args.num_processes if args.launch_config else 1
    run_dir = out / "runs" / f"{model}-b{batch}"
    train_args = synthetic_train_args(model, batch, args.steps, world, run_dir, args.warmup_steps) + [
        "--train-data", args.train_data, "--precision", args.precision, "checkpoint.every_steps=0",
        "checkpoint.save_final=false", f"eval.zeroshot_data={args.zeroshot_data or 'null'}"]
    if args.train_data != "synthetic":
        train_args.append(f"data.num_workers={args.num_workers}")
    if args.trace_step:
        train_args.append(f"train.profile_step={args.trace_step}")
    if (run_dir / "summary.json").is_file() and not args.rerun:
        return json.loads((run_dir / "summary.json").read_text())
    res = run_training(train_args, run_dir, args.launch_config, args.num_processes)
    if res.summary is None or res.returncode != 0:
        raise RuntimeError(f"profile run {run_dir.name} failed ({res.returncode}):\n{res.output[-4000:]}")
    return res.summary


def _compression(name: str) -> Optional[float]:
    m = re.search(r"-(\d+(?:\.\d+)?)x", name)
    return float(m.group(1)) if name.startswith("DTP-") and m else None


def build_rows(models_: List[str], batches: List[int], args, out: Path) -> List[Dict[str, Any]]:
    import models
    from harness.tools.flops import model_gmacs

    rows = []
    for name in models_:
        costs = model_gmacs(name)
        breakdown = {b: memory_breakdown(name, b, args.precision) for b in batches}
        arch = models.architecture(name)["vision_cfg"]
        for b in batches:
            s = run_one(name, b, args, out)
            image_gflops, text_gflops = 2 * costs["image_gmacs"], 2 * costs["text_gmacs"]
            train_flops_per_sample = 3 * (image_gflops + text_gflops) * 1e9
            peak = peak_tflops(s["device"], args.precision)
            achieved = s["samples_per_s"] * train_flops_per_sample / s["world_size"] if s["samples_per_s"] else None
            rows.append({
                "model": name, "micro_batch_size": b, "world_size": s["world_size"],
                "global_batch_size": s["global_batch_size"], "precision": args.precision, "device": s["device"],
                "image_gflops": image_gflops, "text_gflops": text_gflops,
                "compression": _compression(name),
                "resolution": arch["image_size"], "patch_size": arch["patch_size"],
                "zeroshot_top1": s.get("zeroshot_top1"), "zeroshot_top5": s.get("zeroshot_top5"),
                "peak_mem_gib": s["peak_mem_gib"], "peak_mem_kind": s["peak_mem_kind"],
                "avg_step_time_s": s["avg_step_time_s"], "samples_per_s": s["samples_per_s"],
                "achieved_tflops_per_device": achieved / 1e12 if achieved else None,
                "mfu": achieved / (peak * 1e12) if (achieved and peak) else None,
                "mfu_note": None if peak else f"device {s['device']!r} has no peak in the table: MFU not computed",
                "data_wait_fraction": s["data_wait_fraction"],
                "timing_warmup_steps_excluded": s["timing_warmup_steps_excluded"], "steps": s["steps"],
                **breakdown[b],
            })
    return rows


def _fmt(v, spec: str, missing: str = "n/a") -> str:
    return missing if v is None else format(v, spec)


def write_report(rows: List[Dict[str, Any]], out: Path, args) -> None:
    """``report.md``, ``report.csv``, ``report.json`` and the PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mem_kind = rows[0]["peak_mem_kind"]
    mem_label = ("peak GPU memory allocated (GiB)" if mem_kind == "cuda_max_allocated"
                 else "peak memory, CPU max RSS (GiB)")
    lines = [
        f"# Profile: {', '.join(sorted({r['model'] for r in rows}))}",
        "",
        f"Device: {rows[0]['device']}; precision {args.precision}; world size {rows[0]['world_size']}; "
        f"data: {args.train_data}; {rows[0]['steps']} steps per run, the first "
        f"{rows[0]['timing_warmup_steps_excluded']} excluded from averages as warm-up.",
        "GFLOPs: image-tower forward per sample, fvcore with attention counted (GFLOPs = 2 x GMACs). "
        "MFU: 3 x (image + text forward FLOPs) x samples/s per device / the device's dense peak.",
        f"Command: `{args.command}`",
        "",
        f"| model | GFLOPs | resolution | patch size | top-1 | top-5 | micro batch | {mem_label} | "
        "avg training step time (s) | samples/s | MFU | data wait | params / grads / optimizer / activations (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = _fmt(r["zeroshot_top1"], ".2%", "not measured")
        top5 = _fmt(r["zeroshot_top5"], ".2%", "not measured")
        mfu = _fmt(r["mfu"], ".1%", "n/a (unknown device)")
        lines.append(
            f"| {r['model']} | {r['image_gflops']:.2f} | {r['resolution']} | {r['patch_size']} | {top1} | {top5} | "
            f"{r['micro_batch_size']} | {r['peak_mem_gib']:.2f} | {r['avg_step_time_s']:.3f} | "
            f"{r['samples_per_s']:.1f} | {mfu} | {_fmt(r['data_wait_fraction'], '.1%')} | "
            f"{r['params_gib']:.3f} / {r['grads_gib']:.3f} / {r['optimizer_gib']:.3f} / {r['activations_gib']:.3f} |")
    lines += ["", "Memory breakdown: measured on one single-process AdamW step at the same micro batch and "
              "precision (no ZeRO sharding); activations = storages saved for backward.", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(rows, out, mem_label)


def _plots(rows: List[Dict[str, Any]], out: Path, mem_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    for key, label, fname in (("avg_step_time_s", "avg training step time (s)", "step_time_vs_batch.png"),
                              ("peak_mem_gib", mem_label, "peak_memory_vs_batch.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in models_:
            pts = sorted((r["micro_batch_size"], r[key]) for r in rows if r["model"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("micro batch per device")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    dtp = [r for r in rows if r["compression"]]
    if dtp:
        batch = max(r["micro_batch_size"] for r in dtp)
        # the 1x point: a plain ViT of the same resolution and patch size, when profiled
        same = lambda r: (r["resolution"], r["patch_size"]) == (dtp[0]["resolution"], dtp[0]["patch_size"])
        base = [r for r in rows if not r["compression"] and same(r) and r["micro_batch_size"] == batch][:1]
        pts = sorted([(r["compression"], r) for r in dtp if r["micro_batch_size"] == batch] +
                     [(1.0, r) for r in base], key=lambda p: p[0])
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, (key, label) in zip(axes, (("image_gflops", "image GFLOPs (forward)"), ("peak_mem_gib", mem_label),
                                            ("avg_step_time_s", "avg step time (s)"))):
            ax.plot([p[0] for p in pts], [p[1][key] for p in pts], marker="o")
            ax.set_xscale("log")
            ax.set_xticks([p[0] for p in pts], [f"{p[0]:g}x" for p in pts])
            ax.set_xlabel(f"compression (1x = {base[0]['model']})" if base else "compression")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
        fig.suptitle(f"DTP-ViT against compression, micro batch {batch}")
        fig.tight_layout()
        fig.savefig(out / "dtp_vs_compression.png", dpi=120)
        plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated registered model names (required unless --report)")
    p.add_argument("--micro-batch-size", help="per-device micro batch, or a comma-separated sweep")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps excluded from averages")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--launch-config", help="Accelerate launch YAML (e.g. ds_configs/zero2.yaml); default: one process")
    p.add_argument("--num-processes", type=int, default=1, help="processes under --launch-config")
    p.add_argument("--train-data", default="synthetic", help="shards, or 'synthetic' (default)")
    p.add_argument("--num-workers", type=int, default=2, help="data workers per process for real shards")
    p.add_argument("--zeroshot-data", help="ImageFolder directory for top-1/top-5 (else 'not measured')")
    p.add_argument("--trace-step", type=int,
                   help="write a PyTorch profiler trace (and CUDA memory snapshot) of this step")
    p.add_argument("--rerun", action="store_true", help="re-run models whose run already has a summary in --out")
    p.add_argument("--report", action="store_true",
                   help="only render report.md / .csv / plots of --out again from its report.json (no runs)")
    p.add_argument("--out", required=True, help="report folder")
    return p


def render_report(out: Path) -> int:
    """Render the reports of ``out`` again from ``report.json``, with the settings of the command that made them
    (the ``Command:`` line of its ``report.md``)."""
    import shlex

    if not (out / "report.json").is_file() or not (out / "report.md").is_file():
        return refuse(f"--report: {out} holds no report.json / report.md")
    prefix = "Command: `"
    command = next((ln[len(prefix):-1] for ln in (out / "report.md").read_text().splitlines()
                    if ln.startswith(prefix)), None)
    if command is None:
        return refuse(f"--report: {out / 'report.md'} names no command")
    args = _parser().parse_args(shlex.split(command)[2:])
    args.command = command
    write_report(json.loads((out / "report.json").read_text()), out, args)
    print((out / "report.md").read_text())
    return ExitCode.OK


def main(argv: Optional[List[str]] = None) -> int:
    """``harness profile`` entry. Returns the exit status."""
    import models

    args = _parser().parse_args(argv)
    args.command = "harness profile " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report:
        return render_report(Path(args.out))
    if not args.models or not args.micro_batch_size:
        return refuse("--models and --micro-batch-size: required (unless --report)")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        for n in names:
            models.get_spec(n)
        batches = [int(b) for b in args.micro_batch_size.split(",") if b.strip().isdigit()]
        if len(batches) != len(args.micro_batch_size.split(",")) or any(b < 1 for b in batches):
            raise ValueError(f"--micro-batch-size: must be positive integers, got {args.micro_batch_size!r}")
        if args.steps <= args.warmup_steps:
            raise ValueError(f"--steps: must exceed --warmup-steps ({args.warmup_steps}), got {args.steps}")
        if args.launch_config and not Path(args.launch_config).is_file():
            raise ValueError(f"--launch-config: {args.launch_config!r} not found")
    except ValueError as e:
        return refuse(e)
    out = Path(args.out).resolve()  # the child runs in the repository root
    if args.launch_config:
        args.launch_config = str(Path(args.launch_config).resolve())
    rows = build_rows(names, batches, args, out)
    write_report(rows, out, args)
    print((out / "report.md").read_text())
    return ExitCode.OK
