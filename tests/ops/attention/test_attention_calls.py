"""Attention ops on the CPU machine, against the real modules of the shared test wheel.

With no GPU, a call whose descriptors claim ``cuda:0`` passes our checks, crosses the FFI, passes the module's
signature check (argument count and every argument's type) and stops at the module's first CUDA call. That
proves our packing matches the real signatures, for every plan and run entry point: FA2 and FA3, ragged and
paged, single prefill and decode, with and without the optional ``ffi.Tensor`` inputs. Runs are packed with a
plan vector of the real length (an ``ffi.Array`` built with the runtime's global): a wrong length would stop at
the module's ``FromVector`` check instead. Invalid arguments must be rejected before the FFI.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.attention_plans import (
    DECODE_SETTINGS,
    DECODE_URI,
    F16_128,
    PREFILL_SETTINGS,
    PREFILL_URI,
    assert_declaration_matches,
    assert_reached_the_kernel,
    decode_plan,
    decode_run_args,
    host,
    paged,
    paged_run_args,
    prefill_plan,
    ragged_run_args,
    workspace,
)
from helpers.fakes import fake_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fi_ffi.errors import KernelError, KernelNotFoundError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.ops.attention import decode, prefill
from fi_ffi.ops.attention import variants as V
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.usefixtures("kernel_modules", "fake_device_only")

FA3_URI = PREFILL_URI + "_sm90"
SINGLE_DECODE_URI = (
    f"single_decode_with_kv_cache_{F16_128}_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False"
)
SINGLE_PREFILL_URI = (
    f"single_prefill_with_kv_cache_{F16_128}_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_"
    "use_logits_cap_False_f16qk_False"
)


@pytest.mark.parametrize(
    ("uri", "decl"),
    [
        *((DECODE_URI, d) for d in (decode.PLAN, decode.RUN)),
        (SINGLE_DECODE_URI, decode.SINGLE),
        (SINGLE_PREFILL_URI, prefill.SINGLE),
        *((PREFILL_URI, d) for d in (prefill.FA2_PLAN, prefill.FA2_RAGGED, prefill.FA2_PAGED)),
        *((FA3_URI, d) for d in (prefill.FA3_PLAN, prefill.FA3_RAGGED, prefill.FA3_PAGED)),
    ],
)
def test_declarations_match_the_module_signature(uri, decl):
    assert_declaration_matches(uri, decl)


def test_every_attention_module_of_the_wheel_exports_its_entry_points():
    for v in V.available()[1]:
        for name in V.ENTRY_POINTS[v.kind]:
            assert entry_point(v.uri, name).signature_text().startswith("Mismatched number of arguments")


# ------------------------------------------------------------------------------------------ fakes


# ------------------------------------------------------------------------------------------ plans reach the module


def test_batch_decode_plan_reaches_the_module():
    ws = workspace()
    with pytest.raises(KernelError) as info:
        decode.batch_decode_plan(host([0, 2, 3]), None, host([5, 16]), 32, 8, 128, 16, stream=0, workspace=ws)
    assert_reached_the_kernel(info.value)
    assert info.value.function.endswith(".plan")
    assert ws._generation == 1 and not ws._event_pending  # a failed plan records no copy event


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_batch_prefill_plans_reach_the_module(backend, mode):
    ws = workspace()
    with pytest.raises(KernelError) as info:
        if mode == "ragged":
            prefill.batch_prefill_ragged_plan(
                host([0, 3, 4]), host([0, 5, 9]), 32, 8, 128, causal=True, backend=backend, stream=0, workspace=ws
            )
        else:
            prefill.batch_prefill_paged_plan(
                host([0, 3, 4]), host([0, 1, 3]), None, host([5, 4]), 32, 8, 128, 16, backend=backend, workspace=ws
            )
    assert_reached_the_kernel(info.value)
    assert (".plan" in info.value.function) and (("_sm90" in info.value.function) == (backend == "fa3"))


# ------------------------------------------------------------------------------------------ runs reach the module


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_batch_decode_run_reaches_the_module(make_array, layout):
    plan = decode_plan(make_array, kv_layout=layout)
    args = decode_run_args(layout=layout)
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(args), lse=fake_cuda((2, 32), "float32"), enable_pdl=True, plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.arguments[2] == "Array" and info.value.arguments[13] == "True"
    # the plan is reusable: the same call again (memoized validation) packs the same frame
    with pytest.raises(KernelError) as again:
        decode.batch_decode_run(**paged(args), lse=None, plan=plan)
    assert_reached_the_kernel(again.value)
    assert again.value.arguments[10] == "None"


def test_a_plan_vector_of_the_wrong_length_stops_at_from_vector(make_array):
    """The control for the runs below: the module parses the plan before touching CUDA."""
    plan = decode_plan(make_array, info_len=15)
    with pytest.raises(KernelError, match="should be 10"):
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_batch_prefill_ragged_run_reaches_the_module(make_array, backend):
    plan = prefill_plan(make_array, "ragged", backend, causal=True)
    assert plan.backend == backend and plan.mask_mode == 1
    with pytest.raises(KernelError) as info:
        prefill.batch_prefill_ragged_run(**ragged_run_args(), lse=fake_cuda((4, 32), "float32"), plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.function.endswith("ragged_run")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_batch_prefill_paged_run_reaches_the_module(make_array, backend, layout):
    plan = prefill_plan(make_array, "paged", backend, kv_layout=layout)
    cache = (4, 16, 8, 128) if layout == "NHD" else (4, 8, 16, 128)
    with pytest.raises(KernelError) as info:
        prefill.batch_prefill_paged_run(**paged_run_args(cache), plan=plan)
    assert_reached_the_kernel(info.value)


def test_custom_mask_goes_in_as_tensor_objects(make_array):
    packed, mask_indptr = prefill.pack_custom_mask([np.ones((3, 5), bool), np.tril(np.ones((1, 4), bool))])
    assert packed.dtype == np.uint8 and mask_indptr.tolist() == [0, 2, 3]
    mask, mind = fake_cuda(packed.shape, "uint8"), fake_cuda((3,), "int32")
    plan = prefill_plan(make_array, "ragged", "auto", custom_mask=mask, mask_indptr=mind)
    assert plan.backend == "fa2" and plan.mask_mode == 2
    with pytest.raises(KernelError) as info:
        prefill.batch_prefill_ragged_run(**ragged_run_args(), plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.arguments[14] == "Tensor" and info.value.arguments[15] == "Tensor"
    # the same mask packed as a plain DLTensor* (what flashinfer-rs does) is refused by the module
    ep = entry_point(PREFILL_URI, "ragged_run")
    with pytest.raises(KernelError) as bad:
        ep(
            fake_cuda((8,), "uint8"),
            fake_cuda((8,), "uint8"),
            make_array(*([0] * 15)),
            fake_cuda((4, 32, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((3,), "int32"),
            fake_cuda((3,), "int32"),
            fake_cuda((4, 32, 128)),
            None,
            2,
            0,
            -1,
            False,
            mask,
            mind,
            None,
            None,
            None,
            None,
            0.0,
            0.1,
            1.0,
            1e-4,
            0,
        )
    assert bad.value.kind == "TypeError" and "Optional<ffi.Tensor>" in bad.value.message


def test_single_decode_reaches_the_module():
    with pytest.raises(KernelError) as info:
        decode.single_decode(
            fake_cuda((32, 128)),
            fake_cuda((100, 8, 128)),
            fake_cuda((100, 8, 128)),
            out=fake_cuda((32, 128)),
            lse=fake_cuda((32,), "float32"),
        )
    assert_reached_the_kernel(info.value)
    with pytest.raises(KernelError) as info:
        decode.single_decode(
            fake_cuda((32, 128)),
            fake_cuda((8, 300, 128)),
            fake_cuda((8, 300, 128)),
            out=fake_cuda((32, 128)),
            kv_layout="HND",
            tmp=fake_cuda((32 << 20,), "uint8"),
        )
    assert_reached_the_kernel(info.value)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_prefill_reaches_the_module_with_and_without_custom_mask(layout):
    k = fake_cuda((9, 8, 128) if layout == "NHD" else (8, 9, 128))
    mask = fake_cuda((5,), "uint8")  # ceil(4 * 9 / 8) bytes
    with pytest.raises(KernelError) as info:
        prefill.single_prefill(
            fake_cuda((4, 32, 128)), k, k, out=fake_cuda((4, 32, 128)), kv_layout=layout, packed_custom_mask=mask
        )
    assert_reached_the_kernel(info.value)
    assert info.value.arguments[9] == "Tensor" and info.value.arguments[6] == "2"
    with pytest.raises(KernelError) as info:
        prefill.single_prefill(
            fake_cuda((4, 32, 128)),
            k,
            k,
            out=fake_cuda((4, 32, 128)),
            kv_layout=layout,
            causal=True,
            lse=fake_cuda((4, 32), "float32"),
            sm_scale=0.5,
            rope_scale=2.0,
            rope_theta=5e5,
        )
    assert_reached_the_kernel(info.value)
    assert info.value.arguments[6] == "1" and info.value.arguments[9] == "None"
    assert info.value.arguments[12:15] == ("0.5", "0.5", "2e-06")  # sm_scale, 1/rope_scale, 1/rope_theta


def test_defaults_on_the_wire(make_array):
    plan = decode_plan(make_array)
    assert plan.sm_scale == pytest.approx(128**-0.5)
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)
    assert info.value.arguments[11:] == ("0", "-1", "False", "None", "0.0", repr(128**-0.5), "1.0", "0.0001")


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("over", "exc", "text"),
    [
        (dict(q=fake_cuda((2, 32, 64))), ValueError, r"q: expected shape \[2, 32, 128\]"),
        (dict(q=fake_cuda((3, 32, 128))), ValueError, "q: expected shape"),
        (dict(q=fake_cuda((2, 32, 128), "bfloat16")), TypeError, "q: expected dtype float16"),
        (dict(q=fake_cuda((2, 32, 128), device="cuda:1")), ValueError, "q: expected a tensor on cuda:0"),
        (dict(q=fake_cuda((2, 32, 128), device="cpu")), ValueError, "q: expected a CUDA device tensor"),
        (dict(q=fake_cuda((2, 32, 128), strides=(4096, 128, 2))), ValueError, "q: the last dimension"),
        (dict(q=fake_cuda((2, 32, 128), strides=(4100, 128, 1))), ValueError, "q: stride of dimension 0"),
        (dict(k_cache=fake_cuda((4, 8, 16, 128))), ValueError, r"k_cache: expected shape \[\*, 16, 8, 128\]"),
        (dict(v_cache=fake_cuda((5, 16, 8, 128))), ValueError, "v_cache: expected 4 pages"),
        (dict(v_cache=fake_cuda((4, 16, 8, 128), strides=(16384 * 2, 1024, 128, 1))), ValueError, "identical|strides"),
        (dict(kv_indptr=fake_cuda((3,), "int64")), TypeError, "kv_indptr: expected dtype int32"),
        (dict(kv_indptr=fake_cuda((4,), "int32")), ValueError, "kv_indptr: expected 3 entries"),
        (dict(kv_indices=fake_cuda((2,), "int32")), ValueError, "kv_indices: the plan's kv_indptr ends at 3 pages"),
        (dict(kv_indices=fake_cuda((4,), "int32", device="cpu")), ValueError, "kv_indices: expected a device tensor"),
        (dict(kv_last_page_len=fake_cuda((3,), "int32")), ValueError, "kv_last_page_len: expected 2 entries"),
        (dict(out=fake_cuda((2, 32, 128), strides=(8192, 256, 1))), ValueError, "out: expected a contiguous"),
        (dict(out=fake_cuda((2, 32, 128), "bfloat16")), TypeError, "out: expected dtype float16"),
    ],
)
def test_batch_decode_run_rejects_before_the_ffi(make_array, over, exc, text):
    plan = decode_plan(make_array)
    with pytest.raises(exc, match=text):
        decode.batch_decode_run(**paged(decode_run_args(**over)), plan=plan)


def test_batch_decode_run_names_a_kv_indices_of_rank_0(make_array):
    plan = decode_plan(make_array)
    with pytest.raises(ValueError, match=r"kv_indices: expected at least 1 dimensions, got shape \(\)"):
        decode.batch_decode_run(**paged(decode_run_args(kv_indices=fake_cuda((), "int32"))), plan=plan)
    with pytest.raises(ValueError, match=r"kv_indices: expected a 1-D int32 tensor, got shape \(4, 1\)"):
        decode.batch_decode_run(**paged(decode_run_args(kv_indices=fake_cuda((4, 1), "int32"))), plan=plan)


def test_batch_decode_run_refuses_strides_its_kernel_truncates(make_array):
    plan = decode_plan(make_array)
    q = fake_cuda((2, 32, 128), strides=(1 << 31, 128, 1))  # BatchDecodeParams: int32 q strides
    with pytest.raises(ValueError, match=r"q: the decode kernel takes q's strides as int32"):
        decode.batch_decode_run(**paged(decode_run_args(q=q)), plan=plan)
    cache = fake_cuda((4, 16, 8, 128), strides=(1 << 32, 1024, 128, 1))  # paged_kv_t: uint32 strides
    with pytest.raises(ValueError, match=r"k_cache: the kernel takes 32-bit strides"):
        decode.batch_decode_run(**paged(decode_run_args(k_cache=cache, v_cache=cache)), plan=plan)
    # the largest int32 stride that keeps 16 bytes; its 4 GiB footprint at an address of its own (never read: no
    # GPU), so that it overlaps no other argument's memory
    q = Tensor.from_pointer(1 << 40, (2, 32, 128), "float16", "cuda:0", ((1 << 31) - 8, 128, 1))
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(decode_run_args(q=q)), plan=plan)
    assert_reached_the_kernel(info.value)


def test_batch_decode_run_lse_and_flags(make_array):
    plan = decode_plan(make_array)
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 32\)"):
        decode.batch_decode_run(**paged(decode_run_args()), lse=fake_cuda((2, 8), "float32"), plan=plan)
    with pytest.raises(TypeError, match="lse: expected dtype float32"):
        decode.batch_decode_run(**paged(decode_run_args()), lse=fake_cuda((2, 32), "float16"), plan=plan)
    with pytest.raises(TypeError, match="enable_pdl"):
        decode.batch_decode_run(**paged(decode_run_args()), enable_pdl="yes", plan=plan)
    with pytest.raises(TypeError, match="plan: expected a Plan"):
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan.info)


def test_plan_state_is_checked_at_run(make_array):
    ws = workspace()
    plan = decode_plan(make_array, ws=ws)
    args = decode_run_args()
    later = decode_plan(make_array, ws=ws)
    ws._generation += 1  # what call_plan does for `later`
    later._generation = ws._generation
    with pytest.raises(ValueError, match="stale"):
        decode.batch_decode_run(**paged(args), plan=plan)
    with pytest.raises(KernelError):
        decode.batch_decode_run(**paged(args), plan=later)
    later.release()
    with pytest.raises(ValueError, match="released"):
        decode.batch_decode_run(**paged(args), plan=later)
    prefill_p = prefill_plan(make_array, "paged", ws=ws)
    with pytest.raises(ValueError, match="expected a batch_decode plan"):
        decode.batch_decode_run(**paged(args), plan=prefill_p)
    ragged = prefill_plan(make_array, "ragged", ws=ws)
    with pytest.raises(ValueError, match="expected a batch_prefill plan for paged KV"):
        prefill.batch_prefill_paged_run(**paged_run_args(), plan=ragged)


def test_plan_carries_layout_and_dtype_of_the_cache(make_array):
    plan = decode_plan(make_array, kv_layout="HND")
    with pytest.raises(ValueError, match=r"k_cache: expected shape \[\*, 8, 16, 128\] \(HND"):
        decode.batch_decode_run(**paged(decode_run_args(layout="NHD")), plan=plan)
    plan = decode_plan(make_array, q_dtype="bfloat16")
    with pytest.raises(TypeError, match="q: expected dtype bfloat16"):
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)
    plan = decode_plan(make_array, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"k_cache: expected shape \[\*, 16, 4, 128\]"):
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(num_qo_heads=40), ValueError, "GQA group sizes 1, 2, 3, 4 and 8"),
        (dict(num_qo_heads=30), ValueError, "multiple of num_kv_heads"),
        (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
        (dict(page_size=0), ValueError, "page_size"),
        (dict(indptr=host([1, 2, 3])), ValueError, "indptr: must start at 0"),
        (dict(indptr=host([0, 3, 2])), ValueError, "indptr: must be non-decreasing"),
        (dict(indptr=np.array([0, 2, 3], np.int64)), TypeError, "indptr: expected dtype int32"),
        (dict(last_page_len=host([0, 16])), ValueError, "last_page_len: request 0 has 2 page"),
        (dict(last_page_len=host([5, 17])), ValueError, "last_page_len: request 1"),
        (dict(kv_layout="NDH"), ValueError, "kv_layout"),
        (dict(window_left=-2), ValueError, "window_left"),
        (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
        (dict(sm_scale=float("nan")), ValueError, "sm_scale"),
        (dict(rope_theta=0.0), ValueError, "rope_theta"),
        (dict(pos_encoding_mode="XPOS"), ValueError, "pos_encoding_mode"),
        (
            dict(q_data_type="float32"),
            TypeError,
            "q_data_type: no FlashInfer attention module exists for dtype float32",
        ),
        (dict(head_dim=256), KernelNotFoundError, "head_dim_qk_256"),
        (dict(window_left=128), KernelNotFoundError, "use_swa_True"),
        (dict(logits_soft_cap=30.0), KernelNotFoundError, "use_logits_cap_True"),
        (dict(pos_encoding_mode="ALIBI"), ValueError, "alibi_slopes: required"),
        (dict(alibi_slopes=fake_cuda((32,), "float32")), ValueError, "alibi_slopes: only used with"),
        (dict(enable_cuda_graph="no"), TypeError, "enable_cuda_graph"),
    ],
)
def test_batch_decode_plan_rejects_before_the_ffi(kw, exc, text):
    args = dict(
        indptr=host([0, 2, 3]),
        indices=None,
        last_page_len=None,
        num_qo_heads=32,
        num_kv_heads=8,
        head_dim=128,
        page_size=16,
    )
    args.update((k, kw.pop(k)) for k in list(kw) if k in args)
    ws = workspace()
    with pytest.raises(exc, match=text):
        decode.batch_decode_plan(**args, **kw, workspace=ws)
    assert ws._generation == 0  # nothing crossed the FFI


def test_plan_needs_a_workspace():
    with pytest.raises(TypeError, match=r"workspace: expected a fi_ffi\.Workspace \("):
        decode.batch_decode_plan(host([0, 1]), None, None, 32, 8, 128, 16, workspace=object())


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(packed_custom_mask=fake_cuda((4,), "uint8")), ValueError, "pass both"),
        (
            dict(packed_custom_mask=fake_cuda((4,), "uint8"), mask_indptr=fake_cuda((3,), "int32"), causal=True),
            ValueError,
            "causal",
        ),
        (
            dict(packed_custom_mask=fake_cuda((2,), "uint8"), mask_indptr=fake_cuda((3,), "int32")),
            ValueError,
            "packed_custom_mask: expected at least 3 bytes",
        ),
        (
            dict(packed_custom_mask=fake_cuda((3,), "uint8"), mask_indptr=fake_cuda((3,), "int64")),
            TypeError,
            "mask_indptr: expected dtype int32",
        ),
        (
            dict(packed_custom_mask=fake_cuda((3,), "uint8"), mask_indptr=fake_cuda((3,), "int32"), backend="fa3"),
            ValueError,
            "custom mask",
        ),
        (dict(kv_layout="HND", backend="fa3"), ValueError, "NHD only"),
        (dict(kv_indptr=host([0, 5])), ValueError, "kv_indptr: expected 3 entries"),
        (dict(num_qo_heads=12), ValueError, "multiple of num_kv_heads"),
        (dict(max_total_num_rows=8), ValueError, "enable_cuda_graph"),
        (dict(max_total_num_rows=2, enable_cuda_graph=True), ValueError, "max_total_num_rows: must be >= qo_indptr"),
        (dict(backend="fa5"), ValueError, "backend"),
        (dict(head_dim_qk=64, backend="fa3"), KernelNotFoundError, "_sm90"),
        (dict(use_fp16_qk_reduction=True), KernelNotFoundError, "f16qk_True"),
    ],
)
def test_batch_prefill_ragged_plan_rejects_before_the_ffi(kw, exc, text):
    args = dict(qo_indptr=host([0, 3, 4]), kv_indptr=host([0, 5, 9]), num_qo_heads=32, num_kv_heads=8, head_dim_qk=128)
    args.update((k, kw.pop(k)) for k in list(kw) if k in args)
    ws = workspace()
    with pytest.raises(exc, match=text):
        prefill.batch_prefill_ragged_plan(**args, **kw, workspace=ws)
    assert ws._generation == 0


def test_batch_prefill_paged_plan_needs_last_page_len_and_checks_it():
    ws = workspace()
    with pytest.raises(ValueError, match="kv_last_page_len: request 1 has 2 page"):
        prefill.batch_prefill_paged_plan(
            host([0, 3, 4]), host([0, 1, 3]), None, host([5, 17]), 32, 8, 128, 16, workspace=ws
        )
    with pytest.raises(ValueError, match="kv_last_page_len: expected 2 entries"):
        prefill.batch_prefill_paged_plan(
            host([0, 3, 4]), host([0, 1, 3]), None, host([5]), 32, 8, 128, 16, workspace=ws
        )


def test_prefill_run_checks_rows_and_extent(make_array):
    plan = prefill_plan(make_array, "ragged")
    with pytest.raises(ValueError, match="q: the plan's qo_indptr ends at 4 rows"):
        prefill.batch_prefill_ragged_run(
            fake_cuda((3, 32, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((9, 8, 128)),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            out=fake_cuda((3, 32, 128)),
            plan=plan,
        )
    with pytest.raises(ValueError, match="k: the plan's kv_indptr ends at 9 tokens"):
        prefill.batch_prefill_ragged_run(
            fake_cuda((4, 32, 128)),
            fake_cuda((8, 8, 128)),
            fake_cuda((8, 8, 128)),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            out=fake_cuda((4, 32, 128)),
            plan=plan,
        )
    with pytest.raises(ValueError, match=r"v: expected shape \[9, 8, 128\]"):
        prefill.batch_prefill_ragged_run(
            fake_cuda((4, 32, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((9, 4, 128)),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            out=fake_cuda((4, 32, 128)),
            plan=plan,
        )


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(q=fake_cuda((32, 128, 1))), ValueError, "q: expected a 2-D"),
        (dict(q=fake_cuda((32, 128), strides=(256, 1))), ValueError, "q: expected a contiguous"),
        (dict(k=fake_cuda((100, 6, 128)), v=fake_cuda((100, 6, 128))), ValueError, "multiple of num_kv_heads"),
        (
            dict(
                k=fake_cuda((100, 5, 128)), v=fake_cuda((100, 5, 128)), q=fake_cuda((25, 128)), out=fake_cuda((25, 128))
            ),
            ValueError,
            "GQA group sizes",
        ),
        (dict(v=fake_cuda((100, 8, 128), "bfloat16")), TypeError, "v: expected dtype float16"),
        (dict(v=fake_cuda((101, 8, 128))), ValueError, "v: expected shape"),
        (dict(out=fake_cuda((32, 64))), ValueError, "out: expected shape"),
        (dict(lse=fake_cuda((32, 1), "float32")), ValueError, r"lse: expected shape \(32,\)"),
        (dict(tmp=fake_cuda((16, 16), "uint8")), ValueError, "tmp: expected a contiguous 1-D"),
        (dict(kv_layout="XYZ"), ValueError, "kv_layout"),
        (dict(window_left=-5), ValueError, "window_left"),
    ],
)
def test_single_decode_rejects_before_the_ffi(kw, exc, text):
    args = dict(
        q=fake_cuda((32, 128)), k=fake_cuda((100, 8, 128)), v=fake_cuda((100, 8, 128)), out=fake_cuda((32, 128))
    )
    args.update((k, kw.pop(k)) for k in list(kw) if k in args)
    with pytest.raises(exc, match=text):
        decode.single_decode(**args, **kw)


def test_single_prefill_rejects_before_the_ffi():
    q, k, o = fake_cuda((4, 32, 128)), fake_cuda((9, 8, 128)), fake_cuda((4, 32, 128))
    with pytest.raises(ValueError, match="custom_mask: expected at least 5 bytes"):
        prefill.single_prefill(q, k, k, out=o, packed_custom_mask=fake_cuda((4,), "uint8"))
    with pytest.raises(ValueError, match="causal"):
        prefill.single_prefill(q, k, k, out=o, packed_custom_mask=fake_cuda((5,), "uint8"), causal=True)
    with pytest.raises(ValueError, match="q: expected a 3-D"):
        prefill.single_prefill(fake_cuda((4, 32)), k, k, out=o)
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 32, 64\]"):
        prefill.single_prefill(q, k, fake_cuda((9, 8, 64)), out=o)
    with pytest.raises(KernelNotFoundError, match="head_dim_vo_64"):
        prefill.single_prefill(q, k, fake_cuda((9, 8, 64)), out=fake_cuda((4, 32, 64)))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    batch=st.integers(1, 6),
    hq_mult=st.sampled_from([1, 2, 3, 4, 8]),
    hk=st.integers(1, 4),
    page=st.sampled_from([1, 16, 64]),
    layout=st.sampled_from(["NHD", "HND"]),
    data=st.data(),
)
def test_batch_decode_run_accepts_exactly_the_planned_shapes(make_array, batch, hq_mult, hk, page, layout, data):
    pages = data.draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))
    indptr = host(np.concatenate([[0], np.cumsum(pages)]))
    hq = hk * hq_mult
    plan = decode_plan(make_array, kv_indptr=indptr, num_qo_heads=hq, num_kv_heads=hk, page_size=page, kv_layout=layout)
    total = max(int(indptr[-1]), 1)
    good = decode_run_args(batch=batch, hq=hq, hk=hk, page=page, pages=total, layout=layout)
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(good), plan=plan)
    assert_reached_the_kernel(info.value)
    # perturb one dimension of one tensor: always rejected before the FFI
    name = data.draw(st.sampled_from(["q", "k_cache", "v_cache", "out", "kv_indptr", "kv_last_page_len"]))
    t = good[name]
    dim = data.draw(st.integers(0, t.ndim - 1))
    if name in ("k_cache", "v_cache") and dim == 0:
        dim = 1
    shape = list(t.shape)
    shape[dim] += data.draw(st.sampled_from([-1, 1])) if shape[dim] > 1 else 1
    bad = dict(good, **{name: fake_cuda(tuple(shape), t.dtype.name)})
    with pytest.raises(ValueError, match=f"^{name}: "):
        decode.batch_decode_run(**paged(bad), plan=plan)


def test_plan_settings_are_one_value_per_argument_values_and_types():
    ws = workspace()
    first = decode._settings(0, tuple(DECODE_SETTINGS.values()))
    again = decode._settings(0, tuple(DECODE_SETTINGS.values()))
    assert first is not again and first == again and hash(first) == hash(again)  # a value, not an identity
    assert {first: 1}[again] == 1
    with pytest.raises(AttributeError, match="cannot assign to field .page_size."):
        first.page_size = 4
    other = decode._settings(0, tuple({**DECODE_SETTINGS, "kv_layout": "HND"}.values()))
    assert other != first and other.kv_layout == "HND" and other.layout_code == 1
    # the plan's cache: one settings object per argument values *and types*, no workspace in the key
    a = _plan_settings_of(ws)
    assert _plan_settings_of(workspace()) is a
    with pytest.raises(TypeError, match="window_left"):
        decode.batch_decode_plan(
            host([0, 2, 3]), None, None, 32, 8, 128, 16, window_left=-1.0, workspace=ws
        )  # == -1, but a float
    ragged = prefill._settings("ragged", 0, tuple({**PREFILL_SETTINGS, "causal": True}.values()))
    assert ragged.mask_mode == 1 and ragged.backend == "fa2"


def _plan_settings_of(ws):
    """The settings object batch_decode_plan used (the call itself stops at the missing GPU)."""
    from fi_ffi.ops.attention import plan_settings

    before = dict(plan_settings._cache)
    with pytest.raises(KernelError):
        decode.batch_decode_plan(host([0, 2, 3]), None, None, 32, 8, 128, 16, workspace=ws)
    found = [v for k, v in plan_settings._cache.items() if k not in before or before[k] is v]
    assert found
    return next(
        v
        for v in found
        if v.kind == "batch_decode"
        and v.num_qo_heads == 32
        and v.kv_layout == "NHD"
        and v.window_left == -1
        and v.logits_soft_cap == 0.0
        and v.dtype_kv.name == "float16"
    )


# ------------------------------------------------------------------------------------------ any producer, nothing kept


class UnhashableCAI:
    """A device array that speaks only the CUDA array interface and cannot be hashed (like CuPy arrays)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape, typestr="<f2"):
        itemsize = int(typestr[2:])
        self._host = np.zeros(max(1, int(np.prod(shape))) * itemsize + 64, np.uint8)
        ptr = (self._host.ctypes.data + 15) // 16 * 16
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }

    def __eq__(self, other):
        return self is other


