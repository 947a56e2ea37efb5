"""What happens to a step's logits between the LM head and the sampler, for the requests that ask (the OpenAI API's
``logprobs`` and the sampling controls of :class:`~fi_engine.runtime.sampling_params.SamplingParams`):

Which requests ask: ``Request.asks`` (their :class:`~fi_engine.runtime.sampling_params.SamplingParams` where
:func:`~fi_engine.runtime.sampling_params.asks_processing`, else None), set by the scheduler at submission.

1. **log-probabilities** of the raw logits (before any control; vLLM's default): each asking row's log-softmax
   normalizer and its ``logprobs`` most likely tokens, kept on the device until the step's tokens are recorded,
   then its chosen token's log-probability (:class:`PendingLogprobs`); and a prompt's (``prompt_logprobs``) from
   its prefill pass's logits of every row (:class:`PendingPromptLogprobs`; such a prompt is never matched in the
   prefix cache: each of its positions needs its row);
2. **the grammar's mask** (``grammar``, the OpenAI API's ``response_format``): each such row's tokens that its
   request's matcher (``Request.grammar``, :class:`~fi_engine.text.grammar.GrammarMatcher`) does not allow next get a
   logit of -inf. The matchers' packed bitmasks (int32 ``[k, ceil(vocab / 32)]``, bit ``t % 32`` of word ``t // 32``
   for token ``t``) are stacked on the host and copied to the device once per step, where a few array operations
   unpack them over every such row at once (:func:`mask_disallowed`);
3. **controls**, in vLLM's order, on the logits in place: ``logit_bias``, ``min_tokens`` (the request's
   end-of-sequence ids masked until it has that many tokens), ``repetition_penalty`` (over the prompt and the
   output), ``frequency_penalty`` and ``presence_penalty`` (over the output), and ``min_p`` as a mask (a token whose
   probability at the request's temperature is below ``min_p`` times the most likely one's: ``logit < max + T *
   ln(min_p)``), which the sampler's temperature, top-k and top-p then see as vLLM's order has them.

Rows asking nothing cost nothing: a step whose rows ask nothing never calls here (the scheduler counts the active
requests that ask, ``Scheduler.processed``). A step that does runs a few CuPy launches per control over the rows
that ask (temporary arrays of those rows, made per step), and its greedy rows' argmax is taken again after the
controls (the decode graph's captured argmax saw the raw logits).

One GPU: with a vocabulary shard the logits are split over the ranks (refused by the engine's ``add_request``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...text.grammar import GrammarMatcher, GrammarTokenizer
from ..sampling_params import SamplingParams, sets_controls
from ..sched.request import Request
from ..stepping import TokenLogprobs

__all__ = ["LogitsProcessor", "PendingLogprobs", "PendingPromptLogprobs", "logprobs_of_rows", "mask_disallowed"]


@dataclass
class PendingLogprobs:
    """The log-probabilities of one step's asking rows, on the device until :meth:`resolve` (after the step's
    tokens are chosen: it reads them from the device too). ``rows``: the step's row of each asking request."""

    requests: list[Request]
    rows: list[int]
    raw: Any  # [k, vocab] float32: the asking rows' raw logits
    lse: Any  # [k]: their log-sum-exp
    top_ids: Any  # [k, N] int: the N most likely tokens (N the most any asking row wants), or None
    top_values: Any  # [k, N] float32: their log-probabilities
    host: Callable[[Any], np.ndarray]  # a device array's copy on the host (CuPy's asnumpy)
    chosen: Any = None  # [k] float32: the chosen tokens' log-probabilities (set by LogitsProcessor.chosen)

    def resolve(self) -> list[TokenLogprobs]:
        """Each asking row's :class:`TokenLogprobs` (its top N as its request asked), read from the device (waits
        for the stream)."""
        chosen = self.host(self.chosen) if self.chosen is not None else np.zeros(len(self.rows), np.float32)
        ids = self.host(self.top_ids) if self.top_ids is not None else None
        values = self.host(self.top_values) if self.top_values is not None else None
        out = []
        for i, r in enumerate(self.requests):
            n = (r.asks.logprobs or 0) if r.asks is not None else 0
            top: tuple[tuple[int, float], ...] = ()
            if n and ids is not None and values is not None:
                top = tuple((int(t), float(v)) for t, v in zip(ids[i, :n], values[i, :n], strict=True))
            out.append(TokenLogprobs(float(chosen[i]), top))
        return out


