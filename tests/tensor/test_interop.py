"""``fi_ffi.as_tensor`` on the CPU machine: numpy through DLPack, hand-made DLPack / CUDA-array-interface /
array-interface producers, cuda.core's StridedMemoryView when installed. Every descriptor is also read back
from its DLTensor record, the bytes a kernel would see.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from typing import Any

import numpy as np
import pytest

import fi_ffi
from fi_ffi import dtypes
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.cuda import driver
from fi_ffi.tensor import intake
from fi_ffi.tensor.descriptor import Tensor
from fi_ffi.tensor.intake import as_tensor

NUMPY_DTYPES = [
    (np.float16, dtypes.float16),
    (np.float32, dtypes.float32),
    (np.int8, dtypes.int8),
    (np.int32, dtypes.int32),
    (np.int64, dtypes.int64),
    (np.uint8, dtypes.uint8),
    (np.uint16, dtypes.uint16),
    (np.uint32, dtypes.uint32),
    (np.bool_, dtypes.bool_),
]


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def record(t: Tensor) -> dict[str, Any]:
    """The DLTensor a kernel would read for ``t``, decoded through cffi."""
    ffi = get_ffi()
    dl = ffi.cast("DLTensor*", t._dl_addr)
    n = dl.ndim
    return {
        "data": int(ffi.cast("uintptr_t", dl.data)),
        "device": (dl.device.device_type, dl.device.device_id),
        "dtype": (dl.dtype.code, dl.dtype.bits, dl.dtype.lanes),
        "shape": tuple(dl.shape[i] for i in range(n)),
        "strides": tuple(dl.strides[i] for i in range(n)),
        "byte_offset": dl.byte_offset,
    }


def assert_describes(
    t: Tensor, ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: dtypes.DType, device: dtypes.Device
) -> None:
    assert type(t) is Tensor
    assert (t.data_ptr, t.shape, t.strides, t.dtype, t.device, t.ndim) == (
        ptr,
        shape,
        strides,
        dtype,
        device,
        len(shape),
    )
    assert record(t) == {
        "data": ptr,
        "device": tuple(device),
        "dtype": (dtype.code, dtype.bits, dtype.lanes),
        "shape": shape,
        "strides": strides,
        "byte_offset": 0,
    }


def elem_strides(a: np.ndarray) -> tuple[int, ...]:
    return tuple(s // a.itemsize for s in a.strides)


# ---- numpy through DLPack ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("np_dtype", "expected"), NUMPY_DTYPES, ids=[d.name for _, d in NUMPY_DTYPES])
def test_every_supported_numpy_dtype_maps_to_its_dlpack_triple(np_dtype: Any, expected: dtypes.DType) -> None:
    a = np.zeros((3, 5), np_dtype)
    t = as_tensor(a, name="x")
    assert_describes(t, address(a), (3, 5), (5, 1), expected, dtypes.cpu())
    assert t.owner is a


def test_ml_dtypes_arrays_go_through_the_array_interface() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for np_dtype, expected in [
        (ml_dtypes.bfloat16, dtypes.bfloat16),
        (ml_dtypes.float8_e4m3fn, dtypes.float8_e4m3fn),
        (ml_dtypes.float8_e5m2, dtypes.float8_e5m2),
    ]:
        a = np.zeros((4, 6), np_dtype)[:, 1:5]
        assert_describes(as_tensor(a), address(a), (4, 4), (6, 1), expected, dtypes.cpu())


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a,
        lambda a: a.T,
        lambda a: a[1:, ::2],
        lambda a: a[2:5, 3:9],
        lambda a: a[:, 4],
        lambda a: a[3],
        lambda a: a.reshape(2, 3, 16)[:, 1:, ::4].transpose(2, 0, 1),
        lambda a: np.broadcast_to(a[0], (5, 16)),
    ],
    ids=["contiguous", "transposed", "rows_and_step", "window", "column", "row", "3d_permuted", "broadcast"],
)
def test_strides_are_in_elements_and_offsets_are_folded(view: Any) -> None:
    base = np.arange(6 * 16, dtype=np.float32).reshape(6, 16)
    v = view(base)
    t = as_tensor(v, name="v")
    assert_describes(t, address(v), v.shape, elem_strides(v), dtypes.float32, dtypes.cpu())
    # walk the memory as a kernel would: every element found through (data_ptr, strides) is the view's
    ffi = get_ffi()
    for index in np.ndindex(*v.shape):
        offset = sum(i * s for i, s in zip(index, t.strides, strict=True))
        assert ffi.cast("float*", t.data_ptr)[offset] == v[index]


def test_window_pointer_is_base_plus_offset_in_bytes() -> None:
    base = np.zeros((8, 10), np.float16)
    t = as_tensor(base[3:, 2:7])
    assert t.data_ptr == address(base) + (3 * 10 + 2) * 2
    assert t.strides == (10, 1)
    assert record(t)["byte_offset"] == 0


def test_zero_dim_and_empty_arrays() -> None:
    s = np.array(7, np.int32)
    assert_describes(as_tensor(s), address(s), (), (), dtypes.int32, dtypes.cpu())
    e = np.zeros((0, 4), np.uint8)
    t = as_tensor(e)
    assert t.shape == (0, 4) and t.numel == 0 and t.dtype == dtypes.uint8


def test_read_only_arrays_are_described() -> None:
    a = np.zeros((2, 8), np.float16)
    a.flags.writeable = False
    assert_describes(as_tensor(a), address(a), (2, 8), (8, 1), dtypes.float16, dtypes.cpu())


def test_owner_keeps_the_producer_alive_and_nothing_else_does() -> None:
    a = np.ones((64, 32), np.float16)
    ref = weakref.ref(a)
    t = as_tensor(a[4:, :16], name="x")
    del a
    gc.collect()
    assert ref() is not None, "the descriptor must keep the producer alive"
    view = t.owner
    assert view.base is ref()
    assert t.data_ptr == address(view)
    del t, view
    gc.collect()
    # the DLPack capsule (and its deleter's reference) did not leak: the array is gone with the descriptor
    assert ref() is None


@pytest.mark.parametrize("np_dtype", [np.float64, np.complex64, np.int16, np.uint64])
def test_unsupported_dtype_is_a_type_error_naming_the_argument(np_dtype: Any) -> None:
    with pytest.raises(TypeError, match=r"^query: unsupported DLPack dtype"):
        as_tensor(np.zeros(4, np_dtype), name="query")


def test_negative_strides_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"^k: negative strides are not supported"):
        as_tensor(np.zeros((4, 4), np.float16)[::-1], name="k")


def test_more_than_16_dimensions_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"^x: at most 16 dimensions"):
        as_tensor(np.zeros((1,) * 17, np.float16), name="x")


def test_byte_strides_not_a_multiple_of_the_itemsize_are_rejected() -> None:
    # field 'a' of a packed record: float16 every 3 bytes (numpy's DLPack refuses it; the array interface shows it)
    packed = np.zeros(4, dtype=[("a", "<f2"), ("b", "u1")])["a"]
    with pytest.raises(ValueError, match=r"^w: strides \(3,\) \(bytes\) are not multiples of the item size 2"):
        as_tensor(packed, name="w")


@pytest.mark.parametrize("obj", [object(), 3, "tensor", [1.0, 2.0], None, b"bytes"])
def test_objects_without_a_protocol_are_a_type_error_naming_the_argument(obj: object) -> None:
    with pytest.raises(TypeError, match=r"^weight: expected a fi_ffi.Tensor, a torch tensor, a DLPack producer"):
        as_tensor(obj, name="weight")


def test_a_tensor_is_returned_as_is() -> None:
    t = Tensor.from_pointer(0x1000, (2, 3), "bfloat16", "cuda:1")
    assert as_tensor(t) is t
    assert fi_ffi.as_tensor is as_tensor


def test_matches_tensor_from_pointer_slot_by_slot() -> None:
    a = np.zeros((5, 7), np.int64)[1:, 2:]
    t = as_tensor(a)
    ref = Tensor.from_pointer(address(a), a.shape, "int64", "cpu", elem_strides(a), owner=a)
    for slot in Tensor.__slots__:
        if slot in ("__weakref__", "_block", "_dl_addr"):
            continue
        if slot == "owner":
            assert t.owner is ref.owner
        else:
            assert getattr(t, slot) == getattr(ref, slot), slot
    assert record(t) == record(ref)
    assert weakref.ref(t)() is t


def test_neither_torch_nor_cupy_is_imported() -> None:
    code = (
        "import sys, numpy as np, fi_ffi\n"
        "t = fi_ffi.as_tensor(np.zeros((2, 3), np.float16))\n"
        "class C:\n"
        "    __cuda_array_interface__ = {'shape': (2,), 'typestr': '<f4', 'data': (4096, False), 'version': 3}\n"
        "try:\n"
        "    fi_ffi.as_tensor(C())\n"
        "except ValueError:\n"
        "    pass  # a CUDA driver is present and knows the fake pointer is not its memory\n"
        "bad = [m for m in ('torch', 'cupy', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(fi_ffi.__file__)), *sys.path]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_private_dlpack_structs_match_the_checked_declarations() -> None:
    """intake declares DLTensor with ``data`` as an integer; every offset must match fi_ffi.abi.cdefs (whose
    layouts tests/abi/test_layout.py checks against dlpack.h)."""
    mine, ref = intake._capsule_api()[0], get_ffi()
    pairs = {
        "DLTensor": [
            ("data", "data"),
            ("device_type", "device.device_type"),
            ("device_id", "device.device_id"),
            ("ndim", "ndim"),
            ("code", "dtype.code"),
            ("bits", "dtype.bits"),
            ("lanes", "dtype.lanes"),
            ("shape", "shape"),
            ("strides", "strides"),
            ("byte_offset", "byte_offset"),
        ],
        "DLManagedTensorVersioned": [
            ("major", "version.major"),
            ("minor", "version.minor"),
            ("manager_ctx", "manager_ctx"),
            ("deleter", "deleter"),
            ("flags", "flags"),
            ("dl_tensor", "dl_tensor"),
        ],
    }
    for struct_name, fields in pairs.items():
        assert mine.sizeof(struct_name) == ref.sizeof(struct_name)
        for field, ref_path in fields:
            ref_offset = ref.offsetof(struct_name, *ref_path.split("."))
            assert mine.offsetof(struct_name, field) == ref_offset, (struct_name, field)


# ---- DLPack protocol details, with a recording producer -----------------------------------------------------


def _numpy_takes_max_version() -> bool:
    try:
        np.zeros(1).__dlpack__(max_version=(1, 0))
    except TypeError:
        return False
    return True


NUMPY_TAKES_MAX_VERSION = _numpy_takes_max_version()  # numpy >= 2.1; the declared lower bound 1.26 does not


class Producer:
    """A DLPack producer around a numpy array that records how it was asked, and can pretend to be on CUDA.

    The capsule is numpy's, so the descriptor describes host memory whatever ``device`` claims; the tests
    below look at the protocol (stream, max_version), not at the device.
    """

    def __init__(self, array: np.ndarray, device: tuple[int, int] = (1, 0), legacy: bool = False) -> None:
        self.array = array
        self.device = device
        self.legacy = legacy
        self.calls: list[dict[str, Any]] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device

    def __dlpack__(self, *, stream: Any = None, **kwargs: Any) -> Any:
        self.calls.append(dict(kwargs, stream=stream))
        if self.legacy and kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        if not NUMPY_TAKES_MAX_VERSION:  # numpy < 2.1: a legacy capsule is a valid answer to a max_version request
            kwargs.pop("max_version", None)
        return self.array.__dlpack__(**kwargs)


class LegacyProducer(Producer):
    def __init__(self, array: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        super().__init__(array, device, legacy=True)


def test_versioned_capsule_is_requested_with_max_version() -> None:
    p = Producer(np.zeros((2, 4), np.float16))
    t = as_tensor(p)
    assert p.calls == [{"stream": None, "max_version": (1, 3)}]
    assert t.owner is p and t.data_ptr == address(p.array)


def test_legacy_producer_falls_back_once_and_is_remembered() -> None:
    a = np.zeros((3, 4), np.float32)[:, 1:]
    p = LegacyProducer(a)
    t = as_tensor(p, name="x")
    assert_describes(t, address(a), (3, 3), (4, 1), dtypes.float32, dtypes.cpu())
    assert p.calls == [{"stream": None, "max_version": (1, 3)}, {"stream": None}]
    as_tensor(p)
    assert p.calls[2:] == [{"stream": None}]  # no second failed try


@pytest.mark.parametrize(
    ("stream", "expected"),
    [(-1, -1), (None, None), (0, 1), (1, 1), (2, 2), (0x7F00DEAD, 0x7F00DEAD)],
    ids=["default_no_sync", "legacy_default", "zero_is_legacy", "legacy", "per_thread", "handle"],
)
def test_cuda_producers_get_the_consumer_stream(stream: Any, expected: Any) -> None:
    p = Producer(np.zeros(4, np.float16), device=(2, 0))
    if stream == -1:
        as_tensor(p)
    else:
        as_tensor(p, stream=stream)
    assert p.calls[-1]["stream"] == expected


def test_stream_objects_are_converted() -> None:
    class CudaStream:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, 0xBEEF)

    p = Producer(np.zeros(4, np.float16), device=(13, 0))
    as_tensor(p, stream=CudaStream())
    assert p.calls[-1]["stream"] == 0xBEEF


def test_a_stream_object_made_for_the_call_lives_until_the_export() -> None:
    refs: list[weakref.ref[Any]] = []

    class OwnedStream:
        """Like ``cupy.cuda.Stream()``: the handle dies with the object."""

        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, 0x5151)

    def new_stream() -> OwnedStream:
        s = OwnedStream()
        refs.append(weakref.ref(s))
        return s

    seen: list[bool] = []

    class Checks(Producer):
        def __dlpack__(self, *, stream: Any = None, **kwargs: Any) -> Any:
            seen.append(refs[-1]() is not None)
            return super().__dlpack__(stream=stream, **kwargs)

    p = Checks(np.zeros(4, np.float16), device=(2, 0))
    as_tensor(p, stream=new_stream())
    assert p.calls[-1]["stream"] == 0x5151
    assert seen == [True], "the stream object was released before the producer used its handle"


def test_host_producers_always_get_stream_none() -> None:
    for device in [(1, 0), (3, 0)]:
        p = Producer(np.zeros(4, np.float16), device=device)
        as_tensor(p, stream=0x1234)
        assert p.calls[-1]["stream"] is None
    # numpy itself raises for any stream but None
    as_tensor(np.zeros(3, np.float16), stream=5)


@pytest.mark.parametrize(("stream", "error"), [(-2, ValueError), (True, TypeError), ("s", TypeError), (1.0, TypeError)])
def test_bad_streams_are_rejected(stream: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^stream: "):
        as_tensor(np.zeros(2, np.float16), stream=stream)


def test_producer_refusal_is_a_type_error_naming_the_argument() -> None:
    class Refuses:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 0)

        def __dlpack__(self, **kwargs: Any) -> Any:
            raise BufferError("cannot export a tensor that requires grad")

    with pytest.raises(TypeError, match=r"^bias: Refuses.__dlpack__ refused to export it: cannot export") as info:
        as_tensor(Refuses(), name="bias")
    assert isinstance(info.value.__cause__, BufferError)


def test_non_capsule_export_is_a_type_error() -> None:
    class NotACapsule:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

        def __dlpack__(self, **kwargs: Any) -> Any:
            return object()

    with pytest.raises(TypeError, match=r"^x: NotACapsule.__dlpack__ returned object, not an unconsumed DLPack"):
        as_tensor(NotACapsule(), name="x")


def test_dlpack_device_types_map_and_others_are_rejected() -> None:
    for device_type in (1, 2, 3, 13):
        assert intake._device(device_type, 1, "x") == dtypes.Device(device_type, 1)
    for device_type in (4, 7, 10, 14):
        with pytest.raises(ValueError, match=rf"^x: device type {device_type} is not supported"):
            intake._device(device_type, 0, "x")


def test_refused_dlpack_falls_back_to_the_array_interface() -> None:
    backing = np.zeros((4, 4), np.int32)

    class Refuses:
        __array_interface__ = backing.__array_interface__

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

        def __dlpack__(self, **kwargs: Any) -> Any:
            raise BufferError("no")

    assert_describes(as_tensor(Refuses()), address(backing), (4, 4), (4, 1), dtypes.int32, dtypes.cpu())


def test_strided_memory_view_of_numpy() -> None:
    utils = pytest.importorskip("cuda.core.utils")
    a = np.zeros((6, 8), np.float16)[1:, ::2]
    view = utils.StridedMemoryView.from_dlpack(a, -1)
    t = as_tensor(view, name="v")
    assert_describes(t, address(a), (5, 4), (8, 2), dtypes.float16, dtypes.cpu())
    assert t.owner is view


# ---- __cuda_array_interface__ and __array_interface__ ----------------------------------------------------------

FAKE = 0x7F12_3456_0000  # never dereferenced


class CAI:
    """A device array that speaks only the CUDA array interface (the pointer is fake)."""

    def __init__(self, **entries: Any) -> None:
        self.__cuda_array_interface__ = {
            "shape": (4, 6),
            "typestr": "<f2",
            "data": (FAKE, False),
            "version": 3,
            "strides": None,
            **entries,
        }


no_driver = pytest.mark.skipif(
    driver.load() is not None, reason="a CUDA driver is present: the pointer's device would be asked from it"
)


@no_driver
def test_cai_object_is_a_cuda_descriptor_without_a_driver() -> None:
    obj = CAI()
    t = as_tensor(obj, name="x")
    assert_describes(t, FAKE, (4, 6), (6, 1), dtypes.float16, dtypes.cuda(0))
    assert t.owner is obj


@no_driver
@pytest.mark.parametrize(
    ("entries", "shape", "strides", "dtype"),
    [
        ({"strides": (24, 2)}, (4, 6), (12, 1), dtypes.float16),
        ({"strides": (2, 12)}, (4, 6), (1, 6), dtypes.float16),
        ({"shape": (3,), "typestr": "<i4", "version": 2}, (3,), (1,), dtypes.int32),
        ({"shape": (2, 2), "typestr": "|u1", "strides": (8, 1)}, (2, 2), (8, 1), dtypes.uint8),
        ({"shape": (5,), "typestr": "<i8", "strides": (0,)}, (5,), (0,), dtypes.int64),
        ({"shape": (), "typestr": "<f4"}, (), (), dtypes.float32),
        ({"stream": 0x5555}, (4, 6), (6, 1), dtypes.float16),  # default: no synchronization, stream ignored
    ],
)
def test_cai_strides_are_converted_to_elements(
    entries: dict[str, Any], shape: tuple[int, ...], strides: tuple[int, ...], dtype: dtypes.DType
) -> None:
    assert_describes(as_tensor(CAI(**entries)), FAKE, shape, strides, dtype, dtypes.cuda(0))


@pytest.mark.parametrize(
    ("entries", "error", "text"),
    [
        ({"strides": (24, 3)}, ValueError, r"^y: strides \(24, 3\) \(bytes\) are not multiples of the item size 2"),
        ({"strides": (-12, 2)}, ValueError, r"^y: negative strides"),
        ({"strides": (12,)}, ValueError, r"^y: __cuda_array_interface__ has 1 strides for shape \(4, 6\)"),
        ({"typestr": "<f8"}, TypeError, r"^y: unsupported dtype \(typestr '<f8'"),
        ({"typestr": ">f2"}, TypeError, r"^y: big-endian data \(typestr '>f2'"),
        ({"typestr": "<c8"}, TypeError, r"^y: unsupported dtype"),
        ({"mask": object()}, ValueError, r"^y: masked arrays"),
        ({"data": FAKE}, TypeError, r"^y: __cuda_array_interface__ 'data' must be an \(address, read_only\) pair"),
        ({"data": (-5, False)}, ValueError, r"^y: __cuda_array_interface__ address -5 is out of range"),
        ({"shape": (4, -1)}, ValueError, r"^y: __cuda_array_interface__ 'shape' has a negative size"),
        ({"shape": (4, 1.5)}, TypeError, r"^y: __cuda_array_interface__ 'shape' must be a tuple of ints"),
        ({"shape": (1,) * 17}, ValueError, r"^y: at most 16 dimensions"),
    ],
)
def test_malformed_cai_is_rejected_naming_the_argument(
    entries: dict[str, Any], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        as_tensor(CAI(**entries), name="y")


def test_cai_that_is_not_a_dict_or_misses_entries() -> None:
    class NotDict:
        __cuda_array_interface__ = (("shape", (2,)),)

    with pytest.raises(TypeError, match=r"^y: __cuda_array_interface__ must be a dict, got tuple"):
        as_tensor(NotDict(), name="y")
    obj = CAI()
    del obj.__cuda_array_interface__["typestr"]
    with pytest.raises(TypeError, match=r"^y: __cuda_array_interface__ has no 'typestr' entry"):
        as_tensor(obj, name="y")


@no_driver
def test_cai_stream_ordering_needs_a_driver() -> None:
    with pytest.raises(ValueError, match=r"^y: cannot order stream 7 after the producer's stream 9"):
        as_tensor(CAI(stream=9), name="y", stream=7)
    with pytest.raises(ValueError, match=r"^y: __cuda_array_interface__ 'stream' must be None or a handle > 0"):
        as_tensor(CAI(stream=0), name="y", stream=7)
    as_tensor(CAI(stream=7), stream=7)  # same stream: nothing to order


def test_array_interface_only_objects_are_host_descriptors() -> None:
    backing = np.zeros((3, 8), np.float32)

    class HostArray:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        @property
        def __array_interface__(self) -> dict[str, Any]:
            return self.a.__array_interface__

    view = backing[:, 2:6]
    obj = HostArray(view)
    t = as_tensor(obj, name="h")
    assert_describes(t, address(view), (3, 4), (8, 1), dtypes.float32, dtypes.cpu())
    assert t.owner is obj


def test_the_producer_is_chosen_once_per_type() -> None:
    as_tensor(np.zeros(2, np.float16))
    found = intake.producers[np.ndarray]
    assert found.describe is intake._from_dlpack and found.read is intake._read_any
    assert intake.producer(np.ndarray) is found  # one object per type, the one cache
    # an interface set on the instance is not a property of the type: the type's producer asks each instance
    assert intake.producer(CAI).describe is intake._from_instance_interface


@no_driver  # CAI's pointer is fake: a driver would refuse it (on a GPU machine, test_gpu_interop reads real ones)
def test_an_interface_set_on_the_instance_is_read_from_the_instance() -> None:
    obj = CAI()
    assert intake.producer(CAI).describe is intake._from_instance_interface
    assert as_tensor(obj, name="x").owner is obj
