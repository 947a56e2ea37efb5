"""Plan objects (ownership against the real libtvm_ffi.so object API), host index checks, workspaces."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from helpers.fake_driver import FakeDriver
from hypothesis import given
from hypothesis import strategies as st

from fi_ffi.abi.objects import ARRAY, Array
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.usefixtures("kernel_modules")


def _incref(handle: int) -> None:
    from fi_ffi.abi.cdefs import get_ffi
    from fi_ffi.abi.runtime import api

    assert api().TVMFFIObjectIncRef(get_ffi().cast("void*", handle)) == 0


def fake_cuda(arr: np.ndarray, device: str = "cuda:0") -> Tensor:
    """A descriptor claiming ``device`` over host memory (stops at the kernels' CUDA checks, never read)."""
    return Tensor.from_pointer(arr.ctypes.data, arr.shape, str(arr.dtype), device, owner=arr)


def fake_workspace(float_bytes: int = 1 << 16, int_bytes: int = 1 << 12, pinned_bytes: int | None = None):
    from fi_ffi.ops.attention.workspace import Workspace

    pinned = np.zeros(pinned_bytes or int_bytes, np.uint8)
    return Workspace.from_buffers(
        fake_cuda(np.zeros(float_bytes, np.uint8)),
        fake_cuda(np.zeros(int_bytes, np.uint8)),
        Tensor.from_pointer(pinned.ctypes.data, pinned.shape, "uint8", "cpu", owner=pinned),
    )


# ------------------------------------------------------------------------------------------ Plan ownership


def test_plan_takes_ownership_and_releases_exactly_once(make_array):
    from fi_ffi.ops.attention.plan import Plan

    arr = make_array(2, 0, 0, 0, 16, 32, 0, 44, 0, 0)
    assert isinstance(arr, Array) and arr.refcount == 1
    handle = arr.handle
    _incref(handle)  # a second holder (the test) so the count stays observable after the plan lets go
    plan = Plan(arr, kind="batch_decode")
    assert plan.refcount == 2
    assert plan.info == [2, 0, 0, 0, 16, 32, 0, 44, 0, 0]
    assert not plan.released
    plan.release()
    assert plan.released
    assert arr.handle == 0
    plan.release()  # idempotent: no second DecRef
    del plan, arr
    gc.collect()
    holder = Array(handle, ARRAY)  # adopt the test's reference
    assert holder.refcount == 1
    holder.release()


def test_plan_released_by_gc_and_by_context_exit(make_array):
    from fi_ffi.ops.attention.plan import Plan

    inner = make_array(7)
    assert inner.refcount == 1
    # Each outer Array holds a reference to `inner`; releasing the outer one drops it.
    plan = Plan(make_array(inner, 1))
    assert inner.refcount == 2
    del plan
    gc.collect()
    assert inner.refcount == 1
    with Plan(make_array(inner)) as p:
        assert inner.refcount == 2
    assert p.released and inner.refcount == 1


def test_no_leak_over_many_plan_cycles(make_array):
    from fi_ffi.ops.attention.plan import Plan

    inner = make_array(1, 2, 3)
    for i in range(10_000):
        plan = Plan(make_array(inner, i))
        assert inner.refcount == 2
        if i % 2:
            plan.release()
            plan.release()
        else:
            with plan:
                pass
        assert inner.refcount == 1
    for _ in range(1_000):  # dropped without release: the GC path releases once
        Plan(make_array(inner))
    gc.collect()
    assert inner.refcount == 1


def test_plan_refuses_anything_but_an_owned_array(make_array):
    from fi_ffi.abi.objects import ObjectRef
    from fi_ffi.ops.attention.plan import Plan

    with pytest.raises(TypeError, match="info"):
        Plan([1, 2, 3])
    with pytest.raises(TypeError, match="info"):
        Plan(ObjectRef(0, 0))


def test_released_and_stale_plans_are_not_runnable(make_array):
    from fi_ffi.ops.attention.plan import Plan

    ws = fake_workspace()
    plan = Plan(make_array(*([0] * 10)), ws, kind="batch_decode", mode="paged")
    plan.check_runnable("batch_decode", "paged")
    with pytest.raises(ValueError, match="batch_prefill plan"):
        plan.check_runnable("batch_prefill", "paged")
    ws._generation += 1  # what the next plan on this workspace does
    assert plan.stale
    with pytest.raises(ValueError, match="stale"):
        plan.check_runnable("batch_decode", "paged")
    plan2 = Plan(make_array(*([0] * 10)), ws, kind="batch_decode", mode="paged")
    plan2.release()
    with pytest.raises(ValueError, match="released"):
        plan2.check_runnable("batch_decode", "paged")
    assert "released" in repr(plan2) and "stale" in repr(plan)


# ------------------------------------------------------------------------------------------ host index arrays


def test_host_array_accepts_numpy_lists_and_host_descriptors():
    from fi_ffi.ops.attention.host_index import host_array

    a = np.array([0, 2, 5], np.int32)
    assert host_array("kv_indptr", a) is a
    view = host_array("kv_indptr", [0, 1, 4])
    assert view.dtype == np.int32 and view.tolist() == [0, 1, 4]
    d = Tensor.from_pointer(a.ctypes.data, (3,), "int32", "cpu", owner=a)
    assert host_array("kv_indptr", d).tolist() == [0, 2, 5]
    strided = np.arange(10, dtype=np.int32)[::2]
    got = host_array("kv_indptr", strided)
    assert got.tolist() == [0, 2, 4, 6, 8] and got.flags.c_contiguous


def test_host_tensor_describes_the_array_without_copying_it():
    """The descriptor a plan call gets for a host index array: its memory, int32 [n] on the CPU, nothing kept."""
    from fi_ffi.ops.attention.host_index import host_tensor

    a = np.array([0, 3, 7, 7], np.int32)
    t = host_tensor(a)
    assert (t.data_ptr, t.shape, t.strides, t.dtype.name, str(t.device)) == (a.ctypes.data, (4,), (1,), "int32", "cpu")
    assert t.owner is None  # the plan call's caller holds the array; no descriptor keeps a caller's object
    b = np.array([0, 1, 2, 3], np.int32)
    assert host_tensor(b).data_ptr == b.ctypes.data and host_tensor(b)._lid == t._lid  # one layout, rebound
    assert host_tensor(np.zeros(0, np.int32)).shape == (0,)


def test_host_array_uses_numpy_int32_arrays_as_they_are_and_converts_lists_once():
    from fi_ffi.ops.attention.host_index import host_array

    a = np.array([0, 2, 5], np.int32)
    assert host_array("kv_indptr", a) is a
    assert host_array("kv_indptr", (0, np.int64(2), 5)).tolist() == [0, 2, 5]
    ro = np.array([0, 1], np.int32)
    ro.flags.writeable = False
    assert host_array("kv_indptr", ro) is ro


@pytest.mark.parametrize(
    ("value", "exc", "text"),
    [
        (np.array([0, 1], np.int64), TypeError, "int32"),
        (np.zeros((2, 2), np.int32), ValueError, "1-D"),
        ([0, 1 << 40], ValueError, "int32"),
        ([0, 1 << 70], ValueError, r"values must fit in int32, got 1180591620717411303424"),
        ([0, "1"], TypeError, r"expected a sequence of ints, got str '1' at index 1"),
        ([0, 1.0], TypeError, r"expected a sequence of ints, got float 1\.0 at index 1"),
        ([0, 2.7], TypeError, "got float"),
        ([0, True], TypeError, "got bool"),
        ([[0, 1]], TypeError, "got list"),
        (np.array([0, 1], ">i4"), TypeError, "big-endian"),
        ("0,1", TypeError, "host int32"),
        (Tensor.from_pointer(0x1000, (3,), "int32", "cuda:0"), ValueError, "host"),
        (Tensor.from_pointer(0x1000, (3,), "int64", "cpu"), TypeError, "int32"),
        (Tensor.from_pointer(0, (3,), "int32", "cpu"), ValueError, "NULL"),
    ],
)
def test_host_array_rejects(value, exc, text):
    from fi_ffi.ops.attention.host_index import host_array

    with pytest.raises(exc, match=text) as info:
        host_array("qo_indptr", value)
    assert str(info.value).startswith("qo_indptr")


@given(st.lists(st.integers(0, 50), min_size=1, max_size=20))
def test_check_indptr_accepts_any_valid_and_rejects_corruptions(lengths):
    from fi_ffi.ops.attention.host_index import check_indptr

    arr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    assert check_indptr("kv_indptr", arr) == sum(lengths)
    assert check_indptr("kv_indptr", arr, len(lengths)) == sum(lengths)
    with pytest.raises(ValueError, match=r"kv_indptr: expected \d+ entries"):
        check_indptr("kv_indptr", arr, len(lengths) + 1)
    shifted = arr + 1
    with pytest.raises(ValueError, match="must start at 0"):
        check_indptr("kv_indptr", shifted)
    if arr[-1] > 0:
        broken = arr.copy()
        broken[-1] = -1
        with pytest.raises(ValueError, match="non-decreasing"):
            check_indptr("kv_indptr", broken)


def test_check_indptr_needs_a_batch():
    from fi_ffi.ops.attention.host_index import check_indptr

    with pytest.raises(ValueError, match="at least 2"):
        check_indptr("qo_indptr", np.zeros(1, np.int32))


@given(st.integers(1, 64), st.lists(st.integers(0, 6), min_size=1, max_size=40), st.data())
def test_check_last_page_len(page_size, pages, data):
    from fi_ffi.ops.attention.host_index import check_last_page_len

    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    last = np.array([data.draw(st.integers(1, page_size)) if p else 0 for p in pages], np.int32)
    assert check_last_page_len("kv_last_page_len", last, indptr, page_size) is None
    lengths = check_last_page_len("kv_last_page_len", last, indptr, page_size, lengths=True)
    expected = [(p - 1) * page_size + lp if p else 0 for p, lp in zip(pages, last, strict=True)]
    assert lengths.tolist() == expected
    i = data.draw(st.integers(0, len(pages) - 1))
    bad = last.copy()
    bad[i] = page_size + 1 if pages[i] else 1
    with pytest.raises(ValueError, match=f"kv_last_page_len: request {i}"):
        check_last_page_len("kv_last_page_len", bad, indptr, page_size)
    if pages[i]:
        bad[i] = 0
        with pytest.raises(ValueError, match=r"1\.\."):
            check_last_page_len("kv_last_page_len", bad, indptr, page_size)
    with pytest.raises(ValueError, match="entries"):
        check_last_page_len("kv_last_page_len", last[:-1], indptr, page_size)


# ------------------------------------------------------------------------------------------ workspaces


def test_workspace_from_buffers_validates():
    from fi_ffi.ops.attention.workspace import Workspace

    ws = fake_workspace(1 << 16, 1 << 12)
    assert (ws.float_bytes, ws.int_bytes, ws.pinned_bytes) == (1 << 16, 1 << 12, 1 << 12)
    assert not ws.owns_memory
    ws.close()  # frees nothing, invalidates plans
    f, i = fake_cuda(np.zeros(64, np.uint8)), fake_cuda(np.zeros(64, np.uint8))
    host = np.zeros(64, np.uint8)
    h = Tensor.from_pointer(host.ctypes.data, (64,), "uint8", "cpu", owner=host)
    small = Tensor.from_pointer(host.ctypes.data, (32,), "uint8", "cpu", owner=host)
    with pytest.raises(ValueError, match="pinned_buffer: expected at least 64 bytes"):
        Workspace.from_buffers(f, i, small)
    with pytest.raises(ValueError, match="pinned_buffer: expected a host"):
        Workspace.from_buffers(f, i, fake_cuda(np.zeros(64, np.uint8)))
    with pytest.raises(ValueError, match="float_buffer: expected a CUDA"):
        Workspace.from_buffers(h, i, h)
    with pytest.raises(ValueError, match="int_buffer: expected a tensor on cuda:0"):
        Workspace.from_buffers(f, fake_cuda(np.zeros(64, np.uint8), "cuda:1"), h)
    with pytest.raises(ValueError, match="float_buffer: expected a 1-D"):
        Workspace.from_buffers(fake_cuda(np.zeros((8, 8), np.uint8)), i, h)
    with pytest.raises(ValueError, match="float_buffer: expected a non-empty"):
        Workspace.from_buffers(fake_cuda(np.zeros(0, np.uint8)), i, h)


@pytest.mark.parametrize("which", ["float_buffer", "int_buffer", "pinned_buffer"])
def test_a_null_workspace_buffer_is_refused_by_name(which: str) -> None:
    """A NULL buffer would reach the plans' copies and the kernels' scratch writes at address 0."""
    from fi_ffi.ops.attention.workspace import Workspace

    host = np.zeros(64, np.uint8)
    buffers = {
        "float_buffer": fake_cuda(np.zeros(64, np.uint8)),
        "int_buffer": fake_cuda(np.zeros(64, np.uint8)),
        "pinned_buffer": Tensor.from_pointer(host.ctypes.data, (64,), "uint8", "cpu", owner=host),
    }
    Workspace.from_buffers(**buffers)  # valid as given
    null = Tensor.from_pointer(0, (64,), "uint8", "cpu" if which == "pinned_buffer" else 0)
    with pytest.raises(ValueError, match=rf"^{which}: data pointer is NULL; pass the address of a buffer"):
        Workspace.from_buffers(**{**buffers, which: null})


def test_the_int_buffer_must_not_overlap_the_float_buffer() -> None:
    from fi_ffi.ops.attention.workspace import Workspace

    host = np.zeros(64, np.uint8)
    h = Tensor.from_pointer(host.ctypes.data, (64,), "uint8", "cpu", owner=host)
    f = fake_cuda(np.zeros(64, np.uint8))
    with pytest.raises(ValueError, match="^int_buffer: overlaps float_buffer"):
        Workspace.from_buffers(f, f, h)
    with pytest.raises(ValueError, match="^int_buffer: overlaps float_buffer"):
        Workspace.from_buffers(f, f.rebind(f.data_ptr + 32), h)


def test_workspace_buffers_must_not_wrap_the_address_space_or_exceed_int32_sizes():
    from fi_ffi.ops.attention.workspace import Workspace

    host = np.zeros(64, np.uint8)
    h = Tensor.from_pointer(host.ctypes.data, (64,), "uint8", "cpu", owner=host)
    i = fake_cuda(np.zeros(64, np.uint8))
    top = 2**64 - 256  # 1024 float32 elements from here run 3840 bytes past the last address
    with pytest.raises(ValueError, match=r"float_buffer: the buffer 0x[0-9a-f]+ \+ 4096 bytes wraps past the end"):
        Workspace.from_buffers(Tensor.from_pointer(top, (1024,), "float32", 0), i, h)
    with pytest.raises(ValueError, match="int_buffer: the buffer .* wraps past the end"):
        Workspace.from_buffers(i, Tensor.from_pointer(top, (65,), "float32", 0), h)
    Workspace.from_buffers(Tensor.from_pointer(top, (64,), "float32", 0), i, h)  # ends exactly at 2**64: fits
    with pytest.raises(ValueError, match="pinned_buffer: the buffer .* wraps past the end"):
        Workspace.from_buffers(fake_cuda(np.zeros(64, np.uint8)), i, Tensor.from_pointer(top, (33,), "int64", "cpu"))
    with pytest.raises(ValueError, match="float_buffer: 2147483648 elements do not fit the kernels' int32 sizes"):
        Workspace.from_buffers(Tensor.from_pointer(1 << 40, (1 << 31,), "uint8", 0), i, h)
    Workspace.from_buffers(Tensor.from_pointer(1 << 40, (1 << 29,), "float32", 0), i, h)  # 2 GiB as float32
    with pytest.raises(ValueError, match=r"float_bytes: expected fewer than 2\*\*31 bytes"):
        Workspace.allocate(0, float_bytes=1 << 31)
    with pytest.raises(ValueError, match=r"device: expected a CUDA device ordinal < 2\*\*31"):
        Workspace.allocate(1 << 31)


def test_workspace_allocate_argument_checks():
    from fi_ffi.ops.attention.workspace import FLOAT_BYTES, INT_BYTES, PINNED_BYTES, TMP_BYTES, Workspace

    assert (FLOAT_BYTES, INT_BYTES, PINNED_BYTES, TMP_BYTES) == (128 << 20, 8 << 20, 8 << 20, 32 << 20)
    with pytest.raises(ValueError, match="pinned_bytes"):
        Workspace.allocate(0, int_bytes=1024, pinned_bytes=512)
    with pytest.raises(ValueError, match="float_bytes"):
        Workspace.allocate(0, float_bytes=0)


def test_workspace_allocate_without_a_gpu_is_a_clear_error():
    from cuda.bindings import runtime as rt

    from fi_ffi.cuda import driver
    from fi_ffi.errors import CudaError
    from fi_ffi.ops.attention.workspace import Workspace

    if rt.cudaGetDeviceCount()[0] == rt.cudaError_t.cudaSuccess:
        pytest.skip("a GPU is present (covered by the GPU tests)")
    # no driver at all: named so, with the install fix; a driver that sees no GPU: the nvidia-smi advice
    fix = "no NVIDIA driver found .*Install the NVIDIA driver" if not driver.probe().found else ".*nvidia-smi"
    with pytest.raises(CudaError, match=rf"(cudaMalloc|cudaGetDevice) failed: cudaError\w+: {fix}"):
        Workspace.allocate(0, float_bytes=1024, int_bytes=1024)


def test_tmp_bound_is_safe_for_the_launchers_heuristics(monkeypatch):
    from fi_ffi.cuda import device
    from fi_ffi.ops.attention import workspace as W

    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((9, 0), 132, 32))  # 132 * 32 resident blocks
    assert W.tmp_bytes_needed(0, 256, 1, 32, 8, 128, 2, prefill=False) == 0  # no split at <= 256 tokens
    # decode: min(ceil(4096 / 256), 4224 // 8) = 16 chunks of 32 rows * (128 * 2 + 4) bytes
    assert W.tmp_bytes_needed(0, 4096, 1, 32, 8, 128, 2, prefill=False) == 16 * 32 * 260
    # prefill with many query tiles: too few CTAs left to split
    assert W.tmp_bytes_needed(0, 4096, 4096, 32, 8, 128, 2, prefill=True) == 0
    # every bound fits the 32 MiB upstream uses, for head_dim <= 128
    worst = max(
        W.tmp_bytes_needed(0, kv, qo, 32, hk, 128, 2, prefill=True)
        for kv in (512, 4096, 1 << 17)
        for qo in (1, 16, 64, 256)
        for hk in (1, 8, 32)
    )
    assert 0 < worst <= W.TMP_BYTES
    monkeypatch.setitem(device._properties, 1, None)
    assert W.tmp_bytes_needed(1, 4096, 1, 32, 8, 128, 2, prefill=False) is None


