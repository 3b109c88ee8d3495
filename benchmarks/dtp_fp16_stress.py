"""fp16 stress run of a DTP-ViT CLIP: high learning rate, dynamic loss scaling, NaN/Inf watch.

The research notes hit NaN boundary probabilities in fp16 at high learning rate. This trains
``--model`` on the digits shards under fp16 autocast (on CUDA when present, else on the CPU, where
PyTorch's fp16 autocast and GradScaler also run) with a ``GradScaler``, and counts every step whose
loss, gradients (after unscaling) or parameters hold NaN/Inf. ``--numerics reference`` switches the
tower to the research code's boundary sampling (no fp32 island, no clamp) for comparison.

    python benchmarks/dtp_fp16_stress.py --steps 300 --lr 1e-2 --numerics safe
    python benchmarks/dtp_fp16_stress.py --steps 300 --lr 1e-2 --numerics reference
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from harness.components.metrics import dump_result  # noqa: E402
from harness.config.job_config import DataConfig
from harness.config.layout import BatchLayout
from harness.data.digits import ensure_digits  # noqa: E402
from harness.data.loader import build_train_loader  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DTP-ViT-tiny-8-4x")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--numerics", choices=["safe", "reference"], default="safe")
    p.add_argument("--data", default="data/digits/train")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.data == "data/digits/train":
        ensure_digits("data/digits")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = models.create_model(args.model).to(device)
    model.visual.cfg.numerics = args.numerics
    from open_clip import ClipLoss

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scaler = torch.amp.GradScaler(device.type)
    layout = BatchLayout(args.batch, 1, 1, args.batch)
    loader = iter(build_train_loader(DataConfig(train_data=args.data, num_workers=1), args.model, layout, 0, 0,
                                     torch.device("cpu")))
    bad_loss = bad_grad = bad_param = skipped = 0
    first_bad, error = None, None
    sfs = []
    it = iter(loader)
    step = 0
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(it)
        try:
            with torch.autocast(device.type, dtype=torch.float16):
                images = models.normalize_uint8(batch["image"].to(device), *models.image_mean_std(args.model))
                out = model(images, batch["text"].to(device))
                loss = loss_fn(out["image_features"].float(), out["text_features"].float(),
                               out["logit_scale"].float().clamp(max=100))
                loss = loss + sum(v.float() for v in model.visual.extra_losses().values())
        except Exception as exn:  # the reference path can raise on NaN probabilities
            error = f"step {step}: {type(exn).__name__}: {exn}"
            break
        sfs.append(float(model.visual.last_stats["shortening_factor"]))
        scale_before = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads_finite = all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        skipped += int(scaler.get_scale() < scale_before)
        loss_bad = not math.isfinite(loss.item())
        params_bad = not all(torch.isfinite(q).all() for q in model.parameters())
        bad_loss += loss_bad
        bad_grad += not grads_finite
        bad_param += params_bad
        if (loss_bad or params_bad) and first_bad is None:
            first_bad = step
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.4f} scale {scaler.get_scale():g} skipped {skipped} "
                  f"SF {sfs[-1]:.2f} {time.perf_counter() - t_start:.0f} s", flush=True)
    result = {"model": args.model, "numerics": args.numerics, "device": str(device), "lr": args.lr,
              "batch": args.batch, "steps_run": step if error is None else step - 1, "steps_asked": args.steps,
              "error": error, "steps_with_nonfinite_loss": bad_loss,
              "steps_with_nonfinite_grads_before_skip": bad_grad, "optimizer_steps_skipped_by_scaler": skipped,
              "steps_with_nonfinite_params": bad_param, "first_nonfinite_step": first_bad,
              "final_loss": loss.item() if error is None else None,
              "shortening_factor_last_50": sum(sfs[-50:]) / max(len(sfs[-50:]), 1),
              "command": "python benchmarks/dtp_fp16_stress.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    dump_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
