"""The FP8 attention modules of the FP8 test wheel (``../shared/wheels-fp8``) on the CPU machine: bf16 queries over
an e4m3 paged KV cache (FA2 decode, FA2 prefill ragged and paged) and FA3 prefill with e4m3 q/k/v and bf16 output.

As in test_attention_calls.py: descriptors claim ``cuda:0`` but point at host memory, so a call passes our checks,
crosses the FFI, passes the module's signature check (argument count and types) and stops at the module's first
CUDA call. That proves the packing matches each module's own signature; the declarations are also compared with
the signature text (tests/launch/test_declarations.py compares every declaration with every module it matches).
"""

from __future__ import annotations

import pytest
from helpers.attention_plans import assert_declaration_matches, assert_reached_the_kernel, host, prefill_plan, workspace
from helpers.fakes import fake_cuda

from fi_ffi.errors import KernelError
from fi_ffi.ops.attention import decode, prefill

pytestmark = pytest.mark.usefixtures("kernel_modules", "fp8_modules", "fake_device_only")

_TAIL = "dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False"
DECODE = "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_" + _TAIL
FA2 = "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_" + _TAIL + "_f16qk_False"
FA3 = "batch_prefill_with_kv_cache_dtype_q_e4m3_dtype_kv_e4m3_" + _TAIL + "_f16qk_False_sm90"
E4M3, BF16 = "float8_e4m3fn", "bfloat16"


@pytest.mark.parametrize(
    ("uri", "decl"),
    [
        *((DECODE, d) for d in (decode.PLAN, decode.RUN)),
        *((FA2, d) for d in (prefill.FA2_PLAN, prefill.FA2_RAGGED, prefill.FA2_PAGED)),
        *((FA3, d) for d in (prefill.FA3_FP8_PLAN, prefill.FA3_FP8_RAGGED, prefill.FA3_FP8_PAGED)),
    ],
)
def test_declarations_match_the_fp8_module_signatures(uri, decl):
    assert_declaration_matches(uri, decl)


def test_the_16_bit_fa3_declarations_do_not_claim_the_fp8_module():
    """The FP8 module's runs take scales where the 16-bit FA3 runs take multi-item inputs and a soft cap: the two
    URI patterns are disjoint, so neither declaration is ever bound to the other's module."""
    import re

    patterns = {d.entry + ":" + p for p, d in prefill.DECLARATIONS if re.fullmatch(p, FA3)}
    assert patterns == {
        "plan:" + prefill._FA3_FP8_URI,
        "ragged_run:" + prefill._FA3_FP8_URI,
        "paged_run:" + prefill._FA3_FP8_URI,
    }
    assert not re.fullmatch(prefill._FA3_FP8_URI, FA3.replace("dtype_q_e4m3", "dtype_q_bf16"))


# ------------------------------------------------------------------------------------------ plans reach the modules


def test_bf16_decode_plan_over_an_e4m3_cache_reaches_its_module():
    ws = workspace()
    with pytest.raises(KernelError) as info:
        decode.batch_decode_plan(
            host([0, 2, 3]), None, None, 32, 8, 128, 16, q_data_type=BF16, kv_data_type=E4M3, workspace=ws
        )
    assert_reached_the_kernel(info.value)
    assert info.value.function == DECODE + ".plan"


def prefill_plan_of(mode, **settings):
    """A causal ``mode`` ("ragged" or "paged") prefill plan of 2 requests over 32/8 heads of 128 (pages of 16) on a
    fresh workspace, with ``settings``."""
    ws = workspace()
    if mode == "ragged":
        return prefill.batch_prefill_ragged_plan(
            host([0, 3, 4]), host([0, 5, 9]), 32, 8, 128, causal=True, workspace=ws, **settings
        )
    return prefill.batch_prefill_paged_plan(
        host([0, 3, 4]), host([0, 1, 3]), None, host([5, 4]), 32, 8, 128, 16, causal=True, workspace=ws, **settings
    )


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_bf16_prefill_plans_over_e4m3_kv_reach_the_fa2_module(mode):
    with pytest.raises(KernelError) as info:
        prefill_plan_of(mode, q_data_type=BF16, kv_data_type=E4M3)
    assert_reached_the_kernel(info.value)
    assert info.value.function == FA2 + ".plan"  # bf16 q over e4m3 KV: FA3 has no such module, FA2 serves it


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_fa3_fp8_plans_reach_the_module(mode):
    with pytest.raises(KernelError) as info:
        prefill_plan_of(mode, q_data_type=E4M3, o_data_type=BF16, backend="fa3")
    assert_reached_the_kernel(info.value)
    assert info.value.function == FA3 + ".plan"


