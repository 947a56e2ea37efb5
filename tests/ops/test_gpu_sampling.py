"""Sampling and top-k on a real GPU (gated by FI_FFI_RUN_GPU_TESTS=1), on whichever FlashInfer release the lock
pins (0.6.3 by default; run with a lock of the 0.7.2 wheel to test that release: the ops pass ``valid`` and the
renorm ``workspace`` when the module takes them).

Statistics: each sampler draws N = 131072 samples (4 calls of 32768 rows sharing one distribution through
``indices``, with one :class:`fi_ffi.Generator`, so the successive calls must draw new samples). The support
must be exactly the filtered set (top-k, top-p nucleus, min-p), and the counts must fit the renormalized
distribution by Pearson's chi-square test at p-value > 1e-4: the statistic is compared with the chi-square
upper 1e-4 quantile for the degrees of freedom (categories - 1), from the Wilson-Hilferty approximation
``k * (1 - 2/(9k) + z * sqrt(2/(9k)))**3`` with ``z = 3.7190`` (the standard normal upper 1e-4 quantile); the
approximation errs on the safe side (above the exact quantile by 3.5 % at k = 3, 1.1 % at 10, 0.1 % at 63), so the
test's false-alarm rate is at most 1e-4 per test. Supports have >= 4 tokens (k >= 3). Parameters are chosen away
from the filters' boundaries (no ties, thresholds midway between neighbouring values), so the filtered set is
unambiguous.

Deterministic comparisons: softmax against a float32 torch reference (atol 1e-6, rtol 1e-4); renorm / mask
against exact references (atol 1e-6); top-k against a sort (values bit-exact, indices point at them).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.ops import sampling as S

torch = require_torch()

pytestmark = pytest.mark.gpu

V = 64
ROWS = 32768
CALLS = 4
N = ROWS * CALLS
Z_1E4 = 3.7190
MIB = 1 << 20


def chi2_critical(dof: int) -> float:
    """Upper 1e-4 quantile of the chi-square distribution with ``dof`` degrees of freedom (Wilson-Hilferty)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + Z_1E4 * math.sqrt(h)) ** 3


def test_wilson_hilferty_matches_tabulated_quantiles() -> None:
    # exact upper 1e-4 quantiles (regularized incomplete gamma): dof 3, 5, 10, 63
    for dof, exact in ((3, 21.108), (5, 25.745), (10, 35.564), (63, 113.505)):
        assert 0.0 <= (chi2_critical(dof) - exact) / exact < 0.04


def release_kwargs(batch: int) -> dict[str, Any]:
    """What the pinned release's ``*_from_probs`` ops also need (0.7: the ``valid`` output)."""
    return {"valid": torch.empty(batch, dtype=torch.bool, device="cuda")} if S.sampling_release() == "0.7.2" else {}


def base_probs() -> np.ndarray:
    """A fixed distribution over V tokens with distinct, well separated probabilities, in shuffled order."""
    weights = np.arange(1, V + 1, dtype=np.float64) + 10  # p_min = 11/2720: >= 500 expected draws each
    order = np.random.default_rng(1).permutation(V)
    p = weights[order]
    return p / p.sum()


def draw(op: Any, probs: np.ndarray, *params: Any, generator: fi_ffi.Generator | None = None) -> np.ndarray:
    """N samples from ``op`` on the distribution ``probs`` (one row, shared by all output rows)."""
    p = torch.tensor(probs, dtype=torch.float32, device="cuda").reshape(1, V)
    indices = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    out = torch.empty(ROWS, dtype=torch.int32, device="cuda")
    g = generator or fi_ffi.Generator(1234)
    extra = release_kwargs(ROWS) if op is not fi_ffi.sampling_from_logits else {}
    samples = []
    for _ in range(CALLS):
        op(p, *params, out=out, indices=indices, generator=g, **extra)
        samples.append(out.cpu().numpy().copy())
        if "valid" in extra:
            assert bool(extra["valid"].all())
    return np.concatenate(samples)


