"""What every engine holds, declared once for the modules that make up :class:`~fi_engine.runtime.engine.Engine` (each
concern a class of its own module, the engine their union): the sizes it was made with, its device buffers and
weights, the step index arrays and their views, the sampling state, the graphs. Declarations only (types for the
checker); the values are set by the engine's constructor, :mod:`~fi_engine.runtime.storage` and the family definition's
``load`` / ``allocate`` (:mod:`~fi_engine.runtime.family`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..layers.tensor_parallel import VocabShard
    from .family import ModelFamily
    from .paging import Layout, Request, Scheduler
    from .sampling_params import SamplingParams
    from .settings import EngineSettings
    from .stepping import StepOutput

__all__: list[str] = []


class EngineState:
    """The attributes the engine's parts share (set in :class:`~fi_engine.runtime.engine.Engine`'s constructor), and the
    methods one part calls on another (declared here for the type checker only)."""

    family: ModelFamily  # the model family's definition: config checks, weights, layer body, attention plans
    definition: type[ModelFamily]  # the engine class's family (ModelFamily.llama_pass: the shared pass)
    config: Any  # this rank's shard of the model's config (the checkpoint's on one GPU)
    model_config: Any
    settings: EngineSettings  # the constructor's arguments, checked (runtime.settings)
    tensor_parallel: int
    cuda_graph: bool
    max_batch: int
    page_size: int
    max_seq_len: int
    num_pages: int
    max_prefill_tokens: int
    prefill_graphs: bool
    prefill_graph_failures: dict[tuple[int, int], str]
    packed_attention: bool
    graph: Any
    comm: Any
    rank: int
    device: int
    stream: Any
    dense: Any
    dtype: str
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8_e4m3" (fi_engine.layers.kv_fp8)
    vocab_shard: VocabShard | None
    _kv_fp8: Any = None  # kv_fp8.KvFp8 with an FP8 cache (class default: an engine assembled without __init__)
    _kv_scales: tuple[float, float] | None = None

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type as the attention ops name it: the model's dtype, or ``float8_e4m3fn``."""
        return "float8_e4m3fn" if self._kv_fp8 is not None else self.dtype

    @property
    def kv_sm_scale(self) -> float | None:
        """The attention plans' softmax scale: None (``1/sqrt(head_dim)``), or with an FP8 cache that times its
        ``k_scale`` (the FP8 modules take no scales: flashinfer-python's wrappers fold it the same way)."""
        return self._kv_fp8.sm_scale if self._kv_fp8 is not None else None

    _cp: Any
    _s: int
    _closed: bool
    _own_comm: bool
    _allreduce: Any
    _static_moe: bool
    _ids_agree: bool
    # weights (the family's load): device addresses, descriptors of vectors, the MoE layers
    _weights: list[Any]
    _ab: Any
    _f32: Any
    _embed: int
    _lm_head: int
    _head_rows: int
    _wqkv: list[int]
    _wo: list[int]
    _wgu: list[int]
    _wd: list[int]
    _ln1: list[Any]
    _ln2: list[Any]
    _norm: Any
    _q_norm: list[Any]
    _k_norm: list[Any]
    _moe: list[Any]
    _moe_scratch: Any
    _ws_moe: Any
    # buffers (the family's allocate): activations, KV cache, step index arrays and their views
    _buf: SimpleNamespace
    _normed: Any
    _qkv_width: int
    _k_cache: list[Any]
    _v_cache: list[Any]
    _ws_prefill: Any
    _ws_decode: Any
    _dlayout: Layout
    _playout: Layout
    _dmeta: Any
    _dhost: np.ndarray
    _pmeta: Any
    _phost: np.ndarray
    _dh: dict[str, np.ndarray]
    _ph: dict[str, np.ndarray]
    _ids_mem: Any
    _ids_host: np.ndarray
    _prefill_done: Any
    _decode_ids: tuple[np.ndarray, np.ndarray]
    _decode_done: tuple[Any, Any]
    _decode_turn: int
    _views: dict[tuple[Any, ...], SimpleNamespace]
    # sampling state (made on the first sampled step)
    _probs: Any
    _gathered: Any
    _softmax_ws: Any
    _valid: Any
    _shared_draws: Any
    _slayout: Layout
    _shosts: tuple[np.ndarray, ...]
    _sturn: int
    _smeta: Any
    _smeta_mem: Any
    _choice: Any
    # the step API (serving.ServingLoop): the engine's scheduler, its requests by id, aborted ones to report
    _sched: Scheduler | None
    _requests: dict[int, Request]
    _aborted: list[Request]
    _unreported: list[StepOutput]
    _ffi_stream: Any
    # the serving loop's decode step prepared ahead, and the graphs
    _next_rows: list[Request | None] | None
    _inflight: Any  # serving.LaunchedStep or None
    _last_prefill_s: float
    _overlap_steps: bool
    _scheduler_delay_factor: float
    _mixed_prefill: bool
    _staged: Any
    _staged_wait_s: float
    _prepare_ahead: bool
    _decode_plan: Any
    _prefill_plan: Any
    graphs: dict[int, Any]
    _graph_plan_infos: dict[int, Any]
    _graph_batches: tuple[int, ...]
    _graphs_checked: set[int]
    _prefill_graph_cache: dict[tuple[int, ...], Any]
    _prefill_buckets: tuple[int, ...]
    _fused_decode: bool

    if TYPE_CHECKING:  # one part's methods that another calls

        @property
        def prefill_buckets(self) -> tuple[int, ...]:
            raise NotImplementedError

        @property
        def decode_graph_batches(self) -> tuple[int, ...]:
            raise NotImplementedError

        def _forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
            raise NotImplementedError

        def _decode_attention(self, i: int, v: SimpleNamespace) -> None:
            raise NotImplementedError

        def _prefill_attention(self, i: int, v: SimpleNamespace) -> None:
            raise NotImplementedError

        def _plan_decode(self, rows: int, cuda_graph: bool) -> None:
            raise NotImplementedError

        def _plan_prefill(self, batch: int) -> None:
            raise NotImplementedError

        def _plan_prefill_padded(self, batch: int) -> None:
            raise NotImplementedError

        def _finish_logits(self, logits: int, rows: int, columns: int) -> None:
            raise NotImplementedError

        def _embed_and_norm(self, v: SimpleNamespace, rows: int) -> None:
            raise NotImplementedError

        def _add_norm(self, v: SimpleNamespace, weight: Any) -> None:
            raise NotImplementedError

        def _head(self, rows: int, x: int) -> None:
            raise NotImplementedError

        def _view(self, kind: str, rows: int, batch: int) -> SimpleNamespace:
            raise NotImplementedError

        def _pick(
            self, v: SimpleNamespace, n: int, rows: Sequence[Request | None] | None, argmax_done: bool = False
        ) -> bool:
            raise NotImplementedError

        def _draws(self, sampling: SamplingParams | None) -> Any:
            raise NotImplementedError

        def _argmax(self, rows: int) -> None:
            raise NotImplementedError

        def _share_ids(self, sampled: bool) -> None:
            raise NotImplementedError

        def _fuses(self, rows: int) -> bool:
            raise NotImplementedError

        def _fused_step(self, v: SimpleNamespace, rows: int) -> None:
            raise NotImplementedError

        def _upload_decode(self, rows: int, n_pages: int, cuda_graph: bool) -> None:
            raise NotImplementedError

        def _prefill_bucket(self, nnz: int, batch: int) -> int | None:
            raise NotImplementedError

        def _prefill_padded(self, nnz: int, batch: int, bucket: int) -> bool:
            raise NotImplementedError

        def _check_open(self) -> None:
            raise NotImplementedError

        def _scheduler(self) -> Scheduler:
            raise NotImplementedError
