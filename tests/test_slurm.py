"""Slurm templates without Slurm: the dry run prints each node's command, bad input is refused, and the fit probe's
phases shard and select cells. (The batch script run for real with stand-ins for ``srun`` and ``scontrol``, stopped
by SIGUSR1 and SIGTERM, requeued and resumed: tests/test_preemption.py.)"""
from __future__ import annotations

import os
import shlex
import subprocess

from tests.helpers import REPO


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
    from harness.fit.cells import validate_args
    from harness.fit.probe import parse_args

    base = ["--models", "ViT-micro-8", "--stages", "ddp,fsdp,3", "--nodes", "1,2", "--budget-gib", "0.25",
            "--out", str(tmp_path)]
    cells, _ = validate_args(parse_args(base + ["--select", "single-node"]))
    assert [c.nodes for c in cells] == [1, 1, 1]
    multi, _ = validate_args(parse_args(base + ["--select", "multi-node"]))
    assert [c.nodes for c in multi] == [2, 2, 2]
    shards = [validate_args(parse_args(base + ["--shard", f"{i}/2"]))[0] for i in range(2)]
    assert sorted(c.key for s in shards for c in s) == sorted(c.key for c in cells + multi)
