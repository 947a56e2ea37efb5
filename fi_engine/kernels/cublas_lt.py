"""cuBLASLt matmuls whose descriptors and algorithm are chosen once per shape (cffi in ABI mode, as
:mod:`~fi_engine.kernels.cublas`).

Why: ``cublasGemmEx`` costs about 11 us of host time per call on the H100 (measured in the engine's eager decode
step: four per layer, 45 % of the step), most of it cuBLAS choosing a kernel again for the same problem.
``cublasLtMatmul`` takes that choice as an argument: :class:`LtMatmuls` makes the matmul descriptor, the three
matrix layouts and the heuristic's first algorithm once per problem shape and keeps them, so a warm call is the
enqueue alone. The GEMM is the same (float32 accumulation and scale; inputs and output keep their types).

Declarations: ``cublasLt.h`` of cuBLAS 13 (the enum values the engine uses, checked against the header in
``tests/engine/test_cublas.py`` when it is installed). Device pointers and the stream are declared as
``uintptr_t`` (the same register on LP64) so the hot path passes Python ints.
"""

from __future__ import annotations

import threading
from typing import Any

from fi_ffi import loader
from fi_ffi.cdecl import Declarations
from fi_ffi.errors import CublasError, LibraryLoadError

from .cublas import CUBLAS_COMPUTE_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_32F, status_name

__all__ = ["CDEFS", "FUNCTIONS", "LtMatmuls", "library"]

CUBLASLT_MATMUL_DESC_TRANSA = 3
CUBLASLT_MATMUL_DESC_TRANSB = 4
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1
# FP8 (e4m3) products with scales (cuBLASLt 12.9+; the enum values of cublasLt.h)
CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17
CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18
CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31
CUBLASLT_MATMUL_DESC_B_SCALE_MODE = 32
CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F = 3  # a float32 per row of A (its M) / per column of B (its N)
CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F = 4  # a float32 per 128 elements along k
CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F = 5  # a float32 per 128x128 block
CUDA_R_8F_E4M3 = 28

CDEFS = r"""
typedef struct cublasLtContext* cublasLtHandle_t;
typedef struct cublasLtMatmulDescOpaque_t* cublasLtMatmulDesc_t;
typedef struct cublasLtMatrixLayoutOpaque_t* cublasLtMatrixLayout_t;
typedef struct cublasLtMatmulPreferenceOpaque_t* cublasLtMatmulPreference_t;
typedef struct { uint64_t data[8]; } cublasLtMatmulAlgo_t;
typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    int state;                /* cublasStatus_t */
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

int cublasLtCreate(cublasLtHandle_t* handle);
int cublasLtDestroy(cublasLtHandle_t handle);
int cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, int computeType, int scaleType);
int cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
int cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, int attr, const void* buf, size_t sizeInBytes);
int cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, int type, uint64_t rows, uint64_t cols, int64_t ld);
int cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
int cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref);
int cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
int cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, int attr, const void* buf,
                                         size_t sizeInBytes);
int cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                   cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                   cublasLtMatmulPreference_t pref, int requested,
                                   cublasLtMatmulHeuristicResult_t* results, int* returned);
int cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha, uintptr_t A,
                   cublasLtMatrixLayout_t Adesc, uintptr_t B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                   uintptr_t C, cublasLtMatrixLayout_t Cdesc, uintptr_t D, cublasLtMatrixLayout_t Ddesc,
                   const cublasLtMatmulAlgo_t* algo, uintptr_t workspace, size_t workspaceSizeInBytes,
                   uintptr_t stream);
"""

FUNCTIONS = (
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmul",
)

_DECLARATIONS = Declarations(CDEFS)
_lock = threading.Lock()
_lib: Any = None
# the most shapes kept per LtMatmuls (prefill makes one per prompt length): past it the cache starts again
_MAX_SHAPES = 1024


