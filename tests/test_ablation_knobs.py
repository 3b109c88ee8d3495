"""The ablation's knobs: DeCAtt (:mod:`models.decatt`), quadtree mixed-resolution tokens (:mod:`models.mixed_res`),
and ``harness ablate`` (:mod:`harness.tools.ablate`). Their 2-process ZeRO-2 / FSDP2 training and bit-for-bit resume
is covered by the shared digits reference runs, which use both knobs (:data:`tests.helpers.REFERENCE_EXTRA`)."""
from __future__ import annotations

import json

import pytest
import torch

import models
from harness.config.overrides import from_dict
from harness.config.validate import validate
from harness.core.errors import ConfigError
from models.decatt import decatt_loss, enable_decatt, extra_losses
from models.mixed_res import (
    QuadtreeSelector,
    apply_mixed_resolution,
    candidate_centres,
    quadtree_select,
    quadtree_spec,
    reachable_tokens,
)


def _heads(orthogonal: bool) -> torch.Tensor:
    """``[B=3, h=4, n=2, d=4]`` per-head outputs: head i of every sample lives on basis vectors of its own (pairwise
    orthogonal), or, if not ``orthogonal``, heads 0 and 1 share a direction."""
    gen = torch.Generator().manual_seed(0)
    a = torch.zeros(3, 4, 8)
    for i in range(4):
        a[:, i, 2 * i:2 * i + 2] = torch.randn(3, 2, generator=gen)
    if not orthogonal:
        a[:, 1] += a[:, 0]
    return a.view(3, 4, 2, 4)


def test_decatt_is_zero_for_orthogonal_heads_and_positive_otherwise():
    assert decatt_loss(_heads(True)).item() == 0.0
    correlated = decatt_loss(_heads(False)).item()
    assert 0.0 < correlated < 1.0
    same = torch.randn(2, 3, 5, 4).expand(2, 3, 5, 4).clone()
    same[:, 1:] = same[:, :1]  # three identical heads: C1 = 1/3 everywhere, 6 off-diagonal entries of 1/9
    assert decatt_loss(same).item() == pytest.approx(6 / 9, rel=1e-6)


def _vit_decatt(grad_checkpointing: bool = False, attention: str = "sdpa", name: str = "ViT-micro-8"):
    torch.manual_seed(0)
    model = models.create_model(name, attention=attention)
    assert enable_decatt(model.visual, 2.0) > 0
    if grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    images = torch.randn(4, 3, models.image_size(name), models.image_size(name))
    model.visual.train()(images)
    loss = extra_losses(model.visual)["decatt_loss"]
    loss.backward()
    return model, loss.detach()


def test_decatt_gradient_reaches_every_heads_projection_and_checkpointing_changes_nothing():
    model, loss = _vit_decatt()
    assert loss.item() > 0
    for blk in model.visual.transformer.resblocks:
        attn = blk.attn
        grad = attn.in_proj_weight.grad.view(3, attn.num_heads, attn.head_dim, -1)  # q, k, v rows per head
        assert (grad.abs().sum(dim=(2, 3)) > 0).all(), "a head's q, k or v projection got no DeCAtt gradient"
    ckpt_model, ckpt_loss = _vit_decatt(grad_checkpointing=True)
    assert ckpt_loss.item() == loss.item()
    for (name, p), q in zip(model.visual.named_parameters(), ckpt_model.visual.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["ViT-micro-8", "DTP-ViT-micro-8-2x"])
def test_decatt_is_the_same_on_the_flash_and_math_kernels(name):
    """fp32 on this CPU: SDPA's flash kernel (``sdpa_flash``) against the unfused reference (``math``), for open_clip's
    attention and DTP-ViT's timm attention (whose full-sequence blocks carry the term)."""
    from models.attention import available_backends

    if "sdpa_flash" not in available_backends(torch.device("cpu"), torch.float32):
        pytest.skip("no SDPA flash kernel on this CPU")
    _, flash = _vit_decatt(attention="sdpa_flash", name=name)
    _, math = _vit_decatt(attention="math", name=name)
    assert flash.item() > 0
    assert flash.item() == pytest.approx(math.item(), abs=1e-5)


def _coverage(quad: torch.Tensor, spec) -> torch.Tensor:
    """How often each finest-grid cell is covered by the selected patches of one image."""
    centres, _ = candidate_centres(spec, torch.device("cpu"))
    sizes = torch.cat([torch.full((g * g,), s // spec.patch_size) for s, g in zip(spec.sizes(), spec.grids())])
    g = spec.grids()[-1]
    cover = torch.zeros(g, g, dtype=torch.int64)
    for i in quad.tolist():
        half = sizes[i].item() / 2
        y0, x0 = int(centres[i, 0] - half), int(centres[i, 1] - half)
        cover[y0:y0 + sizes[i], x0:x0 + sizes[i]] += 1
    return cover


@pytest.mark.parametrize("levels,tokens", [(2, 7), (3, 10), (3, 16), (2, 4)])
def test_quadtree_gives_the_budget_and_covers_every_pixel_once(levels, tokens):
    spec = quadtree_spec(32, 8, levels, tokens)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(levels * 100 + tokens))
    quad = quadtree_select(images, spec)
    assert quad.shape == (5, tokens)
    for row in quad:
        assert (_coverage(row, spec) == 1).all()


def test_quadtree_splits_a_flat_image_uniformly_and_detail_first():
    spec = quadtree_spec(64, 8, 3, 16)  # 64 px: 4 patches of 32 px; 16 tokens = every 16 px patch
    flat = torch.full((1, 3, 64, 64), 0.3)
    sizes = torch.cat([torch.full((g * g,), s) for s, g in zip(spec.sizes(), spec.grids())])
    assert sizes[quadtree_select(flat, spec)[0]].tolist() == [16] * 16
    detail = flat.clone()
    detail[:, :, 40:48, 8:16] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))  # bottom-left
    spec7 = quadtree_spec(64, 8, 3, 7)  # one split of the 4 large patches
    chosen = quadtree_select(detail, spec7)[0]
    centres, _ = candidate_centres(spec7, torch.device("cpu"))
    split_small = centres[chosen][sizes[chosen] == 16]
    assert ((split_small[:, 0] > 4) & (split_small[:, 1] < 4)).all()  # the bottom-left quadrant was split


