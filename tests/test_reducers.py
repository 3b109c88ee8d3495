"""Token-reduced ViTs as registered models (:mod:`models.reducers`): names, the FLOPs matcher against DTP-ViT, the
memory model's token counts, export, ``harness compare-reducers``'s refusals, and 2-process ZeRO-2 / FSDP2 runs that
resume bit for bit. Each method's own behaviour is in ``test_tome.py``, ``test_tokenlearner.py`` and
``test_dynamicvit.py``."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

import models
from harness.components.checkpoint import complete_checkpoints
from harness.fit.model_shape import model_shape
from harness.tools import compare_reducers
from models import reducers
from tests.helpers import (
    accelerate_launch,
    assert_same_trajectory,
    digits_args,
    in_process,
    losses,
    metrics_by_step,
    synthetic_args,
    train,
)


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


def _teacher_args(folder, name: str):
    """For a DynamicViT model, the override that makes it distil from a teacher: a random ViT of its base, saved in
    ``folder``; nothing for the other methods."""
    red = reducers.parse(name)
    if red.method != "dynamicvit":
        return []
    torch.save(models.create_model(red.base).state_dict(), folder / "teacher.pt")
    return [f"model.distill_teacher={folder / 'teacher.pt'}"]


def _engine_matrix():
    """Every method under ZeRO-2 and FSDP2, and under ZeRO-3 (parameters partitioned: TokenLearner's and DynamicViT's
    own among them), ZeRO-0 and ZeRO-1; DynamicViT always distils from a teacher, once under DeepSpeed's pure bf16
    (the teacher follows the student's input dtype). ``make test`` runs one (DynamicViT's Gumbel noise and teacher
    under ZeRO-2); the others are marked ``matrix`` (``make test-matrix``, which CI runs after ``make test``; 25 to
    40 s each), to keep ``make test`` inside its 15 minutes."""
    dvt, tl, tome = "ViT-tiny-8-dynamicvit-0.7", "ViT-tiny-8-tokenlearner-4-at2", "ViT-tiny-8-tome-r2"
    default = [("zero2.yaml", dvt, "fp32")]
    matrix = [("fsdp.yaml", tl, "fp32"), ("zero2.yaml", tl, "fp32"), ("zero2.yaml", tome, "fp32"),
              ("fsdp.yaml", dvt, "fp32"), ("fsdp.yaml", tome, "fp32"), ("zero3.yaml", dvt, "bf16"),
              ("zero3.yaml", tl, "fp32"), ("zero3.yaml", tome, "fp32"), ("zero0.yaml", tome, "fp32"),
              ("zero1.yaml", tl, "fp32")]
    return [pytest.param(*case) for case in default] + [pytest.param(*case, marks=pytest.mark.matrix)
                                                        for case in matrix]


@pytest.mark.slow
@pytest.mark.parametrize("config, name, precision", _engine_matrix())
def test_two_processes_train_and_resume_bit_for_bit(tmp_path, digits_dir, config, name, precision):
    """A 2-process run of a reduced tower checkpoints at step 3; a copy of it resumed from there follows the
    uninterrupted run bit for bit to step 6 (DynamicViT's distillation terms too: the teacher is read again)."""
    args = ["--model", name, "checkpoint.every_steps=3", "checkpoint.keep_last=5", f"train.precision={precision}",
            *_teacher_args(tmp_path, name)]
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
    if "-dynamicvit-" in name:
        last = metrics_by_step(full)[6]
        assert last["distill_embed_loss"] > 0 and last["distill_token_loss"] > 0, last


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-tiny-8-tome-r2", "ViT-tiny-8-tokenlearner-4-at2", "ViT-tiny-8-dynamicvit-0.7"])
def test_mixed_precision_follows_the_fp32_run(tmp_path, name):
    """One process, plain engine: bf16 and fp16 (autocast; fp16 with loss scaling) runs of each reduced tower follow
    the fp32 run's losses within 3% over 4 steps, every loss finite (DynamicViT's fp32 policy softmax, ToMe's
    size-weighted merges and TokenLearner's maps under autocast; DynamicViT with a teacher)."""
    extra = _teacher_args(tmp_path, name)
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        train(synthetic_args(tmp_path, precision, 8, f"train.precision={precision}", *extra, model=name, steps=4))
        runs[precision] = losses(tmp_path / precision)
    assert len(runs["fp32"]) == 4 and all(math.isfinite(v) for r in runs.values() for v in r)
    for precision in ("bf16", "fp16"):
        assert runs[precision] == pytest.approx(runs["fp32"], rel=0.03), (precision, runs)
