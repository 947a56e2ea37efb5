"""Attention kernel variants: which prebuilt module serves a given problem, by FlashInfer's URI grammar.

FlashInfer compiles one module per combination of compile-time settings and names it by a URI
(``flashinfer/jit/attention/modules.py`` ``get_*_uri``), for example::

    batch_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_
    head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False

A :class:`Variant` holds those settings and renders (:attr:`Variant.uri`) or parses (:meth:`Variant.parse`)
the URI. :func:`resolve` maps a variant to a module of the pinned wheels, or raises
:class:`~fi_ffi.errors.KernelNotFoundError` naming the closest variants that do exist: there is never a
silent fallback to another variant and never a JIT build. Modules are extracted and loaded lazily, once per
process, by :mod:`fi_ffi.loader` when an entry point is first bound.

:func:`list_variants` (rows for ``fi-ffi list``) enumerates the attention variants of the pinned wheels.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, fields
from typing import Any

from .. import dtypes as _dt
from ..dtypes import DType
from ..errors import KernelNotFoundError

SINGLE_PREFILL = "single_prefill"
BATCH_PREFILL = "batch_prefill"
SINGLE_DECODE = "single_decode"
BATCH_DECODE = "batch_decode"
KINDS = (SINGLE_PREFILL, BATCH_PREFILL, SINGLE_DECODE, BATCH_DECODE)

# The entry points each kind of module exports (ABI.md B).
ENTRY_POINTS = {
    SINGLE_PREFILL: ("run",),
    BATCH_PREFILL: ("plan", "ragged_run", "paged_run"),
    SINGLE_DECODE: ("run",),
    BATCH_DECODE: ("plan", "run"),
}

# pos_encoding_mode: a compile-time setting (part of the URI).
POS_ENCODINGS = {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
_POS_NAMES = {v: k for k, v in POS_ENCODINGS.items()}

BACKENDS = ("fa2", "fa3")

# flashinfer.jit.utils.filename_safe_dtype_map: the dtypes a URI can name (there is no f32 variant).
_URI_DTYPES: dict[str, DType] = {d.short: d for d in (
    _dt.float16, _dt.bfloat16, _dt.float8_e4m3fn, _dt.float8_e5m2, _dt.int8, _dt.uint8, _dt.int32, _dt.uint32,
    _dt.int64)}

_PREFIXES = {
    SINGLE_PREFILL: "single_prefill_with_kv_cache",
    BATCH_PREFILL: "batch_prefill_with_kv_cache",
    SINGLE_DECODE: "single_decode_with_kv_cache",
    BATCH_DECODE: "batch_decode_with_kv_cache",
}

_DT = r"([a-z0-9]+)"
_BOOL = r"(True|False)"
_URI_RE = re.compile(
    r"^(single_prefill|batch_prefill|single_decode|batch_decode)_with_kv_cache"
    rf"_dtype_q_{_DT}_dtype_kv_{_DT}_dtype_o_{_DT}(?:_dtype_idx_{_DT})?"
    rf"_head_dim_qk_(\d+)_head_dim_vo_(\d+)_posenc_(\d+)_use_swa_{_BOOL}_use_logits_cap_{_BOOL}"
    rf"(?:_f16qk_{_BOOL})?(_sm90)?$"
)


def _uri_dtype(name: str, value: Any) -> DType:
    d = _dt.dtype(value)
    if d.short not in _URI_DTYPES:
        allowed = ", ".join(sorted(x.name for x in _URI_DTYPES.values()))
        raise TypeError(f"{name}: no FlashInfer module variant exists for dtype {d.name} (URIs name {allowed})")
    return d


@dataclass(frozen=True)
class Variant:
    """The compile-time settings of one attention module; ``uri`` is its FlashInfer module name.

    Attributes:
        kind: ``"single_prefill"``, ``"batch_prefill"``, ``"single_decode"`` or ``"batch_decode"``.
        dtype_q, dtype_kv, dtype_o: element types of the query, the KV cache and the output.
        head_dim_qk, head_dim_vo: head dimension of q/k and of v/o.
        dtype_idx: index dtype of the batch kinds (indptr, page indices); None for the single kinds.
        pos_encoding: 0 none, 1 RoPE (Llama), 2 ALiBi (compiled in, not a run-time switch).
        use_sliding_window: compiled with a left window (``window_left >= 0``).
        use_logits_cap: compiled with logits soft-capping (``logits_soft_cap > 0``).
        use_fp16_qk_reduction: prefill kinds only.
        backend: ``"fa2"``, or ``"fa3"`` (the ``_sm90`` modules; prefill kinds only).
    """

    kind: str
    dtype_q: DType
    dtype_kv: DType
    dtype_o: DType
    head_dim_qk: int
    head_dim_vo: int
    dtype_idx: DType | None = None
    pos_encoding: int = 0
    use_sliding_window: bool = False
    use_logits_cap: bool = False
    use_fp16_qk_reduction: bool = False
    backend: str = "fa2"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("dtype_q", "dtype_kv", "dtype_o"):
            object.__setattr__(self, name, _uri_dtype(name, getattr(self, name)))
        batch = self.kind in (BATCH_PREFILL, BATCH_DECODE)
        if batch:
            if self.dtype_idx is None:
                raise ValueError(f"dtype_idx: required for kind {self.kind!r}")
            object.__setattr__(self, "dtype_idx", _uri_dtype("dtype_idx", self.dtype_idx))
        elif self.dtype_idx is not None:
            raise ValueError(f"dtype_idx: kind {self.kind!r} has no index dtype, got {self.dtype_idx}")
        for name in ("head_dim_qk", "head_dim_vo"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.pos_encoding not in _POS_NAMES:
            raise ValueError(f"pos_encoding: expected 0 (NONE), 1 (ROPE_LLAMA) or 2 (ALIBI), got {self.pos_encoding!r}")
        prefill = self.kind in (SINGLE_PREFILL, BATCH_PREFILL)
        if self.use_fp16_qk_reduction and not prefill:
            raise ValueError(f"use_fp16_qk_reduction: only prefill modules have it, not {self.kind!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected 'fa2' or 'fa3', got {self.backend!r}")
        if self.backend == "fa3" and not prefill:
            raise ValueError(f"backend: 'fa3' exists only for prefill modules, not {self.kind!r}")

    @property
    def uri(self) -> str:
        """The module's URI, exactly as ``flashinfer.jit.attention.modules.get_*_uri`` builds it."""
        s = (f"{_PREFIXES[self.kind]}_dtype_q_{self.dtype_q.short}_dtype_kv_{self.dtype_kv.short}"
             f"_dtype_o_{self.dtype_o.short}")
        if self.dtype_idx is not None:
            s += f"_dtype_idx_{self.dtype_idx.short}"
        s += (f"_head_dim_qk_{self.head_dim_qk}_head_dim_vo_{self.head_dim_vo}_posenc_{self.pos_encoding}"
              f"_use_swa_{bool(self.use_sliding_window)}_use_logits_cap_{bool(self.use_logits_cap)}")
        if self.kind in (SINGLE_PREFILL, BATCH_PREFILL):
            s += f"_f16qk_{bool(self.use_fp16_qk_reduction)}"
            if self.backend == "fa3":
                s += "_sm90"
        return s

    @classmethod
    def parse(cls, uri: str) -> Variant | None:
        """The variant a URI names, or None if ``uri`` is not an attention module of the four kinds."""
        m = _URI_RE.match(uri)
        if m is None:
            return None
        kind, q, kv, o, idx, dqk, dvo, pos, swa, cap, f16qk, sm90 = m.groups()
        batch = kind in (BATCH_PREFILL, BATCH_DECODE)
        prefill = kind in (SINGLE_PREFILL, BATCH_PREFILL)
        if batch != (idx is not None) or prefill != (f16qk is not None) or (sm90 and not prefill):
            return None
        try:
            v = cls(kind, _URI_DTYPES[q], _URI_DTYPES[kv], _URI_DTYPES[o], int(dqk), int(dvo),
                    _URI_DTYPES[idx] if idx is not None else None, int(pos), swa == "True", cap == "True",
                    f16qk == "True", "fa3" if sm90 else "fa2")
        except (KeyError, ValueError, TypeError):
            return None
        return v if v.uri == uri else None

    def describe(self) -> str:
        """A short human-readable summary (used in error messages)."""
        dt = self.dtype_q.name if self.dtype_q == self.dtype_kv == self.dtype_o else (
            f"q {self.dtype_q.name}/kv {self.dtype_kv.name}/o {self.dtype_o.name}")
        hd = str(self.head_dim_qk) if self.head_dim_qk == self.head_dim_vo else f"{self.head_dim_qk}/{self.head_dim_vo}"
        parts = [self.kind, self.backend, dt, f"head_dim {hd}"]
        if self.dtype_idx is not None:
            parts.append(f"idx {self.dtype_idx.name}")
        parts.append(f"pos_encoding {_POS_NAMES[self.pos_encoding]}")
        if self.use_sliding_window:
            parts.append("sliding window")
        if self.use_logits_cap:
            parts.append("logits cap")
        if self.use_fp16_qk_reduction:
            parts.append("fp16 qk reduction")
        return ", ".join(parts)

    def as_row(self) -> dict[str, Any]:
        """The variant as a flat dict of plain values (one row of ``fi-ffi list``)."""
        return {
            "kind": self.kind,
            "backend": self.backend,
            "dtype_q": self.dtype_q.name,
            "dtype_kv": self.dtype_kv.name,
            "dtype_o": self.dtype_o.name,
            "dtype_idx": self.dtype_idx.name if self.dtype_idx is not None else None,
            "head_dim_qk": self.head_dim_qk,
            "head_dim_vo": self.head_dim_vo,
            "pos_encoding": _POS_NAMES[self.pos_encoding],
            "sliding_window": self.use_sliding_window,
            "logits_cap": self.use_logits_cap,
            "fp16_qk_reduction": self.use_fp16_qk_reduction,
            "entry_points": list(ENTRY_POINTS[self.kind]),
            "uri": self.uri,
        }


