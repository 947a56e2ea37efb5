"""Token ids in, text out, one token at a time: an incremental detokenizer and stop strings.

Decoding token by token is not decoding each token alone: a byte-level BPE token may hold part of a UTF-8
sequence (an emoji is 4 bytes, often 2-4 tokens), and some decoders change a token's text by what surrounds it
(SentencePiece's leading space). :class:`IncrementalDetokenizer` therefore decodes a short window of recent ids
twice, without and with the new ones, and emits the difference only once it is settled: text that ends in an
incomplete UTF-8 sequence (the decoder's U+FFFD) is held back until the sequence completes. The emitted deltas
concatenate to the generated text as it reads after the prompt; no delta holds a U+FFFD the full text lacks.

:class:`StopStrings` cuts a text stream at the first of several stop strings, wherever token boundaries fall:
text that could still be the start of a stop string is held back until it is decided; the stop string itself
and everything after it are never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..values import MAX_SIZE, arg_flag, show
from .args import arg_text, arg_token_ids

__all__ = ["IncrementalDetokenizer", "StopStrings"]

# prompt tokens decoded before the first generated one, so that the first token's text reads as it does in
# context (a leading space is kept)
CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) valid UTF-8


class StopStrings:
    """Cut a text stream at the first stop string.

    ``stop``: one stop string, or a list (or tuple) of them, as OpenAI's ``stop`` takes them. ``feed(text)``
    returns the text that is safe to emit; after a stop string is seen, :attr:`stopped` is the matched string
    and nothing more is emitted. ``finish()`` returns what was held back (the stream ended without a stop string
    completing it).
    """

    def __init__(self, stop: str | Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop: expected a str or a list of str, got {type(stop).__name__}")
        checked = []
        for i, item in enumerate(stop):
            if not isinstance(item, str):
                raise TypeError(f"stop[{i}]: expected a str, got {type(item).__name__}")
            if not item:
                raise ValueError(f"stop[{i}]: an empty stop string would stop before the first token; drop it")
            checked.append(item)
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(checked))
        self.stopped: str | None = None
        self._held = ""
        # the longest text that could be a stop string's start (held back at most this many characters)
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """Emit-ready text of the stream so far, given its next piece ``text``."""
        text = arg_text("text", text)
        if self.stopped is not None or not text:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        # the earliest stop string wins (the text before it is all that is emitted)
        cut, matched = len(buffer), None
        for stop in self.stops:
            at = buffer.find(stop)
            if at != -1 and (at < cut or (at == cut and matched is not None and len(stop) > len(matched))):
                cut, matched = at, stop
        if matched is not None:
            self.stopped = matched
            self._held = ""
            return buffer[:cut]
        keep = self._undecided_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def release(self, text: str) -> str:
        """What was held back and ``text``, all emitted without looking for a stop string (text that may not
        stop the stream: a request's first ``min_tokens`` tokens)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held + arg_text("text", text)

    def finish(self) -> str:
        """What was held back; the stream has ended, so it cannot become a stop string any more."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held

    def _undecided_tail(self, buffer: str) -> int:
        """The length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        for n in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0


class IncrementalDetokenizer:
    """The text of generated tokens, pushed one at a time (see the module's docstring).

    Args:
        tokenizer: a :class:`fi_engine.text.tokenizer.Tokenizer` (anything with ``decode(ids, skip_special_tokens)``
            and an int ``vocab_size``).
        prompt_ids: the prompt's token ids (its last few give the first generated token its context).
        skip_special_tokens: leave special tokens (EOS, ``<|im_end|>``, ...) out of the text.
        keep_special_tokens: special tokens (their texts) kept in the text all the same, where
            ``skip_special_tokens`` leaves the others out: the markers of a harmony reply, which its reader needs
            (:data:`fi_engine.text.harmony.MARKERS`). Texts that are not tokens of the vocabulary are ignored; the
            tokenizer then needs ``token_id(text)`` and ``special_ids()`` too.
        stop: stop strings (see :class:`StopStrings`); :attr:`stopped` names the one that ended the text.
        min_tokens: stop strings are looked for only in the text that the tokens after the first ``min_tokens``
            add (vLLM's rule: a request's ``min_tokens`` holds back its stop strings as well as its EOS).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: str | Sequence[str] = (),
        min_tokens: int = 0,
        keep_special_tokens: Sequence[str] = (),
    ) -> None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if (
            not callable(getattr(tokenizer, "decode", None))
            or isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
        ):
            raise TypeError(
                f"tokenizer: expected a fi_engine.text.tokenizer.Tokenizer (decode() and vocab_size), got "
                f"{type(tokenizer).__name__}"
            )
        self._tokenizer = tokenizer
        # the ids of a window are checked as they come in (push): fi_engine's Tokenizer then decodes them without
        # checking each again (one Rust call per push; the per-token cost of a server streaming many requests)
        self._decode = getattr(tokenizer, "_decode_checked", None) or tokenizer.decode
        self._vocab_size = vocab_size
        self._skip = arg_flag("skip_special_tokens", skip_special_tokens)
        # the special ids left out by hand (the window's other ids decoded with their special tokens), where some
        # are kept; None: the decoder leaves them all out (or keeps them all)
        self._dropped = _dropped_ids(tokenizer, keep_special_tokens, self._skip)
        self._stops = StopStrings(stop)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 0 <= min_tokens <= MAX_SIZE:
            raise ValueError(f"min_tokens: expected an int in [0, {MAX_SIZE}], got {show(min_tokens)}")
        self._min_tokens = min_tokens
        # the window decoded on each push: the settled ids of the last emission (at first the prompt's last few,
        # as context), then the ids not yet emitted from _read on
        self._ids: list[int] = arg_token_ids("prompt_ids", prompt_ids, vocab_size)[-CONTEXT_TOKENS:]
        self._read = len(self._ids)
        self._before: str | None = None  # the text of self._ids[:self._read] (decoded once per window)
        self.generated: list[int] = []

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` settles (often ``""`` while a character or a stop string is pending)."""
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TypeError(f"token_id: expected an int, got {type(token_id).__name__}")
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token_id: {show(int(token_id))} is outside the vocabulary [0, {self._vocab_size})")
        token = int(token_id)
        self.generated.append(token)
        self._ids.append(token)
        return self._stop(self._settled(final=False))

    def push_many(self, token_ids: Sequence[int]) -> str:
        """:meth:`push` of several tokens with one decode of the window: the same text in all (the same pieces
        joined; only where the pieces end may differ). A server streaming many requests calls it once per
        delivery rather than once per token."""
        vocab = self._vocab_size
        for i, token_id in enumerate(token_ids):
            if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
                raise TypeError(f"token_ids[{i}]: expected an int, got {type(token_id).__name__}")
            if not 0 <= token_id < vocab:
                raise ValueError(f"token_ids[{i}]: {show(int(token_id))} is outside the vocabulary [0, {vocab})")
        tokens = [int(t) for t in token_ids]
        if not tokens:
            return ""
        self.generated.extend(tokens)
        self._ids.extend(tokens)
        return self._stop(self._settled(final=False))

    def _stop(self, text: str) -> str:
        """``text`` through the stop strings, once the request has more than ``min_tokens`` tokens."""
        if len(self.generated) <= self._min_tokens:
            return self._stops.release(text)
        return self._stops.feed(text)

    @property
    def has_stops(self) -> bool:
        """Whether stop strings were given (their matching needs each token's text as it comes)."""
        return bool(self._stops.stops)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (ids ``[0, vocab_size)`` decode)."""
        return self._vocab_size

    def finish(self) -> str:
        """The text still held back at the end of the generation (an unfinished UTF-8 sequence decodes to
        U+FFFD here, as in the full decode; a stop string's possible start is released)."""
        return self._stops.feed(self._settled(final=True)) + self._stops.finish()

    def _text(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out as asked."""
        if self._dropped is None:
            return str(self._decode(ids, skip_special_tokens=self._skip))
        dropped = self._dropped
        return str(self._decode([i for i in ids if i not in dropped], skip_special_tokens=False))

    def _settled(self, final: bool) -> str:
        before = self._before
        if before is None:
            before = self._before = self._text(self._ids[: self._read])
        after = self._text(self._ids)
        if not final and after.endswith(REPLACEMENT):
            return ""  # an unfinished UTF-8 sequence: wait for the tokens that complete it
        # the window's old text is normally a prefix of its new text; where the new token changed it (the
        # context ended in a broken character that it completes), the text from the first difference on is new
        delta = after[len(before) :] if after.startswith(before) else after[_common_prefix(before, after) :]
        if not delta and not final:
            return ""  # nothing readable yet (a skipped special token): keep the window as it is
        # the settled ids become the next window's context; ids before them are no longer needed
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._before = None
        return delta


def _dropped_ids(tokenizer: Any, keep: Any, skip: bool) -> frozenset[int] | None:
    """The special ids to leave out when the special tokens ``keep`` (texts) stay in: None when none is kept or
    none is skipped."""
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise TypeError(f"keep_special_tokens: expected a list of token texts, got {type(keep).__name__}")
    for i, text in enumerate(keep):
        if not isinstance(text, str):
            raise TypeError(f"keep_special_tokens[{i}]: expected a str, got {type(text).__name__}")
    if not keep or not skip:
        return None
    if not (callable(getattr(tokenizer, "token_id", None)) and callable(getattr(tokenizer, "special_ids", None))):
        raise TypeError(
            f"tokenizer: keeping special tokens needs a fi_engine.text.tokenizer.Tokenizer (token_id() and "
            f"special_ids()), got {type(tokenizer).__name__}"
        )
    kept = {tokenizer.token_id(text) for text in keep}
    return frozenset(tokenizer.special_ids()) - kept


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
