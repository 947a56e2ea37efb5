"""The one calling mechanism of every op: a launcher compiled from an entry point's declaration.

:func:`launcher` takes a :class:`~fi_ffi.abi.wire.Declaration` (what the entry point takes), the module URI
and the op's contract check, and returns a function ``launch(*wire_args, stream=None, context=None)`` that
validates, packs and calls. The function is generated once per declaration (Python source built from the
declaration, so the per-call path is straight-line code with no loop over parameters and no byte offset
written by hand).

How a call runs:

1. **Read.** Each tensor argument gives ``(layout key, data pointer)`` through :mod:`fi_ffi.tensor.intake`
   (descriptor, torch, CuPy, any DLPack / CUDA-array-interface producer). Scalars are their own keys.
2. **Look up.** The tuple of keys (plus ``context``, a hashable value the op adds, e.g. its plan settings)
   is looked up in this thread's frame cache. Scalar parameters that are a function of the context (a
   :class:`Bound`: a decode run's plan scalars) are neither arguments of the launch function nor keyed. A hit
   is a layout combination that passed every check before:
   the cache holds the packed frame image for it (argument slots and one ``DLTensor`` record per tensor
   parameter, owned by the frame), plus that layout's pointer rules (:mod:`fi_ffi.launch.pointer_rules`).
3. **Test the pointers**, every call: each against its alignment mask (one test of all pointers against the
   union of the masks first), non-NULL unless its tensor is empty, no high bits (the slow path checks such an
   address range does not wrap), and the op's overlap rules (a few integer comparisons per rule). A pointer
   that fails takes the slow path, which raises the error naming the argument.
4. **Write.** The image is copied over the frame in one slice assignment, then the data pointers (and
   per-call values: plan info, seeds) are written to their words; the frame's records belong to the call, so
   a foreign tensor costs no descriptor object.
5. **Call** the entry point (one cffi call), on the call's stream (set and restored around the call when it
   is not TVM-FFI's current one).

Anything unusual (a layout not seen, an unhashable argument, a pointer that fails a rule, an unknown
producer) takes the **slow path**: each argument is described and checked with messages naming it
(:func:`fi_ffi.as_tensor`, generic checks below, then the op's own ``check``), the image is built and
remembered, and the call proceeds. The op's check sees the arguments without their addresses, because its
verdict is remembered per layout: what it requires of addresses it returns as
:class:`~fi_ffi.launch.pointer_rules.PointerRules`, which step 3 tests. ``launch.launcher.slow_calls`` counts
slow-path entries (tests use it to prove a loop stays on the fast path).

Prepared calls skip all of that per call: :meth:`Launcher.prepare` checks and packs one call into a frame of its own
(:class:`PreparedCall`: calling it is one FFI call); :meth:`Launcher.prepare_run` does the same for a call with plan
info, whose slot each call of the :class:`PreparedRun` writes from the plan it is given (a plan of the context it
was checked against, else refused naming ``plan``).

What is kept: per thread and entry point, one frame and a bounded dict from layout keys (values: ints,
shapes, dtypes) to images (bytes). No caller object is referenced after the call returns. TVM-FFI Tensor
objects made for ``ffi.Tensor`` parameters are released right after the call.

Generic checks done for every tensor argument on the slow path: a supported producer and dtype (as_tensor),
a non-NULL pointer for a non-empty tensor, natural alignment of the pointer (itemsize), sizes that fit the
kernels' int32, a byte extent below 2**63 that does not wrap the address space, all CUDA tensors on one
device, and outputs whose elements do not overlap (no stride-0 or interleaved rows).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

from .. import caches
from ..abi import wire
from ..abi.frame import RECORD as _RECORD
from ..abi.frame import SLOT as _SLOT
from ..abi.frame import Frame, call_on, describe_frame, fail, result
from ..abi.objects import ARRAY, BOOL, DLTENSOR_PTR, FLOAT, INT, NONE, RAW_STR, TENSOR, Array, ObjectRef
from ..dtypes import CUDA
from ..errors import LoaderError
from ..tensor import intake
from ..tensor.descriptor import WIRE_DEVICE_TYPE, Tensor
from ..tensor.streams import stream_handle
from .pointer_rules import HIDDEN_ADDRESS, ApartTest, PointerRules, apart_test, compile_apart, enforce, without_address

# An op's contract: given the call's arguments without their addresses (and ``context``), raise on a bad layout or
# scalar, and return what the data pointers must satisfy (a mapping is alignments in bytes by parameter name).
Check = Callable[[SimpleNamespace], PointerRules | Mapping[str, int] | None]


class Bound(NamedTuple):
    """Scalar parameters a launch function does not take: their values are ``values(context)``, in the order of
    ``names`` (a function of the context alone, e.g. a plan's settings, so the context in the key covers them).
    The fast path neither reads nor keys them; the slow path checks them and writes them into the frame image.
    """

    names: tuple[str, ...]
    values: Callable[[Any], tuple[Any, ...]]


_PTR_END = 1 << 64
_INT32_END = 1 << 31
_INT64_END = 1 << 63
# Any pointer with one of these bits set takes the slow path, which checks the extent does not wrap.
_HIGH = ((1 << 64) - 1) ^ ((1 << 56) - 1)
_ABSENT = 4096  # the "pointer" of an absent optional tensor: its record is not passed; aligned for any mask
_MAX_IMAGES = 512  # per thread and entry point; cleared (not evicted one by one) when full


class _Bad:
    """Key of a scalar of an unexpected type: never cached, so such a call always takes the slow path."""

    def __repr__(self) -> str:
        return "<unexpected type>"


_BAD = _Bad()


class _Slow(Exception):
    """Internal: leave the fast path."""


class Entry(NamedTuple):
    """What a frame cache remembers of one layout combination that passed every check (one per layout key)."""

    image: bytes  # the frame's bytes for it, data pointers and per-call values left zero
    masks: tuple[int, ...]  # per tensor parameter: alignment - 1 | high bits (0 for an absent tensor)
    device_id: int  # the CUDA ordinal of its tensors (0 when none is on a CUDA device)
    stream_source: intake.StreamSource | None  # the default stream's source (None: TVM-FFI's current one)
    keep: tuple[Any, ...]  # what the image points to (text arguments' buffers)
    empty_ok: tuple[bool, ...]  # per tensor parameter: validated empty, so its pointer may be NULL
    union: int  # the union of ``masks``: one test of all pointers for the common case
    apart: ApartTest | None  # the overlap test of its pointers (None: no rule to test)


class LaunchFrame(Frame):
    """One thread's :class:`~fi_ffi.abi.frame.Frame` for one entry point (one DLTensor record per tensor
    parameter), with the layout cache: ``cache`` maps layout keys to entries, ``image`` is the entry whose image
    the frame holds now (see the generated launch)."""

    __slots__ = ("cache", "image")

    def __init__(self, nargs: int, ntensors: int, call: Any, this: Any = None) -> None:
        super().__init__(nargs, ntensors, call, this)
        self.cache: dict[Hashable, Entry] = {}
        self.image: Entry | None = None


class Launcher:
    """What a generated launch function needs: the declaration, the module, the check, the bound entry point.

    Attributes:
        decl: the declaration.
        uri: the kernel module.
        slow_calls: number of calls that took the slow path (validation and packing from scratch).
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

    def forget(self) -> None:
        """Drop every thread's frame and remembered images (the next call of each thread starts afresh)."""
        self.tls = threading.local()
        if self.namespace:
            self.namespace["_tls"] = self.tls

    # ---- binding --------------------------------------------------------------------------------------------

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

    # ---- slow path -------------------------------------------------------------------------------------------

    def slow(
        self, values: Sequence[Any], stream: Any, context: Any, frame: LaunchFrame | None = None, remember: bool = True
    ) -> tuple[LaunchFrame, Entry, list[int]]:
        """Describe and check every argument, build the frame image, remember it; return (frame, entry, ptrs)."""
        self.slow_calls += 1
        decl = self.decl
        if len(values) != len(decl.params):
            raise TypeError(f"{self.name}: expected {len(decl.params)} arguments, got {len(values)}")
        checked, ptrs, first_cuda = self._describe(values, stream)
        tensors = {name: t for name, t in checked.items() if isinstance(t, Tensor)}
        rules = PointerRules({name: t.dtype.itemsize for name, t in tensors.items()})
        if self.check is not None:  # the op's contract first: it names arguments in the op's own order
            rules.update(self.check(self._check_view(checked, context)))
            self._known(rules)
        devices = _one_device(self.name, decl, checked)
        enforce(rules, tensors)
        if stream is not None:
            _stream(stream)  # a bad stream is refused before anything is bound or launched
        f = frame if frame is not None else self.frame()  # binds the module: only once the arguments passed
        keep: list[Any] = []
        masks = []
        for i in self.pointer_index:
            name = decl.params[i].name
            masks.append(0 if checked[name] is None else (rules.alignment.get(name, 1) - 1) | _HIGH)
        _write_image(f, decl, self.record_of, checked, keep)
        device_id = devices[0] if devices else 0
        source = None
        if first_cuda is not None:
            source = intake.stream_source(first_cuda)
        # per record: may its pointer be NULL on the fast path (an empty tensor: the kernel reads nothing)
        empty_ok = tuple(
            checked[decl.params[i].name] is not None and checked[decl.params[i].name].numel == 0
            for i in self.pointer_index
        )
        # the fast path first tests every pointer against the union of the masks (one test for the common case:
        # all pointers aligned for the strictest tensor); only when that fails are the per-tensor masks asked
        union = 0
        for mask in masks:
            union |= mask
        # the overlap rules of this layout combination, as integers the fast path tests (None: nothing to test)
        compiled = compile_apart(rules, tensors, self.pointer_position)
        apart = None if compiled is None else apart_test(compiled, len(self.pointer_index))
        entry = Entry(bytes(f.mv), tuple(masks), device_id, source, tuple(keep), empty_ok, union, apart)
        if remember:
            try:
                key, _ = self.keys(*values, stream)
            except Exception:  # a reader that refuses what as_tensor accepted: just do not remember
                key = None
            if key is not None and _cacheable(key, context):
                cache = f.cache
                if len(cache) >= _MAX_IMAGES:
                    cache.clear()
                cache[(*key, context)] = entry
        return f, entry, ptrs

    def _check_view(self, checked: dict[str, Any], context: Any) -> SimpleNamespace:
        """The arguments as the op's check sees them: what the layout key covers, nothing else (tensors without
        their addresses, per-call scalars and plan infos hidden), so the check's verdict may be cached."""
        view = {}
        for p in self.decl.params:
            value = checked[p.name]
            if isinstance(value, Tensor):
                value = without_address(value)
            elif p.per_call or p.wire == wire.ARRAY:
                value = HIDDEN_ADDRESS
            view[p.name] = value
        return SimpleNamespace(**view, context=context)

    def _known(self, rules: PointerRules) -> None:
        """Every name in ``rules`` is a tensor parameter (a misspelt name would silently test nothing)."""
        names = [*rules.alignment, *(n for pair in rules.apart for n in pair[:2])]
        for name in names:
            if name not in self.pointer_position:
                raise TypeError(
                    f"{self.name}: the op's check states a pointer rule for {name!r}, not a tensor parameter"
                )

    def _describe(self, values: Sequence[Any], stream: Any) -> tuple[dict[str, Any], list[int], Any]:
        checked: dict[str, Any] = {}
        ptrs: list[int] = []
        first_cuda = None
        for p, value in zip(self.decl.params, values, strict=True):
            name, kind = p.name, p.wire
            if kind in wire.TENSOR_TYPES or kind in wire.OBJECT_TENSOR_TYPES:
                if value is None:
                    if kind not in wire.OPTIONAL_TYPES:
                        raise TypeError(f"{name}: expected a tensor, got None")
                    checked[name] = None
                    if kind in wire.TENSOR_TYPES:
                        ptrs.append(_ABSENT)
                    continue
                t = intake.describe(value, name, stream)
                check_tensor(name, t, output=p.output)
                checked[name] = t
                if kind in wire.TENSOR_TYPES:
                    ptr = t.data_ptr
                    ptrs.append(ptr if ptr < _INT64_END else ptr - _PTR_END)  # int64 words: two's complement
                # the default stream follows the first CUDA tensor that comes from a framework with a current
                # stream (torch, CuPy): for a batch run that is q, not the workspace's descriptors
                if (
                    first_cuda is None
                    and t.device.is_cuda
                    and kind in wire.TENSOR_TYPES
                    and intake.stream_source(value) is not None
                ):
                    first_cuda = value
            elif kind == wire.ARRAY:
                checked[name] = plan_info(name, value)
            else:
                checked[name] = scalar(name, kind, value)
        return checked, ptrs, first_cuda

    # ---- prepared calls --------------------------------------------------------------------------------------

    def prepare(self, values: Sequence[Any], stream: Any = None, context: Any = None) -> PreparedCall:
        """Check and pack one call into a frame of its own; the result launches it again (see PreparedCall)."""
        if any(p.wire in (wire.ARRAY, wire.FFI_TENSOR, wire.OPT_FFI_TENSOR) or p.per_call for p in self.decl.params):
            raise TypeError(
                f"{self.name}: calls with plan info, per-call values or ffi.Tensor arguments cannot be prepared"
            )
        handle = None if stream is None else _stream(stream)  # a bad stream is named before the module is bound
        entry_point = self.bind()
        frame = LaunchFrame(len(self.decl.params), len(self.tensor_index), entry_point.safe_call, entry_point.this)
        f, entry, ptrs = self.slow(values, stream, context, frame=frame, remember=False)
        _write_pointers(f, self.decl, self.record_of, ptrs)
        if handle is None and entry.stream_source is not None:
            handle = entry.stream_source(entry.device_id)
        return PreparedCall(self, f, tuple(values), entry.device_id, handle)

    def prepare_run(self, values: Sequence[Any], stream: Any = None, context: Any = None) -> PreparedRun:
        """:meth:`prepare` for a call with one plan info (an ``ARRAY`` parameter): every argument is checked and
        packed once as :meth:`prepare` does (the op's check against ``context``, pointer rules, layouts, stream),
        except the plan info's slot, which each call of the result writes from its plan (see PreparedRun).

        ``values``: the launch function's arguments in wire order, without the :class:`Bound` scalars (their values
        are ``self.bound.values(context)``, as the launch function's are); the plan info among them is any live
        info of ``context`` (only checked: it is neither written into the frame nor kept). ``ffi.Tensor``
        parameters must be None (their objects are made per call).
        """
        params = self.decl.params
        arrays = [i for i, p in enumerate(params) if p.wire == wire.ARRAY]
        if len(arrays) != 1 or any(p.per_call or p.wire == wire.FFI_TENSOR for p in params):
            raise TypeError(
                f"{self.name}: only calls with one plan info and no per-call values or ffi.Tensor arguments can be "
                f"prepared as runs"
            )
        bound = self.bound
        bound_names = () if bound is None else bound.names
        free = [p for p in params if p.name not in bound_names]
        if len(values) != len(free):
            raise TypeError(f"{self.name}: expected {len(free)} arguments, got {len(values)}")
        for p, value in zip(free, values, strict=True):
            if p.wire == wire.OPT_FFI_TENSOR and value is not None:
                raise ValueError(f"{p.name}: a prepared run takes no ffi.Tensor argument (it is made per call)")
        given = dict(zip((p.name for p in free), values, strict=True))
        if bound is not None:
            given.update(zip(bound.names, bound.values(context), strict=True))
        full = [given[p.name] for p in params]
        handle = None if stream is None else _stream(stream)  # a bad stream is named before the module is bound
        entry_point = self.bind()
        frame = LaunchFrame(len(params), len(self.tensor_index), entry_point.safe_call, entry_point.this)
        f, entry, ptrs = self.slow(full, stream, context, frame=frame, remember=False)
        _write_pointers(f, self.decl, self.record_of, ptrs)
        if handle is None and entry.stream_source is not None:
            handle = entry.stream_source(entry.device_id)
        # the plan info is not kept: a prepared run must not hold a schedule alive (it outlives many plans)
        keep = tuple(None if p.wire == wire.ARRAY else value for p, value in zip(free, values, strict=True))
        return PreparedRun(self, f, keep, entry.device_id, handle, 2 * arrays[0] + 1, context)