def assert_fits(samples: np.ndarray, support: np.ndarray, target: np.ndarray) -> None:
    """Every sample in ``support``; counts fit ``target`` (renormalized over ``support``) by chi-square."""
    allowed = np.zeros(V, bool)
    allowed[support] = True
    assert allowed[samples].all(), f"samples outside the support: {sorted(set(samples[~allowed[samples]]))}"
    counts = np.bincount(samples, minlength=V)[support].astype(np.float64)
    expected = target[support] / target[support].sum() * len(samples)
    assert expected.min() >= 5, "too few draws per category for the chi-square test"
    assert len(support) >= 4, "the Wilson-Hilferty quantile is checked for dof >= 3"
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(support) - 1
    assert stat < chi2_critical(dof), f"chi-square {stat:.1f} >= {chi2_critical(dof):.1f} (dof {dof})"


def top_set(p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-p)[:k]


def nucleus(p: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The ``size`` most likely tokens and a top_p midway between the mass of ``size - 1`` and ``size`` of them."""
    order = np.argsort(-p)
    c = np.cumsum(p[order])
    return order[:size], float((c[size - 2] + c[size - 1]) / 2)


def test_sampling_from_probs_fits_the_distribution() -> None:
    p = base_probs()
    assert_fits(draw(fi_ffi.sampling_from_probs, p), np.arange(V), p)


def test_sampling_from_logits_fits_the_softmax() -> None:
    p = base_probs()
    assert_fits(draw(fi_ffi.sampling_from_logits, np.log(p)), np.arange(V), p)


@pytest.mark.parametrize("k", [1, 10, 40])
def test_top_k_sampling_keeps_exactly_the_top_k(k: int) -> None:
    p = base_probs()
    samples = draw(fi_ffi.top_k_sampling_from_probs, p, k)
    if k == 1:
        assert (samples == np.argmax(p)).all()
    else:
        assert_fits(samples, top_set(p, k), p)


@pytest.mark.parametrize("size", [4, 12])
def test_top_p_sampling_keeps_exactly_the_nucleus(size: int) -> None:
    p = base_probs()
    support, top_p = nucleus(p, size)
    assert_fits(draw(fi_ffi.top_p_sampling_from_probs, p, top_p), support, p)


def test_min_p_sampling_keeps_exactly_the_tokens_above_the_threshold() -> None:
    p = base_probs()
    ratios = np.sort(p / p.max())[::-1]
    min_p = float((ratios[14] + ratios[15]) / 2)  # 15 tokens have p >= min_p * max(p)
    support = np.flatnonzero(p >= min_p * p.max())
    assert len(support) == 15
    assert_fits(draw(fi_ffi.min_p_sampling_from_probs, p, min_p), support, p)


@pytest.mark.parametrize(("k", "size"), [(12, 6), (4, 10)])
def test_top_k_top_p_sampling_keeps_the_intersection(k: int, size: int) -> None:
    # the joint kernel keeps token x when fewer than k tokens and less than top_p mass are above it (both read
    # on the original probabilities): the top min(k, size) tokens
    p = base_probs()
    _, top_p = nucleus(p, size)
    assert_fits(draw(fi_ffi.top_k_top_p_sampling_from_probs, p, k, top_p), top_set(p, min(k, size)), p)


def test_per_row_parameters_apply_per_row() -> None:
    p = base_probs()
    rows = 4
    probs = torch.tensor(np.tile(p, (rows, 1)), dtype=torch.float32, device="cuda")
    top_k = torch.tensor([1, 2, 3, V], dtype=torch.int32, device="cuda")
    out = torch.empty(rows, dtype=torch.int32, device="cuda")
    g = fi_ffi.Generator(5)
    seen: list[set[int]] = [set() for _ in range(rows)]
    for _ in range(200):
        fi_ffi.top_k_sampling_from_probs(probs, top_k, out=out, generator=g, **release_kwargs(rows))
        for r, t in enumerate(out.cpu().tolist()):
            seen[r].add(t)
    order = np.argsort(-p)
    assert seen[0] == {int(order[0])}
    assert seen[1] <= set(order[:2].tolist()) and len(seen[1]) == 2
    assert seen[2] <= set(order[:3].tolist()) and len(seen[2]) == 3
    assert len(seen[3]) > 3


def one_call(seed: int, offset: int, op: Any = fi_ffi.top_p_sampling_from_probs) -> np.ndarray:
    p = torch.tensor(base_probs(), dtype=torch.float32, device="cuda").reshape(1, V)
    out = torch.empty(ROWS, dtype=torch.int32, device="cuda")
    indices = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    op(p, 0.9, out=out, indices=indices, seed=seed, offset=offset, **release_kwargs(ROWS))
    return out.cpu().numpy()


def test_equal_seed_and_offset_reproduce_and_different_offsets_differ() -> None:
    a, b = one_call(7, 1024), one_call(7, 1024)
    assert (a == b).all()
    assert (a != one_call(7, 1024 + 4 * ROWS)).mean() > 0.5
    assert (a != one_call(8, 1024)).mean() > 0.5


def test_the_generator_advances_and_replays_exactly() -> None:
    p = base_probs()
    g = fi_ffi.Generator(99, 40)
    first = draw(fi_ffi.top_k_sampling_from_probs, p, 20, generator=g)
    assert g.get_state() == (99, 40 + CALLS * ROWS * 32)  # top-k advances B * 32 per call
    chunks = first.reshape(CALLS, ROWS)
    assert all((chunks[i] != chunks[i + 1]).mean() > 0.5 for i in range(CALLS - 1))  # successive calls differ
    again = draw(fi_ffi.top_k_sampling_from_probs, p, 20, generator=fi_ffi.Generator(99, 40))
    assert (first == again).all()
    # the generator's i-th call is the explicit (seed, advanced offset) call
    explicit = one_call(
        99, 40 + ROWS * 32, op=lambda pr, _, out, **kw: fi_ffi.top_k_sampling_from_probs(pr, 20, out=out, **kw)
    )
    assert (explicit == chunks[0]).all()


@pytest.mark.skipif("S.sampling_release() != '0.7.2'", reason="seed/offset device tensors need FlashInfer >= 0.7")
def test_072_device_seed_and_offset_equal_the_int_call() -> None:
    p = torch.tensor(base_probs(), dtype=torch.float32, device="cuda").reshape(1, V)
    indices = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    out_t, out_i = (torch.empty(ROWS, dtype=torch.int32, device="cuda") for _ in range(2))
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    offset = torch.tensor([400], dtype=torch.int64, device="cuda")
    fi_ffi.sampling_from_probs(p, out=out_t, indices=indices, seed=seed, offset=offset, **release_kwargs(ROWS))
    fi_ffi.sampling_from_probs(p, out=out_i, indices=indices, seed=11, offset=400, **release_kwargs(ROWS))
    assert torch.equal(out_t, out_i)


@pytest.mark.skipif("S.sampling_release() != '0.7.2'", reason="seed/offset device tensors need FlashInfer >= 0.7")
def test_072_a_captured_graph_advances_a_device_offset() -> None:
    p = torch.tensor(base_probs(), dtype=torch.float32, device="cuda").reshape(1, V)
    indices = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    out = torch.empty(ROWS, dtype=torch.int32, device="cuda")
    valid = torch.empty(ROWS, dtype=torch.bool, device="cuda")
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    offset = torch.tensor([0], dtype=torch.int64, device="cuda")

    def step() -> None:
        fi_ffi.sampling_from_probs(p, out=out, indices=indices, valid=valid, seed=seed, offset=offset)
        offset.add_(4 * ROWS)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    offset.zero_()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert (out != first).float().mean().item() > 0.5  # the graph advanced the offset itself
    offset.zero_()
    graph.replay()
    assert torch.equal(out, first)


def test_a_graph_captured_with_int_seeds_replays_the_same_draw() -> None:
    p = torch.tensor(base_probs(), dtype=torch.float32, device="cuda").reshape(1, V)
    indices = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    out = torch.empty(ROWS, dtype=torch.int32, device="cuda")
    extra = release_kwargs(ROWS)
    g = fi_ffi.Generator(21)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fi_ffi.sampling_from_probs(p, out=out, indices=indices, generator=g, **extra)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fi_ffi.sampling_from_probs(p, out=out, indices=indices, generator=g, **extra)
    state = g.get_state()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.equal(out, first)  # (seed, offset) were baked into the captured launch
    assert g.get_state() == state  # replays do not touch the generator


# ---- softmax, renorm, mask ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 32000), (200, 1000), (3, 5)])
@pytest.mark.parametrize("per_row", [False, True])
def test_softmax_matches_float32(shape: tuple[int, int], per_row: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(shape, device="cuda") * 3
    out = torch.empty_like(logits)
    ws = torch.empty(S.softmax_workspace_size(*shape) or 1, dtype=torch.uint8, device="cuda")
    temperature: Any = torch.rand(shape[0], device="cuda") + 0.5 if per_row else 0.7
    fi_ffi.softmax(logits, out=out, workspace=ws, temperature=temperature)
    t = temperature[:, None] if per_row else temperature
    ref = torch.softmax(logits / t, dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-4)


def separated_probs(rows: int, vocab: int, top: int) -> torch.Tensor:
    """Rows whose ``top`` largest probabilities are 3 % apart (distinct even in bfloat16), at random positions,
    over a background 100x smaller."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.rand(rows, vocab, device="cuda", generator=g) * 0.01
    peaks = 0.97 ** torch.arange(top, device="cuda", dtype=torch.float32)
    for r in range(rows):
        x[r, torch.randperm(vocab, device="cuda", generator=g)[:top]] = peaks
    return x / x.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 65536])
