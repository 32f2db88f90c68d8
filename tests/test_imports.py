"""The modules import each other without a circle (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import layerfreeze as lf

SRC = Path(lf.__file__).parent


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert {"core", "freezer", "schedule", "config", "cli", "timeline"} <= set(graph)  # the walk saw the modules
    assert set(graph) <= set(state) and set(state.values()) == {2}  # and finished each one


def test_schedule_config_and_timeline_depend_one_way() -> None:
    graph = _graph()
    assert "schedule" not in graph["config"] and "timeline" not in graph["schedule"]
    assert "cli" not in graph["timeline"] and "schedule" in graph["timeline"]


@pytest.mark.parametrize("module", ["selectors", "core", "holds", "rules", "config", "schedule", "timeline",
                                    "guard", "optim", "freezer", "distributed", "cli"])
def test_each_module_imports_first(module: str) -> None:
    code = f"import importlib, sys; importlib.import_module('layerfreeze.{module}')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr


def test_importing_layerfreeze_does_not_load_dynamo() -> None:
    # torch.compiler.disable loads torch._dynamo (seconds); the hooks take it only once it is needed
    code = ("import sys, layerfreeze, torch; net = torch.nn.Linear(2, 2); "
            "lf = layerfreeze; fz = lf.Freezer(net, schedule=lf.Schedule().freeze('weight'), cache=True); "
            "net(torch.zeros(3, 2)); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
