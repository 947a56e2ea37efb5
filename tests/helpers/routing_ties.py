"""Near ties in a DeepSeek router, for the greedy token check (:func:`helpers.yardstick.check_greedy`).

A MoE layer's expert choice is discrete: where two groups (V3's ``noaux_tc``) or two experts score within rounding of
each other, bfloat16 may pick the other one, and the layer's output, and so the logits, move by a step that no logit
tolerance covers (seen: a V3 fixture position whose two group scores differ by 0.0038 in float32, where the engine's
token was 0.12 below the reference's best). :class:`RoutingTies` measures transformers' own bfloat16 error of the
router's scores on the fixture's prompts (the yardstick, as the logit bounds are) and calls a position's choice a
near tie where some MoE layer's margin is within twice that error (two competitors, each off by up to it).

Scores as transformers computes them, here in float64 from each model's router input: V3 ``sigmoid(x W^T)`` plus the
correction bias, groups scored by their two best experts, ``topk_group`` groups kept; V2 (greedy) ``softmax(x W^T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _router_inputs(model: Any, tokens: Sequence[int]) -> dict[int, np.ndarray]:
    """Each MoE layer's router input ``[len(tokens), hidden]`` (float64) for one sequence, by layer index."""
    import torch

    caught: dict[int, Any] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: caught.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(tokens)], device="cuda"))
    finally:
        for h in hooks:
            h.remove()
    return {i: x.reshape(-1, x.shape[-1]).double().cpu().numpy() for i, x in caught.items()}


class RoutingTies:
    """The router scores of ``ref`` (the float32 reference) against ``hf16`` (transformers in bfloat16) on
    ``prompts``: :attr:`error` is the largest difference of any expert or group score; :meth:`is_near_tie` asks
    whether a position's choice under ``ref`` is within ``2 * error`` in some MoE layer."""

    def __init__(self, ref: Any, hf16: Any, prompts: Sequence[list[int]]) -> None:
        self.ref, cfg = ref, ref.config
        self.k = int(cfg.num_experts_per_tok)
        self.n_group = int(getattr(cfg, "n_group", None) or 1)
        self.topk_group = int(getattr(cfg, "topk_group", None) or 1)
        self.weights = {
            i: (
                layer.mlp.gate.weight.detach().double().cpu().numpy(),
                getattr(layer.mlp.gate, "e_score_correction_bias", None),
            )
            for i, layer in enumerate(ref.model.layers)
            if hasattr(layer.mlp, "gate")
        }
        self.error = 0.0
        for p in prompts:
            want, got = _router_inputs(ref, p), _router_inputs(hf16, p)
            for i in self.weights:
                (s32, g32), (s16, g16) = self.scores(i, want[i]), self.scores(i, got[i])
                self.error = max(self.error, float(np.abs(s32 - s16).max()), float(np.abs(g32 - g16).max()))

    def scores(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The choice scores ``[rows, experts]`` and group scores ``[rows, n_group]`` of router input ``x``."""
        w, bias = self.weights[layer]
        logits = x @ w.T
        if bias is not None:  # V3: sigmoid scores, the bias added for the choice
            s = 1.0 / (1.0 + np.exp(-logits)) + bias.detach().double().cpu().numpy()
        else:  # V2: softmax
            e = np.exp(logits - logits.max(-1, keepdims=True))
            s = e / e.sum(-1, keepdims=True)
        grouped = s.reshape(len(s), self.n_group, -1)
        top2 = np.sort(grouped, axis=-1)[..., -2:] if grouped.shape[-1] > 1 else grouped
        return s, top2.sum(-1)

    def margin(self, tokens: Sequence[int], pos: int) -> float:
        """The smallest margin of ``ref``'s choice at ``pos`` over the MoE layers: between the last group kept and
        the next, and between the k-th expert of the kept groups and the next."""
        inputs = _router_inputs(self.ref, tokens[: pos + 1])
        smallest = np.inf
        for i in self.weights:
            s, g = self.scores(i, inputs[i][pos : pos + 1])
            s, g = s[0], g[0]
            if self.n_group > self.topk_group:
                order = np.sort(g)[::-1]
                smallest = min(smallest, float(order[self.topk_group - 1] - order[self.topk_group]))
            kept = np.argsort(-g)[: self.topk_group]
            candidates = np.sort(s.reshape(self.n_group, -1)[kept].reshape(-1))[::-1]
            smallest = min(smallest, float(candidates[self.k - 1] - candidates[self.k]))
        return smallest

    def is_near_tie(self, tokens: Sequence[int], pos: int) -> bool:
        """Whether ``ref``'s expert choice at ``pos`` of ``tokens`` is within ``2 * error`` in some MoE layer."""
        return self.margin(tokens, pos) < 2 * self.error
