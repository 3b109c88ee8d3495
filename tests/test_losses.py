"""The memory-bounded (tiled) contrastive losses against open_clip's dense ``ClipLoss`` / ``SigLipLoss``: value and
every gradient (image features, text features, logit scale, logit bias), in one process and in 2-3 real processes
on gloo with gather-with-grad; the largest tensor they create; the config section and its errors; the SigLIP model
hook; real training runs with ``loss.kind=siglip`` and ``loss.impl=tiled``.

Tolerances: float64 inputs agree to 1e-10 relative (the math is the same; only the summation order differs);
float32 inputs to 1e-5 relative to the largest element of each compared tensor (sums over up to 36 columns
accumulated in another order, logits up to 100: a few ulps of fp32's 1.2e-7; measured at most 7.2e-7 in one
process).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import models
from harness.cli import build_config
from harness.config.job_config import LossConfig, to_dict
from harness.config.layout import batch_layout
from harness.core.errors import ConfigError
from harness.train.job import check_resume_compatible
from harness.train.losses import TiledClipLoss, TiledSigLipLoss, build_loss, tiled_clip_loss, tiled_siglip_loss
from tests.helpers import losses, read_jsonl, synthetic_args, train

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
B, D = 12, 16  # rows per rank, feature width
TILES = [1, 5, B, 64]  # one column per tile, a tile that divides no batch here, exactly B, more than all columns


def _features(world: int, dtype: torch.dtype, seed: int = 0):
    """L2-normalised image and text features of ``world * B`` samples, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return img, txt


def _run(loss_fn, image, text, log_scale, bias):
    """Loss and gradients w.r.t. (image, text, log of the scale, bias) of ``loss_fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, log_scale, bias) if t is not None]
    loss = loss_fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3] if bias is not None else None)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _assert_same(ref, got, dtype, what):
    names = ["loss", "d image", "d text", "d logit_scale", "d logit_bias"]
    for name, r, g in zip(names, ref, got):
        assert g is not None and g.shape == r.shape, f"{what}: {name} missing or of another shape"
        err = (g - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err <= TOL[dtype], f"{what}: {name} differs by {err:.2e} relative (tolerance {TOL[dtype]:.0e})"


def _compare_with_open_clip(rank: int, world: int, dtype: torch.dtype, log_scale_value: float):
    img, txt = _features(world, dtype)
    image, text = img[rank * B:(rank + 1) * B], txt[rank * B:(rank + 1) * B]
    log_scale = torch.tensor([log_scale_value], dtype=dtype)
    bias = torch.tensor([-3.0], dtype=dtype)
    clip_ref = _run(ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
                    image, text, log_scale, None)
    siglip_ref = _run(SigLipLoss(rank=rank, world_size=world), image, text, log_scale, bias)
    for tile in TILES:
        what = f"rank {rank}/{world} {dtype} s={math.exp(log_scale_value):.3g} tile {tile}"
        _assert_same(clip_ref, _run(TiledClipLoss(tile, rank, world), image, text, log_scale, None), dtype,
                     f"clip {what}")
        _assert_same(siglip_ref, _run(TiledSigLipLoss(tile, rank, world), image, text, log_scale, bias), dtype,
                     f"siglip {what}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("log_scale_value", [math.log(1 / 0.07), math.log(100.0)], ids=["s=14.3", "s=100"])
def test_tiled_equals_open_clip_in_one_process(dtype, log_scale_value):
    """World size 1: ``ClipLoss`` (no gather) and ``SigLipLoss`` with bias, at CLIP's initial and maximal scale."""
    _compare_with_open_clip(0, 1, dtype, log_scale_value)


def test_siglip_without_bias_equals_open_clip():
    img, txt = _features(1, torch.float64)
    log_scale = torch.tensor(2.3, dtype=torch.float64)  # a 0-dim scale works as well as shape [1]
    ref = _run(SigLipLoss(), img, txt, log_scale, None)
    _assert_same(ref, _run(TiledSigLipLoss(5), img, txt, log_scale, None), torch.float64, "siglip without bias")


