"""Code generation: the Python source of a declaration's launch function, compiled and shown in tracebacks.

:func:`launch_source` writes, from a :class:`~fi_ffi.abi.wire.Declaration`, straight-line code with no loop over
parameters and no byte offset written by hand (the offsets come from :mod:`fi_ffi.abi.frame`). How a call runs:

1. **Read.** Each tensor argument gives ``(layout key, data pointer)`` (:func:`read_tensor_argument`: descriptors,
   torch tensors and CuPy arrays inline, any other producer through :mod:`fi_ffi.tensor.intake`). Scalars are
   their own keys.
2. **Look up.** The tuple of keys (plus ``context``) in this thread's frame cache (:mod:`fi_ffi.launch.images`).
3. **Test the pointers** against the entry's masks (one test of all against their union first) and its overlap
   rules. A pointer that fails, like a key not found, takes the slow path (:mod:`fi_ffi.launch.validation`), which
   raises the error naming the argument or builds and remembers the image.
4. **Write.** The image is copied over the frame in one slice assignment (skipped when the frame holds it from
   the previous call), then the data pointers and per-call values are written to their words.
5. **Call** the entry point (one cffi call) on the call's stream (:func:`invoke` when it is not TVM-FFI's
   current one).

:func:`compile_launch` compiles the source under a pseudo-filename (``<fi_ffi launcher module.entry>``) and
registers it with :mod:`linecache`, so a traceback through a launch function shows its lines and a debugger can
step through them.
"""

from __future__ import annotations

import keyword
import linecache
from collections.abc import Sequence
from typing import Any

from ..abi import wire
from ..abi.frame import call_on, pointer_word
from ..abi.objects import ARRAY
from ..abi.values import INT64_END, INT64_MIN
from ..dtypes import CUDA
from ..tensor import intake
from .images import ABSENT, PTR_END, Entry
from .validation import stream_of


def arg_names(decl: wire.Declaration) -> list[str]:
    """Python argument names of the launch function: the parameter names (a keyword gets a trailing ``_``)."""
    return [p.name + "_" if keyword.iskeyword(p.name) else p.name for p in decl.params]


# ---- tensor arguments: the reads come from the tensor intake (fi_ffi.tensor.intake.read_source) ------------------


def read_tensor_argument(i: int, a: str, optional: bool) -> list[str]:
    """Lines of the launch function that read tensor argument ``a`` (parameter ``i``) into ``_k{i}`` (its layout
    key) and ``_p{i}`` (its data pointer): the tensor intake's own source text (:func:`fi_ffi.tensor.intake.
    read_source`: descriptors, torch tensors and CuPy arrays inline, other producers through their reader, which
    raises for what it does not take; the slow path then names it). ``optional``: None is an absent tensor. The
    names these lines read are :func:`producer_globals`'."""
    return intake.read_source(a, f"_k{i}", f"_p{i}", ABSENT if optional else None)


def producer_globals() -> dict[str, Any]:
    """The globals :func:`read_tensor_argument`'s lines read (the intake's :func:`~fi_ffi.tensor.intake.
    read_globals`); after ``exec``, :func:`~fi_ffi.tensor.intake.follow_classes` keeps the classes read inline
    current."""
    return intake.read_globals()


# ---- the source --------------------------------------------------------------------------------------------------


