"""Mixture-of-experts routing and grouping on the host, in numpy: what a MoE layer decides between its router GEMM
and its expert GEMMs.

- :func:`softmax_topk`: Mixtral / Qwen3-MoE routing: softmax over all experts (float32), the ``k`` largest
  probabilities per token, optionally renormalized to sum to 1 (Mixtral always; Qwen3-MoE when
  ``norm_topk_prob``).
- :func:`group_by_expert`: the ``T * k`` (token, choice) assignments sorted by expert (stable: by token within an
  expert), as the grouped GEMM wants them: ``seg_indptr`` (rows of each expert's segment), ``row_token`` (the
  token whose activations each sorted row holds: the gather that permutes the input) and ``row_of`` (where
  assignment ``(t, j)`` went: the gather that combines the outputs).
- :func:`local_assignments` and :func:`group_local`: a routing over every rank's experts as one rank holding experts
  ``[first, first + count)`` whole serves it (tensor parallelism split by expert): its own assignments renumbered
  from 0, the others' dropped (an id no expert of the rank has, weight 0: computed nowhere, added nothing).

Everything is a plain array in, plain arrays out; nothing here touches a GPU (the layer copies the results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ExpertGroups", "group_by_expert", "group_local", "local_assignments", "softmax_topk"]

MAX_EXPERTS = 1 << 20


def _what(value: Any) -> str:
    return f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__


def softmax_topk(logits: np.ndarray, k: int, renormalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` experts per token of router ``logits`` ``[T, E]`` and their weights.

    Returns:
        ``(weights, experts)``: float32 ``[T, k]`` (softmax probabilities, renormalized over the chosen ``k`` when
        ``renormalize``) and int32 ``[T, k]`` expert ids, in decreasing probability (ties: the lower id first, as
        ``torch.topk`` on CUDA returns them for distinct values; exact ties are left to the stable sort).

    Raises:
        ValueError: ``logits`` is not 2-D, or ``k`` is not in ``[1, E]``, or a logit is not finite.
        TypeError: ``k`` is not an int.
    """
    x = np.asarray(logits) if isinstance(logits, np.ndarray) else None
    if x is None or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"logits: expected a numeric numpy array [num_tokens, num_experts], got {_what(logits)}")
    if isinstance(renormalize, np.bool_):
        renormalize = bool(renormalize)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {renormalize!r:.40}")
    if x.ndim != 2:
        raise ValueError(f"logits: expected a 2-D [num_tokens, num_experts] array, got shape {x.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    tokens, experts = x.shape
    if not 1 <= k <= experts:
        raise ValueError(f"k: expected 1 <= k <= num_experts ({experts}), got {k}")
    x = x.astype(np.float32, copy=False)
    if tokens and not np.isfinite(x).all():
        raise ValueError("logits: expected finite values (a NaN or inf came out of the router GEMM)")
    shifted = x - x.max(axis=1, keepdims=True) if tokens else x
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    chosen = np.argsort(-p, axis=1, kind="stable")[:, :k].astype(np.int32)
    weights = np.take_along_axis(p, chosen, axis=1)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32), chosen


@dataclass(frozen=True)
class ExpertGroups:
    """The assignments of a batch sorted by expert.

    Attributes:
        counts: int64 ``[E]``: rows routed to each expert (0 for an expert no token chose).
        seg_indptr: int32 ``[E + 1]``: expert ``e``'s rows are ``seg_indptr[e]:seg_indptr[e + 1]`` of the sorted
            rows (the ``seg_indptr`` of :func:`fi_ffi.segment_gemm`, with ``weight_indices`` = expert ids).
        row_token: int32 ``[T * k]``: the token of each sorted row (gather the input rows with it).
        row_choice: int32 ``[T * k]``: which of its token's ``k`` choices each sorted row is.
        row_of: int32 ``[T, k]``: the sorted row of assignment ``(t, j)`` (gather the expert outputs with it).
    """

    counts: np.ndarray
    seg_indptr: np.ndarray
    row_token: np.ndarray
    row_choice: np.ndarray
    row_of: np.ndarray


def group_by_expert(experts: np.ndarray, num_experts: int) -> ExpertGroups:
    """Sort the assignments ``experts`` ``[T, k]`` (expert ids) by expert, stably (token order within an expert).

    Raises:
        ValueError: ``experts`` is not 2-D or holds an id outside ``[0, num_experts)``; ``num_experts < 1``.
        TypeError: ``experts`` is not an integer array.
    """
    return _group(experts, num_experts, "experts")


