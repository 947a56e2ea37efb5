"""Radix top-k on the CPU machine, against the real ``topk.so`` of the 0.6.3 extension test wheel.

A call with fake ``cuda:0`` descriptors must get past the module's signature check and stop at its first CUDA
call; every bad argument is refused by our checks, naming it, before the kernel is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import fakes
from helpers.fakes import reached

import fi_ffi
from fi_ffi.ops import topk as T
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only  # fake cuda:0 descriptors over host memory

MIB = 1 << 20
R, L, K = 4, 256, 8


def fake_cuda(
    shape: tuple[int, ...], dtype: str = "float32", strides: tuple[int, ...] | None = None, device: object = "cuda:0"
) -> Tensor:
    """:func:`helpers.fakes.fake_cuda` with float32 as the default dtype (these ops' scores and probabilities)."""
    return fakes.fake_cuda(shape, dtype, strides, device)


def states(nbytes: int = MIB, **kw: Any) -> Tensor:
    return fake_cuda((nbytes,), "uint8", **kw)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_top_k_reaches_the_device_check(kernel_modules: list[str], dtype: str) -> None:
    values, indices = fake_cuda((R, K), dtype), fake_cuda((R, K), "int32")
    text = reached(
        lambda: fi_ffi.top_k(fake_cuda((R, L), dtype), K, values=values, indices=indices, row_states_buffer=states())
    )
    assert (
        f"topk.radix_topk(DLTensor*({dtype}[4, 256] cuda:0), DLTensor*(int32[4, 8] cuda:0), "
        f"DLTensor*({dtype}[4, 8] cuda:0), DLTensor*(uint8[1048576] cuda:0), 8)" in text
    )


@pytest.mark.parametrize("row_to_batch", [False, True])
def test_page_table_transform_reaches_the_device_check(kernel_modules: list[str], row_to_batch: bool) -> None:
    extra = {"row_to_batch": fake_cuda((R,), "int32")} if row_to_batch else {}
    text = reached(
        lambda: fi_ffi.top_k_page_table_transform(
            fake_cuda((R, L)),
            fake_cuda((2 if row_to_batch else R, L), "int32"),
            fake_cuda((R,), "int32"),
            K,
            out=fake_cuda((R, K), "int32"),
            row_states_buffer=states(),
            **extra,
        )
    )
    assert "topk.radix_topk_page_table_transform(" in text
    assert ("DLTensor*(int32[4] cuda:0), DLTensor*(int32[4] cuda:0)" in text) == row_to_batch


def test_ragged_transform_reaches_the_device_check(kernel_modules: list[str]) -> None:
    text = reached(
        lambda: fi_ffi.top_k_ragged_transform(
            fake_cuda((R, L), "float16"),
            fake_cuda((R,), "int32"),
            fake_cuda((R,), "int32"),
            300,
            out=fake_cuda((R, 300), "int32"),
            row_states_buffer=states(),
        )
    )
    assert text.rstrip(")").endswith(", 300")  # k may exceed the row length: short rows are padded with -1


GOOD = {"input": ((R, L), "float32"), "values": ((R, K), "float32"), "indices": ((R, K), "int32")}


@pytest.mark.parametrize(
    ("change", "k", "exc", "pattern"),
    [
        ({"input": ((R, L), "int32")}, K, TypeError, r"^input: expected dtype float32, float16, bfloat16, got int32"),
        ({"input": ((R, 2, L), "float32")}, K, ValueError, r"^input: expected a 2-D tensor"),
        ({"values": ((R, K), "float16")}, K, TypeError, r"^values: expected dtype float32, got float16"),
        ({"values": ((R, K + 1), "float32")}, K, ValueError, r"^values: expected shape \(4, 8\)"),
        ({"indices": ((R, K), "int64")}, K, TypeError, r"^indices: expected dtype int32, got int64"),
        ({"indices": ((R + 1, K), "int32")}, K, ValueError, r"^indices: expected shape \(4, 8\)"),
        ({}, 0, ValueError, r"^k: expected an int in \[1, 256\] \(the row length\), got 0"),
        ({}, L + 1, ValueError, r"^k: expected an int in \[1, 256\] \(the row length\), got 257"),
        ({}, 2.0, TypeError, r"^k: expected an int, got float"),
        ({}, True, TypeError, r"^k: expected an int, got bool"),
    ],
)
def test_bad_top_k_arguments_are_named(change: dict[str, Any], k: Any, exc: type, pattern: str) -> None:
    spec = {**GOOD, **change}
    x, v, i = (fake_cuda(*spec[n]) for n in ("input", "values", "indices"))
    with pytest.raises(exc, match=pattern):
        fi_ffi.top_k(x, k, values=v, indices=i, row_states_buffer=states())


def test_bad_layouts_devices_and_pointers_are_named() -> None:
    v, i = fake_cuda((R, K)), fake_cuda((R, K), "int32")
    with pytest.raises(ValueError, match=r"^input: expected a contiguous tensor"):
        fi_ffi.top_k(fake_cuda((R, L), strides=(2 * L, 1)), K, values=v, indices=i, row_states_buffer=states())
    with pytest.raises(ValueError, match=r"^input: expected a CUDA device tensor, got one on cpu"):
        fi_ffi.top_k(fake_cuda((R, L), device="cpu"), K, values=v, indices=i, row_states_buffer=states())
    with pytest.raises(ValueError, match=r"^indices: expected a tensor on cuda:0 \(same as input\), got cuda:1"):
        fi_ffi.top_k(
            fake_cuda((R, L)), K, values=v, indices=fake_cuda((R, K), "int32", device=1), row_states_buffer=states()
        )
    with pytest.raises(ValueError, match=r"^input: data pointer is NULL"):
        fi_ffi.top_k(
            Tensor.from_pointer(0, (R, L), "float32", "cuda:0"), K, values=v, indices=i, row_states_buffer=states()
        )
    with pytest.raises(ValueError, match=r"^values: an output's elements must not overlap"):
        fi_ffi.top_k(
            fake_cuda((R, L)), K, values=fake_cuda((R, K), strides=(0, 1)), indices=i, row_states_buffer=states()
        )


def test_row_states_buffer_is_required_and_sized() -> None:
    x, v, i = fake_cuda((R, L)), fake_cuda((R, K)), fake_cuda((R, K), "int32")
    with pytest.raises(TypeError, match=r"^row_states_buffer: expected a tensor, got None"):
        fi_ffi.top_k(x, K, values=v, indices=i, row_states_buffer=None)
    with pytest.raises(
        ValueError,
        match=rf"^row_states_buffer: needs at least {MIB} bytes \(ROW_STATES_BYTES\), "
        rf"got {MIB // 2}",
    ):
        fi_ffi.top_k(x, K, values=v, indices=i, row_states_buffer=states(MIB // 2))
    with pytest.raises(ValueError, match=r"^row_states_buffer: expected a 1-D tensor"):
        fi_ffi.top_k(x, K, values=v, indices=i, row_states_buffer=fake_cuda((2, MIB), "uint8"))
    with pytest.raises(ValueError, match=r"^row_states_buffer: expected a tensor on cuda:0 \(same as input\)"):
        fi_ffi.top_k(x, K, values=v, indices=i, row_states_buffer=states(device=1))
    assert T.ROW_STATES_BYTES == MIB


def transform(op: Callable[..., Any], index: str, spec: dict[str, Any], **extra: Any) -> Any:
    """``op`` (a transform) of ``[R, L]`` scores, with the tensors ``spec`` gives as ``(shape, dtype)`` under their
    names (``index``: the op's own index tensor, then ``lengths`` and ``out``) and ``spec["k"]`` (default ``K``)."""
    return op(
        fake_cuda((R, L)),
        fake_cuda(*spec[index]),
        fake_cuda(*spec["lengths"]),
        spec.get("k", K),
        out=fake_cuda(*spec["out"]),
        row_states_buffer=states(),
        **extra,
    )


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        (
            {"src_page_table": ((R, L - 1), "int32")},
            ValueError,
            r"^src_page_table: expected at least 256 columns \(the input's row length\)",
        ),
        (
            {"src_page_table": ((R - 1, L), "int32")},
            ValueError,
            r"^src_page_table: without row_to_batch, row r reads page-table row r: expected at least 4 rows",
        ),
        ({"src_page_table": ((R, L), "int64")}, TypeError, r"^src_page_table: expected dtype int32"),
        ({"lengths": ((R + 1,), "int32")}, ValueError, r"^lengths: expected shape \(4,\)"),
        ({"lengths": ((R,), "float32")}, TypeError, r"^lengths: expected dtype int32"),
        ({"row_to_batch": ((R - 1,), "int32")}, ValueError, r"^row_to_batch: expected shape \(4,\)"),
        ({"out": ((R, K), "int64")}, TypeError, r"^out: expected dtype int32"),
        ({"out": ((R, K - 1), "int32")}, ValueError, r"^out: expected shape \(4, 8\)"),
        ({"k": 0}, ValueError, r"^k: expected an int in \[1, 2\*\*31\)"),
    ],
)
def test_bad_page_table_transform_arguments_are_named(change: dict[str, Any], exc: type, pattern: str) -> None:
    spec: dict[str, Any] = {
        "src_page_table": ((R, L), "int32"),
        "lengths": ((R,), "int32"),
        "out": ((R, K), "int32"),
        **change,
    }
    extra = {"row_to_batch": fake_cuda(*spec["row_to_batch"])} if "row_to_batch" in spec else {}
    with pytest.raises(exc, match=pattern):
        transform(fi_ffi.top_k_page_table_transform, "src_page_table", spec, **extra)


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"offsets": ((R, 1), "int32")}, ValueError, r"^offsets: expected a 1-D tensor"),
        ({"offsets": ((R,), "int64")}, TypeError, r"^offsets: expected dtype int32"),
        ({"lengths": ((R - 1,), "int32")}, ValueError, r"^lengths: expected shape \(4,\)"),
        ({"out": ((R + 1, K), "int32")}, ValueError, r"^out: expected shape \(4, 8\)"),
        ({"k": -1}, ValueError, r"^k: expected an int in \[1, 2\*\*31\)"),
        ({"k": 2**31}, ValueError, r"^k: expected an int in \[1, 2\*\*31\)"),
    ],
)
def test_bad_ragged_transform_arguments_are_named(change: dict[str, Any], exc: type, pattern: str) -> None:
    spec: dict[str, Any] = {"offsets": ((R,), "int32"), "lengths": ((R,), "int32"), "out": ((R, K), "int32"), **change}
    with pytest.raises(exc, match=pattern):
        transform(fi_ffi.top_k_ragged_transform, "offsets", spec)
