"""The engine against transformers in the GPU model tests: prompts, the float32 reference's logits, the greedy
token check and the tolerances. torch is imported where a reference runs, not with this module (the multi-GPU
tests take only the tolerances).

The reference is the transformers model in float32 on the checkpoint's saved (rounded) weights
(:func:`helpers.checkpoints.float32_reference`), so all of a difference is the engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LOGIT_TOL = {"float16": 2e-2, "bfloat16": 8e-2}
"""Max |engine - float32 reference| over the logits of every position, by activation dtype (logits of standard
deviation about 0.6; bfloat16 has an 8-bit mantissa): measured in tests/engine/test_gpu_llama.py."""


def prompts(lens: Sequence[int], vocab: int, seed: int = 1) -> list[list[int]]:
    """Random prompts of the given lengths, token ids in ``[3, vocab)`` (clear of BOS / EOS / pad)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


def reference_logits(ref: Any, tokens: Sequence[int]) -> np.ndarray:
    """``ref``'s logits ``[len(tokens), vocab]`` (float32, on the host) for one prompt."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([tokens], device="cuda")
        return ref(input_ids=ids).logits[0].float().cpu().numpy()


def check_greedy(
    ref: Any, ps: Sequence[list[int]], outputs: Sequence[list[int]], tol: float, routing: Any = None
) -> int:
    """Every generated token is the reference's choice up to ``tol`` (teacher forcing: the reference runs on the
    engine's own sequence; a token within ``tol`` of the best logit is a near tie either may break). Returns how many
    are exactly the reference's argmax.

    With ``routing`` (a MoE family's :class:`helpers.routing_ties.RoutingTies`), a token past ``tol`` also passes, at
    most once a prompt, where a flipped expert choice explains it: for each MoE decision of the reference at that
    position within the near-tie margin (``2 * routing.error``: the group kept, or the k-th expert against the
    k+1-th), the reference is rerun with that one decision flipped at that one position and layer
    (:meth:`~helpers.routing_ties.RoutingTies.flipped_logits`), and the token passes only if it is within ``tol`` of
    that flipped reference's best logit. The margin only picks which flips are tried; the flipped logits decide."""
    exact = 0
    for i, (p, out) in enumerate(zip(ps, outputs, strict=True)):
        seq = p + out[:-1]
        lg = reference_logits(ref, seq)  # position len(p) - 1 + t predicts out[t]
        ties = 0
        for t, tok in enumerate(out):
            pos = len(p) - 1 + t
            row = lg[pos]
            best = float(row.max())
            why = (
                f"request {i} token {t}: engine chose {tok} (reference logit "
                f"{row[tok]:.4f}), reference best {int(row.argmax())} ({best:.4f})"
            )
            if row[tok] < best - tol and routing is not None:
                tried = routing.flipped_logits(seq, pos)
                if any(f[tok] >= float(f.max()) - tol for _, f in tried):
                    ties += 1  # the token is the reference's own choice once a near-tie decision flips: a step
                    assert ties <= 1, f"{why}; a second token explained by a routing flip in this request"
                    continue
                why += "; flips tried: " + (
                    ", ".join(
                        f"layer {fl.layer} {fl.what} (margin {fl.margin:.4f}): best {int(f.argmax())} "
                        f"({float(f.max()):.4f}), {tok} {f[tok]:.4f}"
                        for fl, f in tried
                    )
                    or "none within the near-tie margin"
                )
            assert row[tok] >= best - tol, why
            exact += int(tok == int(row.argmax()))
    return exact


def check_eager_matches_graph(
    ref: Any,
    ps: Sequence[list[int]],
    eager: Sequence[list[int]],
    graph: Sequence[list[int]],
    tol: float,
    what: str = "",
) -> None:
    """Eager and CUDA-graph tokens agree up to their first difference, which must be a near tie: the reference's
    logits of the two tokens there within ``tol``. ``what`` prefixes the failure message."""
    for i, (a, b) in enumerate(zip(eager, graph, strict=True)):
        t = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if t is not None:  # only a near tie may split them; the prefixes up to t are equal
            row = reference_logits(ref, ps[i] + a[:t])[-1]
            assert abs(float(row[a[t]] - row[b[t]])) <= tol, f"{what}request {i}: eager and graph differ at {t}"


def bf16_yardstick(model: Any, refs: Sequence[np.ndarray], ps: Sequence[list[int]]) -> tuple[float, int]:
    """transformers' own error, the yardstick where no fixed tolerance fits: ``model`` (the same checkpoint run by
    transformers in bfloat16) against the float32 reference logits ``refs`` of ``ps``. Returns (max |logit error|
    over every position, the positions where its argmax equals the reference's)."""
    hf = [reference_logits(model, p) for p in ps]
    err = max(float(np.abs(h - r).max()) for h, r in zip(hf, refs, strict=True))
    agree = sum(int((h.argmax(1) == r.argmax(1)).sum()) for h, r in zip(hf, refs, strict=True))
    return err, agree
