"""Loading: libtvm_ffi.so (one copy per process), libcudart, the 21 kernel modules, and clear dlopen errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.wheels import WheelEnv

from fi_ffi import loader
from fi_ffi.abi.cdefs import get_ffi
from fi_ffi.errors import LibraryLoadError, LoaderError
from fi_ffi.loader import dl, libraries

# Entry points each module family exports (ABI.md B).
SYMBOLS = {
    "norm": ["rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "layernorm"],
    "page": ["append_paged_kv_cache", "append_paged_mla_kv_cache"],
    "gdn_prefill_sm90": ["gdn_prefill"],
    "single_prefill": ["run"],
    "batch_prefill": ["plan", "ragged_run", "paged_run"],
    "single_decode": ["run"],
    "batch_decode": ["plan", "run"],
}


def symbols_for(uri: str) -> list[str]:
    return next(v for k, v in SYMBOLS.items() if uri == k or uri.startswith(k + "_with"))


def run_python(code: str, **env: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(**env), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def edited_module(shared_wheel: Path, tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A copy of norm.so with every occurrence of ``old`` replaced by ``new`` (same length)."""
    assert len(old) == len(new)
    with zipfile.ZipFile(shared_wheel) as zf:
        data = zf.read("flashinfer_jit_cache/jit_cache/norm/norm.so")
    assert old in data
    out = tmp_path / "edited" / "norm.so"
    out.parent.mkdir()
    out.write_bytes(data.replace(old, new))
    return out


# ---------------------------------------------------------------------------------------- TVM-FFI runtime


def test_runtime_library_loads_once_and_answers_its_version() -> None:
    path = loader.runtime_library()
    assert os.path.basename(path) == "libtvm_ffi.so"
    assert loader.runtime_library() == path
    ffi = get_ffi()
    lib = ffi.dlopen(path)
    version = ffi.new("TVMFFIVersion*")
    lib.TVMFFIGetVersion(version)
    assert (version.major, version.minor) == (0, 1)
    info = loader.runtime_info()
    assert info.version == f"{version.major}.{version.minor}.{version.patch}"
    assert info.source in ("loaded", "package", "lock", "env") and info.reason
    assert dl.loaded_paths("libtvm_ffi.so") == [os.path.realpath(path)]


def test_installed_package_runtime_is_the_one_tvm_ffi_imports() -> None:
    path, why = libraries.package_runtime()
    if path is None:
        pytest.skip(why)
    assert "apache-tvm-ffi 0.1." in why
    result = run_python(
        "import json; from fi_ffi import loader; from fi_ffi.loader import dl\n"
        "info = loader.runtime_info()\n"
        "import tvm_ffi\n"
        "print(json.dumps({'source': info.source, 'path': info.path, 'maps': dl.loaded_paths('libtvm_ffi.so')}))",
        FI_FFI_RUNTIME="auto",
    )
    assert result["source"] == "package" and result["path"] == path
    assert result["maps"] == [os.path.realpath(path)]  # `import tvm_ffi` mapped no second copy


def test_a_copy_loaded_first_by_tvm_ffi_is_reused_and_a_conflicting_choice_refused() -> None:
    if libraries.package_runtime()[0] is None:
        pytest.skip("apache-tvm-ffi is not installed")
    code = (
        "import json, tvm_ffi; from fi_ffi import loader; from fi_ffi.loader import dl\n"
        "from fi_ffi.errors import LoaderError\n"
        "try:\n"
        "    info = loader.runtime_info(); out = {'source': info.source, 'path': info.path}\n"
        "except LoaderError as e:\n"
        "    out = {'error': str(e)}\n"
        "out['maps'] = dl.loaded_paths('libtvm_ffi.so')\n"
        "print(json.dumps(out))"
    )
    reused = run_python(code, FI_FFI_RUNTIME="auto")
    assert reused["source"] == "loaded" and reused["maps"] == [reused["path"]]
    refused = run_python(code, FI_FFI_RUNTIME="lock")
    assert "already loaded" in str(refused["error"]) and "abort" in str(refused["error"])
    assert len(refused["maps"]) == 1  # type: ignore[arg-type]


