"""RoPE ops on the CPU machine, against the real ``rope`` module of the extension test wheel.

A valid call with fake ``cuda:0`` descriptors passes our checks and the module's signature check and stops at
its first CUDA call; each bad argument is refused by our checks with a TypeError/ValueError naming it.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.launch import aliasing
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

NNZ, HQ, HK, D = 5, 4, 2, 128


def qk(dtype: str = "float16", d: int = D) -> dict[str, Tensor]:
    return {
        "q": fake_cuda((NNZ, HQ, d), dtype),
        "k": fake_cuda((NNZ, HK, d), dtype),
        "q_rope": fake_cuda((NNZ, HQ, d), dtype),
        "k_rope": fake_cuda((NNZ, HK, d), dtype),
    }


def pos(dtype: str = "int32", n: int = NNZ) -> Tensor:
    return fake_cuda((n,), dtype)


def ragged(dtype: str = "int32", batch: int = 2) -> tuple[Tensor, Tensor]:
    return fake_cuda((batch + 1,), dtype), fake_cuda((batch,), dtype)


def call_pos_ids(t: dict[str, Any], p: Any, **kw: Any) -> Any:
    return fi_ffi.apply_rope_pos_ids(t["q"], t["k"], p, q_rope=t["q_rope"], k_rope=t["k_rope"], **kw)


CALLS = {
    "apply_rope_pos_ids": lambda t: call_pos_ids(t, pos(), rotary_dim=64, interleave=True),
    "apply_rope_pos_ids_inplace": lambda t: fi_ffi.apply_rope_pos_ids_inplace(t["q"], t["k"], pos("int64")),
    "apply_llama31_rope_pos_ids": lambda t: fi_ffi.apply_llama31_rope_pos_ids(
        t["q"], t["k"], pos(), q_rope=t["q_rope"], k_rope=t["k_rope"]
    ),
    "apply_llama31_rope_pos_ids_inplace": lambda t: fi_ffi.apply_llama31_rope_pos_ids_inplace(
        t["q"], t["k"], pos(), 32, False, 8, 5e5, 1, 4, 8192
    ),
    "apply_rope": lambda t: fi_ffi.apply_rope(t["q"], t["k"], *ragged(), q_rope=t["q_rope"], k_rope=t["k_rope"]),
    "apply_rope_inplace": lambda t: fi_ffi.apply_rope_inplace(t["q"], t["k"], *ragged("int64"), interleave=True),
    "apply_llama31_rope": lambda t: fi_ffi.apply_llama31_rope(
        t["q"], t["k"], *ragged(), rotary_dim=96, q_rope=t["q_rope"], k_rope=t["k_rope"]
    ),
    "apply_llama31_rope_inplace": lambda t: fi_ffi.apply_llama31_rope_inplace(t["q"], t["k"], *ragged()),
    "apply_rope_with_cos_sin_cache (3-D)": lambda t: fi_ffi.apply_rope_with_cos_sin_cache(
        pos(), t["q"], t["k"], D, fake_cuda((64, D), "float32"), query_out=t["q_rope"], key_out=t["k_rope"]
    ),
    "apply_rope_with_cos_sin_cache (2-D)": lambda t: fi_ffi.apply_rope_with_cos_sin_cache(
        pos(),
        *(fake_cuda((NNZ, h * D), t["q"].dtype.name) for h in (HQ, HK)),
        D,
        fake_cuda((64, 64), "float32"),
        False,
        query_out=fake_cuda((NNZ, HQ * D), t["q"].dtype.name),
        key_out=fake_cuda((NNZ, HK * D), t["q"].dtype.name),
    ),
    "apply_rope_with_cos_sin_cache_inplace": lambda t: fi_ffi.apply_rope_with_cos_sin_cache_inplace(
        pos("int64"), t["q"], t["k"], D, fake_cuda((64, D), "float32")
    ),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_entry_point_reaches_the_kernel(kernel_modules: object, name: str, dtype: str) -> None:
    with pytest.raises(KernelError) as info:
        CALLS[name](qk(dtype))
    assert_reached_the_kernel(info.value)
    assert f"{dtype}[{NNZ}, {HQ}, {D}] cuda:0" in str(info.value)


@pytest.mark.parametrize("d", [64, 256, 512])
def test_every_supported_head_dim_reaches_the_kernel(kernel_modules: object, d: int) -> None:
    with pytest.raises(KernelError) as info:
        call_pos_ids(qk(d=d), pos(), rotary_dim=d // 2)
    assert_reached_the_kernel(info.value)


def test_fused_qkv_slices_in_place_reach_the_kernel(kernel_modules: object) -> None:
    # q and k are views of one [nnz, (HQ + 2 HK) * D] buffer: their byte ranges interleave, their rows do not
    width = (HQ + 2 * HK) * D
    qkv = fake_cuda((NNZ, width))
    q = qkv.view((NNZ, HQ, D), (width, D, 1))
    k = qkv.view((NNZ, HK, D), (width, D, 1), offset=HQ * D)
    with pytest.raises(KernelError) as info:
        fi_ffi.apply_rope_pos_ids_inplace(q, k, pos())
    assert_reached_the_kernel(info.value)
    # out of place into slices of another fused buffer
    out = fake_cuda((NNZ, width))
    with pytest.raises(KernelError):
        fi_ffi.apply_rope_pos_ids(
            q,
            k,
            pos(),
            q_rope=out.view((NNZ, HQ, D), (width, D, 1)),
            k_rope=out.view((NNZ, HK, D), (width, D, 1), offset=HQ * D),
        )


# ---- bad inputs: our errors, naming the argument -----------------------------------------------------------


@pytest.mark.parametrize(
    "rotary_dim, pattern",
    [
        (0, r"rotary_dim: expected 0 < rotary_dim <= head_dim \(128\), got 0"),
        (-2, r"rotary_dim: expected 0 < rotary_dim <= head_dim"),
        (130, r"rotary_dim: expected 0 < rotary_dim <= head_dim \(128\), got 130"),
        (63, r"rotary_dim: expected an even rotary_dim"),
        (40, r"rotary_dim: expected a multiple of 16 for head_dim 128, not interleaved"),
        (1 << 40, r"rotary_dim: expected 0 < rotary_dim"),
    ],
)
def test_rotary_dim_out_of_range_odd_or_off_vector_is_named(rotary_dim: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call_pos_ids(qk(), pos(), rotary_dim=rotary_dim)


def test_rotary_dim_vector_rule_depends_on_interleave_and_head_dim(kernel_modules: object) -> None:
    with pytest.raises(KernelError):
        call_pos_ids(qk(), pos(), rotary_dim=40, interleave=True)  # multiple of 8: fine interleaved
    with pytest.raises(ValueError, match="rotary_dim: expected a multiple of 32 for head_dim 512"):
        call_pos_ids(qk(d=512), pos(), rotary_dim=48)


@pytest.mark.parametrize(
    "kw, exc, pattern",
    [
        (dict(rotary_dim=64.0), TypeError, "rotary_dim: expected an int, got float"),
        (dict(rotary_dim="64"), TypeError, "rotary_dim: expected an int"),
        (dict(interleave="yes"), TypeError, "interleave: expected a bool, got 'yes'"),
        (dict(interleave=2), TypeError, "interleave: expected a bool, got 2"),
        (dict(interleave=None), TypeError, "interleave: expected a bool"),
        (dict(rope_scale=0.0), ValueError, "rope_scale: expected a finite value > 0, got 0.0"),
        (dict(rope_scale=float("nan")), ValueError, "rope_scale: expected a finite value > 0"),
        (dict(rope_theta=-1.0), ValueError, "rope_theta: expected a finite value > 0"),
        (dict(rope_theta="1e4"), TypeError, "rope_theta: expected a float"),
        (dict(stream="default"), TypeError, "stream"),
    ],
)
def test_bad_scalars_are_named(kw: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call_pos_ids(qk(), pos(), **kw)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(high_freq_factor=1.0), r"high_freq_factor: expected a value > low_freq_factor \(1.0\), got 1.0"),
        (dict(low_freq_factor=0.0), "low_freq_factor: expected a finite value > 0"),
        (dict(high_freq_factor=float("inf")), "high_freq_factor: expected a finite value"),
        (dict(old_context_len=-8192), "old_context_len: expected a finite value > 0"),
    ],
)
def test_bad_llama31_factors_are_named(kw: dict, pattern: str) -> None:
    t = qk()
    with pytest.raises(ValueError, match=pattern):
        fi_ffi.apply_llama31_rope_pos_ids(t["q"], t["k"], pos(), q_rope=t["q_rope"], k_rope=t["k_rope"], **kw)
    with pytest.raises(ValueError, match=pattern):
        fi_ffi.apply_llama31_rope_inplace(t["q"], t["k"], *ragged(), **kw)


HUGE = 10**400  # an int no float64 holds


FLOAT_ARGS = ("rope_scale", "rope_theta", "low_freq_factor", "high_freq_factor", "old_context_len")


@pytest.mark.parametrize(
    "name,arg",
    [
        (name, arg)
        for name in sorted(n for n in CALLS if "cos_sin" not in n)
        for arg in FLOAT_ARGS
        if arg in inspect.signature(getattr(fi_ffi, name)).parameters
    ],
)
def test_an_int_too_large_for_a_float_is_named(name: str, arg: str) -> None:
    op = getattr(fi_ffi, name)
    t = qk()
    index = (pos(),) if "pos_ids" in name else ragged()
    outputs = {} if name.endswith("_inplace") else {"q_rope": t["q_rope"], "k_rope": t["k_rope"]}
    for value in (HUGE, -HUGE):
        with pytest.raises(ValueError, match=rf"^{arg}: expected a finite float, got an int too large for a float64"):
            op(t["q"], t["k"], *index, **outputs, **{arg: value})


@pytest.mark.parametrize("name", sorted(n for n in CALLS if "cos_sin" not in n))
def test_a_0d_q_without_rotary_dim_is_named(name: str) -> None:
    op = getattr(fi_ffi, name)
    t = qk()
    index = (pos(),) if "pos_ids" in name else ragged()
    outputs = {} if name.endswith("_inplace") else {"q_rope": t["q_rope"], "k_rope": t["k_rope"]}
    with pytest.raises(ValueError, match=r"^q: expected"):
        op(fake_cuda((), "float16"), t["k"], *index, **outputs)


def with_(**changes: Any) -> dict[str, Any]:
    return {**qk(), **changes}


@pytest.mark.parametrize(
    "tensors, p, exc, pattern",
    [
        (with_(), pos("float32"), TypeError, "pos_ids: expected dtype int32, int64, got float32"),
        (with_(), pos(n=NNZ + 1), ValueError, r"pos_ids: expected shape \(5,\) \(\[nnz\]\), got \(6,\)"),
        (with_(), fake_cuda((NNZ, 1), "int32"), ValueError, "pos_ids: expected a 1-D tensor"),
        (with_(), fake_cuda((NNZ,), "int32", strides=(2,)), ValueError, "pos_ids: expected a contiguous tensor"),
        (with_(), fake_cuda((NNZ,), "int32", device="cpu"), ValueError, "pos_ids: expected a tensor on cuda:0"),
        (
            with_(q=fake_cuda((NNZ, HQ, D), "float32")),
            pos(),
            TypeError,
            "q: expected dtype float16, bfloat16, got float32",
        ),
        (
            with_(q=fake_cuda((NNZ, HQ * D))),
            pos(),
            ValueError,
            r"q: expected a 3-D tensor \[nnz, num_qo_heads, head_dim\]",
        ),
        (
            with_(q=fake_cuda((NNZ, HQ, 96)), q_rope=fake_cuda((NNZ, HQ, 96))),
            pos(),
            ValueError,
            "q: head_dim 96 is not supported",
        ),
        (with_(k=fake_cuda((NNZ + 1, HK, D))), pos(), ValueError, r"k: expected shape \(5, num_kv_heads >= 1, 128\)"),
        (with_(k=fake_cuda((NNZ, HK, 64))), pos(), ValueError, r"k: expected shape \(5, num_kv_heads >= 1, 128\)"),
        (with_(k=fake_cuda((NNZ, HK, D), "bfloat16")), pos(), TypeError, r"k: expected dtype float16 \(same as q\)"),
        (with_(q_rope=fake_cuda((NNZ, HK, D))), pos(), ValueError, r"q_rope: expected shape \(5, 4, 128\)"),
        (with_(k_rope=fake_cuda((NNZ, HK, D), "bfloat16")), pos(), TypeError, "k_rope: expected dtype float16"),
        (with_(k_rope=fake_cuda((NNZ, HK, D), device=1)), pos(), ValueError, r"k_rope: expected a tensor on cuda:0"),
        (with_(q=fake_cuda((NNZ, HQ, D), device="cpu")), pos(), ValueError, "q: expected a CUDA device tensor"),
        (
            with_(q=fake_cuda((NNZ, HQ, D), strides=(HQ * D * 2, D * 2, 2))),
            pos(),
            ValueError,
            "q: the last dimension must be contiguous",
        ),
        (
            with_(k=fake_cuda((NNZ, HK, D), strides=(HK * D + 4, D, 1))),
            pos(),
            ValueError,
            "k: stride of dimension 0 must be a multiple of 8 elements",
        ),
        (
            with_(q_rope=fake_cuda((NNZ, HQ, D)).view((NNZ, HQ, D), offset=4)),
            pos(),
            ValueError,
            "q_rope: data pointer .* must be aligned to 16 bytes",
        ),
        (with_(q=Tensor.from_pointer(0, (NNZ, HQ, D), "float16", 0)), pos(), ValueError, "q: data pointer is NULL"),
        (
            with_(
                q=fake_cuda((0, HQ, D)),
                k=fake_cuda((0, HK, D)),
                q_rope=fake_cuda((0, HQ, D)),
                k_rope=fake_cuda((0, HK, D)),
            ),
            pos(n=0),
            ValueError,
            "q: expected at least one token",
        ),
        (with_(k=None), pos(), TypeError, "k: expected a tensor, got None"),
    ],
)
def test_bad_tensors_are_named(tensors: dict, p: Any, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call_pos_ids(tensors, p)


def test_missing_outputs_say_that_fi_ffi_does_not_allocate() -> None:
    t = qk()
    with pytest.raises(TypeError, match="q_rope: required .*never allocates"):
        fi_ffi.apply_rope_pos_ids(t["q"], t["k"], pos())
    with pytest.raises(TypeError, match="k_rope: required"):
        fi_ffi.apply_llama31_rope(t["q"], t["k"], *ragged(), q_rope=t["q_rope"])
    with pytest.raises(TypeError, match="query_out: required"):
        fi_ffi.apply_rope_with_cos_sin_cache(pos(), t["q"], t["k"], D, fake_cuda((8, D), "float32"))


@pytest.mark.parametrize(
    "indptr, offsets, exc, pattern",
    [
        (
            fake_cuda((3,), "int32"),
            fake_cuda((2,), "int64"),
            TypeError,
            r"offsets: expected dtype int32 \(same as indptr\)",
        ),
        (
            fake_cuda((3,), "int32"),
            fake_cuda((3,), "int32"),
            ValueError,
            r"offsets: expected shape \(2,\) \(\[batch_size\]\)",
        ),
        (fake_cuda((1,), "int32"), fake_cuda((0,), "int32"), ValueError, "indptr: expected at least 2 entries"),
        (fake_cuda((3,), "float32"), fake_cuda((2,), "float32"), TypeError, "indptr: expected dtype int32, int64"),
        (fake_cuda((3, 1), "int32"), fake_cuda((2,), "int32"), ValueError, "indptr: expected a 1-D tensor"),
    ],
)
def test_bad_indptr_and_offsets_are_named(indptr: Tensor, offsets: Tensor, exc: type, pattern: str) -> None:
    t = qk()
    with pytest.raises(exc, match=pattern):
        fi_ffi.apply_rope(t["q"], t["k"], indptr, offsets, q_rope=t["q_rope"], k_rope=t["k_rope"])


# ---- aliasing -----------------------------------------------------------------------------------------------


def test_outputs_that_partly_overlap_an_input_are_refused() -> None:
    t = qk()
    shifted = t["q"].view((NNZ, HQ, D), offset=8)  # q's memory, 8 elements in: a race, not an in-place call
    with pytest.raises(ValueError, match="q_rope: overlaps q without being the same tensor"):
        call_pos_ids({**t, "q_rope": shifted}, pos())
    with pytest.raises(ValueError, match="q_rope: overlaps k"):
        call_pos_ids({**t, "q_rope": t["k"].view((NNZ, HQ, D))}, pos())
    with pytest.raises(ValueError, match="k_rope: overlaps q"):
        call_pos_ids({**t, "k_rope": t["q"].view((NNZ, HK, D), (HQ * D, D, 1))}, pos())
    with pytest.raises(ValueError, match="q_rope: overlaps k_rope"):
        call_pos_ids({**t, "k_rope": t["q_rope"].view((NNZ, HK, D), (HQ * D, D, 1))}, pos())
    p = pos()
    with pytest.raises(ValueError, match="q_rope: overlaps pos_ids"):
        call_pos_ids({**t, "q_rope": Tensor.from_pointer(p.data_ptr, (NNZ, HQ, D), "float16", 0)}, p)


def test_out_of_place_call_with_outputs_equal_to_inputs_is_in_place(kernel_modules: object) -> None:
    t = qk()
    with pytest.raises(KernelError):
        call_pos_ids({**t, "q_rope": t["q"], "k_rope": t["k"]}, pos())


def test_row_refined_overlap_test() -> None:
    buf = fake_cuda((4, 64))
    left, right = buf.view((4, 32), (64, 1)), buf.view((4, 32), (64, 1), offset=32)
    assert not aliasing.overlaps(left, right) and not aliasing.overlaps(right, left)
    assert aliasing.overlaps(left, buf.view((4, 32), (64, 1), offset=31))
    assert aliasing.overlaps(left, buf.view((3, 32), (64, 1), offset=64))  # row 1 of left = row 0 of this one
    assert not aliasing.overlaps(buf.view((2, 64)), buf.view((2, 64), offset=128))
    assert aliasing.overlaps(buf, buf.view((1,), offset=255))


# ---- cos/sin cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cache, head_size, exc, pattern",
    [
        (fake_cuda((64, D), "float16"), D, TypeError, "cos_sin_cache: expected dtype float32, got float16"),
        (fake_cuda((64, 2 * D), "float32"), D, ValueError, r"cos_sin_cache: its width \(rotary_dim\): expected 0 <"),
        (
            fake_cuda((64, 24), "float32"),
            D,
            ValueError,
            r"cos_sin_cache: its width \(rotary_dim\): expected a multiple of 16",
        ),
        (fake_cuda((64, D, 1), "float32"), D, ValueError, "cos_sin_cache: expected a 2-D tensor"),
        (fake_cuda((64, D), "float32", strides=(2 * D, 1)), D, ValueError, "cos_sin_cache: expected a contiguous"),
        (
            fake_cuda((64, D), "float32"),
            64,
            ValueError,
            r"query: its last dimension \(128\) must equal head_size \(64\)",
        ),
        (fake_cuda((64, D), "float32"), 0, TypeError, "head_size: expected an int >= 1"),
        (fake_cuda((64, D), "float32"), 128.0, TypeError, "head_size: expected an int >= 1"),
    ],
)
def test_bad_cos_sin_cache_calls_are_named(cache: Tensor, head_size: Any, exc: type, pattern: str) -> None:
    t = qk()
    with pytest.raises(exc, match=pattern):
        fi_ffi.apply_rope_with_cos_sin_cache(
            pos(), t["q"], t["k"], head_size, cache, query_out=t["q_rope"], key_out=t["k_rope"]
        )


def test_bad_2d_query_and_positions_are_named() -> None:
    cache = fake_cuda((64, D), "float32")
    with pytest.raises(ValueError, match=r"query: its width 500 is not a multiple of head_size \(128\)"):
        fi_ffi.apply_rope_with_cos_sin_cache_inplace(pos(), fake_cuda((NNZ, 500)), fake_cuda((NNZ, HK * D)), D, cache)
    with pytest.raises(TypeError, match="positions: expected dtype int32, int64, got float16"):
        fi_ffi.apply_rope_with_cos_sin_cache_inplace(
            fake_cuda((NNZ,)), fake_cuda((NNZ, HQ * D)), fake_cuda((NNZ, HK * D)), D, cache
        )
    with pytest.raises(TypeError, match="is_neox: expected a bool"):
        fi_ffi.apply_rope_with_cos_sin_cache_inplace(
            pos(), fake_cuda((NNZ, HQ * D)), fake_cuda((NNZ, HK * D)), D, cache, "neox"
        )


def test_a_validated_layout_stays_on_the_fast_path(kernel_modules: object) -> None:
    from fi_ffi.ops import rope

    t, p = qk(), pos()
    launch = rope._apply_rope_pos_ids.launcher
    for _ in range(3):
        with pytest.raises(KernelError):
            call_pos_ids(t, p, rotary_dim=64)
    before = launch.slow_calls
    for _ in range(3):
        with pytest.raises(KernelError):
            call_pos_ids(t, p, rotary_dim=64, rope_scale=2)  # an int scale is passed as a float: no slow path
    assert launch.slow_calls - before == 1
