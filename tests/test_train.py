"""End-to-end training runs: summary, exact resume in one process, a kill in the middle of a checkpoint save (a child
process), the 2-process DeepSpeed ZeRO-2 run's summary and checkpoint layout, faulty shards, refusals, host reads.
Single-process runs go through ``train.py``'s entry in this process (:func:`tests.helpers.train`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.components.checkpoint import complete_checkpoints
from harness.core import hooks
from tests.helpers import (
    STEPS,
    assert_same_trajectory,
    digits_args,
    read_jsonl,
    train,
    train_py,
    write_shards,
)

pytestmark = pytest.mark.slow  # every test here runs the real trainer

SUMMARY_KEYS = {"model", "world_size", "micro_batch_size", "global_batch_size", "steps", "samples_seen",
                "final_loss", "zeroshot_top1", "zeroshot_top5", "avg_step_time_s", "samples_per_s", "peak_mem_gib"}
SINGLE = ("data.num_workers=2", "checkpoint.every_steps=4", "checkpoint.keep_last=5")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, digits_dir) -> Path:
    """One uninterrupted 20-step run in one process (2 data workers, a checkpoint every 4 steps): the run the
    resume and kill tests compare against."""
    out = tmp_path_factory.mktemp("single")
    train(digits_args(out, digits_dir, "full", *SINGLE))
    return out / "full"


def test_single_process_run_trains_and_writes_summary(single_run):
    summary = json.loads((single_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["steps"] == 20 and summary["samples_seen"] == 320 and summary["world_size"] == 1
    assert summary["global_batch_size"] == 16 and summary["micro_batch_size"] == 8
    assert summary["grad_accum_steps"] == 2 and summary["contrastive_batch_size"] == 16  # accumulation with negatives
    losses = [r["loss"] for r in read_jsonl(single_run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3]), "loss did not go down"
    assert 0.0 <= summary["zeroshot_top1"] <= summary["zeroshot_top5"] <= 1.0
    assert (single_run / "config.yaml").is_file()


def test_resume_matches_uninterrupted_run_single_process(tmp_path, digits_dir, single_run):
    train(digits_args(tmp_path, digits_dir, "split", *SINGLE, "--max-steps", "7"))
    assert [p.name for p in complete_checkpoints(tmp_path / "split" / "checkpoints")] == ["step_00000004",
                                                                                        "step_00000007"]
    train(digits_args(tmp_path, digits_dir, "split", *SINGLE, "--resume", "latest"))
    assert_same_trajectory(single_run, tmp_path / "split", 7, 20)


def test_zero2_two_processes_train_and_checkpoint_every_rank(reference_run):
    """The real 2-process DeepSpeed ZeRO-2 run on gloo via the shipped launch config (the reference run that the
    fault and preemption tests resume against): its summary and a checkpoint with each rank's optimizer shard."""
    run = reference_run("zero2.yaml")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "deepspeed" and summary["zero_stage"] == 2
    assert summary["grad_accum_steps"] == 1 and summary["contrastive_batch_size"] == 16
    assert summary["steps"] == STEPS and summary["zeroshot_top1"] is not None
    logged = read_jsonl(run / "metrics.jsonl")  # the reference trains with DeCAtt (tests.helpers.REFERENCE_EXTRA)
    assert all(m["decatt_loss"] > 0 for m in logged if "step" in m and "loss" in m)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert sorted(p.name for p in (ckpt / "deepspeed").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_kill_during_checkpoint_save_resumes_from_last_complete(tmp_path, digits_dir, single_run):
    """A child process that dies inside the save of step 8 (test hook, exit status 17) leaves step 4 as the newest
    complete checkpoint and the half-written one aside; the resume continues exactly like the uninterrupted run."""
    killed = train_py(digits_args(tmp_path, digits_dir, "split", *SINGLE), env={hooks.KILL_IN_SAVE: "8"}, check=False)
    assert killed.returncode == 17
    ckpts = tmp_path / "split" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000004"]
    assert (ckpts / "step_00000008.tmp").is_dir()  # the half-written save is left aside, not used
    train(digits_args(tmp_path, digits_dir, "split", *SINGLE, "--resume", "latest"))
    assert not (ckpts / "step_00000008.tmp").exists()
    assert_same_trajectory(single_run, tmp_path / "split", 4, 20)


def test_trains_through_faulty_img2dataset_shards(tmp_path, digits_dir):
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=4, per_shard=24, missing=["000000003", "000020011"], corrupt=["000010005"],
                 no_caption=["000030001"], truncate=3)
    args = digits_args(tmp_path, digits_dir, "faulty", "data.num_workers=1")
    args[args.index("--train-data") + 1] = str(shards)
    train(args)
    summary = json.loads((tmp_path / "faulty" / "summary.json").read_text())
    assert summary["steps"] == 20
    bad = summary["skipped_samples"]
    assert bad["corrupt"] >= 1 and bad["truncated_shards"] >= 1 and bad["incomplete"] >= 1


