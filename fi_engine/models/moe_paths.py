"""Which path a model's MoE layers take for a step (``moe_path``): the choice between the routed paths of
:class:`~fi_engine.layers.moe.MoELayer` (only the chosen experts' weights are read) and its dense-over-the-experts
path (every expert's weights read through one GEMM and one batched GEMM).

The MoE families' definitions (:class:`~fi_engine.models.llama.Llama` for Mixtral and Qwen3-MoE,
:class:`~fi_engine.models.gpt_oss.GptOss`) take ``moe_path`` (their engine classes pass it on) and answer
:meth:`MoEPaths.moe_path_for`; the family's load allocates the buffers of the paths some step may take, and its forward
asks per step. A decode CUDA graph (one per batch size,
:attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.decode_graph_batches`) picks once, at its capture.
"""

from __future__ import annotations

from typing import Any

from ..layers.moe import choose_path
from ..values import arg_int

__all__ = ["MOE_PATHS", "MoEPaths"]

MOE_PATHS = ("auto", "routed", "dense")

# Far above any step's token rows (an int argument's range check; the kernels take int32 rows)
_MAX_ROWS = 1 << 31

GEMV_DENSE_FILL = 2
"""Steps the grouped GEMV serves stay routed under ``"auto"`` while their ``rows * top_k`` assignments number at
most this many times the experts. Measured on an H100 (benchmarks/RESULTS.md, Mixtral shape, 2 layers, graph; the
GEMV with more warps per block where its staged rows leave room for few blocks per SM): at 8 rows (16 assignments
over 8 experts, ~7.2 of them chosen) the grouped GEMV gave 3,734-3,750 tokens/s, dense over the experts 3,479; at 6
rows 3,086-3,126 against 2,609. (Before those warps, at 8 rows dense won: 3,436 against 3,191, and the bound was
strict.)"""


class MoEPaths:
    """The ``moe_path`` option of a family definition with MoE layers (a base before
    :class:`~fi_engine.runtime.family.ModelFamily` in the definition's bases).

    Args:
        moe_path: how the MoE layers run a step of up to ``max_batch`` token rows: ``"auto"`` (default) picks per
            step (:meth:`moe_path_for`); ``"routed"`` or ``"dense"`` force one path. Steps of more rows (long
            prefills) are always routed. A model without MoE layers takes ``"auto"`` only (ValueError otherwise,
            from :meth:`check_moe_path`).
    """

    def __init__(self, moe_path: str = "auto") -> None:
        if not isinstance(moe_path, str) or moe_path not in MOE_PATHS:
            raise ValueError(f"moe_path: expected one of {', '.join(map(repr, MOE_PATHS))}, got {moe_path!r:.60}")
        self.moe_path = moe_path

    def moe_path_for(self, eng: Any, rows: int) -> str:
        """``"routed"`` or ``"dense"``: the path the MoE layers of runner ``eng`` take for a step of ``rows`` token
        rows. Under
        ``"auto"``: routed where the layers' grouped GEMV serves the step (at most :meth:`_moe_gemv_rows` rows, whose
        assignments number at most :data:`GEMV_DENSE_FILL` times the experts), then
        :func:`~fi_engine.layers.moe.choose_path`'s
        rule (dense once the step's ``rows * top_k`` assignments reach the number of experts: they cover most
        experts anyway, and one GEMM and one batched GEMM stream every expert faster than the grouped GEMM streams
        the chosen ones). Always routed above ``max_batch`` rows (the dense path's buffers hold ``max_batch``; long
        prefills are compute-bound, where routing's ``top_k / num_experts`` of the FLOPs counts)."""
        rows = arg_int("rows", rows, 1, _MAX_ROWS)
        if rows > eng.max_batch:
            return "routed"
        if self.moe_path != "auto":
            return self.moe_path
        moe = eng.model_config.moe
        if moe is None:
            return "routed"
        if self._moe_experts_stored():
            return "routed"  # e4m3 experts: the grouped GEMV reads them as stored; the dense path reads a copy
        if rows <= self._moe_gemv_rows() and rows * moe.top_k <= GEMV_DENSE_FILL * moe.num_experts:
            return "routed"  # the grouped GEMV: each chosen expert's weights streamed once, few unchosen
        return choose_path(rows, moe.num_experts, moe.top_k)

    def _moe_gemv_rows(self) -> int:
        """Steps of at most this many rows stay routed under ``"auto"`` whatever
        :func:`~fi_engine.layers.moe.choose_path`
        says: the layers' grouped GEMV serves them (0: the class's layers have none)."""
        return 0

    def _moe_experts_stored(self) -> bool:
        """Whether the layers hold their experts quantized as stored (e4m3): every step up to ``max_batch`` rows
        stays routed under ``"auto"``, since the dense path would first write their 16-bit copy (False: the
        class's layers have none)."""
        return False

    def check_moe_path(self, cfg: Any) -> None:
        """ValueError where ``moe_path`` is forced on a model (config ``cfg``) without MoE layers: the family's
        ``check`` calls it, before any GPU work."""
        if self.moe_path != "auto" and cfg.moe is None:
            raise ValueError(f"moe_path: {self.moe_path!r} needs MoE layers; this model has none (pass 'auto')")
