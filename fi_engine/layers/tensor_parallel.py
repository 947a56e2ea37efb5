"""Tensor parallelism of the Llama engine (Megatron-style): what each rank holds and the all-reduce it adds.

Each of ``N`` ranks (one process per GPU, :class:`~fi_ffi.comm.nccl.Communicator`) holds:

- attention heads ``[r * Hq / N, (r + 1) * Hq / N)`` and KV heads ``[r * Hk / N, ...)``: the Q, K, V projections
  split by output rows (column-parallel), the output projection by input columns (row-parallel), and the KV cache
  for its own KV heads only;
- MLP columns ``[r * I / N, (r + 1) * I / N)``: gate/up by output rows, down by input columns; in an MoE layer
  (Mixtral, Qwen3-MoE) the same slice of *every* expert's intermediate columns, and the whole router (every rank
  routes every token the same way, so each expert's partial output is a plain partial sum);
- vocabulary rows ``[r * V' / N, (r + 1) * V' / N)`` of the embedding and of the LM head (:class:`VocabShard`;
  ``V'`` is the vocabulary padded up to a multiple of ``N`` with zero rows): the embedding gathers the rows it
  has (zeros for the others) and the ranks' rows are summed by the same all-reduce that adds the first residual;
  the LM head gives each rank its columns of the logits, greedy decoding takes each shard's argmax and combines
  the ``N`` (value, index) pairs (:func:`combine_shard_argmax`), sampling gathers the logits first
  (``vocab_parallel=False`` keeps both whole on every rank, as before);
- the norms whole. Every rank ends a step with the same tokens; rank 0's are broadcast each step all the same, so
  the ranks can never drift apart.

The O and down projections give partial sums; :class:`ResidualAllReduce` sums them over the ranks and, as the
unsharded model does next, adds the residual and applies the next RMSNorm: in one kernel
(``trtllm_allreduce_fusion``, pattern ``kARResidualRMSNorm``) where it applies (2/4/8/16 ranks on one host,
hidden size a multiple of 8), else NCCL's all-reduce then ``fused_add_rmsnorm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..checkpoint.config import LlamaConfig
from ..values import arg_array, arg_int

MAX_VOCAB = (1 << 31) - 1  # token ids are int32
MAX_PARTS = 1 << 16  # ranks of one tensor-parallel group (a bound that keeps the arithmetic in int64)


def shard_config(cfg: Any, tensor_parallel: int) -> Any:
    """The per-rank shape of ``cfg`` split ``tensor_parallel`` ways (heads and MLP columns divided): a
    :class:`~fi_engine.checkpoint.config.LlamaConfig` (Llama, Gemma 2, gpt-oss) by the rules above, a family config
    with its own rule by its ``tensor_parallel_shard`` method (DeepSeek's:
    :meth:`~fi_engine.models.deepseek_config.DeepSeekConfig.tensor_parallel_shard`).

    Raises:
        ValueError: naming ``tensor_parallel`` and the dimension it does not divide.
    """
    own_rule = getattr(type(cfg), "tensor_parallel_shard", None)  # a family config that shards itself (DeepSeek's)
    if not isinstance(cfg, LlamaConfig) and own_rule is None:
        raise TypeError(
            f"cfg: expected a LlamaConfig (LlamaConfig.from_dir) or a family config with a tensor_parallel_shard "
            f"method (DeepSeekConfig), got {type(cfg).__name__}"
        )
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: expected an int >= 1 (ranks), got {tensor_parallel!r}")
    if own_rule is not None:
        return own_rule(cfg, tensor_parallel)  # type: ignore[no-any-return]
    n = tensor_parallel
    checked = [
        ("query heads", "num_attention_heads", cfg.num_qo_heads),
        ("KV heads", "num_key_value_heads", cfg.num_kv_heads),
        ("MLP columns", "intermediate_size", cfg.intermediate_size),
    ]
    if cfg.moe is not None:
        key = "moe_intermediate_size" if cfg.model_type == "qwen3_moe" else "intermediate_size"
        checked.append(("expert intermediate columns", key, cfg.moe.intermediate_size))
    refuse_undivided(n, checked)
    moe = cfg.moe if cfg.moe is None else dataclasses.replace(cfg.moe, intermediate_size=cfg.moe.intermediate_size // n)
    return dataclasses.replace(
        cfg,
        num_qo_heads=cfg.num_qo_heads // n,
        num_kv_heads=cfg.num_kv_heads // n,
        intermediate_size=cfg.intermediate_size // n,
        moe=moe,
    )


def refuse_undivided(tensor_parallel: int, checked: list[tuple[str, str, int]]) -> None:
    """ValueError naming ``tensor_parallel`` and the first of the model's sizes ``checked`` (``(what, config key,
    size)`` each) it does not divide, and the sizes a tensor-parallel size must divide."""
    for what, key, value in checked:
        if value % tensor_parallel:
            raise ValueError(
                f"tensor_parallel: {tensor_parallel} does not divide the model's {value} {what} ({key}); use a "
                f"tensor-parallel size that divides {', '.join(f'{v} {w}' for w, _, v in checked)} (1 always does)"
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


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """The vocabulary rows one rank keeps of the embedding and the LM head (and its columns of the logits).

    Attributes:
        vocab: the model's vocabulary size ``V``.
        rank, parts: this rank of ``parts``.
        rows: rows per rank, ``ceil(V / parts)`` (the padded vocabulary ``V' = rows * parts``).
        start: the first token id of the shard, ``rank * rows``.
        valid: the shard's real rows, ``min(rows, V - start)`` clipped at 0: the last ranks' tails are padding
            (zero rows; their logits are never read).
    """

    vocab: int
    rank: int
    parts: int
    rows: int
    start: int
    valid: int

    @classmethod
    def of(cls, vocab: int, rank: int, parts: int) -> VocabShard:
        """Rank ``rank``'s shard of a ``vocab``-token vocabulary split ``parts`` ways."""
        vocab = arg_int("vocab", vocab, 1, MAX_VOCAB)
        parts = arg_int("parts", parts, 1, MAX_PARTS)
        rank = arg_int("rank", rank, 0, parts - 1)
        step = -(-vocab // parts)
        start = rank * step
        return cls(vocab, rank, parts, step, start, max(0, min(step, vocab - start)))

    def take(self, table: np.ndarray) -> np.ndarray:
        """This shard's ``[rows, H]`` block of a ``[V, H]`` table (embedding or LM head), zero rows past ``V``."""
        arg_array("table", table, 2, f"[{self.vocab}, hidden]")
        if table.shape[0] != self.vocab:
            raise ValueError(f"table: expected [{self.vocab}, hidden], got {table.shape}")
        out = np.zeros((self.rows, table.shape[1]), table.dtype)
        out[: self.valid] = table[self.start : self.start + self.valid]
        return out


def combine_shard_argmax(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The token each row takes from the ranks' shard argmaxes (the rule the device combine kernel follows).

    Args:
        values: ``[parts, rows]`` float32, each shard's largest logit (-inf for a shard with no real rows or only
            NaN / -inf logits).
        indices: ``[parts, rows]`` int, the global token id of that largest logit (the first one on ties).

    Returns ``[rows]`` int32: the id of the largest value; on ties the lowest id (the lower rank: shards ascend),
    which is what one argmax over the whole row gives (the first maximum); a row with no finite maximum anywhere
    gives rank 0's index, as the single-GPU argmax gives 0.
    """
    values = arg_array("values", values, 2, "[parts, rows]").astype(np.float32, copy=False)
    idx = arg_array("indices", indices, 2, f"[parts, rows] {values.shape}")
    if idx.shape != values.shape or not values.shape[0]:
        raise ValueError(f"indices: expected the shape of values {values.shape} (at least one part), got {idx.shape}")
    if idx.dtype.kind == "f" or (idx.size and not (idx.min() >= 0 and idx.max() < 1 << 31)):
        raise ValueError("indices: expected integer token ids in [0, 2**31) (an int32 array)")
    indices = idx
    best = np.full(values.shape[1], -np.inf, np.float32)
    out = np.asarray(indices[0], np.int32).copy()
    for r in range(values.shape[0]):
        win = values[r] > best  # strictly larger: an equal value on a later rank has a larger id
        best = np.where(win, values[r], best)
        out = np.where(win, np.asarray(indices[r], np.int32), out)
    return out


def rows(weight: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of output rows of ``weight`` ``[out, in]`` (column-parallel)."""
    step = _block(weight, rank, parts, 0)
    return weight[rank * step : (rank + 1) * step]


def columns(weight: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of input columns of ``weight`` ``[out, in]`` (row-parallel)."""
    step = _block(weight, rank, parts, 1)
    return np.ascontiguousarray(weight[:, rank * step : (rank + 1) * step])


def segment(vector: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of a 1-D ``vector`` split ``parts`` ways: the biases of column-parallel rows (gpt-oss's
    q/k/v biases) and per-head values (gpt-oss's attention sinks) go with their rows and heads."""
    arg_array("vector", vector, 1, "[length]")
    parts = arg_int("parts", parts, 1, MAX_PARTS)
    rank = arg_int("rank", rank, 0, parts - 1)
    if vector.shape[0] % parts:
        raise ValueError(f"parts: {parts} does not divide vector's length ({vector.shape[0]})")
    step = vector.shape[0] // parts
    return vector[rank * step : (rank + 1) * step].copy()


def expert_rows(weight: np.ndarray, rank: int, parts: int) -> np.ndarray:
    """Rank ``rank``'s block of every expert's intermediate rows of a stacked gate/up weight ``[E, 2I, H]`` (gate
    rows, then up rows): ``[E, 2I/N, H]``, its gate rows then its up rows (what ``silu_and_mul`` pairs)."""
    arg_array("weight", weight, 3, "[num_experts, 2 * intermediate, hidden]")
    parts = arg_int("parts", parts, 1, MAX_PARTS)
    rank = arg_int("rank", rank, 0, parts - 1)
    if weight.shape[1] % (2 * parts):
        raise ValueError(
            f"parts: 2 * {parts} does not divide weight's dimension 1 ({weight.shape[1]}, the gate and up rows)"
        )
    i = weight.shape[1] // 2
    step = i // parts
    lo = rank * step
    return np.ascontiguousarray(np.concatenate([weight[:, lo : lo + step], weight[:, i + lo : i + lo + step]], axis=1))


def allocate_rank_buffers(eng: Any, buffers: Any, rows: int, storage: Any) -> Any:
    """The buffers a rank's pass adds to ``buffers`` (a namespace of the runner ``eng``'s CuPy activations, ``rows``
    token rows of ``storage`` elements): with a vocabulary shard, ``head`` (this rank's float32 logits columns),
    ``pairs`` and ``pairs_all`` (its and every rank's shard argmax: value bits, index; the whole logits are only
    gathered for sampling); with the fused all-reduce, ``x2`` (the normalized rows it writes: its output may not
    overlap its input). Returns where the normalized rows live: ``x2``, or ``x`` itself (normalized in place)."""
    cp, b = eng.cupy, buffers
    if eng.vocab_shard is not None:
        b.head = cp.empty((eng.max_batch, eng.head_rows), np.float32)
        b.pairs = cp.empty((eng.max_batch, 2), np.int32)
        b.pairs_all = cp.empty(eng.tensor_parallel * eng.max_batch * 2, np.int32)
    if eng.allreduce is not None and eng.allreduce.fused:
        b.x2 = cp.empty((rows, eng.config.hidden_size), storage)
    return b.x2 if hasattr(b, "x2") else b.x


class ResidualAllReduce:
    """``residual += all_reduce(partial)``; ``normed = rmsnorm(residual) * weight``, over a communicator's ranks.

    Args:
        comm: the communicator (``world_size`` ranks).
        max_rows: the most token rows of a call.
        hidden: hidden size.
        dtype: the activations' dtype (``"float16"``/``"bfloat16"``).
        fused: use the fused kernel where it applies (False: always NCCL).
        pdl: the GPU runs programmatic dependent launch (Hopper and later; the engine passes its launcher's
            ``launches_with_pdl``).

    ``fused`` (attribute) says which path was taken: the fused kernel writes the normalized rows into a buffer
    of their own (``normed``), the NCCL path normalizes ``partial`` in place. ``pdl`` (attribute): the fused kernel
    is launched with programmatic dependent launch, where ``pdl``, the class attribute ``launch_with_pdl`` and
    :attr:`~fi_engine.kernels.cuda_sources.Griddep.after_wait` all allow it; with the class attribute
    ``trigger_early`` too (the default), the kernel after it is launched as soon as it has waited for the one
    before it, not when it ends.

    Why it needs ``Griddep.after_wait``: that kernel (FlashInfer 0.6.3's, the comm test wheel's version; 0.7.2 moved
    the load after the wait) loads its ``residual_in`` (and the norm's weight) before its own wait for the kernel
    before it. Where the engine's kernels let the next one start at their own start, a chain of early launches can
    overtake the all-reduce that writes that residual: on two H200s the TP 2 graph test gave other tokens than one
    GPU in 8 of 18 runs. With ``after_wait`` on, each kernel lets the next start only once its own wait has
    returned, so a kernel that starts has every kernel two or more before it finished, the all-reduce before this
    one too. The model runner turns it on in a rank's process before it compiles a kernel, where this class's
    ``launch_with_pdl`` is on. Measured on two H200s (benchmarks/RESULTS.md; the 8B shape at TP 2, tokens/s
    against the kernel launched without it): +5.5 % at batch 1, about +1 % at 8 and 32, and the TP 2 graph test
    passed 8 runs of 8; ``after_wait`` cost one GPU nothing measurable. ``bench_llama_tp.py``'s variant
    ``no-ar-pdl`` turns it off; ``pdl`` keeps the trigger at the kernel's end. :meth:`sum` (the plain all-reduce,
    Gemma 2's) launches the same way; the family TP tests ran Gemma 2 with it on (two H200s).
    """

    launch_with_pdl = True
    trigger_early = True

    def __init__(
        self, comm: Any, max_rows: int, hidden: int, dtype: str, *, fused: bool = True, pdl: bool = False
    ) -> None:
        self.comm = comm
        from ..kernels.cuda_sources import Griddep

        # launched early only where every kernel between two all-reduces releases the next after its own wait
        self.pdl = bool(pdl and self.launch_with_pdl and Griddep.after_wait)
        self.workspace: Any = None
        single_host = comm.env is None or comm.env.single_host
        if fused and comm.world_size in (2, 4, 8, 16) and single_host and hidden % 8 == 0:
            from ..kernels.system import AllReduceFusionWorkspace

            self.workspace = AllReduceFusionWorkspace(comm, max_rows, hidden, dtype)
        self.fused = self.workspace is not None

    def __call__(self, partial: Any, residual: Any, weight: Any, normed: Any, eps: float, stream: int) -> None:
        """``partial`` (this rank's sum, ``[rows, hidden]``) is consumed; ``residual`` is updated in place; the
        normalized rows land in ``normed`` (fused) or in ``partial`` (NCCL)."""
        if self.workspace is not None:
            from ..kernels.system import AllReduceFusionPattern

            self.workspace.allreduce_fusion(
                partial,
                pattern=AllReduceFusionPattern.kARResidualRMSNorm,
                residual_in=residual,
                residual_out=residual,
                norm_out=normed,
                rms_gamma=weight,
                rms_eps=eps,
                launch_with_pdl=self.pdl,
                trigger_completion_at_end=not (self.pdl and self.trigger_early),
                stream=stream,
            )
            return
        from ..kernels.flashinfer import fused_add_rmsnorm

        self.comm.all_reduce(partial, stream=stream)
        fused_add_rmsnorm(partial, residual, weight, eps, stream)

    def sum(self, partial: Any, out: Any, stream: int) -> Any:
        """The plain all-reduce (no residual, no norm: Gemma 2 normalizes a layer's output before adding it to the
        residual): the sum of ``partial`` (``[rows, hidden]``) over the ranks lands in ``out`` (fused kernel's
        ``kAllReduce``; ``out`` must not overlap ``partial``) or in ``partial`` itself (NCCL). Returns the one
        holding it."""
        if self.workspace is not None:
            from ..kernels.system import AllReduceFusionPattern

            self.workspace.allreduce_fusion(
                partial,
                pattern=AllReduceFusionPattern.kAllReduce,
                allreduce_out=out,
                launch_with_pdl=self.pdl,
                stream=stream,
            )
            return out
        self.comm.all_reduce(partial, stream=stream)
        return partial

    def close(self) -> None:
        """Release the fused kernel's workspace (a collective: every rank calls it)."""
        if self.workspace is not None:
            self.workspace.close()


__all__ = [
    "ResidualAllReduce",
    "VocabShard",
    "columns",
    "combine_shard_argmax",
    "expert_rows",
    "rows",
    "segment",
    "shard_config",
]
