"""``harness plan``: the GPU catalog, the plan's rows and files, its agreement with the committed CPU fit store, and
its refusals. Everything runs in this process: no GPU, no process group."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import ConfigError, ExitCode
from harness.distributed.gpu_catalog import CATALOG_PATH, find_gpu, load_catalog
from harness.fit.activations import activation_profile, cache_file
from tests.helpers import in_process

REPO = Path(__file__).resolve().parents[1]
CPU_STORE = REPO / "results" / "fit_cpu"
ROW_FIELDS = ("gpu", "model", "stage", "precision", "checkpointing", "attention", "loss", "nodes", "gpus_per_node",
              "micro_batch", "fits", "max_micro_batch", "peak_gib", "breakdown_gib", "step_time_s",
              "samples_per_s_per_gpu", "mfu", "gpu_hours")
BREAKDOWN = ("parameters", "gradients", "optimizer_states", "engine_buffers", "activations_image", "activations_text",
             "contrastive_loss", "cublas_workspace", "cuda_context_nccl", "allocator_slack")


def plan(tmp_path, *args, check=True):
    """``harness plan ARGS --out tmp_path/plan``; returns (process result, plan.json or None)."""
    out = tmp_path / "plan"
    proc = in_process(main, ["plan", *args, "--out", str(out)], check=check)
    return proc, (json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None)


def test_catalog_entries_cite_their_sources_and_names_are_unambiguous():
    """Every built-in GPU has a data-sheet source, a source for its driver-reported memory, a dense bf16 or fp16 peak
    and links; no name or alias points at two GPUs; what torch calls a GPU finds its entry."""
    catalog = load_catalog()
    assert len(catalog) >= 15
    seen = {}
    for gpu in catalog.values():
        assert gpu.source.startswith("http") and gpu.memory_source
        assert gpu.peak_tflops("fp16") and gpu.hbm_gbps > 0 and gpu.intra_node.gbps > 0 and gpu.inter_node.gbps > 0
        assert 10 < gpu.memory_gib < 200
        for n in (gpu.name, *gpu.aliases, *gpu.device_names):
            assert seen.setdefault(n.lower(), gpu.name) == gpu.name, n
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100-SXM-80GB"
    assert find_gpu("nvidia a100-sxm4-40gb").name == "A100-SXM4-40GB"
    assert find_gpu("NVIDIA A10").name == "A10"
    with pytest.raises(ConfigError, match="--gpu: unknown GPU 'Z100'; known: V100-SXM2-16GB"):
        find_gpu("Z100")


def test_a_user_catalog_adds_and_replaces_entries(tmp_path):
    import yaml

    entries = yaml.safe_load(CATALOG_PATH.read_text())
    h100 = next(e for e in entries if e["name"] == "H100-SXM-80GB")
    mine = dict(h100, name="H100-SXM-80GB", memory_gib=40.0)
    new = dict(h100, name="X1", aliases=[], device_names=["Acme X1"])
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump([mine, new]))
    assert find_gpu("H100", str(path)).memory_gib == 40.0
    assert find_gpu("Acme X1", str(path)).name == "X1"
    path.write_text(yaml.safe_dump([{k: v for k, v in new.items() if k != "source"}]))
    with pytest.raises(ConfigError, match="lacks source"):
        load_catalog(str(path))


@pytest.fixture(scope="module")
def micro_plan(tmp_path_factory):
    """A plan of ViT-micro-8 on two GPUs, four engines, two cluster shapes and a job of 1e6 samples."""
    tmp = tmp_path_factory.mktemp("plan")
    _, data = plan(tmp, "--models", "ViT-micro-8", "--stages", "ddp,2,3,fsdp", "--checkpointing", "0,1",
                   "--gpus-per-node", "1,8", "--nodes", "1,2", "--gpu", "A100-40GB", "--gpu", "H100",
                   "--samples", "1e6", "--max-batch", "4096")
    return tmp / "plan", data


def test_plan_writes_every_field_and_file(micro_plan):
    out, data = micro_plan
    assert len(data["rows"]) == 2 * 4 * 2 * 2 * 2
    for r in data["rows"]:
        assert all(f in r for f in ROW_FIELDS)
        assert r["fits"] and r["max_micro_batch"] > 0 and 0 < r["mfu"] < 1
        assert r["gpu_hours"] == pytest.approx(1e6 / r["samples_per_s_per_gpu"] / 3600)
        assert r["peak_gib"] <= r["memory_gib"] * 0.95
    with open(out / "plan.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert (out / "plan.png").stat().st_size > 0 and "| H100-SXM-80GB | ViT-micro-8 |" in (out / "plan.md").read_text()


def test_breakdown_sums_to_the_peak(micro_plan):
    """Forward-dominated rows (at the largest batch) and step-dominated rows (batch 8) alike."""
    _, data = micro_plan
    for r in data["rows"]:
        b = r["breakdown_gib"]
        assert all(k in b for k in BREAKDOWN)
        assert sum(b.values()) == pytest.approx(r["peak_gib"], rel=1e-9)
        assert b["activations_image"] > 0 and b["activations_text"] > 0 and b["cuda_context_nccl"] > 0


def test_the_time_model_adds_recompute_and_communication(micro_plan):
    """Checkpointing every block costs about one more forward (step time x ~4/3 at the same batch, at most); a
    second node puts the gradient all-reduce on the slower fabric, so the same DDP cell is slower per GPU."""
    _, data = micro_plan
    rows = {(r["gpu"], r["stage"], r["checkpointing"], r["nodes"], r["gpus_per_node"]): r for r in data["rows"]}
    for gpu in ("A100-SXM4-40GB", "H100-SXM-80GB"):
        plain, ckpt = rows[gpu, "ddp", 0, 1, 1], rows[gpu, "ddp", 1, 1, 1]
        per_sample = [r["time_breakdown_s"]["compute"] / r["micro_batch"] for r in (plain, ckpt)]
        assert 1.2 < per_sample[1] / per_sample[0] <= 4 / 3 + 1e-9
        one, two = rows[gpu, "ddp", 0, 1, 8], rows[gpu, "ddp", 0, 2, 8]
        assert two["time_breakdown_s"]["communication_total"] > one["time_breakdown_s"]["communication_total"]


def test_margin_lowers_the_batch_and_batch_is_evaluated(tmp_path):
    args = ("--models", "ViT-micro-8", "--stages", "2", "--gpu", "L4")
    _, loose = plan(tmp_path, *args, "--margin", "0.05")
    _, tight = plan(tmp_path, *args, "--margin", "0.5")
    (lo,), (ti,) = loose["rows"], tight["rows"]
    assert 0 < ti["max_micro_batch"] < lo["max_micro_batch"] < 1 << 16
    _, at = plan(tmp_path, *args, "--batch", str(lo["max_micro_batch"] + 8))
    (row,) = at["rows"]
    assert not row["fits"] and row["peak_gib"] > 0.95 * row["memory_gib"]


@pytest.mark.parametrize("args, message", [
    (("--gpu", "Z100"), "--gpu: unknown GPU 'Z100'; known: V100-SXM2-16GB"),
    (("--gpu", "cpu"), "--budget-gib: required"),
    (("--gpu", "H100", "--margin", "1.5"), "--margin: a fraction"),
    (("--gpu", "H100", "--stages", "4"), "--stages: '4' not allowed"),
    (("--gpu", "H100", "--calibrate-from", "/nonexistent"), "--calibrate-from: /nonexistent has no probes.jsonl"),
])
def test_bad_input_is_exit_2_naming_the_flag(tmp_path, args, message):
    proc, data = plan(tmp_path, "--models", "ViT-micro-8", *args, check=False)
    assert proc.returncode == ExitCode.CONFIG and message in proc.stderr and data is None


def test_a_cpu_plan_agrees_with_the_committed_cpu_fit_store(tmp_path):
    """``--gpu cpu`` with the store's budget and granularity, calibrated on the store: the plan's largest micro batch of
    every cell the store measured (or emulated at 8 ranks) is the measured one to within one granularity step (the
    plan and the probe are one model; ``benchmarks/plan_validation.py`` gives the held-out errors)."""
    cells = [json.loads(line) for line in (CPU_STORE / "cells.jsonl").read_text().splitlines()]
    _, data = plan(tmp_path, "--models", "ViT-tiny-8,DTP-ViT-tiny-8-4x", "--stages", "ddp,fsdp,fsdp-sgo",
                   "--checkpointing", "0,1", "--gpus-per-node", "1,8", "--gpu", "cpu", "--budget-gib", "0.5",
                   "--granularity", "16", "--calibrate-from", str(CPU_STORE))
    planned = {(r["model"], r["stage"], r["checkpointing"], r["gpus_per_node"]): r for r in data["rows"]}
    compared = 0
    for c in cells:
        if c["how"] in ("measured", "emulated"):
            r = planned[c["model"], c["stage"], c["checkpointing"], c["gpus_per_node"]]
            assert abs(r["max_micro_batch"] - c["max_batch"]) <= 16, (c["cell"], r["max_micro_batch"])
            compared += 1
    assert compared == 20


def test_activation_profiles_are_cached_and_a_damaged_cache_is_measured_again():
    path = cache_file("activations", "ViT-micro-8", "fp32", "math")
    activation_profile.cache_clear()
    first = activation_profile("ViT-micro-8", "fp32", "math")
    assert path.is_file()
    activation_profile.cache_clear()
    assert activation_profile("ViT-micro-8", "fp32", "math") == first  # read back
    path.write_text("{not json")
    activation_profile.cache_clear()
    assert activation_profile("ViT-micro-8", "fp32", "math") == first and json.loads(path.read_text())
