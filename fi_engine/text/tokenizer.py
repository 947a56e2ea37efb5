"""A checkpoint's own tokenizer: ``tokenizer.json`` through the ``tokenizers`` library (no torch), and its named
special tokens from ``tokenizer_config.json``.

What is read, as transformers (5.x) reads it for a fast tokenizer:

- ``tokenizer.json`` (required): the model, normalizer, pre-tokenizer, post-processor, decoder and added tokens.
  :meth:`Tokenizer.encode` with ``add_special_tokens=True`` applies its post-processor (a Llama 3 checkpoint's
  adds ``<|begin_of_text|>``), as transformers' generic fast tokenizer does; ``tokenizer_config.json``'s
  ``add_bos_token`` / ``add_eos_token`` are not read (transformers 5 applies them only in some model-specific
  tokenizer classes). Chat prompts are encoded with ``add_special_tokens=False``, since the template writes the
  special tokens itself.
- ``tokenizer_config.json`` (optional): the named special tokens ``bos_token``, ``eos_token``, ``unk_token``,
  ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``, each a string or an AddedToken object
  (``{"content": ...}``); ``special_tokens_map.json`` (legacy, optional) fills the names the config leaves out.
  The config is kept whole (:attr:`Tokenizer.config`) for the chat template, which may live in it.

Decoding is the ``tokenizers`` decoder's (``skip_special_tokens`` drops added tokens marked special);
transformers' ``clean_up_tokenization_spaces`` is not applied (transformers 5 itself skips it for BPE models,
the tokenizers of every family the engine serves).

Encoding and decoding go through the ``tokenizers`` library's batch calls, which release the interpreter lock while
the Rust code runs (its single-text ``encode``/``decode`` hold it): the server tokenizes in worker threads, and a
long prompt there must not stall its event loop. :attr:`Tokenizer.max_token_bytes` bounds how many bytes of text
one token can stand for, where the tokenizer's parts make that provable, so that the server refuses a prompt too
long for the context from its length in bytes, before it is tokenized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from ..values import arg_flag, show
from .args import arg_text, arg_token_ids
from .model_files import checkpoint_dir, read_json
from .optional import require

__all__ = ["SPECIAL_TOKEN_NAMES", "Tokenizer"]

# the named special tokens a chat template sees as variables, in transformers' order
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: the printable Latin-1 bytes stand for themselves, the
    others (control characters, space, ...) for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _token_text(value: Any, source: Path, name: str) -> str | None:
    """A special token's text from its JSON form: a string, an AddedToken object or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ValueError(
        f"model_dir: {source}: {name} must be a string, an object with a string 'content' (an AddedToken) or null, "
        f"got {show(value)}"
    )


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the checkpoint's named special tokens (made by :meth:`from_dir`).

    Attributes:
        special_tokens: name (``"bos_token"``, ...) -> token text, for the names the checkpoint sets.
        config: ``tokenizer_config.json`` as parsed (``{}`` when absent).
        source: the ``tokenizer.json`` it was read from (for messages).
        vocab_size: token ids lie in ``[0, vocab_size)`` (added tokens included).
    """

    def __init__(
        self, backend: Any, special_tokens: Mapping[str, str], config: Mapping[str, Any], source: Path
    ) -> None:
        if not (callable(getattr(backend, "decode", None)) and callable(getattr(backend, "get_vocab_size", None))):
            raise TypeError(f"backend: expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens)
        self.config: dict[str, Any] = dict(config)
        self.source = Path(source)
        self.vocab_size: int = int(backend.get_vocab_size(with_added_tokens=True))
        self._pieces: dict[int, tuple[str, bytes]] = {}  # token_piece's answers
        self._special_ids: frozenset[int] | None = None  # special_ids' answer

    @classmethod
    def from_dir(cls, model_dir: Any) -> Tokenizer:
        """Read ``model_dir/tokenizer.json`` (required) and the special tokens of ``tokenizer_config.json`` /
        ``special_tokens_map.json`` (optional); ValueError naming ``model_dir`` and the file when one is missing
        or malformed."""
        root = checkpoint_dir(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"model_dir: {path} does not exist; the engine reads a checkpoint's fast tokenizer: write one with "
                f"transformers' AutoTokenizer.from_pretrained(...).save_pretrained({str(root)!r})"
            )
        tokenizers = require("tokenizers", "reading tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for every parse error
            raise ValueError(
                f"model_dir: {path}: not a tokenizer the 'tokenizers' library can read ({str(exc)[:200]}); replace "
                f"it with the checkpoint's original tokenizer.json"
            ) from None
        config_path = root / "tokenizer_config.json"
        config = read_json(config_path, "the tokenizer's settings and special tokens") or {}
        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name), config_path, name)
            if text is not None:
                special[name] = text
        legacy_path = root / "special_tokens_map.json"
        legacy = read_json(legacy_path, "the named special tokens") or {}
        for name in SPECIAL_TOKEN_NAMES:
            if name not in special and (text := _token_text(legacy.get(name), legacy_path, name)) is not None:
                special[name] = text
        return cls(backend, special, config, path)

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` (its exact text, e.g. ``"<|im_end|>"``), or None when the vocabulary lacks it."""
        found = self._backend.token_to_id(arg_text("token", token))
        return None if found is None else int(found)

    def special_token_id(self, token_name: str) -> int | None:
        """The id of the named special token (``token_name``: ``"eos_token"``, ...), or None when it is unset or
        not a token."""
        text = self.special_tokens.get(arg_text("token_name", token_name))
        return None if text is None else self.token_id(text)

    def special_ids(self) -> frozenset[int]:
        """The ids of the added tokens marked special: those that ``skip_special_tokens`` leaves out of a decode."""
        if self._special_ids is None:
            added = self._backend.get_added_tokens_decoder()
            self._special_ids = frozenset(int(i) for i, token in added.items() if token.special)
        return self._special_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.special_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_token_id("pad_token")

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token as log-probabilities show it: its text alone (special tokens included; a token holding part of
        a UTF-8 character reads U+FFFD there) and its exact bytes (that part: a byte-level BPE token's own bytes,
        a ``<0xNN>`` byte-fallback token's byte), so that the bytes of consecutive tokens join into the text."""
        found = self._pieces.get(token_id) if type(token_id) is int else None
        if found is not None:
            return found
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"token_id: expected an int, got {type(token_id).__name__}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id: {show(token_id)} is outside the vocabulary [0, {self.vocab_size})")
        text = self.decode([token_id], skip_special_tokens=False)
        raw = text.encode()
        if "\ufffd" in text:
            piece = self._backend.id_to_token(token_id) or ""
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            elif type(self._backend.decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF_CHAR for c in piece):
                raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
        self._pieces[token_id] = found = (text, raw)
        return found

    def backend_json(self) -> str:
        """``tokenizer.json``'s text as the ``tokenizers`` library holds it (for libraries that take a tokenizer
        in that form, such as the grammar matcher's)."""
        return str(self._backend.to_str())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies ``tokenizer.json``'s post-processor (BOS etc.)."""
        text = arg_text("text", text)
        add = arg_flag("add_special_tokens", add_special_tokens)
        return list(self._backend.encode_batch([text], add_special_tokens=add)[0].ids)  # without the lock

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of token ``ids`` (a sequence of ints in ``[0, vocab_size)``); ``skip_special_tokens`` leaves
        out the added tokens marked special (EOS, ``<|im_end|>``, ...)."""
        checked = arg_token_ids("ids", ids, self.vocab_size)
        skip = arg_flag("skip_special_tokens", skip_special_tokens)
        return str(self._backend.decode_batch([checked], skip_special_tokens=skip)[0])  # without the lock

    def _decode_checked(self, ids: list[int], skip_special_tokens: bool) -> str:
        """:meth:`decode` of ids the caller has checked (ints in ``[0, vocab_size)``, a bool flag): the
        incremental detokenizer's per-token call, without checking the window's ids again."""
        return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes of UTF-8 text one token stands for, where ``tokenizer.json`` makes that provable (None
        where it does not): a text of ``b`` bytes then encodes to at least ``ceil(b / max_token_bytes)`` tokens.
        Worked out once (it reads the whole vocabulary)."""
        return _max_token_bytes(json.loads(self.backend_json()))