def test_top_k_renorm_and_mask_match_references(dtype: torch.dtype, vocab: int) -> None:
    rows, k = 5, 17
    probs = separated_probs(rows, vocab, k + 8).to(dtype)
    states = torch.zeros(MIB, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(probs)
    fi_ffi.top_k_renorm_probs(probs, k, out=out, row_states_buffer=states)
    vals, idx = torch.topk(probs.float(), k + 1, dim=-1)
    assert (vals[:, k - 1] > vals[:, k]).all(), "tie at the k-th value: pick another seed"
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx[:, :k], True)
    ref = torch.where(keep, probs.float(), 0.0)
    ref = ref / ref.sum(-1, keepdim=True)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    masked = torch.empty_like(probs)
    fi_ffi.top_k_mask_logits(probs, k, out=masked, row_states_buffer=states)
    assert torch.equal(masked.float().isinf(), ~keep)
    assert torch.equal(masked[keep], probs[keep])


def test_top_p_renorm_keeps_the_nucleus() -> None:
    p = base_probs()
    support, top_p = nucleus(p, 7)
    probs = torch.tensor(np.tile(p, (3, 1)), dtype=torch.float32, device="cuda")
    out = torch.empty_like(probs)
    extra = {}
    if S.sampling_release() == "0.7.2":
        extra["workspace"] = torch.empty(S.top_p_renorm_workspace_size(3, V), dtype=torch.uint8, device="cuda")
    fi_ffi.top_p_renorm_probs(probs, top_p, out=out, **extra)
    ref = np.zeros(V)
    ref[support] = p[support] / p[support].sum()
    np.testing.assert_allclose(out.cpu().numpy(), np.tile(ref, (3, 1)), atol=1e-6)