@dataclass
class PendingPromptLogprobs:
    """The prompt log-probabilities of a prefill pass's requests that ask (``prompt_logprobs``), on the device until
    :meth:`resolve`: per request, its prompt tokens' log-probabilities (positions 1 on) and the top N at each."""

    entries: list[tuple[Request, Any, Any, Any]]  # (request, chosen [n-1], top ids [n-1, N] or None, their values)
    host: Callable[[Any], np.ndarray]

    def resolve(self) -> None:
        """Set each asking request's ``prompt_logprobs``: None for its first token, then one :class:`TokenLogprobs`
        per prompt token (reads the device: waits for the stream)."""
        for r, chosen, ids, values in self.entries:
            lp = self.host(chosen)
            top_ids = self.host(ids) if ids is not None else None
            top_values = self.host(values) if values is not None else None
            out: list[TokenLogprobs | None] = [None]
            for t in range(lp.shape[0]):
                top: tuple[tuple[int, float], ...] = ()
                if top_ids is not None and top_values is not None:
                    top = tuple((int(i), float(v)) for i, v in zip(top_ids[t], top_values[t], strict=True))
                out.append(TokenLogprobs(float(lp[t]), top))
            r.prompt_logprobs = tuple(out)


def logprobs_of_rows(cp: Any, logits: Any, top_n: int) -> tuple[Any, Any, Any]:
    """``(lse, top_ids, top_values)`` of float32 ``logits`` ``[k, vocab]``: each row's log-sum-exp, and its ``top_n``
    most likely tokens' ids and log-probabilities, most likely first, ties to the lower id (None, None for 0)."""
    m = logits.max(axis=1, keepdims=True)
    lse = (cp.log(cp.exp(logits - m).sum(axis=1, keepdims=True)) + m)[:, 0]
    if top_n <= 0:
        return lse, None, None
    # a stable sort of the negated logits: descending values, equal ones in ascending id order
    order = cp.argsort(-logits, axis=1, kind="stable")[:, :top_n]
    values = cp.take_along_axis(logits, order, axis=1) - lse[:, None]
    return lse, order, values


def mask_disallowed(cp: Any, logits: Any, rows: Sequence[int], bitmasks: np.ndarray) -> None:
    """Set to -inf, in place, the logits of ``logits`` (float32 ``[batch, vocab]``) at ``rows`` (``k`` row indices)
    whose bit is clear in the host's ``bitmasks`` (int32 ``[k, ceil(vocab / 32)]``: token ``t`` allowed when bit
    ``t % 32`` of word ``t // 32`` is set, :meth:`~fi_engine.text.grammar.GrammarMatcher.bitmask`'s layout). One
    copy to the device; the bits unpacked by array operations over all ``k`` rows (``cp``: CuPy, or numpy)."""
    vocab = logits.shape[1]
    words = cp.asarray(bitmasks).view(np.uint32)  # (unsigned: bit 31 shifts down as a plain bit)
    shifts = cp.arange(32, dtype=np.uint32)
    allowed = ((words[:, :, None] >> shifts) & 1).reshape(len(rows), -1)[:, :vocab].astype(bool)
    idx = cp.asarray(rows, dtype=np.int32)
    logits[idx] = cp.where(allowed, logits[idx], np.float32(-math.inf))


