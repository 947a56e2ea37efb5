"""Near ties in a MoE router (DeepSeek-V3 / V2, Mixtral, Qwen3-MoE), and the proof that one explains a greedy token
(:func:`helpers.yardstick.check_greedy`).

A MoE layer's expert choice is discrete: where two groups (V3's ``noaux_tc``) or two experts score within rounding of
each other, bfloat16 may pick the other one, and the layer's output, and so the logits, move by a step that no logit
tolerance covers (seen: a V3 fixture position whose two group scores differ by 0.0038 in float32, where an engine's
token was 0.12 below the reference's best, and the best of the reference with that group flipped). :class:`RoutingTies`
measures transformers' own 16-bit error of the router's scores on the fixture's prompts (the yardstick, as the logit
bounds are); a decision of the float32 reference at one position and MoE layer is a near tie where its margin is within
twice that error (two competitors, each off by up to it). A near tie only says which flips to try:
:meth:`RoutingTies.flipped_logits` reruns the float32 reference with that one decision flipped (at that one position and
layer, every other decision as transformers makes it), and the greedy check accepts a token only where it is within the
logit tolerance of such a flipped reference's best logit.

The routers (:func:`router_of`, from the model's config; each MoE layer's ``mlp.gate`` returns ``(router_logits
[tokens, experts], weights [tokens, k], experts [tokens, k])`` and its block consumes the last two):

- V3: choice scores ``sigmoid(logits) + bias`` (the correction bias), chosen by group: the groups with the best
  ``topk_group`` group scores (the sum of a group's two best choice scores) kept, then the top-k experts of those;
  weights the sigmoid scores gathered (no bias), divided by their sum (+ 1e-20) where ``norm_topk_prob``, times
  ``routed_scaling_factor``;
- V2 (``greedy``): the top-k of ``softmax(logits)``, weights those softmax scores times ``routed_scaling_factor``;
- Mixtral: the top-k of ``softmax(logits)``, weights those scores divided by their sum (always);
- Qwen3-MoE: the top-k of ``softmax(logits)``, weights those scores, divided by their sum where ``norm_topk_prob``.

The decisions and their margins: V3, the last group kept against the next, and (every router) the k-th expert of the
kept ones against the k+1-th by choice score. Scores in float64 from each gate's own router logits (float32 in the
reference; for the 16-bit model the logits it computed, so Mixtral's and Qwen3-MoE's 16-bit router GEMM counts in the
error). The flips: the runner-up group kept in place of the last kept one, with the top-k experts of the groups then
kept; the k+1-th expert in place of the k-th. The flipped row takes the new expert in the dropped one's place (the
others where transformers put them) and its weights as that router computes them from the layer's float32 logits, so a
flip that changes nothing reproduces the reference's logits exactly.
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


class Router(NamedTuple):
    """How a family's router turns its logits into experts and their weights (module docstring)."""

    sigmoid: bool
    """V3's sigmoid scores plus the correction bias, chosen by group; otherwise the top-k of the softmax."""
    renormalize: bool
    """The k weights divided by their sum."""
    scale: float
    """``routed_scaling_factor`` (1 where the family has none)."""


def router_of(cfg: Any) -> Router:
    """The router of a transformers config (``model_type`` deepseek_v3, deepseek_v2, mixtral or qwen3_moe)."""
    kind = getattr(cfg, "model_type", None)
    if kind == "deepseek_v3":
        return Router(True, bool(cfg.norm_topk_prob), float(cfg.routed_scaling_factor))
    if kind == "deepseek_v2":  # its gate ignores norm_topk_prob
        if getattr(cfg, "topk_method", "greedy") != "greedy":
            raise ValueError(f"RoutingTies: V2 routing must be 'greedy', got topk_method={cfg.topk_method!r}")
        return Router(False, False, float(cfg.routed_scaling_factor))
    if kind == "mixtral":
        return Router(False, True, 1.0)
    if kind == "qwen3_moe":
        return Router(False, bool(cfg.norm_topk_prob), 1.0)
    raise ValueError(
        f"RoutingTies: no router known for model_type={kind!r}; expected deepseek_v3, deepseek_v2, mixtral or qwen3_moe"
    )


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _router_logits(model: Any, tokens: Sequence[int]) -> dict[int, np.ndarray]:
    """Each MoE layer's router logits ``[len(tokens), experts]`` (float64, as its gate computed them) for one
    sequence, by layer index."""
    import torch

    caught: dict[int, Any] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: caught.__setitem__(i, out[0].detach()))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(tokens)], device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return {i: x.reshape(-1, x.shape[-1]).double().cpu().numpy() for i, x in caught.items()}


