"""DynamicViT in the image tower (models/dynamicvit.py) on ViT-tiny-8: 32 px images, patch 8 -> 16 patches + the
class token, 4 blocks (stages before blocks 1, 2, 3), width 128."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.blocks import set_grad_checkpointing
from models.dynamicvit import (
    DynamicViTBlock,
    DynamicViTPredictor,
    DynamicViTVisionTransformer,
    apply_dynamicvit,
    batch_gather,
    keep_targets,
    ratio_loss,
    run_blocks,
    softmax_with_policy,
)

RHO, B, N0, D = 0.7, 3, 16, 128


def _model(seed: int = 0, keep_ratio: float = RHO, **kwargs):
    torch.manual_seed(seed)
    model = models.create_model("ViT-tiny-8", attention="math")
    apply_dynamicvit(model.visual, keep_ratio, **kwargs)
    return model


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _keep_sets(k: int, seed: int = 2) -> torch.Tensor:
    """``[B, k]`` distinct patch indices per sample, in a shuffled (not ascending) order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N0, generator=gen)[:k] for _ in range(B)])


def _policy(keep: torch.Tensor) -> torch.Tensor:
    """Hard policy ``[B, 1 + N0, 1]`` over the tokens: the class token and ``keep``'s patches 1, the rest 0."""
    policy = torch.zeros(B, 1 + N0, 1)
    policy[:, 0] = 1
    policy.scatter_(1, keep[..., None] + 1, 1.0)
    return policy


def test_masked_blocks_equal_gathered_blocks_on_kept_tokens():
    visual = _model().visual.train()
    blocks = list(visual.transformer.resblocks)
    assert all(isinstance(b, DynamicViTBlock) for b in blocks)
    keep = _keep_sets(7)
    idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep + 1], dim=1)  # class token first
    with torch.no_grad():
        x = run_blocks(blocks[:1], visual._embeds(_images()))  # [B, 17, D], before the first stage
        masked = run_blocks(blocks[1:], x, _policy(keep))  # dropped tokens stay, masked as keys
        gathered = run_blocks(blocks[1:], batch_gather(x, idx))  # dropped tokens removed, plain attention
    assert masked.shape == (B, 1 + N0, D) and gathered.shape == (B, 1 + 7, D)
    torch.testing.assert_close(batch_gather(masked, idx), gathered, rtol=0, atol=1e-5)
    for pool_type in ("tok", "avg"):  # pooling: the class token, or the mean over the kept patch tokens only
        visual.pool_type = pool_type
        with torch.no_grad():
            pooled_masked, _ = visual._pool_kept(masked, _policy(keep))
            pooled_gathered, _ = visual._pool_kept(gathered, None)
        torch.testing.assert_close(pooled_masked, pooled_gathered, rtol=0, atol=1e-5)
    # the dropped tokens do change the plain (unmasked) result: the mask is what makes the two agree
    with torch.no_grad():
        unmasked = run_blocks(blocks[1:], x)
    assert (batch_gather(unmasked, idx)[:, 0] - gathered[:, 0]).abs().max() > 1e-3


def test_softmax_with_policy_attends_to_kept_keys_and_self():
    scores = torch.randn(B, 2, 1 + N0, 1 + N0)
    policy = _policy(_keep_sets(5))
    probs = softmax_with_policy(scores, policy)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, 2, 1 + N0), rtol=0, atol=1e-5)
    allowed = (policy[:, None, None, :, 0] > 0) | torch.eye(1 + N0, dtype=torch.bool)  # [B, 1, N, N]
    assert probs.masked_select(~allowed.expand_as(probs)).max() < 1e-6  # eps / N only
    # every row (a dropped token's too) is the softmax over the kept keys and the token itself
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)
    dropped = (policy[0, :, 0] == 0).nonzero()[0, 0]
    assert probs[0, :, dropped, dropped].min() > 1e-3  # not masked away: its row stays defined
    ones = softmax_with_policy(scores, torch.ones(B, 1 + N0, 1))
    torch.testing.assert_close(ones, scores.softmax(-1), rtol=0, atol=1e-6)


