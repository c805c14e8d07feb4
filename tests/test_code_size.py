"""House limits on code size: every module ≤ 500 lines, every function or method ≤ 80 lines.

A function is measured from its `def` line to its last line (decorators not counted); a nested function
counts on its own as well as inside its parent.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("mmsae", "encoders", "datasets", "kernels", "apps", "tests", "benchmarks")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules(root: Path = ROOT) -> list[Path]:
    found = sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.py"))
    assert found, f"no Python modules under {root}: the folder layout changed"
    return found


def long_modules(paths: list[Path], root: Path = ROOT, limit: int = MAX_MODULE_LINES) -> list[str]:
    """`path: N lines` for every module longer than `limit` lines."""
    lengths = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in paths}
    return [f"{p.relative_to(root)}: {n} lines" for p, n in lengths.items() if n > limit]


def long_functions(paths: list[Path], root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`path:line name: N lines` for every function or method longer than `limit` lines."""
    offenders = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return offenders


def test_no_module_is_over_500_lines() -> None:
    offenders = long_modules(modules())
    print("\n".join(offenders))
    assert not offenders, "Split these modules along a natural seam:\n" + "\n".join(offenders)


def test_no_function_is_over_80_lines() -> None:
    offenders = long_functions(modules())
    print("\n".join(offenders))
    assert not offenders, "Split these functions into named steps:\n" + "\n".join(offenders)


def test_the_scan_finds_what_is_over_the_limits(tmp_path: Path) -> None:
    """Strict limits (at the limit passes, one over fails); nested functions are measured too."""
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 2))
    source = f"def outer():\n    def inner():\n{body}\n        return 0\n    return inner\n"
    (tmp_path / "apps").mkdir()
    path = tmp_path / "apps" / "long.py"
    path.write_text(source)
    lines = MAX_FUNCTION_LINES + 2  # outer: its def, inner (exactly at the limit), its return

    assert modules(tmp_path) == [path]
    assert long_modules([path], tmp_path, limit=lines) == []
    assert long_modules([path], tmp_path, limit=lines - 1) == [f"apps/long.py: {lines} lines"]
    assert long_functions([path], tmp_path) == [f"apps/long.py:1 outer: {lines} lines"]
