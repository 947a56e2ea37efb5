"""The wheel lock: which prebuilt wheels fi_ffi uses, pinned by file name and sha256, and how one is chosen.

The packaged lock is ``wheels.lock`` at the repository root (shipped as ``fi_ffi/wheels.lock``);
``FI_FFI_LOCK`` names another file of the same format, which replaces it section by section (a user lock
with only ``[[kernel]]`` entries keeps the packaged ``[[runtime]]`` entries).

Format, version 1 (TOML, read with :mod:`tomllib`)::

    version = 1                                   # required; the format version

    [[kernel]]                                    # a FlashInfer JIT-cache wheel (any number of entries)
    filename = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl"   # required
    sha256 = "e5b0560a…"                          # required; of the whole file, 64 lowercase hex digits
    cuda = "13.0"                                 # required; CUDA runtime major.minor this entry serves
    arch = "x86_64"                               # required; a platform.machine() value: x86_64, aarch64
    sm = ["90a"]                                  # optional; GPU archs with code in it (absent: all)
    size = 25051210                               # optional; bytes
    url = "https://…/flashinfer_jit_cache-0.6.3%2Bcu130-…whl"   # optional; http(s) download address
    pip = "some-dist==1.0"                        # optional; a requirement fetched with `pip download`
    path = "wheels/my.whl"                        # optional; a local copy, relative to the lock's folder
    prefix = "flashinfer_jit_cache/jit_cache"     # optional (this default); holds <uri>/<uri>.so members
    note = "…"                                    # optional; free text
    members = { "flashinfer_jit_cache/jit_cache/norm/norm.so" = "…" }   # optional; member sha256s
    release = "0.6.3"                             # optional; the FlashInfer release the kernels were built from
    priority = 0                                  # optional (this default); higher wins a shared module name
    modules = ["gdn_prefill_sm90", "batch_*"]     # optional; serve only these modules (fnmatch patterns)

    [[runtime]]                                   # the TVM-FFI runtime wheel; at most one per arch
    # filename, sha256, arch, size, url, pip, path, note, members: as above
    library = "tvm_ffi/lib/libtvm_ffi.so"         # optional (this default); the member to load

Unknown keys are errors (a typo must not silently drop a pin). Where a wheel comes from, in order: the
cache, ``FI_FFI_WHEELHOUSE``, ``path``, ``url``, ``pip``; whatever the source, its sha256 must match.

Selection (:func:`select`): among ``[[kernel]]`` entries for the machine's arch and the CUDA runtime's
major version, the highest minor not above the runtime's minor wins; every entry at that version is used
(several wheels may split the kernels by GPU arch), minus those whose ``sm`` list misses ``FI_FFI_SM``.

Several FlashInfer releases in one lock (:func:`provider`): module names repeat across releases (``norm``,
``page``, ...), so when more than one selected entry holds a module, the one that serves it is, in order:

1. only entries whose ``modules`` list (if any) matches the name are considered;
2. the highest ``priority`` wins;
3. at equal priority, the newest ``release`` wins (``0.7.2.post1`` over ``0.6.3``);
4. at equal priority and release (one build split over several wheels, or no release recorded anywhere),
   the first entry in the lock wins.

An entry with a ``release`` and one without it at equal priority both holding the module cannot be
ordered: that is a :class:`LockError` saying to record the release (``fi-ffi lock`` writes it) or to set
``priority``. By default a lock of 0.6.3 and 0.7.2 wheels thus takes every shared module from 0.7.2 and
the rest (``gdn_prefill_sm90``, the single prefill/decode modules) from 0.6.3.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import LockError
from . import settings

FORMAT_VERSION = 1
DEFAULT_PREFIX = "flashinfer_jit_cache/jit_cache"
DEFAULT_LIBRARY = "tvm_ffi/lib/libtvm_ffi.so"

Kind = Literal["kernel", "runtime"]

_COMMON_KEYS = {"filename", "sha256", "arch", "size", "url", "pip", "path", "note", "members"}
_KEYS: dict[str, set[str]] = {
    "kernel": _COMMON_KEYS | {"cuda", "sm", "prefix", "release", "priority", "modules"},
    "runtime": _COMMON_KEYS | {"library"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "kernel": ("filename", "sha256", "cuda", "arch"),
    "runtime": ("filename", "sha256", "arch"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CUDA = re.compile(r"^(\d+)\.(\d+)$")
# The subset of PEP 440 FlashInfer releases use: 0.6.3, 0.7.2.post1, 0.8.0rc1, 0.8.0.dev2.
_RELEASE = re.compile(r"^(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?$")
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


@dataclass(frozen=True)
class WheelPin:
    """One lock entry: a wheel pinned by file name and sha256, plus where to get it.

    ``size`` is in bytes; ``members`` maps member paths to their sha256; ``lock_path`` is the lock file the
    entry came from (relative ``path`` values are resolved against its folder).
    """

    kind: Kind
    filename: str
    sha256: str
    arch: str
    lock_path: Path
    cuda: str = ""
    sm: tuple[str, ...] = ()
    size: int | None = None
    url: str = ""
    pip: str = ""
    path: str = ""
    prefix: str = DEFAULT_PREFIX
    library: str = DEFAULT_LIBRARY
    note: str = ""
    members: Mapping[str, str] = field(default_factory=dict)
    release: str = ""
    priority: int = 0
    modules: tuple[str, ...] = ()

    def serves(self, uri: str) -> bool:
        """True if this entry may provide module ``uri``: it has no ``modules`` list, or one pattern matches."""
        import fnmatch

        return not self.modules or any(fnmatch.fnmatchcase(uri, pattern) for pattern in self.modules)

    @property
    def local_path(self) -> Path | None:
        """``path`` resolved against the lock's folder, or ``None`` if the entry has none."""
        if not self.path:
            return None
        p = Path(os.path.expanduser(self.path))
        return p if p.is_absolute() else self.lock_path.parent / p

    def module_member(self, uri: str) -> str:
        """The member path of kernel module ``uri`` inside this wheel."""
        return f"{self.prefix}/{uri}/{uri}.so"

    def describe(self) -> str:
        """One line naming the file and what it serves."""
        what = f"CUDA {self.cuda}, {self.arch}" if self.kind == "kernel" else self.arch
        if self.release:
            what = f"FlashInfer {self.release}, {what}"
        if self.sm:
            what += f", sm {','.join(self.sm)}"
        return f"{self.filename} ({what})"


