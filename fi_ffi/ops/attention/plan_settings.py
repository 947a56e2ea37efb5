"""The settings of an attention plan as one immutable value, and the checks of the scalars they come from.

:class:`PlanSettings` holds what every plan made with the same arguments shares: the module (variant, URI,
backend), heads, head dims, page size, KV layout, dtypes, mask mode, window, soft cap, scales, CUDA-graph
mode; and, derived from those values, the launch functions of the module's ``plan`` and ``run`` entry points.
It is hashable (the hash is computed once) and compares by value, so the ops use it (with the batch size) as
the launcher's ``context``: a run whose tensors passed the checks for these settings is remembered by value.

:func:`cached` keeps built settings by the *values and types* of the public arguments (never a tensor, never a
workspace: only the workspace's device ordinal), so a plan per step costs one dict lookup for them. The
scalar checks below raise ``TypeError`` / ``ValueError`` naming the public argument.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

from ... import caches
from ...dtypes import DType
from ...dtypes import dtype as to_dtype
from ...launch import checks
from .variants import POS_ENCODINGS

__all__ = [
    "LAYOUTS",
    "MASK_CAUSAL",
    "MASK_CUSTOM",
    "MASK_NONE",
    "AttentionBackend",
    "AttentionDType",
    "DTypeObject",
    "KVLayout",
    "PlanSettings",
    "PosEncodingMode",
    "cached",
]

# The closed choices of the attention ops, as flashinfer-python spells them (its plan/run keywords take these strings).
KVLayout: TypeAlias = Literal["NHD", "HND"]
PosEncodingMode: TypeAlias = Literal["NONE", "ROPE_LLAMA", "ALIBI"]
AttentionBackend: TypeAlias = Literal["auto", "fa2", "fa3"]


class DTypeObject(Protocol):
    """A dtype object: a :class:`fi_ffi.dtypes.DType`, a numpy dtype or a torch dtype (each states its itemsize)."""

    @property
    def itemsize(self) -> int: ...


# An element type of the attention modules: its name, or a dtype object of one (flashinfer takes torch dtypes).
AttentionDType: TypeAlias = Literal["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"] | DTypeObject

LAYOUTS = {"NHD": 0, "HND": 1}
MASK_NONE, MASK_CAUSAL, MASK_CUSTOM = 0, 1, 2
_INT32_END = 1 << 31


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class PlanSettings:
    """What every plan made with the same settings shares: an immutable, hashable value.

    Build it with keyword arguments (each defaults as below); an unknown name is a ``TypeError``. The value
    fields are compared and hashed (the hash is computed once, at construction); the derived fields and
    ``plan`` / ``run`` are not.

    Derived: ``uri``, ``backend``, ``layout_code`` (the wire code of ``kv_layout``), ``rope_rcp_scale``,
    ``rope_rcp_theta`` (the reciprocals the kernels take). ``plan`` / ``run``: the launch functions of the
    module's entry points, given by the op that builds the settings; None for settings made by hand.
    """

    # ---- the value fields (their values make the key; everything below them is derived or not compared)
    kind: str = "batch_decode"  # "batch_decode" / "batch_prefill"
    mode: str = "paged"  # "paged" / "ragged"
    variant: Any = None  # the module variant (uri, backend); None for settings made by hand
    device_id: int = 0
    num_qo_heads: int = 0
    num_kv_heads: int = 0
    head_dim_qk: int = 0
    head_dim_vo: int = 0
    page_size: int = 1  # tokens
    kv_layout: str = "NHD"  # "NHD" / "HND"
    dtype_q: DType | None = None
    dtype_kv: DType | None = None
    dtype_o: DType | None = None
    mask_mode: int = MASK_NONE  # 0 none, 1 causal, 2 custom
    pos_encoding: int = 0
    window_left: int = -1  # tokens, -1 off
    logits_soft_cap: float = 0.0  # 0 off
    sm_scale: float = 1.0
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    enable_cuda_graph: bool = False
    use_fp16_qk_reduction: bool = False
    fixed_split_size: int = -1  # -1 off
    disable_split_kv: bool = False
    # ---- not compared: the module's launch functions, given by the op
    plan: Any = field(default=None, compare=False)
    run: Any = field(default=None, compare=False)
    # ---- derived from the values (set in __post_init__)
    uri: str = field(init=False, compare=False)
    backend: str = field(init=False, compare=False)
    layout_code: int = field(init=False, compare=False)
    rope_rcp_scale: float = field(init=False, compare=False)
    rope_rcp_theta: float = field(init=False, compare=False)
    _hash: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: the derived fields are set once, here
        variant = self.variant
        put(self, "uri", variant.uri if variant is not None else "")
        put(self, "backend", variant.backend if variant is not None else "")
        put(self, "layout_code", LAYOUTS.get(self.kv_layout, 0))
        put(self, "rope_rcp_scale", 1.0 / self.rope_scale)
        put(self, "rope_rcp_theta", 1.0 / self.rope_theta)
        # Computed once: the settings key the launchers' caches on every run.
        put(self, "_hash", hash(tuple(getattr(self, name) for name in _VALUE_FIELDS)))

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)!r}" for n in _VALUE_FIELDS if n != "variant")
        return f"PlanSettings({self.uri or '-'}: {values})"


# The value fields, in order (what __eq__ compares and the hash covers).
_VALUE_FIELDS = tuple(f.name for f in fields(PlanSettings) if f.compare)


# ---- the value-keyed cache ------------------------------------------------------------------------------------

_cache: dict[Hashable, PlanSettings] = {}
_cache_lock = threading.Lock()
_MAX_SETTINGS = 1024


def cached(key: Any, build: Callable[[], PlanSettings]) -> PlanSettings:
    """The settings remembered for ``key`` (plain values and their types), else ``build()`` remembered.

    An unhashable key (a list where an int belongs) is not an error here: ``build`` validates the arguments and
    raises the error naming the argument.
    """
    try:
        return _cache[key]
    except (KeyError, TypeError):
        pass
    settings = build()
    try:
        with _cache_lock:
            if len(_cache) >= _MAX_SETTINGS:
                _cache.clear()
            _cache[key] = settings
    except TypeError:  # valid but unhashable values (an unhashable int subclass): not remembered
        pass
    return settings


caches.register("attention plan settings (by argument values)", _cache.clear)


# ---- checks of the public scalars -------------------------------------------------------------------------------


def count(name: str, value: Any) -> int:
    """A positive int that fits the kernels' int32 (heads, head dims, page size, rows)."""
    n = checks.integer(name, value, 1)
    if n >= _INT32_END:
        raise ValueError(f"{name}: expected an int < 2**31 (the kernels' int32), got {n}")
    return n


