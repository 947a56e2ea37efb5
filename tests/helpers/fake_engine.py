"""A stand-in :class:`~fi_engine.runtime.stepping.StepEngine` for the serving tests on CPU (no GPU, no model).

:class:`FakeStepEngine` keeps the protocol's contract the way the GPU engine does: requests queued FIFO and
admitted into ``max_batch`` slots, one token per active request per step (the admitting step is the prefill and
gives the first token), a request ends on one of its EOS ids (kept in its output) or at ``max_new_tokens``,
:meth:`~FakeStepEngine.abort_request` frees the slot at once and the next step reports it with ``"abort"``.
Its tokens follow a rule (:func:`expected_tokens`) so that a test knows every request's exact output; a
``scripts`` table gives chosen prompts chosen outputs (text for the stop-string tests).

A prefix cache (``prefix_cache_page``), modelled on the GPU engine's so that a test can predict each request's
``num_cached_tokens`` (:func:`cached_tokens`): pages of that many tokens whose K/V an earlier request computed (its
prompt and its output but the last token, whose K/V the GPU engine writes in the pass after it was sampled), found
from the prompt's start, never evicted; a request admitted in the same step as another finds none of its pages
(they are written by that step's pass). Its tokens do not change.

It records what a test asserts: the rids aborted, the most slots used at once, the threads that called it (the
service must call it from one), and it can be slow (``step_delay_s``) or fail at a step (``fail_at_step``).

Log-probabilities and the sampling controls. Behind the rule stand logits (:func:`fake_logits`): a fixed
pseudo-random vector per (prompt, seed, step) whose most likely token is the rule's (or the script's). A request
that asks for ``logprobs`` / ``prompt_logprobs`` gets them from those logits (:func:`position_logprobs`); one that
sets a control that can change the choice (``logit_bias``, ``min_tokens``, a penalty, ``min_p``) has its tokens
chosen from them by :func:`next_token`, in vLLM's order, greedy or drawn with a uniform fixed per (seed, step).
:func:`reference_run` plays a request through the same functions, so a test knows its every token and logprob.

A request with a ``grammar`` (``response_format``; the engine needs the ``tokenizer`` then) has the tokens its
grammar does not allow masked out of those logits before the controls (:class:`~fi_engine.text.grammar.GrammarMatcher`)
and chooses from the rest as above: greedy, the highest-logit allowed token. Once the grammar is complete only its
end-of-sequence ids are allowed, and choosing one ends the request (``"stop"``, even with ``ignore_eos``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.runtime.stepping import FinishReason, StepOutput, TokenLogprobs
from fi_engine.text.grammar import GrammarMatcher, GrammarTokenizer


def expected_tokens(
    prompt: Sequence[int], max_new_tokens: int, pool: Sequence[int], seed: int = 0, eos: Sequence[int] = ()
) -> list[int]:
    """What :class:`FakeStepEngine` generates for ``prompt`` (without a script): token ``k`` is
    ``pool[(sum(prompt) * 7 + seed * 13 + k * 5) % len(pool)]``, up to ``max_new_tokens`` or the first EOS id."""
    out = []
    base = sum(prompt) * 7 + seed * 13
    for k in range(max_new_tokens):
        token = pool[(base + k * 5) % len(pool)]
        out.append(token)
        if token in eos:
            break
    return out


def lora_seed(name: str) -> int:
    """The seed a request of LoRA adapter ``name`` adds to its own in :class:`FakeStepEngine` (so that each adapter
    generates other tokens than the base model and the other adapters: :func:`expected_tokens` with it)."""
    return sum(map(ord, name)) * 101


def rule_token(prompt: Sequence[int], k: int, pool: Sequence[int], seed: int = 0) -> int:
    """Token ``k`` of :func:`expected_tokens`' rule."""
    return pool[(sum(prompt) * 7 + seed * 13 + k * 5) % len(pool)]


