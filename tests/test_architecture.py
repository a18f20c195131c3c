"""The package's shape, as docs/contributing.md describes it: layers by folder, modules small
enough to read in one sitting, Ray, Optuna and MLflow each behind one edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = PLATFORM / "segsweep"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _name(path: Path) -> str:
    return str(path.relative_to(PLATFORM))


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_platform_is_a_source_folder_not_a_package() -> None:
    # `platform` is also a standard-library module: an __init__.py here would shadow it.
    assert not (PLATFORM / "__init__.py").exists()
    assert [p.name for p in PLATFORM.iterdir() if p.name != "__pycache__"] == ["segsweep"]


def test_no_module_is_longer_than_one_sitting() -> None:
    long = {_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screenful_or_two() -> None:
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long[f"{_name(path)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        # The runtime's edges; the bench (a developer tool) measures them directly.
        ("ray", {"segsweep/sweep/ray_tune.py"}),
        ("optuna", {"segsweep/sweep/studies.py"}),
        ("mlflow", {"segsweep/tracking/"}),
    ],
)
def test_each_service_library_is_imported_behind_one_edge(library: str, allowed: set[str]) -> None:
    users = {
        _name(p) for p in MODULES if library in _imports(p) and not _name(p).startswith("segsweep/bench/")
    }
    outside = {u for u in users if not any(u == a or (a.endswith("/") and u.startswith(a)) for a in allowed)}
    assert users, f"nothing imports {library}: the rule checks nothing"
    assert not outside, f"{library} imported outside {sorted(allowed)}: {sorted(outside)}"


def test_every_layer_is_a_folder_and_only_the_core_sits_at_the_top() -> None:
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"config.py", "errors.py", "files.py", "primitives.py", "waiting.py"}
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"cli", "methods", "data", "models", "training", "sweep", "tracking", "reports", "bench"} <= layers


def test_the_modules_make_test_starts_first_exist() -> None:
    """``LONGEST_FIRST`` names test modules by file: one renamed would silently start last."""
    from .conftest import LONGEST_FIRST

    tests = Path(__file__).parent
    assert [name for name in LONGEST_FIRST if not (tests / name).is_file()] == []
