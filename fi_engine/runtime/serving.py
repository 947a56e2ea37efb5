"""The serving loop over the engine's parts: prompts queued as requests in the scheduler
(:mod:`~fi_engine.runtime.sched`), admitted into free batch slots and prefilled together, then one decode step after
another over every active request until each ends (an end-of-sequence token, its token limit or an abort), its pages
freed; :class:`GenerationResult` with the tokens and the timings. The loop is driven by ``generate`` to the end of its
prompts, or one step at a time by the step API (``add_request`` / ``step`` / ``abort_request``,
:class:`~fi_engine.runtime.stepping.StepEngine`); both run the same step (``ServingLoop._advance``) over the engine's
one scheduler.

Each step goes one way through the parts: the **scheduler** picks the rows (admission, the decode rows, their pages),
the **model runner** (:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`) stages them and runs the forward pass
and the LM head, the **sampler** (:class:`~fi_engine.runtime.sample.sampler.Sampler`) picks each row's token, the runner
copies the tokens out, and the scheduler records them. The loop is the same for every model family; what differs is the
runner's family definition.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast, overload

import numpy as np

from ..kernels import flashinfer as kernels
from ..kernels.flashinfer import stream_scope
from ..text.grammar import GrammarMatcher, GrammarTokenizer
from ..values import arg_int
from .sample.logits_processing import LogitsProcessor, PendingLogprobs, PendingPromptLogprobs
from .sample.sampler import Draws, Sampler
from .sample.speculation import (
    DraftModelProposer,
    DraftPolicy,
    NgramProposer,
    SpeculationStats,
    accepted_tokens,
    same_directory,
    speculative_config_arg,
    tokenizer_difference,
)
from .sampling_params import SamplingParams, asks_processing, sampling_arg, sets_controls
from .sched.kv_cache import KVCacheManager
from .sched.pages import pages_for
from .sched.request import Request
from .sched.scheduler import Scheduler
from .stepping import FinishReason, NewRequest, StepEngineBase, StepOutput, TokenLogprobs
from .worker.graph_shapes import prefill_slots
from .worker.model_runner import ModelRunner

__all__ = ["GenerationResult", "delay_factor_arg", "mixed_prefill_arg", "overlap_steps_arg"]


def _switch(name: str, value: object) -> bool:
    """A switch of the step API checked: a bool, else TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return value


def overlap_steps_arg(overlap_steps: object) -> bool:
    """``overlap_steps`` checked: a bool, else TypeError naming it."""
    return _switch("overlap_steps", overlap_steps)


def mixed_prefill_arg(mixed_prefill: object) -> bool:
    """``mixed_prefill`` checked: a bool, else TypeError naming it."""
    return _switch("mixed_prefill", mixed_prefill)


def delay_factor_arg(scheduler_delay_factor: object) -> float:
    """``scheduler_delay_factor`` checked: a number in [0, 100] (not a bool), as a float; else ValueError naming it."""
    value = scheduler_delay_factor
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"scheduler_delay_factor: expected a number in [0, 100], got {value!r:.40}")
    return float(value)


T = TypeVar("T")


class _Setting(property, Generic[T]):
    """A setting of the step API: a property that keeps its value in ``_<name>`` on the engine and checks every value
    set with ``check`` (its ``*_arg`` function: the value, or TypeError / ValueError naming it). ``doc``: its
    docstring."""

    def __init__(self, check: Callable[[object], T], doc: str) -> None:
        super().__init__(self._get, self._set)
        self.check = check
        self.__doc__ = doc  # a property subclass's own docstring is its instance's, not the class's

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    def _get(self, obj: object) -> T:
        return cast("T", getattr(obj, self.attr))

    def _set(self, obj: object, value: T) -> None:
        setattr(obj, self.attr, self.check(value))

    # typed for the checker (a plain property's value is Any)
    @overload  # type: ignore[override]
    def __get__(self, obj: None, owner: type, /) -> _Setting[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None, /) -> T: ...

    def __get__(self, obj: object, owner: type | None = None, /) -> Any:
        return super().__get__(obj, owner)

    def __set__(self, obj: object, value: T, /) -> None:
        super().__set__(obj, value)


# the scheduler's finish reasons as the step API's (fi_engine.runtime.stepping.FinishReason)
_FINISH: dict[str, FinishReason] = {"eos": "stop", "length": "length", "abort": "abort"}


@dataclass(frozen=True)
class _LaunchedStep:
    """A decode step launched and not yet recorded: its rows (None: a padding row), the page-locked buffer its
    tokens are copied into and the event that marks the end of that copy (ServingLoop._decode_launch)."""

    rows: list[Request | None]
    ids: np.ndarray
    done: Any
    logprobs: PendingLogprobs | None = None  # the log-probabilities of its rows that ask (logits_processing)


@dataclass(frozen=True)
class _LaunchedPass:
    """A prefill pass launched and not yet recorded (ServingLoop._prefill_launch): the decoding requests it carried
    (``riders``), the requests it prefilled (``admitted``), the slot of each (its token's place among the pass's
    tokens: it chooses one per slot, ModelRunner.prefill_tokens) and the event that marks the end of their copy."""

    riders: list[Request]
    admitted: list[Request]
    slots: list[int]
    done: Any
    logprobs: PendingLogprobs | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None  # those of its admitted requests that ask


@dataclass
class GenerationResult:
    """Tokens per prompt (in the order given) and timings.

    ``decode_steps``: decode steps run; ``decode_tokens``: tokens they produced; ``decode_s``: their wall time;
    ``step_host_us``: host time of each step (building the index arrays, planning, launching, and handling the
    sampled tokens; the wait for the GPU excluded).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    step_host_us: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens per second of decode-step wall time."""
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def host_us_per_step(self) -> float:
        """Median host time per decode step, in microseconds."""
        return float(np.median(self.step_host_us)) if self.step_host_us else 0.0


