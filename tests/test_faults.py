"""Fault injection (issue 14): kill -9 of one rank at random steps and inside a save, damaged checkpoint files
(truncated, emptied, missing: each file of a real ZeRO-2 and FSDP2 checkpoint), and non-finite losses, on real
2-process gloo runs where sharding matters. Every resume must continue bit for bit like the uninterrupted run (the
shared reference run of ``tests/conftest.py``)."""
from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from harness.components.checkpoint import CheckpointManager, complete_checkpoints, load_model_state, save_checkpoint
from harness.components.checkpoint_verify import checkpoint_files, read_meta_or_none, verify
from harness.core import hooks
from harness.core.errors import ExitCode, NonFiniteError
from harness.engines.nonfinite import NonfiniteGuard
from tests.helpers import (
    REFERENCE_EXTRA,
    REPO,
    STEPS,
    accelerate_command,
    accelerate_launch,
    assert_same_trajectory,
    child_env,
    digits_args,
    metrics_by_step,
    train,
)

# ZeRO-2 in `make test`; FSDP2 (its own checkpoint layout, DCP) in the `matrix` tier, which CI runs after it
ENGINES = ["zero2.yaml", pytest.param("fsdp.yaml", marks=pytest.mark.matrix)]
EXTRA = (*REFERENCE_EXTRA, "checkpoint.every_steps=3", "checkpoint.keep_last=30")


def _launch_and_kill(config: str, args, at_step: int, rank: int, run: Path) -> int:
    """Launch like :func:`accelerate_launch`, SIGKILL rank ``rank`` (not its data worker) once ``metrics.jsonl``
    reaches ``at_step``; returns the launcher's exit status."""
    since = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").is_file() else 0
    proc = subprocess.Popen(accelerate_command(config, str(REPO / "train.py"), *args), cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if max(metrics_by_step(run, since), default=0) >= at_step:  # this launch's own lines
            break
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.environ().get("RANK") == str(rank) and "train.py" in " ".join(p.cmdline())]
    victims = [p for p in ranks if p.parent() not in ranks]  # the rank, not a DataLoader worker it forked
    assert victims, "rank process not found (the run ended before the kill?)"
    victims[0].send_signal(signal.SIGKILL)
    return proc.wait(timeout=300)


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    else:
        path.unlink()


def _newest_step(run: Path) -> int:
    return int(complete_checkpoints(run / "checkpoints")[-1].name[5:])


@pytest.mark.slow
@pytest.mark.parametrize("config", ENGINES)
def test_kills_and_damaged_checkpoints_resume_bit_for_bit(tmp_path, digits_dir, config, caplog, reference_run):
    """One 2-process run is killed three times and resumed from a damaged checkpoint, and ends bit for bit like the
    uninterrupted run (every step's loss and LR, the final weights): kill -9 of a random rank at a random step;
    kill -9 of a rank inside a checkpoint save; kill -9 at a random step after the next save; then the newest
    checkpoint gets a truncated file and ``--resume latest`` falls back to the previous one, naming the file. Before
    that, every file of the uninterrupted run's newest checkpoint, truncated, emptied or deleted in a copy, makes the
    verified choice fall back to the previous checkpoint, naming that file."""
    rng = random.Random(f"faults-{config}")
    full = reference_run(config)
    _fallback_matrix(full, tmp_path / "copies", caplog)

    split = tmp_path / "split"
    tried = []
    k1, r1 = rng.randint(4, 8), rng.randint(0, 1)  # after the first save (step 3)
    assert _launch_and_kill(config, digits_args(tmp_path, digits_dir, "split", *EXTRA, steps=STEPS), k1, r1,
                            split) != 0
    tried.append(f"kill -9 rank {r1} at step >= {k1}")
    resume = digits_args(tmp_path, digits_dir, "split", *EXTRA, "--resume", "latest", steps=STEPS)
    last = _newest_step(split)
    in_save, r2 = last + 3, rng.randint(0, 1)  # the next save after the resume
    killed = accelerate_launch(config, resume, env={hooks.KILL_IN_SAVE: f"{in_save}@{r2}"}, check=False)
    assert killed.returncode != 0
    assert _newest_step(split) == last  # the half-written one is no candidate
    tried.append(f"kill -9 rank {r2} inside the save of step {in_save}")
    start = _newest_step(split)
    k3, r3 = rng.randint(start + 4, start + 8), rng.randint(0, 1)  # after the resumed run's next save
    assert _launch_and_kill(config, resume, k3, r3, split) != 0
    tried.append(f"kill -9 rank {r3} at step >= {k3}")

    newest, previous = complete_checkpoints(split / "checkpoints")[-2:][::-1]
    shard = sorted(f for f in checkpoint_files(newest) if "rank_1" in f or "__1_" in f or "rank_00001" in f)[0]
    _damage(newest / shard, "truncated")
    done = accelerate_launch(config, resume)
    log = (split / "train.log").read_text()
    assert f"{newest / shard}: " in log and f"falling back to {previous}" in log
    assert f"resumed from {previous}" in log
    tried.append(f"truncated {shard} in {newest.name}")
    assert done.returncode == 0
    assert sorted(metrics_by_step(split)) == sorted(metrics_by_step(full)) == list(range(1, STEPS + 1))
    assert_same_trajectory(full, split, 0, STEPS)
    print("survived:", "; ".join(tried))


