"""``benchmarks/gpu_suite.sh --dry-run`` on a CPU: every step is printed, and every harness command in it parses
(the fit-probe cells expand, the profile flags are accepted), so the suite does not fail on a typo at GPU time."""
from __future__ import annotations

import re
import shlex
import subprocess

from tests.helpers import REPO

STEPS = ["smoke", "tests", "fit_b32", "fit_l14", "profile", "peer", "dtp"]


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_dry_run_prints_every_step_and_its_commands_parse():
    from harness.fit.cells import build_cells
    from harness.fit.probe import parse_args
    from harness.tools.profile import _parser

    proc = _dry_run()
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    assert list(lines) == STEPS
    text = proc.stdout.replace("\\n", "\n")
    fit = [shlex.split(m.rstrip("'")) for m in re.findall(r"fit-probe (--models [^\n]+)", text)]
    assert len(fit) == 4
    cells = [c for args in fit for c in build_cells(parse_args(args))]
    assert {c.model for c in cells} == {"ViT-B-32", "ViT-L-14"}
    assert {c.world for c in cells if c.stage in ("3", "fsdp")} == {1, 8, 64}  # 8 and 64 GPUs emulated
    assert {c.world for c in cells if c.stage in ("0", "2")} == {1}
    for args in re.findall(r"harness.cli profile (--models [^\n]+)", text):
        _parser().parse_args(shlex.split(args.replace("$model", "ViT-B-32").replace("$batch", "8")))
    for path in re.findall(r"(?:ds_configs|benchmarks|tests)/[\w./$]+\.(?:py|yaml)", text):
        assert (REPO / path.replace("$cfg", "zero2")).is_file(), path


def test_only_runs_the_named_steps_and_bad_names_are_refused():
    proc = _dry_run("--only", "tests,dtp")
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["tests", "dtp"]
    bad = _dry_run("--only", "nope")
    assert bad.returncode == 2 and "--only: nope is not one of" in bad.stderr