def test_predictor_gets_gradient_from_training_forward():
    model = _model()
    visual = model.visual.train()
    text = torch.randint(0, 1000, (B, 16))
    out = model(_images(), text)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(B)
    contrastive = (torch.nn.functional.cross_entropy(logits, labels)
                   + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    extras = visual.extra_losses()
    assert set(extras) == {"ratio_loss"}
    # the policy in the attention softmax alone carries gradient to every predictor
    contrastive.backward(retain_graph=True)
    for s, predictor in enumerate(visual.predictors):
        for name, p in predictor.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (s, name)
    model.zero_grad()
    (contrastive + sum(extras.values())).backward()
    for s, predictor in enumerate(visual.predictors):
        for name, p in predictor.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (s, name)


def test_eval_token_counts_follow_tokens_per_block_and_training_keeps_shapes():
    visual = _model().visual
    assert isinstance(visual, DynamicViTVisionTransformer)
    assert visual.tokens_per_block == [17, 12, 8, 6]
    assert visual.dynamicvit_stages == [1, 2, 3]
    assert visual.progress_metrics == {"keep_ratio_last": "keep"}
    seen = []
    for blk in visual.transformer.resblocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    visual.eval()
    with torch.no_grad():
        out = visual(_images())
    assert out.shape == (B, visual.output_dim)
    assert seen == [(B, n, D) for n in visual.tokens_per_block]
    assert visual.extra_losses() == {}
    stats = visual.last_stats
    assert set(stats) == {"tokens_last_block", "keep_ratio_last"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert float(stats["tokens_last_block"]) == 6 and float(stats["keep_ratio_last"]) == 5 / 16
    seen.clear()
    visual.train()
    visual(_images())
    assert seen == [(B, 1 + N0, D)] * 4  # static shapes: dropped tokens stay in the sequence
    stats = visual.last_stats  # in training: the batch mean of the kept tokens at the last stage
    assert 1 <= float(stats["tokens_last_block"]) <= 1 + N0
    torch.testing.assert_close(stats["tokens_last_block"], 1 + N0 * stats["keep_ratio_last"])


def test_gradients_with_and_without_checkpointing():
    plain, ckpt = _model(), _model()
    assert set_grad_checkpointing(ckpt, 1)["image"] == 4
    images = _images()
    for model in (plain, ckpt):
        visual = model.visual.train()
        for blk in visual.transformer.resblocks:  # randomness inside the blocks too: attention dropout
            getattr(blk, "_checkpoint_wrapped_module", blk).attn.dropout = 0.1
        torch.manual_seed(123)  # the same Gumbel noise and dropout masks
        out = visual(images)
        (out.square().sum() + sum(visual.extra_losses().values())).backward()
    for name in ("tokens_last_block", "keep_ratio_last"):
        assert torch.equal(plain.visual.last_stats[name], ckpt.visual.last_stats[name])
    grads = {n: p.grad for n, p in plain.visual.named_parameters()}
    ckpt_grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in ckpt.visual.named_parameters()}
    assert grads.keys() == ckpt_grads.keys()
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(ckpt_grads[name], g, rtol=0, atol=1e-6, msg=name)
    # a different seed draws different decisions: the equality above is not vacuous
    torch.manual_seed(124)
    plain.visual(images)
    torch.manual_seed(123)
    first = plain.visual(images)
    torch.manual_seed(124)
    assert not torch.allclose(plain.visual(images), first)


def test_ratio_loss_zero_at_target_positive_otherwise():
    rho = 0.5  # targets 8, 4, 2 of 16 patches: exact fractions
    targets = keep_targets(rho)
    assert targets == [0.5, 0.25, 0.125]

    def policies(counts):
        out = []
        for k in counts:
            p = torch.zeros(B, N0, 1)
            p.scatter_(1, _keep_sets(k)[..., None], 1.0)
            out.append(p)
        return out

    assert float(ratio_loss(policies([8, 4, 2]), targets)) == 0.0
    off = ratio_loss(policies([9, 4, 2]), targets)
    torch.testing.assert_close(off, torch.tensor((1 / 16) ** 2 / 3))
    assert float(ratio_loss(policies([8, 4, 1]), targets)) > 0
    # per sample: one sample over, one under the target do not cancel
    mixed = policies([8, 4, 2])
    mixed[0][0] = 0
    mixed[0][0, :9] = 1
    mixed[0][1] = 0
    mixed[0][1, :7] = 1
    torch.testing.assert_close(ratio_loss(mixed, targets), torch.tensor(2 * (1 / 16) ** 2 / B / 3))


def test_ratio_weight_scales_extra_loss():
    losses = []
    for weight in (2.0, 0.5):
        visual = _model(ratio_weight=weight).visual.train()
        torch.manual_seed(7)
        visual(_images())
        losses.append(visual.extra_losses()["ratio_loss"])
    assert float(losses[0].detach()) > 0
    torch.testing.assert_close(losses[0], 4 * losses[1])


def test_predictor_shapes_and_global_feature_uses_kept_tokens():
    pred = DynamicViTPredictor(D)
    x = torch.randn(B, N0, D)
    policy = _policy(_keep_sets(6))[:, 1:]
    out = pred(x, policy)
    assert out.shape == (B, N0, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(B, N0))  # log-probabilities
    changed = x.clone()
    changed[policy[..., 0] == 0] += 5.0  # dropped tokens' features do not reach the kept tokens' scores
    again = pred(changed, policy)
    kept = policy[..., 0] > 0
    torch.testing.assert_close(again[kept], out[kept], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_training_stays_finite_when_every_patch_is_dropped(pool_type):
    visual = _model().visual.train()
    visual.pool_type = pool_type
    with torch.no_grad():
        visual.predictors[0].out_conv[4].bias.copy_(torch.tensor([-50.0, 50.0]))  # stage 1 drops every patch
    out = visual(_images())
    assert float(visual.last_stats["keep_ratio_last"]) == 0.0
    (out.square().sum() + sum(visual.extra_losses().values())).backward()
    assert torch.isfinite(out).all()
    for name, p in visual.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kwargs, field", [
    ({"keep_ratio": 0.0}, "dynamicvit keep_ratio"),
    ({"keep_ratio": 1.0}, "dynamicvit keep_ratio"),
    ({"keep_ratio": -0.3}, "dynamicvit keep_ratio"),
    ({"keep_ratio": 0.3}, "dynamicvit keep_ratio"),  # int(16 * 0.027) = 0 patches at the last stage
    ({"keep_ratio": 0.7, "ratio_weight": -1.0}, "dynamicvit ratio_weight"),
])
def test_bad_settings_raise(kwargs, field):
    visual = models.create_model("ViT-tiny-8", attention="math").visual
    with pytest.raises(ValueError, match=field):
        apply_dynamicvit(visual, **kwargs)


