"""``fi-ffi generate`` forwards to ``fi-engine generate``: one deprecation line on stderr, then the engine's own
command in a child process with the same arguments, stdin, stdout and stderr, and its exit status; without the
engine, one line naming the extra and exit 2. The forwarding itself is checked against a stand-in child (a
Python one-liner that echoes what it was given), the whole path against the real ``python -m fi_engine``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from helpers.env import subprocess_env

from fi_ffi.cli import generate, main

ENGINE_CLI = pytest.mark.skipif(
    importlib.util.find_spec("fi_engine.cli") is None,
    reason="fi_engine.cli (the engine's own `generate`, h-engine's branch) is not in this checkout yet",
)

# A child that shows what it was given: its arguments and stdin on stdout, a mark on stderr, and status 3.
ECHO = "import sys; print(sys.argv[1:], sys.stdin.read().upper()); print('child stderr', file=sys.stderr); sys.exit(3)"


def run_forwarder(child: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``fi-ffi generate ARGS`` in a fresh interpreter whose engine command is ``python -c CHILD``."""
    code = textwrap.dedent(f"""
        import sys
        from fi_ffi.cli import generate, main
        generate.engine_command = lambda arguments: [sys.executable, "-c", {child!r}, *arguments]
        sys.exit(main(["generate", *sys.argv[1:]]))
    """)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )


def test_the_engine_command_is_this_interpreter_running_fi_engine_generate() -> None:
    assert generate.engine_command(["--model", "m", "--help"]) == [
        sys.executable,
        "-m",
        "fi_engine",
        "generate",
        "--model",
        "m",
        "--help",
    ]


def test_arguments_stdin_stdout_stderr_and_status_pass_through() -> None:
    # options the forwarder does not know, --help and a `--` included, reach the child as given
    done = run_forwarder(ECHO, "--model", "m", "--help", "-q", "--", "x", stdin="piped in")
    assert done.returncode == 3
    assert done.stdout == "['--model', 'm', '--help', '-q', '--', 'x'] PIPED IN\n"
    assert done.stderr == f"{generate.NOTICE}\nchild stderr\n"  # the notice first, once


def test_a_child_ended_by_a_signal_exits_as_a_shell_reports_it() -> None:
    done = run_forwarder("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert done.returncode == 128 + 15


def test_in_process_callers_that_replaced_stdout_get_the_childs_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pytest's capsys, like io.StringIO, has no file descriptor: the child's output is copied into it
    monkeypatch.setattr(generate, "engine_command", lambda arguments: [sys.executable, "-c", ECHO, *arguments])
    assert main(["generate", "--top-k", "2"]) == 3
    out, err = capsys.readouterr()
    assert out == "['--top-k', '2'] \n" and err == f"{generate.NOTICE}\nchild stderr\n"


def test_without_the_engine_one_line_names_the_extra_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fi_engine", None)  # importlib.util.find_spec("fi_engine") is None now
    assert importlib.util.find_spec("fi_engine") is None
    assert main(["generate", "--model", "m", "--prompt-ids", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"{generate.NOT_INSTALLED}\n"
    # the extra as a checkout installs it (fi-ffi is on no index: tests/package/test_first_use.py)
    assert "pip install '.[engine]'" in err and "fi-engine generate" in err


def test_the_top_level_help_lists_generate_as_moved() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "--help"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 0 and "generate" in done.stdout and "fi-engine generate" in done.stdout


def engine_and_forwarder(*args: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``python -m fi_engine generate ARGS`` and ``python -m fi_ffi generate ARGS``, each in a subprocess."""
    runs = [
        subprocess.run(
            [sys.executable, "-m", package, "generate", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(),
        )
        for package in ("fi_engine", "fi_ffi")
    ]
    return runs[0], runs[1]


@ENGINE_CLI
def test_help_is_the_engines_help() -> None:
    engine, forwarded = engine_and_forwarder("--help")
    assert engine.returncode == 0, engine.stderr
    assert "--model" in engine.stdout and "--prompt-ids" in engine.stdout
    assert (forwarded.returncode, forwarded.stdout) == (0, engine.stdout)
    assert forwarded.stderr == f"{generate.NOTICE}\n{engine.stderr}"


@ENGINE_CLI
@pytest.mark.parametrize(
    "args",
    [
        ("--model", "m", "--prompt-ids", "1,x"),  # a usage error of the engine's parser
        ("--model", "/nonexistent/fi-ffi-checkpoint", "--prompt-ids", "1,2,3"),  # no checkpoint there
    ],
)
def test_errors_and_status_are_the_engines(args: tuple[str, ...]) -> None:
    engine, forwarded = engine_and_forwarder(*args)
    assert engine.returncode == 2, engine.stderr  # one message, no traceback (the engine's contract)
    assert "Traceback" not in engine.stderr
    assert (forwarded.returncode, forwarded.stdout) == (engine.returncode, engine.stdout)
    assert forwarded.stderr == f"{generate.NOTICE}\n{engine.stderr}"
