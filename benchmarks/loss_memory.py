"""Benchmark: peak tensor memory and time of the contrastive loss's forward + backward, dense against tiled.

For each local batch ``B`` (rows) and loss kind (``clip``, ``siglip``), the loss of
:func:`harness.train.losses.build_loss` with ``impl`` ``dense`` (open_clip's ``ClipLoss`` / ``SigLipLoss``) and
``tiled`` (:mod:`harness.train.losses`) is run on
random L2-normalised fp32 features ``[B, d]`` (plus logit scale, and bias for SigLIP):

* ``loss_peak_mib``: the peak of live CPU tensor bytes during one forward + backward, above what was live before it
  (the features and parameters), counted by :class:`harness.distributed.tensor_memory.TensorMemoryTracker`: the CPU
  analogue of ``torch.cuda.max_memory_allocated`` minus the inputs. It includes the features' gradients (``[B, d]``
  each, and ``[W B, d]`` for the gathered ones), which both implementations need.
* ``time_s``: wall time of one more forward + backward, untracked (the tracked call is the warm-up).

With ``--world W > 1`` the process is rank 0 of ``W`` on PyTorch's fake process group (collectives return tensors of
the right shape, values meaningless), so the columns are ``W B`` gathered samples, as on rank 0 of ``W`` GPUs.

    OMP_NUM_THREADS=2 python benchmarks/loss_memory.py --batches 1024,2048,4096,8192,16384 --dim 512 \\
        --tile-size 1024 --out results/loss_memory_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.components.metrics import dump_result  # noqa: E402
from harness.config.job_config import LossConfig  # noqa: E402
from harness.distributed.hardware import cpu_label  # noqa: E402
from harness.distributed.tensor_memory import TensorMemoryTracker  # noqa: E402
from harness.train.losses import build_loss  # noqa: E402

MIB = 2.0 ** 20


def measure(kind: str, impl: str, batch: int, dim: int, tile_size: int, world: int) -> dict:
    """One row: tracked forward + backward (peak above the inputs, MiB), then one timed forward + backward (s)."""
    loss_fn = build_loss(LossConfig(kind=kind, impl=impl, tile_size=tile_size), rank=0, world_size=world)
    g = torch.Generator().manual_seed(0)
    leaves = [F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(),
              F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(),
              torch.tensor([2.3], requires_grad=True), torch.tensor([-10.0], requires_grad=True)]

    def call():
        for t in leaves:
            t.grad = None
        image, text, log_scale, bias = leaves
        loss = loss_fn(image, text, log_scale.exp(), bias if kind == "siglip" else None)
        loss.backward()

    tracker = TensorMemoryTracker().track(leaves)
    with tracker:
        before = tracker.live_bytes
        tracker.reset_peak()
        call()
    peak = tracker.peak_bytes - before
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    return {"kind": kind, "impl": impl, "batch": batch, "columns": world * batch, "dim": dim,
            "tile_size": tile_size if impl == "tiled" else None, "loss_peak_mib": round(peak / MIB, 1),
            "logits_matrix_mib": round(batch * world * batch * 4 / MIB, 1), "time_s": round(seconds, 3)}


def table(result: dict) -> str:
    """Markdown table: one line per (kind, batch), dense and tiled side by side."""
    rows = {(r["kind"], r["batch"], r["impl"]): r for r in result["rows"]}
    lines = ["| loss | B (rows) | columns | one [B, N] fp32 matrix (MiB) | dense peak (MiB) | tiled peak (MiB) | "
             "ratio | dense time (s) | tiled time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for (kind, batch, impl), d in rows.items():
        t = rows.get((kind, batch, "tiled"))
        if impl != "dense" or t is None:
            continue
        lines.append(f"| {kind} | {batch} | {d['columns']} | {d['logits_matrix_mib']:.0f} | {d['loss_peak_mib']:.0f} | "
                     f"{t['loss_peak_mib']:.0f} | {d['loss_peak_mib'] / t['loss_peak_mib']:.1f}x | {d['time_s']:.2f} | "
                     f"{t['time_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1024,2048,4096,8192,16384", help="local batches B (rows), comma-separated")
    p.add_argument("--dim", type=int, default=512, help="feature width d")
    p.add_argument("--tile-size", type=int, default=1024, help="columns per tile of the tiled loss")
    p.add_argument("--kinds", default="clip,siglip")
    p.add_argument("--world", type=int, default=1, help="ranks emulated on the fake process group (columns W B)")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)
    if args.world > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for kind in args.kinds.split(","):
            for impl in ("dense", "tiled"):
                row = measure(kind, impl, batch, args.dim, args.tile_size, args.world)
                rows.append(row)
                print(f"{kind:6s} {impl:5s} B={batch:6d} N={row['columns']:6d} peak {row['loss_peak_mib']:9.1f} MiB "
                      f"time {row['time_s']:8.3f} s", flush=True)
    result = {"benchmark": "benchmarks/loss_memory.py",
              "command": "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": cpu_label(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "world_size": args.world, "rows": rows}
    dump_result(result, args.out)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
