"""Fit probe: the search, the store and the table, and real sweeps on this CPU with a memory budget (child
process groups, out-of-memory at the budget, rank agreement, kill and resume, emulated world sizes)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.fitcells import Cell
from harness.fitsearch import doubling_probes, how_obtained, search_cell
from harness.fitstore import ResultsStore
from harness.memmodel import GIB, MemoryModel
from tests.conftest import REPO, read_jsonl

HARNESS = str(Path(sys.executable).with_name("harness"))
BUDGET = 0.25  # GiB per probe process


def fit_probe(args, env=None, timeout=1800, check=True) -> subprocess.CompletedProcess:
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([HARNESS, "fit-probe", *args], env=full, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"fit-probe failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# ----------------------------------------------------------------------------------------------- the search


@pytest.mark.parametrize("boundary", [8, 136, 1000, 2392])
def test_search_brackets_the_boundary_at_the_granularity(boundary):
    """Against a device whose memory grows linearly with the batch (fits up to ``boundary``), the search
    ends with the boundary, having probed both it and the next multiple of the granularity."""
    model = MemoryModel("cpu")
    cell = Cell("ViT-micro-8", "ddp", "fp32", 0, "sdpa", 1, 1)
    limit = 0.25 * GIB
    per_sample = (limit - 0.03 * GIB) / boundary  # hits the limit just past `boundary`
    seen = []

    def probe(b):
        seen.append(b)
        peak = 0.03 * GIB + per_sample * b
        return {"batch": b, "outcome": "fits" if b <= boundary else "oom", "reason": "",
                "peak_gib": peak / GIB if b <= boundary else None}

    rec = search_cell(cell, "measured", model, limit, 8, 1 << 16, probe, [])
    assert rec["max_batch"] == boundary and rec["first_fail"] == boundary + 8 and rec["status"] == "fits"
    assert boundary in seen and boundary + 8 in seen and len(seen) == len(set(seen)) == rec["probes"]


def test_search_reuses_probes_of_an_interrupted_run():
    model, cell = MemoryModel("cpu"), Cell("ViT-micro-8", "ddp", "fp32", 0, "sdpa", 1, 1)
    known = [{"batch": 96, "outcome": "fits", "reason": "", "peak_gib": None},
             {"batch": 112, "outcome": "oom", "reason": "", "peak_gib": None}]
    ran = []
    rec = search_cell(cell, "measured", model, GIB, 8, 1 << 16,
                      lambda b: ran.append(b) or {"batch": b, "outcome": "fits" if b <= 96 else "oom",
                                                  "reason": "", "peak_gib": None}, known)
    assert rec["max_batch"] == 96 and rec["first_fail"] == 104 and ran == [104] and rec["probes_total"] == 3


def test_doubling_replay_counts_probes():
    # 8, 16, 32, 64 fit, 128 fails; bisect 96 (fits), 112 (fails), 104 (fits) -> boundary 104
    assert doubling_probes(104, 112, 8, 1 << 16) == 8
    assert doubling_probes(8, 16, 8, 1 << 16) == 2


def test_cells_beyond_this_machine_are_emulated_or_predicted():
    assert how_obtained(Cell("ViT-B-32", "3", "bf16", 0, "sdpa", 1, 2), 2, "local", None) == "measured"
    assert how_obtained(Cell("ViT-B-32", "3", "bf16", 0, "sdpa", 1, 8), 2, "local", None) == "emulated"
    assert how_obtained(Cell("ViT-B-32", "fsdp", "bf16", 0, "sdpa", 4, 8), 2, "local", None) == "emulated"
    assert how_obtained(Cell("ViT-B-32", "ddp", "bf16", 0, "sdpa", 1, 8), 2, "local", None) == "predicted"
    assert how_obtained(Cell("ViT-B-32", "2", "bf16", 0, "sdpa", 8, 8), 8, "slurm", 4) == "scheduler-limit"


def test_store_ignores_a_cut_record_and_notices_a_changed_environment(tmp_path):
    env = {"device": "cpu", "torch": "2.15.0", "budget_gib": 0.25}
    store = ResultsStore(tmp_path, env)
    store.add_probe({"cell": "c1", "batch": 8, "outcome": "fits"})
    store.add_cell({"cell": "c1", "max_batch": 8})
    with open(store.probes_path, "a") as f:
        f.write('{"cell": "c1", "batch": 16, "outc')  # a kill in the middle of a write
    probes, cells, notes = store.load()
    assert [p["batch"] for p in probes["c1"]] == [8] and "c1" in cells and not notes
    before = store.probes_path.read_text()
    probes, cells, notes = ResultsStore(tmp_path, {**env, "torch": "2.16.0"}).load()
    assert not probes and not cells
    assert len(notes) == 1 and "torch: '2.15.0' -> '2.16.0'" in notes[0] and "probed again" in notes[0]
    assert store.probes_path.read_text() == before  # nothing written is lost


@pytest.mark.parametrize("args, message", [
    (["--models", "ViT-Q-99"], r"--models: 'ViT-Q-99' not allowed; allowed: .*ViT-B-32"),
    (["--models", "ViT-micro-8", "--stages", "4"], r"--stages: '4' not allowed; allowed: ddp, 0, 1, 2, 3"),
    (["--models", "ViT-micro-8", "--gpus-per-node", "0"], r"--gpus-per-node: expected comma-separated integers >= 1"),
    (["--models", "ViT-micro-8", "--gpus-per-node", "two"], r"--gpus-per-node: expected comma-separated integers"),
    (["--models", "ViT-micro-8", "--nodes", "1,-2"], r"--nodes: expected comma-separated integers >= 1"),
    (["--models", "ViT-micro-8", "--budget-gib", "100000"], r"--budget-gib: 100000 GiB is more than the cpu"),
    (["--models", "ViT-micro-8", "--budget-gib", None], r"--budget-gib: required without a GPU"),
    (["--models", "ViT-micro-8", "--steps", "1"], r"--steps: must be >= 2"),
])
def test_bad_input_is_refused_before_any_probe(tmp_path, capsys, args, message):
    from harness.fitprobe import main

    if None in args:
        args = args[:args.index("--budget-gib")]
    elif "--budget-gib" not in args:
        args = args + ["--budget-gib", "0.25"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- real CPU sweeps


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two models x two stages, measured on 1 process; FSDP on 4 ranks emulated, DDP on 4 ranks predicted."""
    out = tmp_path_factory.mktemp("fit") / "sweep"
    proc = fit_probe(["--models", "ViT-micro-8,ViT-tiny-8", "--stages", "ddp,fsdp", "--precisions", "fp32",
                      "--gpus-per-node", "1,4", "--budget-gib", str(BUDGET), "--out", str(out)])
    return out, proc.stdout


