"""Entry-point declarations: what a kernel module's function takes, as data.

A :class:`Declaration` names one exported entry point (``__tvm_ffi_<entry>`` of a module) and lists its
parameters in wire order, each a :class:`Param` with its name (as in FlashInfer's ``csrc/*_binding.cu``) and
its **wire type**, spelled exactly as the module prints it in its own signature (the text a zero-argument
call returns, e.g. ``rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void``). So a
declaration can be checked against the module it is bound to (:func:`check_signature`), and a module built
from another FlashInfer release with another argument list is refused by name instead of being called wrong.

The wire types fi_ffi can pass:

=========================  ==========================================================================
``DLTensor*``              a tensor (descriptor or any producer), written into a record the call owns
``Optional<DLTensor*>``    the same, or None
``ffi.Tensor``             a tensor passed as a TVM-FFI Tensor object (made for the call, released after)
``Optional<ffi.Tensor>``   the same, or None
``int`` / ``float`` /      scalars (int64, float64, bool)
``bool``
``Optional<int>``          an int or None
``Optional<float>``        a float or None
``std::string``            a short text (passed as a C string)
``Array<int>``             a TVM-FFI object handed back by a plan function (the plan info), passed as is;
                           for setup calls (:mod:`fi_ffi.comm.control`) a list of ints
``Array<Array<int>>``      setup calls only: a list of lists of ints
``DataType``               setup calls only: a dtype
=========================  ==========================================================================

Setup calls (once per communicator, not per step) are packed by :func:`fi_ffi.comm.control.call`; the
launcher (every per-step call) refuses the last two types.

Nothing here knows byte offsets: :mod:`fi_ffi.launch.launcher` lays out the frame from the declaration.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a parameter every call must pass

TENSOR = "DLTensor*"
OPT_TENSOR = "Optional<DLTensor*>"
FFI_TENSOR = "ffi.Tensor"
OPT_FFI_TENSOR = "Optional<ffi.Tensor>"
INT = "int"
OPT_INT = "Optional<int>"
FLOAT = "float"
OPT_FLOAT = "Optional<float>"
BOOL = "bool"
STRING = "std::string"
ARRAY = "Array<int>"
ARRAY_OF_ARRAYS = "Array<Array<int>>"
DATA_TYPE = "DataType"

WIRE_TYPES = (
    TENSOR,
    OPT_TENSOR,
    FFI_TENSOR,
    OPT_FFI_TENSOR,
    INT,
    OPT_INT,
    FLOAT,
    OPT_FLOAT,
    BOOL,
    STRING,
    ARRAY,
    ARRAY_OF_ARRAYS,
    DATA_TYPE,
)
SETUP_ONLY_TYPES = frozenset((ARRAY_OF_ARRAYS, DATA_TYPE))
TENSOR_TYPES = frozenset((TENSOR, OPT_TENSOR))
OBJECT_TENSOR_TYPES = frozenset((FFI_TENSOR, OPT_FFI_TENSOR))
OPTIONAL_TYPES = frozenset((OPT_TENSOR, OPT_FFI_TENSOR, OPT_INT, OPT_FLOAT))


@dataclass(frozen=True)
class Param:
    """One parameter of an entry point.

    Attributes:
        name: the parameter's name (FlashInfer's C++ name), used in every error message about it.
        wire: its wire type (one of :data:`WIRE_TYPES`).
        output: the kernel writes it (tensors only): rows must not alias.
        per_call: a scalar that changes from call to call (a seed, an offset): written every call instead of
            being part of the validated layout the launcher remembers.
        default: the value used when the op does not pass it (:data:`REQUIRED`: it must pass it). Arguments a
            newer release added get defaults that reproduce the older behaviour, so one op call serves both
            declarations; an argument the bound module's declaration lacks may only be passed at its default.
    """

    name: str
    wire: str
    output: bool = False
    per_call: bool = False
    default: Any = field(default_factory=lambda: REQUIRED)

    def __post_init__(self) -> None:
        if self.wire not in WIRE_TYPES:
            raise ValueError(
                f"parameter {self.name!r}: unknown wire type {self.wire!r}; expected one of {', '.join(WIRE_TYPES)}"
            )
        if self.output and self.wire not in TENSOR_TYPES:
            raise ValueError(f"parameter {self.name!r}: only DLTensor* parameters can be outputs")


def tensor(name: str, *, output: bool = False) -> Param:
    """A ``DLTensor*`` parameter."""
    return Param(name, TENSOR, output=output)


def tensors(*names: str, output: bool = False) -> tuple[Param, ...]:
    """One ``DLTensor*`` parameter per name, in wire order: a declaration's run of plain tensors on one line
    (``*tensors("q", "k", "v")``)."""
    return tuple(Param(name, TENSOR, output=output) for name in names)


def optional_tensor(name: str, *, output: bool = False, default: Any = REQUIRED) -> Param:
    """An ``Optional<DLTensor*>`` parameter."""
    return Param(name, OPT_TENSOR, output=output, default=default)


def scalar(name: str, wire: str, default: Any = REQUIRED, *, per_call: bool = False) -> Param:
    """A scalar parameter (``int``, ``float``, ``bool``, ``Optional<int>``, ``std::string``)."""
    return Param(name, wire, per_call=per_call, default=default)


@dataclass(frozen=True)
class Declaration:
    """One entry point of a kernel module, as data.

    Attributes:
        entry: the exported function's name (the module exports ``__tvm_ffi_<entry>``).
        params: the parameters in wire order.
        returns: the result type as the module prints it (``void``, ``Array<int>``, ...).
        release: the FlashInfer releases whose modules have this argument list (for messages), e.g. ``"0.6.3"``.
    """

    entry: str
    params: tuple[Param, ...]
    returns: str = "void"
    release: str = ""
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        names = tuple(p.name for p in self.params)
        if len(set(names)) != len(names):
            raise ValueError(f"{self.entry}: duplicate parameter names in {names}")
        object.__setattr__(self, "names", names)

    @property
    def signature(self) -> str:
        """The signature text the module should print for this declaration."""
        args = ", ".join(f"{i}: {p.wire}" for i, p in enumerate(self.params))
        return f"{self.entry}({args}) -> {self.returns}"


def declare(
    entry: str, params: Sequence[Param | tuple[str, str]], returns: str = "void", release: str = ""
) -> Declaration:
    """A :class:`Declaration`; parameters may be given as ``(name, wire)`` pairs."""
    return Declaration(entry, tuple(p if isinstance(p, Param) else Param(*p) for p in params), returns, release)


_SIGNATURE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z_0-9]*)\((?P<args>.*)\) -> (?P<ret>.+)$")
_ARG = re.compile(r"\s*(\d+): (.+)\s*")


@dataclass(frozen=True)
class ModuleSignature:
    """An entry point's signature as the module states it: name, argument wire types, result type."""

    name: str
    args: tuple[str, ...]
    returns: str

    @property
    def text(self) -> str:
        return f"{self.name}({', '.join(f'{i}: {a}' for i, a in enumerate(self.args))}) -> {self.returns}"


