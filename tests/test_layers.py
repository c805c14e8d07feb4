"""Layering: the package's import graph, read with `ast` (module-level and in-function imports alike),
has no cycle, and the SAE layer never imports the checkpoint or converter layers above it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed names of the source folders (pyproject's package-dir).
PACKAGES = {
    "mmsae": ROOT / "mmsae",
    "mmsae.encoders": ROOT / "encoders",
    "mmsae.datasets": ROOT / "datasets",
    "mmsae.kernels": ROOT / "kernels",
    "mmsae.apps": ROOT / "apps",
}
# `load_dataset` in datasets/images.py dispatches to the photo and image–prompt data sets, which build on
# images.py: a registry cycle through in-function imports, inside one package.
ALLOWED_CYCLES = [{"mmsae.datasets.images", "mmsae.datasets.photos", "mmsae.datasets.image_prompts"}]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too, except those under `if TYPE_CHECKING:`."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += [i for n in node.orelse for i in _imports(ast.Module([n], []))]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        out += _imports(node)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mmsae")]
            elif node.module and node.module.startswith("mmsae") and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                # `from pkg import submodule` runs pkg/__init__ as any submodule import does: not an edge.
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            else:
                targets = []
            graph[name].update(owner(t) for t in targets)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_cycle() -> None:
    assert [c for c in cycles(import_graph()) if c not in ALLOWED_CYCLES] == []


def test_sae_layer_imports_nothing_above_it() -> None:
    graph = import_graph()
    upper = {"mmsae", "mmsae.checkpoint", "mmsae.convert", "mmsae.store", "mmsae.trainer"}
    for name in graph:
        if name.startswith("mmsae.sae") or name in ("mmsae.fileio", "mmsae._version"):
            assert not graph[name] & upper, (name, graph[name] & upper)
    assert "mmsae.convert" not in graph["mmsae.checkpoint"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
