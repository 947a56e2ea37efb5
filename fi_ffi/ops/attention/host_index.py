"""Host index arrays of the attention plans (``qo_indptr``, ``kv_indptr``, ``kv_last_page_len``) and their checks.

A plan reads its index arrays on the host: they arrive as numpy int32 arrays (used as they are, no copy), host
descriptors, other host array producers, or lists/tuples of ints (converted once). :func:`host_array` gives a
1-D C-contiguous int32 numpy array, :func:`check_indptr` / :func:`check_last_page_len` validate the contents
(whole-array operations: numpy for long arrays, C-level list operations for short ones, where numpy's
per-call overhead dominates), and :func:`host_tensor` describes the array for a plan call as a
:class:`~fi_ffi.tensor.Tensor` without parsing a layout (a cached ``[n]`` int32 descriptor, rebound).

Every error names the argument and says what was expected.
"""

from __future__ import annotations

import threading
from operator import lt as _lt
from typing import Any

import numpy as np

from ... import caches
from ...tensor.descriptor import Tensor

__all__ = ["check_indices", "check_indptr", "check_last_page_len", "host_array", "host_tensor"]

_INT32_MIN, _INT32_END = -(1 << 31), 1 << 31
_I32 = np.dtype(np.int32)  # native int32 arrays share this descriptor object: an identity test is enough
_SHORT = 64  # up to this many entries, list operations beat numpy's per-call overhead


def host_array(name: str, value: Any) -> np.ndarray:
    """A host int32 index array as a 1-D C-contiguous numpy array (the caller's own array where possible).

    Accepts a numpy int32 array (returned as is when contiguous), a host :class:`~fi_ffi.tensor.Tensor` of
    int32 (CPU or page-locked), a host DLPack / array-interface producer, or a list/tuple of ints (Python or
    numpy integers; converted once, each value must fit int32). Other dtypes, floats, strings and booleans are
    a TypeError: the kernels read int32 and fi_ffi never converts an array behind the caller's back.
    """
    if value.__class__ is np.ndarray:
        if value.dtype is _I32 and value.ndim == 1 and value.flags.c_contiguous:  # the common case, no copy
            return value
        if value.dtype != np.int32:
            if value.dtype.byteorder == ">" and value.dtype.newbyteorder("=") == np.int32:
                raise TypeError(f"{name}: expected a native (little-endian) int32 array, got a big-endian one")
            raise TypeError(f"{name}: expected dtype int32, got {value.dtype}")
        if value.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {value.shape}")
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)
    if value.__class__ is list or value.__class__ is tuple:
        return _from_ints(name, value)
    if value.__class__ is Tensor:
        return _from_descriptor(name, value)
    if isinstance(value, np.ndarray):  # a subclass
        return host_array(name, np.asarray(value))
    if isinstance(value, (list, tuple)):
        return _from_ints(name, value)
    if hasattr(value, "__dlpack__") or hasattr(value, "__array_interface__"):
        from ...launch import checks

        return _from_descriptor(name, checks.tensor(name, value))
    raise TypeError(
        f"{name}: expected a host int32 array (numpy, host descriptor, list of ints), got {type(value).__name__}"
    )


def _from_ints(name: str, values: Any) -> np.ndarray:
    if not all(v.__class__ is int for v in values):
        for i, v in enumerate(values):  # the slow path names the first offender
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected a sequence of ints, got {type(v).__name__} {v!r} at index {i}")
        values = [int(v) for v in values]
    if values and (min(values) < _INT32_MIN or max(values) >= _INT32_END):
        bad = next(v for v in values if not _INT32_MIN <= v < _INT32_END)
        raise ValueError(f"{name}: values must fit in int32, got {bad}")
    return np.array(values, np.int32)


def _from_descriptor(name: str, t: Tensor) -> np.ndarray:
    if not t.device.is_host:
        raise ValueError(f"{name}: expected a host (CPU) array, the plan reads it on the host; got one on {t.device}")
    if t.dtype.name != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {t.dtype.name}")
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {t.shape}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous array, got strides {t.strides}")
    if not t.shape[0]:
        return np.zeros(0, np.int32)
    if not t.data_ptr:
        raise ValueError(f"{name}: data pointer is NULL")
    from ...abi.cdefs import get_ffi

    ffi = get_ffi()
    return np.frombuffer(ffi.buffer(ffi.cast("char*", t.data_ptr), t.shape[0] * 4), dtype=np.int32)


def check_indptr(name: str, arr: np.ndarray, batch_size: int | None = None) -> int:
    """Validate an indptr array: ``[batch+1]``, starts at 0, non-decreasing. Returns its last value."""
    n = arr.shape[0]
    if n < 2:
        raise ValueError(f"{name}: expected at least 2 entries ([batch_size + 1], batch_size >= 1), got {n}")
    if batch_size is not None and n != batch_size + 1:
        raise ValueError(f"{name}: expected {batch_size + 1} entries ([batch_size + 1]), got {n}")
    if n <= _SHORT:
        values = arr.tolist()
        ok = values[0] == 0 and sorted(values) == values
    else:
        values = None
        ok = arr[0] == 0 and not (arr[1:] < arr[:-1]).any()
    if not ok:
        _bad_indptr(name, arr)
    return values[-1] if values is not None else int(arr[n - 1])  # type: ignore[no-any-return]


