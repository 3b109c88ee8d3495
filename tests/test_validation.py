"""Validation on held-out shards (``data.val_data``): the retrieval metrics against open_clip's own
``get_clip_metrics``, the loss against open_clip's ``ClipLoss``, a tiny run's metrics in range, the up-front
refusal of missing shards, and 2-process sharded runs (FSDP2, ZeRO-3) against one process on the same weights."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

import models
from harness.cli import build_config, train_main
from harness.components.checkpoint import complete_checkpoints, load_model_state
from harness.config.validate import validate
from harness.core.errors import ConfigError
from harness.data.shards import count_samples, expand_shards
from harness.eval.validation import batched_clip_loss, clip_retrieval_metrics, validate_clip
from tests.helpers import child_pids, read_jsonl, train

RECALL_KEYS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


def _features(n: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, dim, generator=g), dim=-1)  # paired, noisy: recall between 0 and 1
    return img, txt


def test_recall_matches_open_clip_get_clip_metrics():
    """Chunked recall@1/5/10, mean and median rank equal open_clip_train's ``get_clip_metrics`` on the same
    embeddings (300 pairs in chunks of 64 rows, so chunk edges are crossed)."""
    from open_clip_train.train import get_clip_metrics

    img, txt = _features(300)
    ours = clip_retrieval_metrics(img, txt, logit_scale=20.0, chunk=64)
    ref = get_clip_metrics(img, txt, torch.tensor(20.0))
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-12), key
    assert 0 < ours["image_to_text_R@1"] < ours["image_to_text_R@10"] < 1  # the data is neither trivial nor hopeless


def test_val_loss_is_open_clips_per_batch_clip_loss():
    """The validation loss is open_clip's ``ClipLoss`` on consecutive batches (in-batch negatives), averaged
    weighted by batch size: 70 pairs in batches of 32, 32, 6."""
    from open_clip import ClipLoss

    img, txt = _features(70, seed=1)
    scale = torch.tensor(10.0)
    parts = [(ClipLoss()(img[s:s + 32], txt[s:s + 32], scale).item(), len(img[s:s + 32])) for s in (0, 32, 64)]
    expected = sum(loss * n for loss, n in parts) / 70
    assert batched_clip_loss(img, txt, 10.0, 32) == pytest.approx(expected, rel=1e-6)


def test_missing_val_shards_are_refused_before_training(tmp_path, digits_dir, capsys):
    """A val shard that does not exist is ``error: data.val_data: ...`` with exit status 2, before any process
    group, and no run folder is written."""
    cfg, _ = build_config(["--train-data", str(digits_dir / "train"), "--val-data", str(tmp_path / "nope.tar")])
    with pytest.raises(ConfigError, match=r"^data\.val_data: shard not found"):
        validate(cfg)
    code = train_main(["--train-data", str(digits_dir / "train"), "--zeroshot-data", "none", "--val-data",
                       str(tmp_path / "none/{00000..00001}.tar"), "--output-dir", str(tmp_path), "--run-name", "r"])
    assert code == 2 and "error: data.val_data: shard not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _assert_in_range(metrics: dict, n: int) -> None:
    for d in ("image_to_text", "text_to_image"):
        r1, r5, r10 = (metrics[f"{d}_R@{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 <= 1.0
        assert 1.0 <= metrics[f"{d}_median_rank"] <= n and 1.0 <= metrics[f"{d}_mean_rank"] <= n
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0


@pytest.mark.slow
def test_tiny_run_reports_validation_at_the_interval_and_the_end(tmp_path, digits_dir):
    """ViT-micro-8, 4 steps on the digits, validated on two of the shards every 2 steps: metrics.jsonl has a
    validation record at steps 2 and 4, summary.json the last one, counts match the shards, values in range."""
    val = f"{digits_dir}/train/{{00000..00001}}.tar"
    train(["--model", "ViT-micro-8", "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none",
           "--val-data", val, "--max-steps", "4", "--output-dir", str(tmp_path), "--run-name", "v",
           "eval.val_every_steps=2", "eval.batch_size=100", "checkpoint.every_steps=0"])
    records = [r for r in read_jsonl(tmp_path / "v" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    n = count_samples(expand_shards(val))
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert summary["val_samples"] == n and all(r["val_samples"] == n for r in records)
    for key in ["val_loss", *RECALL_KEYS]:
        assert summary[key] == records[-1][key]
    _assert_in_range(summary, n)
    assert summary["val_loss"] < 2 * math.log(100)  # an untrained CLIP sits near ln(batch), not far above it


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp-siglip", "zero3"])
def test_sharded_validation_equals_one_process_on_the_same_weights(val_shards, sharded_run, name):
    """A 2-process run (parameters sharded by FSDP2 or ZeRO-3; the shared runs of ``tests/conftest.py``) validates on
    101 samples with unique captions in forwards of 10 (rank 0 has 51 samples, rank 1 runs a filler forward); its
    metrics equal those computed in this single process from the same final weights (its checkpoint): recall and
    ranks exactly, the loss to 1e-5."""
    run = sharded_run(name)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_samples"] == 101
    siglip = name.endswith("siglip")
    model = models.create_model("ViT-micro-8", siglip=siglip)
    model.load_state_dict(load_model_state(complete_checkpoints(run / "checkpoints")[-1]))
    single = validate_clip(model, str(val_shards), "ViT-micro-8", batch_size=10)
    _assert_in_range(single, 101)
    assert single["val_samples"] == 101
    for key in RECALL_KEYS + [f"{d}_{s}_rank" for d in ("image_to_text", "text_to_image") for s in ("mean", "median")]:
        assert summary[key] == single[key], key
    assert summary["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


def test_validation_workers_outlive_a_stop_signal(digits_dir):
    """Slurm sends SIGTERM to every process of the job, DataLoader workers included. Validation's 2 workers
    ignore it, as the training loader's do (the rank alone decides to checkpoint and stop), so a signal arriving
    while the first batch is encoded still ends in metrics over every sample, not in "DataLoader worker (pid N) is
    killed by signal: Terminated". Batches of 8 over 2 shards: the workers still have batches to decode after it."""
    val = f"{digits_dir}/train/{{00000..00001}}.tar"
    model = models.create_model("ViT-micro-8")
    before, signalled = set(child_pids(os.getpid())), []
    encode = model.encode_image

    def encode_after_signalling_the_workers(images, normalize=False):
        if not signalled:
            signalled.extend(set(child_pids(os.getpid())) - before)
            for pid in signalled:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)  # the signal is delivered before the workers decode another batch
        return encode(images, normalize=normalize)

    model.encode_image = encode_after_signalling_the_workers
    metrics = validate_clip(model, val, "ViT-micro-8", batch_size=8, num_workers=2)
    assert len(signalled) == 2
    assert metrics["val_samples"] == count_samples(expand_shards(val))
