"""Paged KV append (MHA and MLA) on the CPU machine, against the real ``page.so`` of the test wheel, plus the
host-side index helpers.

With no GPU, a call whose descriptors claim ``cuda:0`` passes our checks, crosses the FFI, passes the module's
signature and argument checks and stops at the module's first CUDA call (the device guard). That proves the
packing matches the real signature. Invalid arguments must be rejected by our checks before the FFI.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from helpers.fakes import fake_cuda
from helpers.page_args import kv_args, mla_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fi_ffi.errors import KernelError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.ops import page
from fi_ffi.tensor.descriptor import Tensor

# Descriptors here claim cuda:0 over host memory: only a machine without a GPU stops them before a launch.
pytestmark = pytest.mark.cpu_only

SIGNATURES = {
    "append_paged_kv_cache": "append_paged_kv_cache(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: DLTensor*, "
    "4: DLTensor*, 5: DLTensor*, 6: DLTensor*, 7: DLTensor*, 8: DLTensor*, 9: int) -> void",
    "append_paged_mla_kv_cache": "append_paged_mla_kv_cache(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, "
    "3: DLTensor*, 4: DLTensor*, 5: DLTensor*, 6: DLTensor*, 7: DLTensor*, "
    "8: DLTensor*) -> void",
}


def assert_reached_the_kernel(err: KernelError) -> None:
    """The module accepted the argument list and its checks, and failed on the missing CUDA driver."""
    assert err.kind != "TypeError", f"signature mismatch: {err}"
    assert "Mismatched" not in err.message and "Expected" not in err.message, err.message
    assert "cuda" in err.message.lower() and "driver" in err.message.lower(), err.message


# ---- the real module: signature and packing ----


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_of_real_module_matches_our_wire_layout(kernel_modules: object, name: str) -> None:
    assert SIGNATURES[name] in entry_point("page", name).signature_text()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("stream", [None, 0, 12345])
def test_append_gets_past_the_signature_check(kernel_modules: object, layout: str, dtype: str, stream: object) -> None:
    with pytest.raises(KernelError) as info:
        page.append_paged_kv_cache(stream=stream, **kv_args(layout=layout, dtype=dtype))
    assert_reached_the_kernel(info.value)
    described = ", ".join(info.value.arguments)
    assert f"{dtype}[5, 8, 128] cuda:0" in described
    assert "int32[5] cuda:0" in described and "int32[3] cuda:0" in described
    assert info.value.arguments[9] == ("0" if layout == "NHD" else "1")


def test_append_with_strided_tokens_and_a_combined_cache_gets_past_the_signature_check(kernel_modules: object) -> None:
    nnz, h, d, p, ps = 3, 4, 128, 5, 16
    # k and v slices of a fused [nnz, 3, H, D] QKV; k/v halves of a combined [P, 2, page, H, D] cache.
    k = fake_cuda((nnz, h, d), strides=(3 * h * d, d, 1))
    kc = fake_cuda((p, ps, h, d), strides=(2 * ps * h * d, h * d, d, 1))
    with pytest.raises(KernelError) as info:
        page.append_paged_kv_cache(
            **kv_args(nnz=nnz, heads=h, num_pages=p, append_key=k, append_value=k, k_cache=kc, v_cache=kc)
        )
    assert_reached_the_kernel(info.value)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn"])
def test_mla_append_gets_past_the_signature_check(kernel_modules: object, dtype: str) -> None:
    with pytest.raises(KernelError) as info:
        page.append_paged_mla_kv_cache(**mla_args(dtype=dtype), stream=0)
    assert_reached_the_kernel(info.value)
    assert f"{dtype}[6, 16, 512] cuda:0" in ", ".join(info.value.arguments)


def test_host_tensors_stop_at_the_modules_device_check(kernel_modules: object) -> None:
    args = kv_args()
    values = list(args.values())
    flat = [*values[:4], *values[4], *values[5:8]]  # the wire order: the (k, v) tuple as two tensors
    host = [
        Tensor.from_pointer(t.data_ptr, t.shape, t.dtype, "cpu", owner=t)  # type: ignore[attr-defined]
        for t in flat
    ]
    with pytest.raises(KernelError) as info:
        entry_point("page", "append_paged_kv_cache")(*host, 0)  # bypasses our checks on purpose
    assert info.value.kind == "InternalError"
    assert "must be a CUDA tensor" in info.value.message


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_kv_cache_as_one_tensor_reaches_the_kernel_as_its_two_halves(kernel_modules: object, layout: str) -> None:
    # flashinfer's other form: one [num_pages, 2, ...] tensor, keys at [:, 0], values at [:, 1]
    inner = (16, 8, 128) if layout == "NHD" else (8, 16, 128)
    kv = fake_cuda((6, 2, *inner))
    launcher = page._append.launcher
    with pytest.raises(KernelError) as info:
        page.append_paged_kv_cache(**kv_args(layout=layout, paged_kv_cache=kv))
    assert_reached_the_kernel(info.value)
    half = 16 * 8 * 128 * 2  # bytes of one page's keys
    assert packed_data_ptr(launcher, 4) == kv.data_ptr
    assert packed_data_ptr(launcher, 5) == kv.data_ptr + half
    assert f"float16[6, {inner[0]}, {inner[1]}, 128] cuda:0" in info.value.arguments[4]


def test_paged_kv_cache_as_one_4d_tensor_is_page_size_1() -> None:
    kv = fake_cuda((6, 2, 8, 128))  # flashinfer's page size 1 without its dimension
    k, v = page._split_paged_kv_cache(kv, "NHD")
    assert k.shape == v.shape == (6, 1, 8, 128) and v.data_ptr - k.data_ptr == 8 * 128 * 2


@pytest.mark.parametrize(
    ("cache", "exc", "pattern"),
    [
        (lambda: None, TypeError, r"^paged_kv_cache: expected a \(k_cache, v_cache\) tuple or one tensor"),
        (lambda: [fake_cuda((6, 16, 8, 128))] * 2, TypeError, r"^paged_kv_cache: expected .* got list"),
        (lambda: (fake_cuda((6, 16, 8, 128)),), ValueError, r"^paged_kv_cache: .* got a tuple of 1"),
        (lambda: fake_cuda((6, 3, 16, 8, 128)), ValueError, r"^paged_kv_cache: expected one tensor \[num_pages, 2"),
        (lambda: fake_cuda((6, 2, 16, 8, 128, 1)), ValueError, r"^paged_kv_cache: expected one tensor"),
    ],
)
def test_bad_paged_kv_cache_forms_are_named(cache: Any, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        page.append_paged_kv_cache(**kv_args(paged_kv_cache=cache()))


def test_empty_append_is_a_no_op_and_never_reaches_the_kernel(kernel_modules: object) -> None:
    # With no GPU, reaching the kernel would raise; nnz == 0 must return before that.
    assert page.append_paged_kv_cache(**kv_args(nnz=0)) is None
    assert page.append_paged_mla_kv_cache(**mla_args(nnz=0)) is None


def test_validation_memo_does_not_hide_a_changed_argument(kernel_modules: object) -> None:
    args = kv_args()
    with pytest.raises(KernelError):
        page.append_paged_kv_cache(**args)  # validated and remembered
    with pytest.raises(KernelError):
        page.append_paged_kv_cache(**args)  # same descriptors: memo hit, still reaches the kernel
    with pytest.raises(TypeError, match="positions: expected dtype int32"):
        page.append_paged_kv_cache(**{**args, "positions": fake_cuda((5,), "int64")})
    with pytest.raises(ValueError, match="kv_layout: 'HND' reads k_cache"):
        page.append_paged_kv_cache(**{**args, "kv_layout": "HND"})  # same tensors, other layout: heads differ


# ---- our checks: every rule, each bad argument named, nothing crosses the FFI ----


@pytest.mark.parametrize("name", ["batch_indices", "positions", "kv_indices", "kv_indptr", "kv_last_page_len"])
@pytest.mark.parametrize("dtype", ["int64", "uint32", "float32"])
def test_index_arrays_must_be_int32(name: str, dtype: str) -> None:
    args = kv_args()
    bad = fake_cuda(args[name].shape, dtype)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=rf"{name}: expected dtype int32 .*got {dtype}"):
        page.append_paged_kv_cache(**{**args, name: bad})
    margs = mla_args()
    with pytest.raises(TypeError, match=rf"{name}: expected dtype int32"):
        page.append_paged_mla_kv_cache(**{**margs, name: fake_cuda(margs[name].shape, dtype)})  # type: ignore


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(layout="nhd"), ValueError, r"kv_layout: expected 'NHD' or 'HND', got 'nhd'"),
        (dict(layout=0), TypeError, r"kv_layout: expected 'NHD' or 'HND', got 0"),
        (dict(append_key=fake_cuda((5, 8, 128, 1))), ValueError, r"append_key: expected a 3-D tensor"),
        (dict(append_key=fake_cuda((5, 8, 128), "float32")), TypeError, r"append_key: expected dtype float16, "),
        (dict(append_key=fake_cuda((5, 8, 128), device="cpu")), ValueError, r"append_key: expected a CUDA device"),
        (
            dict(append_key=fake_cuda((5, 8, 128), strides=(2048, 256, 2))),
            ValueError,
            r"append_key: the last dimension must be contiguous",
        ),
        (dict(append_value=fake_cuda((5, 8, 64))), ValueError, r"append_value: expected shape \(5, 8, 128\)"),
        (
            dict(append_value=fake_cuda((5, 8, 128), "bfloat16")),
            TypeError,
            r"append_value: expected dtype float16 \(same as append_key\)",
        ),
        (
            dict(append_value=fake_cuda((5, 8, 128), device=1)),
            ValueError,
            r"append_value: expected a tensor on cuda:0 \(same as append_key\), got cuda:1",
        ),
        (dict(k_cache=fake_cuda((6, 16, 8, 128, 1))), ValueError, r"k_cache: expected a 4-D tensor"),
        (
            dict(k_cache=fake_cuda((6, 16, 8, 128), "bfloat16")),
            TypeError,
            r"append_key: expected k_cache's dtype bfloat16",
        ),
        (dict(k_cache=fake_cuda((6, 16, 8, 128), device=1)), ValueError, r"k_cache: expected a tensor on cuda:0"),
        (dict(v_cache=fake_cuda((6, 16, 8, 128), device=1)), ValueError, r"v_cache: expected a tensor on cuda:0"),
        (dict(v_cache=fake_cuda((7, 16, 8, 128))), ValueError, r"v_cache: expected shape \(6, 16, 8, 128\)"),
        (dict(v_cache=fake_cuda((6, 16, 8, 128), "bfloat16")), TypeError, r"v_cache: expected dtype float16"),
        (
            dict(v_cache=fake_cuda((6, 16, 8, 128), strides=(2 * 16 * 8 * 128, 8 * 128, 128, 1))),
            ValueError,
            r"v_cache: expected the same strides as k_cache",
        ),
        (
            dict(k_cache=fake_cuda((6, 16, 4, 128)), v_cache=fake_cuda((6, 16, 4, 128))),
            ValueError,
            r"append_key: expected \[nnz, 4, 128\] to match k_cache",
        ),
        (
            # an NHD cache (16 tokens of 8 heads a page) called HND: the layout is blamed, not append_key's shape
            dict(layout="HND", k_cache=fake_cuda((6, 16, 8, 128)), v_cache=fake_cuda((6, 16, 8, 128))),
            ValueError,
            r"^kv_layout: 'HND' reads k_cache \(6, 16, 8, 128\) as 16 heads of pages of 8 tokens, but append_key "
            r"\(5, 8, 128\) has 8 heads: the cache is laid out NHD \(\[num_pages, page_size, num_kv_heads, "
            r"head_dim\]\); pass kv_layout='NHD'$",
        ),
        (
            dict(layout="HND", k_cache=fake_cuda((6, 4, 16, 128)), v_cache=fake_cuda((6, 4, 16, 128))),
            ValueError,
            r"append_key: expected \[nnz, 4, 128\] to match k_cache .*HND",  # neither layout fits: the shape
        ),
        (
            dict(k_cache=fake_cuda((6, 0, 8, 128)), v_cache=fake_cuda((6, 0, 8, 128))),
            ValueError,
            r"k_cache: expected page_size >= 1",
        ),
        (dict(batch_indices=fake_cuda((4,), "int32")), ValueError, r"batch_indices: expected shape \(5,\)"),
        (dict(positions=fake_cuda((5, 1), "int32")), ValueError, r"positions: expected a 1-D tensor"),
        (dict(kv_indptr=fake_cuda((2,), "int32")), ValueError, r"kv_indptr: expected shape \(3,\)"),
        (
            dict(kv_indices=fake_cuda((6,), "int32", device="cpu")),
            ValueError,
            r"kv_indices: expected a tensor on cuda:0 \(same as append_key\), got cpu",
        ),
        (
            dict(kv_last_page_len=fake_cuda((4,), "int32", strides=(2,))),
            ValueError,
            r"kv_last_page_len: expected a contiguous tensor",
        ),
        (dict(positions=Tensor.from_pointer(0, (5,), "int32", 0)), ValueError, r"positions: data pointer is NULL"),
    ],
)
def test_bad_arguments_are_named(change: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        page.append_paged_kv_cache(**kv_args(**change))


@pytest.mark.parametrize("head_dim", [32, 96, 100, 1024])
def test_unsupported_head_dim(head_dim: int) -> None:
    with pytest.raises(ValueError, match=rf"k_cache: expected head_dim .* in \(64, 128, 256, 512\), got {head_dim}"):
        page.append_paged_kv_cache(**kv_args(head_dim=head_dim))


@pytest.mark.parametrize(
    "dtype,head_dim,max_heads",
    [
        ("float16", 128, 64),
        ("float16", 64, 128),
        ("bfloat16", 256, 32),
        ("float8_e4m3fn", 128, 128),
        ("float16", 512, 32),
    ],
)
def test_heads_limited_by_the_kernels_block_size(
    kernel_modules: object, dtype: str, head_dim: int, max_heads: int
) -> None:
    with pytest.raises(KernelError):  # the largest head count that fits a block reaches the kernel
        page.append_paged_kv_cache(**kv_args(heads=max_heads, head_dim=head_dim, dtype=dtype))
    with pytest.raises(ValueError, match="append_key: too many heads for the kernel"):
        page.append_paged_kv_cache(**kv_args(heads=max_heads + 1, head_dim=head_dim, dtype=dtype))


def test_alignment_and_32_bit_cache_strides_are_checked() -> None:
    misaligned = fake_cuda((5, 8, 128)).view((5, 8, 128), offset=1)
    with pytest.raises(ValueError, match=r"append_key: data pointer .* must be aligned to 16 bytes"):
        page.append_paged_kv_cache(**kv_args(append_key=misaligned))
    with pytest.raises(ValueError, match="append_value: stride of dimension 1 must be a multiple of 8"):
        page.append_paged_kv_cache(**kv_args(append_value=fake_cuda((5, 8, 128), strides=(8 * 132, 132, 1))))
    odd = (16 * 8 * 128 + 4, 8 * 128, 128, 1)
    with pytest.raises(ValueError, match="k_cache: stride of dimension 0 must be a multiple of 8"):
        page.append_paged_kv_cache(
            **kv_args(k_cache=fake_cuda((6, 16, 8, 128), strides=odd), v_cache=fake_cuda((6, 16, 8, 128), strides=odd))
        )
    huge = (1 << 32, 8 * 128, 128, 1)
    with pytest.raises(ValueError, match=r"k_cache: strides must be < 2\*\*32"):
        page.append_paged_kv_cache(
            **kv_args(
                k_cache=fake_cuda((6, 16, 8, 128), strides=huge), v_cache=fake_cuda((6, 16, 8, 128), strides=huge)
            )
        )


def test_bad_stream_and_missing_tensor_are_named() -> None:
    with pytest.raises(TypeError, match="stream"):
        page.append_paged_kv_cache(stream="default", **kv_args())
    with pytest.raises(TypeError, match="kv_indices: expected a tensor, got None"):
        page.append_paged_kv_cache(**kv_args(kv_indices=None))


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(append_ckv=fake_cuda((5, 256), "bfloat16")), ValueError, r"append_ckv: the kernel supports ckv_dim 512"),
        (dict(append_ckv=fake_cuda((5, 512, 1), "bfloat16")), ValueError, r"append_ckv: expected a 2-D tensor"),
        (dict(append_ckv=fake_cuda((5, 512), "float32")), TypeError, r"append_ckv: expected dtype"),
        (dict(append_kpe=fake_cuda((5, 32), "bfloat16")), ValueError, r"append_kpe: expected shape \(5, 64\)"),
        (dict(append_kpe=fake_cuda((5, 64), "float16")), TypeError, r"append_kpe: expected dtype bfloat16"),
        (dict(append_kpe=fake_cuda((5, 64), "bfloat16", device=1)), ValueError, r"append_kpe: expected a tensor on"),
        (
            dict(ckv_cache=fake_cuda((6, 16, 512), "float16")),
            TypeError,
            r"append_ckv: expected ckv_cache's dtype float16",
        ),
        (
            dict(ckv_cache=fake_cuda((6, 16, 256), "bfloat16")),
            ValueError,
            r"ckv_cache: expected \[num_pages, page_size, 512\]",
        ),
        (dict(kpe_cache=fake_cuda((6, 8, 64), "bfloat16")), ValueError, r"kpe_cache: expected shape \(6, 16, 64\)"),
        (dict(kpe_cache=fake_cuda((6, 16, 64), "float16")), TypeError, r"kpe_cache: expected dtype bfloat16"),
        (
            dict(kpe_cache=fake_cuda((6, 16, 64), "bfloat16", device="cpu")),
            ValueError,
            r"kpe_cache: expected a tensor on cuda:0",
        ),
        (
            dict(kpe_cache=fake_cuda((6, 16, 64), "bfloat16", strides=(2048, 128, 2))),
            ValueError,
            r"kpe_cache: the last dimension must be contiguous",
        ),
        (
            dict(append_ckv=fake_cuda((5, 512), "bfloat16", strides=(513, 1))),
            ValueError,
            r"append_ckv: stride of dimension 0 must be a multiple of 2",
        ),
        (dict(positions=fake_cuda((6,), "int32")), ValueError, r"positions: expected shape \(5,\)"),
    ],
)
def test_bad_mla_arguments_are_named(change: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        page.append_paged_mla_kv_cache(**mla_args(**change))


def test_mla_cache_strides_may_differ_between_ckv_and_kpe(kernel_modules: object) -> None:
    # ckv and kpe halves of one [P, page, 576] buffer: rows of 576 elements in both.
    ckv = fake_cuda((6, 16, 512), "bfloat16", strides=(16 * 576, 576, 1))
    kpe = fake_cuda((6, 16, 64), "bfloat16", strides=(16 * 576, 576, 1))
    with pytest.raises(KernelError) as info:
        page.append_paged_mla_kv_cache(**mla_args(ckv_cache=ckv, kpe_cache=kpe))
    assert_reached_the_kernel(info.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    nnz=st.integers(1, 300),
    heads=st.sampled_from([1, 2, 4, 8, 32]),
    head_dim=st.sampled_from([64, 128, 256]),
    page_size=st.sampled_from([1, 16, 64]),
    num_pages=st.integers(1, 50),
    batch=st.integers(1, 9),
    layout=st.sampled_from(["NHD", "HND"]),
    dtype=st.sampled_from(["float16", "bfloat16", "float8_e5m2"]),
)
def test_any_valid_shape_reaches_the_kernel(
    kernel_modules: object,
    nnz: int,
    heads: int,
    head_dim: int,
    page_size: int,
    num_pages: int,
    batch: int,
    layout: str,
    dtype: str,
) -> None:
    with pytest.raises(KernelError) as info:
        page.append_paged_kv_cache(**kv_args(nnz, heads, head_dim, page_size, num_pages, batch, layout, dtype))
    assert_reached_the_kernel(info.value)


@settings(max_examples=60, deadline=None)
@given(
    nnz=st.integers(1, 50),
    extra=st.integers(1, 3),
    which=st.sampled_from(["batch_indices", "positions"]),
    heads=st.sampled_from([2, 4]),
    other_heads=st.sampled_from([1, 3, 8]),
)
def test_mismatched_token_counts_and_heads_are_rejected(
    nnz: int, extra: int, which: str, heads: int, other_heads: int
) -> None:
    with pytest.raises(ValueError, match=rf"{which}: expected shape \({nnz},\)"):
        page.append_paged_kv_cache(**kv_args(nnz=nnz, heads=heads, **{which: fake_cuda((nnz + extra,), "int32")}))
    key = fake_cuda((nnz, other_heads, 128))
    with pytest.raises(ValueError, match=r"append_(key|value)"):
        page.append_paged_kv_cache(**kv_args(nnz=nnz, heads=heads, append_key=key, append_value=key))


# ---- host helpers ----


def test_batch_indices_positions_upstream_docstring_example() -> None:
    bi, pos = page.get_batch_indices_positions(np.array([0, 1, 3, 6, 10], np.int32), [5, 5, 5, 5], 10)
    assert bi.dtype == np.int32 and pos.dtype == np.int32
    assert bi.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert pos.tolist() == [4, 3, 4, 2, 3, 4, 1, 2, 3, 4]


def test_batch_indices_positions_prefill_from_empty_cache() -> None:
    # Upstream's append example: 45 + 8 + 25 + 22 tokens into empty requests with page size 16.
    lens = [45, 8, 25, 22]
    indptr = np.concatenate([[0], np.cumsum(lens)])
    seq = page.get_seq_lens([0, 3, 4, 6, 8], [13, 8, 9, 6], 16)
    assert seq.tolist() == lens
    bi, pos = page.get_batch_indices_positions(indptr, seq)
    assert bi.tolist() == [0] * 45 + [1] * 8 + [2] * 25 + [3] * 22
    assert pos.tolist() == list(range(45)) + list(range(8)) + list(range(25)) + list(range(22))


def test_batch_indices_positions_decode_step_and_idle_requests() -> None:
    # Request 0 holds 17 tokens after appending 1, request 1 appends nothing, request 2 holds 5 after 2 more.
    bi, pos = page.get_batch_indices_positions([0, 1, 1, 3], [17, 30, 5])
    assert bi.tolist() == [0, 2, 2]
    assert pos.tolist() == [16, 3, 4]
    empty_bi, empty_pos = page.get_batch_indices_positions([0], [])
    assert empty_bi.shape == (0,) and empty_pos.shape == (0,)


def test_batch_indices_positions_write_into_given_arrays() -> None:
    bi_out, pos_out = np.full(3, -1, np.int32), np.full(3, -1, np.int32)
    bi, pos = page.get_batch_indices_positions(
        np.array([0, 2, 3]), np.array([4, 1]), 3, batch_indices=bi_out, positions=pos_out
    )
    assert bi is bi_out and pos is pos_out
    assert bi.tolist() == [0, 0, 1] and pos.tolist() == [2, 3, 0]


@pytest.mark.parametrize(
    "indptr,seq,nnz,kw,exc,pattern",
    [
        ([1, 2], [3], None, {}, ValueError, r"append_indptr: expected offsets starting at 0"),
        ([0, 3, 2], [3, 3], None, {}, ValueError, r"append_indptr: expected non-decreasing offsets"),
        ([], [], None, {}, ValueError, r"append_indptr: expected \[batch \+ 1\] offsets"),
        ([0, 2], [2, 2], None, {}, ValueError, r"seq_lens: expected shape \(1,\)"),
        ([0, 3], [2], None, {}, ValueError, r"seq_lens: request 0 appends 3 tokens but seq_lens\[0\] = 2"),
        ([0, 3], [3], 4, {}, ValueError, r"nnz: expected append_indptr\[-1\] = 3, got 4"),
        ([0, 3], [3.0], None, {}, TypeError, r"seq_lens: expected integers, got seq_lens\[0\] = 3.0"),
        ([0, 3], np.array([3.0]), None, {}, TypeError, r"seq_lens: expected an integer array"),
        ([[0, 3]], [3], None, {}, ValueError, r"append_indptr: expected a 1-D array"),
        ([0, 3], [3], None, dict(positions=np.zeros(3, np.int64)), TypeError, r"positions: expected dtype int32"),
        (
            [0, 3],
            [3],
            None,
            dict(batch_indices=np.zeros(4, np.int32)),
            ValueError,
            r"batch_indices: expected shape \(3,\)",
        ),
        ([0, 3], [3], None, dict(batch_indices=[0, 0, 0]), TypeError, r"batch_indices: expected an int32 numpy"),
        ([0, 3], [2**31], None, {}, ValueError, r"seq_lens: values must fit in int32 .*seq_lens\[0\] = 2147483648"),
    ],
)
def test_batch_indices_positions_rejects_bad_input(
    indptr: list, seq: list, nnz: int | None, kw: dict, exc: type, pattern: str
) -> None:
    with pytest.raises(exc, match=pattern):
        page.get_batch_indices_positions(indptr, seq, nnz, **kw)


def test_batch_indices_positions_rejects_device_tensors() -> None:
    with pytest.raises(TypeError, match="append_indptr: expected a host array"):
        page.get_batch_indices_positions(fake_cuda((3,), "int32"), [1, 1])


@settings(max_examples=100, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=0, max_size=12), data=st.data())
def test_batch_indices_positions_match_a_per_token_loop(lens: list[int], data: st.DataObject) -> None:
    seq = [n + data.draw(st.integers(0, 100)) for n in lens]  # tokens already held before the append
    indptr = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    bi, pos = page.get_batch_indices_positions(indptr, np.asarray(seq, np.int32))
    expected_bi, expected_pos = [], []
    for b, n in enumerate(lens):
        for j in range(n):
            expected_bi.append(b)
            expected_pos.append(seq[b] - n + j)
    assert bi.tolist() == expected_bi and pos.tolist() == expected_pos


def test_seq_lens() -> None:
    assert page.get_seq_lens([0, 1, 1, 4], [5, 7, 16], 16).tolist() == [5, 0, 48]
    with pytest.raises(ValueError, match=r"kv_last_page_len: expected values in \[1, 16\]"):
        page.get_seq_lens([0, 1], [17], 16)
    with pytest.raises(ValueError, match=r"kv_last_page_len: expected shape \(2,\)"):
        page.get_seq_lens([0, 1, 2], [1], 16)
    with pytest.raises(ValueError, match="page_size: expected an int >= 1"):
        page.get_seq_lens([0, 1], [1], 0)


def test_check_append_positions() -> None:
    # Two requests, page size 4: request 0 owns pages [3, 0] holding 6 tokens, request 1 owns page [5] holding 1.
    table = dict(kv_indices=[3, 0, 5], kv_indptr=[0, 2, 3], kv_last_page_len=[2, 1], page_size=4)
    page.check_append_positions([0, 0, 1], [4, 5, 0], **table, num_pages=6)
    with pytest.raises(ValueError, match=r"positions: token 1 of request 0 has position 6, .* hold 6 tokens"):
        page.check_append_positions([0, 0], [5, 6], **table)
    with pytest.raises(ValueError, match=r"positions: token 0 of request 1 has position -1"):
        page.check_append_positions([1], [-1], **table)
    with pytest.raises(ValueError, match=r"batch_indices: token 0 names request 2, but the batch has 2 requests"):
        page.check_append_positions([2], [0], **table)
    with pytest.raises(ValueError, match=r"kv_indices: token 0 \(request 1, position 0\) goes to page 5, outside"):
        page.check_append_positions([1], [0], **table, num_pages=5)
    with pytest.raises(ValueError, match=r"kv_indptr: the last offset 3 exceeds the 2 entries of kv_indices"):
        page.check_append_positions([0], [0], **{**table, "kv_indices": [3, 0]})
    with pytest.raises(ValueError, match=r"positions: expected shape \(2,\)"):
        page.check_append_positions([0, 0], [0], **table)


def test_helpers_work_together_for_a_decode_step() -> None:
    page_size, seq_before = 16, np.array([15, 16, 40])
    seq_after = seq_before + 1  # one token each; request 1 needs a new page
    pages = -(-seq_after // page_size)
    indptr = np.concatenate([[0], np.cumsum(pages)])
    last = seq_after - (pages - 1) * page_size
    assert page.get_seq_lens(indptr, last, page_size).tolist() == seq_after.tolist()
    bi, pos = page.get_batch_indices_positions([0, 1, 2, 3], page.get_seq_lens(indptr, last, page_size))
    assert pos.tolist() == seq_before.tolist()
    page.check_append_positions(bi, pos, np.arange(indptr[-1]), indptr, last, page_size, num_pages=int(indptr[-1]))


# ---- the launcher: a cache per layer stays on the fast path, any producer, nothing escapes ----


class HostCAI:
    """A CUDA-array-interface producer over host memory (on a machine without a driver its pointer is taken as
    cuda:0). Unhashable, like CuPy arrays: the launcher must key it by its layout, not by the object."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f2", offset: int = 0) -> None:
        self.host = np.zeros(64, dtype=np.uint8)
        ptr = (self.host.ctypes.data + 15) // 16 * 16 + offset
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, False), strides=None, version=3)

    def __eq__(self, other: object) -> bool:
        return self is other