class PreparedCall:
    """One kernel call with all its arguments packed once, in a frame of its own.

    Calling it launches the kernel again with the same arguments (same buffers, scalars, stream): one FFI call,
    plus the stream set/restore when it was prepared with a stream. It keeps the arguments it was prepared
    with referenced (their memory must stay valid); drop it to release them.
    """

    __slots__ = ("_frame", "_launcher", "_result_word", "device_id", "keep", "stream")

    def __init__(
        self, launcher: Launcher, frame: Frame, keep: tuple[Any, ...], device_id: int, stream: int | None
    ) -> None:
        self._launcher = launcher
        self._frame = frame
        self.keep = keep
        self.device_id = device_id
        self.stream = stream
        self._result_word = 2 * frame.nargs

    def __call__(self) -> None:
        f = self._frame
        # the result slot's type: None, as the launch function writes it before each call (the callee may have
        # left a result there at the previous call; TVM-FFI's convention is a None result slot on entry)
        f.q[self._result_word] = 0
        if self.stream is None:
            if f.call(*f.cargs):
                fail(self._launcher.name, f)
        else:
            call_on(self._launcher.name, f, self.device_id, self.stream)

    def __repr__(self) -> str:
        return f"<PreparedCall {self._launcher.name}({', '.join(describe_frame(self._frame))})>"