@dataclass(frozen=True)
class Lock:
    """A parsed lock file. ``sources`` says, per section, which file its entries came from."""

    path: Path
    kernels: tuple[WheelPin, ...]
    runtimes: tuple[WheelPin, ...]
    sources: Mapping[str, Path] = field(default_factory=dict)

    def all_pins(self) -> tuple[WheelPin, ...]:
        """Kernel and runtime entries, kernels first."""
        return self.kernels + self.runtimes


@dataclass(frozen=True)
class Selection:
    """The wheels chosen for this machine and why.

    ``cuda`` is the CUDA runtime version the choice was made for (``"13.0"``), ``cuda_source`` where that
    version came from, ``arch`` the machine arch, ``kernels`` the chosen kernel wheels (several when the
    kernels are split per GPU arch), ``runtime`` the runtime wheel for the arch (``None`` if the lock has
    none), ``reason`` a sentence for a doctor report.
    """

    lock_path: Path
    cuda: str
    cuda_source: str
    arch: str
    kernels: tuple[WheelPin, ...]
    runtime: WheelPin | None
    reason: str


# ---------------------------------------------------------------------------------------------- parsing


def default_lock_path() -> Path:
    """The packaged lock, ``fi_ffi/wheels.lock``."""
    return Path(__file__).resolve().parent.parent / "wheels.lock"


