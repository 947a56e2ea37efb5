"""Speculative decoding by prompt lookup (n-gram drafting), on the host: which tokens to draft for a request, and how
many of them the model's own choices accept.

A request whose last tokens (its last ``n`` for ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``) also
occur earlier in its prompt or output is likely to go on as it went on there (a summary quoting its document, an
edit of code in the prompt, a list repeating its pattern): the tokens that followed the latest earlier occurrence
are its **draft** (at most ``k``; vLLM's ``ngram`` method, prompt-lookup decoding). The engine then feeds the request
its last token and its draft in one pass (``Engine.speculative_tokens``), ``k + 1`` rows at their positions,
and reads the model's greedy choice at each row: the draft's tokens are **accepted** while each equals the choice
before it, and the choice after the last accepted one comes free, so one pass gives ``1 .. k + 1`` tokens, exactly
the ones one decode step after another would give (greedy).

A sampled request's rows are sampled instead of taken at their argmax (each row from the request's distribution:
temperature, top-k and top-p, as the engine's sampler draws; ``Speculator._row_choices``), and the same rule
accepts them. For a draft that is one token per
position (a probability of 1 for it, as prompt lookup's is), that is speculative sampling exactly (the chain rule of
FlashInfer's ``chain_speculative_sampling``): the draft token is accepted with the probability the model gives it,
and where it is not, the row's own draw is a sample of the model's distribution without it, renormalized. So the
tokens follow the distribution of decoding one token at a time (not the same draws).

A **draft model** (vLLM's ``draft_model`` method; :class:`DraftModelProposer`) drafts instead: a smaller model of the
same tokenizer, served by an engine of its own, continues each request's text greedily for ``k`` tokens. Its drafts
are one token per position too (the draft model's argmax), so the same rule verifies them, exactly.

A verifying pass costs more than a decode step (its prefill kernels over ``k + 1`` rows a request, every row's logits
read back): on an H100 about 1.35 decode steps for an 8B model at batch 1, about 3 for a 135M one, whose steps are
launch-bound. So a step verifies only where it pays (:class:`DraftPolicy`): the tokens it is expected to give per
second, from each request's recent acceptance, beat a decode step's. Nothing here touches a GPU (tests/engine/
test_speculation.py).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...text.args import arg_token_ids
from ...values import arg_int, show

__all__ = [
    "DraftModelProposer",
    "DraftPolicy",
    "NgramProposer",
    "SpeculationStats",
    "SpeculativeConfig",
    "accepted_tokens",
    "same_directory",
    "speculative_config_arg",
    "tokenizer_difference",
]


@dataclass
class SpeculationStats:
    """Counters of the engine's speculative passes: ``passes`` (verifying passes run), ``drafted`` (draft tokens fed),
    ``accepted`` (of those, the ones the model's choices accepted), ``tokens`` (tokens the passes gave: the accepted
    ones and one more per request and pass). ``acceptance_rate``: accepted / drafted (0 before any)."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class NgramProposer:
    """Drafts of up to ``k`` tokens by prompt lookup: the tokens after the latest earlier occurrence of a request's
    last ``n`` tokens, ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min`` (the longest match first; vLLM's
    option names). ValueError naming the argument for sizes outside ``1 <= prompt_lookup_min <= prompt_lookup_max <=
    64``, ``1 <= k <= 64``."""

    def __init__(self, k: int, prompt_lookup_max: int = 4, prompt_lookup_min: int = 1) -> None:
        self.k = arg_int("k", k, 1, 64)
        self.prompt_lookup_max = arg_int("prompt_lookup_max", prompt_lookup_max, 1, 64)
        self.prompt_lookup_min = arg_int("prompt_lookup_min", prompt_lookup_min, 1, self.prompt_lookup_max)

    def propose(self, tokens: Sequence[int] | np.ndarray, limit: int | None = None) -> tuple[int, ...]:
        """The draft after ``tokens`` (a request's prompt and output, in order): up to ``min(k, limit)`` token ids,
        ``()`` where no suffix of ``prompt_lookup_min`` or more tokens occurred before."""
        k = self.k if limit is None else min(self.k, limit)
        arr = np.asarray(tokens)
        size = arr.shape[0]
        if k <= 0 or size < 2:
            return ()
        for n in range(min(self.prompt_lookup_max, size - 1), self.prompt_lookup_min - 1, -1):
            suffix = arr[size - n :]
            # every start i < size - n whose n tokens equal the suffix: candidates by the first token, then the rest
            starts = np.flatnonzero(arr[: size - n] == suffix[0])
            for j in range(1, n):
                if starts.size == 0:
                    break
                starts = starts[arr[starts + j] == suffix[j]]
            if starts.size:
                at = int(starts[-1]) + n  # after the latest occurrence
                return tuple(int(t) for t in arr[at : at + k])
        return ()

    def propose_many(self, histories: Sequence[np.ndarray], limits: Sequence[int]) -> list[tuple[int, ...]]:
        """:meth:`propose` for each request of a step: ``histories[i]`` its prompt and output, ``limits[i]`` the most
        tokens it may draft."""
        return [self.propose(h, n) for h, n in zip(histories, limits, strict=True)]


