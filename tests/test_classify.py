"""``harness classify``: the linear probe's C selection on features whose answer is known, linear probe and finetune
of a digits-trained model above chance, and refusals (one class, an existing --out) with nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.eval.classify import linear_probe
from tests.helpers import train


def test_linear_probe_separates_clusters_and_not_noise():
    """Well-separated class clusters are classified perfectly; labels that carry no information about the features
    stay near chance (10 classes), so the probe does not score its own training data."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16)) * 3
    labels = np.repeat(np.arange(10), 40)
    x = centers[labels] + rng.normal(size=(400, 16)) * 0.3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train, val = (x[::2], labels[::2]), (x[1::2], labels[1::2])
    grid = (1e-2, 1.0, 100.0)
    result = linear_probe(train, val, seed=0, grid=grid)
    assert result["top1"] == 1.0 and result["top5"] == 1.0
    assert f"{result['C']:.3g}" in result["heldout_top1"]  # chosen from the grid it reports
    noise = linear_probe((x[::2], rng.permutation(labels[::2])), (x[1::2], labels[1::2]), seed=0, grid=grid)
    assert noise["top1"] < 0.3 and noise["top5"] < 0.8


def test_one_class_folder_and_existing_out_are_refused(tmp_path, capsys):
    one = tmp_path / "one" / "seven"
    one.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), color=i * 40).save(one / f"{i}.png")
    out = tmp_path / "summary.json"
    assert main(["classify", "--model", "ViT-micro-8", "--data", str(tmp_path / "one"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --data:" in err and "at least 2 class" in err and not out.exists()
    out.write_text("an earlier result")
    assert main(["classify", "--model", "ViT-micro-8", "--data", str(tmp_path / "one"), "--out", str(out)]) == 2
    assert "error: --out:" in capsys.readouterr().err and out.read_text() == "an earlier result"
    (tmp_path / "one" / "eight").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=255 - i * 40).save(tmp_path / "one" / "eight" / f"{i}.png")
    assert main(["classify", str(tmp_path / "one"), "--data", str(tmp_path / "one")]) == 2  # not a model folder
    assert "error: SOURCE:" in capsys.readouterr().err


@pytest.mark.slow
def test_linear_probe_and_finetune_of_a_digits_model(tmp_path, digits_dir, capsys):
    """ViT-micro-8 trained 60 steps on the digits: linear probe and finetune on the held-out digits (split in half,
    stratified) score well above chance (10%); the summary printed is the one written."""
    train(["--model", "ViT-micro-8", "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none",
              "--output-dir", str(tmp_path), "--run-name", "digits", "--micro-batch-size", "32",
              "--global-batch-size", "32", "--train-samples", "1920", "optim.lr=2e-3", "optim.warmup_samples=320",
              "train.progress_bar=false", "data.num_workers=0"])
    out = tmp_path / "classify" / "summary.json"
    assert main(["classify", str(tmp_path / "digits"), "--data", str(digits_dir / "val"), "--val-fraction", "0.5",
                 "--epochs", "5", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["classes"] == 10 and printed["train_images"] == printed["val_images"] == 180
    probe, tuned = printed["linear_probe"], printed["finetune"]
    assert probe["top1"] > 0.5 and probe["top1"] <= probe["top5"]
    assert tuned["top1"] > 0.3 and tuned["top1"] <= tuned["top5"] and tuned["steps"] == 25
    assert Path(printed["checkpoint"]).name == "step_00000060"
