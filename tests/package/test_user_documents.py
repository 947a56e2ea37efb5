"""The user documents describe the product, not its history: README.md, CONTRIBUTING.md, docs/ (the API reference
included, generated from the docstrings) and the sources of both packages name no working session and no issue
number. Measurements carry their date and machine in benchmarks/RESULTS.md, the dated log, which keeps its history.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# "session 13", "sessions 9-10", "issue 32", "issue #21", "issue 32's goal"
HISTORY = re.compile(r"\b(?:sessions?|issues?) #?\d+", re.IGNORECASE)


def history_mentions(paths: list[Path]) -> list[str]:
    """``path:line: text`` for every line of ``paths`` that names a session or an issue by number."""
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
    return docs + sources


def test_no_user_document_names_a_session_or_an_issue() -> None:
    paths = user_documents()
    assert len(paths) > 150 and ROOT / "docs" / "engine.md" in paths
    assert history_mentions(paths) == []


def test_the_history_check_finds_what_it_looks_for(tmp_path: Path) -> None:  # the check above could fail
    doc = tmp_path / "probe.md"
    lines = ["measured in session 13", "issue 32's goal", "Issue #21", "sessions 9-10", "a session of 13 requests"]
    doc.write_text("\n".join(lines), encoding="utf-8")
    assert [m.split(": ", 1)[1] for m in history_mentions([doc])] == lines[:4]
