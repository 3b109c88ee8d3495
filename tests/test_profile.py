"""``harness profile``: real child training runs aggregated into the report (Markdown, CSV, JSON, plots)."""
from __future__ import annotations

import csv
import json

import pytest

from harness.distributed.gpu_catalog import peak_tflops
from harness.tools.profile import main, memory_breakdown


def test_peak_table_knows_gpus_by_their_torch_names_and_not_cpus():
    """The dense data-sheet peaks, found by what ``torch.cuda.get_device_name()`` says: the PCIe H100 is not taken for
    the SXM one, nor an A10 for an A100; fp32 runs on TF32 tensor cores, a V100 has no bf16."""
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 156.0
    assert peak_tflops("NVIDIA A10", "bf16") == 125.0
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_tflops("cpu (x86_64 AVX512, 2 cores)", "fp32") is None


def test_memory_breakdown_scales_with_batch_and_counts_adamw_state():
    small, large = memory_breakdown("ViT-micro-8", 2), memory_breakdown("ViT-micro-8", 8)
    assert small["params_gib"] == large["params_gib"] > 0
    assert small["grads_gib"] == pytest.approx(small["params_gib"])
    assert small["optimizer_gib"] == pytest.approx(2 * small["params_gib"], rel=0.01)  # exp_avg + exp_avg_sq
    assert 3.0 < large["activations_gib"] / small["activations_gib"] < 4.5  # ~linear in the batch


@pytest.mark.slow
def test_profile_writes_report_for_vit_and_dtp(tmp_path, digits_dir):
    out = tmp_path / "report"
    rc = main(["--models", "ViT-micro-8,DTP-ViT-micro-8-2x", "--micro-batch-size", "4,8", "--steps", "4",
               "--warmup-steps", "1", "--zeroshot-data", str(digits_dir / "val"), "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert {(r["model"], r["micro_batch_size"]) for r in rows} == {
        (m, b) for m in ("ViT-micro-8", "DTP-ViT-micro-8-2x") for b in ("4", "8")}
    data = json.loads((out / "report.json").read_text())
    for r in data:
        assert r["avg_step_time_s"] > 0 and r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["timing_warmup_steps_excluded"] == 1 and r["steps"] == 4
        assert r["mfu"] is None and "MFU not computed" in r["mfu_note"]  # a CPU has no peak in the table
        assert 0 <= r["zeroshot_top1"] <= 1 and r["image_gflops"] > 0
    md = (out / "report.md").read_text()
    assert "the first 1 excluded from averages as warm-up" in md and "n/a (unknown device)" in md
    for png in ("step_time_vs_batch.png", "peak_memory_vs_batch.png", "dtp_vs_compression.png"):
        assert (out / png).stat().st_size > 1000


def test_profile_rejects_bad_input_before_running(tmp_path, capsys):
    assert main(["--models", "ViT-nope", "--micro-batch-size", "4", "--out", str(tmp_path)]) == 2
    assert "unknown model 'ViT-nope'" in capsys.readouterr().err
    assert main(["--models", "ViT-micro-8", "--micro-batch-size", "4,x", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())