def test_too_few_blocks_and_not_a_vit_raise():
    visual = models.create_model("ViT-tiny-8", attention="math").visual
    visual.transformer.resblocks = visual.transformer.resblocks[:3]
    with pytest.raises(ValueError, match="dynamicvit blocks"):
        apply_dynamicvit(visual, RHO)
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_dynamicvit(torch.nn.Linear(2, 2), RHO)
    apply_dynamicvit(models.create_model("ViT-tiny-8", attention="math").visual, 0.4)  # int(16 * 0.064) = 1: fine


def test_state_dict_round_trip():
    first, second = _model(seed=0).visual.eval(), _model(seed=5).visual.eval()
    assert any(k.startswith("predictors.") for k in first.state_dict())
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(first(images), second(images))
        second.load_state_dict(first.state_dict(), strict=True)
        torch.testing.assert_close(second(images), first(images), rtol=0, atol=0)


def test_predictors_follow_tower_device_and_dtype():
    meta = models.create_model("ViT-tiny-8", device="meta", attention="math").visual
    apply_dynamicvit(meta, RHO)
    assert len(meta.predictors) == 3 and all(p.is_meta for p in meta.predictors.parameters())
    torch.manual_seed(0)
    half = models.create_model("ViT-tiny-8", attention="math").visual.to(torch.bfloat16)
    apply_dynamicvit(half, RHO)
    assert all(p.dtype == torch.bfloat16 for p in half.predictors.parameters())
    images = _images().to(torch.bfloat16)
    with torch.no_grad():
        assert half.eval()(images).dtype == torch.bfloat16
        assert half.train()(images).dtype == torch.bfloat16


# ---- distillation from a frozen full-token teacher (models.distill, models.pretrained.load_teacher)

