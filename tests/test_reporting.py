"""Metrics where people look: TensorBoard event files read back, ``train.log``, log lines instead of a progress
bar when stderr is not a terminal, Weights & Biases when installed, and ``train.report_to`` checked up front."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from harness.cli import build_config
from harness.config.validate import validate
from harness.core.errors import ConfigError
from tests.helpers import read_jsonl, train, train_py

HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def _scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_train_log_and_log_lines(tmp_path, digits_dir):
    """A 6-step run logging every 2nd step (and the first) with ``train.report_to=tensorboard`` (its stderr a
    pipe, as under Slurm): the event files hold the loss of each logged step equal to metrics.jsonl (stored as
    float32) and the validation and zero-shot results; train.log has the console's INFO lines and the summary;
    stderr has one progress line per log step and no tqdm bar."""
    proc = train(["--model", "ViT-micro-8", "--train-data", str(digits_dir / "train"),
                     "--zeroshot-data", str(digits_dir / "val"), "--val-data", f"{digits_dir}/train/00000.tar",
                     "--max-steps", "6", "--output-dir", str(tmp_path), "--run-name", "r",
                     "train.log_every_steps=2", "train.timing_warmup_steps=2", "train.report_to=tensorboard",
                     "checkpoint.every_steps=0"])
    run = tmp_path / "r"
    records = read_jsonl(run / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 4, 6]  # the first step, then every 2nd (warm-up ends at 2)
    scalars = _scalars(run / "tensorboard")
    assert scalars["loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in train_lines}
    assert scalars["lr"] == {r["step"]: pytest.approx(r["lr"], rel=1e-6) for r in train_lines}
    summary = json.loads((run / "summary.json").read_text())
    assert scalars["val_loss"] == {6: pytest.approx(summary["val_loss"], rel=1e-6)}
    assert scalars["zeroshot_top1"] == {6: pytest.approx(summary["zeroshot_top1"], rel=1e-6)}
    assert "skipped_samples/corrupt" in scalars
    log_text = (run / "train.log").read_text()
    assert "harness: summary: {" in log_text and "zero-shot top-1" in log_text and "validation: val_loss" in log_text
    err = proc.stderr
    ours = [ln for ln in err.splitlines() if " [rank 0] harness: " in ln]
    assert len(ours) >= 7 and set(ours) <= set(log_text.splitlines())  # the file has the console's lines
    steps = re.findall(r"harness: step (\d+)/6 loss ", err)
    assert steps == ["1", "2", "4", "6"]
    assert "\r" not in err and "%|" not in err and not re.search(r"\d(step/s|s/step)", err), "a tqdm bar was printed"


def test_report_to_is_checked_before_training():
    """An unknown destination names the field and the allowed values; so does one whose package is missing."""
    with pytest.raises(ConfigError, match=r"^train\.report_to: each of tensorboard, wandb at most once, got \['tb'\]"):
        build_config(["train.report_to=tb"])
    cfg, _ = build_config(["train.report_to=tensorboard", "--train-data", "synthetic", "--zeroshot-data", "none"])
    assert cfg.train.report_to == ["tensorboard"]
    validate(cfg)


@pytest.mark.skipif(HAVE_WANDB, reason="wandb is installed here")
def test_wandb_without_the_package_is_refused():
    cfg, _ = build_config(["train.report_to=wandb", "--train-data", "synthetic", "--zeroshot-data", "none"])
    with pytest.raises(ConfigError, match=r"^train\.report_to: wandb is asked for but the 'wandb' package is not "
                                          r"installed"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install -e '.[report]')")
def test_wandb_offline_run(tmp_path):
    """With wandb installed, ``train.report_to=wandb`` in offline mode trains and leaves a W&B offline run in the
    run folder."""
    train_py(["--config", "synthetic", "--model", "ViT-micro-8", "--train-samples", "64", "--micro-batch-size", "16",
              "--output-dir", str(tmp_path), "--run-name", "w", "train.report_to=wandb", "train.progress_bar=false",
              "checkpoint.save_final=false"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