def _fallback_matrix(run: Path, work: Path, caplog) -> None:
    """Each file of the newest checkpoint of ``run`` truncated / emptied / missing, in a copy: the verified choice
    is the previous checkpoint, the file is named in the log, the damaged one is moved aside (one process)."""
    newest, previous = complete_checkpoints(run / "checkpoints")[-2:][::-1]
    names = checkpoint_files(newest) + ["meta.json"]
    assert set(read_meta_or_none(newest)["files"]) == set(checkpoint_files(newest))
    assert verify(newest) == [] and verify(previous) == []
    for name in names:
        for how in ("truncated", "zero-byte", "missing"):
            copy = work / "run"
            shutil.rmtree(copy, ignore_errors=True)
            for c in (previous, newest):
                shutil.copytree(c, copy / "checkpoints" / c.name)
            _damage(copy / "checkpoints" / newest.name / name, how)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="harness"):
                chosen = CheckpointManager(copy, 20, 0, fallback=True).verified(copy / "checkpoints" / newest.name)
            assert chosen.name == previous.name, (name, how)
            assert str(copy / "checkpoints" / newest.name / name) in caplog.text, (name, how, caplog.text)
            assert [p.name for p in complete_checkpoints(copy / "checkpoints")] == [previous.name]


@pytest.mark.slow
@pytest.mark.parametrize("config", ENGINES)
def test_nonfinite_loss_is_skipped_on_every_rank_and_stops_the_run(tmp_path, digits_dir, config):
    """A NaN loss injected on rank 1 only at step 5, and at every step from 10: step 5 is skipped on both ranks (the
    checkpoint after step 5 equals the one after step 4, and each rank's shard stays finite) and training goes on;
    after ``train.max_nonfinite_steps`` (3) skipped steps in a row the run stops with the non-finite exit status of
    every rank, each rank having counted the skips; every checkpoint holds finite weights and the older ones remain."""
    extra = ("data.num_workers=0", "checkpoint.every_steps=1", "checkpoint.keep_last=100",
             "train.max_nonfinite_steps=3")
    proc = accelerate_launch(config, digits_args(tmp_path, digits_dir, "nan", *extra),
                             env={hooks.NONFINITE_LOSS: "5,10+@1"}, check=False)
    run = tmp_path / "nan"
    assert proc.returncode != 0
    assert f"exitcode  : {int(ExitCode.NONFINITE)}" in proc.stdout + proc.stderr  # torch elastic's summary of each rank
    m = metrics_by_step(run)
    assert [m[s]["nonfinite_steps"] for s in (4, 5, 9, 10, 11, 12)] == [0, 1, 1, 2, 3, 4]
    assert [m[s]["nonfinite_in_a_row"] for s in (4, 5, 6, 12)] == [0, 1, 0, 3]
    assert max(m) == 12
    for rank in (0, 1):
        status = json.loads((run / "status" / f"rank_{rank:05d}.json").read_text())
        assert "NonFiniteError" in status["message"] and "this rank skipped 4 in all, 3 in a row" in status["message"]
    ckpts = complete_checkpoints(run / "checkpoints")
    assert [int(c.name[5:]) for c in ckpts] == list(range(1, 12))  # none after the stop, none deleted
    states = {int(c.name[5:]): load_model_state(c) for c in ckpts if int(c.name[5:]) in (4, 5, 6, 9, 10, 11)}
    assert all(torch.isfinite(t).all() for s in states.values() for t in s.values() if t.is_floating_point())
    same = lambda a, b: all(torch.equal(states[a][k], states[b][k]) for k in states[a])
    assert same(4, 5) and not same(5, 6) and same(9, 10) and same(10, 11)


@pytest.mark.slow
def test_single_process_nonfinite_exit_status_and_bad_resume_path(tmp_path, digits_dir):
    """One process (plain engine): the non-finite stop is exit status 4 with a message naming the steps, loss and
    gradient norm; ``--resume PATH`` of a checkpoint with a truncated file is exit status 2 naming the file."""
    extra = ("data.num_workers=0", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "train.max_nonfinite_steps=2")
    proc = train(digits_args(tmp_path, digits_dir, "one", *extra), env={hooks.NONFINITE_LOSS: "6+"}, check=False)
    assert proc.returncode == ExitCode.NONFINITE
    assert "steps 6-7; found at step 7" in proc.stderr and "loss nan, gradient norm nan" in proc.stderr
    ckpts = complete_checkpoints(tmp_path / "one" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000006"]
    _damage(ckpts[-1] / "optimizer.pt", "truncated")
    bad = train(digits_args(tmp_path, digits_dir, "one", *extra, "--resume", str(ckpts[-1])), check=False)
    assert bad.returncode == 2 and f"{ckpts[-1] / 'optimizer.pt'}: " in bad.stderr
    assert "resumed" not in bad.stderr


class _TinyEngine:
    """A real module with the three things a save needs (parameters, a guard, ``save``)."""

    kind = "local"

    def __init__(self):
        self.device = torch.device("cpu")
        self.module = torch.nn.Linear(3, 2)
        self.guard = NonfiniteGuard(self.device, 0, False)

    def save(self, directory: Path, rank: int) -> None:
        torch.save(self.module.state_dict(), directory / "model.pt")


def test_no_checkpoint_of_nonfinite_weights(tmp_path):
    """A save of non-finite parameters raises before anything is written; the older checkpoints stay."""
    engine = _TinyEngine()
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(engine, root, step, {"step": step}, {}, 0, keep_last=2)
    with torch.no_grad():
        engine.module.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="step 3 not written"):
        save_checkpoint(engine, root, 3, {"step": 3}, {}, 0, keep_last=2)
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000001", "step_00000002"]
    assert verify(root / "step_00000002") == []