def _group(experts: Any, num_experts: Any, name: str) -> ExpertGroups:
    """group_by_expert, its errors naming the ids ``name`` (the caller's argument)."""
    if not isinstance(experts, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array of expert ids [num_tokens, k], got {_what(experts)}")
    e = experts
    if e.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [num_tokens, k] array, got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.integer):
        raise TypeError(f"{name}: expected integer expert ids, got dtype {e.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"num_experts: expected 1..{MAX_EXPERTS} (more experts than any model; arrays of this length are made "
            f"per call), got {num_experts}"
        )
    tokens, k = e.shape
    flat = e.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_experts):
        bad = int(flat[(flat < 0) | (flat >= num_experts)][0])
        raise ValueError(f"{name}: expert id {bad} outside [0, {num_experts})")
    if flat.size >= 1 << 31:
        raise ValueError(f"{name}: {flat.size} assignments do not fit int32 row indices")
    order = np.argsort(flat, kind="stable")  # sorted row r holds assignment order[r] = t * k + j
    counts = np.bincount(flat, minlength=num_experts).astype(np.int64)
    seg = np.zeros(num_experts + 1, np.int32)
    np.cumsum(counts, out=seg[1:])
    row_of = np.empty(flat.size, np.int32)
    row_of[order] = np.arange(flat.size, dtype=np.int32)
    return ExpertGroups(
        counts=counts,
        seg_indptr=seg,
        row_token=(order // k).astype(np.int32),
        row_choice=(order % k).astype(np.int32),
        row_of=row_of.reshape(tokens, k),
    )


def local_assignments(
    experts: np.ndarray, weights: np.ndarray, first: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The routing ``experts`` ``[T, k]`` (global ids) with ``weights`` ``[T, k]`` as the rank holding experts
    ``[first, first + count)`` serves it: ``(local, local_weights)``, int32 and float32 ``[T, k]``, an assignment
    to one of its experts renumbered ``id - first`` with its weight, any other (another rank's expert) ``count``
    (no expert of the rank: the MoE layer's kernels skip it) with weight 0 (the combine adds nothing for it). Over
    ranks whose ranges tile ``[0, E)`` each assignment is kept by exactly one. What the layer's device kernel
    ``moe_localize`` does in place (:meth:`~fi_engine.layers.moe.MoELayer.keep_local_experts`).

    Raises:
        TypeError / ValueError: naming the argument (arrays of other shapes, ``count < 1``, ``first < 0``).
    """
    if not isinstance(experts, np.ndarray) or not np.issubdtype(experts.dtype, np.integer) or experts.ndim != 2:
        raise TypeError(f"experts: expected a 2-D integer numpy array [num_tokens, k], got {_what(experts)}")
    if not isinstance(weights, np.ndarray) or weights.shape != experts.shape:
        got = weights.shape if isinstance(weights, np.ndarray) else _what(weights)
        raise ValueError(f"weights: expected a numpy array of the shape of experts {experts.shape}, got {got}")
    if not np.issubdtype(weights.dtype, np.floating):
        raise TypeError(f"weights: expected a floating-point array, got dtype {weights.dtype}")
    for name, value, low in (("first", first, 0), ("count", count, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not low <= value <= MAX_EXPERTS:
            raise ValueError(f"{name}: expected {low}..{MAX_EXPERTS}, got {value}")
    mine = (experts >= first) & (experts < first + count)
    local = np.where(mine, experts - first, count).astype(np.int32)
    return local, np.where(mine, weights, 0).astype(np.float32)


def group_local(local: np.ndarray, count: int) -> ExpertGroups:
    """:func:`group_by_expert` of a rank's :func:`local_assignments` ``local`` ``[T, k]`` (ids ``0..count``,
    ``count`` the other ranks' assignments): ``count`` experts' segments, the other ranks' assignments sorted after
    the last of them, so a grouped GEMM over ``seg_indptr`` (``count + 1`` entries) never computes their rows;
    ``row_of`` still points every assignment at a sorted row (the combine gives the others weight 0)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count: expected an int, got {type(count).__name__}")
    if not 1 <= count < MAX_EXPERTS:
        raise ValueError(f"count: expected 1..{MAX_EXPERTS - 1}, got {count}")
    g = _group(local, count + 1, "local")
    return ExpertGroups(g.counts[:-1], g.seg_indptr[:-1], g.row_token, g.row_choice, g.row_of)
