"""The test suite's own structure, read with :mod:`ast` (nothing is imported or run).

No file under ``tests/`` imports a test module (``test_*``): what tests share lives in ``tests/helpers/`` (plain
functions, constants, workers) or ``tests/conftest.py`` (fixtures and session set-up). Importing a test module from
another runs its module-level code (skips, ``multicast_off()``, fixtures) at collection of the importer, ties the
importer to the other module's pytest markers and fixtures, and makes one test file's clean-up break another's.
Every import counts: function-local ones, ``importlib.import_module`` and ``__import__`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_test_modules(tree: ast.Module) -> set[str]:
    """The top-level names of the ``test_*`` modules that ``tree`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found.update(top for top in (name.split(".")[0] for name in names) if top.startswith("test_"))
    return found


def offenders(root: Path) -> list[str]:
    """``path -> module`` for every test module imported by a file under ``root``."""
    return [
        f"{path.relative_to(root)} -> {module}"
        for path in sorted(root.rglob("*.py"))
        for module in sorted(imported_test_modules(ast.parse(path.read_text(), str(path))))
    ]


def test_no_test_module_imports_another_test_module() -> None:
    assert offenders(TESTS) == [], "move what is shared to tests/helpers/ (or a fixture to tests/conftest.py)"


def test_the_check_finds_every_kind_of_import_of_a_test_module(tmp_path: Path) -> None:  # the check above could fail
    (tmp_path / "helpers").mkdir()
    (tmp_path / "test_a.py").write_text(
        "import importlib\n"
        "from conftest import REPO\n"
        "from helpers.fakes import fake_cuda\n"
        "from test_b import plan\n"
        "import test_c as c, numpy\n"
        "def f():\n"
        "    from test_d.sub import x\n"
        "    return importlib.import_module('test_e'), __import__('test_f'), importlib.import_module('numpy')\n"
    )
    (tmp_path / "helpers" / "plans.py").write_text("from test_a import workspace\nfrom .fakes import fake_cuda\n")
    assert offenders(tmp_path) == [
        "helpers/plans.py -> test_a",
        "test_a.py -> test_b",
        "test_a.py -> test_c",
        "test_a.py -> test_d",
        "test_a.py -> test_e",
        "test_a.py -> test_f",
    ]
