"""``harness plan`` against published GPU measurements of CLIP training: each published figure, the plan's
prediction for the same configuration, and the error. Writes ``validation.json`` and ``validation.md`` to ``--out``.

    python benchmarks/plan_validation.py --out results/plan_validation

Targets (issue "Plan a run on any GPU"): predicted peak memory within 10% of each published memory figure, every
published per-GPU batch predicted to fit, step time within 25% of each published throughput. Where a source does not
record a setting, the entry says what was assumed. ``benchmarks/plan_validation_gpus.yaml`` adds the one GPU the
catalog lacks (a GeForce RTX 3090 of open_clip's PR #85).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

from harness.core.units import GIB
from harness.fit.cells import build_cells
from harness.fit.plan import Device, _parser, make_plan, plan_row, store_probes

EXTRA_GPUS = str(Path(__file__).with_name("plan_validation_gpus.yaml"))
LAION_CSV = "LAION-AI/scaling-laws-openclip trained_models_info.csv @529d370 (samples_per_sec / gpus)"
NEMO_PERF = ("NVIDIA NeMo Framework docs, CLIP performance (multimodalmodels/visionlanguagefoundation/clip/perf.html), "
             "1 node; micro batch 88 from NeMo-Framework-Launcher conf/training/clip/vit_g_14.yaml")
NEMO_CONF = ("NVIDIA/NeMo-Framework-Launcher launcher_scripts/conf/training/clip/{}.yaml: "
             "'micro_batch_size: {} # limited by GPU memory'")

# kind: "allocated_gb" (torch.cuda.max_memory_allocated), "device_gb" (nvidia-smi), "fits" (this per-GPU batch ran),
# "oom" (this batch ran out of memory), "samples_per_s_per_gpu"
PUBLISHED: List[Dict[str, Any]] = [
    dict(id="openclip-B32-512-mem", kind="allocated_gb", value=20.1, gpu="A100-SXM4-40GB", model="ViT-B-32",
         precision="fp16", attention="sdpa", nodes=1, gpus=1, batch=512,
         source="the research notes' open_clip run (torch.cuda.max_memory_allocated 20.1-20.5 GB, unit not recorded)",
         assumed="DDP on 1 GPU, AMP fp16, no checkpointing (as recorded); fused SDPA attention (torch 2 open_clip)"),
    dict(id="metaclip-B16-256-mem", kind="device_gb", value=26.0, gpu="V100-SXM2-32GB", model="ViT-B-16",
         precision="fp16", attention="sdpa", nodes=8, gpus=8, batch=256,
         source="facebookresearch/MetaCLIP#47: 'memory usage is 26/32GB when batch_size=256'",
         assumed="nvidia-smi figure; 8 x 8 V100 of run_configs_fullcc.py b16_fullcc (reporter's count unknown), AMP"),
    dict(id="metaclip-B16-512-oom", kind="oom", value=512, gpu="V100-SXM2-32GB", model="ViT-B-16", precision="fp16",
         attention="sdpa", nodes=8, gpus=8, batch=512, source="facebookresearch/MetaCLIP#47: 'OOM when batch_size=512'",
         assumed="as above, no checkpointing"),
    dict(id="openclip-pr85-B32-416", kind="fits", value=416, gpu="RTX-3090", model="ViT-B-32", precision="fp16",
         attention="math", nodes=1, gpus=1, batch=416,
         source="mlfoundations/open_clip#85: 'For B/32 I was < 512 ... ~416 batch size w/o'",
         assumed="1 GPU, AMP fp16, nn.MultiheadAttention of 2022 (math)"),
    dict(id="openclip-pr85-B32-512-oom", kind="oom", value=512, gpu="RTX-3090", model="ViT-B-32", precision="fp16",
         attention="math", nodes=1, gpus=1, batch=512, source="mlfoundations/open_clip#85 ('< 512')",
         assumed="as above"),
    dict(id="openclip-pr85-B32-2048-ckpt", kind="device_gb", value=20.0, gpu="RTX-3090", model="ViT-B-32",
         precision="fp16", attention="math", nodes=1, gpus=1, batch=2048, checkpointing=1,
         source="mlfoundations/open_clip#85: 'pushed past 2048 (with 20GB of 24GB used)'",
         assumed="nvidia-smi figure at 2048 with --grad-checkpointing"),
    dict(id="laion-B32-256-fits", kind="fits", value=256, gpu="A100-SXM4-40GB", model="ViT-B-32", precision="fp16",
         attention="math", nodes=32, gpus=4, batch=256, source=LAION_CSV, assumed="AMP fp16, DDP, no checkpointing"),
    dict(id="laion-B16-256-fits", kind="fits", value=256, gpu="A100-SXM4-40GB", model="ViT-B-16", precision="fp16",
         attention="math", nodes=86, gpus=4, batch=256, source=LAION_CSV, assumed="AMP fp16, DDP, no checkpointing"),
    dict(id="laion-L14-224-fits", kind="fits", value=224, gpu="A100-SXM4-40GB", model="ViT-L-14", precision="fp16",
         attention="math", nodes=99, gpus=4, batch=224, checkpointing=1, source=LAION_CSV,
         assumed="AMP fp16, DDP, checkpointing (224 per 40 GB card implies it)"),
    dict(id="laion-H14-96-fits", kind="fits", value=96, gpu="A100-SXM4-40GB", model="ViT-H-14", precision="fp16",
         attention="math", nodes=206, gpus=4, batch=96, checkpointing=1, source=LAION_CSV,
         assumed="AMP fp16, DDP, checkpointing"),
    dict(id="nemo-B32-500-fits", kind="fits", value=500, gpu="A100-SXM4-80GB", model="ViT-B-32", precision="bf16",
         attention="sdpa", nodes=8, gpus=8, batch=500, source=NEMO_CONF.format("vit_B_32", 500),
         assumed="bf16 O2, DDP, no checkpointing; launcher default, not a measurement of memory"),
    dict(id="nemo-H14-128-fits", kind="fits", value=128, gpu="A100-SXM4-80GB", model="ViT-H-14", precision="bf16",
         attention="sdpa", nodes=32, gpus=8, batch=128, source=NEMO_CONF.format("vit_H_14", 128),
         assumed="as above (NeMo's H/14 has a 32-layer 1280-wide image tower like open_clip's)"),
    dict(id="nemo-g14-88-fits", kind="fits", value=88, gpu="A100-SXM4-80GB", model="ViT-g-14", precision="bf16",
         attention="sdpa", nodes=46, gpus=8, batch=88, source=NEMO_CONF.format("vit_g_14", 88), assumed="as above"),
    dict(id="eva02-B16-2048-fits", kind="fits", value=2048, gpu="A100-SXM4-40GB", model="ViT-B-16", stage="1",
         precision="fp16", attention="sdpa", nodes=8, gpus=8, batch=2048, checkpointing=1,
         source="baaivision/EVA EVA-CLIP/README.md: EVA02_CLIP_B_psz16_s8B, --batch-size=2048, 64 A100(40GB), ZeRO-1",
         assumed="EVA02-B/16 (rope, SwiGLU, LAMB) approximated by ViT-B-16 with AdamW (same state size)"),
    dict(id="laion-B32-256-speed", kind="samples_per_s_per_gpu", value=728.9, gpu="A100-SXM4-40GB", model="ViT-B-32",
         precision="fp16", attention="math", nodes=32, gpus=4, batch=256, source=LAION_CSV + ": 93294.3 / 128",
         assumed="end-to-end rate of a whole run (data loading and evaluation included)"),
    dict(id="laion-B16-256-speed", kind="samples_per_s_per_gpu", value=390.2, gpu="A100-SXM4-40GB", model="ViT-B-16",
         precision="fp16", attention="math", nodes=86, gpus=4, batch=256, source=LAION_CSV + ": 134239.8 / 344",
         assumed="as above"),
    dict(id="laion-L14-112-speed", kind="samples_per_s_per_gpu", value=78.6, gpu="A100-SXM4-40GB", model="ViT-L-14",
         precision="fp16", attention="math", nodes=192, gpus=4, batch=112, checkpointing=1,
         source=LAION_CSV + ": 60327.9 / 768", assumed="as above, checkpointing"),
    dict(id="laion-L14-84-speed", kind="samples_per_s_per_gpu", value=77.3, gpu="A100-SXM4-40GB", model="ViT-L-14",
         precision="fp16", attention="math", nodes=256, gpus=4, batch=84, checkpointing=1,
         source=LAION_CSV + ": 79116.3 / 1024", assumed="as above, checkpointing"),
    dict(id="laion-H14-96-speed", kind="samples_per_s_per_gpu", value=42.0, gpu="A100-SXM4-40GB", model="ViT-H-14",
         precision="fp16", attention="math", nodes=206, gpus=4, batch=96, checkpointing=1,
         source=LAION_CSV + ": 34608 / 824", assumed="as above, checkpointing"),
    dict(id="nemo-g14-A100-speed", kind="samples_per_s_per_gpu", value=69.9, gpu="A100-SXM4-80GB", model="ViT-g-14",
         precision="bf16", attention="sdpa", nodes=1, gpus=8, batch=88, source=NEMO_PERF + ": 559 / 8",
         assumed="bf16, DDP, no checkpointing, Transformer Engine"),
    dict(id="nemo-g14-H100-speed", kind="samples_per_s_per_gpu", value=116.9, gpu="H100-SXM-80GB", model="ViT-g-14",
         precision="bf16", attention="sdpa", nodes=1, gpus=8, batch=88, source=NEMO_PERF + ": 935 / 8",
         assumed="as above"),
]


def predict(entry: Dict[str, Any]) -> Dict[str, Any]:
    """The plan's row for a published configuration (DDP unless ``stage`` says otherwise)."""
    argv = ["--models", entry["model"], "--stages", entry.get("stage", "ddp"), "--precisions", entry["precision"],
            "--checkpointing", str(entry.get("checkpointing", 0)), "--attention", entry["attention"],
            "--nodes", str(entry["nodes"]), "--gpus-per-node", str(entry["gpus"]), "--gpu", entry["gpu"],
            "--gpu-catalog", EXTRA_GPUS, "--batch", str(entry["batch"]), "--granularity", "8", "--out", "-"]
    args = _parser().parse_args(argv)
    args.argv = argv
    (row,) = make_plan(args)["rows"]
    return row


