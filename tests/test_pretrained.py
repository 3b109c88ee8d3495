"""Pretrained init from local open_clip files: every file format into a ViT, a ViT into DTP-ViT (pre and shortened
layers, text tower; new boundary predictor), the load report, refusal of another architecture before anything is
written, tower locking in a real run, and the resume check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models
from harness.cli import train_main
from harness.components.checkpoint import complete_checkpoints, load_model_state
from harness.config.job_config import JobConfig, to_dict
from harness.config.layout import batch_layout
from harness.core.errors import ConfigError
from harness.train.job import check_resume_compatible
from models.dtp_vit import DTPViT
from models.exported import open_clip_state_dict
from models.pretrained import load_pretrained
from tests.helpers import train


def _state(name: str, seed: int):
    torch.manual_seed(seed)
    return models.create_model(name).state_dict()


def _write(state, path: Path, fmt: str) -> Path:
    """``state`` in one of the layouts open_clip checkpoints come in."""
    if fmt == "pt":  # a harness model.pt: plain state dict, logit_scale [1]
        torch.save(state, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if fmt == "wrapped":  # a training checkpoint of open_clip_train: {"state_dict": {"module.<key>": ...}}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path.with_suffix(".bin"))
        return path.with_suffix(".bin")
    save_file(open_clip_state_dict(state), str(path.with_suffix(".safetensors")))  # 0-dim logit_scale
    return path.with_suffix(".safetensors")


@pytest.mark.parametrize("fmt", ["pt", "wrapped", "safetensors"])
def test_vit_checkpoint_loads_every_key(tmp_path, fmt):
    source = _state("ViT-tiny-8", seed=1)
    path = _write(source, tmp_path / "vit", fmt)
    torch.manual_seed(2)
    model = models.create_model("ViT-tiny-8")
    report = load_pretrained(model, str(path))
    assert report.new == [] and report.leftover == []
    assert len(report.loaded) == len(source) and all(a == b for a, b in report.loaded)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source), "a tensor was not copied"
    assert model.logit_scale.shape == (1,)


def test_dtp_starts_from_vit_blocks_and_text_tower(tmp_path):
    """ViT-tiny-8's 4 blocks become DTP-ViT-tiny-8-4x's 2 pre + 2 shortened blocks (timm names mapped onto
    open_clip's); embeddings, norms, projection and the text tower are copied; the boundary predictor is new."""
    source = _state("ViT-tiny-8", seed=1)
    path = _write(source, tmp_path / "vit", "pt")
    torch.manual_seed(2)
    dtp = models.create_model("DTP-ViT-tiny-8-4x")
    predictor = {k: v.clone() for k, v in dtp.visual.boundary_predictor.state_dict().items()}
    report = load_pretrained(dtp, str(path))
    assert sorted(report.new) == sorted(f"visual.boundary_predictor.{k}" for k in predictor)
    assert report.leftover == []
    lines = "\n".join(report.lines())
    assert "4 new, 0 left over" in lines and "visual.boundary_predictor" in lines
    v = dtp.visual
    pairs = {  # DTP tensor -> the ViT tensor it must hold
        v.pre_blocks[0].attn.qkv.weight: "visual.transformer.resblocks.0.attn.in_proj_weight",
        v.pre_blocks[1].norm2.bias: "visual.transformer.resblocks.1.ln_2.bias",
        v.shortened_blocks[0].attn.proj.weight: "visual.transformer.resblocks.2.attn.out_proj.weight",
        v.shortened_blocks[1].mlp.fc1.bias: "visual.transformer.resblocks.3.mlp.c_fc.bias",
        v.shortened_blocks[1].mlp.fc2.weight: "visual.transformer.resblocks.3.mlp.c_proj.weight",
        v.conv1.weight: "visual.conv1.weight", v.positional_embedding: "visual.positional_embedding",
        v.class_embedding: "visual.class_embedding", v.ln_pre.weight: "visual.ln_pre.weight",
        v.ln_post.bias: "visual.ln_post.bias", v.proj: "visual.proj",
        dtp.token_embedding.weight: "token_embedding.weight",
        dtp.transformer.resblocks[2].attn.in_proj_weight: "transformer.resblocks.2.attn.in_proj_weight",
        dtp.text_projection: "text_projection",
    }
    for tensor, key in pairs.items():
        assert torch.equal(tensor, source[key]), key
    for k, before in predictor.items():
        assert torch.equal(v.boundary_predictor.state_dict()[k], before), "the boundary predictor was touched"


def test_dtp_from_vit_computes_the_vit_when_every_patch_is_a_segment(tmp_path):
    """With a boundary after every patch (nominal boundaries, shortening 1) and CLS pooling, a DTP-ViT whose pre +
    shortened blocks are a ViT's blocks is that ViT: same image features. This checks the parameter mapping's
    meaning (q/k/v and head layout), not only its names. Tolerance 5e-5 absolute on features of magnitude ~3
    (measured 8e-6: timm's attention against ours)."""
    source = _state("ViT-tiny-8", seed=3)
    path = _write(source, tmp_path / "vit", "pt")
    vit = models.create_model("ViT-tiny-8")
    vit.load_state_dict(source)
    cfg = models.architecture("DTP-ViT-tiny-8-4x")
    cfg["dtp_cfg"].update(compression=1, pooling="cls")
    dtp = models.dtp_from_config(cfg)
    assert isinstance(dtp.visual, DTPViT)
    load_pretrained(dtp, str(path))
    dtp.visual.boundary_mode = "nominal"
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected, got = vit.eval().encode_image(images), dtp.eval().encode_image(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5)


def test_leftover_keys_are_reported(tmp_path):
    source = dict(_state("ViT-micro-8", seed=1))
    source["visual.extra_head.weight"] = torch.zeros(3)
    torch.save(source, tmp_path / "vit.pt")
    report = load_pretrained(models.create_model("ViT-micro-8"), str(tmp_path / "vit.pt"))
    assert report.leftover == ["visual.extra_head.weight"] and report.new == []
    assert "1 left over" in report.lines()[0] and "visual.extra_head.weight" in report.lines()[1]


def _refused(tmp_path, digits_dir, capsys, model: str, pretrained: str, *extra: str) -> str:
    out = tmp_path / "runs"
    rc = train_main(["--model", model, "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none",
                     "--output-dir", str(out), "--run-name", "r", "--train-samples", "64",
                     *([f"model.pretrained={pretrained}"] if pretrained else []), *extra])
    assert rc == 2
    assert not out.exists(), "something was written before the refusal"
    return capsys.readouterr().err


def test_another_architecture_is_refused_before_anything_is_written(tmp_path, digits_dir, capsys):
    torch.save(_state("ViT-tiny-8", seed=1), tmp_path / "tiny.pt")
    err = _refused(tmp_path, digits_dir, capsys, "ViT-micro-8", str(tmp_path / "tiny.pt"))
    assert "error: model.pretrained:" in err and "another architecture" in err and "visual.proj" in err
    torch.save({"classifier.weight": torch.zeros(10, 4)}, tmp_path / "resnet.pt")
    err = _refused(tmp_path, digits_dir, capsys, "ViT-micro-8", str(tmp_path / "resnet.pt"))
    assert "error: model.pretrained:" in err and "shares no parameter name" in err
    err = _refused(tmp_path, digits_dir, capsys, "ViT-micro-8", str(tmp_path / "missing.pt"))
    assert "error: model.pretrained:" in err and "is not a file" in err
    (tmp_path / "notes.txt").write_text("not weights")
    err = _refused(tmp_path, digits_dir, capsys, "ViT-micro-8", str(tmp_path / "notes.txt"))
    assert "error: model.pretrained:" in err and ".safetensors" in err


def test_a_bad_distillation_setup_is_refused_before_anything_is_written(tmp_path, digits_dir, capsys):
    """``model.distill_teacher`` (DynamicViT's frozen teacher, models.dynamicvit) is checked like model.pretrained:
    on a model that is not DynamicViT, of another architecture, missing; and its loss weights."""
    torch.save(_state("ViT-micro-8", seed=1), tmp_path / "micro.pt")
    dvt, teacher = "ViT-tiny-8-dynamicvit-0.7", f"model.distill_teacher={tmp_path / 'micro.pt'}"
    for model, extra, expected in (
            ("ViT-tiny-8-tome-r2", [teacher], "model.distill_teacher: only DynamicViT models"),
            (dvt, [teacher], "another architecture"),
            (dvt, [f"model.distill_teacher={tmp_path / 'missing.pt'}"], "is not a file"),
            (dvt, ["loss.distill_token_weight=-1"], "loss.distill_token_weight")):
        err = _refused(tmp_path, digits_dir, capsys, model, "", *extra)
        assert expected in err, (model, extra, err)
        assert "error: model.distill_teacher:" in err or "weight" in expected


def test_resume_refuses_another_pretrained_file_and_accepts_old_checkpoints():
    cfg = JobConfig()
    layout = batch_layout(cfg.train, 1)
    saved = to_dict(cfg)
    meta = {"config": saved, "world_size": 1, "global_batch_size": layout.global_batch_size,
            "total_train_samples": 100}
    cfg.model.pretrained = "other.pt"
    with pytest.raises(ConfigError, match="model.pretrained: checkpoint None vs now 'other.pt'"):
        check_resume_compatible(meta, cfg, layout, 100)
    cfg.model.pretrained = None
    for field in ("pretrained", "lock_image", "lock_text"):  # a checkpoint written before these fields existed
        del saved["model"][field]
    check_resume_compatible(meta, cfg, layout, 100)
    cfg.model.lock_image = True
    with pytest.raises(ConfigError, match="model.lock_image"):
        check_resume_compatible(meta, cfg, layout, 100)


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["image", "text"])
def test_locked_tower_gets_no_update(tmp_path, digits_dir, tower):
    """A 3-step run started from a pretrained file with one tower locked: the locked tower's weights are exactly
    the file's at the end, the other tower's have moved."""
    source = _state("ViT-micro-8", seed=1)
    torch.save(source, tmp_path / "init.pt")
    proc = train(["--model", "ViT-micro-8", "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none",
                     "--output-dir", str(tmp_path), "--run-name", "locked", "--micro-batch-size", "16",
                     "--global-batch-size", "16", "--train-samples", "48", "train.progress_bar=false",
                     "data.num_workers=0", f"model.pretrained={tmp_path / 'init.pt'}", f"model.lock_{tower}=true"])
    assert f"locked (frozen): {tower} tower" in proc.stderr
    final = load_model_state(complete_checkpoints(tmp_path / "locked" / "checkpoints")[-1])
    is_image = lambda k: k.startswith("visual.")
    locked = [k for k in source if is_image(k) == (tower == "image") and k != "logit_scale"]
    free = [k for k in source if is_image(k) != (tower == "image") and k != "logit_scale"]
    assert locked and all(torch.equal(final[k], source[k]) for k in locked), "a locked weight changed"
    moved = [k for k in free if not torch.equal(final[k], source[k])]
    assert len(moved) > len(free) // 2, f"the unlocked tower barely trained: {len(moved)} of {len(free)} moved"
