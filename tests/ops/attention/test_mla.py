"""MLA paged attention (``batch_mla_plan`` / ``batch_mla_run``) on the CPU machine, against the real modules.

With no GPU, a call whose descriptors claim ``cuda:0`` passes our checks, crosses the FFI, passes the module's
signature check and stops at the module's first CUDA call: that proves the packing of plan and run for the FA2
and FA3 modules of the 0.6.3 test wheels (the session lock) and for the 0.7.2 ``_planabi2`` module (a lock that
also pins ``../shared/wheels-072``; skipped when it is absent). Runs are packed with a plan vector of the real
length (18, an ``ffi.Array`` built with the runtime's global): a wrong length stops at the module's
``FromVector`` check instead. Bad inputs must raise our TypeError/ValueError naming the argument, before the FFI.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
from helpers.fakes import fake_cuda
from helpers.mla_plans import CKV, KPE, H, fake_plan, workspace

import fi_ffi
from fi_ffi.abi import wire
from fi_ffi.cuda import device
from fi_ffi.errors import CudaError, KernelError, KernelNotFoundError, LoaderError, UnsupportedDeviceError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.launch.launcher import bound_entry
from fi_ffi.ops.attention import mla
from fi_ffi.ops.attention import variants as V
from fi_ffi.tensor.descriptor import Tensor

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("kernel_modules")]

MLA_F16 = (
    "batch_mla_attention_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_ckv_512_head_dim_kpe_64_"
    "profiler_False"
)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Each test resolves modules under its own lock and device answers."""
    mla._settings_cache.clear()
    yield
    mla._settings_cache.clear()


def host(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def assert_reached_the_kernel(err: KernelError) -> None:
    """The module accepted the argument list (count and types) and failed on the missing CUDA driver."""
    assert err.kind != "TypeError", f"signature mismatch: {err}"
    assert "Mismatched" not in err.message and "Expected" not in err.message, err.message
    assert "FromVector" not in err.message, err.message
    assert "cuda" in err.message.lower(), err.message


# A decode step of 2 requests (1 row each) and a causal prefill of 2 requests (3 and 2 rows), 16-token pages.
DECODE = dict(qo_indptr=host([0, 1, 2]), kv_indptr=host([0, 2, 3]), kv_indices=None, kv_len_arr=host([20, 16]))
PREFILL = dict(qo_indptr=host([0, 3, 5]), kv_indptr=host([0, 2, 3]), kv_indices=None, kv_len_arr=host([20, 16]))


def plan_args(**over):
    args = dict(
        **DECODE, num_heads=H, head_dim_ckv=CKV, head_dim_kpe=KPE, page_size=16, causal=False, sm_scale=192**-0.5
    )
    args.update(over)
    return args


def run_args(rows=2, pages=4, page_size=16, dtype="float16", **over):
    args = dict(
        q_nope=fake_cuda((rows, H, CKV), dtype),
        q_pe=fake_cuda((rows, H, KPE), dtype),
        ckv_cache=fake_cuda((pages, page_size, CKV), dtype),
        kpe_cache=fake_cuda((pages, page_size, KPE), dtype),
        kv_indices=fake_cuda((pages,), "int32"),
        out=fake_cuda((rows, H, CKV), dtype),
    )
    args.update(over)
    return args


# ------------------------------------------------------------------------------------------ signatures


def test_declarations_state_the_0_6_3_signatures_of_all_four_modules(kernel_modules):
    mods = [u for u in kernel_modules if u.startswith("batch_mla_attention_")]
    assert len(mods) == 4  # f16 / bf16, FA2 / FA3
    for uri in mods:
        assert re.fullmatch(mla.DECLARATIONS[0][0], uri)
        assert mla.PLAN.signature in entry_point(uri, "plan").signature_text()
        assert mla.RUN.signature in entry_point(uri, "run").signature_text()
    assert mla.PLAN.signature == (
        "plan(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: DLTensor*, 4: DLTensor*, "
        "5: DLTensor*, 6: int, 7: int, 8: bool) -> Array<int>"
    )
    assert len(mla.RUN.params) == 15 and len(mla.RUN_PLANABI2.params) == 18
    assert mla.PLAN_PLANABI2.signature.endswith("-> Tuple<Array<int>, int>")


# ------------------------------------------------------------------------------------------ plans reach the module


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_plan_reaches_the_module(backend, dtype, shape):
    ws = workspace()
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_plan(
            q_data_type=dtype,
            backend=backend,
            stream=0,
            **{**plan_args(causal=shape is PREFILL), **shape},
            workspace=ws,
        )
    assert_reached_the_kernel(info.value)
    suffix = "_sm90.plan" if backend == "fa3" else "_profiler_False.plan"
    assert info.value.function.endswith(suffix), info.value.function
    assert f"dtype_q_{'f16' if dtype == 'float16' else 'bf16'}" in info.value.function
    assert ws._generation == 1 and not ws._event_pending  # a failed plan makes older plans stale, records no copy


def test_auto_backend_is_fa2_without_a_hopper_and_fa3_on_one(monkeypatch):
    ws = workspace()
    assert mla._settings(ws, H, CKV, KPE, 16, False, 0.1, "float16", None, "auto").backend == "fa2"  # no GPU here
    mla._settings_cache.clear()
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((9, 0), 132, 32))
    st = mla._settings(ws, H, CKV, KPE, 16, False, 0.1, "float16", None, "auto")
    assert st.backend == "fa3" and st.uri == MLA_F16 + "_sm90"
    mla._settings_cache.clear()
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((8, 0), 108, 32))
    assert mla._settings(ws, H, CKV, KPE, 16, False, 0.1, "float16", None, "auto").uri == MLA_F16
    with pytest.raises(UnsupportedDeviceError, match=r"backend 'fa3' needs an SM 9.x GPU.*SM 8.x"):
        mla._settings(ws, H, CKV, KPE, 16, False, 0.1, "float16", None, "fa3")


