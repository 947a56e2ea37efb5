"""cuBLAS through cffi in ABI mode: the six functions the engine needs, on a handle of its own.

Why not CuPy's cuBLAS bindings (``cupy_backends.cuda.libs.cublas``): their wrappers set the handle's stream to
CuPy's current stream on every call and refuse to run while a stream is being captured
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``), so a decode step
with GEMMs could not become a CUDA graph. Calling libcublas directly, the handle is bound to the engine's stream
once (:meth:`Handle.bind`) and the GEMM call does nothing but enqueue work, which stream capture records.

cuBLAS may allocate a workspace on first use of a stream; during capture that allocation would either fail or be
baked into the graph. cuBLAS's documentation for CUDA graphs asks for a user-owned workspace
(``cublasSetWorkspace``) instead: :meth:`Handle.bind` sets one, after the stream (``cublasSetStream`` resets the
workspace to cuBLAS's default pool, so the order matters).

Declarations: ``cublas_api.h`` of cuBLAS 13 (the ``_v2`` symbols that ``cublas_v2.h`` maps the plain names to) and
``library_types.h`` of CUDA 13; the enums list only the members the engine uses, with the headers' values.
``tests/engine/test_cublas.py`` checks them against the real header and library when they are installed.
The library is found and loaded by :func:`fi_ffi.loader.nvidia_library` (the one finder of libcublas and libcublasLt
in the repository: the ``nvidia-cublas`` wheel, conda, or a CUDA toolkit) on first use, never at import, so the
CPU-only parts of the engine do not need it. A failing status is fi_ffi's :class:`~fi_ffi.errors.CublasError`.
"""

from __future__ import annotations

import threading
from typing import Any

import cffi

from fi_ffi import loader
from fi_ffi.cdecl import Declarations
from fi_ffi.errors import CublasError, LibraryLoadError

__all__ = [
    "CDEFS",
    "CUBLAS_COMPUTE_32F",
    "CUBLAS_DEFAULT_MATH",
    "CUBLAS_GEMM_DEFAULT",
    "CUBLAS_OP_N",
    "CUBLAS_OP_T",
    "CUDA_R_16BF",
    "CUDA_R_16F",
    "CUDA_R_32F",
    "FUNCTIONS",
    "Handle",
    "get_ffi",
    "library",
    "library_path",
    "status_name",
]

# The values declared in CDEFS, as plain ints for the hot path (tests check that both agree).
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_16BF = 14
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
CUBLAS_COMPUTE_32F = 68  # float32 accumulation (inputs and output keep their own types)
CUBLAS_GEMM_DEFAULT = -1  # cuBLAS's heuristic picks the kernel
CUBLAS_DEFAULT_MATH = 0  # tensor cores allowed; reductions as the compute type says

CDEFS = r"""
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0 } cublasMath_t;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;
typedef struct cublasContext* cublasHandle_t;
typedef struct CUstream_st* cudaStream_t;

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle);
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle);
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId);
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t workspaceSizeInBytes);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
const char* cublasGetStatusName(cublasStatus_t status);
/* A, B and C (device pointers) are declared as uintptr_t rather than const void* / void*: the same register on
   LP64 platforms, and the hot path passes Python ints without building a pointer cdata per argument. */
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                            int m, int n, int k, const void* alpha, uintptr_t A, cudaDataType Atype, int lda,
                            uintptr_t B, cudaDataType Btype, int ldb, const void* beta, uintptr_t C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t algo);
/* batchCount GEMMs whose matrices lie at fixed element strides (MLA: one GEMM per attention head). */
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, uintptr_t A, cudaDataType Atype,
                                          int lda, long long strideA, uintptr_t B, cudaDataType Btype, int ldb,
                                          long long strideB, const void* beta, uintptr_t C, cudaDataType Ctype,
                                          int ldc, long long strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo);
"""

FUNCTIONS = (
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetMathMode",
    "cublasGetStatusName",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
)

_lock = threading.Lock()
_DECLARATIONS = Declarations(CDEFS)
_lib: Any = None
_path = ""

_INSTALL = (
    "install cuBLAS 13 with `python -m pip install 'nvidia-cublas>=13,<14'` (or a CUDA 13 toolkit, with CUDA_HOME set)"
)


def get_ffi() -> cffi.FFI:
    """The ``cffi.FFI`` holding :data:`CDEFS` (parsed once, thread-safe; no library is loaded)."""
    return _DECLARATIONS.ffi()


