"""Keyword arguments of valid paged K/V cache appends over fake ``cuda:0`` descriptors, for the CPU tests
(``tests/ops/test_page.py``, ``tests/loader/test_release_072_calls.py``)."""

from __future__ import annotations

from helpers.fakes import fake_cuda


def kv_args(
    nnz: int = 5,
    heads: int = 8,
    head_dim: int = 128,
    page_size: int = 16,
    num_pages: int = 6,
    batch: int = 2,
    layout: str = "NHD",
    dtype: str = "float16",
    **over: object,
) -> dict[str, object]:
    """Keyword arguments of a valid ``append_paged_kv_cache`` call (descriptors only), with overrides.

    ``k_cache=``, ``v_cache=`` and ``layout=`` override one half of the ``paged_kv_cache`` tuple and the
    ``kv_layout`` (the call's own keywords ``paged_kv_cache=`` / ``kv_layout=`` override them whole)."""
    cache = (num_pages, page_size, heads, head_dim) if layout == "NHD" else (num_pages, heads, page_size, head_dim)
    args: dict[str, object] = dict(
        append_key=fake_cuda((nnz, heads, head_dim), dtype),
        append_value=fake_cuda((nnz, heads, head_dim), dtype),
        batch_indices=fake_cuda((nnz,), "int32"),
        positions=fake_cuda((nnz,), "int32"),
        k_cache=fake_cuda(cache, dtype),
        v_cache=fake_cuda(cache, dtype),
        kv_indices=fake_cuda((num_pages,), "int32"),
        kv_indptr=fake_cuda((batch + 1,), "int32"),
        kv_last_page_len=fake_cuda((batch,), "int32"),
        layout=layout,
    )
    args.update(over)
    k_cache, v_cache, layout = args.pop("k_cache"), args.pop("v_cache"), args.pop("layout")
    args.setdefault("paged_kv_cache", (k_cache, v_cache))
    args.setdefault("kv_layout", layout)
    order = ("append_key", "append_value", "batch_indices", "positions", "paged_kv_cache", "kv_indices")
    return {**{k: args.pop(k) for k in order}, **args}  # the op's parameter order


def mla_args(
    nnz: int = 5, page_size: int = 16, num_pages: int = 6, batch: int = 2, dtype: str = "bfloat16", **over: object
) -> dict[str, object]:
    args: dict[str, object] = dict(
        append_ckv=fake_cuda((nnz, 512), dtype),
        append_kpe=fake_cuda((nnz, 64), dtype),
        batch_indices=fake_cuda((nnz,), "int32"),
        positions=fake_cuda((nnz,), "int32"),
        ckv_cache=fake_cuda((num_pages, page_size, 512), dtype),
        kpe_cache=fake_cuda((num_pages, page_size, 64), dtype),
        kv_indices=fake_cuda((num_pages,), "int32"),
        kv_indptr=fake_cuda((batch + 1,), "int32"),
        kv_last_page_len=fake_cuda((batch,), "int32"),
    )
    args.update(over)
    return args
