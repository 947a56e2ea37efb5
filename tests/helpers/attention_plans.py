"""Batch attention plans and run arguments over fake ``cuda:0`` descriptors, for the CPU tests.

A plan here is built as the plan functions build it, around a synthetic schedule of the right length, so a run
crosses the FFI and stops at the module's first CUDA call. ``make_array`` is the runtime's ``ffi.Array`` global
(each test module's fixture). Used by ``tests/ops/attention/test_attention_calls.py`` and the tests that reuse its plans
(``test_sink``, ``test_release_072``, ``test_pointer_rules``, ``test_bad_input_campaign``, ``test_loader_symbols``).
"""

from __future__ import annotations

import numpy as np

from fi_ffi.abi.wire import Declaration
from fi_ffi.errors import KernelError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.ops.attention import decode, prefill
from fi_ffi.ops.attention.plan import Plan
from fi_ffi.ops.attention.workspace import Workspace
from fi_ffi.tensor.descriptor import Tensor
from helpers.fakes import fake_cuda

F16_128 = "dtype_q_f16_dtype_kv_f16_dtype_o_f16"


DECODE_URI = (
    f"batch_decode_with_kv_cache_{F16_128}_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_"
    "False_use_logits_cap_False"
)


PREFILL_URI = (
    f"batch_prefill_with_kv_cache_{F16_128}_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_"
    "False_use_logits_cap_False_f16qk_False"
)


def host(arr) -> np.ndarray:
    return np.asarray(arr, dtype=np.int32)


def workspace() -> Workspace:
    pinned = np.zeros(1 << 12, np.uint8)
    return Workspace.from_buffers(
        fake_cuda((1 << 16,), "uint8"),
        fake_cuda((1 << 12,), "uint8"),
        Tensor.from_pointer(pinned.ctypes.data, pinned.shape, "uint8", "cpu", owner=pinned),
    )


def assert_reached_the_kernel(err: KernelError) -> None:
    """The module accepted the argument list (count and types) and failed on the missing CUDA driver."""
    assert err.kind != "TypeError", f"signature mismatch: {err}"
    assert "Mismatched" not in err.message and "Expected" not in err.message, err.message
    assert "FromVector" not in err.message, err.message
    assert "cuda" in err.message.lower(), err.message


# The settings of decode._settings and prefill._settings, in their order (tests pass them as a tuple of values);
# the dtypes and the position settings are the same in both.
_DTYPES = dict(q_dtype="float16", kv_dtype=None, o_dtype=None, kv_layout="NHD")
_POSITIONS = dict(
    pos_encoding="NONE", window_left=-1, logits_soft_cap=0.0, sm_scale=None, rope_scale=1.0, rope_theta=1e4
)

DECODE_SETTINGS = dict(
    num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, **_DTYPES, **_POSITIONS, enable_cuda_graph=False
)

PREFILL_SETTINGS = dict(
    num_qo_heads=32,
    num_kv_heads=8,
    head_dim_qk=128,
    page_size=1,
    head_dim_vo=None,
    **_DTYPES,
    causal=False,
    custom=False,
    **_POSITIONS,
    use_fp16_qk_reduction=False,
    backend="fa2",
    enable_cuda_graph=False,
    fixed_split_size=None,
    disable_split_kv=False,
)


def assert_declaration_matches(uri: str, decl: Declaration) -> None:
    """``decl`` is the signature module ``uri`` prints for its entry point (a zero-argument call), parameter count
    included."""
    text = entry_point(uri, decl.entry).signature_text()
    assert decl.signature in text, text
    assert f"Expected {len(decl.params)} but got 0" in text


def decode_plan(make_array, ws=None, info_len=10, alibi_slopes=None, **kw) -> Plan:
    """A batch decode Plan as batch_decode_plan builds it, around a synthetic schedule of ``info_len`` ints."""
    indptr = kw.pop("kv_indptr", host([0, 2, 3]))
    args = {**DECODE_SETTINGS, **kw}
    ws = ws or workspace()
    st = decode._settings(ws.device.device_id, tuple(args.values()))
    batch = len(indptr) - 1
    return Plan.make(
        make_array(*([0] * info_len)), ws, ws._generation, st, batch, batch, int(indptr[-1]), (None, None, alibi_slopes)
    )


