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

from harness.core import hooks
from harness.core.units import GIB
from harness.fit.cells import Cell
from harness.fit.memory_model import MemoryModel
from harness.fit.search import doubling_probes, how_obtained, search_cell
from harness.fit.store import ResultsStore
from tests.helpers import REPO, child_env, in_process, read_jsonl

HARNESS = str(Path(sys.executable).with_name("harness"))
BUDGET = 0.25  # GiB per probe process


def fit_probe(args, env=None) -> subprocess.CompletedProcess:
    """``harness fit-probe ARGS`` in this process (its probes are child processes, as always)."""
    from harness.cli import main

    return in_process(main, ["fit-probe", *args], env=env)


# ----------------------------------------------------------------------------------------------- the search


@pytest.mark.parametrize("boundary", [8, 136, 1000, 2392])
def test_search_brackets_the_boundary_at_the_granularity(boundary):
    """Against a device whose memory grows linearly with the batch (fits up to ``boundary``), the search
    ends with the boundary, having probed both it and the next multiple of the granularity."""
    model = MemoryModel("cpu")
    cell = Cell("ddp", "fp32", 0, "sdpa", model="ViT-micro-8", nodes=1, gpus_per_node=1)
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
    model, cell = MemoryModel("cpu"), Cell("ddp", "fp32", 0, "sdpa", model="ViT-micro-8", nodes=1, gpus_per_node=1)
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
    b32 = lambda stage, nodes, gpus: Cell(stage, "bf16", 0, "sdpa", model="ViT-B-32", nodes=nodes, gpus_per_node=gpus)
    assert how_obtained(b32("3", 1, 2), 2, "local", None) == "measured"
    assert how_obtained(b32("3", 1, 8), 2, "local", None) == "emulated"
    assert how_obtained(b32("fsdp", 4, 8), 2, "local", None) == "emulated"
    assert how_obtained(b32("ddp", 1, 8), 2, "local", None) == "predicted"
    assert how_obtained(b32("2", 8, 8), 8, "slurm", 4) == "scheduler-limit"


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
    from harness.fit.probe import main

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
    """DDP and FSDP2 measured on 1 process; FSDP on 4 ranks emulated, DDP on 4 ranks predicted."""
    out = tmp_path_factory.mktemp("fit") / "sweep"
    proc = fit_probe(["--models", "ViT-micro-8", "--stages", "ddp,fsdp", "--precisions", "fp32",
                      "--gpus-per-node", "1,4", "--budget-gib", str(BUDGET), "--out", str(out)])
    return out, proc.stdout


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """A sweep of another model killed (SIGKILL to its process group) in its second cell's first probe, then run again
    with the same arguments: ``(store, the probes of the first cell before the kill, the second run's output)``."""
    out = tmp_path_factory.mktemp("fit") / "resumed"
    args = ["--models", "ViT-tiny-8", "--stages", "ddp", "--checkpointing", "0,1", "--precisions", "fp32",
            "--budget-gib", str(BUDGET), "--out", str(out)]
    job = subprocess.Popen([HARNESS, "fit-probe", *args], env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
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
    return out, probes_before, fit_probe(args).stdout


@pytest.mark.slow
def test_cpu_probe_finds_the_boundary_exactly(sweep):
    """For each measured cell the store holds a probe at the found batch that fits (peak within the budget)
    and one at the next granularity step that ran out of memory at the budget."""
    out, _ = sweep
    cells = {c["cell"]: c for c in read_jsonl(out / "cells.jsonl")}
    probes = {(p["cell"], p["batch"]): p for p in read_jsonl(out / "probes.jsonl")}
    measured = [c for c in cells.values() if c["how"] == "measured"]
    assert {(c["model"], c["stage"]) for c in measured} == {("ViT-micro-8", "ddp"), ("ViT-micro-8", "fsdp")}
    for c in measured:
        fit, fail = probes[(c["cell"], c["max_batch"])], probes[(c["cell"], c["max_batch"] + 8)]
        assert fit["outcome"] == "fits" and 0 < fit["peak_gib"] <= BUDGET and fit["peak_kind"] == "cpu_tensor_peak"
        assert fail["outcome"] == "oom" and "CPU memory budget exceeded" in fail["reason"]
        assert fit["step_time_s"] > 0 and fit["samples_per_s"] > 0


@pytest.mark.slow
def test_every_cell_gets_a_number_and_says_how(sweep):
    out, _ = sweep
    cells = {(c["model"], c["stage"], c["gpus_per_node"]): c for c in read_jsonl(out / "cells.jsonl")}
    assert len(cells) == 4
    model = "ViT-micro-8"
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
    assert len(report["probes"]) >= 4
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
    assert len(rows) == 8  # a fitting and a failing row per cell
    assert any("| ✅ |" in r and r.endswith("| measured |") for r in rows)
    assert any("❌ (OOM)" in r for r in rows) and any(r.endswith("| emulated |") for r in rows)
    assert any("✅ (predicted)" in r for r in rows)
    assert (out / "table.csv").read_text().count("\n") == 9
    assert (out / "peak_memory_vs_batch.png").stat().st_size > 10_000
    heat = json.loads((out / "fit_heatmap.json").read_text())  # 2 stages, 1 and 4 GPUs
    assert heat["columns"] == ["1x1", "1x4"] and len(heat["rows"]) == 2
    assert {m for row in heat["marks"] for m in row} == {"M", "E", "P"}


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_cells(resumed_sweep):
    out, probes_before, stdout = resumed_sweep
    assert "1 already done" in stdout
    first = read_jsonl(out / "cells.jsonl")[0]
    probes_after = [p for p in read_jsonl(out / "probes.jsonl") if p["cell"] == first["cell"]]
    assert probes_after == probes_before  # the finished cell was not probed again
    done = {c["cell"] for c in read_jsonl(out / "cells.jsonl")}
    assert len(done) == 2 and first["cell"] in done


@pytest.mark.slow
def test_one_rank_out_of_memory_is_agreed_and_the_search_goes_on(tmp_path, sweep):
    """A 2-rank DeepSpeed ZeRO-2 cell where rank 1 gets 3/4 of the budget (test hook): probes where only it runs out
    of memory end with the cell's outcome OOM agreed from the ranks' statuses, within seconds (no hang), and the
    search goes on to a batch that fits, smaller than what one process with the whole budget fits (the sweep's DDP
    cell on 1 process)."""
    out = tmp_path / "sweep"
    fit_probe(["--models", "ViT-micro-8", "--stages", "2", "--precisions", "fp32", "--gpus-per-node", "2",
               "--budget-gib", str(BUDGET), "--granularity", "128", "--timeout", "300", "--out", str(out)],
              env={hooks.BUDGET_SCALE_RANK: "1:0.75"})
    probes = read_jsonl(out / "probes.jsonl")
    one_rank = [p for p in probes if p["outcome"] == "oom" and p["ranks"].get("1") == "oom"
                and p["ranks"].get("0") != "oom"]
    assert one_rank, probes
    assert all(p["seconds"] < 120 and p["returncode"] is not None for p in one_rank)
    assert all(p["reason"].startswith("rank 1:") for p in one_rank)
    (cell,) = read_jsonl(out / "cells.jsonl")
    whole = {(c["stage"], c["gpus_per_node"]): c for c in read_jsonl(sweep[0] / "cells.jsonl")}[("ddp", 1)]
    assert 0 < cell["max_batch"] < whole["max_batch"]  # rank 1's smaller budget bounds the 2-rank cell


@pytest.mark.slow
def test_merge_puts_sweeps_into_one_table(sweep, resumed_sweep, tmp_path):
    out, other = sweep[0], resumed_sweep[0]
    merged = tmp_path / "merged"
    proc = fit_probe(["--merge", str(out), str(other), "--out", str(merged)])
    rows = [ln for ln in (merged / "table.md").read_text().splitlines() if ln.startswith("| ViT-")]
    assert len(rows) == 12 and sum(r.startswith("| ViT-tiny-8 ") for r in rows) == 4 and "ViT-tiny-8" in proc.stdout
    assert (out / "cells.jsonl").read_text().count("\n") == 4  # the sources are untouched
    assert (other / "cells.jsonl").read_text().count("\n") == 2


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
    assert command.startswith("`harness fit-probe --models ViT-micro-8 ") and "re-rendered with" in command
    assert json.loads((copy / "memory_model.json").read_text()) == json.loads((out / "memory_model.json").read_text())
    assert rows(again)[0] in proc.stdout
