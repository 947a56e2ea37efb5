"""The user documents describe the product, not its history: README.md, CONTRIBUTING.md, docs/ (the API reference
included, generated from the docstrings), the sources of both packages, benchmarks/ (its README.md, RESULTS.md and
scripts), tools/ and the tests name no working session and no issue number, and no machine as lent to whoever wrote
a passage or as a team's. Measurements carry their date and machine in benchmarks/RESULTS.md, the dated log: each
entry says when and on what it was measured, and names no session or issue.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# "session 13", "sessions 9-10", "issue 32", "issue #21", "issue 32's goal"; "no 2-GPU machine was lent", "the
# machine as lent" (which machines the writer had, not what was measured on which); "the team's GPU machine"
HISTORY = re.compile(r"\b(?:sessions?|issues?) #?\d+|\blent\b|\bthe team's\b", re.IGNORECASE)


def history_mentions(paths: list[Path]) -> list[str]:
    """``path:line: text`` for every line of ``paths`` that names a session or an issue by number, a machine as lent
    or a team's."""
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{number}: {line.strip()[:100]}")
    return found


def user_documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    sources = [p for package in ("fi_ffi", "fi_engine") for p in sorted((ROOT / package).rglob("*.py"))]
    benchmarks = [*sorted((ROOT / "benchmarks").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    tools = sorted((ROOT / "tools").glob("*.py"))
    # not this file: its examples and probes name sessions and issues on purpose, to show the check finds them
    tests = [p for p in sorted((ROOT / "tests").rglob("*.py")) if p != Path(__file__).resolve()]
    return docs + sources + benchmarks + tools + tests


def test_no_user_document_names_a_session_or_an_issue() -> None:
    paths = user_documents()
    assert len(paths) > 150 and ROOT / "docs" / "engine.md" in paths
    assert ROOT / "benchmarks" / "RESULTS.md" in paths and Path(__file__).resolve() not in paths
    assert history_mentions(paths) == []


def test_the_history_check_finds_what_it_looks_for(tmp_path: Path) -> None:  # the check above could fail
    doc = tmp_path / "probe.md"
    lines = [
        "measured in session 13",
        "issue 32's goal",
        "Issue #21",
        "sessions 9-10",
        "no 4-GPU machine was lent",
        "On the team's GPU machine",
        "a session of 13 requests",
        "an equivalent machine",
        "the team of ranks",
    ]
    doc.write_text("\n".join(lines), encoding="utf-8")
    assert [m.split(": ", 1)[1] for m in history_mentions([doc])] == lines[:6]


# `fi_ffi.sampling_release()`, `fi_engine.models.registry.read_config`: a dotted name of either package, in backticks
DOTTED_NAME = re.compile(r"`((?:fi_ffi|fi_engine)(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")


def dotted_names_missing(paths: list[Path]) -> list[str]:
    """``path: name`` for every backticked ``fi_ffi.``/``fi_engine.`` name in ``paths`` that does not resolve (the
    longest importable module prefix, then attributes)."""
    import importlib
    import warnings

    def resolves(dotted: str) -> bool:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                with warnings.catch_warnings():  # an old module path the docs name on purpose still resolves
                    warnings.simplefilter("ignore", DeprecationWarning)
                    obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                if not hasattr(obj, part):
                    return False
                obj = getattr(obj, part)
            return True
        return False

    return [
        f"{path.name}: {m.group(1)}"
        for path in paths
        for m in DOTTED_NAME.finditer(path.read_text(encoding="utf-8"))
        if not resolves(m.group(1))
    ]


def test_every_name_the_documents_give_exists() -> None:
    # docs/ops.md named fi_ffi.ops.sampling.release() after it became fi_ffi.sampling_release()
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert dotted_names_missing(docs) == []


def test_the_name_check_finds_a_stale_name(tmp_path: Path) -> None:  # the check above could fail
    doc = tmp_path / "probe.md"
    doc.write_text("`fi_ffi.sampling_release()`, `fi_ffi.ops.sampling.release()`, `fi_engine.cli.main`\n")
    assert dotted_names_missing([doc]) == ["probe.md: fi_ffi.ops.sampling.release"]
