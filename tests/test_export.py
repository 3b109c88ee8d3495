"""``harness export``: a run's model as an open_clip ``local-dir:`` folder. open_clip loads ViT exports and gives the
harness model's embeddings (from a single-process run, and from ZeRO-3 and FSDP2 2-process checkpoints); DTP-ViT
exports load through ``models.load_exported``; bad input is refused before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import models
from harness.cli import main
from harness.components.checkpoint import complete_checkpoints, load_model_state
from tests.helpers import SHARDED, train

TOL = 1e-5  # on L2-normalised embeddings; measured: 2e-7 (image: our SDPA vs nn.MultiheadAttention), 0 (text)
PROMPTS = ["a handwritten digit three.", "a photo of the number seven.", "the digit zero"]


def fake_checkpoint(folder: Path, name: str, seed: int = 0) -> Path:
    """A plain-engine checkpoint folder (``meta.json`` + ``model.pt``, what ``LocalEngine.save`` writes) of a randomly
    initialised ``name``: for the tests that need a checkpoint but no training."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    torch.save(models.create_model(name).state_dict(), folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps({"step": 1, "engine": "local", "config": {"model": {"name": name}}}))
    return folder


def harness_model(ckpt: Path) -> torch.nn.Module:
    meta = json.loads((ckpt / "meta.json").read_text())
    model = models.create_model(meta["config"]["model"]["name"])
    model.load_state_dict(load_model_state(ckpt))
    return model.eval()


def digit_images(root: Path, n: int = 8):
    return [Image.open(p) for p in sorted(Path(root).rglob("*.png"))[:n]]


def assert_open_clip_matches(out: Path, ref: torch.nn.Module, name: str, images, tol: float = TOL) -> None:
    """open_clip loads ``out`` with its transforms and tokenizer; they and the embeddings match the harness's."""
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    oc.eval()
    ours = models.image_transform(name, is_train=False)
    x = torch.stack([preprocess(im) for im in images])
    assert torch.equal(x, torch.stack([ours(im) for im in images])), "open_clip's eval transform differs from ours"
    tokens = tokenizer(PROMPTS)
    assert torch.equal(tokens, models.get_tokenizer(name)(PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x, normalize=True), ref.encode_image(x, normalize=True),
                                   rtol=0, atol=tol)
        torch.testing.assert_close(oc.encode_text(tokens, normalize=True), ref.encode_text(tokens, normalize=True),
                                   rtol=0, atol=tol)
    assert oc.logit_scale.dim() == 0 and torch.equal(oc.logit_scale.reshape(1), ref.logit_scale.detach())


def test_export_of_a_checkpoint_loads_in_open_clip(tmp_path, digits_dir, capsys):
    ckpt = fake_checkpoint(tmp_path / "ckpt", "ViT-micro-8")
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "ViT-micro-8" and info["tensors"] == len(load_model_state(ckpt))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["open_clip_config.json",
                                                                    "open_clip_model.safetensors"]
    config = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config("ViT-micro-8")
    assert config["preprocess_cfg"]["size"] == 16
    assert_open_clip_matches(tmp_path / "out", harness_model(ckpt), "ViT-micro-8", digit_images(digits_dir / "val"))


def test_bf16_export(tmp_path, digits_dir):
    """bf16 tensors on disk; open_clip loads them into its fp32 model, which then computes exactly what the harness
    model computes with its weights rounded to bf16."""
    ckpt = fake_checkpoint(tmp_path / "ckpt", "ViT-micro-8")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    tensors = load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    ref = harness_model(ckpt)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_open_clip_matches(tmp_path / "out", ref, "ViT-micro-8", digit_images(digits_dir / "val"))


