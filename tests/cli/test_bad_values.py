"""Command lines that used to trace back or accept nonsense: each ends in one line on stderr
that names the option, what was expected and the fix, and exit status 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def launch(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``fi-ffi launch ARGS`` in this process: its status and its one line on stderr."""
    from fi_ffi.cli import main

    status = main(["launch", *args])
    return status, one_error_line(capsys.readouterr().err)


def test_launch_master_addr_that_does_not_resolve_starts_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.comm import launch as launch_mod

    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("a rank was started"))
    status, line = launch("--nproc", "2", "--master-addr", "not.a.host.invalid", "--", "true", capsys=capsys)
    assert status == 2
    assert "--master-addr 'not.a.host.invalid'" in line and "127.0.0.1" in line


@pytest.mark.parametrize("gpus", [0, 2])
def test_launch_nproc_is_bounded_before_anything_starts(
    gpus: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.comm import cuda
    from fi_ffi.comm import launch as launch_mod

    monkeypatch.setattr(cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("a rank was started"))
    status, line = launch("--nproc", "100000", "--", "true", capsys=capsys)
    assert status == 2
    assert "--nproc 100000" in line and "--allow-oversubscribe" in line
    assert ("the 2 GPUs visible" if gpus else "4 per CPU core") in line


def test_launch_allow_oversubscribe_lifts_the_bound(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.comm import cuda
    from fi_ffi.comm import launch as launch_mod

    started: list[int] = []
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(launch_mod, "launch", lambda command, nproc, **k: started.append(nproc) or 0)
    from fi_ffi.cli import main

    assert main(["launch", "--nproc", "2", "--", "true"]) == 2
    assert main(["launch", "--allow-oversubscribe", "--nproc", "2", "--", "true"]) == 0
    assert main(["launch", "--nproc", "1", "--", "true"]) == 0
    assert started == [2, 1]


def test_launch_a_failed_fork_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.comm import launch as launch_mod

    def fork_fails(*args: object, **kwargs: object) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(launch_mod, "launch", fork_fails)
    status, line = launch("--allow-oversubscribe", "--nproc", "3", "--", "true", capsys=capsys)
    assert status == 2 and "could not start the ranks" in line


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "-3", "soon"])
def test_launch_grace_must_be_seconds_at_least_zero(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, line = launch("--nproc", "1", "--grace", value, "--", "true", capsys=capsys)
    assert status == 2
    assert "--grace" in line and "expected seconds >= 0" in line


def test_launch_grace_zero_is_accepted() -> None:
    from fi_ffi.cli.launch import grace

    assert grace("0") == 0.0 and grace("2.5") == 2.5 and grace("inf") == float("inf")


@pytest.mark.parametrize("dtype", ["fp32", "float32", "int32", "f64"])
def test_list_dtype_that_no_variant_has_is_a_usage_error(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fi_ffi.cli import main

    assert main(["list", "--dtype", dtype]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--dtype" in line and "no variant matches" not in line
    assert all(name in line for name in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"))


def test_list_q_dtypes_are_dtypes_a_variant_uri_can_name() -> None:
    pytest.importorskip("fi_ffi.ops.attention.variants")
    from fi_ffi.cli import listing
    from fi_ffi.ops.attention import variants

    uri = {d.name for d in variants._URI_DTYPES.values()}
    floats = {d for d in uri if d.startswith(("float", "bfloat"))}  # the rest are index and integer types
    assert set(listing._Q_DTYPES) == floats


def test_cache_list_full_lists_every_file_of_each_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.cli import main

    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "something_else"  # an entry fi_ffi did not create: listed as "other", a folder
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 1500)
    (folder / "sub" / "b.bin").write_bytes(b"y" * 7)
    assert main(["cache", "list"]) == 0
    short = capsys.readouterr().out
    assert main(["cache", "list", "--full"]) == 0
    full = capsys.readouterr().out
    assert short != full
    assert "a.bin" not in short and "1.5 KiB" in short
    assert f"1500 B    {folder / 'a.bin'}" in full and f"7 B    {folder / 'sub' / 'b.bin'}" in full
    assert "1507 B" in full  # the entry's own size in bytes too
    assert main(["cache", "list", "--json"]) == 0
    assert "files" not in json.loads(capsys.readouterr().out)[0]
    assert main(["cache", "list", "--full", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["files"] == [
        {"path": str(folder / "a.bin"), "size": 1500},
        {"path": str(folder / "sub" / "b.bin"), "size": 7},
    ]


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--json"], ["cache", "path"], ["--help"], ["list", "--help"]])
def test_output_that_cannot_be_written_is_one_line_and_exit_2(args: list[str]) -> None:
    import subprocess
    import sys

    from helpers.env import subprocess_env

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "fi_ffi", *args], stdout=full, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(), timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    command = "fi-ffi" if "--help" in args else f"fi-ffi {args[0]}"  # --help ends before a command is known
    assert line.startswith(f"{command}: cannot write the output to stdout") and len(done.stderr.splitlines()) == 1
