"""Paged KV append (MHA and MLA) on a real GPU against a numpy model of the cache (gated by
FI_FFI_RUN_GPU_TESTS=1).

The append is a copy, so the comparison is exact: every byte of both caches must equal the model's, which
starts from the cache's random previous contents and writes each new token at
``(kv_indices[kv_indptr[b] + pos // page_size], pos % page_size)``. That also proves nothing else was touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.ops import page
from fi_ffi.tensor.descriptor import Tensor

torch = require_torch()

pytestmark = pytest.mark.gpu

BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.int8,
    torch.float8_e5m2: torch.int8,
}


@dataclass
class Batch:
    """A ragged append into a paged cache, with host copies of the index arrays."""

    page_size: int
    seq_before: np.ndarray  # tokens each request held before the append
    append_lens: np.ndarray  # tokens each request appends
    kv_indices: np.ndarray
    kv_indptr: np.ndarray
    kv_last_page_len: np.ndarray
    batch_indices: np.ndarray
    positions: np.ndarray
    num_pages: int

    @property
    def nnz(self) -> int:
        return int(self.append_lens.sum())

    def device_indices(self) -> dict[str, torch.Tensor]:
        cuda = {
            name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.int32)).cuda()
            for name in ("batch_indices", "positions", "kv_indices", "kv_indptr", "kv_last_page_len")
        }
        return cuda

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(page id, slot in page) of every appended token, from the host index arrays."""
        pages = self.kv_indices[self.kv_indptr[self.batch_indices] + self.positions // self.page_size]
        return pages, self.positions % self.page_size


def make_batch(seed: int, page_size: int, batch: int, max_before: int, max_append: int, spare_pages: int = 3) -> Batch:
    rng = np.random.default_rng(seed)
    before = rng.integers(0, max_before + 1, batch)
    lens = rng.integers(0, max_append + 1, batch)
    lens[rng.integers(0, batch)] = max(1, max_append)  # at least one request appends
    after = before + lens
    pages = -(-after // page_size)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    last = np.where(pages > 0, after - (pages - 1) * page_size, 0).astype(np.int32)
    num_pages = int(indptr[-1]) + spare_pages
    kv_indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)  # scattered, unordered page ids
    seq = page.get_seq_lens(indptr, last, page_size)
    assert seq.tolist() == after.tolist()
    append_indptr = np.concatenate([[0], np.cumsum(lens)])
    bi, pos = page.get_batch_indices_positions(append_indptr, seq)
    page.check_append_positions(bi, pos, kv_indices, indptr, last, page_size, num_pages)
    return Batch(page_size, before, lens, kv_indices, indptr, last, bi, pos, num_pages)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(BITS[t.dtype]).cpu().numpy()


def random_of(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, device="cuda").to(dtype)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_append_matches_the_model(page_size: int, layout: str, dtype: torch.dtype) -> None:
    # Ragged appends into requests of various lengths: crosses page boundaries (and, for page 1, every token
    # is its own page); some requests append nothing.
    b = make_batch(seed=page_size, page_size=page_size, batch=6, max_before=70, max_append=40)
    heads, d = 4, 128
    shape = (b.num_pages, page_size, heads, d) if layout == "NHD" else (b.num_pages, heads, page_size, d)
    k_cache, v_cache = random_of(shape, dtype), random_of(shape, dtype)
    expect_k, expect_v = bits(k_cache), bits(v_cache)
    key, value = random_of((b.nnz, heads, d), dtype), random_of((b.nnz, heads, d), dtype)
    idx = b.device_indices()
    assert (
        page.append_paged_kv_cache(
            key,
            value,
            idx["batch_indices"],
            idx["positions"],
            (k_cache, v_cache),
            idx["kv_indices"],
            idx["kv_indptr"],
            idx["kv_last_page_len"],
            kv_layout=layout,
        )
        is None
    )
    torch.cuda.synchronize()
    pages, slots = b.slots()
    kb, vb = bits(key), bits(value)
    if layout == "NHD":
        expect_k[pages, slots] = kb
        expect_v[pages, slots] = vb
    else:
        expect_k[pages, :, slots] = kb
        expect_v[pages, :, slots] = vb
    np.testing.assert_array_equal(bits(k_cache), expect_k)
    np.testing.assert_array_equal(bits(v_cache), expect_v)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_append_fp8_cache_and_other_head_dims(dtype: torch.dtype, head_dim: int) -> None:
    b = make_batch(seed=7, page_size=16, batch=3, max_before=33, max_append=20)
    heads = 2
    shape = (b.num_pages, b.page_size, heads, head_dim)
    k_cache, v_cache = random_of(shape, dtype), random_of(shape, dtype)
    expect_k, expect_v = bits(k_cache), bits(v_cache)
    key, value = random_of((b.nnz, heads, head_dim), dtype), random_of((b.nnz, heads, head_dim), dtype)
    idx = b.device_indices()
    page.append_paged_kv_cache(
        key,
        value,
        idx["batch_indices"],
        idx["positions"],
        (k_cache, v_cache),
        idx["kv_indices"],
        idx["kv_indptr"],
        idx["kv_last_page_len"],
    )
    torch.cuda.synchronize()
    pages, slots = b.slots()
    expect_k[pages, slots] = bits(key)
    expect_v[pages, slots] = bits(value)
    np.testing.assert_array_equal(bits(k_cache), expect_k)
    np.testing.assert_array_equal(bits(v_cache), expect_v)


def test_append_strided_qkv_slices_into_a_combined_cache_on_a_side_stream() -> None:
    # k/v are slices of a fused [nnz, 3, H, D] QKV; the cache is the upstream combined [P, 2, page, H, D].
    b = make_batch(seed=3, page_size=16, batch=4, max_before=50, max_append=30)
    heads, d, dtype = 8, 128, torch.float16
    qkv = random_of((b.nnz, 3, heads, d), dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    kv = random_of((b.num_pages, 2, b.page_size, heads, d), dtype)
    expect = bits(kv)
    idx = b.device_indices()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    page.append_paged_kv_cache(
        key,
        value,
        idx["batch_indices"],
        idx["positions"],
        (kv[:, 0], kv[:, 1]),
        idx["kv_indices"],
        idx["kv_indptr"],
        idx["kv_last_page_len"],
        stream=stream,
    )
    stream.synchronize()
    pages, slots = b.slots()
    expect[pages, 0, slots] = bits(key)
    expect[pages, 1, slots] = bits(value)
    np.testing.assert_array_equal(bits(kv), expect)


def test_decode_steps_fill_pages_one_token_at_a_time() -> None:
    # 40 decode steps of 3 requests, page size 16, with Tensor descriptors reused every step.
    page_size, heads, d, dtype, steps = 16, 2, 128, torch.bfloat16, 40
    seq = np.array([0, 15, 31])
    num_pages = int((-(-(seq + steps) // page_size)).sum())
    k_cache = torch.zeros(num_pages, page_size, heads, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    max_pages = -(-(seq + steps) // page_size)
    base = np.concatenate([[0], np.cumsum(max_pages)])  # request b owns pages base[b]:base[b+1], in order
    model_k = np.zeros(tuple(k_cache.shape), np.float32)
    model_v = np.zeros_like(model_k)
    kc, vc = (
        Tensor.from_pointer(k_cache.data_ptr(), k_cache.shape, "bfloat16", 0, owner=k_cache),
        Tensor.from_pointer(v_cache.data_ptr(), v_cache.shape, "bfloat16", 0, owner=v_cache),
    )
    for _ in range(steps):
        seq = seq + 1
        pages = -(-seq // page_size)
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        indices = np.concatenate([np.arange(base[r], base[r] + pages[r]) for r in range(3)]).astype(np.int32)
        last = (seq - (pages - 1) * page_size).astype(np.int32)
        bi, pos = page.get_batch_indices_positions([0, 1, 2, 3], page.get_seq_lens(indptr, last, page_size))
        key = torch.randn(3, heads, d, device="cuda").to(dtype)
        value = torch.randn(3, heads, d, device="cuda").to(dtype)
        dev = {
            n: torch.from_numpy(a).cuda()
            for n, a in (("bi", bi), ("pos", pos), ("ind", indices), ("ptr", indptr), ("last", last))
        }
        page.append_paged_kv_cache(key, value, dev["bi"], dev["pos"], (kc, vc), dev["ind"], dev["ptr"], dev["last"])
        pg = indices[indptr[bi] + pos // page_size]
        model_k[pg, pos % page_size] = key.float().cpu().numpy()
        model_v[pg, pos % page_size] = value.float().cpu().numpy()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(k_cache.float().cpu().numpy(), model_k)
    np.testing.assert_array_equal(v_cache.float().cpu().numpy(), model_v)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_append_matches_the_model(page_size: int, dtype: torch.dtype) -> None:
    b = make_batch(seed=11 + page_size, page_size=page_size, batch=5, max_before=90, max_append=35)
    ckv_cache = random_of((b.num_pages, page_size, 512), dtype)
    kpe_cache = random_of((b.num_pages, page_size, 64), dtype)
    expect_ckv, expect_kpe = bits(ckv_cache), bits(kpe_cache)
    ckv, kpe = random_of((b.nnz, 512), dtype), random_of((b.nnz, 64), dtype)
    idx = b.device_indices()
    assert (
        page.append_paged_mla_kv_cache(
            ckv,
            kpe,
            idx["batch_indices"],
            idx["positions"],
            ckv_cache,
            kpe_cache,
            idx["kv_indices"],
            idx["kv_indptr"],
            idx["kv_last_page_len"],
        )
        is None
    )
    torch.cuda.synchronize()
    pages, slots = b.slots()
    expect_ckv[pages, slots] = bits(ckv)
    expect_kpe[pages, slots] = bits(kpe)
    np.testing.assert_array_equal(bits(ckv_cache), expect_ckv)
    np.testing.assert_array_equal(bits(kpe_cache), expect_kpe)


def test_mla_append_into_one_buffer_split_in_ckv_and_kpe() -> None:
    # One [P, page, 576] buffer: ckv is [..., :512], kpe is [..., 512:], so both have row stride 576.
    b = make_batch(seed=5, page_size=16, batch=3, max_before=40, max_append=25)
    dtype = torch.bfloat16
    buf = random_of((b.num_pages, b.page_size, 576), dtype)
    expect = bits(buf)
    latent = random_of((b.nnz, 576), dtype)  # the new tokens as one [nnz, 576] tensor, split the same way
    idx = b.device_indices()
    page.append_paged_mla_kv_cache(
        latent[:, :512],
        latent[:, 512:],
        idx["batch_indices"],
        idx["positions"],
        buf[..., :512],
        buf[..., 512:],
        idx["kv_indices"],
        idx["kv_indptr"],
        idx["kv_last_page_len"],
    )
    torch.cuda.synchronize()
    pages, slots = b.slots()
    expect[pages, slots] = bits(latent)
    np.testing.assert_array_equal(bits(buf), expect)


def test_append_with_raw_cuda_python_allocations() -> None:
    from cuda.bindings import runtime as rt

    b = make_batch(seed=21, page_size=16, batch=3, max_before=20, max_append=20)
    heads, d = 2, 128
    rng = np.random.default_rng(0)
    cache_shape = (b.num_pages, b.page_size, heads, d)
    host = {
        "key": rng.standard_normal((b.nnz, heads, d)).astype(np.float16),
        "value": rng.standard_normal((b.nnz, heads, d)).astype(np.float16),
        "k_cache": rng.standard_normal(cache_shape).astype(np.float16),
        "v_cache": rng.standard_normal(cache_shape).astype(np.float16),
        "batch_indices": b.batch_indices.astype(np.int32),
        "positions": b.positions.astype(np.int32),
        "kv_indices": b.kv_indices.astype(np.int32),
        "kv_indptr": b.kv_indptr.astype(np.int32),
        "kv_last_page_len": b.kv_last_page_len.astype(np.int32),
    }
    ptrs: dict[str, int] = {}
    try:
        desc = {}
        for name, arr in host.items():
            err, ptr = rt.cudaMalloc(arr.nbytes)
            assert err == rt.cudaError_t.cudaSuccess, err
            ptrs[name] = int(ptr)
            (err,) = rt.cudaMemcpy(ptrs[name], arr.ctypes.data, arr.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
            assert err == rt.cudaError_t.cudaSuccess, err
            desc[name] = Tensor.from_pointer(ptrs[name], arr.shape, str(arr.dtype), 0)
        page.append_paged_kv_cache(
            desc["key"],
            desc["value"],
            desc["batch_indices"],
            desc["positions"],
            (desc["k_cache"], desc["v_cache"]),
            desc["kv_indices"],
            desc["kv_indptr"],
            desc["kv_last_page_len"],
            stream=0,
        )
        (err,) = rt.cudaDeviceSynchronize()
        assert err == rt.cudaError_t.cudaSuccess, err
        pages, slots = b.slots()
        for cache, new in (("k_cache", "key"), ("v_cache", "value")):
            got = np.empty_like(host[cache])
            (err,) = rt.cudaMemcpy(got.ctypes.data, ptrs[cache], got.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
            assert err == rt.cudaError_t.cudaSuccess, err
            expect = host[cache].copy()
            expect[pages, slots] = host[new]
            np.testing.assert_array_equal(got, expect)
    finally:
        for ptr in ptrs.values():
            rt.cudaFree(ptr)


LAYERS = 32


def test_a_layer_loop_with_torch_tensors_per_call_is_bit_exact_and_validated_once() -> None:
    # A decode step as a runtime issues it: another cache (same layout) and fresh tokens at each of 32 layers,
    # torch tensors passed per call. 3 heads and page size 8: a layout no other test uses, so the loop's
    # first layer is the only call validated from scratch.
    b = make_batch(seed=31, page_size=8, batch=3, max_before=20, max_append=9)
    heads, d, dtype = 3, 128, torch.float16
    shape = (b.num_pages, b.page_size, heads, d)
    caches = [(random_of(shape, dtype), random_of(shape, dtype)) for _ in range(LAYERS)]
    expect = [(bits(k), bits(v)) for k, v in caches]
    idx = b.device_indices()
    pages, slots = b.slots()
    launcher = page._append.launcher
    before = launcher.slow_calls
    for layer, (k_cache, v_cache) in enumerate(caches):
        key, value = random_of((b.nnz, heads, d), dtype), random_of((b.nnz, heads, d), dtype)
        page.append_paged_kv_cache(
            key,
            value,
            idx["batch_indices"],
            idx["positions"],
            (k_cache, v_cache),
            idx["kv_indices"],
            idx["kv_indptr"],
            idx["kv_last_page_len"],
        )
        expect[layer][0][pages, slots] = bits(key)
        expect[layer][1][pages, slots] = bits(value)
    torch.cuda.synchronize()
    assert launcher.slow_calls - before == 1
    for layer, (k_cache, v_cache) in enumerate(caches):
        np.testing.assert_array_equal(bits(k_cache), expect[layer][0], err_msg=f"k_cache of layer {layer}")
        np.testing.assert_array_equal(bits(v_cache), expect[layer][1], err_msg=f"v_cache of layer {layer}")
    # an empty append (an idle step) checks its arguments, launches nothing and changes nothing
    empty = torch.empty((0, heads, d), dtype=dtype, device="cuda")
    none = torch.empty(0, dtype=torch.int32, device="cuda")
    with pytest.raises(TypeError, match="stream"):
        page.append_paged_kv_cache(
            empty,
            empty,
            none,
            none,
            caches[0],
            idx["kv_indices"],
            idx["kv_indptr"],
            idx["kv_last_page_len"],
            stream="default",
        )
    page.append_paged_kv_cache(
        empty, empty, none, none, caches[0], idx["kv_indices"], idx["kv_indptr"], idx["kv_last_page_len"]
    )
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(caches[0][0]), expect[0][0])


def test_a_layer_loop_with_cupy_arrays_per_call_is_bit_exact() -> None:
    cupy = pytest.importorskip("cupy")
    b = make_batch(seed=37, page_size=16, batch=4, max_before=40, max_append=12)
    heads, d = 2, 256
    rng = np.random.default_rng(37)
    shape = (b.num_pages, b.page_size, heads, d)
    host = [
        (rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16))
        for _ in range(LAYERS)
    ]
    caches = [(cupy.asarray(k), cupy.asarray(v)) for k, v in host]
    idx = {
        name: cupy.asarray(np.ascontiguousarray(getattr(b, name), dtype=np.int32))
        for name in ("batch_indices", "positions", "kv_indices", "kv_indptr", "kv_last_page_len")
    }
    pages, slots = b.slots()
    for layer, (k_cache, v_cache) in enumerate(caches):
        key = rng.standard_normal((b.nnz, heads, d)).astype(np.float16)
        value = rng.standard_normal((b.nnz, heads, d)).astype(np.float16)
        page.append_paged_kv_cache(
            cupy.asarray(key),
            cupy.asarray(value),
            idx["batch_indices"],
            idx["positions"],
            (k_cache, v_cache),
            idx["kv_indices"],
            idx["kv_indptr"],
            idx["kv_last_page_len"],
        )
        host[layer][0][pages, slots] = key  # the expected caches: a copy, so exact
        host[layer][1][pages, slots] = value
    cupy.cuda.get_current_stream().synchronize()  # the appends ran on CuPy's current stream (stream=None)
    for layer, (k_cache, v_cache) in enumerate(caches):
        np.testing.assert_array_equal(
            cupy.asnumpy(k_cache).view(np.uint16), host[layer][0].view(np.uint16), err_msg=f"k_cache of layer {layer}"
        )
        np.testing.assert_array_equal(
            cupy.asnumpy(v_cache).view(np.uint16), host[layer][1].view(np.uint16), err_msg=f"v_cache of layer {layer}"
        )


def test_mla_append_with_cupy_arrays() -> None:
    cupy = pytest.importorskip("cupy")
    b = make_batch(seed=41, page_size=16, batch=3, max_before=30, max_append=10)
    rng = np.random.default_rng(41)
    ckv_host = rng.standard_normal((b.num_pages, b.page_size, 512)).astype(np.float16)
    kpe_host = rng.standard_normal((b.num_pages, b.page_size, 64)).astype(np.float16)
    ckv_cache, kpe_cache = cupy.asarray(ckv_host), cupy.asarray(kpe_host)
    ckv = rng.standard_normal((b.nnz, 512)).astype(np.float16)
    kpe = rng.standard_normal((b.nnz, 64)).astype(np.float16)
    idx = {
        name: cupy.asarray(np.ascontiguousarray(getattr(b, name), dtype=np.int32))
        for name in ("batch_indices", "positions", "kv_indices", "kv_indptr", "kv_last_page_len")
    }
    page.append_paged_mla_kv_cache(
        cupy.asarray(ckv),
        cupy.asarray(kpe),
        idx["batch_indices"],
        idx["positions"],
        ckv_cache,
        kpe_cache,
        idx["kv_indices"],
        idx["kv_indptr"],
        idx["kv_last_page_len"],
    )
    cupy.cuda.get_current_stream().synchronize()
    pages, slots = b.slots()
    ckv_host[pages, slots] = ckv
    kpe_host[pages, slots] = kpe
    np.testing.assert_array_equal(cupy.asnumpy(ckv_cache).view(np.uint16), ckv_host.view(np.uint16))
    np.testing.assert_array_equal(cupy.asnumpy(kpe_cache).view(np.uint16), kpe_host.view(np.uint16))


def test_host_helper_rejects_device_tensors_it_cannot_read() -> None:
    with pytest.raises(TypeError, match="append_indptr: expected a host array"):
        page.get_batch_indices_positions(torch.tensor([0, 1], device="cuda"), [1])
    bi, pos = page.get_batch_indices_positions(torch.tensor([0, 2]), torch.tensor([5]))  # CPU tensors are fine
    assert bi.tolist() == [0, 0] and pos.tolist() == [3, 4]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_a_prepared_append_writes_as_the_op_each_step(layout: str) -> None:
    """``fi_ffi.prepare(append_paged_kv_cache, ...)`` over decode steps whose tokens and index arrays the loop writes
    into the same buffers: the caches equal, bit for bit, those the op call fills from the same steps."""
    page_size, heads, d, dtype, steps, batch = 16, 2, 128, torch.float16, 20, 3
    num_pages = batch * 4
    shape = (num_pages, page_size, heads, d) if layout == "NHD" else (num_pages, heads, page_size, d)
    caches = [torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(4)]  # prepared k, v; op k, v
    key = torch.zeros(batch, heads, d, dtype=dtype, device="cuda")
    value = torch.zeros_like(key)
    dev = {
        n: torch.zeros(size, dtype=torch.int32, device="cuda")
        for n, size in (("bi", batch), ("pos", batch), ("ind", num_pages), ("ptr", batch + 1), ("last", batch))
    }
    index = (dev["ind"], dev["ptr"], dev["last"])
    call = fi_ffi.prepare(
        fi_ffi.append_paged_kv_cache,
        key,
        value,
        dev["bi"],
        dev["pos"],
        (caches[0], caches[1]),
        *index,
        kv_layout=layout,
    )
    seq = np.array([0, 7, 30])
    for _ in range(steps):
        seq = seq + 1
        pages = -(-seq // page_size)
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        indices = np.concatenate([np.arange(4 * r, 4 * r + pages[r]) for r in range(batch)]).astype(np.int32)
        last = (seq - (pages - 1) * page_size).astype(np.int32)
        bi, pos = page.get_batch_indices_positions(list(range(batch + 1)), page.get_seq_lens(indptr, last, page_size))
        for name, values in (("bi", bi), ("pos", pos), ("ptr", indptr), ("last", last)):
            dev[name].copy_(torch.from_numpy(values.astype(np.int32)))
        dev["ind"][: len(indices)].copy_(torch.from_numpy(indices))
        key.normal_()
        value.normal_()
        call()
        fi_ffi.append_paged_kv_cache(
            key, value, dev["bi"], dev["pos"], (caches[2], caches[3]), *index, kv_layout=layout
        )
    torch.cuda.synchronize()
    assert caches[0].abs().sum() > 0
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
