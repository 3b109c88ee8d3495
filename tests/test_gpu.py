"""On a CUDA GPU (skipped elsewhere): every engine x precision trains, every attention backend the GPU runs trains
ViT and DTP-ViT, fp16 overflow skipping under DeepSpeed, checkpointing equivalence, no host sync in a step, OOM
forms. Run by ``benchmarks/gpu_suite.sh`` (``CUDA_VISIBLE_DEVICES=0 pytest -m gpu``); each run is 3 steps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import accelerate_launch, read_jsonl, train_py

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
GPU = {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "8"}
ENGINES = [None, "zero0.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml", "fsdp.yaml"]


def _train(tmp_path: Path, name: str, launch, *extra: str) -> dict:
    args = ["--config", "synthetic", "--model", "ViT-B-32", "--micro-batch-size", "32", "--train-samples", "96",
            "--output-dir", str(tmp_path), "--run-name", name, "train.progress_bar=false",
            "train.log_every_steps=1", *extra]
    if launch:
        accelerate_launch(launch, args, env=GPU, timeout=900)
    else:
        train_py(args, env=GPU, timeout=900)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    losses = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 3 and "NVIDIA" in summary["device"] and all(math.isfinite(v) for v in losses)
    return summary


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("launch", ENGINES, ids=lambda c: c or "plain")
def test_every_engine_and_precision_trains(tmp_path, launch, precision):
    summary = _train(tmp_path, "run", launch, "--precision", precision)
    assert summary["precision"] == precision and summary["peak_mem_gib"] > 0
    assert summary["tf32"] is True and summary["cuda_overhead_gib"] >= 0


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    from models.attention import available_backends

    return available_backends(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("model", ["ViT-B-32", "DTP-ViT-B-32-4x"])
@pytest.mark.parametrize("backend", _gpu_backends())
def test_every_attention_backend_trains(tmp_path, backend, model):
    """DTP-ViT's shortened layers take the variable-length path for the mask-less kernels (sdpa_flash, sdpa_cudnn,
    flash_attn) and the masked one for the others."""
    summary = _train(tmp_path, "run", None, "--precision", "bf16", "--attention", backend, "--model", model)
    assert summary["attention"] == backend


@pytest.mark.parametrize("launch", ["zero2.yaml", "fsdp.yaml"])
def test_dtp_trains_under_sharding(tmp_path, launch):
    _train(tmp_path, "run", launch, "--precision", "bf16", "--model", "DTP-ViT-B-32-4x")


def test_fp16_overflow_is_skipped_under_deepspeed(tmp_path):
    summary = _train(tmp_path, "run", "zero2.yaml", "--precision", "fp16", "--train-samples", "192",
                     "train.loss_scale_init=1073741824", "train.loss_scale_window=2")
    assert summary["skipped_optimizer_steps"] >= 1


@pytest.mark.parametrize("launch", [None, "fsdp.yaml"])
def test_no_host_sync_in_a_step(tmp_path, launch):
    """``train.count_host_syncs`` runs every step under ``torch.cuda.set_sync_debug_mode("error")`` on CUDA: a run
    that finishes had no synchronising call outside its log steps; the counter agrees."""
    summary = _train(tmp_path, "run", launch, "--precision", "bf16", "--train-samples", "320",
                     "train.log_every_steps=5", "train.timing_warmup_steps=2", "train.count_host_syncs=true")
    log_steps = {1, 2, 5, 10}
    assert all(n == 0 for s, n in summary["host_syncs_by_step"].items() if int(s) not in log_steps)


def test_checkpointing_gives_the_same_gradients_on_gpu():
    import models
    from models.blocks import set_grad_checkpointing

    grads = []
    for every in (0, 1):
        torch.manual_seed(0)
        model = models.create_model("ViT-B-32").cuda()
        if every:
            set_grad_checkpointing(model, every)
        torch.manual_seed(1)
        out = model(torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(1, 49408, (8, 77), device="cuda"))
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    worst = max(float((grads[1][k] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for k, g in grads[0].items())
    assert worst <= 1e-4, worst


def test_a_cuda_out_of_memory_is_an_oom_exit_with_the_allocator_snapshot(tmp_path):
    proc = train_py(["--config", "synthetic", "--model", "ViT-B-32", "--micro-batch-size", "4096", "--train-samples",
                     "8192", "--output-dir", str(tmp_path), "--run-name", "oom", "train.memory_budget_gib=8",
                     "train.oom_snapshot=true"], env=GPU, check=False, timeout=900)
    status = json.loads((tmp_path / "oom" / "status" / "rank_00000.json").read_text())
    assert proc.returncode == 3 and status["status"] == "oom"
    snapshot = tmp_path / "oom" / "oom_snapshot_rank00000.pickle"
    assert str(snapshot) in status["message"] and snapshot.stat().st_size > 0
    import pickle

    assert pickle.loads(snapshot.read_bytes())["segments"]  # the allocator's segments at the failure


def test_packed_dtp_segments_match_the_padded_path_on_gpu():
    """The variable-length call (torch's varlen_attn for sdpa_flash) gives the masked path's outputs, bf16."""
    import models

    torch.manual_seed(0)
    tower = models.create_model("DTP-ViT-B-32-4x", attention="sdpa_flash").visual.cuda().eval()
    B, N, D = 4, 1 + tower.max_segments, tower.cfg.width
    valid = torch.arange(N, device="cuda")[None, :] < torch.tensor([[3], [N], [7], [1]], device="cuda")
    tokens = torch.randn(B, N, D, device="cuda") * valid[..., None]
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        packed = tower.shortened_forward(tokens, valid)
        tower.cfg.varlen = "off"  # the masked path, with a kernel that takes the mask
        for blk in tower.shortened_blocks:
            blk.attn.backend = "sdpa"
        padded = tower.shortened_forward(tokens, valid)
    assert torch.allclose(packed[valid].float(), padded[valid].float(), atol=5e-2, rtol=5e-2)