def library() -> Any:
    """libcublasLt, opened once per process with :data:`CDEFS` bound: the copy :func:`fi_ffi.loader.nvidia_library`
    loads (the one fi_ffi's ``gemm`` kernel module links, and libcublas too); raises
    :class:`~fi_ffi.errors.LibraryLoadError` when it cannot be found or lacks a declared function."""
    global _lib
    if _lib is not None:
        return _lib
    ffi = _DECLARATIONS.ffi()
    with _lock:
        if _lib is None:
            path = loader.nvidia_library("cublasLt")
            try:
                lib = ffi.dlopen(path)
                missing = [name for name in FUNCTIONS if not hasattr(lib, name)]
            except (OSError, AttributeError) as exc:
                raise LibraryLoadError(f"cuBLASLt ({path}) could not be loaded: {exc}") from None
            if missing:
                raise LibraryLoadError(f"cuBLASLt ({path}) lacks {', '.join(missing)}")
            _lib = lib
    return _lib


def _check(function: str, status: int) -> None:
    if status:
        raise CublasError(function, status, status_name(status))


class LtMatmuls:
    """``y = x @ w.T`` (row-major, see :meth:`~fi_engine.kernels.dense.Dense.linear`) through ``cublasLtMatmul`` on
    ``stream`` with ``workspace_bytes`` at ``workspace``, one cached (descriptor, layouts, algorithm) per shape.

    ``one``/``zero``: float32 host scalars (alpha/beta) that outlive this object.
    """

    def __init__(self, stream: int, workspace: int, workspace_bytes: int, one: Any, zero: Any) -> None:
        lib, ffi = library(), _DECLARATIONS.ffi()
        self._lib, self._ffi = lib, ffi
        out = ffi.new("cublasLtHandle_t*")
        _check("cublasLtCreate", lib.cublasLtCreate(out))
        self._h = out[0]
        self._matmul = lib.cublasLtMatmul
        self._stream, self._ws, self._ws_bytes = stream, workspace, workspace_bytes
        self._one, self._zero = one, zero
        self._shapes: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._layouts: list[Any] = []
        self._pref: Any = None
        self._desc: Any = None
        # FP8 products: one descriptor per (blocked, c_type) (its scale modes; the weight's scale pointer is set
        # per call) and the cached (layouts, algorithm) per shape, None where no algorithm serves it
        self._fp8_descs: dict[tuple[bool, int], Any] = {}
        self._fp8_refused: set[tuple[bool, int]] = set()  # modes this cuBLASLt does not take
        self._fp8_shapes: dict[tuple[int, ...], tuple[Any, ...] | None] = {}
        self._pointer = ffi.new("uint64_t*")  # a scale pointer's value as fp8_call passes it (no allocation per call)
        try:
            p = ffi.new("cublasLtMatmulPreference_t*")
            _check("cublasLtMatmulPreferenceCreate", lib.cublasLtMatmulPreferenceCreate(p))
            self._pref = p[0]
            size = ffi.new("uint64_t*", workspace_bytes)
            _check(
                "cublasLtMatmulPreferenceSetAttribute",
                lib.cublasLtMatmulPreferenceSetAttribute(self._pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, size, 8),
            )
            d = ffi.new("cublasLtMatmulDesc_t*")
            _check("cublasLtMatmulDescCreate", lib.cublasLtMatmulDescCreate(d, CUBLAS_COMPUTE_32F, CUDA_R_32F))
            self._desc = d[0]
            for attr, value in ((CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T), (CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N)):
                op = ffi.new("int32_t*", value)
                _check("cublasLtMatmulDescSetAttribute", lib.cublasLtMatmulDescSetAttribute(self._desc, attr, op, 4))
        except BaseException:
            self.close()
            raise

    def shape(
        self, rows: int, n: int, k: int, x_ld: int, y_ld: int, ab_type: int, c_type: int
    ) -> tuple[Any, ...] | None:
        """The cached ``(A, B, C layouts, algorithm, workspace bytes)`` of one problem; None where the heuristic
        offers no algorithm, or after :meth:`close` (the caller falls back to ``cublasGemmEx``). Sizes and
        leading dimensions in elements; ``ab_type``/``c_type``: cudaDataType_t of x and w / of y. At most
        1024 shapes kept, then every layout is destroyed and the cache starts again."""
        if self._h is None:  # closed: no layout made on a destroyed handle (nothing would destroy it)
            return None
        key = (rows, n, k, x_ld, y_ld, ab_type, c_type)
        found = self._shapes.get(key)
        if found is not None or key in self._shapes:
            return found
        if len(self._shapes) >= _MAX_SHAPES:
            self._drop_shapes()
        entry = self._choose(self._desc, ((ab_type, k, n, k), (ab_type, k, rows, x_ld), (c_type, n, rows, y_ld)))
        self._shapes[key] = entry  # type: ignore[assignment]
        return entry

    def _choose(self, desc: Any, layouts: tuple[tuple[int, int, int, int], ...]) -> tuple[Any, ...] | None:
        """The A, B and C/D layouts (``(type, rows, cols, ld)`` each, column-major; kept until the cache drops)
        and the heuristic's first algorithm for ``desc``: ``(a, b, c, algo, workspace bytes)``, or None where it
        offers none."""
        lib, ffi = self._lib, self._ffi
        made = []
        for dtype, r, c, ld in layouts:
            out = ffi.new("cublasLtMatrixLayout_t*")
            _check("cublasLtMatrixLayoutCreate", lib.cublasLtMatrixLayoutCreate(out, dtype, r, c, ld))
            made.append(out[0])
            self._layouts.append(out[0])
        results = ffi.new("cublasLtMatmulHeuristicResult_t[1]")
        returned = ffi.new("int*")
        a, b, c = made
        status = lib.cublasLtMatmulAlgoGetHeuristic(self._h, desc, a, b, c, c, self._pref, 1, results, returned)
        if status or returned[0] <= 0 or results[0].state != 0:
            return None
        algo = ffi.new("cublasLtMatmulAlgo_t*")
        algo[0] = results[0].algo
        return a, b, c, algo, results[0].workspaceSize

    def __call__(self, entry: tuple[Any, ...], x: int, w: int, y: int, accumulate: bool) -> int:
        """Enqueue one product of a :meth:`shape` entry; returns the cublasStatus_t (0: success)."""
        a, b, c, algo, _ = entry
        return self._matmul(  # type: ignore[no-any-return]
            self._h,
            self._desc,
            self._one,
            w,
            a,
            x,
            b,
            self._one if accumulate else self._zero,
            y,
            c,
            y,
            c,
            algo,
            self._ws,
            self._ws_bytes,
            self._stream,
        )

    def fp8_shape(
        self, rows: int, n: int, k: int, y_ld: int, c_type: int, blocked: bool, x_scales: int, w_scales: int
    ) -> tuple[Any, ...] | None:
        """The cached entry of ``y[:rows, :n] = dequant(xq)[:rows, :k] @ dequant(w).T`` with e4m3 ``xq`` (row-major,
        row stride ``k``) and ``w`` (``[n, k]`` row-major), float32 sums, ``y`` of ``c_type`` (row stride ``y_ld``).
        ``blocked`` False: per-row scales of both (``x_scales`` ``[rows]``, the weight's ``[n]``); True: the
        weight's per 128x128 block (``[n / 128, k / 128]`` row-major) and x's per 128 columns (``x_scales``
        ``[k / 128, rows]``, rows contiguous; ``w_scales``: a weight's, for the algorithm query, which offers none
        while a scale pointer is NULL). None where cuBLASLt offers no algorithm (older than 12.9, a GPU
        without FP8 tensor cores, a shape it does not serve) or after :meth:`close`."""
        if self._h is None:
            return None
        key = (rows, n, k, y_ld, c_type, blocked, x_scales)
        if key in self._fp8_shapes:
            return self._fp8_shapes[key]
        if len(self._fp8_shapes) >= _MAX_SHAPES:
            self._drop_shapes()
        lib, ffi = self._lib, self._ffi
        if (blocked, c_type) in self._fp8_refused:
            return None
        desc = self._fp8_descs.get((blocked, c_type))
        if desc is None:
            d = ffi.new("cublasLtMatmulDesc_t*")
            _check("cublasLtMatmulDescCreate", lib.cublasLtMatmulDescCreate(d, CUBLAS_COMPUTE_32F, CUDA_R_32F))
            desc = d[0]
            a_mode, b_mode = (
                (CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F)
                if blocked
                else (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F)
            )
            for attr, value in (
                (CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T),
                (CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N),
                (CUBLASLT_MATMUL_DESC_A_SCALE_MODE, a_mode),
                (CUBLASLT_MATMUL_DESC_B_SCALE_MODE, b_mode),
            ):
                status = lib.cublasLtMatmulDescSetAttribute(desc, attr, ffi.new("int32_t*", value), 4)
                if status:  # a cuBLASLt without scale modes: no FP8 product from it, for any shape of this mode
                    lib.cublasLtMatmulDescDestroy(desc)  # (a descriptor without its modes would scale wrongly)
                    self._fp8_refused.add((blocked, c_type))
                    return None
            self._fp8_descs[(blocked, c_type)] = desc
        status = lib.cublasLtMatmulDescSetAttribute(
            desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, ffi.new("uint64_t*", w_scales), 8
        ) or lib.cublasLtMatmulDescSetAttribute(
            desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, ffi.new("uint64_t*", x_scales), 8
        )
        entry = None
        if status == 0:
            e4m3 = CUDA_R_8F_E4M3
            chosen = self._choose(desc, ((e4m3, k, n, k), (e4m3, k, rows, k), (c_type, n, rows, y_ld)))
            if chosen is not None:
                a, b, c, algo, _ = chosen
                entry = (desc, a, b, c, algo, x_scales)
        self._fp8_shapes[key] = entry
        return entry

    def fp8_call(self, entry: tuple[Any, ...], xq: int, w: int, w_scales: int, y: int, accumulate: bool) -> int:
        """Enqueue one FP8 product of a :meth:`fp8_shape` entry with the weight ``w`` and its scales; returns the
        cublasStatus_t (0: success)."""
        desc, a, b, c, algo, x_scales = entry
        lib, pointer = self._lib, self._pointer
        # the descriptor is shared by the shapes of its mode: both scale pointers are this call's (the attribute
        # keeps the value, not the buffer)
        pointer[0] = w_scales
        status = lib.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, pointer, 8)
        if not status:
            pointer[0] = x_scales
            status = lib.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, pointer, 8)
        if status:
            return int(status)
        return self._matmul(  # type: ignore[no-any-return]
            self._h, desc, self._one, w, a, xq, b, self._one if accumulate else self._zero, y, c, y, c, algo,
            self._ws, self._ws_bytes, self._stream,
        )  # fmt: skip

    def _drop_shapes(self) -> None:
        for layout in self._layouts:
            self._lib.cublasLtMatrixLayoutDestroy(layout)
        self._layouts.clear()
        self._shapes.clear()
        self._fp8_shapes.clear()

    def close(self) -> None:
        """Destroy the layouts, descriptor, preference and handle (idempotent; work already enqueued is unaffected)."""
        if self._h is None:
            return
        self._drop_shapes()
        for desc in self._fp8_descs.values():
            self._lib.cublasLtMatmulDescDestroy(desc)
        self._fp8_descs.clear()
        if self._desc is not None:
            self._lib.cublasLtMatmulDescDestroy(self._desc)
            self._desc = None
        if self._pref is not None:
            self._lib.cublasLtMatmulPreferenceDestroy(self._pref)
            self._pref = None
        h, self._h = self._h, None
        self._lib.cublasLtDestroy(h)
