"""The package's shape: no import circle inside visualad/, and a CLI that starts without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

PKG = Path(__file__).resolve().parents[1] / "visualad"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: Set[str]) -> str:
    """The module an imported name lives in: itself, or its parent package for an imported attribute."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] == "visualad":
                    dep = _resolve(t, modules)
                    if dep and dep != mod:
                        graph[mod].add(dep)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert "visualad.modes.knn" in graph["visualad.runtime.engine"]  # the graph sees relative imports
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = import_graph()
    graph["visualad.store"].add("visualad.detector")  # detector -> store exists; close the loop
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "visualad.detector" in cycle


def _importtime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "visualad", *args], capture_output=True,
                          text=True, timeout=120)


def _imported(stderr: str) -> Set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_help_version_and_argument_errors_start_without_torch():
    for args, code in ((("--help",), 0), (("--version",), 0), (("predict", "--help"), 0),
                       (("predict", "x.png", "--batch-size", "0"), 2), (("predict",), 2)):
        proc = _importtime(*args)
        mods = _imported(proc.stderr)
        assert proc.returncode == code, (args, proc.stderr[-500:])
        assert "visualad.cli" in mods
        assert not {m for m in mods if m == "torch" or m.startswith("torch.")}, args
    assert "visualad 0." in _importtime("--version").stdout
