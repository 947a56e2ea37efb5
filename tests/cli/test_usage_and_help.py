"""The CLI's surface (real CLI in subprocesses): every subcommand's --help has a description and examples,
tables have headers, reporting commands take --json, -q/-v work before or after the subcommand, the cache list
shows a wheelhouse stamp at its own size, and the progress bar keeps its line and its room at 120 columns."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import run_fi_ffi, subprocess_env

from fi_ffi import loader
from fi_ffi.loader import cache

# `generate` is answered by fi-engine, its help with it (tests/cli/test_generate_forwarder.py)
COMMANDS = ("doctor", "fetch", "cache", "lock", "list", "smoke", "launch")
WHEEL = "tiny-1.0+cu130-py3-none-manylinux_2_28_x86_64.whl"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_a_description_and_examples(command: str) -> None:
    done = run_fi_ffi(command, "--help")
    assert done.returncode == 0, done.stderr
    usage, description = done.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: fi-ffi {command}") and len(description.split()) >= 10
    examples = done.stdout.split("examples:\n", 1)[1]
    assert f"  fi-ffi {command}" in examples
    assert "fi-ffi generate" not in examples  # the deprecated spelling: examples run `fi-engine generate`
    assert "-q, --quiet" in done.stdout and "-v, --verbose" in done.stdout


SOME_COMMAND_LINES = [["doctor"], ["fetch"], ["cache", "list"], ["list"], ["smoke"], ["launch", "--nproc", "1"]]


@pytest.mark.parametrize("argv", SOME_COMMAND_LINES)
def test_an_unknown_option_shows_the_subcommands_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse hands a subcommand's unknown arguments back to the top-level parser, whose usage names none of the
    # subcommand's options: `fi-ffi fetch --bogus` printed `usage: fi-ffi [-h] [-q] [-v] [--version] COMMAND ...`
    from fi_ffi.cli.main import main

    assert main([*argv, "--bogus-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fi-ffi {argv[0]} "), err
    assert f"fi-ffi {argv[0]}: error: unrecognized arguments: --bogus-flag" in err


def test_lock_arguments_have_help_text() -> None:
    text = run_fi_ffi("lock", "--help").stdout
    assert re.search(r"WHEEL\s+wheel files \(\.whl\) to pin", text)
    assert re.search(r"--kind \{kernel,runtime\}\s+what the wheels hold", text)
    assert re.search(r"--url URL\s+http\(s\):// or file:// address", text)


@pytest.fixture
def cached(tmp_path: Path, make_wheel: Callable[..., Path]) -> dict[str, str]:
    """A cache holding one fetched wheel (its lock active), and the environment that selects them."""
    wheel = make_wheel(WHEEL, {"tiny/a.txt": b"abc" * 1000})
    lock = tmp_path / "tiny.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(wheel, kind="kernel")], header="test"))
    env = {"FI_FFI_CACHE_DIR": str(tmp_path / "cache"), "FI_FFI_LOCK": str(lock), "FI_FFI_WHEELHOUSE": ""}
    done = run_fi_ffi("fetch", "--json", "--wheel", str(wheel), **env)
    assert done.returncode == 0, done.stderr
    assert [Path(p).name for p in json.loads(done.stdout)] == [WHEEL]
    return {**env, "wheel": str(wheel)}


def test_cache_list_has_a_header_and_json(cached: dict[str, str]) -> None:
    env = {k: v for k, v in cached.items() if k != "wheel"}
    header, *rows = run_fi_ffi("cache", "list", **env).stdout.splitlines()
    assert header.split() == ["KIND", "SIZE", "PATH", "DETAIL"] and rows and rows[0].startswith("wheel")
    data = json.loads(run_fi_ffi("cache", "list", "--json", **env).stdout)
    assert data[0]["kind"] == "wheel" and data[0]["path"].endswith(WHEEL) and data[0]["size"] > 0
    assert json.loads(run_fi_ffi("cache", "path", "--json", **env).stdout) == {"path": env["FI_FFI_CACHE_DIR"]}


def test_cache_verify_and_clear_take_json(cached: dict[str, str]) -> None:
    env = {k: v for k, v in cached.items() if k != "wheel"}
    verify = run_fi_ffi("cache", "verify", "--full", "--json", **env)
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["checked"] >= 1 and report["bad"] == [] and report["read_only"] is False
    clear = run_fi_ffi("cache", "clear", "--json", **env)
    assert clear.returncode == 0, clear.stderr
    cleared = json.loads(clear.stdout)
    assert any(r["path"].endswith(WHEEL) for r in cleared["removed"]) and cleared["failed"] == []
    assert cleared["freed"] > 0


def test_a_wheelhouse_stamp_is_listed_at_its_own_size(tmp_path: Path, make_wheel: Callable[..., Path]) -> None:
    wheel = make_wheel(WHEEL, {"tiny/a.bin": random.Random(0).randbytes(1 << 20)}, tmp_path / "house")
    lock = tmp_path / "tiny.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(wheel, kind="kernel")], header="test"))
    env = {
        "FI_FFI_CACHE_DIR": str(tmp_path / "cache"),
        "FI_FFI_LOCK": str(lock),
        "FI_FFI_WHEELHOUSE": str(wheel.parent),
    }
    assert run_fi_ffi("fetch", **env).returncode == 0  # hashes the wheelhouse wheel, uses it in place, stamps it
    stamps = [e for e in json.loads(run_fi_ffi("cache", "list", "--json", **env).stdout) if e["kind"] == "stamp"]
    assert len(stamps) == 1 and stamps[0]["size"] == Path(stamps[0]["path"]).stat().st_size < 4096
    assert str(wheel) in stamps[0]["detail"]  # the wheel it vouches for, which stays in the wheelhouse
    assert "(1.0 MiB, kept there)" in stamps[0]["detail"]


def test_quiet_and_verbose(cached: dict[str, str]) -> None:
    env = {k: v for k, v in cached.items() if k != "wheel"}
    # the session sets FI_FFI_QUIET=1: without -v nothing is said; -v logs the copy, before or after the command
    assert "fi_ffi:" not in run_fi_ffi("cache", "clear", **env).stderr
    for args in (["-v", "fetch", "--wheel", cached["wheel"]], ["fetch", "--wheel", cached["wheel"], "-v"]):
        run_fi_ffi("cache", "clear", **env)
        done = run_fi_ffi(*args, **env)
        assert done.returncode == 0 and "fi_ffi: copied" in done.stderr, done.stderr
    run_fi_ffi("cache", "clear", **env)
    loud = run_fi_ffi("fetch", "--wheel", cached["wheel"], **{**env, "FI_FFI_QUIET": "0"})
    assert "fi_ffi: copied" in loud.stderr  # unconfigured logging: the progress line is printed
    run_fi_ffi("cache", "clear", **env)
    quiet = run_fi_ffi("-q", "fetch", "--wheel", cached["wheel"], **{**env, "FI_FFI_QUIET": "0"})
    assert quiet.returncode == 0 and "fi_ffi:" not in quiet.stderr


def test_the_progress_label_leaves_room_for_the_bar_at_120_columns() -> None:
    from tqdm import tqdm

    name = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl"
    for desc in (name, f"verifying {name}"):
        label = cache.progress_label(desc)
        assert len(label) <= cache.LABEL_WIDTH and "flashinfer_jit_cache 0.6.3" in label
        line = tqdm.format_meter(
            512 << 20, 1536 << 20, 30.0, ncols=120, prefix=label, unit="B", unit_scale=True, unit_divisor=1024
        )
        bar = line[line.index("|") + 1 : line.rindex("|")]
        assert len(line) <= 120 and len(bar) >= 40, line


TERMINAL = """
import io, re, sys
from fi_ffi.loader import cache, log


class Terminal(io.StringIO):
    def isatty(self):
        return True


sys.stderr = screen = Terminal()
with cache.progress(1000, "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl") as bar:
    bar.update(100)
    bar.refresh()
    log.announce("fetching flashinfer_jit_cache (1.2 GiB) from https://example.invalid/x.whl")
    bar.update(100)
sys.stdout.write(screen.getvalue())
"""


def test_a_log_line_during_a_progress_bar_gets_its_own_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TERMINAL],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(FI_FFI_QUIET="0"),
    )
    assert done.returncode == 0, done.stderr
    lines = re.split(r"[\r\n]", done.stdout)
    assert any(line.startswith("flashinfer_jit_cache 0.6.3:") for line in lines)  # the bar was drawn
    assert "fi_ffi: fetching flashinfer_jit_cache (1.2 GiB) from https://example.invalid/x.whl" in lines
