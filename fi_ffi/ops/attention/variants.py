"""Attention kernel variants: which prebuilt module serves a given problem, by FlashInfer's URI grammar.

FlashInfer compiles one module per combination of compile-time settings and names it by a URI
(``flashinfer/jit/attention/modules.py`` ``get_*_uri``), for example::

    batch_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_
    head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False

A :class:`Variant` holds those settings and renders (:attr:`Variant.uri`) or parses (:meth:`Variant.parse`)
the URI. FlashInfer 0.7 appends a tag to some names, each naming a different argument list (see
:data:`ABI_TAGS`): the FA2 batch prefill module its wheels ship is ``..._f16qk_False_kv_stride_equal``, the
MLA modules are ``..._profiler_False_planabi2[_sm90]``; a variant carries that tag as ``abi`` (``""`` for
the untagged 0.6.x names). :func:`resolve` maps a variant's settings to a module of the pinned wheels,
whatever its tag (when several releases are pinned, the lock's precedence picks one), or raises
:class:`~fi_ffi.errors.KernelNotFoundError` naming the closest variants that do exist: there is never a
silent fallback to another variant and never a JIT build. Modules are extracted and loaded lazily, once per
process, by :mod:`fi_ffi.loader` when an entry point is first bound.

:func:`list_variants` (rows for ``fi-ffi list``) enumerates the attention variants of the pinned wheels.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from ... import dtypes as _dt
from ...dtypes import DType
from ...errors import KernelNotFoundError
from ...launch import checks
from ...launch.kernels import require_driver
from ...launch.registry import op

SINGLE_PREFILL = "single_prefill"
BATCH_PREFILL = "batch_prefill"
SINGLE_DECODE = "single_decode"
BATCH_DECODE = "batch_decode"
KINDS = (SINGLE_PREFILL, BATCH_PREFILL, SINGLE_DECODE, BATCH_DECODE)  # the ``*_with_kv_cache_*`` grammar
BATCH_MLA = "batch_mla"  # ``batch_mla_attention_*``: head_dim_qk/vo hold head_dim_ckv/kpe (see Variant)
ALL_KINDS = (*KINDS, BATCH_MLA)

# The entry points each kind of module exports (ABI.md B).
ENTRY_POINTS = {
    SINGLE_PREFILL: ("run",),
    BATCH_PREFILL: ("plan", "ragged_run", "paged_run"),
    SINGLE_DECODE: ("run",),
    BATCH_DECODE: ("plan", "run"),
    BATCH_MLA: ("plan", "run"),
}

# The name tags FlashInfer appends since 0.7 (``flashinfer/jit/attention/modules.py``), per (kind, backend):
# tag -> what it means. A tag sits before ``_sm90``. Untagged ("") names exist in every release; in 0.6.x
# they are the only ones. 0.7.x prebuilt wheels ship ``kv_stride_equal`` FA2 batch prefill and ``planabi2``
# MLA modules; the other 0.7.x tags exist only as JIT builds but are parsed all the same.
ABI_TAGS: dict[tuple[str, str], dict[str, str]] = {
    (BATCH_PREFILL, "fa2"): {
        "": "untagged: the 0.6.x module; in 0.7.x, k/v page strides read at run time",
        "kv_stride_equal": "0.7.x name: equal k/v page strides",
        "kv_stride_independent": "0.7.x name: independent k/v page strides",
        "paged_kv_stride_independent": "0.7.x name: paged only, independent k/v page strides",
    },
    (BATCH_MLA, "fa2"): {"": "untagged: the 0.6.x module", "planabi2": "0.7.x name: plan ABI 2"},
    (BATCH_MLA, "fa3"): {"": "untagged: the 0.6.x module", "planabi2": "0.7.x name: plan ABI 2"},
}

# Modules the prebuilt wheels of some releases lack: op kind (or module name) -> (the releases whose wheels have
# it, what to do instead). :func:`not_shipped` words it for a KernelNotFoundError.
NOT_SHIPPED: dict[str, tuple[str, str]] = {
    "gdn_prefill": (
        "FlashInfer <= 0.6.13 jit-cache wheels (module gdn_prefill_sm90; upstream removed it in 0.6.14)",
        "pin a 0.6.x jit-cache wheel for it next to the newer release (docs/operations.md: FlashInfer releases)",
    ),
    SINGLE_PREFILL: (
        "FlashInfer 0.6.x jit-cache wheels (0.7.x does not prebuild single prefill modules)",
        "use the batch calls (batch_prefill_ragged_plan/run with one request), or pin a 0.6.x wheel next to 0.7.x",
    ),
    SINGLE_DECODE: (
        "FlashInfer 0.6.x jit-cache wheels (0.7.x does not prebuild single decode modules)",
        "use the batch calls (batch_decode_plan/run with one request), or pin a 0.6.x wheel next to 0.7.x",
    ),
}
NOT_SHIPPED["gdn_prefill_sm90"] = NOT_SHIPPED["gdn_prefill"]


def not_shipped(kind: str) -> str:
    """A sentence saying which FlashInfer releases prebuild modules of ``kind`` (an op kind such as
    ``"single_prefill"`` or ``"gdn_prefill"``, or a module name) and what to do instead; ``""`` for a kind every
    supported release ships. Ops append it to their KernelNotFoundError."""
    found = NOT_SHIPPED.get(kind)
    if found is None:
        return ""
    releases, instead = found
    return f"{kind} modules are prebuilt only in {releases}; {instead}"


# pos_encoding_mode: a compile-time setting (part of the URI).
POS_ENCODINGS = {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
_POS_NAMES = {v: k for k, v in POS_ENCODINGS.items()}

BACKENDS = ("fa2", "fa3")

# flashinfer.jit.utils.filename_safe_dtype_map: the dtypes a URI can name (there is no f32 variant).
_URI_DTYPES: dict[str, DType] = {
    d.short: d
    for d in (
        _dt.float16,
        _dt.bfloat16,
        _dt.float8_e4m3fn,
        _dt.float8_e5m2,
        _dt.int8,
        _dt.uint8,
        _dt.int32,
        _dt.uint32,
        _dt.int64,
    )
}

_PREFIXES = {
    SINGLE_PREFILL: "single_prefill_with_kv_cache",
    BATCH_PREFILL: "batch_prefill_with_kv_cache",
    SINGLE_DECODE: "single_decode_with_kv_cache",
    BATCH_DECODE: "batch_decode_with_kv_cache",
}

_DT = r"([a-z0-9]+)"
_BOOL = r"(True|False)"
_TAG = r"(?:_([a-z0-9_]+?))??"  # lazy, tried absent first: a trailing _sm90 is the backend, not a tag
_URI_RE = re.compile(
    r"^(single_prefill|batch_prefill|single_decode|batch_decode)_with_kv_cache"
    rf"_dtype_q_{_DT}_dtype_kv_{_DT}_dtype_o_{_DT}(?:_dtype_idx_{_DT})?"
    rf"_head_dim_qk_(\d+)_head_dim_vo_(\d+)_posenc_(\d+)_use_swa_{_BOOL}_use_logits_cap_{_BOOL}"
    rf"(?:_f16qk_{_BOOL})?{_TAG}(_sm90)?$"
)
_MLA_RE = re.compile(
    rf"^batch_mla_attention_dtype_q_{_DT}_dtype_kv_{_DT}_dtype_o_{_DT}_dtype_idx_{_DT}"
    rf"_head_dim_ckv_(\d+)_head_dim_kpe_(\d+)_profiler_{_BOOL}{_TAG}(_sm90)?$"
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
        backend: ``"fa2"``, or ``"fa3"`` (the ``_sm90`` modules; prefill kinds and MLA only).
        abi: the tag FlashInfer 0.7 appends to the name, one of :data:`ABI_TAGS` for (kind, backend); ``""``
            for an untagged name.
        use_profiler: MLA only (``_profiler_True`` builds).

    For ``batch_mla``, ``head_dim_qk`` is ``head_dim_ckv`` (the compressed KV width, 512 for DeepSeek) and
    ``head_dim_vo`` is ``head_dim_kpe`` (the RoPE part, 64): the two head dims its URI names; it has no
    position encoding, window, logits cap or fp16 qk reduction.
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
    abi: str = ""
    use_profiler: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(ALL_KINDS)}, got {self.kind!r}")
        for name in ("dtype_q", "dtype_kv", "dtype_o"):
            object.__setattr__(self, name, _uri_dtype(name, getattr(self, name)))
        batch = self.kind in (BATCH_PREFILL, BATCH_DECODE, BATCH_MLA)
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
        if self.backend == "fa3" and not prefill and self.kind != BATCH_MLA:
            raise ValueError(f"backend: 'fa3' exists only for prefill and MLA modules, not {self.kind!r}")
        if self.kind == BATCH_MLA:
            if self.pos_encoding or self.use_sliding_window or self.use_logits_cap:
                raise ValueError(
                    "batch_mla: has no pos_encoding, sliding window or logits cap in its name; leave them 0/False"
                )
        elif self.use_profiler:
            raise ValueError(f"use_profiler: only MLA modules have it, not {self.kind!r}")
        tags = ABI_TAGS.get((self.kind, self.backend), {"": ""})
        if self.abi not in tags:
            allowed = ", ".join(repr(t) for t in tags)
            raise ValueError(f"abi: {self.kind} {self.backend} module names take the tag {allowed}, got {self.abi!r}")

    @property
    def head_dim_ckv(self) -> int:
        """MLA: the compressed KV head dim (stored in ``head_dim_qk``)."""
        return self.head_dim_qk

    @property
    def head_dim_kpe(self) -> int:
        """MLA: the RoPE part's head dim (stored in ``head_dim_vo``)."""
        return self.head_dim_vo

    @property
    def uri(self) -> str:
        """The module's URI, exactly as ``flashinfer.jit.attention.modules.get_*_uri`` builds it."""
        tail = (f"_{self.abi}" if self.abi else "") + ("_sm90" if self.backend == "fa3" else "")
        if self.kind == BATCH_MLA:
            assert self.dtype_idx is not None
            return (
                f"batch_mla_attention_dtype_q_{self.dtype_q.short}_dtype_kv_{self.dtype_kv.short}"
                f"_dtype_o_{self.dtype_o.short}_dtype_idx_{self.dtype_idx.short}_head_dim_ckv_{self.head_dim_qk}"
                f"_head_dim_kpe_{self.head_dim_vo}_profiler_{bool(self.use_profiler)}{tail}"
            )
        s = (
            f"{_PREFIXES[self.kind]}_dtype_q_{self.dtype_q.short}_dtype_kv_{self.dtype_kv.short}"
            f"_dtype_o_{self.dtype_o.short}"
        )
        if self.dtype_idx is not None:
            s += f"_dtype_idx_{self.dtype_idx.short}"
        s += (
            f"_head_dim_qk_{self.head_dim_qk}_head_dim_vo_{self.head_dim_vo}_posenc_{self.pos_encoding}"
            f"_use_swa_{bool(self.use_sliding_window)}_use_logits_cap_{bool(self.use_logits_cap)}"
        )
        if self.kind in (SINGLE_PREFILL, BATCH_PREFILL):
            s += f"_f16qk_{bool(self.use_fp16_qk_reduction)}"
        return s + tail

    def siblings(self) -> list[Variant]:
        """This variant under every name tag its kind and backend know (itself first): the same settings as
        named by each FlashInfer release."""
        tags = ABI_TAGS.get((self.kind, self.backend), {"": ""})
        return [self, *(_replace(self, abi=t) for t in tags if t != self.abi)]

    @classmethod
    def parse(cls, uri: str) -> Variant | None:
        """The variant a URI names, or None if ``uri`` is not an attention module (the four ``*_with_kv_cache``
        kinds, ``batch_mla_attention``) in a spelling of a known release."""
        try:
            m = _MLA_RE.match(uri)
            if m is not None:
                q, kv, o, idx, ckv, kpe, profiler, tag, sm90 = m.groups()
                v = cls(
                    BATCH_MLA,
                    _URI_DTYPES[q],
                    _URI_DTYPES[kv],
                    _URI_DTYPES[o],
                    int(ckv),
                    int(kpe),
                    _URI_DTYPES[idx],
                    backend="fa3" if sm90 else "fa2",
                    abi=tag or "",
                    use_profiler=profiler == "True",
                )
                return v if v.uri == uri else None
            m = _URI_RE.match(uri)
            if m is None:
                return None
            kind, q, kv, o, idx, dqk, dvo, pos, swa, cap, f16qk, tag, sm90 = m.groups()
            batch = kind in (BATCH_PREFILL, BATCH_DECODE)
            prefill = kind in (SINGLE_PREFILL, BATCH_PREFILL)
            if batch != (idx is not None) or prefill != (f16qk is not None) or (sm90 and not prefill):
                return None
            v = cls(
                kind,
                _URI_DTYPES[q],
                _URI_DTYPES[kv],
                _URI_DTYPES[o],
                int(dqk),
                int(dvo),
                _URI_DTYPES[idx] if idx is not None else None,
                int(pos),
                swa == "True",
                cap == "True",
                f16qk == "True",
                "fa3" if sm90 else "fa2",
                tag or "",
            )
        except (KeyError, ValueError, TypeError):
            return None
        return v if v.uri == uri else None

    def describe(self) -> str:
        """A short human-readable summary (used in error messages)."""
        dt = (
            self.dtype_q.name
            if self.dtype_q == self.dtype_kv == self.dtype_o
            else (f"q {self.dtype_q.name}/kv {self.dtype_kv.name}/o {self.dtype_o.name}")
        )
        hd = str(self.head_dim_qk) if self.head_dim_qk == self.head_dim_vo else f"{self.head_dim_qk}/{self.head_dim_vo}"
        if self.kind == BATCH_MLA:
            hd = f"ckv {self.head_dim_qk}, kpe {self.head_dim_vo}"
        parts = [self.kind, self.backend, dt, f"head_dim {hd}"]
        if self.dtype_idx is not None:
            parts.append(f"idx {self.dtype_idx.name}")
        if self.kind != BATCH_MLA:
            parts.append(f"pos_encoding {_POS_NAMES[self.pos_encoding]}")
        if self.use_sliding_window:
            parts.append("sliding window")
        if self.use_logits_cap:
            parts.append("logits cap")
        if self.use_fp16_qk_reduction:
            parts.append("fp16 qk reduction")
        if self.use_profiler:
            parts.append("profiler")
        if self.abi:
            parts.append(f"{self.abi} ({ABI_TAGS[(self.kind, self.backend)][self.abi]})")
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
            "profiler": self.use_profiler,
            "abi": self.abi,
            "entry_points": list(ENTRY_POINTS[self.kind]),
            "uri": self.uri,
        }