class DraftModelProposer:
    """Drafts of up to ``k`` tokens by a draft model (vLLM's ``draft_model`` method): the greedy continuation of each
    request's text by ``engine``, an engine of a smaller model of the same tokenizer (a
    :class:`~fi_engine.runtime.serving.ServingLoop`: its ``generate`` is called, so it must be idle otherwise).

    One :meth:`propose_many` is one ``generate`` call for every drafting request of a step: a prefill pass of each
    request's text and ``k - 1`` decode steps of the draft model. With the draft engine's prefix cache on (the
    target engine turns it on: ``Engine.draft_model``), a request's text is found cached from its last draft
    up to its last full page, so a draft prefills the tokens since then only, not the whole text again. A draft
    stops early at the draft model's end-of-sequence token (kept: the target may accept it)."""

    def __init__(self, engine: Any, k: int) -> None:
        self.engine = engine
        self.k = arg_int("k", k, 1, 64)

    def propose_many(self, histories: Sequence[np.ndarray], limits: Sequence[int]) -> list[tuple[int, ...]]:
        """The drafts of the requests of a step: ``histories[i]`` a request's prompt and output (token ids),
        ``limits[i]`` the most tokens it may draft; ``()`` for a limit of 0 or a text the draft engine cannot hold
        with its draft (longer than its ``max_seq_len``)."""
        room = int(self.engine.max_seq_len)
        sizes = [min(self.k, int(n), room - len(h)) for h, n in zip(histories, limits, strict=True)]
        todo = [i for i, n in enumerate(sizes) if n > 0]
        out: list[tuple[int, ...]] = [()] * len(sizes)
        if todo:
            made = self.engine.generate([histories[i].tolist() for i in todo], [sizes[i] for i in todo])
            for i, tokens in zip(todo, made.tokens, strict=True):
                out[i] = tuple(int(t) for t in tokens)
        return out


def accepted_tokens(draft: Sequence[int], choices: Sequence[int]) -> list[int]:
    """The tokens one verifying pass gives a request fed its last token and ``draft``: ``choices`` (the model's
    choice at each of its ``len(draft) + 1`` rows) up to and including the first that differs from the draft token
    fed after it (all ``len(draft) + 1`` where none does). TypeError/ValueError naming the argument that is no
    sequence of token ids, or ``choices`` of another length."""
    draft = arg_token_ids("draft", draft, 1 << 31)
    choices = arg_token_ids("choices", choices, 1 << 31)
    if len(choices) != len(draft) + 1:
        want = len(draft) + 1
        raise ValueError(f"choices: expected {want} (one per row: the last token and the draft), got {len(choices)}")
    n = 0
    while n < len(draft) and int(choices[n]) == int(draft[n]):
        n += 1
    return [int(t) for t in choices[: n + 1]]


