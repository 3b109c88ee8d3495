"""Benchmark: the largest contrastive batch that trains at one fixed CPU memory budget, open_clip's dense ``ClipLoss``
without accumulation against the tiled loss with gradient accumulation that adds negatives
(:mod:`harness.train.accumulate`).

Every trial is a fresh ``train.py`` child (one process, synthetic batches of the model's shapes, one optimizer step)
with ``train.memory_budget_gib``: :class:`harness.distributed.tensor_memory.TensorMemoryTracker` counts the live CPU
tensor bytes of the process (parameters, gradients, AdamW state, data, activations, logits: the CPU analogue of
``torch.cuda.max_memory_allocated``) and raises ``torch.OutOfMemoryError`` past the budget, as the fit probe does
(:mod:`harness.fit.search`). Process RSS is not the measure: it mixes tensors with the Python runtime and libraries.

* dense: micro batch ``N``, no accumulation (``train.accum_negatives`` irrelevant), ``loss.impl=dense``; contrastive
  batch ``N``. Largest ``N`` by doubling from ``--start``, then bisection to ``--granularity``.
* ours: micro batch ``--micro``, ``K = N / micro`` micro batches, ``train.accum_negatives=true``,
  ``loss.impl=tiled loss.tile_size=--tile-size``; contrastive batch ``N``. ``N`` from the first multiple of
  ``--micro`` at or above 8x dense's largest, doubled while it trains, up to ``--max-ratio`` x dense's largest.
* time per sample of both at the same contrastive batch (dense's largest, rounded down to a multiple of ``--micro``),
  ``--timing-steps`` steps of which the first is excluded, without the tracker (it slows every op): what the
  recompute of accumulation with negatives costs (each micro batch is forwarded twice).

    OMP_NUM_THREADS=2 python benchmarks/contrastive_batch.py --model ViT-tiny-8 --budget-gib 1.0 --micro 128 \\
        --tile-size 256 --out results/contrastive_batch_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.distributed.hardware import cpu_label  # noqa: E402
from harness.fit.search import classify  # noqa: E402
from harness.train.child_job import run_training, synthetic_train_args  # noqa: E402


def trial(args, name: str, contrastive: int, micro: int, ours: bool, steps: int = 1,
          budget: bool = True) -> Dict[str, Any]:
    """One child run of ``steps`` optimizer steps with contrastive batch ``contrastive`` (micro ``micro``)."""
    run_dir = Path(args.work).resolve() / name
    train_args = synthetic_train_args(args.model, micro, steps, 1, run_dir, warmup_steps=1) + [
        "--global-batch-size", str(contrastive), "--train-samples", str(steps * contrastive), "--max-steps", str(steps),
        "checkpoint.every_steps=0", "checkpoint.save_final=false", "train.log_every_steps=1"]
    if ours:
        train_args += ["train.accum_negatives=true", "loss.impl=tiled", f"loss.tile_size={args.tile_size}"]
    else:
        train_args += ["loss.impl=dense"]
    if budget:
        train_args += [f"train.memory_budget_gib={args.budget_gib}", "train.track_memory=true"]
    res = run_training(train_args, run_dir, timeout_s=args.timeout,
                       env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    outcome, reason = classify(res)
    s = res.summary or {}
    rec = {"contrastive_batch": contrastive, "micro_batch": micro, "grad_accum_steps": contrastive // micro,
           "outcome": outcome, "reason": reason[:300], "peak_gib": s.get("peak_mem_gib"),
           "summary_contrastive_batch_size": s.get("contrastive_batch_size"),
           "avg_step_time_s": s.get("avg_step_time_s"), "seconds": round(res.seconds, 1)}
    print(json.dumps({"trial": name, **rec}), flush=True)
    return rec


def largest_dense(args, log: List[Dict[str, Any]]) -> int:
    """Doubling from ``--start``, then bisection to ``--granularity``: the largest dense batch that trains."""
    fits: Optional[int] = None
    fails: Optional[int] = None
    n = args.start
    while fails is None:
        rec = trial(args, f"dense-{n}", n, n, ours=False)
        log.append({"form": "dense", **rec})
        if rec["outcome"] == "fits":
            fits, n = n, 2 * n
        elif rec["outcome"] == "oom":
            fails = n
        else:
            raise SystemExit(f"dense trial at {n} failed: {rec['reason']}")
    if fits is None:
        raise SystemExit(f"--start {args.start} does not fit the budget: lower it")
    while fails - fits > args.granularity:
        mid = (fits + fails) // 2 // args.granularity * args.granularity
        rec = trial(args, f"dense-{mid}", mid, mid, ours=False)
        log.append({"form": "dense", **rec})
        fits, fails = (mid, fails) if rec["outcome"] == "fits" else (fits, mid)
    return fits


def largest_ours(args, dense: int, log: List[Dict[str, Any]]) -> Dict[str, Optional[int]]:
    """From the first multiple of ``--micro`` at or above 8x ``dense``, doubled while it trains, up to
    ``--max-ratio`` x ``dense``: the largest that trained and the first that did not (None if none failed)."""
    n = -(-8 * dense // args.micro) * args.micro
    fits, fails = None, None
    while n <= args.max_ratio * dense:
        rec = trial(args, f"ours-{n}", n, args.micro, ours=True)
        log.append({"form": "tiled + accumulation with negatives", **rec})
        if rec["outcome"] != "fits":
            fails = n
            break
        fits, n = n, 2 * n
    return {"largest_trained": fits, "first_failed": fails}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-tiny-8")
    p.add_argument("--budget-gib", type=float, default=1.0, help="CPU tensor budget per process, GiB")
    p.add_argument("--micro", type=int, default=128, help="micro batch of the accumulated runs")
    p.add_argument("--tile-size", type=int, default=256, help="loss.tile_size of the tiled loss")
    p.add_argument("--start", type=int, default=256, help="first dense batch tried")
    p.add_argument("--granularity", type=int, default=64, help="dense search resolution, samples")
    p.add_argument("--max-ratio", type=float, default=16.0, help="largest ratio to dense tried for ours")
    p.add_argument("--timing-steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child run")
    p.add_argument("--work", default="/tmp/contrastive_batch_runs")
    p.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    trials: List[Dict[str, Any]] = []
    dense = largest_dense(args, trials)
    ours = largest_ours(args, dense, trials)
    n_time = max(dense // args.micro, 1) * args.micro
    timing = {}
    for form, is_ours, micro in (("dense", False, n_time), ("ours", True, args.micro)):
        rec = trial(args, f"time-{form}-{n_time}", n_time, micro, is_ours, steps=args.timing_steps, budget=False)
        timing[form] = {"contrastive_batch": n_time, "micro_batch": micro, "avg_step_time_s": rec["avg_step_time_s"],
                        "time_per_sample_ms": rec["avg_step_time_s"] / n_time * 1e3 if rec["avg_step_time_s"] else None}
    result = {
        "command": "OMP_NUM_THREADS=%s python benchmarks/contrastive_batch.py %s" % (
            os.environ.get("OMP_NUM_THREADS", "2"), " ".join(argv if argv is not None else sys.argv[1:])),
        "model": args.model, "budget_gib": args.budget_gib, "memory_measure": "live CPU tensor bytes "
        "(harness.distributed.tensor_memory.TensorMemoryTracker via train.memory_budget_gib), one process, "
        "one optimizer step, fp32",
        "dense_no_accumulation": {"loss": "open_clip ClipLoss (dense)", "largest_contrastive_batch": dense},
        "tiled_accumulation_with_negatives": {"loss": f"tiled, tile {args.tile_size}", "micro_batch": args.micro,
                                              **ours},
        "ratio_at_least": (ours["largest_trained"] or 0) / dense,
        "ratio_capped_by_max_ratio": ours["first_failed"] is None,
        "timing": timing,
        "recompute_time_ratio": (timing["ours"]["avg_step_time_s"] / timing["dense"]["avg_step_time_s"]
                                 if timing["ours"]["avg_step_time_s"] and timing["dense"]["avg_step_time_s"] else None),
        "trials": trials, "machine": cpu_label(), "cpu_count": os.cpu_count(),
        "benchmark_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