# ------------------------------------------------------------------------------------------ the pinned wheels

_lock = threading.Lock()


@dataclass(frozen=True)
class _Pinned:
    """What the pinned wheels serve: URIs, the attention variants among them, and per URI the FlashInfer release
    and the precedence (higher first) of the lock entry serving it."""

    uris: frozenset[str]
    variants: tuple[Variant, ...]
    releases: dict[str, str]
    rank: dict[str, tuple[Any, ...]]
    found: dict[Variant, Variant | None] = field(default_factory=dict)  # find()'s answers (plans ask per call)


_pinned: _Pinned | None = None


def _state() -> _Pinned:
    global _pinned
    found = _pinned
    if found is None:
        with _lock:
            found = _pinned
            if found is None:
                from ... import loader
                from ...loader.lockfile import release_key

                sources = loader.module_sources()
                kernels = loader.selection().kernels
                # Entries later in the lock rank lower at equal priority and release (lockfile.provider's rule).
                rank = {
                    uri: (pin.priority, release_key(pin.release), -kernels.index(pin)) for uri, pin in sources.items()
                }
                variants = tuple(sorted((v for v in map(Variant.parse, sources) if v is not None), key=_sort_key))
                found = _pinned = _Pinned(
                    frozenset(sources), variants, {uri: pin.release for uri, pin in sources.items()}, rank
                )
    return found


