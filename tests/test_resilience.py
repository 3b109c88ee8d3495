"""Per-rank fault handling without a trainer (harness/components/resilience.py): the hang watchdog and the stop signals
in a child Python process, all-corrupt shards and a killed DataLoader worker on real shards and real worker processes.
The end-to-end runs (2 processes, ZeRO-2 / FSDP2) are in tests/test_faults.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from torch.utils.data import DataLoader

import models
from harness.core.errors import ExitCode
from harness.data.loader import Roles, Sampling, ShardStream
from harness.data.shards import expand_shards
from harness.data.workers import DataWorkerError, NamedWorkerErrors, data_worker_error
from tests.helpers import REPO, write_shards


def _child(code: str, tmp_path, **popen) -> subprocess.Popen:
    """A fresh Python process running ``code`` (the repository importable)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)


def test_watchdog_dumps_every_threads_stack_and_exits(tmp_path):
    proc = _child("""
        import threading, time
        from harness.components.resilience import Watchdog
        def data_thread_waiting():
            time.sleep(60)
        threading.Thread(target=data_thread_waiting, daemon=True).start()
        dog = Watchdog(1.0, "run/hang_rank_00003.txt", rank=3)
        dog.start()
        for step in range(1, 4):
            dog.beat(step)
            time.sleep(0.3)
        def stuck_in_a_collective():
            time.sleep(60)
        stuck_in_a_collective()
    """, tmp_path)
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.HANG and time.monotonic() - start < 30
    dump = (tmp_path / "run" / "hang_rank_00003.txt").read_text()
    assert dump.startswith("error: rank 3: no training step completed for 1 s (train.hang_timeout_s=1) after step 3")
    assert "stuck_in_a_collective" in dump and "data_thread_waiting" in dump  # every thread, the main one included
    assert "no training step completed" in err and "stuck_in_a_collective" in err


GUARD = """
    import os, signal, sys, time, types
    from harness.components.resilience import RunSupervisor
    cfg = types.SimpleNamespace(hang_timeout_s=0, preempt_grace_s={grace})
    with RunSupervisor(cfg, "run", rank=0) as guard:
        print("ready", flush=True)
        deadline = time.monotonic() + 30
        while not guard.signalled and time.monotonic() < deadline:
            time.sleep(0.01)
        print("signalled", guard.signalled, guard.signal_name, flush=True)
        if os.fork() == 0:  # a forked DataLoader worker inherits the handler: it must not act on a signal
            os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); os._exit(0)
        os.wait()
        time.sleep({work})  # the "training" that goes on until the next log step
        print("agreed", guard.agree(1.0), guard.stopping, flush=True)
    sys.exit(0)
"""


def _signal_when_ready(proc, *delays):
    assert proc.stdout.readline().strip() == "ready"
    for delay in delays:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)


def test_stop_signal_is_a_vote_and_duplicates_are_one_request(tmp_path):
    proc = _child(GUARD.format(grace=0, work=2.5), tmp_path)
    _signal_when_ready(proc, 0.0, 0.3)  # the launcher forwarding the same SIGTERM a moment later
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "signalled True SIGTERM" in out and "agreed True True" in out
    assert err.count("SIGTERM received") == 1


def test_a_second_signal_exits_at_once(tmp_path):
    proc = _child(GUARD.format(grace=0, work=30), tmp_path)
    start = time.monotonic()
    _signal_when_ready(proc, 0.0, 2.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.PREEMPTED and time.monotonic() - start < 20
    assert "agreed" not in out and "a second SIGTERM: exiting now" in err


def test_grace_time_running_out_exits_at_once(tmp_path):
    proc = _child(GUARD.format(grace=1.0, work=30), tmp_path)
    start = time.monotonic()
    _signal_when_ready(proc, 0.0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.PREEMPTED and time.monotonic() - start < 20
    assert "train.preempt_grace_s=1 ran out: exiting now" in err


def _stream(shards, workers: int):
    ds = ShardStream(shards, 2, models.image_transform("ViT-micro-8", is_train=True, uint8=True),
                     models.get_tokenizer("ViT-micro-8"), Roles(0, 1, workers), Sampling(0, shuffle_buffer=0))
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return NamedWorkerErrors(loader, ds.worker_shards, rank=0) if workers else loader


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_list_of_only_bad_samples_is_an_error_not_an_endless_loop(tmp_path, workers):
    keys = [f"{s:05d}{i:04d}" for s in range(3) for i in range(6)]
    write_shards(tmp_path / "bad", n_shards=3, per_shard=6, corrupt=keys[::2], no_caption=keys[1::2])
    shards = expand_shards(str(tmp_path / "bad"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"data.train_data: data role 0 read a whole epoch of 3 shard\(s\) without "
                                           r"one valid sample .*'corrupt': 9, 'incomplete': 9.*00000.tar") as info:
        next(iter(_stream(shards, workers)))
    assert time.monotonic() - start < 60
    assert not isinstance(info.value, DataWorkerError)


def test_a_killed_dataloader_worker_is_an_error_naming_its_shards(tmp_path):
    write_shards(tmp_path / "ok", n_shards=4, per_shard=40)
    shards = expand_shards(str(tmp_path / "ok"))
    stream = _stream(shards, workers=2)
    it = iter(stream)
    first = [next(it) for _ in range(4)]
    assert {b["worker"] for b in first} == {0, 1}
    victim = stream._it._workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        while time.monotonic() - start < 60:
            next(it)
            time.sleep(0.05)
    # raised by next() (PyTorch's liveness check) or by its SIGCHLD handler wherever the main thread was
    named = info.value if isinstance(info.value, DataWorkerError) else data_worker_error(info.value)
    assert isinstance(named, DataWorkerError), info.value
    text = str(named)
    assert f"pid {victim.pid}" in text or f"pid(s) {victim.pid}" in text
    assert "worker 1: reading shard " in text and text.count(".tar") >= 2
    mine = stream.shards_of_worker(1, 0)
    assert all(s in text for s in mine) and not any(s in text for s in shards if s not in mine)
    assert time.monotonic() - start < 30
    # a batch transfer cut by the death surfaces as EOFError / ConnectionResetError: named the same way
    assert stream.explain(EOFError()) is None  # an error from elsewhere is not the loader's
    cut = stream._dead_worker(EOFError())
    assert isinstance(cut, DataWorkerError) and f"pid {victim.pid}, exit code -9" in str(cut)


def test_a_transfer_cut_before_the_dead_worker_can_be_reaped_is_still_named(tmp_path):
    """The kernel closes a killed worker's pipes before the worker can be reaped, so the rank may read EOF while
    ``is_alive()`` still says True (CI saw it): the transfer error waits for the death instead of passing as is."""
    write_shards(tmp_path / "ok", n_shards=2, per_shard=40)
    stream = _stream(expand_shards(str(tmp_path / "ok")), workers=2)
    it = iter(stream)
    next(it)
    victim = stream._it._workers[1]
    assert stream._dead_worker(ValueError("not a transfer")) is None  # every worker lives: not the loader's
    threading.Timer(0.5, os.kill, (victim.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    named = stream._dead_worker(EOFError())  # seen while the victim still lives
    assert isinstance(named, DataWorkerError) and f"pid {victim.pid}" in str(named), named
    assert 0.4 < time.monotonic() - start < 5
    stream.close()
