"""DTP-ViT: padding never leaks into valid tokens, gradients reach the boundary predictor, the binomial
prior matches a reference, numerics under half-precision autocast, nominal costs (fvcore GMACs)."""
from __future__ import annotations

import pytest
import torch
from open_clip import ClipLoss

import models
from models.dtp_vit import DTPConfig, DTPViT
from models.segments import binomial_boundary_loss, segment_pool

MICRO = "DTP-ViT-micro-8-2x"


def _tower(**kw) -> DTPViT:
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, shortened_layers=2, compression=4,
               output_dim=16)
    cfg.update(kw)
    return DTPViT(DTPConfig(**cfg))


@pytest.mark.parametrize("fused", [True, False])  # SDPA and timm's explicit softmax path
def test_padded_segments_never_change_valid_outputs(fused):
    tower = _tower().eval()
    for blk in tower.shortened_blocks:
        blk.attn.fused_attn = fused
    B, S, D = 3, 6, 32
    tokens = torch.randn(B, 1 + S, D)
    valid = torch.ones(B, 1 + S, dtype=torch.bool)
    valid[0, 4:] = False  # sample 0 has 3 segments, sample 1 has 5, sample 2 all 6
    valid[1, 6:] = False
    tokens = tokens * valid[..., None]
    out = tower.shortened_forward(tokens, valid)
    perturbed = tokens + 1e3 * torch.randn_like(tokens) * (~valid)[..., None]
    out2 = tower.shortened_forward(perturbed, valid)
    assert torch.equal(out[valid], out2[valid])
    assert torch.all(out[~valid] == 0)


def test_sample_output_does_not_depend_on_batch_padding():
    tower = _tower().eval()
    images = torch.randn(4, 3, 32, 32)
    batched = tower(images)
    alone = torch.cat([tower(images[i:i + 1]) for i in range(4)])
    assert torch.allclose(batched, alone, atol=1e-5)


@pytest.mark.parametrize("trained", [False, True])
def test_clip_loss_gradient_reaches_boundary_predictor(trained):
    model = models.create_model(MICRO)
    predictor = model.visual.boundary_predictor
    if trained:  # a predictor past its zero-initialised output layer: every weight gets gradient
        torch.nn.init.normal_(predictor[2].weight, std=0.1)
    images = torch.randn(4, 3, 16, 16)
    text = models.get_tokenizer(MICRO)(["a", "b c", "d e f", "g"])
    out = model(images, text)
    ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()  # no boundary loss
    layers = [predictor[0], predictor[2]] if trained else [predictor[2]]  # fresh: fc1 is behind a zero layer
    grads = [p.grad for layer in layers for p in layer.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_segment_pool_means_and_mask():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)  # tokens 0..5
    hard = torch.tensor([[0, 1, 0, 0, 0, 1.0]])  # segments {0,1}, {2,3,4,5}
    seg, valid, weights = segment_pool(x, hard, 3)  # three static slots, two used
    assert seg.shape == (1, 3, 2) and valid.tolist() == [[True, True, False]]
    assert torch.allclose(seg[0, 0], x[0, :2].mean(0)) and torch.allclose(seg[0, 1], x[0, 2:].mean(0))
    assert torch.all(seg[0, 2] == 0)
    assert weights.sum().item() == 6  # each token belongs to exactly one segment


def test_segments_past_the_static_bound_merge_into_the_last_slot():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    hard = torch.tensor([[1, 0, 1, 0, 1, 1.0]])  # four segments {0}, {1,2}, {3,4}, {5}
    seg, valid, _ = segment_pool(x, hard, 2)
    assert valid.tolist() == [[True, True]]
    assert torch.allclose(seg[0, 0], x[0, 0]) and torch.allclose(seg[0, 1], x[0, 1:].mean(0))


def test_segment_bound_from_the_target_rate():
    from models.segments import segment_bound

    assert [segment_bound(49, c) for c in (2, 4, 10)] == [39, 25, 14]  # mean + 4 binomial standard deviations
    assert segment_bound(4, 2) == 4 and segment_bound(49, 10, max_segments=60) == 49