def _no_driver():
    from fi_ffi.cuda import driver

    if driver.load() is not None:
        pytest.skip("a CUDA driver is present: a CAI pointer's device would be asked from it")


def test_unhashable_producers_reach_every_attention_module(make_array):
    _no_driver()
    u = UnhashableCAI
    with pytest.raises(TypeError):
        hash(u((1,)))
    with pytest.raises(KernelError) as info:
        decode.single_decode(u((32, 128)), u((100, 8, 128)), u((100, 8, 128)), out=u((32, 128)))
    assert_reached_the_kernel(info.value)
    with pytest.raises(KernelError) as info:
        prefill.single_prefill(
            u((4, 32, 128)), u((9, 8, 128)), u((9, 8, 128)), out=u((4, 32, 128)), packed_custom_mask=u((5,), "|u1")
        )
    assert_reached_the_kernel(info.value)
    plan = decode_plan(make_array)
    args = dict(
        q=u((2, 32, 128)),
        k_cache=u((4, 16, 8, 128)),
        v_cache=u((4, 16, 8, 128)),
        kv_indptr=u((3,), "<i4"),
        kv_indices=u((4,), "<i4"),
        kv_last_page_len=u((2,), "<i4"),
        out=u((2, 32, 128)),
    )
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(args), lse=u((2, 32), "<f4"), plan=plan)
    assert_reached_the_kernel(info.value)
    for backend in ("fa2", "fa3"):
        ragged = prefill_plan(make_array, "ragged", backend)
        with pytest.raises(KernelError) as info:
            prefill.batch_prefill_ragged_run(
                u((4, 32, 128)),
                u((9, 8, 128)),
                u((9, 8, 128)),
                qo_indptr=u((3,), "<i4"),
                kv_indptr=u((3,), "<i4"),
                out=u((4, 32, 128)),
                plan=ragged,
            )
        assert_reached_the_kernel(info.value)
        paged_plan = prefill_plan(make_array, "paged", backend)
        with pytest.raises(KernelError) as info:
            prefill.batch_prefill_paged_run(
                u((4, 32, 128)),
                (u((4, 16, 8, 128)), u((4, 16, 8, 128))),
                qo_indptr=u((3,), "<i4"),
                kv_indptr=u((3,), "<i4"),
                kv_indices=u((3,), "<i4"),
                kv_last_page_len=u((2,), "<i4"),
                out=u((4, 32, 128)),
                plan=paged_plan,
            )
        assert_reached_the_kernel(info.value)


