"""The memory model's contrastive-loss terms against real allocations, the contrastive-batch column, the heat map's
data and the accumulation search of the fit probe (single process, no child jobs)."""
from __future__ import annotations

import json

import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from harness.core.units import GIB
from harness.distributed.tensor_memory import TensorMemoryTracker
from harness.fit.cells import Cell, ProbeOptions
from harness.fit.memory_model import MemoryModel, Setup, loss_bytes
from harness.fit.report import write_reports
from harness.fit.search import probe_args, search_cell
from harness.train.losses import tiled_clip_loss, tiled_siglip_loss


def _loss_peak(fn, rows: int, dim: int) -> int:
    """Tracked tensor bytes one forward + backward of ``fn`` adds above its ``[rows, dim]`` fp32 features."""
    torch.manual_seed(0)
    img, txt = torch.randn(rows, dim, requires_grad=True), torch.randn(rows, dim, requires_grad=True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    with TensorMemoryTracker() as tracker:
        base = tracker.live_bytes
        tracker.reset_peak()
        fn(img, txt, scale, bias).backward()
    return tracker.peak_bytes - base


LOSSES = {
    ("clip", "dense"): lambda i, t, s, b: ClipLoss()(i, t, s),
    ("siglip", "dense"): lambda i, t, s, b: SigLipLoss()(i, t, s, b),
    ("clip", "tiled"): lambda i, t, s, b: tiled_clip_loss(i, t, i, t, s, tile_size=128),
    ("siglip", "tiled"): lambda i, t, s, b: tiled_siglip_loss(i, t, s, b, tile_size=128),
}


@pytest.mark.parametrize("form", list(LOSSES))
@pytest.mark.parametrize("rows, dim", [(256, 64), (1024, 32)])
def test_loss_term_matches_the_losses_real_allocation(form, rows, dim):
    """``loss_bytes`` of each form equals (within 2%) the peak tensor bytes of that loss's forward and backward
    (open_clip's dense classes, our tiled functions) measured by the CPU tensor tracker."""
    measured = _loss_peak(LOSSES[form], rows, dim)
    predicted = loss_bytes(Setup("ddp", "fp32", 0, "sdpa", 1, *form, 128), dim, rows)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_dense_loss_grows_with_the_contrastive_batch_and_tiled_does_not():
    """At 8 ranks the dense CLIP logits are ``[B, 8 B]``: their bytes (16 B N) dominate; the tiled form holds
    ``[B, t]`` tiles, so its growth with the world size is only the gathered ``[N, d]`` features."""
    d, b = 512, 1024
    dense = [loss_bytes(Setup("fsdp", "bf16", 1, "sdpa", w), d, b) for w in (1, 8)]
    tiled = [loss_bytes(Setup("fsdp", "bf16", 1, "sdpa", w, "clip", "tiled", 256), d, b) for w in (1, 8)]
    assert dense[1] - dense[0] >= 16 * b * 7 * b  # the logits of 7 more ranks' columns
    assert tiled[1] - tiled[0] == pytest.approx(4 * d * 3 * 7 * b + 8 * 8 * b * d)  # column grads + gathered


def test_accumulation_caches_k_micro_batches_of_features():
    """With accumulation with negatives the searched value is K: the contrastive batch is K x micro x world, and
    each further micro batch adds its cached image and text features (fp32, d wide) on every rank plus its
    columns in the loss."""
    s = Setup("ddp", "bf16", 0, "sdpa", 2, "clip", "tiled", 128, micro=64)
    assert s.rows_cols(4) == (64, 4, 512)
    d = 128
    step = loss_bytes(s, d, 5) - loss_bytes(s, d, 4)
    n_step = 64 * 2  # columns per extra K
    assert step == pytest.approx(8 * n_step * d + 8 * 64 * d + 4 * d * 3 * n_step)


def test_contrastive_batch_of_a_cell():
    plain = Cell("fsdp", "bf16", 0, "sdpa", model="ViT-tiny-8", nodes=2, gpus_per_node=4)
    accum = Cell("fsdp", "bf16", 0, "sdpa", loss="clip", loss_impl="tiled", tile=256, micro=32, model="ViT-tiny-8",
                 nodes=2, gpus_per_node=4)
    assert plain.contrastive_batch(96) == 96 * 8
    assert accum.contrastive_batch(6) == 6 * 32 * 8
    assert plain.key == "ViT-tiny-8|stage=fsdp|bf16|ckpt=0|sdpa|2x4"  # the keys of older stores still match
    assert accum.key.endswith("|loss=clip-tiled-t256|accum-micro=32")


def test_probe_arguments_of_an_accumulation_cell(tmp_path):
    cell = Cell("fsdp", "bf16", 1, "sdpa", loss="siglip", loss_impl="tiled", tile=512, micro=16, model="ViT-tiny-8",
                nodes=1, gpus_per_node=2)
    args = probe_args(cell, 3, "measured", tmp_path / "run", ProbeOptions(out=str(tmp_path), steps=2))
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--micro-batch-size") == "16" and value("--global-batch-size") == str(3 * 16 * 2)
    assert value("--train-samples") == str(2 * 3 * 16 * 2) and "train.accum_negatives=true" in args
    assert {"loss.kind=siglip", "loss.impl=tiled", "loss.tile_size=512"} <= set(args)


@pytest.mark.parametrize("boundary", [1, 5, 37])
def test_accumulation_search_finds_the_largest_k(boundary):
    """Against a device whose memory grows linearly with K (fits up to ``boundary``), the search over K in steps
    of 1 ends at the boundary with K + 1 probed and failing."""
    model = MemoryModel("cpu")
    cell = Cell("ddp", "fp32", 0, "sdpa", loss="clip", loss_impl="tiled", tile=128, micro=32, model="ViT-micro-8",
                nodes=1, gpus_per_node=1)
    limit = 0.25 * GIB
    per_k = (limit - 0.05 * GIB) / boundary
    seen = []

    def probe(k):
        seen.append(k)
        return {"batch": k, "outcome": "fits" if k <= boundary else "oom", "reason": "",
                "peak_gib": (0.05 * GIB + per_k * k) / GIB if k <= boundary else None}

    rec = search_cell(cell, "measured", model, limit, 1, 4096, probe, [])
    assert rec["max_batch"] == boundary and rec["first_fail"] == boundary + 1
    assert rec["accum_steps"] == boundary and rec["contrastive_batch"] == boundary * 32
    assert boundary + 1 in seen and len(seen) == len(set(seen))


@pytest.mark.slow
def test_accum_search_runs_the_trainer_with_negatives(tmp_path):
    """``--accum-search 64 --max-accum 4`` on the real trainer (one CPU process under a budget): the cell records
    K = 4 accumulated micro batches of 64 and a contrastive batch of 256, and the probe's run really trained with
    that contrastive batch (its ``summary.json``)."""
    from harness.fit.probe import main

    out = tmp_path / "fit"
    code = main(["--models", "ViT-micro-8", "--stages", "ddp", "--precisions", "fp32", "--losses", "clip-tiled",
                 "--accum-search", "64", "--max-accum", "4", "--budget-gib", "0.25", "--out", str(out)])
    assert code == 0
    (cell,) = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert (cell["status"], cell["how"]) == ("fits", "measured")
    assert (cell["micro_batch"], cell["accum_steps"], cell["contrastive_batch"]) == (64, 4, 256)
    (summary,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")]
    assert summary["contrastive_batch_size"] == 256 and summary["micro_batch_size"] == 64
    assert "K=4 x micro 64 accumulated with negatives" in (out / "table.md").read_text()


def _record(cell: Cell, how: str, best: int, status: str = "fits"):
    micro, k, contrastive = cell.rows_cols(best)
    return {"cell": cell.key, "model": cell.model, "stage": cell.stage, "precision": cell.precision,
            "checkpointing": cell.checkpointing, "attention": cell.attention, "nodes": cell.nodes,
            "gpus_per_node": cell.gpus_per_node, "loss": cell.loss, "loss_impl": cell.loss_impl, "tile": cell.tile,
            "micro": cell.micro, "world": cell.world, "how": how, "status": status, "reason": "",
            "max_batch": best, "first_fail": best + 8, "probes": 0, "probes_total": 0, "micro_batch": micro,
            "accum_steps": k, "contrastive_batch": contrastive, "peak_gib": 0.2,
            "env": {"device": "cpu (test)", "device_memory_gib": 8.0, "budget_gib": 0.25, "probe_steps": 3}}


def test_table_and_heat_map_from_cell_records(tmp_path):
    """The table gains the contrastive batch; the heat map's data has one row per model x stage x precision x
    checkpointing (and accumulation), one column per nodes x GPUs per node, the number of every cell and its
    mark (M / E / P / S / !), and empty places where the sweep has no cell."""
    a = Cell("ddp", "bf16", 0, "sdpa", model="ViT-tiny-8", nodes=1, gpus_per_node=1)
    b = Cell("ddp", "bf16", 0, "sdpa", model="ViT-tiny-8", nodes=1, gpus_per_node=8)
    c = Cell("fsdp", "bf16", 1, "sdpa", model="ViT-tiny-8", nodes=1, gpus_per_node=8)
    d = Cell("fsdp", "bf16", 1, "sdpa", model="ViT-tiny-8", nodes=4, gpus_per_node=8)
    e = Cell("fsdp", "bf16", 1, "sdpa", micro=64, model="ViT-tiny-8", nodes=1, gpus_per_node=1)
    cells = [_record(a, "measured", 752), _record(b, "predicted", 624), _record(c, "emulated", 1696),
             _record(d, "scheduler-limit", 1600), _record(e, "measured", 12), _record(a, "measured", 768)]
    write_reports(cells, tmp_path, ProbeOptions(out=str(tmp_path), granularity=16, command="harness fit-probe x"))
    data = json.loads((tmp_path / "fit_heatmap.json").read_text())
    assert data["columns"] == ["1x1", "1x8", "4x8"]
    assert len(data["rows"]) == 3 and "contrastive @ micro 64" in data["rows"][2]
    assert data["values"] == [[768, 624, None], [None, 1696, 1600], [12 * 64, None, None]]
    assert data["marks"] == [["M", "P", ""], ["", "E", "S"], ["M", "", ""]]
    assert "budget 0.25 GiB" in data["title"] and (tmp_path / "fit_heatmap.png").stat().st_size > 10_000
    md = (tmp_path / "table.md").read_text()
    assert "| effective batch size | contrastive batch |" in md
    row = next(ln for ln in md.splitlines() if "| ✅ |" in ln and "accumulated" in ln)
    assert "| 64 | 1 | 1 | 768 | 768 |" in row and "K=12 x micro 64" in row


def test_activation_profile_follows_the_models_token_counts():
    """Read from the autograd graph: DTP-ViT's shortened blocks (1 + 11 static segment slots) keep 12/17 of what
    its full-length blocks (1 + 16 patches) keep, and the text tower (fp32 residual stream under bf16 autocast
    from the fp32 token embedding) keeps fp32 block inputs while the image tower's are bf16."""
    from harness.fit.activations import activation_profile

    prof = activation_profile("DTP-ViT-tiny-8-4x", "bf16", "sdpa")
    full, short = prof.blocks["image"][0], prof.blocks["image"][2]
    assert short.saved / full.saved == pytest.approx(12 / 17, rel=0.05)
    assert full.input == 17 * 128 * 2 and short.input == 12 * 128 * 2
    assert prof.blocks["text"][0].input == 16 * 128 * 4