def cai_args(nnz: int, num_pages: int, heads: int = 4, head_dim: int = 128) -> dict[str, object]:
    """``kv_args`` with every tensor a HostCAI (float16 tokens and caches, int32 indices)."""
    cache = (num_pages, 16, heads, head_dim)
    return dict(
        append_key=HostCAI((nnz, heads, head_dim)),
        append_value=HostCAI((nnz, heads, head_dim)),
        batch_indices=HostCAI((nnz,), "<i4"),
        positions=HostCAI((nnz,), "<i4"),
        paged_kv_cache=(HostCAI(cache), HostCAI(cache)),
        kv_indices=HostCAI((num_pages,), "<i4"),
        kv_indptr=HostCAI((3,), "<i4"),
        kv_last_page_len=HostCAI((2,), "<i4"),
    )


@pytest.mark.parametrize("producer", ["descriptors", "cuda_array_interface"])
def test_a_32_layer_loop_with_a_cache_per_layer_stays_on_the_fast_path(kernel_modules: object, producer: str) -> None:
    # A decode step as a runtime issues it: the same token layout, another (same-layout) cache at every layer.
    # A layout no other test uses, so the first layer is the only one validated from scratch.
    num_pages = 41 if producer == "descriptors" else 43
    make = (
        (lambda: kv_args(nnz=3, heads=4, num_pages=num_pages))
        if producer == "descriptors"
        else (lambda: cai_args(nnz=3, num_pages=num_pages))
    )
    shared = make()
    layers = [make() for _ in range(32)]
    launcher = page._append.launcher
    before = launcher.slow_calls
    for step in range(2):
        for i, layer in enumerate(layers):
            args = {**shared, "paged_kv_cache": layer["paged_kv_cache"]}
            with pytest.raises(KernelError) as info:
                page.append_paged_kv_cache(**args)
            assert_reached_the_kernel(info.value)
            assert f"float16[{num_pages}, 16, 4, 128] cuda:0" in info.value.arguments[4]
            # the kernel was handed this layer's caches, not those the layout was first validated with
            assert packed_data_ptr(launcher, 4) == data_ptr(layer["paged_kv_cache"][0])
            assert packed_data_ptr(launcher, 5) == data_ptr(layer["paged_kv_cache"][1])
            assert launcher.slow_calls - before == 1, f"step {step}, layer {i} took the slow path"


