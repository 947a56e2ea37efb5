"""fi_ffi.loader.elf: the dynamic symbols of real shared libraries, and damaged files as typed errors.

The reader is checked against the dynamic linker of this process (what ``dlsym`` finds in the loaded library),
not against another ELF tool: every name it says a loaded module exports is found in it, every undefined name
of a module that loads completely is provided by the process, and the entry points the 0.7.2 wheel's
signature listing names are among the exports. Then truncated, foreign and randomly damaged files: each a
:class:`LoaderError` naming the file, never ``struct.error``, ``IndexError`` or ``OverflowError``.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from helpers.wheels import WHEELS_HINT, find_wheels_072
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fi_ffi import loader
from fi_ffi.errors import LoaderError
from fi_ffi.loader import dl, elf, symbols

ENTRY_POINTS_063 = {"norm": ["rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm"], "page": ["append_paged_kv_cache"]}


def signatures_072() -> dict[str, set[str]]:
    """Module → its entry points, from ``signatures-072.txt`` beside the 0.7.2 test wheel."""
    wheels = find_wheels_072()
    listing = wheels[0].parent / "signatures-072.txt" if wheels else Path("/nonexistent")
    if not listing.is_file():
        pytest.skip(
            f"signatures-072.txt of the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072); {WHEELS_HINT}"
        )
    out: dict[str, set[str]] = {}
    uri = ""
    for line in listing.read_text().splitlines():
        if line.startswith("## "):
            uri = line[3:].split()[0]
        elif line.strip():
            out.setdefault(uri, set()).add(line.strip().partition(": ")[0])
    return out


def check_module_file(path: Path, entries: set[str] | list[str]) -> elf.DynamicSymbols:
    found = elf.read(path, exports=True)
    assert found.path == str(path)
    assert "libcudart.so.13" in found.needed and "libc.so.6" in found.needed, found.needed
    assert found.soname == ""  # FlashInfer's modules are built without -soname
    assert {f"__tvm_ffi_{e}" for e in entries} <= found.exported
    assert not set(found.undefined) & found.exported and not set(found.weak_undefined) & found.exported
    # every module raises TVM-FFI errors and registers its GPU code with libcudart
    assert {"TVMFFIErrorSetRaised", "__cudaRegisterFatBinary"} <= set(found.undefined)
    assert list(found.undefined) == sorted(found.undefined)
    # imports() is the same reading without the exports
    assert elf.imports(path) == elf.DynamicSymbols(str(path), "", found.needed, found.undefined, found.weak_undefined)
    return found


def test_the_063_modules_as_the_dynamic_linker_sees_them(kernel_modules: list[str]) -> None:
    for uri, entries in ENTRY_POINTS_063.items():
        path = loader.module_path(uri)
        found = check_module_file(path, entries)
        handle = loader.load_module(uri)
        missing = [name for name in sorted(found.exported) if not dl.symbol_address(handle, name)]
        assert missing == [] and len(found.exported) > 1000  # the modules export their static libstdc++
        # loaded RTLD_LOCAL: its entry points are not in the global scope
        assert not dl.symbol_address(dl.global_scope(), f"__tvm_ffi_{entries[0]}")
        assert symbols.check_loaded(path, handle) == symbols.SymbolCheck(str(path), loaded=True)


def test_every_module_of_the_072_wheel(release_072: list[str]) -> None:
    listed = signatures_072()
    assert set(listed) == set(release_072)
    for uri in release_072:
        check_module_file(loader.module_path(uri), listed[uri])


def test_the_tvm_ffi_runtime_library(kernel_modules: list[str]) -> None:
    path = loader.runtime_library()
    found = elf.read(path, exports=True)
    assert found.soname == "libtvm_ffi.so"
    assert {"TVMFFIGetVersion", "TVMFFIErrorSetRaised", "TVMFFIEnvGetStream", "TVMFFIFunctionCall"} <= found.exported
    assert "libc.so.6" in found.needed and "TVMFFIGetVersion" not in found.undefined


def test_imports_reads_a_file_once_per_size_and_mtime(kernel_modules: list[str], tmp_path: Path) -> None:
    copy = tmp_path / "norm.so"
    shutil.copyfile(loader.module_path("norm"), copy)
    first = elf.imports(copy)
    assert elf.imports(copy) is first  # cached
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced in place, same size
    again = elf.imports(copy)
    assert again is not first and again == first
    with open(copy, "r+b") as f:  # damaged in place: read again, and refused
        f.truncate(st.st_size // 2)
    with pytest.raises(LoaderError, match=rf"^{copy}: not a readable ELF64 shared library: .* it is truncated"):
        elf.imports(copy)


# ------------------------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def module_bytes(kernel_modules: list[str]) -> bytes:
    return loader.module_path("norm").read_bytes()


def written(tmp_path: Path, data: bytes, name: str = "damaged.so") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, match: str) -> LoaderError:
    with pytest.raises(LoaderError) as info:
        elf.read(path, exports=True)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "fi-ffi cache verify --full" in text, text
    assert match in text, text
    return info.value


def test_empty_foreign_and_other_class_files_are_refused_by_name(tmp_path: Path, module_bytes: bytes) -> None:
    refused(written(tmp_path, b""), "the file has 0 bytes, fewer than an ELF64 header (64)")
    refused(written(tmp_path, b"#!/bin/sh\necho not a library\n" * 4), "does not start with the ELF magic number")
    elf32 = bytearray(module_bytes[:4096])
    elf32[4] = 1  # ELFCLASS32
    refused(written(tmp_path, bytes(elf32)), "ELF class 1, data encoding 1; fi_ffi reads ELF64 little-endian")
    big = bytearray(module_bytes[:4096])
    big[5] = 2  # ELFDATA2MSB
    refused(written(tmp_path, bytes(big)), "ELF class 2, data encoding 2")
    no_sections = bytearray(module_bytes)
    struct.pack_into("<Q", no_sections, 0x28, 0)  # e_shoff = 0
    refused(written(tmp_path, bytes(no_sections)), "it has no section headers")
    far = bytearray(module_bytes)
    struct.pack_into("<Q", far, 0x28, 2**63)  # e_shoff far past the end (and past any seek)
    refused(written(tmp_path, bytes(far)), "lies past the end of the file")


def test_a_missing_file_is_a_loader_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=rf"^cannot read {tmp_path / 'absent.so'}: No such file"):
        elf.read(tmp_path / "absent.so")
    with pytest.raises(LoaderError, match=r"^cannot read .*absent\.so"):
        elf.imports(tmp_path / "absent.so")


def test_truncated_copies_are_refused_by_name(tmp_path: Path, module_bytes: bytes) -> None:
    shoff = struct.unpack_from("<Q", module_bytes, 0x28)[0]
    for size in (1, 63, 64, 4096, len(module_bytes) // 2, shoff, shoff + 100, len(module_bytes) - 1):
        refused(written(tmp_path, module_bytes[:size], f"cut-{size}.so"), "")


def test_a_string_offset_outside_its_table_is_refused(tmp_path: Path, module_bytes: bytes) -> None:
    data = bytearray(module_bytes)
    shoff, shnum = struct.unpack_from("<Q", data, 0x28)[0], struct.unpack_from("<H", data, 0x3C)[0]
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + 64 * i) for i in range(shnum)]
    dynsym = next(h for h in headers if h[1] == 11)
    undefined = next(
        off
        for off in range(dynsym[4] + 24, dynsym[4] + dynsym[5], 24)
        if struct.unpack_from("<H", data, off + 6)[0] == 0
    )
    struct.pack_into("<I", data, undefined, 0xFFFFFFF0)  # st_name of an undefined symbol
    refused(written(tmp_path, bytes(data)), "a symbol name: string offset 4294967280 is outside its string table")


# (offset in a section header, struct format) of sh_type, sh_offset, sh_size, sh_link, sh_entsize
SECTION_FIELDS = [(4, "<I"), (24, "<Q"), (32, "<Q"), (40, "<I"), (56, "<Q")]
ODD_VALUES = [0, 1, 3, 6, 8, 11, 23, 24, 25, 64, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_gives_a_result_or_a_loader_error(
    tmp_path: Path, module_bytes: bytes, data: st.DataObject
) -> None:
    buf = bytearray(module_bytes)
    shoff, shnum = struct.unpack_from("<Q", buf, 0x28)[0], struct.unpack_from("<H", buf, 0x3C)[0]
    dynsym = next(i for i in range(shnum) if struct.unpack_from("<I", buf, shoff + 64 * i + 4)[0] == 11)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):  # a field of a section header, the dynamic symbol table's most often
            index = data.draw(st.one_of(st.just(dynsym), st.just(dynsym + 1), st.integers(0, shnum - 1)))
            at, fmt = data.draw(st.sampled_from(SECTION_FIELDS))
            limit = 2 ** (8 * struct.calcsize(fmt)) - 1
            value = data.draw(st.one_of(st.sampled_from(ODD_VALUES), st.integers(0, len(buf))))
            struct.pack_into(fmt, buf, shoff + 64 * index + at, min(value, limit))
        else:  # a byte of the ELF header, or of a symbol entry (names, bindings, section indices)
            start, end = data.draw(st.sampled_from([(0, 64), (0x300, 0x2000)]))
            buf[data.draw(st.integers(start, end - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.integers(0, 9)) == 0:
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    path = written(tmp_path, bytes(buf))
    try:
        found = elf.read(path, exports=True)
    except LoaderError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:
        assert isinstance(found.undefined, tuple) and all(isinstance(n, str) for n in found.undefined)


def test_a_module_file_that_cannot_be_read_is_reported_not_raised(kernel_modules: list[str], tmp_path: Path) -> None:
    handle = loader.load_module("norm")
    bad = written(tmp_path, b"\x7fELF")
    check = symbols.check_loaded(bad, handle)
    assert check.loaded and not check.ok and check.unresolved == ()
    assert check.error.startswith(f"{bad}: not a readable ELF64 shared library")
    assert check.summary() == f"not checked: {check.error}"
    assert symbols.check_file(bad).error == check.error