class PreparedRun:
    """A call packed once like a :class:`PreparedCall`, except its plan info, which each call gives:
    ``run(info, context)`` writes ``info`` (a live plan's ``Array``) into the packed frame and launches.

    Everything else was checked and packed once against ``context`` (e.g. a decode run's settings and batch
    size), so a call whose ``context`` is not equal to it is refused (ValueError naming ``plan``). It keeps the
    arguments it was prepared with referenced, but no plan info (it outlives many plans). The frame is written
    before each launch, so one prepared run is for one thread at a time (as a plan is: its schedule lives in one
    workspace).
    """

    __slots__ = ("_frame", "_info_word", "_launcher", "_result_word", "context", "device_id", "keep", "stream")

    def __init__(
        self,
        launcher: Launcher,
        frame: Frame,
        keep: tuple[Any, ...],
        device_id: int,
        stream: int | None,
        info_word: int,
        context: Any,
    ) -> None:
        self._launcher = launcher
        self._frame = frame
        self.keep = keep
        self.device_id = device_id
        self.stream = stream
        self._info_word = info_word
        self._result_word = 2 * frame.nargs
        self.context = context

    def check(self, info: Any, context: Any) -> None:
        """Raise unless ``info`` is a live plan info and ``context`` equals the prepared one."""
        plan_info("plan", info)
        if context is not self.context and context != self.context:
            raise ValueError(
                f"plan: made for {context!r}, but the run was prepared for {self.context!r} (its tensors and "
                f"scalars were checked against that); prepare a run for this plan's settings and batch size"
            )

    def run(self, info: Any, context: Any) -> None:
        """Launch with plan info ``info`` (of ``context``, which must equal the prepared context)."""
        if context is not self.context or info.__class__ is not Array or not info.handle:
            self.check(info, context)
        f = self._frame
        q = f.q
        q[self._info_word] = info.handle
        q[self._result_word] = 0  # the result slot's type: None, as the launch function writes it
        if self.stream is None:
            if f.call(*f.cargs):
                fail(self._launcher.name, f)
        else:
            call_on(self._launcher.name, f, self.device_id, self.stream)

    def __repr__(self) -> str:
        return f"<PreparedRun {self._launcher.name}({', '.join(describe_frame(self._frame))})>"


