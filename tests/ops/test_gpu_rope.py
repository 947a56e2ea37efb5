"""RoPE ops on a real GPU against a float64 numpy reference (gated by FI_FFI_RUN_GPU_TESTS=1).

The reference implements the definitions independently of the kernel: frequencies
``theta ** (-2j / rotary_dim) / rope_scale``, and for Llama 3.1 the wavelength rule (keep the frequency below
``old_context_len / high_freq_factor``, divide it by ``rope_scale`` above ``old_context_len / low_freq_factor``,
blend linearly in ``old_context_len / wavelength`` between). It rotates the dtype-rounded inputs.

Tolerances, absolute and relative, on outputs of magnitude <= ~4 with positions < 1024: float16 1e-2,
bfloat16 4e-2 (the kernel uses fast ``__powf``/``__sincosf``: angle errors ~1e-3 rad at position 1000, plus one
rounding to the dtype). Elements past ``rotary_dim`` are copied: compared exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.tensor.descriptor import Tensor

torch = require_torch()

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
DTYPES = [torch.float16, torch.bfloat16]
LLAMA31 = dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192.0)


def frequencies(rotary_dim: int, rope_scale: float, rope_theta: float, llama31: dict | None = None) -> np.ndarray:
    j = np.arange(rotary_dim // 2, dtype=np.float64)
    freq = rope_theta ** (-2.0 * j / rotary_dim)
    if llama31 is None:
        return freq / rope_scale
    low, high, old = llama31["low_freq_factor"], llama31["high_freq_factor"], llama31["old_context_len"]
    wavelength = 2 * np.pi / freq
    blend = np.clip((old / wavelength - low) / (high - low), 0.0, 1.0)  # 1 below old/high, 0 above old/low
    return (1 - blend) * freq / rope_scale + blend * freq


def rotate(x: np.ndarray, positions: np.ndarray, freq: np.ndarray, rotary_dim: int, interleave: bool) -> np.ndarray:
    """x ``[nnz, heads, head_dim]`` (float64) rotated by ``positions[:, None] * freq``."""
    angle = positions.astype(np.float64)[:, None, None] * freq[None, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    out = x.copy()
    if interleave:
        a, b = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = a * cos - b * sin
        out[..., 1:rotary_dim:2] = b * cos + a * sin
    else:
        h = rotary_dim // 2
        a, b = x[..., :h], x[..., h:rotary_dim]
        out[..., :h] = a * cos - b * sin
        out[..., h:rotary_dim] = b * cos + a * sin
    return out


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def check(
    got: torch.Tensor,
    x: np.ndarray,
    positions: np.ndarray,
    freq: np.ndarray,
    rotary_dim: int,
    interleave: bool,
    dtype: torch.dtype,
) -> None:
    want = rotate(x, positions, freq, rotary_dim, interleave)
    g = f64(got)
    np.testing.assert_allclose(g[..., :rotary_dim], want[..., :rotary_dim], atol=TOL[dtype], rtol=TOL[dtype])
    np.testing.assert_array_equal(g[..., rotary_dim:], x[..., rotary_dim:])  # copied unchanged


def make(nnz: int, hq: int, hk: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(nnz, hq, d, dtype=dtype, device="cuda"), torch.randn(nnz, hk, d, dtype=dtype, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("llama31", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_pos_ids_variants_match_reference(
    dtype: torch.dtype, head_dim: int, interleave: bool, partial: bool, llama31: bool, inplace: bool
) -> None:
    torch.manual_seed(0)
    nnz, hq, hk = 37, 8, 2
    q, k = make(nnz, hq, hk, head_dim, dtype)
    pos = torch.randint(0, 1000, (nnz,), dtype=torch.int32, device="cuda")
    rotary_dim = head_dim // 2 if partial else head_dim
    params = dict(LLAMA31) if llama31 else dict(rope_scale=1.0, rope_theta=1e4)
    q0, k0 = f64(q), f64(k)
    if inplace:
        op = fi_ffi.apply_llama31_rope_pos_ids_inplace if llama31 else fi_ffi.apply_rope_pos_ids_inplace
        assert op(q, k, pos, rotary_dim=rotary_dim, interleave=interleave, **params) is None
        qr, kr = q, k
    else:
        op = fi_ffi.apply_llama31_rope_pos_ids if llama31 else fi_ffi.apply_rope_pos_ids
        qr, kr = torch.empty_like(q), torch.empty_like(k)
        got = op(q, k, pos, rotary_dim=rotary_dim, interleave=interleave, q_rope=qr, k_rope=kr, **params)
        assert got[0] is qr and got[1] is kr
    torch.cuda.synchronize()
    freq = frequencies(rotary_dim, params["rope_scale"], params["rope_theta"], LLAMA31 if llama31 else None)
    p = pos.cpu().numpy()
    check(qr, q0, p, freq, rotary_dim, interleave, dtype)
    check(kr, k0, p, freq, rotary_dim, interleave, dtype)
    if not inplace:
        np.testing.assert_array_equal(f64(q), q0)  # inputs untouched out of place


def test_llama31_blend_differs_from_plain_scaling() -> None:
    # the reference's three regimes all occur for head_dim 128 with Llama 3.1's settings
    freq = frequencies(128, 1.0, 5e5)
    wavelength = 2 * np.pi / freq
    assert (wavelength < 8192 / 4).any() and (wavelength > 8192 / 1).any()
    assert ((wavelength > 8192 / 4) & (wavelength < 8192)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("llama31", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("inplace", [False, True])
def test_ragged_indptr_offsets_match_reference(
    dtype: torch.dtype, llama31: bool, index_dtype: torch.dtype, inplace: bool
) -> None:
    torch.manual_seed(1)
    lens, offsets = [5, 1, 12, 7], [0, 40, 3, 900]
    nnz = sum(lens)
    q, k = make(nnz, 4, 4, 128, dtype)
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=index_dtype, device="cuda")
    off = torch.tensor(offsets, dtype=index_dtype, device="cuda")
    positions = np.concatenate([o + np.arange(n) for o, n in zip(offsets, lens, strict=True)])
    params = dict(LLAMA31) if llama31 else dict(rope_scale=2.0, rope_theta=1e4)
    q0, k0 = f64(q), f64(k)
    if inplace:
        (fi_ffi.apply_llama31_rope_inplace if llama31 else fi_ffi.apply_rope_inplace)(q, k, indptr, off, **params)
        qr, kr = q, k
    else:
        qr, kr = torch.empty_like(q), torch.empty_like(k)
        (fi_ffi.apply_llama31_rope if llama31 else fi_ffi.apply_rope)(q, k, indptr, off, q_rope=qr, k_rope=kr, **params)
    torch.cuda.synchronize()
    freq = frequencies(128, params["rope_scale"], params["rope_theta"], LLAMA31 if llama31 else None)
    check(qr, q0, positions, freq, 128, False, dtype)
    check(kr, k0, positions, freq, 128, False, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_on_fused_qkv_slices_leaves_v_alone(dtype: torch.dtype) -> None:
    nnz, hq, hk, d = 19, 8, 2, 128
    qkv = torch.randn(nnz, (hq + 2 * hk) * d, dtype=dtype, device="cuda")
    q = qkv[:, : hq * d].view(nnz, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    q0, k0 = f64(q), f64(k)
    pos = torch.arange(nnz, dtype=torch.int64, device="cuda") * 7
    fi_ffi.apply_rope_pos_ids_inplace(q, k, pos, interleave=True)
    torch.cuda.synchronize()
    freq = frequencies(d, 1.0, 1e4)
    check(q, q0, pos.cpu().numpy(), freq, d, True, dtype)
    check(k, k0, pos.cpu().numpy(), freq, d, True, dtype)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


def cos_sin_cache(max_pos: int, rotary_dim: int, theta: float = 1e4) -> torch.Tensor:
    freq = frequencies(rotary_dim, 1.0, theta)
    angle = np.arange(max_pos, dtype=np.float64)[:, None] * freq[None, :]
    # slack after the last row: the interleaved kernel reads a few floats past it (see the op's docs)
    cache = torch.zeros(max_pos + 1, rotary_dim, dtype=torch.float32, device="cuda")
    cache[:max_pos] = torch.from_numpy(np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32))
    return cache[:max_pos]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 128])
@pytest.mark.parametrize("flat", [True, False])
def test_cos_sin_cache_matches_reference(dtype: torch.dtype, is_neox: bool, rotary_dim: int, flat: bool) -> None:
    torch.manual_seed(2)
    nnz, hq, hk, d = 23, 8, 4, 128
    q, k = make(nnz, hq, hk, d, dtype)
    cache = cos_sin_cache(2048, rotary_dim)
    positions = torch.randint(0, 2048, (nnz,), dtype=torch.int64, device="cuda")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if flat:  # flashinfer-python's [nnz, heads * head_size] form
        fi_ffi.apply_rope_with_cos_sin_cache(
            positions,
            q.view(nnz, -1),
            k.view(nnz, -1),
            d,
            cache,
            is_neox,
            query_out=qo.view(nnz, -1),
            key_out=ko.view(nnz, -1),
        )
    else:
        fi_ffi.apply_rope_with_cos_sin_cache(positions, q, k, d, cache, is_neox, query_out=qo, key_out=ko)
    torch.cuda.synchronize()
    freq = frequencies(rotary_dim, 1.0, 1e4)
    p = positions.cpu().numpy()
    check(qo, f64(q), p, freq, rotary_dim, not is_neox, dtype)
    check(ko, f64(k), p, freq, rotary_dim, not is_neox, dtype)
    q0 = f64(q)
    fi_ffi.apply_rope_with_cos_sin_cache_inplace(positions, q.view(nnz, -1), k.view(nnz, -1), d, cache, is_neox)
    torch.cuda.synchronize()
    check(q, q0, p, freq, rotary_dim, not is_neox, dtype)


def test_descriptors_and_head_dim_512() -> None:
    nnz, h, d = 9, 2, 512
    q, k = make(nnz, h, h, d, torch.float16)
    qr, kr = torch.empty_like(q), torch.empty_like(k)
    pos = torch.arange(nnz, dtype=torch.int32, device="cuda") * 31

    def desc(t: torch.Tensor) -> Tensor:
        return Tensor.from_pointer(
            t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch."), 0, tuple(t.stride())
        )

    torch.cuda.synchronize()
    fi_ffi.apply_rope_pos_ids(desc(q), desc(k), desc(pos), rotary_dim=256, q_rope=desc(qr), k_rope=desc(kr))
    torch.cuda.synchronize()  # descriptors run on TVM-FFI's current stream (the legacy default stream)
    freq = frequencies(256, 1.0, 1e4)
    check(qr, f64(q), pos.cpu().numpy(), freq, 256, False, torch.float16)
    check(kr, f64(k), pos.cpu().numpy(), freq, 256, False, torch.float16)


@pytest.mark.parametrize("llama31", [False, True])
def test_a_prepared_rope_rotates_as_the_op_each_step(llama31: bool) -> None:
    """``fi_ffi.prepare`` of the in-place op, called over steps whose positions and inputs the loop writes into the
    same buffers: bit-equal to the op call on copies of the same data, every step (the packed frame reads the new
    positions at each launch)."""
    torch.manual_seed(1)
    nnz, hq, hk, d = 5, 8, 2, 128
    op = fi_ffi.apply_llama31_rope_pos_ids_inplace if llama31 else fi_ffi.apply_rope_pos_ids_inplace
    params = dict(LLAMA31) if llama31 else dict(rope_scale=1.0, rope_theta=1e4)
    q, k = make(nnz, hq, hk, d, torch.float16)
    pos = torch.zeros(nnz, dtype=torch.int32, device="cuda")
    call = fi_ffi.prepare(op, q, k, pos, rotary_dim=64, **params)
    for step in range(3):
        q.normal_()
        k.normal_()
        pos.copy_(torch.randint(0, 1000, (nnz,), dtype=torch.int32) + step)
        q2, k2, pos2 = q.clone(), k.clone(), pos.clone()
        call()
        op(q2, k2, pos2, rotary_dim=64, **params)
        torch.cuda.synchronize()
        assert torch.equal(q, q2) and torch.equal(k, k2), f"step {step}"