def test_runtime_extracted_from_the_locks_wheel_loads_and_serves_the_modules(
    shared_wheel: Path, tvm_ffi_runtime_wheel: Path, tmp_path: Path
) -> None:
    lock = tmp_path / "full.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(shared_wheel), loader.lock_entry(tvm_ffi_runtime_wheel)]))
    house = tmp_path / "house"
    house.mkdir()
    for wheel in (shared_wheel, tvm_ffi_runtime_wheel):
        (house / wheel.name).symlink_to(wheel)
    cache_dir = tmp_path / "cache"
    result = run_python(
        "import json; from fi_ffi import loader; from fi_ffi.loader import dl; from fi_ffi.abi.cdefs import get_ffi\n"
        "info = loader.runtime_info()\n"
        "ffi = get_ffi(); v = ffi.new('TVMFFIVersion*'); ffi.dlopen(info.path).TVMFFIGetVersion(v)\n"
        "h = loader.load_module('norm')\n"
        "print(json.dumps({'source': info.source, 'path': info.path, 'version': [v.major, v.minor],\n"
        "    'maps': dl.loaded_paths('libtvm_ffi.so'), 'rmsnorm': dl.symbol_address(h, '__tvm_ffi_rmsnorm')}))",
        FI_FFI_RUNTIME="lock",
        FI_FFI_LOCK=str(lock),
        FI_FFI_WHEELHOUSE=str(house),
        FI_FFI_CACHE_DIR=str(cache_dir),
    )
    assert result["source"] == "lock"
    assert Path(str(result["path"])).is_relative_to(cache_dir / "extracted")
    assert str(result["path"]).endswith("tvm_ffi/lib/libtvm_ffi.so")
    assert result["version"] == [0, 1] and result["maps"] == [result["path"]]
    assert result["rmsnorm"] != 0


def test_runtime_env_path_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    result = run_python(
        "import json; from fi_ffi import loader\n"
        "try:\n    loader.runtime_library(); print(json.dumps({}))\n"
        "except Exception as e:\n    print(json.dumps({'type': type(e).__name__, 'error': str(e)}))",
        FI_FFI_RUNTIME=str(tmp_path / "libtvm_ffi.so"),
    )
    assert result["type"] == "LoaderError" and "no such file" in str(result["error"])


def test_importing_the_loader_loads_nothing_and_imports_no_heavy_module() -> None:
    result = run_python(
        "import json, sys; before = set(sys.modules); import fi_ffi.loader\n"
        "maps = open('/proc/self/maps').read()\n"
        "heavy = ('cuda', 'tqdm', 'filelock', 'platformdirs', 'urllib.request', 'http.client', 'zipfile', 'tomllib')\n"
        "new = set(sys.modules) - before  # what the import added (site hooks may preload e.g. zipfile)\n"
        "print(json.dumps({'mods': sorted(m for m in new if m.startswith(heavy)),"
        " 'tvm': 'libtvm_ffi' in maps, 'cudart': 'libcudart' in maps}))"
    )
    assert result == {"mods": [], "tvm": False, "cudart": False}


# ------------------------------------------------------------------------------------------ kernel modules


def test_all_21_modules_of_the_test_wheel_load_and_export_their_entry_points(
    shared_wheel_env: WheelEnv, kernel_modules: list[str]
) -> None:
    uris = loader.available_uris()
    assert len(uris) == 21
    before = loader.loaded_modules()  # modules other tests loaded (from the session's cache) stay loaded
    for uri in uris:
        handle = loader.load_module(uri)
        assert handle != get_ffi().NULL
        for name in symbols_for(uri):
            assert dl.symbol_address(handle, f"__tvm_ffi_{name}") != 0, (uri, name)
    assert loader.load_module("norm") is loader.load_module("norm")
    loaded = loader.loaded_modules()
    assert set(uris) <= set(loaded)
    assert all(Path(p).is_relative_to(shared_wheel_env.cache) for u, p in loaded.items() if u not in before)
    cudart = loader.ensure_cudart()
    assert os.path.basename(cudart).startswith("libcudart.so.") and dl.loaded_paths(os.path.basename(cudart))


def test_concurrent_first_loads_return_one_handle(shared_wheel_env: WheelEnv, kernel_modules: list[str]) -> None:
    uri = next(u for u in kernel_modules if u.startswith("single_decode"))
    handles: list[object] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            handles.append(loader.load_module(uri))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(handles) == 8
    assert len({int(get_ffi().cast("uintptr_t", h)) for h in handles}) == 1


# ------------------------------------------------------------------------------------------ dlopen errors