def _dist_worker(rank: int, world: int, store_path: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        for dtype in (torch.float64, torch.float32):
            _compare_with_open_clip(rank, world, dtype, math.log(1 / 0.07))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_tiled_equals_open_clip_across_processes(tmp_path, world):
    """``world`` real processes on gloo: each rank's loss and its gradients (which, through gather-with-grad, carry
    the other ranks' losses) equal open_clip's ``ClipLoss(local_loss, gather_with_grad)`` and ``SigLipLoss``
    (neighbour exchange: one shift at 2 ranks, the bidirectional exchange at 3)."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


@pytest.mark.parametrize("offset", [0, 7, 24])
def test_rows_against_more_columns_with_a_label_offset(offset):
    """The interface gradient accumulation with negatives needs: ``B`` rows against ``N > B`` columns, the positive
    of row ``i`` at column ``offset + i``; checked against the losses' definitions written densely (cross-entropy
    of the ``[B, N]`` logits; ``-log sigmoid`` of the signed logits), including the columns' gradients."""
    n = 36
    img, txt = _features(3, torch.float64)
    rows_i, rows_t = img[:B] + 0.1, txt[:B] - 0.1  # rows need not be among the columns (cached features)
    s, bias = torch.tensor([10.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    labels = torch.arange(B) + offset

    def dense_clip(ri, rt, ci, ct, s):
        return (F.cross_entropy(s * ri @ ct.T, labels) + F.cross_entropy(s * rt @ ci.T, labels)) / 2

    def dense_siglip(ri, ct, s, b):
        z = -torch.ones(B, n, dtype=torch.float64)
        z[torch.arange(B), labels] = 1.0
        return -F.logsigmoid(z * (s * ri @ ct.T + b)).sum() / B

    def both(fn, *args):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        fn(*leaves).backward()
        return [fn(*leaves).detach()] + [a.grad for a in leaves]

    clip_args = (rows_i, rows_t, img[:n], txt[:n], s)
    ref = both(dense_clip, *clip_args)
    for tile in (5, 64):
        got = both(lambda ri, rt, ci, ct, s, tile=tile: tiled_clip_loss(ri, rt, ci, ct, s, offset, tile), *clip_args)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    ref = both(dense_siglip, rows_i, txt[:n], s, bias)
    got = both(lambda ri, ct, s, b: tiled_siglip_loss(ri, ct, s, b, offset, 5), rows_i, txt[:n], s, bias)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_refused():
    img, txt = _features(2, torch.float32)
    s = torch.tensor([10.0])
    with pytest.raises(ValueError, match="label_offset 13"):
        tiled_clip_loss(img[:B], txt[:B], img, txt, s, label_offset=13)  # rows 12..24 past 24 columns
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        tiled_siglip_loss(img[:B], txt, s, None, 0, tile_size=0)
    with pytest.raises(ValueError, match="features must be"):
        tiled_clip_loss(img[:B], txt[:B], img[:, :4], txt, s)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_rows_by_columns_matrix_is_created(kind):
    """Forward and backward of the tiled loss never create a tensor of ``B x N`` elements: the largest is a
    ``[B, tile]`` tile or an ``[N, d]`` gradient. The dense loss, probed the same way, does create one."""
    b, n_cols, d, tile = 64, 64, 8, 16  # B x N = 4096 > B x tile = 1024 > N x d = 512
    img = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    s, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    for impl, bound in (("tiled", b * tile), ("dense", None)):
        loss_fn = build_loss(LossConfig(kind=kind, impl=impl, tile_size=tile))
        with _LargestTensor() as probe:
            loss_fn(img, txt, s, bias if kind == "siglip" else None).backward()
        if bound is None:
            assert probe.largest >= b * n_cols, "the probe misses the dense loss's [B, N] logits"
        else:
            assert probe.largest <= bound, f"tiled {kind}: a tensor of {probe.largest} elements (B x N = {b * n_cols})"


def test_loss_section_refuses_bad_values():
    with pytest.raises(ConfigError, match=r"loss.kind: 'softmax' is not one of clip, siglip"):
        build_config(["loss.kind=softmax"])
    with pytest.raises(ConfigError, match=r"loss.impl: 'flash' is not one of dense, tiled"):
        build_config(["loss.impl=flash"])
    with pytest.raises(ConfigError, match=r"loss.tile_size: must be a positive integer"):
        build_config(["loss.tile_size=0"])
    cfg, _ = build_config(["loss.kind=siglip", "loss.impl=tiled", "loss.tile_size=256"])
    assert (cfg.loss.kind, cfg.loss.impl, cfg.loss.tile_size) == ("siglip", "tiled", 256)


def test_resume_refuses_another_loss_kind():
    """A SigLIP checkpoint does not resume as CLIP (the model has a bias, the trajectory differs); a checkpoint
    written before the ``loss`` section existed resumes as CLIP."""
    cfg, _ = build_config(["--config", "synthetic", "loss.kind=siglip"])
    layout = batch_layout(cfg.train, 1)
    meta = {"config": to_dict(cfg), "world_size": 1, "global_batch_size": layout.global_batch_size,
            "total_train_samples": 3200}
    check_resume_compatible(meta, cfg, layout, 3200)
    clip_cfg, _ = build_config(["--config", "synthetic"])
    with pytest.raises(ConfigError, match=r"loss.kind: checkpoint 'siglip' vs now 'clip'"):
        check_resume_compatible(meta, clip_cfg, layout, 3200)
    old = {**meta, "config": {k: v for k, v in to_dict(clip_cfg).items() if k != "loss"}}
    check_resume_compatible(old, clip_cfg, layout, 3200)
    with pytest.raises(ConfigError, match=r"loss.kind: checkpoint 'clip' vs now 'siglip'"):
        check_resume_compatible(old, cfg, layout, 3200)


@pytest.mark.parametrize("name", ["ViT-micro-8", "DTP-ViT-micro-8-2x"])
def test_siglip_model_carries_a_bias(name):
    """open_clip's ``--siglip`` initialisation (scale ln 10, bias -10), both parameters of shape [1] (ZeRO-3 and
    FSDP2 cannot shard 0-dim ones), and the bias in the output dict; a CLIP model has none."""
    model = models.create_model(name, siglip=True)
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(math.log(10))
    size = models.image_size(name)
    out = model(torch.randn(2, 3, size, size), torch.randint(1, 100, (2, models.context_length(name))))
    assert torch.equal(out["logit_bias"], model.logit_bias.detach()) and out["logit_bias"] is not model.logit_bias
    assert models.create_model(name).logit_bias is None


@pytest.mark.slow
def test_training_with_siglip_and_tiled_losses(tmp_path):
    """Real runs of ViT-micro-8 on synthetic data: for each loss kind, the tiled loss (tile 5, dividing neither
    the batch of 16 nor anything else) follows the dense loss's trajectory over 8 steps (1e-5 relative; measured
    ~1e-7); losses are finite and go down; under SigLIP the bias is trained. (2 processes under DeepSpeed ZeRO-3 and
    FSDP2 with the tiled SigLIP loss: tests/test_scale.py.)"""
    runs = {}
    for kind in ("clip", "siglip"):
        for impl in ("dense", "tiled"):
            name = f"{kind}-{impl}"
            train(synthetic_args(tmp_path, name, 16, f"loss.kind={kind}", f"loss.impl={impl}", "loss.tile_size=5"))
            runs[name] = losses(tmp_path / name)
            assert len(runs[name]) == 8 and all(math.isfinite(x) for x in runs[name])
            assert runs[name][-1] < runs[name][0], f"{name}: loss did not go down: {runs[name]}"
        assert runs[f"{kind}-tiled"] == pytest.approx(runs[f"{kind}-dense"], rel=1e-5)
    biases = [r["logit_bias"] for r in read_jsonl(tmp_path / "siglip-tiled" / "metrics.jsonl") if "loss" in r]
    assert biases[0] == pytest.approx(-10.0, abs=0.01) and biases[-1] != biases[0]
