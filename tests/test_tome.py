"""ToMe (:mod:`models.tome`): r = 0 is the plain ViT bit for bit, token counts follow N - r l with sizes summing to
N, merges are size-weighted, and activation checkpointing recomputes the same matching."""
from __future__ import annotations

import pytest
import torch

import models
from models.blocks import set_grad_checkpointing
from models.tome import apply_tome, bipartite_soft_matching, merge_wavg, tome_schedule

NAME = "ViT-tiny-8"  # 16 patches + the class token, 4 image blocks


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _model(r=None, attention: str = "math"):
    torch.manual_seed(0)
    model = models.create_model(NAME, attention=attention)
    if r is not None:
        apply_tome(model.visual, r)
    return model


@pytest.mark.parametrize("train", [False, True])
def test_r0_is_the_plain_vit_bit_for_bit(train):
    plain, tome = _model(), _model(0)
    outs = []
    for m in (plain, tome):
        m.visual.train(train)
        out = m.visual(_images())
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.visual.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_token_counts_follow_n_minus_r_per_block_and_sizes_sum_to_n():
    model = _model(3).eval()
    visual = model.visual
    assert visual.tokens_per_block == [17, 14, 11, 8]
    x, size, seen = visual._embeds(_images()), None, []
    with torch.no_grad():
        for blk, r in zip(visual.transformer.resblocks, visual.tome_r):
            seen.append(x.shape[1])
            x, size = blk(x, size=size, r=r)
            assert torch.equal(size.sum(dim=1), torch.full((3, 1), 17.0))  # every patch is somewhere, once
            assert torch.equal(size[:, 0], torch.ones(3, 1))  # the class token is never merged
        assert seen == visual.tokens_per_block and x.shape[1] == 17 - 3 * 4
        assert visual(_images()).shape == (3, models.architecture(NAME)["embed_dim"])
    assert visual.last_stats["tokens_last_block"].item() == 8


def test_schedule_caps_r_and_refuses_bad_values():
    assert tome_schedule(4, 8, 17) == [8, 4, 2, 1]  # at most (t - 1) // 2 per block: the class token + one remain
    assert tome_schedule(3, [4, 2, 0], 17) == [4, 2, 0]
    for bad in (-1, [1, 2]):
        with pytest.raises(ValueError, match="tome r"):
            tome_schedule(3, bad, 17)
    dtp = models.create_model("DTP-ViT-micro-8-2x")
    with pytest.raises(ValueError, match="ToMe needs an open_clip VisionTransformer"):
        apply_tome(dtp.visual, 1)


def test_merges_are_size_weighted_and_pick_the_most_similar_pair():
    # tokens 0 (class) .. 5; A = 0, 2, 4 and B = 1, 3, 5. Token 2's key equals token 3's: the one merge with r = 1
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0.2, 0.3, 1], [0.2, 0.3, 1], [1, -1, 0], [-1, 0, 0]]])
    x = torch.arange(12.0).view(1, 6, 2)
    size = torch.tensor([[[1.0], [1], [3], [1], [1], [1]]])
    merged, new_size = merge_wavg(bipartite_soft_matching(metric, 1), x, size)
    # unmerged A (0, 4) then B (1, 3 + 2, 5)
    expected = torch.stack([x[0, 0], x[0, 4], x[0, 1], (3 * x[0, 2] + x[0, 3]) / 4, x[0, 5]])[None]
    assert torch.allclose(merged, expected)
    assert new_size.flatten().tolist() == [1, 1, 1, 4, 1]


def test_proportional_attention_with_unit_sizes_changes_nothing_and_runs_on_sdpa():
    for attention in ("math", "sdpa"):
        torch.manual_seed(0)
        model = models.create_model(NAME + "-tome-r2-prop", attention=attention).eval()
        torch.manual_seed(0)
        ref = models.create_model(NAME + "-tome-r2", attention=attention).eval()
        with torch.no_grad():
            x = ref.visual._embeds(_images())
            blk = ref.visual.transformer.resblocks[0]
            ones = torch.ones(3, 17, 1)
            a, _ = blk(x, size=ones, r=2, prop_attn=True)  # log 1 = 0 added to every logit
            b, _ = blk(x, size=ones, r=2, prop_attn=False)
            assert torch.allclose(a, b, atol=1e-6)
            assert not torch.allclose(model.visual(_images()), ref.visual(_images()), atol=1e-4)  # sizes differ later


def test_gradients_with_and_without_checkpointing_agree():
    grads = []
    for every in (0, 1):
        model = _model(2)
        set_grad_checkpointing(model, every)
        model.visual.train()
        model.visual(_images()).square().sum().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.visual.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=0), n
