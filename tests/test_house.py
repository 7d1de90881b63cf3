"""The package's import graph, read from its own code (imports inside functions included): no
circles, no import from a lower layer to a higher one, no module taking another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module may import its own layer or lower ones (never a circle).
LAYERS = [
    ("lorasweep", "lorasweep.quiet", "lorasweep.config", "lorasweep.claims"),  # what a config is
    ("lorasweep.compose",),                                                     # Hydra -> RunConfig
    ("lorasweep.run",),            # one run on one process (its lease, checkpoints, pruner, plan)
    ("lorasweep.distributed",),    # one run on several processes
    ("lorasweep.job",),            # one run config: skip, lease, one process or several
    ("lorasweep.study", "hydra_plugins"),  # many runs: sweeps and searches
    ("lorasweep.analysis",),       # reports over finished runs
    ("lorasweep.cli", "lorasweep.plan_cli", "lorasweep.merge", "lorasweep.switch"),  # the commands
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, dict[str, set[str]]]:
    """module -> {imported module: names taken from it}"""
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = {m: {} for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in files:  # `from . import pipeline`: the module itself
                        graph[mod].setdefault(sub, set())
                    elif target in files:
                        graph[mod].setdefault(target, set()).add(alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files:
                        graph[mod].setdefault(alias.name, set())
    return graph


def _layer(mod: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, f"{mod} is in no layer of tests/test_house.py: place it"
    return best[0]


def _circles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_no_import_runs_back_up_a_layer():
    up = [f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})"
          for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert up == []


def test_no_module_takes_another_modules_private_names():
    taken = [f"{a} takes {sorted(n for n in names if n.startswith('_'))} from {b}"
             for a, targets in _graph().items() for b, names in targets.items()
             if any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert taken == []


def test_one_run_knows_nothing_of_sweeps_or_several_processes():
    """run/ is the recipe of one run on one process: studies and torchrun plug in from above."""
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() if a.startswith("lorasweep.run")
             for b in targets if b.startswith(("lorasweep.study", "lorasweep.distributed", "lorasweep.job",
                                                 "lorasweep.cli", "lorasweep.analysis"))]
    assert wrong == []