def _student_and_teacher(tmp_path, keep_all: bool = False):
    """A DynamicViT student and the teacher :func:`load_teacher` reads from a checkpoint of the student's own ViT
    weights (so the two differ only in the student's token dropping). ``keep_all``: the predictors' last bias
    makes every Gumbel sample a keep."""
    from models.distill import attach_teacher
    from models.pretrained import load_teacher

    model = _model()
    base = {k: v for k, v in model.state_dict().items() if ".predictors." not in k}
    torch.save(base, tmp_path / "vit.pt")
    if keep_all:
        with torch.no_grad():
            for p in model.visual.predictors:
                p.out_conv[-2].bias.copy_(torch.tensor([50.0, -50.0]))
    teacher = load_teacher("ViT-tiny-8-dynamicvit-0.7", str(tmp_path / "vit.pt"), attention="math")
    attach_teacher(model.visual, teacher, embed_weight=0.5, token_weight=2.0)
    return model.train(), teacher


def test_distillation_terms_are_cosine_and_masked_token_mse():
    from models.distill import distill_losses

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(B, 8, generator=g), torch.randn(B, 8, generator=g)
    st, tt = torch.randn(B, N0, D, generator=g), torch.randn(B, N0, D, generator=g)
    keep = torch.rand(B, N0, generator=g) > 0.5
    policy = torch.cat([torch.ones(B, 1), keep.float()], dim=1)[..., None]
    embed, token = distill_losses(s, st, policy, t, tt)
    torch.testing.assert_close(embed, (2 - 2 * F.cosine_similarity(s, t, dim=-1)).mean())
    torch.testing.assert_close(token, F.mse_loss(st[keep], tt[keep]))  # the reference's boolean-mask MSE
    assert distill_losses(s, st, torch.zeros_like(policy), t, tt)[1] == 0  # nothing kept: 0, not NaN


def test_the_teacher_is_frozen_outside_the_module_tree_and_only_trains(tmp_path):
    model, teacher = _student_and_teacher(tmp_path)
    visual = model.visual
    assert set(model.state_dict()) == set(_model().state_dict())  # nothing of the teacher is saved
    assert not any(p is q for p in model.parameters() for q in teacher.parameters())  # nor optimised
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = visual(_images())
    extras = visual.extra_losses()
    assert set(extras) == {"ratio_loss", "distill_embed_loss", "distill_token_loss"}
    (out.square().sum() + sum(extras.values())).backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert visual.predictors[0].in_conv[1].weight.grad.abs().sum() > 0
    with torch.no_grad():  # accumulation's first pass: no teacher forward
        visual(_images())
    assert set(visual.extra_losses()) == {"ratio_loss"}
    model.eval()
    visual(_images())
    assert visual.extra_losses() == {}


def test_a_student_keeping_every_token_matches_its_own_teacher(tmp_path):
    """Student and teacher share the ViT weights and every token is kept: both terms vanish (up to the policy
    softmax's eps); the token term's weight is applied."""
    model, _ = _student_and_teacher(tmp_path, keep_all=True)
    model.visual(_images())
    extras = model.visual.extra_losses()
    assert extras["distill_embed_loss"] < 1e-6 and extras["distill_token_loss"] < 1e-6
    model2, _ = _student_and_teacher(tmp_path)  # tokens dropped: the student's features move away from the teacher's
    model2.visual(_images())
    assert model2.visual.extra_losses()["distill_token_loss"] > 1e-4


def test_a_teacher_of_another_architecture_or_incomplete_is_refused(tmp_path):
    from models.distill import attach_teacher
    from models.pretrained import PretrainedError, load_teacher

    model = _model()
    torch.save(models.create_model("ViT-micro-8").state_dict(), tmp_path / "micro.pt")
    with pytest.raises(PretrainedError, match="another architecture"):
        load_teacher("ViT-tiny-8-dynamicvit-0.7", str(tmp_path / "micro.pt"), device="meta")
    state = {k: v for k, v in models.create_model("ViT-tiny-8").state_dict().items() if "resblocks.3." not in k}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(PretrainedError, match="lacks 12 image-tower weights"):
        load_teacher("ViT-tiny-8-dynamicvit-0.7", str(tmp_path / "partial.pt"), device="meta")
    with pytest.raises(ValueError, match="only DynamicViT models"):
        load_teacher("ViT-tiny-8-tome-r2", str(tmp_path / "micro.pt"))
    with pytest.raises(ValueError, match="differ from the student"):
        attach_teacher(model.visual, models.create_model("ViT-micro-8").visual)
    with pytest.raises(ValueError, match="loss.distill_token_weight"):
        attach_teacher(model.visual, models.create_model("ViT-tiny-8").visual, token_weight=-1)
