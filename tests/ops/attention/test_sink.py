"""Attention with sinks on the CPU machine, against the real ``batch_prefill_with_attention_sink_*`` modules (FA2
and FA3, window off and on) of the model-family test wheel: plans and runs are packed and reach the modules
(which stop at the missing device), the module is chosen from dtype, head dim, window and backend, and bad
arguments are refused before the FFI, naming the argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers.attention_plans import assert_reached_the_kernel, host, paged, workspace
from helpers.fakes import fake_cuda
from helpers.sink_plans import H_K, H_Q, PAGE, D, fake_plan, settings

import fi_ffi
from fi_ffi.errors import KernelError, KernelNotFoundError
from fi_ffi.ops.attention import sink as K

pytestmark = pytest.mark.cpu_only


@pytest.fixture
def make_array(models_modules: object):  # type: ignore[no-untyped-def]
    """``ffi.Array``; asks for the model-family wheel too, since a sink plan's settings name its pinned modules."""
    from fi_ffi.abi.call import Function

    return Function.global_function("ffi.Array")


@pytest.mark.parametrize("window_left", [-1, 127])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
@pytest.mark.parametrize("mode", ["paged", "ragged"])
def test_plans_reach_the_sink_modules(
    kernel_modules: object, models_modules: object, mode: str, backend: str, window_left: int
) -> None:
    ws = workspace()
    with pytest.raises(KernelError) as info:
        if mode == "paged":
            fi_ffi.batch_attention_sink_plan(
                host([0, 3, 4]),
                host([0, 1, 3]),
                None,
                host([5, 4]),
                H_Q,
                H_K,
                D,
                PAGE,
                window_left=window_left,
                backend=backend,
                workspace=ws,
            )
        else:
            fi_ffi.batch_attention_sink_ragged_plan(
                host([0, 3, 4]), host([0, 5, 9]), H_Q, H_K, D, window_left=window_left, backend=backend, workspace=ws
            )
    assert_reached_the_kernel(info.value)
    uri = info.value.function.rsplit(".", 1)[0]
    assert uri == K.SinkVariant(fi_ffi.bfloat16, D, window_left >= 0, backend).uri
    assert uri.startswith("batch_prefill_with_attention_sink_") and uri.endswith("_sm90") == (backend == "fa3")


@pytest.mark.parametrize("window_left", [-1, 127])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_paged_runs_reach_the_sink_modules(
    kernel_modules: object, models_modules: object, make_array: Any, backend: str, window_left: int
) -> None:
    plan = fake_plan(make_array, "paged", backend, window_left)
    sink = fake_cuda((H_Q,), "float32")
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_attention_sink_run(
            fake_cuda((4, H_Q, D), "bfloat16"),
            (fake_cuda((4, PAGE, H_K, D), "bfloat16"), fake_cuda((4, PAGE, H_K, D), "bfloat16")),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            kv_indices=fake_cuda((3,), "int32"),
            kv_last_page_len=fake_cuda((2,), "int32"),
            out=fake_cuda((4, H_Q, D), "bfloat16"),
            sinks=sink,
            lse=fake_cuda((4, H_Q), "float32"),
            plan=plan,
        )
    assert_reached_the_kernel(info.value)
    assert info.value.function.endswith("paged_run")
    args = info.value.arguments
    assert (
        args[12] == "1"
        and args[14] == str(window_left)
        and args[16].startswith("Tensor")
        and float(args[17]) == pytest.approx(D**-0.5)
    )


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_ragged_runs_reach_the_sink_modules(
    kernel_modules: object, models_modules: object, make_array: Any, backend: str
) -> None:
    plan = fake_plan(make_array, "ragged", backend)
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_attention_sink_ragged_run(
            fake_cuda((4, H_Q, D), "bfloat16"),
            fake_cuda((9, H_K, D), "bfloat16"),
            fake_cuda((9, H_K, D), "bfloat16"),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            out=fake_cuda((4, H_Q, D), "bfloat16"),
            sinks=fake_cuda((H_Q,), "float32"),
            plan=plan,
        )
    assert_reached_the_kernel(info.value)
    assert info.value.function.endswith("ragged_run")


