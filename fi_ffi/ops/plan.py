"""Plan objects and the host-side checks of plan inputs, shared by batch decode and batch prefill.

A :class:`Plan` owns the ``Array<int>`` a module's ``plan`` entry point returned (the schedule's offsets into
the int workspace) and everything a ``run`` must agree with: the module (variant and backend), the workspace,
batch size, heads, head dims, page size, KV layout, dtypes, and the attention settings fixed at plan time
(mask mode, window, soft cap, scales). A run with tensors that disagree is a ValueError/TypeError raised
before the kernel is called, never a wrong answer.

Ownership: the Array is released exactly once, by :meth:`Plan.release` (idempotent; a context manager
exit calls it) or when the Plan is garbage-collected. A released plan cannot be run. A plan can be reused
for any number of runs (every layer of a step), until the next plan on the same workspace overwrites the
schedule in the int workspace: from then on it is stale and running it is a ValueError.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from typing import Any

import numpy as np

from ..abi.objects import ARRAY, BOOL, DLTENSOR_PTR, FLOAT, Array
from ..dtypes import DType
from ..errors import KernelError
from ..tensor import Tensor
from . import checks
from .variants import POS_ENCODINGS
from .workspace import Workspace, current_stream

__all__ = ["Plan", "PlanSettings", "host_array"]

LAYOUTS = {"NHD": 0, "HND": 1}
MASK_NONE, MASK_CAUSAL, MASK_CUSTOM = 0, 1, 2


class PlanSettings:
    """What every plan made with the same settings on the same workspace shares (built once, cached).

    Attributes: ``kind``, ``mode``, ``variant``, ``uri``, ``backend``, ``device_id``, ``num_qo_heads``,
    ``num_kv_heads``, ``head_dim_qk``, ``head_dim_vo``, ``page_size``, ``kv_layout``, ``dtype_q``, ``dtype_kv``,
    ``dtype_o``, ``mask_mode``, ``window_left``, ``logits_soft_cap``, ``sm_scale``, ``rope_scale``,
    ``rope_theta``, ``enable_cuda_graph``; and for the ops: ``extra`` (objects the run passes, kept alive),
    ``plan_ep``/``plan_sig``/``plan_prefix``/``plan_middle``/``plan_suffix`` (the plan call's constant parts),
    ``ep``/``tails`` (the run's entry point, and its frame's slots after the tensors packed for
    ``enable_pdl`` False/True).
    """

    __slots__ = ("backend", "device_id", "dtype_kv", "dtype_o", "dtype_q", "enable_cuda_graph", "ep", "extra",
                 "head_dim_qk", "head_dim_vo", "kind", "kv_layout", "logits_soft_cap", "mask_mode", "mode",
                 "num_kv_heads", "num_qo_heads", "page_size", "plan_ep", "plan_middle", "plan_prefix", "plan_sig",
                 "plan_suffix", "rope_scale", "rope_theta", "sm_scale", "tails", "uri", "variant", "window_left")

    def __init__(self, *, kind: str = "batch_decode", mode: str = "paged", variant: Any = None, device_id: int = 0,
                 num_qo_heads: int = 0, num_kv_heads: int = 0, head_dim_qk: int = 0, head_dim_vo: int = 0,
                 page_size: int = 1, kv_layout: str = "NHD", dtype_q: DType | None = None,
                 dtype_kv: DType | None = None, dtype_o: DType | None = None, mask_mode: int = MASK_NONE,
                 window_left: int = -1, logits_soft_cap: float = 0.0, sm_scale: float = 1.0, rope_scale: float = 1.0,
                 rope_theta: float = 1e4, enable_cuda_graph: bool = False, extra: tuple[Any, ...] = ()) -> None:
        self.kind = kind
        self.mode = mode
        self.variant = variant
        self.uri = variant.uri if variant is not None else ""
        self.backend = variant.backend if variant is not None else ""
        self.device_id = device_id
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_vo = head_dim_vo
        self.page_size = page_size
        self.kv_layout = kv_layout
        self.dtype_q = dtype_q
        self.dtype_kv = dtype_kv
        self.dtype_o = dtype_o
        self.mask_mode = mask_mode
        self.window_left = window_left
        self.logits_soft_cap = logits_soft_cap
        self.sm_scale = sm_scale
        self.rope_scale = rope_scale
        self.rope_theta = rope_theta
        self.enable_cuda_graph = enable_cuda_graph
        self.extra = extra
        self.ep: Any = None
        self.tails: tuple[bytes, bytes] = (b"", b"")
        self.plan_ep: Any = None
        self.plan_sig: Any = None
        self.plan_prefix: tuple[Any, ...] = ()
        self.plan_middle: tuple[Any, ...] = ()
        self.plan_suffix: tuple[Any, ...] = ()


class Plan:
    """The result of a ``plan`` call: the module's schedule plus what runs must match.

    Per plan: ``workspace``, ``batch_size``, ``num_rows`` (query rows, ``qo_indptr[-1]``; the batch size for
    decode), ``kv_extent`` (``kv_indptr[-1]``: pages, or tokens for ragged). Shared with every plan of the same
    settings (:class:`PlanSettings`, read through the plan): ``kind`` (``"batch_decode"`` / ``"batch_prefill"``),
    ``mode`` (``"paged"`` / ``"ragged"``), ``variant``, ``uri``, ``backend``, ``device_id``, ``num_qo_heads``,
    ``num_kv_heads``, ``head_dim_qk``, ``head_dim_vo``, ``page_size``, ``kv_layout``, ``dtype_q``, ``dtype_kv``,
    ``dtype_o``, ``mask_mode``, ``window_left``, ``logits_soft_cap``, ``sm_scale``, ``rope_scale``, ``rope_theta``,
    ``enable_cuda_graph``.
    """

    __slots__ = ("__weakref__", "_generation", "_head", "_info", "_key", "_s", "batch_size", "kv_extent", "num_rows",
                 "workspace")

    _s: PlanSettings

    def __init__(self, info: Array, workspace: Any = None, *, batch_size: int = 0, num_rows: int = 0,
                 kv_extent: int = 0, **settings: Any) -> None:
        """Take ownership of ``info`` (an Array a plan call returned). Ops use :meth:`make`; tests may use this."""
        if not isinstance(info, Array) or info.type_index != ARRAY:
            raise TypeError(f"info: expected an owned Array, got {type(info).__name__}")
        if workspace is not None:
            settings.setdefault("device_id", workspace.device.device_id)
        self._init(info, workspace, workspace._generation if workspace is not None else 0, PlanSettings(**settings),
                   batch_size, num_rows, kv_extent)

    @classmethod
    def make(cls, info: Array, workspace: Any, generation: int, settings: PlanSettings, batch_size: int,
             num_rows: int, kv_extent: int) -> Plan:
        """The plan of a schedule ``info`` returned by a plan call on ``workspace`` at ``generation``."""
        plan = object.__new__(cls)
        plan._init(info, workspace, generation, settings, batch_size, num_rows, kv_extent)
        return plan

    def _init(self, info: Array, workspace: Any, generation: int, settings: PlanSettings, batch_size: int,
              num_rows: int, kv_extent: int) -> None:
        self._info = info
        self.workspace = workspace
        self._generation = generation
        self._s = settings
        self.batch_size = batch_size
        self.num_rows = num_rows
        self.kv_extent = kv_extent
        # Everything run-time validation depends on, interned so that the validation memo compares by identity.
        self._key = _intern((settings, batch_size))
        # The run frame's first three slots, packed: float and int workspaces, this plan's schedule (borrowed).
        self._head = _HEAD.pack(DLTENSOR_PTR, 0, workspace.float_buffer._dl_addr, DLTENSOR_PTR, 0,
                                workspace.int_buffer._dl_addr, ARRAY, 0, info.handle) if workspace is not None else b""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._s, name)

    @property
    def released(self) -> bool:
        """True once the schedule has been released."""
        return not self._info.handle

    @property
    def stale(self) -> bool:
        """True if a later plan on the same workspace (or closing it) has overwritten this plan's schedule."""
        ws = self.workspace
        return ws is not None and ws._generation != self._generation

    @property
    def info(self) -> list[int]:
        """The schedule vector as plain ints (diagnostics; FA2 prefill 15, FA3 prefill 9, decode 10 values)."""
        return self._info.to_list()

    @property
    def refcount(self) -> int:
        """Strong reference count of the owned Array (0 once released); diagnostics and tests."""
        return self._info.refcount

    def release(self) -> None:
        """Release the schedule now (idempotent). Runs already enqueued are unaffected."""
        self._info.release()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        s = self._s
        state = "released" if self.released else ("stale" if self.stale else "live")
        return (f"<Plan {s.kind}/{s.mode} {s.backend} batch={self.batch_size} heads={s.num_qo_heads}/"
                f"{s.num_kv_heads} head_dim={s.head_dim_qk} page={s.page_size} {s.kv_layout} {state}>")

    def check_runnable(self, kind: str, mode: str) -> None:
        """Raise unless this plan is live, current on its workspace, and of ``kind``/``mode``."""
        s = self._s
        if s.kind != kind or s.mode != mode:
            raise ValueError(f"plan: expected a {kind} plan for {mode} KV, got a {s.kind} plan for {s.mode} KV")
        if not self._info.handle:
            raise ValueError("plan: has been released")
        if self.workspace._generation != self._generation:
            raise ValueError("plan: is stale: another plan was made on its workspace since (or the workspace was "
                             "closed), which overwrote its schedule; plan again")


_HEAD = struct.Struct("<iIqiIqiIq")


def pack_slots(*values: Any) -> bytes:
    """``TVMFFIAny`` slots packed from (type_index, 0, payload) triples (floats as doubles)."""
    fmt = "".join("iId" if values[i] == FLOAT else "iIq" for i in range(0, len(values), 3))
    return struct.pack("<" + fmt, *values)


def run_tails(mid: tuple[Any, ...], tail: tuple[Any, ...]) -> tuple[bytes, bytes]:
    """The run frame's slots after the tensors, packed for ``enable_pdl`` False and True (index by the bool).

    ``mid``: the slots before ``enable_pdl``; ``tail``: those after it, ending with the result slot (None).
    """
    return pack_slots(*mid, BOOL, 0, 0, *tail), pack_slots(*mid, BOOL, 0, 1, *tail)


_interned: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_intern_lock = threading.Lock()


def _intern(key: tuple[Any, ...]) -> tuple[Any, ...]:
    found = _interned.get(key)
    if found is None:
        with _intern_lock:
            if len(_interned) > 4096:
                _interned.clear()
            found = _interned.setdefault(key, key)
    return found


class Memo:
    """A bounded FIFO set of argument tuples that passed validation (descriptors are immutable).

    Keys hold the descriptors themselves (identity hash), never ids, so a recycled address cannot alias.
    Only all-descriptor calls are remembered: converted inputs are fresh objects that would never hit again.
    """

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int = 128) -> None:
        self.cap = cap
        self.seen: dict[tuple[Any, ...], None] = {}

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return key in self.seen

    def add(self, key: tuple[Any, ...]) -> None:
        seen = self.seen
        if len(seen) >= self.cap:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):  # another thread evicted first
                del seen[next(iter(seen))]
        seen[key] = None

    def clear(self) -> None:
        self.seen.clear()


