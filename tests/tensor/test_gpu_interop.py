"""``fi_ffi.as_tensor`` with GPU producers: torch CUDA tensors, CuPy arrays, cuda.core buffers and views, and
CUDA-array-interface objects whose device the driver reports (gated by FI_FFI_RUN_GPU_TESTS=1).

Each descriptor is checked against the producer's own account of its memory (pointer, shape, strides,
dtype, device), and one op (RMSNorm) runs on CuPy arrays against a float32 numpy reference
(tolerance 5e-3 absolute and relative for float16 outputs of magnitude ~1-4).
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi import dtypes
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.tensor import intake
from fi_ffi.tensor.descriptor import Tensor
from fi_ffi.tensor.intake import as_tensor

torch = require_torch()

pytestmark = pytest.mark.gpu

TORCH_DTYPES = [
    (torch.float16, dtypes.float16),
    (torch.bfloat16, dtypes.bfloat16),
    (torch.float32, dtypes.float32),
    (torch.int8, dtypes.int8),
    (torch.int32, dtypes.int32),
    (torch.int64, dtypes.int64),
    (torch.uint8, dtypes.uint8),
    (torch.bool, dtypes.bool_),
    (torch.float8_e4m3fn, dtypes.float8_e4m3fn),
    (torch.float8_e5m2, dtypes.float8_e5m2),
]


def record(t: Tensor) -> tuple[Any, ...]:
    ffi = get_ffi()
    dl = ffi.cast("DLTensor*", t._dl_addr)
    n = dl.ndim
    return (
        int(ffi.cast("uintptr_t", dl.data)),
        (dl.device.device_type, dl.device.device_id),
        (dl.dtype.code, dl.dtype.bits, dl.dtype.lanes),
        tuple(dl.shape[i] for i in range(n)),
        tuple(dl.strides[i] for i in range(n)),
        dl.byte_offset,
    )


def fields(t: Tensor) -> tuple[Any, ...]:
    assert record(t) == (
        t.data_ptr,
        tuple(t.device),
        (t.dtype.code, t.dtype.bits, t.dtype.lanes),
        t.shape,
        t.strides,
        0,
    )
    return (t.data_ptr, t.shape, t.strides, t.dtype, t.device)


def torch_fields(x: torch.Tensor, dtype: dtypes.DType) -> tuple[Any, ...]:
    device = dtypes.cuda(x.device.index) if x.is_cuda else dtypes.cpu()
    return (x.data_ptr(), tuple(x.shape), x.stride(), dtype, device)


# ---- torch --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("torch_dtype", "expected"), TORCH_DTYPES, ids=[d.name for _, d in TORCH_DTYPES])
def test_torch_cuda_tensor(torch_dtype: torch.dtype, expected: dtypes.DType) -> None:
    x = torch.zeros(6, 40, device="cuda:0").to(torch_dtype)
    t = as_tensor(x, name="x")
    assert fields(t) == torch_fields(x, expected)
    assert t.owner is x
    # the DLPack route (taken when a stream must be ordered) describes the same memory
    assert fields(as_tensor(x, stream=torch.cuda.current_stream())) == fields(t)


@pytest.mark.parametrize(
    "view",
    [
        lambda b: b[2:, 4:12],
        lambda b: b[3],
        lambda b: b[1:7:2, 5:],
        lambda b: b.t()[3:],
        lambda b: b.view(4, 2, 16)[1:, :, 8:].permute(2, 0, 1),
        lambda b: b[5:6, 1:2].expand(3, 7),
    ],
    ids=["window", "row", "row_step", "transposed_offset", "3d_permuted", "expanded"],
)
def test_torch_view_with_storage_offset_on_cuda0(view: Any) -> None:
    base = torch.arange(8 * 16, dtype=torch.float16, device="cuda:0").view(8, 16)
    v = view(base)
    t = as_tensor(v, name="v")
    assert t.data_ptr == base.data_ptr() + v.storage_offset() * 2
    assert fields(t) == torch_fields(v, dtypes.float16)
    assert fields(intake._from_dlpack(v, "v", -1)) == fields(t)
    # every element found through (data_ptr, strides) is the view's
    flat = base.flatten().cpu()
    got = [
        flat[(t.data_ptr - base.data_ptr()) // 2 + sum(i * s for i, s in zip(idx, t.strides, strict=True))]
        for idx in np.ndindex(*t.shape)
    ]
    assert torch.equal(torch.stack(got).view(v.shape), v.cpu())


def test_torch_storage_offset_is_folded() -> None:
    base = torch.zeros(8, 16, dtype=torch.float16, device="cuda:0")
    v = base[2:, 4:12]
    assert v.storage_offset() == 36
    t = as_tensor(v)
    assert t.data_ptr == base.data_ptr() + 72
    assert t.strides == (16, 1)
    assert record(t)[5] == 0


def test_torch_owner_is_kept_alive() -> None:
    x = torch.ones(4, 4, device="cuda")
    ref = weakref.ref(x)
    t = as_tensor(x)
    del x
    gc.collect()
    assert ref() is not None
    del t
    gc.collect()
    assert ref() is None


def test_torch_cpu_and_pinned_tensors_are_host_descriptors() -> None:
    for x in (torch.zeros(3, 5), torch.zeros(3, 5).pin_memory()):
        t = as_tensor(x)
        assert t.device.is_host
        assert (t.data_ptr, t.shape, t.strides, t.dtype) == (x.data_ptr(), (3, 5), (5, 1), dtypes.float32)


def test_torch_parameter_and_requires_grad() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 8, device="cuda", dtype=torch.float16))
    assert fields(as_tensor(p)) == torch_fields(p, dtypes.float16)


@pytest.mark.parametrize(
    ("make", "error", "text"),
    [
        (lambda: torch.zeros(3, device="cuda", dtype=torch.float64), TypeError, r"^x: unsupported dtype"),
        (lambda: torch.zeros(3, device="cuda", dtype=torch.complex64), TypeError, r"^x: unsupported dtype"),
        (lambda: torch.zeros(3, 3, device="cuda").to_sparse(), TypeError, r"^x: expected a strided"),
        (lambda: torch.zeros(3, device="meta"), ValueError, r"^x: torch tensors on meta are not supported"),
        (lambda: torch._neg_view(torch.zeros(3, device="cuda")), ValueError, r"^x: the tensor is a lazily negated"),
    ],
    ids=["float64", "complex64", "sparse", "meta", "neg_view"],
)
def test_torch_refusals(make: Any, error: type[Exception], text: str) -> None:
    x = make()
    with pytest.raises(error, match=text):
        as_tensor(x, name="x")


def test_torch_never_synchronizes_by_default_and_orders_on_request() -> None:
    x = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream()
    for stream in (side, side.cuda_stream, None, 0):
        assert fields(as_tensor(x, stream=stream)) == fields(as_tensor(x))
    # a stream made for the call lives until torch has ordered its work on it
    assert fields(as_tensor(x, stream=torch.cuda.Stream())) == fields(as_tensor(x))
    torch.cuda.synchronize()


# ---- CuPy -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


def cupy_fields(a: Any, dtype: dtypes.DType) -> tuple[Any, ...]:
    return (a.data.ptr, a.shape, tuple(s // a.itemsize for s in a.strides), dtype, dtypes.cuda(a.device.id))


@pytest.mark.parametrize("np_dtype", ["float16", "float32", "int32", "int64", "uint8"])
def test_cupy_array(cupy: Any, np_dtype: str) -> None:
    base = cupy.zeros((8, 24), np_dtype)
    for a in (base, base[2:, 3:19], base.T, base[:, 5]):
        t = as_tensor(a, name="a")
        assert fields(t) == cupy_fields(a, dtypes.dtype(np_dtype))
        assert t.owner is a


class CAIOnly:
    """Exposes only another array's __cuda_array_interface__ (optionally naming a producer stream)."""

    def __init__(self, array: Any, stream: int | None = None) -> None:
        self.array = array
        self.stream = stream

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        iface = dict(self.array.__cuda_array_interface__)
        iface["stream"] = self.stream
        return iface