class RoutingTies:
    """The router scores of ``ref`` (the float32 reference) against ``hf16`` (transformers in bfloat16 or float16)
    on ``prompts``: :attr:`error` is the largest difference of any expert or group score; :meth:`near_ties` lists a
    position's decisions under ``ref`` within ``2 * error``, :meth:`flipped_logits` the reference's logits there with
    each flipped."""

    def __init__(self, ref: Any, hf16: Any, prompts: Sequence[list[int]]) -> None:
        self.ref, cfg = ref, ref.config
        self.router = router_of(cfg)
        self.k = int(cfg.num_experts_per_tok)
        self.n_group = int(getattr(cfg, "n_group", None) or 1) if self.router.sigmoid else 1
        self.topk_group = int(getattr(cfg, "topk_group", None) or 1) if self.router.sigmoid else 1
        self.bias = {  # V3's correction bias [experts] by MoE layer; None for the softmax routers
            i: (layer.mlp.gate.e_score_correction_bias.detach().double().cpu().numpy() if self.router.sigmoid else None)
            for i, layer in enumerate(ref.model.layers)
            if hasattr(layer.mlp, "gate")
        }
        if not self.bias:
            raise ValueError("RoutingTies: the model has no MoE layer (no layers[i].mlp.gate)")
        self.error = 0.0
        for p in prompts:
            want, got = _router_logits(ref, p), _router_logits(hf16, p)
            for i in self.bias:
                (s32, g32), (s16, g16) = self.scores(i, want[i]), self.scores(i, got[i])
                self.error = max(self.error, float(np.abs(s32 - s16).max()), float(np.abs(g32 - g16).max()))

    def scores(self, layer: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The choice scores ``[rows, experts]`` and group scores ``[rows, n_group]`` of router logits ``logits``
        ``[rows, experts]`` (one group where the router has none: its score unused)."""
        bias = self.bias[layer]
        if bias is not None:  # V3: sigmoid scores, the bias added for the choice
            s = 1.0 / (1.0 + np.exp(-logits)) + bias
        else:  # softmax
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
        logits = _router_logits(self.ref, tokens[: pos + 1])
        out = []
        k, kg = self.k, self.topk_group
        for i in self.bias:
            s, g = self.scores(i, logits[i][pos : pos + 1])
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
        """The decisions at ``pos`` of ``tokens`` within ``2 * error``: the flips 16-bit rounding might make."""
        return [f for f in self.decisions(tokens, pos) if f.margin < 2 * self.error]

    def _weights(self, router_logits: Any, pos: int, row: Any) -> Any:
        """The weights ``[k]`` (float32) the router gives experts ``row`` at ``pos``, from its logits ``[tokens,
        experts]`` in the order of transformers' gates (scores of every row, gathered, renormalized, scaled)."""
        import torch

        if self.router.sigmoid:
            w = router_logits.sigmoid()[pos].gather(0, row)
            if self.router.renormalize:
                w = w / (w.sum() + 1e-20)
        else:
            w = torch.softmax(router_logits, dim=-1, dtype=torch.float32)[pos].gather(0, row)
            if self.router.renormalize:
                w = w / w.sum()
        return w * self.router.scale

    def rerun(self, tokens: Sequence[int], pos: int, flip: Flip) -> np.ndarray:
        """``ref``'s logits ``[vocab]`` (float32) at ``pos`` of ``tokens`` with the experts of layer ``flip.layer`` at
        ``pos`` those of ``flip.flipped``: a forward hook on the layer's ``mlp.gate`` replaces row ``pos`` of its
        ``(router_logits, weights, experts)`` (each expert of ``flip.chosen`` not in ``flip.flipped`` by one that is,
        in its place; the weights as the router computes them). Asserts that transformers chose ``flip.chosen``."""
        import torch

        ids = torch.tensor([list(tokens[: pos + 1])], device=_device(self.ref))
        gate = self.ref.model.layers[flip.layer].mlp.gate
        dropped, added = np.setdiff1d(flip.chosen, flip.flipped), np.setdiff1d(flip.flipped, flip.chosen)

        def flipped(mod: Any, args: Any, result: Any) -> Any:
            router_logits, weights, indices = result
            row = indices[pos].clone()
            got = np.sort(row.cpu().numpy())
            # the float64 choice this flips must be the one transformers made in float32
            assert (got == flip.chosen).all(), f"layer {flip.layer}: transformers chose {got}, not {flip.chosen}"
            for old, new in zip(dropped.tolist(), added.tolist(), strict=True):
                row[row == old] = new
            weights, indices = weights.clone(), indices.clone()
            weights[pos], indices[pos] = self._weights(router_logits, pos, row).to(weights.dtype), row
            return router_logits, weights, indices

        hook = gate.register_forward_hook(flipped)
        try:
            with torch.no_grad():
                return self.ref(input_ids=ids).logits[0, pos].float().cpu().numpy()
        finally:
            hook.remove()

    def flipped_logits(self, tokens: Sequence[int], pos: int) -> list[tuple[Flip, np.ndarray]]:
        """For each near tie at ``pos`` of ``tokens``, ``ref``'s logits ``[vocab]`` (float32) at ``pos`` with that one
        decision flipped (:meth:`rerun`)."""
        return [(flip, self.rerun(tokens, pos, flip)) for flip in self.near_ties(tokens, pos)]
