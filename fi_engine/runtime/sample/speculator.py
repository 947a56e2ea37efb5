"""Speculative decoding, a part of the serving loop (:class:`Speculator`; the loop holds one, ``loop.speculator``, as
it holds its sampler and logits processor): which requests draft and how much (the policy,
:class:`~fi_engine.runtime.sample.speculation.DraftPolicy`), their drafts (prompt lookup or a draft model's engine:
:mod:`~fi_engine.runtime.sample.speculation`), the verifying pass (one prefill pass over each request's last token and
its draft, every row's logits read), the model's choices at its rows (greedy, or drawn as the sampler draws) and the
tokens they accept, recorded in the scheduler; and the times the policy weighs. The engine's settings
``speculative_tokens``, ``speculative_config``, ``speculation_policy`` and ``draft_model`` are this part's.

It is given the loop it serves and reads the loop's model runner (``run_prefill`` with every row's logits,
``prefill_arrays``) and logits processor (the logprobs of the rows that ask); the loop tells it when a decode step's
or a pass's tokens were recorded and when other work came between.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from ...kernels import flashinfer as kernels
from ...values import arg_int
from ..sampling_params import sets_controls
from ..sched.request import Request
from ..sched.scheduler import Scheduler
from ..stepping import TokenLogprobs
from .speculation import (
    DraftModelProposer,
    DraftPolicy,
    NgramProposer,
    SpeculationStats,
    accepted_tokens,
    same_directory,
    speculative_config_arg,
    tokenizer_difference,
)

__all__: list[str] = []


class Speculator:
    """Speculative decoding for the serving loop ``loop`` (an engine: its ``runner``, ``processor``, ``model_dir``,
    ``paged_prefill_blocker`` and ``speculation_max_rows`` are read). Off (no drafts) until
    :attr:`speculative_tokens` is set."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.proposer: NgramProposer | DraftModelProposer | None = None  # the drafts (None: off)
        self._draft_model: Any = None  # the engine of the draft model (draft_model), or None
        self._policy = DraftPolicy()  # whether a step's drafts are worth a verifying pass
        self._policy_for: tuple[int, Any] = (0, None)  # the (k, draft model) whose costs _policy measured
        self._draws: Any = None  # the Philox stream of sampled rows in verifying passes (made on first use)
        self._recorded_at: float | None = None  # when the last decode step's or pass's tokens were recorded
        self._pass_s: float | None = None  # the last verifying pass's time, until the step after it is recorded
        self._lookup: weakref.WeakKeyDictionary[Request, np.ndarray] = weakref.WeakKeyDictionary()  # prompts
        self.stats = SpeculationStats()  # the passes, drafted and accepted tokens (the engine's speculation_stats)

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
        return 0 if self.proposer is None else self.proposer.k

    @speculative_tokens.setter
    def speculative_tokens(self, k: int) -> None:
        k = arg_int("speculative_tokens", k, 0, 16)
        why = self.loop.paged_prefill_blocker("a draft verified against the cache") if k else None
        if why is not None:
            raise ValueError(f"speculative_tokens: {why}; leave it 0 for this engine")
        proposer: NgramProposer | DraftModelProposer | None = None
        if k:
            proposer = NgramProposer(k) if self._draft_model is None else DraftModelProposer(self._draft_model, k)
        self.proposer = proposer
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
        p = self.proposer
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
        self.proposer = NgramProposer(checked.k, checked.prompt_lookup_max, checked.prompt_lookup_min)

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
        if self.proposer is not None:
            self.speculative_tokens = self.proposer.k  # (its drafts the new drafter's, its costs measured again)
        if old is not None:
            old.close()

    def _check_draft_model(self, engine: Any) -> None:
        """TypeError/ValueError where ``engine`` cannot draft for this one (:attr:`draft_model`)."""
        if not isinstance(getattr(engine, "speculator", None), Speculator):  # (an engine of this package)
            raise TypeError(f"draft_model: expected None or an engine (fi_engine's), got {type(engine).__name__}")
        if engine is self.loop:
            raise ValueError("draft_model: an engine cannot draft for itself; open a second engine of the draft model")
        if engine.closed:
            raise ValueError("draft_model: the engine is closed")
        if engine.speculator.proposer is not None or engine.speculator.draft_model is not None:
            raise ValueError("draft_model: the draft engine speculates itself; set its speculative_tokens to 0")
        if engine.has_unfinished:
            raise ValueError("draft_model: the draft engine has requests queued or active; it must be idle")
        mine, theirs = self.loop.runner.config.vocab_size, engine.runner.config.vocab_size
        if theirs > mine:
            raise ValueError(
                f"draft_model: its vocabulary ({theirs} tokens) does not fit this model's ({mine}); a draft model "
                "must share the target's tokenizer"
            )
        why = tokenizer_difference(getattr(self.loop, "model_dir", None), getattr(engine, "model_dir", None))
        if why is not None:
            raise ValueError(f"draft_model: {why}; a draft model must share the target's tokenizer")

    def close(self) -> None:
        """The draft model's engine closed (with this engine's close)."""
        draft, self._draft_model = self._draft_model, None
        self.proposer = None
        if draft is not None:
            draft.close()

    def _applies(self, sched: Scheduler) -> bool:
        """Whether this step may verify drafts: speculation on, and no request sets a sampling control (logprobs are
        read from the pass's rows: :meth:`_pass_logprobs`)."""
        if self.proposer is None:
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
        if not live or len(live) > self.loop.speculation_max_rows:
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
        proposer = self.proposer
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

    def pass_due(self, sched: Scheduler) -> bool:
        """Whether the next step is a verifying pass (:meth:`drafts_to_verify`). A draft model's drafts cost device
        time, so they are not made to decide: the policy weighs each request's draft at its full length
        (:meth:`_draft_limits`), and the drafts are made once the pass runs."""
        if self.proposer is None:  # off: asked every step, answered at once
            return False
        if not isinstance(self.proposer, DraftModelProposer):
            return self.drafts_to_verify(sched) is not None
        if not self._applies(sched):
            return False
        limits = self._draft_limits(sched)
        if limits is None or not any(n for _, n in limits):
            return False
        k = self.proposer.k
        return self._policy.worth([(r, min(k, n)) for r, n in limits])

    def drafts_to_verify(self, sched: Scheduler, decided: bool = False) -> list[tuple[Request, tuple[int, ...]]] | None:
        """The drafts of a verifying pass to run now, or None: speculation applies (:meth:`_applies`), a request
        has a draft, and the pass pays (:class:`~fi_engine.runtime.sample.speculation.DraftPolicy`; ``decided``: it was
        found to pay a step ago (:meth:`pass_due`), when the drafts were planned from the tokens then recorded)."""
        if self.proposer is None or not self._applies(sched):
            return None
        model = isinstance(self.proposer, DraftModelProposer)
        if model and not decided and not self.pass_due(sched):
            return None
        drafts = self._drafts(sched)
        if drafts is None or not (decided or model or self._policy.worth([(r, len(d)) for r, d in drafts])):
            return None
        return drafts

    def verify(
        self, sched: Scheduler, drafts: list[tuple[Request, tuple[int, ...]]]
    ) -> tuple[float, dict[Request, int]]:
        """A speculative decode step (:attr:`speculative_tokens`) of the decoding requests' ``drafts``
        (:meth:`drafts_to_verify`), waited for and recorded: one prefill pass feeds every one its last token and its
        draft; the greedy choice at each row accepts the draft's tokens up to the first that differs, and gives one
        more (``accepted_tokens``). Returns its wall time in microseconds and the tokens each request got."""
        live = [r for r, _ in drafts]
        for r, draft in drafts:
            r.draft = draft
        t0 = time.perf_counter()
        runner = self.loop.runner
        for r in live:
            sched.grow_pages([r], len(r.draft))  # the pages of its draft's positions (within its budget)
        try:  # (its graph padded to the request slots of len(live): the runner's default)
            _, _, full = runner.run_prefill(live, 0, None, 0, all_logits=True, last_head=False)
            bounds = runner.prefill_arrays["qo_indptr"][: len(live) + 1].tolist()  # each request's rows
            choices = self._row_choices(full, live, bounds)
            logprobs = self._pass_logprobs(full, live, bounds, choices)
        finally:
            for r in live:
                r.draft = ()
        got: dict[Request, int] = {}
        stats = self.stats
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
        self.recorded(verify=True)
        return (time.perf_counter() - t0) * 1e6, got  # (the wait for the pass included)

    def _pass_logprobs(
        self, full: Any, live: Sequence[Request], bounds: Sequence[int], choices: Sequence[int]
    ) -> dict[int, list[TokenLogprobs]]:
        """The log-probabilities a verifying pass gives the requests that ask for them (``logprobs``; no control: such
        a step does not verify, :meth:`_applies`), by ``id`` of the request: one
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
        pending = self.loop.processor.pending_logprobs(full, want)
        self.loop.processor.chosen(pending, self.loop.runner.cupy.asarray(choices, dtype=np.int32))
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
        runner = self.loop.runner
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
            if self._draws is None:
                self._draws = kernels.generator(int(np.random.default_rng().integers(1 << 62)))
            idx = cp.asarray(rows, dtype=np.int64)
            choices[idx] = kernels.sample_logit_rows(
                cp.ascontiguousarray(full[idx]),
                cp.asarray(temperature, dtype=np.float32),
                cp.asarray(top_k, dtype=np.int32),
                cp.asarray(top_p, dtype=np.float32),
                self._draws,
                runner.stream_ptr,
            )
        return cast(list[int], choices.get(stream=runner.stream).tolist())

    def recorded(self, verify: bool) -> None:
        """A decode step's (``verify`` False) or a verifying pass's tokens were just recorded. With speculation on,
        the time since the last such record is its cost to the loop, which
        :class:`~fi_engine.runtime.sample.speculation.DraftPolicy` weighs: a pipelined step's; a pass's with its
        drafting and the pipeline's bubble before it, and the excess of the step after it over a pipelined one (the
        pipeline starting again), charged once that step is recorded."""
        if self.proposer is None:
            return
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

    def untimed(self) -> None:
        """Other work (a prefill pass, the caller's time between ``generate`` calls) comes before the next decode step
        or pass, so with speculation on the time until its record is not its cost: the policy times from that record
        on (a pass waiting for the step after it is charged as it stands)."""
        if self.proposer is None:
            return
        pending, self._pass_s = self._pass_s, None
        if pending is not None:
            self._policy.timed(True, pending)
        self._recorded_at = None

    def prefill_recorded(self) -> None:
        """A prefill pass's tokens were recorded: no step's time is measured across it."""
        self._recorded_at = self._pass_s = None
