"""Property tests of descriptors and of the checks in front of the FFI.

- ``Tensor.from_pointer``: every valid (pointer, shape, strides, dtype, device) round-trips through the
  DLTensor record a kernel reads (decoded here with cffi from ``_dl_addr``); invalid ones raise
  ``TypeError``/``ValueError`` whose message starts with the argument's name.
- ``fi_ffi.ops.norm``: descriptors or scalars that break a contract are rejected by our checks, never by the
  kernel module: no ``KernelError``, and the ``norm`` module is not even bound.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fi_ffi
from fi_ffi import dtypes
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.errors import KernelError
from fi_ffi.launch import kernels
from fi_ffi.ops import norm
from fi_ffi.tensor import descriptor as tensor_module
from fi_ffi.tensor.descriptor import Tensor

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEVICES = st.one_of(
    st.integers(0, 15).map(lambda i: (i, dtypes.cuda(i))),
    st.integers(0, 15).map(lambda i: (f"cuda:{i}", dtypes.cuda(i))),
    st.just(("cuda", dtypes.cuda(0))),
    st.just(("cpu", dtypes.cpu())),
    st.sampled_from([1, 2, 3, 13]).flatmap(
        lambda t: st.integers(0, 7).map(lambda i: (dtypes.Device(t, i), dtypes.Device(t, i)))
    ),
    st.sampled_from([1, 2, 3, 13]).flatmap(lambda t: st.integers(0, 7).map(lambda i: ((t, i), dtypes.Device(t, i)))),
)
DTYPES = st.sampled_from(dtypes.ALL).flatmap(
    lambda d: st.sampled_from([d, d.name, (d.code, d.bits, d.lanes)]).map(lambda spec: (spec, d))
)
SIZES = st.integers(0, 2**31)
STEPS = st.integers(0, 2**40)


def read_record(t: Tensor) -> dict[str, Any]:
    ffi = get_ffi()
    dl = ffi.cast("DLTensor*", t._dl_addr)
    n = dl.ndim
    assert dl.strides != ffi.NULL and dl.shape != ffi.NULL  # NULL strides crash the kernels (ABI.md D.1)
    return {
        "data": int(ffi.cast("uintptr_t", dl.data)),
        "device": (dl.device.device_type, dl.device.device_id),
        "ndim": n,
        "dtype": (dl.dtype.code, dl.dtype.bits, dl.dtype.lanes),
        "shape": tuple(dl.shape[i] for i in range(n)),
        "strides": tuple(dl.strides[i] for i in range(n)),
        "byte_offset": dl.byte_offset,
    }


@st.composite
def valid_descriptors(draw: st.DrawFn) -> dict[str, Any]:
    ndim = draw(st.integers(0, 16))
    shape = tuple(draw(st.lists(SIZES, min_size=ndim, max_size=ndim)))
    strides = draw(st.none() | st.lists(STEPS, min_size=ndim, max_size=ndim).map(tuple))
    dtype_spec, dtype = draw(DTYPES)
    device_spec, device = draw(DEVICES)
    return {
        "data_ptr": draw(st.integers(0, 2**64 - 1)),
        "shape": shape,
        "strides": strides,
        "dtype_spec": dtype_spec,
        "dtype": dtype,
        "device_spec": device_spec,
        "device": device,
    }


def expected_contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= max(size, 1)
    return tuple(reversed(out))


@SETTINGS
@given(valid_descriptors())
def test_valid_descriptors_round_trip_through_the_dltensor_record(d: dict[str, Any]) -> None:
    if d["strides"] is None and max(expected_contiguous(d["shape"]), default=0) >= 2**63:
        return  # covered by the invalid-shape test: contiguous strides would not fit in int64
    owner = object()
    t = Tensor.from_pointer(d["data_ptr"], d["shape"], d["dtype_spec"], d["device_spec"], d["strides"], owner)
    strides = d["strides"] if d["strides"] is not None else expected_contiguous(d["shape"])
    assert (t.data_ptr, t.shape, t.strides, t.dtype, t.device, t.ndim) == (
        d["data_ptr"],
        d["shape"],
        strides,
        d["dtype"],
        d["device"],
        len(d["shape"]),
    )
    assert t.owner is owner
    dt = d["dtype"]
    # On the wire, managed memory is presented as CUDA and pinned host memory as CPU (the kernels check for
    # exactly those two kinds).
    wire = {13: 2, 3: 1}.get(d["device"].device_type, d["device"].device_type), d["device"].device_id
    assert read_record(t) == {
        "data": d["data_ptr"],
        "device": wire,
        "ndim": len(d["shape"]),
        "dtype": (dt.code, dt.bits, dt.lanes),
        "shape": d["shape"],
        "strides": strides,
        "byte_offset": 0,
    }


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=0, max_size=6).map(tuple), st.sampled_from(dtypes.ALL))
def test_default_strides_are_numpys_row_major_strides_in_elements(shape: tuple[int, ...], dtype: dtypes.DType) -> None:
    # (numpy gives empty arrays zero strides, so sizes start at 1 here; the round-trip test covers size 0)
    t = Tensor.from_pointer(0x1000, shape, dtype)
    assert t.strides == tuple(s // 8 for s in np.empty(shape, np.int64).strides)
    assert t.is_contiguous()
    assert t.numel == math.prod(shape)


def _invalid_cases() -> st.SearchStrategy[tuple[dict[str, Any], type[Exception], str]]:
    """(kwargs, exception type, argument name) for descriptors that must be refused."""
    base = {"data_ptr": 0x1000, "shape": (2, 3), "dtype": "float16", "device": 0, "strides": None}

    def case(error: type[Exception], arg: str, **changes: Any) -> tuple[dict[str, Any], type[Exception], str]:
        return ({**base, **changes}, error, arg)

    shapes = st.lists(st.integers(0, 8), min_size=1, max_size=6)
    return st.one_of(
        # negative sizes, sizes past int64, too many dimensions, non-int entries, bools
        shapes.flatmap(
            lambda s: st.integers(0, len(s) - 1).flatmap(
                lambda i: st.integers(-(2**70), -1).map(
                    lambda bad: case(ValueError, "shape", shape=(*s[:i], bad, *s[i + 1 :]))
                )
            )
        ),
        st.integers(2**63, 2**70).map(lambda bad: case(ValueError, "shape", shape=(2, bad))),
        st.integers(17, 40).map(lambda n: case(ValueError, "shape", shape=(1,) * n)),
        st.sampled_from([(2, True), (False,), (2.0, 3), ("2",), (None,)]).map(
            lambda s: case(TypeError, "shape", shape=s)
        ),
        st.sampled_from([3, 2.5, None, object()]).map(lambda s: case(TypeError, "shape", shape=s)),
        # wrong stride count, negative strides, strides past int64, bools, non-ints
        shapes.flatmap(
            lambda s: (
                st.integers(0, 8)
                .filter(lambda n: n != len(s))
                .map(lambda n: case(ValueError, "strides", shape=tuple(s), strides=(1,) * n))
            )
        ),
        st.integers(-(2**70), -1).map(lambda bad: case(ValueError, "strides", strides=(bad, 1))),
        st.integers(2**63, 2**70).map(lambda bad: case(ValueError, "strides", strides=(bad, 1))),
        st.sampled_from([(3, True), (1.0, 1), ("3", 1)]).map(lambda s: case(TypeError, "strides", strides=s)),
        # contiguous strides that do not fit in int64
        st.just(case(ValueError, "strides", shape=(2**40, 2**40, 2**40))),
        # pointers: wrong types (bools included) and out of range
        st.sampled_from([True, False, 1.0, "0x1000", None, b"\x00", np.int64(4096), object()]).map(
            lambda p: case(TypeError, "data_ptr", data_ptr=p)
        ),
        st.one_of(st.integers(-(2**70), -1), st.integers(2**64, 2**70)).map(
            lambda p: case(ValueError, "data_ptr", data_ptr=p)
        ),
        # dtypes fi_ffi does not know
        st.sampled_from(["float64", "complex64", "int16", (2, 64, 1), (2, 16, 2), None, 3, np.float64]).map(
            lambda d: case(TypeError, "dtype", dtype=d)
        ),
        # devices: bools, negative ordinals, unknown kinds and device types, non-int tuples
        st.sampled_from(
            [
                True,
                -1,
                -7,
                "gpu",
                "cuda:x",
                "cuda:-1",
                "cpu:0",
                1.0,
                None,
                (99, 0),
                (2, -1),
                ("cuda", 0),
                (2.0, 0),
                (2, True),
                (2, 0, 0),
            ]
        ).map(lambda dev: case(TypeError, "device", device=dev)),
    )


@SETTINGS
@given(_invalid_cases())
def test_invalid_descriptors_are_refused_naming_the_argument(c: tuple[dict[str, Any], type[Exception], str]) -> None:
    kwargs, error, arg = c
    with pytest.raises(error) as info:
        Tensor.from_pointer(**kwargs)
    assert type(info.value) is error
    assert str(info.value).startswith(f"{arg}: "), str(info.value)


# ---- the norm ops refuse invalid arguments before the FFI ----------------------------------------------------

ALIGN = 0x7F40_0000_0000  # a 64 KiB-aligned fake device address: these descriptors are never dereferenced
OPS = {
    # op -> names of its three tensor arguments in call order (the op's own parameter names)
    "rmsnorm": ("input", "weight", "out"),
    "gemma_rmsnorm": ("input", "weight", "out"),
    "fused_add_rmsnorm": ("input", "residual", "weight"),
    "gemma_fused_add_rmsnorm": ("input", "residual", "weight"),
}


def fake(
    shape: tuple[int, ...], dtype: Any = "float16", device: Any = 0, strides: Any = None, offset: int = 0, slot: int = 0
) -> Tensor:
    return Tensor.from_pointer(ALIGN + slot * 0x1000_0000 + offset, shape, dtype, device, strides)


@st.composite
def broken_norm_calls(draw: st.DrawFn) -> tuple[str, dict[str, Any], str, Any, type[Exception]]:
    """A valid call of a norm op and one broken argument: (op, valid kwargs, culprit, flaw, error type)."""
    op = draw(st.sampled_from(sorted(OPS)))
    b = draw(st.integers(2, 64))
    d = 8 * draw(st.integers(1, 64))  # a multiple of 8: float16/bfloat16 rows are loaded 16 bytes at a time
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    other_dtype = {"float16": "bfloat16", "bfloat16": "float16"}[dtype]
    rows, vec = (b, d), (d,)
    names = OPS[op]
    second = names[1] if names[1] != "weight" else names[2]  # "out" or "residual"
    valid = {"input": fake(rows, dtype, slot=0), "weight": fake(vec, dtype, slot=1), second: fake(rows, dtype, slot=2)}
    culprit = draw(st.sampled_from(["input", "weight", second, "eps", "enable_pdl"]))
    shape = vec if culprit == "weight" else rows
    slot = {"input": 0, "weight": 1, second: 2}.get(culprit, 0)
    flaws: list[tuple[Any, type[Exception]]]
    if culprit == "eps":
        flaws = [
            (0.0, ValueError),
            (-1e-6, ValueError),
            (math.nan, ValueError),
            (math.inf, ValueError),
            (-math.inf, ValueError),
            (0, ValueError),
            ("1e-6", TypeError),
            (None, TypeError),
            (True, TypeError),
            (1j, TypeError),
            ([1e-6], TypeError),
        ]
    elif culprit == "enable_pdl":
        flaws = [(2, TypeError), ("yes", TypeError), (0.5, TypeError)]  # None: flashinfer's "ask the device"
    else:
        flaws = [
            (fake((*shape, 1), dtype, slot=slot), ValueError),  # one dimension too many
            (fake(shape[:-1] or (1, d), dtype, slot=slot), ValueError),  # one too few (weight: two)
            (fake((*shape[:-1], d + 8), dtype, slot=slot), ValueError),  # D disagrees
            (fake(shape, other_dtype, slot=slot), TypeError),  # dtype disagrees
            (fake(shape, "float32", slot=slot), TypeError),  # unsupported dtype
            (fake(shape, dtype, device=1, slot=slot), ValueError),  # another device
            (fake(shape, dtype, device="cpu", slot=slot), ValueError),  # host memory
            (fake(shape, dtype, device=dtypes.Device(dtypes.CUDA_HOST, 0), slot=slot), ValueError),  # pinned host
            (Tensor.from_pointer(0, shape, dtype, 0), ValueError),  # NULL pointer
            (fake(shape, dtype, slot=slot, offset=2), ValueError),  # pointer not 16-byte aligned
            (fake(shape, dtype, slot=slot, strides=(*(2 * d for _ in shape[:-1]), 2)), ValueError),  # last dim strided
        ]
        if culprit != "weight":
            flaws.append((fake((b + 1, d), dtype, slot=slot), ValueError))  # B disagrees
            flaws.append((fake(rows, dtype, slot=slot, strides=(d + 4, 1)), ValueError))  # row stride misaligned
    flaw, error = draw(st.sampled_from(flaws))
    return op, valid, culprit, flaw, error


def _call(op: str, args: dict[str, Any]) -> None:
    extra = {k: args[k] for k in ("eps", "enable_pdl") if k in args}
    names = OPS[op]
    if "out" in names:  # out of place: out is keyword-only (flashinfer's order puts eps third)
        getattr(fi_ffi, op)(*(args[n] for n in names if n != "out"), out=args["out"], **extra)
    else:
        getattr(fi_ffi, op)(*(args[n] for n in names), **extra)


@pytest.fixture
def fresh_bindings(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], Any]:
    """An empty table of bound entry points for the test: anything bound meanwhile shows up in it."""
    table: dict[tuple[str, str], Any] = {}
    monkeypatch.setattr(kernels, "_bound", table)
    return table


@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(broken_norm_calls())
def test_broken_norm_calls_never_reach_the_ffi(
    fresh_bindings: dict[tuple[str, str], Any], call: tuple[str, dict[str, Any], str, Any, type[Exception]]
) -> None:
    op, valid, culprit, flaw, error = call
    names = OPS[op]
    second = names[1] if names[1] != "weight" else names[2]
    # the unbroken call passes every check (so the error below is the flaw's doing)
    norm._rows((2,), second)(SimpleNamespace(**valid, eps=1e-6))
    with pytest.raises((ValueError, TypeError)) as info:
        _call(op, {**valid, culprit: flaw})
    assert not isinstance(info.value, KernelError)  # refused before the module: no error of the kernel
    assert isinstance(info.value, error), repr(info.value)
    # the message starts with the broken argument's name; a broken input may instead show up as the first
    # tensor that disagrees with it
    text = str(info.value)
    allowed = names if culprit == "input" else (culprit,)
    assert text.startswith(tuple(f"{n}: " for n in allowed)), text
    assert not any(uri == "norm" for uri, _ in fresh_bindings), "the norm module was bound"


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        # unhashable and malformed dtypes (the parse cache must not see them first), non-int triples
        (dict(dtype={}), "dtype"),
        (dict(dtype=[2, 16, 1]), "dtype"),
        (dict(dtype=({}, 16, 1)), "dtype"),
        (dict(dtype=([],)), "dtype"),
        (dict(dtype=("a", "b", "c")), "dtype"),
        (dict(dtype=(2.5, 16, 1)), "dtype"),
        (dict(dtype=(True, 16, 1)), "dtype"),
        # unhashable devices, and values equal to a cached int ordinal (False == 0, 1.0 == 1)
        (dict(device={}), "device"),
        (dict(device=[0]), "device"),
        (dict(device=(2, {})), "device"),
        (dict(device=False), "device"),
        (dict(device=0.0), "device"),
        (dict(device=True), "device"),
        (dict(device=1.0), "device"),
        # iterables that are not sequences of sizes
        (dict(shape={}), "shape"),
        (dict(shape={2: 3}), "shape"),
        (dict(shape={2, 3}), "shape"),
        (dict(shape="23"), "shape"),
    ],
)
def test_bad_layout_arguments_are_named_after_the_same_layout_was_parsed(kwargs: dict[str, Any], arg: str) -> None:
    for device in (0, 1):  # warm the parse cache for (shape, "float16", 0) and (shape, "float16", 1)
        Tensor.from_pointer(0x1000, (2, 3), "float16", device)
    with pytest.raises(TypeError) as info:
        Tensor.from_pointer(**{"data_ptr": 0x1000, "shape": (2, 3), "dtype": "float16", "device": 0, **kwargs})
    assert str(info.value).startswith(f"{arg}: "), str(info.value)
    assert type(info.value) is TypeError


def test_a_triple_of_ints_is_a_dtype() -> None:
    assert Tensor.from_pointer(0x1000, (2,), (2, 16, 1)).dtype == dtypes.float16
    assert dtypes.dtype((4, 16, 1)) == dtypes.bfloat16


@pytest.mark.parametrize(
    "scalar_type, expected",
    [(np.float16, dtypes.float16), (np.int32, dtypes.int32), (np.uint8, dtypes.uint8), (np.bool_, dtypes.bool_)],
)
def test_a_numpy_scalar_type_is_a_dtype_as_numpy_dtype_names_it(scalar_type: type, expected: dtypes.DType) -> None:
    # np.float16 as np.dtype(np.float16) and "float16" are: a numpy user's first spelling
    assert Tensor.from_pointer(0x1000, (2,), scalar_type, device=0).dtype == expected
    assert dtypes.dtype(scalar_type) == dtypes.dtype(np.dtype(scalar_type)) == expected


@pytest.mark.parametrize("scalar_type", [np.float64, np.complex64, np.floating, np.generic, float, int])
def test_a_numpy_scalar_type_fi_ffi_does_not_take_is_refused_by_name(scalar_type: type) -> None:
    with pytest.raises(TypeError, match=r"^dtype: unsupported dtype .*: expected one of float16, bfloat16"):
        Tensor.from_pointer(0x1000, (2,), scalar_type, device=0)


@pytest.mark.parametrize("offset,exc", [(1.5, TypeError), ("1", TypeError), (True, TypeError), (-1, ValueError)])
def test_a_bad_view_offset_is_named(offset: Any, exc: type) -> None:
    with pytest.raises(exc, match="^offset: "):
        Tensor.from_pointer(0x1000, (8,), "float16").view((4,), offset=offset)


@pytest.mark.parametrize(
    "shape, dtype, device",
    [((1, 128), "float16", 0), ((4, 0, 3), "bfloat16", "cuda:1"), ((), dtypes.float32, "cpu"), ((7,), "int8", 2)],
)
def test_a_layout_met_before_describes_as_the_first_time(shape: tuple[int, ...], dtype: Any, device: Any) -> None:
    # from_pointer fills a layout it met before from the parsed-layout cache, without __init__; every
    # field must equal the first (parsed) description's, the owner is this call's, and no record is shared
    tensor_module.clear_layouts()
    first_owner, second_owner = object(), object()
    first = Tensor.from_pointer(0x1000, shape, dtype, device, owner=first_owner)
    second = Tensor.from_pointer(0x2000, shape, dtype, device, owner=second_owner)
    assert (shape, dtype, device) in tensor_module._PARSED  # the second call took the cached case
    fields = ("shape", "strides", "dtype", "device", "ndim", "_lid")
    assert [getattr(second, f) for f in fields] == [getattr(first, f) for f in fields]
    assert (second.data_ptr, second.owner, second._block) == (0x2000, second_owner, None)
    assert read_record(second)["data"] == 0x2000 and read_record(first)["data"] == 0x1000


@pytest.mark.parametrize("ptr", [-1, 1 << 64, 4096.0, True, "0x1000", None])
def test_a_bad_pointer_is_named_after_its_layout_was_parsed(ptr: Any) -> None:
    Tensor.from_pointer(0x1000, (2, 3), "float16", 0)  # warm: the cached case is taken for good pointers
    with pytest.raises((TypeError, ValueError)) as info:
        Tensor.from_pointer(ptr, (2, 3), "float16", 0)
    assert str(info.value).startswith("data_ptr: "), str(info.value)
