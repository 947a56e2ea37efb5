"""Dense math of the engine: cuBLAS GEMMs (through cffi, :mod:`~fi_engine.kernels.cublas`; cuBLASLt with algorithms
cached per shape, :mod:`~fi_engine.kernels.cublas_lt`), a GEMV of its own for GEMMs of at most 4 rows (also with a
norm, add-norm or SiLU prologue and a RoPE + KV-append epilogue: the fused decode step), the skinny GEMM for
GPU-bound steps of up to 32 rows where it is timed faster (:mod:`~fi_engine.kernels.skinny_gemm`), and a few small CuPy
kernels (row gather, argmax; with a vocabulary split over ranks: the shard's gather and argmax, the argmaxes'
combination, the gathered logits' reassembly). Their CUDA C is :mod:`~fi_engine.kernels.cuda_sources`; here they are
compiled, checked and launched.

Why ``cublasGemmEx`` on raw pointers rather than ``cupy.matmul``: ``matmul`` has no bfloat16 (numpy has no such
dtype), may allocate temporaries, and goes through CuPy's cuBLAS wrappers, which reset the handle's stream on every
call and refuse to run during stream capture. Our handle is bound once to the engine's stream with a fixed
workspace, writes into our buffers and never allocates, so the GEMMs can be captured in a CUDA graph. The
kernels are compiled once with NVRTC (``cupy.RawModule``) and never allocate either (a ``RawKernel`` or
``cuLaunchKernel`` launch is a plain kernel launch, which capture records).

Every launch goes to CuPy's *current* stream (kernels) or the handle's stream (GEMMs, the GEMV); the engine makes
its stream current and gives it to :class:`Dense`, so they are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fi_ffi.cuda import driver_error
from fi_ffi.errors import CublasError, LibraryLoadError

from ..values import float32_bits, integer
from .cublas import (
    CUBLAS_COMPUTE_32F,
    CUBLAS_GEMM_DEFAULT,
    CUBLAS_OP_N,
    CUBLAS_OP_T,
    CUDA_R_16BF,
    CUDA_R_16F,
    CUDA_R_32F,
    Handle,
    status_name,
)
from .cuda_sources import function_ptr, functions, source
from .fp8_linear import FP8_GEMV_MAX_ROWS, PAIR_MAX_ROWS, PAIR_ROPE, PAIR_SILU
from .int4_linear import INT4_GEMV_MAX_ROWS, Int4Weight
from .skinny_gemm import E4M3_BLOCK, E4M3_ROW, INT4, SKINNY_MAX_ROWS, W16, SkinnyPlan

__all__ = [
    "ADD_NORM",
    "CUDA_R_16BF",
    "CUDA_R_16F",
    "CUDA_R_32F",
    "GEMV_MAX_ROWS",
    "NORM",
    "SILU",
    "WORKSPACE_BYTES",
    "Dense",
    "RopeAppend",
    "RouterEpilogue",
    "data_type",
]

# cuBLAS's scratch: 32 MiB, what NVIDIA's cuBLAS documentation recommends for Hopper (4 MiB suffices before it).
WORKSPACE_BYTES = 32 << 20


def _column_blocks(width: int) -> int:
    """Blocks of 256 threads per row of the row copies (``gather_rows16``), one column each (at least one)."""
    return max(1, -(-int(width) // 256))


def data_type(dtype: str) -> int:
    """The cudaDataType_t of an fi_ffi dtype name."""
    try:
        return {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF, "float32": CUDA_R_32F}[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}") from None


# the fused GEMV's prologues (its MODE; see csrc/fused_gemv.cu); Dense.fused_linear's `mode`
NORM, ADD_NORM, SILU = 1, 2, 3
_FUSED_SUFFIX = {NORM: "norm", ADD_NORM: "addnorm", SILU: "silu"}
_ROPE = 16  # a mode flag: the QKV GEMV with RoPE and the KV append as its epilogue (Dense.prepared_qkv_rope)
_ROUTE = 32  # a mode flag: a MoE router GEMV with the routing as its epilogue (Dense.prepared_router)
_GATE_UP = 64  # a mode flag: the gate/up GEMV with SiLU-and-mul as its epilogue (Dense.prepared_gate_up_silu)
_PAIRS = _ROPE | _GATE_UP  # the epilogues over pairs of columns, which their own methods pack
_FUSED_WARPS = 8  # output columns per block per pass (one warp each); a block stages its input rows once
_STATIC_SMEM = 48 << 10  # dynamic shared memory a kernel may take without opting in

GEMV_MAX_ROWS = 4  # the rows one GEMV launch takes (the kernel keeps a sum per row in registers)
_GEMV_WARPS = 4  # output columns per block (one warp each)
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h's CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_GEMV_NAMES = {
    (CUDA_R_16F, CUDA_R_16F): "gemv_f16_f16",
    (CUDA_R_16F, CUDA_R_32F): "gemv_f16_f32",
    (CUDA_R_16BF, CUDA_R_16BF): "gemv_bf16_bf16",
    (CUDA_R_16BF, CUDA_R_32F): "gemv_bf16_f32",
}


@dataclass(frozen=True)
class RopeAppend:
    """What :meth:`Dense.prepared_qkv_rope`'s epilogue needs: the heads (``hq`` query, ``hk`` key/value), head
    dim ``d``; the RoPE settings as FlashInfer's op takes them (``theta``, ``scale``; with ``llama3`` also
    ``low_freq_factor``, ``high_freq_factor``, ``old_context_len``); this step's int32 device arrays
    (``positions``, ``batch_indices`` per row, ``kv_indptr``, ``kv_indices``) and the layer's NHD caches
    (``k_cache``, ``v_cache``: ``num_pages`` pages of ``page_size`` tokens, strides in elements). Addresses as
    ints; a value (the engine keys nothing by it)."""

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
_ROPE_CONSTANTS = (
    "rope.theta (its reciprocal)",
    "rope.scale (its reciprocal)",
    "rope.old_context_len / (high_freq_factor - low_freq_factor)",
    "rope.high_freq_factor / low_freq_factor",
)


@dataclass(frozen=True)
class RouterEpilogue:
    """What :meth:`Dense.prepared_router`'s epilogue needs, addresses as ints: ``normed`` (where the normalized
    input rows go, 16-bit ``[rows, k]`` with row stride ``normed_ld`` elements, for the experts' GEMVs),
    ``top_k`` experts per row from the softmax of the logits (``renormalize``: their weights divided by their
    sum), written to ``experts`` (int32) and ``weights`` (float32), each ``[rows, top_k]`` contiguous; ``done``: a
    uint32 the caller zeroed once, which each launch's last block sets back to 0 (one per stream of launches:
    two launches in flight at once must not share it). A value (the engine keys nothing by it)."""

    normed: int
    normed_ld: int
    top_k: int
    renormalize: bool
    experts: int
    weights: int
    done: int


_GEMV, _LT = -1, -2  # Dense._choice: the GEMV, cuBLASLt (or the FP8 paths); 0, 1, ...: a skinny plan
_U64 = 1 << 64  # a device address is below it (the kernels' pointers, packed into uint64 slots)
_MAX_LD = 1 << 40  # row strides (elements): far past any buffer, far below the kernels' long long


def gemv_bound(rows: int, n: int, k: int) -> bool:
    """The rule where a shape cannot be timed (``Dense._choice``): whether the GEMV likely reads a ``[n, k]``
    weight for ``rows`` rows faster than cuBLASLt when only the device's time counts (a CUDA graph's replay): one
    row, or an output at least 16 times wider than deep (the LM head), up to :data:`GEMV_MAX_ROWS` rows. From an
    H100 (benchmarks/bench_gemv.py; benchmarks/RESULTS.md): at one row the GEMV read the 8B shape's weights at
    68-92 % of HBM bandwidth, cuBLASLt at 64-86 %, each winning some shapes; at 2-4 rows the GEMV's per-row reads
    of ``x`` make it slower than cuBLASLt except for the LM head."""
    return rows == 1 or n >= 16 * k


def _int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi)`` (a bool or a float is none), else TypeError/ValueError naming ``name``:
    checked before packing, where cffi would raise OverflowError or TypeError naming nothing."""
    value = integer(name, value)
    if not lo <= value < hi:
        shown = value if abs(value) < 1 << 80 else f"an int of {value.bit_length()} bits"
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}), got {shown}")
    return value


def _check_fused_values(key: tuple[Any, ...]) -> None:
    """The types and ranges of one fused GEMV call's values (``Dense._pack_fused``'s key), each refused naming
    its argument: ints (not bools) where the kernel takes ints, addresses in ``[0, 2**64)``, row strides in
    ``[0, 2**40)``, ``eps`` a float finite in float32. The kernel's own limits (rows, k, n, row strides at least a row's
    width, alignment, overlap) are checked after."""
    mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, eps = key
    if isinstance(mode, bool) or not isinstance(mode, int) or (mode & ~_PAIRS) not in _FUSED_SUFFIX:
        raise ValueError(f"mode: expected NORM, ADD_NORM or SILU (fi_engine.kernels.dense), got {mode!r:.40}")
    for name, value in (("rows", rows), ("n", n), ("k", k), ("ab_type", ab_type), ("c_type", c_type)):
        _int_arg(name, value, -(1 << 63), 1 << 63)  # their limits: fused_fits, and the kernel lookup
    for name, value in (("x", x), ("w", w), ("y", y), ("h", h), ("norm_weight", norm_weight), ("h_out", h_out)):
        _int_arg(name, value, 0, _U64)
    for name, value in (("x_ld", x_ld), ("y_ld", y_ld), ("h_ld", h_ld)):
        _int_arg(name, value, 0, _MAX_LD)
    if isinstance(eps, bool) or not hasattr(eps, "__float__"):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    try:
        value = float(eps)
    except (OverflowError, TypeError, ValueError):  # an int past float's range, or a __float__ that refuses
        value = math.nan
    float32_bits("eps", value)  # the kernel reads it as a float32: finite there too


def _rope_ints(rope: Any) -> list[int]:
    """The RoPE and append arguments of a QKV GEMV's epilogue checked, as the kernels take them after their GEMV's:
    ``hq, hk, d``, the four float32 constants' bits, the index arrays, the caches, ``page_size`` and the three cache
    strides. TypeError/ValueError naming ``rope`` or its field (:func:`_caches_apart` checks the caches against the
    launch's other operands)."""
    if not isinstance(rope, RopeAppend):
        raise TypeError(f"rope: expected a RopeAppend, got {type(rope).__name__}")
    r = rope
    for name in ("hq", "hk", "d", "page_size", "num_pages", "stride_page", "stride_n", "stride_h"):
        _int_arg(f"rope.{name}", getattr(r, name), 1, 1 << 31 if name in ("hq", "hk", "d", "page_size") else _MAX_LD)
    for name in ("positions", "batch_indices", "kv_indptr", "kv_indices", "k_cache", "v_cache"):
        _int_arg(f"rope.{name}", getattr(r, name), 0, _U64)
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
    rope_bits = [float32_bits(name, v) for name, v in zip(_ROPE_CONSTANTS, r.constants(), strict=True)]
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


def _fused_args(key: tuple[Any, ...], n: int | None = None) -> list[int]:
    """The 13 arguments every fused GEMV kernel takes first (``x, w, y, rows, n, k, x_ld, y_ld, h, norm_weight,
    h_out, h_ld`` and ``eps``'s float32 bits), from a call's checked key (:func:`_check_fused_values`'s order);
    ``n``: the weight's rows where the key holds ``y``'s narrower width (the gate/up GEMV's ``n / 2``)."""
    _, rows, x, x_ld, w, key_n, k, y, y_ld, _, _, h, h_ld, norm_weight, h_out, eps = key
    n = key_n if n is None else n
    return [x, w, y, rows, n, k, x_ld, y_ld, h, norm_weight, h_out, h_ld, float32_bits("eps", eps)]