def layout_name(value: Any) -> str:
    """``"NHD"`` or ``"HND"`` (case-insensitive), else ValueError."""
    if isinstance(value, str) and value.upper() in LAYOUTS:
        return value.upper()
    raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {value!r}")


def window(value: Any) -> int:
    """``window_left``: -1 (no window) or a left window in tokens that fits int32."""
    w = checks.integer("window_left", value)
    if not -1 <= w < _INT32_END:
        raise ValueError(f"window_left: expected -1 (no window) or 0 <= window_left < 2**31, got {w}")
    return w


def soft_cap(value: Any) -> float:
    """``logits_soft_cap``: 0 (off) or a finite value > 0."""
    if value is None:  # flashinfer-python's default: off
        return 0.0
    c = checks.finite("logits_soft_cap", value)
    if c < 0:
        raise ValueError(f"logits_soft_cap: expected 0 (off) or a value > 0, got {c}")
    return c


def pos_encoding(value: Any) -> int:
    """``"NONE"``, ``"ROPE_LLAMA"``, ``"ALIBI"`` (or their codes 0, 1, 2) as the code."""
    if isinstance(value, str) and value.upper() in POS_ENCODINGS:
        return POS_ENCODINGS[value.upper()]
    if value.__class__ is int and value in POS_ENCODINGS.values():
        return value  # type: ignore[no-any-return]
    raise ValueError(f"pos_encoding_mode: expected 'NONE', 'ROPE_LLAMA' or 'ALIBI', got {value!r}")


