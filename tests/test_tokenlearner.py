"""TokenLearner v1.1 in the image tower (models/tokenlearner.py) on ViT-tiny-8: 32 px images, patch 8 -> 16 patches
+ the class token, 4 blocks, width 128."""
from __future__ import annotations

import pytest
import torch

import models
from models.blocks import set_grad_checkpointing
from models.tokenlearner import TokenLearnerV11, TokenLearnerVisionTransformer, apply_tokenlearner

S, AT, B = 4, 2, 3


def _model(seed: int = 0, tokens: int = S, at: int = AT):
    torch.manual_seed(seed)
    model = models.create_model("ViT-tiny-8", attention="math")
    apply_tokenlearner(model.visual, tokens=tokens, at=at)
    return model


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_weights_are_spatial_distributions():
    learner = TokenLearnerV11(128, S)
    x = torch.randn(B, 16, 128) * 3
    out, w = learner(x, return_weights=True)
    assert out.shape == (B, S, 128) and w.shape == (B, S, 16)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(B, S), rtol=0, atol=1e-6)
    torch.testing.assert_close(learner.weights(x), w, rtol=0, atol=0)
    assert not torch.allclose(w, torch.full_like(w, 1 / 16))  # the maps depend on the tokens


def test_learned_token_is_weighted_sum_of_input_tokens():
    learner = TokenLearnerV11(128, S)
    x = torch.randn(B, 16, 128)
    out, w = learner(x, return_weights=True)
    for b in range(B):
        for s in range(S):
            by_hand = sum(w[b, s, n] * x[b, n] for n in range(16))  # un-normalised input tokens
            torch.testing.assert_close(out[b, s], by_hand, rtol=1e-5, atol=1e-5)


def test_forward_shapes_token_counts_and_untouched_class_token():
    model = _model().eval()
    visual = model.visual
    assert isinstance(visual, TokenLearnerVisionTransformer)
    assert visual.tokens_per_block == [17, 17, 1 + S, 1 + S]
    assert visual.progress_metrics == {"tokens_last_block": "T"}
    entering = {}
    visual.transformer.resblocks[AT].register_forward_pre_hook(lambda m, args: entering.setdefault("x", args[0]))
    images = _images()
    with torch.no_grad():
        out = visual(images)
        x = visual._embeds(images)  # the same tower's blocks by hand, without the learner
        for blk in visual.transformer.resblocks[:AT]:
            x = blk(x)
        learned = visual.token_learner(x[:, 1:])
    assert out.shape == (B, model.visual.output_dim)
    stat = visual.last_stats["tokens_last_block"]
    assert isinstance(stat, torch.Tensor) and stat.dim() == 0 and float(stat) == 1 + S
    assert entering["x"].shape == (B, 1 + S, 128)
    assert torch.equal(entering["x"][:, 0], x[:, 0])  # the class token passes the learner unchanged
    assert torch.equal(entering["x"][:, 1:], learned)


def test_gradients_with_and_without_checkpointing():
    plain, ckpt = _model(), _model()
    assert set_grad_checkpointing(ckpt, 1)["image"] == 4
    images = _images()
    for model in (plain, ckpt):
        model.visual.train()
        model.visual(images).sum().backward()
    grads = {n: p.grad for n, p in plain.visual.named_parameters()}
    ckpt_grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in ckpt.visual.named_parameters()}
    assert grads.keys() == ckpt_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=0, atol=1e-6, msg=name)
    for name, p in plain.visual.token_learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, field", [
    ({"tokens": 0, "at": 2}, "tokenlearner tokens"),
    ({"tokens": 16, "at": 2}, "tokenlearner tokens"),
    ({"tokens": 4, "at": 0}, "tokenlearner at"),
    ({"tokens": 4, "at": 4}, "tokenlearner at"),
])
def test_bad_settings_raise(kwargs, field):
    visual = models.create_model("ViT-tiny-8", attention="math").visual
    with pytest.raises(ValueError, match=field):
        apply_tokenlearner(visual, **kwargs)


def test_not_a_vit_raises():
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_tokenlearner(torch.nn.Linear(2, 2), tokens=4, at=2)


def test_state_dict_round_trip():
    first, second = _model(seed=0).visual.eval(), _model(seed=5).visual.eval()
    assert any(k.startswith("token_learner.") for k in first.state_dict())
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(first(images), second(images))
        second.load_state_dict(first.state_dict(), strict=True)
        torch.testing.assert_close(second(images), first(images), rtol=0, atol=0)


def test_learner_follows_tower_device_and_dtype():
    meta = models.create_model("ViT-tiny-8", device="meta", attention="math").visual
    apply_tokenlearner(meta, tokens=S, at=AT)
    assert all(p.is_meta for p in meta.token_learner.parameters())
    torch.manual_seed(0)
    half = models.create_model("ViT-tiny-8", attention="math").visual.to(torch.bfloat16)
    apply_tokenlearner(half, tokens=S, at=AT)
    assert all(p.dtype == torch.bfloat16 for p in half.token_learner.parameters())
    with torch.no_grad():
        assert half(_images().to(torch.bfloat16)).dtype == torch.bfloat16
