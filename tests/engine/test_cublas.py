"""The engine's cuBLAS declarations (fi_engine.cublas) without a GPU.

The cffi declarations parse and carry the enum values the hot path uses as plain ints. When cuBLAS's header is
installed (``nvidia-cublas`` wheel or a CUDA toolkit, found by cuda-pathfinder) the values are compared with it; when
the library is installed, every declared function must resolve in it, its status names come from it, and creating
a handle on a machine without a GPU must raise our :class:`CublasError` (a real status from the real library). When
it is not installed, loading must fail with our error saying how to install it. Importing the engine must not load
libcublas (the CPU-only parts of the engine never need it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fi_engine import cublas, cublas_lt
from fi_ffi.errors import LibraryLoadError

ENUMS = {  # name -> (header file, the module's int)
    "CUBLAS_OP_N": ("cublas_api.h", cublas.CUBLAS_OP_N),
    "CUBLAS_OP_T": ("cublas_api.h", cublas.CUBLAS_OP_T),
    "CUBLAS_COMPUTE_32F": ("cublas_api.h", cublas.CUBLAS_COMPUTE_32F),
    "CUBLAS_GEMM_DEFAULT": ("cublas_api.h", cublas.CUBLAS_GEMM_DEFAULT),
    "CUBLAS_DEFAULT_MATH": ("cublas_api.h", cublas.CUBLAS_DEFAULT_MATH),
    "CUBLAS_STATUS_SUCCESS": ("cublas_api.h", 0),
    "CUDA_R_32F": ("library_types.h", cublas.CUDA_R_32F),
    "CUDA_R_16F": ("library_types.h", cublas.CUDA_R_16F),
    "CUDA_R_16BF": ("library_types.h", cublas.CUDA_R_16BF),
}
ARITY = {
    "cublasCreate_v2": 1,
    "cublasDestroy_v2": 1,
    "cublasSetStream_v2": 2,
    "cublasSetWorkspace_v2": 3,
    "cublasSetMathMode": 2,
    "cublasGetStatusName": 1,
    "cublasGemmEx": 19,
    "cublasGemmStridedBatchedEx": 23,
}


def _library():
    """The real libcublas, or skip saying why."""
    try:
        return cublas.library()
    except LibraryLoadError as exc:
        pytest.skip(f"cuBLAS is not installed here ({str(exc).splitlines()[0]})")


def _header_dir() -> Path | None:
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        return None
    found = find_nvidia_header_directory("cublas")
    return Path(found) if found else None


def test_declarations_parse_and_match_the_python_constants():
    ffi = cublas.get_ffi()
    declared = {}
    for enum in (
        "cublasOperation_t",
        "cublasComputeType_t",
        "cublasGemmAlgo_t",
        "cudaDataType",
        "cublasMath_t",
        "cublasStatus_t",
    ):
        declared.update(ffi.typeof(enum).relements)
    assert declared == {name: value for name, (_, value) in ENUMS.items()}
    # The opaque handle and stream types are pointers; the scalars are read as float32 (CUBLAS_COMPUTE_32F).
    assert ffi.sizeof("cublasHandle_t") == ffi.sizeof("void*")
    assert ffi.sizeof("cudaStream_t") == ffi.sizeof("void*")
    # uintptr_t stands in for the matrix pointers of cublasGemmEx: only sound where it has a pointer's size.
    assert ffi.sizeof("uintptr_t") == ffi.sizeof("void*")
    for enum in (
        "cublasOperation_t",
        "cublasComputeType_t",
        "cublasGemmAlgo_t",
        "cudaDataType",
        "cublasMath_t",
        "cublasStatus_t",
    ):
        assert ffi.sizeof(enum) == ffi.sizeof("int"), enum
    assert set(ARITY) == set(cublas.FUNCTIONS)


def test_enum_values_match_the_installed_headers():
    include = _header_dir()
    if include is None:
        pytest.skip("cuBLAS headers not installed (nvidia-cublas wheel or a CUDA toolkit)")
    texts = {}
    for name, (header, value) in ENUMS.items():
        path = include / header
        if not path.is_file():  # library_types.h lives with the CUDA runtime headers in some layouts
            found = _cuda_runtime_header(header)
            if found is None:
                pytest.skip(f"{header} not found next to cublas.h")
            path = found
        text = texts.setdefault(path, path.read_text(errors="replace"))
        m = re.search(rf"\b{name}\s*=\s*(-?\d+)", text)
        assert m, f"{name} not in {path}"
        assert int(m.group(1)) == value, f"{name}: header says {m.group(1)}, we declare {value}"


def _cuda_runtime_header(header: str) -> Path | None:
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        return None
    found = find_nvidia_header_directory("cudart")
    return Path(found) / header if found and (Path(found) / header).is_file() else None


def test_library_loads_or_says_how_to_install_it():
    try:
        lib = cublas.library()
    except LibraryLoadError as exc:
        assert "nvidia-cublas" in str(exc), str(exc)
        assert cublas.library_path() == ""
        return
    assert lib is cublas.library()  # opened once
    assert "cublas" in cublas.library_path()


def test_every_declared_function_resolves_with_the_declared_arity():
    lib = _library()
    ffi = cublas.get_ffi()
    for name, arity in ARITY.items():
        fn = getattr(lib, name)
        assert len(ffi.typeof(fn).args) == arity, name


def test_status_names_come_from_the_library():
    _library()
    assert cublas.status_name(0) == "CUBLAS_STATUS_SUCCESS"
    assert cublas.status_name(7) == "CUBLAS_STATUS_INVALID_VALUE"
    err = cublas.CublasError("cublasGemmEx", 7)
    assert isinstance(err, RuntimeError)
    assert str(err) == "cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (7)"
    assert (err.function, err.status) == ("cublasGemmEx", 7)


def test_status_names_without_the_library():
    # The fallback table (used before the library is loaded) or the library itself: the same names.
    err = cublas.CublasError("cublasSetStream_v2", 1)
    assert str(err) == "cublasSetStream_v2 failed: CUBLAS_STATUS_NOT_INITIALIZED (1)"
    assert str(cublas.CublasError("cublasGemmEx", 999)).endswith("(999)")  # an unknown status still shows its value


@pytest.mark.cpu_only
def test_creating_a_handle_without_a_gpu_raises_our_error():
    _library()
    with pytest.raises(cublas.CublasError, match=r"cublasCreate_v2 failed: CUBLAS_STATUS_\w+ \(\d+\)") as info:
        cublas.Handle()
    assert info.value.function == "cublasCreate_v2" and info.value.status != 0


def test_importing_the_engine_does_not_load_cublas():
    code = textwrap.dedent("""
        import fi_engine.dense, fi_engine.llama, fi_engine.cublas as c
        assert c._lib is None
        maps = open("/proc/self/maps").read()
        assert "libcublas" not in maps, "libcublas was mapped at import"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- cuBLASLt (fi_engine.cublas_lt): the engine's GEMMs with the algorithm chosen once per shape ----------