def plan_info(name: str, value: Any) -> Any:
    """``value`` if it is a live plan info (an ``Array`` a plan call returned), else the error naming ``name``."""
    if not isinstance(value, ObjectRef) or value.type_index != ARRAY:
        raise TypeError(f"{name}: expected the plan info (an Array from a plan call), got {type(value).__name__}")
    if not value.handle:
        raise ValueError(f"{name}: the plan has been released")
    return value


# ---- checks shared by every op -------------------------------------------------------------------------------


def check_tensor(name: str, t: Tensor, *, output: bool = False) -> None:
    """The generic contract of a tensor argument (see the module docstring)."""
    numel = 1
    extent = 1  # elements spanned, first to last, plus one
    for size, stride in zip(t.shape, t.strides, strict=True):
        if size >= _INT32_END:
            raise ValueError(f"{name}: size {size} in shape {t.shape} does not fit the kernels' int32 sizes")
        numel *= size
        if size:
            extent += (size - 1) * stride
    if not numel:
        return
    if not t.data_ptr:
        raise ValueError(f"{name}: data pointer is NULL")
    span = extent * t.dtype.itemsize
    if span >= _INT64_END:
        raise ValueError(
            f"{name}: the tensor spans {span} bytes (shape {t.shape}, strides {t.strides}); at most "
            f"2**63 - 1 are supported"
        )
    if t.data_ptr + span > _PTR_END:
        raise ValueError(
            f"{name}: the memory range 0x{t.data_ptr:x} + {span} bytes wraps past the end of the address space"
        )
    if output and not _no_overlap(t.shape, t.strides):
        raise ValueError(
            f"{name}: an output's elements must not overlap (shape {t.shape}, strides {t.strides}: "
            f"stride-0 or interleaved rows would be written by several threads)"
        )


