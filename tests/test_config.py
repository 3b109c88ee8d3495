"""Job config: presets, overrides, validation errors that name the field, CLI exit codes."""
from __future__ import annotations

import pytest
import yaml

from harness.cli import build_config, train_main
from harness.config.job_config import JobConfig
from harness.config.layout import batch_layout
from harness.config.overrides import describe, from_dict
from harness.config.validate import validate
from harness.core.errors import ConfigError
from tests.helpers import write_shards


def _cfg(tmp_path, **sections) -> JobConfig:
    write_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    base = {"data": {"train_data": str(tmp_path / "shards")}, "train": {"train_samples": 64},
            "eval": {"zeroshot_data": None}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return from_dict(base)


def test_defaults_preset_and_overrides_apply_in_order(tmp_path):
    cfg, _ = build_config(["--model", "ViT-micro-8", "--micro-batch-size", "8", "train.seed=3",
                           "--set", "optim.lr=0.01", "--max-steps", "5", "--resume", "latest"])
    assert cfg.model.name == "ViT-micro-8"
    assert cfg.train.micro_batch_size == 8 and cfg.train.max_steps == 5
    assert cfg.train.seed == 3 and cfg.optim.lr == 0.01
    assert cfg.checkpoint.resume == "latest"
    assert cfg.train.global_batch_size == 64  # from the digits preset, untouched
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": {"micro_batch_size": 4}, "run_name": "x"}))
    cfg, _ = build_config(["--config", str(preset), "train.micro_batch_size=2"])
    assert cfg.train.micro_batch_size == 2 and cfg.run_name == "x"


@pytest.mark.parametrize("args, field", [
    (["train.micro_batchsize=3"], "train.micro_batchsize: no such config key"),
    (["nosection.x=1"], "nosection: no such config key"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size: expected int"),
    (["--config", "does-not-exist"], "preset 'does-not-exist' not found"),
])
def test_bad_keys_and_values_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        build_config(args)


def test_validate_names_field_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'ViT-Q-99'; registered models: .*ViT-B-32"):
        validate(_cfg(tmp_path, model={"name": "ViT-Q-99"}), world_size=1)
    with pytest.raises(ConfigError, match=r"train.precision: 'fp8' is not one of fp32, bf16, fp16"):
        validate(_cfg(tmp_path, train={"precision": "fp8"}), world_size=1)
    with pytest.raises(ConfigError, match=r"model.attention: 'xformers' is not one of sdpa, sdpa_flash, "
                                          r"sdpa_efficient, sdpa_cudnn, math, flash_attn"):
        validate(_cfg(tmp_path, model={"attention": "xformers"}), world_size=1)
    with pytest.raises(ConfigError, match=r"model.grad_checkpointing: must be >= 0"):
        validate(_cfg(tmp_path, model={"grad_checkpointing": -1}), world_size=1)
    with pytest.raises(ConfigError, match=r"train.loss_scale_init: must be a power of 2"):
        validate(_cfg(tmp_path, train={"precision": "fp16", "loss_scale_init": 1000.0}), world_size=1)
    with pytest.raises(ConfigError, match=r"data.train_data: shard not found"):
        validate(_cfg(tmp_path, data={"train_data": str(tmp_path / "nope/{00000..00003}.tar")}), world_size=1)
    with pytest.raises(ConfigError, match=r"train.train_samples / train.epochs: set exactly one"):
        validate(_cfg(tmp_path, train={"epochs": 2}), world_size=1)
    with pytest.raises(ConfigError, match=r"eval.zeroshot_data: .* is not a directory"):
        validate(_cfg(tmp_path, eval={"zeroshot_data": str(tmp_path / "missing")}), world_size=1)


def test_micro_batch_must_divide_global_batch(tmp_path):
    cfg = _cfg(tmp_path, train={"micro_batch_size": 6, "global_batch_size": 64})
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 64 is not a multiple of .*micro_batch_size \(6\)"):
        validate(cfg, world_size=1)
    cfg = _cfg(tmp_path, train={"micro_batch_size": 16, "global_batch_size": 64})
    assert validate(cfg, world_size=2).grad_accum_steps == 2
    with pytest.raises(ConfigError, match=r"world size \(3\) = 48"):
        validate(cfg, world_size=3)


def test_batch_layout_arithmetic():
    train = from_dict({"train": {"micro_batch_size": 8, "global_batch_size": 256}}).train
    layout = batch_layout(train, world_size=4)
    assert (layout.grad_accum_steps, layout.global_batch_size, layout.contrastive_batch_size) == (8, 256, 256)
    train.accum_negatives = False  # plain accumulation: the loss sees micro x world
    assert batch_layout(train, world_size=4).contrastive_batch_size == 32
    train.global_batch_size = None
    assert batch_layout(train, world_size=4).global_batch_size == 32


def test_cli_error_exits_2_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "runs"
    rc = train_main(["--model", "ViT-Q-99", "--output-dir", str(out), "--train-data", "synthetic",
                     "--train-samples", "64", "--zeroshot-data", "none"])
    assert rc == 2
    assert "model.name: unknown model 'ViT-Q-99'" in capsys.readouterr().err
    assert not out.exists()


def test_every_field_is_documented():
    lines = describe()
    assert len(lines) > 30
    undocumented = [ln for ln in lines if ln.endswith(": ")]
    assert not undocumented, undocumented


def test_length_flag_replaces_the_presets_length(tmp_path):
    cfg, _ = build_config(["--epochs", "2"])  # the digits preset sets train.train_samples
    assert cfg.train.epochs == 2.0 and cfg.train.train_samples is None
    cfg, _ = build_config(["--config", "clip", "--train-samples", "1000"])
    assert cfg.train.train_samples == 1000 and cfg.train.epochs is None and cfg.model.name == "ViT-B-32"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a CPU-only machine refuses")
def test_what_this_cpu_cannot_run_is_refused_naming_what_it_can(tmp_path):
    import torch

    from harness.distributed.hardware import check_device_support, check_machine
    from harness.distributed.launch import LaunchInfo

    for backend in ("sdpa_efficient", "sdpa_cudnn", "flash_attn"):
        cfg = _cfg(tmp_path, model={"attention": backend})
        validate(cfg, world_size=1)  # a valid config ...
        with pytest.raises(ConfigError, match=rf"model.attention: '{backend}' needs a CUDA GPU; available on "
                                              r"this CPU machine: sdpa, sdpa_flash, math"):
            check_machine(cfg)  # ... that this machine cannot run
    cpu = torch.device("cpu")
    fp16 = _cfg(tmp_path, train={"precision": "fp16"})
    validate(fp16, world_size=1)  # fp16 itself runs on a CPU (autocast + GradScaler) ...
    check_device_support(fp16, cpu, LaunchInfo())
    with pytest.raises(ConfigError, match=r"train.precision: DeepSpeed's fp16 mode needs a GPU"):
        check_device_support(fp16, cpu, LaunchInfo(deepspeed=True))  # ... but not DeepSpeed's fp16
    for backend in ("sdpa", "sdpa_flash", "math"):  # the kernel itself is tried on the device
        check_device_support(_cfg(tmp_path, model={"attention": backend}), cpu, LaunchInfo())