class DraftPolicy:
    """Whether a step's drafts are worth a verifying pass, from what the engine measured: each request's acceptance
    rate (per draft token, a moving average starting at ``prior``), and the wall time of a decode step and of a
    verifying pass (moving averages). A step of ``rows`` decoding requests verifies when the tokens it is expected to
    give, ``rows`` plus each draft's expected accepted length (``p + p**2 + ... + p**len(draft)`` at its request's rate
    ``p``), per second of a verifying pass beat ``rows`` per second of a decode step (before a pass is timed it
    verifies, then decodes until a decode step is timed; a request's first draft is verified). Every
    :meth:`interval`-th step with drafts that would not verify does anyway, so a request whose text turns repetitive is
    found again.

    A request whose rate fell below ``min_rate`` drafts nothing (its rows in a pass would cost more than they give)
    until :meth:`interval` steps (decode steps and passes: :meth:`stepped`) have passed since its last verified draft.
    The interval is ``explore`` steps, or more where a pass costs so much more than a decode step that exploring
    that often would lose more than ``explore_budget`` of the decode time (a draft model's pass on a small model).
    Asking (:meth:`drafts`, :meth:`expected`) changes nothing, so a step may ask twice (once to decide, once to
    draft) and get the same answers."""

    def __init__(
        self, prior: float = 0.5, explore: int = 32, min_rate: float = 0.15, explore_budget: float = 0.04
    ) -> None:
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior: expected an acceptance rate in [0, 1], got {prior!r:.40}")
        if isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or not 0.0 <= min_rate <= 1.0:
            raise ValueError(f"min_rate: expected an acceptance rate in [0, 1], got {min_rate!r:.40}")
        if (
            isinstance(explore_budget, bool)
            or not isinstance(explore_budget, (int, float))
            or not 0.0 < explore_budget <= 1.0
        ):
            raise ValueError(
                f"explore_budget: expected a share of the decode time in (0, 1], got {explore_budget!r:.40}"
            )
        self.explore_budget = float(explore_budget)
        self.prior = float(prior)
        self.min_rate = float(min_rate)
        self.explore = arg_int("explore", explore, 1, 1 << 20)
        self.steps = 0  # decode steps and verifying passes recorded (stepped)
        self._verified_at: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.decode_s: float | None = None  # a decode step's wall time (moving average)
        self.verify_s: float | None = None  # a verifying pass's
        self._rates: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._declined = 0

    def rate(self, request: Any) -> float:
        """``request``'s acceptance rate per draft token (``prior`` before its first verified draft)."""
        return self._rates.get(request, self.prior)

    def drafts(self, request: Any) -> bool:
        """Whether ``request`` drafts this step: its rate is at least ``min_rate``, or ``explore`` steps have passed
        since its last draft was verified."""
        if self.rate(request) >= self.min_rate:
            return True
        return self.steps - self._verified_at.get(request, 0) >= self.interval()

    def interval(self) -> int:
        """The steps between explorations: ``explore``, or where a pass that gives nothing (its excess over a decode
        step, ``verify_s - decode_s``) every ``explore`` steps would cost more than ``explore_budget`` of the decode
        time, as many steps as keep it within."""
        if self.decode_s is None or self.verify_s is None or self.decode_s <= 0.0:
            return self.explore
        excess = (self.verify_s - self.decode_s) / (self.explore_budget * self.decode_s)
        return max(self.explore, min(1 << 20, math.ceil(excess)))

    def stepped(self) -> None:
        """A decode step's or a verifying pass's tokens were recorded (the clock of :meth:`drafts`)."""
        self.steps += 1

    def expected(self, request: Any, drafted: int) -> float:
        """The draft tokens a pass is expected to accept of a draft of ``drafted`` tokens for ``request``."""
        p = self.rate(request)
        return sum(p**i for i in range(1, drafted + 1))

    def worth(self, drafts: Sequence[tuple[Any, int]]) -> bool:
        """Whether to verify a step whose decoding requests have drafts of these lengths (``(request, drafted)``,
        one per row, 0 for a row without). Before a pass is timed: yes; then, before a decode step is: no (a draft
        model drafts every step, so without this no decode step would ever be timed); then yes where a request drafts
        for the first time (a probe: the prior says little about it, and a pass at its start tells)."""
        if self.verify_s is None:
            return True
        if self.decode_s is None:
            return False
        if any(n and r not in self._rates for r, n in drafts):
            return True  # a request's first draft: its acceptance is unknown, and worth knowing early
        rows = len(drafts)
        gain = sum(self.expected(r, n) for r, n in drafts if n)
        if (rows + gain) / self.verify_s > rows / self.decode_s:
            return True
        self._declined += 1
        return self._declined % self.interval() == 0

    def observe(self, request: Any, drafted: int, accepted: int) -> None:
        """A verified draft of ``drafted`` tokens of which ``accepted`` were: ``request``'s rate moves halfway to it."""
        if drafted:
            self._rates[request] = 0.5 * self.rate(request) + 0.5 * accepted / drafted
            self._verified_at[request] = self.steps

    def timed(self, verify: bool, seconds: float) -> None:
        """A decode step's (``verify`` False) or a verifying pass's wall time, into its moving average."""
        old = self.verify_s if verify else self.decode_s
        new = seconds if old is None else 0.8 * old + 0.2 * seconds
        if verify:
            self.verify_s = new
        else:
            self.decode_s = new


