"""The test suite's own structure, read with :mod:`ast` (nothing is imported or run).

No file under ``tests/`` imports a test module (``test_*``): what tests share lives in ``tests/helpers/`` (plain
functions, constants, workers) or ``tests/conftest.py`` (fixtures and session set-up). Importing a test module from
another runs its module-level code (skips, ``multicast_off()``, fixtures) at collection of the importer, ties the
importer to the other module's pytest markers and fixtures, and makes one test file's clean-up break another's.
Every import counts: function-local ones, ``importlib.import_module`` and ``__import__`` with a literal name.

``tests/conftest.py`` defines fixtures and pytest hooks (``pytest_*``) only, and no file imports it: a plain
function, class or constant there would be reachable only as ``from conftest import ...``, a module named for
pytest's plugin mechanism rather than its subject; it lives in a module of ``tests/helpers/`` instead.

GPU test modules (``test_gpu_*``, and the helpers they import, workers aside) take torch from
``helpers.gpu.require_torch()``, never by a plain ``import torch`` at module level: with ``FI_FFI_RUN_GPU_TESTS=1``
on a machine without torch the module is then skipped naming ``pip install -e '.[dev,gpu-tests]'`` instead of
failing the collection with ``ModuleNotFoundError``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import REPO, subprocess_env
from helpers.gpu import GPU_TESTS_INSTALL, TORCH_MISSING

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(tree: ast.Module) -> set[str]:
    """The top-level names of the modules that ``tree`` imports, anywhere in it (absolute imports)."""
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
        found.update(name.split(".")[0] for name in names)
    return found


def offenders(root: Path, imported: Callable[[str], bool] = lambda name: name.startswith("test_")) -> list[str]:
    """``path -> module`` for every module that a file under ``root`` imports and ``imported`` picks (by default:
    the test modules)."""
    return [
        f"{path.relative_to(root)} -> {module}"
        for path in sorted(root.rglob("*.py"))
        for module in sorted(filter(imported, imported_modules(ast.parse(path.read_text(), str(path)))))
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


def is_fixture(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether ``node`` is decorated with ``pytest.fixture`` (bare, called, or imported as ``fixture``)."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
        if name == "fixture":
            return True
    return False


def conftest_intruders(source: str) -> list[str]:
    """``line: what`` for every top-level statement of a conftest source that is neither its docstring, an
    import, a fixture nor a pytest hook (a function named ``pytest_*``)."""
    found = []
    for index, node in enumerate(ast.parse(source).body):
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("pytest_") or is_fixture(node):
                continue
            found.append(f"{node.lineno}: function {node.name}")
        elif isinstance(node, ast.ClassDef):
            found.append(f"{node.lineno}: class {node.name}")
        else:
            found.append(f"{node.lineno}: {ast.unparse(node).splitlines()[0]}")
    return found


def test_conftest_defines_fixtures_and_hooks_only() -> None:
    assert conftest_intruders((TESTS / "conftest.py").read_text()) == [], (
        "move plain functions, classes and constants to a module of tests/helpers/ named by its subject"
    )


def test_no_file_imports_conftest() -> None:
    assert offenders(TESTS, lambda name: name == "conftest") == [], "import the helper module instead"


def test_the_conftest_check_finds_what_is_not_a_fixture_or_a_hook(tmp_path: Path) -> None:  # both checks could fail
    source = (
        '"""Fixtures."""\n'
        "import pytest\n"
        "from pytest import fixture\n"
        "REPO = 1\n"
        "def helper():\n    pass\n"
        "class Server:\n    pass\n"
        "@pytest.fixture\ndef a():\n    pass\n"
        "@pytest.fixture(scope='session')\ndef b():\n    pass\n"
        "@fixture\ndef c():\n    pass\n"
        "@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n    yield\n"
        "def pytest_configure(config):\n    pass\n"
        "@pytest.mark.slow\ndef marked():\n    pass\n"
        "if True:\n    x = 2\n"
        "print('set-up')\n"
    )
    assert conftest_intruders(source) == [
        "4: REPO = 1",
        "5: function helper",
        "7: class Server",
        "24: function marked",
        "26: if True:",
        "28: print('set-up')",
    ]
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "wheels.py").write_text("from conftest import REPO\n")
    (tmp_path / "test_a.py").write_text("def f():\n    import conftest\n")
    assert offenders(tmp_path, lambda name: name == "conftest") == [
        "helpers/wheels.py -> conftest",
        "test_a.py -> conftest",
    ]


def module_level_torch_imports(source: str) -> list[str]:
    """``line: statement`` for every top-level statement of ``source`` that imports torch other than through
    ``require_torch()``: ``import torch``, ``from torch import ...``, ``torch = pytest.importorskip("torch")``."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            hit = any(alias.name.split(".")[0] == "torch" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            hit = node.level == 0 and (node.module or "").split(".")[0] == "torch"
        elif isinstance(node, ast.Assign | ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            hit = (
                ast.unparse(call.func).endswith("importorskip")
                and bool(call.args)
                and isinstance(call.args[0], ast.Constant)
                and str(call.args[0].value).split(".")[0] == "torch"
            )
        else:
            hit = False
        if hit:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def gpu_modules() -> list[Path]:
    """The GPU test modules and the helpers (not the workers, which run as scripts) under ``tests/``."""
    helpers = [p for p in (TESTS / "helpers").glob("*.py") if not p.name.endswith("_worker.py")]
    return sorted([*TESTS.rglob("test_gpu_*.py"), *helpers])


def test_gpu_modules_take_torch_from_require_torch() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{hit}"
        for path in gpu_modules()
        for hit in module_level_torch_imports(path.read_text())
    ]
    assert found == [], "write `torch = require_torch()` (from helpers.gpu) after the module's imports"


def test_the_torch_import_check_finds_every_spelling() -> None:  # the check above could fail
    source = (
        "import os, torch\n"
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "torch = pytest.importorskip('torch')\n"
        "pytest.importorskip('torch.cuda', reason='x')\n"
        "torch = require_torch()\n"
        "cp = pytest.importorskip('cupy')\n"
        "import torchvision_like_name_is_not_torch\n"
        "def f():\n    import torch\n"
    )
    assert [hit.split(":")[0] for hit in module_level_torch_imports(source)] == ["1", "2", "3", "4", "5"]


def test_gpu_modules_without_torch_skip_naming_the_extra() -> None:
    """``FI_FFI_RUN_GPU_TESTS=1`` where torch cannot be imported (made so in the child, whether or not it is
    installed here): two GPU modules, one importing torch itself and one through ``helpers.attention_reference``,
    are collected without error and skipped with the install command. Every module is skipped, so no test is
    collected: pytest exits 5 (``NO_TESTS_COLLECTED``), not 2 (``INTERRUPTED``, a collection error); in a whole run
    the other tests are collected and the exit is 0."""
    files = ["tests/ops/test_gpu_packbits.py", "tests/ops/attention/test_gpu_decode.py"]
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch raises ModuleNotFoundError, as where it is not installed\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', *{files!r}]))\n"
    )
    env = subprocess_env(FI_FFI_RUN_GPU_TESTS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out[-4000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 2, out[-4000:]
    for line in skips:
        assert line.endswith(TORCH_MISSING) and GPU_TESTS_INSTALL in line, line
        assert "helpers/gpu.py" not in line, f"the skip should point at the line that needs torch: {line}"
    assert files[0] in skips[0], skips  # the module's own `torch = require_torch()`
    assert "tests/helpers/attention_reference.py" in skips[1], skips  # the torch reference it imports
    assert "error" not in out.lower(), out[-4000:]