def active_lock_path() -> Path:
    """``FI_FFI_LOCK`` if set, else the packaged lock."""
    user = settings.get(settings.LOCK)
    return Path(os.path.expanduser(user)).absolute() if user else default_lock_path()


def parse_lock(text: str, path: Path) -> Lock:
    """Parse and validate lock text; ``path`` is used in messages and to resolve relative ``path`` keys."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: not valid TOML: {exc}") from None
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise LockError(
            f"{path}: 'version = {FORMAT_VERSION}' is required (found {version!r}); "
            "this fi_ffi reads lock format version 1 only"
        )
    unknown = set(data) - {"version", "kernel", "runtime"}
    if unknown:
        raise LockError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [[kernel]] / [[runtime]]")
    kernels = tuple(_parse_entries(data, "kernel", path))
    runtimes = tuple(_parse_entries(data, "runtime", path))
    seen_arch: set[str] = set()
    for pin in runtimes:
        if pin.arch in seen_arch:
            raise LockError(f"{path}: more than one [[runtime]] entry for arch {pin.arch}")
        seen_arch.add(pin.arch)
    return Lock(path=path, kernels=kernels, runtimes=runtimes, sources={"kernel": path, "runtime": path})


def read_lock(path: Path) -> Lock:
    """Read and parse the lock file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LockError(f"cannot read the wheel lock {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LockError(
            f"the wheel lock {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}); "
            "a lock is a TOML file: save it as UTF-8, or regenerate it with `fi-ffi lock WHEEL...`"
        ) from None
    return parse_lock(text, Path(path))


def active_lock() -> Lock:
    """The lock in force: ``FI_FFI_LOCK`` (its missing sections taken from the packaged lock) or the default."""
    path = active_lock_path()
    lock = read_lock(path)
    default = default_lock_path()
    if path == default or (lock.kernels and lock.runtimes):
        return lock
    base = read_lock(default)
    kernels, runtimes = lock.kernels, lock.runtimes
    sources = dict(lock.sources)
    if not kernels:
        kernels, sources["kernel"] = base.kernels, default
    if not runtimes:
        runtimes, sources["runtime"] = base.runtimes, default
    return Lock(path=path, kernels=kernels, runtimes=runtimes, sources=sources)


