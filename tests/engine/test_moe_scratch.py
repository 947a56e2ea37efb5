"""MoEScratch's arguments are checked before CuPy is imported, so a bad one is named the same on a CPU machine
(CI, no CuPy) as on a GPU; and its size formula matches the buffers it allocates (checked on the GPU in
tests/engine/test_gpu_moe.py, here against the shapes the docstring states)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fi_engine.layers.moe import MoEScratch

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
        ({"dense_rows": 0}, ValueError, "dense_rows"),
        ({"dense_rows": 65}, ValueError, "dense_rows"),
        ({"dense_rows": "8"}, TypeError, "dense_rows"),
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


def test_bytes_needed_counts_the_dense_path_buffers() -> None:
    e, h, i, k, t, c, d = 8, 256, 512, 2, 64, 16, 32
    dense = 2 * d * e * 2 * i + 2 * d * e * i + 4 * e * d * h + d * k * (4 + 4)  # d_gu, d_act, d_y, d_experts/weights
    assert MoEScratch.bytes_needed(e, h, i, k, t, c, d) == MoEScratch.bytes_needed(e, h, i, k, t, c) + dense


def test_choose_path_is_dense_once_the_assignments_cover_the_experts() -> None:
    from fi_engine.layers.moe import DENSE_MIN_FILL, choose_path

    assert DENSE_MIN_FILL == 1
    # gpt-oss-20b: 32 experts, top-4: dense from 8 rows; gpt-oss-120b: 128 experts, top-4: from 32
    assert [choose_path(r, 32, 4) for r in (1, 4, 7, 8, 32, 4096)] == ["routed"] * 3 + ["dense"] * 3
    assert choose_path(31, 128, 4) == "routed" and choose_path(32, 128, 4) == "dense"
    assert choose_path(0, 8, 2) == "routed"
    with pytest.raises(ValueError, match="num_experts"):
        choose_path(4, 0, 2)
    with pytest.raises(TypeError, match="rows"):
        choose_path(4.0, 8, 2)  # type: ignore[arg-type]


def _layer_weights(e: int = 8, h: int = 16, i: int = 32) -> Any:
    """Stand-ins of the right shapes: MoELayer reads only the shapes before importing CuPy."""
    from fi_engine.layers.moe import MoEWeights

    return MoEWeights(
        np.zeros((e, h), np.float16), np.zeros((e, 2 * i, h), np.float16), np.zeros((e, h, i), np.float16)
    )


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        ({"weights": "w"}, TypeError, "weights: expected a MoEWeights"),
        ({"weights": "router 1-D"}, ValueError, "weights.router: expected a 2-D"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"top_k": "2"}, TypeError, "top_k"),
        ({"top_k": 9}, ValueError, "top_k"),
        ({"max_tokens": 2.0}, TypeError, "max_tokens"),
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"capacity": True}, TypeError, "capacity"),
        ({"dense_rows": "8"}, TypeError, "dense_rows"),
        ({"dense_rows": 0}, ValueError, "dense_rows"),
        ({"dtype": "float32"}, ValueError, "dtype"),
    ],
)
def test_moe_layer_names_a_bad_argument_before_cupy(change: dict[str, Any], error: type, names: str) -> None:
    """MoELayer's size and type checks run before CuPy is imported (none is on a CPU machine: an unchecked argument
    would surface as ModuleNotFoundError here, and on a GPU as a stray TypeError from a comparison)."""
    from fi_engine.layers.moe import MoELayer, MoEWeights

    if change.get("weights") == "router 1-D":
        w = _layer_weights()
        change = {"weights": MoEWeights(np.zeros(8, np.float16), w.gate_up, w.down)}
    args: dict[str, Any] = dict(weights=_layer_weights(), dtype="float16", top_k=2, max_tokens=64, stream=None)
    with pytest.raises(error, match=names):
        MoELayer(**{**args, **change})


@pytest.mark.parametrize(("alpha", "limit", "name"), [(1e39, 7.0, "alpha"), (1.702, float("nan"), "swiglu_limit")])
def test_a_clamped_swiglu_past_float32_is_refused_at_construction(alpha: float, limit: float, name: str) -> None:
    # the kernels take alpha and the limit as float32: 1e39 would reach them as an infinity (no clamp at all)
    from fi_engine.layers.moe import ClampedSwiGLU

    assert ClampedSwiGLU(1.702, 7.0).limit == 7.0
    with pytest.raises(ValueError, match=rf"^{name}: expected a finite float within float32's range"):
        ClampedSwiGLU(alpha, limit)
