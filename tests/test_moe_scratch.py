"""MoEScratch's arguments are checked before CuPy is imported, so a bad one is named the same on a CPU machine
(CI, no CuPy) as on a GPU; and its size formula matches the buffers it allocates (checked on the GPU in
tests/test_gpu_moe.py, here against the shapes the docstring states)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fi_ffi.models.moe import MoEScratch

GOOD: dict[str, Any] = dict(
    num_experts=8, hidden=256, intermediate=512, top_k=2, max_tokens=64, dtype="bfloat16", capacity=16
)


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"num_experts": 2.5}, TypeError, "num_experts"),
        ({"hidden": -1}, ValueError, "hidden"),
        ({"hidden": "256"}, TypeError, "hidden"),
        ({"intermediate": None}, TypeError, "intermediate"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 9}, ValueError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"max_tokens": np.array([1, 2])}, TypeError, "max_tokens"),
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": 65}, ValueError, "capacity"),
        ({"capacity": 1.0}, TypeError, "capacity"),
        ({"dtype": "float32"}, ValueError, "dtype"),
        ({"dtype": {}}, ValueError, "dtype"),
        ({"hidden": 2**40, "max_tokens": 2**20}, ValueError, "more than any device has"),
        ({"intermediate": 10**30}, ValueError, "more than any device has"),
    ],
)
def test_bad_arguments_are_named_before_any_allocation(change: dict[str, Any], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        MoEScratch(**{**GOOD, **change})


def test_bytes_needed_counts_every_buffer() -> None:
    e, h, i, k, t, c = 8, 256, 512, 2, 64, 16
    rows, static = t * k, e * c
    want = (
        4 * t * e  # logits
        + 2 * rows * (h + 2 * i + i + h)  # xs, gate_up_out, act, y
        + rows * (4 + 4 + 4)  # row_token, row_of, route_weights
        + 2 * static * (h + 2 * i + i + h)  # s_xs, s_gu, s_act, s_y
        + c * k * (4 + 4 + 4)  # s_experts, s_row_of, s_weights
    )
    assert MoEScratch.bytes_needed(e, h, i, k, t, c) == want
    assert MoEScratch.bytes_needed(e, h, i, k, t, None) == want - 2 * static * (2 * h + 3 * i) - c * k * 12