def _parse_entries(data: dict[str, Any], kind: Kind, path: Path) -> list[WheelPin]:
    entries = data.get(kind, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LockError(f"{path}: '{kind}' must be an array of tables, written [[{kind}]]")
    return [_parse_entry(e, kind, path, i) for i, e in enumerate(entries)]


def _parse_entry(entry: dict[str, Any], kind: Kind, path: Path, index: int) -> WheelPin:
    where = f"{path}: [[{kind}]] entry {index + 1}"
    if "filename" in entry:
        where += f" ({entry['filename']})"
    unknown = set(entry) - _KEYS[kind]
    if unknown:
        raise LockError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS[kind])}")
    for key in _REQUIRED[kind]:
        if key not in entry:
            raise LockError(f"{where}: '{key}' is required")
    for key in ("filename", "sha256", "cuda", "arch", "url", "pip", "path", "prefix", "library", "note"):
        if key in entry and not isinstance(entry[key], str):
            raise LockError(f"{where}: '{key}' must be a string")
    filename = entry["filename"]
    if not filename.endswith(".whl") or "/" in filename or "\\" in filename or filename.startswith("."):
        raise LockError(f"{where}: 'filename' must be a bare wheel file name ending in .whl")
    sha = entry["sha256"].lower()
    if not _SHA256.match(sha):
        raise LockError(f"{where}: 'sha256' must be 64 hex digits")
    cuda = entry.get("cuda", "")
    if kind == "kernel" and not _CUDA.match(cuda):
        raise LockError(f"{where}: 'cuda' must be 'major.minor', like \"13.0\" (found {cuda!r})")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise LockError(f"{where}: 'size' must be a byte count")
    url = entry.get("url", "")
    if url and not url.startswith(("https://", "http://")):
        raise LockError(f"{where}: 'url' must be an http:// or https:// address")
    sm = entry.get("sm", [])
    if not isinstance(sm, list) or not all(isinstance(s, str) and s for s in sm):
        raise LockError(f'{where}: \'sm\' must be a list of GPU arch strings like ["90a", "100a"]')
    members = entry.get("members", {})
    if not isinstance(members, dict) or not all(
        isinstance(v, str) and _SHA256.match(v.lower()) for v in members.values()
    ):
        raise LockError(f"{where}: 'members' must map member paths to sha256 hex strings")
    release = entry.get("release", "")
    if not isinstance(release, str) or (release and not _RELEASE.match(release)):
        raise LockError(f"{where}: 'release' must be a FlashInfer version like \"0.7.2.post1\" (found {release!r})")
    priority = entry.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise LockError(f"{where}: 'priority' must be an integer (higher wins a module name several entries hold)")
    modules = entry.get("modules")
    if modules is None:
        modules = []
    elif (
        not isinstance(modules, list)
        or not modules
        or not all(isinstance(m, str) and m and "/" not in m for m in modules)
    ):
        raise LockError(
            f"{where}: 'modules' must be a non-empty list of module names or fnmatch patterns, like [\"norm\", "
            '"batch_prefill_*"]'
        )
    for key in ("prefix", "library"):
        value = entry.get(key)
        if value is not None and (not value or value.startswith("/") or ".." in value.split("/")):
            raise LockError(f"{where}: '{key}' must be a relative member path inside the wheel")
    return WheelPin(
        kind=kind,
        filename=filename,
        sha256=sha,
        arch=normalize_arch(entry["arch"]),
        lock_path=path,
        cuda=cuda,
        sm=tuple(s.lower().removeprefix("sm_").removeprefix("sm") for s in sm),
        size=size,
        url=url,
        pip=entry.get("pip", ""),
        path=entry.get("path", ""),
        prefix=entry.get("prefix", DEFAULT_PREFIX).rstrip("/"),
        library=entry.get("library", DEFAULT_LIBRARY),
        note=entry.get("note", ""),
        members={k: v.lower() for k, v in members.items()},
        release=release,
        priority=priority,
        modules=tuple(modules),
    )


# -------------------------------------------------------------------------------------------- selection


def normalize_arch(arch: str) -> str:
    """``platform.machine()`` spellings mapped to the lock's (``AMD64`` → ``x86_64``, ``arm64`` → ``aarch64``)."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


def machine_arch() -> str:
    """This machine's arch, as the lock spells it."""
    return normalize_arch(platform.machine())


def parse_cuda_version(text: str, what: str = "CUDA version") -> tuple[int, int]:
    """``"13.0"`` → ``(13, 0)``; anything else is a :class:`LockError` naming ``what``."""
    m = _CUDA.match(text.strip())
    if not m:
        raise LockError(f"{what} must be 'major.minor', like 13.0 (found {text!r})")
    return int(m.group(1)), int(m.group(2))


def select_runtime(lock: Lock, arch: str) -> WheelPin | None:
    """The ``[[runtime]]`` entry for ``arch``, or ``None``."""
    arch = normalize_arch(arch)
    return next((p for p in lock.runtimes if p.arch == arch), None)


