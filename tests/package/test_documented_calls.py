"""Every ``fi_ffi.<name>(...)`` call in the Python blocks of README.md and docs/*.md binds to that function's
signature: as many positional arguments as it takes, only keywords it has, every required argument given. A call
copied from the documents then fails, if at all, on its values, not with a TypeError about its arguments.

Calls that unpack (``*args``, ``**kwargs``) are skipped: their count is not known from the text.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import fi_ffi

ROOT = Path(__file__).resolve().parents[2]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_calls(path: Path, text: str) -> Iterator[tuple[str, ast.Call]]:
    """``(path:line, call)`` for every call of a function ``fi_ffi.<name>`` in ``text``'s Python blocks."""
    for block in PYTHON_BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        for node in ast.walk(ast.parse(block.group(1))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, name = node.func.value, node.func.attr
                if isinstance(owner, ast.Name) and owner.id == "fi_ffi" and callable(getattr(fi_ffi, name, None)):
                    yield f"{path.name}:{first_line + node.lineno - 1}", node


def unbound(call: ast.Call) -> str | None:
    """Why ``call``'s positional count and keyword names do not bind to its function's signature, or None."""
    assert isinstance(call.func, ast.Attribute)
    keywords = [k.arg for k in call.keywords]
    if any(isinstance(a, ast.Starred) for a in call.args) or None in keywords:
        return None  # unpacking: the count is not known from the text
    try:
        inspect.signature(getattr(fi_ffi, call.func.attr)).bind(*call.args, **dict.fromkeys(keywords))
    except TypeError as e:
        return f"fi_ffi.{call.func.attr}: {e}"
    return None


def unbound_calls(path: Path, text: str) -> tuple[int, list[str]]:
    """How many calls ``text`` has, and ``path:line: fi_ffi.name: why`` for each one that does not bind."""
    calls = list(documented_calls(path, text))
    return len(calls), [f"{where}: {why}" for where, call in calls if (why := unbound(call))]


def test_every_documented_call_binds_to_its_signature() -> None:
    checked, found = 0, []
    for path in documents():
        calls, unbound = unbound_calls(path, path.read_text(encoding="utf-8"))
        checked, found = checked + calls, found + unbound
    assert checked > 5  # the documents were read and their calls found
    assert found == []


def test_the_check_finds_a_call_that_does_not_bind() -> None:  # the check above could fail
    text = (
        "text\n```python\nimport fi_ffi\n"
        "fi_ffi.rmsnorm(x, w, out=o)\n"  # binds
        "fi_ffi.batch_decode_run(plan, q, (k, v), out=o)\n"  # plan is keyword-only; kv_indptr... missing
        "fi_ffi.rmsnorm(x, w, eps=1e-6, bias=b)\n"  # no such keyword
        "fi_ffi.rmsnorm(*args)\n"  # unpacking: skipped
        "```\n"
    )
    calls, found = unbound_calls(Path("probe.md"), text)
    assert calls == 4
    assert [f.split(": ", 2)[:2] for f in found] == [
        ["probe.md:5", "fi_ffi.batch_decode_run"],
        ["probe.md:6", "fi_ffi.rmsnorm"],
    ]