def test_cai_device_comes_from_the_driver(cupy: Any) -> None:
    a = cupy.arange(8 * 24, dtype=cupy.float16).reshape(8, 24)[1:, ::2]
    t = as_tensor(CAIOnly(a), name="a")
    assert fields(t) == cupy_fields(a, dtypes.float16)
    assert fields(t) == fields(as_tensor(a))


def test_cai_on_a_second_device(cupy: Any) -> None:
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU")
    with cupy.cuda.Device(1):
        a = cupy.zeros((4, 4), cupy.float32)
    assert as_tensor(CAIOnly(a)).device == dtypes.cuda(1)


def test_cai_pointer_unknown_to_cuda_is_refused() -> None:
    class Fake:
        @property
        def __cuda_array_interface__(self) -> dict[str, Any]:
            return {"shape": (2,), "typestr": "<f2", "data": (0x7F12_3456_0000, False), "version": 3}

    with pytest.raises(ValueError, match=r"^y: __cuda_array_interface__ pointer 0x7f1234560000 is not memory"):
        as_tensor(Fake(), name="y")


def test_cai_producer_stream_is_waited_on_only_when_asked(cupy: Any) -> None:
    produce, consume = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    a = cupy.zeros((64, 64), cupy.float16)
    obj = CAIOnly(a, stream=produce.ptr)
    expected = cupy_fields(a, dtypes.float16)
    assert fields(as_tensor(obj)) == expected  # default: nothing ordered
    assert fields(as_tensor(obj, stream=consume.ptr)) == expected  # event recorded on produce, waited on consume
    assert fields(as_tensor(obj, stream=consume)) == expected
    assert fields(as_tensor(obj, stream=None)) == expected  # legacy default stream waits
    consume.synchronize()