def select(lock: Lock, cuda: str, arch: str, *, cuda_source: str = "given", sm: tuple[str, ...] = ()) -> Selection:
    """Choose the kernel wheels for CUDA runtime ``cuda`` (``"13.2"``) on ``arch``; see the module docstring.

    Raises :class:`LockError` naming the CUDA version, the arch and the lock file when nothing fits.
    """
    major, minor = parse_cuda_version(cuda)
    arch = normalize_arch(arch)
    kernel_lock = lock.sources.get("kernel", lock.path)
    same_arch = [p for p in lock.kernels if p.arch == arch]
    fits = [p for p in same_arch if parse_cuda_version(p.cuda)[0] == major and parse_cuda_version(p.cuda)[1] <= minor]
    if not fits:
        offered = sorted({f"{p.cuda}/{p.arch}" for p in lock.kernels}) or ["none"]
        raise LockError(
            f"the wheel lock {kernel_lock} has no kernel wheel for CUDA {major}.{minor} on {arch} "
            f"(it pins CUDA/arch: {', '.join(offered)}). Kernel wheels are chosen by the CUDA runtime's major "
            f"version and the highest minor not above it. Install a CUDA runtime the lock covers, or pin a "
            f"wheel built for CUDA {major}.x on {arch} in a lock of your own (`fi-ffi lock WHEEL`, then "
            f"FI_FFI_LOCK=that file)"
        )
    best = max(parse_cuda_version(p.cuda)[1] for p in fits)
    chosen = [p for p in fits if parse_cuda_version(p.cuda)[1] == best]
    dropped = []
    if sm:
        wanted = set(sm)
        dropped = [p for p in chosen if p.sm and not wanted.intersection(p.sm)]
        chosen = [p for p in chosen if p not in dropped]
        if not chosen:
            raise LockError(
                f"the wheel lock {kernel_lock} has kernel wheels for CUDA {major}.{best} on {arch}, but none "
                f"for GPU arch {','.join(sm)} (FI_FFI_SM); they cover sm "
                f"{', '.join(sorted({s for p in dropped for s in p.sm}))}"
            )
    versions = sorted({p.cuda for p in same_arch}, key=parse_cuda_version)
    reason = (
        f"CUDA runtime {major}.{minor} ({cuda_source}) on {arch}: the lock {kernel_lock} offers CUDA "
        f"{', '.join(versions)} for {arch}; chose {major}.{best}, the highest {major}.x not above {major}.{minor}"
    )
    if len(chosen) > 1:
        reason += f" ({len(chosen)} wheels)"
    releases = sorted({p.release for p in chosen if p.release}, key=release_key)
    if releases:
        reason += f"; FlashInfer {', '.join(releases)}"
    if dropped:
        reason += f"; skipped {len(dropped)} wheel(s) without sm {','.join(sm)} (FI_FFI_SM)"
    runtime = select_runtime(lock, arch)
    return Selection(
        lock_path=lock.path,
        cuda=f"{major}.{minor}",
        cuda_source=cuda_source,
        arch=arch,
        kernels=tuple(chosen),
        runtime=runtime,
        reason=reason,
    )


def release_key(release: str) -> tuple[Any, ...]:
    """A sort key ordering FlashInfer releases by PEP 440 (``0.6.3`` < ``0.7.0rc1`` < ``0.7.0`` < ``0.7.2.post1``).

    ``""`` (not recorded) sorts before every release; anything else not of the form N.N[.N][aN|bN|rcN]
    [.postN][.devN] is a :class:`LockError`.
    """
    if not release:
        return ((), 0, 0, 0, 0)
    m = _RELEASE.match(release)
    if m is None:
        raise LockError(f"{release!r} is not a FlashInfer release (a version like 0.7.2.post1)")
    numbers, pre, pre_n, post, dev = m.groups()
    parts = tuple(int(x) for x in numbers.split("."))
    while len(parts) > 1 and parts[-1] == 0:  # 0.7 == 0.7.0
        parts = parts[:-1]
    # A final release sorts after its pre-releases (3) and its dev releases (-1 before a0); post after both.
    pre_rank = {"a": 0, "b": 1, "rc": 2}[pre] if pre else (3 if dev is None or post is not None else -1)
    return (parts, pre_rank, int(pre_n or 0), int(post) if post is not None else -1, int(dev) if dev else 1 << 30)


def release_from_version(version: str) -> str:
    """The FlashInfer release a wheel version names: its public part (``0.7.2.post1+cu130.sm90a`` → ``0.7.2.post1``),
    or ``""`` when that is not a release number."""
    public = version.partition("+")[0]
    return public if _RELEASE.match(public) else ""


