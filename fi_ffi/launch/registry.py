"""``@op``: a public op stated once, on its def.

An op of fi_ffi is a name of ``fi_ffi`` (``fi_ffi.rmsnorm``), a name of its family's ``__all__``, a function
calling a launch function (:func:`~fi_ffi.launch.launcher.launcher`) and, for some, an op ``fi_ffi.prepare`` packs.
The decorator on the def states all of it::

    _rmsnorm = launcher(RMSNORM, "norm", _check_2d_or_3d_out)


    @op(launch=_rmsnorm, packable=_out_first, flashinfer="flashinfer.norm.rmsnorm")
    def rmsnorm(input, weight, eps=1e-6, *, out, enable_pdl=False, stream=None): ...

and the rest is derived from it:

- **the family's ``__all__``**: at the family's import, each decorated name is added to its module's ``__all__``
  (created when the module states none; a family lists by hand only what is public at its own level and not an op
  of ``fi_ffi``: constants such as ``WORKSPACE_BYTES``, host helpers such as ``page.get_seq_lens``);
- **the exports row** of ``fi_ffi``: ``python tools/gen_init_stub.py`` reads the decorated defs and classes of
  ``fi_ffi/ops/`` with :mod:`ast` and writes the table :data:`fi_ffi.launch.exports.OPS` (name -> module) that
  ``fi_ffi/__init__.py`` adds to its hand-written rows (dtypes, errors, ``Tensor``...); ``--check`` and
  tests/package/test_exports.py fail when the table is stale;
- **the packable entry**: ``packable=`` (the op's wire mapping, see :class:`~fi_ffi.launch.packing.Packable`)
  registers the op with ``fi_ffi.prepare`` (:func:`fi_ffi.launch.packing.register`) at the family's import;
- **the launcher**: ``launch=`` records which launch function the op calls (:func:`launch_of`), so that
  tests/launch/test_declarations.py checks each op's declaration against its family's ``DECLARATIONS``.

Why this shape:

- The decorator returns the def itself (no wrapper): an op call is exactly the def's own code, with no extra
  Python call level (the hot path). It only records the op in module-level tables at import.
- The launch function stays a module global that the def's body reads (one global load per call, as before),
  written once, above the def, as ``_name = launcher(DECL, uri, check)``. A decorator that bound it as a
  global itself would hide the name from ruff and mypy (an undefined name to both); and many launch
  functions are not one-to-one with an op (``apply_rope`` and ``apply_rope_inplace`` share one; ``rmsnorm`` and
  ``qk_rmsnorm`` one declaration under two checks; attention ops choose theirs per variant at call time).
- The exports row is generated rather than collected at import: ``import fi_ffi`` imports no op module (the
  lazy ``__getattr__`` of PEP 562 imports one on first use), so the table of which module defines which op
  must exist before any op module runs. Reading it from the source with :mod:`ast` is what
  scientific-python's lazy-loader (SPEC 1) does with its ``.pyi``; here the result is committed as a plain
  dict literal (read at no cost) and checked, as the type stubs are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .packing import Packable, register

__all__ = ["flashinfer_of", "launch_of", "op", "ops"]

_Op = TypeVar("_Op", bound=Callable[..., Any])

_launch: dict[Callable[..., Any], Callable[..., Any] | None] = {}
_flashinfer: dict[Callable[..., Any], str | None] = {}


def op(
    *,
    launch: Callable[..., Any] | None = None,
    packable: Callable[..., Any] | None = None,
    nonempty: str | None = None,
    flashinfer: str | None = None,
) -> Callable[[_Op], _Op]:
    """Declare the decorated def (or class) a public op of ``fi_ffi`` and of its family module.

    Args:
        launch: the launch function the op calls (a :func:`~fi_ffi.launch.launcher.launcher` result), when it
            calls one fixed one; None for ops that choose theirs per call (variants) or call none (host helpers,
            plans, classes).
        packable: the op's wire mapping ``wire(launch, **arguments)`` (its own parameter names, ``stream``
            included), which the op itself calls with ``launch``: makes the op one ``fi_ffi.prepare`` packs.
            Requires ``launch``.
        nonempty: for a packable op that launches nothing for an empty tensor: that argument (see
            :class:`~fi_ffi.launch.packing.Packable`).
        flashinfer: the flashinfer-python function or wrapper method this op ports, dotted
            (``"flashinfer.norm.rmsnorm"``, ``"flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan"``): the
            op keeps its name's meaning, positional order and keywords (a test holds it to them); None where
            flashinfer-python has no such op.

    Returns:
        a decorator that records the op and returns it unchanged.
    """
    if packable is None and nonempty is not None:
        raise TypeError(f"nonempty: only a packable op takes it, got nonempty={nonempty!r} without packable")
    if packable is not None and launch is None:
        raise TypeError("launch: a packable op names its launch function (packable= maps arguments onto it)")

    def record(function: _Op) -> _Op:
        # a def's module namespace is its __globals__ (a module being executed, in sys.modules or not); a class's
        # is its module's
        namespace = getattr(function, "__globals__", None)
        if namespace is None:
            namespace = vars(sys.modules[function.__module__])
        names: list[str] = namespace.setdefault("__all__", [])
        if function.__name__ not in names:
            names.append(function.__name__)
            names.sort()
        _launch[function] = launch
        _flashinfer[function] = flashinfer
        if packable is not None:
            assert launch is not None  # checked above
            register({function: Packable(launch, packable, nonempty)})
        return function

    return record


def ops() -> list[Callable[..., Any]]:
    """Every op declared so far (the families imported), in declaration order."""
    return list(_launch)


def launch_of(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """The launch function ``function`` was declared with (None: it names none)."""
    return _launch[function]


def flashinfer_of(function: Callable[..., Any]) -> str | None:
    """The flashinfer-python function ``function`` ports (dotted), or None (see :func:`op`'s ``flashinfer``)."""
    return _flashinfer[function]
