"""The engine: one model served on one GPU (or one tensor-parallel rank), assembled from parts, each an object of its
own module with a narrow interface:

- the **family definition** (:mod:`~fi_engine.runtime.family`; :class:`~fi_engine.models.llama.Llama`,
  :class:`~fi_engine.models.gemma2.Gemma2`, :class:`~fi_engine.models.gpt_oss.GptOss`,
  :class:`~fi_engine.models.deepseek.DeepSeek`): config checks, weights, layer body, attention plans;
- the **model runner** (:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`): the model on the GPU (weights,
  buffers, the KV cache's tensors, CUDA graphs, the fused decode step), staging and running one step at a time;
- the **scheduler** (:class:`~fi_engine.runtime.sched.scheduler.Scheduler`) with the KV-cache manager
  (:class:`~fi_engine.runtime.sched.kv_cache.KVCacheManager`: the pages, and the prompt prefixes cached in them): the
  requests, their slots and pages, admission, a step's rows;
- the **logits processor** (:class:`~fi_engine.runtime.sample.logits_processing.LogitsProcessor`): the log-probabilities
  and sampling controls (a grammar's mask, bias, penalties, ``min_tokens``, ``min_p``) of the rows that ask;
- the **sampler** (:class:`~fi_engine.runtime.sample.sampler.Sampler`): greedy, top-k / top-p, each request with its own
  parameters, over the runner's logits;
- the **serving loop** (:class:`~fi_engine.runtime.serving.ServingLoop`, this class's base): ``generate``,
  ``prefill_logits``, the warm-ups and the step API, each step one way: schedule -> run -> sample -> record.

A family engine (:class:`~fi_engine.models.llama.LlamaEngine`, ``Gemma2Engine``, ``GptOssEngine``, ``DeepSeekEngine``)
is this class with its :attr:`Engine.definition` (and the family's own constructor arguments, if any).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from .family import ModelFamily
from .sample.logits_processing import LogitsProcessor
from .sched.kv_cache import KVCacheManager
from .sched.scheduler import Scheduler
from .serving import ServingLoop
from .settings import EngineSettings
from .worker.model_runner import ModelRunner

__all__: list[str] = []

T = TypeVar("T")


class _RunnerValue(Generic[T]):
    """An attribute of the engine that is its runner's: the sizes and device it was made with (read-only), or one of
    the runner's switches (``settable``)."""

    def __init__(self, settable: bool = False) -> None:
        self.settable = settable

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, eng: None, owner: type) -> _RunnerValue[T]: ...
    @overload
    def __get__(self, eng: Engine, owner: type) -> T: ...
    def __get__(self, eng: Engine | None, owner: type) -> T | _RunnerValue[T]:
        return self if eng is None else getattr(eng.runner, self.name)  # type: ignore[no-any-return]

    def __set__(self, eng: Engine, value: T) -> None:
        if not self.settable:
            raise AttributeError(f"engine.{self.name} is read-only: it is fixed when the engine is made")
        setattr(eng.runner, self.name, value)


