"""Prepared calls: one kernel call checked and packed once into a frame of its own, launched again and again.

:meth:`fi_ffi.launch.launcher.Launcher.prepare` makes a :class:`PreparedCall` (calling it is one FFI call) and
:meth:`~fi_ffi.launch.launcher.Launcher.prepare_run` a :class:`PreparedRun` (a call with plan info, whose slot
each call writes from the plan it is given). Whether a call goes straight to the callee or through
:func:`fi_ffi.abi.frame.call_on` (a stream to set and restore) is decided once, when it is prepared, by
:func:`fi_ffi.abi.frame.stream_call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..abi import wire
from ..abi.frame import Frame, describe_frame, fail, stream_call
from ..abi.objects import Array
from .validation import plan_info


class _Packed:
    """What a :class:`PreparedCall` and a :class:`PreparedRun` hold: the call's name, its own packed frame, the
    arguments kept referenced, its device and stream, and the callable that launches it (decided once by
    :func:`~fi_ffi.abi.frame.stream_call`)."""

    __slots__ = ("_args", "_call", "_frame", "_result_word", "device_id", "keep", "name", "stream")

    def __init__(self, name: str, frame: Frame, keep: tuple[Any, ...], device_id: int, stream: int | None) -> None:
        self.name = name
        self._frame = frame
        self.keep = keep
        self.device_id = device_id
        self.stream = stream
        self._result_word = 2 * frame.nargs  # the result slot in 8-byte words of frame.q: after nargs 16-byte slots
        self._call, self._args = stream_call(name, frame, device_id, stream)


class PreparedCall(_Packed):
    """One kernel call with all its arguments packed once, in a frame of its own.

    Calling it launches the kernel again with the same arguments (same buffers, scalars, stream): one FFI call,
    plus the stream set/restore when it was prepared with a stream. It keeps the arguments it was prepared
    with referenced (their memory must stay valid); drop it to release them.

    Attributes:
        name: the launcher's name (``module.entry``).
        keep: the arguments it was prepared with.
        device_id: the CUDA ordinal of its tensors.
        stream: the stream handle it launches on (None: TVM-FFI's current stream of the device at each call).
    """

    __slots__ = ()

    def __call__(self) -> None:
        f = self._frame
        # the result slot's type: None, as the launch function writes it before each call (the callee may have
        # left a result there at the previous call; TVM-FFI's convention is a None result slot on entry)
        f.q[self._result_word] = 0
        if self._call(*self._args):
            fail(self.name, f)

    def __repr__(self) -> str:
        return f"<PreparedCall {self.name}({', '.join(describe_frame(self._frame))})>"


class PreparedRun(_Packed):
    """A call packed once like a :class:`PreparedCall`, except its plan info, which each call gives:
    ``run(info, context)`` writes ``info`` (a live plan's ``Array``) into the packed frame and launches.

    Everything else was checked and packed once against ``context`` (e.g. a decode run's settings and batch
    size), so a call whose ``context`` is not equal to it is refused (ValueError naming ``plan``). It keeps the
    arguments it was prepared with referenced, but no plan info (it outlives many plans). The frame is written
    before each launch, so one prepared run is for one thread at a time (as a plan is: its schedule lives in one
    workspace).
    """

    __slots__ = ("_info_word", "context")

    def __init__(
        self,
        name: str,
        frame: Frame,
        keep: tuple[Any, ...],
        device_id: int,
        stream: int | None,
        info_word: int,
        context: Any,
    ) -> None:
        super().__init__(name, frame, keep, device_id, stream)
        self._info_word = info_word
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
        if self._call(*self._args):
            fail(self.name, f)

    def __repr__(self) -> str:
        return f"<PreparedRun {self.name}({', '.join(describe_frame(self._frame))})>"


def refuse_unpreparable(name: str, decl: wire.Declaration) -> None:
    """A call with plan info, per-call values or ``ffi.Tensor`` arguments cannot be packed once (TypeError)."""
    if any(p.wire in (wire.ARRAY, wire.FFI_TENSOR, wire.OPT_FFI_TENSOR) or p.per_call for p in decl.params):
        raise TypeError(f"{name}: calls with plan info, per-call values or ffi.Tensor arguments cannot be prepared")


def run_arguments(
    name: str, decl: wire.Declaration, bound: Any, values: Sequence[Any], context: Any
) -> tuple[list[Any], tuple[Any, ...], int]:
    """A prepared run's arguments: ``(every argument in wire order, what the run keeps, the plan info's word)``.

    ``values``: the launch function's arguments without the bound scalars (``bound``: a
    :class:`~fi_ffi.launch.launcher.Bound` or None; their values are ``bound.values(context)``). The plan info
    among them is only checked, not kept (a prepared run outlives many plans). ``ffi.Tensor`` parameters must be
    None (their objects are made per call).
    """
    params = decl.params
    arrays = [i for i, p in enumerate(params) if p.wire == wire.ARRAY]
    if len(arrays) != 1 or any(p.per_call or p.wire == wire.FFI_TENSOR for p in params):
        raise TypeError(
            f"{name}: only calls with one plan info and no per-call values or ffi.Tensor arguments can be "
            f"prepared as runs"
        )
    bound_names = () if bound is None else bound.names
    free = [p for p in params if p.name not in bound_names]
    if len(values) != len(free):
        raise TypeError(f"{name}: expected {len(free)} arguments, got {len(values)}")
    for p, value in zip(free, values, strict=True):
        if p.wire == wire.OPT_FFI_TENSOR and value is not None:
            raise ValueError(f"{p.name}: a prepared run takes no ffi.Tensor argument (it is made per call)")
    given = dict(zip((p.name for p in free), values, strict=True))
    if bound is not None:
        given.update(zip(bound.names, bound.values(context), strict=True))
    full = [given[p.name] for p in params]
    keep = tuple(None if p.wire == wire.ARRAY else value for p, value in zip(free, values, strict=True))
    return full, keep, 2 * arrays[0] + 1


__all__ = ["PreparedCall", "PreparedRun", "refuse_unpreparable", "run_arguments"]
