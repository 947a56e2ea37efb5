"""DeepSeek-V2/V3 expert routing on the host, in numpy (the engine's routing for every forward: see the README for
why not the models wheel's fused kernel here).

:func:`grouped_topk` takes the router's float32 logits ``[T, E]`` and returns the chosen experts and their weights,
as :class:`~fi_ffi.models.deepseek_config.DeepSeekRouting` describes (V3 ``noaux_tc``: sigmoid, correction bias,
groups by their two best biased scores; V2 ``greedy`` / ``group_limited_greedy``: softmax, groups by their best
score). The result feeds :meth:`fi_ffi.models.moe.MoELayer.forward_routed` after
:func:`~fi_ffi.models.moe_routing.group_by_expert`.
"""

from __future__ import annotations

import numpy as np

from .deepseek_config import DeepSeekRouting
from .values import arg_array, arg_int

__all__ = ["grouped_topk"]


def grouped_topk(
    logits: np.ndarray,
    top_k: int,
    routing: DeepSeekRouting,
    renormalize: bool,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Experts per token of router ``logits`` ``[T, E]`` (float32).

    Returns:
        ``(weights, experts)``: float32 ``[T, top_k]`` (scores of the chosen experts, renormalized over them when
        ``renormalize``, times ``routed_scaling_factor``) and int32 ``[T, top_k]`` expert ids in decreasing order
        of the score they were chosen by (ties: the lower id first).

    Raises:
        TypeError: an argument of the wrong type (``logits``/``bias`` not numeric numpy arrays, ``top_k`` not an
            int, ``renormalize`` not a bool, ``routing`` not a DeepSeekRouting).
        ValueError: ``logits`` not 2-D or not finite; ``bias`` not ``[E]``; ``top_k`` not in ``[1, E]``.
    """
    x = arg_array("logits", logits, 2, "[num_tokens, num_experts]").astype(np.float32, copy=False)
    tokens, experts = x.shape
    top_k = arg_int("top_k", top_k, 1, max(experts, 1))
    if top_k > experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts ({experts}), got {top_k}")
    if not isinstance(routing, DeepSeekRouting):
        raise TypeError(f"routing: expected a DeepSeekRouting (DeepSeekConfig.routing), got {type(routing).__name__}")
    if not isinstance(renormalize, (bool, np.bool_)):
        raise TypeError(f"renormalize: expected a bool, got {renormalize!r:.40}")
    if tokens and not np.isfinite(x).all():
        raise ValueError("logits: expected finite values (a NaN or inf came out of the router GEMM)")
    g = routing.n_group
    if experts % g:
        raise ValueError(f"routing.n_group: {g} does not divide the {experts} experts")
    if routing.scoring == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-x))
    else:
        shifted = x - x.max(axis=1, keepdims=True) if tokens else x
        scores = np.exp(shifted)
        scores /= scores.sum(axis=1, keepdims=True)
    choice = scores
    if routing.method == "noaux_tc":
        if bias is None:
            raise ValueError("bias: noaux_tc routing needs the layer's e_score_correction_bias [E]")
        b = arg_array("bias", bias, 1, f"[{experts}]").astype(np.float32, copy=False)
        if b.shape != (experts,):
            raise ValueError(f"bias: expected shape ({experts},), got {b.shape}")
        choice = scores + b
    if routing.method != "greedy" and g > 1:
        per = choice.reshape(tokens, g, experts // g)
        # V3: a group ranks by the sum of its two best biased scores; V2: by its best score
        best = -np.sort(-per, axis=2)
        group_score = best[:, :, :2].sum(axis=2) if routing.method == "noaux_tc" else best[:, :, 0]
        keep = np.argsort(-group_score, axis=1, kind="stable")[:, : routing.topk_group]
        mask = np.zeros((tokens, g), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        # masked experts can never be chosen (V3 fills -inf; V2 fills 0, which softmax scores never reach)
        choice = np.where(np.repeat(mask, experts // g, axis=1), choice, -np.inf)
    chosen = np.argsort(-choice, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    weights = np.take_along_axis(scores, chosen, axis=1)
    if renormalize:
        weights = weights / (weights.sum(axis=1, keepdims=True) + 1e-20)
    return (weights * np.float32(routing.routed_scaling_factor)).astype(np.float32), chosen