def test_cupy_dlpack_with_streams(cupy: Any) -> None:
    a = cupy.ones((16, 16), cupy.float16)
    s = cupy.cuda.Stream(non_blocking=True)
    for stream in (-1, None, 0, s, s.ptr):
        assert fields(as_tensor(a, stream=stream)) == cupy_fields(a, dtypes.float16)
    # a stream made for the call (CuPy destroys it with the object) lives until CuPy has waited on it
    assert fields(as_tensor(a, stream=cupy.cuda.Stream(non_blocking=True))) == cupy_fields(a, dtypes.float16)
    cupy.cuda.Device().synchronize()


def test_rmsnorm_on_cupy_arrays(cupy: Any) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 512)).astype(np.float16)
    w = rng.standard_normal(512).astype(np.float16)
    big = cupy.asarray(np.concatenate([x, np.zeros((7, 64), np.float16)], axis=1))
    xd, wd = big[:, :512], cupy.asarray(w)  # rows strided by 576 elements
    out = cupy.empty((7, 512), cupy.float16)
    stream = cupy.cuda.get_current_stream()
    assert fi_ffi.rmsnorm(xd, wd, out=out, eps=1e-6, stream=stream.ptr) is out
    stream.synchronize()
    xf, wf = x.astype(np.float32), w.astype(np.float32)
    ref = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * wf
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), ref, atol=5e-3, rtol=5e-3)


# ---- cuda.core -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core_device() -> Any:
    core = pytest.importorskip("cuda.core")
    dev = core.Device(0)
    dev.set_current()
    return dev


def test_cuda_core_buffer(core_device: Any) -> None:
    buf = core_device.allocate(4096, stream=core_device.default_stream)
    t = as_tensor(buf, name="buf")
    assert t.data_ptr == int(buf.handle)
    assert t.device == dtypes.cuda(0)
    assert t.ndim == 1 and t.nbytes == 4096
    assert t.owner is buf


def test_cuda_core_managed_and_pinned_buffers_keep_their_device_types(core_device: Any) -> None:
    import cuda.core as core

    stream = core_device.default_stream
    managed = core.ManagedMemoryResource().allocate(4096, stream=stream)
    pinned = core.LegacyPinnedMemoryResource().allocate(4096, stream=stream)
    assert as_tensor(managed).device == dtypes.Device(dtypes.CUDA_MANAGED, 0)
    assert as_tensor(pinned).device == dtypes.Device(dtypes.CUDA_HOST, 0)
    assert as_tensor(pinned).data_ptr == int(pinned.handle)


def test_cuda_core_strided_memory_view_of_torch(core_device: Any) -> None:
    from cuda.core.utils import StridedMemoryView

    # float16: StridedMemoryView cannot re-export bfloat16 without ml_dtypes (as_tensor of the torch tensor can)
    x = torch.zeros(8, 32, dtype=torch.float16, device="cuda:0")[1:, 4:20]
    view = StridedMemoryView.from_dlpack(x, -1)
    t = as_tensor(view, name="v")
    assert fields(t) == torch_fields(x, dtypes.float16)
    assert t.owner is view
