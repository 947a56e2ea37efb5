"""The package's own structure, read from its source with :mod:`ast` (nothing is imported or run).

- No module of ``fi_ffi/`` imports ``ctypes``: the C ABI goes through cffi only.
- The layers ``fi_ffi.tensor`` (descriptors), ``fi_ffi.abi`` (the TVM-FFI C API) and ``fi_ffi.loader`` (finding
  and opening libraries) import one another in one direction only: every import counts, function-local and
  ``TYPE_CHECKING`` ones included, since a function-local import is still a dependency.
- The whole package stands in :data:`FLOORS`: a module imports only modules of its own unit (package or top-level
  module) or of a lower floor. Units on one floor are siblings and import neither each other: ``fi_ffi.ops`` and
  ``fi_ffi.comm`` both stand on the calling engine ``fi_ffi.launch``, which imports neither.
- ``fi_ffi.comm`` and ``fi_engine`` take no private (``_name``) names from ``fi_ffi.ops`` or ``fi_ffi.launch``;
  no module of ``fi_ffi.ops.attention`` takes a private name from another module.
- No module takes a private (``_name``) name of another unit.
- The top level of ``fi_ffi.ops`` holds only op families (modules with ``DECLARATIONS``).
- The layout tree of ``docs/design.md`` names every top-level module and subpackage, and every module of ``launch``,
  ``ops``, ``ops.attention``, ``tensor`` and ``cuda``.
- The engine (``fi_engine``) takes from fi_ffi only public names: ``fi_ffi.__all__`` and the ``__all__`` of
  :data:`PUBLIC_MODULES`, in imports (function-local too) and in ``fi_ffi.x.y`` chains; fi_ffi never imports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fi_ffi"
LAYERS = ("fi_ffi.abi", "fi_ffi.loader", "fi_ffi.tensor.descriptor")


def sources(root: Path = PACKAGE) -> dict[str, ast.Module]:
    """Module name (``fi_ffi.abi.call``; a package is its ``__init__``) → parsed source, for every file of the
    package at ``root`` (fi_ffi's, or the engine's)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    assert len(found) > 40
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