def _bad_indptr(name: str, arr: np.ndarray) -> None:
    if arr[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {int(arr[0])}")
    i = int(np.argmax(arr[1:] < arr[:-1]))
    raise ValueError(
        f"{name}: must be non-decreasing, but {name}[{i + 1}] = {int(arr[i + 1])} < {name}[{i}] = {int(arr[i])}"
    )


def check_indices(name: str, arr: np.ndarray, pages: int) -> None:
    """Page ids (host int32, 1-D): at least the ``pages`` the indptr ends at, none negative among those."""
    if arr.shape[0] < pages:
        raise ValueError(f"{name}: the indptr ends at {pages} pages, but {name} has {arr.shape[0]} entries")
    if pages and int(arr[:pages].min()) < 0:
        i = int(np.argmax(arr[:pages] < 0))
        raise ValueError(f"{name}: page ids must be >= 0, got {name}[{i}] = {int(arr[i])}")


def check_last_page_len(
    name: str, last: np.ndarray, kv_indptr: np.ndarray, page_size: int, lengths: bool = False
) -> np.ndarray | None:
    """Validate last-page lengths against the page indptr; with ``lengths``, return the KV lengths (int32).

    A request with pages has ``1 <= last <= page_size`` (its length is ``(pages - 1) * page_size + last``); a
    request with no pages has length 0 and must have ``last == 0`` (the kernels ignore it, but FA3 plans and
    upstream's ``get_seq_lens`` would count it as tokens).
    """
    batch = kv_indptr.shape[0] - 1
    if last.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} entries ([batch_size]), got {last.shape[0]}")
    if batch <= _SHORT:  # list operations: numpy's per-call overhead dominates short arrays
        ptr = kv_indptr.tolist()
        values = last.tolist()
        if not lengths and values and min(values) >= 1 and max(values) <= page_size and all(map(_lt, ptr, ptr[1:])):
            return None  # every request has pages and a valid last page (the common case, at C speed)
        out_list = []
        for i, lp in enumerate(values):
            pages_i = ptr[i + 1] - ptr[i]
            if (pages_i and not 1 <= lp <= page_size) or (not pages_i and lp):
                _bad_last(name, i, pages_i, lp, page_size)
            out_list.append((pages_i - 1) * page_size + lp if pages_i else 0)
        if not lengths:
            return None
        if out_list and max(out_list) >= _INT32_END:
            raise ValueError(f"{name}: a KV length exceeds int32")
        return np.array(out_list, np.int32)
    pages = (kv_indptr[1:] - kv_indptr[:-1]).astype(np.int64)
    has = pages > 0
    bad = (has & ((last < 1) | (last > page_size))) | (~has & (last != 0))
    if bad.any():
        i = int(np.argmax(bad))
        _bad_last(name, i, int(pages[i]), int(last[i]), page_size)
    if not lengths:
        return None
    out = np.where(has, (pages - 1) * page_size + last, 0)
    if out.size and out.max() >= _INT32_END:
        raise ValueError(f"{name}: a KV length exceeds int32")
    return out.astype(np.int32)


def _bad_last(name: str, i: int, pages: int, last: int, page_size: int) -> None:
    if pages:
        raise ValueError(
            f"{name}: request {i} has {pages} page(s), so its last page holds 1..{page_size} tokens; got {last}"
        )
    raise ValueError(f"{name}: request {i} has no pages, so its last_page_len must be 0; got {last}")


# ---- describing a host array for a plan call ------------------------------------------------------------------

_templates: dict[int, Tensor] = {}  # n -> an int32 [n] host descriptor (pointer rebound per call); values only
_lock = threading.Lock()
_MAX_TEMPLATES = 4096


def host_tensor(arr: np.ndarray) -> Tensor:
    """A host :class:`Tensor` describing ``arr`` (1-D C-contiguous int32, from :func:`host_array`).

    The descriptor does not keep ``arr`` alive: the caller holds it for the plan call.
    """
    n = arr.shape[0]
    template = _templates.get(n)
    if template is None:
        with _lock:
            if len(_templates) >= _MAX_TEMPLATES:
                _templates.clear()
            template = _templates[n] = Tensor(0, (n,), "int32", "cpu")
    if not n:
        return template
    if _address is None:
        _bind()
    return template.rebind(int(_address(_UINTPTR, _from_buffer(arr))))


_address: Any = None  # ffi.cast, ffi.from_buffer and the uintptr_t type, bound on first use
_from_buffer: Any = None
_UINTPTR: Any = None


def _bind() -> None:
    global _address, _from_buffer, _UINTPTR
    from ...abi.cdefs import get_ffi

    ffi = get_ffi()
    _UINTPTR, _from_buffer, _address = ffi.typeof("uintptr_t"), ffi.from_buffer, ffi.cast


caches.register("host index descriptors (int32 [n] templates of the attention plans)", _templates.clear)