def fake_logits(vocab_size: int, pool: Sequence[int], key: Sequence[int], favoured: int) -> np.ndarray:
    """The stand-in model's logits (float64, ``(vocab_size,)``): standard normal noise drawn from ``key`` (ints
    >= 0), 8 lower outside ``pool``, and ``favoured`` set 2 above the largest (so it is the argmax)."""
    logits = np.random.default_rng([int(k) % 2**63 for k in key]).standard_normal(vocab_size)
    outside = np.ones(vocab_size, dtype=bool)
    outside[list(pool)] = False
    logits[outside] -= 8.0
    logits[favoured] = logits.max() + 2.0
    return logits


def greedy_under_grammar(
    codec: Any, grammars: GrammarTokenizer, grammar: str, key: int, vocab: int, steps: int = 600
) -> str:
    """The text a model of :func:`fake_logits` writes under ``grammar`` (``codec``: a TextCodec; ``vocab``: the
    logits' width, past the tokenizer's for padded rows): at each step the allowed token of the highest logit, its
    logits keyed by (``key``, step) and favouring id 0 (an EOS id the grammar must refuse until it is complete),
    until an EOS id or ``steps`` tokens (AssertionError). Special tokens are kept in the text."""
    matcher = grammars.matcher(grammar)
    every = list(range(codec.tokenizer.vocab_size))
    out: list[int] = []
    for k in range(steps):
        logits = fake_logits(vocab, every, (key, k), favoured=0)
        logits[~matcher.allowed_mask(vocab)] = -np.inf
        token = int(np.argmax(logits))
        assert token < codec.tokenizer.vocab_size  # a padded row is never allowed
        matcher.consume(token)
        if token in codec.eos_token_ids:
            assert matcher.is_finished
            return str(codec.tokenizer.decode(out, skip_special_tokens=False))
        out.append(token)
    raise AssertionError(f"no end within {steps} tokens: {codec.tokenizer.decode(out)!r}")


def step_logits(
    vocab_size: int, pool: Sequence[int], prompt: Sequence[int], k: int, seed: int, script: Sequence[int] | None
) -> np.ndarray:
    """The logits of a request's step ``k``: favouring the script's token ``k``, else the rule's."""
    favoured = script[k] if script is not None else rule_token(prompt, k, pool, seed)
    return fake_logits(vocab_size, pool, (sum(prompt) * 7 + seed * 13, k), favoured)


def position_logprobs(logits: np.ndarray, token: int, n: int) -> TokenLogprobs:
    """``token``'s log-softmax and the ``n`` most likely (id, logprob), most likely first, ties by id."""
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    order = np.lexsort((np.arange(logits.size), -logprobs))[:n]
    return TokenLogprobs(float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in order))


def prompt_logprobs(
    vocab_size: int, pool: Sequence[int], prompt: Sequence[int], n: int
) -> tuple[TokenLogprobs | None, ...]:
    """The prompt's log-probabilities: position ``i`` under the logits of a greedy request of ``prompt[:i]``'s
    first step (None for position 0)."""
    out: list[TokenLogprobs | None] = [None]
    for i in range(1, len(prompt)):
        logits = step_logits(vocab_size, pool, prompt[:i], 0, 0, None)
        out.append(position_logprobs(logits, prompt[i], n))
    return tuple(out)


def changes_choice(sampling: SamplingParams | None) -> bool:
    """Whether ``sampling`` sets a control that can change which token is chosen (the rule no longer applies)."""
    if sampling is None:
        return False
    return bool(
        sampling.grammar
        or sampling.logit_bias
        or sampling.min_tokens
        or sampling.presence_penalty
        or sampling.frequency_penalty
        or sampling.repetition_penalty != 1.0
        or sampling.min_p
    )


