"""Every declared entry point against the module's own signature, for every module of both shared wheels.

Each op family lists its declarations in a ``DECLARATIONS`` tuple of ``(module URI pattern, Declaration)``
(the pattern is a regular expression matched against whole module URIs). Here each declaration is bound
to every pinned module its pattern matches and checked the way the launcher checks it at bind time; a
declaration that matches no module is a mistake too. Runs on CPU: the modules load and state their signature.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import fi_ffi.ops
from fi_ffi.abi import wire
from fi_ffi.errors import LoaderError
from fi_ffi.ops.kernels import entry_point
from fi_ffi.ops.launcher import bound_entry


def all_declarations() -> list[tuple[str, str, wire.Declaration]]:
    """(op module, URI pattern, declaration) for every op module that declares entry points."""
    found = []
    for info in pkgutil.iter_modules(fi_ffi.ops.__path__):
        module = importlib.import_module(f"fi_ffi.ops.{info.name}")
        for pattern, decl in getattr(module, "DECLARATIONS", ()):
            found.append((info.name, pattern, decl))
    return found


DECLARED = all_declarations()


def test_every_op_family_declares_its_entry_points() -> None:
    assert {family for family, _, _ in DECLARED} >= {"norm"}
    for family, pattern, decl in DECLARED:
        re.compile(pattern)
        assert decl.params, f"{family}: {decl.entry} declares no parameters"


@pytest.mark.parametrize(("family", "pattern", "decl"), DECLARED,
                         ids=[f"{f}:{d.entry}:{p[:40]}" for f, p, d in DECLARED])
def test_declaration_matches_every_module_it_applies_to(kernel_modules: list[str], family: str, pattern: str,
                                                        decl: wire.Declaration) -> None:
    modules = [uri for uri in kernel_modules if re.fullmatch(pattern, uri)]
    assert modules, f"{family}: no pinned module matches {pattern!r} for {decl.entry}"
    for uri in modules:
        text = entry_point(uri, decl.entry).signature_text()
        found = wire.parse_signature(text, decl.entry)
        assert wire.signature_mismatch(decl, found) == "", f"{uri}: {text}"
        bound_entry(uri, decl)  # the launcher's own bind-time check accepts it


def test_a_declaration_from_another_release_is_refused_by_name(kernel_modules: list[str]) -> None:
    # norm.rmsnorm with an extra int inserted before the scalars, as a newer release might do
    from fi_ffi.ops.norm import RMSNORM

    shifted = wire.declare("rmsnorm", [*RMSNORM.params[:3], ("extra", wire.INT), *RMSNORM.params[3:]],
                           release="9.9")
    with pytest.raises(LoaderError) as info:
        bound_entry("norm", shifted)
    text = str(info.value)
    assert "module 'norm', entry point 'rmsnorm'" in text
    assert "expected: rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: int, 4: float, 5: bool) -> void" in text
    assert "found:    rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void" in text
    assert "takes 5 arguments, the declaration 6" in text
    retyped = wire.declare("rmsnorm", [*RMSNORM.params[:3], ("eps", wire.INT), RMSNORM.params[4]])
    with pytest.raises(LoaderError, match=r"argument 3 \(eps\) is float in the module, int in the declaration"):
        bound_entry("norm", retyped)


def test_signature_parsing_handles_nested_types() -> None:
    text = "Mismatched number of arguments when calling: `plan(0: DLTensor*, 1: Optional<ffi.Tensor>, " \
           "2: int) -> Tuple<Array<int>, int>`. Expected 3 but got 0 arguments"
    sig = wire.parse_signature(text, "plan")
    assert sig is not None
    assert sig.args == ("DLTensor*", "Optional<ffi.Tensor>", "int")
    assert sig.returns == "Tuple<Array<int>, int>"
    assert wire.parse_signature(text, "run") is None