# ------------------------------------------------------------------------------------------ host index arrays


def host_array(name: str, value: Any) -> np.ndarray:
    """A host int32 index array as a 1-D C-contiguous numpy array (a view where possible, never a device read).

    Accepts a numpy int32 array, a host :class:`~fi_ffi.tensor.Tensor` descriptor (CPU or page-locked) of int32,
    a host DLPack producer, or a list/tuple of ints (converted to int32). Other dtypes are a TypeError: the
    kernels read int32 and fi_ffi never converts an array behind the caller's back.
    """
    if type(value) is np.ndarray:
        if value.dtype != np.int32:
            raise TypeError(f"{name}: expected dtype int32, got {value.dtype}")
        if value.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {value.shape}")
        return value if value.flags.c_contiguous else value.copy()  # a strided view: copied, host-only
    if type(value) is Tensor:
        t = value
        if not t.device.is_host:
            raise ValueError(f"{name}: expected a host (CPU) array, the plan reads it on the host; got one on "
                             f"{t.device}")
        if t.dtype.name != "int32":
            raise TypeError(f"{name}: expected dtype int32, got {t.dtype.name}")
        if t.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {t.shape}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous array, got strides {t.strides}")
        if t.shape[0] and not t.data_ptr:
            raise ValueError(f"{name}: data pointer is NULL")
        return _numpy_view(t)
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value, dtype=np.int64)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a sequence of ints, got {value!r}") from None
        if arr.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
        if arr.size and (arr.min() < -(1 << 31) or arr.max() >= 1 << 31):
            raise ValueError(f"{name}: values must fit in int32")
        return arr.astype(np.int32)
    if isinstance(value, np.ndarray):  # a subclass
        return host_array(name, np.asarray(value))
    if hasattr(value, "__dlpack__") or hasattr(value, "__array_interface__"):
        return host_array(name, checks.tensor(name, value))
    raise TypeError(f"{name}: expected a host int32 array (numpy, host descriptor, list), got {type(value).__name__}")