# ------------------------------------------------------------------------------------------ runs reach the module


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_run_reaches_the_module(make_array, backend, with_lse):
    plan = fake_plan(make_array, backend=backend)
    lse = fake_cuda((2, H), "float32") if with_lse else None
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(lse=lse, return_lse_base_on_e=with_lse, stream=0, **run_args(), plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.function.endswith("_sm90.run" if backend == "fa3" else "_profiler_False.run")


def test_run_passes_the_plan_vector(make_array):
    plan = fake_plan(make_array, info_len=17)  # the module wants 18 values: proves the Array is what it reads
    with pytest.raises(KernelError, match="should be 18, but got 17"):
        fi_ffi.batch_mla_run(**run_args(), plan=plan)


def test_strided_queries_and_a_bfloat16_causal_prefill_reach_the_module(make_array):
    plan = fake_plan(make_array, rows=5, dtype="bfloat16", causal=True)
    # q_nope / q_pe as slices of one [rows, H, 576] projection output
    q = dict(
        q_nope=fake_cuda((5, H, CKV), "bfloat16", strides=(H * 576, 576, 1)),
        q_pe=fake_cuda((5, H, KPE), "bfloat16", strides=(H * 576, 576, 1)),
    )
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(**run_args(rows=5, dtype="bfloat16", **q), plan=plan)
    assert_reached_the_kernel(info.value)


def test_a_repeated_run_layout_stays_on_the_fast_path(make_array):
    plan = fake_plan(make_array)
    args = run_args()
    for _ in range(3):
        with pytest.raises(KernelError):
            fi_ffi.batch_mla_run(**args, plan=plan)
    launch = plan._s.run
    before = launch.launcher.slow_calls
    with pytest.raises(KernelError):
        fi_ffi.batch_mla_run(**args, plan=plan)
    assert launch.launcher.slow_calls == before


# ------------------------------------------------------------------------------------------ plan lifetime


def test_a_later_plan_on_the_workspace_makes_the_earlier_one_stale(make_array):
    ws = workspace()
    plan = fake_plan(make_array, ws)
    assert not plan.stale and "live" in repr(plan)
    with pytest.raises(KernelError):  # a second plan on the same workspace (it stops at the device, on CPU)
        fi_ffi.batch_mla_plan(stream=0, **plan_args(), workspace=ws)
    assert plan.stale and "stale" in repr(plan)
    with pytest.raises(ValueError, match="plan: is stale: another plan was made on its workspace"):
        fi_ffi.batch_mla_run(**run_args(), plan=plan)


def test_a_released_plan_cannot_run(make_array):
    plan = fake_plan(make_array)
    assert len(plan.info) == 18
    with plan:
        pass
    assert plan.released
    plan.release()  # idempotent
    with pytest.raises(ValueError, match="plan: has been released"):
        fi_ffi.batch_mla_run(**run_args(), plan=plan)


def test_settings_read_through_the_plan(make_array):
    plan = fake_plan(make_array, backend="fa3", causal=True)
    assert (plan.backend, plan.num_heads, plan.head_dim_ckv, plan.head_dim_kpe, plan.page_size, plan.causal) == (
        "fa3",
        H,
        CKV,
        KPE,
        16,
        True,
    )
    assert plan.uri == MLA_F16 + "_sm90" and plan.staged_bytes is None


def test_a_072_plans_staged_byte_count_is_checked_and_copied(make_array):
    ws = workspace()  # int workspace 4096 bytes, page-locked buffer 4096 bytes
    st = mla._settings(ws, H, CKV, KPE, 16, False, 0.1, "float16", None, "fa2")
    for bad in (-1, 4097, 1.5, None):
        with pytest.raises(KernelError, match=r"plan reported .* staged bytes; expected an int in 0\.\.4096"):
            mla._copy_staged(ws, bad, 0, st)
    mla._copy_staged(ws, 0, 0, st)  # nothing staged: nothing to copy
    # 0.7.x leaves the copy to us: it is enqueued (no GPU here)
    with pytest.raises(CudaError, match="cudaMemcpyAsync|cudaGetDevice"):
        mla._copy_staged(ws, 4096, 0, st)


# ------------------------------------------------------------------------------------------ bad plan inputs


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        (dict(num_heads=0), ValueError, r"num_heads: expected an int >= 1"),
        (dict(num_heads=2.0), TypeError, r"num_heads: expected an int"),
        (dict(num_heads=1 << 16), ValueError, r"num_heads: expected at most 65535"),
        (dict(head_dim_ckv=True), TypeError, r"head_dim_ckv: expected an int"),
        (dict(page_size=0), ValueError, r"page_size: expected an int >= 1"),
        (dict(causal=2), TypeError, r"causal: expected a bool"),
        (dict(sm_scale=0.0), ValueError, r"sm_scale: expected a finite value > 0"),
        (dict(sm_scale=float("inf")), ValueError, r"sm_scale: expected a finite value > 0"),
        (dict(sm_scale="0.1"), TypeError, r"sm_scale: expected a float"),
        (dict(q_data_type="float32"), TypeError, r"q_data_type: expected float16 or bfloat16, got float32"),
        (dict(q_data_type="nonsense"), TypeError, r"q_data_type: expected a dtype"),
        (dict(kv_data_type="bfloat16"), TypeError, r"kv_data_type: expected float16 \(as q_data_type\)"),
        (dict(backend="fa4"), ValueError, r"backend: expected 'auto', 'fa2' or 'fa3', got 'fa4'"),
        (dict(qo_indptr=host([0])), ValueError, r"qo_indptr: expected at least 2 entries"),
        (dict(qo_indptr=np.array([0, 1, 2], np.int64)), TypeError, r"qo_indptr: expected dtype int32, got int64"),
        (dict(qo_indptr=host([[0, 1, 2]])), ValueError, r"qo_indptr: expected a 1-D array"),
        (dict(qo_indptr=fake_cuda((3,), "int32")), ValueError, r"qo_indptr: expected a host \(CPU\) array"),
        (dict(qo_indptr=host([1, 1, 2])), ValueError, r"qo_indptr: must start at 0, got 1"),
        (dict(qo_indptr=host([0, 2, 1])), ValueError, r"qo_indptr: must be non-decreasing, but qo_indptr\[2\] = 1"),
        (dict(kv_indptr=host([0, 2])), ValueError, r"kv_indptr: expected 3 entries \(\[batch_size \+ 1\], as qo"),
        (dict(kv_indptr=host([0, 3, 2])), ValueError, r"kv_indptr: must be non-decreasing"),
        (dict(kv_len_arr=host([20])), ValueError, r"kv_len_arr: expected 2 entries \(\[batch_size\]\), got 1"),
        (dict(kv_len_arr=host([20, -1])), ValueError, r"kv_len_arr: must be >= 0, got kv_len_arr\[1\] = -1"),
        (
            dict(kv_len_arr=host([20, 17])),
            ValueError,
            r"kv_len_arr: request 1 has 17 tokens but only 1 page\(s\) of 16",
        ),
        (dict(kv_len_arr=[20, "x"]), TypeError, r"kv_len_arr: expected a sequence of ints"),
        (
            dict(causal=True, qo_indptr=host([0, 1, 5]), kv_len_arr=host([20, 3])),
            ValueError,
            r"kv_len_arr: with causal=True .* request 1 has 4 rows, 3 tokens",
        ),
        (
            dict(kv_indptr=host([0, 1 << 27, 1 << 28]), kv_len_arr=host([16, 16])),
            ValueError,
            r"kv_indptr: 268435456 pages of 16 tokens exceed the kernels' 32-bit token index",
        ),
        (
            dict(qo_indptr=host([0, 8000, 16000]), kv_len_arr=host([20, 16]), num_heads=128),
            ValueError,
            r"qo_indptr: 16000 query rows x 128 heads make 16000 work tiles; the MLA schedule holds at most 15360",
        ),
    ],
)
def test_bad_plan_inputs_are_named_before_the_ffi(over, exc, pattern):
    ws = workspace()
    with pytest.raises(exc, match=pattern):
        fi_ffi.batch_mla_plan(**plan_args(**over), workspace=ws)
    assert ws._generation == 0  # nothing reached the plan call