def test_plans_take_numpy_arrays_and_lists_and_name_a_list_where_an_int_belongs():
    ws = workspace()
    for indptr in (np.array([0, 2, 3], np.int32), [0, 2, 3], (0, 2, 3)):
        with pytest.raises(KernelError) as info:
            decode.batch_decode_plan(indptr, None, [5, 16], 32, 8, 128, 16, workspace=ws)
        assert_reached_the_kernel(info.value)
    with pytest.raises(TypeError, match=r"^num_qo_heads: expected an int, got list"):
        decode.batch_decode_plan([0, 2, 3], None, None, [32], 8, 128, 16, workspace=ws)
    with pytest.raises(TypeError, match=r"^page_size: expected an int, got list"):
        prefill.batch_prefill_paged_plan([0, 3, 4], [0, 1, 3], None, [5, 4], 32, 8, 128, [16], workspace=ws)
    with pytest.raises(TypeError, match=r"^window_left: expected an int, got ndarray"):
        prefill.batch_prefill_ragged_plan([0, 3, 4], [0, 5, 9], 32, 8, 128, window_left=np.zeros(2, int), workspace=ws)


def test_a_decode_loop_with_per_layer_caches_replanned_every_step_stays_on_the_fast_path(make_array):
    ws = workspace()
    layers = [decode_run_args() for _ in range(32)]  # a cache per layer: same layout, other memory
    run = decode_plan(make_array, ws=ws)._s.run
    slow = []
    for step in range(4):
        plan = decode_plan(make_array, ws=ws, kv_indptr=host([0, 2, 3 + step % 2]))  # new plan, new extent
        for layer in layers:
            with pytest.raises(KernelError) as info:
                decode.batch_decode_run(**paged(layer), plan=plan)
            assert_reached_the_kernel(info.value)
        slow.append(run.launcher.slow_calls)
        plan.release()
    assert slow[1] == slow[2] == slow[3], slow  # from the second step on, no call is validated again