def _no_overlap(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """A sufficient test that distinct indices map to distinct elements: sorted by stride, each stride is at
    least the extent of the dimensions inside it."""
    dims = sorted((stride, size) for size, stride in zip(shape, strides, strict=True) if size > 1)
    inner = 1
    for stride, size in dims:
        if stride < inner:
            return False
        inner = stride * (size - 1) + inner
    return True


def _one_device(name: str, decl: wire.Declaration, checked: dict[str, Any]) -> list[int]:
    """CUDA ordinals of the tensor arguments: all equal, else a ValueError naming the odd one.

    The reference is the first CUDA *input* (outputs follow their inputs), so the message names the tensor
    that disagrees with what the kernel reads.
    """
    tensors = [
        (p.name, checked[p.name], p.output)
        for p in decl.params
        if isinstance(checked.get(p.name), Tensor) and checked[p.name].device.is_cuda
    ]
    if not tensors:
        return []
    ref_name, ref, _ = next((t for t in tensors if not t[2]), tensors[0])
    for pname, t, _ in tensors:
        if t.device.device_id != ref.device.device_id:
            raise ValueError(
                f"{pname}: expected a tensor on cuda:{ref.device.device_id} (same as {ref_name}), got one on {t.device}"
            )
    return [ref.device.device_id]


def scalar(name: str, kind: str, value: Any) -> Any:
    """``value`` checked and converted for a scalar wire type (int64, float64, bool, text, optional int)."""
    import math

    if kind in (wire.OPT_INT, wire.OPT_FLOAT) and value is None:
        return None
    if kind in (wire.INT, wire.OPT_INT):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        try:
            value = int(value.__index__())
        except (TypeError, ValueError):  # numpy arrays of more than one element have an __index__ that refuses
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
        if not -_INT64_END <= value < _INT64_END:
            raise ValueError(f"{name}: {value} does not fit in int64")
        return value
    if kind in (wire.FLOAT, wire.OPT_FLOAT):
        if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        try:
            out = float(value)
        except OverflowError:
            raise ValueError(f"{name}: {value!r} does not fit in a float64") from None
        except (TypeError, ValueError):  # numpy arrays of more than one element have a __float__ that refuses
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}") from None
        if math.isinf(out) and not (isinstance(value, float) and math.isinf(value)):
            raise ValueError(f"{name}: {value!r} does not fit in a float64")
        return out
    if kind == wire.BOOL:
        if value is True or value is False:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    if kind == wire.STRING:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
        if "\0" in value:
            raise ValueError(f"{name}: text must not contain NUL characters")
        return value
    raise TypeError(f"{name}: wire type {kind} is not a scalar")


