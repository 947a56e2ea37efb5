"""The one calling mechanism of every op: a launcher compiled from an entry point's declaration.

:func:`launcher` takes a :class:`~fi_ffi.abi.wire.Declaration` (what the entry point takes), the module URI
and the op's contract check, and returns a function ``launch(*wire_args, stream=None, context=None)`` that
validates, packs and calls. A :class:`Launcher` ties the jobs, each in a module of its own:

- :mod:`.codegen`: the launch function's source, generated once per declaration (straight-line code: read each
  argument's layout key and pointer, look the keys up, test the pointers, write them, call), compiled and
  registered with :mod:`linecache` so tracebacks show its lines.
- :mod:`.images`: the layout cache (per thread and entry point, one frame and the images of the layout
  combinations that passed every check), what the fast path looks up.
- :mod:`.validation`: the slow path's checks, with messages naming the argument (:meth:`Launcher.slow` runs them
  and remembers the image). ``launch.launcher.slow_calls`` counts slow-path entries (tests use it to prove a loop
  stays on the fast path).
- :mod:`.prepared`: one call packed once (:meth:`Launcher.prepare`, :meth:`Launcher.prepare_run`).
- :mod:`.binding`: the entry point bound and its signature checked against the declaration.

Scalars are converted by :mod:`fi_ffi.abi.values` (the one packer of Python values) and frame images written by
:mod:`fi_ffi.abi.frame` (which owns the byte layout).

What is kept: per thread and entry point, one frame and a bounded dict from layout keys (values: ints,
shapes, dtypes) to images (bytes). No caller object is referenced after the call returns. TVM-FFI Tensor
objects made for ``ffi.Tensor`` parameters are released right after the call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import caches
from ..abi import wire
from ..abi.frame import fail, result, write_image, write_pointers
from ..abi.values import to_scalar
from ..tensor import intake
from . import binding, codegen
from .binding import bound_entry, select_declaration
from .images import UNEXPECTED, Entry, LaunchFrame, Slow, pointers_ok, remember_entry
from .prepared import PreparedCall, PreparedRun, refuse_unpreparable, run_arguments
from .validation import Check, check_tensor, plan_info, stream_of, validate

# the scalar converter under its old name (comm and tests import it from here)
scalar = to_scalar


class Bound(NamedTuple):
    """Scalar parameters a launch function does not take: their values are ``values(context)``, in the order of
    ``names`` (a function of the context alone, e.g. a plan's settings, so the context in the key covers them).
    The fast path neither reads nor keys them; the slow path checks them and writes them into the frame image.
    """

    names: tuple[str, ...]
    values: Callable[[Any], tuple[Any, ...]]


class Launcher:
    """What a generated launch function needs: the declaration, the module, the check, the bound entry point.

    Attributes:
        decl: the declaration.
        uri: the kernel module.
        name: ``uri.entry``, in messages.
        slow_calls: number of calls that took the slow path (validation and packing from scratch).
        source, filename: the launch function's generated source and the pseudo-filename it is compiled under.
    """

    def __init__(self, decl: wire.Declaration, uri: str, check: Check | None) -> None:
        self.decl = decl
        self.uri = uri
        self.check = check
        self.name = f"{uri}.{decl.entry}"
        self.slow_calls = 0
        self.tls = threading.local()
        self.entry: Any = None
        self._bind_lock = threading.Lock()
        params = decl.params
        self.tensor_index = [i for i, p in enumerate(params) if p.wire in wire.TENSOR_TYPES]
        self.record_of = {i: j for j, i in enumerate(self.tensor_index)}
        # every tensor parameter (DLTensor records and ffi.Tensor objects): the pointers each call tests
        self.pointer_index = [
            i for i, p in enumerate(params) if p.wire in wire.TENSOR_TYPES or p.wire in wire.OBJECT_TENSOR_TYPES
        ]
        self.pointer_position = {params[i].name: k for k, i in enumerate(self.pointer_index)}
        self.keys: Callable[..., tuple[tuple[Any, ...], list[int]]] = _no_keys
        self.namespace: dict[str, Any] = {}
        self.bound: Bound | None = None  # the scalars the launch function does not take (compile_launcher sets it)
        self.source = ""
        self.filename = ""

    def forget(self) -> None:
        """Drop every thread's frame and remembered images (the next call of each thread starts afresh)."""
        self.tls = threading.local()
        if self.namespace:
            self.namespace["_tls"] = self.tls

    def bind(self) -> Any:
        """Bind the entry point once and check the module's own signature against the declaration."""
        if self.entry is None:
            with self._bind_lock:
                if self.entry is None:
                    self.entry = bound_entry(self.uri, self.decl)
        return self.entry

    def frame(self) -> LaunchFrame:
        """This thread's frame (made on first use; binds the entry point)."""
        try:
            frame: LaunchFrame = self.tls.frame
            return frame
        except AttributeError:
            pass
        entry = self.bind()
        if self.namespace.get("_get_stream") is None:  # the runtime is loaded now (binding loaded it)
            from ..abi.runtime import api

            self.namespace["_get_stream"] = api().TVMFFIEnvGetStream
        f = self.tls.frame = LaunchFrame(len(self.decl.params), len(self.tensor_index), entry.safe_call, entry.this)
        return f

    def new_frame(self) -> LaunchFrame:
        """A frame of its own for one prepared call (binds the entry point)."""
        entry = self.bind()
        return LaunchFrame(len(self.decl.params), len(self.tensor_index), entry.safe_call, entry.this)

    def slow(
        self, values: Sequence[Any], stream: Any, context: Any, frame: LaunchFrame | None = None, remember: bool = True
    ) -> tuple[LaunchFrame, Entry, list[int]]:
        """Describe and check every argument, build the frame image, remember it; return (frame, entry, ptrs)."""
        self.slow_calls += 1
        v = validate(self.name, self.decl, self.check, self.pointer_position, values, stream, context)
        f = frame if frame is not None else self.frame()  # binds the module: only once the arguments passed
        keep: list[Any] = []
        f.image = None  # overwritten now: no cached image is in the frame any more
        write_image(f, self.decl, self.record_of, v.checked, keep)
        entry = Entry(bytes(f.mv), v.masks, v.device_id, v.stream_source, tuple(keep), v.empty_ok, v.union, v.apart)
        if remember:
            try:
                key, _ = self.keys(*values, stream)
            except Exception:  # a reader that refuses what as_tensor accepted: just do not remember
                key = None
            if key is not None:
                remember_entry(f, key, context, entry)
        return f, entry, v.ptrs

    def _packed_once(self, values: Sequence[Any], stream: Any, context: Any) -> tuple[LaunchFrame, Entry, int | None]:
        """One call checked and packed into a frame of its own, pointers written: ``(frame, entry, stream)``."""
        handle = None if stream is None else stream_of(stream)  # a bad stream is named before the module is bound
        f, entry, ptrs = self.slow(values, stream, context, frame=self.new_frame(), remember=False)
        write_pointers(f, ptrs)
        if handle is None and entry.stream_source is not None:
            handle = entry.stream_source(entry.device_id)
        return f, entry, handle

    def prepare(self, values: Sequence[Any], stream: Any = None, context: Any = None) -> PreparedCall:
        """Check and pack one call into a frame of its own; the result launches it again (see PreparedCall)."""
        refuse_unpreparable(self.name, self.decl)
        f, entry, handle = self._packed_once(values, stream, context)
        return PreparedCall(self.name, f, tuple(values), entry.device_id, handle)

    def prepare_run(self, values: Sequence[Any], stream: Any = None, context: Any = None) -> PreparedRun:
        """:meth:`prepare` for a call with one plan info (an ``ARRAY`` parameter): every argument is checked and
        packed once as :meth:`prepare` does (the op's check against ``context``, pointer rules, layouts, stream),
        except the plan info's slot, which each call of the result writes from its plan (see PreparedRun).

        ``values``: the launch function's arguments in wire order, without the :class:`Bound` scalars (their values
        are ``self.bound.values(context)``, as the launch function's are); the plan info among them is any live
        info of ``context`` (only checked: it is neither written into the frame nor kept). ``ffi.Tensor``
        parameters must be None (their objects are made per call).
        """
        full, keep, info_word = run_arguments(self.name, self.decl, self.bound, values, context)
        f, entry, handle = self._packed_once(full, stream, context)
        return PreparedRun(self.name, f, keep, entry.device_id, handle, info_word, context)


def _no_keys(*args: Any) -> tuple[tuple[Any, ...], list[int]]:
    raise Slow


def compile_launcher(
    decl: wire.Declaration,
    uri: str,
    check: Check | None = None,
    accept_absent: bool = False,
    bound: Bound | None = None,
) -> Callable[..., Any]:
    """Generate the launch function of ``decl`` on module ``uri`` (see :mod:`.codegen`).

    ``accept_absent``: the launch function also takes (as ``**kwargs``) arguments of other releases'
    declarations, refusing them unless they are at their "off" value.
    ``bound``: scalar parameters whose values are a function of the call's ``context`` (see :class:`Bound`).
    """
    setup_only = [p.name for p in decl.params if p.wire in wire.SETUP_ONLY_TYPES]
    if setup_only:
        raise ValueError(
            f"{decl.entry}: parameters {setup_only} are setup-only wire types; call it with fi_ffi.comm.control.call"
        )
    launcher_ = Launcher(decl, uri, check)
    source = codegen.launch_source(decl, launcher_.record_of, accept_absent, bound.names if bound is not None else ())
    namespace: dict[str, Any] = {
        **codegen.producer_globals(),
        "_tls": launcher_.tls,
        "_slow": launcher_.slow,
        "_Slow": Slow,
        "_BAD": UNEXPECTED,
        "_fail": fail,
        "_invoke": codegen.invoke,
        "_get_stream": None,  # TVMFFIEnvGetStream, set when the first frame is made (the runtime is loaded then)
        "_name": launcher_.name,
        "_result": result,
        "_scalar": to_scalar,
        "_tensor_object": codegen.tensor_object,
        "_pointers_ok": pointers_ok,
        "_refuse_absent": codegen.refuse_absent,
        "_release": decl.release,
        "_DEFAULTS": [p.default for p in decl.params],
        "_bound": bound.values if bound is not None else None,
    }
    filename = codegen.compile_launch(source, launcher_.name, namespace)
    launcher_.namespace = namespace
    _all_launchers.add(launcher_)
    launch = namespace["launch"]
    intake.follow_classes(launch)  # the classes the reads test inline, kept in step with those the intake has seen
    launcher_.keys = namespace["keys"]
    launcher_.bound = bound
    launcher_.source, launcher_.filename = source, filename
    launch.launcher = launcher_
    launch.source = source
    launch.__doc__ = f"Launch {launcher_.name}: {decl.signature}"
    compiled: Callable[..., Any] = launch
    return compiled


def launcher(
    decl: wire.Declaration | Sequence[wire.Declaration],
    uri: str,
    check: Check | None = None,
    bound: Bound | None = None,
    *,
    defer: bool = False,
) -> Callable[..., Any]:
    """The launch function of ``decl`` on module ``uri`` (one per declaration, module, check and ``bound``).

    ``decl`` may be a sequence of declarations of one entry point for several FlashInfer releases: the module
    is then bound at once and the declaration its own signature matches is used (:func:`select_declaration`).
    Ops call the result with keyword arguments for parameters only some releases have (their defaults
    reproduce the older behaviour).

    ``defer`` (a sequence of declarations only): bind nothing yet. Until a call's arguments have passed, the result
    is a :class:`Deferred` whose calls check their arguments against every declaration first (the op's check
    included; nothing is loaded, so a bad argument is named before a kernel wheel could be downloaded), then
    bind; once bound, :func:`launcher` returns the launch function itself (no indirection on later calls). For
    ops that call :func:`launcher` on each call and whose only checks are the launcher's.
    """
    key = (id(decl), uri, check, bound)
    found = _launchers.get(key)
    if found is None and defer and not isinstance(decl, wire.Declaration):
        return Deferred(tuple(decl), uri, check, bound, key, decl)
    if found is None:
        chosen = decl if isinstance(decl, wire.Declaration) else select_declaration(decl, uri)
        with _lock:
            found = _launchers.get(key)
            if found is None:
                found = compile_launcher(chosen, uri, check, accept_absent=chosen is not decl, bound=bound)
                _launchers[key] = found
                _pinned.append(decl)  # the id in the key stays valid while the entry exists
    return found


class Deferred:
    """The launch function of one entry point's declarations for several releases, before the module is bound
    (what :func:`launcher` returns with ``defer=True``). A call checks its arguments against each declaration
    (:func:`precheck`: loads nothing) and, once one declaration accepts them, binds the module, picks the
    declaration it matches and launches; attributes (``launcher``, ``source``) are the bound launch function's
    (reading one binds the module)."""

    def __init__(
        self,
        decls: tuple[wire.Declaration, ...],
        uri: str,
        check: Check | None,
        bound: Bound | None,
        key: tuple[Any, ...],
        original: Sequence[wire.Declaration],
    ) -> None:
        self.decls, self.uri, self.check, self.bound = decls, uri, check, bound
        self._key, self._original = key, original

    def resolve(self) -> Callable[..., Any]:
        """The bound launch function (binds the module: it may be loaded, or downloaded)."""
        return launcher(self._original, self.uri, self.check, self.bound)

    def __call__(self, *args: Any, stream: Any = None, context: Any = None, **kwargs: Any) -> Any:
        found = _launchers.get(self._key)
        if found is None:
            precheck(self.decls, self.uri, self.check, self.bound, args, kwargs, stream, context)
            found = self.resolve()
        return found(*args, stream=stream, context=context, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)


def precheck(
    decls: Sequence[wire.Declaration],
    uri: str,
    check: Check | None,
    bound: Bound | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    stream: Any,
    context: Any,
) -> None:
    """Check one call's arguments against each of ``decls`` as its launch function would (described, converted,
    the op's check, pointer rules, stream), binding and loading nothing; return once one declaration accepts them.

    A declaration lacking an argument passed at other than its "off" value (None, False, 0) does not accept the
    call. When every declaration refuses it, the first error about an argument's value is raised (the releases'
    argument lists share their leading arguments, which the op's check names first); only when every refusal is
    an argument some release lacks is that one raised (it names the argument and the releases).

    Raises:
        TypeError / ValueError: no declaration accepts the arguments; names the argument and the fix.
    """
    first: Exception | None = None
    lacking: list[str] = []
    for decl in decls:
        names = codegen.arg_names(decl)
        extra = [
            k
            for k, v in kwargs.items()
            if k not in names and not (v is None or v is False or (type(v) is int and v == 0))
        ]
        if extra:
            lacking.append(f"{extra[0]}: not taken by FlashInfer {decl.release or '?'}'s {decl.entry}")
            continue
        required = [n for n, p in zip(names, decl.params, strict=True) if p.default is wire.REQUIRED]
        given = dict(zip(required, args, strict=False))  # positional arguments: the required ones, in order
        bound_values = dict(zip(bound.names, bound.values(context), strict=True)) if bound is not None else {}
        values = []
        for p, name in zip(decl.params, names, strict=True):
            if p.name in bound_values:
                values.append(bound_values[p.name])
            elif name in kwargs:
                values.append(kwargs[name])
            elif name in given:
                values.append(given[name])
            else:  # a required argument not passed: None, which describing it refuses by name
                values.append(None if p.default is wire.REQUIRED else p.default)
        probe = Launcher(decl, uri, check)
        try:
            validate(probe.name, decl, check, probe.pointer_position, values, stream, context)
        except (TypeError, ValueError) as exc:
            first = first or exc
            continue
        return
    if first is not None:
        raise first
    if lacking:
        raise ValueError("; ".join(lacking) + "; pass it only where the pinned release takes it")


def _write_pointers(f: LaunchFrame, decl: wire.Declaration, record_of: dict[int, int], ptrs: list[int]) -> None:
    """The old spelling of :func:`fi_ffi.abi.frame.write_pointers` (benchmarks/bench_step*.py time trees from
    before and after the move with the same code)."""
    write_pointers(f, ptrs)


_lock = threading.Lock()
_launchers: dict[tuple[Any, ...], Callable[..., Any]] = {}
_pinned: list[Any] = []
_all_launchers: weakref.WeakSet[Launcher] = weakref.WeakSet()


def _reset() -> None:
    for each in list(_all_launchers):
        each.forget()
    _launchers.clear()
    binding.forget()
    _pinned.clear()


caches.register("launchers (compiled per declaration, with their frames and images)", _reset)

__all__ = [
    "Bound",
    "Check",
    "Deferred",
    "Entry",
    "LaunchFrame",
    "Launcher",
    "PreparedCall",
    "PreparedRun",
    "bound_entry",
    "check_tensor",
    "compile_launcher",
    "launcher",
    "plan_info",
    "precheck",
    "scalar",
    "select_declaration",
]
