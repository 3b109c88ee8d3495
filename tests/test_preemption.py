"""Fault injection on real runs (CPU, gloo, 2 processes, ZeRO-2 and FSDP2): SIGUSR1 to a Slurm batch script and
SIGTERM to every process of the job at random steps (the batch script with stand-ins for srun/scontrol), a hung
rank, a killed DataLoader worker, an all-corrupt shard list, and a two-"node" run on localhost killed and resumed.
Each resume is compared bit for bit with the uninterrupted reference run of ``tests/conftest.py``."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.components.checkpoint import complete_checkpoints
from harness.core import hooks
from harness.core.errors import ExitCode
from harness.train.child_job import free_port
from tests.helpers import (
    REFERENCE_EXTRA,
    REPO,
    STEPS,
    accelerate_launch,
    assert_same_trajectory,
    child_env,
    child_pids,
    digits_args,
    read_jsonl,
    slurm_stubs,
    train,
    write_shards,
)

pytestmark = pytest.mark.slow  # every test here runs the real trainer as processes
HANG_S = 10  # train.hang_timeout_s of the hang test: the watchdog starts before the model is built


def _last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_jsonl(metrics) if "loss" in r), default=0) if metrics.is_file() else 0


def _start(cmd, env, log: Path) -> subprocess.Popen:
    """A job in its own session (so the whole job can be signalled, as Slurm does), output to ``log``."""
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_step(job: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _last_step(run_dir) < step:
        assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def _tree(pid: int) -> list:
    """``pid`` and all its descendants (torch elastic starts each rank in a process group of its own)."""
    children = child_pids(pid)
    if children is None:
        return []
    return [pid] + [q for c in children for q in _tree(c)]


def _signal_tree(pid: int, sig: int) -> int:
    """Send ``sig`` to every process of the job, as Slurm does; returns how many got it."""
    pids = _tree(pid)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def _slurm_env(tmp_path: Path, launch_config: str) -> dict:
    stubs = slurm_stubs(tmp_path / "bin")
    return child_env({"PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
                      "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "2",
                      "MASTER_PORT": str(free_port()), "LAUNCH_CONFIG": f"ds_configs/{launch_config}",
                      "STOP_FILE": str(tmp_path / "stop"), "HARNESS_VENV": str(tmp_path / "no-venv")})


@pytest.mark.parametrize("launch_config, signals", [("zero2.yaml", ["TERM"]), ("fsdp.yaml", ["USR1", "TERM"])])
def test_stop_signals_at_random_steps_checkpoint_there_requeue_and_resume_bit_for_bit(tmp_path, digits_dir,
                                                                                      reference_run, launch_config,
                                                                                      signals):
    """The batch script (``slurm/train.sbatch``, with stand-ins for srun/scontrol) stopped at random steps, the way
    Slurm stops a job, and requeued each time:

    * SIGUSR1 to the batch script alone (what ``--signal=B:USR1@300`` sends before the time limit): it writes the
      stop file, every rank checkpoints at the next log step and ends normally, and the script requeues the job;
    * SIGTERM to every process of the job (batch script, launcher, ranks, DataLoader workers: preemption,
      ``scancel``, the time limit): every rank checkpoints at the same step (the next log step) and exits with status
      75, and the script requeues the job.

    The last requeued job runs to the end and equals the uninterrupted run bit for bit."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    print(f"random seed {seed}")
    extra = (*REFERENCE_EXTRA, "checkpoint.every_steps=0", "checkpoint.keep_last=5")
    env = _slurm_env(tmp_path, launch_config)
    job_cmd = [str(REPO / "slurm" / "train.sbatch"), *digits_args(tmp_path, digits_dir, "job", *extra, steps=STEPS)]
    run_dir, log = tmp_path / "job", tmp_path / "job.log"
    stopped = 0
    for i, name in enumerate(signals):
        target = rng.randint(stopped + 3, stopped + 12)
        job = _start(job_cmd, env, log)
        _wait_for_step(job, run_dir, target, log)
        if name == "USR1":
            job.send_signal(signal.SIGUSR1)
        else:
            assert _signal_tree(job.pid, signal.SIGTERM) >= 6  # script, launcher, 2 ranks, 2 data workers
        assert job.wait(timeout=240) == 0, log.read_text()[-4000:]  # requeued: the batch script ends well
        assert (tmp_path / "bin" / "requeued").read_text().split() == ["4242"] * (i + 1)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["stopped_by_signal"], summary["stopped_by_stop_file"]) == (name == "TERM", name == "USR1")
        assert target <= summary["steps"] <= target + 5 and summary["zeroshot_top1"] is None, (target, summary)
        stopped = summary["steps"]
        assert int(complete_checkpoints(run_dir / "checkpoints")[-1].name[5:]) == stopped == _last_step(run_dir)
        statuses = [json.loads((run_dir / "status" / f"rank_{r:05d}.json").read_text())["status"] for r in (0, 1)]
        assert statuses == (["preempted"] * 2 if name == "TERM" else ["ok"] * 2), statuses
        assert not (tmp_path / "stop").exists()  # the stop file is consumed, so the requeued job runs
        print(f"{launch_config}: SIG{name} after step {target}, checkpoint at step {stopped}")
    job = _start(job_cmd, env, log)  # the requeued job runs to the end
    assert job.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert "resumed from" in log.read_text()
    assert (tmp_path / "bin" / "requeued").read_text().split() == ["4242"] * len(signals)  # not requeued again
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert_same_trajectory(reference_run(launch_config), run_dir, 0, STEPS)