def data_ptr(t: object) -> int:
    return t.data_ptr if isinstance(t, Tensor) else t.__cuda_array_interface__["data"][0]  # type: ignore


def packed_data_ptr(launcher: object, i: int) -> int:
    """The data pointer of the DLTensor the last call on this thread passed as argument ``i``."""
    from fi_ffi.abi.cdefs import get_ffi

    frame = launcher.tls.frame  # type: ignore[attr-defined]
    _type_index, _pad, raw = struct.unpack_from("<iIq", frame.buf, 16 * i)  # TVMFFIAny: 16 bytes per slot
    return int(get_ffi().cast("uintptr_t", get_ffi().cast("DLTensor*", raw).data))


def test_unhashable_producers_reach_the_kernel(kernel_modules: object) -> None:
    with pytest.raises(KernelError) as info:
        page.append_paged_kv_cache(**cai_args(nnz=2, num_pages=5))
    assert_reached_the_kernel(info.value)
    assert "float16[2, 4, 128] cuda:0" in ", ".join(info.value.arguments)


def test_empty_append_still_checks_the_stream_and_every_argument(kernel_modules: object) -> None:
    with pytest.raises(TypeError, match="stream"):
        page.append_paged_kv_cache(stream="default", **kv_args(nnz=0))
    with pytest.raises((TypeError, ValueError), match="stream"):
        page.append_paged_kv_cache(stream=-1, **kv_args(nnz=0))
    with pytest.raises(TypeError, match="stream"):
        page.append_paged_mla_kv_cache(**mla_args(nnz=0), stream=1.5)
    with pytest.raises(TypeError, match="positions: expected dtype int32"):
        page.append_paged_kv_cache(**kv_args(nnz=0, positions=fake_cuda((0,), "int64")))
    with pytest.raises(ValueError, match=r"k_cache: expected head_dim"):
        page.append_paged_kv_cache(**kv_args(nnz=0, head_dim=96))
    with pytest.raises(ValueError, match=r"kv_indptr: expected shape \(3,\)"):
        page.append_paged_mla_kv_cache(**mla_args(nnz=0, kv_indptr=fake_cuda((4,), "int32")))
    with pytest.raises(TypeError, match="kv_indices: expected a tensor, got None"):
        page.append_paged_kv_cache(**kv_args(nnz=0, kv_indices=None))
    assert page.append_paged_kv_cache(stream=7, **kv_args(nnz=0)) is None  # valid: nothing launched


