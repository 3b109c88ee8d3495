"""Shared test helpers: img2dataset-style shards with realistic faults, and launching real runs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

from harness.launch import free_port

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


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


def run_cmd(args: List[str], env: Optional[dict] = None, timeout: int = 600, cwd: Path = REPO,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the test environment (no GPU, 1 thread per process), capture output."""
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def accelerate_launch(config: str, train_args: List[str], **kw) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file ds_configs/<config> train.py <train_args>`` as a real multi-process run."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return run_cmd([accelerate, "launch", "--config_file", str(REPO / "ds_configs" / config),
                    "--main_process_port", str(free_port()), str(REPO / "train.py"), *train_args], **kw)


def train_py(train_args: List[str], **kw) -> subprocess.CompletedProcess:
    """``python train.py <train_args>`` (single process)."""
    return run_cmd([sys.executable, str(REPO / "train.py"), *train_args], **kw)


def child_pids(pid: int) -> Optional[List[int]]:
    """The direct children of process ``pid`` (``/proc/PID/task/PID/children``); None when ``pid`` is gone."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return None


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits dataset written once per test session."""
    from harness.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out), num_shards=4)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
