"""The package's imports point one way (docs/design.md, "Layers"): no module imports a
module of a later layer, and no import cycles. Read from the source with ``ast``, so every
import counts, including those inside functions."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dknet_jax"

# layer of each top-level name under dknet_jax (the data flow of docs/design.md); a module
# may import modules of its own layer or of earlier ones
LAYERS = {
    "types": 0,
    "config": 0,
    "io_atomic": 0,
    "cli": 1,
    "checkpoint": 1,
    "data": 2,
    "eval": 3,
    "synthetic": 3,
    "sparse": 3,
    "candidates": 4,
    "aggregation": 4,
    "model": 5,
    "released": 5,
    "objective": 6,
    "inference": 7,
    "training": 8,
    "benchmarking": 9,
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """dknet_jax modules imported by the file (``from a import b`` counts ``a.b`` when it
    is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("dknet_jax"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dknet_jax"))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_top_level_name_has_a_layer():
    names = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    assert names <= set(LAYERS), f"add to LAYERS: {sorted(names - set(LAYERS))}"


def test_no_import_runs_back_up_the_layers():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        mine = _layer(name)
        for dep in _imports(path, modules):
            theirs = _layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{name} (layer {mine}) imports {dep} (layer {theirs})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {
        name: {d for d in _imports(path, modules) if d in modules and d != name}
        for name, path in modules.items()
    }
    # a package's __init__ importing its own submodules is not a cycle in practice
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_back_import(tmp_path, monkeypatch):
    """The checks can fail: a fake model module importing training is caught."""
    fake = tmp_path / "dknet_jax"
    (fake / "model").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "model" / "net.py").write_text("def f():\n    from dknet_jax.training import train\n")
    (fake / "training" / "train.py").write_text("from dknet_jax.model import net\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    with pytest.raises(AssertionError, match="model.net .layer 5. imports"):
        test_no_import_runs_back_up_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
