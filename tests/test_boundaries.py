"""The package boundaries docs/architecture.md states, read from the source: what each package may import.

The imports are read with ``ast`` rather than by importing, so a lazy import inside a function counts as
much as one at the top of a file, and nothing here depends on what the test process has already loaded.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_roots(tree: ast.AST) -> set[str]:
    """Top-level package of every absolute import in ``tree``, ``importlib.import_module("x.y")`` included.
    Relative imports (``from . import x``) stay inside their package and are left out."""
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


def forbidden_imports(package: str, forbidden: set[str]) -> list[str]:
    """``"file: roots"`` for every file under ``package`` (subpackages included) importing a forbidden root."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_roots(ast.parse(path.read_text(), filename=str(path))) & forbidden
        if bad:
            found.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    return found


def test_engine_imports_nothing_from_the_server_or_bench():
    """engine/ is the library the server drives: it knows no HTTP (aiohttp) and no server or bench code."""
    assert forbidden_imports("engine", {"server", "bench", "aiohttp", "tests"}) == []


def test_kernels_import_nothing_but_torch_and_triton():
    """kernels/ is a standalone library: no engine, server or model code, only the stdlib, torch and triton."""
    found = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        extra = imported_roots(ast.parse(path.read_text())) - set(sys.stdlib_module_names) - {"torch", "triton"}
        if extra:
            found.append(f"{path.relative_to(ROOT)}: {sorted(extra)}")
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import server.protocol",
        "from bench import kernels",
        "def lazy():\n    from aiohttp import web",
        "import importlib\nimportlib.import_module('server.loader')",
    ],
)
def test_the_reader_sees_each_kind_of_import(source: str):
    """The check above is only as good as ``imported_roots``: each way of importing must be seen."""
    assert imported_roots(ast.parse(source)) & {"server", "bench", "aiohttp"}


def test_relative_imports_are_not_counted():
    assert imported_roots(ast.parse("from . import server\nfrom ..bench import x")) == set()
