"""What a shared library says about its linking, read from the file: ``DT_NEEDED``, ``DT_SONAME`` and the names
in its dynamic symbol table (ELF64 little-endian, the only format the kernel wheels ship; pure Python).

Kernel modules are loaded with lazy binding (:mod:`fi_ffi.loader.modules`), so a function symbol they reference
and nothing defines is not an error at ``dlopen``: the process aborts when code calling it first runs. Reading
the module's undefined symbols here is what lets the loader say so beforehand
(:mod:`fi_ffi.loader.symbols`).

Only what that needs is read: the ELF header, the section headers, ``.dynsym`` and its string table, and
``.dynamic`` (a few hundred KB even for a module of hundreds of MB of GPU code). Every offset and size is
checked against the file, so a truncated or damaged file is a :class:`~fi_ffi.errors.LoaderError` naming
it, never a ``struct.error`` or ``IndexError``. :func:`imports` caches its answer per file by (path, size,
mtime): a module file is read once per process.

Format: the System V gABI, "Object Files" (ELF header, section header table, symbol table, dynamic section).
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import LoaderError

_IDENT = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # e_ident .. e_shstrndx (64 bytes)
_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size (24 bytes)
_DYN = struct.Struct("<qQ")  # d_tag, d_val (16 bytes)
_SHT_STRTAB, _SHT_DYNAMIC, _SHT_NOBITS, _SHT_DYNSYM = 3, 6, 8, 11
_DT_NULL, _DT_NEEDED, _DT_SONAME = 0, 1, 14
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK, _STB_GNU_UNIQUE = 0, 1, 2, 10
_STV_DEFAULT, _STV_PROTECTED = 0, 3
_SHN_UNDEF = 0

_FIX = (
    "If the file is in the fi_ffi cache, `fi-ffi cache verify --full` removes damaged files so that they are "
    "extracted again; otherwise reinstall the package it came from"
)


@dataclass(frozen=True)
class DynamicSymbols:
    """The linking facts of one shared library file.

    ``needed``: the ``DT_NEEDED`` sonames, in order. ``soname``: its ``DT_SONAME`` (``""`` if none).
    ``undefined``: names of the symbols it references without defining them (``SHN_UNDEF``), binding global
    (not weak: a weak one may stay unresolved), sorted. ``weak_undefined``: the weak ones. ``exported``: the
    names it defines for others (global, weak or unique binding; default or protected visibility); filled
    only when read with ``exports=True`` (:func:`read`), else empty.
    """

    path: str
    soname: str
    needed: tuple[str, ...]
    undefined: tuple[str, ...]
    weak_undefined: tuple[str, ...]
    exported: frozenset[str] = frozenset()


class _Reader:
    """Bounds-checked reads of one open file; every failure names the file and what was being read."""

    def __init__(self, path: str, file: BinaryIO, size: int) -> None:
        self.path, self.file, self.size = path, file, size

    def damaged(self, what: str) -> LoaderError:
        return LoaderError(f"{self.path}: not a readable ELF64 shared library: {what}. {_FIX}")

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.damaged(
                f"{what} (offset {offset}, {length} bytes) lies past the end of the file ({self.size} bytes): "
                "it is truncated"
            )
        self.file.seek(offset)
        data = self.file.read(length)
        if len(data) != length:
            raise self.damaged(f"{what}: short read ({len(data)} of {length} bytes)")
        return data


def _string(table: bytes, offset: int, reader: _Reader, what: str) -> str:
    end = table.find(b"\0", offset)
    if offset >= len(table) or end < 0:
        raise reader.damaged(f"{what}: string offset {offset} is outside its string table ({len(table)} bytes)")
    return table[offset:end].decode("utf-8", "surrogateescape")


def read(path: str | os.PathLike[str], *, exports: bool = False) -> DynamicSymbols:
    """Read the dynamic symbols of the shared library at ``path`` (uncached; see :func:`imports`).

    ``exports``: also collect the names it defines (:attr:`DynamicSymbols.exported`), which costs a decode
    per symbol. :class:`LoaderError` naming ``path`` if the file cannot be read, is not ELF64 little-endian,
    has no section headers, or is truncated or damaged.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            reader = _Reader(name, file, os.fstat(file.fileno()).st_size)
            try:
                return _read(reader, exports)
            except (struct.error, IndexError, ValueError, OverflowError) as exc:  # a check above missed a case
                raise reader.damaged(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise LoaderError(f"cannot read {name}: {exc.strerror or exc}") from None


def _read(reader: _Reader, exports: bool) -> DynamicSymbols:
    if reader.size < _EHDR.size:
        raise reader.damaged(f"the file has {reader.size} bytes, fewer than an ELF64 header ({_EHDR.size})")
    header = reader.read(0, _EHDR.size, "the ELF header")
    ident, *_, shoff, _, _, _, _, shentsize, shnum, _ = _EHDR.unpack(header)
    if ident[:4] != _IDENT:
        raise reader.damaged(f"it does not start with the ELF magic number (found {ident[:4]!r})")
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
        raise reader.damaged(
            f"it is ELF class {ident[4]}, data encoding {ident[5]}; fi_ffi reads ELF64 little-endian "
            "(class 2, encoding 1) only"
        )
    if shoff == 0:
        raise reader.damaged("it has no section headers, so its dynamic symbol table cannot be found")
    if shentsize != _SHDR.size:
        raise reader.damaged(f"section header size {shentsize}, expected {_SHDR.size}")
    if shnum == 0:  # 65280 sections or more: the count is in section 0's sh_size
        shnum = _SHDR.unpack(reader.read(shoff, _SHDR.size, "section header 0"))[5]
    table = reader.read(shoff, shnum * _SHDR.size, f"the section header table ({shnum} entries)")
    sections = [_SHDR.unpack_from(table, i * _SHDR.size) for i in range(shnum)]  # found by type, not name

    def contents(index: int, what: str) -> bytes:
        if not 0 <= index < len(sections):
            raise reader.damaged(f"{what}: section index {index} is not among the {len(sections)} sections")
        _, sh_type, _, _, offset, size, *_ = sections[index]
        if sh_type == _SHT_NOBITS:
            raise reader.damaged(f"{what}: section {index} has no contents in the file")
        return reader.read(offset, size, f"{what} (section {index})")

    def string_table(of: int, what: str) -> bytes:  # the section sh_link of section ``of`` names
        index = sections[of][6]
        if not 0 <= index < len(sections) or sections[index][1] != _SHT_STRTAB:
            raise reader.damaged(f"the string table of {what} (section {index}) is missing or not a string table")
        return contents(index, f"the string table of {what}")

    dynsym = next((i for i, s in enumerate(sections) if s[1] == _SHT_DYNSYM), None)
    dynamic = next((i for i, s in enumerate(sections) if s[1] == _SHT_DYNAMIC), None)
    needed: list[str] = []
    soname = ""
    if dynamic is not None:
        data = contents(dynamic, ".dynamic")
        strings = string_table(dynamic, ".dynamic")
        for tag, value in _DYN.iter_unpack(data[: len(data) - len(data) % _DYN.size]):
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(_string(strings, value, reader, "a DT_NEEDED entry"))
            elif tag == _DT_SONAME:
                soname = _string(strings, value, reader, "the DT_SONAME entry")
    undefined: set[str] = set()
    weak: set[str] = set()
    exported: set[str] = set()
    if dynsym is not None:
        entsize = sections[dynsym][9]
        if entsize != _SYM.size:
            raise reader.damaged(f".dynsym entry size {entsize}, expected {_SYM.size}")
        data = contents(dynsym, ".dynsym")
        if len(data) % _SYM.size:
            raise reader.damaged(f".dynsym size {len(data)} is not a multiple of its entry size {_SYM.size}")
        strings = string_table(dynsym, ".dynsym")
        for index in range(len(data) // _SYM.size) if exports else _undefined_entries(data):
            st_name, info, other, shndx, _, _ = _SYM.unpack_from(data, index * _SYM.size)
            bind = info >> 4
            if st_name == 0 or bind == _STB_LOCAL:
                continue
            if shndx == _SHN_UNDEF:
                (weak if bind == _STB_WEAK else undefined).add(_string(strings, st_name, reader, "a symbol name"))
            elif other & 3 in (_STV_DEFAULT, _STV_PROTECTED):
                exported.add(_string(strings, st_name, reader, "a symbol name"))
    return DynamicSymbols(
        path=reader.path,
        soname=soname,
        needed=tuple(needed),
        undefined=tuple(sorted(undefined)),
        weak_undefined=tuple(sorted(weak)),
        exported=frozenset(exported),
    )


def _undefined_entries(dynsym: bytes) -> list[int]:
    """Indices of the entries of ``dynsym`` whose ``st_shndx`` is ``SHN_UNDEF`` (0).

    A module has thousands of symbols (it exports static libstdc++) and ~150 undefined ones: rather than
    unpack every entry in Python, the two bytes of every ``st_shndx`` (offsets 6 and 7 of each 24-byte entry)
    are taken with C-speed slices and OR'ed as two big integers; a zero byte of the result is an undefined
    entry. This keeps the read well under a millisecond for a large module.
    """
    low, high = dynsym[6 :: _SYM.size], dynsym[7 :: _SYM.size]
    both = (int.from_bytes(low, "little") | int.from_bytes(high, "little")).to_bytes(len(low), "little")
    found = []
    index = both.find(0)
    while index >= 0:
        found.append(index)
        index = both.find(0, index + 1)
    return found


_lock = threading.Lock()
_cache: dict[tuple[str, int, int], DynamicSymbols] = {}


def imports(path: str | os.PathLike[str]) -> DynamicSymbols:
    """:func:`read` without exports, once per file: the answer is kept by (path, size, mtime_ns), so a file
    replaced in place (extracted again) is read again. :class:`LoaderError` as for :func:`read`."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise LoaderError(f"cannot read {name}: {exc.strerror or exc}") from None
    key = (name, st.st_size, st.st_mtime_ns)
    found = _cache.get(key)
    if found is None:
        found = read(name)
        with _lock:
            _cache[key] = found
    return found
