"""The serving loop over the engine's parts: prompts queued as requests in the scheduler
(:mod:`~fi_engine.runtime.sched`), admitted into free batch slots and prefilled together, then one decode step after
another over every active request until each ends (an end-of-sequence token, its token limit or an abort), its pages
freed; :class:`GenerationResult` with the tokens and the timings. The loop is driven by ``generate`` to the end of its
prompts, or one step at a time by the step API (``add_request`` / ``step`` / ``abort_request``,
:class:`~fi_engine.runtime.stepping.StepEngine`); both run the same step (``ServingLoop._advance``) over the engine's
one scheduler.

Each step goes one way through the parts (a pass: :mod:`~fi_engine.runtime.passes`): the **scheduler** picks the rows
(admission, the decode rows, their pages), the **model runner**
(:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`) stages them and runs the forward pass and the LM head, the
**sampler** (:class:`~fi_engine.runtime.sample.sampler.Sampler`) picks each row's token, the runner copies the tokens
out, and the scheduler records them; the **speculator** (:class:`~fi_engine.runtime.sample.speculator.Speculator`)
replaces a decode step by a verifying pass where drafts pay; the **launch policy**
(:class:`~fi_engine.runtime.launch_policy.LaunchPolicy`) says when each pass launches: ahead of or behind the step in
flight, queued requests admitted now or held, the decoding requests riding in a prefill pass. The loop is the same
for every model family; what differs is the runner's family definition.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast, overload

import numpy as np

from ..kernels.flashinfer import stream_scope
from ..values import arg_flag
from .launch_policy import LaunchPolicy
from .passes import LaunchedPass, LaunchedStep, Passes
from .sample.logits_processing import LogitsProcessor
from .sample.sampler import Draws, Sampler
from .sample.speculator import Speculator
from .sampling_params import SamplingParams, asks_processing, sampling_arg
from .sched.kv_cache import KVCacheManager
from .sched.request import Request
from .sched.scheduler import Scheduler
from .stepping import FinishReason, NewRequest, StepEngineBase, StepOutput
from .worker.model_runner import ModelRunner

__all__ = ["GenerationResult", "delay_factor_arg", "mixed_prefill_arg", "overlap_steps_arg"]


def _prompt_loras(lora: object, default: str | None, prompts: object) -> Sequence[str | None] | None:
    """``generate``'s ``lora`` as one adapter name (or None) per prompt for ``Scheduler.submit_all`` (which checks
    the list's length); None where no prompt names one."""
    if lora is None:
        lora = default
    if lora is None:
        return None
    if isinstance(lora, str):
        return [lora] * len(prompts) if isinstance(prompts, Sequence) else None
    if not isinstance(lora, Sequence) or any(x is not None and not isinstance(x, str) for x in lora):
        raise TypeError(f"lora: expected an adapter's name, or a name or None per prompt, got {type(lora).__name__}")
    return list(lora)


def overlap_steps_arg(overlap_steps: object) -> bool:
    """``overlap_steps`` checked: a bool, else TypeError naming it."""
    return arg_flag("overlap_steps", overlap_steps)


def mixed_prefill_arg(mixed_prefill: object) -> bool:
    """``mixed_prefill`` checked: a bool, else TypeError naming it."""
    return arg_flag("mixed_prefill", mixed_prefill)


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


def step_output(r: Request, k: int, caching: bool) -> StepOutput:
    """The step API's output of request ``r``, which got ``k`` tokens this step (``caching``: the prefix cache is
    on): its tokens and end; where it asked for log-probabilities or controls, the prefix cache is on, or its draft
    was verified, also its logprobs, with its first tokens the prompt's and the prefix cache's hit, and the draft
    tokens verified since its last output (then counted afresh)."""
    finish = _FINISH.get(r.finish_reason) if r.finish_reason is not None else None
    if not (caching or r.asks is not None or r.drafted):  # most rows: their tokens and end (a step of 64 rows pays
        return StepOutput(r.rid, tuple(r.output[-k:]), finish)  # per row here)
    first = len(r.output) == k
    hit = r.hit if caching and first else None
    logprobs = tuple(r.logprobs[-k:]) if r.asks is not None and r.asks.logprobs is not None else None
    prompt = r.prompt_logprobs if first else None  # (set where asked)
    drafted, accepted = (r.drafted, r.accepted) if r.drafted else (None, None)
    r.drafted = r.accepted = 0
    return StepOutput(r.rid, tuple(r.output[-k:]), finish, None, logprobs, prompt, hit, drafted, accepted)