def test_plan_needs_a_workspace_and_a_module_for_its_head_dims():
    with pytest.raises(TypeError, match=r"workspace: expected a fi_ffi\.Workspace \("):
        fi_ffi.batch_mla_plan(**plan_args(), workspace=object())  # type: ignore[arg-type]
    with pytest.raises(KernelNotFoundError) as info:
        fi_ffi.batch_mla_plan(**plan_args(head_dim_ckv=256), workspace=workspace())
    text = str(info.value)
    assert "no prebuilt module for batch_mla, fa2, float16" in text and "ckv 256, kpe 64" in text
    assert "closest available variants" in text and "head_dim_ckv_512" in text


# ------------------------------------------------------------------------------------------ bad run inputs


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        (dict(q_nope=fake_cuda((3, H, CKV))), ValueError, r"q_nope: expected shape \(2, 16, 512\)"),
        (dict(q_nope=fake_cuda((2, H, CKV), "bfloat16")), TypeError, r"q_nope: expected dtype float16 \(the plan's\)"),
        (dict(q_nope=fake_cuda((2, H, CKV), "float32")), TypeError, r"q_nope: expected dtype float16"),
        (dict(q_pe=fake_cuda((2, 8, KPE))), ValueError, r"q_pe: expected shape \(2, 16, 64\)"),
        (
            dict(q_pe=fake_cuda((2, H, KPE), strides=(H * KPE, KPE, 2))),
            ValueError,
            r"q_pe: the last dimension must be contiguous",
        ),
        (
            dict(q_pe=fake_cuda((2, H, KPE), strides=(H * 68, 68, 1))),
            ValueError,
            r"q_pe: stride of dimension 1 must be a multiple of 8 elements",
        ),
        (dict(ckv_cache=fake_cuda((4, 32, CKV))), ValueError, r"ckv_cache: expected shape \(4, 16, 512\)"),
        (dict(ckv_cache=fake_cuda((4, 16, 256))), ValueError, r"ckv_cache: expected shape \(4, 16, 512\)"),
        (dict(kpe_cache=fake_cuda((5, 16, KPE))), ValueError, r"kpe_cache: expected shape \(4, 16, 64\)"),
        (dict(kpe_cache=fake_cuda((4, 16, KPE), "bfloat16")), TypeError, r"kpe_cache: expected dtype float16"),
        (dict(kv_indices=fake_cuda((4,), "int64")), TypeError, r"kv_indices: expected a 1-D int32 tensor"),
        (
            dict(kv_indices=fake_cuda((2,), "int32")),
            ValueError,
            r"kv_indices: the plan's kv_indptr ends at 3 pages, but kv_indices has 2 entries",
        ),
        (dict(kv_indices=fake_cuda((4,), "int32", strides=(2,))), ValueError, r"kv_indices: expected a contiguous"),
        (dict(out=fake_cuda((2, H, CKV), "bfloat16")), TypeError, r"out: expected dtype float16"),
        (dict(out=fake_cuda((2, H, KPE))), ValueError, r"out: expected shape \(2, 16, 512\)"),
        (
            dict(out=fake_cuda((2, H, CKV), strides=(0, CKV, 1))),
            ValueError,
            r"out: an output's elements must not overlap",
        ),
        (dict(lse=fake_cuda((2, H))), TypeError, r"lse: expected dtype float32, got float16"),
        (dict(lse=fake_cuda((2, H + 1), "float32")), ValueError, r"lse: expected shape \(2, 16\)"),
        (dict(lse=fake_cuda((2, H), "float32", strides=(1, 2))), ValueError, r"lse: expected a contiguous tensor"),
        (
            dict(q_nope=fake_cuda((2, H, CKV), device="cpu")),
            ValueError,
            r"q_nope: expected a CUDA device tensor on cuda:0, got one on cpu",
        ),
        (
            dict(ckv_cache=fake_cuda((4, 16, CKV), device="cuda:1")),
            ValueError,
            r"ckv_cache: expected a tensor on cuda:0 \(the plan's workspace device\), got cuda:1",
        ),
        (dict(out=Tensor.from_pointer(0, (2, H, CKV), "float16", 0)), ValueError, r"out: data pointer is NULL"),
        (
            dict(q_nope=Tensor.from_pointer(8, (2, H, CKV), "float16", 0)),
            ValueError,
            r"q_nope: data pointer 0x8 must be aligned to 16 bytes",
        ),
        (dict(ckv_cache=fake_cuda((4, 16 * CKV))), ValueError, r"ckv_cache: expected shape \(\*, 16, 512\)"),
        (
            dict(ckv_cache=fake_cuda((1 << 19, 16, CKV)), kpe_cache=fake_cuda((1 << 19, 16, KPE))),
            ValueError,
            r"ckv_cache: spans \d+ elements .* the MLA kernels use 32-bit element offsets",
        ),
        (dict(return_lse_base_on_e=2), TypeError, r"return_lse_base_on_e: expected a bool"),
        (dict(ckv_scale=1.0), ValueError, r"ckv_scale: scale factors apply to FP8 KV caches only"),
        (dict(ckv_scale_arr=fake_cuda((64, 4), "float32")), ValueError, r"ckv_scale_arr: scale factors apply to FP8"),
        (dict(stream="default"), TypeError, r"stream"),
    ],
)
def test_bad_run_inputs_are_named_before_the_ffi(make_array, over, exc, pattern):
    plan = fake_plan(make_array)
    args = run_args()
    args.update(over)
    with pytest.raises(exc, match=pattern):
        fi_ffi.batch_mla_run(**args, plan=plan)


