"""Several FlashInfer releases in one lock: the release of each entry, which entry serves a shared module name,
pinning a set of wheels (the 0.7.x metadata wheel plus provider wheels), and what `fi-ffi` shows about it.

The tests with real wheels lock the two 0.6.3 test wheels (``../shared/wheels``) together with the 0.7.2 one
(``../shared/wheels-072``) and skip when those folders are absent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.wheels import WHEELS_HINT

from fi_ffi import caches, dtypes, loader
from fi_ffi.cli import main
from fi_ffi.errors import KernelNotFoundError, LockError
from fi_ffi.loader import lockfile
from fi_ffi.loader.lockfile import WheelPin
from fi_ffi.ops.attention import variants as V
from fi_ffi.ops.attention.variants import Variant

REPO = Path(__file__).resolve().parents[2]
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
NAME_063 = "flashinfer_jit_cache-0.6.3+cu130.sm90a-cp39-abi3-linux_x86_64.whl"
NAME_072 = "flashinfer_jit_cache_072-0.7.2.post1+cu130.sm90a-cp39-abi3-linux_x86_64.whl"


def _shared(folder: str, pattern: str) -> list[Path]:
    return sorted((REPO.parent / "shared" / folder).glob(pattern))


@pytest.fixture(scope="session")
def wheels_063() -> list[Path]:
    found = _shared("wheels", "flashinfer_jit_cache*.whl")
    if len(found) < 2:
        pytest.skip(f"the two 0.6.3 test wheels are not present (<repo>/../shared/wheels); {WHEELS_HINT}")
    return found


@pytest.fixture(scope="session")
def wheel_072() -> Path:
    found = _shared("wheels-072", "flashinfer_jit_cache_072-*.whl")
    if not found:
        pytest.skip(f"the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072); {WHEELS_HINT}")
    return found[0]


def pin(filename: str, sha: str = SHA_A, **fields: object) -> WheelPin:
    return WheelPin(
        kind="kernel",
        filename=filename,
        sha256=sha,
        arch="x86_64",
        lock_path=Path("/locks/x.lock"),
        cuda="13.0",
        **fields,
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- releases


@pytest.mark.parametrize(
    "older, newer",
    [
        ("0.6.3", "0.7.2.post1"),
        ("0.7.2", "0.7.2.post1"),
        ("0.6.13", "0.6.14"),
        ("0.7.0rc1", "0.7.0"),
        ("0.7.0.dev3", "0.7.0a1"),
        ("0.7.0a2", "0.7.0b1"),
        ("0.7.0", "0.7.0.post1"),
        ("", "0.1"),
        ("0.9", "0.10"),
    ],
)
def test_releases_order_as_pep440(older: str, newer: str) -> None:
    assert lockfile.release_key(older) < lockfile.release_key(newer)


def test_trailing_zeros_do_not_make_a_release_newer() -> None:
    assert lockfile.release_key("0.7") == lockfile.release_key("0.7.0")


@pytest.mark.parametrize(
    "version, release",
    [
        ("0.6.3+cu130.sm90a", "0.6.3"),
        ("0.7.2.post1+cu130", "0.7.2.post1"),
        ("0.7.2.post1", "0.7.2.post1"),
        ("nightly+cu130", ""),
    ],
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
    [
        ('release = "latest"', "'release' must be a FlashInfer version"),
        ("release = 7", "'release' must be a FlashInfer version"),
        ('priority = "high"', "'priority' must be an integer"),
        ("priority = true", "'priority' must be an integer"),
        ('modules = "norm"', "'modules' must be a non-empty list"),
        ("modules = []", "'modules' must be a non-empty list"),
        ('modules = ["norm/norm.so"]', "'modules' must be a non-empty list"),
    ],
)
def test_bad_release_priority_or_modules_is_a_lock_error(extra: str, message: str) -> None:
    text = (
        f'version = 1\n[[kernel]]\nfilename = "{NAME_063}"\nsha256 = "{SHA_A}"\ncuda = "13.0"\n'
        f'arch = "x86_64"\n{extra}\n'
    )
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
    record = [
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
        for n, d in files.items()
    ]
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
    meta = write_zip(
        tmp_path / f"flashinfer_jit_cache-{version}-cp39-abi3-manylinux_2_28_x86_64.whl",
        {
            f"{meta_info}/METADATA": (
                f"Metadata-Version: 2.1\nName: flashinfer-jit-cache\nVersion: {version}\n"
                f"Requires-Dist: flashinfer-jit-cache-sm90a=={version}\n"
            ).encode(),
            f"{meta_info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp39-abi3-manylinux_2_28_x86_64\n",
        },
    )
    prov_info = f"flashinfer_jit_cache_sm90a-{version}.dist-info"
    provider = write_zip(
        tmp_path / f"flashinfer_jit_cache_sm90a-{version}-cp39-abi3-manylinux_2_28_x86_64.whl",
        {
            "flashinfer_jit_cache/jit_cache/norm/norm.so": b"\x7fELF not really",
            f"{prov_info}/METADATA": (
                f"Metadata-Version: 2.1\nName: flashinfer-jit-cache-sm90a\nVersion: {version}\n".encode()
            ),
            f"{prov_info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp39-abi3-manylinux_2_28_x86_64\n",
        },
    )
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
    wheels_063: list[Path],
    wheel_072: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
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
    from fi_ffi.ops.attention import variants

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


# ------------------------------------------------------------------------------- module names per release

F16 = dtypes.float16
FA2_072 = (
    "batch_prefill_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_"
    "128_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False_kv_stride_equal"
)
FA2_063 = FA2_072.removesuffix("_kv_stride_equal")
MLA_072 = (
    "batch_mla_attention_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_ckv_512_head_dim_kpe_64_"
    "profiler_False_planabi2"
)
MLA_063 = MLA_072.removesuffix("_planabi2")
FA2_BASE = Variant("batch_prefill", F16, F16, F16, 128, 128, dtypes.int32)


def test_072_names_are_spelled_as_upstream_builds_them() -> None:
    assert Variant("batch_prefill", F16, F16, F16, 128, 128, dtypes.int32, abi="kv_stride_equal").uri == FA2_072
    mla = Variant("batch_mla", F16, F16, F16, 512, 64, dtypes.int32, abi="planabi2")
    assert mla.uri == MLA_072 and (mla.head_dim_ckv, mla.head_dim_kpe) == (512, 64)
    assert Variant("batch_mla", F16, F16, F16, 512, 64, dtypes.int32).uri == MLA_063
    # 0.7.x puts the backend after the tag (get_batch_mla_uri): ..._planabi2_sm90
    assert Variant("batch_mla", F16, F16, F16, 512, 64, dtypes.int32, backend="fa3", abi="planabi2").uri == (
        MLA_072 + "_sm90"
    )
    assert Variant.parse(MLA_072 + "_sm90") == Variant(
        "batch_mla", F16, F16, F16, 512, 64, dtypes.int32, backend="fa3", abi="planabi2"
    )


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(kind="batch_decode", abi="kv_stride_equal"), "abi"),
        (dict(kind="batch_prefill", abi="planabi2"), "abi"),
        (dict(kind="batch_prefill", backend="fa3", abi="kv_stride_equal"), "abi"),
        (dict(kind="batch_prefill", use_profiler=True), "use_profiler"),
        (dict(kind="batch_mla", pos_encoding=1), "batch_mla"),
    ],
)
def test_a_tag_or_flag_the_kind_does_not_have_is_refused(kwargs: dict[str, object], text: str) -> None:
    base: dict[str, object] = dict(
        dtype_q=F16, dtype_kv=F16, dtype_o=F16, head_dim_qk=128, head_dim_vo=128, dtype_idx=dtypes.int32
    )
    with pytest.raises(ValueError, match=text):
        Variant(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "uri",
    [
        FA2_063 + "_kv_stride_bogus",
        MLA_063 + "_planabi3",
        FA2_063 + "_sm90_kv_stride_equal",
        MLA_072.replace("profiler_False", "profiler_Maybe"),
    ],
)
def test_unknown_tags_do_not_parse(uri: str) -> None:
    assert Variant.parse(uri) is None


def test_every_072_module_name_parses_and_round_trips(wheel_072: Path) -> None:
    with zipfile.ZipFile(wheel_072) as zf:
        uris = sorted(n.split("/")[-2] for n in zf.namelist() if n.endswith(".so"))
    parsed = {u: Variant.parse(u) for u in uris}
    attention = {u: v for u, v in parsed.items() if v is not None}
    assert sorted(set(uris) - set(attention)) == ["cascade", "norm", "page", "rope", "sampling", "silu_and_mul"]
    assert all(v.uri == u for u, v in attention.items())
    assert {(v.kind, v.backend, v.abi) for v in attention.values()} == {
        ("batch_decode", "fa2", ""),
        ("batch_prefill", "fa2", "kv_stride_equal"),
        ("batch_prefill", "fa3", ""),
        ("batch_mla", "fa2", "planabi2"),
    }


def test_the_063_mla_names_parse_untagged(wheels_063: list[Path]) -> None:
    with zipfile.ZipFile(next(w for w in wheels_063 if "_ext-" in w.name)) as zf:
        mla = [n.split("/")[-2] for n in zf.namelist() if "batch_mla_attention" in n and n.endswith(".so")]
    assert len(mla) == 4
    for uri in mla:
        v = Variant.parse(uri)
        assert v is not None and v.kind == "batch_mla" and v.abi == "" and v.uri == uri


@pytest.mark.parametrize(
    "kind, text",
    [
        ("gdn_prefill", "FlashInfer <= 0.6.13"),
        ("gdn_prefill_sm90", "removed it in 0.6.14"),
        ("single_prefill", "use the batch calls"),
        ("single_decode", "0.7.x does not prebuild single decode"),
    ],
)
def test_not_shipped_says_which_releases_have_it(kind: str, text: str) -> None:
    assert text in V.not_shipped(kind)
    assert kind in V.not_shipped(kind)


def test_not_shipped_is_empty_for_what_every_release_ships() -> None:
    assert V.not_shipped("batch_decode") == "" and V.not_shipped("norm") == ""


def test_with_both_releases_fa2_prefill_resolves_to_072_and_priority_turns_it_back(
    both_releases: Callable[[str], Path],
) -> None:
    both_releases("")
    assert V.resolve(FA2_BASE) == FA2_072
    chosen = V.choose_prefill(FA2_BASE, "fa2", 0)
    assert (chosen.abi, chosen.uri) == ("kv_stride_equal", FA2_072)
    assert V.release_of(FA2_072) == "0.7.2.post1" and V.release_of(FA2_063) == "0.6.3"
    both_releases(f"{NAME_063}: priority = 1")
    assert V.resolve(FA2_BASE) == FA2_063
    assert V.choose_prefill(FA2_BASE, "fa2", 0).abi == ""


def test_list_variants_rows_carry_the_release(both_releases: Callable[[str], Path]) -> None:
    both_releases("")
    rows = {r["uri"]: r for r in V.list_variants()}
    assert rows[FA2_072]["release"] == "0.7.2.post1" and rows[FA2_072]["abi"] == "kv_stride_equal"
    assert rows[FA2_063]["release"] == "0.6.3" and rows[FA2_063]["abi"] == ""
    assert rows[MLA_072]["kind"] == "batch_mla" and rows[MLA_072]["release"] == "0.7.2.post1"
    assert {r["uri"] for r in V.list_variants(kind="mla")} >= {MLA_072, MLA_063}


@pytest.fixture
def only_072(
    wheel_072: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Path]:
    assert main(["lock", str(wheel_072)]) == 0
    lock = tmp_path / "072.lock"
    lock.write_text(capsys.readouterr().out)
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(wheel_072.parent))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.delenv("FI_FFI_SM", raising=False)
    _refresh_variants()
    yield lock
    _refresh_variants()


def test_on_072_alone_the_untagged_fa2_request_finds_the_kv_stride_equal_module(only_072: Path) -> None:
    assert V.resolve(FA2_BASE) == FA2_072
    assert V.has(FA2_BASE)


def test_on_072_a_missing_variant_lists_072_neighbours(only_072: Path) -> None:
    want = Variant("batch_prefill", F16, F16, F16, 64, 64, dtypes.int32)
    with pytest.raises(KernelNotFoundError) as info:
        V.resolve(want)
    text = str(info.value)
    assert "closest available variants" in text and FA2_072 in text
    assert "FlashInfer 0.7.2.post1" in text


def test_on_072_single_prefill_says_which_releases_ship_it(only_072: Path) -> None:
    want = Variant("single_prefill", F16, F16, F16, 128, 128)
    with pytest.raises(KernelNotFoundError) as info:
        V.resolve(want)
    text = str(info.value)
    assert "no single_prefill module at all" in text
    assert "prebuilt only in FlashInfer 0.6.x" in text and "use the batch calls" in text
    assert "the pinned wheels are FlashInfer 0.7.2.post1" in text


# ------------------------------------------------------------------------------------- fi-ffi list / doctor


def test_fi_ffi_list_shows_the_release_of_each_variant(
    both_releases: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    both_releases("")
    assert main(["list", "--kind", "batch_prefill", "--dtype", "f16", "--head-dim", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_uri = {line.split()[-1]: line for line in lines}
    assert " 0.7.2.post1 " in by_uri[FA2_072] and " 0.6.3 " in by_uri[FA2_063]


def test_fi_ffi_doctor_shows_the_release_of_each_kernel_entry(
    both_releases: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    both_releases("")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"FlashInfer 0.7.2.post1: {NAME_072}" in out
    assert f"FlashInfer 0.6.3: {NAME_063}" in out
    assert main(["doctor", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["lock"]["entries"]
    assert {e["filename"]: e["release"] for e in entries if e["kind"] == "kernel"}[NAME_072] == "0.7.2.post1"


def test_the_packaged_lock_records_release_063_on_every_kernel_entry() -> None:
    lock = lockfile.read_lock(lockfile.default_lock_path())
    assert lock.kernels and {p.release for p in lock.kernels} == {"0.6.3"}


# ------------------------------------------------------------------------ the lock of FI_FFI_TEST_RELEASE=0.7.2


def test_the_072_test_run_lock_prefers_072_and_keeps_063_for_the_rest(
    kernel_modules: list[str],
    wheels_063: list[Path],
    wheel_072: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session lock of ``FI_FFI_TEST_RELEASE=0.7.2`` (tests/conftest.py): 0.7.2 entries at priority 1."""
    from helpers.wheels import lock_text, use_lock

    text = lock_text(wheels_063[:1], [wheel_072])
    try:
        use_lock(monkeypatch, tmp_path / "run.lock", text, [*wheels_063[:1], wheel_072])
        assert loader.module_release("norm") == loader.module_release("sampling") == "0.7.2.post1"
        assert V.resolve(FA2_BASE) == FA2_072
        assert loader.module_release("gdn_prefill_sm90") == "0.6.3"
        assert lockfile.read_lock(tmp_path / "run.lock").kernels[1].priority == 1
    finally:
        monkeypatch.undo()
        caches.reset()  # later tests bind the session's 0.6.3 modules again
        _refresh_variants()