def _epilogue_mode(mode: object, epilogue: str) -> None:
    """ValueError naming ``mode`` unless it is NORM or ADD_NORM (an int, not a bool): the prologues a GEMV with an
    ``epilogue`` (the RoPE, SiLU or routing one) follows."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (NORM, ADD_NORM):
        raise ValueError(f"mode: the {epilogue} epilogue follows a NORM or ADD_NORM prologue, got {mode!r:.40}")


def _caches_apart(rope: RopeAppend, areas: list[tuple[str, int, int]]) -> None:
    """ValueError naming the cache of ``rope`` (checked by :func:`_rope_ints`) that runs past the address space or
    overlaps the other cache or one of ``areas`` (``(name, address, bytes)``: what the launch reads or writes)."""
    span_cache = 2 * rope.num_pages * rope.stride_page
    for name in ("k_cache", "v_cache"):
        value = getattr(rope, name)
        if value + span_cache > _U64:
            raise ValueError(f"rope.{name}: 0x{value:x} + {span_cache} bytes runs past the end of the address space")
        for other, base, span in areas:
            if _overlap(value, span_cache, base, span):
                raise ValueError(f"rope.{name}: overlaps {other} (the launch writes the cache while reading it)")
    if _overlap(rope.k_cache, span_cache, rope.v_cache, span_cache):
        raise ValueError("rope.v_cache: overlaps rope.k_cache")


def _check_epilogue_io(rows: int, x: int, x_ld: int, k: int, y: int, y_ld: int, out: int) -> tuple[int, int]:
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
        if base + span > _U64:
            raise ValueError(f"{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
    if _overlap(y, span_y, x, span_x):
        raise ValueError("y: overlaps x (the launch writes y while other blocks still read x)")
    return span_x, span_y


def _overlap(a: int, a_len: int, b: int, b_len: int) -> bool:
    """Whether the byte ranges ``[a, a + a_len)`` and ``[b, b + b_len)`` share a byte."""
    return a < b + b_len and b < a + a_len


def _unroll(value: Any) -> int:
    """A ``gemv_unroll`` / ``rope_unroll`` setting checked: an int from 1 to 16 (registers bound it)."""
    if value.__class__ is not int or not 1 <= value <= 16:
        raise ValueError(f"Dense.gemv_unroll, Dense.rope_unroll: expected an int from 1 to 16, got {value!r:.40}")
    return int(value)


class Dense:
    """A cuBLAS handle bound to ``stream`` with a workspace of its own, plus the gather/argmax kernels and the
    vocabulary shards' (compiled on construction). Create it on the device it serves (CuPy's current device).

    Args:
        stream: the engine's ``cupy.cuda.Stream``; kernels launch on CuPy's current stream, which the engine
            keeps equal to it.

    ``gemv`` (True where the kernel compiled and the driver loaded): :meth:`linear` of at most
    :data:`GEMV_MAX_ROWS` rows runs a GEMV kernel of its own, launched with ``cuLaunchKernel`` on arguments packed
    once per call site, instead of cuBLAS (whose launch costs several times more host time: an eager decode step
    is host-bound). ``lt``: the other GEMMs go through cuBLASLt with cached algorithms.
    """

    # no FP8 weight until add_fp8_weight makes them instance attributes (class defaults: the host tests build a
    # Dense without its GPU __init__)
    _fp8: Any = None
    _fp8_weights: Mapping[int, Any] = MappingProxyType({})
    _int4: Any = None  # and no int4 weight until add_int4_weight
    _int4_weights: Mapping[int, Any] = MappingProxyType({})

    pdl = True
    """The prepared GEMV launches (the fused decode step's) use programmatic dependent launch on Hopper and later:
    each may start while the kernel before it drains, its first weights already loading (benchmarks/RESULTS.md).
    Read when a launch is prepared; set it on the class to compare."""

    gemv_unroll = 4
    """16-byte weight vectors each lane of the 16-bit GEMVs (plain and fused) keeps in flight: more bytes in flight
    per warp against more registers. Compiled in when a Dense is made; set it on the class to compare
    (``benchmarks/bench_llama_tp.py --variants unroll-N``)."""

    fused_blocks_per_sm = 8
    """The fused GEMVs' blocks per SM at most (their grid: this many times the SMs, each block serving a grid-stride
    set of columns after computing its prologue -- the norm or SiLU of the input rows -- once): more blocks keep more
    weight loads in flight, fewer recompute the prologue fewer times. Read when a Dense is made; set it on the class
    to compare (``benchmarks/bench_llama_tp.py --variants fused-blocks-N``)."""

    rope_unroll = 4
    """The same for each of the two columns of the fused QKV + RoPE + append GEMV (``prepared_qkv_rope``); 1 is
    the one-vector loop it had before (``benchmarks/bench_llama_tp.py --variants rope-unroll-1``)."""

    gemv_fixed_rows = True
    """The 16-bit GEMVs (plain, fused, RoPE, router) compiled once per row count, 1 to 4, each launch taking the
    kernel of its rows: loops of known length, whose loads of the input rows the compiler issues together. False:
    one kernel per variant for any row count (each row's load behind a branch), as the engine ran before 2026-11-25.
    The same sums either way. Compiled in when a Dense is made; set it on the class to compare
    (``benchmarks/bench_llama_tp.py --variants any-rows``)."""

    gemv_pipeline = True
    """The plain and fused 16-bit GEMVs load each lane's next :attr:`gemv_unroll` weight vectors before summing the
    ones in hand, so a load never waits for a sum (the same sums in the same order). Compiled in when a Dense is
    made; set it on the class to compare (``benchmarks/bench_llama_tp.py --variants no-gemv-pipeline``)."""

    fused_min_blocks = 4
    """The one-row fused GEMVs' registers capped (``__launch_bounds__``) so that this many of their 256-thread
    blocks fit an SM (1: no cap). Compiled in when a Dense is made; set it on the class to compare
    (``benchmarks/bench_llama_tp.py --variants fused-min-blocks-N``)."""

    @property
    def launches_with_pdl(self) -> bool:
        """Whether the prepared launches use programmatic dependent launch (:attr:`pdl` on, a Hopper or later GPU,
        a driver with ``cuLaunchKernelEx``): the decode step launches its attention runs the same way."""
        return bool(self.pdl and getattr(self, "_launch_ex", None) is not None)

    def __init__(self, stream: Any) -> None:
        import cupy

        # cuBLAS scratch, allocated here so that no GEMM allocates (least of all during capture); kept alive as
        # long as the handle and any graph captured with it (the engine closes the graph first).
        self._workspace = cupy.empty(WORKSPACE_BYTES, cupy.uint8)
        self._blas = Handle()
        try:
            self._blas.bind(stream.ptr, self._workspace.data.ptr, WORKSPACE_BYTES)
            (
                self._gather_fn,
                self._argmax_fn,
                self._gather_shard_fn,
                self._argmax_shard_fn,
                self._combine_argmax_fn,
                self._unshard_fn,
            ) = functions(
                cupy,
                "rows.cu",
                (
                    "gather_rows16",
                    "argmax_rows",
                    "gather_rows16_shard",
                    "argmax_rows_shard",
                    "combine_argmax",
                    "unshard_columns",
                ),
            )
        except BaseException:
            self._blas.close()
            raise
        self._stream = stream.ptr
        self._gemv_fns: dict[tuple[int, int], tuple[int, ...]] = {}  # (ab_type, c_type) -> CUfunction per row count
        self._gemv_args: dict[tuple[int, ...], tuple[Any, ...]] = {}
        # the GEMV with a prologue (fused_linear): (mode, ab_type, c_type) -> CUfunction per row count (1 to 4),
        # packed calls, limits
        self._fused_fns: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self._fused_args: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._fused_smem = 0  # the most dynamic shared memory (bytes) a fused launch may take: its input rows
        self._fused_grid = 1056  # blocks per fused launch at most (8 per SM; each stages its input rows once)
        self._launch: Any = None
        self._launch_ex: Any = None
        self._null: Any = None
        self.gemv = False
        self.gemv_error = ""  # why the GEMV is unavailable, if it is
        # True while a GPU-bound step is issued (a CUDA graph's warm-up and capture): each shape of up to 32 rows
        # then takes the launch timed fastest on this device (_choice: the GEMV, the skinny GEMM, cuBLASLt or the
        # quantized paths), not the GEMV for every shape of <= 4 rows as eagerly, where its lower host time wins
        self.bandwidth_bound = False
        # which launch serves a shape of up to SKINNY_MAX_ROWS rows in a GPU-bound step, timed once per
        # (rows, n, k, ab_type, c_type, FP8 weight or 0): _LT, _GEMV or the index of a skinny plan (_choice)
        self._choices: dict[tuple[int, ...], int] = {}
        self._skinny: Any = None  # skinny_gemm.SkinnyGemm, made at the first shape a GPU-bound step times
        self._skinny_calls: dict[tuple[Any, ...], Any] = {}  # a call's skinny launch, packed (values only)
        # the e4m3 weights' kernels (fp8_linear.Fp8Linears, made by the first add_fp8_weight) and their registrations
        # by device address (empty: no FP8 weight)
        self._fp8 = None
        self._fp8_weights = MappingProxyType({})
        self._int4 = None  # the int4 weights' (int4_linear.Int4Linears, made by the first add_int4_weight)
        self._int4_weights = MappingProxyType({})
        self._flush: Any = None  # 64 MiB written between timed runs: each reads its weight from HBM, not L2
        try:  # the small-row GEMV (see linear); a GPU or driver it cannot serve leaves it off
            from fi_ffi.cuda import libcuda, libcuda_ffi

            lib = libcuda()
            if lib is not None:
                gemv = cupy.RawModule(code=source("gemv.cu"), options=self.gemv_options())
                self._gemv_fns = {key: self._row_kernels(gemv, name) for key, name in _GEMV_NAMES.items()}
                self._gemv_module = gemv
                self._launch, self._driver_ffi = lib.cuLaunchKernel, libcuda_ffi()
                try:  # CUDA 12.0 drivers and later; Hopper and later run its programmatic dependent launch
                    major = int(cupy.cuda.Device().compute_capability[:-1] or 0)
                    self._launch_ex = lib.cuLaunchKernelEx if major >= 9 else None
                except (AttributeError, ValueError):
                    self._launch_ex = None
                self._null = self._driver_ffi.NULL
                self.gemv = True
                self._load_fused(cupy)
            else:
                self.gemv_error = "libcuda could not be loaded or cuInit failed (fi_ffi.cuda.libcuda)"
        except Exception as exc:  # NVRTC or the driver refusing: cuBLAS serves every GEMM
            self._gemv_fns, self.gemv_error = {}, f"{type(exc).__name__}: {exc}"
        self._gemm, self._h = self._blas.gemm_ex, self._blas.ptr
        self._batched = self._blas.gemm_strided_batched_ex
        self._one, self._zero = self._blas.one, self._blas.zero
        # cuBLASLt with the algorithm chosen once per shape (cublas_lt's docstring says why); None: GemmEx only
        self._lt: Any = None
        self._lt_shape: Any = None
        try:
            from .cublas_lt import LtMatmuls

            self._lt = LtMatmuls(stream.ptr, self._workspace.data.ptr, WORKSPACE_BYTES, self._one, self._zero)
            self._lt_shape = self._lt.shape
        except (LibraryLoadError, CublasError):
            self._lt = None
        except BaseException:  # anything else is raised: the cuBLAS handle has no finalizer, destroy it first
            self._blas.close()
            raise

    @classmethod
    def gemv_options(cls) -> tuple[str, ...]:
        """The NVRTC options ``csrc/gemv.cu`` is compiled with: :attr:`gemv_unroll`,
        :attr:`gemv_fixed_rows` and :attr:`gemv_pipeline` (what ``tools/kernel_fingerprints.py`` compiles too)."""
        return (
            f"-DGEMV_UNROLL={_unroll(cls.gemv_unroll)}",
            f"-DGEMV_FIXED_ROWS={int(bool(cls.gemv_fixed_rows))}",
            f"-DGEMV_PIPELINE={int(bool(cls.gemv_pipeline))}",
        )

    @classmethod
    def fused_options(cls) -> tuple[str, ...]:
        """The NVRTC options :data:`~fi_engine.kernels.csrc/fused_gemv.cu` is compiled with: fast math (as
        FlashInfer's modules are), :meth:`gemv_options`, :attr:`rope_unroll` and :attr:`fused_min_blocks`."""
        return (
            "--use_fast_math",
            *cls.gemv_options(),
            f"-DROPE_UNROLL={_unroll(cls.rope_unroll)}",
            f"-DGEMV_FUSED_MIN_BLOCKS={max(1, min(32, int(cls.fused_min_blocks)))}",
        )

    @staticmethod
    def fused_kernels() -> dict[tuple[int, int, int], str]:
        """The fused GEMVs a Dense loads, ``(mode, ab_type, c_type) -> kernel name`` (without the ``_r<rows>``
        suffix): the prologue kernels of every type pair, and per 16-bit type the QKV + RoPE + append, gate/up + SiLU
        and MoE router kernels after a NORM or ADD_NORM prologue."""
        names = {}
        for (ab, c), name in _GEMV_NAMES.items():
            for mode, suffix in _FUSED_SUFFIX.items():
                names[(mode, ab, c)] = f"{name}_{suffix}"
        for ab, name in ((CUDA_R_16F, "f16"), (CUDA_R_16BF, "bf16")):
            for mode, suffix in ((NORM, "norm"), (ADD_NORM, "addnorm")):
                names[(mode | _ROPE, ab, ab)] = f"gemv_{name}_{suffix}_rope"
                names[(mode | _GATE_UP, ab, ab)] = f"gemv_{name}_{suffix}_gateup"
                names[(mode | _ROUTE, ab, CUDA_R_32F)] = f"gemv_{name}_{suffix}_route"
        return names

    @classmethod
    def row_kernel_names(cls, name: str) -> list[str]:
        """Kernel ``name``'s functions for 1, 2, 3 and 4 rows, in that order: ``name_r1`` .. ``name_r4``, or without
        :attr:`gemv_fixed_rows` ``name_r0`` four times (one kernel for any count)."""
        return [f"{name}_r{r}" for r in range(1, GEMV_MAX_ROWS + 1)] if cls.gemv_fixed_rows else [f"{name}_r0"] * 4

    def _row_kernels(self, module: Any, name: str, keep: bool = False) -> Any:
        """Kernel ``name``'s functions for 1, 2, 3 and 4 rows (:meth:`row_kernel_names`): CUfunction handles, or with
        ``keep`` the CuPy functions."""
        kernels = [module.get_function(n) for n in self.row_kernel_names(name)]
        return tuple(kernels) if keep else tuple(function_ptr(k) for k in kernels)

    def _load_fused(self, cupy: Any) -> None:
        """Compile the fused GEMV variants (``fused_linear``); a failure leaves them off, the plain GEMV on."""
        try:
            module = cupy.RawModule(code=source("fused_gemv.cu"), options=self.fused_options())
            attrs = cupy.cuda.Device().attributes
            fns = {}
            limit = _STATIC_SMEM - 1024  # the static part (the sums of squares) counts against the same 48 KiB
            optin = int(attrs.get("MaxSharedMemoryPerBlockOptin", 0)) - 1024

            def load(kernel_name: str) -> tuple[int, ...]:
                nonlocal optin
                kernels = self._row_kernels(module, kernel_name, keep=True)
                for kernel in kernels:
                    if optin > limit:  # rows x k input values beyond 48 KiB: opt in once per kernel
                        try:
                            kernel.max_dynamic_shared_size_bytes = optin
                        except Exception:
                            optin = limit
                return tuple(function_ptr(kernel) for kernel in kernels)

            for key, name in self.fused_kernels().items():
                fns[key] = load(name)
            self._fused_smem = max(limit, optin)
            self._fused_grid = max(1, int(self.fused_blocks_per_sm)) * int(attrs.get("MultiProcessorCount", 132))
            self._fused_module, self._fused_fns = module, fns
        except Exception as exc:  # NVRTC refusing: the engine keeps its separate norm and activation launches
            self._fused_fns, self.gemv_error = {}, f"fused GEMV: {type(exc).__name__}: {exc}"

    def fused_fits(self, rows: int, k: int) -> bool:
        """Whether :meth:`fused_linear` serves ``rows`` input rows of ``k`` elements (16-bit): the GEMV is on, its
        fused variants compiled, ``rows <= GEMV_MAX_ROWS``, ``k`` a multiple of 8 and the rows fit the shared
        memory a block may take. TypeError naming ``rows`` or ``k`` when one is no int."""
        if rows.__class__ is not int or k.__class__ is not int:  # (two class tests on the per-step path)
            _int_arg("rows", rows, -(1 << 63), 1 << 63)
            _int_arg("k", k, -(1 << 63), 1 << 63)
        return (
            self.gemv
            and bool(self._fused_fns)
            and 0 < rows <= GEMV_MAX_ROWS
            and 0 < k < 1 << 31
            and k % 8 == 0
            and rows * k * 2 <= self._fused_smem
        )

    def fused_linear(
        self,
        mode: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        h: int = 0,
        h_ld: int = 0,
        norm_weight: int = 0,
        h_out: int = 0,
        eps: float = 0.0,
    ) -> None:
        """``y[:rows, :n] = in @ w.T`` (``w`` row-major ``[n, k]``, float32 sums, ``y`` rounded once to
        ``c_type``) where the input rows ``in [rows, k]`` are computed in the launch itself (``mode``):

        - :data:`NORM`: ``in = rmsnorm(h) * norm_weight`` (``h [rows, k]``, row stride ``h_ld``; ``x`` unused);
        - :data:`ADD_NORM`: ``s = h + x``; ``h_out = s`` (rounded; skipped where ``h_out`` is 0);
          ``in = rmsnorm(s) * norm_weight`` -- FlashInfer's ``fused_add_rmsnorm(x, h, norm_weight)``, with the new
          residual written to ``h_out``, which must not overlap ``h`` (every block reads ``h``);
        - :data:`SILU`: ``in = silu(x[:, :k]) * x[:, k:2k]`` (FlashInfer's ``silu_and_mul``; ``x [rows, 2k]``).

        Rounded where those kernels round (``in`` and ``h_out`` to the 16-bit type), so the result equals theirs
        followed by :meth:`linear`'s GEMV. Pointers as ints, strides in elements; ``eps`` the norm's epsilon.
        :meth:`fused_fits` must hold. Raises TypeError/ValueError naming an argument that is no int (``eps``: no
        finite float), an address outside ``[0, 2**64)`` or whose rows run past it, a row stride shorter than its
        row (more than one row), misaligned (x, h, h_out, norm_weight and their row strides: 16 bytes; y: its
        element) or overlapping (``h_out`` with ``h``, ``x`` or ``y``; ``y`` with ``x`` or ``h``): checked when a
        call site is packed, and a call site is keyed by every value, so every call is covered."""
        key = (mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, eps)
        try:
            packed = self._fused_args.get(key)
        except TypeError:  # an unhashable value: _pack_fused refuses it by name
            packed = None
        if packed is None:
            packed = self._pack_fused(key)
        fn, grid, smem, params, _ = packed
        err = self._launch(fn, grid, 1, 1, 32 * _FUSED_WARPS, 1, 1, smem, self._stream, params, self._null)
        if err:
            raise driver_error(err, f"cuLaunchKernel(fused gemv, mode={mode}, rows={rows}, n={n}, k={k})")

    def prepared_fused(
        self,
        mode: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        h: int = 0,
        h_ld: int = 0,
        norm_weight: int = 0,
        h_out: int = 0,
        eps: float = 0.0,
    ) -> Callable[[], None]:
        """:meth:`fused_linear` with these arguments checked and packed once: calling the result launches it again
        (no key built, no lookup: about one ``cuLaunchKernel``). The result keeps the packed argument array alive;
        after :meth:`close` it raises instead of launching."""
        key = (mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, eps)
        fn, grid, smem, params, values = self._pack_fused(key)
        return self._prepared(fn, grid, 32 * _FUSED_WARPS, smem, params, values, "fused gemv", pdl=True)

    def prepared_linear(
        self,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
    ) -> Callable[[], None]:
        """:meth:`linear` (no ``accumulate``) with these arguments packed once where the GEMV serves it (see
        :meth:`prepared_fused`); elsewhere a call of :meth:`linear` with them. Raises TypeError/ValueError naming
        an argument that is no int or out of range (addresses in ``[0, 2**64)``, ``rows``, ``n``, ``k`` in ``[1,
        2**31)``, row strides in ``[0, 2**40)``), or, where the GEMV serves it, a misaligned ``y``."""
        for name, value in (("rows", rows), ("n", n), ("k", k)):
            _int_arg(name, value, 1, 1 << 31)
        for name, value in (("x", x), ("w", w), ("y", y)):
            _int_arg(name, value, 0, _U64)
        for name, value in (("x_ld", x_ld), ("y_ld", y_ld)):
            _int_arg(name, value, 0, _MAX_LD)
        for name, value in (("ab_type", ab_type), ("c_type", c_type)):
            _int_arg(name, value, -(1 << 31), 1 << 31)
        args = (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
        fp8 = self._fp8_weights.get(w)
        if fp8 is not None and self.gemv and rows <= min(FP8_GEMV_MAX_ROWS, self.fp8_gemv_max_rows):
            self._check_fp8_call(fp8, n, k, ab_type, c_type)
            packed = self._fp8.gemv(rows, x, x_ld, fp8, y, y_ld, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F)
            if packed:
                fn, grid, threads, params, values = packed
                return self._prepared(fn, grid, threads, 0, params, values, "fp8 gemv", pdl=True)
        int4 = self._int4_weights.get(w)
        if int4 is not None:
            if self.gemv and rows <= min(INT4_GEMV_MAX_ROWS, self.int4_gemv_max_rows):
                self._check_quantized_call(int4, "int4", n, k, ab_type, c_type)
                packed = self._int4.gemv(rows, x, x_ld, int4, y, y_ld, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F)
                if packed:
                    fn, grid, threads, params, values = packed
                    return self._prepared(fn, grid, threads, 0, params, values, "int4 gemv", pdl=True)
            return lambda: self.linear(*args)
        packed = self._pack_gemv(args) if fp8 is None and self.gemv and rows <= GEMV_MAX_ROWS else ()
        if not packed:
            return lambda: self.linear(*args)
        fn, grid, params, values = packed
        return self._prepared(fn, grid, 32 * _GEMV_WARPS, 0, params, values, "gemv", pdl=True)

    def prepared_gather(self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int) -> Any:
        """:meth:`gather_rows` packed once and launched with ``cuLaunchKernel`` on this Dense's stream (a CuPy
        ``RawKernel`` launch costs about 4 us more host time); needs the GEMV's driver (``gemv`` True). Raises
        ValueError when it is off, and TypeError/ValueError naming an argument that is no int, out of range
        (``rows`` in ``[1, 2**31)``: one block each; strides and ``width`` in elements, ``[0, 2**40)``), NULL or
        misaligned (``src``, ``dst``: 2 bytes, their 16-bit elements; ``index``: 4, int32)."""
        if not self.gemv:
            raise ValueError("dense: the driver launch path is off (closed, or the GEMV is unavailable)")
        _int_arg("rows", rows, 1, 1 << 31)
        for name, value in (("src_ld", src_ld), ("dst_ld", dst_ld), ("width", width)):
            _int_arg(name, value, 0, _MAX_LD)
        for name, value, align in (("src", src, 2), ("index", index, 4), ("dst", dst, 2)):
            if not _int_arg(name, value, 0, _U64) or value % align:
                raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
        params, values = self._slots([src, index, dst, width, src_ld, dst_ld])
        return self._prepared(
            function_ptr(self._gather_fn), rows, 256, 0, params, values, "gather_rows16", grid_y=_column_blocks(width)
        )

    def prepared_kernel(
        self, fn: int, grid: tuple[int, int], block: int, smem: int, args: Sequence[int], name: str
    ) -> Callable[[], None]:
        """A launch of kernel ``fn`` (a ``CUfunction`` handle, e.g. a CuPy ``RawKernel``'s ``ptr``) on ``grid``
        (x, y) blocks of ``block`` threads with ``smem`` dynamic shared bytes, its arguments packed once: each a
        pointer or an integer, passed in an 8-byte slot (a 32-bit parameter reads its low 4 bytes: little-endian),
        so none may be a float. Calling the result launches it again on this Dense's stream (about a tenth of a
        CuPy kernel call's host time). Raises ValueError when the driver launch path is off and TypeError/ValueError
        naming an argument that is no int or outside ``[0, 2**64)`` (negative 32-bit values: pass them as their
        unsigned bits)."""
        if not self.gemv:
            raise ValueError("dense: the driver launch path is off (closed, or the GEMV is unavailable)")
        gx, gy = (_int_arg("grid", g, 1, 1 << 31) for g in grid)
        _int_arg("block", block, 1, 1025)
        _int_arg("smem", smem, 0, 1 << 31)
        params, values = self._slots([_int_arg(f"args[{i}]", a, 0, _U64) for i, a in enumerate(args)])
        return self._prepared(fn, gx, block, smem, params, values, name, grid_y=gy)

    def _slots(self, ints: list[int]) -> tuple[Any, Any]:
        """``(params, values)`` of a launch: each of ``ints`` in its own 8-byte slot of ``values`` (a 32-bit
        parameter reads its low 4 bytes: little-endian), ``params`` the kernel's array of pointers into them; at
        least one slot (cffi makes no empty array). ``values`` must be kept alive with ``params``."""
        ffi, count = self._driver_ffi, max(1, len(ints))
        values = ffi.new(f"uint64_t[{count}]", ints or [0])
        params = ffi.new(f"void*[{count}]", [values + i for i in range(count)])
        return params, values

    def _prepared(
        self,
        fn: int,
        grid: int,
        block: int,
        smem: int,
        params: Any,
        values: Any,
        name: str,
        pdl: bool = False,
        grid_y: int = 1,
    ) -> Any:
        """A launch of ``fn`` packed once. ``pdl``: the kernel waits for its predecessor itself
        (``griddep_wait`` in :mod:`~fi_engine.kernels.cuda_sources`), so it is launched with programmatic dependent
        launch where :attr:`pdl` allows it: it may start while the kernel before it drains, loading its weights. Where
        the driver has ``cuLaunchKernelEx`` every launch goes through it, its configuration packed here: a call then
        passes 4 arguments where ``cuLaunchKernel`` takes 11, each converted by cffi (about 1.5 us of host time a launch
        on the H100's host: benchmarks/RESULTS.md); the attribute only where ``pdl`` asks for it."""
        stream, null = self._stream, self._null
        if self._launch_ex is not None:
            ffi = self._driver_ffi
            config = ffi.new("CUlaunchConfig*")
            config.gridDimX, config.gridDimY, config.gridDimZ = grid, grid_y, 1
            config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
            config.sharedMemBytes, config.hStream = smem, stream
            attr = ffi.NULL
            if pdl and self.pdl:
                attr = ffi.new("CUlaunchAttribute*")
                attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
                attr.value[0] = 1  # programmaticStreamSerializationAllowed (an int, little-endian)
                config.attrs, config.numAttrs = attr, 1
            launch_ex = self._launch_ex

            def call_ex() -> None:
                if not self.gemv:  # closed: the module and its functions may be gone
                    raise ValueError("dense: closed (or the GEMV turned off); prepared launches refuse")
                err = launch_ex(config, fn, params, null)
                if err:
                    raise driver_error(err, f"cuLaunchKernelEx({name})")

            call_ex.keep = (values, attr, config)  # type: ignore[attr-defined]  # what params and config point into
            return call_ex
        launch = self._launch

        def call() -> None:
            if not self.gemv:  # closed: the module and its functions may be gone
                raise ValueError("dense: closed (or the GEMV turned off); prepared launches refuse")
            err = launch(fn, grid, grid_y, 1, block, 1, 1, smem, stream, params, null)
            if err:
                raise driver_error(err, f"cuLaunchKernel({name})")

        call.keep = values  # type: ignore[attr-defined]  # the argument array params points into
        return call

    def _pack_fused(self, key: tuple[Any, ...], checks_only: bool = False) -> tuple[Any, ...]:
        """Check one :meth:`fused_linear` call site and pack its kernel arguments once: ``(function, grid, shared
        bytes, params, values)``; at most 4096 kept, then the cache starts again. ``checks_only``: the checks and
        ``(function, grid, shared bytes, None, None)``, nothing packed or kept (the pairs variants pack their own)."""
        _check_fused_values(key)
        mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, _ = key
        if mode & _PAIRS and not checks_only:  # (an AssertionError below otherwise)
            raise ValueError(
                f"mode: expected NORM, ADD_NORM or SILU; the RoPE and SiLU epilogues are prepared_qkv_rope's and "
                f"prepared_gate_up_silu's, got {mode}"
            )
        fn = self._fused_fns.get((mode, ab_type, c_type))
        if fn is None:
            why = "compiled (closed, or NVRTC refused them)" if not self._fused_fns else "for these types"
            raise ValueError(f"ab_type, c_type: no fused GEMV {why} ({ab_type}, {c_type}, mode {mode})")
        if self._int4_weights and w in self._int4_weights:
            raise ValueError("w: the fused GEMVs read 16-bit or FP8 weights; this one is registered as int4")
        fp8 = self._fp8_weights.get(w) if self._fp8_weights else None
        if fp8 is not None:  # e4m3 weights: the same prologue before the FP8 GEMV (fp8_linear)
            if mode & _PAIRS:
                raise ValueError("w: the RoPE and SiLU epilogues read 16-bit weights; this one is registered as FP8")
            self._check_fp8_call(fp8, n, k, ab_type, c_type)
            fn = self._fp8.fused_fn(mode, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F, fp8.block is not None)
            if fn is None:
                raise ValueError(f"w: no fused GEMV over FP8 weights compiled ({self._fp8.fused_error or 'closed'})")
            if rows * k * 2 > self._fp8.fused_smem:
                raise ValueError(f"rows, k: the FP8 fused GEMV stages at most {self._fp8.fused_smem} bytes of input")
        pairs, mode = mode & _PAIRS, mode & ~_PAIRS
        if not self.fused_fits(rows, k):
            raise ValueError(f"rows, k: the fused GEMV does not serve {rows} rows of {k} (see fused_fits)")
        if fp8 is None:
            fn = fn[rows - 1]  # the 16-bit kernel of this many rows
        if not 0 < n < 1 << 31:
            raise ValueError(f"n: expected 1 to 2**31 - 1 output columns, got {n}")
        if rows > 1:  # rows closer than a row's width would overlap (one row never steps by its stride)
            widths = [("y_ld", y_ld, n)] + ([("h_ld", h_ld, k)] if mode != SILU else [])
            widths += [("x_ld", x_ld, 2 * k if mode == SILU else k)] if mode != NORM else []  # NORM reads no x
            for name, value, width in widths:
                if value < width:
                    raise ValueError(f"{name}: {value} elements between rows is less than a row's {width}")
        out_item = 4 if c_type == CUDA_R_32F else 2
        span_in = 2 * ((rows - 1) * h_ld + k)  # bytes of h's (and h_out's) rows
        x_width = 2 * k if mode == SILU else k
        span_x = 2 * ((rows - 1) * x_ld + x_width)
        span_y = out_item * ((rows - 1) * y_ld + n)
        checks = [("w", w, 16), ("y", y, out_item)]
        if mode == SILU:
            checks += [("x", x, 16), ("x_ld", 2 * x_ld, 16)]
        else:
            checks += [("h", h, 16), ("h_ld", 2 * h_ld, 16), ("norm_weight", norm_weight, 16)]
        if mode == ADD_NORM:
            checks += [("x", x, 16), ("x_ld", 2 * x_ld, 16), ("h_out", h_out, 16)]
        for name, value, align in checks:
            if value % align or (value == 0 and not name.endswith("_ld") and name != "h_out"):
                raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
        reads = [("x", x, span_x)] if mode != NORM else []
        if mode != SILU:
            reads.append(("h", h, span_in))
        ends = [*reads, ("w", w, (1 if fp8 is not None else 2) * n * k), ("y", y, span_y)]
        ends += [("norm_weight", norm_weight, 2 * k)] if mode != SILU else []
        ends += [("h_out", h_out, span_in)] if mode == ADD_NORM else []
        for name, base, span in ends:
            if base + span > _U64:
                raise ValueError(f"{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
        for name, base, span in reads:
            if _overlap(y, span_y, base, span):
                raise ValueError(f"y: overlaps {name} (the launch writes y while other blocks still read {name})")
            if mode == ADD_NORM and h_out and _overlap(h_out, span_in, base, span):
                raise ValueError(f"h_out: overlaps {name} (block 0 writes h_out while every block reads {name})")
        if mode == ADD_NORM and h_out and _overlap(h_out, span_in, y, span_y):
            raise ValueError("h_out: overlaps y")
        if checks_only:
            return (fn, None, rows * k * 2, None, None)
        assert not pairs
        args = _fused_args(key)
        grid = min((n + _FUSED_WARPS - 1) // _FUSED_WARPS, self._fused_grid)
        if fp8 is not None:  # its scales; two groups of 4 columns a block (csrc/fp8_fused.cu)
            args += [fp8.scales, *fp8.scale_args[:3]]
            grid = min((n + 7) // 8, self._fused_grid)
        params, values = self._slots(args)
        packed = (fn, grid, rows * k * 2, params, values)  # values: kept with params
        if len(self._fused_args) > 4096:
            self._fused_args.clear()
        self._fused_args[key] = packed
        return packed

    def has_qkv_rope(self, ab_type: int, d: int) -> bool:
        """Whether :meth:`prepared_qkv_rope` serves ``ab_type`` inputs and head dim ``d`` (its kernels compiled;
        the head dims FlashInfer's RoPE serves). TypeError naming ``ab_type`` or ``d`` when one is no int."""
        _int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        _int_arg("d", d, -(1 << 63), 1 << 63)
        return (ADD_NORM | _ROPE, ab_type, ab_type) in self._fused_fns and d in (64, 128, 256, 512)

    def prepared_qkv_rope(
        self,
        mode: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        h: int,
        h_ld: int,
        norm_weight: int,
        h_out: int,
        eps: float,
        rope: RopeAppend,
    ) -> Callable[[], None]:
        """The fused QKV GEMV of a decode step (``mode`` NORM or ADD_NORM, as :meth:`fused_linear`; 16-bit ``y =
        qkv [rows, (hq + 2 hk) d]``) with FlashInfer's ``apply_rope_pos_ids`` (in place, non-interleaved, every
        element rotated; Llama 3.1 scaling where ``rope.llama3``) and ``append_paged_kv_cache`` (NHD) of this step's
        k and v as its epilogue, checked and packed once (see :meth:`prepared_fused`): one launch for three. The
        result equals those launches' bit for bit (the GPU test checks it). Raises TypeError/ValueError naming an
        argument as :meth:`fused_linear` does, ``rope`` that is no :class:`RopeAppend` or one of its fields
        (``rope.<field>``) of the wrong type or range, a misaligned, NULL or overlapping cache or index array (the
        caches against y, h, x and h_out), or a shape the kernel does not serve."""
        _epilogue_mode(mode, "RoPE")
        rope_ints = _rope_ints(rope)
        n = (rope.hq + 2 * rope.hk) * rope.d
        key = (mode | _ROPE, rows, x, x_ld, w, n, k, y, y_ld, ab_type, ab_type, h, h_ld, norm_weight, h_out, eps)
        fn, grid, smem, _, _ = self._pack_fused(key, checks_only=True)
        areas = [("y", y, 2 * ((rows - 1) * y_ld + n)), ("h", h, 2 * ((rows - 1) * h_ld + k))]
        if mode == ADD_NORM:
            areas.append(("x", x, 2 * ((rows - 1) * x_ld + k)))
            if h_out:
                areas.append(("h_out", h_out, 2 * ((rows - 1) * h_ld + k)))
        _caches_apart(rope, areas)
        params, values = self._slots([*_fused_args(key), *rope_ints])
        grid = min((n // 2 + _FUSED_WARPS - 1) // _FUSED_WARPS, self._fused_grid)
        return self._prepared(fn, grid, 32 * _FUSED_WARPS, smem, params, values, "qkv gemv + rope + append", pdl=True)

    def has_gate_up_silu(self, ab_type: int) -> bool:
        """Whether :meth:`prepared_gate_up_silu` serves ``ab_type`` inputs (its kernels compiled). TypeError naming
        ``ab_type`` when it is no int."""
        _int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        return (ADD_NORM | _GATE_UP, ab_type, ab_type) in self._fused_fns

    def prepared_gate_up_silu(
        self,
        mode: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        h: int,
        h_ld: int,
        norm_weight: int,
        h_out: int,
        eps: float,
    ) -> Callable[[], None]:
        """The fused gate/up GEMV of a decode step (``mode`` NORM or ADD_NORM, as :meth:`fused_linear`; the 16-bit
        weight ``w [n, k]`` holds the ``n / 2`` gate rows, then the ``n / 2`` up rows) with FlashInfer's
        ``silu_and_mul`` as its epilogue, checked and packed once (see :meth:`prepared_fused`): ``y [rows, n / 2] =
        silu(g) * u`` (16-bit, row stride ``y_ld``), ``g`` and ``u`` the GEMV's columns ``j`` and ``n / 2 + j``
        rounded as its output is. One launch where the fused GEMV and ``silu_and_mul`` were two, and the down GEMV
        after it reads ``y`` as it is (no SiLU prologue recomputed in each of its blocks); the same values as those
        launches bit for bit (the GPU test checks them). Raises TypeError/ValueError naming an argument as
        :meth:`fused_linear` does (``y``'s extent: ``n / 2`` columns), an odd ``n``, or a weight registered as FP8
        (:meth:`prepared_fp8_silu` serves those)."""
        _epilogue_mode(mode, "SiLU")
        _int_arg("n", n, 2, 1 << 31)
        if n % 2:
            raise ValueError(f"n: the gate/up weight pairs its gate and up rows, an even count; got {n}")
        m = n // 2
        # the GEMV's checks over y's real extent (m columns); the weight's 2 m rows checked after
        key = (mode | _GATE_UP, rows, x, x_ld, w, m, k, y, y_ld, ab_type, ab_type, h, h_ld, norm_weight, h_out, eps)
        fn, _, smem, _, _ = self._pack_fused(key, checks_only=True)
        if w + 2 * n * k > _U64:
            raise ValueError(f"w: 0x{w:x} + {2 * n * k} bytes runs past the end of the address space")
        # (17 zero slots: the RoPE arguments, which the SiLU kernel reads none of)
        params, values = self._slots([*_fused_args(key, n), *[0] * 17])
        grid = min((m + _FUSED_WARPS - 1) // _FUSED_WARPS, self._fused_grid)
        return self._prepared(fn, grid, 32 * _FUSED_WARPS, smem, params, values, "gate/up gemv + silu", pdl=True)

    def has_router(self, ab_type: int) -> bool:
        """Whether :meth:`prepared_router` serves ``ab_type`` inputs (its kernels compiled). TypeError naming
        ``ab_type`` when it is no int."""
        _int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        return (ADD_NORM | _ROUTE, ab_type, CUDA_R_32F) in self._fused_fns

    def prepared_router(
        self,
        mode: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        logits: int,
        logits_ld: int,
        ab_type: int,
        h: int,
        h_ld: int,
        norm_weight: int,
        h_out: int,
        eps: float,
        route: RouterEpilogue,
    ) -> Callable[[], None]:
        """A MoE layer's router GEMV of a decode step (``mode`` NORM or ADD_NORM, as :meth:`fused_linear`; float32
        ``logits [rows, n]`` over ``n`` experts' ``[n, k]`` 16-bit router weight ``w``) with the routing as its
        epilogue, checked and packed once (see :meth:`prepared_fused`): the normalized rows also written to
        ``route.normed``, then each row's softmax top-``route.top_k`` experts and weights (as ``moe_route``), one
        launch where the norm, the router GEMV and the routing were three. The logits and the experts equal those
        launches' bit for bit; the weights are within a few float32 ulps (fast-math ``expf``; the GPU test checks
        both). Raises TypeError/ValueError naming an argument as :meth:`fused_linear` does, ``route`` that is no
        :class:`RouterEpilogue` or one of its fields (``route.<field>``) of the wrong type or range, misaligned,
        NULL or overlapping another operand, or a shape the kernel does not serve."""
        _epilogue_mode(mode, "routing")
        if not isinstance(route, RouterEpilogue):
            raise TypeError(f"route: expected a RouterEpilogue, got {type(route).__name__}")
        r = route
        _int_arg("route.top_k", r.top_k, 1, 65)
        if not isinstance(r.renormalize, bool):
            raise TypeError(f"route.renormalize: expected a bool, got {type(r.renormalize).__name__}")
        for name in ("normed", "experts", "weights", "done"):
            _int_arg(f"route.{name}", getattr(r, name), 0, _U64)
        _int_arg("route.normed_ld", r.normed_ld, 0, _MAX_LD)
        key = (mode, rows, x, x_ld, w, n, k, logits, logits_ld, ab_type, CUDA_R_32F, h, h_ld, norm_weight, h_out, eps)
        _check_fused_values(key)
        if self._fp8_weights and w in self._fp8_weights:
            raise ValueError("w: the routing epilogue reads 16-bit router weights; this one is registered as FP8")
        _, _, smem, _, _ = self._pack_fused(key, checks_only=True)  # the GEMV's own checks
        fns = self._fused_fns.get((mode | _ROUTE, ab_type, CUDA_R_32F))
        if fns is None:
            raise ValueError(f"ab_type: no router GEMV compiled for it ({ab_type}; see has_router)")
        fn = fns[rows - 1]  # (rows checked by the GEMV's checks above)
        if r.top_k > n:
            raise ValueError(f"route.top_k: expected at most n ({n}) experts, got {r.top_k}")
        if rows > 1 and r.normed_ld < k:
            raise ValueError(f"route.normed_ld: {r.normed_ld} elements between rows is less than a row's {k}")
        span_normed = 2 * ((rows - 1) * r.normed_ld + k)
        span_choice = 4 * rows * r.top_k
        aligned = [("normed", r.normed, 16), ("normed_ld", 2 * r.normed_ld, 16), ("experts", r.experts, 4)]
        aligned += [("weights", r.weights, 4), ("done", r.done, 4)]
        for name, value, align in aligned:
            if value % align or (value == 0 and name != "normed_ld"):
                raise ValueError(f"route.{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
        outs = [("normed", r.normed, span_normed), ("experts", r.experts, span_choice)]
        outs += [("weights", r.weights, span_choice), ("done", r.done, 4)]
        span_in = 2 * ((rows - 1) * h_ld + k)
        others = [("h", h, span_in), ("norm_weight", norm_weight, 2 * k), ("w", w, 2 * n * k)]
        others += [("logits", logits, 4 * ((rows - 1) * logits_ld + n))]
        if mode == ADD_NORM:
            others.append(("x", x, 2 * ((rows - 1) * x_ld + k)))
            if h_out:
                others.append(("h_out", h_out, span_in))
        for i, (name, base, span) in enumerate(outs):
            if base + span > _U64:
                raise ValueError(f"route.{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
            for other, obase, ospan in others + [(f"route.{o}", b, n_) for o, b, n_ in outs[:i]]:
                if _overlap(base, span, obase, ospan):
                    raise ValueError(
                        f"route.{name}: overlaps {other} (the launch writes it while reading or writing that)"
                    )
        ints = [*_fused_args(key), r.normed, r.normed_ld, r.top_k, int(r.renormalize), r.experts, r.weights, r.done]
        params, values = self._slots(ints)
        grid = min((n + _FUSED_WARPS - 1) // _FUSED_WARPS, self._fused_grid)
        return self._prepared(fn, grid, 32 * _FUSED_WARPS, smem, params, values, "router gemv + routing", pdl=True)

    @property
    def lt(self) -> bool:
        """Whether :meth:`linear` goes through cuBLASLt (cached algorithms); False: ``cublasGemmEx``. Settable (a
        benchmark compares the two); cuBLASLt that could not be loaded stays off."""
        return self._lt_shape is not None

    @lt.setter
    def lt(self, on: bool) -> None:
        self._lt_shape = self._lt.shape if on and self._lt is not None else None

    def linear(
        self,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool = False,
    ) -> None:
        """``y[:rows, :n] = x[:rows, :k] @ w.T`` with ``w`` a row-major ``[n, k]`` matrix (a PyTorch-style
        Linear weight); pointers as ints, leading dimensions (row strides) in elements; ``ab_type``/``c_type``:
        cudaDataType_t of x and w / of y. Accumulates in float32 (as torch's float16/bfloat16 matmul).
        ``accumulate``: ``y += x @ w.T`` (y's old values join the float32 sum). A ``w`` registered with
        :meth:`add_fp8_weight` is read as e4m3 times its scales, one registered with :meth:`add_int4_weight` as int4."""
        if self._fp8_weights:  # empty unless FP8 weights were registered: one truth test on the 16-bit path
            fp8 = self._fp8_weights.get(w)
            if fp8 is not None:
                self._fp8_linear(rows, x, x_ld, fp8, n, k, y, y_ld, ab_type, c_type, accumulate)
                return
        if self._int4_weights:  # (the same for int4 weights)
            int4 = self._int4_weights.get(w)
            if int4 is not None:
                self._int4_linear(rows, x, x_ld, int4, n, k, y, y_ld, ab_type, c_type, accumulate)
                return
        if self.gemv and not accumulate and rows <= SKINNY_MAX_ROWS:
            key = (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
            # eagerly the GEMV serves every shape it takes, for its lower host time; a GPU-bound step the fastest
            choice = self._choices.get((rows, n, k, ab_type, c_type, 0)) if self.bandwidth_bound else None
            if choice is None:
                choice = self._choice(key, 0) if self.bandwidth_bound else _GEMV if rows <= GEMV_MAX_ROWS else _LT
            if choice == _GEMV and self._run_gemv(key):
                return
            if choice >= 0 and self._run_skinny(key, choice, None):
                return
        self._gemm16((rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type), accumulate)

    def _gemm16(self, key: tuple[int, ...], accumulate: bool = False) -> None:
        """cuBLASLt (or ``cublasGemmEx``) for :meth:`linear`'s call ``key`` over a 16-bit weight."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        # Column-major view: y^T (n x rows, ld y_ld) = op_T(w as k x n, ld k) . x^T (k x rows, ld x_ld).
        shape = self._lt_shape
        if shape is not None:
            entry = shape(rows, n, k, x_ld, y_ld, ab_type, c_type)
            if entry is not None:
                status = self._lt(entry, x, w, y, accumulate)
                if status:
                    raise CublasError("cublasLtMatmul", status, status_name(status))
                return
        status = self._gemm(
            self._h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n,
            rows,
            k,
            self._one,
            w,
            ab_type,
            k,
            x,
            ab_type,
            x_ld,
            self._one if accumulate else self._zero,
            y,
            c_type,
            y_ld,
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        )
        if status:
            raise CublasError("cublasGemmEx", status, status_name(status))

    def add_fp8_weight(self, w: int, n: int, k: int, scales: int, block: tuple[int, int] | None) -> None:
        """Serve the e4m3 weight ``[n, k]`` (row-major, one byte each) at device address ``w`` with its float32
        ``scales`` (``block`` None: one per output row, ``[n]``; ``(bn, bk)``: one per block, ``[ceil(n / bn),
        ceil(k / bk)]`` row-major): from now on :meth:`linear` (and :meth:`prepared_linear`) with this ``w`` compute
        ``x @ (e4m3(w) * scale).T`` (:mod:`~fi_engine.kernels.fp8_linear`: a GEMV reading the bytes for at most 8 rows,
        else cuBLASLt's FP8 GEMM over activations quantized to e4m3 (:attr:`fp8_w8a8`), else the weight
        dequantized into a 16-bit scratch matrix and the 16-bit GEMM). Call it while loading, not
        during a step (the scratch may grow); the weight must stay allocated until :meth:`remove_fp8_weight` or
        :meth:`close`. ValueError naming a bad argument; RuntimeError where the driver launch path is off."""
        if not self.gemv:
            raise RuntimeError(f"FP8 weights need the engine's own GEMV kernels, which are off: {self.gemv_error}")
        if self._fp8 is None:
            from .fp8_linear import Fp8Linears

            self._fp8 = Fp8Linears(self._launch, self._driver_ffi, self._stream)
        self._fp8.add(w, n, k, scales, block, self._fused_smem if self._fused_fns else 0)
        self._fp8_weights = self._fp8.weights
        self._forget_launches()

    def remove_fp8_weight(self, w: int) -> None:
        """Undo :meth:`add_fp8_weight` for ``w`` (before freeing it); unknown addresses: nothing happens."""
        if self._fp8 is not None:
            self._fp8.remove(w)
        self._forget_launches()

    @property
    def serves_fp8(self) -> bool:
        """Whether any weight was registered with :meth:`add_fp8_weight`."""
        return bool(self._fp8_weights)

    def has_fp8_weight(self, w: int) -> bool:
        """Whether the weight at device address ``w`` is registered as FP8 (:meth:`add_fp8_weight`)."""
        return w in self._fp8_weights

    fp8_w8a8 = True
    """Whether linears of FP8 weights over more than :attr:`fp8_gemv_max_rows` rows quantize their activations to e4m3
    and run cuBLASLt's FP8 tensor-core GEMM (W8A8, :mod:`~fi_engine.kernels.fp8_linear`); False: the FP8 GEMV up to 8
    rows,
    else the weight dequantized to 16 bits and the 16-bit GEMM (W8A16, slower: 5 bytes read per weight). A class
    attribute; set it on an instance to override."""

    fp8_w8a8_blocks = True
    """Whether :attr:`fp8_w8a8` serves 128x128-block weights too (per-tensor and per-channel ones: always); False:
    those weights take the dequantizing path above :attr:`fp8_gemv_max_rows` rows."""

    fp8_gemv_max_rows = 8
    """Linears of FP8 weights over at most this many rows run the FP8 GEMV (W8A16); more rows run the FP8 GEMM
    (:attr:`fp8_w8a8`) where cuBLASLt serves the call, else the GEMV up to ``FP8_GEMV_MAX_ROWS`` rows. 8: the GEMV
    runs on tensor cores from 3 rows (``Fp8Linears.tensor_core_rows``), and on an H100 (8B shape, 128x128 blocks,
    decode graph, one run) it beat the FP8 GEMM at 4 rows (914.8 against 831.8 tokens/s) and 8 (1,791.5 against
    1,636.1), and tied at 1 and 2 (cuBLASLt takes no block-scaled call of 1 or 2 rows). It was 2 while the GEMV
    widened each weight per group of rows, which made it compute-bound from 4 rows. A class attribute, read when a
    call is made or a step packed."""

    fp8_fused = False
    """Whether the fused decode step runs over FP8 weights (``csrc/fp8_fused.cu``'s kernels, which
    :meth:`fused_linear` serves either way): off, since on an H100 its one-row graph ran slower than separate
    launches over the plain FP8 GEMV (8B shape: 4.57 against 4.00 ms per step; benchmarks/RESULTS.md). Read
    when a step is packed; set it on the class to compare."""

    fp8_epilogues = True
    """Whether the fused decode step runs over FP8 weights with its GEMVs' pairwise epilogues where
    :attr:`fp8_fused` is off (:meth:`prepared_fp8_silu`, :meth:`prepared_fp8_qkv_rope`: SiLU in the gate/up GEMV,
    RoPE and the KV append in the QKV GEMV, the norms as launches of their own); False: the FP8 decode step as
    separate launches. Read when a step is packed; set it on the class to compare."""

    @property
    def fuses_fp8(self) -> bool:
        """Whether the fused decode step serves the registered FP8 weights (:attr:`fp8_fused` and their fused
        kernels compiled, or :attr:`fp8_epilogues` and the epilogue GEMVs compiled); True where there is none."""
        if not self._fp8_weights:
            return True
        if self._fp8 is None:
            return False
        if self.fp8_fused:
            return bool(self._fp8.fused_fn(NORM, True, False, False))
        return self.fp8_epilogues and self._fp8.pair_fn(PAIR_SILU, True, False, 1) is not None

    def prepared_fp8_silu(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int
    ) -> Callable[[], None]:
        """A decode step's gate/up GEMV over the FP8 weight ``w`` (registered, ``[2 m, k]``: the gate rows, then the
        up rows) with FlashInfer's ``silu_and_mul`` as its epilogue, checked and packed once (see
        :meth:`prepared_fused`): ``y [rows, m] = silu(g) * u`` (16-bit, row stride ``y_ld``), ``g`` and ``u`` the
        16-bit outputs of ``x [rows, k] @ w.T`` (row stride ``x_ld``), each rounded as :meth:`linear` rounds them:
        one launch for two, the same values as the FP8 GEMV then ``silu_and_mul`` (the GPU test checks them).
        ``rows`` 1 to 4. Raises TypeError/ValueError naming an argument that is no int or out of range, a weight
        not registered as FP8 or of another shape, a misaligned ``x`` (16 bytes, and its row stride) or ``y`` (2),
        or ``y`` overlapping ``x``."""
        return self._prepared_pairs(PAIR_SILU, rows, x, x_ld, w, k, y, y_ld, ab_type, None)

    def prepared_fp8_qkv_rope(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int, rope: RopeAppend
    ) -> Callable[[], None]:
        """A decode step's QKV GEMV over the FP8 weight ``w`` (registered, ``[(hq + 2 hk) d, k]``) into 16-bit ``y =
        qkv [rows, (hq + 2 hk) d]`` with FlashInfer's ``apply_rope_pos_ids`` and ``append_paged_kv_cache`` as its
        epilogue (as :meth:`prepared_qkv_rope`'s, over the normalized rows ``x`` the launch before wrote), checked
        and packed once: one launch for three, the same values as the FP8 GEMV then those two (the GPU test checks
        them). ``rows`` 1 to 4. Raises as :meth:`prepared_fp8_silu` does, and for ``rope`` as
        :meth:`prepared_qkv_rope` does (its caches against ``x`` and ``y``)."""
        return self._prepared_pairs(PAIR_ROPE, rows, x, x_ld, w, k, y, y_ld, ab_type, rope)

    def _prepared_pairs(
        self, epi: int, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int, rope: Any
    ) -> Callable[[], None]:
        """:meth:`prepared_fp8_silu` (``epi`` PAIR_SILU, ``rope`` None) or :meth:`prepared_fp8_qkv_rope`."""
        what = "the SiLU" if epi == PAIR_SILU else "the RoPE"
        _int_arg("rows", rows, 1, PAIR_MAX_ROWS + 1)
        _int_arg("k", k, 1, 1 << 31)
        for name, value in (("x", x), ("w", w), ("y", y)):
            _int_arg(name, value, 0, _U64)
        for name, value in (("x_ld", x_ld), ("y_ld", y_ld)):
            _int_arg(name, value, 0, _MAX_LD)
        _int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        rope_ints = _rope_ints(rope) if epi == PAIR_ROPE else [0] * 17  # (the SiLU kernel reads none of them)
        fp8 = self._fp8_weights.get(w)
        if fp8 is None:
            raise ValueError(f"w: 0x{w:x} is no registered FP8 weight (add_fp8_weight); {what} GEMV reads e4m3")
        n = fp8.n if epi == PAIR_SILU else (rope.hq + 2 * rope.hk) * rope.d
        if epi == PAIR_SILU and fp8.n % 2:
            raise ValueError(f"w: the gate/up weight has {fp8.n} rows; the SiLU pairs gate and up rows, an even count")
        self._check_fp8_call(fp8, n, k, ab_type, ab_type)
        out = fp8.n // 2 if epi == PAIR_SILU else n  # y's width
        pairs = out // 2 if epi == PAIR_ROPE else out
        launch = None if not self.gemv else self._fp8.pair_launch(epi, ab_type == CUDA_R_16BF, fp8, rows, pairs)
        if launch is None:
            raise ValueError(f"w: no FP8 GEMV with {what} epilogue compiled ({self._fp8.fused_error or 'closed'})")
        span_x, span_y = _check_epilogue_io(rows, x, x_ld, k, y, y_ld, out)
        if epi == PAIR_ROPE:
            _caches_apart(rope, [("y", y, span_y), ("x", x, span_x)])
        s_ld, bn, shift, _ = fp8.scale_args
        ints = [x, w, y, rows, pairs, k, x_ld, y_ld, fp8.scales, s_ld, bn, shift, *rope_ints]
        params, values = self._slots(ints)
        name = "fp8 gate/up gemv + silu" if epi == PAIR_SILU else "fp8 qkv gemv + rope + append"
        fn, grid, threads = launch
        return self._prepared(fn, grid, threads, 0, params, values, name, pdl=True)

    @staticmethod
    def _check_fp8_call(fp8: Any, n: int, k: int, ab_type: int, c_type: int) -> None:
        Dense._check_quantized_call(fp8, "FP8", n, k, ab_type, c_type)

    @staticmethod
    def _check_quantized_call(wt: Any, kind: str, n: int, k: int, ab_type: int, c_type: int) -> None:
        """ValueError where a call over the registered ``kind`` weight ``wt`` (FP8, int4) gives other shapes or
        types than it serves."""
        if (n, k) != (wt.n, wt.k):
            raise ValueError(f"n, k: the {kind} weight at 0x{wt.w:x} is [{wt.n}, {wt.k}], the call says [{n}, {k}]")
        if ab_type not in (CUDA_R_16BF, CUDA_R_16F) or c_type not in (ab_type, CUDA_R_32F):
            raise ValueError(
                f"ab_type, c_type: {kind} weights take bfloat16 or float16 activations and give the same type or "
                f"float32, got cudaDataType {ab_type} -> {c_type}"
            )

    def _fp8_linear(
        self,
        rows: int,
        x: int,
        x_ld: int,
        fp8: Any,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool,
    ) -> None:
        """:meth:`linear` of a registered FP8 weight: in a GPU-bound step of at most 32 rows the skinny GEMM where it
        was timed faster (:meth:`_choice`); else the FP8 GEMV for at most :attr:`fp8_gemv_max_rows` rows, else the
        FP8 GEMM (:attr:`fp8_w8a8`) where cuBLASLt serves it, else the GEMV up to 8 rows, else dequantize + 16-bit
        GEMM."""
        self._check_fp8_call(fp8, n, k, ab_type, c_type)
        if not accumulate and self._skinny_quantized(rows, x, x_ld, fp8, n, k, y, y_ld, ab_type, c_type):
            return
        self._fp8_path(rows, x, x_ld, fp8, n, k, y, y_ld, ab_type, c_type, accumulate)

    def _fp8_path(
        self,
        rows: int,
        x: int,
        x_ld: int,
        fp8: Any,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool,
    ) -> None:
        """:meth:`_fp8_linear` but the skinny GEMM: the FP8 GEMV, the FP8 GEMM or dequantize + 16-bit GEMM."""
        bf16 = ab_type == CUDA_R_16BF
        gemv = 0 < rows <= FP8_GEMV_MAX_ROWS and not accumulate
        if gemv and rows <= self.fp8_gemv_max_rows and self._fp8_gemv(rows, x, x_ld, fp8, y, y_ld, bf16, c_type):
            return
        if self.fp8_w8a8 and self._fp8.w8a8(
            self._lt, rows, x, x_ld, fp8, y, y_ld, bf16, c_type, accumulate, self._null, self.fp8_w8a8_blocks
        ):  # the FP8 tensor-core GEMM over activations quantized on the fly
            return
        if gemv and self._fp8_gemv(rows, x, x_ld, fp8, y, y_ld, bf16, c_type):
            return
        weight = self._fp8.dequantize(fp8, bf16, self._null)
        self._scratch_gemm(rows, x, x_ld, weight, n, k, y, y_ld, ab_type, c_type, accumulate)

    def _scratch_gemm(
        self,
        rows: int,
        x: int,
        x_ld: int,
        weight: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool,
    ) -> None:
        """:meth:`linear` over a quantized weight dequantized into the 16-bit scratch at ``weight``: the 16-bit GEMM
        (cuBLASLt / cuBLAS), never the GEMV, which reads the weight once per few rows."""
        on, self.gemv = self.gemv, False
        try:
            self.linear(rows, x, x_ld, weight, n, k, y, y_ld, ab_type, c_type, accumulate)
        finally:
            self.gemv = on

    def add_int4_weight(self, w: int, n: int, k: int, records: int, group_size: int, interleaved: bool = False) -> None:
        """Serve the int4 weight ``[n, k]`` at device address ``w`` in the int4 GEMV's layout (``[n, k / 2]`` bytes
        with its uint32 ``records`` ``[n, k / group_size]``: :meth:`~fi_engine.checkpoint.int4_weights.Int4Matrix.
        gemv_layout`): from now on :meth:`linear` (and :meth:`prepared_linear`) with this ``w`` compute ``x @
        ((code - zero) * scale).T`` (:mod:`~fi_engine.kernels.int4_linear`: a GEMV reading the codes for at most
        :attr:`int4_gemv_max_rows` rows, else the weight dequantized into a 16-bit scratch and the 16-bit GEMM).
        ``n`` and ``k`` as the calls pass them. ``interleaved``: gate and up stacked interleaved by 8 rows
        (``Int4Weight.half_n``; the outputs still come in order, gate's then up's), which
        :meth:`prepared_int4_silu` serves. Register before any step (the scratch may grow); the weight must stay
        allocated until :meth:`remove_int4_weight` or :meth:`close`. ValueError naming a bad argument (see
        ``Int4Linears.add``); RuntimeError where the GPU cannot run the GEMV."""
        if self._int4 is None:
            from .int4_linear import Int4Linears

            self._int4 = Int4Linears(self._launch, self._driver_ffi, self._stream)
        self._int4.add(w, n, k, records, group_size, interleaved)
        self._int4_weights = self._int4.weights
        self._forget_launches()

    def remove_int4_weight(self, w: int) -> None:
        """Undo :meth:`add_int4_weight` for ``w`` (before freeing it); unknown addresses: nothing happens."""
        if self._int4 is not None:
            self._int4.remove(w)
        self._forget_launches()

    def _forget_launches(self) -> None:
        """Drop the timed choices and packed skinny launches (keyed by addresses and shapes): a quantized weight
        registered or removed changes what a call at those addresses reads (a 16-bit weight allocated where an FP8
        one was must not be read as e4m3). Registrations happen at load, so the next step times its shapes again."""
        self._choices.clear()
        self._skinny_calls.clear()

    @property
    def serves_int4(self) -> bool:
        """Whether any weight was registered with :meth:`add_int4_weight`."""
        return bool(self._int4_weights)

    def has_int4_weight(self, w: int) -> bool:
        """Whether the weight at device address ``w`` is registered as int4 (:meth:`add_int4_weight`)."""
        return w in self._int4_weights

    def has_int4_silu(self, w: int) -> bool:
        """Whether :meth:`prepared_int4_silu` serves ``w``: an int4 gate/up weight registered ``interleaved``."""
        wt = self._int4_weights.get(w)
        return wt is not None and wt.half_n > 0 and self.gemv

    def prepared_int4_silu(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int
    ) -> Callable[[], None]:
        """A decode step's gate/up GEMV over the int4 weight ``w`` (registered ``interleaved``, ``[2 m, k]``) with
        FlashInfer's ``silu_and_mul`` as its epilogue, checked and packed once: ``y [rows, m] = silu(g) * u``
        (16-bit, row stride ``y_ld``), ``g`` and ``u`` the 16-bit outputs of ``x [rows, k] @ w.T`` (row stride
        ``x_ld``) as :meth:`linear` rounds them: one launch for two. ``rows`` 1 to 32. Raises TypeError/ValueError
        naming an argument that is no int or out of range, a weight not registered so or of another ``k``, a
        misaligned ``x`` (16 bytes, and its row stride) or ``y`` (2), or ``y`` overlapping ``x``."""
        _int_arg("rows", rows, 1, INT4_GEMV_MAX_ROWS + 1)
        _int_arg("k", k, 1, 1 << 31)
        for name, value in (("x", x), ("w", w), ("y", y)):
            _int_arg(name, value, 0, _U64)
        for name, value in (("x_ld", x_ld), ("y_ld", y_ld)):
            _int_arg(name, value, 0, _MAX_LD)
        _int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        wt = self._int4_weights.get(w)
        if wt is None or not wt.half_n:
            raise ValueError(f"w: 0x{w:x} is no int4 weight registered interleaved (add_int4_weight)")
        self._check_quantized_call(wt, "int4", wt.n, k, ab_type, ab_type)
        out = wt.half_n
        _check_epilogue_io(rows, x, x_ld, k, y, y_ld, out)
        if not self.gemv:
            raise ValueError("dense: the driver launch path is off (closed, or the GEMV is unavailable)")
        fn, grid, threads, params, values = self._int4.gemv(
            rows, x, x_ld, wt, y, y_ld, ab_type == CUDA_R_16BF, False, silu=True
        )
        return self._prepared(fn, grid, threads, 0, params, values, "int4 gate/up gemv + silu", pdl=True)

    int4_gemv_max_rows = INT4_GEMV_MAX_ROWS
    """Linears of int4 weights over at most this many rows (and no ``accumulate``) run the int4 GEMV, reading the
    codes as stored; more rows dequantize the weight into a 16-bit scratch matrix and run the 16-bit GEMM. Read at
    each call and when a call site is packed."""

    def _int4_linear(
        self,
        rows: int,
        x: int,
        x_ld: int,
        int4: Any,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool,
    ) -> None:
        """:meth:`linear` of a registered int4 weight: in a GPU-bound step of at most 32 rows the skinny GEMM where it
        was timed faster (:meth:`_choice`); else :meth:`_int4_path`."""
        self._check_quantized_call(int4, "int4", n, k, ab_type, c_type)
        if not accumulate and self._skinny_quantized(rows, x, x_ld, int4, n, k, y, y_ld, ab_type, c_type):
            return
        self._int4_path(rows, x, x_ld, int4, n, k, y, y_ld, ab_type, c_type, accumulate)

    def _int4_path(
        self,
        rows: int,
        x: int,
        x_ld: int,
        int4: Any,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        c_type: int,
        accumulate: bool,
    ) -> None:
        """The int4 GEMV for at most :attr:`int4_gemv_max_rows` rows, else dequantize + 16-bit GEMM."""
        bf16 = ab_type == CUDA_R_16BF
        if not accumulate and rows <= min(INT4_GEMV_MAX_ROWS, self.int4_gemv_max_rows) and self.gemv:
            packed = self._int4.gemv(rows, x, x_ld, int4, y, y_ld, bf16, c_type == CUDA_R_32F)
            if packed:
                self._int4.run_gemv(packed, self._null)
                return
        weight = self._int4.dequantize(int4, bf16, self._null)
        self._scratch_gemm(rows, x, x_ld, weight, n, k, y, y_ld, ab_type, c_type, accumulate)

    def _fp8_gemv(self, rows: int, x: int, x_ld: int, fp8: Any, y: int, y_ld: int, bf16: bool, c_type: int) -> bool:
        """The FP8 GEMV of at most 8 rows launched; False where it cannot serve the call (nothing launched)."""
        packed = self._fp8.gemv(rows, x, x_ld, fp8, y, y_ld, bf16, c_type == CUDA_R_32F)
        if packed:
            self._fp8.run_gemv(packed, self._null)
        return bool(packed)

    skinny = True
    """Whether GPU-bound steps of up to 32 rows may take the skinny GEMM (:mod:`~fi_engine.kernels.skinny_gemm`)
    where it is timed faster than the other launches of the shape; False: the GEMV (up to 4 rows), cuBLASLt and
    the FP8 paths only. Read when a shape is first timed; set it on the class to compare
    (``benchmarks/bench_llama_tp.py --variants no-skinny``)."""

    def _choice(self, key: tuple[int, ...], quant_w: int) -> int:
        """Which launch serves the shape of the call ``key`` (:meth:`linear`'s arguments; ``quant_w``: the FP8 or int4
        weight's address, 0 for a 16-bit one) in GPU-bound steps: ``_GEMV``, ``_LT`` (cuBLASLt, or the FP8 or int4
        paths of :meth:`_fp8_path` and :meth:`_int4_path`) or the index of a skinny plan, the fastest on the device,
        timed once per shape on the call's own buffers (y is overwritten by the call that asked): best of 3 each after
        a first run, L2 flushed before every run so each reads its weight from HBM, as a decode step does. A capture
        cannot time (no synchronization is allowed in it): a shape first met there takes :func:`gemv_bound`'s rule,
        the GEMV or the rest; the engine warms its step up eagerly before capturing it, so none is."""
        import cupy

        rows, x, x_ld, _, n, k, y, y_ld, ab_type, c_type = key
        fp8 = self._fp8_weights.get(quant_w) if quant_w else None
        int4 = self._int4_weights.get(quant_w) if quant_w and fp8 is None else None
        quant = fp8 if fp8 is not None else int4
        if cupy.cuda.runtime.streamIsCapturing(self._stream) or (quant is None and self._lt_shape is None):
            return _GEMV if quant is None and rows <= GEMV_MAX_ROWS and gemv_bound(rows, n, k) else _LT
        runs: dict[int, Callable[[], object]] = {}
        if quant is None and rows <= GEMV_MAX_ROWS and (self._gemv_args.get(key) or self._pack_gemv(key)):
            runs[_GEMV] = lambda: self._run_gemv(key)
        for i in range(len(self._skinny_plans(key, quant))):
            runs[i] = lambda i=i: self._run_skinny(key, i, quant)  # type: ignore[misc]
        if fp8 is not None:
            runs[_LT] = lambda: self._fp8_path(rows, x, x_ld, fp8, n, k, y, y_ld, ab_type, c_type, False)
        elif int4 is not None:
            runs[_LT] = lambda: self._int4_path(rows, x, x_ld, int4, n, k, y, y_ld, ab_type, c_type, False)
        else:
            runs[_LT] = lambda: self._gemm16(key)
        choice = self._choices[(rows, n, k, ab_type, c_type, quant_w)] = self._fastest(runs)
        return choice

    def _skinny_quantized(
        self, rows: int, x: int, x_ld: int, quant: Any, n: int, k: int, y: int, y_ld: int, ab_type: int, c_type: int
    ) -> bool:
        """Launch the skinny GEMM over the registered FP8 or int4 weight ``quant`` where a GPU-bound step of at most
        32 rows timed it faster than the format's own path (:meth:`_choice`); False where it does not serve the call."""
        if not (self.bandwidth_bound and self.gemv and 0 < rows <= SKINNY_MAX_ROWS):
            return False
        key = (rows, x, x_ld, quant.w, n, k, y, y_ld, ab_type, c_type)
        choice = self._choices.get((rows, n, k, ab_type, c_type, quant.w))
        if choice is None:
            choice = self._choice(key, quant.w)
        return choice >= 0 and self._run_skinny(key, choice, quant)

    def _fastest(self, runs: Mapping[int, Callable[[], object]]) -> int:
        """The key of the fastest of ``runs`` on the device (see :meth:`_choice`); the only one without timing."""
        if len(runs) == 1:
            return next(iter(runs))
        import cupy

        if self._flush is None:
            self._flush = cupy.empty(64 << 20, cupy.uint8)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        record = cupy.cuda.runtime.eventRecord
        best: dict[int, float] = {}
        for label, run in runs.items():
            times = []
            for _ in range(4):
                cupy.cuda.runtime.memsetAsync(self._flush.data.ptr, 0, self._flush.nbytes, self._stream)
                record(start.ptr, self._stream)
                run()
                record(end.ptr, self._stream)
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end))
            best[label] = min(times[1:])  # the first run loads code and picks cuBLASLt's algorithm
        return min(best, key=best.__getitem__)

    def _run_gemv(self, key: tuple[int, ...]) -> bool:
        """Launch the GEMV of :meth:`linear`'s call ``key`` (up to 4 rows); False where it does not take the call."""
        packed = self._gemv_args.get(key)
        if packed is None:
            packed = self._pack_gemv(key)
        if not packed:
            return False
        fn, grid, params, _ = packed
        err = self._launch(fn, grid, 1, 1, 32 * _GEMV_WARPS, 1, 1, 0, self._stream, params, self._null)
        if err:
            raise driver_error(err, f"cuLaunchKernel(gemv, rows={key[0]}, n={key[4]}, k={key[5]})")
        return True

    def _skinny_plans(self, key: tuple[int, ...], quant: Any) -> list[SkinnyPlan]:
        """The skinny GEMM's launches for :meth:`linear`'s call ``key`` over a 16-bit weight (``quant`` None) or the
        registered FP8 or int4 weight ``quant`` (``[]`` where it does not serve the call, or :attr:`skinny` is off).
        Makes the SkinnyGemm at the first call; a GPU or NVRTC it cannot serve leaves it off (:attr:`skinny_error`)."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        if not self.skinny or ab_type not in (CUDA_R_16BF, CUDA_R_16F) or c_type not in (ab_type, CUDA_R_32F):
            return []
        if self._skinny is None:
            try:
                from .skinny_gemm import SkinnyGemm

                self._skinny = SkinnyGemm()
            except Exception as exc:  # NVRTC or the device refusing: the other launches serve every shape
                self._skinny, self.skinny_error = False, f"{type(exc).__name__}: {exc}"
        if not self._skinny:
            return []
        bf16, f32 = ab_type == CUDA_R_16BF, c_type == CUDA_R_32F
        if quant is None:
            return self._skinny.plans(W16, rows, x, x_ld, w, n, k, y, y_ld, bf16, f32)
        if isinstance(quant, Int4Weight):
            q = (quant.records, quant.groups, quant.gshift, quant.half_n)
            return self._skinny.plans(INT4, rows, x, x_ld, quant.w, n, k, y, y_ld, bf16, f32, int4=q)
        fmt = E4M3_ROW if quant.block is None else E4M3_BLOCK
        s_ld = -(-quant.k // quant.block[1]) if quant.block else 0
        return self._skinny.plans(
            fmt, rows, x, x_ld, quant.w, n, k, y, y_ld, bf16, f32, quant.scales, s_ld, quant.block
        )

    skinny_error = ""
    """Why the skinny GEMM is unavailable, where it is."""

    def _run_skinny(self, key: tuple[int, ...], index: int, quant: Any) -> bool:
        """Launch skinny plan ``index`` of :meth:`linear`'s call ``key`` (over the FP8 or int4 weight ``quant``, or a
        16-bit one), packed once per call (values only; at most 4096 kept) and launched with programmatic dependent
        launch; False where the call has no such plan (a shape timed on aligned buffers, called on others)."""
        packed = self._skinny_calls.get((key, index))
        if packed is None:
            plans = self._skinny_plans(key, quant)
            if index >= len(plans):
                return False
            plan = plans[index]
            params, values = self._slots(list(plan.args))
            packed = self._prepared(
                plan.function, plan.grid[0], plan.threads, plan.smem, params, values, "skinny gemm", True, plan.grid[1]
            )
            if len(self._skinny_calls) > 4096:
                self._skinny_calls.clear()
            self._skinny_calls[(key, index)] = packed
        packed()
        return True

    def _pack_gemv(self, key: tuple[int, ...]) -> tuple[Any, ...]:
        """The GEMV launch of one :meth:`linear` call, its kernel arguments packed once: ``(function, grid,
        params, values)`` (``params``: the ``void*[8]`` of argument addresses into ``values``, the ``uint64_t[8]``
        that must live as long as it), or ``()`` where the GEMV does not apply (a dtype pair it lacks, k not a
        multiple of 8, x, w or x's rows not 16-byte aligned). Keyed by the call's ints only (values, no caller
        object); at most 4096 kept, then the cache starts again."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        fns = self._gemv_fns.get((ab_type, c_type))
        fn = fns[rows - 1] if fns is not None and 0 < rows <= GEMV_MAX_ROWS else None
        item = 4 if c_type == CUDA_R_32F else 2
        if fn is not None and y % item:  # the kernel stores one element at a time: each must be aligned
            raise ValueError(
                f"y: 0x{y:x} must be aligned to {item} bytes (its {'float32' if item == 4 else '16-bit'} elements)"
            )
        packed: tuple[Any, ...] = ()
        if fn is not None and k % 8 == 0 and x_ld % 8 == 0 and x % 16 == 0 and w % 16 == 0 and 0 < n < 1 << 31:
            params, values = self._slots([x, w, y, rows, n, k, x_ld, y_ld])
            packed = (fn, (n + _GEMV_WARPS - 1) // _GEMV_WARPS, params, values)  # values: kept with params
        if len(self._gemv_args) > 4096:
            self._gemv_args.clear()
        self._gemv_args[key] = packed
        return packed

    def batched_linear(
        self,
        batch: int,
        rows: int,
        x: int,
        x_ld: int,
        x_stride: int,
        w: int,
        n: int,
        k: int,
        w_stride: int,
        y: int,
        y_ld: int,
        y_stride: int,
        ab_type: int,
        c_type: int,
    ) -> None:
        """``batch`` independent :meth:`linear` products: ``y_b = x_b @ w_b.T`` for ``b < batch`` where ``x_b``,
        ``w_b`` (row-major ``[n, k]``) and ``y_b`` start ``b * x_stride``, ``b * w_stride``, ``b * y_stride``
        elements after ``x``, ``w``, ``y`` (MLA's per-head products: head ``b``'s columns of a ``[rows, H * d]``
        activation, its own weight). One cuBLAS call."""
        status = self._batched(
            self._h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n,
            rows,
            k,
            self._one,
            w,
            ab_type,
            k,
            w_stride,
            x,
            ab_type,
            x_ld,
            x_stride,
            self._zero,
            y,
            c_type,
            y_ld,
            y_stride,
            batch,
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        )
        if status:
            raise CublasError("cublasGemmStridedBatchedEx", status, status_name(status))

    def gather_rows(self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int) -> None:
        """``dst[r, :width] = src[index[r], :width]`` for ``r < rows`` (16-bit elements; ``index`` int32)."""
        self._gather_fn((rows, _column_blocks(width)), (256,), (src, index, dst, width, src_ld, dst_ld))

    def gather_ids(self, rows: int, src: int, index: int, dst: int) -> None:
        """``dst[r] = src[index[r]]`` for ``r < rows`` (int32 token ids: the row gather over two 16-bit halves)."""
        self.gather_rows(rows, src, 2, index, dst, 2, 2)

    def argmax(self, rows: int, x: int, n: int, ld: int, out: int) -> None:
        """``out[r] = argmax(x[r, :n])`` (float32 ``x``, int32 ``out``; ties: the first index)."""
        self._argmax_fn((rows,), (1024,), (x, n, ld, out))

    def gather_rows_shard(
        self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int, lo: int, n: int
    ) -> None:
        """``dst[r] = src[index[r] - lo]`` where ``lo <= index[r] < lo + n``, else a row of zeros (16-bit)."""
        import numpy as np

        args = (src, index, dst, width, src_ld, dst_ld, np.int32(lo), np.int32(n))
        self._gather_shard_fn((rows, _column_blocks(width)), (256,), args)

    def argmax_shard(self, rows: int, x: int, n: int, ld: int, offset: int, pairs: int) -> None:
        """``pairs[r] = (max(x[r, :n]) as float32 bits, first argmax + offset)`` (int32 ``[rows, 2]``)."""
        import numpy as np

        self._argmax_shard_fn((rows,), (1024,), (x, n, ld, np.int32(offset), pairs))

    def combine_argmax(self, rows: int, pairs: int, parts: int, out: int) -> None:
        """``out[r]`` = the winning index of the all-gathered ``pairs [parts, rows, 2]`` (see the kernel)."""
        import numpy as np

        self._combine_argmax_fn(((rows + 127) // 128,), (128,), (pairs, np.int32(parts), np.int32(rows), out))

    def unshard_columns(self, rows: int, src: int, width: int, n: int, dst: int, dst_ld: int) -> None:
        """``dst[r, :n]`` = the columns of the all-gathered float32 shards ``src [parts, rows, width]``."""
        import numpy as np

        self._unshard_fn((rows,), (256,), (src, np.int32(rows), width, n, dst, dst_ld))

    def close(self) -> None:
        """Destroy the cuBLAS handles (later GEMMs raise :class:`~fi_ffi.errors.CublasError`, small-row ones
        included: the GEMV is turned off). Idempotent."""
        self.gemv = False  # else a GEMM of <= GEMV_MAX_ROWS rows would still launch after close
        self._flush = None
        self._gemv_args.clear()
        self._skinny_calls.clear()
        self._skinny = None
        self._fused_args.clear()
        self._fused_fns = {}  # fused_linear refuses after close (fused_fits is False)
        if self._fp8 is not None:
            self._fp8.close()
        if self._int4 is not None:
            self._int4.close()
        self._lt_shape = None
        lt, self._lt = self._lt, None  # `lt = True` after close cannot bring back a destroyed cuBLASLt handle
        if lt is not None:
            lt.close()
        self._blas.close()
        self._h = self._blas.ptr  # NULL: cuBLAS answers CUBLAS_STATUS_NOT_INITIALIZED, no use after free
