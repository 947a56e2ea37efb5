"""The engine's cuBLAS declarations (fi_engine.kernels.cublas) without a GPU.

The cffi declarations parse and carry the enum values the hot path uses as plain ints. When cuBLAS's header is
installed (``nvidia-cublas`` wheel or a CUDA toolkit, found by cuda-pathfinder) the values are compared with it; when
the library is installed, every declared function must resolve in it, its status names come from it, and creating
a handle on a machine without a GPU must raise fi_ffi's :class:`~fi_ffi.errors.CublasError` (a real status from the
real library). When it is not installed, loading must fail with our error saying how to install it. The libraries
are found by one function of the binding (:func:`fi_ffi.loader.nvidia_library`), for the binding and the engine.
Importing the engine must not load libcublas (the CPU-only parts of the engine never need it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fi_engine.kernels import cublas, cublas_lt
from fi_ffi.errors import CublasError, FiFFIError, LibraryLoadError

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


# the enum types the cffi declarations name (each read as an int by the C ABI)
ENUM_TYPES = (
    "cublasOperation_t",
    "cublasComputeType_t",
    "cublasGemmAlgo_t",
    "cudaDataType",
    "cublasMath_t",
    "cublasStatus_t",
)


def test_declarations_parse_and_match_the_python_constants():
    ffi = cublas.get_ffi()
    declared = {}
    for enum in ENUM_TYPES:
        declared.update(ffi.typeof(enum).relements)
    assert declared == {name: value for name, (_, value) in ENUMS.items()}
    # The opaque handle and stream types are pointers; the scalars are read as float32 (CUBLAS_COMPUTE_32F).
    assert ffi.sizeof("cublasHandle_t") == ffi.sizeof("void*")
    assert ffi.sizeof("cudaStream_t") == ffi.sizeof("void*")
    # uintptr_t stands in for the matrix pointers of cublasGemmEx: only sound where it has a pointer's size.
    assert ffi.sizeof("uintptr_t") == ffi.sizeof("void*")
    for enum in ENUM_TYPES:
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
    with pytest.raises(CublasError) as info:  # what every failing engine call raises, named by the library
        cublas._check("cublasGemmEx", 7)
    err = info.value
    assert str(err).startswith("cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (7). Check the shapes")
    assert (err.function, err.status, err.name) == ("cublasGemmEx", 7, "CUBLAS_STATUS_INVALID_VALUE")


def test_status_names_without_the_library():
    # The fallback table (used before the library is loaded) or the library itself: the same names.
    err = CublasError("cublasSetStream_v2", 1)
    assert str(err).startswith("cublasSetStream_v2 failed: CUBLAS_STATUS_NOT_INITIALIZED (1). The handle was")
    assert str(CublasError("cublasGemmEx", 999)).startswith("cublasGemmEx failed: unknown cublasStatus_t (999). ")
    assert cublas.status_name(8) == "CUBLAS_STATUS_ARCH_MISMATCH"


def test_cublas_errors_are_fi_ffi_errors_with_one_convention():
    # the engine's cuBLAS/cuBLASLt calls and fi_ffi's bmm_fp8 handle (launch/cublaslt.py) raise the one class,
    # which is in the FiFFIError tree (a caller's `except FiFFIError` sees it) and still a RuntimeError
    import pickle

    import fi_ffi
    from fi_ffi.launch import cublaslt

    assert CublasError is fi_ffi.CublasError and issubclass(CublasError, (FiFFIError, RuntimeError))
    assert cublas.CublasError is CublasError and cublas_lt.CublasError is CublasError
    assert cublaslt.CublasError is CublasError  # what cublasLtCreate's failure raises in the binding
    err = CublasError("cublasLtMatmul", 3, "CUBLAS_STATUS_ALLOC_FAILED")
    assert str(err) == (
        "cublasLtMatmul failed: CUBLAS_STATUS_ALLOC_FAILED (3). The device is out of memory: free buffers, or ask "
        "for smaller ones"
    )
    back = pickle.loads(pickle.dumps(err))  # a rank's error reaches the parent whole
    assert (type(back), str(back), back.status, back.name) == (CublasError, str(err), 3, err.name)
    with pytest.raises(CublasError, match=r"^cublasLtMatmulDescCreate failed: CUBLAS_STATUS_INVALID_VALUE \(7\)"):
        cublas_lt._check("cublasLtMatmulDescCreate", 7)
    cublas_lt._check("cublasLtMatmul", 0)  # success raises nothing


def test_one_finder_serves_libcublas_and_libcublaslt_to_the_binding_and_the_engine():
    from fi_ffi import loader
    from fi_ffi.loader import libraries

    with pytest.raises(ValueError, match=r"^name: expected one of cublas, cublasLt, got 'cudnn'"):
        loader.nvidia_library("cudnn")
    try:
        path = loader.nvidia_library("cublasLt")
    except LibraryLoadError as exc:  # not installed here: the error says how to install it, wherever it is asked
        assert "pip install 'nvidia-cublas>=13,<14'" in str(exc)
        with pytest.raises(LibraryLoadError, match=r"^kernel module 'gemm' needs libcublasLt\.so\.13 was not found"):
            libraries.ensure_module_libraries("gemm")
        with pytest.raises(LibraryLoadError, match=r"nvidia-cublas>=13,<14"):
            cublas_lt.library()
        with pytest.raises(LibraryLoadError, match=r"(?s)^cuBLAS: libcublas\.so\.13 was not found.*nvidia-cublas"):
            cublas.library()
        return
    assert loader.nvidia_library("cublasLt") == path  # found once, the same copy for every caller
    libraries.ensure_module_libraries("gemm")  # the gemm module's NEEDED copies: the same cache
    assert libraries._nvidia_loaded["cublasLt"] == path
    cublas_lt.library()
    cublas.library()
    assert cublas.library_path() == loader.nvidia_library("cublas")


@pytest.mark.cpu_only
def test_creating_a_handle_without_a_gpu_raises_our_error():
    _library()
    with pytest.raises(CublasError, match=r"cublasCreate_v2 failed: CUBLAS_STATUS_\w+ \(\d+\)") as info:
        cublas.Handle()
    assert info.value.function == "cublasCreate_v2" and info.value.status != 0


def test_importing_the_engine_does_not_load_cublas():
    code = textwrap.dedent("""
        import fi_engine.kernels.dense, fi_engine.models.llama, fi_engine.kernels.cublas as c
        assert c._lib is None
        maps = open("/proc/self/maps").read()
        assert "libcublas" not in maps, "libcublas was mapped at import"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- cuBLASLt (fi_engine.kernels.cublas_lt): the engine's GEMMs with the algorithm chosen once per shape ----------

