"""The wheel lock: format, validation, selection by CUDA version and arch, writing entries for local wheels."""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from fi_ffi import loader
from fi_ffi.errors import LibraryLoadError, LoaderError, LockError
from fi_ffi.loader import libraries, lockfile

SHARED_SHA256 = "865dd2def285393e98953a8a6e49ab785df2ec3b59e3bd778cd924a8da5d5d50"
X86_WHEEL = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl"
ARM_WHEEL = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_aarch64.whl"
SHA_A = "a" * 64
SHA_B = "b" * 64


def parse(text: str, name: str = "test.lock") -> lockfile.Lock:
    return lockfile.parse_lock(text, Path("/locks") / name)


def kernel(filename: str, cuda: str, arch: str = "x86_64", sha: str = SHA_A, extra: str = "") -> str:
    return f'[[kernel]]\nfilename = "{filename}"\nsha256 = "{sha}"\ncuda = "{cuda}"\narch = "{arch}"\n{extra}\n'


# ------------------------------------------------------------------------------------------ packaged lock


def test_packaged_lock_pins_upstream_wheels_for_cu130_and_cu131_on_both_arches() -> None:
    lock = lockfile.read_lock(lockfile.default_lock_path())
    pins = {(p.cuda, p.arch): p for p in lock.kernels}
    assert set(pins) == {("13.0", "x86_64"), ("13.1", "x86_64"), ("13.0", "aarch64"), ("13.1", "aarch64")}
    for cuda in ("13.0", "13.1"):
        x86, arm = pins[(cuda, "x86_64")], pins[(cuda, "aarch64")]
        assert (x86.filename, x86.sha256) == (
            X86_WHEEL,
            "e5b0560aa02befa2964c76b8f9302959ed9fb2f558765b974753d68c4f8b4e1e",
        )
        assert (arm.filename, arm.sha256) == (
            ARM_WHEEL,
            "458fcf5a854334062503ce28bd6521c16029d2248246532421e824e8273b8a81",
        )
        for pin in (x86, arm):
            url = urllib.parse.urlsplit(pin.url)
            assert url.scheme == "https" and url.netloc == "github.com"
            assert url.path == f"/flashinfer-ai/flashinfer/releases/download/v0.6.3/{pin.filename.replace('+', '%2B')}"


def test_packaged_lock_pins_tvm_ffi_runtime_through_pip_with_member_hashes() -> None:
    lock = lockfile.read_lock(lockfile.default_lock_path())
    runtimes = {p.arch: p for p in lock.runtimes}
    assert set(runtimes) == {"x86_64", "aarch64"}
    for arch, pin in runtimes.items():
        assert pin.pip == "apache-tvm-ffi==0.1.15.post2" and not pin.url
        assert pin.filename.startswith("apache_tvm_ffi-0.1.15.post2-cp312-cp312-")
        assert pin.filename.endswith(f"manylinux_2_28_{arch}.whl")
        assert pin.library == "tvm_ffi/lib/libtvm_ffi.so" and pin.library in pin.members
    x86 = runtimes["x86_64"]
    assert x86.members[x86.library] == "c33ef5349896abfd0c5d6994e028ce3b72a343e3e7a29c1030fe093054b656ea"


def test_packaged_lock_ships_inside_the_package_as_the_root_file() -> None:
    inside = Path(lockfile.__file__).resolve().parent.parent / "wheels.lock"
    assert inside.read_bytes() == (Path(__file__).resolve().parents[2] / "wheels.lock").read_bytes()


# -------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("cuda", "arch", "want_cuda", "want_file"),
    [
        ("13.0", "x86_64", "13.0", X86_WHEEL),
        ("13.1", "x86_64", "13.1", X86_WHEEL),
        ("13.2", "x86_64", "13.1", X86_WHEEL),  # newer minor falls back to the highest pinned one
        ("13.9", "aarch64", "13.1", ARM_WHEEL),
        ("13.0", "arm64", "13.0", ARM_WHEEL),  # macOS/Windows spelling
        ("13.0", "AMD64", "13.0", X86_WHEEL),
    ],
)
def test_selection_takes_the_highest_minor_not_above_the_runtime(
    cuda: str, arch: str, want_cuda: str, want_file: str
) -> None:
    chosen = lockfile.select(lockfile.read_lock(lockfile.default_lock_path()), cuda, arch, cuda_source="test")
    assert [(p.cuda, p.filename) for p in chosen.kernels] == [(want_cuda, want_file)]
    assert chosen.cuda == cuda
    assert f"chose {want_cuda}" in chosen.reason and "test" in chosen.reason
    assert chosen.runtime is not None and chosen.runtime.arch == lockfile.normalize_arch(arch)


@pytest.mark.parametrize(("cuda", "arch"), [("12.8", "x86_64"), ("14.0", "aarch64"), ("13.0", "ppc64le")])
def test_no_matching_entry_names_cuda_arch_and_lock(cuda: str, arch: str) -> None:
    path = lockfile.default_lock_path()
    with pytest.raises(LockError) as info:
        lockfile.select(lockfile.read_lock(path), cuda, arch)
    text = str(info.value)
    assert f"CUDA {cuda}" in text and arch in text and str(path) in text
    assert "fi-ffi lock" in text


