"""The layout cache of a launch function: per thread and entry point, one frame and the images it remembers.

An image is the frame's bytes for one layout combination that passed every check (argument slots and one
``DLTensor`` record per tensor parameter, written by :func:`fi_ffi.abi.frame.write_image`), data pointers and
per-call values left zero. An :class:`Entry` is what the cache keeps of it: the image and what the fast path tests
of the pointers each call (alignment masks, NULL, overlap). The cache is a bounded dict from layout keys (values:
ints, shapes, dtypes, the call's ``context``) to entries, cleared, not evicted one by one, when full.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

from ..abi.frame import Frame
from ..tensor import intake
from .pointer_rules import ApartTest

PTR_END = 1 << 64  # one past the largest address
INT32_END = 1 << 31  # one past the largest size the kernels' int32 hold
# Any pointer with one of these bits set takes the slow path, which checks the extent does not wrap.
HIGH = ((1 << 64) - 1) ^ ((1 << 56) - 1)
ABSENT = 4096  # the "pointer" of an absent optional tensor: its record is not passed; aligned for any mask
MAX_IMAGES = 512  # per thread and entry point; cleared (not evicted one by one) when full


class Unexpected:
    """Key of a scalar of an unexpected type: never cached, so such a call always takes the slow path."""

    def __repr__(self) -> str:
        return "<unexpected type>"


UNEXPECTED = Unexpected()


class Slow(Exception):
    """Internal to the generated launch: leave the fast path (never seen by a caller)."""


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


def pointers_ok(entry: Entry, ptrs: tuple[int, ...]) -> bool:
    """The per-tensor test behind the fast path's union test: each pointer meets its own alignment mask (and the
    high-bit guard), and is non-NULL unless its tensor was validated empty."""
    for ptr, mask, empty_ok in zip(ptrs, entry.masks, entry.empty_ok, strict=True):
        if ptr & mask or not (ptr or empty_ok):
            return False
    return True


def remember_entry(frame: LaunchFrame, key: tuple[Any, ...], context: Any, entry: Entry) -> None:
    """Keep ``entry`` under ``(*key, context)`` in ``frame``'s cache, unless the key cannot be one (unhashable, or
    a scalar of an unexpected type); a full cache is cleared first."""
    try:
        hash((key, context))
    except TypeError:
        return
    if any(k is UNEXPECTED for k in key):
        return
    cache = frame.cache
    if len(cache) >= MAX_IMAGES:
        cache.clear()
    cache[(*key, context)] = entry


__all__ = [
    "ABSENT",
    "HIGH",
    "INT32_END",
    "MAX_IMAGES",
    "PTR_END",
    "UNEXPECTED",
    "Entry",
    "LaunchFrame",
    "Slow",
    "Unexpected",
    "pointers_ok",
    "remember_entry",
]
