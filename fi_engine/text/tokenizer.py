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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..values import show
from .args import arg_flag, arg_text, arg_token_ids
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
        return list(self._backend.encode(text, add_special_tokens=add).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of token ``ids`` (a sequence of ints in ``[0, vocab_size)``); ``skip_special_tokens`` leaves
        out the added tokens marked special (EOS, ``<|im_end|>``, ...)."""
        checked = arg_token_ids("ids", ids, self.vocab_size)
        skip = arg_flag("skip_special_tokens", skip_special_tokens)
        return str(self._backend.decode(checked, skip_special_tokens=skip))

    def _decode_checked(self, ids: list[int], skip_special_tokens: bool) -> str:
        """:meth:`decode` of ids the caller has checked (ints in ``[0, vocab_size)``, a bool flag): the
        incremental detokenizer's per-token call, without checking the window's ids again."""
        return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))