def test_workers_selection_equals_the_towers_own_and_bad_budgets_are_refused():
    """The data workers' selection (on uint8, normalised as on the device) is the one the tower makes itself from
    the float images, and feeding it gives the same features; a budget the quadtree cannot reach fails validation
    naming the field and the counts it can reach."""
    torch.manual_seed(0)
    spec = quadtree_spec(32, 8, 2, 10)
    model = models.create_model("ViT-tiny-8")
    visual = apply_mixed_resolution(model.visual, spec).eval()
    uint8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    images = models.normalize_uint8(uint8, *models.image_mean_std("ViT-tiny-8"))
    quad = QuadtreeSelector(spec, models.image_mean_std("ViT-tiny-8"))(uint8)
    assert quad.dtype == torch.int16 and torch.equal(quad.long(), quadtree_select(images, spec))
    assert torch.equal(visual((images, quad)), visual(images))
    assert sum(p.numel() for p in visual.parameters()) == sum(
        p.numel() for p in models.create_model("ViT-tiny-8").visual.parameters())
    assert reachable_tokens(32, 8, 2) == [4, 7, 10, 13, 16]
    cfg = from_dict({"data": {"tokenizer": "quadtree", "quadtree_tokens": 8}, "train": {"train_samples": 64}})
    with pytest.raises(ConfigError, match=r"data.quadtree_tokens: 8 .* allowed: 4, 7, 10, 13, 16"):
        validate(cfg, world_size=1, check_paths=False)
    reduced = from_dict({"model": {"name": "ViT-tiny-8-tome-r2"}, "data": {"tokenizer": "quadtree"},
                         "train": {"train_samples": 64}})
    with pytest.raises(ConfigError, match="data.tokenizer: quadtree tokens need a plain ViT or DTP-ViT"):
        validate(reduced, world_size=1, check_paths=False)
    with pytest.raises(ValueError, match="quadtree needs a ViT or DTP-ViT image tower"):
        apply_mixed_resolution(models.create_model("ViT-tiny-8-tome-r2").visual, spec)


def test_quadtree_dtp_vit_trains_a_step():
    torch.manual_seed(0)
    model = models.create_model("DTP-ViT-micro-8-2x")
    visual = apply_mixed_resolution(model.visual, quadtree_spec(16, 8, 2, 4)).train()
    out = visual(torch.randn(2, 3, 16, 16))
    (out.square().mean() + sum(extra_losses(visual).values())).backward()
    assert out.shape == (2, model.visual.output_dim) and visual.conv1.weight.grad.abs().sum() > 0


@pytest.mark.slow  # a grid of real training runs
def test_ablate_runs_the_grid_once(tmp_path, capsys):
    from harness.tools.ablate import main

    out = tmp_path / "abl"
    base = ["--seeds", "1", "--out", str(out), "--knob", "loss.decatt_weight=0,150",
            "--knob", "data.tokenizer=grid,quadtree", "--only", "data.tokenizer=grid", "--",
            "--config", "synthetic", "model.name=ViT-micro-8", "train.micro_batch_size=4", "train.train_samples=8",
            "eval.zeroshot_data=none"]
    assert main(base) == 0
    table = (out / "ablation.md").read_text()
    assert "| 0 | baseline |" in table and "| 1 | decatt_weight=150 |" in table and "| 2 |" not in table
    runs = json.loads((out / "ablation.json").read_text())["runs"]
    assert [r["knobs"]["loss.decatt_weight"] for r in runs] == ["0", "150"]
    stamp = (out / "runs" / "row1-s0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(base) == 0  # resumed: nothing re-run
    assert "ablate: row" not in capsys.readouterr().out
    assert (out / "runs" / "row1-s0" / "summary.json").stat().st_mtime_ns == stamp


def test_ablate_refuses_a_bad_knob_before_running(tmp_path, capsys):
    from harness.tools.ablate import main

    bad = ["--out", str(tmp_path / "bad"), "--knob", "data.tokenizer=grid,quadtree", "--knob",
           "data.quadtree_tokens=0,8", "--", "--config", "synthetic", "model.name=ViT-micro-8"]
    assert main(bad) == 2
    assert "data.quadtree_tokens: 8" in capsys.readouterr().err and not (tmp_path / "bad").exists()
