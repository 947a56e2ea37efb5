"""Kernel wheels already installed with pip (``pip install flashinfer-jit-cache``), used in place.

A kernel wheel pinned by the lock (``flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl``)
may already be installed in the environment, the way FlashInfer's documentation installs it. Its modules are
then loaded from the installed files instead of downloading (1-2 GB) and extracting the wheel, when the
installed distribution is the pinned build:

1. its name and version equal those in the pinned file name, and its ``WHEEL`` file lists one of the file
   name's tags (same local version such as ``+cu130``, same platform); and
2. something ties it to the pin's sha256, in this order:

   a. its ``direct_url.json`` (PEP 610; pip writes it when installing from a file or URL) records an archive
      sha256 equal to the pin's: pip installed exactly that file;
   b. the lock pins member hashes (``members``, e.g. from ``fi_ffi.loader.lock_entry(..., hash_members=True)``)
      and the installed ``RECORD`` gives every pinned member the same sha256;
   c. ``FI_FFI_TRUST_INSTALLED=1``: the user vouches for an installation that only matches by name, version
      and tags (an index install leaves no record of the wheel's sha256, and pip rewrites ``RECORD``, so
      nothing else can tie it to the pin).

   Without any of these the distribution is not used; the log says so once, with the fix.
3. Each file used is checked against its ``RECORD`` sha256 (and against the lock's member pin if there is
   one) before it is loaded; the check is remembered by a stamp (size, mtime) in the cache. A file that fails
   is not used (the wheel is fetched and extracted as usual) and the log says why.

The dist-info is read through :mod:`importlib.metadata`; the package is never imported (its ``__init__``
may import torch or flashinfer). Its folder is ``locate_file("")`` of the distribution, the same
folder that ``flashinfer_jit_cache.get_jit_cache_dir()`` points into.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoaderError
from . import cache, settings
from .lockfile import WheelPin, parse_wheel_filename
from .log import announce, logger, warn


@dataclass(frozen=True)
class Installed:
    """An installed distribution accepted for ``pin``: ``root`` is the folder its ``RECORD`` paths are
    relative to, ``record`` maps each ``.so`` path to (sha256 hex, size or None), ``why`` says what tied it
    to the pin."""

    pin: WheelPin
    name: str
    version: str
    root: Path
    record: dict[str, tuple[str, int | None]]
    why: str

    def index(self) -> dict[str, list[int]]:
        """The ``.so`` listing in the cache's format ({member: [size, crc32]}; crc32 unknown: -1)."""
        return {m: [size if size is not None else -1, -1] for m, (_, size) in self.record.items()}

    def member_file(self, member: str, *, recheck: bool = False) -> Path | None:
        """The installed file of ``member``, checked against ``RECORD`` (and the lock's member pin), or
        ``None`` (logged) if it is missing or differs. ``recheck`` hashes it even if a stamp vouches for it."""
        entry = self.record.get(member)
        if entry is None:
            return None
        expected, _ = entry
        pinned = self.pin.members.get(member, "")
        path = self.root / member
        where = f"{self.name} {self.version} installed at {self.root}"
        if pinned and pinned != expected:
            warn(f"{path} ({where}): RECORD says sha256 {expected}, the lock {self.pin.lock_path} pins {pinned}")
            return None
        if not recheck and cache.stamped(path, expected):
            return path
        try:
            actual = cache.sha256_file(path)
        except LoaderError as exc:
            warn(f"not using the installed {member} ({where}): {exc}")
            return None
        if actual != expected:
            warn(
                f"not using {path} ({where}): its sha256 is {actual}, its RECORD says {expected} (modified after "
                f"installation; `pip install --force-reinstall` repairs it); the pinned wheel is used instead"
            )
            return None
        cache.record_stamp(path, expected)
        return path


_found: dict[tuple[Any, ...], Installed | None] = {}
_told: set[tuple[str, str]] = set()