def _FakeDriver(query: int = 0, sync: int = 0, record: int = 0) -> FakeDriver:
    """The plan-copy event calls' stand-in for libcuda (absent on CPU machines): records what it is asked."""
    return FakeDriver(cuEventQuery=query, cuEventSynchronize=sync, cuEventRecord=record)


@pytest.mark.parametrize(
    "query, sync, expected",
    [
        (0, 0, ["cuEventQuery"]),  # the copy is done: no wait
        (600, 0, ["cuEventQuery", "cuEventSynchronize"]),  # not ready: wait for that event only
    ],
)
def test_plan_copy_event_goes_through_the_driver(monkeypatch, query, sync, expected):
    from fi_ffi.cuda import driver

    fake = _FakeDriver(query=query, sync=sync)
    monkeypatch.setattr(driver, "_state", (driver.ffi(), fake, driver.probe()))
    ws = fake_workspace()
    ws._event, ws._event_handle = object(), 0x1234  # as if a plan had created it
    ws._record_plan_copy(7)
    assert fake.calls == [("cuEventRecord", 0x1234, 7)] and ws._event_pending
    fake.calls.clear()
    ws._wait_previous_plan_copy()
    assert [c[0] for c in fake.calls] == expected and all(c[1] == 0x1234 for c in fake.calls)
    assert not ws._event_pending
    fake.calls.clear()
    ws._wait_previous_plan_copy()  # nothing pending: no driver call
    assert fake.calls == []
    ws._event = None  # (the fake event is not destroyed through cuda.bindings)


