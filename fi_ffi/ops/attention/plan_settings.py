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
from typing import Any

from ... import caches
from ...dtypes import DType
from ...dtypes import dtype as to_dtype
from ...launch import checks
from .variants import POS_ENCODINGS

__all__ = ["LAYOUTS", "MASK_CAUSAL", "MASK_CUSTOM", "MASK_NONE", "PlanSettings", "cached"]

LAYOUTS = {"NHD": 0, "HND": 1}
MASK_NONE, MASK_CAUSAL, MASK_CUSTOM = 0, 1, 2
_INT32_END = 1 << 31

# The value fields, in order (their values make the key; everything else is derived from them).
_FIELDS = (
    "kind",
    "mode",
    "variant",
    "device_id",
    "num_qo_heads",
    "num_kv_heads",
    "head_dim_qk",
    "head_dim_vo",
    "page_size",
    "kv_layout",
    "dtype_q",
    "dtype_kv",
    "dtype_o",
    "mask_mode",
    "pos_encoding",
    "window_left",
    "logits_soft_cap",
    "sm_scale",
    "rope_scale",
    "rope_theta",
    "enable_cuda_graph",
    "use_fp16_qk_reduction",
    "fixed_split_size",
    "disable_split_kv",
)
_DEFAULTS: dict[str, Any] = {
    "kind": "batch_decode",
    "mode": "paged",
    "variant": None,
    "device_id": 0,
    "num_qo_heads": 0,
    "num_kv_heads": 0,
    "head_dim_qk": 0,
    "head_dim_vo": 0,
    "page_size": 1,
    "kv_layout": "NHD",
    "dtype_q": None,
    "dtype_kv": None,
    "dtype_o": None,
    "mask_mode": MASK_NONE,
    "pos_encoding": 0,
    "window_left": -1,
    "logits_soft_cap": 0.0,
    "sm_scale": 1.0,
    "rope_scale": 1.0,
    "rope_theta": 1e4,
    "enable_cuda_graph": False,
    "use_fp16_qk_reduction": False,
    "fixed_split_size": -1,
    "disable_split_kv": False,
}


class PlanSettings:
    """What every plan made with the same settings shares: an immutable, hashable value.

    Value attributes (compared and hashed): ``kind`` (``"batch_decode"`` / ``"batch_prefill"``), ``mode``
    (``"paged"`` / ``"ragged"``), ``variant``, ``device_id``, ``num_qo_heads``, ``num_kv_heads``,
    ``head_dim_qk``, ``head_dim_vo``, ``page_size`` (tokens), ``kv_layout`` (``"NHD"`` / ``"HND"``),
    ``dtype_q``, ``dtype_kv``, ``dtype_o``, ``mask_mode`` (0 none, 1 causal, 2 custom), ``pos_encoding``,
    ``window_left`` (tokens, -1 off), ``logits_soft_cap`` (0 off), ``sm_scale``, ``rope_scale``,
    ``rope_theta``, ``enable_cuda_graph``, ``use_fp16_qk_reduction``, ``fixed_split_size`` (-1 off),
    ``disable_split_kv``.

    Derived: ``uri``, ``backend``, ``layout_code`` (the wire code of ``kv_layout``), ``rope_rcp_scale``,
    ``rope_rcp_theta`` (the reciprocals the kernels take), and ``plan`` / ``run`` (the launch functions of the
    module's entry points, given by the op that builds the settings; None for settings made by hand).
    """

    __slots__ = (
        *_FIELDS,
        "_hash",
        "_key",
        "backend",
        "layout_code",
        "plan",
        "rope_rcp_scale",
        "rope_rcp_theta",
        "run",
        "uri",
    )

    kind: str
    mode: str
    variant: Any
    device_id: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_vo: int
    page_size: int
    kv_layout: str
    dtype_q: DType
    dtype_kv: DType
    dtype_o: DType
    mask_mode: int
    pos_encoding: int
    window_left: int
    logits_soft_cap: float
    sm_scale: float
    rope_scale: float
    rope_theta: float
    enable_cuda_graph: bool
    use_fp16_qk_reduction: bool
    fixed_split_size: int
    disable_split_kv: bool
    uri: str
    backend: str
    layout_code: int
    rope_rcp_scale: float
    rope_rcp_theta: float
    plan: Any
    run: Any
    _key: tuple[Any, ...]
    _hash: int

    def __init__(
        self, *, plan: Callable[..., Any] | None = None, run: Callable[..., Any] | None = None, **values: Any
    ) -> None:
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise TypeError(f"PlanSettings: unknown settings {sorted(unknown)}")
        merged = {**_DEFAULTS, **values}
        put = object.__setattr__
        for name in _FIELDS:
            put(self, name, merged[name])
        variant = merged["variant"]
        put(self, "uri", variant.uri if variant is not None else "")
        put(self, "backend", variant.backend if variant is not None else "")
        put(self, "layout_code", LAYOUTS.get(merged["kv_layout"], 0))
        put(self, "rope_rcp_scale", 1.0 / merged["rope_scale"])
        put(self, "rope_rcp_theta", 1.0 / merged["rope_theta"])
        put(self, "plan", plan)
        put(self, "run", run)
        key = tuple(merged[name] for name in _FIELDS)
        put(self, "_key", key)
        put(self, "_hash", hash(key))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PlanSettings is immutable (tried to set {name!r})")

    def __hash__(self) -> int:
        return self._hash  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return self is other or (other.__class__ is PlanSettings and self._key == other._key)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS if n != "variant")
        return f"PlanSettings({self.uri or '-'}: {fields})"


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
    raise ValueError(f"pos_encoding: expected 'NONE', 'ROPE_LLAMA' or 'ALIBI', got {value!r}")


def scales(head_dim_qk: int, sm_scale: Any, rope_scale: Any, rope_theta: Any) -> tuple[float, float, float]:
    """(sm_scale, rope_scale, rope_theta) checked; ``sm_scale`` None means ``1/sqrt(head_dim_qk)``."""
    s = head_dim_qk**-0.5 if sm_scale is None else checks.positive_finite("sm_scale", sm_scale)
    return s, checks.positive_finite("rope_scale", rope_scale), checks.positive_finite("rope_theta", rope_theta)


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


def dtypes(q_dtype: Any, kv_dtype: Any, o_dtype: Any) -> tuple[DType, DType, DType]:
    """The q, kv and o element types (kv and o default to q's); errors name the argument."""
    qd = _dtype("q_dtype", q_dtype)
    kd = qd if kv_dtype is None else _dtype("kv_dtype", kv_dtype)
    od = qd if o_dtype is None else _dtype("o_dtype", o_dtype)
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