def statement_imports(node: ast.AST) -> list[str]:
    """The modules an ``import`` or an absolute ``from ... import`` statement names; none for any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_no_fi_ffi_module_imports_ctypes() -> None:
    offenders = []
    for module, tree in sources().items():
        for node in ast.walk(tree):
            names = statement_imports(node)
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
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
    assert graph == {
        "fi_ffi.abi": {"fi_ffi.loader", "fi_ffi.tensor.descriptor"},
        "fi_ffi.loader": set(),
        "fi_ffi.tensor.descriptor": set(),
    }


def test_function_local_and_relative_imports_are_counted() -> None:
    tree = ast.parse("def f():\n    from .abi.cdefs import get_ffi\n")
    assert {"fi_ffi.abi.cdefs", "fi_ffi.abi.cdefs.get_ffi"} <= imported_names("fi_ffi.tensor", tree, False)
    tree = ast.parse("def f():\n    from .. import loader\n")
    assert "fi_ffi.loader" in imported_names("fi_ffi.abi.runtime", tree, False)
    tree = ast.parse("from .libraries import x\nfrom ..abi import dl\n")
    assert {"fi_ffi.loader.libraries", "fi_ffi.abi.dl"} <= imported_names("fi_ffi.loader", tree, True)


# The floors of the package, from the ground up. A unit is a subpackage (``fi_ffi.ops`` with ``fi_ffi.ops.attention``),
# a top-level module, or a module of ``fi_ffi.tensor`` (the descriptor and the reading of stream arguments stand below
# the TVM-FFI layer, which packs the one and sets the other current; the intake above it, since it asks TVM-FFI for the
# current stream); ``fi_ffi`` is the package's face
# (``__init__``: the lazy public names).
FLOORS: tuple[tuple[str, ...], ...] = (
    (
        "fi_ffi.errors",
        "fi_ffi.dtypes",
        "fi_ffi.caches",
        "fi_ffi.cdecl",
        "fi_ffi.generator",
        "fi_ffi.moved",
        "fi_ffi.variables",
    ),
    ("fi_ffi.tensor.descriptor", "fi_ffi.loader"),  # descriptors; libraries
    ("fi_ffi.tensor", "fi_ffi.tensor.protocols", "fi_ffi.cuda"),  # the descriptor's face; static types; CUDA
    ("fi_ffi.tensor.streams",),  # reading stream (and device ordinal) arguments
    ("fi_ffi.abi",),  # the TVM-FFI C API (with its current stream per device and thread)
    ("fi_ffi.tensor.intake",),  # each producer type read (as_tensor; layout key and data pointer; the inline reads)
    ("fi_ffi.launch",),  # the calling engine
    ("fi_ffi.ops", "fi_ffi.comm"),  # op families; tensor parallelism
    ("fi_ffi",),  # the public face
    ("fi_ffi.cli",),  # the command line, the first-use checks
    ("fi_ffi.__main__",),
)


def unit_of(module: str, floors: tuple[tuple[str, ...], ...] = FLOORS) -> str:
    """The longest unit of ``floors`` that ``module`` is or lies in: ``fi_ffi.ops.attention.decode`` →
    ``fi_ffi.ops``; ``fi_ffi.tensor.intake`` → itself; ``fi_ffi`` → ``fi_ffi``; a module of no unit → its first two
    components (which :func:`test_every_module_stands_on_a_floor` then names)."""
    units = sorted((unit for floor in floors for unit in floor), key=len, reverse=True)
    package = floors[-1][0].split(".")[0]  # fi_ffi, fi_engine: the face is a unit of its own module only
    found = next((u for u in units if module == u or module.startswith(u + ".")), None)
    if found is None or (found == package and module != package):
        return ".".join(module.split(".")[:2])
    return found


def floor_of(unit: str, floors: tuple[tuple[str, ...], ...] = FLOORS) -> int:
    return next(i for i, units in enumerate(floors) if unit in units)


def module_imports(trees: dict[str, ast.Module]) -> dict[str, dict[str, set[str]]]:
    """Module → imported fi_ffi module → the names taken from it. ``from .. import caches`` imports
    ``fi_ffi.caches`` (a submodule), not the package's face; every import counts, function-local included."""
    packages = {name for name in trees if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    out: dict[str, dict[str, set[str]]] = {}
    for module, tree in trees.items():
        found: dict[str, set[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in trees:
                        found.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if module in packages else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in trees:
                        found.setdefault(f"{target}.{alias.name}", set())
                    elif target in trees:
                        found.setdefault(target, set()).add(alias.name)
        out[module] = found
    return out


def floor_violations(
    imports: dict[str, dict[str, set[str]]], floors: tuple[tuple[str, ...], ...] = FLOORS
) -> list[str]:
    """``a -> b`` for every import of a module of another unit that is not on a lower floor."""
    bad = []
    for module, targets in imports.items():
        here = unit_of(module, floors)
        for target in targets:
            there = unit_of(target, floors)
            if there != here and floor_of(there, floors) >= floor_of(here, floors):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_every_module_stands_on_a_floor() -> None:
    placed = {unit for units in FLOORS for unit in units}
    assert {unit_of(module) for module in sources()} <= placed, "add the new unit to FLOORS"


def test_no_import_runs_up_or_sideways_between_floors() -> None:
    assert floor_violations(module_imports(sources())) == []


def test_the_floor_check_finds_an_upward_and_a_sideways_import() -> None:  # the check above could fail
    imports = {
        "fi_ffi.launch.launcher": {"fi_ffi.ops.norm": set(), "fi_ffi.tensor": set()},
        "fi_ffi.comm.control": {"fi_ffi.ops.attention.decode": {"x"}},
        "fi_ffi.ops.norm": {"fi_ffi.launch.launcher": set(), "fi_ffi.ops.rope": set()},
    }
    assert floor_violations(imports) == [
        "fi_ffi.comm.control -> fi_ffi.ops.attention.decode",
        "fi_ffi.launch.launcher -> fi_ffi.ops.norm",
    ]


def test_comm_takes_no_private_names_of_ops_or_the_launcher() -> None:
    taken = []
    for module, targets in module_imports(sources()).items():
        if unit_of(module) == "fi_ffi.comm":
            for target, names in targets.items():
                if unit_of(target) in ("fi_ffi.ops", "fi_ffi.launch"):
                    taken += [f"{module} takes {target}.{n}" for n in sorted(names) if n.startswith("_")]
    assert taken == []


def test_from_package_import_submodule_is_an_import_of_the_submodule() -> None:
    trees = {"fi_ffi": ast.parse(""), "fi_ffi.caches": ast.parse(""), "fi_ffi.ops.norm": ast.parse("")}
    trees["fi_ffi.launch.kernels"] = ast.parse("def f():\n    from .. import caches\n    from ..ops.norm import _x\n")
    assert module_imports(trees)["fi_ffi.launch.kernels"] == {"fi_ffi.caches": set(), "fi_ffi.ops.norm": {"_x"}}


ATTENTION_OPS = ("decode", "prefill", "sink", "mla", "cascade")


def test_the_attention_ops_take_no_private_names_of_one_another() -> None:
    # siblings share through common.py or each other's public names (sink builds on prefill's run declarations)
    ops = {f"fi_ffi.ops.attention.{name}" for name in ATTENTION_OPS}
    assert ops <= set(sources())  # the check below could not fail if a module were renamed away
    taken = [
        f"{module} takes {target}.{n}"
        for module, targets in module_imports(sources()).items()
        if module in ops
        for target, names in targets.items()
        if target in ops and target != module
        for n in sorted(names)
        if n.startswith("_")
    ]
    assert taken == []


def test_no_attention_module_takes_a_private_name_of_another_module() -> None:
    # the workspace's device scope and the producers' reader cache are public names (cuda_runtime.DeviceScope,
    # intake.producers): what one module needs of another it names through its public surface
    trees = sources()
    attention = {m for m in trees if m.startswith("fi_ffi.ops.attention.")}
    assert {"fi_ffi.ops.attention.mla", "fi_ffi.ops.attention.workspace", "fi_ffi.ops.attention.common"} <= attention
    taken = [
        f"{module} takes {target}.{n}"
        for module, targets in module_imports(trees).items()
        if module in attention
        for target, names in targets.items()
        if target != module
        for n in sorted(names)
        if n.startswith("_") and not n.startswith("__")
    ]
    assert taken == []


def test_the_design_layout_names_every_unit_and_every_module_of_launch_ops_tensor_and_cuda() -> None:
    # docs/design.md's tree is the contributor's map: a file added or moved without it goes missing here
    text = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    tree = text[text.index("```\nfi_ffi/\n") : text.index("```", text.index("```\nfi_ffi/\n") + 3)]
    named = set(re.findall(r"[\w.]+", tree))
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    missing = sorted(n for n in top if n not in named and f"{n}/" not in tree)
    for folder in ("launch", "ops", "ops/attention", "tensor", "cuda"):
        missing += [
            f"{folder}/{p.name}"
            for p in (PACKAGE / folder).glob("*.py")
            if p.stem != "__init__" and p.stem not in named
        ]
    assert len(top) > 15 and missing == []


def test_the_top_level_of_ops_holds_only_op_families() -> None:
    # an op family declares its entry points (DECLARATIONS, bound by tests/launch/test_declarations.py); what serves
    # several families or the engine belongs in ops/attention/ or fi_ffi/launch/, not beside the families
    trees = sources()
    top = [m for m in trees if m.startswith("fi_ffi.ops.") and m.count(".") == 2 and m != "fi_ffi.ops.attention"]
    assert len(top) > 10
    declaring = {
        m
        for m in top
        for node in trees[m].body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DECLARATIONS" for t in node.targets)
    }
    assert sorted(set(top) - declaring) == []


def test_no_module_takes_a_private_name_of_another_unit() -> None:
    # what one unit needs of another is part of that unit's public surface (tensor.WIRE_DEVICE_TYPE, MAX_NDIM)
    taken = [
        f"{module} takes {target}.{n}"
        for module, targets in module_imports(sources()).items()
        for target, names in targets.items()
        if unit_of(target) != unit_of(module)
        for n in sorted(names)
        if n.startswith("_") and not n.startswith("__")
    ]
    assert taken == []


# ---- one writer of Tensor's fields -------------------------------------------------------------------------------

DESCRIPTOR = "fi_ffi.tensor.descriptor"  # the one module that builds Tensors without __init__ and writes their fields


def tensor_private_slots() -> set[str]:
    """The private slots of :class:`fi_ffi.tensor.descriptor.Tensor`, read from its ``__slots__``."""
    tree = ast.parse((PACKAGE / "tensor" / "descriptor.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Tensor":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "__slots__":
                    slots = ast.literal_eval(stmt.value)
                    return {s for s in slots if s.startswith("_") and not s.startswith("__")}
    raise AssertionError("Tensor.__slots__ not found")


def tensor_writes(module: str, tree: ast.Module, private: set[str]) -> list[str]:
    """Where ``module`` builds a Tensor without ``__init__`` (``Tensor.__new__``, ``object.__new__(Tensor)``, an
    alias of either) or writes a private slot of Tensor (``x._lid = ...``, ``setattr(x, "_lid", ...)``). A write
    through ``self`` is a class's own field (only Tensor's own methods could write a Tensor's so)."""
    found = []
    aliases = {  # ``_alloc = Tensor.__new__`` / ``_new = object.__new__``
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and node.value.attr == "__new__"
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "__new__" and getattr(node.value, "id", "") == "Tensor":
            found.append(f"{module}:{node.lineno} Tensor.__new__")
        elif isinstance(node, ast.Call) and node.args and getattr(node.args[0], "id", "") == "Tensor":
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "__new__") or getattr(func, "id", "") in aliases:
                found.append(f"{module}:{node.lineno} a Tensor built without __init__")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if (
                        isinstance(leaf, ast.Attribute)
                        and leaf.attr in private
                        and isinstance(leaf.ctx, ast.Store)
                        and getattr(leaf.value, "id", "") != "self"  # another class's own field of that name
                    ):
                        found.append(f"{module}:{node.lineno} writes .{leaf.attr}")
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("setattr", "__setattr__")
            and any(isinstance(a, ast.Constant) and a.value in private for a in node.args)
        ):
            found.append(f"{module}:{node.lineno} setattr of a private slot")
    return found


def engine_sources() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted((PACKAGE.parent / "fi_engine").rglob("*.py"))
    }


def test_only_the_descriptor_module_builds_tensors_or_writes_their_private_fields() -> None:
    private = tensor_private_slots()
    assert private == {"_lid", "_block"}  # a slot added to Tensor: the check covers it from __slots__
    trees = {**sources(), **engine_sources()}
    assert tensor_writes(DESCRIPTOR, trees[DESCRIPTOR], private) != []  # the builders are there, and are seen
    found = [w for module, tree in trees.items() if module != DESCRIPTOR for w in tensor_writes(module, tree, private)]
    assert found == []


def test_the_tensor_writer_check_finds_each_way_of_building_or_writing_a_tensor() -> None:  # the check above could fail
    private = {"_lid", "_block"}
    cases = {
        "t = Tensor.__new__(Tensor)": "Tensor.__new__",
        "_alloc = Tensor.__new__": "Tensor.__new__",
        "t = object.__new__(Tensor)": "without __init__",
        "_new = object.__new__\nt = _new(Tensor)": "without __init__",
        "t._lid = 3": "writes ._lid",
        "t.shape, t._lid = s, 3": "writes ._lid",
        "t._block: object = None": "writes ._block",
        "setattr(t, '_lid', 3)": "setattr",
        "object.__setattr__(t, '_block', None)": "setattr",
    }
    for source, what in cases.items():
        found = tensor_writes("m", ast.parse(source), private)
        assert any(what in f for f in found), (source, found)
    allowed = "t = Tensor(0, (1,), 'float16')\nx = t._lid\nother._lidx = 1\nobject.__new__(Plan)\nself._block = None"
    assert tensor_writes("m", ast.parse(allowed), private) == []


# ---- the engine's boundary: fi_engine uses fi_ffi's public API only, and fi_ffi never imports fi_engine ----------

ENGINE = PACKAGE.parent / "fi_engine"
# Modules of fi_ffi whose ``__all__`` is public (besides ``fi_ffi.__all__``): what the engine, or any user, may take.
PUBLIC_MODULES = (
    "fi_ffi.errors",
    "fi_ffi.dtypes",
    "fi_ffi.loader",
    "fi_ffi.comm",
    "fi_ffi.cuda",
    "fi_ffi.cdecl",
    "fi_ffi.tensor.protocols",
    "fi_ffi.moved",  # its finder, given the engine's own table of old paths (fi_engine.moved)
    "fi_ffi.ops.segment_gemm",  # problems laid out by the caller (SegmentGEMMArgs): the engine's LoRA segment form
)


def public_names() -> dict[str, set[str]]:
    """``"fi_ffi"`` and each of :data:`PUBLIC_MODULES` → its public names (``__all__``; a module without one: its
    names not starting with ``_``). Read by importing them, which loads no shared library."""
    import importlib

    found = {}
    for name in ("fi_ffi", *PUBLIC_MODULES):
        module = importlib.import_module(name)
        found[name] = set(getattr(module, "__all__", None) or (n for n in vars(module) if not n.startswith("_")))
    return found


def private_uses(tree: ast.Module, public: dict[str, set[str]]) -> list[str]:
    """Where a module's source takes from fi_ffi anything but a public name: ``import fi_ffi.x`` or ``from fi_ffi.x
    import y`` of a module that is not public or a name not in its ``__all__``, and ``fi_ffi.x`` / ``fi_ffi.m.x``
    attribute chains in code (through ``import fi_ffi``, under any alias) past the public names. Every import
    counts, function-local ones too."""
    bad: list[str] = []
    roots: dict[str, str] = {}  # local name -> the public module it is bound to (``import fi_ffi`` -> fi_ffi)

    def take(module: str, name: str, line: int) -> None:
        if module not in public:
            bad.append(f"{line}: {module}.{name}" if name else f"{line}: {module}")
        elif name and name not in public[module] and f"{module}.{name}" not in public:
            bad.append(f"{line}: {module}.{name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fi_ffi" or alias.name.startswith("fi_ffi."):
                    take(alias.name, "", node.lineno)
                    if alias.asname or alias.name == "fi_ffi":
                        roots[alias.asname or alias.name] = alias.name
                    else:  # ``import fi_ffi.errors`` binds ``fi_ffi``: its chains are read from the root
                        roots["fi_ffi"] = "fi_ffi"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "fi_ffi":
            module = str(node.module)
            for alias in node.names:
                if f"{module}.{alias.name}" in public:  # a public module taken from its package
                    roots[alias.asname or alias.name] = f"{module}.{alias.name}"
                else:
                    take(module, alias.name, node.lineno)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain: list[str] = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        parent = getattr(node, "parent", None)
        if isinstance(parent, ast.Attribute) or not isinstance(inner, ast.Name) or inner.id not in roots:
            continue  # only the whole chain, from a name bound to fi_ffi or a public module
        module = roots[inner.id]
        for part in chain:
            if f"{module}.{part}" in public:  # fi_ffi.errors: a public module, read on
                module = f"{module}.{part}"
                continue
            take(module, part, node.lineno)
            break
    return sorted(set(bad), key=lambda text: int(text.split(":")[0]))


def parsed(text: str) -> ast.Module:
    """``text`` parsed, each node knowing its parent (``.parent``), so that a chain is read once, whole."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def test_the_engine_takes_only_public_names_of_fi_ffi() -> None:
    public = public_names()
    taken = {
        path.relative_to(ENGINE.parent).as_posix(): found
        for path in sorted(ENGINE.rglob("*.py"))
        if (found := private_uses(parsed(path.read_text(encoding="utf-8")), public))
    }
    assert len(list(ENGINE.rglob("*.py"))) > 15
    assert taken == {}


def test_the_engine_check_finds_private_names() -> None:  # the check above could fail
    public = {"fi_ffi": {"Tensor", "rmsnorm"}, "fi_ffi.errors": {"FiFFIError"}, "fi_ffi.cuda": {"check"}}
    source = """
import fi_ffi
import fi_ffi.launch.checks
import fi_ffi.errors as errs
from fi_ffi import rmsnorm, _EXPORTS
from fi_ffi.errors import FiFFIError, _private
from fi_ffi.cuda import check, runtime
from fi_ffi import cuda
def f():
    from fi_ffi.ops.router import routing_limits
    fi_ffi.Tensor(0, (1,), "uint8", 0)
    fi_ffi.ops.norm.rmsnorm
    fi_ffi.errors.FiFFIError, fi_ffi.errors.KernelError
    errs.FiFFIError, errs.LoaderError
    cuda.check, cuda.runtime.runtime
"""
    assert private_uses(parsed(source), public) == [
        "3: fi_ffi.launch.checks",
        "5: fi_ffi._EXPORTS",
        "6: fi_ffi.errors._private",
        "7: fi_ffi.cuda.runtime",
        "10: fi_ffi.ops.router.routing_limits",
        "12: fi_ffi.ops",
        "13: fi_ffi.errors.KernelError",
        "14: fi_ffi.errors.LoaderError",
        "15: fi_ffi.cuda.runtime",
    ]


def imports_of(package: str, trees: dict[str, ast.Module], allowed: tuple[str, ...] = ()) -> list[str]:
    """``module:line`` for every import (function-local too) of ``package`` or a module of it by a module of
    ``trees`` outside the units ``allowed``; a string naming it (``fi_ffi.moved``'s table of old paths) is no
    import."""
    found = []
    for module, tree in trees.items():
        if any(module == u or module.startswith(u + ".") for u in allowed):
            continue
        for node in ast.walk(tree):
            names = statement_imports(node)
            if any(n == package or n.startswith(package + ".") for n in names):
                found.append(f"{module}:{node.lineno}")
    return found


def engine_imports(trees: dict[str, ast.Module]) -> list[str]:
    """``module:line`` for every import of ``fi_engine`` (or a module of it) by a module of ``trees``."""
    return imports_of("fi_engine", trees)


def test_fi_ffi_never_imports_the_engine() -> None:
    # `fi-ffi generate` forwards to `python -m fi_engine generate` in a subprocess: no import
    assert engine_imports(sources()) == []


def test_the_engine_import_check_finds_one() -> None:  # the check above could fail
    trees = {
        "fi_ffi.cli": ast.parse("def f():\n    from fi_engine.models.llama import LlamaEngine\n"),
        "fi_ffi.ops.norm": ast.parse("import fi_engine\n"),
        "fi_ffi.moved": ast.parse('OLD = {"fi_ffi.models": "fi_engine"}\n'),
    }
    assert engine_imports(trees) == ["fi_ffi.cli:2", "fi_ffi.ops.norm:1"]


# ---- the engine's floors: subpackages by concern, every import one way -------------------------------------------

# fi_engine from the ground up (docs/engine.md draws it): the host-only readers of a checkpoint and of text, the
# launch layer over the GPU (the one importer of fi_ffi), the model's building blocks, the runtime room by room (the
# values and the interface at its ground, then the requests and the scheduler, the logits' way to tokens, the model on
# the GPU, a step's passes and when they launch, the loop, the engine assembled), then the families and the servers
# side by side, neither importing the other.
ENGINE_FLOORS: tuple[tuple[str, ...], ...] = (
    ("fi_engine.values", "fi_engine.moved"),  # argument checks; the old module paths
    ("fi_engine.checkpoint", "fi_engine.text"),  # config.json, safetensors; tokenizer, chat template
    ("fi_engine.kernels",),  # fi_ffi's ops, cuBLAS, the engine's CUDA kernels, graphs
    # MoE and routing, tensor parallelism, the FP8 KV cache; LoRA adapters (PEFT files, GPU slots, their launches)
    ("fi_engine.layers", "fi_engine.lora"),
    # a request's sampling settings (a value); the interface a model family implements
    ("fi_engine.runtime.sampling_params", "fi_engine.runtime.family"),
    ("fi_engine.runtime.stepping", "fi_engine.runtime.sched"),  # the step protocol; requests, pages, the scheduler
    ("fi_engine.runtime.settings", "fi_engine.runtime.sample"),  # the engine's settings; sampler, logits, speculation
    ("fi_engine.runtime.worker",),  # the model runner and its parts (it holds the sampler)
    # a prefill pass or a decode step through the runner, processor and sampler; when the loop launches them
    ("fi_engine.runtime.passes", "fi_engine.runtime.launch_policy"),
    ("fi_engine.runtime.serving",),  # the serving loop
    ("fi_engine.runtime.engine", "fi_engine.runtime"),  # the engine assembled; the runtime's face
    ("fi_engine.models", "fi_engine.serve"),  # the families and their registry; the servers
    ("fi_engine.cli",),
    ("fi_engine", "fi_engine.__main__"),
)
ENGINE_ROOT = PACKAGE.parent / "fi_engine"
# what imports fi_ffi: the launch layer, and the old-path table handed to fi_ffi's moved-module finder
FI_FFI_IMPORTERS = ("fi_engine.kernels", "fi_engine.moved")


def test_every_engine_module_stands_on_a_floor_and_imports_only_below() -> None:
    trees = sources(ENGINE_ROOT)
    placed = {unit for units in ENGINE_FLOORS for unit in units}
    assert {unit_of(module, ENGINE_FLOORS) for module in trees} == placed, "add the new unit to ENGINE_FLOORS"
    assert floor_violations(module_imports(trees), ENGINE_FLOORS) == []


def test_the_engine_units_form_no_cycle() -> None:
    graph: dict[str, set[str]] = {unit: set() for units in ENGINE_FLOORS for unit in units}
    for module, targets in module_imports(sources(ENGINE_ROOT)).items():
        here = unit_of(module, ENGINE_FLOORS)
        graph[here] |= {unit_of(t, ENGINE_FLOORS) for t in targets} - {here}
    assert cycle(graph) == [], graph
    assert graph["fi_engine.models"] >= {"fi_engine.runtime.engine", "fi_engine.layers"}  # the graph is read at all


def test_no_engine_module_imports_itself_back() -> None:
    # no cycle of modules either, inside a unit (a TYPE_CHECKING import counts: the type checker follows it)
    imports = module_imports(sources(ENGINE_ROOT))
    graph = {module: set(targets) & set(imports) - {module} for module, targets in imports.items()}
    assert cycle(graph) == []


def test_the_engine_floor_check_finds_an_upward_import() -> None:  # the check above could fail
    trees = {
        "fi_engine.kernels.dense": ast.parse("from ..runtime.paging import Request\n"),
        "fi_engine.runtime.paging": ast.parse("from ..values import arg_int\n"),
        "fi_engine.serve.service": ast.parse("def f():\n    from ..models import registry\n"),
        "fi_engine.models.registry": ast.parse(""),
        "fi_engine.values": ast.parse(""),
    }
    assert floor_violations(module_imports(trees), ENGINE_FLOORS) == [
        "fi_engine.kernels.dense -> fi_engine.runtime.paging",
        "fi_engine.serve.service -> fi_engine.models.registry",
    ]


def test_the_engine_root_keeps_only_its_command_face_and_ground() -> None:
    top = sorted(p.stem for p in ENGINE_ROOT.glob("*.py"))
    folders = sorted(p.name for p in ENGINE_ROOT.iterdir() if (p / "__init__.py").is_file())
    assert top == ["__init__", "__main__", "cli", "moved", "values"]
    assert folders == ["checkpoint", "kernels", "layers", "lora", "models", "runtime", "serve", "text"]


def family_named(folder: Path, families: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """The modules under ``folder`` whose name holds a family's name or one of its model types (``families``: each
    family's label and model types), as ``path: family``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        stem = path.stem.lower()
        for label, types in families:
            words = {label.lower().replace(" ", "").replace("-", "_"), *types}
            if any(word in stem for word in words):
                found.append(f"{path.relative_to(folder.parent).as_posix()}: {label}")
    return found


def test_no_module_of_the_checkpoint_or_the_runtime_is_a_familys() -> None:
    # a family's config reader, quantization scheme and options live with the family (fi_engine.models); checkpoint
    # and the runtime serve every family (docs/ADDING_A_MODEL.md)
    from fi_engine.models.registry import FAMILIES

    families = [(f.label, f.model_types) for f in FAMILIES]
    assert len(families) >= 4
    assert family_named(ENGINE_ROOT / "models", families)  # the check reads names at all
    assert family_named(ENGINE_ROOT / "checkpoint", families) == []
    assert family_named(ENGINE_ROOT / "runtime", families) == []


def fi_ffi_importers(trees: dict[str, ast.Module], allowed: tuple[str, ...] = FI_FFI_IMPORTERS) -> list[str]:
    """``module:line`` for every import of fi_ffi (function-local too) by a module outside the units ``allowed``."""
    return imports_of("fi_ffi", trees, allowed)


def test_only_the_kernels_layer_imports_fi_ffi() -> None:
    # the rest of the engine reaches fi_ffi's ops, errors and devices through fi_engine.kernels (kernels.flashinfer)
    trees = sources(ENGINE_ROOT)
    assert fi_ffi_importers({m: trees[m] for m in ("fi_engine.kernels.flashinfer", "fi_engine.moved")}, ())
    assert fi_ffi_importers(trees) == []


def test_the_fi_ffi_import_check_finds_one() -> None:  # the check above could fail
    trees = {
        "fi_engine.runtime.engine": ast.parse("def f():\n    from fi_ffi.cuda import gpus\n"),
        "fi_engine.models.gemma2": ast.parse("import fi_ffi\n"),
        "fi_engine.kernels.dense": ast.parse("import fi_ffi\n"),
    }
    assert fi_ffi_importers(trees) == ["fi_engine.runtime.engine:2", "fi_engine.models.gemma2:1"]


# ---- a family reaches the engine only through its family interface -----------------------------------------------


def private_reaches(tree: ast.Module) -> list[str]:
    """``line: expression`` for every private attribute (``_name``, not ``__dunder__``) of another object that
    ``tree`` reads or writes: anything but ``self._x``, ``cls._x`` and ``super()._x`` (an object's own)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super":
                continue
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_model_module_reaches_a_private_attribute_of_another_object() -> None:
    # the families read and set the engine through the public attributes and methods RunnerState declares (the family
    # interface), and keep their own state on themselves
    models = {m: t for m, t in sources(ENGINE_ROOT).items() if m.startswith("fi_engine.models.")}
    assert {"fi_engine.models.llama", "fi_engine.models.deepseek", "fi_engine.models.gemma2"} <= set(models)
    assert {m: found for m, t in models.items() if (found := private_reaches(t))} == {}


def test_the_private_attribute_check_finds_each_kind_of_reach() -> None:  # the check above could fail
    source = (
        "def load(self, eng):\n"
        "    eng._wqkv = []\n"  # a write
        "    x = eng._buf.h\n"  # a read
        "    eng.dense._fn(1)\n"  # a private method of an object the engine holds
        "    self._planned = None\n"  # its own: allowed
        "    super()._load(eng)\n"  # its own: allowed
        "    return eng.__class__\n"  # a dunder: allowed
    )
    assert private_reaches(ast.parse(source)) == ["2: eng._wqkv", "3: eng._buf", "4: eng.dense._fn"]