class ServingLoop(StepEngineBase):
    """The engine's public serving calls: :meth:`generate`, :meth:`prefill_logits`, :meth:`warm_prefill`, and the
    step API (:class:`~fi_engine.runtime.stepping.StepEngine`: :meth:`add_request`, :meth:`abort_request`, :meth:`step`,
    :attr:`has_unfinished`), with the prefill and decode steps they run. ``generate`` drives the same step
    (:meth:`_advance`) as :meth:`step`, over the same scheduler, until its own prompts are done.

    Its parts (set by :class:`~fi_engine.runtime.engine.Engine`'s constructor): ``runner``, ``scheduler``, ``kv_cache``
    (the scheduler's page pool) and ``sampler``."""

    runner: ModelRunner  # the model on the GPU: stages and runs each step, copies its tokens out
    scheduler: Scheduler  # the requests, their slots and KV pages: admission, a step's rows, the tokens recorded
    kv_cache: KVCacheManager  # the KV cache's pages and the prompt prefixes cached in them (the scheduler's pool)
    sampler: Sampler  # each row's token from its logits (greedy, or drawn with the request's parameters)
    processor: LogitsProcessor  # the logprobs and sampling controls of the rows that ask, before the sampler
    model_dir: Any  # the checkpoint directory (its tokenizer.json: the grammar_tokenizer, made on first use)
    _grammars: GrammarTokenizer | None  # grammar_tokenizer's value
    # the step API's requests by id, the aborted ones the next step() reports, the ends a failed step() had recorded
    _requests: dict[int, Request]
    _aborted: list[Request]
    _unreported: list[StepOutput]
    _ffi_stream: Any  # TVM-FFI's stream scope of the runner's stream, made on the first step()
    _next_rows: list[Request | None] | None  # the decode step the runner staged ahead (its rows), or None
    _inflight: _LaunchedStep | None  # the decode step step() launched and left running (overlap_steps)
    _last_prefill_s: float  # the host time of the last prefill (_admit's delay)
    _overlap_steps: bool
    _scheduler_delay_factor: float
    _mixed_prefill: bool
    _closed: bool
    _max_num_batched_tokens: int
    _proposer: NgramProposer | DraftModelProposer | None  # speculative decoding's drafts (None: off)
    _draft_model: Any  # the engine of speculative decoding's draft model (draft_model), or None
    _policy: DraftPolicy  # whether a step's drafts are worth a verifying pass
    _draft_draws: Any
    _verify_next: bool  # the policy found a verifying pass worth it a step ago (generate's pipelined loop)
    _recorded_at: float | None  # when the last decode step's or verifying pass's tokens were recorded (the policy's)
    _pass_s: float | None  # the last verifying pass's time, until the step after it is recorded
    _lookup: weakref.WeakKeyDictionary[Request, np.ndarray]  # each speculating request's prompt, as an array
    speculation_stats: SpeculationStats

    def _start_loop(self) -> None:
        """The loop's state before the first request (the constructor calls it once the parts exist)."""
        self._requests = {}
        self._aborted = []
        self._unreported = []
        self._ffi_stream = None
        self._next_rows = None
        self._inflight = None
        self._last_prefill_s = 0.0
        self._grammars = None
        # the step API launches each decode step and returns, its tokens coming with the next step() (one GPU;
        # _serve_step): the caller's handling of a step's tokens overlaps the next step on the GPU. Off by default
        # (step() then returns each step's own tokens); the servers turn it on (models.registry.open_engine)
        self.overlap_steps = False
        # the step API's admission waits while others decode, up to this many times the last prefill's time, so a
        # burst of arrivals is prefilled in fewer passes (_admit); 0: admitted at the next step
        self.scheduler_delay_factor = 0.0
        # the step API's prefill passes also decode the active requests (mixed_prefill); off by default (their
        # riders' logits come from the prefill's kernels); the servers turn it on (models.registry.open_engine)
        self.mixed_prefill = False
        self._max_num_batched_tokens = self.scheduler.max_prefill_tokens
        self._proposer = None
        self._draft_model = None
        self._policy = DraftPolicy()
        self._policy_for: tuple[int, Any] = (0, None)  # the (k, draft model) whose costs _policy measured
        self._draft_draws = None  # the Philox stream of sampled rows in verifying passes (made on first use)
        self._verify_next = False
        self._recorded_at = None
        self._pass_s = None
        self._lookup = weakref.WeakKeyDictionary()
        self.speculation_stats = SpeculationStats()

    pipelined_decode = True
    """With the decode graph on one GPU and the next step prepared ahead: ``generate``'s loop, and :meth:`step`
    with :attr:`overlap_steps`, launch decode step n + 1 before waiting for step n's tokens (its input tokens are
    copied on the device from step n's output; its index arrays and plan were staged while step n ran), so the GPU
    goes from step to step without waiting for the host to read tokens and launch. A request that ends with an
    end-of-sequence token at step n takes nothing from step n + 1; steps that would admit queued requests, or
    after which a request reaches its token limit, are not launched ahead. Sampled rows draw as they would one step
    at a time (the same Philox offsets in the same order), with one exception: where an end-of-sequence token at
    step n empties the highest occupied slot, step n + 1 (launched ahead) still replays the graph of the rows it was
    prepared for, where one step at a time would replay a smaller one (:meth:`Scheduler.graph_rows`), so the other
    rows' logits come from other GEMM shapes and a sampling call's Philox offset advances by that graph's rows: the
    tokens after that step may differ from a run with this off (each run still reproduces itself). Set it on the
    class to compare (``benchmarks/bench_llama_tp.py --variants no-pipeline``)."""

    pipelined_prefill = True
    """With :attr:`overlap_steps`, the decode graph on one GPU and steps prepared ahead: a queued request's prefill
    pass is prepared while the decode step in flight runs and launched behind it, its riders fed that step's tokens
    on the device (:meth:`_serve_step`), instead of after the host has waited for that step. Set it on the class to
    compare (``benchmarks/bench_serve.py compare``'s closed-loop rows)."""

    # ------------------------------------------------------------------------------------ the step API

    overlap_steps = _Setting(
        overlap_steps_arg,
        """Whether :meth:`step` leaves its decode step running and reports its tokens with the next call (one GPU;
        :meth:`_serve_step`). Default False; ``fi-engine serve`` turns it on. TypeError for anything but a bool.""",
    )
    mixed_prefill = _Setting(
        mixed_prefill_arg,
        """Whether the step API's prefill passes also decode the requests already active (SGLang's mixed chunk; what
        vLLM's chunked prefill does for prompts that fit one pass): each decoding request feeds its last token as one
        more row of the pass, at its position, attending to its cached tokens through the prefill attention, and
        gets its next token from it. A prefill then costs the batch a pass with a few more rows instead of a pass
        and the decode step it held back. Default False; ``fi-engine serve`` turns it on. One GPU and the Llama
        pass (the prefill attention reads the paged cache); elsewhere, and where the prompts leave no rows for the
        decoding requests (``max_prefill_tokens``), a prefill runs alone as before. The riders' logits come from the
        prefill's kernels (other sums than the decode step's): equal within bfloat16 rounding, not bit for bit, so a
        greedy token at a near tie may differ from ``generate``'s. TypeError for anything but a bool.""",
    )

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
        on = _switch("prefix_caching", on)
        why = self.prefix_caching_blocker() if on else None
        if why is not None:
            raise ValueError(f"prefix_caching: {why}; leave it off for this engine")
        self.scheduler.prefix_caching = on
        if not on:
            self.kv_cache.reset()  # (nothing dropped while a request holds pages)

    def prefix_caching_blocker(self) -> str | None:
        """Why :attr:`prefix_caching` cannot be on for this engine, or None."""
        return self._paged_prefill_blocker("a cached prefix")

    def _paged_prefill_blocker(self, needs: str) -> str | None:
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
        on = _switch("chunked_prefill", on)
        why = self._paged_prefill_blocker("a prompt's later chunk") if on else None
        if why is not None:
            raise ValueError(f"chunked_prefill: {why}; leave it off for this engine")
        self.scheduler.chunk_tokens = self._max_num_batched_tokens if on else 0

    @property
    def speculative_tokens(self) -> int:
        """Speculative decoding (:mod:`~fi_engine.runtime.sample.speculation`): the most draft tokens a request is fed
        per pass, 0 (the default) for off, at most 16. The drafts come from the :attr:`draft_model` where one is set
        (vLLM's ``draft_model`` method: its greedy continuation of the request's text), else from prompt lookup
        (vLLM's ``ngram`` method: where a request's last tokens occurred earlier in its prompt or output, the tokens
        that followed). One pass over a request's last token and its draft (the prefill pass, ``k + 1`` rows a
        request) gives it the draft's tokens that the model's choices accept and one more: 1 to ``k + 1`` tokens for
        about one decode step's weight reads. A greedy request's choices are its rows' argmax; a sampled one's,
        draws from its distribution at each row, which makes this speculative sampling (the tokens follow the
        distribution of decoding one at a time; :mod:`~fi_engine.runtime.sample.speculation`); a seeded request is not
        speculated (its draws stay its own). A step verifies drafts only where the policy expects the pass to pay
        (:class:`~fi_engine.runtime.sample.speculation.DraftPolicy`: a verifying pass, with its drafting, costs more
        than a decode step, and text the drafts do not predict gains nothing); a step that does not, or where no request
        has a draft, is an ordinary decode step, as is one with a request that sets a sampling control (not
        speculated yet; logprobs are read from the pass's rows). The greedy choices are computed by the prefill's
        kernels (equal to the decode step's within bfloat16 rounding, so a near tie may go the other way).
        ``speculation_stats`` counts the passes, drafted and accepted tokens. Where :attr:`prefix_caching` applies (the
        Llama pass on one GPU); ValueError naming what stands in the way elsewhere or for a count out of range."""
        return 0 if self._proposer is None else self._proposer.k

    @speculative_tokens.setter
    def speculative_tokens(self, k: int) -> None:
        k = arg_int("speculative_tokens", k, 0, 16)
        why = self._paged_prefill_blocker("a draft verified against the cache") if k else None
        if why is not None:
            raise ValueError(f"speculative_tokens: {why}; leave it 0 for this engine")
        proposer: NgramProposer | DraftModelProposer | None = None
        if k:
            proposer = NgramProposer(k) if self._draft_model is None else DraftModelProposer(self._draft_model, k)
        self._proposer = proposer
        if k and (k, self._draft_model) != self._policy_for:
            # measured again where the pass's cost changes (k, the drafter); kept while speculation is off
            self._policy = DraftPolicy()
            self._policy_for = (k, self._draft_model)

    @property
    def speculative_config(self) -> dict[str, Any] | None:
        """Speculative decoding as vLLM's ``speculative_config`` gives it: None (off), ``{"method": "ngram",
        "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}`` (prompt lookup with the
        n-gram sizes of :class:`~fi_engine.runtime.sample.speculation.NgramProposer`, 4 and 1 unless set) or
        ``{"method": "draft_model", "model": DIR, "num_speculative_tokens": k}`` (the :attr:`draft_model`'s drafts;
        ``model`` its checkpoint). Set it to None or such a mapping (the sizes optional; a ``model`` given must be
        the draft model's, which this setter does not open: ``fi_engine.models.registry.open_engine`` does, or set
        :attr:`draft_model` first); ValueError/TypeError naming the key otherwise, or where speculation does not
        apply (:attr:`speculative_tokens`)."""
        p = self._proposer
        if p is None:
            return None
        if isinstance(p, DraftModelProposer):
            return {
                "method": "draft_model",
                "model": str(getattr(p.engine, "model_dir", "")),
                "num_speculative_tokens": p.k,
            }
        return {
            "method": "ngram",
            "num_speculative_tokens": p.k,
            "prompt_lookup_max": p.prompt_lookup_max,
            "prompt_lookup_min": p.prompt_lookup_min,
        }

    @speculative_config.setter
    def speculative_config(self, config: Mapping[str, Any] | None) -> None:
        checked = speculative_config_arg(config)
        if checked is None:
            self.speculative_tokens = 0
            return
        draft = self._draft_model
        if checked.method == "draft_model":
            if draft is None:
                raise ValueError(
                    "speculative_config: the 'draft_model' method needs the draft model's engine: set "
                    "engine.draft_model to one, or open both with fi_engine.models.registry.open_engine(..., "
                    "speculative_config={'model': DIR, ...})"
                )
            if checked.model is not None and not same_directory(checked.model, getattr(draft, "model_dir", None)):
                raise ValueError(
                    f"speculative_config['model']: {checked.model!r} is not the draft model set "
                    f"({getattr(draft, 'model_dir', None)!s}); set engine.draft_model to its engine first"
                )
            self.speculative_tokens = checked.k
            return
        if draft is not None:
            raise ValueError(
                "speculative_config: the 'ngram' method while a draft model is set (engine.draft_model); set "
                "engine.draft_model = None first"
            )
        self.speculative_tokens = checked.k  # (the checks that it applies)
        self._proposer = NgramProposer(checked.k, checked.prompt_lookup_max, checked.prompt_lookup_min)

    @property
    def speculation_policy(self) -> DraftPolicy:
        """The :class:`~fi_engine.runtime.sample.speculation.DraftPolicy` that decides which steps verify drafts, with
        what it measured (a decode step's and a pass's time, each request's acceptance). A new one is made where the
        pass's cost changes (:attr:`speculative_tokens` set to another count, another :attr:`draft_model`) and kept
        while speculation is switched off and on again. Set one to tune it (``prior``, ``explore``, ``min_rate``,
        ``explore_budget``) or to measure afresh; TypeError for anything else."""
        return self._policy

    @speculation_policy.setter
    def speculation_policy(self, policy: DraftPolicy) -> None:
        if not isinstance(policy, DraftPolicy):
            raise TypeError(f"speculation_policy: expected a DraftPolicy, got {type(policy).__name__}")
        self._policy = policy
        self._policy_for = (self.speculative_tokens, self._draft_model)

    @property
    def draft_model(self) -> Any:
        """The engine of speculative decoding's draft model (vLLM's ``draft_model`` method), or None (the default:
        drafts by prompt lookup). Set it to an engine (a :class:`ServingLoop`, idle, not speculating itself) of a
        smaller model of the same tokenizer, on the same GPU: its vocabulary must fit this engine's, and where both
        checkpoints have a ``tokenizer.json``, their vocabularies must be the same (TypeError/ValueError naming the
        difference). The engine takes it over: its prefix cache is turned on where it applies (a request's text is
        then prefilled once, each later draft only its new tokens), and it is closed with this engine or when
        replaced. With :attr:`speculative_tokens` set, the drafts come from it from the next step on."""
        return self._draft_model

    @draft_model.setter
    def draft_model(self, engine: Any) -> None:
        if engine is self._draft_model:
            return
        if engine is not None:
            self._check_draft_model(engine)
            if engine.prefix_caching_blocker() is None:
                engine.prefix_caching = True
        old, self._draft_model = self._draft_model, engine
        if self._proposer is not None:
            self.speculative_tokens = self._proposer.k  # (its drafts the new drafter's, its costs measured again)
        if old is not None:
            old.close()

    def _check_draft_model(self, engine: Any) -> None:
        """TypeError/ValueError where ``engine`` cannot draft for this one (:attr:`draft_model`)."""
        if not isinstance(engine, ServingLoop):
            raise TypeError(f"draft_model: expected None or an engine (fi_engine's), got {type(engine).__name__}")
        if engine is self:
            raise ValueError("draft_model: an engine cannot draft for itself; open a second engine of the draft model")
        if engine._closed:
            raise ValueError("draft_model: the engine is closed")
        if engine._proposer is not None or engine._draft_model is not None:
            raise ValueError("draft_model: the draft engine speculates itself; set its speculative_tokens to 0")
        if engine.has_unfinished:
            raise ValueError("draft_model: the draft engine has requests queued or active; it must be idle")
        mine, theirs = self.runner.config.vocab_size, engine.runner.config.vocab_size
        if theirs > mine:
            raise ValueError(
                f"draft_model: its vocabulary ({theirs} tokens) does not fit this model's ({mine}); a draft model "
                "must share the target's tokenizer"
            )
        why = tokenizer_difference(getattr(self, "model_dir", None), getattr(engine, "model_dir", None))
        if why is not None:
            raise ValueError(f"draft_model: {why}; a draft model must share the target's tokenizer")

    def _close_draft_model(self) -> None:
        """The draft model's engine closed (with this engine's close)."""
        draft, self._draft_model = self._draft_model, None
        self._proposer = None
        if draft is not None:
            draft.close()

    def _speculates(self, sched: Scheduler) -> bool:
        """Whether this step may verify drafts: speculation on, and no request sets a sampling control (logprobs are
        read from the pass's rows: :meth:`_pass_logprobs`)."""
        if self._proposer is None:
            return False
        return not sched.processed or not any(r.asks is not None and sets_controls(r.asks) for r in sched.active)

    speculation_max_rows = 16
    """Speculative decoding drafts only while at most this many requests decode (beyond, the drafting's host time and
    the verifying pass's rows cost more than they give; vLLM's ``speculative_disable_by_batch_size``)."""

    def _draft_limits(self, sched: Scheduler) -> list[tuple[Request, int]] | None:
        """Each decoding request with the most tokens it may draft this step (0: none: it is seeded or asked for no
        speculation, or the policy holds it back, or it is one token from its limit: its last token is never fed
        back), or None where more than :attr:`speculation_max_rows` (or none) decode."""
        live = [r for r in sched.slots if r is not None and r.decoding]
        if not live or len(live) > self.speculation_max_rows:
            return None
        out: list[tuple[Request, int]] = []
        for r in live:
            # (a seeded request keeps its draws: whether a pass runs depends on timings)
            held = not r.speculative or (r.sampling is not None and r.sampling.seed is not None)
            left = 0 if held or not self._policy.drafts(r) else r.max_new_tokens - len(r.output) - 1
            out.append((r, max(0, left)))
        return out

    def _drafts(self, sched: Scheduler) -> list[tuple[Request, tuple[int, ...]]] | None:
        """Each decoding request's draft (:attr:`speculative_tokens`) from its recorded tokens, or None where none has
        one or more than :attr:`speculation_max_rows` decode."""
        proposer = self._proposer
        assert proposer is not None
        limits = self._draft_limits(sched)
        if limits is None:
            return None
        asking = [(r, n) for r, n in limits if n > 0]
        histories = []
        for r, _ in asking:
            prompt = self._lookup.get(r)
            if prompt is None:
                prompt = self._lookup[r] = np.asarray(r.prompt, dtype=np.int64)
            histories.append(np.concatenate((prompt, np.asarray(r.output, dtype=np.int64))))
        drafted = proposer.propose_many(histories, [n for _, n in asking])
        made = {id(r): d for (r, _), d in zip(asking, drafted, strict=True)}
        out = [(r, made.get(id(r), ())) for r, _ in limits]
        return out if any(out_draft for _, out_draft in out) else None

    def _pass_due(self, sched: Scheduler) -> bool:
        """Whether the next step is a verifying pass (:meth:`_verify_drafts`). A draft model's drafts cost device time,
        so they are not made to decide: the policy weighs each request's draft at its full length
        (:meth:`_draft_limits`), and the drafts are made once the pass runs."""
        if not isinstance(self._proposer, DraftModelProposer):
            return self._verify_drafts(sched) is not None
        if not self._speculates(sched):
            return False
        limits = self._draft_limits(sched)
        if limits is None or not any(n for _, n in limits):
            return False
        k = self._proposer.k
        return self._policy.worth([(r, min(k, n)) for r, n in limits])

    def _verify_drafts(self, sched: Scheduler, decided: bool = False) -> list[tuple[Request, tuple[int, ...]]] | None:
        """The drafts of a verifying pass to run now, or None: speculation applies (:meth:`_speculates`), a request
        has a draft, and the pass pays (:class:`~fi_engine.runtime.sample.speculation.DraftPolicy`; ``decided``: it was
        found to pay a step ago (:meth:`_pass_due`), when the drafts were planned from the tokens then recorded)."""
        if not self._speculates(sched):
            return None
        model = isinstance(self._proposer, DraftModelProposer)
        if model and not decided and not self._pass_due(sched):
            return None
        drafts = self._drafts(sched)
        if drafts is None or not (decided or model or self._policy.worth([(r, len(d)) for r, d in drafts])):
            return None
        return drafts

    def _speculative_step(
        self, sched: Scheduler, drafts: list[tuple[Request, tuple[int, ...]]]
    ) -> tuple[float, dict[Request, int]]:
        """A speculative decode step (:attr:`speculative_tokens`) of the decoding requests' ``drafts``
        (:meth:`_verify_drafts`), waited for and recorded: one prefill pass feeds every one its last token and its
        draft; the greedy choice at each row accepts the draft's tokens up to the first that differs, and gives one
        more (``accepted_tokens``). Returns its wall time in microseconds and the tokens each request got."""
        live = [r for r, _ in drafts]
        for r, draft in drafts:
            r.draft = draft
        t0 = time.perf_counter()
        runner = self.runner
        for r in live:
            sched.grow_pages([r], len(r.draft))  # the pages of its draft's positions (within its budget)
        self._next_rows = None  # a decode step staged before this pass is stale after it
        slots = prefill_slots(len(live), runner.max_batch)
        try:
            _, _, full = runner.run_prefill(live, 0, slots, 0, all_logits=True, last_head=False)
            bounds = runner.prefill_arrays["qo_indptr"][: len(live) + 1].tolist()  # each request's rows
            choices = self._row_choices(full, live, bounds)
            logprobs = self._pass_logprobs(full, live, bounds, choices)
        finally:
            for r in live:
                r.draft = ()
        got: dict[Request, int] = {}
        stats = self.speculation_stats
        stats.passes += 1
        for b, (r, draft) in enumerate(drafts):
            tokens = accepted_tokens(draft, choices[bounds[b] : bounds[b + 1]])
            stats.drafted += len(draft)
            stats.accepted += len(tokens) - 1
            self._policy.observe(r, len(draft), len(tokens) - 1)
            r.drafted += len(draft)
            r.accepted += len(tokens) - 1
            n = 0
            rows = logprobs.get(id(r))
            for t in tokens:  # one at a time: an end-of-sequence token or the limit ends it there
                if rows is not None:
                    r.logprobs.append(rows[n])
                sched.record([r], [t])
                n += 1
                if r.finished:
                    break
            stats.tokens += n
            got[r] = n
        self._timed_record(verify=True)
        return (time.perf_counter() - t0) * 1e6, got  # (the wait for the pass included)

    def _pass_logprobs(
        self, full: Any, live: Sequence[Request], bounds: Sequence[int], choices: Sequence[int]
    ) -> dict[int, list[TokenLogprobs]]:
        """The log-probabilities a verifying pass gives the requests that ask for them (``logprobs``; no control: such
        a step does not verify, :meth:`_speculates`), by ``id`` of the request: one
        :class:`~fi_engine.runtime.stepping.TokenLogprobs` per row of its (the row's choice's, and the top N), from
        the raw logits ``full`` as a decode step's are (reads the device)."""
        want = [
            (i, r)
            for b, r in enumerate(live)
            if r.asks is not None and r.asks.logprobs is not None
            for i in range(bounds[b], bounds[b + 1])
        ]
        if not want:
            return {}
        pending = self.processor.pending_logprobs(full, want)
        self.processor.chosen(pending, self.runner.cupy.asarray(choices, dtype=np.int32))
        out: dict[int, list[TokenLogprobs]] = {}
        for (_, r), entry in zip(want, pending.resolve(), strict=True):
            out.setdefault(id(r), []).append(entry)
        return out

    def _row_choices(self, full: Any, live: Sequence[Request], bounds: Sequence[int]) -> list[int]:
        """Each row's choice of a verifying pass's float32 logits ``full`` ``[rows, vocab]`` (``live``: its requests,
        request ``b``'s rows ``bounds[b]:bounds[b + 1]``, the pass's ``qo_indptr``): a greedy request's argmax, a
        sampled one's draw from its distribution (temperature, top-k and top-p jointly, as the sampler draws:
        ``kernels.sample_logit_rows``, from a stream of the verifying passes' own; a seeded request has no draft), on
        the host (waits for the pass)."""
        runner = self.runner
        cp = runner.cupy
        choices = full.argmax(axis=1).astype(np.int32)
        sampled = [(r, b) for b, r in enumerate(live) if r.sampling is not None]
        if sampled:
            vocab = int(full.shape[1])
            rows: list[int] = []
            temperature: list[float] = []
            top_k: list[int] = []
            top_p: list[float] = []
            for r, b in sampled:
                sp = r.sampling
                assert sp is not None
                n = bounds[b + 1] - bounds[b]
                rows += range(bounds[b], bounds[b + 1])
                temperature += [sp.temperature] * n
                top_k += [vocab if sp.top_k == 0 or sp.top_k > vocab else sp.top_k] * n
                top_p += [sp.top_p] * n
            if self._draft_draws is None:
                self._draft_draws = kernels.generator(int(np.random.default_rng().integers(1 << 62)))
            idx = cp.asarray(rows, dtype=np.int64)
            choices[idx] = kernels.sample_logit_rows(
                cp.ascontiguousarray(full[idx]),
                cp.asarray(temperature, dtype=np.float32),
                cp.asarray(top_k, dtype=np.int32),
                cp.asarray(top_p, dtype=np.float32),
                self._draft_draws,
                runner.stream_ptr,
            )
        return cast(list[int], choices.get(stream=runner.stream).tolist())

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

    @contextlib.contextmanager
    def _whole_prompts(self) -> Iterator[None]:
        """Within: every prompt is prefilled whole, in one pass, without the prefix cache (``prefill_logits`` needs
        every row's logits; a warm-up's dummy prompts must run the shapes they were made for)."""
        sched = self.scheduler
        on, sched.prefix_caching = sched.prefix_caching, False
        chunk, sched.chunk_tokens = sched.chunk_tokens, 0
        try:
            yield
        finally:
            sched.prefix_caching = on
            sched.chunk_tokens = chunk

    scheduler_delay_factor = _Setting(
        delay_factor_arg,
        """How long queued requests may wait while others decode, in multiples of the last prefill's time
        (:meth:`_admit`; vLLM's option of that name), 0 to 100. Default 0; ``fi-engine serve`` uses 3.""",
    )

    @property
    def grammar_tokenizer(self) -> GrammarTokenizer | None:
        """The :class:`~fi_engine.text.grammar.GrammarTokenizer` that requests with a ``grammar`` (the OpenAI API's
        ``response_format``) are matched against: None until the first such request makes it from the checkpoint's
        ``tokenizer.json`` and end-of-sequence ids (``TextCodec.from_dir(model_dir)``, as the server reads them; it
        indexes every token, up to about a second for 150k of them). A server holding one of the same tokenizer sets
        it here (``fi_engine.serve.openai_server`` does), so it is made once. TypeError for anything but a
        GrammarTokenizer or None; ValueError when its vocabulary is wider than the model's logits."""
        return self._grammars

    @grammar_tokenizer.setter
    def grammar_tokenizer(self, value: GrammarTokenizer | None) -> None:
        if value is not None and not isinstance(value, GrammarTokenizer):
            raise TypeError(
                f"grammar_tokenizer: expected a fi_engine.text.grammar.GrammarTokenizer or None, got "
                f"{type(value).__name__}"
            )
        width = self.processor.vocab_size
        if value is not None and value.vocab_size > width:
            raise ValueError(
                f"grammar_tokenizer: its tokenizer has {value.vocab_size} tokens, more than the model's {width} "
                f"logits; give the checkpoint's own tokenizer"
            )
        self._grammars = value

    def _grammar_matcher(self, sampling: SamplingParams | None) -> GrammarMatcher | None:
        """A new request's matcher at the start of ``sampling.grammar`` (None without one): ValueError naming
        ``response_format`` when the grammar does not compile for the tokenizer, naming ``grammar`` when the engine
        has no tokenizer to match it against (a checkpoint without ``tokenizer.json``) or ``llguidance`` is missing."""
        if sampling is None or sampling.grammar is None:
            return None
        grammars = self._grammars
        if grammars is None:
            from ..text.codec import TextCodec

            try:
                codec = TextCodec.from_dir(self.model_dir)
            except (ValueError, ModuleNotFoundError) as exc:  # no tokenizer.json (random weights), a malformed one
                raise ValueError(
                    f"grammar: this engine has no tokenizer to match a grammar against ({str(exc)[:300]}); serve a "
                    f"checkpoint with its tokenizer.json, or set the engine's grammar_tokenizer"
                ) from None
            try:
                grammars = GrammarTokenizer(codec.tokenizer, codec.eos_token_ids)
                self.grammar_tokenizer = grammars
            except (ValueError, ModuleNotFoundError) as exc:  # no EOS ids, llguidance missing, a wider vocabulary
                raise ValueError(f"grammar: the engine's tokenizer cannot match a grammar: {str(exc)[:300]}") from None
        return grammars.matcher(sampling.grammar)

    def _add_request(self, request: NewRequest) -> int:
        """:meth:`add_request`: queue ``prompt`` (token ids) for up to ``max_new_tokens`` new tokens; returns its id
        (an int, never reused by this engine). ``sampling``: its own (None: greedy; its ``seed``:
        :class:`SamplingParams`); ``eos_token_ids``: the tokens that end it, kept in its output (None: the
        checkpoint's; ``()``: none).

        Raises ValueError naming ``prompt``, ``max_new_tokens`` or ``eos_token_ids[i]`` for a request that can never
        be served (empty, ids outside the vocabulary, longer than ``max_seq_len`` or ``max_prefill_tokens``, a
        page budget beyond the KV cache), naming ``response_format`` or ``grammar`` for a grammar it cannot match
        (:meth:`_grammar_matcher`), TypeError naming ``sampling`` for anything but :class:`SamplingParams` or None;
        nothing is queued then."""
        prompt, max_new_tokens, sampling, eos_token_ids = request
        self._check_open()
        sampling = sampling_arg(sampling)
        if asks_processing(sampling):
            self._check_processing(sampling)
        r = self.scheduler.submit(
            prompt,
            max_new_tokens,
            name="prompt",
            sampling=sampling,
            eos_token_ids=eos_token_ids,
            draws=self.sampler.draws(sampling),
            grammar=self._grammar_matcher(sampling),
        )
        self._requests[r.rid] = r
        return r.rid

    def _check_processing(self, sampling: Any) -> None:
        """ValueError naming the field where this engine cannot honour ``sampling``'s logprobs or controls."""
        if self.runner.vocab_shard is not None:
            asked = ("logprobs", "prompt_logprobs", "grammar")
            field = next((f for f in asked if getattr(sampling, f) is not None), "logit_bias, penalties or min_p")
            raise ValueError(f"{field}: not supported with a vocabulary split over tensor-parallel ranks yet")
        vocab = self.runner.config.vocab_size
        bad = next((t for t, _ in sampling.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab})")

    def abort_request(self, rid: int) -> None:
        """End request ``rid`` now, queued or active: its slot and KV pages are free when this returns, and the next
        :meth:`step` reports it once (``finish_reason="abort"``). An id that is unknown or already finished: nothing
        happens. TypeError naming ``rid`` for anything but an int."""
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise TypeError(f"rid: expected a request id (the int add_request returned), got {type(rid).__name__}")
        r = self._requests.pop(rid, None)
        if r is not None and self.scheduler.abort(r):
            self._aborted.append(r)

    @property
    def has_unfinished(self) -> bool:
        """Whether a request added with :meth:`add_request` is queued or active."""
        return self.scheduler.has_work

    def step(self) -> list[StepOutput]:
        """Admit queued requests into free slots and prefill them (each one's first token comes from its prefill),
        then one decode step over every active request (the same step as :meth:`generate`'s loop): one
        :class:`StepOutput` per request that produced tokens or ended, in the order they did (a request admitted
        here has two tokens: its prefill's and its first decode step's, unless it ended at the first), after the
        ones aborted since the last step. With nothing queued or active: those aborted ones only, at once. With
        :attr:`overlap_steps`, the decode step is left running and its tokens come first in the next call
        (:meth:`_serve_step`); with :attr:`scheduler_delay_factor`, queued requests may wait a few steps
        (:meth:`_admit`); with :attr:`mixed_prefill`, the requests already active take a token from the prefill pass
        too (so one more in that call).

        An exception from the device work (a CUDA error, an interrupt) ends every queued and active request (the
        next step reports them as aborted, after the requests that had ended in the failed call before it failed,
        with their tokens) and is raised; the engine can serve new requests afterwards unless the error left the
        device unusable."""
        self._check_open()
        out, self._unreported = self._unreported, []
        out += [StepOutput(r.rid, (), "abort") for r in self._aborted]
        self._aborted.clear()
        sched, runner = self.scheduler, self.runner
        if not sched.has_work and self._inflight is None:
            return out
        if self._ffi_stream is None:
            self._ffi_stream = stream_scope(runner.stream_ptr, runner.device)
        # the device, CuPy's current stream and TVM-FFI's are the engine's for this step only (a device switch, CuPy's
        # thread-local stream, two TVM-FFI calls; the stream_scope is made once), so the caller's thread keeps its
        # own between steps
        produced: dict[Request, int] = {}
        with runner.cupy.cuda.Device(runner.device), runner.stream, self._ffi_stream:
            try:
                self._serve_step(sched, produced)
            except BaseException:
                # a request that ended before the failure (its last token recorded, its slot left) is no longer
                # the scheduler's to abort: the next step reports its end, with the tokens this call gave it
                self._unreported = self._outputs({r: k for r, k in produced.items() if r.finished})
                self._abort_everything(sched)
                raise
        return out + self._outputs(produced)

    def _outputs(self, produced: dict[Request, int]) -> list[StepOutput]:
        """The step API's outputs of ``produced`` (request -> tokens it got); ended requests are forgotten."""
        out = []
        requests = self._requests
        caching = self.scheduler.prefix_caching
        for r, k in produced.items():
            finish = _FINISH.get(r.finish_reason) if r.finish_reason is not None else None
            if caching or r.asks is not None or r.drafted:
                out.append(self._output_with_extras(r, k, finish, caching))
            else:  # most rows: their tokens and end (a step of 64 rows pays per row here)
                out.append(StepOutput(r.rid, tuple(r.output[-k:]), finish))
            if finish is not None:
                requests.pop(r.rid, None)
        return out

    @staticmethod
    def _output_with_extras(r: Request, k: int, finish: FinishReason | None, caching: bool) -> StepOutput:
        """:meth:`_outputs`' entry of a request that asked for log-probabilities or controls, with the prefix cache
        on, or whose draft was verified: its logprobs, with its first tokens the prompt's and the prefix cache's hit,
        and the draft tokens verified since its last output (then counted afresh)."""
        first = len(r.output) == k
        hit = r.hit if caching and first else None
        logprobs = tuple(r.logprobs[-k:]) if r.asks is not None and r.asks.logprobs is not None else None
        prompt = r.prompt_logprobs if first else None  # (set where asked)
        drafted, accepted = (r.drafted, r.accepted) if r.drafted else (None, None)
        r.drafted = r.accepted = 0
        return StepOutput(r.rid, tuple(r.output[-k:]), finish, None, logprobs, prompt, hit, drafted, accepted)

    def _serve_step(self, sched: Scheduler, produced: dict[Request, int]) -> None:
        """:meth:`step`'s device work: how many tokens each request got, into ``produced`` in the order it first
        did (filled as they come, so a failure midway leaves what was recorded before it). With
        :attr:`overlap_steps` (one GPU), the decode step launched by the last call is waited for and its tokens
        taken first, and this call's decode step is launched and left running: its tokens come with the next call,
        while the caller handles these (the GPU does not wait for the host between steps). A request that ended
        meanwhile (aborted) gets no token from the step in flight; its slot and pages are reused only by work
        queued after that step on the engine's one stream. Where queued requests are admitted, their prefill pass
        (with the running requests riding in it: :attr:`mixed_prefill`) is prepared while the step in flight runs
        and launched behind it (:attr:`pipelined_prefill`), and the decode step after the pass behind the pass
        where it gave every active request a token (:meth:`_decodes_behind_prefill`)."""
        inflight, self._inflight = self._inflight, None
        # speculation: a verifying pass worth it by the tokens recorded so far runs after the step in flight, waited
        # for (it reads that step's tokens), and the step is the synchronous one (_advance)
        verify = self._proposer is not None and self._pass_due(sched)
        if inflight is not None and verify:
            for r in self._decode_finish(sched, inflight):
                produced[r] = 1
            inflight = None
        launched: _LaunchedPass | None = None
        riders: list[Request] = []
        admitted: list[Request] = []
        prefill_s = 0.0  # the prefill pass's launch and wait (kept for the scheduler delay)
        if inflight is not None:  # also when overlap_steps was turned off since that step was launched
            # the next step launched before this one's tokens are read, where nothing changes the rows in between
            if self.overlap_steps and self._launches_ahead(sched, delay=True):
                self._inflight = self._decode_launch(sched, depth=2)
            elif self.overlap_steps and self._prefills_ahead(sched):
                # the prefill pass of the requests admitted now goes behind the step in flight, prepared while it
                # runs: its riders are fed the step's tokens on the device, one position on
                admitted = self._admit(sched, delay=True, riders=riders, behind=True)
                if admitted:
                    t = time.perf_counter()
                    try:
                        launched, _ = self._prefill_launch(
                            sched, admitted, riders, behind=True, graph_slots=self.runner.max_batch
                        )
                    except BaseException:
                        # the step in flight ran before the failure: the requests it ended are reported with their
                        # tokens (step() aborts the rest), as where the prefill follows its recording
                        with contextlib.suppress(Exception):
                            for r in self._decode_finish(sched, inflight, behind=True):
                                produced[r] = 1
                        raise
                    prefill_s = time.perf_counter() - t
            for r in self._decode_finish(sched, inflight, behind=self._inflight is not None or launched is not None):
                produced[r] = 1
            if self._inflight is not None:
                return
        if launched is None:
            if not (self.overlap_steps and self.runner.comm is None) or verify:
                self._advance(sched, None, produced, verify=verify)
                return
            admitted = self._admit(sched, delay=True, riders=riders)
            if admitted:
                t = time.perf_counter()
                launched, _ = self._prefill_launch(sched, admitted, riders, graph_slots=self.runner.max_batch)
                prefill_s = time.perf_counter() - t
        if launched is not None:
            # every active request takes a token from the pass (it was admitted, or rides in it)
            passed = [*launched.riders, *launched.admitted]
            ids = {id(r) for r in passed}
            had = [len(r.output) for r in passed]
            # every decoding request took a token from the pass: with a prompt's chunks left, the next step() is the
            # next chunk's pass (they ride in it again), so no decode step between the passes holds the prompt back
            all_rode = all(id(r) in ids for r in sched.active if r.decoding)
            chunking = sched.chunks_pending
            if all_rode and not chunking and self._decodes_behind_prefill(sched):
                # the decode step goes right behind the pass, its input tokens copied on the device: the GPU does
                # not wait for the host to read the pass's tokens and prepare the step
                self._inflight = self._decode_launch(sched, depth=2)
                t = time.perf_counter()
                self._prefill_finish(sched, launched, behind=True)
            else:
                t = time.perf_counter()
                self._prefill_finish(sched, launched)
            self._last_prefill_s = prefill_s + time.perf_counter() - t
            for r, n in zip(passed, had, strict=True):  # (a rider the step in flight ended took nothing)
                if len(r.output) > n:
                    produced[r] = produced.get(r, 0) + 1
            if all_rode and chunking:
                return
        if sched.decoding and self._inflight is None:
            self._inflight = self._decode_launch(sched)

    def _timed_prefill(self, sched: Scheduler, admitted: list[Request], riders: Sequence[Request] = ()) -> float:
        """:meth:`_prefill` of the admitted requests (with ``riders``, a mixed pass: :attr:`mixed_prefill`); its
        host time in seconds, kept for :meth:`_admit`'s delay."""
        t = time.perf_counter()
        self._prefill(sched, admitted, riders=riders)
        self._last_prefill_s = time.perf_counter() - t
        return self._last_prefill_s

    def _launches_ahead(self, sched: Scheduler, delay: bool) -> bool:
        """Whether the next decode step may be launched now, before the tokens of the one in flight are read
        (:attr:`pipelined_decode`): it was prepared during that step (decode graph, one GPU) for the rows the
        slots still hold (:meth:`Scheduler.same_rows`: no request reaches its token limit in the step in flight,
        none was aborted), and no queued request would be admitted first (:meth:`_would_admit`). (Sampled rows
        stage their parameters in the other of two host buffers than the step in flight's.)"""
        prepared = self._next_rows
        return (
            self.pipelined_decode
            and prepared is not None
            and any(r is not None for r in prepared)  # (all padding: every request ended; nothing to step)
            and self.runner.graph is not None
            and self.runner.comm is None
            and sched.same_rows(prepared)
            and not sched.processed  # its controls and logprobs read each request's recorded tokens
            and not self._would_admit(sched, delay)
        )

    def _prefills_ahead(self, sched: Scheduler) -> bool:
        """Whether the prefill pass of queued requests may be launched now, behind the decode step in flight
        (:meth:`_serve_step`, :attr:`pipelined_prefill`): a queued request would be admitted (:meth:`_would_admit`),
        on one GPU with the decode graph where steps are prepared ahead (:attr:`pipelined_decode`'s conditions)."""
        return (
            self.pipelined_prefill
            and self._prepares_ahead()
            and not sched.processed  # a rider's controls and logprobs read its recorded tokens
            and self._would_admit(sched, delay=True)
        )

    def _prepares_ahead(self) -> bool:
        """Whether decode steps are prepared while the one before runs and launched with their input tokens copied
        on the device (:attr:`pipelined_decode`, the decode graph, one GPU, ``ModelRunner.prepare_ahead``)."""
        runner = self.runner
        return self.pipelined_decode and runner.graph is not None and runner.comm is None and runner.prepare_ahead

    def _decodes_behind_prefill(self, sched: Scheduler) -> bool:
        """Prepare the decode step after the prefill pass just launched, which gives every active request a token
        (the caller checks), for the rows the slots will hold after it (:meth:`Scheduler.peek_rows` of one pass
        ahead: each admitted request at its prompt's end, each rider one position on), and return True; False
        (nothing prepared) where steps are not prepared ahead (the conditions of :attr:`pipelined_decode`) or a
        request reaches its token limit in the pass (the rows will change). The step's input tokens are then the
        pass's, which it chose one per slot: copied on the device at launch."""
        if not self._prepares_ahead() or sched.processed:  # (controls and logprobs read the recorded tokens)
            return False
        rows = sched.peek_rows(1)
        rows = rows[: sched.graph_rows(rows, self.runner.decode_graph_batches)]
        if not sched.same_rows(rows):
            return False
        self.runner.stage_decode_ahead(rows, ahead=1)
        self._next_rows = rows
        return True

    def _would_admit(self, sched: Scheduler, delay: bool) -> bool:
        """Whether :meth:`_admit` would admit a queued request now (:meth:`Scheduler.can_admit`), without admitting
        it. ``delay`` (the step API): the queue is held by :attr:`scheduler_delay_factor` times the last prefill's
        time."""
        return sched.can_admit(self.scheduler_delay_factor * self._last_prefill_s if delay else 0.0)

    def _admit(
        self, sched: Scheduler, delay: bool, riders: list[Request] | None = None, behind: bool = False
    ) -> list[Request]:
        """The scheduler's admission (:meth:`Scheduler.admit`), or none yet: with ``delay`` (the step API) and
        :attr:`scheduler_delay_factor` > 0, queued requests wait while others decode, until the oldest has waited
        that many times the last prefill's time or they would fill every free slot (vLLM's scheduler delay): a burst
        of arrivals is prefilled in a few larger passes instead of one small pass per step, each of which costs the
        batch a step.

        ``riders`` (the step API): with :attr:`mixed_prefill` where it applies, the requests already active are
        appended to it when some are admitted (they ride in the prefill pass, each one token row of the pass's
        ``max_prefill_tokens``); where the first queued prompt does not fit beside them, it is admitted alone and
        ``riders`` stays empty. ``behind``: the pass goes behind a decode step in flight, not recorded: a request
        that step gives its last token (its limit) rides no more."""
        if not self._would_admit(sched, delay):
            return []
        if riders is not None and self._mixes():
            admitted, riding = sched.admit_beside_active(behind)
            riders.extend(riding)
            return admitted
        return sched.admit()

    def _mixes(self) -> bool:
        """Whether the step API's prefill passes take the decoding requests along (:attr:`mixed_prefill`): one GPU,
        and the Llama pass, whose prefill attention reads every request's KV from the paged cache."""
        return self.mixed_prefill and self.runner.comm is None and self.runner.family.llama_pass

    def _settle(self) -> None:
        """Wait for a decode step left in flight whose requests have all ended since (aborted): nothing of it is
        recorded; the engine's buffers are free for the next call."""
        if self._inflight is not None:
            self.runner.stream.synchronize()
            self._inflight = None
            self._next_rows = None

    def _abort_everything(self, sched: Scheduler) -> None:
        """After a failed step: wait for what was issued (the host staging buffers may be rewritten next), then end
        every request; the step API's ones are reported as aborted by the next :meth:`step`."""
        self._next_rows = None
        self._inflight = None
        with contextlib.suppress(Exception):  # the step's own error is the one raised
            self.runner.stream.synchronize()
        for r in [*sched.active, *sched.pending]:
            sched.abort(r)
            if self._requests.pop(r.rid, None) is not None:
                self._aborted.append(r)

    # ------------------------------------------------------------------------------------ generate

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        eos_token_ids: Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationResult:
        """Generate tokens for each prompt (lists of token ids) until an end-of-sequence token (kept in the
        output) or ``max_new_tokens`` (one value, or one per prompt).

        ``eos_token_ids``: default the checkpoint's ``eos_token_id``; ``()`` to always run to
        ``max_new_tokens``. Returns the tokens in prompt order, with timings. Sampled generation starts a new
        Philox stream from ``sampling.seed`` (None: 0; offset 0) on every call, shared by its prompts, so the same
        call reproduces its tokens. It runs the step of :meth:`step` over the engine's scheduler, so it needs the
        step API idle: ValueError while requests added with :meth:`add_request` are queued or active.
        """
        self._check_open()
        self._check_idle("generate")
        sampling = sampling_arg(sampling) or SamplingParams()
        if asks_processing(sampling):
            self._check_processing(sampling)
        # a fresh stream per call (seed, offset 0), every row its own subsequence: reproducible generations
        draws = None if sampling.greedy else Draws.seeded(sampling.seed or 0, shared=True)
        sched, runner = self.scheduler, self.runner
        reqs = self._submit(
            sched, prompts, max_new_tokens, sampling, eos_token_ids, draws, lambda: self._grammar_matcher(sampling)
        )
        self._next_rows = None
        result = GenerationResult([], [])
        # TVM-FFI's current stream is the runner's for the whole call: every op is given that stream, and finds it
        # current already (one query instead of a set and a restore around each of the ~10 kernels per layer)
        with runner.cupy.cuda.Device(runner.device), runner.stream, stream_scope(runner.stream_ptr, runner.device):
            try:
                if self.pipelined_decode and runner.graph is not None and runner.comm is None:
                    launched = None
                    while sched.has_work:
                        launched = self._advance_pipelined(sched, result, launched)
                else:
                    while sched.has_work:
                        self._advance(sched, result)
            finally:
                if sum(sched.abort(r) for r in reqs):  # interrupted: nothing of this call stays queued or active
                    self._next_rows = None
                runner.stream.synchronize()
        result.tokens = [list(r.output) for r in reqs]
        result.finish_reasons = [r.finish_reason or "" for r in reqs]
        result.decode_tokens = sum(len(r.output) - 1 for r in reqs)
        return result

    def _advance(
        self,
        sched: Scheduler,
        result: GenerationResult | None,
        produced: dict[Request, int] | None = None,
        verify: bool = False,
    ) -> None:
        """One step of the serving loop: admit what fits and prefill it, then one decode step over the active
        requests. With ``result`` (``generate``): its timings are added there and nothing else is kept; without
        (the step API), how many tokens each request produced goes into ``produced``, in the order it first did."""
        if produced is None:
            produced = {}
        riders: list[Request] = []
        admitted = self._admit(sched, delay=result is None, riders=None if result is not None else riders)
        if admitted:
            elapsed = self._timed_prefill(sched, admitted, riders)
            if result is not None:
                result.prefill_s += elapsed
            else:
                for rider in riders:
                    produced[rider] = produced.get(rider, 0) + 1
                produced.update((r, 1) for r in admitted if r.output)  # (a prompt's chunk gives no token)
            if riders and sched.chunks_pending and all(r in riders for r in sched.active if r.decoding):
                return  # the decoding requests took their token; the next step is the next chunk's pass
        if sched.decoding:
            t = time.perf_counter()
            drafts = self._verify_drafts(sched, decided=verify) if self._proposer is not None else None
            if drafts is not None:
                host_us, got = self._speculative_step(sched, drafts)
            else:
                host_us, rows = self._decode_step(sched)
                got = {r: 1 for r in rows if r is not None}
            if result is not None:
                result.step_host_us.append(host_us)
                result.decode_s += time.perf_counter() - t
                result.decode_steps += 1
            else:
                for r, n in got.items():
                    produced[r] = produced.get(r, 0) + n

    def _advance_pipelined(
        self, sched: Scheduler, result: GenerationResult, launched: _LaunchedStep | None
    ) -> _LaunchedStep | None:
        """``generate``'s step with :attr:`pipelined_decode`: with a decode step in flight (``launched``), the
        next one is launched first where it may be (:meth:`_launches_ahead`), then the one in flight is waited for
        and recorded; without, what fits is admitted and prefilled and a decode step launched. Returns the step
        left in flight. The timings as :meth:`_advance` gives them (the waits for the GPU excluded)."""
        if launched is None:
            admitted = self._admit(sched, delay=False)
            if admitted:
                result.prefill_s += self._timed_prefill(sched, admitted)
            if not sched.decoding:  # (nothing, or only prompts with chunks left)
                return None
            t = time.perf_counter()
            drafts = self._verify_drafts(sched, decided=self._verify_next) if self._proposer is not None else None
            self._verify_next = False
            if drafts is not None:  # a verifying pass, waited for and recorded (speculative_tokens)
                host_us, _ = self._speculative_step(sched, drafts)
                result.step_host_us.append(host_us)
                result.decode_s += time.perf_counter() - t
                result.decode_steps += 1
                return None
            launched = self._decode_launch(sched)
            result.decode_s += time.perf_counter() - t
            return launched
        t0 = time.perf_counter()
        # with speculation, a step whose drafts (from the tokens recorded so far) are worth a verifying pass is not
        # launched ahead: the pass follows the step in flight, with its tokens
        verify = self._proposer is not None and self._pass_due(sched)
        ahead = self._decode_launch(sched, depth=2) if not verify and self._launches_ahead(sched, delay=False) else None
        waited = self.runner.staged_wait_s if ahead is not None else 0.0
        t1 = time.perf_counter()
        if ahead is not None:
            launched.done.synchronize()  # its token copy, not the step queued behind it
        else:
            self.runner.stream.synchronize()  # everything, the copies out of the host staging buffers included
        t2 = time.perf_counter()
        self._record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
        t3 = time.perf_counter()
        self._verify_next = verify
        result.step_host_us.append((t1 - t0 - waited + t3 - t2) * 1e6)
        result.decode_s += t3 - t0
        result.decode_steps += 1
        return ahead

    def _check_idle(self, what: str) -> None:
        """``what`` shares the step API's scheduler and KV cache: refused while its requests are in flight."""
        if self.scheduler.has_work:
            n = len(self.scheduler.active) + len(self.scheduler.pending)
            raise ValueError(
                f"engine: {n} request(s) added with add_request are queued or active; step() them to the end or "
                f"abort_request() them before {what}()"
            )
        self._settle()

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits ``[len(prompt), vocab]`` of every position of every prompt (a check against a
        reference implementation; the prompts are prefilled in batches, then their pages freed)."""
        self._check_open()
        self._check_idle("prefill_logits")
        sched, runner = self.scheduler, self.runner
        reqs = self._submit(sched, prompts, 1, None, (), None)
        out: dict[int, np.ndarray] = {}
        device = runner.cupy.cuda.Device(runner.device)
        with self._whole_prompts(), device, runner.stream, stream_scope(runner.stream_ptr, runner.device):
            try:
                while sched.has_work:
                    admitted = sched.admit()
                    for r, logits in zip(admitted, self._prefill(sched, admitted, all_logits=True), strict=True):
                        out[r.rid] = logits
            finally:
                for r in reqs:  # interrupted: nothing of this call stays queued or active
                    sched.abort(r)
        return [out[r.rid] for r in reqs]

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
        with self._whole_prompts():
            for prompts in runs:
                self.generate(prompts, 1, eos_token_ids=())
        return self.runner.prefill_graph_shapes()

    @staticmethod
    def _submit(
        sched: Scheduler,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        sampling: SamplingParams | None,
        eos_token_ids: Sequence[int] | None,
        draws: Any,
        grammar: Callable[[], GrammarMatcher | None] = lambda: None,
    ) -> list[Request]:
        """Queue every prompt, all or none: a prompt refused takes the ones queued before it out again. ``grammar``:
        makes each request's own grammar matcher (``sampling.grammar``'s, else None)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts: expected a non-empty list of prompts (lists of token ids)")
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(
                    f"max_new_tokens: expected one value per prompt ({len(prompts)}), got {len(max_new_tokens)}"
                )
            limits = list(max_new_tokens)
        else:
            limits = [max_new_tokens] * len(prompts)
        reqs: list[Request] = []
        try:
            for i, (p, m) in enumerate(zip(prompts, limits, strict=True)):
                reqs.append(
                    sched.submit(
                        p,
                        m,
                        name=f"prompts[{i}]",
                        sampling=sampling,
                        eos_token_ids=eos_token_ids,
                        draws=draws,
                        grammar=grammar(),
                    )
                )
        except BaseException:
            for r in reqs:
                sched.abort(r)
            raise
        return reqs

    def _prefill(
        self, sched: Scheduler, reqs: list[Request], all_logits: bool = False, riders: Sequence[Request] = ()
    ) -> list[np.ndarray]:
        """Prefill the admitted requests ``reqs`` and, in the same pass, decode ``riders`` (active requests: one token
        row each, :attr:`mixed_prefill`); wait for it and record their tokens (:meth:`_prefill_launch`,
        :meth:`_prefill_finish`). ``all_logits`` (without riders: :meth:`prefill_logits`): return each request's
        logits at every row."""
        launched, full = self._prefill_launch(sched, reqs, riders, all_logits)
        self._prefill_finish(sched, launched)
        return [] if full is None else self.runner.split_logits(full, len(reqs))

    def _prefill_launch(
        self,
        sched: Scheduler,
        reqs: list[Request],
        riders: Sequence[Request] = (),
        all_logits: bool = False,
        behind: bool = False,
        graph_slots: int | None = None,
    ) -> tuple[_LaunchedPass, Any]:
        """Launch the prefill pass of ``reqs`` with ``riders`` (:meth:`_prefill`), its tokens copied behind it to the
        host (not waited for): one per slot up to the highest slot it serves, in slot order, so that the decode step
        after it can read them in place (:meth:`_decodes_behind_prefill`); an empty slot's is garbage.
        ``behind``: a decode step is in flight, not recorded: the riders' last tokens are its tokens, fed one
        position on and gathered from its ``ids`` on the device (a rider it ends with an end-of-sequence token
        computes a row nobody records). ``graph_slots``: the request slots its graph is padded to (None:
        ``max_batch`` for a mixed pass, else :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots` of its
        requests; the step API's passes take ``max_batch``, so that a server replays one graph per bucket, each captured
        before it serves:
        :meth:`warm_serving`). Returns the launched pass and, with ``all_logits``, the float32 logits of every row (on
        the device)."""
        runner, sampler = self.runner, self.sampler
        if self._proposer is not None:
            self._untimed()
        ahead = 1 if behind else 0
        if riders:
            sched.grow_pages(riders, ahead)  # each rider's next token may open a page
        rows = [*riders, *reqs]
        self._next_rows = None  # the prefill's tokens overwrite `ids`: a step prepared before it cannot run
        padded_slots = graph_slots
        if padded_slots is None:  # a mixed pass's requests are every occupied slot: one graph per bucket
            padded_slots = runner.max_batch if riders else prefill_slots(len(rows), runner.max_batch)
        # a prompt whose logprobs are asked takes every row's logits (from the pass's own LM head over all rows)
        asking = [(r, j) for j, r in enumerate(reqs) if r.asks is not None and r.asks.prompt_logprobs is not None]
        view, width, full = runner.run_prefill(
            rows, len(riders) if behind else 0, padded_slots, ahead, all_logits or bool(asking)
        )
        prompts = None
        if asking:
            qo = runner.prefill_arrays["qo_indptr"]  # each request's first row (riders first)
            prompts = self.processor.prompt_logprobs(full, [(r, int(qo[len(riders) + j])) for r, j in asking])
        by_slot: list[Request | None] = [None] * width
        for r in rows:
            if r.decoding:  # (a prompt's chunk short of its end chooses no token: its row is garbage, as a padding one)
                by_slot[r.slot] = r
        pending = self.processor.apply(by_slot, width)[0] if sched.processed else None
        sampler.share_ids(sampler.pick(view, width, by_slot if sched.sampled else None))
        if pending is not None:
            self.processor.chosen(pending, runner.buffers.ids)
        done = runner.send_prefill_tokens(width)
        launched = _LaunchedPass(list(riders), reqs, [r.slot for r in rows], done, pending, prompts)
        return launched, full if all_logits else None

    def _prefill_finish(self, sched: Scheduler, launched: _LaunchedPass, behind: bool = False) -> None:
        """Wait for the prefill pass ``launched`` and record its tokens: the riders' next, the admitted requests'
        first. ``behind``: a decode step was launched after it (:meth:`_decodes_behind_prefill`): only its token
        copy is waited for; otherwise the whole stream, so that the host staging buffers may be written next."""
        if behind:
            launched.done.synchronize()
        else:
            self.runner.stream.synchronize()
        tokens = self.runner.prefill_tokens(launched.slots)
        self._recorded_at = self._pass_s = None  # (no step's time is measured across a prefill pass)
        k = len(launched.riders)
        if launched.logprobs is not None:
            self._keep_logprobs(launched.logprobs, [*launched.riders, *launched.admitted])
        if launched.prompt_logprobs is not None:
            launched.prompt_logprobs.resolve()
        if k:
            sched.record(launched.riders, tokens[:k])
        sched.record(launched.admitted, tokens[k:], prefill=True)

    def _decode_step(self, sched: Scheduler) -> tuple[float, list[Request | None]]:
        """One decode step for every active request, launched (:meth:`_decode_launch`), waited for and recorded;
        returns its host time in microseconds (with a graph, the next step's preparation included, which runs while
        the GPU computes this step) and its rows (None: a padding row)."""
        t0 = time.perf_counter()
        launched = self._decode_launch(sched)
        t2 = time.perf_counter()
        self.runner.stream.synchronize()
        t3 = time.perf_counter()
        self._record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
        return ((t2 - t0) + (time.perf_counter() - t3)) * 1e6, launched.rows

    def _decode_finish(self, sched: Scheduler, launched: _LaunchedStep, behind: bool = False) -> list[Request]:
        """Wait for the decode step ``launched`` and record its tokens; returns the requests that took one (those
        still active: a request that ended since the launch, aborted or at the step before it, takes none).
        ``behind``: another step was launched after it (:meth:`_launches_ahead`): only its token copy is waited
        for; otherwise the whole stream, so that the host staging buffers may be written next."""
        live = [r for r in launched.rows if r is not None and r.finish_reason is None]
        if behind:
            launched.done.synchronize()
        else:
            self.runner.stream.synchronize()
        self._record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
        return live

    def _decode_launch(self, sched: Scheduler, depth: int = 1) -> _LaunchedStep:
        """Launch one decode step for every active request: the scheduler's rows, staged and run by the runner, each
        row's token picked by the sampler, the tokens copied out behind it on the stream (not waited for).
        ``depth``: the steps then in flight, this one included (2: launched before the last one's tokens were read,
        :meth:`_launches_ahead`); the step after them is staged for that many steps ahead.

        A step staged during the previous one (:meth:`Scheduler.peek_rows`) runs only if the slots are still its rows
        (:meth:`Scheduler.same_rows`): a request that ended with an end-of-sequence token, was aborted or admitted
        since (a prefill also drops it) makes it be staged again here."""
        runner, sampler = self.runner, self.sampler
        graph = runner.graph
        prepared, self._next_rows = self._next_rows, None
        if prepared is not None and sched.same_rows(prepared):
            # staged during the previous step (index arrays and plan enqueued behind it); its input tokens are that
            # step's output, still on the device in slot order
            rows = prepared
            runner.feed_staged_decode(len(rows))
        else:
            rows = sched.decode_rows(padded=graph is not None)
            if graph is not None:  # the first slots, as many as the smallest graph holding every request
                rows = rows[: sched.graph_rows(rows, runner.decode_graph_batches)]
            runner.stage_decode(rows)
        n = len(rows)
        view, argmax_done = runner.run_decode(n)
        pending = None
        if sched.processed:  # logprobs and controls of the rows that ask; a control: every argmax taken again
            pending, changed = self.processor.apply(rows, n)
            argmax_done = argmax_done and not changed
        draw_rows = rows if sched.sampled else None  # None: every row greedy (one counter read, no row scan)
        if argmax_done:  # the graph's argmax is every greedy row's token
            sampled = draw_rows is not None and sampler.pick(view, n, draw_rows, argmax_done=True)
        else:
            sampled = sampler.pick(view, n, draw_rows)
        sampler.share_ids(sampled)
        if pending is not None:
            self.processor.chosen(pending, runner.buffers.ids)
        ids, done = runner.send_decode_tokens(n)
        if graph is not None and runner.prepare_ahead:
            # the next step, as it will be unless a request ends with an end-of-sequence token or a prefill comes
            # first (then it is dropped and staged again): staged and planned while the GPU runs this one
            ahead = sched.peek_rows(depth)
            ahead = ahead[: sched.graph_rows(ahead, runner.decode_graph_batches)]
            runner.stage_decode_ahead(ahead, depth)
            self._next_rows = ahead
        return _LaunchedStep(rows, ids, done, pending)

    def _record(
        self, sched: Scheduler, rows: Sequence[Request | None], tokens: list[int], pending: PendingLogprobs | None
    ) -> None:
        """A decode step's tokens recorded (``Scheduler.record``), with the log-probabilities of its rows that asked
        kept on their requests first."""
        if pending is not None:
            self._keep_logprobs(pending, [r for r in rows if r is not None])
        sched.record(rows, tokens)
        if self._proposer is not None:
            self._timed_record(verify=False)

    def _timed_record(self, verify: bool) -> None:
        """With speculation: a decode step's (``verify`` False) or a verifying pass's tokens were just recorded. The
        time since the last such record is its cost to the loop, which
        :class:`~fi_engine.runtime.sample.speculation.DraftPolicy` weighs: a pipelined step's; a pass's with its
        drafting and the pipeline's bubble before it, and the excess of the step after it over a pipelined one (the
        pipeline starting again), charged once that step is recorded."""
        self._policy.stepped()
        now = time.perf_counter()
        last, self._recorded_at = self._recorded_at, now
        pending, self._pass_s = self._pass_s, None
        if last is None:
            return
        interval = now - last
        if verify:
            if pending is not None:  # (two passes in a row: the first has no step after it)
                self._policy.timed(True, pending)
            self._pass_s = interval
        elif pending is not None:
            excess = max(0.0, interval - (self._policy.decode_s or interval))
            self._policy.timed(True, pending + excess)
        else:
            self._policy.timed(False, interval)

    def _untimed(self) -> None:
        """With speculation: other work (a prefill pass, the caller's time between ``generate`` calls) comes before
        the next decode step or pass, so the time until its record is not its cost: the policy times from that record
        on (a pass waiting for the step after it is charged as it stands)."""
        pending, self._pass_s = self._pass_s, None
        if pending is not None:
            self._policy.timed(True, pending)
        self._recorded_at = None

    @staticmethod
    def _keep_logprobs(pending: PendingLogprobs, taking: Sequence[Request]) -> None:
        """Append each asking request's :class:`~fi_engine.runtime.stepping.TokenLogprobs` of this pass to its
        ``logprobs``, where it takes the pass's token (a request that ended since the launch takes none)."""
        live = {id(r) for r in taking if r.finish_reason is None}
        for r, entry in zip(pending.requests, pending.resolve(), strict=True):
            if id(r) in live:
                r.logprobs.append(entry)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")
