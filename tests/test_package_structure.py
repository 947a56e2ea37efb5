"""The package's own structure, read from its source with :mod:`ast` (nothing is imported or run).

- No module of ``fi_ffi/`` imports ``ctypes``: the C ABI goes through cffi only.
- The layers ``fi_ffi.tensor`` (descriptors), ``fi_ffi.abi`` (the TVM-FFI C API) and ``fi_ffi.loader`` (finding
  and opening libraries) import one another in one direction only: every import counts, function-local and
  ``TYPE_CHECKING`` ones included, since a function-local import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fi_ffi"
LAYERS = ("fi_ffi.abi", "fi_ffi.loader", "fi_ffi.tensor")


def sources() -> dict[str, ast.Module]:
    """Module name (``fi_ffi.abi.call``; a package is its ``__init__``) → parsed source, for every file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    assert len(found) > 40 and "fi_ffi.abi.runtime" in found and "fi_ffi.loader.modules" in found
    return found


def imported_names(module: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Every module ``module`` imports anywhere in its body, absolute; ``from x import y`` gives ``x`` and ``x.y``
    (``y`` may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def layer_of(name: str) -> str | None:
    return next((layer for layer in LAYERS if name == layer or name.startswith(layer + ".")), None)


def layer_graph() -> dict[str, set[str]]:
    """Layer → the other layers its modules import."""
    trees = sources()
    packages = {name for name in trees if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for module, tree in trees.items():
        source = layer_of(module)
        if source is None:
            continue
        for target in map(layer_of, imported_names(module, tree, module in packages)):
            if target is not None and target != source:
                graph[source].add(target)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` as a path (first node repeated at the end), or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_no_fi_ffi_module_imports_ctypes() -> None:
    offenders = []
    for module, tree in sources().items():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("__import__", "import_module"):
                    names = [str(node.args[0].value)]
            if any(n == "ctypes" or n.startswith("ctypes.") for n in names):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def test_the_cycle_finder_finds_a_cycle() -> None:  # the check below could not fail if this did not hold
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_abi_loader_and_tensor_import_each_other_one_way_only() -> None:
    graph = layer_graph()
    assert cycle(graph) == [], graph
    # the direction chosen: abi builds on the loader (which opens the libraries) and on the descriptors
    assert graph == {"fi_ffi.abi": {"fi_ffi.loader", "fi_ffi.tensor"}, "fi_ffi.loader": set(), "fi_ffi.tensor": set()}


def test_function_local_and_relative_imports_are_counted() -> None:
    tree = ast.parse("def f():\n    from .abi.cdefs import get_ffi\n")
    assert {"fi_ffi.abi.cdefs", "fi_ffi.abi.cdefs.get_ffi"} <= imported_names("fi_ffi.tensor", tree, False)
    tree = ast.parse("def f():\n    from .. import loader\n")
    assert "fi_ffi.loader" in imported_names("fi_ffi.abi.runtime", tree, False)
    tree = ast.parse("from .libraries import x\nfrom ..abi import dl\n")
    assert {"fi_ffi.loader.libraries", "fi_ffi.abi.dl"} <= imported_names("fi_ffi.loader", tree, True)