def test_run_needs_an_mla_plan(make_array):
    with pytest.raises(TypeError, match="plan: expected an MLAPlan from batch_mla_plan, got Array"):
        fi_ffi.batch_mla_run(**run_args(), plan=make_array(*([0] * 18)))  # type: ignore[arg-type]


def test_a_plans_page_size_is_the_runs(make_array):
    plan = fake_plan(make_array, page_size=1)
    with pytest.raises(ValueError, match=r"ckv_cache: expected shape \(4, 1, 512\)"):
        fi_ffi.batch_mla_run(**run_args(), plan=plan)
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(**run_args(page_size=1), plan=plan)
    assert_reached_the_kernel(info.value)


# ------------------------------------------------------------------------------------------ FlashInfer 0.7.2


# release_072_over_063 (tests/conftest.py): the 0.6.3 test wheels and the 0.7.2 one in one lock.


def test_072_declarations_state_the_planabi2_signatures(release_072_over_063):
    uri = MLA_F16 + "_planabi2"
    assert uri in V.available()[0]
    for pattern, decl in mla.DECLARATIONS:
        if decl.release != "0.7.2":
            continue
        assert re.fullmatch(pattern, uri)
        found = wire.parse_signature(entry_point(uri, decl.entry).signature_text(), decl.entry)
        assert wire.signature_mismatch(decl, found) == ""
        bound_entry(uri, decl)


