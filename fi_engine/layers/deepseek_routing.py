"""DeepSeek-V2/V3 expert routing: on the host, in numpy (:func:`grouped_topk`), and the same rule as a small device
kernel (:class:`DeviceGroupedTopk`) for the decode CUDA graph where the models wheel's fused ``NoAuxTc`` kernel does
not apply (V2's softmax routing, ``norm_topk_prob`` false, sizes beyond its limits).

:func:`grouped_topk` takes the router's float32 logits ``[T, E]`` and returns the chosen experts and their weights,
as :class:`DeepSeekRouting` (a config's settings of the rule) describes (V3 ``noaux_tc``: sigmoid, correction bias,
groups by their two best biased scores; V2 ``greedy`` / ``group_limited_greedy``: softmax, groups by their best
score). The result feeds :meth:`fi_engine.layers.moe.MoELayer.forward_routed` after
:func:`~fi_engine.layers.moe_routing.group_by_expert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.cuda_sources import source
from ..values import arg_array, arg_int

__all__ = ["MAX_DEVICE_GROUPS", "DeepSeekRouting", "DeviceGroupedTopk", "device_routing_blocker", "grouped_topk"]

MAX_DEVICE_GROUPS = 64  # the device kernel keeps the chosen groups as bits of one 64-bit word

_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


@dataclass(frozen=True)
class DeepSeekRouting:
    """How a DeepSeek MoE layer picks its experts (``DeepSeekConfig.routing``, read from ``config.json``):
    ``method`` ``"noaux_tc"`` (V3: sigmoid ``scoring``, groups ranked by the sum of their two best scores biased by
    ``e_score_correction_bias``) or ``"greedy"`` / ``"group_limited_greedy"`` (V2: ``"softmax"`` scoring, a group
    ranked by its best score); the ``topk_group`` best of ``n_group`` groups kept; the weights times
    ``routed_scaling_factor``; ``n_shared_experts`` experts every token takes besides."""

    method: str  # "noaux_tc", "greedy" or "group_limited_greedy"
    scoring: str  # "sigmoid" (V3) or "softmax" (V2)
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    n_shared_experts: int


def device_routing_blocker(routing: DeepSeekRouting) -> str | None:
    """Why :class:`DeviceGroupedTopk` cannot route with ``routing`` (its field named), or None when it can."""
    if not isinstance(routing, DeepSeekRouting):
        raise TypeError(f"routing: expected a DeepSeekRouting (DeepSeekConfig.routing), got {type(routing).__name__}")
    if routing.method not in _METHODS:
        return f"topk_method {routing.method!r} is none of {sorted(_METHODS)}"
    if routing.method != "greedy" and routing.n_group > MAX_DEVICE_GROUPS:
        return f"n_group {routing.n_group} is above the device routing's {MAX_DEVICE_GROUPS} groups"
    return None


class DeviceGroupedTopk:
    """:func:`grouped_topk` as a CUDA kernel (CuPy), for ``E`` experts and ``top_k``: no host step, so a CUDA
    graph can capture it. ``__call__`` reads float32 logits ``[T, E]`` (and, for ``noaux_tc``, the float32 bias
    ``[E]``) and writes int32 experts and float32 weights ``[T, top_k]`` (row-major, contiguous CuPy arrays of at
    least ``T * top_k`` entries), launched on ``stream`` (a ``cupy.cuda.Stream``).

    Raises:
        ValueError: a routing the kernel cannot do (:func:`device_routing_blocker`), or sizes that do not fit.
    """

    def __init__(self, routing: DeepSeekRouting, num_experts: int, top_k: int, renormalize: bool) -> None:
        why = device_routing_blocker(routing)
        if why is not None:
            raise ValueError(f"routing: {why}")
        e = arg_int("num_experts", num_experts, 1, 1 << 20)
        self.top_k = arg_int("top_k", top_k, 1, e)
        if e % routing.n_group:
            raise ValueError(f"routing.n_group: {routing.n_group} does not divide the {e} experts")
        if routing.method != "greedy" and not 1 <= routing.topk_group <= routing.n_group:
            # the kernel keeps topk_group distinct groups: more than there are would shift a bit by -1
            raise ValueError(f"routing.topk_group: expected 1..n_group ({routing.n_group}), got {routing.topk_group}")
        if not isinstance(renormalize, (bool, np.bool_)):
            raise TypeError(f"renormalize: expected a bool, got {renormalize!r:.40}")
        self.routing, self.num_experts, self.renormalize = routing, e, bool(renormalize)
        import cupy

        self._fn = cupy.RawModule(code=source("ds_routing.cu")).get_function("ds_grouped_topk")

    def __call__(self, logits: Any, bias: Any, tokens: int, experts: Any, weights: Any, stream: Any) -> None:
        """Route ``tokens`` rows (0: nothing launched); the arrays as the class docstring says (checked: dtype,
        contiguity, size; a wrong one would be read or written as another type by the kernel)."""
        r, e, k = self.routing, self.num_experts, self.top_k
        tokens = arg_int("tokens", tokens, 0, (1 << 31) - 1)
        if tokens == 0:
            return
        for name, arr, dtype, need in (
            ("logits", logits, np.float32, tokens * e),
            ("experts", experts, np.int32, tokens * k),
            ("weights", weights, np.float32, tokens * k),
        ):
            _check_device_array(name, arr, dtype, need)
        if r.method == "noaux_tc":
            if bias is None:
                raise ValueError(
                    f"bias: noaux_tc routing needs the layer's e_score_correction_bias [{e}] on the device"
                )
            _check_device_array("bias", bias, np.float32, e)
            if bias.size != e:
                raise ValueError(f"bias: expected the layer's e_score_correction_bias of {e} entries, got {bias.size}")
        args = (
            logits, logits if bias is None else bias, np.int32(e), np.int32(k), np.int32(r.n_group),
            np.int32(r.topk_group), np.int32(_METHODS[r.method]), np.int32(r.scoring == "sigmoid"),
            np.int32(self.renormalize), np.float32(r.routed_scaling_factor), np.int32(tokens), experts, weights,
        )  # fmt: skip
        self._fn(((tokens + 127) // 128,), (128,), args, stream=stream)


def _check_device_array(name: str, arr: Any, dtype: Any, need: int) -> None:
    """``arr``: a C-contiguous device array of ``dtype`` with at least ``need`` entries, else the error naming it."""
    if getattr(arr, "dtype", None) != dtype or not hasattr(arr, "__cuda_array_interface__"):
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} CuPy array, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous array, got strides {arr.strides}")
    if arr.size < need:
        raise ValueError(f"{name}: {arr.size} entries, fewer than the {need} this call reads or writes")


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
