"""The ``fi-ffi`` command, run as a real subprocess (``python -m fi_ffi``) on this CPU-only machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import run_fi_ffi, subprocess_env


def test_doctor_reports_and_exits_zero_without_a_gpu(shared_wheel: Path) -> None:
    done = run_fi_ffi("doctor")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for label in ("NVIDIA driver:", "CUDA runtime:", "Lock:", "selection:", "TVM-FFI:", "Cache:"):
        assert label in out
    assert "GPUs:           none" in out or "GPU 0:" in out
    assert shared_wheel.name in out  # the session lock pins the shared wheel


def test_doctor_json_is_machine_readable(shared_wheel: Path) -> None:
    done = run_fi_ffi("doctor", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["system"]["arch"]
    assert data["lock"]["entries"][0]["filename"] == shared_wheel.name
    assert data["lock"]["cuda"].startswith("13.")
    assert data["tvm_ffi_runtime"]["source"] in ("loaded", "package", "lock", "env")


def test_doctor_names_a_broken_lock_and_still_exits_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("version = 7\n")
    done = run_fi_ffi("doctor", FI_FFI_LOCK=str(bad))
    assert done.returncode == 0
    assert "version" in done.stdout and str(bad) in done.stdout


@pytest.mark.cpu_only
def test_smoke_without_a_gpu_says_so_and_fails() -> None:
    done = run_fi_ffi("smoke")
    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stdout
    assert "Lock:" in done.stdout  # followed by the doctor summary


def test_lock_then_fetch_then_cache_cycle(shared_wheel: Path, tmp_path: Path) -> None:
    lock = tmp_path / "mine.lock"
    done = run_fi_ffi("lock", str(shared_wheel))
    assert done.returncode == 0, done.stderr
    assert "865dd2def285393e98953a8a6e49ab785df2ec3b59e3bd778cd924a8da5d5d50" in done.stdout
    lock.write_text(done.stdout)
    cache = tmp_path / "cache"
    env = {"FI_FFI_LOCK": str(lock), "FI_FFI_CACHE_DIR": str(cache), "FI_FFI_WHEELHOUSE": str(tmp_path / "none")}
    fetched = run_fi_ffi("fetch", "--wheel", str(shared_wheel), **env)
    assert fetched.returncode == 0, fetched.stderr
    assert Path(fetched.stdout.strip().splitlines()[-1]).is_file()
    assert run_fi_ffi("cache", "path", **env).stdout.strip() == str(cache)
    listing = run_fi_ffi("cache", "list", **env)
    assert shared_wheel.name in listing.stdout
    verify = run_fi_ffi("cache", "verify", "--full", **env)
    assert verify.returncode == 0 and "0 bad" in verify.stdout
    cleared = run_fi_ffi("cache", "clear", **env)
    assert cleared.returncode == 0 and list(cache.iterdir()) == []  # FI_FFI_CACHE_DIR itself is the user's
    assert f"removed {cache / 'wheels'}" in cleared.stdout and shared_wheel.name in cleared.stdout


def test_fetch_offline_with_nothing_available_names_the_fix(tmp_path: Path) -> None:
    done = run_fi_ffi(
        "fetch", FI_FFI_LOCK="", FI_FFI_CACHE_DIR=str(tmp_path / "c"), FI_FFI_OFFLINE="1", FI_FFI_WHEELHOUSE=""
    )
    assert done.returncode == 2
    assert "flashinfer_jit_cache-0.6.3+cu130" in done.stderr
    assert "FI_FFI_WHEELHOUSE" in done.stderr or "fetch --wheel" in done.stderr


def test_fetch_rejects_a_wheel_the_lock_does_not_pin(tmp_path: Path) -> None:
    stray = tmp_path / "other-1.0-py3-none-any.whl"
    stray.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    done = run_fi_ffi("fetch", "--wheel", str(stray), FI_FFI_CACHE_DIR=str(tmp_path / "c"))
    assert done.returncode == 2
    assert stray.name in done.stderr
    assert f"`fi-ffi lock {stray}`" in done.stderr  # a wheel: a lock of one's own can pin it


@pytest.mark.parametrize("given", ["config.json", "folder"])
def test_fetch_wheel_of_what_is_not_a_wheel_says_what_it_expects(tmp_path: Path, given: str) -> None:
    # it suggested `fi-ffi lock some/config.json`, which then failed: lock pins wheel files only
    path = tmp_path / given
    if given == "folder":
        path.mkdir()
    else:
        path.write_text("{}")
    done = run_fi_ffi("fetch", "--wheel", str(path), FI_FFI_CACHE_DIR=str(tmp_path / "c"), FI_FFI_LOCK="")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    what = "is a folder, not a wheel file" if given == "folder" else "is not a wheel file"
    assert done.stderr.startswith(f"fi-ffi fetch: {path} {what}"), done.stderr
    assert "expected a wheel the lock" in done.stderr and "pins, such as flashinfer_jit_cache-" in done.stderr
    assert "fi-ffi lock" not in done.stderr


def test_list_prints_the_variants_of_the_active_lock(kernel_modules: list[str]) -> None:
    pytest.importorskip("fi_ffi.ops.attention.variants")
    done = run_fi_ffi("list", "--kind", "batch_decode", "--dtype", "f16")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.strip().splitlines()
    assert header.split() == ["KIND", "BACKEND", "DTYPES", "HEAD_DIM", "RELEASE", "MODULE"]
    assert lines and all("batch_decode" in line and "f16" in line for line in lines)
    assert all(line.index("batch_decode_with") == header.index("MODULE") for line in lines)  # columns line up
    none = run_fi_ffi("list", "--head-dim", "96")
    assert none.returncode == 1


def test_version_and_help() -> None:
    assert run_fi_ffi("--version").stdout.startswith("fi-ffi ")
    helptext = run_fi_ffi("--help").stdout
    for command in ("doctor", "fetch", "cache", "lock", "list", "smoke"):
        assert command in helptext


# ---- bad arguments: a usage message and exit 2, never a traceback ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--kind", "nope"],
        ["list", "--dtype", "fp12"],
        ["list", "--dtype", ""],
        ["list", "--head-dim", "-3"],
        ["list", "--head-dim", "x"],
        ["smoke", "--device", "-1"],
        ["smoke", "--device", "one"],
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    done = run_fi_ffi(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"error: argument --{args[1][2:]}" in done.stderr


def test_list_kinds_are_the_variant_kinds() -> None:
    from fi_ffi.cli import listing
    from fi_ffi.ops.attention import variants

    assert (*variants.ALL_KINDS, "prefill", "decode", "mla") == listing.LIST_KINDS


def test_list_takes_the_dtype_spellings_its_help_names(kernel_modules: list[str]) -> None:
    outputs = {
        name: run_fi_ffi("list", "--kind", "batch_decode", "--dtype", name) for name in ("f16", "fp16", "float16")
    }
    for name, done in outputs.items():
        assert done.returncode == 0, (name, done.stderr)
    assert outputs["f16"].stdout == outputs["fp16"].stdout == outputs["float16"].stdout
    assert "f16" in outputs["fp16"].stdout
    helptext = run_fi_ffi("list", "--help").stdout
    assert "f16" in helptext and "fp16" in helptext and "bf16" in helptext


def test_smoke_device_is_checked_against_the_visible_gpus() -> None:
    from fi_ffi.cli import smoke
    from fi_ffi.cuda.system import GPU

    h100 = GPU(0, "NVIDIA H100", (9, 0), 80 * 2**30)
    smoke.check_ordinal(0, [h100])
    with pytest.raises(ValueError, match=r"--device 1: no such CUDA device; this machine has 1 visible \(ordinals 0"):
        smoke.check_ordinal(1, [h100])
    with pytest.raises(ValueError, match=r"--device 0: .* has 0 visible \(none"):
        smoke.check_ordinal(0, [])
    with pytest.raises(ValueError, match="--device: expected a CUDA device ordinal"):
        smoke.check_ordinal(True, [h100])  # type: ignore[arg-type]


@pytest.mark.cpu_only
def test_smoke_run_checks_the_ordinal_before_touching_the_device() -> None:
    from fi_ffi.cli import smoke

    with pytest.raises(ValueError, match="--device 3: no such CUDA device"):
        smoke.run(3)


# ---- output piped into a reader that stops early -------------------------------------------------------------


def closed_pipe_run(*args: str) -> tuple[int, str]:
    """Run ``fi-ffi args`` with stdout a pipe whose reader is already gone; returns (exit status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child starts: its first write to stdout gets EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fi_ffi", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=subprocess_env(),
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["doctor"],
        ["doctor", "--json"],
        ["cache", "path"],
        ["cache", "list"],
        ["--help"],
        ["--version"],
        ["list", "--help"],
    ],
)
def test_a_closed_output_pipe_ends_quietly(args: list[str]) -> None:
    status, stderr = closed_pipe_run(*args)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr
    assert status in (0, 141)  # 0 when the text fit into the pipe before the reader left (--version)


