"""``fi-ffi smoke``: run each available op once on small inputs, on the GPU, against a numpy reference.

Written with cuda-python only (no torch), as a runtime would use fi_ffi: device memory from ``cudaMalloc``,
descriptors from raw pointers, one non-blocking stream. Each check prints pass/fail, the largest error and the
host time per call (mean over repeated asynchronous calls, measured after a warm-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tensor import Tensor


@dataclass
class SmokeResult:
    """Outcome of one check: ``max_error`` against the reference, ``host_us`` per call (host time)."""

    name: str
    passed: bool
    max_error: float
    host_us: float
    detail: str = ""


class Device:
    """Device memory and one stream on GPU ``ordinal``, freed on :meth:`close` (cuda.bindings runtime)."""

    def __init__(self, ordinal: int = 0) -> None:
        from cuda.bindings import runtime as rt

        self.rt = rt
        self.ordinal = ordinal
        self._check(rt.cudaSetDevice(ordinal), "cudaSetDevice")
        err, self.stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
        self._check((err,), "cudaStreamCreateWithFlags")
        self.stream_handle = int(self.stream)
        self._allocations: list[int] = []

    def _check(self, result: tuple[Any, ...], what: str) -> None:
        if result[0] != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{what} failed: {result[0].name}")

    def upload(self, host: np.ndarray, dtype: str | None = None) -> Tensor:
        """Copy ``host`` to new device memory; returns a contiguous descriptor (dtype defaults to host's)."""
        host = np.ascontiguousarray(host)
        err, ptr = self.rt.cudaMalloc(max(host.nbytes, 1))
        self._check((err,), "cudaMalloc")
        self._allocations.append(int(ptr))
        self._check(self.rt.cudaMemcpy(int(ptr), host.ctypes.data, host.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy H2D")
        return Tensor.from_pointer(int(ptr), host.shape, dtype or host.dtype.name, self.ordinal)

    def download(self, t: Tensor, np_dtype: Any) -> np.ndarray:
        """Copy a contiguous device tensor back to a new numpy array (after synchronizing the stream)."""
        self.sync()
        out = np.empty(t.shape, dtype=np_dtype)
        self._check(self.rt.cudaMemcpy(out.ctypes.data, t.data_ptr, out.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")
        return out

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._allocations:
            self.rt.cudaFree(ptr)
        self._allocations.clear()
        self.rt.cudaStreamDestroy(self.stream)


def host_time_us(fn: Callable[[], Any], calls: int = 2000) -> float:
    """Mean host time of one call of ``fn`` in microseconds, after 50 warm-up calls."""
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _rms_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    return x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w32


def check_rmsnorm(dev: Device) -> SmokeResult:
    from .ops.norm import rmsnorm

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 512)).astype(np.float16), rng.standard_normal(512).astype(np.float16)
    xd, wd, od = dev.upload(x), dev.upload(w), dev.upload(np.zeros_like(x))
    rmsnorm(xd, wd, od, eps=1e-6, stream=dev.stream_handle)
    err = float(np.max(np.abs(dev.download(od, np.float16).astype(np.float32) - _rms_reference(x, w, 1e-6))))
    us = host_time_us(lambda: rmsnorm(xd, wd, od, eps=1e-6, stream=dev.stream_handle))
    return SmokeResult("rmsnorm f16 [8, 512]", err < 1e-2, err, us)


def check_fused_add_rmsnorm(dev: Device) -> SmokeResult:
    from .ops.norm import fused_add_rmsnorm

    rng = np.random.default_rng(1)
    x, r = rng.standard_normal((4, 256)).astype(np.float16), rng.standard_normal((4, 256)).astype(np.float16)
    w = rng.standard_normal(256).astype(np.float16)
    xd, rd, wd = dev.upload(x), dev.upload(r), dev.upload(w)
    fused_add_rmsnorm(xd, rd, wd, stream=dev.stream_handle)
    expected = _rms_reference((x.astype(np.float32) + r.astype(np.float32)).astype(np.float16), w, 1e-6)
    err = float(np.max(np.abs(dev.download(xd, np.float16).astype(np.float32) - expected)))
    # Host time on copies so the verified buffers stay as checked.
    xc, rc = dev.upload(x), dev.upload(r)
    us = host_time_us(lambda: fused_add_rmsnorm(xc, rc, wd, stream=dev.stream_handle))
    return SmokeResult("fused_add_rmsnorm f16 [4, 256]", err < 2e-2, err, us)


CHECKS: list[Callable[[Device], SmokeResult]] = [check_rmsnorm, check_fused_add_rmsnorm]


def run(ordinal: int = 0) -> list[SmokeResult]:
    """Run every check on GPU ``ordinal``; a check that raises is reported as failed with the error text."""
    dev = Device(ordinal)
    results = []
    try:
        for check in CHECKS:
            try:
                results.append(check(dev))
            except Exception as exc:
                name = check.__name__.removeprefix("check_")
                results.append(SmokeResult(name, False, float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"))
    finally:
        dev.close()
    return results