def test_run_inputs_are_passed_per_call_and_not_kept(make_array):
    """A custom mask given to a plan is referenced by the plan only, and reaches every run as a TVM-FFI Tensor
    made for the call and released right after (no object left alive)."""
    import gc
    import weakref

    from fi_ffi.abi.objects import _managed
    from fi_ffi.ops.attention import plan_settings

    _no_driver()
    mask, offsets = UnhashableCAI((3,), "|u1"), UnhashableCAI((3,), "<i4")
    plan = prefill_plan(make_array, "ragged", "auto", custom_mask=mask, mask_indptr=offsets)
    before = len(_managed.alive)
    for _ in range(200):
        with pytest.raises(KernelError) as info:
            prefill.batch_prefill_ragged_run(**ragged_run_args(), plan=plan)
        assert info.value.arguments[14] == "Tensor" and info.value.arguments[15] == "Tensor"
    assert len(_managed.alive) == before  # every object made for a run was released
    assert all(mask is not v and offsets is not v for v in plan_settings._cache.values())
    refs = [weakref.ref(mask), weakref.ref(offsets)]
    plan.release()
    del mask, offsets, info
    gc.collect()
    assert [r() for r in refs] == [None, None]  # nothing fi_ffi keeps holds the caller's tensors


def test_100k_runs_with_a_custom_mask_grow_neither_rss_nor_objects(make_array):
    """10**5 runs whose custom mask travels as TVM-FFI Tensor objects (made and released per call; each
    run here stops at the module's device check) leave no object alive and no memory behind."""
    import contextlib
    import gc
    import resource

    from fi_ffi.abi.objects import _managed

    _no_driver()
    mask, offsets = UnhashableCAI((3,), "|u1"), UnhashableCAI((3,), "<i4")
    plan = prefill_plan(make_array, "ragged", "fa2", custom_mask=mask, mask_indptr=offsets)
    args = (
        fake_cuda((4, 32, 128)),
        fake_cuda((9, 8, 128)),
        fake_cuda((9, 8, 128)),
        fake_cuda((3,), "int32"),
        fake_cuda((3,), "int32"),
        fake_cuda((4, 32, 128)),
    )

    def runs(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(KernelError):
                prefill.batch_prefill_ragged_run(
                    *args[:3], qo_indptr=args[3], kv_indptr=args[4], out=args[5], plan=plan
                )

    runs(2000)  # warm: layouts validated, frames made
    gc.collect()
    alive, objects = len(_managed.alive), len(gc.get_objects())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs(100_000)
    gc.collect()
    assert len(_managed.alive) == alive
    assert len(gc.get_objects()) - objects < 1000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 16 * 1024  # KiB
    plan.release()


# ------------------------------------------------------------------------------------------ bad input is named


def test_none_tensors_in_the_prefill_runs_are_named(make_array):
    for backend in ("fa2", "fa3"):
        ragged = prefill_plan(make_array, "ragged", backend)
        with pytest.raises(TypeError, match=r"^k: expected a tensor, got None"):
            prefill.batch_prefill_ragged_run(
                fake_cuda((4, 32, 128)),
                None,
                fake_cuda((9, 8, 128)),
                qo_indptr=fake_cuda((3,), "int32"),
                kv_indptr=fake_cuda((3,), "int32"),
                out=fake_cuda((4, 32, 128)),
                plan=ragged,
            )
        with pytest.raises(TypeError, match=r"^q: expected a tensor, got None"):
            prefill.batch_prefill_ragged_run(
                None,
                fake_cuda((9, 8, 128)),
                fake_cuda((9, 8, 128)),
                qo_indptr=fake_cuda((3,), "int32"),
                kv_indptr=fake_cuda((3,), "int32"),
                out=fake_cuda((4, 32, 128)),
                plan=ragged,
            )
        paged_plan = prefill_plan(make_array, "paged", backend)
        with pytest.raises(TypeError, match=r"^kv_indices: expected a tensor, got None"):
            prefill.batch_prefill_paged_run(
                fake_cuda((4, 32, 128)),
                (fake_cuda((4, 16, 8, 128)), fake_cuda((4, 16, 8, 128))),
                qo_indptr=fake_cuda((3,), "int32"),
                kv_indptr=fake_cuda((3,), "int32"),
                kv_indices=None,
                kv_last_page_len=fake_cuda((2,), "int32"),
                out=fake_cuda((4, 32, 128)),
                plan=paged_plan,
            )
        with pytest.raises(TypeError, match=r"^out: expected a tensor, got None"):
            prefill.batch_prefill_paged_run(
                fake_cuda((4, 32, 128)),
                (fake_cuda((4, 16, 8, 128)), fake_cuda((4, 16, 8, 128))),
                qo_indptr=fake_cuda((3,), "int32"),
                kv_indptr=fake_cuda((3,), "int32"),
                kv_indices=fake_cuda((3,), "int32"),
                kv_last_page_len=fake_cuda((2,), "int32"),
                out=None,
                plan=paged_plan,
            )
    with pytest.raises(TypeError, match=r"^kv_indptr: expected a tensor, got None"):
        decode.batch_decode_run(**paged(decode_run_args(kv_indptr=None)), plan=decode_plan(make_array))


def test_head_dim_zero_in_the_single_ops_is_named():
    with pytest.raises(ValueError, match=r"^q: head_dim \(the last dimension\) must be > 0"):
        decode.single_decode(fake_cuda((32, 0)), fake_cuda((100, 8, 0)), fake_cuda((100, 8, 0)), out=fake_cuda((32, 0)))
    with pytest.raises(ValueError, match=r"^q: head_dim \(the last dimension\) must be > 0"):
        prefill.single_prefill(
            fake_cuda((4, 32, 0)), fake_cuda((9, 8, 0)), fake_cuda((9, 8, 0)), out=fake_cuda((4, 32, 0))
        )
    with pytest.raises(ValueError, match=r"^v: head_dim \(the last dimension\) must be > 0"):
        prefill.single_prefill(
            fake_cuda((4, 32, 128)), fake_cuda((9, 8, 128)), fake_cuda((9, 8, 0)), out=fake_cuda((4, 32, 0))
        )


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(q_data_type=("a", "b", "c")), TypeError, r"^q_data_type: unsupported dtype"),
        (dict(kv_data_type="nope"), TypeError, r"^kv_data_type: unsupported dtype"),
        (dict(o_data_type=3.5), TypeError, r"^o_data_type: unsupported dtype"),
        (
            dict(kv_data_type="int32"),
            TypeError,
            r"^kv_data_type: no FlashInfer attention module exists for dtype int32",
        ),
        (dict(num_qo_heads=2**70), ValueError, r"^num_qo_heads: expected an int < 2\*\*31"),
        (dict(page_size=2**70), ValueError, r"^page_size: expected an int < 2\*\*31"),
        (dict(head_dim=2**40), ValueError, r"^head_dim: expected an int < 2\*\*31"),
        (dict(window_left=2**70), ValueError, r"^window_left: expected -1 \(no window\) or 0 <= window_left < 2\*\*31"),
        (dict(sm_scale=10**400), ValueError, r"^sm_scale: 1000+ does not fit in a float64"),
        (dict(logits_soft_cap=10**400), ValueError, r"^logits_soft_cap: 1000+ does not fit in a float64"),
        (dict(rope_theta=-(10**400)), ValueError, r"^rope_theta: -1000+ does not fit in a float64"),
        (dict(indptr=[0, 2**70]), ValueError, r"^indptr: values must fit in int32"),
        (dict(indptr=[0, "2"]), TypeError, r"^indptr: expected a sequence of ints, got str"),
        (dict(indptr=[0, 2.0]), TypeError, r"^indptr: expected a sequence of ints, got float"),
        (dict(last_page_len=["5"]), TypeError, r"^last_page_len: expected a sequence of ints, got str"),
    ],
)
def test_batch_decode_plan_names_bad_scalars_and_index_lists(kw, exc, text):
    args = dict(
        indptr=[0, 2], indices=None, last_page_len=None, num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16
    )
    args.update((k, kw.pop(k)) for k in list(kw) if k in args)
    ws = workspace()
    with pytest.raises(exc, match=text):
        decode.batch_decode_plan(**args, **kw, workspace=ws)
    assert ws._generation == 0


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        (dict(fixed_split_size=2**70), ValueError, r"^fixed_split_size: expected an int < 2\*\*31"),
        (dict(max_total_num_rows=2**70, enable_cuda_graph=True), ValueError, r"^max_total_num_rows: expected an int"),
        (dict(qo_indptr=[0, 3.5, 4]), TypeError, r"^qo_indptr: expected a sequence of ints, got float"),
        (dict(kv_indptr=[0, 5, 2**64]), ValueError, r"^kv_indptr: values must fit in int32"),
        (dict(head_dim_vo=0), ValueError, r"^head_dim_vo: expected an int >= 1"),
        (dict(backend=["fa2"]), ValueError, r"^backend: expected 'auto', 'fa2' or 'fa3'"),
    ],
)
def test_batch_prefill_plans_name_bad_scalars_and_index_lists(kw, exc, text):
    args = dict(qo_indptr=[0, 3, 4], kv_indptr=[0, 5, 9], num_qo_heads=32, num_kv_heads=8, head_dim_qk=128)
    args.update((k, kw.pop(k)) for k in list(kw) if k in args)
    ws = workspace()
    with pytest.raises(exc, match=text):
        prefill.batch_prefill_ragged_plan(**args, **kw, workspace=ws)
    assert ws._generation == 0