LT_ENUMS = {  # name -> the module's int (cublasLt.h)
    "CUBLASLT_MATMUL_DESC_TRANSA": cublas_lt.CUBLASLT_MATMUL_DESC_TRANSA,
    "CUBLASLT_MATMUL_DESC_TRANSB": cublas_lt.CUBLASLT_MATMUL_DESC_TRANSB,
    "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES": cublas_lt.CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
    # the FP8 products (fi_engine.kernels.fp8_linear's W8A8 path)
    "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER": cublas_lt.CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
    "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER": cublas_lt.CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
    "CUBLASLT_MATMUL_DESC_A_SCALE_MODE": cublas_lt.CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
    "CUBLASLT_MATMUL_DESC_B_SCALE_MODE": cublas_lt.CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
    "CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F": cublas_lt.CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F,
    "CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F": cublas_lt.CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
    "CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F": cublas_lt.CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
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


def test_lt_e4m3_data_type_matches_the_installed_header():
    include = _header_dir()
    path = include / "library_types.h" if include is not None else None
    if path is None or not path.is_file():
        path = _cuda_runtime_header("library_types.h")
    if path is None:
        pytest.skip("library_types.h not installed (nvidia-cublas / nvidia-cuda-runtime wheels or a CUDA toolkit)")
    m = re.search(r"\bCUDA_R_8F_E4M3\s*=\s*(\d+)", path.read_text(errors="replace"))
    assert m and int(m.group(1)) == cublas_lt.CUDA_R_8F_E4M3


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