def test_existing_run_is_not_overwritten_and_changed_setup_is_refused(tmp_path, digits_dir):
    train(digits_args(tmp_path, digits_dir, "run", "data.num_workers=0", "--max-steps", "2"))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    again = train(digits_args(tmp_path, digits_dir, "run", "data.num_workers=0"), check=False)
    assert again.returncode == 2 and "pass --resume latest" in again.stderr
    changed = train(digits_args(tmp_path, digits_dir, "run", "data.num_workers=0", "--resume", "latest",
                                "optim.lr=0.5"), check=False)
    assert changed.returncode == 2 and "optim.lr: checkpoint 0.001 vs now 0.5" in changed.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_dtp_model_trains_and_logs_boundary_metrics_every_step(tmp_path, digits_dir):
    args = digits_args(tmp_path, digits_dir, "dtp", "data.num_workers=0", "--train-samples", "96")
    args[args.index("ViT-micro-8")] = "DTP-ViT-micro-8-2x"
    train(args)
    lines = [r for r in read_jsonl(tmp_path / "dtp" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, 7))
    for r in lines:
        assert {"shortening_factor", "boundary_rate", "segments_mean", "segments_max", "boundary_loss"} <= r.keys()
        assert 1.0 <= r["shortening_factor"] <= 4.0 and r["boundary_loss"] > 0
    summary = json.loads((tmp_path / "dtp" / "summary.json").read_text())
    assert summary["model"] == "DTP-ViT-micro-8-2x" and summary["zeroshot_top1"] is not None


def test_no_host_reads_of_device_values_outside_log_steps(tmp_path):
    """``train.count_host_syncs`` counts ``aten._local_scalar_dense`` calls (``.item()``, ``float(t)``...: a
    host-device synchronisation each on a GPU) per optimizer step, data loading excluded. With the default fused
    AdamW no step between log steps has any, for ViT and DTP-ViT; the for-loop AdamW reads every parameter's
    step counter (so the counter does see host reads)."""
    def syncs(name, *extra):
        train(["--config", "synthetic", "--model", "ViT-micro-8", "--micro-batch-size", "8",
                  "--train-samples", "96", "--output-dir", str(tmp_path), "--run-name", name,
                  "train.log_every_steps=4", "train.timing_warmup_steps=2", "train.count_host_syncs=true",
                  "train.progress_bar=false", *extra])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return {int(k): v for k, v in summary["host_syncs_by_step"].items()}

    log_steps = {1, 2, 4, 8, 12}  # the first, the end of the warm-up, every 4th, the last
    for name, extra in (("vit", ()), ("dtp", ("--model", "DTP-ViT-micro-8-2x"))):
        counts = syncs(name, *extra)
        assert sorted(counts) == list(range(1, 13))
        assert {s: n for s, n in counts.items() if s not in log_steps and n} == {}, counts
    loop = syncs("for-loop-adamw", "optim.fused=false")
    assert all(n > 0 for s, n in loop.items() if s not in log_steps), loop