class ServingLoop(StepEngineBase):
    """The serving loop: :meth:`generate`, :meth:`prefill_logits` and the step API
    (:class:`~fi_engine.runtime.stepping.StepEngine`: :meth:`add_request`, :meth:`abort_request`, :meth:`step`,
    :attr:`has_unfinished`), and the steps they run: each step's prefill pass and decode step launched (when, and what
    runs beside or ahead of them, the launch policy says), waited for and recorded, and what each request got.
    ``generate`` drives the same step (:meth:`_advance`) as :meth:`step`, over the same scheduler, until its own
    prompts are done.

    Its parts (set by :class:`~fi_engine.runtime.engine.Engine`'s constructor, the last three by :meth:`_start_loop`):
    ``scheduler``, ``kv_cache`` (the scheduler's page pool), ``runner``, ``processor``, ``sampler``, ``speculator``,
    ``passes`` (how one pass goes through them) and ``launch_policy`` (when the passes launch, which requests are
    admitted: :class:`~fi_engine.runtime.launch_policy.LaunchPolicy`)."""

    runner: ModelRunner  # the model on the GPU: stages and runs each step, copies its tokens out
    scheduler: Scheduler  # the requests, their slots and KV pages: admission, a step's rows, the tokens recorded
    kv_cache: KVCacheManager  # the KV cache's pages and the prompt prefixes cached in them (the scheduler's pool)
    sampler: Sampler  # each row's token from its logits (greedy, or drawn with the request's parameters)
    processor: LogitsProcessor  # the logprobs and sampling controls of the rows that ask, before the sampler
    speculator: Speculator  # speculative decoding: the drafts, the verifying pass, the policy
    passes: Passes  # a prefill pass or decode step launched through the parts above and finished (recorded)
    launch_policy: LaunchPolicy  # when the passes launch: ahead of or behind a step in flight, admitted or held
    model_dir: Any  # the checkpoint directory (its tokenizer.json: the grammar_tokenizer, made on first use)
    # the step API's requests by id, the aborted ones the next step() reports, the ends a failed step() had recorded
    _requests: dict[int, Request]
    _aborted: list[Request]
    _unreported: list[StepOutput]
    _ffi_stream: Any  # TVM-FFI's stream scope of the runner's stream, made on the first step()
    _inflight: LaunchedStep | None  # the decode step step() launched and left running (overlap_steps)
    _overlap_steps: bool
    _scheduler_delay_factor: float
    _mixed_prefill: bool
    _closed: bool
    _verify_next: bool  # the policy found a verifying pass worth it a step ago (generate's pipelined loop)

    def _start_loop(self) -> None:
        """The loop's state before the first request (the constructor calls it once the parts exist)."""
        self._requests = {}
        self._aborted = []
        self._unreported = []
        self._ffi_stream = None
        self.passes = Passes(self)  # (with no decode step staged ahead)
        self._inflight = None
        self.launch_policy = LaunchPolicy(self)  # (its admission delay measured from the first prefill on)
        # the step API launches each decode step and returns, its tokens coming with the next step() (one GPU;
        # _serve_step): the caller's handling of a step's tokens overlaps the next step on the GPU. Off by default
        # (step() then returns each step's own tokens); the servers turn it on (models.registry.open_engine)
        self.overlap_steps = False
        # the step API's admission waits while others decode, up to this many times the last prefill's time, so a
        # burst of arrivals is prefilled in fewer passes (LaunchPolicy.admit); 0: admitted at the next step
        self.scheduler_delay_factor = 0.0
        # the step API's prefill passes also decode the active requests (mixed_prefill); off by default (their
        # riders' logits come from the prefill's kernels); the servers turn it on (models.registry.open_engine)
        self.mixed_prefill = False
        self.speculator = Speculator(self)  # speculative decoding (off until its speculative_tokens is set)
        self._verify_next = False

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

    tp_pipelined_decode = True
    """:attr:`pipelined_decode` for ``generate`` under tensor parallelism too, where the runner stages steps ahead
    (``ModelRunner.tp_prepare_ahead``) and no speculation is on (:meth:`LaunchPolicy.pipelines_decode`). Every rank
    runs the same scheduler over the same tokens (rank 0's, broadcast on the stream in each step,
    ``Sampler.share_ids``), so every rank launches ahead, drops a prepared step or waits at the same steps, and issues
    its collectives in the same order; the step launched ahead copies its input tokens on the device, behind the
    broadcast that made them. On by default (its two-GPU test, tests/engine/test_gpu_llama_tp.py,
    gives the plain loop's tokens; ``benchmarks/bench_llama_tp.py --variants no-tp-pipe`` turns it off: 4-6 % fewer
    tokens/s at TP 2). The step API's overlapped steps stay one GPU's."""

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

    speculation_max_rows = 16
    """Speculative decoding drafts only while at most this many requests decode (beyond, the drafting's host time and
    the verifying pass's rows cost more than they give; vLLM's ``speculative_disable_by_batch_size``)."""

    scheduler_delay_factor = _Setting(
        delay_factor_arg,
        """How long queued requests may wait while others decode, in multiples of the last prefill's time
        (:meth:`LaunchPolicy.admit`; vLLM's option of that name), 0 to 100. Default 0; ``fi-engine serve`` uses 3.""",
    )

    def _add_request(self, request: NewRequest) -> int:
        """:meth:`add_request`: queue ``prompt`` (token ids) for up to ``max_new_tokens`` new tokens; returns its id
        (an int, never reused by this engine). ``sampling``: its own (None: greedy; its ``seed``:
        :class:`SamplingParams`); ``eos_token_ids``: the tokens that end it, kept in its output (None: the
        checkpoint's; ``()``: none).

        Raises ValueError naming ``prompt``, ``max_new_tokens`` or ``eos_token_ids[i]`` for a request that can never
        be served (empty, ids outside the vocabulary, longer than ``max_seq_len`` or ``max_prefill_tokens``, a
        page budget beyond the KV cache), naming ``response_format`` or ``grammar`` for a grammar it cannot match
        (``LogitsProcessor.matcher``), TypeError naming ``sampling`` for anything but :class:`SamplingParams` or None;
        nothing is queued then."""
        prompt, max_new_tokens, sampling, eos_token_ids = request
        self._check_open()
        sampling = sampling_arg(sampling)
        if asks_processing(sampling):
            self.processor.check(sampling, sharded=self.runner.vocab_shard is not None)
        r = self.scheduler.submit(
            prompt,
            max_new_tokens,
            name="prompt",
            sampling=sampling,
            eos_token_ids=eos_token_ids,
            draws=self.sampler.draws(sampling),
            grammar=self.processor.matcher(sampling, self.model_dir),
            lora=None if sampling is None else sampling.lora,
        )
        self._requests[r.rid] = r
        return r.rid

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
        (:meth:`LaunchPolicy.admit`); with :attr:`mixed_prefill`, the requests already active take a token from the
        prefill pass too (so one more in that call).

        An exception from the device work (a CUDA error, an interrupt) ends every queued and active request (the
        next step reports them as aborted, after the requests that had ended in the failed call before it failed,
        with their tokens) and is raised; the engine can serve new requests afterwards unless the error left the
        device unusable."""
        self._check_open()
        out, self._unreported = self._unreported, []
        out += [StepOutput(r.rid, (), "abort") for r in self._aborted]
        self._aborted.clear()
        sched, runner = self.scheduler, self.runner
        out += self._refused_outputs(sched)  # (any a failed step left)
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
        return out + self._outputs(produced) + self._refused_outputs(sched)

    def _refused_outputs(self, sched: Scheduler) -> list[StepOutput]:
        """The step API's outputs of the requests the scheduler aborted at admission (their adapter could not be
        read): ``"abort"`` with the reason as ``error``; they are forgotten."""
        if not sched.refused:  # (asked twice a step)
            return []
        out = [StepOutput(r.rid, (), "abort", r.error) for r in sched.refused]
        for r in sched.refused:
            self._requests.pop(r.rid, None)
        sched.refused.clear()
        return out

    def _outputs(self, produced: dict[Request, int]) -> list[StepOutput]:
        """The step API's outputs of ``produced`` (request -> tokens it got); ended requests are forgotten."""
        out = []
        caching = self.scheduler.prefix_caching
        for r, k in produced.items():
            out.append(step_output(r, k, caching))
            if r.finish_reason is not None:
                self._requests.pop(r.rid, None)
        return out

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
        where it gave every active request a token (:meth:`LaunchPolicy.rows_behind_prefill`)."""
        inflight, self._inflight = self._inflight, None
        policy = self.launch_policy
        # speculation: a verifying pass worth it by the tokens recorded so far runs after the step in flight, waited
        # for (it reads that step's tokens), and the step is the synchronous one (_advance)
        verify = self.speculator.pass_due(sched)
        if inflight is not None and verify:
            for r in self.passes.decode_finish(sched, inflight):
                produced[r] = 1
            inflight = None
        launched: LaunchedPass | None = None
        riders: list[Request] = []
        admitted: list[Request] = []
        prefill_s = 0.0  # the prefill pass's launch and wait (kept for the scheduler delay)
        if inflight is not None:  # also when overlap_steps was turned off since that step was launched
            # the next step launched before this one's tokens are read, where nothing changes the rows in between
            if self.overlap_steps and policy.launches_ahead(sched, delay=True):
                self._inflight = self.passes.decode_launch(sched, depth=2)
            elif self.overlap_steps and policy.prefills_ahead(sched):
                # the prefill pass of the requests admitted now goes behind the step in flight, prepared while it
                # runs: its riders are fed the step's tokens on the device, one position on
                admitted = policy.admit(sched, delay=True, riders=riders, behind=True)
                if admitted:
                    t = time.perf_counter()
                    try:
                        launched, _ = self.passes.prefill_launch(
                            sched, admitted, riders, behind=True, graph_slots=self.runner.max_batch
                        )
                    except BaseException:
                        # the step in flight ran before the failure: the requests it ended are reported with their
                        # tokens (step() aborts the rest), as where the prefill follows its recording
                        with contextlib.suppress(Exception):
                            for r in self.passes.decode_finish(sched, inflight, behind=True):
                                produced[r] = 1
                        raise
                    prefill_s = time.perf_counter() - t
            for r in self.passes.decode_finish(
                sched, inflight, behind=self._inflight is not None or launched is not None
            ):
                produced[r] = 1
            if self._inflight is not None:
                return
        if launched is None:
            if not (self.overlap_steps and self.runner.comm is None) or verify:
                self._advance(sched, None, produced, verify=verify)
                return
            admitted = policy.admit(sched, delay=True, riders=riders)
            if admitted:
                t = time.perf_counter()
                launched, _ = self.passes.prefill_launch(sched, admitted, riders, graph_slots=self.runner.max_batch)
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
            rows = policy.rows_behind_prefill(sched) if all_rode and not chunking else None
            if rows is not None:
                # the decode step goes right behind the pass, its input tokens copied on the device: the GPU does
                # not wait for the host to read the pass's tokens and prepare the step
                self.runner.stage_decode_ahead(rows, ahead=1)
                self.passes.next_rows = rows
                self._inflight = self.passes.decode_launch(sched, depth=2)
                t = time.perf_counter()
                self.passes.prefill_finish(sched, launched, behind=True)
            else:
                t = time.perf_counter()
                self.passes.prefill_finish(sched, launched)
            policy.last_prefill_s = prefill_s + time.perf_counter() - t
            for r, n in zip(passed, had, strict=True):  # (a rider the step in flight ended took nothing)
                if len(r.output) > n:
                    produced[r] = produced.get(r, 0) + 1
            if all_rode and chunking:
                return
        if sched.decoding and self._inflight is None:
            self._inflight = self.passes.decode_launch(sched)

    def _timed_prefill(self, sched: Scheduler, admitted: list[Request], riders: Sequence[Request] = ()) -> float:
        """:meth:`Passes.prefill` of the admitted requests (with ``riders``, a mixed pass: :attr:`mixed_prefill`); its
        host time in seconds, kept for the admission delay (:meth:`LaunchPolicy.admit`)."""
        t = time.perf_counter()
        self.passes.prefill(sched, admitted, riders=riders)
        elapsed = self.launch_policy.last_prefill_s = time.perf_counter() - t
        return elapsed

    def _settle(self) -> None:
        """Wait for a decode step left in flight whose requests have all ended since (aborted): nothing of it is
        recorded; the engine's buffers are free for the next call."""
        if self._inflight is not None:
            self.runner.stream.synchronize()
            self._inflight = None
            self.passes.next_rows = None

    def _abort_everything(self, sched: Scheduler) -> None:
        """After a failed step: wait for what was issued (the host staging buffers may be rewritten next), then end
        every request; the step API's ones are reported as aborted by the next :meth:`step`."""
        self.passes.next_rows = None
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
        lora: str | Sequence[str | None] | None = None,
    ) -> GenerationResult:
        """Generate tokens for each prompt (lists of token ids) until an end-of-sequence token (kept in the
        output) or ``max_new_tokens`` (one value, or one per prompt).

        ``eos_token_ids``: default the checkpoint's ``eos_token_id``; ``()`` to always run to
        ``max_new_tokens``. Returns the tokens in prompt order, with timings. Sampled generation starts a new
        Philox stream from ``sampling.seed`` (None: 0; offset 0) on every call, shared by its prompts, so the same
        call reproduces its tokens. It runs the step of :meth:`step` over the engine's scheduler, so it needs the
        step API idle: ValueError while requests added with :meth:`add_request` are queued or active.

        ``lora``: the LoRA adapter of every prompt (a name), or one per prompt (a list of names and None, the base
        model's), rows of different adapters decoded together; None: ``sampling.lora``. ValueError naming ``lora``
        for a name the engine does not serve; a prompt whose adapter's folder can no longer be read when it is
        admitted (the host had dropped its copy) ends ``"abort"`` with no tokens, the others go on.
        """
        self._check_open()
        self._check_idle("generate")
        sampling = sampling_arg(sampling) or SamplingParams()
        if asks_processing(sampling):
            self.processor.check(sampling, sharded=self.runner.vocab_shard is not None)
        # a fresh stream per call (seed, offset 0), every row its own subsequence: reproducible generations
        draws = None if sampling.greedy else Draws.seeded(sampling.seed or 0, shared=True)
        sched, runner = self.scheduler, self.runner
        matcher = self.processor.matcher
        loras = _prompt_loras(lora, sampling.lora, prompts)
        reqs = sched.submit_all(
            prompts, max_new_tokens, sampling, eos_token_ids, draws, lambda: matcher(sampling, self.model_dir), loras
        )
        self.passes.next_rows = None
        result = GenerationResult([], [])
        # TVM-FFI's current stream is the runner's for the whole call: every op is given that stream, and finds it
        # current already (one query instead of a set and a restore around each of the ~10 kernels per layer)
        with runner.cupy.cuda.Device(runner.device), runner.stream, stream_scope(runner.stream_ptr, runner.device):
            try:
                if self.launch_policy.pipelines_decode():
                    launched = None
                    while sched.has_work:
                        launched = self._advance_pipelined(sched, result, launched)
                else:
                    while sched.has_work:
                        self._advance(sched, result)
            finally:
                if sum(sched.abort(r) for r in reqs):  # interrupted: nothing of this call stays queued or active
                    self.passes.next_rows = None
                runner.stream.synchronize()
        sched.refused.clear()  # (its own requests only: the step API is idle) ended "abort" below
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
        admitted = self.launch_policy.admit(sched, delay=result is None, riders=None if result is not None else riders)
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
            drafts = self.speculator.drafts_to_verify(sched, decided=verify)
            if drafts is not None:
                self.passes.next_rows = None  # a decode step staged before the pass is stale after it
                host_us, got = self.speculator.verify(sched, drafts)
            else:
                host_us, rows = self.passes.decode_step(sched)
                got = {r: 1 for r in rows if r is not None}
            if result is not None:
                result.step_host_us.append(host_us)
                result.decode_s += time.perf_counter() - t
                result.decode_steps += 1
            else:
                for r, n in got.items():
                    produced[r] = produced.get(r, 0) + n

    def _advance_pipelined(
        self, sched: Scheduler, result: GenerationResult, launched: LaunchedStep | None
    ) -> LaunchedStep | None:
        """``generate``'s step with :attr:`pipelined_decode`: with a decode step in flight (``launched``), the
        next one is launched first where it may be (:meth:`LaunchPolicy.launches_ahead`), then the one in flight is
        waited for and recorded; without, what fits is admitted and prefilled and a decode step launched. Returns the
        step left in flight. The timings as :meth:`_advance` gives them (the waits for the GPU excluded)."""
        if launched is None:
            admitted = self.launch_policy.admit(sched, delay=False)
            if admitted:
                result.prefill_s += self._timed_prefill(sched, admitted)
            if not sched.decoding:  # (nothing, or only prompts with chunks left)
                return None
            t = time.perf_counter()
            drafts = self.speculator.drafts_to_verify(sched, decided=self._verify_next)
            self._verify_next = False
            if drafts is not None:  # a verifying pass, waited for and recorded (speculative_tokens)
                self.passes.next_rows = None  # a decode step staged before the pass is stale after it
                host_us, _ = self.speculator.verify(sched, drafts)
                result.step_host_us.append(host_us)
                result.decode_s += time.perf_counter() - t
                result.decode_steps += 1
                return None
            launched = self.passes.decode_launch(sched)
            result.decode_s += time.perf_counter() - t
            return launched
        t0 = time.perf_counter()
        # with speculation, a step whose drafts (from the tokens recorded so far) are worth a verifying pass is not
        # launched ahead: the pass follows the step in flight, with its tokens
        verify = self.speculator.pass_due(sched)
        ahead = (
            self.passes.decode_launch(sched, depth=2)
            if not verify and self.launch_policy.launches_ahead(sched, delay=False)
            else None
        )
        waited = self.runner.staged_wait_s if ahead is not None else 0.0
        t1 = time.perf_counter()
        if ahead is not None:
            launched.done.synchronize()  # its token copy, not the step queued behind it
        else:
            self.runner.stream.synchronize()  # everything, the copies out of the host staging buffers included
        t2 = time.perf_counter()
        self.passes.record(sched, launched.rows, launched.ids[: len(launched.rows)].tolist(), launched.logprobs)
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

    def prefill_logits(
        self, prompts: Sequence[Sequence[int]], lora: str | Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """Float32 logits ``[len(prompt), vocab]`` of every position of every prompt (a check against a
        reference implementation; the prompts are prefilled in batches, then their pages freed). ``lora``: the
        prompts' LoRA adapters, as :meth:`generate` takes them."""
        self._check_open()
        self._check_idle("prefill_logits")
        sched, runner = self.scheduler, self.runner
        reqs = sched.submit_all(prompts, 1, None, (), None, loras=_prompt_loras(lora, None, prompts))
        out: dict[int, np.ndarray] = {}
        device = runner.cupy.cuda.Device(runner.device)
        with sched.whole_prompts(), device, runner.stream, stream_scope(runner.stream_ptr, runner.device):
            try:
                while sched.has_work:
                    admitted = sched.admit()
                    for r, logits in zip(admitted, self.passes.prefill(sched, admitted, all_logits=True), strict=True):
                        out[r.rid] = logits
            finally:
                for r in reqs:  # interrupted: nothing of this call stays queued or active
                    sched.abort(r)
        refused, sched.refused[:] = list(sched.refused), []
        if refused:  # a prompt's adapter could not be read: no logits for it
            raise cast(Exception, refused[0].error)
        return [out[r.rid] for r in reqs]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")
