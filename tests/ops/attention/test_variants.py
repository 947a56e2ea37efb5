"""Attention variants: URI grammar (as flashinfer/jit/attention/modules.py builds it), lookup, errors, listing."""

from __future__ import annotations

import pytest
from helpers.wheels import find_wheels_fp8, find_wheels_models
from hypothesis import given
from hypothesis import strategies as st

from fi_ffi import dtypes
from fi_ffi.cuda import device
from fi_ffi.errors import KernelNotFoundError, UnsupportedDeviceError
from fi_ffi.ops.attention import variants as V
from fi_ffi.ops.attention.variants import Variant

F16, BF16 = dtypes.float16, dtypes.bfloat16

# URIs copied from the shared test wheel (ABI.md B): one per kind.
BATCH_DECODE_F16_128 = (
    "batch_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_"
    "head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False"
)
SINGLE_DECODE_BF16_64 = (
    "single_decode_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_head_dim_qk_64_"
    "head_dim_vo_64_posenc_0_use_swa_False_use_logits_cap_False"
)
SINGLE_PREFILL_F16_64 = (
    "single_prefill_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_head_dim_qk_64_"
    "head_dim_vo_64_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False"
)
BATCH_PREFILL_BF16_128_FA3 = (
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_"
    "head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False_"
    "f16qk_False_sm90"
)

# The attention modules of the shared test wheel.
EXPECTED = {
    *(
        f"{k}_with_kv_cache_dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}_head_dim_qk_{h}_head_dim_vo_{h}_posenc_0_use_swa_False_"
        f"use_logits_cap_False{s}"
        for k, s in (("single_decode", ""), ("single_prefill", "_f16qk_False"))
        for d in ("f16", "bf16")
        for h in (64, 128)
    ),
    *(
        f"{k}_with_kv_cache_dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}_dtype_idx_i32_head_dim_qk_{h}_head_dim_vo_{h}_posenc_0_"
        f"use_swa_False_use_logits_cap_False{s}"
        for k, s in (("batch_decode", ""), ("batch_prefill", "_f16qk_False"))
        for d in ("f16", "bf16")
        for h in (64, 128)
    ),
    *(BATCH_PREFILL_BF16_128_FA3.replace("bf16", d) for d in ("f16", "bf16")),
}
# The attention modules of the shared extension wheel (pinned with the core wheel by the tests' lock).
_F16_128 = (
    "dtype_q_f16_dtype_kv_{kv}_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_{w}"
    "_use_logits_cap_{w}"
)
EXPECTED_EXT = {
    "batch_decode_with_kv_cache_" + _F16_128.format(kv="f16", w="True"),
    "batch_decode_with_kv_cache_"
    + _F16_128.format(kv="e4m3", w="False").replace("swa_False_use_logits_cap_False", "swa_False_use_logits_cap_False"),
    "batch_prefill_with_kv_cache_" + _F16_128.format(kv="f16", w="True") + "_f16qk_False",
    "batch_prefill_with_kv_cache_" + _F16_128.format(kv="e4m3", w="False") + "_f16qk_False",
    *(
        f"batch_mla_attention_dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}_dtype_idx_i32_head_dim_ckv_512_head_dim_kpe_64_"
        f"profiler_False{s}"
        for d in ("f16", "bf16")
        for s in ("", "_sm90")
    ),
}

