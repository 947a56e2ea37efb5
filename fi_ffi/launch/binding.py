"""Binding with the signature check: a declaration meets the module it is called on.

A kernel module states its entry points' argument lists (the text a zero-argument call returns). Before the first
call through a declaration, :func:`bound_entry` compares that text with the declaration and refuses a module
built from a FlashInfer release with another argument list, by name; :func:`select_declaration` picks, among one
entry point's declarations for several releases, the one the module matches. Each (module, declaration) pair is
checked once per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..abi import wire
from ..errors import LoaderError

_checked: set[tuple[str, wire.Declaration]] = set()


def select_declaration(declarations: Sequence[wire.Declaration], uri: str) -> wire.Declaration:
    """The declaration of ``declarations`` (one entry point, several releases) that module ``uri`` matches.

    Raises:
        LoaderError: none matches; names the module, the entry point, each declaration and the found signature.
    """
    from .kernels import entry_point

    entry = declarations[0].entry
    found = wire.parse_signature(entry_point(uri, entry).signature_text(), entry)
    chosen = wire.select(declarations, found)
    if chosen is None:
        expected = "\n".join(f"  FlashInfer {d.release or '?'}: {d.signature}" for d in declarations)
        raise LoaderError(
            f"module {uri!r}, entry point {entry!r}: its signature matches no declaration of fi_ffi\n"
            f"{expected}\n  found: {found.text if found else '(none)'}\nThe module was built from a "
            f"FlashInfer release fi_ffi does not declare; pin one it does (fi-ffi list shows each "
            f"module's release)"
        )
    _checked.add((uri, chosen))
    return chosen


def bound_entry(uri: str, decl: wire.Declaration) -> Any:
    """Bind ``decl.entry`` of module ``uri`` and check the module's signature against ``decl`` (once).

    Raises:
        LoaderError: the module states another argument list (built from another FlashInfer release), naming the
            module, the entry point, the expected and the found signature.
    """
    from .kernels import entry_point

    ep = entry_point(uri, decl.entry)
    key = (uri, decl)
    if key not in _checked:
        found = wire.parse_signature(ep.signature_text(), decl.entry)
        why = wire.signature_mismatch(decl, found)
        if why:
            release = f" (declared for FlashInfer {decl.release})" if decl.release else ""
            raise LoaderError(
                f"module {uri!r}, entry point {decl.entry!r}: its signature does not match fi_ffi's declaration"
                f"{release}: {why}.\n  expected: {decl.signature}\n  found:    "
                f"{found.text if found else '(none)'}\nThe module was built from a FlashInfer release with another "
                f"argument list; pin a wheel of a release fi_ffi declares (fi-ffi list shows each module's release)"
            )
        _checked.add(key)
    return ep


def forget() -> None:
    """Forget which (module, declaration) pairs were checked (the launchers' cache reset calls it)."""
    _checked.clear()


__all__ = ["bound_entry", "forget", "select_declaration"]
