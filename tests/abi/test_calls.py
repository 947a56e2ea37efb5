"""Packing, results, errors, ownership and stream scoping, proven against the real ``libtvm_ffi.so`` and
``libtvm_ffi_testing.so`` (the global functions ``testing.*`` and ``ffi.*``). No mocks: every value goes
through the C ABI and comes back.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from fi_ffi import dtypes
from fi_ffi.abi import objects
from fi_ffi.abi.call import EntryPoint, Function, OpaquePtr
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.abi.frame import Frame, call, call_on, describe_frame, result
from fi_ffi.abi.runtime import api
from fi_ffi.errors import ArgumentRangeError, ArgumentTypeError, KernelError
from fi_ffi.tensor.descriptor import Tensor


def fn(name: str) -> Function:
    return Function.global_function(name)


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        1,
        -1,
        2**62,
        -(2**63),
        2**63 - 1,
        True,
        False,
        0.5,
        -1e300,
        math.inf,
        "",
        "short",
        "seven77",
        "a string of more than seven bytes",
        "ünïcødé",
        b"",
        b"bytes",
        b"longer than seven bytes \x00 nul",
    ],
)
def test_echo_round_trips_every_pod_and_string_kind(testing_lib: object, value: object) -> None:
    got = fn("testing.echo")(value)
    assert type(got) is type(value)
    assert got == value


def test_echo_nan_float(testing_lib: object) -> None:
    assert math.isnan(fn("testing.echo")(math.nan))


def test_echo_dtype_device_and_opaque_pointer(testing_lib: object) -> None:
    echo = fn("testing.echo")
    for dt in dtypes.ALL:
        assert echo(dt) == dt
    assert echo(dtypes.cuda(3)) == dtypes.Device(2, 3)
    assert echo(dtypes.cpu()) == dtypes.Device(1, 0)
    assert echo(OpaquePtr(0xDEADBEEF000)) == 0xDEADBEEF000


def test_int_argument_out_of_range_is_rejected_before_the_call(testing_lib: object) -> None:
    # the one packer's error: fi_ffi's own, a ValueError, naming the argument, the range and the fix
    for value in (2**63, -(2**63) - 1):
        with pytest.raises(
            ArgumentRangeError, match=r"^testing\.echo argument 0: -?\d+ does not fit in int64 \("
        ) as info:
            fn("testing.echo")(value)
        assert isinstance(info.value, ValueError) and "pass a value in that range" in str(info.value)
    assert fn("testing.echo")(2**63 - 1) == 2**63 - 1  # the bounds themselves pass
    assert fn("testing.echo")(-(2**63)) == -(2**63)


def test_unpackable_python_value_is_a_type_error(testing_lib: object) -> None:
    with pytest.raises(ArgumentTypeError, match=r"^testing\.echo argument 0: cannot pass a dict"):
        fn("testing.echo")({"a": 1})


def test_callee_type_check_surfaces_as_kernel_error(testing_lib: object) -> None:
    add_one = fn("testing.add_one")
    assert add_one(41) == 42
    with pytest.raises(KernelError) as info:
        add_one(1.5)
    assert info.value.kind == "TypeError"
    assert "testing.add_one" in str(info.value)
    assert "1.5" in str(info.value)  # the argument list is in the text


def test_raised_error_carries_kind_message_and_backtrace(testing_lib: object) -> None:
    with pytest.raises(KernelError) as info:
        fn("testing.test_raise_error")("ValueError", "something is off")
    err = info.value
    assert err.kind == "ValueError"
    assert err.message == "something is off"
    assert "TestRaiseError" in err.backtrace
    assert err.function == "testing.test_raise_error"
    assert err.arguments == ("const char*", "const char*")
    # The thread's error slot was emptied by the move: nothing is left to take.
    ffi = get_ffi()
    out = ffi.new("void**")
    api().TVMFFIErrorMoveFromRaised(out)
    assert out[0] == ffi.NULL


def test_error_kinds_are_preserved(testing_lib: object) -> None:
    for kind in ("RuntimeError", "IndexError", "InternalError", "CustomKind"):
        with pytest.raises(KernelError) as info:
            fn("testing.test_raise_error")(kind, "x")
        assert info.value.kind == kind


def test_zero_argument_call_of_an_exported_symbol_returns_its_signature(testing_lib: object) -> None:
    ep = EntryPoint(testing_lib, "testing_dll_schema_id_int", "testing")
    assert "testing_dll_schema_id_int(0: int) -> int" in ep.signature_text()
    assert ep(7) == 7


def test_missing_exported_symbol_is_a_clear_error(testing_lib: object) -> None:
    from fi_ffi.errors import KernelNotFoundError

    with pytest.raises(KernelNotFoundError, match="no entry point 'no_such_function'"):
        EntryPoint(testing_lib, "no_such_function", "testing")


def test_unknown_global_is_a_lookup_error(testing_lib: object) -> None:
    with pytest.raises(LookupError, match="no.such.global"):
        fn("no.such.global")


def _array(*items: int) -> objects.Array:
    arr = fn("ffi.Array")(*items)
    assert isinstance(arr, objects.Array)
    return arr


def test_array_result_is_owned_and_decoded(testing_lib: object) -> None:
    arr = _array(1, 2, 3, 40)
    assert arr.refcount == 1
    assert len(arr) == 4
    assert arr.to_list() == [1, 2, 3, 40]
    assert arr[-1] == 40
    with pytest.raises(IndexError):
        arr[4]
    assert fn("ffi.ArraySize")(arr) == 4


def test_object_elements_of_an_array_come_back_owned(testing_lib: object) -> None:
    # A Tuple<Array<int>, int> result (FlashInfer 0.7.x MLA plan) is an ArrayObj at run time: an Array holding an
    # Array and an int. Reading the object element must hand out a reference of its own.
    schedule = _array(*range(18))
    result = fn("ffi.Array")(schedule, 4096, "a string longer than seven bytes")
    assert schedule.refcount == 2
    info = result[0]
    assert isinstance(info, objects.Array) and info.handle == schedule.handle
    assert info.to_list() == list(range(18)) and result[1] == 4096
    assert result[2] == "a string longer than seven bytes"  # copied out; its extra reference dropped at once
    assert schedule.refcount == 3  # the element's new reference belongs to `info`
    result.release()
    schedule.release()
    assert info.refcount == 1 and info[17] == 17
    info.release()


def test_object_argument_is_borrowed_and_result_released_exactly_once(testing_lib: object) -> None:
    arr = _array(5, 6)
    echo = fn("testing.echo")
    back = echo(arr)
    assert back.handle == arr.handle
    assert arr.refcount == 2  # the echoed result owns a second reference
    back.release()
    assert arr.refcount == 1
    back.release()  # idempotent: no second DecRef
    assert arr.refcount == 1
    assert fn("testing.object_use_count")(arr) >= 1
    arr.release()
    assert arr.refcount == 0 and arr.handle == 0


def test_no_leak_over_ten_thousand_result_cycles(testing_lib: object) -> None:
    arr = _array(1)
    echo = fn("testing.echo")
    for _ in range(10_000):
        echo(arr).release()
    assert arr.refcount == 1


def test_garbage_collection_releases_results(testing_lib: object) -> None:
    arr = _array(1)
    echo = fn("testing.echo")
    for _ in range(100):
        echo(arr)  # dropped at once: __del__ releases
    assert arr.refcount == 1


def test_released_object_cannot_be_passed(testing_lib: object) -> None:
    arr = _array(1)
    arr.release()
    with pytest.raises(ValueError, match="released"):
        fn("testing.echo")(arr)


def _host_tensor(shape: tuple[int, ...] = (4, 8)) -> Tensor:
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Tensor.from_pointer(a.ctypes.data, a.shape, "float32", "cpu", owner=a)


def test_dltensor_pointer_is_rejected_where_ffi_tensor_is_required(testing_lib: object) -> None:
    with pytest.raises(KernelError) as info:
        fn("testing.schema_id_tensor")(_host_tensor())
    assert info.value.kind == "TypeError"
    assert "DLTensor*" in info.value.message


def test_tensor_object_round_trips_with_shape_strides_and_pointer(testing_lib: object) -> None:
    t = _host_tensor((3, 5))
    obj = objects.tensor_object(t)
    other = objects.tensor_object(t)
    assert other is not obj and other.handle != obj.handle  # one object per request: nothing cached on `t`
    other.release()
    back = fn("testing.schema_id_tensor")(obj)
    assert isinstance(back, objects.TensorObject)
    assert back.handle == obj.handle
    ffi = get_ffi()
    dl = ffi.cast("DLTensor*", back.handle + 24)
    assert int(ffi.cast("uintptr_t", dl.data)) == t.data_ptr
    assert [dl.shape[i] for i in range(dl.ndim)] == [3, 5]
    assert [dl.strides[i] for i in range(dl.ndim)] == [5, 1]
    assert (dl.dtype.code, dl.dtype.bits) == (2, 32)
    back.release()


def test_tensor_object_deleter_runs_when_the_last_reference_goes(testing_lib: object) -> None:
    import gc
    import weakref

    t = _host_tensor()
    obj = objects.tensor_object(t)
    addresses_before = set(objects._managed.alive)
    assert len(addresses_before) >= 1
    # the object keeps only fi_ffi's own record, never the descriptor (or its producer)
    gone = weakref.ref(t)
    del t
    gc.collect()
    assert gone() is None
    obj.release()
    assert set(objects._managed.alive) < addresses_before  # the deleter callback dropped our record


def test_optional_tensor_accepts_none_descriptor_and_object(testing_lib: object) -> None:
    has_value = fn("testing.optional_tensor_view_has_value")
    assert has_value(None) is False
    assert has_value(_host_tensor()) is True
    assert has_value(objects.tensor_object(_host_tensor())) is True


def test_concurrent_calls_use_per_thread_frames(testing_lib: object) -> None:
    echo = fn("testing.echo")
    failures: list[str] = []

    def worker(seed: int) -> None:
        for i in range(2000):
            value = seed * 100_000 + i
            got = echo(value)
            if got != value:
                failures.append(f"{seed}: {got} != {value}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


class _StreamProbe:
    """A TVM-FFI Function written in Python (a cffi callback) that records the current CUDA stream of
    device 0 at the moment it is called, and can be told to fail."""

    def __init__(self) -> None:
        ffi = get_ffi()
        self.seen: list[int] = []
        self.fail = False

        def safe_call(_self: object, _args: object, _n: int, _result: object) -> int:
            self.seen.append(int(api().TVMFFIEnvGetStream(2, 0)))
            if self.fail:
                api().TVMFFIErrorSetRaisedFromCStr(b"RuntimeError", b"probe failed")
                return -1
            return 0

        self._cb = ffi.callback("TVMFFISafeCallType", safe_call)
        out = ffi.new("void**")
        assert api().TVMFFIFunctionCreate(ffi.NULL, self._cb, ffi.NULL, out) == 0
        self.function = Function(objects.ObjectRef(int(ffi.cast("uintptr_t", out[0])), objects.FUNCTION), "probe")


def _set_stream(value: int) -> None:
    ffi = get_ffi()
    assert api().TVMFFIEnvSetStream(2, 0, value, ffi.NULL) == 0


def test_stream_is_set_for_the_call_and_restored_after(testing_lib: object) -> None:
    probe = _StreamProbe()
    _set_stream(0x1111)
    frame = probe.function.frame(0)  # zero-filled: the result slot holds None
    call_on("probe", frame, 0, 0x2222)
    assert probe.seen == [0x2222]
    assert api().TVMFFIEnvGetStream(2, 0) == 0x1111
    call("probe", frame)  # no stream: the current one is left alone
    assert probe.seen[-1] == 0x1111
    _set_stream(0)


def test_stream_is_restored_when_the_callee_fails(testing_lib: object) -> None:
    probe = _StreamProbe()
    probe.fail = True
    _set_stream(0x3333)
    frame = probe.function.frame(0)
    with pytest.raises(KernelError, match="probe failed"):
        call_on("probe", frame, 0, 0x4444)
    assert probe.seen == [0x4444]
    assert api().TVMFFIEnvGetStream(2, 0) == 0x3333
    _set_stream(0)


def test_stream_table_is_thread_local(testing_lib: object) -> None:
    _set_stream(0x5555)
    seen: list[int] = []
    th = threading.Thread(target=lambda: seen.append(int(api().TVMFFIEnvGetStream(2, 0))))
    th.start()
    th.join()
    assert seen == [0]
    assert api().TVMFFIEnvGetStream(2, 0) == 0x5555
    _set_stream(0)


def test_a_frame_written_word_by_word_is_what_the_callee_reads(testing_lib: object) -> None:
    # what the launchers do: type and payload words written into a Frame, one call. testing.echo returns its
    # first argument, so a packed Int (and then a Float) comes back intact through the result slot.
    echo = fn("testing.echo")
    t = _host_tensor()
    frame = Frame(3, 0, echo.safe_call, echo.this)
    frame.q[0], frame.q[1] = objects.INT, 1234
    frame.q[2], frame.q[3] = objects.DLTENSOR_PTR, t._dl_addr
    frame.q[4], frame.d[5] = objects.FLOAT, 2.5
    call("echo", frame)
    assert result(frame) == 1234
    assert describe_frame(frame) == ("1234", "DLTensor*(float32[4, 8] cpu)", "2.5")
    frame.q[0], frame.d[1] = objects.FLOAT, -0.75
    call("echo", frame)
    assert result(frame) == -0.75


@pytest.fixture(scope="module")
def testing_lib() -> object:
    """``libtvm_ffi_testing.so`` loaded beside the runtime fi_ffi uses (its globals register at load)."""
    import importlib.util
    import os

    from fi_ffi.abi import runtime
    from fi_ffi.loader import dl

    candidates = [os.path.join(os.path.dirname(runtime.library_path()), "libtvm_ffi_testing.so")]
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is not None and spec.submodule_search_locations:
        root = next(iter(spec.submodule_search_locations))
        candidates.append(os.path.join(root, "lib", "libtvm_ffi_testing.so"))
    for path in candidates:
        if os.path.isfile(path):
            return dl.open_library(path, dl.RTLD_NOW | dl.RTLD_GLOBAL)
    pytest.skip("libtvm_ffi_testing.so not found (install the dev extra: apache-tvm-ffi)")


def test_stream_scope_sets_for_the_block_and_restores_even_on_error(testing_lib: object) -> None:
    import fi_ffi

    probe = _StreamProbe()
    _set_stream(0x10)
    frame = probe.function.frame(0)
    with fi_ffi.stream_scope(0x20) as handle:
        assert handle == 0x20
        call("probe", frame)
        with fi_ffi.stream_scope(0x30):  # nested scopes unwind in order
            call("probe", frame)
        assert fi_ffi.current_stream(0) == 0x20
    assert probe.seen == [0x20, 0x30]
    assert fi_ffi.current_stream(0) == 0x10
    with pytest.raises(RuntimeError, match="inside"), fi_ffi.stream_scope(0x40):
        raise RuntimeError("inside")
    assert fi_ffi.current_stream(0) == 0x10
    with pytest.raises(TypeError, match="stream"):
        fi_ffi.stream_scope(None)
    _set_stream(0)


@pytest.mark.parametrize(
    "stream,expected",
    [(0, 0), (0x1234, 0x1234)],
)
def test_stream_handle_accepts_ints_and_protocol_objects(stream: int, expected: int) -> None:
    from fi_ffi.tensor.streams import stream_handle

    class CudaCoreLike:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, stream)

    class TorchLike:
        cuda_stream = stream

    class BindingsLike:
        def getPtr(self) -> int:
            return stream

    for obj in (stream, CudaCoreLike(), TorchLike(), BindingsLike()):
        assert stream_handle(obj) == expected
    assert stream_handle(None) is None
    with pytest.raises(TypeError, match="stream"):
        stream_handle(1.5)
    with pytest.raises(TypeError, match="stream"):
        stream_handle(True)