def run_args(**change: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "q": fake_cuda((4, H_Q, D), "bfloat16"),
        "k_cache": fake_cuda((4, PAGE, H_K, D), "bfloat16"),
        "v_cache": fake_cuda((4, PAGE, H_K, D), "bfloat16"),
        "qo_indptr": fake_cuda((3,), "int32"),
        "kv_indptr": fake_cuda((3,), "int32"),
        "kv_indices": fake_cuda((3,), "int32"),
        "kv_last_page_len": fake_cuda((2,), "int32"),
        "out": fake_cuda((4, H_Q, D), "bfloat16"),
        "sink": fake_cuda((H_Q,), "float32"),
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"sink": None}, TypeError, r"sinks: expected a float32 device tensor \[8\]"),
        ({"sink": fake_cuda((H_Q,), "bfloat16")}, (TypeError, ValueError), "sink"),
        ({"sink": fake_cuda((H_K,), "float32")}, ValueError, "sink"),
        ({"sink": fake_cuda((H_Q,), "float32", device="cpu")}, ValueError, "sink"),
        ({"q": fake_cuda((4, H_Q, D), "float16")}, (TypeError, ValueError), "q"),
        ({"q": fake_cuda((3, H_Q, D), "bfloat16")}, ValueError, "q: the plan's qo_indptr ends at 4 rows"),
        ({"kv_indices": fake_cuda((2,), "int32")}, ValueError, "kv_indices: the plan's kv_indptr ends at 3 pages"),
        ({"out": fake_cuda((4, H_Q, 32), "bfloat16")}, ValueError, "out"),
        ({"k_cache": fake_cuda((4, PAGE, H_K + 1, D), "bfloat16")}, ValueError, "k_cache"),
    ],
)
def test_bad_run_arguments_are_named(make_array: Any, change: dict[str, Any], exc: Any, pattern: str) -> None:
    plan = fake_plan(make_array)
    with pytest.raises(exc, match=pattern):
        fi_ffi.batch_attention_sink_run(**paged(run_args(**change)), plan=plan)


def test_a_plain_prefill_plan_is_refused_by_the_sink_run(make_array: Any) -> None:
    from helpers.attention_plans import prefill_plan

    plan = prefill_plan(make_array, "paged", "fa2")
    with pytest.raises(ValueError, match="plan: expected a batch_attention_sink plan for paged KV"):
        fi_ffi.batch_attention_sink_run(**paged(run_args()), plan=plan)
    with pytest.raises(TypeError, match="plan: expected a Plan"):
        fi_ffi.batch_attention_sink_run(**paged(run_args()), plan=object())  # type: ignore[arg-type]


def test_a_stale_plan_is_refused(make_array: Any) -> None:
    plan = fake_plan(make_array)
    plan.workspace._generation += 1  # a later plan on the same workspace
    with pytest.raises(ValueError, match="stale"):
        fi_ffi.batch_attention_sink_run(**paged(run_args()), plan=plan)


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        ({"head_dim_qk": 128}, KernelNotFoundError, "no pinned module .*head_dim_qk_128.*these sink modules"),
        ({"q_data_type": "float16"}, KernelNotFoundError, "attention sinks, float16"),
        ({"backend": "fa4"}, ValueError, "backend: expected 'auto', 'fa2' or 'fa3'"),
        ({"window_left": -2}, ValueError, "window_left"),
        ({"num_qo_heads": 6}, ValueError, r"num_qo_heads: .*must be a multiple of num_kv_heads \(4\)"),
        ({"kv_layout": "XYZ"}, ValueError, "kv_layout"),
        ({"sm_scale": -1.0}, ValueError, "sm_scale"),
        ({"causal": "yes"}, TypeError, "causal"),
    ],
)
def test_bad_plan_arguments_are_named(models_modules: object, kw: dict[str, Any], exc: type, pattern: str) -> None:
    args: dict[str, Any] = {"num_qo_heads": 8, "num_kv_heads": 4, "head_dim_qk": D, "page_size": PAGE, **kw}
    with pytest.raises(exc, match=pattern):
        fi_ffi.batch_attention_sink_plan(host([0, 1]), host([0, 1]), None, host([3]), **args, workspace=workspace())