def _numpy_view(t: Tensor) -> np.ndarray:
    if not t.shape[0]:
        return np.zeros(0, np.int32)
    from ..abi.cdefs import get_ffi

    ffi = get_ffi()
    buf = ffi.buffer(ffi.cast("char*", t.data_ptr), t.shape[0] * 4)
    return np.frombuffer(buf, dtype=np.int32)


_DLT = struct.Struct("<QiiiBBHQQQ")  # DLTensor: data, device, ndim, dtype, shape*, strides*, byte_offset
_DLT_SLOT = _DLT.size + 16  # the record, then its 1-D shape and strides


class _HostDescriptors(threading.local):
    """Per-thread DLTensor records for the host index arrays of a plan call (read during the call only)."""

    def __init__(self) -> None:
        from ..abi.cdefs import get_ffi

        ffi = get_ffi()
        self.block = ffi.new("char[]", 4 * _DLT_SLOT)
        self.buf = ffi.buffer(self.block)
        self.base = int(ffi.cast("uintptr_t", self.block))


_host = _HostDescriptors()


def host_descriptor(slot: int, arr: np.ndarray) -> int:
    """Address of a ``DLTensor`` (host, int32, 1-D) describing ``arr``, valid on this thread until ``slot`` is
    reused. The caller keeps ``arr`` alive for the call."""
    h = _host
    off = slot * _DLT_SLOT
    addr = h.base + off
    _DLT.pack_into(h.buf, off, arr.ctypes.data if arr.shape[0] else 0, 1, 0, 1, 0, 32, 1, addr + _DLT.size,
                   addr + _DLT.size + 8, 0)
    struct.pack_into("<qq", h.buf, off + _DLT.size, arr.shape[0], 1)
    return addr


