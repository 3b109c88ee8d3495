"""Slurm templates without Slurm: the dry run prints each node's command; the batch script runs for real
with stand-ins for ``srun`` and ``scontrol`` (one node, 2 CPU processes), checkpoints and requeues on the
pre-timeout signal, and the requeued job resumes."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.checkpoint import complete_checkpoints
from harness.launch import free_port
from tests.conftest import REPO, read_jsonl


def _dry_run(script: str, env: dict, *args: str) -> list:
    proc = subprocess.run([str(REPO / "slurm" / script), *args], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("node ")]


def test_train_dry_run_prints_one_launch_per_node():
    lines = _dry_run("train.sbatch", {"NNODES": "3", "GPUS_PER_NODE": "4", "HOSTS": "gpu07 gpu08 gpu11",
                                      "LAUNCH_CONFIG": "ds_configs/zero3.yaml"},
                     "--config", "clip", "--run-name", "b32 run")
    assert len(lines) == 3
    for node, line in enumerate(lines):
        cmd = shlex.split(line.split(":", 1)[1])
        def opt(flag, cmd=cmd):
            return cmd[cmd.index(flag) + 1]
        assert cmd[:2] == ["accelerate", "launch"] and opt("--config_file") == "ds_configs/zero3.yaml"
        assert (opt("--num_machines"), opt("--machine_rank"), opt("--num_processes")) == ("3", str(node), "12")
        assert opt("--main_process_ip") == "gpu07"  # rendezvous on the first node
        assert cmd[cmd.index("train.py"):][:3] == ["train.py", "--resume", "latest"]  # a requeued job resumes
        assert "b32 run" in cmd and any(a.startswith("checkpoint.stop_file=") for a in cmd)
    ports = {shlex.split(ln)[shlex.split(ln).index("--main_process_port") + 1] for ln in lines}
    assert len(ports) == 1


def test_bad_gpu_count_is_refused():
    proc = subprocess.run([str(REPO / "slurm" / "train.sbatch")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "NNODES": "2", "GPUS_PER_NODE": "two"})
    assert proc.returncode == 2 and "GPUS_PER_NODE: must be a positive integer" in proc.stderr


def _stubs(folder: Path) -> Path:
    """``srun`` runs its command once as node 0 (a one-node allocation); ``scontrol`` answers ``show
    hostnames`` and records ``requeue``. Stand-ins for Slurm's binaries, not for the templates under test."""
    folder.mkdir()
    (folder / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                                 "SLURM_NODEID=0 exec \"$@\"\n")
    (folder / "scontrol").write_text("#!/usr/bin/env bash\ncase $1 in show) echo localhost;; "
                                     f"requeue) echo \"$2\" >> {folder}/requeued;; esac\n")
    for f in ("srun", "scontrol"):
        (folder / f).chmod(0o755)
    return folder


@pytest.mark.slow
def test_batch_script_checkpoints_requeues_and_resumes(tmp_path):
    stubs = _stubs(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "LAUNCH_CONFIG": "ds_configs/fsdp.yaml", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "STOP_FILE": str(tmp_path / "stop"), "HARNESS_VENV": str(tmp_path / "no-venv")}
    args = [str(REPO / "slurm" / "train.sbatch"), "--config", "synthetic", "--model", "ViT-micro-8",
            "--output-dir", str(tmp_path / "runs"), "--run-name", "job", "--micro-batch-size", "8",
            "--train-samples", "16000", "checkpoint.every_steps=0", "train.progress_bar=false"]
    metrics = tmp_path / "runs" / "job" / "metrics.jsonl"
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (metrics.is_file() and len(read_jsonl(metrics)) >= 3):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends 5 minutes before the time limit (--signal=B:USR1@300)
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0, out[-3000:]
    assert (stubs / "requeued").read_text().split() == ["4242"]
    stopped_at = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert stopped_at["stopped_by_stop_file"] and 3 <= stopped_at["steps"] < 1000
    assert [int(p.name[5:]) for p in complete_checkpoints(tmp_path / "runs" / "job" / "checkpoints")] == [
        stopped_at["steps"]]
    assert stopped_at["zeroshot_top1"] is None and not (tmp_path / "stop").exists()
    # the requeued job: the same script and arguments, finished this time
    rerun = subprocess.run(args[:-4] + ["--train-samples", "16000", "checkpoint.every_steps=0",
                                        "train.progress_bar=false", "--max-steps", str(stopped_at["steps"] + 2)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    final = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert final["steps"] == stopped_at["steps"] + 2 and not final["stopped_by_stop_file"]
    assert (stubs / "requeued").read_text().split() == ["4242"]  # not requeued again


def test_fit_probe_dry_run_shards_single_node_cells_and_merges():
    lines = _dry_run("fit_probe.sbatch", {"NNODES": "2", "GPUS_PER_NODE": "8", "FIT_OUT": "results/fit_x"},
                     "--models", "ViT-B-32,ViT-L-14", "--stages", "0,3", "--nodes", "1,2")
    assert len(lines) == 2
    for node, line in enumerate(lines):
        cmd = shlex.split(line.split(":", 1)[1])
        assert cmd[:2] == ["harness", "fit-probe"] and "--select" in cmd and "single-node" in cmd
        assert cmd[cmd.index("--shard") + 1] == f"{node}/2" and cmd[-1] == f"results/fit_x/node_{node}"
    proc = subprocess.run([str(REPO / "slurm" / "fit_probe.sbatch"), "--models", "ViT-B-32"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DRY_RUN": "1", "NNODES": "2", "GPUS_PER_NODE": "8",
                                                      "FIT_OUT": "results/fit_x"})
    host = [ln for ln in proc.stdout.splitlines() if ln.startswith("batch host:")]
    assert "--select multi-node --launcher slurm" in host[0]
    assert host[1].split(":", 1)[1].split() == ["harness", "fit-probe", "--merge", "results/fit_x/node_0",
                                                "results/fit_x/node_1", "results/fit_x/multi_node", "--out",
                                                "results/fit_x"]


def test_fit_probe_shards_and_selects_cells(tmp_path):
    """The flags the Slurm phases use: --select keeps single- or multi-node cells, --shard I/K every K-th."""
    from harness.fitcells import validate_args
    from harness.fitprobe import parse_args

    base = ["--models", "ViT-micro-8", "--stages", "ddp,fsdp,3", "--nodes", "1,2", "--budget-gib", "0.25",
            "--out", str(tmp_path)]
    cells, _ = validate_args(parse_args(base + ["--select", "single-node"]))
    assert [c.nodes for c in cells] == [1, 1, 1]
    multi, _ = validate_args(parse_args(base + ["--select", "multi-node"]))
    assert [c.nodes for c in multi] == [2, 2, 2]
    shards = [validate_args(parse_args(base + ["--shard", f"{i}/2"]))[0] for i in range(2)]
    assert sorted(c.key for s in shards for c in s) == sorted(c.key for c in cells + multi)
