"""The small text files of a checkpoint directory (``tokenizer_config.json``, ``generation_config.json``,
``chat_template.jinja``, ...), read with errors that name ``model_dir``, the file and the fix.

``config.json`` has its own reader (:func:`fi_engine.checkpoint.config.read_config_json`); this module serves the text
layer, whose files are optional one by one: :func:`read_json` and :func:`read_text` return None for a file that is
absent, and raise for one that is present but unreadable or malformed, so a broken file is never silently skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..values import model_dir_fspath

__all__ = ["checkpoint_dir", "read_json", "read_text"]


def checkpoint_dir(model_dir: Any) -> Path:
    """``model_dir`` as a Path to an existing directory; TypeError for a non-path, ValueError for a path that is
    not a directory or holds a NUL byte."""
    fs = model_dir_fspath(model_dir)
    path = Path(os.fsdecode(fs))
    if not path.is_dir():
        raise ValueError(
            f"model_dir: {path} is not a directory; pass a Hugging Face checkpoint directory (tokenizer.json, "
            f"tokenizer_config.json, ...)"
        )
    return path


def read_text(path: Path) -> str | None:
    """The UTF-8 text of ``path`` (a file of the checkpoint directory), or None when it does not exist; ValueError
    naming ``model_dir`` and the file when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"model_dir: {path}: cannot read it as UTF-8 text ({exc}); replace the file or remove it"
        ) from None


def read_json(path: Path, expected: str) -> dict[str, Any] | None:
    """The JSON object in ``path`` (a file of the checkpoint directory), or None when the file does not exist;
    ValueError naming ``model_dir`` and the file for text that is not JSON, or JSON that is not an object.
    ``expected`` says what the object holds (for the message)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise ValueError(
            f"model_dir: {path}: not valid JSON ({exc}); the file should hold {expected}: fix or remove it"
        ) from None
    except RecursionError:
        raise ValueError(
            f"model_dir: {path}: its JSON nests too deeply to parse; the file should hold {expected}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"model_dir: {path}: holds a JSON {type(data).__name__}, expected an object ({expected})")
    return data