def check_indptr(name: str, arr: np.ndarray, batch_size: int | None = None) -> int:
    """Validate an indptr array: ``[batch+1]``, starts at 0, non-decreasing. Returns its last value."""
    n = arr.shape[0]
    if n < 2:
        raise ValueError(f"{name}: expected at least 2 entries ([batch_size + 1], batch_size >= 1), got {n}")
    if batch_size is not None and n != batch_size + 1:
        raise ValueError(f"{name}: expected {batch_size + 1} entries ([batch_size + 1]), got {n}")
    if arr[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {int(arr[0])}")
    if (arr[1] < 0) if n == 2 else (arr[1:] < arr[:-1]).any():
        i = int(np.argmax(arr[1:] < arr[:-1]))
        raise ValueError(f"{name}: must be non-decreasing, but {name}[{i + 1}] = {int(arr[i + 1])} < "
                         f"{name}[{i}] = {int(arr[i])}")
    return int(arr[n - 1])


def check_last_page_len(name: str, last: np.ndarray, kv_indptr: np.ndarray, page_size: int,
                        lengths: bool = False) -> np.ndarray | None:
    """Validate last-page lengths against the page indptr; with ``lengths``, return the KV lengths (int32).

    A request with pages has ``1 <= last <= page_size`` (its length is ``(pages - 1) * page_size + last``); a
    request with no pages has length 0 and must have ``last == 0`` (the kernels ignore it, but FA3 plans and
    upstream's ``get_seq_lens`` would count it as tokens).
    """
    batch = kv_indptr.shape[0] - 1
    if last.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} entries ([batch_size]), got {last.shape[0]}")
    if batch <= 16:  # a Python loop beats numpy's per-call overhead on small batches
        ptr = kv_indptr.tolist()
        out = []
        for i, lp in enumerate(last.tolist()):
            pages = ptr[i + 1] - ptr[i]
            if pages:
                if not 1 <= lp <= page_size:
                    _bad_last(name, i, pages, lp, page_size)
                out.append((pages - 1) * page_size + lp)
            else:
                if lp:
                    _bad_last(name, i, 0, lp, page_size)
                out.append(0)
        if not lengths:
            return None
        if out and max(out) >= 1 << 31:
            raise ValueError(f"{name}: a KV length exceeds int32")
        return np.array(out, np.int32)
    pages = (kv_indptr[1:] - kv_indptr[:-1]).astype(np.int64)
    has = pages > 0
    bad = (has & ((last < 1) | (last > page_size))) | (~has & (last != 0))
    if bad.any():
        i = int(np.argmax(bad))
        _bad_last(name, i, int(pages[i]), int(last[i]), page_size)
    if not lengths:
        return None
    out_arr = np.where(has, (pages - 1) * page_size + last, 0)
    if out_arr.size and out_arr.max() >= 1 << 31:
        raise ValueError(f"{name}: a KV length exceeds int32")
    return out_arr.astype(np.int32)