def available() -> tuple[frozenset[str], tuple[Variant, ...]]:
    """(every module URI of the pinned wheels, the attention variants among them); read once per process. For an
    op: "no NVIDIA driver found" first, before any wheel listing is fetched (:func:`_for_an_op`)."""
    state = _for_an_op()
    return state.uris, state.variants


def _for_an_op() -> _Pinned:
    """:func:`_state`, once this machine has a usable driver (:func:`fi_ffi.launch.kernels.require_driver`): an op
    or plan without one says so before the listing could download a wheel. ``fi-ffi list`` reads :func:`_state`
    itself (it answers on any machine)."""
    require_driver("choosing an attention module")  # a flag test once a driver was found
    return _state()


def release_of(uri: str) -> str:
    """The FlashInfer release of the pinned module ``uri`` (``""`` if not recorded or not pinned)."""
    return _state().releases.get(uri, "")


def pinned_releases() -> list[str]:
    """The FlashInfer releases the selected kernel wheels record, oldest first (best effort: [] on a lock error)."""
    from ... import loader
    from ...errors import LoaderError
    from ...loader.lockfile import release_key

    try:
        kernels = loader.selection().kernels
    except LoaderError:
        return []
    return sorted({pin.release for pin in kernels if pin.release}, key=release_key)