def next_token(
    logits: np.ndarray,
    sampling: SamplingParams,
    prompt: Sequence[int],
    generated: Sequence[int],
    eos: Sequence[int],
    allowed: np.ndarray | None = None,
) -> int:
    """The token a request chooses from ``logits`` after ``generated``, in vLLM's order: the grammar's mask
    (``allowed``: bool ``[vocab]``, None: every token), logit_bias, min_tokens (EOS masked), repetition penalty
    (prompt and output), frequency and presence penalties (output); then the argmax (lowest id on a tie) when
    greedy, else temperature, min_p, top_k, top_p and an inverse-CDF draw with a uniform fixed by (seed, step)."""
    x = logits.copy()
    if allowed is not None:
        x[~allowed] = -np.inf
    for token, bias in sampling.logit_bias:
        x[token] += bias
    if len(generated) < sampling.min_tokens and eos:
        x[list(eos)] = -np.inf
    penalty = sampling.repetition_penalty
    if penalty != 1.0:
        seen = np.unique(np.asarray([*prompt, *generated], dtype=np.int64))
        x[seen] = np.where(x[seen] > 0, x[seen] / penalty, x[seen] * penalty)
    counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=x.size)[: x.size]
    x -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    if sampling.greedy:
        return int(np.argmax(x))
    probs = np.exp((x - x.max()) / sampling.temperature)
    probs /= probs.sum()
    probs[probs < sampling.min_p * probs.max()] = 0.0
    order = np.lexsort((np.arange(x.size), -probs))
    if sampling.top_k:
        probs[order[sampling.top_k :]] = 0.0
    if sampling.top_p < 1.0:
        cumulative = np.cumsum(probs[order]) / probs.sum()
        probs[order[int(np.searchsorted(cumulative, sampling.top_p)) + 1 :]] = 0.0
    u = np.random.default_rng([sampling.seed or 0, len(generated), 1]).random()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), x.size - 1))