# ---- speculative sampling -----------------------------------------------------------------------------------------


def test_chain_speculative_sampling_accepts_and_rejects_as_defined() -> None:
    b, n, v = 3, 3, 16
    draft_ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.int32, device="cuda")
    draft = torch.zeros(b, n, v, device="cuda")
    target = torch.zeros(b, n + 1, v, device="cuda")
    for r in range(b):
        for i in range(n):
            draft[r, i, draft_ids[r, i]] = 0.5
            draft[r, i, 0] = 0.5
    # row 0: the target puts all mass on every draft token (q = 1 > u * p): all accepted, bonus from row n
    for i in range(n):
        target[0, i, draft_ids[0, i]] = 1.0
    target[0, n, 11] = 1.0
    # row 1: token 0 accepted, token 1 has q = 0 (always rejected) -> resample relu(q - p) = one-hot 13;
    #        token 2 would be accepted alone (counted in accepted, not emitted)
    target[1, 0, 4] = 1.0
    target[1, 1, 13] = 1.0
    target[1, 2, 6] = 1.0
    target[1, n, 0] = 1.0
    # row 2: rejected at once -> relu(q - p) on row 0 is one-hot 12
    target[2, 0, 12] = 1.0
    target[2, 1:, 0] = 1.0
    out = torch.empty(b, n + 1, dtype=torch.int32, device="cuda")
    accepted = torch.full((b,), 10, dtype=torch.int32, device="cuda")
    emitted = torch.full((b,), 20, dtype=torch.int32, device="cuda")
    for seed in range(5):
        accepted.fill_(10)
        emitted.fill_(20)
        fi_ffi.chain_speculative_sampling(
            draft,
            draft_ids,
            target,
            out=out,
            maybe_output_accepted_token_num=accepted,
            maybe_output_emitted_draft_token_num=emitted,
            seed=seed,
            offset=0,
        )
        assert out.tolist() == [[1, 2, 3, 11], [4, 13, -1, -1], [12, -1, -1, -1]]
        assert accepted.tolist() == [13, 12, 10]  # incremented by 3, 2 (tokens 0 and 2), 0
        assert emitted.tolist() == [23, 21, 20]