# ------------------------------------------------------------------------------------------ runs reach the modules


def _cache(dtype=E4M3):
    return fake_cuda((4, 16, 8, 128), dtype)


def test_bf16_decode_run_over_an_e4m3_cache_reaches_its_module(make_array):
    from helpers.attention_plans import decode_plan

    plan = decode_plan(make_array, q_dtype=BF16, kv_dtype=E4M3)
    assert plan.uri == DECODE
    args = dict(
        kv_indptr=fake_cuda((3,), "int32"),
        kv_indices=fake_cuda((4,), "int32"),
        kv_last_page_len=fake_cuda((2,), "int32"),
        out=fake_cuda((2, 32, 128), BF16),
        plan=plan,
    )
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(fake_cuda((2, 32, 128), BF16), (_cache(), _cache()), **args)
    assert_reached_the_kernel(info.value)
    assert info.value.function == DECODE + ".run"
    with pytest.raises(TypeError, match=r"^k_cache: expected dtype float8_e4m3fn, got bfloat16"):
        decode.batch_decode_run(fake_cuda((2, 32, 128), BF16), (_cache(BF16), _cache(BF16)), **args)
    with pytest.raises(TypeError, match=r"^q: expected dtype bfloat16, got float8_e4m3fn"):
        decode.batch_decode_run(fake_cuda((2, 32, 128), E4M3), (_cache(), _cache()), **args)
    prepared = decode.prepare_decode_run(fake_cuda((2, 32, 128), BF16), (_cache(), _cache()), **args)
    with pytest.raises(KernelError) as info:
        prepared.run(plan)
    assert_reached_the_kernel(info.value)


def _paged_args(q_dtype, cache_dtype=E4M3):
    return dict(
        qo_indptr=fake_cuda((3,), "int32"),
        kv_indptr=fake_cuda((3,), "int32"),
        kv_indices=fake_cuda((3,), "int32"),
        kv_last_page_len=fake_cuda((2,), "int32"),
        out=fake_cuda((4, 32, 128), BF16),
    ), (fake_cuda((4, 32, 128), q_dtype), (_cache(cache_dtype), _cache(cache_dtype)))