@dataclass(frozen=True)
class FakeRun:
    """A request played through the stand-in's rules: its tokens, their logprobs and the prompt's (None when
    the request did not ask)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs] | None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None


def reference_run(
    vocab_size: int,
    pool: Sequence[int],
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos: Sequence[int] = (),
    script: Sequence[int] | None = None,
    grammars: GrammarTokenizer | None = None,
) -> FakeRun:
    """What :class:`FakeStepEngine` gives a request (the same functions, step by step; ``grammars``: the
    tokenizer's, for a request with a grammar)."""
    script = None if script is None else list(script)
    matcher = _matcher(grammars, sampling)
    request = FakeRequest(0, list(prompt), max_new_tokens, _seed(sampling), tuple(eos), script, sampling, matcher)
    logprobs: list[TokenLogprobs] | None = None if sampling is None or sampling.logprobs is None else []
    while True:
        token, entry, last = request.advance(vocab_size, pool)
        if logprobs is not None and entry is not None:
            logprobs.append(entry)
        if request.stops(token) or last:
            break
    asked = None if sampling is None else sampling.prompt_logprobs
    prompts = None if asked is None else prompt_logprobs(vocab_size, pool, prompt, asked)
    return FakeRun(request.generated, logprobs, prompts)


def cached_tokens(prompt: Sequence[int], cached: set[tuple[int, ...]], page: int) -> int:
    """How many of ``prompt``'s tokens a prefix cache holding the page-aligned prefixes ``cached`` finds: the
    longest run of whole pages from its start, at most ``len(prompt) - 1`` tokens rounded down to a page (the last
    prompt token is always computed, for the logits of the first new one)."""
    found = 0
    while found + page <= len(prompt) - 1 and tuple(prompt[: found + page]) in cached:
        found += page
    return found


def _matcher(grammars: GrammarTokenizer | None, sampling: SamplingParams | None) -> GrammarMatcher | None:
    """A request's grammar matcher (None without a grammar)."""
    if sampling is None or sampling.grammar is None:
        return None
    assert grammars is not None, "a request with a grammar needs the engine's tokenizer"
    return grammars.matcher(sampling.grammar)


def _seed(sampling: SamplingParams | None) -> int:
    return 0 if sampling is None or sampling.greedy else sampling.seed or 0


@dataclass
class FakeRequest:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    seed: int
    eos: tuple[int, ...]
    script: list[int] | None  # the tokens to give, else the rule of expected_tokens
    sampling: SamplingParams | None = None
    matcher: GrammarMatcher | None = None  # the request's place in its grammar (None: no grammar)
    generated: list[int] = field(default_factory=list)

    def stops(self, token: int) -> bool:
        """Whether ``token`` ends the request: one of its EOS ids, or its grammar's end (an EOS id it allowed)."""
        done = self.matcher is not None and self.matcher.is_finished and token in self.matcher.eos_token_ids
        return token in self.eos or done

    def advance(self, vocab_size: int, pool: Sequence[int]) -> tuple[int, TokenLogprobs | None, bool]:
        """Generate the next token: it, its logprobs (None unless asked) and whether it is the last by length."""
        k, sampling, script = len(self.generated), self.sampling, self.script
        asked = None if sampling is None else sampling.logprobs
        chooses = changes_choice(sampling)
        logits = None
        if asked is not None or chooses:
            logits = step_logits(vocab_size, pool, self.prompt, k, self.seed, script)
        if chooses:
            assert sampling is not None and logits is not None
            allowed = None if self.matcher is None else self.matcher.allowed_mask(vocab_size)
            token = next_token(logits, sampling, self.prompt, self.generated, self.eos, allowed)
            if self.matcher is not None:
                self.matcher.consume(token)
        else:
            token = script[k] if script is not None else rule_token(self.prompt, k, pool, self.seed)
        entry = None if asked is None or logits is None else position_logprobs(logits, token, asked)
        self.generated.append(token)
        last = k + 1 == (self.max_new_tokens if script is None else min(len(script), self.max_new_tokens))
        return token, entry, last


class FakeStepEngine:
    """A deterministic :class:`~fi_engine.runtime.stepping.StepEngine` over a vocabulary of ``vocab_size`` ids.

    Args:
        vocab_size: ids of prompts lie in ``[0, vocab_size)``.
        pool: the ids it generates from (default: ``range(vocab_size)``; a tokenizer's plain tokens in the text
            tests, so the text is readable and no special token appears by chance).
        max_batch: slots. max_seq_len: the most prompt + generated tokens of a request (a longer one is refused).
        eos_token_ids: the default EOS ids (``add_request(eos_token_ids=None)``).
        scripts: prompt (a tuple of ids) -> the tokens to generate for it (then the limits and EOS apply).
        step_delay_s: seconds each step sleeps (a slow engine). fail_at_step: raise RuntimeError at that step.
        step_s: seconds each step takes in all, its own work included (it sleeps what is left): a GPU's step of a
            fixed time, for benchmarks/bench_serve.py's stand-in server.
        refuses: the :class:`SamplingParams` fields it refuses, as an engine that cannot honour them does: a request
            setting one to other than its default is a ValueError ``"<field>: not supported by this engine"``
            (settable: :attr:`refuses`).
        prefix_cache_page: the prefix cache's page size in tokens (see the module docstring): each request's first
            output reports ``num_cached_tokens`` (:func:`cached_tokens`); None (default): no cache, None reported.
            :attr:`prefix_caching` says which.
        draft: ``(draft tokens, accepted)`` that every output after a request's first reports verified, as a
            speculating engine's do (its tokens do not change).
        adapters: the LoRA adapters it serves by name (None: none, as an engine opened without ``lora``): a request
            of one generates with its seed plus :func:`lora_seed`; :meth:`load_lora` adds one whose folder holds an
            ``adapter_config.json`` (nothing else is read), :meth:`unload_lora` removes one no request uses.
        broken_adapters: adapters a request of which ends at its admission (``"abort"``, a ValueError saying the
            adapter could not be read again), as the GPU engine's does when an adapter's folder is gone.
        tokenizer: the checkpoint's :class:`~fi_engine.text.tokenizer.Tokenizer`, for requests with a ``grammar``
            (its matcher's tokenizer, :attr:`grammar_tokenizer`, is made on the first unless a server set it, as it
            sets the GPU engine's; its EOS ids: ``eos_token_ids``).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        pool: Sequence[int] | None = None,
        max_batch: int = 4,
        max_seq_len: int = 1 << 20,
        eos_token_ids: Sequence[int] = (),
        scripts: dict[tuple[int, ...], list[int]] | None = None,
        step_delay_s: float = 0.0,
        fail_at_step: int | None = None,
        step_s: float = 0.0,
        refuses: Sequence[str] = (),
        prefix_cache_page: int | None = None,
        tokenizer: Any = None,
        draft: tuple[int, int] | None = None,
        adapters: Sequence[str] | None = None,
        broken_adapters: Sequence[str] = (),
    ) -> None:
        self.vocab_size = vocab_size
        self.pool = list(pool) if pool is not None else list(range(vocab_size))
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.scripts = dict(scripts or {})
        self.step_delay_s = step_delay_s
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self.refuses = frozenset(refuses)
        self.prefix_cache_page = prefix_cache_page
        self.draft = draft
        # LoRA: the adapters served (None: none; load_lora / unload_lora change them), and those a request of which
        # ends at its admission, as the GPU engine's does when an adapter's folder is gone (broken: a test's to set)
        self.lora_names: list[str] | None = None if adapters is None else list(adapters)
        self.broken_adapters: set[str] = set(broken_adapters)
        self.cached: set[tuple[int, ...]] = set()  # the page-aligned token prefixes whose K/V were computed
        self.tokenizer = tokenizer
        self.grammar_tokenizer: GrammarTokenizer | None = None
        self._next_rid = 0
        self._queue: deque[FakeRequest] = deque()
        self._active: dict[int, FakeRequest] = {}
        self._aborted_pending: list[int] = []
        self.aborted: list[int] = []  # every rid aborted while queued or active
        self.added: list[tuple[int, tuple[int, ...], int, SamplingParams | None]] = []
        self.most_active = 0
        self.steps = 0
        self.threads: set[int] = set()

    def _called(self) -> None:
        self.threads.add(threading.get_ident())

    def plan(self, prompt: Sequence[int], max_new_tokens: int, seed: int = 0, eos: Sequence[int] = ()) -> list[int]:
        """The tokens a request of ``prompt`` gets (what :meth:`step` will emit for it)."""
        script = self.scripts.get(tuple(prompt))
        if script is None:
            return expected_tokens(prompt, max_new_tokens, self.pool, seed, eos)
        out = []
        for token in script[:max_new_tokens]:
            out.append(token)
            if token in eos:
                break
        return out

    def add_request(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> int:
        self._called()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt: expected at least one token id")
        for i, t in enumerate(prompt):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt[{i}]: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed max_seq_len {self.max_seq_len}"
            )
        default = SamplingParams()
        for name in sorted(self.refuses) if sampling is not None else ():
            if getattr(sampling, name) != getattr(default, name):
                raise ValueError(f"{name}: not supported by this engine; leave it at {getattr(default, name)!r}")
        if sampling is not None:
            for token, _ in sampling.logit_bias:
                if token >= self.vocab_size:
                    raise ValueError(f"logit_bias: token id {token} is outside the vocabulary [0, {self.vocab_size})")
        lora = None if sampling is None else sampling.lora
        if lora is not None and lora not in (self.lora_names or ()):
            raise ValueError(f"lora: no adapter named {lora!r} is loaded (loaded: {self.lora_names})")
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        rid = self._next_rid
        self._next_rid += 1
        if sampling is not None and sampling.grammar is not None and self.grammar_tokenizer is None:
            if self.tokenizer is None:
                raise ValueError("grammar: this stand-in engine has no tokenizer (FakeStepEngine(tokenizer=...))")
            self.grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.eos_token_ids)
        matcher = _matcher(self.grammar_tokenizer, sampling)
        script = self.scripts.get(tuple(prompt))
        seed = _seed(sampling) + (0 if lora is None else lora_seed(lora))
        self._queue.append(FakeRequest(rid, prompt, max_new_tokens, seed, eos, script, sampling, matcher))
        self.added.append((rid, tuple(prompt), max_new_tokens, sampling))
        return rid

    def abort_request(self, rid: int) -> None:
        self._called()
        if rid in self._active:
            del self._active[rid]
        else:
            found = next((r for r in self._queue if r.rid == rid), None)
            if found is None:
                return
            self._queue.remove(found)
        self.aborted.append(rid)
        self._aborted_pending.append(rid)

    def step(self) -> list[StepOutput]:
        self._called()
        if not self.has_unfinished:
            return []
        started = time.perf_counter()
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError(f"the fake engine fails at step {self.steps}")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs = [StepOutput(rid, (), "abort") for rid in self._aborted_pending]
        self._aborted_pending.clear()
        while self._queue and len(self._active) < self.max_batch:
            request = self._queue.popleft()
            lora = None if request.sampling is None else request.sampling.lora
            if lora in self.broken_adapters:
                gone = ValueError(f"lora: the adapter {lora!r} could not be read again from its folder")
                outputs.append(StepOutput(request.rid, (), "abort", gone))
                continue
            self._active[request.rid] = request
        self.most_active = max(self.most_active, len(self._active))
        page = self.prefix_cache_page
        stepped = list(self._active.values())
        for rid, request in list(self._active.items()):
            first = not request.generated
            token, entry, last = request.advance(self.vocab_size, self.pool)
            asked = None if request.sampling is None else request.sampling.prompt_logprobs
            prompts = None
            if first and asked is not None:
                prompts = prompt_logprobs(self.vocab_size, self.pool, request.prompt, asked)
            finish: FinishReason | None = None
            if request.stops(token):
                finish = "stop"
            elif last:
                finish = "length"
            if finish is not None:
                del self._active[rid]
            logprobs = None if entry is None else (entry,)
            hit = cached_tokens(request.prompt, self.cached, page) if first and page is not None else None
            drafted, accepted = self.draft if self.draft is not None and not first else (None, None)
            outputs.append(StepOutput(rid, (token,), finish, None, logprobs, prompts, hit, drafted, accepted))
        if page is not None:  # this step's pass wrote their K/V: the next steps' admissions find the full pages
            for request in stepped:
                computed = [*request.prompt, *request.generated[:-1]]
                self.cached.update(tuple(computed[:end]) for end in range(page, len(computed) + 1, page))
        if self.step_s:
            left = started + self.step_s - time.perf_counter()
            if left > 0:
                time.sleep(left)
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return bool(self._queue or self._active or self._aborted_pending)

    def load_lora(self, name: str, path: str) -> None:
        self._called()
        if self.lora_names is None:
            raise ValueError("lora: this engine serves no LoRA adapters; open it with lora={...} (LoraSettings)")
        if name in self.lora_names:
            raise ValueError(f"lora_name: an adapter named {name!r} is loaded already; unload it first")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError("adapter_config.json: missing from the adapter folder")
        self.lora_names.append(name)

    def unload_lora(self, name: str) -> None:
        self._called()
        if name not in (self.lora_names or ()):
            raise ValueError(f"lora_name: no adapter named {name!r} is loaded")
        requests = (*self._queue, *self._active.values())
        using = [r for r in requests if r.sampling is not None and r.sampling.lora == name]
        if using:
            raise ValueError(f"lora_name: {name!r} is in use by {len(using)} request(s); unload it once they finish")
        assert self.lora_names is not None
        self.lora_names.remove(name)

    @property
    def prefix_caching(self) -> bool:
        """Whether it models a prefix cache (``prefix_cache_page`` given)."""
        return self.prefix_cache_page is not None

    def close(self) -> None:
        """Nothing to free (an engine is closed by its owner: ``with engine:``)."""

    def __enter__(self) -> FakeStepEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        return len(self._active)


def open_fake_engine(
    model_dir: str, *, prefix_caching: bool = False, max_batch: int = 4, max_seq_len: int | None = None, **settings: Any
) -> FakeStepEngine:
    """``fi_engine.models.registry.open_engine``'s stand-in for the ``serve`` command's tests: a
    :class:`FakeStepEngine` over ``model_dir``'s tokenizer with its EOS ids, its prefix cache (pages of 16 tokens)
    on when ``prefix_caching``, with ``speculative_config`` every output after a request's first reporting a verified
    draft of its ``num_speculative_tokens``, half accepted; the other serving settings taken and ignored
    (``max_seq_len`` None: the default).
    Also an engine process's factory (``"helpers.fake_engine:open_fake_engine"``)."""
    from fi_engine.text.codec import TextCodec

    codec = TextCodec.from_dir(model_dir)
    k = (settings.get("speculative_config") or {}).get("num_speculative_tokens")
    return FakeStepEngine(
        codec.tokenizer.vocab_size,
        max_batch=max_batch,
        max_seq_len=max_seq_len or 1 << 20,
        eos_token_ids=codec.eos_token_ids,
        prefix_cache_page=16 if prefix_caching else None,
        draft=None if k is None else (k, k // 2),
    )
