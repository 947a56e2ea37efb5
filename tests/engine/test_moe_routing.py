"""MoE routing and grouping on the host (fi_engine.layers.moe_routing): softmax + top-k against a direct computation,
the expert grouping's invariants (every assignment exactly once, segments in expert order, stable within an
expert, the permutation and its inverse agree), uneven and empty experts, and bad inputs named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fi_engine.layers.moe_routing import group_by_expert, softmax_topk


def test_softmax_topk_by_hand() -> None:
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, -2.0, 0.5]], np.float32)
    w, e = softmax_topk(logits, 2, renormalize=False)
    assert e.tolist() == [[1, 2], [1, 0]]
    p0 = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(w[0], p0[[1, 2]], rtol=1e-6)
    w2, e2 = softmax_topk(logits, 2)  # renormalized: the chosen probabilities sum to 1
    assert e2.tolist() == e.tolist()
    np.testing.assert_allclose(w2.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w2[1], np.exp([3.5, 3.0]) / np.exp([3.5, 3.0]).sum(), rtol=1e-6)
    assert w2.dtype == np.float32 and e2.dtype == np.int32


def test_softmax_topk_is_stable_on_large_logits_and_ties() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0]], np.float32)
    w, e = softmax_topk(logits, 2, renormalize=False)
    assert e.tolist() == [[0, 1]]  # an exact tie: the lower id first
    np.testing.assert_allclose(w, [[0.5, 0.5]])


def test_no_tokens() -> None:
    w, e = softmax_topk(np.zeros((0, 8), np.float32), 2)
    assert w.shape == (0, 2) and e.shape == (0, 2)
    g = group_by_expert(e, 8)
    assert g.seg_indptr.tolist() == [0] * 9 and g.row_token.size == 0 and g.row_of.shape == (0, 2)


def test_grouping_by_hand_with_uneven_and_empty_experts() -> None:
    experts = np.array([[2, 0], [2, 3], [0, 2]], np.int32)  # expert 1 and 4 unused
    g = group_by_expert(experts, 5)
    assert g.counts.tolist() == [2, 0, 3, 1, 0]
    assert g.seg_indptr.tolist() == [0, 2, 2, 5, 6, 6]
    # sorted rows: expert 0: (t0, j1), (t2, j0); expert 2: (t0, j0), (t1, j0), (t2, j1); expert 3: (t1, j1)
    assert g.row_token.tolist() == [0, 2, 0, 1, 2, 1]
    assert g.row_choice.tolist() == [1, 0, 0, 0, 1, 1]
    assert g.row_of.tolist() == [[2, 0], [3, 5], [1, 4]]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(1, 9),
    st.data(),
)
def test_grouping_invariants(tokens: int, num_experts: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, num_experts))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    logits = rng.standard_normal((tokens, num_experts)).astype(np.float32)
    weights, experts = softmax_topk(logits, k)
    g = group_by_expert(experts, num_experts)
    n = tokens * k
    assert g.seg_indptr[0] == 0 and g.seg_indptr[-1] == n
    assert (np.diff(g.seg_indptr) == g.counts).all()
    sorted_experts = experts[g.row_token, g.row_choice]
    for e in range(num_experts):  # segment e holds exactly expert e's rows, tokens ascending (stable)
        seg = slice(g.seg_indptr[e], g.seg_indptr[e + 1])
        assert (sorted_experts[seg] == e).all()
        assert (np.diff(g.row_token[seg]) >= 0).all()
    # the combine gather inverts the permute gather
    assert (g.row_token[g.row_of] == np.arange(tokens)[:, None]).all()
    assert (g.row_choice[g.row_of] == np.arange(k)[None, :]).all()
    assert sorted(g.row_of.reshape(-1).tolist()) == list(range(n))
    # weights: the top-k softmax probabilities, renormalized, in decreasing order
    if tokens:
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
        assert (np.diff(weights, axis=1) <= 1e-7).all()
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kth = np.sort(p, axis=1)[:, -k]
        assert (np.take_along_axis(p, experts, 1) >= kth[:, None] - 1e-7).all()


@pytest.mark.parametrize(
    ("logits", "k", "exc", "pattern"),
    [
        (np.zeros(8, np.float32), 2, ValueError, "logits: expected a 2-D"),
        (np.zeros((2, 8), np.float32), 0, ValueError, r"k: expected 1 <= k <= num_experts \(8\)"),
        (np.zeros((2, 8), np.float32), 9, ValueError, "k: expected 1 <= k"),
        (np.zeros((2, 8), np.float32), 2.0, TypeError, "k: expected an int"),
        (np.zeros((2, 8), np.float32), True, TypeError, "k: expected an int"),
        (np.array([[0.0, np.nan]], np.float32), 1, ValueError, "logits: expected finite values"),
    ],
)
def test_softmax_topk_bad_inputs(logits: np.ndarray, k: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        softmax_topk(logits, k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("experts", "num_experts", "exc", "pattern"),
    [
        (np.array([0, 1]), 4, ValueError, "experts: expected a 2-D"),
        (np.array([[0, 4]]), 4, ValueError, r"experts: expert id 4 outside \[0, 4\)"),
        (np.array([[-1, 0]]), 4, ValueError, r"experts: expert id -1 outside"),
        (np.array([[0.0, 1.0]]), 4, TypeError, "experts: expected integer expert ids"),
        (np.array([[0, 1]]), 0, ValueError, r"num_experts: expected 1\.\.1048576"),
        (np.array([[0, 1]]), "4", TypeError, "num_experts: expected an int, got str"),
    ],
)
def test_group_by_expert_bad_inputs(experts: np.ndarray, num_experts: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        group_by_expert(experts, num_experts)  # type: ignore[arg-type]


def test_moe_weights_shapes_are_checked() -> None:
    from fi_engine.layers.moe import MoEWeights

    e, h, i = 8, 64, 96
    ok = MoEWeights(np.zeros((e, h)), np.zeros((e, 2 * i, h)), np.zeros((e, h, i)))
    assert ok.shapes() == (e, h, i)
    with pytest.raises(ValueError, match=r"gate_up: expected \[8, 2 \* intermediate, 64\]"):
        MoEWeights(np.zeros((e, h)), np.zeros((e, 2 * i + 1, h)), np.zeros((e, h, i))).shapes()
    with pytest.raises(ValueError, match=r"down: expected \[8, 64, 96\]"):
        MoEWeights(np.zeros((e, h)), np.zeros((e, 2 * i, h)), np.zeros((e, i, h))).shapes()


def test_the_moe_modules_never_import_torch() -> None:
    import subprocess
    import sys

    from helpers.env import subprocess_env

    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch import attempted: ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import fi_engine.layers.moe, fi_engine.layers.moe_routing\n"
        "import numpy as np\n"
        "w, e = fi_engine.layers.moe_routing.softmax_topk(np.ones((3, 4), np.float32), 2)\n"
        "fi_engine.layers.moe_routing.group_by_expert(e, 4)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