def _ragged_args(q_dtype, kv_dtype=E4M3):
    q = fake_cuda((4, 32, 128), q_dtype)
    k, v = fake_cuda((9, 8, 128), kv_dtype), fake_cuda((9, 8, 128), kv_dtype)
    rest = dict(
        qo_indptr=fake_cuda((3,), "int32"), kv_indptr=fake_cuda((3,), "int32"), out=fake_cuda((4, 32, 128), BF16)
    )
    return q, k, v, rest


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_fa2_runs_with_bf16_q_over_e4m3_kv_reach_the_module(make_array, mode):
    plan = prefill_plan(make_array, mode, "auto", q_dtype=BF16, kv_dtype=E4M3, causal=True)
    assert plan.uri == FA2 and plan.backend == "fa2"
    with pytest.raises(KernelError) as info:
        if mode == "ragged":
            q, k, v, rest = _ragged_args(BF16)
            prefill.batch_prefill_ragged_run(q, k, v, plan=plan, **rest)
        else:
            rest, (q, cache) = _paged_args(BF16)
            prefill.batch_prefill_paged_run(q, cache, plan=plan, **rest)
    assert_reached_the_kernel(info.value)
    assert info.value.function == FA2 + f".{mode}_run"


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_fa3_fp8_runs_pass_their_scales(make_array, mode):
    """The three dequantization scales land in the scalar slots after sm_scale (default 1.0 each)."""
    plan = prefill_plan(make_array, mode, "fa3", q_dtype=E4M3, o_dtype=BF16, causal=True)
    assert plan.uri == FA3 and plan.backend == "fa3"
    last = 20 if mode == "ragged" else 22  # the index of scale_v_scalar (the last argument)

    def run(**scales):
        with pytest.raises(KernelError) as info:
            if mode == "ragged":
                q, k, v, rest = _ragged_args(E4M3)
                prefill.batch_prefill_ragged_run(q, k, v, plan=plan, **rest, **scales)
            else:
                rest, (q, cache) = _paged_args(E4M3)
                prefill.batch_prefill_paged_run(q, cache, plan=plan, **rest, **scales)
        assert_reached_the_kernel(info.value)
        assert info.value.function == FA3 + f".{mode}_run"
        return info.value.arguments

    args = run()
    assert [float(a) for a in args[last - 2 : last + 1]] == [1.0, 1.0, 1.0]
    assert float(args[last - 3]) == pytest.approx(128**-0.5)  # sm_scale
    args = run(q_scale=0.5, k_scale=2.0, v_scale=0.25)
    assert [float(a) for a in args[last - 2 : last + 1]] == [0.5, 2.0, 0.25]
    args = run(k_scale=3)  # an int is a scale too; the others stay 1.0
    assert [float(a) for a in args[last - 2 : last + 1]] == [1.0, 3.0, 1.0]


@pytest.mark.parametrize(
    ("scales", "error", "match"),
    [
        ({"q_scale": 0.0}, ValueError, r"^q_scale: expected a finite value > 0, got 0.0"),
        ({"k_scale": float("nan")}, ValueError, r"^k_scale: expected a finite value > 0"),
        ({"v_scale": -1.0}, ValueError, r"^v_scale: expected a finite value > 0"),
        ({"v_scale": "1.0"}, TypeError, r"^v_scale: expected a float, got str"),
    ],
)
def test_bad_fp8_scales_are_refused_by_name(make_array, scales, error, match):
    plan = prefill_plan(make_array, "paged", "fa3", q_dtype=E4M3, o_dtype=BF16, causal=True)
    rest, (q, cache) = _paged_args(E4M3)
    with pytest.raises(error, match=match):
        prefill.batch_prefill_paged_run(q, cache, plan=plan, **rest, **scales)


@pytest.mark.parametrize("name", ["q_scale", "k_scale", "v_scale"])
def test_scales_are_refused_where_the_module_takes_none(make_array, name):
    """A bf16-query plan over an e4m3 cache (FA2) takes no scales: the error says how to apply them instead."""
    plan = prefill_plan(make_array, "paged", "auto", q_dtype=BF16, kv_dtype=E4M3, causal=True)
    rest, (q, cache) = _paged_args(BF16)
    with pytest.raises(ValueError, match=rf"^{name}: only the FA3 FP8 prefill modules .* sm_scale \* k_scale"):
        prefill.batch_prefill_paged_run(q, cache, plan=plan, **rest, **{name: 2.0})
    q, k, v, rest = _ragged_args(BF16)
    ragged = prefill_plan(make_array, "ragged", "auto", q_dtype=BF16, kv_dtype=E4M3, causal=True)
    with pytest.raises(ValueError, match=rf"^{name}: only the FA3 FP8"):
        prefill.batch_prefill_ragged_run(q, k, v, plan=ragged, **rest, **{name: 2.0})


def test_fa3_fp8_run_refuses_a_16_bit_cache(make_array):
    plan = prefill_plan(make_array, "paged", "fa3", q_dtype=E4M3, o_dtype=BF16, causal=True)
    rest, (q, cache) = _paged_args(E4M3, BF16)
    with pytest.raises(TypeError, match=r"^k_cache: expected dtype float8_e4m3fn, got bfloat16"):
        prefill.batch_prefill_paged_run(q, cache, plan=plan, **rest)