@pytest.mark.parametrize("decl", [mla.PLAN, mla.RUN], ids=["plan", "run"])
def test_a_063_declaration_offered_the_072_module_is_refused_by_name(release_072_over_063, decl):
    with pytest.raises(LoaderError) as info:
        bound_entry(MLA_F16 + "_planabi2", decl)
    text = str(info.value)
    assert f"entry point '{decl.entry}'" in text and "declared for FlashInfer 0.6.3" in text
    assert ("returns Tuple<Array<int>, int>" in text) if decl is mla.PLAN else ("takes 18 arguments" in text)


def test_a_072_declaration_offered_a_063_module_is_refused_by_name():
    with pytest.raises(LoaderError, match=r"takes 15 arguments, the declaration 18"):
        bound_entry(MLA_F16, mla.RUN_PLANABI2)


@pytest.mark.parametrize("shape", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_072_plan_reaches_the_planabi2_module(release_072_over_063, shape):
    ws = workspace()
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_plan(backend="fa2", stream=0, **{**plan_args(causal=shape is PREFILL), **shape}, workspace=ws)
    assert_reached_the_kernel(info.value)
    assert info.value.function == MLA_F16 + "_planabi2.plan"
    st = mla._settings(ws, H, CKV, KPE, 16, shape is PREFILL, 192**-0.5, "float16", None, "fa2")
    assert st.tuple_result and st.plan.launcher.decl is mla.PLAN_PLANABI2 and st.run.launcher.decl is mla.RUN_PLANABI2


@pytest.mark.parametrize("with_lse", [False, True])
def test_072_run_reaches_the_planabi2_module_with_0_6_3_defaults(release_072_over_063, make_array, with_lse):
    plan = fake_plan(make_array)
    assert plan.uri == MLA_F16 + "_planabi2"
    lse = fake_cuda((2, H), "float32") if with_lse else None
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(lse=lse, **run_args(), plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.function == MLA_F16 + "_planabi2.run"
    # the three 0.7.x arguments went over the wire at their defaults: 1.0, 1.0, None
    assert "1.0, 1.0, None" in str(info.value)


def test_072_lock_serves_modules_only_063_has_from_063(release_072_over_063, make_array):
    bf16 = fake_plan(make_array, dtype="bfloat16")  # 0.7.2 test wheel has only the f16 FA2 MLA module
    fa3 = fake_plan(make_array, backend="fa3")
    assert bf16.uri == MLA_F16.replace("f16", "bf16") and fa3.uri == MLA_F16 + "_sm90"
    assert bf16._s.run.launcher.decl is mla.RUN and not bf16._s.tuple_result


# ------------------------------------------------------------------------------------------ FP8 scale arguments


def fp8_plan(make_array, uri: str) -> mla.MLAPlan:
    """A plan whose caches are FP8 e4m3, on module ``uri`` (neither test wheel has an FP8 MLA module: this only
    drives the argument rules and the packing)."""
    ws = workspace()
    st = mla._Settings(ws.device, H, CKV, KPE, 16, False, 0.1, fi_ffi.float16, fi_ffi.dtypes.float8_e4m3fn, "fa2", uri)
    return mla.MLAPlan(make_array(*([0] * 18)), ws, ws._generation, st, 2, 2, 3)


def fp8_run_args(**over):
    fp8 = "float8_e4m3fn"
    return run_args(ckv_cache=fake_cuda((4, 16, CKV), fp8), kpe_cache=fake_cuda((4, 16, KPE), fp8), **over)


@pytest.mark.parametrize(
    "scales, pattern",
    [
        (dict(kpe_scale=1.0), r"ckv_scale: an FP8 cache needs exactly one of ckv_scale .* or ckv_scale_arr"),
        (dict(ckv_scale=1.0, kpe_scale=1.0, ckv_scale_arr=fake_cuda((64, 4), "float32")), r"ckv_scale: .*exactly one"),
        (dict(ckv_scale=1.0), r"kpe_scale: required with an FP8 cache"),
        (dict(ckv_scale=0.0, kpe_scale=1.0), r"ckv_scale: expected a finite value > 0"),
        (dict(ckv_scale=1.0, kpe_scale=float("nan")), r"kpe_scale: expected a finite value > 0"),
    ],
)
def test_fp8_scale_arguments_follow_flashinfer_rules(make_array, scales, pattern):
    plan = fp8_plan(make_array, MLA_F16)
    with pytest.raises(ValueError, match=pattern):
        fi_ffi.batch_mla_run(**fp8_run_args(), **scales, plan=plan)


def test_scale_arguments_on_a_063_module_are_refused_by_name(make_array):
    plan = fp8_plan(make_array, MLA_F16)  # the 0.6.3 run has no scale arguments
    with pytest.raises(
        ValueError,
        match=r"ckv_scale: not supported by the bound module's entry point .*"
        r"\(FlashInfer 0.6.3\)",
    ):
        fi_ffi.batch_mla_run(ckv_scale=0.5, kpe_scale=0.25, **fp8_run_args(), plan=plan)


def test_072_scale_arguments_reach_the_planabi2_module(release_072_over_063, make_array):
    plan = fp8_plan(make_array, MLA_F16 + "_planabi2")
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(ckv_scale=0.5, kpe_scale=0.25, **fp8_run_args(), plan=plan)
    assert_reached_the_kernel(info.value)
    assert "0.5, 0.25, None" in str(info.value)
    arr = fake_cuda((4 * 16, CKV // 128), "float32")
    with pytest.raises(KernelError) as info:
        fi_ffi.batch_mla_run(ckv_scale_arr=arr, kpe_scale=0.25, **fp8_run_args(), plan=plan)
    assert_reached_the_kernel(info.value)
    assert "1.0, 0.25, DLTensor*(float32[64, 4] cuda:0)" in str(info.value)
    with pytest.raises(ValueError, match=r"ckv_scale_arr: expected float32 with 256 elements"):
        fi_ffi.batch_mla_run(ckv_scale_arr=fake_cuda((16, 4), "float32"), kpe_scale=0.25, **fp8_run_args(), plan=plan)