@pytest.mark.parametrize("varlen", ["off", "torch"])
def test_forward_reads_nothing_on_the_host_and_attends_once_per_block(varlen):
    """No host read of a device value in a training or eval forward (the segment count is static), and one
    SDPA call per transformer block of the tower, padded or variable-length (no call per image)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func] = self.ops.get(func, 0) + 1
            return func(*args, **(kwargs or {}))

    tower = _tower(varlen=varlen)
    blocks = tower.cfg.pre_layers + tower.cfg.shortened_layers
    for train in (True, False):
        tower.train(train)
        with Count() as count:
            tower(torch.randn(5, 3, 32, 32))
        assert count.ops.get(torch.ops.aten._local_scalar_dense.default, 0) == 0
        assert count.ops.get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, 0) == blocks


def test_binomial_prior_matches_scipy_and_is_differentiable():
    from scipy.stats import binom

    b = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, 0, 1.0]], requires_grad=True)
    loss = binomial_boundary_loss(b, 0.25)
    ref = -(binom.logpmf(3, 8, 0.25) + binom.logpmf(1, 8, 0.25)) / 2 / 8
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert b.grad is not None and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("name", ["entropy", "unigram"])
def test_language_model_supervision_is_rejected_with_reason(name):
    with pytest.raises(ValueError, match=rf"dtp_cfg.boundary_loss: '{name}' is not supported for image towers: "
                                         r".*allowed: binomial"):
        DTPConfig(boundary_loss=name)


def test_eval_boundaries_are_deterministic_and_train_ones_stochastic():
    tower = _tower()
    images = torch.randn(2, 3, 32, 32)
    tower.eval()
    assert torch.equal(tower(images), tower(images))
    tower.train()
    torch.manual_seed(1)
    a = tower(images)
    torch.manual_seed(2)
    b = tower(images)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_boundary_logits_stay_finite_under_autocast(dtype):
    tower = _tower().train()
    with torch.no_grad():
        tower.boundary_predictor[2].weight.mul_(1e4)  # logits far beyond the half-precision range
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype):
        out = tower(images)
        loss = out.float().pow(2).mean() + tower.extra_losses()["boundary_loss"]
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)
    assert tower.last_stats["boundary_rate"].dtype == torch.float32


def test_nominal_boundaries_give_target_segment_counts():
    tower = _tower(image_size=224, patch_size=32, compression=10).eval()
    tower.boundary_mode = "nominal"
    tower(torch.randn(1, 3, 224, 224))
    assert tower.last_stats["segments_mean"].item() == 5  # 49 patches, every 10th + the last
    assert tower.last_stats["shortening_factor"].item() == pytest.approx(49 / 5)


@pytest.mark.parametrize("pooling", ["mean", "mean_no_cls", "cls", "last"])
def test_every_pooling_trains(pooling):
    tower = _tower(pooling=pooling).train()
    out = tower(torch.randn(3, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (3, 16) and torch.isfinite(out).all()


# Forward GMACs of the image tower: fvcore with attention counted, against the design notes' reference
# figures (hand counts / open_clip's model profile), not against this code's output.
@pytest.mark.parametrize("name, reference, tolerance", [
    ("ViT-B-32", 4.41, 0.02), ("ViT-B-16", 17.6, 0.02),
    ("DTP-ViT-B-32-2x", 2.7, 0.10), ("DTP-ViT-B-32-4x", 1.8, 0.10), ("DTP-ViT-B-32-10x", 1.25, 0.10),
])
def test_fvcore_gmacs_count_attention(name, reference, tolerance):
    from harness.tools.flops import model_gmacs

    gmacs = model_gmacs(name)["image_gmacs"]
    assert abs(gmacs - reference) / reference < tolerance, gmacs


def test_eval_boundary_count_matches_training_on_average():
    """Eval keeps training's expected boundary count; the 'threshold' rule collapses below rate 1/2."""
    tower = _tower(compression=4)
    with torch.no_grad():
        tower.boundary_predictor[2].bias.fill_(-1.1)  # sigmoid(-1.1) ~ 0.25: a 4x-like predictor
    images = torch.randn(64, 3, 32, 32)
    tower.train()
    train_sf = 0.0
    for _ in range(20):
        tower(images)
        train_sf += float(tower.last_stats["shortening_factor"]) / 20
    tower.eval()
    tower(images)
    eval_sf = float(tower.last_stats["shortening_factor"])
    assert abs(eval_sf - train_sf) / train_sf < 0.2, (eval_sf, train_sf)
    tower.cfg.eval_boundaries = "threshold"
    tower(images)
    assert float(tower.last_stats["shortening_factor"]) > 1.5 * train_sf


def test_packed_varlen_path_matches_padded_path():
    """Packing valid segments for a varlen kernel (flash-attn's on GPU) gives the padded path's outputs;
    here the kernel is the PyTorch reference, so the packing, per-image attention and unpacking are tested."""
    tower = _tower().eval()
    B, S, D = 3, 6, 32
    valid = torch.ones(B, 1 + S, dtype=torch.bool)
    valid[0, 3:] = False
    valid[1, 5:] = False
    tokens = torch.randn(B, 1 + S, D) * valid[..., None]
    tower.cfg.varlen = "off"
    padded = tower.shortened_forward(tokens, valid)
    tower.cfg.varlen = "torch"
    packed = tower.shortened_forward(tokens, valid)
    assert torch.allclose(packed[valid], padded[valid], atol=1e-5)
    assert torch.all(packed[~valid] == 0)
    tower.train()
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    tower(images).sum().backward()  # gradients flow through the packed path
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_harness_flops_cli_reports_nominal_and_measured(digits_dir, capsys):
    import json

    from harness.cli import main

    assert main(["flops", "--model", MICRO, "--model", "ViT-micro-8", "--images", str(digits_dir / "val"),
                 "--num-images", "4", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    dtp, vit = rows[MICRO], rows["ViT-micro-8"]
    assert dtp["unit"].startswith("GMACs") and dtp["measured_images"] == 4
    assert 0 < dtp["image_gmacs"] < vit["image_gmacs"]  # fewer tokens in the shortened layer
    assert dtp["shortening_factor_nominal"] == pytest.approx(2.0)
    assert "image_gmacs_measured" not in vit and vit["text_gmacs"] > 0
    assert main(["flops", "--model", "nope"]) == 2
