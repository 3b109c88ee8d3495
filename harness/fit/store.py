"""The fit probe's results store: JSON lines, appended and flushed one record at a time.

``probes.jsonl`` holds every probe (cell, micro batch, outcome, measurements) and ``cells.jsonl`` every
finished cell. Each record carries the environment fingerprint it was measured in (device name and
memory, budget, library versions). A sweep that is killed and started again reads both files and goes
on where it stopped: finished cells are not probed again, and the probes of an unfinished cell are
reused. Records from another environment are *stale*: they stay in the files (nothing written is ever
removed) but are not reused, and the sweep says what changed. A record cut short by a kill (a last line
without its newline) is ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple


class ResultsStore:
    """``DIR/probes.jsonl`` and ``DIR/cells.jsonl`` for one output folder.

    Args:
        folder: the sweep's output folder (created).
        env: the current environment fingerprint (a JSON-able dict).
    """

    def __init__(self, folder: Path, env: Dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.probes_path = self.folder / "probes.jsonl"
        self.cells_path = self.folder / "cells.jsonl"

    @staticmethod
    def _read(path: Path) -> List[Dict[str, Any]]:
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]  # cut short by a kill: not a record
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def _append(self, path: Path, record: Dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**record, "env": self.env}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_probe(self, record: Dict[str, Any]) -> None:
        self._append(self.probes_path, record)

    def add_cell(self, record: Dict[str, Any]) -> None:
        self._append(self.cells_path, record)

    def load(self) -> Tuple[Dict[str, List[Dict]], Dict[str, Dict], List[str]]:
        """``(probes by cell key, finished cells by key, notes on stale records)`` for the current environment."""
        probes: Dict[str, List[Dict]] = {}
        cells: Dict[str, Dict] = {}
        changes: Dict[str, Tuple[Any, Any]] = {}
        stale = 0
        for kind, records in (("probe", self._read(self.probes_path)), ("cell", self._read(self.cells_path))):
            for r in records:
                old = r.get("env", {})
                if old != self.env:
                    stale += 1
                    for k in set(old) | set(self.env):
                        if old.get(k) != self.env.get(k):
                            changes[k] = (old.get(k), self.env.get(k))
                    continue
                if kind == "probe":
                    probes.setdefault(r["cell"], []).append(r)
                else:
                    cells[r["cell"]] = r
        notes = []
        if stale:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))
            notes.append(f"environment changed since {self.folder} was written ({what}): {stale} earlier records are "
                         "stale; they stay in the store but their cells are probed again")
        return probes, cells, notes

    def all_records(self) -> Tuple[List[Dict], List[Dict]]:
        """Every probe and cell record ever written (any environment)."""
        return self._read(self.probes_path), self._read(self.cells_path)
