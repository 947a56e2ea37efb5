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
- the **speculator** (:class:`~fi_engine.runtime.sample.speculator.Speculator`): speculative decoding (drafts, the
  verifying pass, the policy);
- the **serving loop** (:class:`~fi_engine.runtime.serving.ServingLoop`, this class's base): ``generate``,
  ``prefill_logits`` and the step API, each step one way: schedule -> run -> sample -> record.

The engine class itself adds what sets the parts up: the settings that reach into them (prefix caching, chunked
prefill, speculation, the grammar tokenizer), the warm-ups that capture the prefill graphs before serving, and the
attributes that are the runner's (its sizes and switches).

A family engine (:class:`~fi_engine.models.llama.LlamaEngine`, ``Gemma2Engine``, ``GptOssEngine``, ``DeepSeekEngine``)
is this class with its :attr:`Engine.definition` (and the family's own constructor arguments, if any).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, cast, overload

from ..lora.manager import LoraManager
from ..lora.settings import LoraSettings
from ..text.grammar import GrammarTokenizer
from ..values import arg_flag, arg_int
from .family import ModelFamily
from .sample.logits_processing import LogitsProcessor
from .sample.speculation import DraftPolicy, SpeculationStats
from .sample.speculator import Speculator
from .sched.kv_cache import KVCacheManager
from .sched.pages import pages_for
from .sched.scheduler import Scheduler
from .serving import ServingLoop
from .settings import EngineSettings
from .worker.model_runner import ModelRunner

__all__: list[str] = []

T = TypeVar("T")


class _PartValue(Generic[T]):
    """An attribute of the engine that is one of its parts': the runner's sizes and device it was made with
    (read-only), or one of the runner's switches (``settable``); the speculator's and the logits processor's settings
    (``attr``: its name there, where another; ``doc``: the part's property, whose docstring it takes)."""

    def __init__(self, part: str = "runner", settable: bool = False, attr: str = "", doc: Any = None) -> None:
        self.part, self.settable, self.attr = part, settable, attr
        if doc is not None:
            self.__doc__ = doc.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.attr = self.attr or name

    @overload
    def __get__(self, eng: None, owner: type) -> _PartValue[T]: ...
    @overload
    def __get__(self, eng: Engine, owner: type) -> T: ...
    def __get__(self, eng: Engine | None, owner: type) -> T | _PartValue[T]:
        return self if eng is None else getattr(getattr(eng, self.part), self.attr)  # type: ignore[no-any-return]

    def __set__(self, eng: Engine, value: T) -> None:
        if not self.settable:
            raise AttributeError(f"engine.{self.name} is read-only: it is fixed when the engine is made")
        setattr(getattr(eng, self.part), self.attr, value)


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
        lora: serve LoRA adapters chosen per request (:mod:`fi_engine.lora`): a
            :class:`~fi_engine.lora.settings.LoraSettings` or a dict of its fields (``max_loras``, ``max_cpu_loras``,
            ``max_lora_rank``, ``modules``: the adapters to load now, name -> PEFT folder); None (default): none. A
            request names its adapter with ``SamplingParams(lora=name)`` or ``generate(..., lora=...)``; more are
            loaded with :meth:`load_lora`. The Llama family on one GPU (q/k/v/o, and gate/up/down where the MLP is
            dense); such an engine runs each decode step's separate launches (no fused decode step).

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

    config: _PartValue[Any] = _PartValue()
    model_config: _PartValue[Any] = _PartValue()
    max_batch: _PartValue[int] = _PartValue()
    page_size: _PartValue[int] = _PartValue()
    max_seq_len: _PartValue[int] = _PartValue()
    num_pages: _PartValue[int] = _PartValue()
    max_prefill_tokens: _PartValue[int] = _PartValue()
    device: _PartValue[int] = _PartValue()
    stream: _PartValue[Any] = _PartValue()
    comm: _PartValue[Any] = _PartValue()
    rank: _PartValue[int] = _PartValue()
    dtype: _PartValue[str] = _PartValue()
    tensor_parallel: _PartValue[int] = _PartValue()
    cuda_graph: _PartValue[bool] = _PartValue()
    prefill_graph_failures: _PartValue[dict[tuple[int, int], str]] = _PartValue()
    decode_graph_batches: _PartValue[tuple[int, ...]] = _PartValue()
    prefill_graphs: _PartValue[bool] = _PartValue(settable=True)
    fused_decode: _PartValue[bool] = _PartValue(settable=True)
    packed_attention: _PartValue[bool] = _PartValue(settable=True)
    prefill_buckets: _PartValue[tuple[int, ...]] = _PartValue(settable=True)
    # the speculator's settings (speculative decoding) and the logits processor's grammar tokenizer
    speculative_tokens: _PartValue[int] = _PartValue("speculator", True, doc=Speculator.speculative_tokens)
    speculative_config: _PartValue[dict[str, Any] | None] = _PartValue(
        "speculator", True, doc=Speculator.speculative_config
    )
    speculation_policy: _PartValue[DraftPolicy] = _PartValue("speculator", True, doc=Speculator.speculation_policy)
    draft_model: _PartValue[Any] = _PartValue("speculator", True, doc=Speculator.draft_model)
    speculation_stats: _PartValue[SpeculationStats] = _PartValue("speculator", attr="stats")
    grammar_tokenizer: _PartValue[GrammarTokenizer | None] = _PartValue(
        "processor", True, doc=LogitsProcessor.grammar_tokenizer
    )

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
        lora: LoraSettings | dict[str, Any] | None = None,
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
            lora=lora,
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
        self.lora: LoraManager | None = None  # the adapters served (LoRA settings given), else None
        if settings.lora is not None:
            try:
                self.lora = self.scheduler.adapters = self._lora_manager(cast(LoraSettings, settings.lora))
            except BaseException:
                runner.close()
                raise
        self._start_loop()
        self._closed = False

    def _lora_manager(self, settings: LoraSettings) -> LoraManager:
        """The adapters of ``settings`` (its modules read now), whose GPU slots are the runner's."""
        from ..lora.adapter import BaseShapes

        runner = self.runner
        base = BaseShapes.of(runner.config, runner.dtype)
        return LoraManager(settings, base, runner.lora.write, runner.lora.clear)

    # ------------------------------------------------------------------------------------------ LoRA adapters

    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter of folder ``path`` as ``name`` (:func:`~fi_engine.lora.adapter.read_adapter` reads
        and checks it now; it is copied to a GPU slot when a request needs it). ValueError naming ``lora``, the
        name or the adapter's key that does not fit (a name taken, a rank above ``max_lora_rank``, modules or shapes
        the base model lacks, ...); ValueError naming ``lora`` where the engine was opened without LoRA settings."""
        self._check_open()
        self._adapters().load(name, path)

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` (its GPU slot and host copy are freed). ValueError for a name not loaded, or
        one a queued or active request uses (unload it once they finish)."""
        self._check_open()
        adapters = self._adapters()
        waiting = sum(r.lora == name for r in self.scheduler.pending) + sum(
            r is not None and r.lora == name for r in self.scheduler.slots
        )
        if waiting:
            raise ValueError(f"lora_name: {name!r:.140} is in use by {waiting} request(s); unload it once they finish")
        adapters.unload(name)

    @property
    def lora_names(self) -> list[str]:
        """The adapters served, in the order they were loaded ([] without LoRA settings)."""
        return [] if self.lora is None else self.lora.names

    def _adapters(self) -> LoraManager:
        if self.lora is None:
            raise ValueError("lora: this engine serves no LoRA adapters; open it with lora={...} (LoraSettings)")
        return self.lora

    def _start_loop(self) -> None:
        super()._start_loop()
        self._max_num_batched_tokens = self.scheduler.max_prefill_tokens  # (max_num_batched_tokens)

    # ------------------------------------------------------------------------------------------ the parts' settings

    @property
    def prefix_caching(self) -> bool:
        """Whether a request's prompt reuses the KV of the longest run of full pages an earlier request computed
        for the same tokens (automatic prefix caching, as vLLM's and SGLang's): its prefill starts past them, and its
        own full pages are shared from when a pass wrote them, evicted least recently used once no request holds them
        (:mod:`~fi_engine.runtime.sched.kv_cache`). The tokens are the same as without it up to the rounding of another
        pass shape (the prefix's K/V come from the pass that computed them). Default False; ``fi-engine serve``
        turns it on where it applies: the Llama pass (whose prefill attention reads the paged cache) on one GPU;
        ValueError naming what stands in the way elsewhere (:meth:`prefix_caching_blocker`), TypeError for anything
        but a bool. ``prefill_logits`` and the warm-ups never read or fill the cache. Turning it off drops the
        cached pages (once no request holds them)."""
        return self.scheduler.prefix_caching

    @prefix_caching.setter
    def prefix_caching(self, on: bool) -> None:
        on = arg_flag("prefix_caching", on)
        why = self.prefix_caching_blocker() if on else None
        if why is not None:
            raise ValueError(f"prefix_caching: {why}; leave it off for this engine")
        self.scheduler.prefix_caching = on
        if not on:
            self.kv_cache.reset()  # (nothing dropped while a request holds pages)

    def prefix_caching_blocker(self) -> str | None:
        """Why :attr:`prefix_caching` cannot be on for this engine, or None."""
        return self.paged_prefill_blocker("a cached prefix")

    def paged_prefill_blocker(self, needs: str) -> str | None:
        """Why a prompt's prefill cannot start past K/V already in the cache (what ``needs`` it), or None."""
        runner = self.runner
        if not runner.family.llama_pass:
            return (
                f"{type(runner.family).__name__}'s prefill attention reads only the prompt's own keys and values (the "
                f"Llama family's reads the paged cache, which {needs} needs)"
            )
        if runner.comm is not None:
            return "not with tensor parallelism yet"
        return None

    @property
    def chunked_prefill(self) -> bool:
        """Whether a prompt that does not fit a prefill pass's :attr:`max_num_batched_tokens` rows (with the decoding
        requests riding in it, :attr:`mixed_prefill`) is prefilled in chunks over several passes, each continuing
        from the K/V the last wrote, so the running streams take a token from each pass instead of waiting for the
        whole prompt (vLLM's chunked prefill); prompts longer than ``max_prefill_tokens`` are accepted then (up to
        ``max_seq_len``). The request takes its first token from its last chunk's pass. Its tokens are the same as
        without it up to the rounding of other pass shapes. A prompt whose ``prompt_logprobs`` are asked is
        prefilled whole. Default False; ``fi-engine serve`` turns it on where it applies (as :attr:`prefix_caching`:
        the Llama pass on one GPU; ValueError naming what stands in the way elsewhere, TypeError for anything but a
        bool). ``prefill_logits`` and the warm-ups prefill whole prompts."""
        return self.scheduler.chunk_tokens > 0

    @chunked_prefill.setter
    def chunked_prefill(self, on: bool) -> None:
        on = arg_flag("chunked_prefill", on)
        why = self.paged_prefill_blocker("a prompt's later chunk") if on else None
        if why is not None:
            raise ValueError(f"chunked_prefill: {why}; leave it off for this engine")
        self.scheduler.chunk_tokens = self._max_num_batched_tokens if on else 0

    @property
    def max_num_batched_tokens(self) -> int:
        """The most token rows of one prefill pass with :attr:`chunked_prefill` on (the decoding requests riding in it
        and the prompts' tokens; vLLM's option of that name): 1 to ``max_prefill_tokens`` (the default). Fewer rows
        make each pass, hence each running stream's token during a long prompt's prefill, quicker, and the prompt's
        first token later. ValueError naming it outside that range."""
        return self._max_num_batched_tokens

    @max_num_batched_tokens.setter
    def max_num_batched_tokens(self, tokens: int) -> None:
        sched = self.scheduler
        self._max_num_batched_tokens = arg_int("max_num_batched_tokens", tokens, 1, sched.max_prefill_tokens)
        if sched.chunk_tokens:
            sched.chunk_tokens = self._max_num_batched_tokens

    @property
    def prefix_cache_stats(self) -> Any:
        """The prefix cache's counters (:class:`~fi_engine.runtime.sched.kv_cache.PrefixCacheStats`: requests, prompt
        tokens looked up, tokens found, evictions, ``hit_rate``)."""
        return self.kv_cache.stats

    def warm_prefill(self, lengths: Sequence[int], batch: int = 1) -> list[tuple[int, int]]:
        """Capture, before serving, the prefill graphs that prefills of ``lengths`` token rows in all, of ``batch``
        requests each, will replay, so that no request pays a capture (a bucket met the first time costs about
        one eager prefill more than a replay; benchmarks/RESULTS.md. Each length runs one prefill of ``batch``
        dummy prompts (token 0, ``lengths[i]`` tokens together) with one new token and frees their pages; lengths
        of one bucket capture it once. Nothing is captured where prefill graphs do not apply (``prefill_graphs =
        False``, MoE layers, tensor parallelism, the subclass engines) or a capture fails (a warning says so).

        Args:
            lengths: token rows per prefill, each in ``[batch, max_prefill_tokens]``, at most
                ``batch * (max_seq_len - 1)`` (each dummy prompt leaves room for its token), and with pages for
                all ``batch`` prompts at once in the KV cache (``num_pages - 1``).
            batch: requests per prefill, in ``[1, max_batch]``.

        Returns:
            the ``(bucket rows, request slots)`` of every prefill graph the engine now holds, in replay order (a
            graph of ``s`` slots serves prefills of 1 to ``s`` requests:
            :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`).
        """
        self._check_open()
        max_batch = self.runner.max_batch
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= max_batch:
            raise ValueError(f"batch: expected requests per prefill in [1, {max_batch}], got {batch!r:.40}")
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
            raise ValueError(f"lengths: expected a non-empty list of token-row counts, got {lengths!r:.60}")
        top = self._warm_top(batch)
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or not batch <= n <= top:
                raise ValueError(
                    f"lengths[{i}]: expected token rows in [{batch}, {top}] (at least one per request; at most "
                    f"max_prefill_tokens, and max_seq_len - 1 per request), got {n!r:.40}"
                )
        runs = []
        for i, n in enumerate(lengths):
            prompts, need = self._warm_prompts(n, batch)
            if need > self.runner.num_pages - 1:
                raise ValueError(
                    f"lengths[{i}]: {n} token rows of {batch} requests need {need} KV pages, the cache has "
                    f"{self.runner.num_pages - 1} (they would not be prefilled together)"
                )
            runs.append(prompts)
        return self._warm(runs)

    def warm_serving(self) -> list[tuple[int, int]]:
        """Capture, before serving, the prefill graphs the step API's passes replay: every token bucket of at least
        ``max_batch`` rows (:attr:`prefill_buckets`) at ``max_batch`` request slots, the shape of every pass
        :meth:`step` runs with :attr:`overlap_steps` (mixed or not). A pass that meets a shape first costs a
        capture, during which every request waits: 30-40 ms on an H100 for SmolLM2-135M, where a pass replays in
        2-5 ms; measured serving 64 streams, one or two of them fell inside each 3 s load (benchmarks/RESULTS.md).
        ``fi-engine serve`` calls it with CUDA graphs on. Buckets whose dummy prompts the KV cache or
        ``max_seq_len`` cannot hold are left to be captured when met; where prefill graphs do not apply, nothing is
        captured (:meth:`warm_prefill`). Returns :meth:`warm_prefill`'s list of the graphs held."""
        self._check_open()
        batch = self.runner.max_batch
        top = self._warm_top(batch)
        runs = []
        for n in self.runner.prefill_buckets:
            if batch <= n <= top:
                prompts, need = self._warm_prompts(n, batch)
                if need <= self.runner.num_pages - 1:
                    runs.append(prompts)
        return self._warm(runs)

    def _warm_top(self, batch: int) -> int:
        """The most token rows a warm-up prefill of ``batch`` dummy prompts may have: ``max_prefill_tokens``, and
        room for each prompt's one new token within ``max_seq_len``."""
        return min(self.runner.max_prefill_tokens, batch * (self.runner.max_seq_len - 1))

    def _warm_prompts(self, rows: int, batch: int) -> tuple[list[list[int]], int]:
        """The ``batch`` dummy prompts (token 0) of a warm-up prefill of ``rows`` token rows, and the KV pages they
        need at once: the scheduler admits them together only if the cache holds them (page 0 is the padding
        page); short of pages it would prefill fewer requests at a time and capture another shape."""
        prompts = [[0] * (rows // batch + (1 if r < rows % batch else 0)) for r in range(batch)]
        return prompts, sum(pages_for(len(p), self.runner.page_size) for p in prompts)

    def _warm(self, runs: list[list[list[int]]]) -> list[tuple[int, int]]:
        """One prefill of each set of dummy prompts (a new token each, their pages freed), so that its graph is
        captured now; the ``(bucket rows, request slots)`` of every prefill graph the engine then holds."""
        with self.scheduler.whole_prompts():
            for prompts in runs:
                self.generate(prompts, 1, eos_token_ids=())
        return self.runner.prefill_graph_shapes()

    # ------------------------------------------------------------------------------------------ the engine itself

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a request submitted without ids of its own (the checkpoint config's), ascending."""
        return tuple(sorted(self.scheduler.eos))

    def moe_path_for(self, rows: int) -> str:
        """``"routed"`` or ``"dense"``: the path the MoE layers take for a step of ``rows`` token rows (the family's
        ``moe_path``: :class:`~fi_engine.models.moe_paths.MoEPaths`; ``"routed"`` for a family without it)."""
        return self.family.moe_path_for(self.runner, rows)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (the engine serves nothing more)."""
        return self._closed

    def close(self) -> None:
        """Free the draft model's engine, the runner's graphs, workspaces and handles, then what the family made.
        Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self.speculator.close()
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