def test_a_closed_output_pipe_ends_list_and_lock_quietly(kernel_modules: list[str], shared_wheel: Path) -> None:
    for args in (["list"], ["lock", str(shared_wheel)]):
        status, stderr = closed_pipe_run(*args)
        assert status == 141, stderr
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


# ---- doctor: say where things come from ------------------------------------------------------------------------


def doctor_json(**env: str) -> dict:
    done = run_fi_ffi("doctor", "--json", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_doctor_calls_a_wheelhouse_wheel_available_not_missing(
    shared_wheel: Path, shared_wheel_lock: Path, tmp_path: Path
) -> None:
    env = {
        "FI_FFI_LOCK": str(shared_wheel_lock),
        "FI_FFI_WHEELHOUSE": str(shared_wheel.parent),
        "FI_FFI_CACHE_DIR": str(tmp_path / "cache"),
    }
    entry = doctor_json(**env)["lock"]["entries"][0]
    assert (entry["status"], entry["path"], entry["verified"]) == ("wheelhouse", str(shared_wheel), False)
    text = run_fi_ffi("doctor", **env).stdout
    assert f"{shared_wheel.name}: available (wheelhouse: {shared_wheel}; sha256 checked on first use)" in text
    assert run_fi_ffi("fetch", **env).returncode == 0  # uses it in place, verifies and stamps it
    entry = doctor_json(**env)["lock"]["entries"][0]
    assert (entry["status"], entry["verified"]) == ("wheelhouse", True)
    assert "(wheelhouse" in run_fi_ffi("doctor", **env).stdout and "missing" not in run_fi_ffi("doctor", **env).stdout


def test_doctor_says_where_a_wheel_would_come_from_when_absent(tmp_path: Path) -> None:
    env = {"FI_FFI_LOCK": "", "FI_FFI_WHEELHOUSE": "", "FI_FFI_CACHE_DIR": str(tmp_path / "cache")}
    online = doctor_json(FI_FFI_OFFLINE="", **env)["lock"]["entries"][0]
    assert online["status"] == "download" and online["source"].startswith("https://")
    offline = doctor_json(FI_FFI_OFFLINE="1", **env)["lock"]["entries"][0]
    assert offline["status"] == "missing" and "FI_FFI_OFFLINE" in offline["source"]


def test_doctor_reports_a_cuda_version_override_as_an_override() -> None:
    from fi_ffi import loader
    from fi_ffi.cuda import system

    library = system.cudart_version(loader.ensure_cudart())
    override = "13.1" if library != "13.1" else "13.0"
    data = doctor_json(FI_FFI_CUDA_VERSION=override)
    assert data["system"]["runtime_version"] == library  # the library's own answer, beside its path
    assert data["system"]["cuda_version_override"] == override
    assert data["lock"]["cuda"] == override and data["lock"]["cuda_source"] == "FI_FFI_CUDA_VERSION"
    lines = run_fi_ffi("doctor", FI_FFI_CUDA_VERSION=override).stdout.splitlines()
    runtime = next(line for line in lines if line.startswith("CUDA runtime:"))
    assert runtime.split()[2] == library and "libcudart" in runtime
    assert any(line.strip().startswith(f"override:     FI_FFI_CUDA_VERSION={override}") for line in lines)


def test_doctor_flags_a_runtime_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "libtvm_ffi.so"
    data = doctor_json(FI_FFI_RUNTIME=str(missing))
    assert data["tvm_ffi_runtime"]["source"] == "env"
    assert str(missing) in data["tvm_ffi_runtime"]["problem"] and "FI_FFI_RUNTIME" in data["tvm_ffi_runtime"]["problem"]
    assert "PROBLEM:" in run_fi_ffi("doctor", FI_FFI_RUNTIME=str(missing)).stdout
    assert doctor_json(FI_FFI_RUNTIME="auto")["tvm_ffi_runtime"]["problem"] == ""


def test_doctor_lists_the_fi_ffi_variables_set_and_flags_unknown_ones() -> None:
    data = doctor_json(FI_FFI_OFLINE="1", FI_FFI_SM="90a")
    rows = {row["name"]: row for row in data["settings"]}
    assert rows["FI_FFI_SM"] == {"name": "FI_FFI_SM", "value": "90a", "note": ""}
    assert "typo" in rows["FI_FFI_OFLINE"]["note"]
    assert rows["FI_FFI_QUIET"]["value"] == "1"  # set by the test session
    text = run_fi_ffi("doctor", FI_FFI_OFLINE="1").stdout
    assert (
        "  FI_FFI_OFLINE=1   <- FI_FFI_OFLINE: not a variable fi_ffi reads, a typo? (did you mean FI_FFI_OFFLINE?)"
        in text
    )


def test_doctor_says_which_file_each_lock_section_came_from(shared_wheel_lock: Path) -> None:
    from fi_ffi.loader import lockfile

    data = doctor_json(FI_FFI_LOCK=str(shared_wheel_lock))  # the test lock pins a kernel wheel only
    sections = data["lock"]["sections"]
    assert sections["kernel"] == str(shared_wheel_lock)
    assert sections["runtime"] == str(lockfile.default_lock_path())
    text = run_fi_ffi("doctor", FI_FFI_LOCK=str(shared_wheel_lock)).stdout
    assert f"  [[kernel]]:   {shared_wheel_lock}\n" in text
    assert f"  [[runtime]]:  {lockfile.default_lock_path()} (the packaged lock" in text


def test_gpu_coverage_by_the_wheels_gpu_archs(shared_wheel: Path) -> None:
    from fi_ffi.cli import doctor
    from fi_ffi.cuda.system import GPU
    from fi_ffi.loader import lockfile

    gpus = [
        GPU(0, "H100", (9, 0), 0),
        GPU(1, "A100", (8, 0), 0),
        GPU(2, "RTX 4090", (8, 9), 0),
        GPU(3, "B300", (10, 3), 0),
    ]
    labelled = lockfile.lock_entry(shared_wheel)  # ...+cu130.sm90a...: sm taken from the file name
    assert doctor.wheel_sm(labelled) == ("90a",)
    rows = doctor.gpu_coverage(gpus, [labelled])
    assert [r["covered"] for r in rows] == [True, False, False, False]
    assert rows[0]["wheels"] == [shared_wheel.name] and rows[0]["capability"] == "9.0"
    assert "NOT covered" in rows[1]["detail"] and "sm 90a only" in rows[1]["detail"] and "sm 80" in rows[1]["detail"]

    def pin(name: str, sm: tuple[str, ...] = ()) -> lockfile.WheelPin:
        return lockfile.WheelPin("kernel", name, "0" * 64, "x86_64", Path("x.lock"), cuda="13.0", sm=sm)

    family = [pin("k-1+cu130-cp39-abi3-linux_x86_64.whl", ("80", "100f"))]
    assert [r["covered"] for r in doctor.gpu_coverage(gpus, family)] == [False, True, True, True]
    upstream = [pin("flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl")]
    rows = doctor.gpu_coverage(gpus, upstream)
    assert [r["covered"] for r in rows] == [None] * 4 and "names no GPU archs" in rows[0]["detail"]


def test_doctor_reports_coverage_for_each_visible_gpu(shared_wheel: Path) -> None:
    data = doctor_json()
    assert [row["ordinal"] for row in data["gpu_coverage"]] == [g["ordinal"] for g in data["system"]["gpus"]]
