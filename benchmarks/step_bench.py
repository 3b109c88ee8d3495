"""Benchmark: this tree's training step against an earlier commit's, in one run on one machine.

For each model, one-process ``train.py --config synthetic`` runs of both trees (the earlier commit checked out
as a temporary git worktree), alternated ``--repeats`` times so slow drifts of the machine hit both alike;
samples/s from each run's ``summary.json`` (warm-up steps excluded), medians reported. Also the time to make
one synthetic batch of each model's shapes in each tree (the earlier tree's ``SyntheticStream`` built samples one
by one with CPU ``randn``; this one makes ``uint8`` batches on the training device), and the host reads of device
values per step in each tree (``aten._local_scalar_dense`` calls, counted under a ``TorchDispatchMode`` wrapped
around the whole in-process run of ``--sync-steps`` and of ``--sync-steps // 2`` steps: the difference over the
extra steps is the per-step count, free of setup and the end's evaluation; each tree at its own default logging).

    python benchmarks/step_bench.py --baseline-ref e53806e --models ViT-micro-8,ViT-B-32 --batch 16 \\
        --steps 8 --warmup 3 --repeats 3 --out results/step_bench_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from harness.components.metrics import dump_result  # noqa: E402

# one synthetic batch of a model's shapes, timed inside a tree (whichever source that tree has)
_BATCH_TIMER = r"""
import json, os, sys, time, torch
import models
name, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size, ctx = models.image_size(name), models.context_length(name)
if os.path.exists("harness/data/synthetic.py"):  # (an ImportError test would find this tree's module through the
    from harness.data.synthetic import SyntheticShapes, SyntheticSource  # editable install's finder)
    it = iter(SyntheticSource(SyntheticShapes(size, ctx, 49408), batch, 1, 0, 1, 0, torch.device("cpu")))
    kind = "SyntheticSource (uint8, per-sample generator on the device)"
else:
    from harness.data.loader import SyntheticStream
    it = iter(SyntheticStream(batch, size, ctx, 49408, 0, 0))
    kind = "SyntheticStream (float32, per-sample CPU randn)"
next(it)
times = []
for _ in range(repeats):
    t = time.perf_counter(); next(it); times.append(time.perf_counter() - t)
print(json.dumps({"kind": kind, "seconds": sorted(times)[len(times) // 2]}))
"""

# host reads of device values of a whole in-process run (any tree: the counter is defined here)
_SYNC_COUNTER = r"""
import json, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from harness.cli import train_main

class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            Count.n += 1
        return func(*args, **(kwargs or {}))

with Count():
    rc = train_main(sys.argv[1:])
print(json.dumps({"rc": rc, "syncs": Count.n}))
"""


def run_tree(tree: Path, args, model: str, tmp: Path, name: str) -> dict:
    """One training run in ``tree``; returns its summary."""
    cmd = [sys.executable, str(tree / "train.py"), "--config", "synthetic", "--model", model,
           "--micro-batch-size", str(args.batch), "--train-samples", str(args.batch * args.steps),
           "--output-dir", str(tmp), "--run-name", name, f"train.timing_warmup_steps={args.warmup}",
           "train.progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads((tmp / name / "summary.json").read_text())


def batch_time(tree: Path, model: str, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", _BATCH_TIMER, model, str(batch), "5"], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def syncs_per_step(tree: Path, args, model: str, tmp: Path, side: str) -> float:
    """Host reads per optimizer step in ``tree`` (difference of a ``--sync-steps`` and a half-as-long run)."""
    counts = {}
    for steps in (args.sync_steps // 2, args.sync_steps):
        cmd = [sys.executable, "-c", _SYNC_COUNTER, "--config", "synthetic", "--model", model, "--micro-batch-size",
               "4", "--train-samples", str(4 * steps), "--output-dir", str(tmp), "--run-name",
               f"syncs-{side}-{model}-{steps}", "train.progress_bar=false"]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"sync count {side} {model} failed:\n{proc.stderr[-3000:]}")
        counts[steps] = json.loads(proc.stdout.strip().splitlines()[-1])["syncs"]
    half = args.sync_steps // 2
    return (counts[args.sync_steps] - counts[half]) / (args.sync_steps - half)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ref", required=True, help="git commit to compare against")
    p.add_argument("--models", default="ViT-micro-8,ViT-B-32")
    p.add_argument("--batch", type=int, default=16, help="micro batch (one process)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic-batch", type=int, default=256, help="batch for the synthetic-batch timing")
    p.add_argument("--sync-steps", type=int, default=20, help="steps of the longer host-sync counting run")
    p.add_argument("--out")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python benchmarks/step_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "baseline": args.baseline_ref, "this_tree": f"{commit} + working tree", "threads":
              os.environ.get("OMP_NUM_THREADS", "default"), "models": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        base = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline_ref], cwd=REPO,
                       check=True)
        try:
            for model in args.models.split(","):
                runs = {"before": [], "after": []}
                for i in range(args.repeats):
                    for side, tree in (("before", base), ("after", REPO)):
                        s = run_tree(tree, args, model, tmp / "runs", f"{side}-{model}-{i}")
                        runs[side].append(s["samples_per_s"])
                        result["device"] = s["device"]
                med = {k: statistics.median(v) for k, v in runs.items()}
                result["models"][model] = {
                    "samples_per_s": runs, "samples_per_s_median": med,
                    "ratio_after_before": med["after"] / med["before"],
                    "synthetic_batch": {side: batch_time(tree, model, args.synthetic_batch)
                                        for side, tree in (("before", base), ("after", REPO))},
                    "host_syncs_per_step": {side: syncs_per_step(tree, args, model, tmp / "runs", side)
                                            for side, tree in (("before", base), ("after", REPO))}}
                print(json.dumps({model: result["models"][model]}), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO)
    dump_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