def test_sigterm_to_a_single_process_exits_with_the_preempted_status(tmp_path, digits_dir):
    """Without a launcher the process's own status is the one a scheduler sees: 75."""
    args = [sys.executable, str(REPO / "train.py"), *digits_args(tmp_path, digits_dir, "one", "data.num_workers=1")]
    job = _start(args, child_env(), tmp_path / "one.log")
    _wait_for_step(job, tmp_path / "one", 3, tmp_path / "one.log")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == ExitCode.PREEMPTED, (tmp_path / "one.log").read_text()[-3000:]
    steps = json.loads((tmp_path / "one" / "summary.json").read_text())["steps"]
    assert [p.name for p in complete_checkpoints(tmp_path / "one" / "checkpoints")] == [f"step_{steps:08d}"]


def test_a_hung_rank_dumps_every_threads_stack_on_both_ranks_and_the_job_ends(tmp_path):
    """Test hook: rank 1 sleeps after step 3 (HARNESS_TEST_HANG_AFTER_STEP). Its watchdog dumps its stacks; rank 0,
    blocked in the next step's collective, dumps its own (or is stopped by the launcher); the job ends."""
    args = ["--config", "synthetic", "--model", "ViT-micro-8", "--micro-batch-size", "8", "--train-samples", "800",
            "--output-dir", str(tmp_path), "--run-name", "hang", "train.progress_bar=false", "train.log_every_steps=1",
            f"train.hang_timeout_s={HANG_S}"]
    start = time.monotonic()
    proc = accelerate_launch("zero2.yaml", args, env={hooks.HANG_AFTER_STEP: "1:3"}, check=False, timeout=400)
    took = time.monotonic() - start
    assert proc.returncode != 0
    dump = (tmp_path / "hang" / "hang_rank_00001.txt").read_text()
    idle = re.match(r"error: rank 1: no training step completed for (\d+) s", dump)
    assert idle and int(idle.group(1)) >= HANG_S and "after step 2" in dump, dump[:300]
    assert "step_done" in dump and "harness/train/trainer.py" in dump  # the main thread, where it hangs
    assert "no training step completed" in proc.stdout + proc.stderr
    assert _last_step(tmp_path / "hang") == 3 and took < 300
    rank0 = tmp_path / "hang" / "hang_rank_00000.txt"
    if rank0.is_file():  # the peer, blocked in a collective of step 4
        assert "harness/train/trainer.py" in rank0.read_text()
    print(f"hung rank detected and the job ended in {took:.0f} s; rank 0 dump: {rank0.is_file()}")