def test_bad_source_and_existing_out_are_refused_and_nothing_is_written(tmp_path, capsys):
    not_ckpt = tmp_path / "notes"
    not_ckpt.mkdir()
    (not_ckpt / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    assert main(["export", str(not_ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: RUN_OR_CHECKPOINT:" in err and "neither a checkpoint folder" in err
    assert not out.exists()
    run = tmp_path / "run"  # a run whose only checkpoint was interrupted while saving
    (run / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)
    assert main(["export", str(run), str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "empty_ckpt"  # meta.json but no weights
    empty.mkdir()
    (empty / "meta.json").write_text(json.dumps({"config": {"model": {"name": "ViT-micro-8"}}}))
    assert main(["export", str(empty), str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: RUN_OR_CHECKPOINT:" in err and "no model weights" in err and not out.exists()
    ckpt = fake_checkpoint(tmp_path / "ckpt", "ViT-micro-8")
    out.mkdir()
    (out / "open_clip_model.safetensors").write_text("an earlier export")
    assert main(["export", str(ckpt), str(out)]) == 2
    assert "error: --out:" in capsys.readouterr().err
    assert (out / "open_clip_model.safetensors").read_text() == "an earlier export"
    assert main(["export", str(ckpt), str(tmp_path / "new"), "--dtype", "fp8"]) == 2
    assert "error: --dtype:" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_dtp_export_loads_through_models(tmp_path):
    """open_clip cannot build a DTP-ViT image tower; ``models.load_exported`` builds it from the exported config and
    gives the harness model's embeddings (eval: deterministic boundaries), and its ``logit_scale`` shape ``[1]``."""
    ckpt = fake_checkpoint(tmp_path / "ckpt", "DTP-ViT-tiny-8-4x", seed=4)
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    assert "dtp_cfg" in config["model_cfg"] and "vision_cfg" not in config["model_cfg"]
    loaded, ref = models.load_exported(str(tmp_path / "out")).eval(), harness_model(ckpt)
    assert loaded.logit_scale.shape == (1,) and torch.equal(loaded.logit_scale, ref.logit_scale)
    images, tokens = torch.randn(6, 3, 32, 32), models.get_tokenizer("DTP-ViT-tiny-8-4x")(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), ref.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), ref.encode_text(tokens))


# ---------------------------------------------------------------- real runs (processes)

def _digits_args(out: Path, data: Path, name: str, model: str, *extra: str):
    return ["--model", model, "--train-data", str(data / "train"), "--zeroshot-data", "none", "--output-dir", str(out),
            "--run-name", name, "--micro-batch-size", "16", "--global-batch-size", "32", "--train-samples", "96",
            "train.progress_bar=false", "data.num_workers=0", *extra]


@pytest.mark.slow
def test_round_trip_of_a_trained_run(tmp_path, digits_dir):
    """Train ViT-micro-8 on the digits for 3 steps, export the run folder (its newest checkpoint), load it with
    open_clip: same transforms, tokens and embeddings (tolerance 1e-5 on L2-normalised embeddings)."""
    train(_digits_args(tmp_path, digits_dir, "vit", "ViT-micro-8"))
    assert main(["export", str(tmp_path / "vit"), str(tmp_path / "out")]) == 0
    ckpt = complete_checkpoints(tmp_path / "vit" / "checkpoints")[-1]
    assert json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["harness"]["step"] == 3
    assert_open_clip_matches(tmp_path / "out", harness_model(ckpt), "ViT-micro-8", digit_images(digits_dir / "val"))


@pytest.mark.slow
def test_round_trip_of_a_trained_dtp_run(tmp_path, digits_dir):
    train(_digits_args(tmp_path, digits_dir, "dtp", "DTP-ViT-micro-8-2x"))
    assert main(["export", str(tmp_path / "dtp"), str(tmp_path / "out")]) == 0
    ref = harness_model(complete_checkpoints(tmp_path / "dtp" / "checkpoints")[-1])
    loaded = models.load_exported(str(tmp_path / "out")).eval()
    transform = models.image_transform("DTP-ViT-micro-8-2x", is_train=False)
    x = torch.stack([transform(im) for im in digit_images(digits_dir / "val")])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), ref.encode_image(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "fsdp-checkpointing"])
def test_round_trip_of_sharded_checkpoints(tmp_path, digits_dir, name, sharded_run, single_reference):
    """2-process ZeRO-3 / FSDP2 runs (each rank holds half of every sharded tensor; the shared runs of
    ``tests/conftest.py``) exported from their checkpoints: open_clip's model equals the harness model consolidated
    by ``load_model_state`` (1e-5), and both are the model a single process trains on the same global batches
    (synthetic data, seeded per sample; 1e-4 on L2-normalised embeddings: the reduction order differs; measured 2e-7
    image, 4e-7 text for both)."""
    launch, _, layout, _ = SHARDED[name]
    ckpt = complete_checkpoints(sharded_run(name) / "checkpoints")[-1]
    assert (ckpt / ("deepspeed" if launch.startswith("zero") else "fsdp")).is_dir()
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    images = digit_images(digits_dir / "val")
    assert_open_clip_matches(tmp_path / "out", harness_model(ckpt), "ViT-micro-8", images)
    assert main(["export", str(single_reference(layout)), str(tmp_path / "out_single")]) == 0
    single, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out_single'}")
    sharded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    x = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        torch.testing.assert_close(sharded.eval().encode_image(x, normalize=True),
                                   single.eval().encode_image(x, normalize=True), rtol=0, atol=1e-4)
