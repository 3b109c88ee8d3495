"""Token-reduced ViTs as registered models (:mod:`models.reducers`): names, the FLOPs matcher against DTP-ViT, the
memory model's token counts, export, ``harness compare-reducers``'s refusals, and 2-process ZeRO-2 / FSDP2 runs that
resume bit for bit. Each method's own behaviour is in ``test_tome.py``, ``test_tokenlearner.py`` and
``test_dynamicvit.py``."""
from __future__ import annotations

import shutil

import pytest
import torch

import models
from harness.components.checkpoint import complete_checkpoints
from harness.fit.model_shape import model_shape
from harness.tools import compare_reducers
from models import reducers
from tests.helpers import accelerate_launch, assert_same_trajectory, digits_args, in_process


def test_names_spell_settings_and_any_setting_on_a_registered_vit_builds():
    for name in reducers.CANONICAL:
        red = reducers.parse(name)
        assert reducers.model_name(red.base, red.method, **red.kwargs) == name
        assert models.get_spec(name).family == "reduced" and name in models.list_models()
    spec = models.get_spec("ViT-tiny-8-tome-r5-prop")  # not listed, still a model
    assert spec.tiny and models.reduction(spec.name).kwargs == {"r": 5, "prop_attn": True}
    assert models.architecture("ViT-tiny-8-dynamicvit-0.5")["token_reduction"] == {
        "base": "ViT-tiny-8", "method": "dynamicvit", "keep_ratio": 0.5}
    assert models.get_tokenizer("ViT-tiny-8-tome-r2")(["a digit"]).shape == (1, 16)
    for bad in ("DTP-ViT-tiny-8-4x-tome-r2", "ViT-nope-tome-r2", "ViT-tiny-8-tome-rx"):
        with pytest.raises(ValueError, match="model.name: unknown model"):
            models.get_spec(bad)
    with pytest.raises(ValueError, match="tokenlearner at"):
        models.create_model("ViT-tiny-8-tokenlearner-4-at4")  # 4 blocks: insert after 1 to 3


def test_matched_settings_lie_within_5_percent_of_their_dtp_targets():
    for dtp in ("DTP-ViT-tiny-8-2x", "DTP-ViT-tiny-8-4x"):
        target = compare_reducers.image_gmacs(dtp)
        assert target < compare_reducers.image_gmacs("ViT-tiny-8")
        for method in compare_reducers.METHODS:
            m = compare_reducers.match_setting("ViT-tiny-8", method, target)
            assert m["within"], m
            assert abs(compare_reducers.image_gmacs(m["model"]) / target - 1) <= 0.05


def test_memory_model_counts_the_tokens_each_block_trains_on():
    image = lambda name: [b.tokens for b in model_shape(name).towers["image"]]  # noqa: E731
    assert image("ViT-tiny-8") == [17] * 4
    assert image("ViT-tiny-8-tome-r3") == [17, 14, 11, 8]
    assert image("ViT-tiny-8-tokenlearner-4-at2") == [17, 17, 5, 5]
    assert image("ViT-tiny-8-dynamicvit-0.7") == [17] * 4  # dropped tokens stay in the sequence, masked


@pytest.mark.parametrize("name", ["ViT-tiny-8-tokenlearner-4-at2", "ViT-tiny-8-dynamicvit-0.7"])
def test_export_writes_a_folder_our_loader_rebuilds_exactly(tmp_path, name):
    from models.exported import write_exported

    torch.manual_seed(0)
    model = models.create_model(name).eval()
    write_exported(model.state_dict(), name, tmp_path / "out")
    loaded = models.load_exported(str(tmp_path / "out")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.visual(images), loaded.visual(images))


def test_compare_reducers_refuses_bad_input_before_running(tmp_path):
    for argv, field in ([["--vit", "DTP-ViT-tiny-8-4x", "--match-only"], "--vit"],
                        [["--dtp", "ViT-tiny-8", "--match-only"], "--dtp"],
                        [["--methods", "tome,pruning", "--match-only"], "--methods"],
                        [["--dtp", "DTP-ViT-tiny-8-4x"], "--out"]):
        result = in_process(compare_reducers.main, argv, check=False)
        assert result.returncode == 2 and field in result.stderr, (argv, result.stderr)


def _engine_matrix():
    """Every method under ZeRO-2 and FSDP2; ``make test`` runs two (DynamicViT's Gumbel noise under ZeRO-2,
    TokenLearner's own parameters sharded by FSDP2), the other four are marked ``matrix`` (``make test-matrix``;
    about 35 s each on one core), to keep the suite inside its 15 minutes."""
    default = {("zero2.yaml", "ViT-tiny-8-dynamicvit-0.7"), ("fsdp.yaml", "ViT-tiny-8-tokenlearner-4-at2")}
    return [pytest.param(c, n, marks=() if (c, n) in default else pytest.mark.matrix)
            for c in ("zero2.yaml", "fsdp.yaml")
            for n in ("ViT-tiny-8-dynamicvit-0.7", "ViT-tiny-8-tokenlearner-4-at2", "ViT-tiny-8-tome-r2")]


@pytest.mark.slow
@pytest.mark.parametrize("config, name", _engine_matrix())
def test_two_processes_train_and_resume_bit_for_bit(tmp_path, digits_dir, config, name):
    """A 2-process run of a reduced tower checkpoints at step 3; a copy of it resumed from there follows the
    uninterrupted run bit for bit to step 6."""
    args = ["--model", name, "checkpoint.every_steps=3", "checkpoint.keep_last=5"]
    accelerate_launch(config, digits_args(tmp_path, digits_dir, "full", *args, steps=6))
    full = tmp_path / "full"
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for ckpt in complete_checkpoints(resumed / "checkpoints")[1:]:
        shutil.rmtree(ckpt)
    (resumed / "metrics.jsonl").write_text("")
    (resumed / "summary.json").unlink(missing_ok=True)
    accelerate_launch(config, digits_args(tmp_path, digits_dir, "resumed", *args, "--resume", "latest", steps=6))
    assert_same_trajectory(full, resumed, 3, 6)