def test_killed_dataloader_worker_and_all_corrupt_shards_end_the_run_with_a_clear_error(tmp_path, digits_dir):
    args = digits_args(tmp_path, digits_dir, "killed", "data.num_workers=2")
    job = _start([sys.executable, str(REPO / "train.py"), *args], child_env(), tmp_path / "killed.log")
    _wait_for_step(job, tmp_path / "killed", 2, tmp_path / "killed.log")
    workers = child_pids(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    assert job.wait(timeout=120) == 1
    out = (tmp_path / "killed.log").read_text()
    assert time.monotonic() - start < 60
    assert "DataWorkerError: data.train_data: rank 0: a DataLoader worker died" in out, out[-3000:]
    assert f"{workers[1]}" in out and str(digits_dir / "train") in out
    status = json.loads((tmp_path / "killed" / "status" / "rank_00000.json").read_text())
    assert status["status"] == "error" and "DataWorkerError" in status["message"]

    keys = [f"{s:05d}{i:04d}" for s in range(2) for i in range(8)]
    write_shards(tmp_path / "bad", n_shards=2, per_shard=8, corrupt=keys)
    args = digits_args(tmp_path, digits_dir, "corrupt", "data.num_workers=1")
    args[args.index("--train-data") + 1] = str(tmp_path / "bad")
    start = time.monotonic()
    proc = train(args, check=False)
    assert proc.returncode == 1 and time.monotonic() - start < 120
    assert "without one valid sample" in proc.stderr and "'corrupt': 16" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "corrupt" / "checkpoints").exists()


def _node(rank: int, port: int, log: Path, train_args) -> subprocess.Popen:
    env = child_env({"NNODES": "2", "NODE_RANK": str(rank), "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "LAUNCH_CONFIG": "ds_configs/zero2.yaml",
                     "ACCELERATE": str(Path(sys.executable).with_name("accelerate"))})
    return _start([str(REPO / "slurm" / "node.sh"), str(REPO / "train.py"), *train_args], env, log)


def test_two_node_rehearsal_on_localhost_kill_one_node_and_resume(tmp_path, digits_dir, reference_run):
    """Two "nodes" on this machine (slurm/node.sh: accelerate launch --num_machines 2 --machine_rank 0|1, one
    process each, rendezvous on 127.0.0.1): train with checkpoints every 10 steps, SIGKILL every process of node 1
    after step 25, node 0 ends by itself, both resume from the newest complete checkpoint, and the run equals one
    node with 2 processes bit for bit."""
    run_dir = tmp_path / "two-nodes"
    args = digits_args(tmp_path, digits_dir, "two-nodes", *REFERENCE_EXTRA, "--resume", "latest", steps=STEPS)
    port = free_port()
    nodes = [_node(r, port, tmp_path / f"node{r}.log", args) for r in (0, 1)]
    _wait_for_step(nodes[0], run_dir, 25, tmp_path / "node0.log")
    assert _signal_tree(nodes[1].pid, signal.SIGKILL) >= 3  # node 1 lost: its launcher, rank and data worker
    start = time.monotonic()
    status0 = nodes[0].wait(timeout=240)
    print(f"node 0 ended {time.monotonic() - start:.0f} s after node 1 was killed, status {status0}")
    assert status0 != 0
    nodes[1].wait(timeout=60)
    done = [int(p.name[5:]) for p in complete_checkpoints(run_dir / "checkpoints")]
    assert done and 20 <= done[-1] < STEPS, done
    port = free_port()
    nodes = [_node(r, port, tmp_path / f"node{r}.log", args) for r in (0, 1)]
    assert [n.wait(timeout=400) for n in nodes] == [0, 0], (tmp_path / "node0.log").read_text()[-4000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in (tmp_path / "node0.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert_same_trajectory(reference_run("zero2.yaml"), run_dir, 0, STEPS)
