"""FlashInfer 0.7.2 modules on CPU: the public ops pack calls that reach each module's device check.

Under a lock pinning the 0.7.2 test wheel alone (fixture ``release_072``), one call per module of that wheel
(sampling and MLA: tests/ops/test_sampling.py, tests/ops/attention/test_mla.py) goes through the same public op as on
0.6.3 and
must get past the module's own argument check to its first CUDA call: norm, page, RoPE, silu_and_mul, cascade,
batch decode plan and run, FA3 batch prefill plan and runs, FA2 batch prefill plan and runs (the 0.7 argument
lists: ``uniform_q_len``, the cache scale factors). Also the ``uniform_q_len`` keyword on both releases.
Skips when the 0.7.2 wheel is absent (``<repo>/../shared/wheels-072``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.attention_plans import PREFILL_URI, decode_plan, decode_run_args, host, paged, prefill_plan, workspace
from helpers.fakes import assert_reached_the_kernel, fake_cuda
from helpers.fakes import fake_cuda as sized_cuda  # host memory of the tensor's extent (outputs must not overlap)
from helpers.page_args import kv_args, mla_args

import fi_ffi
from fi_ffi import loader
from fi_ffi.errors import KernelError
from fi_ffi.ops import page
from fi_ffi.ops.attention import decode, prefill

pytestmark = pytest.mark.cpu_only  # fake cuda:0 descriptors over host memory

FA2_072 = PREFILL_URI + "_kv_stride_equal"
FA3_072 = PREFILL_URI + "_sm90"


def reached(call) -> KernelError:  # type: ignore[no-untyped-def]
    with pytest.raises(KernelError) as info:
        call()
    assert_reached_the_kernel(info.value)
    return info.value


def paged_plan(ws, **kw):  # type: ignore[no-untyped-def]
    """``batch_prefill_paged_plan`` of two requests (3 and 1 query rows over 1 and 2 pages of 16) on ``ws``."""
    return prefill.batch_prefill_paged_plan(
        host([0, 3, 4]), host([0, 1, 3]), None, host([5, 4]), 32, 8, 128, 16, workspace=ws, **kw
    )


def served_by_072(uri: str) -> None:
    assert loader.module_release(uri) == "0.7.2.post1"


# ------------------------------------------------------------------------------------ unchanged modules


def test_norm_page_rope_silu_cascade_reach_the_072_modules(release_072: list[str]) -> None:
    x = sized_cuda((4, 128))
    reached(lambda: fi_ffi.rmsnorm(x, sized_cuda((128,)), out=sized_cuda((4, 128)), eps=1e-6))
    reached(lambda: fi_ffi.fused_add_rmsnorm(x, sized_cuda((4, 128)), sized_cuda((128,))))
    reached(lambda: page.append_paged_kv_cache(**kv_args()))
    reached(lambda: page.append_paged_mla_kv_cache(**mla_args()))
    q, k = sized_cuda((3, 4, 128)), sized_cuda((3, 2, 128))
    reached(
        lambda: fi_ffi.apply_rope_pos_ids(
            q, k, sized_cuda((3,), "int32"), q_rope=sized_cuda((3, 4, 128)), k_rope=sized_cuda((3, 2, 128))
        )
    )
    reached(lambda: fi_ffi.silu_and_mul(sized_cuda((2, 128)), sized_cuda((2, 64))))
    reached(
        lambda: fi_ffi.merge_state_in_place(
            sized_cuda((2, 4, 128)),
            sized_cuda((2, 4), "float32"),
            sized_cuda((2, 4, 128)),
            sized_cuda((2, 4), "float32"),
        )
    )
    for uri in ("norm", "page", "rope", "silu_and_mul", "cascade"):
        served_by_072(uri)


def test_batch_decode_plan_and_run_reach_the_072_module(release_072: list[str], make_array) -> None:  # type: ignore[no-untyped-def]
    ws = workspace()
    err = reached(
        lambda: decode.batch_decode_plan(host([0, 2, 3]), None, host([5, 16]), 32, 8, 128, 16, stream=0, workspace=ws)
    )
    assert err.function.endswith(".plan")
    plan = decode_plan(make_array)
    served_by_072(plan.uri)
    reached(lambda: decode.batch_decode_run(**paged(decode_run_args()), plan=plan))


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_fa3_prefill_plan_and_runs_reach_the_072_module(release_072: list[str], make_array, mode: str) -> None:  # type: ignore[no-untyped-def]
    ws = workspace()
    if mode == "ragged":
        err = reached(
            lambda: prefill.batch_prefill_ragged_plan(
                host([0, 3, 4]), host([0, 5, 9]), 32, 8, 128, backend="fa3", uniform_q_len=None, workspace=ws
            )
        )
    else:
        err = reached(lambda: paged_plan(ws, backend="fa3"))
    assert err.function == FA3_072 + ".plan" and len(err.arguments) == 16
    plan = prefill_plan(make_array, mode, "fa3")
    served_by_072(plan.uri)
    run_reaches(plan, mode)


# ------------------------------------------------------------------------------------ FA2: the 0.7 argument lists


def run_reaches(plan, mode: str) -> KernelError:  # type: ignore[no-untyped-def]
    q, out = fake_cuda((4, 32, 128)), fake_cuda((4, 32, 128))
    i3 = fake_cuda((3,), "int32")
    if mode == "ragged":
        kv = fake_cuda((9, 8, 128))
        return reached(
            lambda: prefill.batch_prefill_ragged_run(q, kv, kv, qo_indptr=i3, kv_indptr=i3, out=out, plan=plan)
        )
    cache = fake_cuda((4, 16, 8, 128))
    return reached(
        lambda: prefill.batch_prefill_paged_run(
            q,
            (cache, cache),
            qo_indptr=i3,
            kv_indptr=i3,
            kv_indices=i3,
            kv_last_page_len=fake_cuda((2,), "int32"),
            out=out,
            plan=plan,
        )
    )


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_fa2_prefill_runs_reach_the_072_module_without_scale_factors(
    release_072: list[str],
    make_array,  # type: ignore[no-untyped-def]
    mode: str,
) -> None:
    plan = prefill_plan(make_array, mode, "fa2")
    assert plan.uri == FA2_072
    served_by_072(plan.uri)
    assert plan._s.run.launcher.decl is (prefill.FA2_RAGGED_072 if mode == "ragged" else prefill.FA2_PAGED_072)
    err = run_reaches(plan, mode)
    assert err.function == f"{FA2_072}.{mode}_run"
    n = len(err.arguments)
    assert n == (27 if mode == "ragged" else 29)
    # maybe_k_cache_sf, maybe_v_cache_sf (None: 0.6.3's behaviour), then the four scales and the item length
    assert err.arguments[n - 7 : n - 5] == ("None", "None") and err.arguments[-1] == "0"


def test_fa2_prefill_plan_passes_uniform_q_len_to_the_072_module(release_072: list[str]) -> None:
    ws = workspace()
    err = reached(
        lambda: prefill.batch_prefill_ragged_plan(
            host([0, 3, 6]),
            host([0, 5, 9]),
            32,
            8,
            128,
            backend="fa2",
            enable_cuda_graph=True,
            uniform_q_len=3,
            workspace=ws,
        )
    )
    assert err.function == FA2_072 + ".plan" and len(err.arguments) == 20 and err.arguments[-1] == "3"
    err = reached(lambda: paged_plan(ws, backend="fa2"))
    assert err.arguments[-1] == "0"  # no promise: 0.6.3's behaviour


# ------------------------------------------------------------------------------------ uniform_q_len on 0.6.3


def test_uniform_q_len_on_a_063_fa2_module_is_refused_by_name_before_the_plan(kernel_modules: list[str]) -> None:
    ws = workspace()
    generation = ws._generation
    with pytest.raises(
        ValueError,
        match=r"^uniform_q_len: not supported by the bound module's entry point "
        rf"{PREFILL_URI}\.plan \(FlashInfer 0\.6\.3\); pin FlashInfer >= 0\.7",
    ):
        prefill.batch_prefill_ragged_plan(
            host([0, 3, 6]), host([0, 5, 9]), 32, 8, 128, backend="fa2", uniform_q_len=3, workspace=ws
        )
    assert ws._generation == generation  # refused before the plan call: earlier plans stay valid
    # off (None or 0) is 0.6.3's behaviour and reaches the module
    for off in (None, 0):
        err = reached(
            lambda off=off: prefill.batch_prefill_ragged_plan(
                host([0, 3, 6]), host([0, 5, 9]), 32, 8, 128, backend="fa2", uniform_q_len=off, workspace=ws
            )
        )
        assert len(err.arguments) == 19


def test_uniform_q_len_is_ignored_by_fa3_as_upstream(kernel_modules: list[str]) -> None:
    err = reached(
        lambda: prefill.batch_prefill_ragged_plan(
            host([0, 3, 6]), host([0, 5, 9]), 32, 8, 128, backend="fa3", uniform_q_len=3, workspace=workspace()
        )
    )
    assert err.function.endswith("_sm90.plan") and len(err.arguments) == 16


@pytest.mark.parametrize(
    ("value", "exc", "pattern"),
    [
        (2, ValueError, r"^uniform_q_len: promises 2 query rows per request, but qo_indptr gives request 0 3"),
        (3, ValueError, r"^uniform_q_len: promises 3 query rows per request, but qo_indptr gives request 1 1"),
        (-1, ValueError, r"^uniform_q_len: expected an int >= 0, got -1"),
        (True, TypeError, r"^uniform_q_len: expected an int, got bool"),
        (2.0, TypeError, r"^uniform_q_len: expected an int, got float"),
        (np.array([3, 3]), TypeError, r"^uniform_q_len: expected an int, got ndarray"),
    ],
)
def test_bad_uniform_q_len_is_named(kernel_modules: list[str], value: object, exc: type, pattern: str) -> None:
    ws = workspace()
    generation = ws._generation
    with pytest.raises(exc, match=pattern):
        paged_plan(ws, backend="fa2", uniform_q_len=value)
    assert ws._generation == generation


# ------------------------------------------------------------------------------- split-KV controls in CUDA-graph mode


def _graph_plan(ws, backend: str = "fa2", graph: bool = True, **split):  # type: ignore[no-untyped-def]
    return paged_plan(ws, backend=backend, enable_cuda_graph=graph, **split)


@pytest.mark.parametrize(
    ("split", "pattern"),
    [
        (dict(disable_split_kv=True), r"^disable_split_kv: True with enable_cuda_graph=True is unsafe on "),
        (dict(fixed_split_size=64), r"^fixed_split_size: 64 with enable_cuda_graph=True is unsafe on "),
    ],
)
def test_a_063_fa2_graph_plan_without_split_kv_is_refused_before_the_plan(
    kernel_modules: list[str], split: dict[str, object], pattern: str
) -> None:
    """FlashInfer 0.6.3's FA2 planner masks a CUDA-graph launch's padding blocks only for a split schedule (the
    unsplit one ran them on stale indices: an illegal address on the H100), so fi_ffi refuses the
    combination by name before the plan call; eager plans, FA3 plans and the default split reach the module."""
    ws = workspace()
    generation = ws._generation
    tail = r"FlashInfer 0\.6\.3's FA2 prefill module .*keep split-KV on in CUDA-graph mode.*pin FlashInfer >= 0\.7\.2$"
    with pytest.raises(ValueError, match=pattern + tail):
        _graph_plan(ws, **split)
    assert ws._generation == generation  # refused before the plan call: earlier plans stay valid
    for call in (
        lambda: _graph_plan(ws, graph=False, **split),  # eager: no padding blocks
        lambda: _graph_plan(ws, backend="fa3", **split),  # FA3 takes no split controls
        lambda: _graph_plan(ws),  # graph mode, split as the planner chooses
    ):
        err = reached(call)
        assert err.function.endswith(".plan")
    # the eager plan passes the control on: (fixed_split_size, disable_split_kv) before the last argument
    split_args = reached(lambda: _graph_plan(ws, graph=False, **split)).arguments[-3:-1]
    assert split_args == (("64", "False") if "fixed_split_size" in split else ("-1", "True"))


def test_a_072_fa2_graph_plan_without_split_kv_reaches_the_module(release_072: list[str]) -> None:
    """FlashInfer 0.7.2's planner masks the padding blocks whether or not it splits: the combination is passed on."""
    err = reached(lambda: _graph_plan(workspace(), disable_split_kv=True))
    assert err.function == FA2_072 + ".plan"
    assert "True" in err.arguments