def _cacheable(key: tuple[Any, ...], context: Any) -> bool:
    try:
        hash((key, context))
    except TypeError:
        return False
    return not any(k is _BAD for k in key)


def _stream(stream: Any) -> int:
    handle = stream_handle(stream)
    assert handle is not None
    return handle


# ---- frame images ----------------------------------------------------------------------------------------------


def _write_image(
    f: LaunchFrame, decl: wire.Declaration, record_of: dict[int, int], checked: dict[str, Any], keep: list[Any]
) -> None:
    """Write every slot and record of ``f`` for these checked arguments, with data pointers and per-call values
    left zero (the launch writes them)."""
    from ..abi.cdefs import get_ffi

    ffi = get_ffi()
    q, d = f.q, f.d
    f.image = None  # overwritten here: no cached image is in the frame any more
    f.mv[:] = bytes(len(f.mv))
    for i, p in enumerate(decl.params):
        value = checked[p.name]
        type_word, payload = 2 * i, 2 * i + 1
        kind = p.wire
        if kind in wire.TENSOR_TYPES:
            if value is None:
                q[type_word] = NONE
                continue
            record = f.records + record_of[i] * _RECORD
            q[type_word] = DLTENSOR_PTR
            q[payload] = record
            _write_record(f, record, value)
        elif kind in wire.OBJECT_TENSOR_TYPES:
            q[type_word] = NONE if value is None else TENSOR
        elif kind == wire.ARRAY:
            q[type_word] = ARRAY
        elif kind in (wire.INT, wire.OPT_INT):
            q[type_word] = NONE if value is None else INT
            q[payload] = 0 if value is None or p.per_call else value
        elif kind == wire.FLOAT:
            q[type_word] = FLOAT
            d[payload] = 0.0 if p.per_call else value
        elif kind == wire.OPT_FLOAT:
            q[type_word] = NONE if value is None else FLOAT
            d[payload] = 0.0 if value is None else value
        elif kind == wire.BOOL:
            q[type_word] = BOOL
            q[payload] = int(value)
        elif kind == wire.STRING:
            text = ffi.new("char[]", value.encode())
            keep.append(text)
            q[type_word] = RAW_STR
            q[payload] = int(ffi.cast("uintptr_t", text))
    q[2 * len(decl.params)] = NONE


def _write_record(f: Frame, record: int, t: Tensor) -> None:
    base = (record - f.records) + (f.nargs + 1) * _SLOT  # byte offset of the record in the frame
    q = f.q
    word = base // 8
    n = t.ndim
    device_type = WIRE_DEVICE_TYPE.get(t.device.device_type, t.device.device_type)
    q[word] = 0  # data: written per call
    q[word + 1] = device_type | (t.device.device_id << 32)
    dt = t.dtype
    # ndim (int32) then dtype {u8 code, u8 bits, u16 lanes} share one word
    q[word + 2] = n | (dt.code << 32) | (dt.bits << 40) | (dt.lanes << 48)
    q[word + 3] = record + 48
    q[word + 4] = record + 48 + 8 * n
    q[word + 5] = 0  # byte_offset
    for k in range(n):
        q[word + 6 + k] = t.shape[k]
        q[word + 6 + n + k] = t.strides[k]