@pytest.mark.slow
def test_cpu_probe_finds_the_boundary_exactly(sweep):
    """For each measured cell the store holds a probe at the found batch that fits (peak within the budget)
    and one at the next granularity step that ran out of memory at the budget."""
    out, _ = sweep
    cells = {c["cell"]: c for c in read_jsonl(out / "cells.jsonl")}
    probes = {(p["cell"], p["batch"]): p for p in read_jsonl(out / "probes.jsonl")}
    measured = [c for c in cells.values() if c["how"] == "measured"]
    assert {(c["model"], c["stage"]) for c in measured} == {(m, s) for m in ("ViT-micro-8", "ViT-tiny-8")
                                                            for s in ("ddp", "fsdp")}
    for c in measured:
        fit, fail = probes[(c["cell"], c["max_batch"])], probes[(c["cell"], c["max_batch"] + 8)]
        assert fit["outcome"] == "fits" and 0 < fit["peak_gib"] <= BUDGET and fit["peak_kind"] == "cpu_tensor_peak"
        assert fail["outcome"] == "oom" and "CPU memory budget exceeded" in fail["reason"]
        assert fit["step_time_s"] > 0 and fit["samples_per_s"] > 0


@pytest.mark.slow
def test_every_cell_gets_a_number_and_says_how(sweep):
    out, _ = sweep
    cells = {(c["model"], c["stage"], c["gpus_per_node"]): c for c in read_jsonl(out / "cells.jsonl")}
    assert len(cells) == 8
    for model in ("ViT-micro-8", "ViT-tiny-8"):
        assert cells[(model, "fsdp", 4)]["how"] == "emulated" and cells[(model, "fsdp", 4)]["max_batch"] > 0
        assert cells[(model, "ddp", 4)]["how"] == "predicted" and cells[(model, "ddp", 4)]["max_batch"] > 0
        assert cells[(model, "ddp", 4)]["probes_total"] == 0
    emulated = [p for p in read_jsonl(out / "probes.jsonl") if p["how"] == "emulated"]
    assert emulated and all(p["ranks"] == {"0": p["ranks"]["0"]} for p in emulated)  # one process, rank 0 of 4