def provider(uri: str, pins: Sequence[WheelPin], holds: Callable[[WheelPin], bool]) -> WheelPin | None:
    """The entry of ``pins`` (the selected kernel entries, in lock order) that serves module ``uri``.

    ``holds(pin)`` says whether the pin's wheel has the module; it is asked lazily, in precedence order, so a
    wheel ranked below the winner is not read. Rules: see the module docstring. ``None`` if no entry serves
    ``uri``; :class:`LockError` when an entry with a release and one without tie on priority for it.
    """
    serving = [p for p in pins if p.serves(uri)]
    for priority in sorted({p.priority for p in serving}, reverse=True):
        tier = [p for p in serving if p.priority == priority]
        recorded = [p for p in tier if p.release]
        if recorded and len(recorded) < len(tier):
            holders = [p for p in tier if holds(p)]
            known = [p for p in holders if p.release]
            unknown = [p for p in holders if not p.release]
            if known and unknown:
                raise LockError(
                    f"module {uri!r} is in {known[0].filename} (FlashInfer {known[0].release}) and in "
                    f"{unknown[0].filename} (no release recorded), both at priority {priority} in the lock "
                    f'{known[0].lock_path}, so fi_ffi cannot tell which to use. Add release = "…" to the '
                    f"entry of {unknown[0].filename} (`fi-ffi lock` writes it), or give one entry a higher "
                    f"'priority' or a 'modules' list"
                )
            tier = holders
        # sorted() is stable: among equal releases the lock order stands.
        for pin in sorted(tier, key=lambda p: release_key(p.release), reverse=True):
            if holds(pin):
                return pin
    return None


# ------------------------------------------------------------------------------------ writing lock entries


@dataclass(frozen=True)
class WheelName:
    """The fields of a wheel file name (PEP 427): ``name-version[-build]-python-abi-platform.whl``."""

    name: str
    version: str
    python: str
    abi: str
    platform: str

    @property
    def local(self) -> str:
        """The local version label (``"cu130.sm90a"`` of ``0.6.3+cu130.sm90a``), or ``""``."""
        return self.version.partition("+")[2]

    @property
    def last_platform(self) -> str:
        """The last of the dot-separated platform tags (``manylinux_2_28_x86_64``)."""
        return self.platform.split(".")[-1]

    @property
    def arch(self) -> str:
        """The arch in the platform tag (``x86_64``, ``aarch64``), or ``""``."""
        for arch in ("x86_64", "aarch64"):
            if self.last_platform.endswith(arch):
                return arch
        return ""


def parse_wheel_filename(filename: str) -> WheelName:
    """Split a wheel file name into its fields; :class:`LockError` if it is not one."""
    base = os.path.basename(filename)
    parts = base.removesuffix(".whl").split("-")
    if not base.endswith(".whl") or len(parts) not in (5, 6):
        raise LockError(f"{base!r} is not a wheel file name (name-version-python-abi-platform.whl)")
    return WheelName(parts[0], parts[1], parts[-3], parts[-2], parts[-1])


def cuda_from_label(label: str) -> str:
    """The CUDA version in a local version label: ``cu130`` → ``"13.0"``, ``cu128.sm90a`` → ``"12.8"``."""
    for token in re.split(r"[._-]", label):
        m = re.fullmatch(r"cu(\d{2,3})", token)
        if m:
            digits = m.group(1)
            return f"{int(digits[:-1])}.{digits[-1]}"
    return ""


