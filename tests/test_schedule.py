"""LR schedule keyed on samples: warm-up, cosine, and independence from how the samples are batched."""
import math

import pytest
import torch

from harness.components.lr_schedule import build_scheduler, lr_factor


def test_warmup_rises_linearly_then_cosine_reaches_floor():
    total, warm, g = 10_000, 1_000, 100
    warmup = [lr_factor(s, total, warm, g) for s in range(0, warm, g)]
    assert warmup[0] == pytest.approx(0.1) and warmup[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(warmup, warmup[1:]))
    decay = [lr_factor(s, total, warm, g, min_lr_ratio=0.1) for s in range(warm, total + g, g)]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    mid = lr_factor(warm + (total - warm) // 2, total, warm, g)
    assert mid == pytest.approx(0.5)


def test_same_samples_same_lr_whatever_the_batch():
    # two global batches, same point of the run in samples -> same LR
    assert lr_factor(5_000, 20_000, 2_000, 64) == lr_factor(5_000, 20_000, 2_000, 256)


def test_scheduler_state_round_trip_continues_exactly():
    p = torch.nn.Parameter(torch.zeros(1))
    make = lambda: torch.optim.SGD([p], lr=0.5)
    opt = make()
    sched = build_scheduler(opt, total_samples=6_400, warmup_samples=640, global_batch_size=64)
    lrs = []
    for _ in range(30):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    opt2 = make()
    sched2 = build_scheduler(opt2, total_samples=6_400, warmup_samples=640, global_batch_size=64)
    state = None
    for _ in range(12):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3 = make()
    sched3 = build_scheduler(opt3, total_samples=6_400, warmup_samples=640, global_batch_size=64)
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(18):
        opt3.step()
        sched3.step()
        resumed.append(opt3.param_groups[0]["lr"])
    assert resumed == lrs[12:]
    assert not math.isclose(lrs[0], lrs[-1])
