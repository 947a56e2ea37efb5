"""MLA plans over fake ``cuda:0`` descriptors, for the CPU tests (``tests/ops/attention/test_mla.py``, the pointer
rules and the
bad-input campaign): 16 heads, a 512-wide compressed K/V and a 64-wide rope part."""

from __future__ import annotations

from fi_ffi.ops.attention import mla
from helpers.attention_plans import workspace

H, CKV, KPE = 16, 512, 64


def fake_plan(
    make_array, ws=None, *, rows=2, pages=3, info_len=18, backend="fa2", dtype="float16", page_size=16, causal=False
) -> mla.MLAPlan:
    """An MLAPlan as batch_mla_plan builds it, around a synthetic schedule of ``info_len`` ints."""
    ws = ws or workspace()
    st = mla._settings(ws, H, CKV, KPE, page_size, causal, 0.1, dtype, None, backend)
    return mla.MLAPlan(make_array(*([0] * info_len)), ws, ws._generation, st, 2, rows, pages)
