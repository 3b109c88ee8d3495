"""Gradient accumulation with negatives (:mod:`harness.train.accumulate`, GradCache): ``K`` micro batches contrasted
with each other give the loss and gradients of one contrastive batch of ``K x micro x world`` samples.

References are plain autograd over the whole step (one backward through all samples, open_clip's dense ``ClipLoss``),
never the code under test. Tolerance (fp32): gradients within ``rtol=1e-4, atol=1e-6`` of the reference, losses within
1e-5 relative (measured: every gradient tensor within 7.9e-7 of its largest element, losses within 1e-7 relative; the
sums run in another order); end-to-end loss trajectories within 1e-5 relative.
"""
from __future__ import annotations

import json

import pytest
import torch
from open_clip.loss import ClipLoss

import models
from harness.config.layout import batch_layout
from harness.config.overrides import from_dict
from harness.engines.local import LocalEngine
from harness.train import accumulate
from harness.train.accumulate import NegativesAccumulation
from harness.train.losses import build_loss
from models.distill import attach_teacher
from models.reducers import parse as reduction
from tests.helpers import accelerate_launch, losses, train

K, MICRO = 4, 16


def _model(name: str, dropout: float = 0.0):
    """``name`` in training mode; a DynamicViT model distils from a frozen teacher (a random ViT of its base), so the
    step's extra losses hold the teacher's terms too."""
    torch.manual_seed(0)
    model = models.create_model(name).train()
    for m in model.modules():
        if dropout and hasattr(m, "dropout") and isinstance(m.dropout, float):  # models.attention.SelfAttention
            m.dropout = dropout
    red = reduction(name)
    if red is not None and red.method == "dynamicvit":
        attach_teacher(model.visual, models.create_model(red.base).visual)
    return model


def _data(name: str, n: int = K * MICRO):
    g = torch.Generator().manual_seed(1)
    arch = models.architecture(name)
    size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    return torch.randn(n, 3, size, size, generator=g), torch.randint(1, 400, (n, ctx), generator=g)


def _reference(name: str, micro: int, dropout: float = 0.0):
    """Loss and gradients of the step's loss by plain autograd: forwards of ``micro`` samples in order from seed 5
    (drawing the same noise as pass 1 does), one dense CLIP loss over all samples plus the mean extra loss."""
    model = _model(name, dropout)
    image, text = _data(name)
    torch.manual_seed(5)
    outs, extras = [], []
    for i in range(0, image.shape[0], micro):
        outs.append(model(image[i:i + micro], text[i:i + micro]))
        extras.append(sum(model.visual.extra_losses().values()) if hasattr(model.visual, "extra_losses") else 0.0)
    feats = [torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")]
    loss = ClipLoss()(*feats, outs[0]["logit_scale"].clamp(max=100.0))
    (loss + sum(extras) / len(extras)).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulated(name: str, dropout: float = 0.0, impl: str = "dense"):
    """The same step through :class:`NegativesAccumulation` and the plain engine (``K`` micro batches of ``MICRO``);
    the gradients are read in the optimizer's pre-step hook."""
    cfg = from_dict({"train": {"micro_batch_size": MICRO, "global_batch_size": K * MICRO}, "loss": {"impl": impl},
                     "optim": {"grad_clip_norm": None}})
    layout = batch_layout(cfg.train, world_size=1)
    assert layout.accum_negatives and layout.contrastive_batch_size == K * MICRO
    model = _model(name, dropout)
    engine = LocalEngine(model, cfg, layout, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         torch.device("cpu"))
    grads = {}
    engine.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    acc = NegativesAccumulation(engine, build_loss(cfg.loss), K, torch.device("cpu"), (None, None))
    image, text = _data(name)
    reports = []
    torch.manual_seed(5)
    stepped = [acc.add({"image": image[i:i + MICRO], "text": text[i:i + MICRO]}, reports.append)
               for i in range(0, K * MICRO, MICRO)]
    assert stepped == [False] * (K - 1) + [True]
    return reports[0]["loss"], grads


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name, impl", [("ViT-micro-8", "dense"), ("ViT-micro-8", "tiled"),
                                        ("ViT-tiny-8-tome-r2", "dense"), ("ViT-tiny-8-tokenlearner-4-at2", "dense")])
def test_four_micro_batches_with_negatives_equal_one_batch_of_64(name, impl):
    """A tower without noise (ViT; ToMe's merges and TokenLearner's tokens, both per sample): K=4 x micro 16 equals
    K=1 x micro 64 (one forward of 64 samples)."""
    _assert_same(*_accumulated(name, impl=impl), *_reference(name, micro=K * MICRO))


