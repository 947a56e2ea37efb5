"""The public surface of ``fi_ffi`` (and the facade of ``fi_ffi.loader``) is stated once, in an exports table
(``_EXPORTS``: name -> the module that defines it), and everything else follows from it:

- an op's row is not written by hand: ``@op`` on its def states it, and ``tools/gen_init_stub.py`` writes the
  rows of every ``@op`` into ``fi_ffi/launch/exports.py`` (read with ast, so ``import fi_ffi`` imports no op);
  the other names (dtypes, errors, ``Tensor``...) are the hand-written rows of ``_EXPORTS``;
- every name of ``__all__`` imports and is the very object its defining module holds;
- ``__all__`` is the table's names (plus ``__version__``), each written once in the table's source;
- the table of ops and the type stubs ``__init__.pyi`` are what ``tools/gen_init_stub.py`` writes now (an op or a
  row added without re-running the tool fails here, naming the command);
- ``fi_ffi.loader`` resolves a name at each use, so patching a loader submodule works as before;
- ``import fi_ffi`` still imports no op module, no cffi, numpy or cuda-python, and loads no shared library.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers.env import subprocess_env
from helpers.tools import load_tool

import fi_ffi
import fi_ffi.loader

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (fi_ffi, fi_ffi.loader)


def table(package: ModuleType) -> dict[str, str]:
    exports: dict[str, str] = package._EXPORTS
    return exports


def defining_module(package: ModuleType, module: str, name: str) -> object:
    """What ``from .<module> import <name>`` gives inside ``package`` (``module == ""``: the submodule itself)."""
    if not module:
        return importlib.import_module(f"{package.__name__}.{name}")
    return getattr(importlib.import_module(f"{package.__name__}.{module}"), name)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_imports_and_is_its_defining_modules_object(package: ModuleType) -> None:
    rows = table(package)
    assert len(rows) > 20
    for name in package.__all__:
        value = getattr(package, name)  # through the lazy __getattr__ the first time
        if name not in rows:
            assert name == "__version__", f"{package.__name__}.{name} is public but not a row of _EXPORTS"
            continue
        module = rows[name]
        assert value is defining_module(package, module, name), (name, module)
        if inspect.isclass(value) or inspect.isfunction(value):  # the table names where it is defined, not a re-export
            assert value.__module__ == f"{package.__name__}.{module}", (name, module, value.__module__)
        assert getattr(package, name) is value  # and again, from wherever the first read left it


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_the_table_and_each_row_is_written_once(package: ModuleType) -> None:
    rows = table(package)
    assert sorted(package.__all__) == sorted({*rows, *(["__version__"] if package is fi_ffi else [])})
    assert len(set(package.__all__)) == len(package.__all__)
    # a dict literal keeps the last of two equal keys silently: read the source to see a name written twice; for
    # fi_ffi the rows are the hand-written literal and the generated table of ops, which share no name
    keys = _literal_keys(Path(package.__file__ or ""), "_EXPORTS")
    if package is fi_ffi:
        ops = _literal_keys(ROOT / "fi_ffi" / "launch" / "exports.py", "OPS")
        assert set(keys).isdisjoint(ops), "a name is both an @op and a hand-written row of _EXPORTS"
        keys += ops
    assert sorted(keys) == sorted(rows)
    assert [k for k in keys if keys.count(k) > 1] == []


def _literal_keys(path: Path, name: str) -> list[str]:
    """The keys of the dict literal assigned to ``name: ... = {...}`` in the module at ``path``, as written."""
    source = ast.parse(path.read_text(encoding="utf-8"))
    literal = next(
        node.value
        for node in source.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name
    )
    assert isinstance(literal, ast.Dict)
    keys = [k.value for k in literal.keys if isinstance(k, ast.Constant)]
    assert len(keys) == len(literal.keys)
    return keys


def test_the_ops_rows_are_the_op_decorated_defs() -> None:
    """Each row of the generated table is an ``@op`` of its module (the registry saw it at import), every ``@op`` of
    every family is a row, and the decorator returned the def itself: no wrapper, no extra call level."""
    import pkgutil

    import fi_ffi.ops
    from fi_ffi.launch import registry
    from fi_ffi.launch.exports import OPS

    for info in pkgutil.walk_packages(fi_ffi.ops.__path__, "fi_ffi.ops."):
        importlib.import_module(info.name)
    declared = {f"{f.__module__}.{f.__name__}" for f in registry.ops() if f.__module__.startswith("fi_ffi.")}
    assert declared == {f"fi_ffi.{module}.{name}" for name, module in OPS.items()}
    for name in OPS:
        value = getattr(fi_ffi, name)
        assert value in registry.ops() and not hasattr(value, "__wrapped__"), name
        assert name in vars(sys.modules[value.__module__])["__all__"], name  # its family's __all__, derived
    assert fi_ffi.rmsnorm.__code__.co_filename.endswith("norm.py")  # the def's own code runs, not a wrapper's


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_dir_lists_the_lazy_names_before_they_are_used(package: ModuleType) -> None:
    assert set(package.__all__) <= set(dir(package))


def test_the_committed_stubs_are_what_the_generator_writes() -> None:
    tool = load_tool("gen_init_stub")
    files = tool.stubs()
    assert {p.relative_to(ROOT).as_posix() for p in files} == {
        "fi_ffi/launch/exports.py",
        "fi_ffi/__init__.pyi",
        "fi_ffi/loader/__init__.pyi",
    }
    assert tool.stale(files) == [], "the table of ops or the stubs are out of date; run: python tools/gen_init_stub.py"


def test_the_generator_reads_an_op_from_its_decorator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the table could not fail to match if the reader found nothing: give it a family of its own
    tool = load_tool("gen_init_stub")
    family = tmp_path / "fi_ffi" / "ops" / "attention"
    family.mkdir(parents=True)
    (family / "extra.py").write_text(
        "from ...launch.registry import op\n\n\n@op(launch=_x)\ndef new_op(): ...\n\n\n@op()\nclass NewPlan: ...\n\n\n"
        "def helper(): ...\n\n\n@other\ndef not_an_op(): ...\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "OPS_DIR", tmp_path / "fi_ffi" / "ops")
    assert tool.declared_ops() == {"new_op": "ops.attention.extra", "NewPlan": "ops.attention.extra"}
    (family / "twice.py").write_text("@op()\ndef new_op(): ...\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="new_op is declared in ops.attention.extra and in ops.attention.twice"):
        tool.declared_ops()


def test_a_stub_reexports_every_name_from_its_defining_module() -> None:
    # the check above could not fail if the generator wrote nothing useful: read one stub back
    stub = ast.parse((ROOT / "fi_ffi" / "__init__.pyi").read_text(encoding="utf-8"))
    found = {
        alias.asname: (node.module or "")
        for node in stub.body
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
        if alias.asname == alias.name  # `x as x`: an explicit re-export (PEP 484)
    }
    assert found == table(fi_ffi)
    assert found["CudaError"] == "errors" and found["rmsnorm"] == "ops.norm" and found["dtypes"] == ""


def test_the_stubs_are_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    assert "__init__.pyi" in data["fi_ffi"] and "py.typed" in data["fi_ffi"]
    assert "__init__.pyi" in data["fi_ffi.loader"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_op"):
        fi_ffi.no_such_op  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match="no_such_function"):
        fi_ffi.loader.no_such_function  # type: ignore[attr-defined]  # noqa: B018


def test_the_loader_reads_its_submodule_at_each_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # fi_ffi.loader keeps nothing it resolved: a patched submodule function is what loader.<name> gives, as with
    # the forwarding functions the table replaced (fi_ffi's own __getattr__ keeps what it found: ops are not patched)
    from fi_ffi.loader import modules

    real = modules.loaded_modules
    assert fi_ffi.loader.loaded_modules is real
    monkeypatch.setattr(modules, "loaded_modules", lambda: {"patched": "/x.so"})
    assert fi_ffi.loader.loaded_modules() == {"patched": "/x.so"}
    monkeypatch.undo()
    assert fi_ffi.loader.loaded_modules is real and "loaded_modules" not in vars(fi_ffi.loader)


def test_cuda_error_is_public() -> None:
    from fi_ffi.errors import CudaError, FiFFIError

    assert fi_ffi.CudaError is CudaError and issubclass(fi_ffi.CudaError, FiFFIError)


def test_importing_fi_ffi_imports_no_op_module_and_loads_nothing() -> None:
    code = (
        "import json, sys; before = set(sys.modules); import fi_ffi\n"
        "new = set(sys.modules) - before\n"
        "maps = open('/proc/self/maps').read()\n"
        "heavy = ('cffi', 'numpy', 'cuda', 'torch', 'cupy', 'zipfile', 'tqdm')\n"
        "print(json.dumps({'fi_ffi': sorted(m for m in new if m.startswith('fi_ffi')),"
        " 'heavy': sorted(m for m in new if m.startswith(heavy)), 'tvm': 'libtvm_ffi' in maps}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the ground floor (descriptors, dtypes, errors) as before the table, and the table of ops; no op module, no library
    assert result == {
        "fi_ffi": [
            "fi_ffi",
            "fi_ffi.caches",
            "fi_ffi.dtypes",
            "fi_ffi.errors",
            "fi_ffi.launch",  # a package whose __init__ imports nothing
            "fi_ffi.launch.exports",  # the generated table of ops: a dict literal
            "fi_ffi.moved",
            "fi_ffi.tensor",
            "fi_ffi.tensor.descriptor",
        ],
        "heavy": [],
        "tvm": False,
    }