def compare(entry: Dict[str, Any], row: Dict[str, Any]) -> Dict[str, Any]:
    """Predicted value, error and verdict of one published figure."""
    kind, value = entry["kind"], entry["value"]
    out: Dict[str, Any] = {"predicted_max_micro_batch": row["max_micro_batch"]}
    if kind in ("allocated_gb", "device_gb"):  # the source's "GB" may be 10^9 or 2^30 bytes: both errors
        b = row["breakdown_gib"]
        gib = row["peak_gib"] - (b["cuda_context_nccl"] + b["allocator_slack"] if kind == "allocated_gb" else 0.0)
        out.update(predicted=gib, unit="GiB allocated" if kind == "allocated_gb" else "GiB on the device",
                   error_if_gb=(gib * GIB / 1e9 - value) / value, error_if_gib=(gib - value) / value)
        out["met"] = abs(out["error_if_gb"]) <= 0.10 or abs(out["error_if_gib"]) <= 0.10
    elif kind == "fits":
        out.update(predicted=row["fits"], met=bool(row["fits"]))
    elif kind == "oom":
        out.update(predicted=not row["fits"], met=not row["fits"])
    else:
        pred = row["samples_per_s_per_gpu"]
        out.update(predicted=pred, unit="samples/s/GPU", error=(pred - value) / value, mfu=row["mfu"],
                   met=abs(pred - value) / value <= 0.25)
    return out


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| id | GPU | model | setting | published | predicted | error | target met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, c = r["entry"], r["result"]
        setting = (f"{e.get('stage', 'ddp')}, {e['precision']}, ckpt {e.get('checkpointing', 0)}, {e['attention']}, "
                   f"{e['nodes']}x{e['gpus']}, batch {e['batch']}")
        if e["kind"] in ("allocated_gb", "device_gb"):
            pub = f"{e['value']} GB ({'allocated' if e['kind'] == 'allocated_gb' else 'device'})"
            pred = f"{c['predicted']:.2f} GiB = {c['predicted'] * GIB / 1e9:.2f} GB"
            err = f"{c['error_if_gb']:+.1%} if GB, {c['error_if_gib']:+.1%} if GiB"
        elif e["kind"] in ("fits", "oom"):
            pub = f"{e['value']} {'ran' if e['kind'] == 'fits' else 'out of memory'}"
            fits = c["predicted"] == (e["kind"] == "fits")
            pred = f"{'fits' if fits else 'does not fit'} (max {c['predicted_max_micro_batch']})"
            err = "-"
        else:
            pub, pred = f"{e['value']:.1f} samples/s/GPU", f"{c['predicted']:.1f} (MFU {c['mfu']:.0%})"
            err = f"{c['error']:+.0%}"
        lines.append(f"| {e['id']} | {e['gpu']} | {e['model']} | {setting} | {pub} | {pred} | {err} | "
                     f"{'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def cpu_agreement(store: str) -> List[Dict[str, Any]]:
    """``harness plan --gpu cpu`` against every measured or emulated cell of a CPU fit store: the plan's largest micro
    batch calibrated on the whole store (``in_sample``) and on every other cell's probes only (``held_out``)."""
    cells = [json.loads(line) for line in (Path(store) / "cells.jsonl").read_text().splitlines()]
    cells = [c for c in cells if c["how"] in ("measured", "emulated")]
    models = ",".join(dict.fromkeys(c["model"] for c in cells))
    argv = ["--models", models, "--stages", ",".join(dict.fromkeys(c["stage"] for c in cells)), "--checkpointing",
            "0,1", "--gpus-per-node", "1,8", "--gpu", "cpu", "--budget-gib", str(cells[0]["env"]["budget_gib"]),
            "--granularity", "16", "--out", "-"]
    args = _parser().parse_args(argv)
    probes = store_probes([store])
    planned = {c.key: c for c in build_cells(args)}
    budget = cells[0]["env"]["budget_gib"]
    whole = Device("cpu", probes, budget_gib=budget)
    out = []
    for c in cells:
        cell = planned[c["cell"]]
        other = Device("cpu", [p for p in probes if p["cell"] != c["cell"]], budget_gib=budget)
        a, b = plan_row(whole, cell, args)["max_micro_batch"], plan_row(other, cell, args)["max_micro_batch"]
        out.append({"cell": c["cell"], "how": c["how"], "measured": c["max_batch"], "in_sample": a, "held_out": b,
                    "in_sample_error": (a - c["max_batch"]) / c["max_batch"],
                    "held_out_error": (b - c["max_batch"]) / c["max_batch"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", help="comma-separated ids")
    p.add_argument("--cpu-store", default="results/fit_cpu", help="CPU fit store the --gpu cpu plan is checked against")
    args = p.parse_args()
    chosen = [e for e in PUBLISHED if not args.only or e["id"] in args.only.split(",")]
    cpu = cpu_agreement(args.cpu_store) if args.cpu_store else []
    for r in cpu:
        print(json.dumps(r), flush=True)
    rows = []
    for e in chosen:
        row = predict(e)
        rows.append({"entry": e, "result": compare(e, row), "row": row})
        print(json.dumps({"id": e["id"], **rows[-1]["result"]}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/plan_validation.py --out " + args.out
    (out / "validation.json").write_text(json.dumps({"command": command, "rows": rows, "cpu_store": args.cpu_store,
                                                     "cpu": cpu}, indent=1))
    text = markdown(rows) + cpu_markdown(cpu)
    (out / "validation.md").write_text(text)
    print(text)


def cpu_markdown(cpu: List[Dict[str, Any]]) -> str:
    if not cpu:
        return ""
    lines = ["", "| CPU store cell | how | measured max | plan (in sample) | error | plan (held out) | error |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['how']} | {r['measured']} | {r['in_sample']} | {r['in_sample_error']:+.1%} | "
              f"{r['held_out']} | {r['held_out_error']:+.1%} |" for r in cpu]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