@pytest.mark.parametrize(
    "query, sync, record, what",
    [
        (0, 0, 999, "cuEventRecord(plan copy) failed: CUresult 999"),
        (700, 0, 0, "cuEventSynchronize(previous plan copy) failed: CUresult 700"),
        (600, 719, 0, "cuEventSynchronize(previous plan copy) failed: CUresult 719"),
    ],
)
def test_plan_copy_event_errors_are_cuda_errors(monkeypatch, query, sync, record, what):
    from fi_ffi.cuda import driver
    from fi_ffi.errors import CudaError

    monkeypatch.setattr(driver, "_state", (driver.ffi(), _FakeDriver(query, sync, record), driver.probe()))
    ws = fake_workspace()
    ws._event, ws._event_handle = object(), 0x1234
    with pytest.raises(CudaError, match=what.replace("(", r"\(").replace(")", r"\)")) as info:
        ws._record_plan_copy(7)
        ws._wait_previous_plan_copy()
    from fi_ffi.cuda import runtime as cuda_runtime

    exc = info.value  # the driver's code, and the fix for it in the text
    assert exc.code in (record, query, sync) and exc.hint == cuda_runtime.hint(exc.code) and exc.hint in str(exc)
    ws._event = None


# ------------------------------------------------------------------------------------------ PlanSettings