def find(pin: WheelPin) -> Installed | None:
    """The installed distribution to use for kernel pin ``pin``, or ``None`` (see the module docstring)."""
    if pin.kind != "kernel" or not settings.use_installed():
        return None
    key = (settings.snapshot(), pin.filename, pin.sha256, tuple(sorted(pin.members.items())), tuple(sys.path))
    if key not in _found:
        _found[key] = _find(pin)
    return _found[key]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find(pin: WheelPin) -> Installed | None:
    import importlib.metadata

    wanted = parse_wheel_filename(pin.filename)
    try:
        dists = list(importlib.metadata.distributions(name=_normalize(wanted.name)))
    except Exception as exc:  # a broken dist-info elsewhere on sys.path must not stop a start
        logger.debug("looking for an installed %s failed: %s", wanted.name, exc)
        return None
    for dist in dists:
        try:
            found = _accept(pin, dist)
        except (OSError, ValueError, LoaderError) as exc:  # unreadable or malformed dist-info: not used
            logger.debug("installed %s not usable: %s", wanted.name, exc)
            continue
        if found is not None:
            announce(
                f"using the installed {found.name} {found.version} at {found.root} for {pin.filename} ({found.why})"
            )
            return found
    return None


def _accept(pin: WheelPin, dist: Any) -> Installed | None:
    wanted = parse_wheel_filename(pin.filename)
    name, version = dist.metadata["Name"] or "", dist.version or ""
    if _normalize(name) != _normalize(wanted.name) or version != wanted.version:
        return None
    tags = {
        f"{py}-{abi}-{plat}"
        for py in wanted.python.split(".")
        for abi in wanted.abi.split(".")
        for plat in wanted.platform.split(".")
    }
    wheel_text = dist.read_text("WHEEL") or ""
    installed_tags = {line.partition(":")[2].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")}
    if not tags & installed_tags:
        return None
    record: dict[str, tuple[str, int | None]] = {}
    for file in dist.files or ():
        path = file.as_posix() if hasattr(file, "as_posix") else str(file)
        if path.endswith(".so") and file.hash is not None and file.hash.mode == "sha256":
            digest = base64.urlsafe_b64decode(file.hash.value + "=" * (-len(file.hash.value) % 4)).hex()
            record[path] = (digest, file.size)
    root = Path(dist.locate_file(""))
    why = _binding(pin, dist, record)
    if not why:
        told = (pin.filename, str(root))
        if told not in _told:
            _told.add(told)
            announce(
                f"{name} {version} is installed at {root} and matches {pin.filename} by version and tags, but "
                f"nothing ties it to the pinned sha256 {pin.sha256[:16]}... (no direct_url.json hash, no member "
                "hashes in the lock), so it is not used; set FI_FFI_TRUST_INSTALLED=1 to use it in place",
                logging.WARNING,
            )
        return None
    return Installed(pin=pin, name=name, version=version, root=root, record=record, why=why)


def _binding(pin: WheelPin, dist: Any, record: dict[str, tuple[str, int | None]]) -> str:
    """What ties the installed distribution to ``pin`` (module docstring, point 2), or ``""``."""
    text = dist.read_text("direct_url.json")
    if text:
        data = json.loads(text)
        info = data.get("archive_info", {}) if isinstance(data, dict) else {}
        hashes = info.get("hashes", {}) if isinstance(info, dict) else {}
        digest = hashes.get("sha256", "") if isinstance(hashes, dict) else ""
        if not digest and isinstance(info, dict) and str(info.get("hash", "")).startswith("sha256="):
            digest = str(info["hash"]).partition("=")[2]
        if digest == pin.sha256:
            return "direct_url.json records the pinned sha256"
    pinned = {m: h for m, h in pin.members.items() if m.endswith(".so")}
    if pinned and all(record.get(m, ("",))[0] == h for m, h in pinned.items()):
        return f"RECORD matches the lock's {len(pinned)} member hashes"
    if settings.trust_installed():
        return "trusted by FI_FFI_TRUST_INSTALLED"
    return ""