SPECULATIVE_CONFIG_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``, checked: ``method`` ``"ngram"`` (prompt lookup, :class:`NgramProposer` with
    ``prompt_lookup_max`` / ``prompt_lookup_min``) or ``"draft_model"`` (:class:`DraftModelProposer`; ``model``: the
    draft model's checkpoint directory, or None where the engine's draft engine is set already), ``k`` draft tokens
    a pass (``num_speculative_tokens``)."""

    method: str
    k: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None


def speculative_config_arg(speculative_config: Mapping[str, Any] | None) -> SpeculativeConfig | None:
    """vLLM's ``speculative_config`` checked: None for None; for ``{"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": n, "prompt_lookup_min": m}`` (the sizes optional: 4 and 1) or ``{"method": "draft_model",
    "model": DIR, "num_speculative_tokens": k}`` (``method`` optional: ``"draft_model"`` where ``model`` is given,
    else ``"ngram"``; ``k`` 1 to 16) a :class:`SpeculativeConfig`. TypeError/ValueError naming the key otherwise
    (an unknown one, another method, a size out of range, the lookup sizes with a draft model)."""
    config = speculative_config
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"speculative_config: expected None or a mapping (vLLM's keys), got {show(config)}")
    unknown = [k for k in config if k not in SPECULATIVE_CONFIG_KEYS]
    if unknown:
        keys = ", ".join(SPECULATIVE_CONFIG_KEYS)
        raise ValueError(f"speculative_config: unknown key {show(unknown[0])}; expected some of {keys}")
    model = config.get("model")
    if model is not None and not isinstance(model, str):
        raise TypeError(
            f"speculative_config['model']: expected the draft model's checkpoint directory, got {show(model)}"
        )
    method = config.get("method", "ngram" if model is None else "draft_model")
    if method not in ("ngram", "draft_model"):
        raise ValueError(
            f"speculative_config['method']: 'ngram' (prompt lookup) or 'draft_model' are served, got {show(method)}"
        )
    if "num_speculative_tokens" not in config:
        raise ValueError("speculative_config: 'num_speculative_tokens' is required (the draft tokens a pass)")
    k = arg_int("speculative_config['num_speculative_tokens']", config["num_speculative_tokens"], 1, 16)
    if method == "draft_model":
        lookup = [key for key in ("prompt_lookup_max", "prompt_lookup_min") if key in config]
        if lookup:
            raise ValueError(f"speculative_config[{show(lookup[0])}]: a size of the 'ngram' method, not 'draft_model's")
        return SpeculativeConfig("draft_model", k, model=model)
    if model is not None:
        raise ValueError("speculative_config['model']: a draft model's directory; the 'ngram' method takes none")
    most = arg_int("speculative_config['prompt_lookup_max']", config.get("prompt_lookup_max", 4), 1, 64)
    least = arg_int("speculative_config['prompt_lookup_min']", config.get("prompt_lookup_min", 1), 1, most)
    return SpeculativeConfig("ngram", k, most, least)


def same_directory(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether ``a`` and ``b`` name the same directory (after resolving links; equal text where either is missing)."""
    if a is None or b is None:
        return a is b
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return os.fspath(a) == os.fspath(b)


def _vocabulary(folder: str | os.PathLike[str] | None) -> dict[str, int] | None:
    """The token ids of a checkpoint's ``tokenizer.json`` (its model's vocabulary and added tokens), or None where
    it has none or it cannot be read as one."""
    if folder is None:
        return None
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (
        data.get("model", {}).get("vocab") if isinstance(data, dict) and isinstance(data.get("model"), dict) else None
    )
    if isinstance(vocab, list):  # (a Unigram model: [piece, score] pairs, the id their index)
        vocab = {str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    if not isinstance(vocab, dict):
        return None
    ids = dict(vocab)
    for added in data.get("added_tokens") or ():
        if isinstance(added, dict) and "content" in added and "id" in added:
            ids[str(added["content"])] = added["id"]
    return ids


def tokenizer_difference(target: str | os.PathLike[str] | None, draft: str | os.PathLike[str] | None) -> str | None:
    """Why the checkpoints ``target`` and ``draft`` (directories) do not share a tokenizer, or None where they do or
    either has no readable ``tokenizer.json`` (then only the vocabulary sizes are compared, by the caller): the
    first token whose id differs, or the sizes of the two vocabularies."""
    a, b = _vocabulary(target), _vocabulary(draft)
    if a is None or b is None or a == b:
        return None
    for token, i in b.items():
        if a.get(token) != i:
            return f"the draft tokenizer's {token!r:.40} is token {i}, the target's {a.get(token)}"
    return f"the target's tokenizer has {len(a)} tokens, the draft's {len(b)}"