# ------------------------------------------------------------------------------------------ the pinned wheels

_lock = threading.Lock()
_available: tuple[frozenset[str], tuple[Variant, ...]] | None = None


def available() -> tuple[frozenset[str], tuple[Variant, ...]]:
    """(every module URI of the pinned wheels, the attention variants among them); read once per process."""
    global _available
    found = _available
    if found is None:
        with _lock:
            found = _available
            if found is None:
                from .. import loader

                uris = frozenset(loader.available_uris())
                variants = tuple(sorted((v for v in map(Variant.parse, uris) if v is not None), key=_sort_key))
                found = _available = (uris, variants)
    return found


def _sort_key(v: Variant) -> tuple[Any, ...]:
    return (KINDS.index(v.kind), v.backend, v.dtype_q.name, v.dtype_kv.name, v.dtype_o.name, v.head_dim_qk,
            v.head_dim_vo, v.pos_encoding, v.use_sliding_window, v.use_logits_cap, v.use_fp16_qk_reduction)


def _refresh() -> None:
    """Forget the cached list (tests, or after the lock/selection changed)."""
    global _available
    with _lock:
        _available = None


def has(variant: Variant) -> bool:
    """True if the pinned wheels contain ``variant``'s module."""
    return variant.uri in available()[0]


_WEIGHTS = {"kind": 1000, "dtype_q": 4, "dtype_kv": 4, "dtype_o": 3, "head_dim_qk": 4, "head_dim_vo": 4,
            "dtype_idx": 2, "pos_encoding": 2, "use_sliding_window": 2, "use_logits_cap": 2,
            "use_fp16_qk_reduction": 2, "backend": 1}