def test_uri_spelling_matches_the_pinned_modules(models_modules: list[str]) -> None:
    sinks = {u for u in models_modules if u.startswith("batch_prefill_with_attention_sink_")}
    ours = {K.SinkVariant(fi_ffi.bfloat16, 64, w, b).uri for w in (False, True) for b in ("fa2", "fa3")}
    assert ours == sinks


# Gemma 2's shapes (8/4 heads, head_dim 256, page 16) and settings (bfloat16, a 4096-token window, soft cap 50)
GEMMA2_SHAPES = (8, 4, 256, 16)
GEMMA2_SETTINGS: dict[str, Any] = {"q_data_type": "bfloat16", "window_left": 4095, "logits_soft_cap": 50.0}


def gemma2_prefill_plan(ws: object, **kw: object) -> object:
    """A paged causal prefill plan of Gemma 2 on ``ws``, with ``kw`` added."""
    qo_indptr, kv_indptr, kv_last_page_len = host([0, 3, 4]), host([0, 1, 3]), host([5, 4])
    return fi_ffi.batch_prefill_paged_plan(
        qo_indptr, kv_indptr, None, kv_last_page_len, *GEMMA2_SHAPES, causal=True, **GEMMA2_SETTINGS, workspace=ws, **kw
    )


def test_the_gemma_head_dim_256_modules_serve_decode_and_prefill_plans(
    kernel_modules: object, models_modules: object
) -> None:
    """Gemma 2/3 (head_dim 256, sliding window, soft cap, bfloat16) through the existing batch decode and prefill
    ops: the settings select the model-family wheel's modules and the plans reach them."""
    ws = workspace()
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_decode_plan(host([0, 2, 3]), None, host([5, 16]), *GEMMA2_SHAPES, **GEMMA2_SETTINGS, workspace=ws)
    assert_reached_the_kernel(info.value)
    assert "batch_decode_with_kv_cache_dtype_q_bf16" in info.value.function
    assert "head_dim_qk_256_head_dim_vo_256_posenc_0_use_swa_True_use_logits_cap_True" in info.value.function
    with pytest.raises(KernelError) as info:
        gemma2_prefill_plan(ws)
    assert_reached_the_kernel(info.value)
    assert "head_dim_qk_256_head_dim_vo_256_posenc_0_use_swa_True_use_logits_cap_True_f16qk_False" in (
        info.value.function
    )
    # FA3 has no head_dim 256 module here: a forced FA3 plan is a KernelNotFoundError naming the variant
    with pytest.raises(KernelNotFoundError, match="head_dim_qk_256"):
        gemma2_prefill_plan(ws, backend="fa3")


def test_the_sink_settings_are_values(models_modules: object) -> None:
    a, b = settings(), settings()
    assert a == b and hash(a) == hash(b)
    assert settings(window_left=3) != a
    assert np.isclose(a.sm_scale, D**-0.5)


def test_out_must_not_overlap_the_sink(make_array: Any) -> None:
    from fi_ffi.tensor.descriptor import Tensor

    plan = fake_plan(make_array)
    args = run_args()
    out = args["out"]
    args["sink"] = Tensor.from_pointer(out.data_ptr, (H_Q,), "float32", 0, owner=out)
    with pytest.raises(ValueError, match="out: overlaps sink"):
        fi_ffi.batch_attention_sink_run(**paged(args), plan=plan)