def library() -> Any:
    """libcublas, opened once per process with :data:`CDEFS` bound; raises :class:`LibraryLoadError` (with the fix)
    when it cannot be found or lacks a declared function."""
    global _lib, _path
    if _lib is not None:
        return _lib
    ffi = get_ffi()
    with _lock:
        if _lib is None:
            path = _find()
            try:
                lib = ffi.dlopen(path)
                missing = [name for name in FUNCTIONS if not _has(lib, name)]
            except OSError as exc:
                raise LibraryLoadError(f"cuBLAS ({path}) could not be loaded: {exc}; {_INSTALL}") from None
            if missing:
                raise LibraryLoadError(
                    f"cuBLAS ({path}) lacks {', '.join(missing)}; it is older than the cuBLAS 12/13 "
                    f"this engine declares; {_INSTALL}"
                )
            _lib, _path = lib, path
    return _lib


def library_path() -> str:
    """The file (or soname) :func:`library` opened; ``""`` before it is opened."""
    return _path


def _find() -> str:
    """The path (or soname) of libcublas, loaded once for the process by fi_ffi's loader."""
    try:
        return loader.nvidia_library("cublas")
    except LibraryLoadError as exc:
        raise LibraryLoadError(f"cuBLAS: {exc}") from None


def _has(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:  # cffi: the symbol is declared but the library does not export it
        return False
    return True


def status_name(status: int) -> str:
    """``CUBLAS_STATUS_...`` for a ``cublasStatus_t`` value (the library's own name when it is loaded)."""
    if _lib is not None:
        text = _lib.cublasGetStatusName(status)
        if text != get_ffi().NULL:
            return str(get_ffi().string(text).decode(errors="replace"))
    return CublasError.STATUS_NAMES.get(status, "unknown cublasStatus_t")


def _check(function: str, status: int) -> None:
    if status:
        raise CublasError(function, status, status_name(status))


class Handle:
    """A cuBLAS handle on the current CUDA device, created now; :meth:`bind` it to a stream before use.

    For callers on a hot path the raw pieces are public: ``ptr`` (the ``cublasHandle_t``; NULL once closed, which
    cuBLAS answers with ``CUBLAS_STATUS_NOT_INITIALIZED`` rather than a crash), ``gemm_ex`` (``cublasGemmEx`` as
    declared in :data:`CDEFS`) and ``one``/``zero`` (float32 host scalars for ``alpha``/``beta``). cuBLAS's default
    host pointer mode reads them when a GEMM is enqueued, so a captured graph keeps the values they had then.
    """

    def __init__(self) -> None:
        lib, ffi = library(), get_ffi()
        out = ffi.new("cublasHandle_t*")
        _check("cublasCreate_v2", lib.cublasCreate_v2(out))
        self.ptr: Any = out[0]
        self._lib = lib
        self.gemm_ex = lib.cublasGemmEx
        self.gemm_strided_batched_ex = lib.cublasGemmStridedBatchedEx
        self._scalars = ffi.new("float[2]", [1.0, 0.0])  # float32: the scalar type of CUBLAS_COMPUTE_32F
        self.one = self._scalars
        self.zero = self._scalars + 1
        try:
            _check("cublasSetMathMode", lib.cublasSetMathMode(self.ptr, CUBLAS_DEFAULT_MATH))
        except BaseException:
            self.close()
            raise

    def bind(self, stream: int, workspace: int, workspace_bytes: int) -> None:
        """Run every later call on ``stream`` (a ``cudaStream_t`` as an int) with ``workspace_bytes`` of device
        memory at ``workspace`` as cuBLAS's scratch (it must outlive the handle and any graph captured with it).
        Call it once, outside stream capture."""
        ffi = get_ffi()
        _check("cublasSetStream_v2", self._lib.cublasSetStream_v2(self.ptr, ffi.cast("cudaStream_t", stream)))
        # After the stream: cublasSetStream resets the workspace to cuBLAS's own pool.
        _check(
            "cublasSetWorkspace_v2",
            self._lib.cublasSetWorkspace_v2(self.ptr, ffi.cast("void*", workspace), workspace_bytes),
        )

    @property
    def closed(self) -> bool:
        return self.ptr == get_ffi().NULL

    def close(self) -> None:
        """Destroy the handle (cuBLAS waits for its work first). Idempotent."""
        if not self.closed:
            h, self.ptr = self.ptr, get_ffi().NULL
            _check("cublasDestroy_v2", self._lib.cublasDestroy_v2(h))