def closest(variant: Variant, n: int = 5) -> list[tuple[Variant, tuple[str, ...]]]:
    """Up to ``n`` available variants of the same kind nearest to ``variant``, with the fields that differ."""
    out = []
    for cand in available()[1]:
        if cand.kind != variant.kind:
            continue
        diff = tuple(f.name for f in fields(Variant) if getattr(cand, f.name) != getattr(variant, f.name))
        near = abs(cand.head_dim_qk - variant.head_dim_qk) + abs(cand.head_dim_vo - variant.head_dim_vo)
        out.append(((sum(_WEIGHTS[d] for d in diff), near, _sort_key(cand)), cand, diff))
    out.sort(key=lambda t: t[0])
    return [(c, d) for _, c, d in out[:n]]


def not_found(variant: Variant, reason: str = "") -> KernelNotFoundError:
    """The error for a variant the pinned wheels lack, listing the closest ones that exist."""
    lines = [f"no prebuilt module for {variant.describe()} ({variant.uri}) in the pinned wheels"
             + (f": {reason}" if reason else "")]
    near = closest(variant)
    if near:
        lines.append("closest available variants:")
        for cand, diff in near:
            what = ", ".join(f"{d}={_fmt(getattr(cand, d))}" for d in diff)
            lines.append(f"  {cand.uri}  (differs in {what})")
    else:
        lines.append(f"the pinned wheels contain no {variant.kind} module at all")
    lines.append("list them with `fi-ffi list`; fi_ffi never compiles kernels, so use a lock with a wheel "
                 "that has this variant (FI_FFI_LOCK)")
    return KernelNotFoundError("\n".join(lines))


def _fmt(value: Any) -> str:
    return value.name if isinstance(value, DType) else str(value)


