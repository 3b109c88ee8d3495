"""Benchmark: DTP-ViT image tower against a ViT image tower, equal batch, same process.

Prints the image tower's training step time (forward + backward + AdamW step; median over measured
steps after warm-up) and its activation memory (bytes autograd saves for backward during the forward,
counted once per storage with ``torch.autograd.graph.saved_tensors_hooks``), and their ratios.

    python benchmarks/dtp_vs_vit.py --dtp DTP-ViT-B-32-10x --vit ViT-B-32 --batch 16 --steps 5

The DTP tower runs in training mode with learned boundaries (its measured shortening factor is
printed); its predictor starts at the target boundary rate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from harness.components.metrics import dump_result, saved_activation_bytes  # noqa: E402
from harness.distributed.hardware import cpu_label  # noqa: E402


def activation_bytes(tower: torch.nn.Module, images: torch.Tensor, dtype=None) -> int:
    """Bytes autograd saves for backward in one forward of ``tower(images)``, parameters excluded."""
    with saved_activation_bytes(exclude=tower.parameters()) as saved, _autocast(images, dtype):
        out = tower(images)
    out.float().pow(2).mean().backward()
    tower.zero_grad(set_to_none=True)
    return saved["bytes"]


def _autocast(images: torch.Tensor, dtype):
    return torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None)


def step_times(tower: torch.nn.Module, images: torch.Tensor, warmup: int, steps: int, dtype=None) -> list:
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with _autocast(images, dtype):
            loss = tower(images).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if images.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtp", default="DTP-ViT-B-32-10x")
    p.add_argument("--vit", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--attention", default="sdpa", help="attention backend of both towers (models.attention)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = models.image_size(args.vit)
    if models.image_size(args.dtp) != size:
        p.error("--dtp and --vit must take the same image size")
    images = torch.randn(args.batch, 3, size, size, device=device)
    rows = {}
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for name in (args.vit, args.dtp):
        tower = models.create_model(name, attention=args.attention).visual.to(device).train()
        act = activation_bytes(tower, images, dtype)
        times = step_times(tower, images, args.warmup, args.steps, dtype)
        stats = getattr(tower, "last_stats", {})
        rows[name] = {"step_time_s": statistics.median(times), "step_times_s": times,
                      "activation_gib": act / 2**30,
                      "shortening_factor": float(stats["shortening_factor"]) if stats else None}
        del tower
    v, d = rows[args.vit], rows[args.dtp]
    result = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_label()}, {torch.get_num_threads()} threads"),
        "batch": args.batch, "warmup_steps_excluded": args.warmup, "measured_steps": args.steps,
        "precision": args.precision, "attention": args.attention,
        "models": rows,
        "step_time_speedup": v["step_time_s"] / d["step_time_s"],
        "activation_memory_saving": 1 - d["activation_gib"] / v["activation_gib"],
        "command": "python benchmarks/dtp_vs_vit.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"device {result['device']}, batch {args.batch}, image tower only, median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    for name, r in rows.items():
        sf = f", shortening factor {r['shortening_factor']:.2f}" if r["shortening_factor"] else ""
        print(f"  {name:<22} step {r['step_time_s']:.3f} s   activations {r['activation_gib']:.3f} GiB{sf}")
    print(f"  {args.dtp} vs {args.vit}: {result['step_time_speedup']:.2f}x faster step, "
          f"{100 * result['activation_memory_saving']:.1f}% less activation memory")
    if args.out:
        dump_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
