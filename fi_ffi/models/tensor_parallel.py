"""Tensor parallelism of the Llama engine (Megatron-style): what each rank holds and the all-reduce it adds.

Each of ``N`` ranks (one process per GPU, :class:`~fi_ffi.comm.nccl.Communicator`) holds:

- attention heads ``[r * Hq / N, (r + 1) * Hq / N)`` and KV heads ``[r * Hk / N, ...)``: the Q, K, V projections
  split by output rows (column-parallel), the output projection by input columns (row-parallel), and the KV cache
  for its own KV heads only;
- MLP columns ``[r * I / N, (r + 1) * I / N)``: gate/up by output rows, down by input columns;
- the embedding, the norms and the LM head whole (every rank computes the same logits and tokens; rank 0's
  tokens are broadcast each step so the ranks can never drift apart).

The O and down projections give partial sums; :class:`ResidualAllReduce` sums them over the ranks and, as the
unsharded model does next, adds the residual and applies the next RMSNorm: in one kernel
(``trtllm_allreduce_fusion``, pattern ``kARResidualRMSNorm``) where it applies (2/4/8/16 ranks on one host,
hidden size a multiple of 8), else NCCL's all-reduce then ``fused_add_rmsnorm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .config import LlamaConfig


def shard_config(cfg: LlamaConfig, tensor_parallel: int) -> LlamaConfig:
    """The per-rank shape of ``cfg`` split ``tensor_parallel`` ways (heads and MLP columns divided).

    Raises:
        ValueError: naming ``tensor_parallel`` and the dimension it does not divide.
    """
    if not isinstance(cfg, LlamaConfig):
        raise TypeError(f"cfg: expected a LlamaConfig (LlamaConfig.from_dir), got {type(cfg).__name__}")
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: expected an int >= 1 (ranks), got {tensor_parallel!r}")
    n = tensor_parallel
    for what, key, value in (
        ("query heads", "num_attention_heads", cfg.num_qo_heads),
        ("KV heads", "num_key_value_heads", cfg.num_kv_heads),
        ("MLP columns", "intermediate_size", cfg.intermediate_size),
    ):
        if value % n:
            raise ValueError(
                f"tensor_parallel: {n} does not divide the model's {value} {what} ({key}); use a tensor-parallel "
                f"size that divides {cfg.num_qo_heads} query heads, {cfg.num_kv_heads} KV heads and "
                f"{cfg.intermediate_size} MLP columns (1 always does)"
            )
    return dataclasses.replace(
        cfg,
        num_qo_heads=cfg.num_qo_heads // n,
        num_kv_heads=cfg.num_kv_heads // n,
        intermediate_size=cfg.intermediate_size // n,
    )


def _block(weight: Any, rank: Any, parts: Any, axis: int) -> int:
    """The block length of ``weight``'s ``axis`` split ``parts`` ways, the arguments checked (named)."""
    if not isinstance(weight, np.ndarray) or weight.ndim != 2 or weight.dtype.kind in "OUSM":
        what = (
            f"{weight.dtype} array of shape {weight.shape}" if isinstance(weight, np.ndarray) else type(weight).__name__
        )
        raise TypeError(f"weight: expected a 2-D numpy array of numbers [out, in], got {what}")
    for name, value in (("rank", rank), ("parts", parts)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= rank < parts:
        raise ValueError(f"rank, parts: expected 0 <= rank < parts, got rank {rank} of {parts}")
    if weight.shape[axis] % parts:
        raise ValueError(f"parts: {parts} does not divide weight's dimension {axis} ({weight.shape[axis]})")
    return int(weight.shape[axis] // parts)


def rows(weight: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of output rows of ``weight`` ``[out, in]`` (column-parallel)."""
    step = _block(weight, rank, parts, 0)
    return weight[rank * step : (rank + 1) * step]


def columns(weight: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of input columns of ``weight`` ``[out, in]`` (row-parallel)."""
    step = _block(weight, rank, parts, 1)
    return np.ascontiguousarray(weight[:, rank * step : (rank + 1) * step])


class ResidualAllReduce:
    """``residual += all_reduce(partial)``; ``normed = rmsnorm(residual) * weight``, over a communicator's ranks.

    Args:
        comm: the communicator (``world_size`` ranks).
        max_rows: the most token rows of a call.
        hidden: hidden size.
        dtype: the activations' dtype (``"float16"``/``"bfloat16"``).
        fused: use the fused kernel where it applies (False: always NCCL).

    ``fused`` (attribute) says which path was taken: the fused kernel writes the normalized rows into a buffer
    of their own (``normed``), the NCCL path normalizes ``partial`` in place.
    """

    def __init__(self, comm: Any, max_rows: int, hidden: int, dtype: str, *, fused: bool = True) -> None:
        self.comm = comm
        self.workspace: Any = None
        single_host = comm.env is None or comm.env.single_host
        if fused and comm.world_size in (2, 4, 8, 16) and single_host and hidden % 8 == 0:
            from ..comm.trtllm_ar import AllReduceFusionWorkspace

            self.workspace = AllReduceFusionWorkspace(comm, max_rows, hidden, dtype)
        self.fused = self.workspace is not None

    def __call__(self, partial: Any, residual: Any, weight: Any, normed: Any, eps: float, stream: int) -> None:
        """``partial`` (this rank's sum, ``[rows, hidden]``) is consumed; ``residual`` is updated in place; the
        normalized rows land in ``normed`` (fused) or in ``partial`` (NCCL)."""
        if self.workspace is not None:
            from ..comm.trtllm_ar import AllReduceFusionPattern

            self.workspace.allreduce_fusion(
                partial,
                pattern=AllReduceFusionPattern.kARResidualRMSNorm,
                residual_in=residual,
                residual_out=residual,
                norm_out=normed,
                rms_gamma=weight,
                rms_eps=eps,
                stream=stream,
            )
            return
        import fi_ffi

        self.comm.all_reduce(partial, stream=stream)
        fi_ffi.fused_add_rmsnorm(partial, residual, weight, eps=eps, stream=stream)

    def close(self) -> None:
        """Release the fused kernel's workspace (a collective: every rank calls it)."""
        if self.workspace is not None:
            self.workspace.close()


__all__ = ["ResidualAllReduce", "columns", "rows", "shard_config"]