def _sort_key(v: Variant) -> tuple[Any, ...]:
    return (
        ALL_KINDS.index(v.kind),
        v.backend,
        v.dtype_q.name,
        v.dtype_kv.name,
        v.dtype_o.name,
        v.head_dim_qk,
        v.head_dim_vo,
        v.pos_encoding,
        v.use_sliding_window,
        v.use_logits_cap,
        v.use_fp16_qk_reduction,
        v.use_profiler,
        v.abi,
    )


def _refresh() -> None:
    """Forget the cached list (tests, or after the lock/selection changed)."""
    global _pinned
    with _lock:
        _pinned = None


def find(variant: Variant) -> Variant | None:
    """The pinned module serving ``variant``'s settings under any release's name (:meth:`Variant.siblings`), or
    None. When several are pinned (a 0.6.3 untagged and a 0.7.2 ``kv_stride_equal`` FA2 prefill, say), the one
    whose lock entry takes precedence (priority, then newest release: :mod:`fi_ffi.loader.lockfile`) wins; on a
    tie, ``variant``'s own tag."""
    state = _for_an_op()
    try:
        return state.found[variant]
    except KeyError:
        pass
    served = [(state.rank[s.uri], -i, s) for i, s in enumerate(variant.siblings()) if s.uri in state.uris]
    found = state.found[variant] = max(served, key=lambda t: t[:2])[2] if served else None
    return found