def _max_token_bytes(spec: Mapping[str, Any]) -> int | None:
    """The bound of :attr:`Tokenizer.max_token_bytes` for a parsed ``tokenizer.json``, or None.

    A BPE model's token is the concatenation of the characters it merged, as they read after the normalizer and the
    pre-tokenizer, so its vocabulary entry's UTF-8 length bounds what it covers of that text; a byte-level entry's
    characters stand for one byte each (and take one or two in UTF-8), a ``<0xNN>`` fallback entry for one byte, an
    added token for its own content. That text is at least as long as the input when every step only adds or keeps
    characters; each condition below makes sure of one of those facts, and anything else gives None:

    - no truncation, no normalizer but ``Prepend`` and ``Replace`` of a literal by text at least as long;
    - no pre-tokenizer but ``ByteLevel``, ``Metaspace``, ``Digits`` and ``Split``/``Punctuation`` that keep what
      they split on (not ``Removed``);
    - no added token that swallows the blanks around it (``lstrip``/``rstrip``);
    - a BPE model whose every character is in the vocabulary, or becomes one: each of the 256 byte-level characters
      there (behind a ``ByteLevel`` pre-tokenizer, no subword prefix or suffix), or each of the 256 ``<0xNN>`` bytes
      (``byte_fallback``), or an unknown token per unknown character (``unk_token`` without ``fuse_unk``: at most 4
      bytes each). A character the model knows in no way would be dropped and cover bytes with no token."""
    if spec.get("truncation") is not None or not _keeps_length(spec.get("normalizer"), _LENGTH_KEEPING_NORMALIZERS):
        return None
    if not _keeps_length(spec.get("pre_tokenizer"), _LENGTH_KEEPING_PRE_TOKENIZERS):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, Mapping):
        return None
    longest = max((len(str(t).encode()) for t in vocab), default=1)
    longest = max([longest, *(len(str(t.get("content", "")).encode()) for t in added)])
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(p.get("type") == "ByteLevel" for p in pres) and not (
        model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    )
    if byte_level and all(c in vocab for c in _BYTE_OF_CHAR):
        return longest
    if model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return longest
    if model.get("unk_token") in vocab and not model.get("fuse_unk"):
        return max(longest, 4)  # an unknown character, a token of its own: 4 bytes at most in UTF-8
    return None


# the parts of tokenizer.json that never shorten the text (see _max_token_bytes); a Replace only when its literal
# pattern is no longer than its replacement, a splitter only when it keeps what it splits on
_LENGTH_KEEPING_NORMALIZERS = ("Prepend", "Replace")
_LENGTH_KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "Split", "Punctuation")


def _keeps_length(part: Any, kinds: tuple[str, ...]) -> bool:
    """Whether a normalizer or pre-tokenizer of ``tokenizer.json`` (None: none) only adds or keeps characters."""
    if part is None:
        return True
    if not isinstance(part, Mapping):
        return False
    kind = part.get("type")
    if kind == "Sequence":
        inner = part.get("normalizers", part.get("pretokenizers"))
        return isinstance(inner, list) and all(_keeps_length(p, kinds) for p in inner)
    if kind not in kinds or part.get("behavior") == "Removed":
        return False
    if kind == "Replace":
        pattern, content = part.get("pattern") or {}, part.get("content")
        literal = pattern.get("String") if isinstance(pattern, Mapping) else None
        return isinstance(literal, str) and isinstance(content, str) and len(content.encode()) >= len(literal.encode())
    return True
