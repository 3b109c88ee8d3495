"""Fixtures: the digits set, and the runs several tests compare against, each made once per session on first use.
The helpers themselves are in ``tests/helpers.py``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from tests.helpers import (
    LAYOUTS,
    REFERENCE_EXTRA,
    SHARDED,
    STEPS,
    VALIDATE,
    accelerate_launch,
    digits_args,
    synthetic_args,
    train,
    write_shards,
)

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# measured activation profiles and FLOPs are cached per session: measured by the code under test, not read from a
# cache an earlier version of the code left in ~/.cache
os.environ["HARNESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="harness-cache-")
# the in-process runs compute like the child processes (OMP_NUM_THREADS=1), so the two can be compared bit for bit
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits dataset written once per test session."""
    from harness.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out), num_shards=4)
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, digits_dir) -> Callable[[str], Path]:
    """``reference_run("zero2.yaml")``: the run folder of an uninterrupted 2-process digits run under that launch
    config (:func:`tests.helpers.digits_args`, :data:`tests.helpers.STEPS` steps, :data:`REFERENCE_EXTRA`), launched
    on first use and shared by every test that resumes, kills or preempts the same run. Read it; never write
    into it."""
    made: Dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in made:
            out = tmp_path_factory.mktemp(f"reference-{Path(config).stem}")
            accelerate_launch(config, digits_args(out, digits_dir, "full", *REFERENCE_EXTRA, steps=STEPS))
            made[config] = out / "full"
        return made[config]

    return get


@pytest.fixture(scope="session")
def single_reference(tmp_path_factory) -> Callable[[str], Path]:
    """``single_reference("k4")``: the 1-process synthetic run of a layout of :data:`LAYOUTS` (in this process, with a
    final checkpoint), made on first use."""
    made: Dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            global_batch, steps, micro, extra = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"single-{layout}")
            train(synthetic_args(out, "single", micro, *extra, "checkpoint.save_final=true",
                                 global_batch=global_batch, steps=steps))
            made[layout] = out / "single"
        return made[layout]

    return get


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory) -> Path:
    """Validation shards: 101 samples with unique captions over 2 shards (one sample missing)."""
    out = tmp_path_factory.mktemp("val") / "val"
    write_shards(out, n_shards=2, per_shard=51, missing=("000010050",))
    return out


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory, val_shards) -> Callable[[str], Path]:
    """``sharded_run("zero3")``: the run folder of an entry of :data:`SHARDED`, launched on first use (2 processes,
    gloo), with a final checkpoint."""
    made: Dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            config, extra, layout, _ = SHARDED[name]
            global_batch, steps, _, layout_extra = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"sharded-{name}")
            val = (f"data.val_data={val_shards}",) if VALIDATE[0] in extra else ()
            accelerate_launch(config, synthetic_args(out, name, 8, *layout_extra, *extra, *val,
                                                     "checkpoint.save_final=true", global_batch=global_batch,
                                                     steps=steps))
            made[name] = out / name
        return made[name]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