def launch_source(
    decl: wire.Declaration, record_of: dict[int, int], accept_absent: bool = False, bound: Sequence[str] = ()
) -> str:
    """Python source of the launch function and of the key function for ``decl``.

    The launch function takes the parameters by name (required ones positional-or-keyword in wire order,
    those with defaults keyword-only), then ``stream``, ``context`` and ``**_absent`` (arguments of other
    releases' declarations, accepted only at their "off" value). Locals start with ``_`` so parameter names
    cannot collide with them. Parameters named in ``bound`` (scalars) are not arguments of the launch function:
    their values are ``_bound(context)`` (a function of the context, which the key holds), so a call neither
    passes nor keys them, and only the slow path asks for them (to check them and write them into the image).
    The key function takes every parameter and keys the same values as the launch function.
    ``record_of``: parameter index -> its DLTensor record's index.
    """
    params = decl.params
    names = arg_names(decl)
    bound_set = set(bound)
    read: list[str] = []  # computes _k{i} (and _p{i} for tensors)
    keys: list[str] = []
    ptrs: list[str] = []  # pointers written into DLTensor records
    tested: list[str] = []  # pointers of every tensor parameter: tested against the entry's rules each call
    writes: list[str] = []
    objects: list[int] = []
    for i, (p, a) in enumerate(zip(params, names, strict=True)):
        kind = p.wire
        if p.name in bound_set:
            if kind not in (wire.INT, wire.FLOAT, wire.BOOL) or p.per_call:
                raise ValueError(f"{decl.entry}: parameter {p.name}: only int, float and bool scalars can be bound")
            continue
        if kind in wire.TENSOR_TYPES or kind in wire.OBJECT_TENSOR_TYPES:
            read += read_tensor_argument(i, a, kind in wire.OPTIONAL_TYPES)
            keys.append(f"_k{i}")
            tested.append(f"_p{i}")
            if kind in wire.TENSOR_TYPES:
                ptrs.append(f"_p{i}")
                writes.append(f"_q[{pointer_word(len(params), record_of[i])}] = _p{i}")
            else:
                objects.append(i)
        elif kind == wire.ARRAY:
            read.append(f"_h{i} = {a}.handle")
            read.append(f"if not _h{i} or {a}.type_index != {ARRAY}: raise _Slow")
            writes.append(f"_q[{2 * i + 1}] = _h{i}")
        elif p.per_call:
            # the common case inline; any other value takes the slow path, whose converter (abi.values) accepts it
            # or raises the error naming it
            if kind == wire.INT:
                read.append(f"if {a}.__class__ is not int or not {INT64_MIN} <= {a} < {INT64_END}: raise _Slow")
                writes.append(f"_q[{2 * i + 1}] = {a}")
            elif kind == wire.FLOAT:
                read.append(f"if {a}.__class__ is not float: raise _Slow")
                writes.append(f"_f.d[{2 * i + 1}] = {a}")
            else:
                raise ValueError(f"{decl.entry}: parameter {p.name}: only int and float can be per_call")
        else:
            guard = {wire.INT: "int", wire.FLOAT: "float", wire.BOOL: "bool", wire.STRING: "str"}.get(kind)
            if kind == wire.OPT_INT:
                keys.append(f"({a} if {a} is None or {a}.__class__ is int else _BAD)")
            elif kind == wire.OPT_FLOAT:
                keys.append(f"({a} if {a} is None or {a}.__class__ is float else _BAD)")
            elif kind == wire.BOOL and p.name == "enable_pdl":  # None: flashinfer's "ask the device" (validation)
                keys.append(f"({a} if {a}.__class__ is bool or {a} is None else _BAD)")
            else:
                keys.append(f"({a} if {a}.__class__ is {guard} else _BAD)")
    key_tuple = "(" + "".join(k + ", " for k in keys) + "context)"
    ptr_list = "[" + ", ".join(ptrs) + "]"
    bound_at = {p.name: j for j, p in enumerate(p for p in params if p.name in bound_set)}
    all_args = (
        "("
        + "".join(
            (f"_bv[{bound_at[p.name]}]" if p.name in bound_set else a) + ", "
            for p, a in zip(params, names, strict=True)
        )
        + ")"
    )
    required = [a for p, a in zip(params, names, strict=True) if p.default is wire.REQUIRED and p.name not in bound_set]
    optional = [
        f"{a}=_DEFAULTS[{i}]"
        for i, (p, a) in enumerate(zip(params, names, strict=True))
        if p.default is not wire.REQUIRED and p.name not in bound_set
    ]
    absent = ["**_absent"] if accept_absent else []
    signature = ", ".join([*required, "*", *optional, "stream=None", "context=None", *absent])
    lines = [f"def launch({signature}):"]
    if accept_absent:
        lines.append("    if _absent: _refuse_absent(_name, _release, _absent)")
    lines += ["    try:", "        _f = _tls.frame"]
    lines += ["        " + r for r in read]
    lines += [f"        _e = _f.cache[{key_tuple}]"]
    if tested:
        # alignment, NULL and address range: one test of all pointers against the union of the masks, the per-tensor
        # test only when that fails; then the overlap rules of this layout, if it has any
        pointer_tuple = "(" + "".join(pp + ", " for pp in tested) + ")"
        lines += [
            f"        if ({' | '.join(tested)}) & _e.union or not ({' and '.join(tested)}):",
            f"            if not _pointers_ok(_e, {pointer_tuple}): raise _Slow",
            f"        if _e.apart is not None and not _e.apart({', '.join(tested)}): raise _Slow",
        ]
    # the slow path runs after the except block, so its errors are not shown as raised "during handling" of the
    # fast path's internal exception
    lines += [
        "    except Exception:",
        "        _e = None",
        "    if _e is None:",
        *(["        _bv = _bound(context)"] if bound_set else []),
        f"        _f, _e, ({''.join(pp + ', ' for pp in ptrs)}) = _slow({all_args}, stream, context)"
        if ptrs
        else f"        _f, _e, _ = _slow({all_args}, stream, context)",
    ]
    for i, (p, a) in enumerate(zip(params, names, strict=True)):
        if p.name in bound_set:
            continue
        if p.wire == wire.ARRAY:
            lines.append(f"        _h{i} = {a}.handle")
        elif p.per_call:
            lines.append(f"        {a} = _scalar({p.name!r}, {p.wire!r}, {a})")
    # the frame still holds this image from its previous call (a loop over layers): only pointers change
    lines += [
        "    _q = _f.q",
        "    if _f.image is not _e:",
        "        _f.mv[:] = _e.image",
        "        _f.image = _e",
        "    else:",
        f"        _q[{2 * len(params)}] = 0  # the result slot's type: None",
    ]
    lines += ["    " + w for w in writes]
    for i in objects:
        a = names[i]
        lines.append(f"    _o{i} = None if {a} is None else _tensor_object({a}, {params[i].name!r})")
        lines.append(f"    if _o{i} is not None: _q[{2 * i + 1}] = _o{i}.handle")
    # on TVM-FFI's current stream: no stream given and none from the framework, or the given stream is the
    # current one already (a runtime inside stream_scope); otherwise invoke sets and restores it
    # (a framework's current stream that is TVM-FFI's current one too, the common case, is compared here inline)
    call = [
        "if stream is None:",
        f"    if _e.stream_source is None or _e.stream_source(_e.device_id) == _get_stream({CUDA}, _e.device_id):",
        "        if _f.call(*_f.cargs): _fail(_name, _f)",
        "    else: _invoke(_name, _f, _e, None)",
        f"elif stream.__class__ is int and stream == _get_stream({CUDA}, _e.device_id):",
        "    if _f.call(*_f.cargs): _fail(_name, _f)",
        "else: _invoke(_name, _f, _e, stream)",
    ]
    if objects:
        lines.append("    try:")
        lines += ["        " + c for c in call]
        lines.append("    finally:")
        for i in objects:
            lines.append(f"        if _o{i} is not None: _o{i}.release()")
    else:
        lines += ["    " + c for c in call]
    if decl.returns != "void":
        lines.append("    return _result(_f)")
    # the key function: the same reads, for the slow path to remember what it validated
    key_lines = [f"def keys({', '.join(names)}{', ' if names else ''}stream=None):"]
    key_lines += ["    " + r for r in read if "raise _Slow" not in r and not r.startswith("_h")]
    key_lines.append(f"    return ({''.join(k + ', ' for k in keys)}), {ptr_list}")
    return "\n".join(lines) + "\n\n" + "\n".join(key_lines) + "\n"