# Gemma's head_dim 256 modules of the model-family wheel (sliding window + soft cap, bfloat16; FA2 only). Its
# attention-sink prefill modules are another kind (``batch_prefill_with_attention_sink_*``, fi_ffi.ops.attention.sink).
_BF16_256_SWA_CAP = (
    "dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_256_head_dim_vo_256_posenc_0_use_swa_True"
    "_use_logits_cap_True"
)
EXPECTED_MODELS = {
    "batch_decode_with_kv_cache_" + _BF16_256_SWA_CAP,
    "batch_prefill_with_kv_cache_" + _BF16_256_SWA_CAP + "_f16qk_False",
}
EXPECTED_EXT |= EXPECTED_MODELS if find_wheels_models() else set()
# The FP8 wheel's attention modules (head_dim 128): bf16 queries over an e4m3 KV cache (FA2 decode and prefill),
# and FA3 prefill with e4m3 q/k/v and bf16 output.
_FP8_TAIL = "dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False"
EXPECTED_FP8 = {
    "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_" + _FP8_TAIL,
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_" + _FP8_TAIL + "_f16qk_False",
    "batch_prefill_with_kv_cache_dtype_q_e4m3_dtype_kv_e4m3_" + _FP8_TAIL + "_f16qk_False_sm90",
}
EXPECTED_EXT |= EXPECTED_FP8 if find_wheels_fp8() else set()


def test_uri_of_each_kind_matches_upstream_spelling():
    assert Variant("batch_decode", F16, F16, F16, 128, 128, dtypes.int32).uri == BATCH_DECODE_F16_128
    assert Variant("single_decode", BF16, BF16, BF16, 64, 64).uri == SINGLE_DECODE_BF16_64
    assert Variant("single_prefill", "float16", "f16", "half", 64, 64).uri == SINGLE_PREFILL_F16_64
    fa3 = Variant("batch_prefill", BF16, BF16, BF16, 128, 128, "int32", backend="fa3")
    assert fa3.uri == BATCH_PREFILL_BF16_128_FA3


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"dtype_q": dtypes.float8_e4m3fn}, "_dtype_q_e4m3_"),
        ({"dtype_kv": dtypes.float8_e5m2}, "_dtype_kv_e5m2_"),
        ({"dtype_o": BF16}, "_dtype_o_bf16_"),
        ({"dtype_idx": dtypes.int64}, "_dtype_idx_i64_"),
        ({"head_dim_qk": 192}, "_head_dim_qk_192_"),
        ({"head_dim_vo": 96}, "_head_dim_vo_96_"),
        ({"pos_encoding": 1}, "_posenc_1_"),
        ({"pos_encoding": 2}, "_posenc_2_"),
        ({"use_sliding_window": True}, "_use_swa_True_"),
        ({"use_logits_cap": True}, "_use_logits_cap_True_"),
        ({"use_fp16_qk_reduction": True}, "_f16qk_True"),
        ({"backend": "fa3"}, "_f16qk_False_sm90"),
    ],
)
def test_each_field_lands_in_its_uri_slot(change, fragment):
    base = dict(
        kind="batch_prefill",
        dtype_q=F16,
        dtype_kv=F16,
        dtype_o=F16,
        head_dim_qk=128,
        head_dim_vo=128,
        dtype_idx=dtypes.int32,
    )
    plain = Variant(**base).uri
    v = Variant(**{**base, **change})
    assert fragment in v.uri
    assert fragment not in plain
    assert Variant.parse(v.uri) == v