def test_plan_settings_is_a_frozen_value_with_derived_fields():
    import dataclasses

    from fi_ffi.ops.attention.plan_settings import PlanSettings

    a = PlanSettings(kind="batch_prefill", num_qo_heads=8, kv_layout="HND", rope_scale=2.0, rope_theta=5e5)
    b = PlanSettings(kind="batch_prefill", num_qo_heads=8, kv_layout="HND", rope_scale=2.0, rope_theta=5e5, run=print)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1  # plan / run are not part of the value
    assert a != PlanSettings(kind="batch_prefill", num_qo_heads=8, kv_layout="NHD", rope_scale=2.0, rope_theta=5e5)
    assert (a.layout_code, a.rope_rcp_scale, a.rope_rcp_theta, a.uri, a.backend) == (1, 0.5, 2e-6, "", "")
    assert not hasattr(a, "__dict__")  # slotted
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_qo_heads = 4  # type: ignore[misc]
    with pytest.raises(TypeError, match="bogus"):
        PlanSettings(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PlanSettings("batch_decode")  # type: ignore[misc]  # keyword-only
    assert "num_qo_heads=8" in repr(a) and "variant" not in repr(a)


# ------------------------------------------------------------------------------------------ Workspace.staging


def _staged_workspace(monkeypatch, fake):
    from fi_ffi.cuda import driver

    monkeypatch.setattr(driver, "_state", (driver.ffi(), fake, driver.probe()))
    ws = fake_workspace()
    ws._event, ws._event_handle = object(), 0x1234  # as if a plan had created it
    return ws


def test_staging_waits_for_the_previous_copy_bumps_the_generation_and_records_on_exit(monkeypatch):
    fake = _FakeDriver(query=600)  # the previous copy is still running: the staging waits for it
    ws = _staged_workspace(monkeypatch, fake)
    with ws.staging(7) as stage:
        assert fake.calls == [] and ws._generation == stage.generation == 1  # nothing pending yet
        assert ws._lock.locked()
    assert fake.calls == [("cuEventRecord", 0x1234, 7)] and ws._event_pending and not ws._lock.locked()
    fake.calls.clear()
    with ws.staging(9) as stage:
        assert [c[0] for c in fake.calls] == ["cuEventQuery", "cuEventSynchronize"]  # that event only
        assert stage.generation == 2
        fake.calls.clear()
        stage.record()  # early (e.g. before a launch the next staging need not wait for): not again at exit
        stage.record(11)
    assert fake.calls == [("cuEventRecord", 0x1234, 9), ("cuEventRecord", 0x1234, 11)]
    ws._event = None


def test_staging_releases_the_lock_and_records_nothing_on_an_exception(monkeypatch):
    fake = _FakeDriver()
    ws = _staged_workspace(monkeypatch, fake)
    with pytest.raises(RuntimeError, match="plan failed"), ws.staging(7):
        raise RuntimeError("plan failed")
    assert not ws._lock.locked() and not ws._event_pending and fake.calls == []
    assert ws._generation == 1  # the int workspace may be half written: earlier plans stay stale
    with ws.staging(7) as stage:  # the next staging gets in
        assert stage.generation == 2
    ws._event = None


def test_a_staging_into_other_memory_waits_and_records_but_keeps_the_plans_valid(monkeypatch):
    fake = _FakeDriver(query=600)  # the previous copy is still running
    ws = _staged_workspace(monkeypatch, fake)
    ws._event_pending = True
    with ws.staging(7, into_int_buffer=False) as stage:  # (a prepared segment GEMM's copy into its own buffer)
        assert [c[0] for c in fake.calls] == ["cuEventQuery", "cuEventSynchronize"]  # the page-locked buffer's wait
        assert stage.generation == ws._generation == 0  # the int workspace is not written: no plan goes stale
    assert fake.calls[-1] == ("cuEventRecord", 0x1234, 7) and ws._event_pending and not ws._lock.locked()
    with ws.staging(7) as stage:  # a staging of the int workspace still bumps it
        assert stage.generation == 1
    ws._event = None


def test_a_failed_wait_for_the_previous_copy_releases_the_lock(monkeypatch):
    from fi_ffi.errors import CudaError

    ws = _staged_workspace(monkeypatch, _FakeDriver(query=700))
    ws._event_pending = True
    with pytest.raises(CudaError, match="previous plan copy"), ws.staging(7):
        pass
    assert not ws._lock.locked() and ws._generation == 0
    ws._event = None


def test_a_second_staging_waits_until_the_first_leaves_its_block(monkeypatch):
    import threading

    ws = _staged_workspace(monkeypatch, _FakeDriver())
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        with ws.staging(8) as stage:
            order.append(f"second {stage.generation}")

    with ws.staging(7) as stage:
        t = threading.Thread(target=second)
        t.start()
        assert entered.wait(10)
        t.join(0.2)
        assert t.is_alive()  # blocked on the workspace's lock
        order.append(f"first {stage.generation}")
    t.join(10)
    assert order == ["first 1", "second 2"]
    ws._event = None