def resolve(variant: Variant) -> str:
    """The URI of ``variant``'s module if the pinned wheels contain it; KernelNotFoundError otherwise."""
    uri = variant.uri
    if uri not in available()[0]:
        raise not_found(variant)
    return uri


def list_variants(kind: str | None = None, dtype: Any = None, head_dim: int | None = None) -> list[dict[str, Any]]:
    """The attention variants of the pinned wheels as rows (dicts, see :meth:`Variant.as_row`), sorted.

    Filters: ``kind`` (one of :data:`KINDS`, or ``"prefill"`` / ``"decode"`` for both of a family), ``dtype``
    (matches the q dtype; any spelling :func:`fi_ffi.dtypes.dtype` accepts), ``head_dim`` (matches qk or vo).
    This is what ``fi-ffi list`` prints.
    """
    if kind is not None and kind not in KINDS and kind not in ("prefill", "decode"):
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, 'prefill' or 'decode', got {kind!r}")
    want_dtype = _dt.dtype(dtype) if dtype is not None else None
    rows = []
    for v in available()[1]:
        if kind is not None and v.kind != kind and not v.kind.endswith("_" + kind):
            continue
        if want_dtype is not None and v.dtype_q != want_dtype:
            continue
        if head_dim is not None and head_dim not in (v.head_dim_qk, v.head_dim_vo):
            continue
        rows.append(v.as_row())
    return rows


# ------------------------------------------------------------------------------------------ backend choice

_sm_major: dict[int, int | None] = {}


def sm_major(device_id: int) -> int | None:
    """The compute capability major of CUDA device ``device_id``, or None if it cannot be read (no GPU)."""
    if device_id not in _sm_major:
        try:
            from cuda.bindings import runtime as rt

            err, major = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device_id)
            _sm_major[device_id] = int(major) if err == rt.cudaError_t.cudaSuccess else None
        except Exception:  # no driver, no cuda-bindings: unknown
            _sm_major[device_id] = None
    return _sm_major[device_id]


def fa3_ineligible(pos_encoding: int, use_fp16_qk_reduction: bool, custom_mask: bool) -> str:
    """Why FA3 cannot serve this problem ('' if it can): upstream's ``is_fa3_backend_supported`` rules."""
    if custom_mask:
        return "FA3 has no custom mask"
    if pos_encoding != 0:
        return f"FA3 supports pos_encoding NONE only, got {_POS_NAMES[pos_encoding]}"
    if use_fp16_qk_reduction:
        return "FA3 has no fp16 qk reduction"
    return ""


def choose_prefill(base: Variant, backend: str, device_id: int, custom_mask: bool = False) -> Variant:
    """The batch/single prefill variant for ``backend`` (``"auto"``, ``"fa2"`` or ``"fa3"``), resolved.

    ``auto`` picks FA3 when the device is SM 9.x, the problem is FA3-eligible and the pinned wheels have the
    ``_sm90`` variant, else FA2. A forced ``fa3`` on an ineligible problem is a ValueError, on a device known
    not to be SM 9.x an UnsupportedDeviceError, and a missing module a KernelNotFoundError.
    """
    from ..errors import UnsupportedDeviceError

    if backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    why = fa3_ineligible(base.pos_encoding, base.use_fp16_qk_reduction, custom_mask)
    fa3 = _replace(base, backend="fa3")
    if backend == "auto":
        major = sm_major(device_id)
        if major == 9 and not why and has(fa3):
            resolve(fa3)
            return fa3
        fa2 = _replace(base, backend="fa2")
        resolve(fa2)
        return fa2
    if backend == "fa3":
        if why:
            raise ValueError(f"backend: 'fa3' cannot run this problem: {why}; use 'fa2' or 'auto'")
        major = sm_major(device_id)
        if major is not None and major != 9:
            raise UnsupportedDeviceError(f"backend 'fa3' needs an SM 9.x GPU (H100/H200); cuda:{device_id} is "
                                         f"SM {major}.x; use 'fa2' or 'auto'")
        resolve(fa3)
        return fa3
    fa2 = _replace(base, backend="fa2")
    resolve(fa2)
    return fa2


def _replace(v: Variant, **changes: Any) -> Variant:
    from dataclasses import replace

    return replace(v, **changes)


__all__ = [
    "BACKENDS",
    "BATCH_DECODE",
    "BATCH_PREFILL",
    "ENTRY_POINTS",
    "KINDS",
    "POS_ENCODINGS",
    "SINGLE_DECODE",
    "SINGLE_PREFILL",
    "Variant",
    "available",
    "choose_prefill",
    "closest",
    "has",
    "list_variants",
    "resolve",
    "sm_major",
]