def test_lower_minor_than_every_entry_is_an_error() -> None:
    lock = parse("version = 1\n" + kernel("k-1-py3-none-linux_x86_64.whl", "13.2"))
    with pytest.raises(LockError, match=r"CUDA 13\.1 on x86_64"):
        lockfile.select(lock, "13.1", "x86_64")


def test_several_wheels_at_one_version_are_all_selected_and_filtered_by_sm() -> None:
    text = (
        "version = 1\n"
        + kernel("k_a-1-py3-none-linux_x86_64.whl", "13.0", sha=SHA_A, extra='sm = ["90a"]')
        + kernel("k_b-1-py3-none-linux_x86_64.whl", "13.0", sha=SHA_B, extra='sm = ["sm_100a", "103a"]')
        + kernel("k_c-1-py3-none-linux_x86_64.whl", "13.0", sha=SHA_B)  # no sm: serves every GPU
    )
    lock = parse(text)
    everything = lockfile.select(lock, "13.0", "x86_64")
    assert [p.filename[:3] for p in everything.kernels] == ["k_a", "k_b", "k_c"]
    assert "3 wheels" in everything.reason
    hopper = lockfile.select(lock, "13.0", "x86_64", sm=("90a",))
    assert [p.filename[:3] for p in hopper.kernels] == ["k_a", "k_c"]
    assert "FI_FFI_SM" in hopper.reason
    assert lock.kernels[1].sm == ("100a", "103a")


def test_sm_filter_that_matches_nothing_lists_what_exists() -> None:
    lock = parse("version = 1\n" + kernel("k_a-1-py3-none-linux_x86_64.whl", "13.0", extra='sm = ["90a"]'))
    with pytest.raises(LockError, match=r"none for GPU arch 80.*90a"):
        lockfile.select(lock, "13.0", "x86_64", sm=("80",))


def test_selection_uses_env_cuda_version_and_sm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lock = tmp_path / "user.lock"
    lock.write_text(
        "version = 1\n"
        + kernel("k_a-1-py3-none-linux_x86_64.whl", "13.0", extra='sm = ["90a"]')
        + kernel("k_b-1-py3-none-linux_x86_64.whl", "13.0", sha=SHA_B, extra='sm = ["100a"]')
        + kernel("k_a-1-py3-none-linux_aarch64.whl", "13.0", arch="aarch64")
    )
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.4")
    monkeypatch.setenv("FI_FFI_SM", "sm_100a")
    chosen = loader.selection(arch="x86_64")
    assert (chosen.cuda, chosen.cuda_source) == ("13.4", "FI_FFI_CUDA_VERSION")
    assert [p.filename for p in chosen.kernels] == ["k_b-1-py3-none-linux_x86_64.whl"]
    assert chosen.lock_path == lock
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13")
    with pytest.raises(LoaderError, match="^FI_FFI_CUDA_VERSION='13': expected major.minor"):
        loader.selection(arch="x86_64")  # the settings are checked before anything is selected


def test_user_lock_without_runtime_section_keeps_the_packaged_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lock = tmp_path / "kernels-only.lock"
    lock.write_text("version = 1\n" + kernel("k-1-py3-none-linux_x86_64.whl", "13.0"))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    active = lockfile.active_lock()
    assert [p.filename for p in active.kernels] == ["k-1-py3-none-linux_x86_64.whl"]
    assert {p.arch for p in active.runtimes} == {"x86_64", "aarch64"}
    assert active.sources["kernel"] == lock and active.sources["runtime"] == lockfile.default_lock_path()


def test_cuda_runtime_version_comes_from_libcudart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FI_FFI_CUDA_VERSION", raising=False)
    try:
        version, source = libraries.cuda_runtime_version()
    except LibraryLoadError as exc:
        pytest.skip(f"no libcudart here: {exc}")
    major, minor = lockfile.parse_cuda_version(version)
    assert major >= 12 and minor >= 0
    assert source.startswith("cudaRuntimeGetVersion of ") and "libcudart.so" in source


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"'version = 1' is required"),
        ("version = 2\n", r"found 2"),
        ("version = 1\n[[kernels]]\n", r"unknown top-level key.*kernels"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra='sha265 = "x"'), r"unknown key.*sha265"),
        ('version = 1\n[[kernel]]\nfilename = "k-1-py3-none-any.whl"\n', r"'sha256' is required"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", sha="abc"), r"64 hex digits"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13"), r"'cuda' must be 'major.minor'"),
        ("version = 1\n" + kernel("dir/k-1-py3-none-any.whl", "13.0"), r"bare wheel file name"),
        ("version = 1\n" + kernel("k-1-py3-none-any.zip", "13.0"), r"bare wheel file name"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra='url = "ftp://x/y.whl"'), r"http"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra="size = -1"), r"byte count"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra='sm = "90a"'), r"'sm' must be a list"),
        ("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra='prefix = "../x"'), r"relative member"),
        (
            "version = 1\n"
            + '[[runtime]]\nfilename = "r-1-py3-none-any.whl"\nsha256 = "'
            + SHA_A
            + '"\narch = "x86_64"\n'
            + '[[runtime]]\nfilename = "r-2-py3-none-any.whl"\nsha256 = "'
            + SHA_B
            + '"\narch = "x86_64"\n',
            r"more than one \[\[runtime\]\] entry for arch x86_64",
        ),
        ("version = 1\nkernel = [", r"not valid TOML"),
    ],
)
def test_malformed_lock_is_a_lock_error_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(LockError, match=message) as info:
        parse(text, "broken.lock")
    assert "/locks/broken.lock" in str(info.value)