def test_speculative_acceptance_rate_is_q_over_p() -> None:
    rows = 100_000
    draft = torch.zeros(rows, 1, 4, device="cuda")
    draft[:, 0, 0] = 1.0
    target = torch.zeros(rows, 2, 4, device="cuda")
    target[:, 0, 0], target[:, 0, 1] = 0.3, 0.7
    target[:, 1, 3] = 1.0
    ids = torch.zeros(rows, 1, dtype=torch.int32, device="cuda")
    out = torch.empty(rows, 2, dtype=torch.int32, device="cuda")
    acc = torch.zeros(rows, dtype=torch.int32, device="cuda")
    emi = torch.zeros(rows, dtype=torch.int32, device="cuda")
    fi_ffi.chain_speculative_sampling(
        draft,
        ids,
        target,
        out=out,
        maybe_output_accepted_token_num=acc,
        maybe_output_emitted_draft_token_num=emi,
        generator=fi_ffi.Generator(17),
    )
    first = out[:, 0].cpu().numpy()
    rate = float((first == 0).mean())
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / rows)  # 5 sigma of a binomial proportion
    accepted_rows = first == 0
    assert (out[:, 1].cpu().numpy()[accepted_rows] == 3).all()  # bonus token from target row 1
    assert (first[~accepted_rows] == 1).all()  # resampled from relu(q - p) = one-hot 1
    assert (out[:, 1].cpu().numpy()[~accepted_rows] == -1).all()


# ---- top-k ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "rows", "length", "k"),
    [
        (torch.float32, 8, 1000, 64),
        (torch.float32, 2, 131072, 256),
        (torch.float16, 3, 32768, 100),
        (torch.bfloat16, 16, 4096, 2048),
        (torch.float32, 4, 50, 49),
    ],
)
def test_top_k_equals_a_sort(dtype: torch.dtype, rows: int, length: int, k: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(rows, length, device="cuda", generator=g).to(dtype)  # ties possible in 16 bits: compared as values
    values = torch.empty(rows, k, dtype=dtype, device="cuda")
    indices = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    states = torch.zeros(MIB, dtype=torch.uint8, device="cuda")
    fi_ffi.top_k(x, k, values=values, indices=indices, row_states_buffer=states)
    ref = torch.sort(x.float(), dim=-1, descending=True).values[:, :k]
    got = torch.sort(values.float(), dim=-1, descending=True).values
    assert torch.equal(got, ref)
    assert torch.equal(torch.gather(x, 1, indices.long()), values)  # indices point at the values
    assert all(len(set(r)) == k for r in indices.cpu().tolist())  # no index twice


def test_page_table_and_ragged_transforms_match_references() -> None:
    rows, length, k = 6, 4096, 32
    g = torch.Generator(device="cuda").manual_seed(5)
    scores = torch.stack([torch.randperm(length, device="cuda", generator=g) for _ in range(rows)]).float()
    lengths = torch.tensor([4096, 1000, 32, 10, 2500, 33], dtype=torch.int32, device="cuda")
    table = torch.randint(0, 1 << 20, (3, length), dtype=torch.int32, device="cuda", generator=g)
    row_to_batch = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([0, 100, 5000, 7, 9, 1 << 20], dtype=torch.int32, device="cuda")
    states = torch.zeros(MIB, dtype=torch.uint8, device="cuda")
    out_pt = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    out_rg = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    fi_ffi.top_k_page_table_transform(
        scores, table, lengths, k, out=out_pt, row_states_buffer=states, row_to_batch=row_to_batch
    )
    fi_ffi.top_k_ragged_transform(scores, offsets, lengths, k, out=out_rg, row_states_buffer=states)
    for r in range(rows):
        n = int(lengths[r])
        top = torch.topk(scores[r, :n], min(k, n)).indices
        want_pt = sorted(table[int(row_to_batch[r]), top].tolist()) + [-1] * (k - min(k, n))
        want_rg = sorted((top + int(offsets[r])).tolist()) + [-1] * (k - min(k, n))
        got_pt = sorted(v for v in out_pt[r].tolist() if v != -1) + [-1] * out_pt[r].tolist().count(-1)
        got_rg = sorted(v for v in out_rg[r].tolist() if v != -1) + [-1] * out_rg[r].tolist().count(-1)
        assert got_pt == want_pt, r
        assert got_rg == want_rg, r