def _write_pointers(f: Frame, decl: wire.Declaration, record_of: dict[int, int], ptrs: list[int]) -> None:
    base = (f.nargs + 1) * _SLOT // 8
    for j, ptr in enumerate(ptrs):
        f.q[base + j * _RECORD // 8] = ptr


# ---- calling -----------------------------------------------------------------------------------------------------


def invoke(name: str, f: Frame, entry: Entry, stream: Any) -> None:
    """Call on ``stream`` (None: the framework's current stream of the first tensor, ``entry.stream_source``).

    The stream is set as TVM-FFI's current stream of the call's device only when it differs from it (one FFI
    call to compare instead of two to set and restore), and restored afterwards, also on error.
    """
    device_id = entry.device_id
    if stream is None:
        source = entry.stream_source
        assert source is not None  # the launch calls invoke without a stream only when the entry has a source
        handle = source(device_id)
    elif stream.__class__ is int and 0 <= stream < _PTR_END:
        handle = stream
    else:
        handle = _stream(stream)
    call_on(name, f, device_id, handle)


def _no_keys(*args: Any) -> tuple[tuple[Any, ...], list[int]]:
    raise _Slow


# ---- code generation -----------------------------------------------------------------------------------------


def _arg_names(decl: wire.Declaration) -> list[str]:
    """Python argument names of the launch function: the parameter names (a keyword gets a trailing ``_``)."""
    import keyword

    return [p.name + "_" if keyword.iskeyword(p.name) else p.name for p in decl.params]


def _source(
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
    """
    params = decl.params
    names = _arg_names(decl)
    bound_set = set(bound)
    read: list[str] = []  # computes _k{i} (and _p{i} for tensors)
    keys: list[str] = []
    ptrs: list[str] = []  # pointers written into DLTensor records
    tested: list[str] = []  # pointers of every tensor parameter: tested against the entry's rules each call
    writes: list[str] = []
    objects: list[int] = []
    base = (len(params) + 1) * _SLOT // 8
    for i, (p, a) in enumerate(zip(params, names, strict=True)):
        kind = p.wire
        if p.name in bound_set:
            if kind not in (wire.INT, wire.FLOAT, wire.BOOL) or p.per_call:
                raise ValueError(f"{decl.entry}: parameter {p.name}: only int, float and bool scalars can be bound")
            continue
        if kind in wire.TENSOR_TYPES or kind in wire.OBJECT_TENSOR_TYPES:
            # the reads of the tensor intake (its source text: descriptors, torch tensors and CuPy arrays inline)
            read += intake.read_source(a, f"_k{i}", f"_p{i}", _ABSENT if kind in wire.OPTIONAL_TYPES else None)
            keys.append(f"_k{i}")
            tested.append(f"_p{i}")
            if kind in wire.TENSOR_TYPES:
                j = record_of[i]
                ptrs.append(f"_p{i}")
                writes.append(f"_q[{base + j * _RECORD // 8}] = _p{i}")
            else:
                objects.append(i)
        elif kind == wire.ARRAY:
            read.append(f"_h{i} = {a}.handle")
            read.append(f"if not _h{i} or {a}.type_index != {ARRAY}: raise _Slow")
            writes.append(f"_q[{2 * i + 1}] = _h{i}")
        elif p.per_call:
            if kind == wire.INT:
                read.append(f"if {a}.__class__ is not int or not {-_INT64_END} <= {a} < {_INT64_END}: raise _Slow")
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


def _pointers_ok(entry: Entry, ptrs: tuple[int, ...]) -> bool:
    """The per-tensor test behind the fast path's union test: each pointer meets its own alignment mask (and the
    high-bit guard), and is non-NULL unless its tensor was validated empty."""
    for ptr, mask, empty_ok in zip(ptrs, entry.masks, entry.empty_ok, strict=True):
        if ptr & mask or not (ptr or empty_ok):
            return False
    return True


def _refuse_absent(name: str, release: str, absent: dict[str, Any]) -> None:
    """Arguments the bound module's declaration lacks: accepted only at their "off" value (None, False, 0)."""
    for arg, value in absent.items():
        if value is None or value is False or (type(value) is int and value == 0):
            continue
        raise ValueError(
            f"{arg}: not supported by the bound module's entry point {name} (FlashInfer "
            f"{release or 'release of that module'}); pin a release that has it, or leave it at its "
            f"default"
        )


def _tensor_object(value: Any, name: str) -> Any:
    """A TVM-FFI Tensor object for an ``ffi.Tensor`` parameter, made for one call (the caller releases it)."""
    from ..abi.objects import tensor_object

    return tensor_object(intake.describe(value, name, -1))  # -1: no DLPack synchronization, as as_tensor


def compile_launcher(
    decl: wire.Declaration,
    uri: str,
    check: Check | None = None,
    accept_absent: bool = False,
    bound: Bound | None = None,
) -> Callable[..., Any]:
    """Generate the launch function of ``decl`` on module ``uri`` (see the module docstring).

    ``accept_absent``: the launch function also takes (as ``**kwargs``) arguments of other releases'
    declarations of the entry point, refusing them unless they are at their "off" value.
    ``bound``: scalar parameters whose values are a function of the call's ``context`` (see :class:`Bound`).
    """
    setup_only = [p.name for p in decl.params if p.wire in wire.SETUP_ONLY_TYPES]
    if setup_only:
        raise ValueError(
            f"{decl.entry}: parameters {setup_only} are setup-only wire types; call it with fi_ffi.comm.control.call"
        )
    launcher_ = Launcher(decl, uri, check)
    source = _source(decl, launcher_.record_of, accept_absent, bound.names if bound is not None else ())
    namespace: dict[str, Any] = {
        **intake.read_globals(),  # the names of the tensor reads (intake.read_source)
        "_tls": launcher_.tls,
        "_slow": launcher_.slow,
        "_Slow": _Slow,
        "_BAD": _BAD,
        "_fail": fail,
        "_invoke": invoke,
        "_get_stream": None,  # TVMFFIEnvGetStream, set when the first frame is made (the runtime is loaded then)
        "_stream": _stream,
        "_name": launcher_.name,
        "_result": result,
        "_scalar": scalar,
        "_tensor_object": _tensor_object,
        "_pointers_ok": _pointers_ok,
        "_refuse_absent": _refuse_absent,
        "_release": decl.release,
        "_DEFAULTS": [p.default for p in decl.params],
        "_bound": bound.values if bound is not None else None,
    }
    exec(compile(source, f"<fi_ffi launcher {launcher_.name}>", "exec"), namespace)
    launcher_.namespace = namespace
    _all_launchers.add(launcher_)
    launch = namespace["launch"]
    intake.follow_classes(launch)  # the classes the reads test inline, kept in step with those the intake has seen
    launcher_.keys = namespace["keys"]
    launcher_.bound = bound
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
) -> Callable[..., Any]:
    """The launch function of ``decl`` on module ``uri`` (one per declaration, module, check and ``bound``).

    ``decl`` may be a sequence of declarations of one entry point for several FlashInfer releases: the module
    is then bound at once and the declaration its own signature matches is used (:func:`select_declaration`).
    Ops call the result with keyword arguments for parameters only some releases have (their defaults
    reproduce the older behaviour).
    """
    key = (id(decl), uri, check, bound)
    found = _launchers.get(key)
    if found is None:
        chosen = decl if isinstance(decl, wire.Declaration) else select_declaration(decl, uri)
        with _lock:
            found = _launchers.get(key)
            if found is None:
                found = compile_launcher(chosen, uri, check, accept_absent=chosen is not decl, bound=bound)
                _launchers[key] = found
                _pinned.append(decl)  # the id in the key stays valid while the entry exists
    return found


