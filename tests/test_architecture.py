"""Layering of the package, read from its source with `ast` (nothing is imported).

- No import cycles between modules, counting every import (a deferred import inside a
  function only hides a cycle; it does not remove it).
- `model/` imports nothing from the layers built on it (train, infer, data, serve, compare,
  interop, cli): the model files stay readable on their own.
- `model/` holds the math: the decode kernels (kernels/) are the decode layer's (infer/decode.py).
  The one exception is the fused output-layer losses of training (model/loss.py ->
  kernels/cross_entropy.py, kernels/kl_divergence.py), autograd ops with their own torch paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "latentformer"
ABOVE_MODEL = ("train", "infer", "data", "serve", "compare", "interop", "cli")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "latentformer.model.attention" in graph["latentformer.model.transformer"]
    assert "latentformer.config" in graph["latentformer.train.config"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_imports_no_layer_above_it():
    above = tuple(f"latentformer.{layer}" for layer in ABOVE_MODEL)
    offending = {
        name: sorted(d for d in deps if d.split(".")[:2] in [a.split(".") for a in above])
        for name, deps in _graph().items()
        if name.startswith("latentformer.model")
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_model_imports_no_kernels():
    """Decode speed work lives in the decode layer; model/ reads as the math (see the module docstring)."""
    allowed = {("latentformer.model.loss", "latentformer.kernels.cross_entropy"),  # the fused losses' row kernels
               ("latentformer.model.loss", "latentformer.kernels.kl_divergence"),
               ("latentformer.model.loss", "latentformer.kernels.float8")}  # the FP8 output layer's casts
    offending = sorted((name, d) for name, deps in _graph().items() if name.startswith("latentformer.model")
                       for d in deps if d.startswith("latentformer.kernels") and (name, d) not in allowed)
    assert offending == []
    assert "latentformer.kernels.mla_decode" in _graph()["latentformer.infer.decode"]