class Engine(ServingLoop):
    """Loads a checkpoint of the family :attr:`definition` onto one GPU (or ``tensor_parallel`` GPUs) and serves
    batches of token-id prompts.

    Args:
        model_dir: a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).
        max_batch: batch slots: requests decoded together (the largest decode CUDA graph's rows).
        page_size: tokens per KV-cache page.
        max_seq_len: the most tokens (prompt + generated) per request; default
            ``min(max_position_embeddings, 4096)``.
        num_pages: KV-cache pages (page 0 is the padding page); default enough for ``max_batch`` requests of
            ``max_seq_len`` tokens.
        max_prefill_tokens: the most prompt tokens prefilled together (sizes the activation buffers); default
            ``max(max_seq_len, max_batch)``.
        cuda_graph: capture the decode step once and replay it.
        device: the CUDA device ordinal (default 0; with tensor parallelism the communicator's).
        tensor_parallel: ranks the model is split over (:mod:`fi_engine.layers.tensor_parallel`): every rank makes
            its engine with the same arguments and makes the same calls (``fi-ffi generate --tp N`` does that).
        comm: the ranks' :class:`~fi_ffi.comm.nccl.Communicator` (default: made from the launcher's variables,
            and closed with the engine).
        fused_allreduce: sum the partial outputs with the fused all-reduce + residual + RMSNorm kernel where it
            applies (False: NCCL's all-reduce, then ``fused_add_rmsnorm``).
        vocab_parallel: with ``tensor_parallel > 1``, each rank keeps ``1/N`` of the embedding and LM head rows
            (:class:`~fi_engine.layers.tensor_parallel.VocabShard`); False: both whole on every rank.
        kv_cache_dtype: ``"auto"`` (or None): the KV cache in the model's dtype; ``"fp8_e4m3"`` (or ``"fp8"``):
            float8 e4m3 with a per-tensor scale, half the bytes per token (:mod:`fi_engine.layers.kv_fp8`: bfloat16
            Llama-family models with head_dim 128; anything else is refused here, naming what is missing).
        kv_cache_scales: with an FP8 cache, ``(k_scale, v_scale)`` (stored = value / scale); None: the
            checkpoint's ``self_attn.k_scale`` / ``v_scale`` tensors (the largest over the layers), else 1.0.

        family: the family definition to serve with (default: :attr:`definition`'s, made with no options); a family
            engine class passes its own, made with its constructor's family options (``moe_path``, ...).

    Parts: ``runner`` (:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`), ``scheduler``
    (:class:`~fi_engine.runtime.sched.scheduler.Scheduler`), ``kv_cache`` (its pages:
    :class:`~fi_engine.runtime.sched.kv_cache.KVCacheManager`), ``sampler``
    (:class:`~fi_engine.runtime.sample.sampler.Sampler`), ``family``. The sizes the engine was made with (``config``,
    ``model_config``, ``max_batch``, ``page_size``, ``max_seq_len``, ``num_pages``, ``max_prefill_tokens``) and its
    device (``device``, ``stream``, ``comm``, ``rank``, ``dtype``, ``tensor_parallel``, ``cuda_graph``) are the
    runner's, read through the engine; so are the runner's switches ``prefill_graphs``, ``fused_decode``,
    ``packed_attention`` and ``prefill_buckets`` (settable), ``prefill_graph_failures`` and
    ``decode_graph_batches`` (see :class:`~fi_engine.runtime.worker.model_runner.ModelRunner`). ``model_dir``: the
    checkpoint, whose ``tokenizer.json`` the engine reads at the first request with a ``grammar``
    (``grammar_tokenizer``, which a server in the same process sets with its own).
    """

    definition: type[ModelFamily] = ModelFamily
    """The model family this engine class serves (a subclass sets it; one instance per engine, ``family``)."""

    config: _RunnerValue[Any] = _RunnerValue()
    model_config: _RunnerValue[Any] = _RunnerValue()
    max_batch: _RunnerValue[int] = _RunnerValue()
    page_size: _RunnerValue[int] = _RunnerValue()
    max_seq_len: _RunnerValue[int] = _RunnerValue()
    num_pages: _RunnerValue[int] = _RunnerValue()
    max_prefill_tokens: _RunnerValue[int] = _RunnerValue()
    device: _RunnerValue[int] = _RunnerValue()
    stream: _RunnerValue[Any] = _RunnerValue()
    comm: _RunnerValue[Any] = _RunnerValue()
    rank: _RunnerValue[int] = _RunnerValue()
    dtype: _RunnerValue[str] = _RunnerValue()
    tensor_parallel: _RunnerValue[int] = _RunnerValue()
    cuda_graph: _RunnerValue[bool] = _RunnerValue()
    prefill_graph_failures: _RunnerValue[dict[tuple[int, int], str]] = _RunnerValue()
    decode_graph_batches: _RunnerValue[tuple[int, ...]] = _RunnerValue()
    prefill_graphs: _RunnerValue[bool] = _RunnerValue(settable=True)
    fused_decode: _RunnerValue[bool] = _RunnerValue(settable=True)
    packed_attention: _RunnerValue[bool] = _RunnerValue(settable=True)
    prefill_buckets: _RunnerValue[tuple[int, ...]] = _RunnerValue(settable=True)

    def __init__(
        self,
        model_dir: str | Path,
        *,
        family: ModelFamily | None = None,
        max_batch: int = 32,
        page_size: int = 16,
        max_seq_len: int | None = None,
        num_pages: int | None = None,
        max_prefill_tokens: int | None = None,
        cuda_graph: bool = False,
        device: int | None = None,
        tensor_parallel: int = 1,
        comm: Any = None,
        fused_allreduce: bool = True,
        vocab_parallel: bool = True,
        kv_cache_dtype: str | None = "auto",
        kv_cache_scales: tuple[float, float] | None = None,
    ) -> None:
        self._closed = True  # until every part is made
        settings = EngineSettings(
            max_batch=max_batch,
            page_size=page_size,
            max_seq_len=max_seq_len,
            num_pages=num_pages,
            max_prefill_tokens=max_prefill_tokens,
            cuda_graph=cuda_graph,
            device=device,
            tensor_parallel=tensor_parallel,
            comm=comm,
            fused_allreduce=fused_allreduce,
            vocab_parallel=vocab_parallel,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_scales=kv_cache_scales,
        )  # every argument checked here, before the checkpoint is read
        if family is None:
            family = self.definition()
        elif not isinstance(family, self.definition):
            raise TypeError(
                f"family: expected a {self.definition.__name__} definition for {type(self).__name__}, got "
                f"{type(family).__name__}"
            )
        self.family = family
        self.settings = settings
        self.model_dir = model_dir
        runner = self.runner = ModelRunner(family, model_dir, settings)
        self.sampler = runner.sampler
        c = runner.config
        self.processor = LogitsProcessor(runner.cupy, runner.buffers.logits, c.vocab_size, frozenset(c.eos_token_ids))
        self.kv_cache = KVCacheManager(runner.num_pages, runner.page_size)  # caching once prefix_caching is on
        self.scheduler = Scheduler(
            self.kv_cache,
            runner.page_size,
            runner.max_batch,
            runner.max_seq_len,
            runner.max_prefill_tokens,
            c.vocab_size,
            c.eos_token_ids,
        )
        self._start_loop()
        self._closed = False

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a request submitted without ids of its own (the checkpoint config's), ascending."""
        return tuple(sorted(self.scheduler.eos))

    def moe_path_for(self, rows: int) -> str:
        """``"routed"`` or ``"dense"``: the path the MoE layers take for a step of ``rows`` token rows (the family's
        ``moe_path``: :class:`~fi_engine.runtime.moe_paths.MoEPaths`; ``"routed"`` for a family without it)."""
        return self.family.moe_path_for(self.runner, rows)

    def close(self) -> None:
        """Free the runner's graphs, workspaces and handles, then what the family made. Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._close_draft_model()
            finally:
                self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        comm = self.runner.comm if hasattr(self, "runner") else None
        if exc is not None and comm is not None and not self._closed and not isinstance(exc, GeneratorExit):
            # With TP an exception on one rank would leave the others waiting in a collective and this rank in
            # close()'s own: tell them (they exit naming this rank; fi_ffi.comm.watchdog) and skip the teardown.
            comm.abort(f"{type(exc).__name__}: {exc}")
        self.close()