@pytest.mark.slow
def test_memory_model_predicts_every_measured_probe_within_10_percent(sweep):
    """Every measured probe's peak is predicted within 10% by the model calibrated on the *other* cells
    (what it would have said before probing the cell), and by the model calibrated on all probes."""
    out, stdout = sweep
    report = json.loads((out / "memory_model.json").read_text())
    assert len(report["probes"]) >= 8
    assert report["max_abs_cross_error"] <= 0.10, report["max_abs_cross_error"]
    assert report["max_abs_error"] <= 0.10, report["max_abs_error"]
    assert all(abs(p["cross_error"]) <= 0.10 for p in report["probes"])
    assert "Memory model against" in stdout and "calibrated on the other cells only" in stdout


@pytest.mark.slow
def test_calibrated_search_needs_at_most_3_probes_per_cell(sweep):
    """Cells that start from a calibrated memory model need <= 3 probes on average; the plain doubling
    search, replayed on the same boundaries, needs more (both printed)."""
    out, stdout = sweep
    cells = [c for c in read_jsonl(out / "cells.jsonl") if c["how"] in ("measured", "emulated")]
    calibrated = [c["probes_total"] for c in cells if c["calibrated_start"]]
    assert calibrated and sum(calibrated) / len(calibrated) <= 3.0, calibrated
    doubling = [c["doubling_probes"] for c in cells]
    assert sum(doubling) / len(doubling) > sum(c["probes_total"] for c in cells) / len(cells)
    assert re.search(r"Probes per cell: .* a plain doubling search .* would need", stdout)


@pytest.mark.slow
def test_table_markdown_csv_and_plot(sweep):
    out, _ = sweep
    md = (out / "table.md").read_text()
    header = ("| model | batch size | # nodes | # GPUs per node | effective batch size | contrastive batch | cluster | "
              "partition | fit? | stage | precision | checkpointing | attention | loss | device (memory) | "
              "peak alloc GiB | reserved GiB | step time (s) | samples/s | status | how |")
    assert header in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ViT-")]
    assert len(rows) == 16  # a fitting and a failing row per cell
    assert any("| ✅ |" in r and r.endswith("| measured |") for r in rows)
    assert any("❌ (OOM)" in r for r in rows) and any(r.endswith("| emulated |") for r in rows)
    assert any("✅ (predicted)" in r for r in rows)
    assert (out / "table.csv").read_text().count("\n") == 17
    assert (out / "peak_memory_vs_batch.png").stat().st_size > 10_000
    heat = json.loads((out / "fit_heatmap.json").read_text())  # 2 models x 2 stages, 1 and 4 GPUs
    assert heat["columns"] == ["1x1", "1x4"] and len(heat["rows"]) == 4
    assert {m for row in heat["marks"] for m in row} == {"M", "E", "P"}


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_cells(tmp_path):
    out = tmp_path / "sweep"
    args = ["--models", "ViT-micro-8", "--stages", "ddp,fsdp", "--precisions", "fp32", "--budget-gib", str(BUDGET),
            "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([HARNESS, "fit-probe", *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    cells = out / "cells.jsonl"
    while not (cells.is_file() and cells.read_text().count("\n") >= 1):
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.5)
    time.sleep(3)  # into the second cell's first probe
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    first = read_jsonl(cells)[0]
    probes_before = [p for p in read_jsonl(out / "probes.jsonl") if p["cell"] == first["cell"]]
    proc = fit_probe(args)
    assert "1 already done" in proc.stdout
    probes_after = [p for p in read_jsonl(out / "probes.jsonl") if p["cell"] == first["cell"]]
    assert probes_after == probes_before  # the finished cell was not probed again
    done = {c["cell"] for c in read_jsonl(cells)}
    assert len(done) == 2 and first["cell"] in done