@pytest.mark.parametrize(
    "name,dtype,offset",
    [
        ("batch_indices", "int32", 2),
        ("positions", "int32", 1),
        ("kv_indices", "int32", 2),
        ("kv_indptr", "int32", 3),
        ("kv_last_page_len", "int32", 2),
    ],
)
def test_misaligned_index_pointers_are_refused(kernel_modules: object, name: str, dtype: str, offset: int) -> None:
    args = kv_args()
    good = args[name]
    bad = Tensor.from_pointer(good.data_ptr + offset, good.shape, dtype, 0, owner=good)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=rf"{name}: data pointer 0x[0-9a-f]+ must be aligned to 4 bytes"):
        page.append_paged_kv_cache(**{**args, name: bad})
    with pytest.raises(KernelError):  # the same layout at an aligned address is fine (and now remembered)
        page.append_paged_kv_cache(**args)
    with pytest.raises(ValueError, match=rf"{name}: data pointer .* must be aligned to 4 bytes"):
        page.append_paged_kv_cache(**{**args, name: bad})  # the remembered layout does not hide it
    margs = mla_args()
    with pytest.raises(ValueError, match=rf"{name}: data pointer .* must be aligned to 4 bytes"):
        page.append_paged_mla_kv_cache(
            **{**margs, name: Tensor.from_pointer(margs[name].data_ptr + offset, margs[name].shape, dtype, 0)}
        )  # type: ignore[attr-defined]