def select_declaration(declarations: Sequence[wire.Declaration], uri: str) -> wire.Declaration:
    """The declaration of ``declarations`` (one entry point, several releases) that module ``uri`` matches.

    Raises:
        LoaderError: none matches; names the module, the entry point, each declaration and the found signature.
    """
    from .kernels import entry_point

    entry = declarations[0].entry
    found = wire.parse_signature(entry_point(uri, entry).signature_text(), entry)
    chosen = wire.select(declarations, found)
    if chosen is None:
        expected = "\n".join(f"  FlashInfer {d.release or '?'}: {d.signature}" for d in declarations)
        raise LoaderError(
            f"module {uri!r}, entry point {entry!r}: its signature matches no declaration of fi_ffi\n"
            f"{expected}\n  found: {found.text if found else '(none)'}\nThe module was built from a "
            f"FlashInfer release fi_ffi does not declare; pin one it does (fi-ffi list shows each "
            f"module's release)"
        )
    _checked.add((uri, chosen))
    return chosen


# ---- binding with the signature check ------------------------------------------------------------------------


def bound_entry(uri: str, decl: wire.Declaration) -> Any:
    """Bind ``decl.entry`` of module ``uri`` and check the module's signature against ``decl`` (once).

    Raises:
        LoaderError: the module states another argument list (built from another FlashInfer release), naming the
            module, the entry point, the expected and the found signature.
    """
    from .kernels import entry_point

    ep = entry_point(uri, decl.entry)
    key = (uri, decl)
    if key not in _checked:
        found = wire.parse_signature(ep.signature_text(), decl.entry)
        why = wire.signature_mismatch(decl, found)
        if why:
            release = f" (declared for FlashInfer {decl.release})" if decl.release else ""
            raise LoaderError(
                f"module {uri!r}, entry point {decl.entry!r}: its signature does not match fi_ffi's declaration"
                f"{release}: {why}.\n  expected: {decl.signature}\n  found:    "
                f"{found.text if found else '(none)'}\nThe module was built from a FlashInfer release with another "
                f"argument list; pin a wheel of a release fi_ffi declares (fi-ffi list shows each module's release)"
            )
        _checked.add(key)
    return ep


_lock = threading.Lock()
_launchers: dict[tuple[Any, ...], Callable[..., Any]] = {}
_checked: set[tuple[str, wire.Declaration]] = set()
_pinned: list[Any] = []
_all_launchers: weakref.WeakSet[Launcher] = weakref.WeakSet()


def _reset() -> None:
    for each in list(_all_launchers):
        each.forget()
    _launchers.clear()
    _checked.clear()
    _pinned.clear()


caches.register("launchers (compiled per declaration, with their frames and images)", _reset)

__all__ = [
    "Bound",
    "Entry",
    "Launcher",
    "PreparedCall",
    "PreparedRun",
    "bound_entry",
    "check_tensor",
    "compile_launcher",
    "launcher",
    "plan_info",
    "scalar",
    "select_declaration",
]
