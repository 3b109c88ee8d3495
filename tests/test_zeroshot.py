"""Zero-shot eval: class names / templates discovery and the accuracy computation on real images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import models
from harness.eval.zeroshot import class_names_and_templates, zeroshot_eval


def _folder(root, classes, per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_names_from_folders_files_and_imagenet(tmp_path):
    _folder(tmp_path / "a", ["golden_retriever", "tabby_cat"], 1)
    folders, names, templates = class_names_and_templates(str(tmp_path / "a"))
    assert names == ["golden retriever", "tabby cat"] and templates == ["a photo of a {}."]
    (tmp_path / "a" / "classnames.txt").write_text("dog\ncat\n")
    (tmp_path / "a" / "templates.txt").write_text("a {} here.\n")
    assert class_names_and_templates(str(tmp_path / "a"))[1:] == (["dog", "cat"], ["a {} here."])
    for i in range(1000):
        (tmp_path / "inet" / f"n{i:08d}").mkdir(parents=True)
    _, names, templates = class_names_and_templates(str(tmp_path / "inet"))
    assert names[0] == "tench" and len(templates) > 50
    (tmp_path / "a" / "classnames.txt").write_text("dog\n")
    with pytest.raises(ValueError, match="classnames.txt has 1 names for 2 folders"):
        class_names_and_templates(str(tmp_path / "a"))


def test_accuracy_is_in_range_and_top5_covers_all_of_few_classes(tmp_path):
    _folder(tmp_path, ["one", "two", "three"], per_class=4)
    name = "ViT-micro-8"
    torch.manual_seed(0)
    model = models.create_model(name)
    res = zeroshot_eval(model, models.get_tokenizer(name), str(tmp_path), models.image_transform(name, False), 5)
    assert res["zeroshot_images"] == 12 and res["zeroshot_classes"] == 3
    assert 0.0 <= res["zeroshot_top1"] <= 1.0
    assert res["zeroshot_top5"] == 1.0  # top-5 over 3 classes always contains the label
