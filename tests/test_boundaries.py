"""``harness boundaries`` on a trained DTP-ViT-micro-8-2x checkpoint, and its refusals of bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

import models
from harness.cli import main
from harness.components.checkpoint import complete_checkpoints, load_model_state
from harness.tools.boundaries import find_images, segment_ids
from tests.helpers import train


@pytest.fixture(scope="module")
def dtp_run(tmp_path_factory, digits_dir):
    """DTP-ViT-micro-8-2x trained for 30 steps on the digits (checkpoint at the end)."""
    out = tmp_path_factory.mktemp("dtp")
    train(["--model", "DTP-ViT-micro-8-2x", "--train-data", str(digits_dir / "train"), "--zeroshot-data", "none",
              "--max-steps", "30", "--output-dir", str(out), "--run-name", "dtp", "checkpoint.every_steps=0",
              "train.progress_bar=false"])
    return out / "dtp"


def test_segment_ids_follow_the_boundaries():
    assert segment_ids(torch.tensor([0., 1., 0., 0., 1., 1.])).tolist() == [0, 0, 1, 1, 1, 2]


def test_images_spread_over_classes_or_taken_from_a_plain_folder(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "f" / cls / f"{i}.png")
    assert [f"{p.parent.name}/{p.name}" for p in find_images(str(tmp_path / "f"), 3)] == ["a/0.png", "b/0.png",
                                                                                        "a/1.png"]
    assert [p.name for p in find_images(str(tmp_path / "f" / "b"), 10)] == ["0.png", "1.png", "2.png"]


@pytest.mark.slow
def test_boundaries_of_a_trained_checkpoint(tmp_path, dtp_run, digits_dir, capsys):
    """From the run folder: the PNG is written and each image's segment count is printed and stored; the counts
    are those of the tower's own eval forward (``last_stats``), and the boundary patches end the segments."""
    out = tmp_path / "b"
    assert main(["boundaries", "--checkpoint", str(dtp_run), "--images", str(digits_dir / "val"), "--num-images",
                 "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "boundaries.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "boundaries.json").read_text())
    assert result["model"] == "DTP-ViT-micro-8-2x" and len(result["images"]) == 6
    L = result["patches"]
    for item in result["images"]:
        assert 1 <= item["segments"] <= L and item["boundary_patches"][-1] == L - 1
        assert len(item["boundary_patches"]) == item["segments"]
        assert f"{item['file']}: {item['segments']} segments" in printed
    # the same images through the model's eval forward report the same mean segment count
    model = models.create_model("DTP-ViT-micro-8-2x").eval()
    model.load_state_dict(load_model_state(complete_checkpoints(dtp_run / "checkpoints")[-1]))
    transform = models.image_transform("DTP-ViT-micro-8-2x", is_train=False)
    with torch.no_grad():
        model.visual(torch.stack([transform(Image.open(i["file"]).convert("RGB")) for i in result["images"]]))
    assert float(model.visual.last_stats["segments_mean"]) == pytest.approx(result["segments_mean"])
    # a checkpoint folder works too; an --out that holds results is refused and left alone
    ckpt = complete_checkpoints(dtp_run / "checkpoints")[-1]
    assert main(["boundaries", "--checkpoint", str(ckpt), "--images", str(digits_dir / "val"), "--num-images", "2",
                 "--out", str(tmp_path / "c")]) == 0
    before = (out / "boundaries.json").read_text()
    assert main(["boundaries", "--checkpoint", str(ckpt), "--images", str(digits_dir / "val"), "--out", str(out)]) == 2
    assert "error: --out:" in capsys.readouterr().err and (out / "boundaries.json").read_text() == before


def test_bad_input_is_a_clear_error(tmp_path, digits_dir, capsys):
    """A checkpoint of a plain ViT, a folder without a checkpoint, and a folder without images are each an
    ``error: --flag: ...`` with exit status 2, and nothing is written."""
    vit = tmp_path / "vit" / "checkpoints" / "step_00000010"
    vit.mkdir(parents=True)
    (vit / "meta.json").write_text(json.dumps({"step": 10, "config": {"model": {"name": "ViT-micro-8"}}}))
    dtp = tmp_path / "dtp_meta_only"  # a DTP checkpoint's meta (weights are not read before the images are found)
    dtp.mkdir()
    (dtp / "meta.json").write_text(json.dumps({"step": 10, "config": {"model": {"name": "DTP-ViT-micro-8-2x"}}}))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "vit"), "--images", str(digits_dir / "val")],
         "error: --checkpoint: .* is a checkpoint of 'ViT-micro-8', not of a DTP-ViT model"),
        (["--checkpoint", str(tmp_path / "empty"), "--images", str(digits_dir / "val")],
         "error: --checkpoint: .* is neither a checkpoint folder"),
        (["--checkpoint", str(dtp), "--images", str(tmp_path / "empty")], "error: --images: no image"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["boundaries", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert not out.exists()