def _bad_last(name: str, i: int, pages: int, last: int, page_size: int) -> None:
    if pages:
        raise ValueError(f"{name}: request {i} has {pages} page(s), so its last page holds 1..{page_size} tokens; "
                         f"got {last}")
    raise ValueError(f"{name}: request {i} has no pages, so its last_page_len must be 0; got {last}")


# ------------------------------------------------------------------------------------------ run-time tensor checks


def device_tensor(name: str, t: Tensor, shape: tuple[int | None, ...], layout: str, dtype: DType | None,
                  device: Any, contiguous: bool = False) -> None:
    """``t`` has ``len(shape)`` dims matching ``shape`` (None = any size), ``dtype``, lives on CUDA ``device``,
    has a contiguous last dimension (or is fully contiguous) and 16-byte aligned rows for vector loads."""
    if t.ndim != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want} ({layout}), got {t.shape}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name}, got {t.dtype.name}")
    if t.device != device:
        if not t.device.is_cuda:
            raise ValueError(f"{name}: expected a CUDA device tensor on {device}, got one on {t.device}")
        raise ValueError(f"{name}: expected a tensor on {device} (the workspace's device), got {t.device}")
    if not t.data_ptr and t.numel:
        raise ValueError(f"{name}: data pointer is NULL")
    if contiguous:
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got shape {t.shape} strides {t.strides}")
    elif t.ndim and t.strides[-1] != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.strides}")
    vec = 16 // t.dtype.itemsize
    if vec > 1 and t.numel:
        if t.data_ptr % 16:
            raise ValueError(f"{name}: data pointer 0x{t.data_ptr:x} must be 16-byte aligned (vector loads)")
        for dim, stride in enumerate(t.strides[:-1]):
            if stride % vec and t.shape[dim] > 1:
                raise ValueError(f"{name}: stride of dimension {dim} must be a multiple of {vec} elements "
                                 f"(16 bytes), got {stride}")