def test_a_misaligned_cache_after_an_aligned_one_is_refused(kernel_modules: object) -> None:
    args = kv_args(num_pages=53)
    with pytest.raises(KernelError):
        page.append_paged_kv_cache(**args)
    kc = args["paged_kv_cache"][0]  # type: ignore[index]
    shifted = Tensor.from_pointer(kc.data_ptr + 8, kc.shape, "float16", 0)
    with pytest.raises(ValueError, match=r"k_cache: data pointer .* must be aligned to 16 bytes"):
        page.append_paged_kv_cache(**{**args, "paged_kv_cache": (shifted, shifted)})


def test_big_endian_producers_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="batch_indices"):
        page.append_paged_kv_cache(**kv_args(batch_indices=HostCAI((5,), ">i4")))


# ---- host helpers: bad values are named, never parsed, truncated or wrapped ----


@pytest.mark.parametrize(
    "value,exc,pattern",
    [
        ([0, 2**63], ValueError, r"kv_indptr: values must fit in int32 .*kv_indptr\[1\] = 9223372036854775808"),
        ([0, 2**70], ValueError, r"kv_indptr: values must fit in int32 .*kv_indptr\[1\] = 1180591620717411303424"),
        ([0, -(2**63) - 1], ValueError, r"kv_indptr: values must fit in int32"),
        (np.array([0, 2**64 - 1], np.uint64), ValueError, r"kv_indptr: values must fit .*18446744073709551615"),
        ([0, np.uint64(2**63)], ValueError, r"kv_indptr: values must fit in int32"),
        ([0, 2**31], ValueError, r"kv_indptr: values must fit in int32"),
        ([0, "1"], TypeError, r"kv_indptr: expected integers, got kv_indptr\[1\] = '1' \(str\)"),
        (["0", "1"], TypeError, r"kv_indptr: expected integers, got kv_indptr\[0\] = '0'"),
        ("01", TypeError, r"kv_indptr: expected a 1-D integer array, got str"),
        ([0, 1.0], TypeError, r"kv_indptr: expected integers, got kv_indptr\[1\] = 1.0 \(float\)"),
        ([0, 1.5], TypeError, r"kv_indptr: expected integers"),
        ([0, True], TypeError, r"kv_indptr: expected integers, got kv_indptr\[1\] = True"),
        ([0, None], TypeError, r"kv_indptr: expected integers, got kv_indptr\[1\] = None"),
        ([[0, 1]], ValueError, r"kv_indptr: expected a 1-D array"),
        (np.array([0.0, 1.0]), TypeError, r"kv_indptr: expected an integer array, got dtype float64"),
    ],
)
def test_host_index_values_are_checked_not_converted(value: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        page.get_seq_lens(value, [1], 16)


def test_host_helpers_take_big_endian_and_numpy_integer_inputs() -> None:
    indptr = np.array([0, 1, 1, 4], dtype=">i4")
    last = np.array([5, 7, 16], dtype=">i8")
    assert page.get_seq_lens(indptr, last, 16).tolist() == [5, 0, 48]
    assert page.get_seq_lens([np.int64(0), np.int32(1)], (np.uint8(5),), 16).tolist() == [5]
    bi, pos = page.get_batch_indices_positions(np.array([0, 1, 3], ">u2"), np.array([5, 5], ">i4"))
    assert bi.tolist() == [0, 1, 1] and pos.tolist() == [4, 3, 4]
    with pytest.raises(TypeError, match="positions: expected dtype int32"):
        page.get_batch_indices_positions([0, 1], [1], positions=np.zeros(1, ">i4"))


@pytest.mark.parametrize("page_size", [2**70, 2**63, 2**31])
def test_huge_page_sizes_are_named(page_size: int) -> None:
    with pytest.raises(ValueError, match=r"page_size: expected an int < 2\*\*31"):
        page.get_seq_lens([0, 1], [1], page_size)
    with pytest.raises(ValueError, match=r"page_size: expected an int < 2\*\*31"):
        page.check_append_positions([0], [0], [0], [0, 1], [1], page_size)
    with pytest.raises(TypeError, match="page_size: expected an int"):
        page.get_seq_lens([0, 1], [1], 16.0)  # type: ignore[arg-type]


def test_huge_num_pages_is_named() -> None:
    with pytest.raises(ValueError, match=r"num_pages: expected an int < 2\*\*31"):
        page.check_append_positions([0], [0], [0], [0, 1], [1], 16, num_pages=2**70)


def test_seq_lens_larger_than_int32_are_refused() -> None:
    # 2**30 pages of 16 tokens: the product overflows int32 (the kernels' sequence length type)
    with pytest.raises(ValueError, match="seq_lens: values do not fit in int32"):
        page.get_seq_lens([0, 2**30], [16], 16)