LT_ENUMS = {  # name -> the module's int (cublasLt.h)
    "CUBLASLT_MATMUL_DESC_TRANSA": cublas_lt.CUBLASLT_MATMUL_DESC_TRANSA,
    "CUBLASLT_MATMUL_DESC_TRANSB": cublas_lt.CUBLASLT_MATMUL_DESC_TRANSB,
    "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES": cublas_lt.CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
}
LT_ARITY = {
    "cublasLtCreate": 1,
    "cublasLtDestroy": 1,
    "cublasLtMatmulDescCreate": 3,
    "cublasLtMatmulDescDestroy": 1,
    "cublasLtMatmulDescSetAttribute": 4,
    "cublasLtMatrixLayoutCreate": 5,
    "cublasLtMatrixLayoutDestroy": 1,
    "cublasLtMatmulPreferenceCreate": 1,
    "cublasLtMatmulPreferenceDestroy": 1,
    "cublasLtMatmulPreferenceSetAttribute": 4,
    "cublasLtMatmulAlgoGetHeuristic": 10,
    "cublasLtMatmul": 16,
}


def test_lt_declarations_parse_with_the_header_layouts():
    ffi = cublas_lt._DECLARATIONS.ffi()
    assert set(LT_ARITY) == set(cublas_lt.FUNCTIONS)
    # cublasLt.h: the algorithm is 8 uint64 words; the heuristic result adds workspaceSize, state, wavesCount and
    # four reserved ints (96 bytes on LP64), and the library writes an array of them
    assert ffi.sizeof("cublasLtMatmulAlgo_t") == 64
    assert ffi.sizeof("cublasLtMatmulHeuristicResult_t") == 96
    assert ffi.offsetof("cublasLtMatmulHeuristicResult_t", "workspaceSize") == 64
    assert ffi.offsetof("cublasLtMatmulHeuristicResult_t", "state") == 72
    # the transposes the GEMM needs (w^T . x^T in column-major terms) are cuBLAS's own operation values
    assert (cublas_lt.CUBLAS_OP_T, cublas_lt.CUBLAS_OP_N) == (cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N)


def test_lt_enum_values_match_the_installed_header():
    include = _header_dir()
    if include is None or not (include / "cublasLt.h").is_file():
        pytest.skip("cublasLt.h not installed (nvidia-cublas wheel or a CUDA toolkit)")
    text = (include / "cublasLt.h").read_text(errors="replace")
    for name, value in LT_ENUMS.items():
        m = re.search(rf"\b{name}\s*=\s*(-?\d+)", text)
        assert m, f"{name} not in cublasLt.h"
        assert int(m.group(1)) == value, f"{name}: header says {m.group(1)}, we declare {value}"


def test_lt_functions_resolve_with_the_declared_arity():
    try:
        lib = cublas_lt.library()
    except LibraryLoadError as exc:
        pytest.skip(f"cuBLASLt is not installed here ({str(exc).splitlines()[0]})")
    ffi = cublas_lt._DECLARATIONS.ffi()
    for name, arity in LT_ARITY.items():
        assert len(ffi.typeof(getattr(lib, name)).args) == arity, name