def index_tensor(name: str, t: Tensor, length: int | None, device: Any) -> None:
    """A device int32 index tensor: 1-D, contiguous, on ``device``, of ``length`` entries (None: any)."""
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D int32 tensor, got shape {t.shape}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {t.shape[0]}")
    if t.dtype.name != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {t.dtype.name}")
    if t.device != device:
        raise ValueError(f"{name}: expected a device tensor on {device} (the run reads it on the GPU), got one on "
                         f"{t.device}")
    if t.shape[0] > 1 and t.strides[0] != 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.strides}")
    if not t.data_ptr and t.numel:
        raise ValueError(f"{name}: data pointer is NULL")


def kv_cache(k: Tensor, v: Tensor, layout: str, num_kv_heads: int, page_size: int | None, head_dim_qk: int,
             head_dim_vo: int, dtype: DType, device: Any, names: tuple[str, str] = ("k_cache", "v_cache")) -> int:
    """Paged K/V caches (4-D, NHD ``[P, page, Hkv, d]`` / HND ``[P, Hkv, page, d]``) with identical strides.

    Returns the number of pages ``P``.
    """
    kn, vn = names
    if layout == "NHD":
        ks, vs, text = (None, page_size, num_kv_heads, head_dim_qk), (None, page_size, num_kv_heads, head_dim_vo), \
            "NHD [num_pages, page_size, num_kv_heads, head_dim]"
    else:
        ks, vs, text = (None, num_kv_heads, page_size, head_dim_qk), (None, num_kv_heads, page_size, head_dim_vo), \
            "HND [num_pages, num_kv_heads, page_size, head_dim]"
    device_tensor(kn, k, ks, text, dtype, device)
    device_tensor(vn, v, vs, text, dtype, device)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{vn}: expected {k.shape[0]} pages (as {kn}), got {v.shape[0]}")
    if k.strides != v.strides:
        raise ValueError(f"{vn}: the kernels use one set of strides for both caches; {kn} has strides {k.strides},"
                         f" {vn} has {v.strides}")
    return k.shape[0]


def lse_tensor(name: str, t: Tensor | None, shape: tuple[int, ...], device: Any) -> None:
    """Optional float32 contiguous log-sum-exp output of ``shape`` on ``device``."""
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {t.shape}")
    if t.dtype.name != "float32":
        raise TypeError(f"{name}: expected dtype float32, got {t.dtype.name}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (the kernel writes it dense), got strides {t.strides}")
    if not t.data_ptr and t.numel:
        raise ValueError(f"{name}: data pointer is NULL")


def layout_name(value: Any) -> str:
    """``"NHD"`` or ``"HND"`` (case-insensitive), else ValueError."""
    if isinstance(value, str) and value.upper() in LAYOUTS:
        return value.upper()
    raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {value!r}")


def window(value: Any) -> int:
    w = checks.integer("window_left", value)
    if w < -1:
        raise ValueError(f"window_left: expected -1 (no window) or >= 0, got {w}")
    return w


def soft_cap(value: Any) -> float:
    c = checks.finite("logits_soft_cap", value)
    if c < 0:
        raise ValueError(f"logits_soft_cap: expected 0 (off) or a value > 0, got {c}")
    return c