def compile_launch(source: str, name: str, namespace: dict[str, Any]) -> str:
    """Run ``source`` in ``namespace`` under the pseudo-filename ``<fi_ffi launcher {name}>`` (numbered when
    another source has that name already), registered with :mod:`linecache`; returns the filename.

    The entry has no modification time, so :func:`linecache.checkcache` keeps it (it cannot reread a file that is
    not there): tracebacks show the generated lines for as long as the process runs (one small entry per
    compiled declaration).
    """
    filename = f"<fi_ffi launcher {name}>"
    n = 1
    lines = source.splitlines(keepends=True)
    while filename in linecache.cache and _cached_lines(filename) != lines:
        n += 1
        filename = f"<fi_ffi launcher {name} #{n}>"
    linecache.cache[filename] = (len(source), None, lines, filename)
    exec(compile(source, filename, "exec"), namespace)
    return filename


def _cached_lines(filename: str) -> list[str] | None:
    """The lines :mod:`linecache` holds for ``filename`` (None for a lazy entry, which is not ours)."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4:
        return None
    return entry[2]


# ---- what the generated code calls ---------------------------------------------------------------------------------


def invoke(name: str, f: Any, entry: Entry, stream: Any) -> None:
    """Call on ``stream`` (None: the framework's current stream of the first tensor, ``entry.stream_source``).

    The stream is set as TVM-FFI's current stream of the call's device only when it differs from it (one FFI
    call to compare instead of two to set and restore), and restored afterwards, also on error.
    """
    device_id = entry.device_id
    if stream is None:
        source = entry.stream_source
        assert source is not None  # the launch calls invoke without a stream only when the entry has a source
        handle = source(device_id)
    elif stream.__class__ is int and 0 <= stream < PTR_END:
        handle = stream
    else:
        handle = stream_of(stream)
    call_on(name, f, device_id, handle)


def refuse_absent(name: str, release: str, absent: dict[str, Any]) -> None:
    """Arguments the bound module's declaration lacks: accepted only at their "off" value (None, False, 0)."""
    for arg, value in absent.items():
        if value is None or value is False or (type(value) is int and value == 0):
            continue
        raise ValueError(
            f"{arg}: not supported by the bound module's entry point {name} (FlashInfer "
            f"{release or 'release of that module'}); pin a release that has it, or leave it at its "
            f"default"
        )


def tensor_object(value: Any, name: str) -> Any:
    """A TVM-FFI Tensor object for an ``ffi.Tensor`` parameter, made for one call (the caller releases it)."""
    from ..abi.objects import tensor_object as make

    return make(intake.describe(value, name, -1))  # -1: no DLPack synchronization, as as_tensor


__all__ = [
    "arg_names",
    "compile_launch",
    "invoke",
    "launch_source",
    "producer_globals",
    "read_tensor_argument",
    "refuse_absent",
    "tensor_object",
]