def has(variant: Variant) -> bool:
    """True if the pinned wheels serve ``variant``'s settings (under any release's name)."""
    return find(variant) is not None


_WEIGHTS = {
    "kind": 1000,
    "dtype_q": 4,
    "dtype_kv": 4,
    "dtype_o": 3,
    "head_dim_qk": 4,
    "head_dim_vo": 4,
    "dtype_idx": 2,
    "pos_encoding": 2,
    "use_sliding_window": 2,
    "use_logits_cap": 2,
    "use_fp16_qk_reduction": 2,
    "backend": 1,
    "abi": 1,
    "use_profiler": 2,
}


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
    lines = [
        f"no prebuilt module for {variant.describe()} ({variant.uri}) in the pinned wheels"
        + (f": {reason}" if reason else "")
    ]
    near = closest(variant)
    if near:
        lines.append("closest available variants:")
        for cand, diff in near:
            what = ", ".join(f"{d}={_fmt(getattr(cand, d))}" for d in diff)
            lines.append(f"  {cand.uri}  (differs in {what})")
    else:
        lines.append(f"the pinned wheels contain no {variant.kind} module at all")
        if not_shipped(variant.kind):
            lines.append(not_shipped(variant.kind))
    releases = pinned_releases()
    pinned = f" (the pinned wheels are FlashInfer {', '.join(releases)})" if releases else ""
    lines.append(
        f"list them with `fi-ffi list`{pinned}; fi_ffi never compiles kernels, so use a lock with a "
        "wheel that has this variant (FI_FFI_LOCK)"
    )
    return KernelNotFoundError("\n".join(lines))


def _fmt(value: Any) -> str:
    return value.name if isinstance(value, DType) else str(value)


def resolve(variant: Variant) -> str:
    """The URI of the pinned module serving ``variant`` (see :func:`find`: its own name or another release's);
    KernelNotFoundError otherwise."""
    return _served(variant).uri


def _served(variant: Variant) -> Variant:
    found = find(variant)
    if found is None:
        raise not_found(variant)
    return found


@op()
def list_variants(kind: str | None = None, dtype: Any = None, head_dim: int | None = None) -> list[dict[str, Any]]:
    """The attention variants of the pinned wheels as rows (dicts, see :meth:`Variant.as_row`), sorted.

    Filters: ``kind`` (one of :data:`ALL_KINDS`, or ``"prefill"`` / ``"decode"`` / ``"mla"`` for a family),
    ``dtype`` (matches the q dtype; any spelling :func:`fi_ffi.dtypes.dtype` accepts), ``head_dim`` (matches qk
    or vo; for MLA, ckv or kpe). Each row also says the FlashInfer ``release`` of the lock entry serving it.
    This is what ``fi-ffi list`` prints.

    Raises:
        TypeError, ValueError: an unknown ``kind``, a ``dtype`` that is none, a ``head_dim`` that is not an int
            >= 1, named before the pinned wheels are listed.
        LoaderError: the pinned wheels cannot be listed (absent offline, a damaged cache).
    """
    if kind is not None and kind not in ALL_KINDS and kind not in ("prefill", "decode", "mla"):
        raise ValueError(f"kind: expected one of {', '.join(ALL_KINDS)}, 'prefill', 'decode' or 'mla', got {kind!r}")
    if head_dim is not None:
        head_dim = checks.integer("head_dim", head_dim, 1)
    try:
        want_dtype = _dt.dtype(dtype) if dtype is not None else None
    except (TypeError, ValueError, KeyError):
        raise TypeError(f"dtype: expected a dtype (a name, a numpy or torch dtype), got {dtype!r}") from None
    rows = []
    for v in _state().variants:
        if kind is not None and v.kind != kind and not v.kind.endswith("_" + kind):
            continue
        if want_dtype is not None and v.dtype_q != want_dtype:
            continue
        if head_dim is not None and head_dim not in (v.head_dim_qk, v.head_dim_vo):
            continue
        rows.append({**v.as_row(), "release": release_of(v.uri)})
    return rows