@pytest.mark.parametrize("name,dropout", [("ViT-micro-8", 0.3), ("DTP-ViT-micro-8-2x", 0.0),
                                          ("ViT-tiny-8-dynamicvit-0.7", 0.0)])
def test_random_state_is_replayed_in_the_recompute(name, dropout, monkeypatch):
    """With attention dropout (ViT), DTP-ViT's Gumbel boundary noise (and its boundary loss) or DynamicViT's Gumbel
    keep decisions (and its ratio and distillation losses, the teacher seen in pass 2 only), the two passes see the
    same noise: the gradient is that of the step's loss under the noise pass 1 drew. Without the replay it is not."""
    ref = _reference(name, micro=MICRO, dropout=dropout)
    _assert_same(*_accumulated(name, dropout), *ref)
    monkeypatch.setattr(accumulate, "set_rng_state", lambda *a: None)
    _, grads = _accumulated(name, dropout)
    assert any(not torch.allclose(grads[n], ref[1][n], rtol=1e-3, atol=1e-5) for n in grads)


def test_layout_field():
    train = from_dict({"train": {"micro_batch_size": 8, "global_batch_size": 64}}).train
    assert batch_layout(train, world_size=2).contrastive_batch_size == 64
    train.accum_negatives = False
    assert batch_layout(train, world_size=2).contrastive_batch_size == 16
    train.global_batch_size, train.accum_negatives = 16, True  # no accumulation: nothing to add
    assert not batch_layout(train, world_size=2).accum_negatives


def _synthetic(out, name, micro, *extra, model="ViT-micro-8"):
    return ["--config", "synthetic", "--model", model, "--global-batch-size", "64", "--micro-batch-size", str(micro),
            "--max-steps", "3", "--output-dir", str(out), "--run-name", name, "train.log_every_steps=1",
            "train.progress_bar=false", "optim.warmup_samples=64", *extra]


@pytest.mark.slow
def test_synthetic_micro_16_equals_micro_64_end_to_end_without_host_syncs(tmp_path):
    """``train.py --config synthetic --global-batch-size 64``: micro 16 (K=4, negatives) follows micro 64's losses; with
    ``train.accum_negatives=false`` it does not (contrastive batch 16); the step reads nothing on the host outside log
    steps (DTP-ViT, every 2nd step logged). (2 processes x K=4 under ZeRO-1, ZeRO-2, ZeRO-2 with the optimizer
    offloaded and FSDP2: tests/test_scale.py.)"""
    train(_synthetic(tmp_path, "m64", 64))
    train(_synthetic(tmp_path, "m16", 16))
    train(_synthetic(tmp_path, "plain", 16, "train.accum_negatives=false"))
    ref, acc, plain = (losses(tmp_path / n) for n in ("m64", "m16", "plain"))
    assert len(ref) == 3 and acc == pytest.approx(ref, rel=1e-5)
    assert plain[0] != pytest.approx(ref[0], rel=1e-3)
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("m16", "plain")]
    assert [s["contrastive_batch_size"] for s in summaries] == [64, 16]
    train(_synthetic(tmp_path, "syncs", 16, "train.count_host_syncs=true", "train.log_every_steps=2",
                     "train.timing_warmup_steps=1", "--max-steps", "5", model="DTP-ViT-micro-8-2x"))
    counts = json.loads((tmp_path / "syncs" / "summary.json").read_text())["host_syncs_by_step"]
    assert len(counts) == 5 and {s: n for s, n in counts.items() if s in ("3",) and n} == {}, counts  # 3: no log step


@pytest.mark.slow
def test_two_processes_with_negatives_in_bf16(tmp_path):
    """bf16 under ZeRO-2 (DeepSpeed's ``torch_autocast`` in bfloat16 over fp32 parameters), 2 ranks x K=4 x micro 8
    with negatives, follows one process of micro 64 under bf16 autocast to 2e-3 relative over three steps (a
    different reduction order of bf16 products; 2.5e-4 seen on CPU, bf16's own step is 2^-8 = 3.9e-3), while
    accumulation without negatives (a contrastive batch of 16: a loss near ln 16, not ln 64; one process, micro 16)
    is far outside that tolerance."""
    bf16 = ("--precision", "bf16")
    train(_synthetic(tmp_path, "ref", 64, *bf16))
    train(_synthetic(tmp_path, "plain", 16, *bf16, "train.accum_negatives=false"))
    accelerate_launch("zero2.yaml", _synthetic(tmp_path, "acc", 8, *bf16))
    ref, acc, plain = (losses(tmp_path / n) for n in ("ref", "acc", "plain"))
    assert len(ref) == 3 and acc == pytest.approx(ref, rel=2e-3)
    assert plain[0] != pytest.approx(ref[0], rel=2e-3)