def sm_from_label(label: str) -> tuple[str, ...]:
    """The GPU archs in a local version label: ``cu130.sm90a`` → ``("90a",)``."""
    return tuple(m.group(1) for t in re.split(r"[._-]", label) if (m := re.fullmatch(r"sm_?(\d+[a-z]?)", t)))


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's contents (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_entry(
    wheel: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    cuda: str | None = None,
    arch: str | None = None,
    sm: Iterable[str] | None = None,
    url: str = "",
    pip: str = "",
    path: str = "",
    hash_members: bool = False,
    release: str | None = None,
) -> WheelPin:
    """A lock entry for the local wheel file ``wheel`` (hashes it; reads its zip directory).

    ``kind`` is guessed from the members (``tvm_ffi/lib/libtvm_ffi.so`` → runtime; ``*/jit_cache/<uri>/<uri>.so``
    → kernel, with its ``prefix``). For kernel wheels ``cuda``, ``arch``, ``sm`` and the FlashInfer ``release``
    are read from the file name (``…-0.7.2.post1+cu130.sm90a-…-linux_x86_64.whl``; sm also from a provider
    wheel's name, ``flashinfer_jit_cache_sm90a-…``) unless given. ``path`` is written as given (``""``: no
    ``path`` key). ``hash_members`` records the sha256 of every ``.so`` member.

    A wheel with neither kernel modules nor the runtime library (e.g. the ``flashinfer-jit-cache`` 0.7.x
    metadata wheel, whose modules are in per-architecture provider wheels) is a :class:`NothingToPinError`
    unless ``kind`` is given; :func:`lock_entries` skips such wheels with a note.
    """
    import zipfile

    file = Path(wheel)
    name = parse_wheel_filename(file.name)
    try:
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
            prefix = _guess_prefix(names)
            guessed: Kind | None = "runtime" if DEFAULT_LIBRARY in names else ("kernel" if prefix else None)
            kind = kind or guessed
            if kind is None:
                requires = _requirements(zf, names)
                needs = f"; it requires {', '.join(requires)}: pin those wheels" if requires else ""
                raise NothingToPinError(
                    f"{file}: neither a kernel wheel (no <prefix>/jit_cache/<uri>/<uri>.so members) nor a TVM-FFI "
                    f"runtime wheel (no {DEFAULT_LIBRARY}){needs}; to pin it anyway say which with kind= "
                    "(`fi-ffi lock --kind kernel|runtime`)"
                )
            members: dict[str, str] = {}
            if hash_members:
                for info in zf.infolist():
                    if info.filename.endswith(".so"):
                        h = hashlib.sha256()
                        with zf.open(info) as src:
                            while block := src.read(1 << 20):
                                h.update(block)
                        members[info.filename] = h.hexdigest()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise LockError(
            f"cannot read the wheel {file}: {exc}: the file is damaged or incomplete (a truncated download or "
            f"copy?); download or copy it again, then pin it"
        ) from None
    except OSError as exc:
        raise LockError(f"cannot read the wheel {file}: {exc.strerror or exc}") from None
    arch = normalize_arch(arch or name.arch)
    if not arch:
        raise LockError(f"{file.name}: cannot tell the arch from the file name; pass arch=")
    if kind == "kernel":
        cuda = cuda or cuda_from_label(name.local)
        if not cuda:
            raise LockError(f"{file.name}: no cuXYZ tag in the version; pass cuda='13.0' (the CUDA it was built for)")
        parse_cuda_version(cuda)
    pin = WheelPin(
        kind=kind,
        filename=file.name,
        sha256=sha256_of(file),
        arch=arch,
        lock_path=file.absolute(),
        cuda=(cuda or "") if kind == "kernel" else "",
        sm=tuple(sm) if sm is not None else (_sm_of(name) if kind == "kernel" else ()),
        size=file.stat().st_size,
        url=url,
        pip=pip,
        path=path,
        members=members,
        release=(release if release is not None else release_from_version(name.version)) if kind == "kernel" else "",
    )
    if pin.release and not _RELEASE.match(pin.release):
        raise LockError(f"release={pin.release!r} is not a FlashInfer version like 0.7.2.post1")
    if kind == "kernel" and prefix and prefix != DEFAULT_PREFIX:
        pin = replace(pin, prefix=prefix)
    return pin