# ------------------------------------------------------------------------------------------ backend choice


def sm_major(device_id: int) -> int | None:
    """The compute capability major of CUDA device ``device_id``, or None if it cannot be read (no GPU)."""
    from ...cuda import device

    found = device.known_properties(device_id)  # read once per device, in fi_ffi.cuda.device
    return None if found is None else found.compute_capability[0]


def fa3_ineligible(pos_encoding: int, use_fp16_qk_reduction: bool, custom_mask: bool) -> str:
    """Why FA3 cannot serve this problem ('' if it can): upstream's ``is_fa3_backend_supported`` rules."""
    if custom_mask:
        return "FA3 has no custom mask"
    if pos_encoding != POS_ENCODINGS["NONE"]:
        return f"FA3 supports pos_encoding NONE only, got {_POS_NAMES[pos_encoding]}"
    if use_fp16_qk_reduction:
        return "FA3 has no fp16 qk reduction"
    return ""


def choose_prefill(base: Variant, backend: str, device_id: int, custom_mask: bool = False) -> Variant:
    """The batch/single prefill variant for ``backend`` (``"auto"``, ``"fa2"`` or ``"fa3"``), resolved: the
    returned variant names the pinned module (for FA2 on 0.7.x, its ``kv_stride_equal`` name: see :func:`find`).

    ``auto`` picks FA3 when the device is SM 9.x, the problem is FA3-eligible and the pinned wheels have the
    ``_sm90`` variant, else FA2. A forced ``fa3`` on an ineligible problem is a ValueError, on a device known
    not to be SM 9.x an UnsupportedDeviceError, and a missing module a KernelNotFoundError.
    """
    from ...errors import UnsupportedDeviceError

    if backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    # Variants are built only when needed: a dataclass replace costs ~10 us, and plans ask on every call.
    fa2 = base if base.backend == "fa2" else _replace(base, backend="fa2", abi="")
    if backend == "fa2":
        return _served(fa2)
    why = fa3_ineligible(base.pos_encoding, base.use_fp16_qk_reduction, custom_mask)
    major = sm_major(device_id)
    if backend == "auto":
        if major == 9 and not why:
            fa3 = _replace(base, backend="fa3", abi="")
            if has(fa3):
                return _served(fa3)
        return _served(fa2)
    if why:
        raise ValueError(f"backend: 'fa3' cannot run this problem: {why}; use 'fa2' or 'auto'")
    if major is not None and major != 9:
        raise UnsupportedDeviceError(
            f"backend 'fa3' needs an SM 9.x GPU (H100/H200); cuda:{device_id} is SM {major}.x; use 'fa2' or 'auto'"
        )
    return _served(_replace(base, backend="fa3", abi=""))


def _replace(v: Variant, **changes: Any) -> Variant:
    from dataclasses import replace

    return replace(v, **changes)


__all__ = [
    "ABI_TAGS",
    "ALL_KINDS",
    "BACKENDS",
    "BATCH_DECODE",
    "BATCH_MLA",
    "BATCH_PREFILL",
    "ENTRY_POINTS",
    "KINDS",
    "NOT_SHIPPED",
    "POS_ENCODINGS",
    "SINGLE_DECODE",
    "SINGLE_PREFILL",
    "Variant",
    "available",
    "choose_prefill",
    "closest",
    "find",
    "has",
    "list_variants",
    "not_found",
    "not_shipped",
    "pinned_releases",
    "release_of",
    "resolve",
    "sm_major",
]
