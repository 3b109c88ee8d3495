"""Scale knobs as real multi-process runs on gloo: every sharding launch config against one process (with and
without accumulation with negatives, with the tiled SigLIP loss), the FSDP2 checkpoint layout, fp16 overflow
recovery, and the launch configs themselves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harness.components.checkpoint import complete_checkpoints, load_model_state
from tests.helpers import REPO, SHARDED, accelerate_launch, losses, read_jsonl, synthetic_args, train

# in the `matrix` tier (CI runs it after `make test`): the settings another case already covers in `make test` (ZeRO-0
# and ZeRO-1 by ZeRO-2, ZeRO-Offload 2 by ZeRO-Offload 3, shard-grad-op by FSDP2 full shard)
MATRIX_ONLY = ("zero0", "zero1", "zero2-offload", "fsdp-shard-grad-op")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.matrix) if n in MATRIX_ONLY else n
                                  for n in SHARDED])
def test_sharded_run_follows_the_single_process_trajectory(name, sharded_run, single_reference):
    """2 processes under each launch config (ZeRO-0/1/2/3, ZeRO-3 with activation checkpointing, ZeRO-Offload 2/3,
    FSDP2 full shard with checkpointing every 2nd block, and shard-grad-op) follow one process over the same global
    batches (synthetic data is seeded per global sample). Layouts: micro 8 on each rank against micro 16 in one
    process; 2 ranks x K=4 micro batches of 8 accumulated with negatives against micro 64 in one process (the
    contrastive batch is 64 either way); the tiled SigLIP loss (its bias a [1]-shaped parameter; FSDP2 reshards the
    root after forward, which the model's output must survive). Tolerance: 1e-5 relative on every step's loss
    (measured: at most 1.7e-7, from the order of the gradient reductions). Under ZeRO-3 and FSDP, rank 0 holds half
    of the parameter elements (within 5 points: shards are cut per tensor)."""
    config, _, layout, share = SHARDED[name]
    run, ref = sharded_run(name), single_reference(layout)
    assert losses(run) == pytest.approx(losses(ref), rel=1e-5), f"{name} diverges from the 1-process run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["engine"] == ("fsdp" if config.startswith("fsdp") else "deepspeed")
    if config.startswith("zero"):
        assert summary["zero_stage"] == int(config[4])
    if layout == "k4":
        assert (summary["grad_accum_steps"], summary["contrastive_batch_size"]) == (4, 64)
    held = summary["rank0_local_parameter_elements"] / summary["parameters"]
    assert abs(held - share) < 0.05, f"{name}: rank 0 holds {held:.2%} of the parameters, expected {share:.0%}"


@pytest.mark.slow
def test_fsdp_checkpoint_has_a_shard_per_rank_and_evaluation_gathers_the_root(reference_run):
    """FSDP2 checkpoints (torch.distributed.checkpoint) hold one shard file per rank; zero-shot evaluation at the end
    of a sharded run gathers the root. (Resuming them bit for bit: tests/test_faults.py, tests/test_preemption.py.)"""
    run = reference_run("fsdp.yaml")
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert sorted(p.name for p in (ckpt / "fsdp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "fsdp" and summary["zeroshot_top1"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("launch", [None, "fsdp.yaml"], ids=["single", "fsdp"])
def test_fp16_recovers_from_overflow(tmp_path, launch):
    """fp16 with an initial loss scale of 2^30 (so the first backward overflows fp16) and a loss-scale window
    of 2 steps: overflowing steps are skipped and counted, the scale halves at each and doubles again after
    2 clean steps, and training goes on with finite losses and weights."""
    args = synthetic_args(tmp_path, "fp16", 8, "--precision", "fp16", "--train-samples", "384",
                          "train.loss_scale_init=1073741824", "train.loss_scale_window=2",
                          "checkpoint.save_final=true")
    if launch:
        accelerate_launch(launch, args)
    else:
        train(args)
    lines = read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    summary = json.loads((tmp_path / "fp16" / "summary.json").read_text())
    scales = [r["loss_scale"] for r in lines]
    skipped = [r["skipped_optimizer_steps"] for r in lines]
    assert len(lines) == 24 and all(math.isfinite(r["loss"]) for r in lines)
    assert skipped[0] == 1 and scales[0] == 2.0 ** 29, "the first step must overflow and halve the scale"
    assert summary["skipped_optimizer_steps"] == skipped[-1] and 1 <= skipped[-1] < 24
    halvings = sum(b == a / 2 for a, b in zip(scales, scales[1:]))
    doublings = sum(b == a * 2 for a, b in zip(scales, scales[1:]))
    assert doublings >= 1 and halvings + 1 == skipped[-1], (scales, skipped)
    state = load_model_state(complete_checkpoints(tmp_path / "fp16" / "checkpoints")[-1])
    assert all(torch.isfinite(v).all() for v in state.values())


def test_every_launch_config_loads_and_fills_its_deepspeed_json():
    """Every ds_configs/*.yaml is a valid Accelerate launch config; every DeepSpeed JSON gets the job's batch,
    clipping and precision (no "auto" left); FSDP configs name FSDP2 and a reshard setting."""
    from harness.config.layout import batch_layout
    from harness.config.overrides import from_dict
    from harness.core.paths import REPO_ROOT
    from harness.engines.deepspeed import deepspeed_config

    yamls = sorted((REPO_ROOT / "ds_configs").glob("*.yaml"))
    assert {p.stem for p in yamls} == {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp",
                                       "fsdp_shard_grad_op"}
    jsons = {p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")}
    named = set()
    for path in yamls:
        launch = yaml.safe_load(path.read_text())
        assert launch["mixed_precision"] == "no" and launch["num_machines"] == 1
        if launch["distributed_type"] == "FSDP":
            fsdp = launch["fsdp_config"]
            assert fsdp["fsdp_version"] == 2 and not fsdp["fsdp_offload_params"]
            assert fsdp["fsdp_reshard_after_forward"] is (path.stem == "fsdp")
            continue
        assert launch["distributed_type"] == "DEEPSPEED"
        assert launch["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
        json_name = Path(launch["deepspeed_config"]["deepspeed_config_file"]).name
        named.add(json_name)
        base = json.loads((REPO_ROOT / "ds_configs" / json_name).read_text())
        zero = base["zero_optimization"]
        assert zero["stage"] == int(path.stem[4])
        assert ("offload_optimizer" in zero) == path.stem.endswith("offload")
        for precision in ("fp32", "bf16", "fp16"):
            cfg = from_dict({"train": {"micro_batch_size": 8, "global_batch_size": 64, "precision": precision}})
            ds = deepspeed_config(base, cfg, batch_layout(cfg.train, world_size=4), num_params=151_000_000)
            assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                    ds["train_batch_size"]) == (8, 2, 64)
            assert '"auto"' not in json.dumps(ds)  # no value left as "auto"
            assert ds["zero_optimization"]["reduce_bucket_size"] == 151_000_000 // 16  # sized from the model
            assert ds["timers"]["throughput"]["enabled"] is False  # no device sync per step
            assert not ds["bf16"]["enabled"]  # bf16 runs as torch_autocast: logit_scale stays an fp32 parameter
            autocast = precision == "bf16" or (precision == "fp16" and zero["stage"] == 0)
            assert ds["torch_autocast"]["enabled"] == autocast
            assert ds["fp16"]["enabled"] == (precision == "fp16" and zero["stage"] > 0)
            if ds["fp16"]["enabled"]:
                assert ds["fp16"]["initial_scale_power"] == 16 and ds["fp16"]["loss_scale_window"] == 1000
    assert named == jsons, f"DeepSpeed JSONs no launch config uses: {jsons - named}"


@pytest.mark.slow
def test_fsdp_version_1_and_owned_fields_are_refused_before_any_process_group(tmp_path):
    """An FSDP launch YAML asking for FSDP1, or for activation checkpointing the job config owns, fails with a
    message naming the field, exit status 2, nothing written."""
    base = yaml.safe_load((REPO / "ds_configs" / "fsdp.yaml").read_text())
    for field, value, message in [("fsdp_version", 1, "fsdp_version '1' is not supported"),
                                  ("fsdp_activation_checkpointing", True, "use model.grad_checkpointing")]:
        bad = json.loads(json.dumps(base))
        bad["fsdp_config"][field] = value
        path = tmp_path / f"{field}.yaml"
        path.write_text(yaml.safe_dump(bad))
        proc = accelerate_launch(str(path), synthetic_args(tmp_path / "runs", field, 8), check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "runs").exists()
