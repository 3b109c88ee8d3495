"""Peer benchmark: open_clip's own trainer against this harness, same model, batch, steps, precision, machine.

Both run as fresh child processes, one after the other, in one invocation:

* open_clip: ``python -m open_clip_train.main --dataset-type synthetic`` (its webdataset loader fails
  with webdataset 1.x on these machines, ``KeyError: 'fname'`` in ``group_by_keys_nothrow``, so its
  synthetic dataset is used; it runs open_clip's preprocessing on one blank PIL image per sample);
* ours: ``python train.py --train-data synthetic`` (random tensors of the exact shapes).

Same settings on both sides: one process, local loss + gather-with-grad, AdamW (lr 5e-4, wd 0.2,
betas 0.9/0.98, eps 1e-6), no LR warm-up, no gradient clipping (open_clip's default), log every step.
Step time = mean of the per-step times after the first ``--warmup`` steps (open_clip's
``Batch (t)`` per logged step; ours ``avg_step_time_s``). Peak memory = each child's peak RSS
(``ru_maxrss`` of the finished child, the same measure for both; it includes the Python runtime and
libraries). On a GPU that is host memory; device memory is not compared by this script.

    python benchmarks/peer_open_clip.py --model ViT-B-32 --batch 16 --steps 12 --warmup 3 --repeats 3 \
        --out results/peer_open_clip_cpu.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from harness.components.metrics import dump_result  # noqa: E402

_WRAP = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
         "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def run_measured(cmd, cwd, env=None):
    """Run ``cmd`` in a wrapper process; return (completed process, child peak RSS in GiB)."""
    proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], cwd=cwd, capture_output=True, text=True, env=env)
    m = re.search(r"PEAK_RSS_KIB (\d+)", proc.stdout)
    return proc, (int(m.group(1)) / 2**20 if m else None)


def run_open_clip(args, samples: int, env) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "open_clip_train.main", "--model", args.model, "--dataset-type", "synthetic",
               "--train-num-samples", str(samples), "--batch-size", str(args.batch), "--epochs", "1",
               "--precision", {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision], "--workers", str(args.workers),
               "--lr", "5e-4", "--warmup", "0", "--log-every-n-steps", "1", "--save-frequency", "0",
               "--local-loss", "--gather-with-grad", "--logs", tmp, "--name", "peer", "--report-to", "", "--seed", "0"]
        proc, rss = run_measured(cmd, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"open_clip run failed:\n{proc.stderr[-3000:]}")
        times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", (Path(tmp) / "peer" / "out.log").read_text())]
    step = sum(times[args.warmup:]) / len(times[args.warmup:])
    return {"step_time_s": step, "samples_per_s": args.batch / step, "peak_rss_gib": rss, "step_times_s": times}


def run_harness(args, samples: int, env) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "--config", "synthetic", "--model", args.model,
               "--micro-batch-size", str(args.batch), "--train-samples", str(samples), "--precision", args.precision,
               "--output-dir", tmp, "--run-name", "ours", "optim.warmup_samples=0",
               "optim.grad_clip_norm=null",  # open_clip's default: no clipping
               f"train.timing_warmup_steps={args.warmup}", "train.progress_bar=false"]
        proc, rss = run_measured(cmd, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"harness run failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "ours" / "summary.json").read_text())
    return {"step_time_s": summary["avg_step_time_s"], "samples_per_s": summary["samples_per_s"],
            "peak_rss_gib": rss, "device": summary["device"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times; medians reported")
    p.add_argument("--workers", type=int, default=0, help="open_clip's data workers (its synthetic images are made "
                   "on the CPU; give a GPU run enough of them)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import os

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    samples = args.steps * args.batch
    runs = {"open_clip": [], "harness": []}
    for _ in range(args.repeats):  # alternate, so slow drifts of the machine hit both sides alike
        runs["open_clip"].append(run_open_clip(args, samples, env))
        runs["harness"].append(run_harness(args, samples, env))
    device = runs["harness"][0].pop("device")
    for r in runs["harness"][1:]:
        r.pop("device")
    med = lambda side, key: statistics.median(r[key] for r in runs[side])
    result = {
        "model": args.model, "batch": args.batch, "steps": args.steps, "warmup_steps_excluded": args.warmup,
        "precision": args.precision, "device": device, "threads": env["OMP_NUM_THREADS"], "repeats": args.repeats,
        "open_clip": {"samples_per_s_median": med("open_clip", "samples_per_s"),
                      "peak_rss_gib_median": med("open_clip", "peak_rss_gib"), "runs": runs["open_clip"]},
        "harness": {"samples_per_s_median": med("harness", "samples_per_s"),
                    "peak_rss_gib_median": med("harness", "peak_rss_gib"), "runs": runs["harness"]},
        "command": "python benchmarks/peer_open_clip.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": "open_clip on its --dataset-type synthetic path (its webdataset loader fails with webdataset 1.x: "
                "KeyError 'fname'), ours on --train-data synthetic",
    }
    result["samples_per_s_ratio"] = (result["harness"]["samples_per_s_median"]
                                     / result["open_clip"]["samples_per_s_median"])
    result["peak_memory_ratio"] = result["harness"]["peak_rss_gib_median"] / result["open_clip"]["peak_rss_gib_median"]
    dump_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
