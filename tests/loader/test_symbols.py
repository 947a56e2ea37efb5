"""Kernel modules load RTLD_LAZY | RTLD_LOCAL, as TVM-FFI loads them, and the loader names the symbols a module
references that nothing provides (fi_ffi.loader.symbols): in a debug log line, ``loader.symbol_checks()``,
``fi-ffi doctor`` (text and ``--json``) and ``fi-ffi list --json``.

The case that matters: FlashInfer 0.7.2's FA2 batch prefill module references eight
``BatchPrefillWith{Ragged,Paged}KVCacheDispatched<32u, ...>`` instantiations its own build never compiles. With
``RTLD_NOW`` it does not load at all (shown below in a fresh process); lazily it loads, answers with its
signatures (tests/launch/test_declarations.py binds every declaration to it) and the eight names are reported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.attention_plans import PREFILL_URI
from helpers.env import subprocess_env

from fi_ffi import loader
from fi_ffi.loader import dl, elf, symbols

FA2_072 = PREFILL_URI + "_kv_stride_equal"
FA3_072 = PREFILL_URI + "_sm90"
# The eight names: <32u (CTA tile), 128, 128, PosEncodingMode 0, false, MaskMode 0..3, ...>, ragged and paged
MISSING = re.compile(
    r"_ZN10flashinfer(?:39BatchPrefillWithRaggedKVCacheDispatchedI|38BatchPrefillWithPagedKVCacheDispatchedILb1E)"
    r"Lj32ELj128ELj128ELNS_15PosEncodingModeE0ELb0ELNS_8MaskModeE([0-3])E.*"
)


def assert_the_eight(names: list[str] | tuple[str, ...]) -> None:
    assert len(names) == 8 and list(names) == sorted(names), names
    kinds = sorted((("Ragged" in n), MISSING.fullmatch(n).group(1)) for n in names)  # type: ignore[union-attr]
    assert kinds == sorted((ragged, mode) for ragged in (False, True) for mode in "0123"), names


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env(**env)
    )


def test_the_072_fa2_prefill_module_loads_and_its_eight_missing_symbols_are_named(release_072: list[str]) -> None:
    path = loader.module_path(FA2_072)
    assert_the_eight([n for n in elf.imports(path).undefined if "Dispatched" in n])
    handle = loader.load_module(FA2_072)  # RTLD_NOW refused this module (see the next test)
    assert dl.symbol_address(handle, "__tvm_ffi_paged_run") and dl.symbol_address(handle, "__tvm_ffi_plan")
    checks = loader.symbol_checks(on_disk=False)
    check = checks[FA2_072]
    assert check.path == str(path) and check.loaded and not check.ok
    assert_the_eight(check.unresolved)
    assert check.missing_libraries == () and check.error == ""
    assert "8 undefined symbol(s) that nothing provides (calling code that needs one aborts the process)" in (
        check.summary()
    )
    for uri in release_072:  # every other module of the wheel: nothing missing
        loader.load_module(uri)
    checks = loader.symbol_checks(on_disk=False)
    assert {uri for uri in release_072 if not checks[uri].ok} == {FA2_072}
    assert checks[FA3_072] == symbols.SymbolCheck(str(loader.module_path(FA3_072)), loaded=True)


def test_a_fresh_process_logs_the_missing_symbols_where_rtld_now_refuses_the_module(release_072: list[str]) -> None:
    path = loader.module_path(FA2_072)
    done = run(
        "import logging, json, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
        "from fi_ffi import loader\n"
        "from fi_ffi.loader import libraries\n"
        "from fi_ffi.errors import LibraryLoadError\n"
        "try:\n"
        f"    libraries.load_library({str(path)!r})\n"  # RTLD_NOW, as fi_ffi loaded modules before
        "    now = ''\n"
        "except LibraryLoadError as exc:\n"
        "    now = str(exc)\n"
        f"loader.load_module({FA2_072!r})\n"
        f"check = loader.symbol_checks(on_disk=False)[{FA2_072!r}]\n"
        "print(json.dumps({'now': now, 'unresolved': list(check.unresolved)}))"
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "undefined symbol: _ZN10flashinfer" in out["now"] and "KVCacheDispatched" in out["now"]
    assert_the_eight(out["unresolved"])
    logged = [line for line in done.stderr.splitlines() if line.startswith(f"DEBUG:fi_ffi.loader:module {FA2_072} (")]
    assert len(logged) == 1 and "8 undefined symbol(s) that nothing provides" in logged[0]
    assert all(name in logged[0] for name in out["unresolved"])


def test_the_checks_of_files_on_disk_match_the_checks_of_loaded_modules(release_072: list[str]) -> None:
    for uri in release_072:
        path = loader.module_path(uri)
        on_disk = symbols.check_file(path)
        assert on_disk.loaded is False and on_disk.missing_libraries == ()
        assert on_disk.unresolved == symbols.check_loaded(path, loader.load_module(uri)).unresolved, uri


def test_doctor_and_list_json_report_the_072_fa2_module(
    release_072: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a cache holding the FA2 module only: nothing else is on disk, and the CLI loads and extracts nothing
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path / "cache"))
    loader.module_path(FA2_072)
    env = {"FI_FFI_QUIET": "1"}
    doctor = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "doctor", "--json"], capture_output=True, text=True, env=subprocess_env(**env)
    )
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)["module_symbols"]
    assert report["error"] == "" and set(report["modules"]) == {FA2_072}
    entry = report["modules"][FA2_072]
    assert entry["loaded"] is False and entry["missing_libraries"] == [] and entry["error"] == ""
    assert_the_eight(entry["unresolved"])

    text = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "doctor"], capture_output=True, text=True, env=subprocess_env(**env)
    ).stdout
    assert "Module symbols: 1 kernel modules checked (loaded or on disk): 1 of them reference symbols" in text
    assert f"  {FA2_072}:\n    8 undefined symbols nothing provides" in text
    assert all(f"      {name}\n" in text for name in entry["unresolved"])

    def listed() -> dict[str, list[str] | None]:
        done = subprocess.run(
            [sys.executable, "-m", "fi_ffi", "list", "--json", "--kind", "batch_prefill"],
            capture_output=True,
            text=True,
            env=subprocess_env(**env),
        )
        assert done.returncode == 0, done.stderr
        return {row["uri"]: row["unresolved_symbols"] for row in json.loads(done.stdout)}

    rows = listed()
    assert_the_eight(rows[FA2_072])  # type: ignore[arg-type]
    assert rows[FA3_072] is None  # not on disk: not checked
    loader.module_path(FA3_072)
    rows = listed()
    assert rows[FA3_072] == [] and len(rows[FA2_072] or ()) == 8


def test_doctor_says_why_symbols_were_not_checked(tmp_path: Path) -> None:
    bad = tmp_path / "broken.lock"
    bad.write_text("this is not a lock")
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(FI_FFI_LOCK=str(bad)),
    )
    assert done.returncode == 0
    report = json.loads(done.stdout)["module_symbols"]
    assert report["modules"] == {} and str(bad) in report["error"]