class LogitsProcessor:
    """The engine's logits processing between its LM head and its sampler (see the module docstring), over the
    runner's ``logits`` buffer ``[max_batch, vocab]`` (float32, on its stream)."""

    def __init__(self, cupy: Any, logits: Any, vocab_size: int, eos: frozenset[int]) -> None:
        self.cupy = cupy
        self.logits = logits
        self.vocab_size = vocab_size
        self.eos = eos  # the engine's end-of-sequence ids (a request without its own)
        self._host = getattr(cupy, "asnumpy", np.asarray)  # (numpy stands in for CuPy in the CPU tests)
        self._grammars: GrammarTokenizer | None = None  # grammar_tokenizer's value

    def check(self, sampling: Any, sharded: bool) -> None:
        """ValueError naming the field where the engine cannot honour ``sampling``'s logprobs or controls
        (``sharded``: its vocabulary is split over tensor-parallel ranks)."""
        if sharded:
            asked = ("logprobs", "prompt_logprobs", "grammar")
            field = next((f for f in asked if getattr(sampling, f) is not None), "logit_bias, penalties or min_p")
            raise ValueError(f"{field}: not supported with a vocabulary split over tensor-parallel ranks yet")
        vocab = self.vocab_size
        bad = next((t for t, _ in sampling.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab})")

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
        width = self.vocab_size
        if value is not None and value.vocab_size > width:
            raise ValueError(
                f"grammar_tokenizer: its tokenizer has {value.vocab_size} tokens, more than the model's {width} "
                f"logits; give the checkpoint's own tokenizer"
            )
        self._grammars = value

    def matcher(self, sampling: SamplingParams | None, model_dir: Any) -> GrammarMatcher | None:
        """A new request's matcher at the start of ``sampling.grammar`` (None without one), against
        :attr:`grammar_tokenizer`, made from the checkpoint ``model_dir`` at the first grammar: ValueError naming
        ``response_format`` when the grammar does not compile for the tokenizer, naming ``grammar`` when the engine
        has no tokenizer to match it against (a checkpoint without ``tokenizer.json``) or ``llguidance`` is missing."""
        if sampling is None or sampling.grammar is None:
            return None
        grammars = self._grammars
        if grammars is None:
            from ...text.codec import TextCodec

            try:
                codec = TextCodec.from_dir(model_dir)
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

    def apply(self, rows: Sequence[Request | None], n: int) -> tuple[PendingLogprobs | None, bool]:
        """Process the first ``n`` rows of the logits for ``rows`` (the step's requests by row; None: padding).
        Returns the pending log-probabilities of the rows asking for them (None: none asks) and whether a control
        (a grammar's mask included) changed some row (then every greedy row's argmax must be taken again). A row's
        grammar matcher must have consumed every token its request has recorded (the serving loop launches no step
        ahead while a request asks: ``Scheduler.processed``)."""
        cp, logits = self.cupy, self.logits
        asking = [(i, r) for i, r in enumerate(rows[:n]) if r is not None and r.asks is not None]
        pending = None
        want = [(i, r) for i, r in asking if r.asks is not None and r.asks.logprobs is not None]
        if want:
            pending = self.pending_logprobs(logits, want)  # (of a copy: the controls below change the buffer)
        grammar = [(i, r.grammar) for i, r in asking if r.grammar is not None]
        if grammar:
            masks = np.stack([self._bitmask(m) for _, m in grammar])
            mask_disallowed(cp, logits, [i for i, _ in grammar], masks)
        changed = False
        for i, r in asking:
            sp = r.asks
            if sp is None or not sets_controls(sp):
                continue
            changed = True
            self._control_row(i, r, sp)
        return pending, changed

    def _bitmask(self, matcher: Any) -> np.ndarray:
        """``matcher``'s mask of the tokens allowed next; where its grammar fails computing it, every token (the
        row is left as it is): consuming the chosen token then fails too, which ends that request alone as
        ``"abort"`` (:meth:`Scheduler.record <fi_engine.runtime.sched.scheduler.Scheduler.record>`), not the whole
        step."""
        try:
            return matcher.bitmask(self.vocab_size)  # type: ignore[no-any-return]
        except ValueError:
            return np.full((self.vocab_size + 31) // 32, -1, dtype=np.int32)

    def pending_logprobs(self, logits: Any, want: Sequence[tuple[int, Request]]) -> PendingLogprobs:
        """The raw log-probabilities of rows of float32 ``logits`` ``[rows, vocab]`` (a decode step's, or a verifying
        pass's), ``want`` their ``(row, request)`` pairs, each request asking for ``logprobs``: the rows copied, their
        log-sum-exp and the top N (the most any of them wants); the chosen tokens' follow (:meth:`chosen`)."""
        cp = self.cupy
        raw = logits[cp.asarray([i for i, _ in want], dtype=np.int32)]
        top_n = max(r.asks.logprobs or 0 for _, r in want if r.asks is not None)
        lse, top_ids, top_values = logprobs_of_rows(cp, raw, top_n)
        return PendingLogprobs([r for _, r in want], [i for i, _ in want], raw, lse, top_ids, top_values, self._host)

    def prompt_logprobs(self, logits: Any, spans: Sequence[tuple[Request, int]]) -> PendingPromptLogprobs:
        """The prompt log-probabilities of the requests in ``spans`` (each with the row where its prompt's rows begin
        in ``logits``, a prefill pass's float32 ``[rows, vocab]`` of every row; its prompt prefilled whole, from
        position 0): position ``i``'s entry is ``prompt[i]`` under the logits of row ``i - 1``."""
        cp = self.cupy
        entries = []
        for r, first in spans:
            assert r.asks is not None and r.asks.prompt_logprobs is not None
            x = logits[first : first + len(r.prompt) - 1]
            lse, top_ids, top_values = logprobs_of_rows(cp, x, r.asks.prompt_logprobs)
            targets = cp.asarray(r.prompt[1:], dtype=np.int64)
            chosen = cp.take_along_axis(x, targets[:, None], axis=1)[:, 0] - lse
            entries.append((r, chosen, top_ids, top_values))
        return PendingPromptLogprobs(entries, self._host)

    def chosen(self, pending: PendingLogprobs, ids: Any) -> None:
        """Gather each asking row's chosen token's raw log-probability (``ids``: the step's chosen tokens on the
        device, by row), after the sampler wrote them."""
        cp = self.cupy
        rows = cp.asarray(pending.rows, dtype=np.int32)
        tokens = ids[rows].astype(np.int64)
        pending.chosen = cp.take_along_axis(pending.raw, tokens[:, None], axis=1)[:, 0] - pending.lse

    def _control_row(self, i: int, r: Request, sp: SamplingParams) -> None:
        """Apply ``sp``'s controls to row ``i`` (request ``r``), in vLLM's order."""
        cp, row = self.cupy, self.logits[i]
        if sp.logit_bias:
            ids = cp.asarray([t for t, _ in sp.logit_bias], dtype=np.int64)
            row[ids] += cp.asarray([b for _, b in sp.logit_bias], dtype=np.float32)
        if len(r.output) < sp.min_tokens:
            eos = sorted(self.eos if r.eos is None else r.eos)
            if eos:
                row[cp.asarray(eos, dtype=np.int64)] = -math.inf
        if sp.repetition_penalty != 1.0:
            seen = cp.asarray(sorted({*r.prompt, *r.output}), dtype=np.int64)
            x = row[seen]
            row[seen] = cp.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty)
        if (sp.frequency_penalty or sp.presence_penalty) and r.output:
            tokens, counts = np.unique(np.asarray(r.output, dtype=np.int64), return_counts=True)
            penalty = sp.frequency_penalty * counts + sp.presence_penalty
            row[cp.asarray(tokens)] -= cp.asarray(penalty, dtype=np.float32)
        if sp.min_p > 0.0 and not sp.greedy:
            cut = row.max() + sp.temperature * math.log(sp.min_p)
            row[row < cut] = -math.inf