def prefill_plan(
    make_array,
    mode="ragged",
    backend="fa2",
    ws=None,
    info_len=None,
    custom_mask=None,
    mask_indptr=None,
    alibi_slopes=None,
    **kw,
) -> Plan:
    """A batch prefill Plan as the plan functions build it, around a synthetic schedule of the right length."""
    qo = kw.pop("qo_indptr", host([0, 3, 4]))
    kv = kw.pop("kv_indptr", host([0, 5, 9] if mode == "ragged" else [0, 1, 3]))
    args = {
        **PREFILL_SETTINGS,
        "page_size": 1 if mode == "ragged" else 16,
        "backend": backend,
        "custom": custom_mask is not None,
        **kw,
    }
    ws = ws or workspace()
    st = prefill._settings(mode, ws.device.device_id, tuple(args.values()))
    n = info_len or (9 if st.backend == "fa3" else 15)
    return Plan.make(
        make_array(*([0] * n)),
        ws,
        ws._generation,
        st,
        len(qo) - 1,
        int(qo[-1]),
        int(kv[-1]),
        (custom_mask, mask_indptr, alibi_slopes),
    )


def decode_run_args(batch=2, hq=32, hk=8, d=128, page=16, pages=4, layout="NHD", dtype="float16", **over):
    cache = (pages, page, hk, d) if layout == "NHD" else (pages, hk, page, d)
    args = dict(
        q=fake_cuda((batch, hq, d), dtype),
        k_cache=fake_cuda(cache, dtype),
        v_cache=fake_cuda(cache, dtype),
        kv_indptr=fake_cuda((batch + 1,), "int32"),
        kv_indices=fake_cuda((pages,), "int32"),
        kv_last_page_len=fake_cuda((batch,), "int32"),
        out=fake_cuda((batch, hq, d), dtype),
    )
    args.update(over)
    return args


def paged(args: dict) -> dict:
    """Run arguments (``q, k_cache, v_cache, ...`` in the declarations' order) by the names the runs take: the
    pair as ``paged_kv_cache``, ``sink`` as ``sinks``; ragged and MLA arguments pass through unchanged."""
    out = {k: v for k, v in args.items() if k not in ("k_cache", "v_cache", "sink")}
    if "k_cache" in args or "v_cache" in args:
        out["paged_kv_cache"] = (args.get("k_cache"), args.get("v_cache"))
    if "sink" in args:
        out["sinks"] = args["sink"]
    return out


def ragged_run_args(**over):
    """``batch_prefill_ragged_run``'s arguments after the plan (all but ``plan``), for :func:`prefill_plan`
    ``(..., "ragged")``: q and out ``[4, 32, 128]``, k and v ``[9, 8, 128]`` float16, ``qo_indptr`` and ``kv_indptr``
    ``[3]`` int32 (two requests); ``over`` replaces any of them by name."""
    args = dict(
        q=fake_cuda((4, 32, 128)),
        k=fake_cuda((9, 8, 128)),
        v=fake_cuda((9, 8, 128)),
        qo_indptr=fake_cuda((3,), "int32"),
        kv_indptr=fake_cuda((3,), "int32"),
        out=fake_cuda((4, 32, 128)),
    )
    args.update(over)
    return args


def paged_run_args(cache=(4, 16, 8, 128), **over):
    """``batch_prefill_paged_run``'s arguments after the plan (all but ``plan``), for :func:`prefill_plan`
    ``(..., "paged")``: q and out ``[4, 32, 128]``, ``paged_kv_cache`` a pair of float16 caches of shape ``cache``
    (4 pages of 16 tokens of 8 heads x 128, NHD by default), ``qo_indptr``, ``kv_indptr`` and ``kv_indices`` ``[3]``
    and ``kv_last_page_len`` ``[2]`` int32; ``over`` replaces any of them by name."""
    args = dict(
        q=fake_cuda((4, 32, 128)),
        paged_kv_cache=(fake_cuda(cache), fake_cuda(cache)),
        qo_indptr=fake_cuda((3,), "int32"),
        kv_indptr=fake_cuda((3,), "int32"),
        kv_indices=fake_cuda((3,), "int32"),
        kv_last_page_len=fake_cuda((2,), "int32"),
        out=fake_cuda((4, 32, 128)),
    )
    args.update(over)
    return args
