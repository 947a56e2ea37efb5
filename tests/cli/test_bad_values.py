"""Command lines that used to trace back or accept nonsense (issue 31 item 5): each ends in one line on stderr
that names the option, what was expected and the fix, and exit status 2."""

from __future__ import annotations

import importlib.util

import pytest

ENGINE_CLI = pytest.mark.skipif(importlib.util.find_spec("fi_engine.cli") is None, reason="no fi_engine.cli here")


def one_error_line(err: str) -> str:
    """The last line of ``err``, after checking that ``err`` holds no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


@ENGINE_CLI
@pytest.mark.parametrize("ids", ["1,,3", "1,2,", ",1", " , "])
def test_generate_prompt_ids_with_an_empty_item_is_a_usage_error(ids: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fi_engine.cli import main

    assert main(["generate", "--model", "/nonexistent", "--prompt-ids", ids, "--max-new-tokens", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--prompt-ids" in line and "token id" in line


@ENGINE_CLI
def test_generate_prompt_ids_still_take_spaces_around_the_commas(capsys: pytest.CaptureFixture[str]) -> None:
    from fi_engine.cli import _token_ids

    assert _token_ids("1, 2 ,3") == [1, 2, 3]
