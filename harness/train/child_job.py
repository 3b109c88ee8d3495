"""Run the real trainer as a child job (one process, or ``accelerate launch`` with a launch config) and
collect what it left: ``summary.json``, each rank's ``status/rank_*.json``, the exit status, the output.

Used by ``harness profile``, the fit probe and the benchmark scripts, so each measurement is a fresh
process group (a caught out-of-memory error leaves the caching allocator fragmented and its tensors
alive; later measurements in the same process would lie). A timeout kills the whole process group
(``start_new_session``), turning a hang into a recorded result.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.core.paths import REPO_ROOT


@dataclass
class ChildRun:
    """Outcome of one child training job.

    Attributes:
        returncode: exit status of the launcher (None when killed by the timeout).
        timed_out: the job ran past its timeout and was killed.
        seconds: wall time of the job.
        summary: rank 0's ``summary.json`` (None if the run did not finish).
        statuses: each rank's ``{"rank", "status": "ok"|"oom"|"error", "message"}``, by rank.
        output: the last 20,000 characters of stdout + stderr.
    """

    returncode: Optional[int]
    timed_out: bool
    seconds: float
    summary: Optional[Dict[str, Any]]
    statuses: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    output: str = ""


def free_port() -> int:
    """A TCP port free on this host now (for the rendezvous of a local multi-process job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(train_args: List[str], launch_config: Optional[str] = None, num_processes: int = 1,
                  port: Optional[int] = None) -> List[str]:
    """``accelerate launch --config_file CFG --num_processes N train.py ARGS``; without a launch config
    ``torchrun --nproc_per_node N train.py ARGS`` (plain PyTorch DDP) for N > 1, or ``python train.py ARGS``."""
    script = str(REPO_ROOT / "train.py")
    if not launch_config and num_processes > 1:
        return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(num_processes),
                "--master_port", str(port or free_port()), script, *train_args]
    if not launch_config:
        return [sys.executable, script, *train_args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--config_file", launch_config, "--num_processes", str(num_processes),
            "--main_process_port", str(port or free_port()), script, *train_args]


def slurm_command(train_args: List[str], launch_config: str, num_processes: int, nodes: int) -> tuple:
    """``srun`` over ``nodes`` nodes of the current allocation, one ``slurm/node.sh`` (one ``accelerate
    launch``) per node, rendezvous on the first; returns ``(command, environment)``."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    env = {"NNODES": str(nodes), "GPUS_PER_NODE": str(num_processes // nodes), "MASTER_ADDR": hosts[0],
           "MASTER_PORT": str(free_port()), "LAUNCH_CONFIG": launch_config}
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           str(REPO_ROOT / "slurm" / "node.sh"), str(REPO_ROOT / "train.py"), *train_args]
    return cmd, env


def synthetic_train_args(model: str, micro_batch: int, steps: int, world: int, run_dir: Path,
                         warmup_steps: int) -> List[str]:
    """``train.py`` arguments every measurement run shares: synthetic batches of ``model``'s exact shapes,
    ``steps`` optimizer steps of ``micro_batch`` samples per rank over ``world`` ranks, the run in
    ``run_dir``, the first ``warmup_steps`` steps excluded from the step time, no progress bar."""
    run_dir = Path(run_dir)
    return ["--config", "synthetic", "--model", model, "--micro-batch-size", str(micro_batch),
            "--train-samples", str(steps * micro_batch * world), "--output-dir", str(run_dir.parent),
            "--run-name", run_dir.name, f"train.timing_warmup_steps={warmup_steps}", "train.progress_bar=false"]


def run_training(train_args: List[str], run_dir: Path, launch_config: Optional[str] = None, num_processes: int = 1,
                 timeout_s: Optional[float] = None, env: Optional[Dict[str, str]] = None, launcher: str = "local",
                 nodes: int = 1) -> ChildRun:
    """Run the trainer with ``train_args`` (which must direct its run into ``run_dir``) and collect the outcome.
    ``launcher="slurm"`` spreads the ranks over ``nodes`` nodes of the current Slurm allocation. An existing
    ``run_dir`` is removed first, so no summary or rank status of an earlier run is read as this one's.

    Raises nothing for a failed run: the failure is in the returned :class:`ChildRun`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if launcher == "slurm":
        cmd, slurm_env = slurm_command(train_args, launch_config, num_processes, nodes)
        env = {**(env or {}), **slurm_env}
    else:
        cmd = train_command(train_args, launch_config, num_processes)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
    summary_path = run_dir / "summary.json"
    statuses = {}
    for path in sorted((run_dir / "status").glob("rank_*.json")):
        st = json.loads(path.read_text())
        statuses[int(st["rank"])] = st
    return ChildRun(returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                    seconds=time.perf_counter() - start,
                    summary=json.loads(summary_path.read_text()) if summary_path.is_file() else None,
                    statuses=statuses, output=(output or "")[-20000:])
