"""Benchmark: peak memory and step time per scale knob, for one model and micro batch, on this machine.

Each knob is one real training run of ``train.py`` in a fresh process group (synthetic batches of the
model's exact shapes), changed from a baseline (fp32, ``sdpa`` attention, no checkpointing, no compile,
one process) in that one knob:

* precision: ``bf16``, ``fp16``
* attention: every backend that runs here (``math`` is the unfused, flash-off reference)
* activation checkpointing: every block, every 2nd block
* ``torch.compile`` of every block
* sharding with ``--num-processes`` ranks: DDP, ZeRO-1/2/3, ZeRO-2/3 with CPU offload, FSDP2 full shard and
  shard-grad-op (same micro batch per rank)

Peak memory is ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) on a GPU; on a CPU the
tracked tensor peak (:mod:`harness.distributed.tensor_memory`), the max over ranks. Step time is the mean of the
measured steps (warm-up excluded).

    python benchmarks/knobs.py --model ViT-B-32 --batch 64 --steps 8 --warmup 3 --num-processes 2 \\
        --out results/knobs_<device>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from harness.components.metrics import dump_result  # noqa: E402
from harness.distributed.hardware import cpu_label  # noqa: E402
from harness.train.child_job import run_training, synthetic_train_args  # noqa: E402
from models.attention import available_backends  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def knob_list(num_processes: int, device: torch.device):
    """``(knob name, launch config or None, extra train.py arguments)`` for every knob."""
    knobs = [("baseline (fp32, sdpa, 1 process)", None, [])]
    for precision in ("bf16", "fp16"):
        knobs.append((f"precision {precision}", None, ["--precision", precision]))
    for backend in available_backends(device, torch.float32 if device.type == "cpu" else torch.bfloat16):
        if backend != "sdpa":
            extra = ["--attention", backend] + ([] if device.type == "cpu" else ["--precision", "bf16"])
            knobs.append((f"attention {backend}" + ("" if device.type == "cpu" else " (bf16)"), None, extra))
    knobs += [("checkpointing every block", None, ["--grad-checkpointing", "1"]),
              ("checkpointing every 2nd block", None, ["--grad-checkpointing", "2"]),
              ("torch.compile per block", None, ["model.compile=true"])]
    if num_processes > 1:
        knobs.append((f"DDP x{num_processes}", "", []))  # no launch config: torchrun, plain PyTorch DDP
        for cfg in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp", "fsdp_shard_grad_op"):
            knobs.append((f"{cfg} x{num_processes}", str(REPO / "ds_configs" / f"{cfg}.yaml"), []))
    return knobs


def knobs_table(result: dict) -> str:
    """The Markdown table of a knob benchmark result (what the README quotes)."""
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    lines = ["| knob | peak tensor memory (GiB, max over ranks) | step time (s) | samples/s |", "|---|---|---|---|"]
    lines += [f"| {r['knob']} | {fmt(r['peak_mem_gib'], '.3f')} | {fmt(r['avg_step_time_s'], '.3f')} | "
              f"{fmt(r['samples_per_s'], '.0f')} |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render", metavar="JSON", help="print the table of a result file again (no runs)")
    p.add_argument("--model", default="ViT-tiny-8")
    p.add_argument("--batch", type=int, default=32, help="micro batch per rank")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-processes", type=int, default=2, help="ranks for the sharding knobs (1: skip them)")
    p.add_argument("--only", help="comma-separated substrings: run only knobs whose name contains one")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--work", default="runs/knobs", help="run folders")
    args = p.parse_args(argv)
    if args.render:
        print(knobs_table(json.loads(Path(args.render).read_text())))
        return 0
    models.get_spec(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work).resolve()
    rows = []
    for name, launch, extra in knob_list(args.num_processes, device):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        world = args.num_processes if launch is not None else 1
        run_name = name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        train_args = synthetic_train_args(args.model, args.batch, args.steps, world, work / run_name, args.warmup
                                          ) + ["train.track_memory=true", *extra]
        res = run_training(train_args, work / run_name, launch or None, world, args.timeout)
        s = res.summary or {}
        row = {"knob": name, "ok": res.returncode == 0 and bool(s), "world_size": world,
               "peak_mem_gib": s.get("peak_mem_gib"), "peak_mem_kind": s.get("peak_mem_kind"),
               "peak_reserved_gib": s.get("peak_reserved_gib"), "avg_step_time_s": s.get("avg_step_time_s"),
               "samples_per_s": s.get("samples_per_s"), "seconds": round(res.seconds, 1)}
        if not row["ok"]:
            row["error"] = res.output[-600:]
        rows.append(row)
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
        print(f"{name:<36} peak {fmt(row['peak_mem_gib'], '7.3f')} GiB  step {fmt(row['avg_step_time_s'], '7.3f')} s  "
              f"{fmt(row['samples_per_s'], '8.1f')} samples/s{'' if row['ok'] else '  FAILED'}", flush=True)
    result = {
        "benchmark": "benchmarks/knobs.py", "command": "python benchmarks/knobs.py " + " ".join(sys.argv[1:]),
        "device": (torch.cuda.get_device_name(0) if device.type == "cuda"
                   else cpu_label()),
        "torch": torch.__version__, "model": args.model, "micro_batch_size": args.batch, "steps": args.steps,
        "warmup_steps_excluded": args.warmup, "rows": rows,
    }
    dump_result(result, args.out)
    print(knobs_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