@pytest.mark.slow
def test_one_rank_out_of_memory_is_agreed_and_the_sweep_goes_on(tmp_path):
    """Rank 1 gets half the budget (test hook): probes where only it runs out of memory end with the cell's
    outcome OOM agreed from the ranks' statuses, within seconds (no hang), and the next cell is probed."""
    out = tmp_path / "sweep"
    fit_probe(["--models", "ViT-micro-8", "--stages", "fsdp", "--precisions", "fp32", "--gpus-per-node", "2,1",
               "--budget-gib", str(BUDGET), "--granularity", "64", "--timeout", "300", "--out", str(out)],
              env={"HARNESS_MEMORY_BUDGET_SCALE_RANK": "1:0.5"})
    probes = [p for p in read_jsonl(out / "probes.jsonl") if p["cell"].endswith("1x2")]
    one_rank = [p for p in probes if p["outcome"] == "oom" and p["ranks"].get("1") == "oom"
                and p["ranks"].get("0") != "oom"]
    assert one_rank, probes
    assert all(p["seconds"] < 120 and p["returncode"] is not None for p in one_rank)
    assert all(p["reason"].startswith("rank 1:") for p in one_rank)
    cells = read_jsonl(out / "cells.jsonl")
    assert [c["gpus_per_node"] for c in cells] == [2, 1] and all(c["max_batch"] > 0 for c in cells)
    assert cells[0]["max_batch"] < cells[1]["max_batch"]  # rank 1's half budget bounds the 2-rank cell


@pytest.mark.slow
def test_merge_puts_sweeps_into_one_table(sweep, tmp_path):
    out, _ = sweep
    other = tmp_path / "node1"
    fit_probe(["--models", "ViT-micro-8", "--stages", "0", "--precisions", "fp32", "--budget-gib", str(BUDGET),
               "--granularity", "256", "--out", str(other)])
    merged = tmp_path / "merged"
    proc = fit_probe(["--merge", str(out), str(other), "--out", str(merged)])
    rows = [ln for ln in (merged / "table.md").read_text().splitlines() if ln.startswith("| ViT-")]
    assert len(rows) == 18 and any("| ZeRO-0 |" in r for r in rows) and "ZeRO-0" in proc.stdout
    assert (out / "cells.jsonl").read_text().count("\n") == 8  # the sources are untouched


@pytest.mark.slow
def test_report_renders_the_store_again(sweep, tmp_path):
    """``--report`` rebuilds the table from the store alone (a copy of it, so the sweep's own files stay as
    they were): the same rows, the sweep's command kept, the re-rendering command named, and the memory model
    calibrated on the same measured probes (same errors)."""
    out, _ = sweep
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("cells.jsonl", "probes.jsonl"):
        (copy / name).write_text((out / name).read_text())
    proc = fit_probe(["--report", "--out", str(copy)])
    original, again = (out / "table.md").read_text(), (copy / "table.md").read_text()
    rows = lambda md: [ln for ln in md.splitlines() if ln.startswith("| ViT-")]  # noqa: E731
    assert rows(again) == rows(original) and rows(again)
    command = again.splitlines()[2]
    assert command.startswith("`harness fit-probe --models ViT-micro-8,ViT-tiny-8") and "re-rendered with" in command
    assert json.loads((copy / "memory_model.json").read_text()) == json.loads((out / "memory_model.json").read_text())
    assert rows(again)[0] in proc.stdout