def test_garbage_file_is_reported_as_not_a_library(tmp_path: Path) -> None:
    bad = tmp_path / "x.so"
    bad.write_bytes(b"this is not an ELF file at all" * 10)
    with pytest.raises(LibraryLoadError) as info:
        libraries.load_library(bad)
    text = str(info.value)
    assert str(bad) in text and "not a valid shared library" in text and "fi-ffi cache verify --full" in text


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LibraryLoadError, match="does not exist"):
        libraries.load_library(tmp_path / "absent.so")


def test_module_needing_a_missing_library_names_it(shared_wheel: Path, tmp_path: Path) -> None:
    edited = edited_module(shared_wheel, tmp_path, b"libcudart.so.13\0", b"libfi_nope.so.1\0")
    with pytest.raises(LibraryLoadError) as info:
        libraries.load_library(edited)
    text = str(info.value)
    assert "libfi_nope.so.1" in text and "LD_LIBRARY_PATH" in text and str(edited) in text


def test_module_needing_another_cudart_says_how_to_install_it(shared_wheel: Path, tmp_path: Path) -> None:
    edited = edited_module(shared_wheel, tmp_path, b"libcudart.so.13\0", b"libcudart.so.98\0")
    with pytest.raises(LibraryLoadError) as info:
        libraries.load_library(edited)
    text = str(info.value)
    assert "libcudart.so.98" in text and "Install a CUDA 98 toolkit and set CUDA_HOME" in text
    # pip has no CUDA 98 runtime: the packages it has are named, with their majors, and no made-up one
    assert "`nvidia-cuda-runtime-cu12` for CUDA 12" in text and "`nvidia-cuda-runtime>=13.0,<14` for CUDA 13" in text
    assert "cu98" not in text
    assert "fi-ffi[cudart]" not in text  # an extra of a package not on any index: no command from a checkout


def test_module_needing_cudart_12_names_its_pip_package(shared_wheel: Path, tmp_path: Path) -> None:
    edited = edited_module(shared_wheel, tmp_path, b"libcudart.so.13\0", b"libcudart.so.12\0")
    if libraries.dl.loaded_paths("libcudart.so.12", versioned=True):
        pytest.skip("libcudart.so.12 is loaded in this process: the module would load")
    try:
        libraries.load_library("libcudart.so.12")
    except LibraryLoadError:
        pass
    else:
        pytest.skip("libcudart.so.12 is on the loader's path here: the module would load")
    with pytest.raises(LibraryLoadError) as info:
        libraries.load_library(edited)
    assert "`python -m pip install 'nvidia-cuda-runtime-cu12'`" in str(info.value)


def test_module_needing_a_newer_glibc_names_both_versions(shared_wheel: Path, tmp_path: Path) -> None:
    edited = edited_module(shared_wheel, tmp_path, b"GLIBC_2.36\0", b"GLIBC_2.99\0")
    system = (os.confstr("CS_GNU_LIBC_VERSION") or "glibc ?").split()[-1]
    with pytest.raises(LibraryLoadError) as info:
        libraries.load_library(edited, wheel="flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl")
    text = str(info.value)
    assert "needs glibc 2.99" in text and f"this system has glibc {system}" in text
    assert "manylinux_2_28" in text
    plain = libraries.explain_dlopen_error("/x/m.so", "/x/m.so: version `GLIBC_2.40' not found (required by /x/m.so)")
    assert "glibc 2.40" in plain and "manylinux_2_28" in plain


def test_missing_cudart_error_says_what_to_install() -> None:
    # This machine's libcudart is on the system loader path, so the case is checked on the loader's message.
    text = libraries.explain_dlopen_error(
        "/c/norm.so", "libcudart.so.13: cannot open shared object file: No such file or directory"
    )
    assert "nvidia-cuda-runtime" in text and "CUDA_HOME" in text


def test_lock_runtime_source_without_entry_or_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lock = tmp_path / "aarch64-only.lock"
    lock.write_text(
        'version = 1\n[[runtime]]\nfilename = "r-1-cp312-cp312-linux_aarch64.whl"\n'
        f'sha256 = "{"a" * 64}"\narch = "not-this-arch"\n'
        '[[kernel]]\nfilename = "k-1-py3-none-linux_x86_64.whl"\n'
        f'sha256 = "{"a" * 64}"\ncuda = "13.0"\narch = "x86_64"\n'
    )
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    with pytest.raises(LoaderError, match=r"has no \[\[runtime\]\] wheel for .*apache-tvm-ffi"):
        libraries._lock_runtime()