def pos_encoding(value: Any) -> int:
    if isinstance(value, str) and value.upper() in POS_ENCODINGS:
        return POS_ENCODINGS[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in POS_ENCODINGS.values():
        return value
    raise ValueError(f"pos_encoding: expected 'NONE', 'ROPE_LLAMA' or 'ALIBI', got {value!r}")


def scales(head_dim_qk: int, sm_scale: Any, rope_scale: Any, rope_theta: Any) -> tuple[float, float, float]:
    """(sm_scale, rope_scale, rope_theta) checked; sm_scale None means ``1/sqrt(head_dim_qk)``."""
    s = head_dim_qk ** -0.5 if sm_scale is None else checks.positive_finite("sm_scale", sm_scale)
    return s, checks.positive_finite("rope_scale", rope_scale), checks.positive_finite("rope_theta", rope_theta)


def positive(name: str, value: Any) -> int:
    return checks.integer(name, value, 1)


def gqa(num_qo_heads: int, num_kv_heads: int, decode: bool) -> None:
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads: must be a multiple of num_kv_heads ({num_kv_heads}), got {num_qo_heads}")
    if decode and num_qo_heads // num_kv_heads not in (1, 2, 3, 4, 8):
        raise ValueError(f"num_qo_heads: the decode kernels support GQA group sizes 1, 2, 3, 4 and 8 only; "
                         f"{num_qo_heads} / {num_kv_heads} = {num_qo_heads // num_kv_heads}")


def workspace_of(value: Any) -> Any:
    if not isinstance(value, Workspace):
        raise TypeError(f"workspace: expected a fi_ffi.ops.workspace.Workspace (Workspace.allocate() or "
                        f"Workspace.from_buffers()), got {type(value).__name__}")
    return value


def alibi(pos: int, alibi_slopes: Any, num_qo_heads: int, device: Any) -> Any:
    """The ALiBi slopes as an ``ffi.Tensor`` object (float32 ``[num_qo_heads]``), required exactly when
    ``pos`` is 2 (ALIBI); None otherwise."""
    if pos == 2 and alibi_slopes is None:
        raise ValueError("alibi_slopes: required with pos_encoding ALIBI (float32 [num_qo_heads])")
    if pos != 2 and alibi_slopes is not None:
        raise ValueError("alibi_slopes: only used with pos_encoding ALIBI")
    return optional_object("alibi_slopes", alibi_slopes, "float32", (num_qo_heads,), device)


def optional_object(name: str, value: Any, dtype: str, shape: tuple[int, ...] | None, device: Any) -> Any:
    """An optional device tensor passed as an ``Optional<ffi.Tensor>``: checked, returned as a TensorObject."""
    if value is None:
        return None
    from ..abi.objects import tensor_object
    t = checks.tensor(name, value)
    if t.dtype.name != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype.name}")
    if t.ndim != 1 or (shape is not None and t.shape != shape):
        want = shape if shape is not None else "(n,)"
        raise ValueError(f"{name}: expected a 1-D tensor of shape {want}, got {t.shape}")
    if t.device != device:
        raise ValueError(f"{name}: expected a device tensor on {device}, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.strides}")
    if not t.data_ptr and t.numel:
        raise ValueError(f"{name}: data pointer is NULL")
    return tensor_object(t)


def call_plan(ws: Any, ep: Any, sig: Any, values: tuple[Any, ...], stream: int | None) -> tuple[Array, int]:
    """Call a module's ``plan`` on ``ws`` and ``stream``; returns (owned schedule Array, workspace generation).

    Under the workspace lock: wait for the previous plan's pinned-buffer copy, invalidate earlier plans, call,
    then record the event that the next plan will wait for.
    """
    s = current_stream(ws.device) if stream is None else stream
    with ws._lock:
        ws._wait_previous_plan_copy()
        ws._generation += 1  # from here on the int workspace may hold a new schedule: earlier plans are stale
        result = ep.call_packed(sig, values, ws.device.device_id, stream)
        if isinstance(result, Array):
            ws._record_plan_copy(s)
        generation = ws._generation
    if not isinstance(result, Array):
        raise KernelError("TypeError", f"plan returned {type(result).__name__}, expected Array<int>", function=ep.name)
    return result, generation
