"""The public surface of ``fi_ffi`` is stated consistently: every name of ``__all__`` imports, and each lazy name
is named once in each of the three places ``fi_ffi/__init__.py`` keeps (its ``TYPE_CHECKING`` import for type
checkers, the lazy table ``_LAZY`` naming its module, ``__all__``), with the same module in the first two."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fi_ffi

INIT = Path(fi_ffi.__file__)


def type_checking_imports() -> dict[str, str]:
    """Name → module (relative to ``fi_ffi``, as ``_LAZY`` spells it) of the ``if TYPE_CHECKING:`` imports."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1 and imp.module, ast.dump(imp)
                for alias in imp.names:
                    assert alias.name not in found, f"{alias.name} imported twice under TYPE_CHECKING"
                    found[alias.asname or alias.name] = imp.module
    return found


def test_every_public_name_imports() -> None:
    missing = [name for name in fi_ffi.__all__ if getattr(fi_ffi, name, None) is None]
    assert missing == []
    assert len(set(fi_ffi.__all__)) == len(fi_ffi.__all__), "a name listed twice in __all__"


def test_each_lazy_name_is_typed_and_listed_with_the_same_module() -> None:
    lazy: dict[str, str] = fi_ffi._LAZY  # type: ignore[attr-defined]
    assert type_checking_imports() == lazy
    assert set(lazy) <= set(fi_ffi.__all__)


def test_a_lazy_name_comes_from_the_module_the_table_names() -> None:
    lazy: dict[str, str] = fi_ffi._LAZY  # type: ignore[attr-defined]
    for name, module in lazy.items():
        assert getattr(fi_ffi, name).__module__ == f"fi_ffi.{module}", (name, module)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_op"):
        fi_ffi.no_such_op  # type: ignore[attr-defined]  # noqa: B018
