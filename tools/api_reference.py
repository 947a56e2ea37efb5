"""Write fi_ffi's API reference (Markdown, ``docs/api/``) from the signatures and docstrings of its public names.

    python tools/api_reference.py           # (re)write docs/api/
    python tools/api_reference.py --check   # exit 1, naming the stale pages, if docs/api/ is not what it would write

The public surface is read from the package itself, never from file paths, so it follows modules that move:
``fi_ffi.__all__``, ``fi_ffi.tensor.protocols.__all__``, ``fi_ffi.cuda.__all__``, ``fi_ffi.cdecl.__all__``,
``fi_ffi.comm.__all__`` and the ``__all__`` of each module of ``fi_engine``. Ops are grouped into pages by family
(:data:`FAMILIES`, keyed by the last part of the defining module's name), then by module; every other name of
``fi_ffi`` is on the core page.

Why a small generator rather than Sphinx or MkDocs: the pages are plain Markdown committed with the code, so they
read on any Git host and in the checkout without a build; the generator needs nothing beyond the standard library
and fi_ffi itself (no network, no extra dependency in the dev extra, seconds in CI), and
``tests/package/test_api_reference.py`` fails when a page is stale, so the reference cannot drift from the docstrings.
The docstrings are Google style (``Args:``/``Returns:``/``Raises:``) with reST inline markup (````code````,
``:func:`name```), which is all this file renders.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ForwardRef

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api"

# page -> (title, last parts of the op modules it holds). An op module not listed gets a page of its own.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "attention": ("Attention", ("decode", "prefill", "mla", "sink", "cascade", "plan", "workspace", "variants")),
    "normalization": ("Normalization", ("norm",)),
    "activation": ("Activations", ("activation",)),
    "rope": ("Rotary embeddings (RoPE)", ("rope",)),
    "kv-cache": ("Paged KV cache", ("page",)),
    "sampling": ("Sampling and top-k", ("sampling", "topk")),
    "gemm": ("GEMMs and MoE routing", ("bmm_fp8", "segment_gemm", "router")),
    "state-space": ("Linear attention and state-space models", ("gdn", "mamba")),
    "quantization": ("Bit packing", ("quantization",)),
}
CORE = ("core", "Descriptors, dtypes, streams, errors and typing")
COMM = ("comm", "Tensor parallelism (fi_ffi.comm)")
MODELS = ("models", "The serving engine (fi_engine)")
PAGE_ORDER = ("core", *FAMILIES, "comm", "models")


@dataclass(frozen=True)
class Entry:
    """One public name: where users reach it (``qualname``), the object and the page it is documented on."""

    qualname: str
    obj: Any
    page: str

    @property
    def module(self) -> str:
        """The module that defines the object (a constant: the module it is exported from)."""
        module = getattr(self.obj, "__module__", None)
        if inspect.isfunction(self.obj) or inspect.isclass(self.obj):
            return str(module)
        return self.qualname.rpartition(".")[0]

    @property
    def short(self) -> str:
        return self.qualname.rpartition(".")[2]


def _exported(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        raise SystemExit(f"{module.__name__} has no __all__: the reference lists only declared public names")
    return list(names)


def _op_page(module: str) -> str:
    last = module.rpartition(".")[2]
    return next((page for page, (_, members) in FAMILIES.items() if last in members), last)


def public_surface() -> list[Entry]:
    """Every public name of fi_ffi, with the page it belongs on (imports fi_ffi; loads no shared library)."""
    import fi_engine
    import fi_ffi
    import fi_ffi.cdecl
    import fi_ffi.comm
    import fi_ffi.cuda
    import fi_ffi.tensor.protocols

    entries = []
    for name in _exported(fi_ffi):
        obj = getattr(fi_ffi, name)
        module = getattr(obj, "__module__", "") if callable(obj) else ""
        page = _op_page(module) if module.startswith("fi_ffi.ops.") else CORE[0]
        entries.append(Entry(f"fi_ffi.{name}", obj, page))
    for name in _exported(fi_ffi.tensor.protocols):
        entries.append(Entry(f"fi_ffi.tensor.protocols.{name}", getattr(fi_ffi.tensor.protocols, name), CORE[0]))
    for module in (fi_ffi.cuda, fi_ffi.cdecl):  # public modules the engine (and users) take names from
        for name in _exported(module):
            entries.append(Entry(f"{module.__name__}.{name}", getattr(module, name), CORE[0]))
    for name in _exported(fi_ffi.comm):
        entries.append(Entry(f"fi_ffi.comm.{name}", getattr(fi_ffi.comm, name), COMM[0]))
    for info in sorted(pkgutil.walk_packages(fi_engine.__path__, "fi_engine."), key=lambda i: i.name):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name in _exported(module):
            entries.append(Entry(f"{module.__name__}.{name}", getattr(module, name), MODELS[0]))
    return entries


def titles() -> dict[str, str]:
    return {CORE[0]: CORE[1], COMM[0]: COMM[1], MODELS[0]: MODELS[1]} | {p: t for p, (t, _) in FAMILIES.items()}


# ---- docstrings to Markdown ---------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")
_SECTIONS = {"Args", "Arguments", "Parameters", "Returns", "Raises", "Yields", "Attributes", "Example", "Examples"}
_ITEM = re.compile(r"^(\*{0,2}[\w.]+(?:\s*,\s*\*{0,2}[\w.]+)*)(\s*\([^)]*\))?:\s*(.*)$")


class Renderer:
    """Renders docstrings with links to the entries it knows (by qualified name, defining path or short name)."""

    def __init__(self, entries: list[Entry]) -> None:
        self.targets: dict[str, tuple[str, str]] = {}
        self.module = ""  # the module of the entry being rendered
        shorts: dict[str, list[tuple[str, str]]] = {}
        for e in entries:
            target = (e.page, anchor(e.qualname))
            self.targets[e.qualname] = target
            if inspect.isfunction(e.obj) or inspect.isclass(e.obj):
                self.targets.setdefault(f"{e.obj.__module__}.{e.obj.__qualname__}", target)
            shorts.setdefault(e.short, []).append(target)
        for short, found in shorts.items():
            if len(set(found)) == 1:
                self.targets.setdefault(short, found[0])

    def link(self, name: str, page: str) -> str | None:
        name = name.strip().removesuffix("()")
        local = f"{self.module}.{name}"  # a name in the module of the docstring being rendered comes first
        for key in (local, name, name.removeprefix("fi_ffi."), name.rpartition(".")[2]):
            if key in self.targets:
                target_page, slug = self.targets[key]
                return f"#{slug}" if target_page == page else f"{target_page}.md#{slug}"
        return None

    def inline(self, text: str, page: str) -> str:
        def role(m: re.Match[str]) -> str:
            tilde, name, explicit = m.group(1), m.group(2), m.group(3)
            target = explicit or name
            shown = target.rpartition(".")[2] if tilde else name
            href = self.link(target, page)
            return f"[`{shown}`]({href})" if href else f"`{shown}`"

        text = _ROLE.sub(role, text)
        return re.sub(r"``(.+?)``", _code, text)

    def docstring(self, doc: str, page: str) -> str:
        """Google-style sections become bold headers with bullet items; ``::`` blocks and reST tables become code."""
        out: list[str] = []
        lines = doc.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            head = stripped[:-1] if stripped.endswith(":") else ""
            if not line.startswith(" ") and head in _SECTIONS:
                body, i = _block(lines, i + 1)
                out += ["", f"**{head}**", ""]
                if head in ("Returns", "Yields", "Example", "Examples"):
                    out += self._paragraphs(_dedent(body), page)
                else:
                    out += self._items(_dedent(body), page)
                out.append("")
                continue
            if stripped.endswith("::"):  # a reST literal block: "Text::" shows "Text:", then the block as code
                if stripped != "::":
                    out.append(self.inline(line.rstrip()[:-1], page))
                body, i = _block(lines, i + 1)
                out += ["", "```text", *_trim(_dedent(body)), "```", ""]
                continue
            if stripped.startswith("==="):  # a reST simple table, shown as it is written
                j = i
                while j < len(lines) and lines[j].strip():
                    j += 1
                out += ["", "```text", *_dedent(lines[i:j]), "```", ""]
                i = j
                continue
            if stripped.endswith(":") and i + 1 < len(lines) and lines[i + 1].startswith(" " * 4):
                out += [self.inline(line, page), ""]  # "Args are those of X, except:" and its indented items
                body, i = _block(lines, i + 1)
                out += [*self._items(_dedent(body), page), ""]
                continue
            out.append(self.inline(line, page))
            i += 1
        return "\n".join(_squeeze(out)).strip()

    def _paragraphs(self, body: list[str], page: str) -> list[str]:
        return [self.inline(line, page) for line in body]

    def _items(self, body: list[str], page: str) -> list[str]:
        items: list[list[str]] = []
        for line in body:
            m = _ITEM.match(line) if not line.startswith(" ") else None
            if m:
                names = ", ".join(f"`{n.strip()}`" for n in m.group(1).split(","))
                items.append([f"- {names}{m.group(2) or ''}: {m.group(3)}"])
            elif items and line.strip():
                items[-1].append(line.strip())
            elif line.strip():
                items.append([line.strip()])
        return [self.inline(" ".join(item), page) for item in items]


def _code(m: re.Match[str]) -> str:
    """reST ````code```` as Markdown code (double backticks where the code holds one)."""
    return f"`{m.group(1)}`" if "`" not in m.group(1) else f"`` {m.group(1)} ``"


def _block(lines: list[str], i: int) -> tuple[list[str], int]:
    """The indented (or blank) lines from ``i`` on, and the index after them."""
    j = i
    while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
        j += 1
    return lines[i:j], j


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def _dedent(lines: list[str]) -> list[str]:
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return [x[indent:] for x in lines]


def _squeeze(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1].strip()):
            out.append(line.rstrip())
    return out


def anchor(qualname: str) -> str:
    """The id a Markdown renderer gives the heading ``### `qualname` `` (GitHub's rule: lower case, punctuation
    other than ``-`` and ``_`` dropped)."""
    return re.sub(r"[^\w\- ]", "", qualname.lower()).replace(" ", "-")


# ---- signatures -------------------------------------------------------------------------------------------------


def _default(value: Any) -> str:
    text = repr(value)
    return "..." if " at 0x" in text or len(text) > 100 else text


def _class_line(name: str, cls: type) -> str:
    bases = ", ".join(b.__name__ for b in cls.__bases__ if b is not object)
    return f"class {name}({bases})" if bases else f"class {name}"


def signature(name: str, obj: Any, prefix: str = "def ", bound: bool = False) -> str:
    """``def name(params) -> result`` as written in the source (annotations are kept as strings); ``bound``:
    a method, shown without ``self``/``cls``."""
    if inspect.isclass(obj) and (issubclass(obj, BaseException) or getattr(obj, "_is_protocol", False)):
        return _class_line(name, obj)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return _class_line(name, obj) if inspect.isclass(obj) else f"{prefix}{name}(...)"
    params = []
    for k, p in enumerate(sig.parameters.values()):
        if bound and k == 0 and p.name in ("self", "cls"):
            continue
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        params.append((p.kind, text))
    parts: list[str] = []
    star = any(k is inspect.Parameter.VAR_POSITIONAL for k, _ in params)
    kinds = inspect.Parameter
    for k, (kind, text) in enumerate(params):
        previous = params[k - 1][0] if k else None
        if kind is kinds.KEYWORD_ONLY and not star and previous is not kinds.KEYWORD_ONLY:
            parts.append("*")
        if previous is kinds.POSITIONAL_ONLY and kind is not kinds.POSITIONAL_ONLY:
            parts.append("/")
        parts.append(text)
    result = ""
    if sig.return_annotation is not sig.empty and prefix != "class ":
        result = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{prefix}{name}({', '.join(parts)}){result}"
    if len(one_line) <= 100:
        return one_line
    body = "".join(f"    {p},\n" for p in parts)
    return f"{prefix}{name}(\n{body}){result}"


def _annotation(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, ForwardRef):  # a dataclass field's string annotation
        return value.__forward_arg__
    if isinstance(value, type):
        return value.__qualname__
    return repr(value).replace("typing.", "")


# ---- pages ------------------------------------------------------------------------------------------------------


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) if _documentable(obj) else None
    return _first_paragraph(doc).split(". ")[0].rstrip(".")


def _documentable(obj: Any) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj)


def _line(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """The public methods and properties ``cls`` itself defines (not what it inherits), in source order."""
    found = []
    protocol = getattr(cls, "_is_protocol", False)
    for name, value in vars(cls).items():
        if name.startswith("_") and not (protocol and name.startswith("__") and name not in _PROTOCOL_PLUMBING):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            target = value.fget if isinstance(value, property) else value
            found.append((_line(target), name, value))
    for _, name, value in sorted(found, key=lambda t: (t[0], t[1])):
        yield name, value


_PROTOCOL_PLUMBING = frozenset(("__init__", "__subclasshook__", "__parameters__", "__protocol_attrs__"))


def _entry(e: Entry, r: Renderer) -> list[str]:
    r.module = e.module
    out = [f"### `{e.qualname}`", ""]
    obj = e.obj
    if inspect.isclass(obj):
        out += ["```python", signature(e.short, obj, "class "), "```", ""]
    elif inspect.isfunction(obj):
        out += ["```python", signature(e.short, obj), "```", ""]
    elif isinstance(obj, ModuleType):
        out += [f"Module `{obj.__name__}`.", ""]
        doc = inspect.getdoc(obj)
        return [*out, r.inline(_first_paragraph(doc), e.page), ""] if doc else out
    else:
        value, doc = _ALIAS_DOCS.get(e.qualname, (_default(obj), ""))
        out += ["```python", f"{e.short} = {value}", "```", ""]
        return [*out, r.inline(doc, e.page), ""] if doc else out
    doc = inspect.getdoc(obj)
    if doc:
        out += [r.docstring(doc, e.page), ""]
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        for name, member in _members(obj):
            if isinstance(member, property):
                out += [f"#### `{e.short}.{name}` (property)", ""]
                doc = inspect.getdoc(member)
            else:
                out += [f"#### `{e.short}.{name}`", "", "```python", signature(name, member, bound=True), "```", ""]
                doc = inspect.getdoc(member)
            if doc:
                out += [r.docstring(doc, e.page), ""]
    return out


# Type aliases and type variables carry no docstring object; their documentation is the string literal that
# follows them in fi_ffi/typing.py, read here from the module's source so it is written once.
_ALIAS_DOCS: dict[str, tuple[str, str]] = {}


def _alias_docs() -> dict[str, tuple[str, str]]:
    import ast

    import fi_ffi.tensor.protocols

    found = {}
    source = inspect.getsource(fi_ffi.tensor.protocols)
    tree = ast.parse(source)
    for node, after in zip(tree.body, tree.body[1:], strict=False):
        target: ast.expr
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if (
            isinstance(target, ast.Name)
            and value is not None
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = " ".join((ast.get_source_segment(source, value) or "...").split())
            found[f"fi_ffi.tensor.protocols.{target.id}"] = (
                text,
                " ".join(inspect.cleandoc(after.value.value).split()),
            )
    return found


def render(entries: list[Entry]) -> dict[str, str]:
    """File name → Markdown text of every page (``index.md`` included)."""
    _ALIAS_DOCS.clear()
    _ALIAS_DOCS.update(_alias_docs())
    r = Renderer(entries)
    names = titles()
    pages: dict[str, list[Entry]] = {}
    for e in entries:
        pages.setdefault(e.page, []).append(e)
    order = [p for p in PAGE_ORDER if p in pages] + sorted(p for p in pages if p not in PAGE_ORDER)
    files: dict[str, str] = {}
    note = "<!-- Generated by tools/api_reference.py from the docstrings; edit those, then re-run the tool. -->"
    for page in order:
        title = names.get(page, page)
        out = [note, "", f"# {title}", "", "[API reference index](index.md)", ""]
        by_module: dict[str, list[Entry]] = {}
        for e in pages[page]:
            by_module.setdefault(e.module, []).append(e)
        for module in sorted(by_module, key=lambda m: (m != "fi_ffi", m)):
            mod = sys.modules.get(module)
            out += [f"## `{module}`", ""]
            summary = _first_paragraph(inspect.getdoc(mod)) if mod is not None else ""
            if summary:
                out += [r.inline(summary, page), ""]
            for e in sorted(by_module[module], key=lambda e: (_line(e.obj) if _documentable(e.obj) else 0, e.short)):
                out += _entry(e, r)
        files[f"{page}.md"] = "\n".join(_squeeze(out)).rstrip() + "\n"
    index = [
        note,
        "",
        "# fi_ffi API reference",
        "",
        "Every public name of fi_ffi with its signature and docstring. Tensor arguments are typed with",
        "[`fi_ffi.tensor.protocols`](core.md#fi_ffitensorprotocolstensorlike): `TensorLike` is a `fi_ffi.Tensor`",
        "descriptor or any object speaking DLPack, `__cuda_array_interface__` or `__array_interface__` (numpy, CuPy,",
        "JAX, torch, numba, ...); an op that writes a caller's tensor returns it as passed (`TensorT`). Shapes are",
        "written `[B, D]`, in elements; sizes in bytes say so.",
        "",
        "These pages are generated by `python tools/api_reference.py` and checked by",
        "`tests/package/test_api_reference.py`.",
        "",
        "| Page | Contents |",
        "| --- | --- |",
    ]
    for page in order:
        index.append(f"| [{names.get(page, page)}]({page}.md) | {len(pages[page])} names |")
    index += ["", "## All names", ""]
    for e in sorted(entries, key=lambda e: e.qualname.lower()):
        summary = r.inline(_summary(e.obj), "index")
        index.append(f"- [`{e.qualname}`]({e.page}.md#{anchor(e.qualname)})" + (f": {summary}" if summary else ""))
    files["index.md"] = "\n".join(index) + "\n"
    return files


def stale(files: dict[str, str], folder: Path = OUT) -> list[str]:
    """Pages that differ from ``files`` (or are missing), and pages in ``folder`` the generator does not write."""
    found = {p.name for p in folder.glob("*.md")} if folder.is_dir() else set()
    differ = [n for n, text in files.items() if not (folder / n).is_file() or (folder / n).read_text("utf-8") != text]
    return sorted(differ + sorted(found - set(files)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files = render(public_surface())
    if args == ["--check"]:
        bad = stale(files)
        if bad:
            print(f"docs/api is out of date ({', '.join(bad)}); run: python tools/api_reference.py", file=sys.stderr)
            return 1
        print(f"docs/api is up to date ({len(files)} pages)")
        return 0
    if args:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    for extra in sorted({p.name for p in OUT.glob("*.md")} - set(files)):
        (OUT / extra).unlink()
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} pages to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
