"""Near ties in a DeepSeek router, and the proof that one explains a greedy token
(:func:`helpers.yardstick.check_greedy`).

A MoE layer's expert choice is discrete: where two groups (V3's ``noaux_tc``) or two experts score within rounding of
each other, bfloat16 may pick the other one, and the layer's output, and so the logits, move by a step that no logit
tolerance covers (seen: a V3 fixture position whose two group scores differ by 0.0038 in float32, where an engine's
token was 0.12 below the reference's best, and the best of the reference with that group flipped). :class:`RoutingTies`
measures transformers' own bfloat16 error of the router's scores on the fixture's prompts (the yardstick, as the logit
bounds are); a decision of the float32 reference at one position and MoE layer is a near tie where its margin is within
twice that error (two competitors, each off by up to it). A near tie only says which flips to try:
:meth:`RoutingTies.flipped_logits` reruns the float32 reference with that one decision flipped (at that one position and
layer, every other decision as transformers makes it), and the greedy check accepts a token only where it is within the
logit tolerance of such a flipped reference's best logit.

The decisions and their margins: V3, the last group kept against the next (group scores: the sum of a group's two
best ``sigmoid(x W^T) + bias``), and the k-th expert of the kept groups against the k+1-th; V2 (``greedy``), the k-th
expert of ``softmax(x W^T)`` against the k+1-th. Scores in float64 from the reference's own router input. The flips:
the runner-up group kept in place of the last kept one, with the top-k experts of the groups then kept; the k+1-th
expert in place of the k-th. The flipped experts' weights as transformers computes them from the layer's float32 router
logits: V3 the sigmoid scores gathered (no bias), normalized to sum 1 where ``norm_topk_prob``, times
``routed_scaling_factor``; V2 the softmax scores gathered, times ``routed_scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class Flip(NamedTuple):
    """One near-tie decision of the reference at one position, and the experts it picks when flipped."""

    layer: int
    """The MoE layer's index in ``model.model.layers``."""
    what: str
    """``"group"`` or ``"expert"``."""
    margin: float
    """The decision's margin in the reference (float64 scores)."""
    chosen: np.ndarray
    """The reference's experts ``[k]`` (sorted ids)."""
    flipped: np.ndarray
    """The experts ``[k]`` (sorted ids) with this decision flipped."""


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
    ``prompts``: :attr:`error` is the largest difference of any expert or group score; :meth:`near_ties` lists a
    position's decisions under ``ref`` within ``2 * error``, :meth:`flipped_logits` the reference's logits there with
    each flipped."""

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
        self.v3 = any(bias is not None for _, bias in self.weights.values())
        if not self.v3 and getattr(cfg, "topk_method", "greedy") != "greedy":
            raise ValueError(f"RoutingTies: V2 routing must be 'greedy', got topk_method={cfg.topk_method!r}")
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

    def _experts(self, s: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """The ids of the experts in ``groups``, best choice score ``s`` first."""
        per = len(s) // self.n_group
        ids = (groups[:, None] * per + np.arange(per)).reshape(-1)
        return ids[np.argsort(-s[ids], kind="stable")]

    def decisions(self, tokens: Sequence[int], pos: int) -> list[Flip]:
        """Every MoE layer's decisions under ``ref`` at ``pos`` of ``tokens``, each with its margin and its flip."""
        inputs = _router_inputs(self.ref, tokens[: pos + 1])
        out = []
        k, kg = self.k, self.topk_group
        for i in self.weights:
            s, g = self.scores(i, inputs[i][pos : pos + 1])
            s, g = s[0], g[0]
            order = np.argsort(-g, kind="stable")
            ranked = self._experts(s, order[:kg])
            chosen = np.sort(ranked[:k])
            if self.n_group > kg:  # the runner-up group in place of the last one kept, its experts ranked anew
                swapped = np.concatenate([order[: kg - 1], order[kg : kg + 1]])
                flip = np.sort(self._experts(s, swapped)[:k])
                out.append(Flip(i, "group", float(g[order[kg - 1]] - g[order[kg]]), chosen, flip))
            flip = np.sort(np.concatenate([ranked[: k - 1], ranked[k : k + 1]]))
            out.append(Flip(i, "expert", float(s[ranked[k - 1]] - s[ranked[k]]), chosen, flip))
        return out

    def near_ties(self, tokens: Sequence[int], pos: int) -> list[Flip]:
        """The decisions at ``pos`` of ``tokens`` within ``2 * error``: the flips bfloat16 might make."""
        return [f for f in self.decisions(tokens, pos) if f.margin < 2 * self.error]

    def margin(self, tokens: Sequence[int], pos: int) -> float:
        """The smallest margin of ``ref``'s decisions at ``pos`` over the MoE layers."""
        return min(f.margin for f in self.decisions(tokens, pos))

    def flipped_logits(self, tokens: Sequence[int], pos: int) -> list[tuple[Flip, np.ndarray]]:
        """For each near tie at ``pos`` of ``tokens``, ``ref``'s logits ``[vocab]`` (float32) at ``pos`` with that one
        decision flipped: a forward hook on the layer's ``mlp.gate`` replaces row ``pos`` of its
        ``(router_logits, topk_weights, topk_indices)`` by the flipped experts and their weights."""
        import torch

        ids = torch.tensor([list(tokens[: pos + 1])], device="cuda")
        out = []
        for flip in self.near_ties(tokens, pos):
            gate = self.ref.model.layers[flip.layer].mlp.gate

            def flipped(mod: Any, args: Any, result: Any, flip: Flip = flip) -> Any:
                router_logits, weights, indices = result
                got = np.sort(indices[pos].cpu().numpy())
                # the float64 choice this flips must be the one transformers made in float32
                assert (got == flip.chosen).all(), f"layer {flip.layer}: transformers chose {got}, not {flip.chosen}"
                row = torch.as_tensor(flip.flipped, device=indices.device, dtype=indices.dtype)
                if self.v3:
                    w = router_logits[pos].sigmoid().gather(0, row)
                    if mod.norm_topk_prob:
                        w = w / (w.sum() + 1e-20)
                else:
                    w = router_logits[pos].softmax(-1, dtype=torch.float32).gather(0, row)
                weights, indices = weights.clone(), indices.clone()
                weights[pos], indices[pos] = (w * mod.routed_scaling_factor).to(weights.dtype), row
                return router_logits, weights, indices

            hook = gate.register_forward_hook(flipped)
            try:
                with torch.no_grad():
                    out.append((flip, self.ref(input_ids=ids).logits[0, pos].float().cpu().numpy()))
            finally:
                hook.remove()
        return out