class NothingToPinError(LockError):
    """A wheel with no kernel modules and no runtime library (a metadata-only wheel); :func:`lock_entries` skips it."""


def lock_entries(
    wheels: Iterable[str | os.PathLike[str]], *, kind: Kind | None = None, url: str = "", cuda: str | None = None
) -> tuple[list[WheelPin], list[str]]:
    """Lock entries for a set of local wheels (one release split over several wheels, or several releases).

    ``cuda`` (``"12.9"``) is recorded for every kernel wheel in place of the version its file name tags (for a wheel
    whose name has no ``cuXYZ`` tag); each entry records its own CUDA version otherwise.

    Returns (entries, notes): a wheel with nothing to load (no kernel modules, no runtime library), such as
    the 0.7.x ``flashinfer-jit-cache`` metadata wheel next to its per-architecture provider wheels, is left
    out with a note saying why, since fi_ffi would never read it. :class:`LockError` if no wheel is left.
    """
    pins: list[WheelPin] = []
    notes: list[str] = []
    for wheel in wheels:
        try:
            pins.append(lock_entry(wheel, kind=kind, url=url, cuda=cuda))
        except NothingToPinError as exc:
            notes.append(f"skipped {exc}")
    if not pins:
        raise LockError("nothing to pin: " + "; ".join(notes) if notes else "nothing to pin: no wheel given")
    return pins, notes


def _requirements(zf: Any, names: list[str]) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA (what a metadata-only wheel pulls in), or []."""
    import zipfile
    import zlib

    meta = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
    if meta is None:
        return []
    try:
        text = zf.read(meta)[: 1 << 20].decode("utf-8", errors="replace")
    except (OSError, RuntimeError, NotImplementedError, zlib.error, zipfile.BadZipFile):
        return []  # only a hint for the message; the wheel's other faults are reported where it is used
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _sm_of(name: WheelName) -> tuple[str, ...]:
    """GPU archs named by a wheel: its local label (``+cu130.sm90a``), else its name (``…_sm90a``, upstream's
    per-architecture provider wheels)."""
    return sm_from_label(name.local) or sm_from_label(name.name)


def _guess_prefix(names: list[str]) -> str:
    for n in names:
        parts = n.split("/")
        if len(parts) >= 3 and parts[-1] == parts[-2] + ".so" and parts[-3] == "jit_cache":
            return "/".join(parts[:-2])
    return ""


def dump_lock(pins: Iterable[WheelPin], *, header: str = "") -> str:
    """Lock file text (format version 1) holding ``pins``; ``header`` lines are written as comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines.append(f"version = {FORMAT_VERSION}")
    for pin in sorted(pins, key=lambda p: p.kind):  # stable: kernels first, then runtime
        lines += ["", f"[[{pin.kind}]]"]
        fields: list[tuple[str, Any]] = [("filename", pin.filename), ("sha256", pin.sha256)]
        if pin.kind == "kernel":
            fields.append(("cuda", pin.cuda))
        fields.append(("arch", pin.arch))
        if pin.sm:
            fields.append(("sm", list(pin.sm)))
        if pin.size is not None:
            fields.append(("size", pin.size))
        for key in ("url", "pip", "path", "note"):
            if getattr(pin, key):
                fields.append((key, getattr(pin, key)))
        if pin.kind == "kernel" and pin.prefix != DEFAULT_PREFIX:
            fields.append(("prefix", pin.prefix))
        if pin.release:
            fields.append(("release", pin.release))
        if pin.priority:
            fields.append(("priority", pin.priority))
        if pin.modules:
            fields.append(("modules", list(pin.modules)))
        if pin.kind == "runtime" and pin.library != DEFAULT_LIBRARY:
            fields.append(("library", pin.library))
        lines += [f"{k} = {_toml_value(v)}" for k, v in fields]
        if pin.members:
            lines.append(f"[{pin.kind}.members]")
            lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in sorted(pin.members.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are a subset of TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a lock")
