"""fi_ffi.cuda.runtime: one ``check`` for every CUDA runtime result, one ``CudaError``.

This CPU machine has cuda-bindings but no driver, so every real runtime call fails: the error path is tested
with the real library (no mocks). On a GPU machine the failing calls below are skipped.
"""

from __future__ import annotations

import pickle

import pytest

from fi_ffi.cuda import runtime as cuda_runtime
from fi_ffi.errors import CudaError, FiFFIError

rt = pytest.importorskip("cuda.bindings.runtime")


def _no_gpu() -> bool:
    return int(rt.cudaGetDeviceCount()[0]) != 0


needs_no_gpu = pytest.mark.skipif(not _no_gpu(), reason="a usable GPU is present: the runtime calls succeed")


@needs_no_gpu
def test_failing_call_raises_cuda_error_naming_call_error_and_fix() -> None:
    with pytest.raises(CudaError) as info:
        cuda_runtime.check(cuda_runtime.runtime().cudaMalloc(1024), "cudaMalloc(1024)")
    exc = info.value
    assert isinstance(exc, FiFFIError)
    text = str(exc)
    assert text.startswith("cudaMalloc(1024) failed: ")
    assert exc.name.startswith("cudaError") and exc.name in text  # e.g. cudaErrorInsufficientDriver
    assert exc.code is not None and exc.code != 0 and exc.code in cuda_runtime.NO_DEVICE_CODES
    assert cuda_runtime.no_device(exc)
    assert exc.hint and exc.hint in text  # the fix
    from fi_ffi.cuda import driver

    if not driver.probe().found:  # no driver here: its absence is named, not "insufficient"
        assert exc.description.startswith("no NVIDIA driver found") and "Install the NVIDIA driver" in exc.hint
    else:
        assert "nvidia-smi" in exc.hint or "driver" in exc.hint
    assert exc.description and exc.description in text


@needs_no_gpu
def test_cuda_error_survives_pickling() -> None:  # workers send errors to their parent
    with pytest.raises(CudaError) as info:
        cuda_runtime.check(cuda_runtime.runtime().cudaSetDevice(0), "cudaSetDevice(0)")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is CudaError and str(back) == str(info.value)
    assert (back.what, back.code, back.name, back.hint) == (
        info.value.what,
        info.value.code,
        info.value.name,
        info.value.hint,
    )


def test_check_returns_the_values() -> None:
    ok = rt.cudaError_t.cudaSuccess
    assert cuda_runtime.check((ok,), "x") is None
    assert cuda_runtime.check(ok, "x") is None
    assert cuda_runtime.check((ok, 7), "x") == 7
    assert cuda_runtime.check((ok, 1, 2), "x") == (1, 2)


def test_each_error_class_has_its_own_hint() -> None:
    err = rt.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(CudaError, match=r"cudaMalloc\(8\) failed: cudaErrorMemoryAllocation: .*out of memory"):
        cuda_runtime.check((err, None), "cudaMalloc(8)")
    with pytest.raises(CudaError, match=r"cudaErrorInvalidDevice.*cudaGetDeviceCount") as info:
        cuda_runtime.check((rt.cudaError_t.cudaErrorInvalidDevice,), "cudaSetDevice(9)")
    assert not cuda_runtime.no_device(info.value)
    with pytest.raises(CudaError, match="CUDA_LAUNCH_BLOCKING=1"):
        cuda_runtime.check((rt.cudaError_t.cudaErrorLaunchFailure,), "cudaStreamSynchronize")


def test_comm_cuda_error_is_the_one_class() -> None:
    from fi_ffi.comm import cuda as comm_cuda

    assert comm_cuda.CudaError is CudaError


def test_driver_results_become_the_same_error() -> None:  # fi_ffi.cuda.driver's cffi calls (event, staging copy)
    exc = cuda_runtime.driver_error(2, "cuMemcpyHtoDAsync")
    assert type(exc) is CudaError and exc.code == 2 and "out of memory" in str(exc)
    assert str(exc).startswith("cuMemcpyHtoDAsync failed: ") and exc.name in str(exc)  # CUDA_ERROR_... / CUresult 2
    missing = cuda_runtime.no_driver("cuEventRecord")
    assert cuda_runtime.no_device(missing) and "libcuda.so.1" in str(missing)
    from fi_ffi.cuda import driver

    if not driver.probe().found:  # no driver at all: named so, with the fix (not "check nvidia-smi")
        assert str(missing).startswith("cuEventRecord failed: no NVIDIA driver found (libcuda.so.1")
        assert "Install the NVIDIA driver (>= 580" in missing.hint
    else:  # a driver whose cuInit fails
        assert "cuInit" in str(missing) and "nvidia-smi" in str(missing)


def test_device_queries_say_no_gpu_as_unsupported_device() -> None:  # the one documented conversion
    from fi_ffi.cuda import device
    from fi_ffi.errors import UnsupportedDeviceError

    if not _no_gpu():
        pytest.skip("a usable GPU is present")
    with pytest.raises(UnsupportedDeviceError, match=r"no CUDA device is available \(cudaGetDevice failed") as info:
        device.current_device()
    assert isinstance(info.value.__cause__, CudaError) and cuda_runtime.no_device(info.value.__cause__)


@needs_no_gpu
def test_device_scope_refuses_on_entry_with_the_one_cuda_error() -> None:
    # what workspace allocation and MLA's schedule copy stand in: no usable GPU means a CudaError naming the call,
    # raised before the block runs and with nothing to restore afterwards
    ran = []
    scope = cuda_runtime.DeviceScope(0)
    with pytest.raises(CudaError, match=r"^cudaGetDevice failed: cudaError\w+") as info, scope:
        ran.append(True)
    assert ran == [] and scope.previous is None
    assert cuda_runtime.no_device(info.value)


@pytest.mark.parametrize("err", [901, rt.cudaError_t(901), (901,), (901, None)])
def test_an_int_code_is_named_as_its_enum_is(err: object) -> None:
    # a result whose code is a plain int (a stand-in runtime, a raw value): cuda-bindings 13.0 names only its
    # cudaError_t enum, so the name and description come from the enum made of the code
    with pytest.raises(CudaError) as info:
        cuda_runtime.check(err, "cudaStreamEndCapture")
    assert (info.value.code, info.value.name) == (901, "cudaErrorStreamCaptureInvalidated")
    assert "capture" in info.value.description


def test_a_code_no_release_knows_is_named_by_its_number() -> None:
    exc = cuda_runtime.error(987654, "cudaFoo")
    assert exc.code == 987654 and str(exc).startswith("cudaFoo failed: ")