def parse_signature(text: str, entry: str) -> ModuleSignature | None:
    """Find ``entry``'s signature in ``text`` (a module's zero-argument error message); None if absent.

    TVM-FFI states it as ``...when calling: `name(0: T0, 1: T1) -> R`. Expected ...``; a bare signature line
    is accepted too.
    """
    candidates = text.split("`")[1::2] if "`" in text else text.splitlines()
    for candidate in candidates:
        found = _SIGNATURE.match(candidate.strip())
        if found and found["name"] == entry:
            return ModuleSignature(entry, _split_args(found["args"]), found["ret"].strip())
    return None


def _split_args(args: str) -> tuple[str, ...]:
    """Split ``0: A, 1: Optional<B, C>`` on top-level commas (types may contain ``<...,...>``)."""
    out: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in args:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        out.append("".join(current))
    types = []
    for item in out:
        m = _ARG.fullmatch(item)
        types.append(m.group(2).strip() if m else item.strip())
    return tuple(types)


def signature_mismatch(decl: Declaration, found: ModuleSignature | None) -> str:
    """Why ``found`` does not match ``decl`` (empty when it matches)."""
    if found is None:
        return "the module did not state a signature for it"
    if len(found.args) != len(decl.params):
        return f"it takes {len(found.args)} arguments, the declaration {len(decl.params)}"
    for i, (param, wire) in enumerate(zip(decl.params, found.args, strict=True)):
        if param.wire != wire:
            return f"argument {i} ({param.name}) is {wire} in the module, {param.wire} in the declaration"
    if found.returns != decl.returns:
        return f"it returns {found.returns}, the declaration {decl.returns}"
    return ""


__all__ = [
    "ARRAY",
    "ARRAY_OF_ARRAYS",
    "BOOL",
    "DATA_TYPE",
    "FFI_TENSOR",
    "FLOAT",
    "INT",
    "OPT_FFI_TENSOR",
    "OPT_FLOAT",
    "OPT_INT",
    "OPT_TENSOR",
    "REQUIRED",
    "SETUP_ONLY_TYPES",
    "STRING",
    "TENSOR",
    "WIRE_TYPES",
    "Declaration",
    "ModuleSignature",
    "Param",
    "declare",
    "optional_tensor",
    "parse_signature",
    "scalar",
    "select",
    "signature_mismatch",
    "tensor",
    "tensors",
]


def select(declarations: Sequence[Declaration], found: ModuleSignature | None) -> Declaration | None:
    """The declaration among ``declarations`` (one entry point, several releases) that ``found`` matches."""
    for decl in declarations:
        if not signature_mismatch(decl, found):
            return decl
    return None