def variant(kind, **change):
    """Keyword arguments of a float16 ``Variant`` of ``kind`` with head_dim 64, ``change`` applied."""
    return {**dict(kind=kind, dtype_q=F16, dtype_kv=F16, dtype_o=F16, head_dim_qk=64, head_dim_vo=64), **change}


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        (variant("batch_decode", dtype_q="float32", dtype_idx="int32"), TypeError, "dtype_q"),
        (variant("batch_decode"), ValueError, "dtype_idx"),
        (variant("single_decode", dtype_idx="int32"), ValueError, "dtype_idx"),
        (variant("single_decode", backend="fa3"), ValueError, "backend"),
        (variant("batch_decode", dtype_idx="int32", use_fp16_qk_reduction=True), ValueError, "use_fp16_qk_reduction"),
        (variant("single_decode", head_dim_qk=0), ValueError, "head_dim_qk"),
        (variant("single_decode", pos_encoding=3), ValueError, "pos_encoding"),
        (variant("decode"), ValueError, "kind"),
    ],
)
def test_invalid_variants_are_refused_naming_the_field(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        Variant(**kwargs)


@pytest.mark.parametrize(
    "uri",
    [
        "norm",
        "page",
        "gdn_prefill_sm90",
        BATCH_DECODE_F16_128 + "_sm90",
        SINGLE_DECODE_BF16_64 + "_f16qk_False",
        BATCH_DECODE_F16_128.replace("_dtype_idx_i32", ""),
        SINGLE_PREFILL_F16_64.replace("f16qk_False", "f16qk_Maybe"),
        SINGLE_PREFILL_F16_64.replace("dtype_q_f16", "dtype_q_f32"),
        "",
    ],
)
def test_parse_rejects_what_is_not_an_attention_variant(uri):
    assert Variant.parse(uri) is None


_dt = st.sampled_from([F16, BF16, dtypes.float8_e4m3fn, dtypes.float8_e5m2, dtypes.int8, dtypes.uint8])


@st.composite
def variants(draw):
    kind = draw(st.sampled_from(V.ALL_KINDS))
    batch = kind.startswith("batch")
    prefill = kind.endswith("prefill")
    mla = kind == V.BATCH_MLA
    backend = draw(st.sampled_from(["fa2", "fa3"])) if prefill or mla else "fa2"
    return Variant(
        kind,
        draw(_dt),
        draw(_dt),
        draw(_dt),
        draw(st.integers(1, 512)),
        draw(st.integers(1, 512)),
        draw(st.sampled_from([dtypes.int32, dtypes.int64, dtypes.uint32])) if batch else None,
        0 if mla else draw(st.sampled_from([0, 1, 2])),
        False if mla else draw(st.booleans()),
        False if mla else draw(st.booleans()),
        draw(st.booleans()) if prefill else False,
        backend,
        draw(st.sampled_from(sorted(V.ABI_TAGS.get((kind, backend), {"": ""})))),
        draw(st.booleans()) if mla else False,
    )


@given(variants())
def test_uri_round_trips_for_any_variant(v):
    assert Variant.parse(v.uri) == v
    assert (V._MLA_RE if v.kind == V.BATCH_MLA else V._URI_RE).match(v.uri)


# ------------------------------------------------------------------------------------------ the pinned wheels


@pytest.fixture(autouse=True)
def _fresh_listing(request):
    """Tests below read the shared wheel through the loader; forget any listing cached from another lock."""
    if "kernel_modules" in request.fixturenames:
        V._refresh()
    yield


def test_the_shared_wheel_holds_exactly_the_expected_attention_variants(kernel_modules):
    uris, found = V.available()
    assert {v.uri for v in found} == EXPECTED | EXPECTED_EXT
    assert uris >= EXPECTED
    for v in found:
        assert V.has(v)
        assert V.resolve(v) == v.uri


def test_list_variants_rows_and_filters(kernel_modules):
    rows = V.list_variants()
    assert len(rows) == len(EXPECTED | EXPECTED_EXT)
    assert {r["uri"] for r in rows} == EXPECTED | EXPECTED_EXT
    row = next(r for r in rows if r["uri"] == BATCH_DECODE_F16_128)
    assert row == {
        "kind": "batch_decode",
        "backend": "fa2",
        "dtype_q": "float16",
        "dtype_kv": "float16",
        "dtype_o": "float16",
        "dtype_idx": "int32",
        "head_dim_qk": 128,
        "head_dim_vo": 128,
        "pos_encoding": "NONE",
        "sliding_window": False,
        "logits_cap": False,
        "fp16_qk_reduction": False,
        "profiler": False,
        "abi": "",
        "entry_points": ["plan", "run"],
        "uri": BATCH_DECODE_F16_128,
        "release": "0.6.3",
    }
    assert {r["kind"] for r in V.list_variants(kind="decode")} == {"single_decode", "batch_decode"}
    gemma = len(EXPECTED_MODELS & EXPECTED_EXT) // 2  # the model-family wheel's head_dim 256 decode and prefill
    fp8 = len(EXPECTED_FP8 & EXPECTED_EXT)  # the FP8 wheel's: one decode, two prefill
    # + the extension wheel's sliding-window and FP8
    assert len(V.list_variants(kind="decode")) == 8 + 2 + gemma + fp8 // 3
    assert len(V.list_variants(kind="batch_prefill")) == 6 + 2 + gemma + 2 * fp8 // 3
    assert {r["backend"] for r in V.list_variants(kind="batch_prefill", head_dim=128)} == {"fa2", "fa3"}
    assert all(r["dtype_q"] == "bfloat16" for r in V.list_variants(dtype="bf16"))
    if fp8:
        assert [r["backend"] for r in V.list_variants(dtype="float8_e4m3fn")] == ["fa3"]
    assert len(V.list_variants(dtype=BF16, head_dim=64)) == 4 + 2  # + MLA (its kpe head dim is 64)
    assert {r["uri"] for r in V.list_variants(head_dim=256)} == EXPECTED_MODELS & EXPECTED_EXT
    assert all(r["sliding_window"] and r["logits_cap"] for r in V.list_variants(head_dim=256))
    with pytest.raises(ValueError, match="kind"):
        V.list_variants(kind="attention")


def test_missing_variant_error_lists_the_closest_existing_ones(kernel_modules):
    want = Variant("batch_decode", F16, F16, F16, 256, 256, dtypes.int32)
    with pytest.raises(KernelNotFoundError) as info:
        V.resolve(want)
    text = str(info.value)
    assert want.uri in text
    assert "closest available variants" in text
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "closest" in line) + 1
    # nearest first: same dtype, head dim 128 (nearer to 256 than 64), only the head dims differ
    assert lines[first].strip().startswith(BATCH_DECODE_F16_128)
    assert "head_dim_qk=128" in lines[first]
    assert "fi-ffi list" in text


