"""The codebase's shape, checked as behaviour: no import cycle (function-level imports included), packages of
``harness/`` that depend one way only, ``models/`` independent of ``harness/``, no top-level module in ``harness/``
but ``cli.py``, no module name used twice, no source file over 400 lines, no function in ``harness/`` with more
than 8 parameters (``self``/``cls`` not counted; ruff's PLR0913 enforces the same in ``make lint``)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.helpers import REPO

PACKAGES = ("harness", "models")
MAX_LINES, MAX_PARAMS = 400, 8
LAYERS = ("core", "data", "config", "distributed", "engines", "components", "eval", "train", "tools", "fit", "cli")
"""The packages of ``harness/`` from the bottom up: each may import only from those before it (the trainer runs
zero-shot and validation, so eval sits below train; the fit planner counts FLOPs with tools' counter, so tools sits
below fit)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Edges ``module -> project module it imports``, from every import statement in the file (top-level and
    inside functions). ``from package import name`` points at ``package.name`` when that is a module."""
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        edges: Set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_hidden_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    modules = _modules()
    graph = import_graph(modules)
    # the graph sees imports
    assert graph["harness.train.trainer"] >= {"harness.engines", "harness.distributed.parallelize"}
    assert find_cycles(graph) == []


def _layer(module: str) -> int:
    """Index in :data:`LAYERS` of the ``harness`` package (or ``cli``) that holds ``module``."""
    part = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if part == layer or part in layer)


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """Edges between two packages of ``harness/`` that do not point down :data:`LAYERS` (the package's own
    ``__init__`` aside)."""
    bad = []
    for src, targets in graph.items():
        if not src.startswith("harness.") or src.count(".") < 1:
            continue
        for dst in targets:
            if dst.startswith("harness.") and dst.split(".")[1] != src.split(".")[1] \
                    and _layer(dst) >= _layer(src):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_packages_depend_one_way_and_models_import_nothing_from_harness():
    graph = import_graph(_modules())
    assert upward_imports({"harness.train.job": {"harness.fit.search"}}) == ["harness.train.job -> harness.fit.search"]
    assert upward_imports({"harness.tools.profile": {"harness.fit.plan"}}) == [
        "harness.tools.profile -> harness.fit.plan"]
    assert upward_imports({"harness.fit.plan": {"harness.tools.flops"}}) == []  # tools sits below fit
    assert upward_imports(graph) == []
    assert graph["models"] >= {"models.attention"}  # the graph sees the models package's imports
    assert {m: sorted(d) for m, t in graph.items() if m.startswith("models")
            if (d := {x for x in t if x.startswith("harness")})} == {}


def test_harness_holds_packages_and_cli_only_and_no_module_name_twice():
    top = sorted(p.name for p in (REPO / "harness").glob("*.py"))
    assert top == ["__init__.py", "cli.py"], top
    stems: Dict[str, List[str]] = {}
    for path in (REPO / "harness").rglob("*.py"):
        if path.name != "__init__.py":
            stems.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    packages = {p.name for p in (REPO / "harness").iterdir() if (p / "__init__.py").is_file()}
    assert {s: f for s, f in stems.items() if len(f) > 1 or s in packages} == {}


def test_no_source_file_over_400_lines():
    files = [p for d in ("harness", "models", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_function_in_harness_takes_more_than_8_parameters():
    wide = []
    for path in (REPO / "harness").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                n = len([x for x in names if x not in ("self", "cls")])
                if n > MAX_PARAMS:
                    wide.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n})")
    assert not wide, wide
