"""``harness lr-find``: the sweep, smoothing and suggestion as units; real sweeps in one process and under
``accelerate launch`` with DeepSpeed ZeRO-2; bad input refused before anything runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.cli import main
from harness.tools.lrfind import LRSweep, smoothed, steepest_descent
from tests.helpers import accelerate_command, in_process, read_jsonl, run_cmd


def test_sweep_is_exponential_between_the_bounds():
    sweep = LRSweep(start_lr=1e-6, end_lr=1e-1, steps=51)
    lrs = [sweep.lr(k) for k in range(51)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    assert np.allclose(np.diff(np.log10(lrs)), 0.1)  # 5 decades in 50 equal steps of log LR


def test_smoothing_is_bias_corrected():
    """A constant loss stays that constant from the first step (an uncorrected EMA would start near 0), and a
    step change is followed with the EMA's lag."""
    assert smoothed([3.0] * 5, 0.98) == pytest.approx([3.0] * 5)
    s = smoothed([1.0] * 10 + [0.0] * 200, 0.9)
    assert s[9] == pytest.approx(1.0) and 0 < s[10] < 1 and s[-1] < 1e-6


def test_suggestion_is_the_steepest_descent_within_the_kept_points():
    """On a falling-then-rising curve the suggestion is where it falls fastest; points trimmed at either end are
    never suggested (a steeper fall there is ignored)."""
    x = np.arange(120)
    curve = list(-np.tanh((x - 60) / 8.0) + 0.002 * np.maximum(x - 90, 0) ** 2)
    assert steepest_descent(curve, 10, 5) == 60
    curve[2] -= 5  # a steep fall inside the skipped start
    assert steepest_descent(curve, 10, 5) == 60
    assert steepest_descent([1.0, 0.5, 0.2], 1, 1) is None  # fewer than 3 points kept


def test_bad_sweep_settings_and_existing_out_are_refused(tmp_path, digits_dir, capsys):
    """Bad settings are ``error: --flag: ...`` with exit status 2; an --out folder that holds anything is refused
    and left as it was."""
    assert main(["lr-find", "--out", str(tmp_path / "a"), "--start-lr", "1e-2", "--end-lr", "1e-3"]) == 2
    assert "error: --end-lr: must be greater than --start-lr" in capsys.readouterr().err
    assert main(["lr-find", "--out", str(tmp_path / "a"), "--steps", "5"]) == 2
    assert "error: --steps: must be at least" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "lr_find.json").write_text("earlier")
    code = main(["lr-find", "--out", str(tmp_path / "b"), "--train-data", str(digits_dir / "train"),
                 "--zeroshot-data", "none"])
    assert code == 2 and "error: --out:" in capsys.readouterr().err
    assert (tmp_path / "b" / "lr_find.json").read_text() == "earlier" and not (tmp_path / "a").exists()


def _check_result(out, steps: int, engine: str, world: int) -> dict:
    result = json.loads((out / "lr_find.json").read_text())
    assert result["engine"] == engine and result["world_size"] == world
    assert result["steps_run"] == len(result["lrs"]) == len(result["losses"]) <= steps
    assert result["lrs"] == sorted(result["lrs"]) and result["lrs"][0] == pytest.approx(result["start_lr"])
    assert result["start_lr"] <= result["suggested_lr"] <= result["end_lr"]
    # every step's loss is the trainer's own logged loss at that step
    logged = [r["loss"] for r in read_jsonl(out / "run" / "metrics.jsonl")]
    assert result["losses"] == logged and all(math.isfinite(v) for v in logged)
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


@pytest.mark.slow
def test_lr_find_on_the_digits_suggests_an_lr_inside_the_sweep(tmp_path, digits_dir):
    """One process, ViT-micro-8 on the digits, 60 steps from 1e-6 to 1: a suggestion inside the range and a plot;
    the suggestion lies where the smoothed loss falls (lower on both sides' difference, and lower later on)."""
    out = tmp_path / "lrf"
    in_process(main, ["lr-find", "--out", str(out), "--steps", "60", "--start-lr", "1e-6", "--end-lr", "1", "--model",
                      "ViT-micro-8", "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none", "--beta",
                      "0.9"])
    result = _check_result(out, 60, "local", 1)
    i = result["lrs"].index(result["suggested_lr"])
    smooth = result["smoothed_losses"]
    assert smooth[i + 1] < smooth[i - 1] and min(smooth[i:]) < smooth[i]


@pytest.mark.slow
def test_lr_find_runs_under_accelerate_launch_with_deepspeed(tmp_path, digits_dir):
    """``accelerate launch --config_file ds_configs/zero2.yaml -m harness.cli lr-find``: 2 ranks under DeepSpeed
    ZeRO-2 sweep together (the loss is reduced over ranks, so they stop at the same step) and rank 0 writes."""
    out = tmp_path / "lrf"
    run_cmd(accelerate_command("zero2.yaml", "-m", "harness.cli", "lr-find", "--out", str(out), "--steps", "20",
                               "--skip-start", "2", "--skip-end", "2", "--model", "ViT-micro-8", "--train-data",
                               str(digits_dir / "train"), "--zeroshot-data", "none", "--micro-batch-size", "16"))
    _check_result(out, 20, "deepspeed", 2)
