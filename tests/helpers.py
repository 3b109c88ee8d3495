"""What the tests share: img2dataset-style shards with realistic faults, the ways to run the real trainer (in this
process, as a child process, under ``accelerate launch``), the argument lists of the standard runs, and the
comparisons of two runs. Fixtures (the digits set, the reference runs several tests compare against) are in
``tests/conftest.py``."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from harness.components.checkpoint import complete_checkpoints, load_model_state
from harness.train.child_job import free_port

REPO = Path(__file__).resolve().parent.parent
STEPS = 60
"""Optimizer steps of the standard digits run (global batch 16): long enough that a signal or a kill sent at a
step lands before the end."""

REFERENCE_EXTRA = ("data.num_workers=1", "checkpoint.every_steps=10", "checkpoint.keep_last=10",
                   "data.tokenizer=quadtree", "loss.decatt_weight=150")
"""Settings of the uninterrupted reference runs; a run compared with one passes the same trajectory-defining
fields (``data.num_workers`` among them) and may choose its own checkpoint interval. The references train on
quadtree mixed-resolution tokens (selected in the data worker) with DeCAtt on, so every ZeRO-2 / FSDP2 kill,
preemption and resume test covers both knobs too; the grid ViT's sharded runs are :data:`SHARDED`'s."""
SIGLIP = ("loss.kind=siglip", "loss.impl=tiled", "loss.tile_size=5")
VALIDATE = ("eval.batch_size=10",)  # with data.val_data set by the fixture: 101 samples in forwards of 10
LAYOUTS = {  # reference layout: (global batch, steps, micro batch of the 1-process reference, extra flags)
    "k1": (16, 8, 16, ()),  # 2 ranks x micro 8: no accumulation
    "k4": (64, 3, 64, ()),  # 2 ranks x K=4 x micro 8, accumulated with negatives
    "siglip": (16, 8, 16, SIGLIP),  # SigLIP, tiled (tile 5 divides nothing), 2 ranks x micro 8
}
SHARDED = {  # name: (launch config, extra flags, layout, rank 0's expected share of the parameter elements)
    "zero0": ("zero0.yaml", (), "k1", 1.0),
    "zero1": ("zero1.yaml", (), "k4", 1.0),
    "zero2": ("zero2.yaml", (), "k4", 1.0),
    "zero3": ("zero3.yaml", VALIDATE, "k1", 0.5),
    "zero3-checkpointing-siglip": ("zero3.yaml", ("--grad-checkpointing", "1"), "siglip", 0.5),
    "zero2-offload": ("zero2_offload.yaml", (), "k4", 1.0),
    "zero3-offload": ("zero3_offload.yaml", (), "k1", 0.5),
    "fsdp-checkpointing": ("fsdp.yaml", ("--grad-checkpointing", "2"), "k4", 0.5),
    "fsdp-shard-grad-op": ("fsdp_shard_grad_op.yaml", (), "k1", 0.5),
    "fsdp-siglip": ("fsdp.yaml", VALIDATE, "siglip", 0.5),
}
"""The 2-process sharded runs on synthetic data, one per engine setting: every ZeRO stage (with activation
checkpointing, with the optimizer offloaded), FSDP2 full shard and shard-grad-op; some accumulate with negatives,
two train with the tiled SigLIP loss, two validate at the end. Each is compared with the 1-process run of its layout
(``test_scale``), exported (``test_export``) or validated again in one process (``test_validation``);
the fixtures ``sharded_run`` and ``single_reference`` of ``tests/conftest.py`` make each once per session."""


# --------------------------------------------------------------------------------------------- shards

def _png(rng: np.random.Generator, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def write_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0, missing: Sequence[str] = (),
                 corrupt: Sequence[str] = (), no_caption: Sequence[str] = (), truncate: Optional[int] = None,
                 stats: bool = True) -> Dict[str, List[str]]:
    """Write img2dataset-layout shards ``folder/0000k.tar`` of ``<key>.png|txt|json`` samples.

    ``missing`` keys are left out (failed downloads), ``corrupt`` keys get garbage image bytes,
    ``no_caption`` keys lose their ``.txt``, and shard ``truncate`` is cut mid-file. Captions are
    ``"caption <key>"`` so a test can tell samples apart. Returns ``{"written": keys, "good": keys}``
    where good keys are those a reader can decode (for a truncated shard: computed by the caller).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, good = [], []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        n_ok = 0
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                if key in missing:
                    continue
                img = b"\x89PNG\r\n\x1a\n garbage" if key in corrupt else _png(rng)
                _add(tf, f"{key}.png", img)
                if key not in no_caption:
                    _add(tf, f"{key}.txt", f"caption {key}".encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                written.append(key)
                n_ok += 1
                if key not in corrupt and key not in no_caption:
                    good.append(key)
        if stats:
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n_ok, "count": per_shard}))
        if truncate == s:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2 + 100])
    return {"written": written, "good": good}


# --------------------------------------------------------------------------------------------- running