def scales(head_dim_qk: int, sm_scale: Any, rope_scale: Any, rope_theta: Any) -> tuple[float, float, float]:
    """(sm_scale, rope_scale, rope_theta) checked; None means flashinfer-python's default: ``1/sqrt(head_dim_qk)``,
    1.0 and 1e4."""
    s = head_dim_qk**-0.5 if sm_scale is None else checks.positive_finite("sm_scale", sm_scale)
    rs = 1.0 if rope_scale is None else checks.positive_finite("rope_scale", rope_scale)
    return s, rs, 1e4 if rope_theta is None else checks.positive_finite("rope_theta", rope_theta)


def gqa(num_qo_heads: int, num_kv_heads: int, decode: bool, where: str = "num_qo_heads") -> None:
    """``num_qo_heads`` is a multiple of ``num_kv_heads`` (and a group size the decode kernels have).

    ``where`` names what the errors start with: the argument, or for the single ops (whose head counts are read
    from ``q`` and ``k``) the tensor and layout the KV heads came from, e.g. ``"k (NHD [kv_len, ...])"``.
    """
    if num_qo_heads % num_kv_heads:
        raise ValueError(
            f"{where}: num_qo_heads must be a multiple of num_kv_heads ({num_kv_heads}), got {num_qo_heads}"
        )
    if decode and num_qo_heads // num_kv_heads not in (1, 2, 3, 4, 8):
        raise ValueError(
            f"{where}: the decode kernels support GQA group sizes 1, 2, 3, 4 and 8 only; "
            f"{num_qo_heads} / {num_kv_heads} = {num_qo_heads // num_kv_heads}"
        )


class Geometry(NamedTuple):
    """A paged plan's heads, head dims, page size and KV layout, checked (the :class:`PlanSettings` fields of the
    same names: ``PlanSettings(**geometry._asdict(), ...)``)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_vo: int
    page_size: int
    kv_layout: str


def geometry(
    num_qo_heads: Any, num_kv_heads: Any, head_dim: tuple[str, Any], page_size: Any, kv_layout: Any, decode: bool
) -> Geometry:
    """The geometry of a plan whose queries and values share one head dim (``head_dim``: its name in the op and
    its value), checked in this order: the counts, the GQA group (:func:`gqa`), the layout."""
    hq = count("num_qo_heads", num_qo_heads)
    hk = count("num_kv_heads", num_kv_heads)
    d = count(*head_dim)
    ps = count("page_size", page_size)
    gqa(hq, hk, decode)
    return Geometry(hq, hk, d, d, ps, layout_name(kv_layout))


def dtypes(q_dtype: Any, kv_dtype: Any, o_dtype: Any) -> tuple[DType, DType, DType]:
    """The q, kv and o element types (kv and o default to q's); errors name the argument."""
    qd = _dtype("q_data_type", q_dtype)
    kd = qd if kv_dtype is None else _dtype("kv_data_type", kv_dtype)
    od = qd if o_dtype is None else _dtype("o_data_type", o_dtype)
    return qd, kd, od


_ATTENTION_DTYPES = frozenset(("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"))


def _dtype(name: str, value: Any) -> DType:
    try:
        d = to_dtype(value)
    except (TypeError, ValueError, KeyError):
        raise TypeError(
            f"{name}: unsupported dtype {value!r}: expected float16, bfloat16, float8_e4m3fn or float8_e5m2"
        ) from None
    if d.name not in _ATTENTION_DTYPES:
        raise TypeError(
            f"{name}: no FlashInfer attention module exists for dtype {d.name} (modules are built "
            f"for float16, bfloat16, and float8_e4m3fn / float8_e5m2 KV caches)"
        )
    return d