def test_missing_sliding_window_variant_names_the_field(kernel_modules):
    want = Variant("single_prefill", F16, F16, F16, 64, 64, use_sliding_window=True)
    with pytest.raises(KernelNotFoundError, match="sliding window") as info:
        V.resolve(want)
    assert f"{SINGLE_PREFILL_F16_64}  (differs in use_sliding_window=False)" in str(info.value)


def test_closest_is_same_kind_only(kernel_modules):
    want = Variant("single_decode", dtypes.float8_e4m3fn, F16, F16, 128, 128)
    near = V.closest(want, n=20)
    assert near and all(c.kind == "single_decode" for c, _ in near)
    assert all("dtype_q" in diff for _, diff in near)


def test_backend_choice(kernel_modules, monkeypatch):
    base = Variant("batch_prefill", F16, F16, F16, 128, 128, dtypes.int32)
    monkeypatch.setitem(device._properties, 0, None)  # unknown device (CPU machine): auto never picks FA3
    assert V.choose_prefill(base, "auto", 0).backend == "fa2"
    assert V.choose_prefill(base, "fa3", 0).backend == "fa3"  # forced: the module call reports the device
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((9, 0), 132, 32))
    assert V.choose_prefill(base, "auto", 0).backend == "fa3"
    assert V.choose_prefill(base, "auto", 0, custom_mask=True).backend == "fa2"
    assert V.choose_prefill(base, "fa2", 0).backend == "fa2"
    with pytest.raises(ValueError, match="custom mask"):
        V.choose_prefill(base, "fa3", 0, custom_mask=True)
    hd64 = Variant("batch_prefill", F16, F16, F16, 64, 64, dtypes.int32)
    assert V.choose_prefill(hd64, "auto", 0).backend == "fa2"  # no hd-64 FA3 in the wheel: FA2, not an error
    with pytest.raises(KernelNotFoundError, match="_sm90"):
        V.choose_prefill(hd64, "fa3", 0)
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((8, 0), 108, 32))
    assert V.choose_prefill(base, "auto", 0).backend == "fa2"
    with pytest.raises(UnsupportedDeviceError, match="SM 9"):
        V.choose_prefill(base, "fa3", 0)
    with pytest.raises(ValueError, match="backend"):
        V.choose_prefill(base, "fa4", 0)
