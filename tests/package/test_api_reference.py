"""The API reference (``docs/api/``, written by ``tools/api_reference.py``) and the docstrings it is made of.

- The committed pages are what the generator writes now: a changed docstring or signature without a re-run fails
  here, naming the stale pages and the command that fixes them.
- Every public name is on its page and in the index.
- Every public callable has a docstring; every tensor argument of one is documented (its shape, dtype, units) in
  the docstring's ``Args:`` section or in that of the op it refers to (``arguments as :func:`rmsnorm```).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from helpers.tools import load_tool

ROOT = Path(__file__).resolve().parents[2]


tool = load_tool("api_reference")
ENTRIES = tool.public_surface()
TENSOR_TYPES = ("TensorLike", "TensorT", "IndexLike")


def test_committed_pages_are_current() -> None:
    files = tool.render(ENTRIES)
    stale = tool.stale(files, ROOT / "docs" / "api")
    assert not stale, f"docs/api is out of date: {stale}; run: python tools/api_reference.py"


def test_every_public_name_is_on_its_page_and_in_the_index() -> None:
    import fi_ffi
    import fi_ffi.comm

    files = tool.render(ENTRIES)
    names = {e.qualname for e in ENTRIES}
    assert {f"fi_ffi.{n}" for n in fi_ffi.__all__} <= names
    assert {f"fi_ffi.comm.{n}" for n in fi_ffi.comm.__all__} <= names
    assert "fi_engine.models.llama.LlamaEngine" in names and "fi_ffi.tensor.protocols.TensorLike" in names
    for e in ENTRIES:
        assert f"### `{e.qualname}`\n" in files[f"{e.page}.md"], e.qualname
        assert f"[`{e.qualname}`]({e.page}.md#{tool.anchor(e.qualname)})" in files["index.md"], e.qualname
    assert "attention.md" in files and "fi_ffi.batch_decode_plan" in files["attention.md"]


def test_renderer_turns_google_sections_and_roles_into_markdown() -> None:
    r = tool.Renderer(ENTRIES)
    r.module = "fi_ffi.ops.norm"
    doc = inspect.cleandoc(
        """Like :func:`rmsnorm`, see :mod:`fi_ffi.nowhere`.

        Args:
            input, weight: ``[B, D]`` float16,
                contiguous.
            eps: > 0.

        Returns:
            ``out``.

        Example::

            f(x)
        """
    )
    text = r.docstring(doc, "normalization")
    assert text.startswith("Like [`rmsnorm`](#fi_ffirmsnorm), see `fi_ffi.nowhere`.")
    assert "**Args**\n\n- `input`, `weight`: `[B, D]` float16, contiguous.\n- `eps`: > 0.\n" in text
    assert "**Returns**\n\n`out`.\n" in text
    assert "Example:\n\n```text\nf(x)\n```" in text
    assert tool.anchor("fi_ffi.comm.read_env") == "fi_fficommread_env"


# ---- docstrings -------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:func|meth|class):`~?([\w.]+)`")
# An argument item: "    name: ...", "    a, b: ...", or one more after "; " / ". " on the same line.
_ITEM = re.compile(r"(?:^\s+|[;.]\s+)(\w+(?:\s*,\s*\w+)*)(?:\s*\([^)]*\))?:\s", re.M)
# Callables whose tensors may have any shape (they describe tensors rather than compute on them).
ANY_SHAPE = {"fi_ffi.as_tensor"}


def _callables() -> list[tuple[str, Any]]:
    """(name, function) for every public function, class and method of a public class."""
    found = []
    for e in ENTRIES:
        if inspect.isfunction(e.obj) or inspect.isclass(e.obj):
            found.append((e.qualname, e.obj))
        if inspect.isclass(e.obj) and not issubclass(e.obj, BaseException):
            for name, member in tool._members(e.obj):
                if inspect.isfunction(member):
                    found.append((f"{e.qualname}.{name}", member))
    return found


def _documented(doc: str) -> set[str]:
    """Names an ``Args:``-style item documents, or that the text quotes as ````code````."""
    names = {n.strip() for m in _ITEM.finditer(doc) for n in m.group(1).split(",")}
    return names | set(re.findall(r"``(\w+)``", doc))


def _referred(doc: str, by_short: dict[str, Any]) -> list[Any]:
    return [by_short[n.rpartition(".")[2]] for n in _ROLE.findall(doc) if n.rpartition(".")[2] in by_short]


def test_every_public_callable_has_a_docstring() -> None:
    missing = [name for name, obj in _callables() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public callables without a docstring: {missing}"


def test_tensor_arguments_state_their_shapes_in_the_docstring() -> None:
    """The project's convention: an ``Args:`` item per argument with its shape (``[B, D]``) and dtype, or a
    reference to the op whose ``Args:`` apply (``arguments as :func:`silu_and_mul```)."""
    functions = [(n, f) for n, f in _callables() if inspect.isfunction(f)]
    by_short = {n.rpartition(".")[2]: f for n, f in functions if n.count(".") == 1}  # fi_ffi.<op>

    def covers(f: Any, param: str, seen: frozenset[int] = frozenset()) -> bool:
        doc = inspect.getdoc(f) or ""
        if param in _documented(doc):
            return True
        return any(covers(g, param, seen | {id(f)}) for g in _referred(doc, by_short) if id(g) not in seen)

    def shapes(f: Any, seen: frozenset[int] = frozenset()) -> bool:
        doc = inspect.getdoc(f) or ""
        if re.search(r"``\[[^`]*\]``|``[\w.]+ \[[^`]*\]``", doc) or re.search(r"\[[\w ,.+*/>=-]+\]", doc):
            return True
        return any(shapes(g, seen | {id(f)}) for g in _referred(doc, by_short) if id(g) not in seen)

    problems = []
    checked = 0
    for name, f in functions:
        tensors = [
            p.name
            for p in inspect.signature(f).parameters.values()
            if isinstance(p.annotation, str) and any(t in p.annotation for t in TENSOR_TYPES)
        ]
        if not tensors:
            continue
        checked += 1
        undocumented = [p for p in tensors if not covers(f, p)]
        if undocumented:
            problems.append(f"{name}: {', '.join(undocumented)} not documented")
        if name not in ANY_SHAPE and not shapes(f):
            problems.append(f"{name}: no shape ([...]) stated")
    assert checked >= 60, checked  # the ops are annotated with fi_ffi.tensor.protocols (a regression to Any shows here)
    assert not problems, "\n".join(problems)