def test_single_ops_name_a_null_tmp_and_huge_scalars():
    q, k, o = fake_cuda((32, 128)), fake_cuda((100, 8, 128)), fake_cuda((32, 128))
    with pytest.raises(ValueError, match=r"^tmp: data pointer is NULL"):
        decode.single_decode(q, k, k, out=o, tmp=Tensor.from_pointer(0, (1 << 20,), "uint8", "cuda:0"))
    with pytest.raises(ValueError, match=r"^tmp: data pointer is NULL"):
        prefill.single_prefill(
            fake_cuda((4, 32, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((9, 8, 128)),
            out=fake_cuda((4, 32, 128)),
            tmp=Tensor.from_pointer(0, (1 << 20,), "uint8", "cuda:0"),
        )
    with pytest.raises(ValueError, match=r"^sm_scale: 1000+ does not fit in a float64"):
        decode.single_decode(q, k, k, out=o, sm_scale=10**400)
    with pytest.raises(ValueError, match=r"^window_left: expected -1"):
        decode.single_decode(q, k, k, out=o, window_left=2**70)
    with pytest.raises(ValueError, match=r"^logits_soft_cap: 1000+ does not fit"):
        prefill.single_prefill(
            fake_cuda((4, 32, 128)),
            fake_cuda((9, 8, 128)),
            fake_cuda((9, 8, 128)),
            out=fake_cuda((4, 32, 128)),
            logits_soft_cap=10**400,
        )
    with pytest.raises(TypeError, match=r"^q: no attention module exists for dtype float32"):
        decode.single_decode(fake_cuda((32, 128), "float32"), k, k, out=o)


@pytest.mark.parametrize(
    ("masks", "exc", "text"),
    [
        (5, TypeError, r"^masks: expected a sequence of boolean \[qo_len, kv_len\] arrays, got int"),
        ("ab", TypeError, r"^masks: expected a sequence"),
        ([np.ones((2, 3), np.float32)], TypeError, r"^masks\[0\]: expected a boolean array .* got dtype float32"),
        ([np.ones((2, 3), bool), np.array([[0, 2]])], TypeError, r"^masks\[1\]: expected a boolean array"),
        ([np.ones(3, bool)], ValueError, r"^masks\[0\]: expected a 2-D \[qo_len, kv_len\] mask, got shape \(3,\)"),
        ([[[True, False]], 7], TypeError, r"^masks\[1\]: expected a boolean array"),
        ([[True, False]], ValueError, r"^masks\[0\]: expected a 2-D"),
    ],
)
def test_pack_custom_mask_refuses_what_is_not_a_boolean_mask(masks, exc, text):
    with pytest.raises(exc, match=text):
        prefill.pack_custom_mask(masks)


def test_pack_custom_mask_packs_nested_lists_of_bools():
    packed, indptr = prefill.pack_custom_mask([[[True, False, True]], np.zeros((2, 5), bool)])
    assert packed.tolist() == [0b101, 0, 0] and indptr.tolist() == [0, 1, 3]


# ------------------------------------------------------------------------------------------ modules of the ext wheel

EXT_SWA_CAP = (
    "batch_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_head_dim"
    "_vo_128_posenc_0_use_swa_True_use_logits_cap_True"
)


def test_sliding_window_and_soft_cap_select_their_modules():
    ws = workspace()
    with pytest.raises(KernelError) as info:
        decode.batch_decode_plan(
            [0, 2, 3], None, None, 32, 8, 128, 16, window_left=64, logits_soft_cap=30.0, workspace=ws
        )
    assert_reached_the_kernel(info.value)
    assert info.value.function == EXT_SWA_CAP + ".plan"
    assert info.value.arguments[9:11] == ("64", "30.0")
    for mode in ("ragged", "paged"):
        with pytest.raises(KernelError) as info:
            if mode == "ragged":
                prefill.batch_prefill_ragged_plan(
                    [0, 3, 4], [0, 5, 9], 32, 8, 128, window_left=16, logits_soft_cap=50.0, causal=True, workspace=ws
                )
            else:
                prefill.batch_prefill_paged_plan(
                    [0, 3, 4],
                    [0, 1, 3],
                    None,
                    [5, 4],
                    32,
                    8,
                    128,
                    16,
                    window_left=16,
                    logits_soft_cap=50.0,
                    workspace=ws,
                )
        assert_reached_the_kernel(info.value)
        assert "use_swa_True_use_logits_cap_True_f16qk_False.plan" in info.value.function


def test_sliding_window_and_soft_cap_runs_reach_their_modules(make_array):
    plan = decode_plan(make_array, window_left=64, logits_soft_cap=30.0)
    assert plan.uri == EXT_SWA_CAP
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)
    assert_reached_the_kernel(info.value)
    assert info.value.arguments[12] == "64" and info.value.arguments[15] == "30.0"
    for mode in ("ragged", "paged"):
        p = prefill_plan(make_array, mode, "auto", window_left=16, logits_soft_cap=50.0)
        assert "use_swa_True_use_logits_cap_True" in p.uri
        with pytest.raises(KernelError) as info:
            if mode == "ragged":
                prefill.batch_prefill_ragged_run(**ragged_run_args(), plan=p)
            else:
                prefill.batch_prefill_paged_run(**paged_run_args(), plan=p)
        assert_reached_the_kernel(info.value)


def test_fp8_kv_cache_selects_its_modules(make_array):
    ws = workspace()
    with pytest.raises(KernelError) as info:
        decode.batch_decode_plan([0, 2, 3], None, None, 32, 8, 128, 16, kv_data_type="float8_e4m3fn", workspace=ws)
    assert_reached_the_kernel(info.value)
    assert "dtype_kv_e4m3" in info.value.function
    with pytest.raises(KernelError) as info:
        prefill.batch_prefill_paged_plan(
            [0, 3, 4], [0, 1, 3], None, [5, 4], 32, 8, 128, 16, kv_data_type="float8_e4m3fn", workspace=ws
        )
    assert_reached_the_kernel(info.value)
    assert "dtype_kv_e4m3" in info.value.function
    plan = decode_plan(make_array, kv_dtype="float8_e4m3fn")
    fp8 = decode_run_args(
        k_cache=fake_cuda((4, 16, 8, 128), "float8_e4m3fn"), v_cache=fake_cuda((4, 16, 8, 128), "float8_e4m3fn")
    )
    with pytest.raises(KernelError) as info:
        decode.batch_decode_run(**paged(fp8), plan=plan)
    assert_reached_the_kernel(info.value)
    with pytest.raises(TypeError, match=r"^k_cache: expected dtype float8_e4m3fn, got float16"):
        decode.batch_decode_run(**paged(decode_run_args()), plan=plan)
    paged_plan = prefill_plan(make_array, "paged", "auto", kv_dtype="float8_e4m3fn")
    assert paged_plan.backend == "fa2" and "dtype_kv_e4m3" in paged_plan.uri
    with pytest.raises(KernelError) as info:
        prefill.batch_prefill_paged_run(
            fake_cuda((4, 32, 128)),
            (fp8["k_cache"], fp8["v_cache"]),
            qo_indptr=fake_cuda((3,), "int32"),
            kv_indptr=fake_cuda((3,), "int32"),
            kv_indices=fake_cuda((3,), "int32"),
            kv_last_page_len=fake_cuda((2,), "int32"),
            out=fake_cuda((4, 32, 128)),
            plan=paged_plan,
        )
    assert_reached_the_kernel(info.value)


def test_a_decode_runs_plan_scalars_are_bound_to_its_context(make_array):
    """A run neither passes nor keys the plan's scalars (layout code, window, soft cap, scales): the
    launcher takes them from the plan's context, which its key holds, so plans of other settings over the same
    tensor layouts pack their own values."""
    from fi_ffi import caches
    from fi_ffi.ops.attention.plan import run_context

    ws = workspace()
    args = decode_run_args()
    words = {}
    for sm_scale in (0.5, 0.25, 0.5):
        plan = decode_plan(make_array, ws=ws, sm_scale=sm_scale)
        with pytest.raises(KernelError) as info:
            decode.batch_decode_run(**paged(args), plan=plan)
        assert_reached_the_kernel(info.value)
        launch = plan._s.run
        assert "sm_scale" not in launch.source.split("\n", 1)[0]  # not an argument of the launch function
        index = [p.name for p in launch.launcher.decl.params].index("sm_scale")
        words[sm_scale] = launch.launcher.tls.frame.d[2 * index + 1]
        assert words[sm_scale] == sm_scale
        plan.release()
    # the context: one int token per (settings, batch) value, unpacked as the run's check reads it
    s = plan._s
    assert run_context(s, 2) is run_context(s, 2) and run_context(s, 2) != run_context(s, 3)
    settings, batch = run_context(s, 3)
    assert settings is s and batch == 3
    # after the table is emptied (full, or caches.reset) a pair gets a new token: an old one is never given again
    old = int(run_context(s, 2))
    caches.reset()
    assert int(run_context(s, 2)) > old