def child_env(env: Optional[dict] = None) -> dict:
    """The environment of every child the tests start: no GPU, one thread per process, this checkout first."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}


def run_cmd(args: List[str], env: Optional[dict] = None, timeout: int = 600, cwd: Path = REPO,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the test environment (:func:`child_env`), capture output."""
    proc = subprocess.run(args, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def accelerate_command(config: str, *args: str) -> List[str]:
    """``accelerate launch --config_file ds_configs/<config> ...`` on a free port (``config`` may be a path)."""
    path = config if Path(config).is_absolute() else str(REPO / "ds_configs" / config)
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", path,
            "--main_process_port", str(free_port()), *args]


def accelerate_launch(config: str, train_args: List[str], **kw) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file ds_configs/<config> train.py <train_args>``: a real multi-process run."""
    return run_cmd(accelerate_command(config, str(REPO / "train.py"), *train_args), **kw)


def train_py(train_args: List[str], **kw) -> subprocess.CompletedProcess:
    """``python train.py <train_args>`` as a child process: for the tests where a process of its own is the point
    (a signal, a kill, an exit inside a save)."""
    return run_cmd([sys.executable, str(REPO / "train.py"), *train_args], **kw)


def in_process(main: Callable[[List[str]], int], argv: List[str], env: Optional[dict] = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """``main(argv)`` (a command's entry, as open_clip's tests call ``main([...])``) run in this process with stdout and
    stderr captured and the environment, the root logger and its handlers restored afterwards. An error the entry
    does not turn into an exit status is exit status 1 with its traceback on stderr, as a process would end.
    Returns what :func:`run_cmd` returns."""
    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = int(main(list(argv)))
            except SystemExit as e:
                code = int(e.code or 0)
            except Exception:  # noqa: BLE001 - a process would print it and exit 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    proc = subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({code})\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def train(train_args: List[str], env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    """``train.py <train_args>`` in this process (:func:`in_process` of :func:`harness.cli.train_main`): for
    single-process runs where a process of its own is not what is tested."""
    from harness.cli import train_main

    return in_process(train_main, train_args, env, check)


def child_pids(pid: int) -> Optional[List[int]]:
    """The direct children of process ``pid`` (``/proc/PID/task/PID/children``); None when ``pid`` is gone."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return None


def slurm_stubs(folder: Path) -> Path:
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


# --------------------------------------------------------------------------------------------- standard runs

def digits_args(out: Path, data: Path, name: str, *extra: str, steps: int = 20) -> List[str]:
    """ViT-micro-8 on the digits: micro batch 8, global batch 16 (accumulation with negatives in one process),
    ``steps`` optimizer steps, every step logged, zero-shot on the held-out digits."""
    return ["--model", "ViT-micro-8", "--train-data", str(data / "train"), "--zeroshot-data", str(data / "val"),
            "--output-dir", str(out), "--run-name", name, "--micro-batch-size", "8", "--global-batch-size", "16",
            "--train-samples", str(16 * steps), "train.log_every_steps=1", "train.progress_bar=false",
            "optim.warmup_samples=64", "data.shuffle_buffer=32", *extra]


def synthetic_args(out: Path, name: str, micro: int, *extra: str, global_batch: int = 16, steps: int = 8,
                   model: str = "ViT-micro-8") -> List[str]:
    """Synthetic batches (seeded per global sample, so any split of a global batch sees the same samples):
    ``steps`` optimizer steps of ``global_batch``, every step logged, no checkpoint at the end."""
    return ["--config", "synthetic", "--model", model, "--output-dir", str(out), "--run-name", name,
            "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
            "--train-samples", str(global_batch * steps), "train.progress_bar=false", "train.log_every_steps=1",
            "optim.lr=0.002", "checkpoint.save_final=false", *extra]


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> List[float]:
    """Every logged step's loss of a run."""
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def metrics_by_step(run: Path, since: int = 0) -> dict:
    """Last record per step of ``metrics.jsonl`` from byte ``since`` on (a resumed run's lines replace the killed
    run's); a line cut by a kill is ignored."""
    out = {}
    path = run / "metrics.jsonl"
    text = path.read_bytes()[since:].decode(errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r:
            out[r["step"]] = r
    return out


def assert_same_trajectory(full_dir: Path, resumed_dir: Path, from_step: int, to_step: int) -> None:
    """Every step's loss and LR after ``from_step`` up to ``to_step`` bit for bit, and the same final weights."""
    full, resumed = metrics_by_step(full_dir), metrics_by_step(resumed_dir)
    for step in range(from_step + 1, to_step + 1):
        assert resumed[step]["loss"] == full[step]["loss"], f"loss differs at step {step}"
        assert resumed[step]["lr"] == full[step]["lr"], f"lr differs at step {step}"
    a = load_model_state(complete_checkpoints(full_dir / "checkpoints")[-1])
    b = load_model_state(complete_checkpoints(resumed_dir / "checkpoints")[-1])
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"parameters differ after resume: {diff[:5]}"
