"""What a fused GEMV call takes, checked (:class:`~fi_engine.kernels.fused_gemv.FusedGemvs` and the quantized
weights' epilogue GEMVs pack nothing before these pass): its ``mode`` (the prologue: :data:`NORM`, :data:`ADD_NORM`
or :data:`SILU`, with an epilogue's flag; :data:`PLAIN` only with the RoPE or SiLU epilogue), the operands' types,
ranges, alignment and overlaps, and the values of its epilogues: the RoPE + KV append of the QKV GEMV
(:class:`RopeAppend`) and the MoE router's routing (:class:`RouterEpilogue`). Each bad value is refused by name
(TypeError/ValueError), before any launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..values import float32_bits
from .launch import MAX_LD, U64, int_arg, overlap

__all__ = ["ADD_NORM", "NORM", "PLAIN", "SILU", "RopeAppend", "RouterEpilogue"]

# the fused GEMV's prologues (its MODE; see csrc/fused_gemv.cu); FusedGemvs.fused_linear's `mode`
NORM, ADD_NORM, SILU = 1, 2, 3
FUSED_SUFFIX = {NORM: "norm", ADD_NORM: "addnorm", SILU: "silu"}
# the plain prologue (MODE 0): the input rows x as they are, normalized already by another launch (a tensor-parallel
# rank's all-reduce + residual + RMSNorm); only before the RoPE and SiLU epilogues (the plain GEMV is Dense.linear)
PLAIN = 0
ROPE = 16  # a mode flag: the QKV GEMV with RoPE and the KV append as its epilogue (FusedGemvs.prepared_qkv_rope)
ROUTE = 32  # a mode flag: a MoE router GEMV with the routing as its epilogue (FusedGemvs.prepared_router)
GATE_UP = 64  # a mode flag: the gate/up GEMV with SiLU-and-mul as its epilogue (FusedGemvs.prepared_gate_up_silu)
PAIRS = ROPE | GATE_UP  # the epilogues over pairs of columns, which their own methods pack


@dataclass(frozen=True)
class RopeAppend:
    """What :meth:`~fi_engine.kernels.fused_gemv.FusedGemvs.prepared_qkv_rope`'s epilogue needs: the heads (``hq``
    query, ``hk`` key/value), head dim ``d``; the RoPE settings as FlashInfer's op takes them (``theta``, ``scale``;
    with ``llama3`` also ``low_freq_factor``, ``high_freq_factor``, ``old_context_len``); this step's int32 device
    arrays (``positions``, ``batch_indices`` per row, ``kv_indptr``, ``kv_indices``) and the layer's NHD caches
    (``k_cache``, ``v_cache``: ``num_pages`` pages of ``page_size`` tokens, strides in elements). Addresses as ints; a
    value (the engine keys nothing by it)."""

    hq: int
    hk: int
    d: int
    theta: float
    scale: float
    llama3: bool
    low_freq_factor: float
    high_freq_factor: float
    old_context_len: float
    positions: int
    batch_indices: int
    kv_indptr: int
    kv_indices: int
    k_cache: int
    v_cache: int
    page_size: int
    num_pages: int
    stride_page: int
    stride_n: int
    stride_h: int

    @property
    def cache_bytes(self) -> int:
        """The bytes each cache spans: ``num_pages`` pages of ``stride_page`` 16-bit elements."""
        return 2 * self.num_pages * self.stride_page

    def constants(self) -> tuple[float, float, float, float]:
        """``(rcp_theta, rcp_scale, smooth_a, smooth_b)`` as FlashInfer's launcher computes them from its float
        arguments (float32 reciprocals; smooth_a through double, as its expression with M_PI evaluates)."""
        import numpy as np

        f = np.float32
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # an infinity here is refused by name
            theta, scale = f(self.theta), f(self.scale)
            rcp_theta, rcp_scale = f(1) / theta, f(1) / scale
            if not self.llama3:
                return float(rcp_theta), float(rcp_scale), 0.0, 0.0
            low, high, old = f(self.low_freq_factor), f(self.high_freq_factor), f(self.old_context_len)
            smooth_a = f(float(old) / (2 * math.pi * float(high) - 2 * math.pi * float(low)))
            smooth_b = f(-1) / (high / low - f(1))
        return float(rcp_theta), float(rcp_scale), float(smooth_a), float(smooth_b)


# what each of RopeAppend.constants() is derived from, for the error naming one that is no float32
ROPE_CONSTANTS = (
    "rope.theta (its reciprocal)",
    "rope.scale (its reciprocal)",
    "rope.old_context_len / (high_freq_factor - low_freq_factor)",
    "rope.high_freq_factor / low_freq_factor",
)


@dataclass(frozen=True)
class RouterEpilogue:
    """What :meth:`~fi_engine.kernels.fused_gemv.FusedGemvs.prepared_router`'s epilogue needs, addresses as ints:
    ``normed`` (where the normalized input rows go, 16-bit ``[rows, k]`` with row stride ``normed_ld`` elements, for the
    experts' GEMVs), ``top_k`` experts per row from the softmax of the logits (``renormalize``: their weights divided by
    their sum), written to ``experts`` (int32) and ``weights`` (float32), each ``[rows, top_k]`` contiguous; ``done``: a
    uint32 the caller zeroed once, which each launch's last block sets back to 0 (one per stream of launches: two
    launches in flight at once must not share it). A value (the engine keys nothing by it)."""

    normed: int
    normed_ld: int
    top_k: int
    renormalize: bool
    experts: int
    weights: int
    done: int


def check_fused_values(key: tuple[Any, ...], plain: bool = False) -> None:
    """The types and ranges of one fused GEMV call's values (``FusedGemvs._pack``'s key), each refused naming
    its argument: ints (not bools) where the kernel takes ints, addresses in ``[0, 2**64)``, row strides in
    ``[0, 2**40)``, ``eps`` a float finite in float32. The kernel's own limits (rows, k, n, row strides at least a row's
    width, alignment, overlap) are checked after. ``plain``: mode PLAIN taken (the LoRA form's GEMV over rows made
    before, which has a kernel of its own)."""
    mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, eps = key
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise ValueError(f"mode: expected NORM, ADD_NORM or SILU (fi_engine.kernels.fused_args), got {mode!r:.40}")
    if mode == PLAIN and not plain:  # (its plain GEMV is the Dense's own)
        raise ValueError(
            "mode: PLAIN (the input rows as they are) is the RoPE and SiLU epilogues' only (prepared_qkv_rope, "
            "prepared_gate_up_silu); a plain GEMV is Dense.linear"
        )
    if (mode & ~PAIRS) not in FUSED_SUFFIX and mode & ~PAIRS != PLAIN:
        raise ValueError(f"mode: expected NORM, ADD_NORM or SILU (fi_engine.kernels.fused_args), got {mode!r:.40}")
    for name, value in (("rows", rows), ("n", n), ("k", k), ("ab_type", ab_type), ("c_type", c_type)):
        int_arg(name, value, -(1 << 63), 1 << 63)  # their limits: fused_fits, and the kernel lookup
    for name, value in (("x", x), ("w", w), ("y", y), ("h", h), ("norm_weight", norm_weight), ("h_out", h_out)):
        int_arg(name, value, 0, U64)
    for name, value in (("x_ld", x_ld), ("y_ld", y_ld), ("h_ld", h_ld)):
        int_arg(name, value, 0, MAX_LD)
    if isinstance(eps, bool) or not hasattr(eps, "__float__"):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    try:
        value = float(eps)
    except (OverflowError, TypeError, ValueError):  # an int past float's range, or a __float__ that refuses
        value = math.nan
    float32_bits("eps", value)  # the kernel reads it as a float32: finite there too


def rope_ints(rope: Any) -> list[int]:
    """The RoPE and append arguments of a QKV GEMV's epilogue checked, as the kernels take them after their GEMV's:
    ``hq, hk, d``, the four float32 constants' bits, the index arrays, the caches, ``page_size`` and the three cache
    strides. TypeError/ValueError naming ``rope`` or its field (:func:`caches_apart` checks the caches against the
    launch's other operands)."""
    if not isinstance(rope, RopeAppend):
        raise TypeError(f"rope: expected a RopeAppend, got {type(rope).__name__}")
    r = rope
    for name in ("hq", "hk", "d", "page_size", "num_pages", "stride_page", "stride_n", "stride_h"):
        int_arg(f"rope.{name}", getattr(r, name), 1, 1 << 31 if name in ("hq", "hk", "d", "page_size") else MAX_LD)
    for name in ("positions", "batch_indices", "kv_indptr", "kv_indices", "k_cache", "v_cache"):
        int_arg(f"rope.{name}", getattr(r, name), 0, U64)
    for name in ("theta", "scale", "low_freq_factor", "high_freq_factor", "old_context_len"):
        value = getattr(r, name)
        try:
            ok = not isinstance(value, bool) and 0 < float(value) < math.inf
        except (OverflowError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"rope.{name}: expected a finite float > 0, got {value!r:.40}")
    if not isinstance(r.llama3, bool):
        raise TypeError(f"rope.llama3: expected a bool, got {type(r.llama3).__name__}")
    if r.llama3 and not r.high_freq_factor > r.low_freq_factor:  # as FlashInfer's Llama 3.1 RoPE op refuses
        raise ValueError(
            f"rope.high_freq_factor: expected a value > low_freq_factor ({r.low_freq_factor}), got "
            f"{r.high_freq_factor} (the blend divides by high_freq_factor / low_freq_factor - 1)"
        )
    # the kernel's float32 constants (1/theta of a subnormal theta is no float32, say)
    rope_bits = [float32_bits(name, v) for name, v in zip(ROPE_CONSTANTS, r.constants(), strict=True)]
    if r.d not in (64, 128, 256, 512):
        raise ValueError(f"rope.d: the RoPE epilogue serves head dims 64, 128, 256 and 512, got {r.d}")
    for name in ("positions", "batch_indices", "kv_indptr", "kv_indices"):
        value = getattr(r, name)
        if not value or value % 4:
            raise ValueError(f"rope.{name}: 0x{value:x} must be a non-NULL address aligned to 4 bytes (int32)")
    for name in ("k_cache", "v_cache"):
        value = getattr(r, name)
        if not value or value % 2:
            raise ValueError(f"rope.{name}: 0x{value:x} must be a non-NULL address aligned to 2 bytes")
    ints = [r.hq, r.hk, r.d, *rope_bits]
    ints += [r.positions, r.batch_indices, r.kv_indptr, r.kv_indices, r.k_cache, r.v_cache, r.page_size]
    return [*ints, r.stride_page, r.stride_n, r.stride_h]


def fused_args(key: tuple[Any, ...], n: int | None = None) -> list[int]:
    """The 13 arguments every fused GEMV kernel takes first (``x, w, y, rows, n, k, x_ld, y_ld, h, norm_weight,
    h_out, h_ld`` and ``eps``'s float32 bits), from a call's checked key (:func:`check_fused_values`'s order);
    ``n``: the weight's rows where the key holds ``y``'s narrower width (the gate/up GEMV's ``n / 2``)."""
    _, rows, x, x_ld, w, key_n, k, y, y_ld, _, _, h, h_ld, norm_weight, h_out, eps = key
    n = key_n if n is None else n
    return [x, w, y, rows, n, k, x_ld, y_ld, h, norm_weight, h_out, h_ld, float32_bits("eps", eps)]


def epilogue_mode(mode: object, epilogue: str, plain: bool = False) -> None:
    """ValueError naming ``mode`` unless it is NORM or ADD_NORM (an int, not a bool), or PLAIN where ``plain``: the
    prologues a GEMV with an ``epilogue`` (the RoPE, SiLU or routing one) follows."""
    modes = (NORM, ADD_NORM, PLAIN) if plain else (NORM, ADD_NORM)
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in modes:
        also = " (or PLAIN: input rows normalized already)" if plain else ""
        raise ValueError(f"mode: the {epilogue} epilogue follows a NORM or ADD_NORM prologue{also}, got {mode!r:.40}")


def caches_apart(rope: RopeAppend, areas: list[tuple[str, int, int]]) -> None:
    """ValueError naming the cache of ``rope`` (checked by :func:`rope_ints`) that runs past the address space or
    overlaps the other cache or one of ``areas`` (``(name, address, bytes)``: what the launch reads or writes)."""
    span_cache = rope.cache_bytes
    for name in ("k_cache", "v_cache"):
        value = getattr(rope, name)
        if value + span_cache > U64:
            raise ValueError(f"rope.{name}: 0x{value:x} + {span_cache} bytes runs past the end of the address space")
        for other, base, span in areas:
            if overlap(value, span_cache, base, span):
                raise ValueError(f"rope.{name}: overlaps {other} (the launch writes the cache while reading it)")
    if overlap(rope.k_cache, span_cache, rope.v_cache, span_cache):
        raise ValueError("rope.v_cache: overlaps rope.k_cache")


def indices_apart(rope: RopeAppend, rows: int, written: list[tuple[str, int, int]]) -> None:
    """ValueError naming the index array of ``rope`` (checked by :func:`rope_ints`) that runs past the address space or
    overlaps a cache or one of ``written`` (``(name, address, bytes)``: what the launch writes besides the caches),
    so that no block's store changes an index another block is still to read. The bytes checked are those every
    launch of ``rows`` rows reads: ``positions`` and ``batch_indices`` an int32 a row, ``kv_indptr`` and
    ``kv_indices`` at least their first (how far the kernel reads into them is up to their values)."""
    span_cache = rope.cache_bytes
    areas = [("rope.k_cache", rope.k_cache, span_cache), ("rope.v_cache", rope.v_cache, span_cache), *written]
    for name, span in (("positions", 4 * rows), ("batch_indices", 4 * rows), ("kv_indptr", 4), ("kv_indices", 4)):
        value = getattr(rope, name)
        if value + span > U64:
            raise ValueError(f"rope.{name}: 0x{value:x} + {span} bytes runs past the end of the address space")
        for other, base, size in areas:
            if overlap(value, span, base, size):
                raise ValueError(
                    f"rope.{name}: overlaps {other} (the launch writes it while its blocks read the index)"
                )


def check_epilogue_io(rows: int, x: int, x_ld: int, k: int, y: int, y_ld: int, out: int) -> tuple[int, int]:
    """The byte spans of ``x [rows, k]`` and ``y [rows, out]`` (16-bit, row strides ``x_ld``, ``y_ld``) of a GEMV with
    an epilogue, checked: rows no closer than their width, ``x`` 16-byte aligned with its row stride and ``y`` 2,
    neither NULL nor running past the address space, ``y`` apart from ``x`` (ValueError naming the argument)."""
    if rows > 1:
        for name, value, width in (("x_ld", x_ld, k), ("y_ld", y_ld, out)):
            if value < width:
                raise ValueError(f"{name}: {value} elements between rows is less than a row's {width}")
    for name, value, align in (("x", x, 16), ("x_ld", 2 * x_ld, 16), ("y", y, 2)):
        if value % align or (value == 0 and name != "x_ld"):
            raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
    span_x, span_y = 2 * ((rows - 1) * x_ld + k), 2 * ((rows - 1) * y_ld + out)
    for name, base, span in (("x", x, span_x), ("y", y, span_y)):
        if base + span > U64:
            raise ValueError(f"{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
    if overlap(y, span_y, x, span_x):
        raise ValueError("y: overlaps x (the launch writes y while other blocks still read x)")
    return span_x, span_y
