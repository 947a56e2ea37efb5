"""Several FlashInfer releases in one lock: the release of each entry, which entry serves a shared module name,
pinning a set of wheels (the 0.7.x metadata wheel plus provider wheels), and what `fi-ffi` shows about it.

The tests with real wheels lock the two 0.6.3 test wheels (``../shared/wheels``) together with the 0.7.2 one
(``../shared/wheels-072``) and skip when those folders are absent.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fi_ffi import loader
from fi_ffi.cli import main
from fi_ffi.errors import KernelNotFoundError, LockError
from fi_ffi.loader import lockfile
from fi_ffi.loader.lockfile import WheelPin

REPO = Path(__file__).resolve().parent.parent
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
NAME_063 = "flashinfer_jit_cache-0.6.3+cu130.sm90a-cp39-abi3-linux_x86_64.whl"
NAME_072 = "flashinfer_jit_cache_072-0.7.2.post1+cu130.sm90a-cp39-abi3-linux_x86_64.whl"


def _shared(folder: str, pattern: str) -> list[Path]:
    for base in (REPO.parent / "shared", Path("/work/shared")):
        found = sorted((base / folder).glob(pattern))
        if found:
            return found
    return []


@pytest.fixture(scope="session")
def wheels_063() -> list[Path]:
    found = _shared("wheels", "flashinfer_jit_cache*.whl")
    if len(found) < 2:
        pytest.skip("the two 0.6.3 test wheels are not present (<repo>/../shared/wheels)")
    return found


@pytest.fixture(scope="session")
def wheel_072() -> Path:
    found = _shared("wheels-072", "flashinfer_jit_cache_072-*.whl")
    if not found:
        pytest.skip("the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072)")
    return found[0]


def pin(filename: str, sha: str = SHA_A, **fields: object) -> WheelPin:
    return WheelPin(kind="kernel", filename=filename, sha256=sha, arch="x86_64", lock_path=Path("/locks/x.lock"),
                    cuda="13.0", **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- releases


@pytest.mark.parametrize(
    "older, newer",
    [("0.6.3", "0.7.2.post1"), ("0.7.2", "0.7.2.post1"), ("0.6.13", "0.6.14"), ("0.7.0rc1", "0.7.0"),
     ("0.7.0.dev3", "0.7.0a1"), ("0.7.0a2", "0.7.0b1"), ("0.7.0", "0.7.0.post1"), ("", "0.1"), ("0.9", "0.10")],
)
def test_releases_order_as_pep440(older: str, newer: str) -> None:
    assert lockfile.release_key(older) < lockfile.release_key(newer)


def test_trailing_zeros_do_not_make_a_release_newer() -> None:
    assert lockfile.release_key("0.7") == lockfile.release_key("0.7.0")


@pytest.mark.parametrize(
    "version, release",
    [("0.6.3+cu130.sm90a", "0.6.3"), ("0.7.2.post1+cu130", "0.7.2.post1"), ("0.7.2.post1", "0.7.2.post1"),
     ("nightly+cu130", "")],
)
def test_release_is_the_public_part_of_the_wheel_version(version: str, release: str) -> None:
    assert lockfile.release_from_version(version) == release


def test_lock_entry_records_the_release_and_it_survives_dump_and_parse(make_wheel: Callable[..., Path]) -> None:
    wheel = make_wheel(
        "flashinfer_jit_cache-0.7.2.post1+cu130-cp39-abi3-manylinux_2_28_x86_64.whl",
        {"flashinfer_jit_cache/jit_cache/norm/norm.so": b"x"},
    )
    entry = loader.lock_entry(wheel)
    assert entry.release == "0.7.2.post1"
    text = loader.dump_lock([entry])
    assert 'release = "0.7.2.post1"' in text
    assert lockfile.parse_lock(text, Path("/l/a.lock")).kernels[0].release == "0.7.2.post1"
    assert loader.lock_entry(wheel, release="0.7.2").release == "0.7.2"


def test_priority_and_modules_survive_dump_and_parse() -> None:
    text = loader.dump_lock([pin(NAME_063, release="0.6.3", priority=2, modules=("gdn_*", "norm"))])
    back = lockfile.parse_lock(text, Path("/l/a.lock")).kernels[0]
    assert (back.release, back.priority, back.modules) == ("0.6.3", 2, ("gdn_*", "norm"))


@pytest.mark.parametrize(
    "extra, message",
    [('release = "latest"', "'release' must be a FlashInfer version"),
     ("release = 7", "'release' must be a FlashInfer version"),
     ('priority = "high"', "'priority' must be an integer"),
     ("priority = true", "'priority' must be an integer"),
     ('modules = "norm"', "'modules' must be a non-empty list"),
     ("modules = []", "'modules' must be a non-empty list"),
     ('modules = ["norm/norm.so"]', "'modules' must be a non-empty list")],
)
def test_bad_release_priority_or_modules_is_a_lock_error(extra: str, message: str) -> None:
    text = (f'version = 1\n[[kernel]]\nfilename = "{NAME_063}"\nsha256 = "{SHA_A}"\ncuda = "13.0"\n'
            f'arch = "x86_64"\n{extra}\n')
    with pytest.raises(LockError, match=message):
        lockfile.parse_lock(text, Path("/l/bad.lock"))


# ---------------------------------------------------------------------------------- which entry serves


def holder(*held: WheelPin) -> tuple[Callable[[WheelPin], bool], list[str]]:
    asked: list[str] = []

    def holds(p: WheelPin) -> bool:
        asked.append(p.filename)
        return any(p is h for h in held)

    return holds, asked


def test_newest_release_wins_a_shared_module_name_by_default() -> None:
    old, new = pin("old.whl", release="0.6.3"), pin("new.whl", SHA_B, release="0.7.2.post1")
    holds, _ = holder(old, new)
    assert lockfile.provider("norm", [old, new], holds) is new
    assert lockfile.provider("norm", [new, old], holds) is new


def test_a_module_only_the_older_release_has_comes_from_it() -> None:
    old, new = pin("old.whl", release="0.6.3"), pin("new.whl", SHA_B, release="0.7.2.post1")
    holds, asked = holder(old)
    assert lockfile.provider("gdn_prefill_sm90", [old, new], holds) is old
    assert asked == ["new.whl", "old.whl"]  # newest first


def test_higher_priority_beats_a_newer_release() -> None:
    old, new = pin("old.whl", release="0.6.3", priority=1), pin("new.whl", SHA_B, release="0.7.2.post1")
    holds, asked = holder(old, new)
    assert lockfile.provider("norm", [new, old], holds) is old
    assert asked == ["old.whl"]  # the winner's wheel is the only one read


def test_a_modules_list_limits_what_an_entry_serves() -> None:
    old, new = pin("old.whl", release="0.6.3"), pin("new.whl", SHA_B, release="0.7.2.post1", modules=("norm",))
    holds, _ = holder(old, new)
    assert lockfile.provider("norm", [old, new], holds) is new
    assert lockfile.provider("page", [old, new], holds) is old
    assert lockfile.provider("page", [new], holds) is None


def test_modules_patterns_are_fnmatch() -> None:
    p = pin("x.whl", modules=("batch_prefill_*", "gdn_prefill_sm9?"))
    assert p.serves("batch_prefill_with_kv_cache_dtype_q_f16") and p.serves("gdn_prefill_sm90")
    assert not p.serves("norm") and not p.serves("batch_decode_with_kv_cache")


def test_same_release_keeps_lock_order_and_reads_no_further() -> None:
    a, b, c = pin("a.whl", release="0.6.3"), pin("b.whl", SHA_B, release="0.6.3"), pin("c.whl", SHA_C, release="0.6.3")
    holds, asked = holder(b, c)
    assert lockfile.provider("rope", [a, b, c], holds) is b
    assert asked == ["a.whl", "b.whl"]


def test_entries_without_release_keep_the_old_first_in_lock_rule() -> None:
    a, b = pin("a.whl"), pin("b.whl", SHA_B)
    holds, _ = holder(a, b)
    assert lockfile.provider("norm", [a, b], holds) is a


def test_release_against_no_release_at_equal_priority_is_an_error_naming_both() -> None:
    known, unknown = pin("known.whl", release="0.7.2.post1"), pin("unknown.whl", SHA_B)
    holds, _ = holder(known, unknown)
    with pytest.raises(LockError, match=r"'norm' is in known\.whl .*unknown\.whl \(no release recorded\).*priority"):
        lockfile.provider("norm", [unknown, known], holds)
    only_known, _ = holder(known)
    assert lockfile.provider("norm", [unknown, known], only_known) is known  # no clash when one wheel has it
    ranked = pin("unknown.whl", SHA_B, priority=1)
    holds2, _ = holder(known, ranked)
    assert lockfile.provider("norm", [ranked, known], holds2) is ranked


# --------------------------------------------------------------------------------- set of wheels (0.7.x)


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel holding exactly ``files`` plus a RECORD (no members added)."""
    info = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in files.items()]
    files = {**files, f"{info}/RECORD": ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def upstream_072_set(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny stand-in for upstream's 0.7.x packaging: the metadata-only ``flashinfer-jit-cache`` wheel (dist-info
    only, requiring the provider) and one provider wheel ``flashinfer-jit-cache-sm90a`` holding a module."""
    version = "0.7.2.post1+cu130"
    meta_info = f"flashinfer_jit_cache-{version}.dist-info"
    meta = write_zip(tmp_path / f"flashinfer_jit_cache-{version}-cp39-abi3-manylinux_2_28_x86_64.whl", {
        f"{meta_info}/METADATA": (f"Metadata-Version: 2.1\nName: flashinfer-jit-cache\nVersion: {version}\n"
                                  f"Requires-Dist: flashinfer-jit-cache-sm90a=={version}\n").encode(),
        f"{meta_info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp39-abi3-manylinux_2_28_x86_64\n",
    })
    prov_info = f"flashinfer_jit_cache_sm90a-{version}.dist-info"
    provider = write_zip(tmp_path / f"flashinfer_jit_cache_sm90a-{version}-cp39-abi3-manylinux_2_28_x86_64.whl", {
        "flashinfer_jit_cache/jit_cache/norm/norm.so": b"\x7fELF not really",
        f"{prov_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: flashinfer-jit-cache-sm90a\nVersion: {version}\n".encode()
        ),
        f"{prov_info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp39-abi3-manylinux_2_28_x86_64\n",
    })
    return meta, provider


def test_a_metadata_only_wheel_is_skipped_with_a_note_naming_what_it_requires(
    upstream_072_set: tuple[Path, Path],
) -> None:
    meta, provider = upstream_072_set
    pins, notes = loader.lock_entries([meta, provider])
    assert [p.filename for p in pins] == [provider.name]
    assert (pins[0].release, pins[0].sm, pins[0].cuda) == ("0.7.2.post1", ("90a",), "13.0")
    assert len(notes) == 1 and meta.name in notes[0]
    assert "flashinfer-jit-cache-sm90a==0.7.2.post1" in notes[0]


def test_fi_ffi_lock_pins_the_provider_of_a_set_and_notes_the_metadata_wheel(
    upstream_072_set: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    meta, provider = upstream_072_set
    assert main(["lock", str(meta), str(provider)]) == 0
    out, err = capsys.readouterr()
    lock = lockfile.parse_lock(out, tmp_path / "set.lock")
    assert [(p.filename, p.release) for p in lock.kernels] == [(provider.name, "0.7.2.post1")]
    assert f"skipped {meta}" in err and "requires flashinfer-jit-cache-sm90a" in err


def test_fi_ffi_lock_with_only_a_metadata_wheel_says_there_is_nothing_to_pin(
    upstream_072_set: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    meta, _ = upstream_072_set
    assert main(["lock", str(meta)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "nothing to pin" in err and "pin those wheels" in err


def test_a_metadata_wheel_is_pinned_when_the_kind_is_given(upstream_072_set: tuple[Path, Path]) -> None:
    meta, _ = upstream_072_set
    entry = loader.lock_entry(meta, kind="kernel")
    assert entry.filename == meta.name and entry.release == "0.7.2.post1"


# ------------------------------------------------------------------------------ the real wheels, 0.6.3 + 0.7.2


@pytest.fixture
def both_releases(
    wheels_063: list[Path], wheel_072: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[[str], Path]]:
    """Lock the three real wheels with `fi-ffi lock`; returns ``use(extra_toml_per_072_entry)`` → lock path,
    which (re)writes the lock, appends the given lines to chosen entries and makes it the active lock."""
    assert main(["lock", *map(str, wheels_063), str(wheel_072)]) == 0
    base = capsys.readouterr().out
    folders = dict.fromkeys(str(w.parent) for w in [*wheels_063, wheel_072])
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", os.pathsep.join(folders))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.delenv("FI_FFI_SM", raising=False)

    def use(edits: str = "") -> Path:
        text = base
        for line in filter(None, edits.splitlines()):
            filename, _, setting = line.partition(":")
            anchor = f'filename = "{filename.strip()}"\n'
            assert anchor in text
            text = text.replace(anchor, anchor + setting.strip() + "\n")
        path = tmp_path / f"both-{abs(hash(edits))}.lock"
        path.write_text(text)
        monkeypatch.setenv("FI_FFI_LOCK", str(path))
        _refresh_variants()
        return path

    yield use
    _refresh_variants()


def _refresh_variants() -> None:
    from fi_ffi.ops import variants

    variants._refresh()


def test_fi_ffi_lock_records_each_real_wheels_release(both_releases: Callable[[str], Path]) -> None:
    lock = lockfile.read_lock(both_releases(""))
    assert {p.filename: p.release for p in lock.kernels} == {
        NAME_063: "0.6.3",
        "flashinfer_jit_cache_ext-0.6.3+cu130.sm90a-cp39-abi3-linux_x86_64.whl": "0.6.3",
        NAME_072: "0.7.2.post1",
    }


def test_by_default_shared_modules_come_from_072_and_gdn_from_063(both_releases: Callable[[str], Path]) -> None:
    both_releases("")
    assert loader.module_release("norm") == "0.7.2.post1"
    assert loader.module_source("norm").filename == NAME_072
    assert loader.module_release("page") == "0.7.2.post1"
    assert loader.module_release("gdn_prefill_sm90") == "0.6.3"
    assert loader.module_source("gdn_prefill_sm90").filename == NAME_063
    assert "FlashInfer 0.6.3, 0.7.2.post1" in loader.selection().reason


def test_the_loaded_norm_file_is_the_072_member(both_releases: Callable[[str], Path], wheel_072: Path) -> None:
    both_releases("")
    with zipfile.ZipFile(wheel_072) as zf:
        want = zf.read("flashinfer_jit_cache_072/jit_cache/norm/norm.so")
    assert loader.module_path("norm").read_bytes() == want


def test_priority_pins_063_for_everything_it_has(both_releases: Callable[[str], Path]) -> None:
    both_releases(f"{NAME_063}: priority = 1")
    assert loader.module_release("norm") == "0.6.3"
    assert loader.module_source("norm").filename == NAME_063
    assert loader.module_release("rope") == "0.7.2.post1"  # the 0.6.3 rope is in the ext wheel, priority 0
    assert loader.module_release("gdn_prefill_sm90") == "0.6.3"


def test_a_modules_list_on_072_takes_only_those_from_it(both_releases: Callable[[str], Path]) -> None:
    both_releases(f'{NAME_072}: modules = ["norm", "batch_prefill_*"]')
    assert loader.module_release("norm") == "0.7.2.post1"
    assert loader.module_release("page") == "0.6.3"
    assert loader.module_release("sampling") == "0.6.3"
    sources = loader.module_sources()
    assert sources["page"].filename == NAME_063 and sources["norm"].filename == NAME_072
    assert not any(uri.endswith("_planabi2") for uri in sources)  # the 0.7.2 MLA is left out
    assert not any(uri.endswith("_planabi2") for uri in loader.available_uris())
    with pytest.raises(KernelNotFoundError, match=r"'modules' list leaves it out"):
        loader.module_path(next(u for u in _072_uris() if u.endswith("_planabi2")))


def _072_uris() -> list[str]:
    """Every module in the 0.7.2 wheel, whatever the lock's rules let it serve."""
    from fi_ffi.loader import modules

    return [u for p in loader.active_lock().kernels if p.filename == NAME_072 for u in modules.wheel_uris(p)]