def test_missing_lock_file_is_a_lock_error(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="cannot read the wheel lock"):
        lockfile.read_lock(tmp_path / "nope.lock")


def test_relative_path_resolves_against_the_lock_folder() -> None:
    lock = parse("version = 1\n" + kernel("k-1-py3-none-any.whl", "13.0", extra='path = "w/k-1-py3-none-any.whl"'))
    assert lock.kernels[0].local_path == Path("/locks/w/k-1-py3-none-any.whl")


# -------------------------------------------------------------------------------------- writing entries


@pytest.mark.parametrize(
    ("label", "cuda", "sm"),
    [("cu130", "13.0", ()), ("cu128.sm90a", "12.8", ("90a",)), ("cu131.sm90a.sm100a", "13.1", ("90a", "100a"))],
)
def test_cuda_and_sm_are_read_from_the_local_version_label(label: str, cuda: str, sm: tuple[str, ...]) -> None:
    assert lockfile.cuda_from_label(label) == cuda
    assert lockfile.sm_from_label(label) == sm


def test_wheel_file_name_fields() -> None:
    name = lockfile.parse_wheel_filename(
        "apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl"
    )
    assert (name.name, name.version, name.python, name.abi) == ("apache_tvm_ffi", "0.1.15.post2", "cp312", "cp312")
    assert (name.last_platform, name.arch) == ("manylinux_2_28_aarch64", "aarch64")
    with pytest.raises(LockError, match="not a wheel file name"):
        lockfile.parse_wheel_filename("nonsense.whl")


def test_lock_entry_for_the_shared_wheel_reads_name_and_hashes_it(shared_wheel: Path) -> None:
    pin = loader.lock_entry(shared_wheel)
    assert pin.kind == "kernel"
    assert (pin.cuda, pin.arch, pin.sm) == ("13.0", "x86_64", ("90a",))
    assert pin.sha256 == SHARED_SHA256
    assert pin.size == shared_wheel.stat().st_size == 25_051_210
    assert pin.prefix == "flashinfer_jit_cache/jit_cache"


def test_dumped_lock_parses_back_to_the_same_entries(make_wheel: Callable[..., Path], tmp_path: Path) -> None:
    kernel_whl = make_wheel(
        "my_kernels-1.0+cu128.sm87-py3-none-linux_aarch64.whl",
        {"my_kernels/jit_cache/norm/norm.so": b"\x7fELF-not-really", "my_kernels/jit_cache/page/page.so": b"x"},
    )
    runtime_whl = make_wheel("apache_tvm_ffi-9.9-cp312-cp312-linux_x86_64.whl", {"tvm_ffi/lib/libtvm_ffi.so": b"r"})
    k = loader.lock_entry(kernel_whl, url="https://example.invalid/a+b.whl", path="wheels/x.whl", hash_members=True)
    r = loader.lock_entry(runtime_whl, pip="apache-tvm-ffi==9.9")
    assert (k.kind, k.cuda, k.arch, k.sm, k.prefix) == ("kernel", "12.8", "aarch64", ("87",), "my_kernels/jit_cache")
    assert k.members["my_kernels/jit_cache/norm/norm.so"] == hashlib.sha256(b"\x7fELF-not-really").hexdigest()
    assert (r.kind, r.arch, r.cuda) == ("runtime", "x86_64", "")
    text = loader.dump_lock([r, k], header="generated\nby a test")
    assert text.startswith("# generated\n# by a test\nversion = 1\n")
    out = tmp_path / "round.lock"
    out.write_text(text)
    back = lockfile.read_lock(out)
    assert [replace(p, lock_path=out) for p in (k, r)] == [*back.kernels, *back.runtimes]


def test_lock_entry_needs_cuda_when_the_name_has_none(make_wheel: Callable[..., Path]) -> None:
    whl = make_wheel("plain-1.0-py3-none-linux_x86_64.whl", {"plain/jit_cache/m/m.so": b"x"})
    with pytest.raises(LockError, match="pass cuda="):
        loader.lock_entry(whl)
    assert loader.lock_entry(whl, cuda="13.0").cuda == "13.0"
    other = make_wheel("other-1.0-py3-none-linux_x86_64.whl", {"other/readme.txt": b"x"})
    with pytest.raises(LockError, match="neither a kernel wheel"):
        loader.lock_entry(other)
