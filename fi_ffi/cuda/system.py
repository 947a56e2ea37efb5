"""What this machine offers: NVIDIA driver, CUDA runtime, GPUs and their compute capability, glibc.

Used by ``fi-ffi doctor`` and ``fi-ffi smoke``. Every query degrades to a readable "not available" on a
machine without a GPU or driver; nothing here raises for a missing GPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import CudaError


@dataclass(frozen=True)
class GPU:
    """One CUDA device: ordinal, name, compute capability (major, minor), memory in bytes."""

    ordinal: int
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    @property
    def sm(self) -> str:
        """The architecture as ``"90"`` for compute capability 9.0."""
        return f"{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class SystemReport:
    """Facts for a doctor report; the ``*_error`` fields say why a fact is missing.

    ``driver_version`` is the newest CUDA the driver runs (``"12.8"``; ``driver_summary`` says it in a sentence, with
    the driver's release where ``/proc`` tells it); ``runtime_version`` is what the loaded libcudart
    (``runtime_path``) reports; ``cuda_version_override`` is ``FI_FFI_CUDA_VERSION`` as set (``""`` if unset), which
    wheel selection uses instead; ``bindings_version`` is cuda-bindings' release and ``bindings_runtime`` the CUDA
    version of the runtime it links (its own calls: device queries, allocations, streams).
    """

    python: str
    arch: str
    glibc: str
    driver_version: str = ""
    driver_error: str = ""
    driver_summary: str = ""
    bindings_version: str = ""
    bindings_runtime: str = ""
    runtime_version: str = ""
    runtime_path: str = ""
    runtime_error: str = ""
    cuda_version_override: str = ""
    gpus: list[GPU] = field(default_factory=list)
    gpu_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def glibc_version() -> str:
    """The C library's version, e.g. ``"glibc 2.36"`` (empty if not glibc)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ""


def _version_text(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def cudart_version(path: str) -> str:
    """The version the CUDA runtime library at ``path`` reports (``cudaRuntimeGetVersion``), e.g. ``"13.0"``.

    Asked through the loader's cffi binding (:func:`fi_ffi.loader.libraries.cudart_version`); raises
    :class:`~fi_ffi.errors.LibraryLoadError` if the library cannot be opened or does not answer.
    """
    from ..loader import libraries

    return libraries.cudart_version(path)


def gpus() -> tuple[list[GPU], str]:
    """The CUDA devices and an error text ("" if the query worked): the :class:`~fi_ffi.errors.CudaError`'s, which
    names the call, the CUDA error and the fix."""
    found, error = _devices()
    return found, "" if error is None else str(error)


def _devices() -> tuple[list[GPU], CudaError | None]:
    """The CUDA devices, and the error that ended the query (None if it worked)."""
    from ..errors import CudaError
    from . import runtime as cuda_runtime

    found: list[GPU] = []
    try:
        rt = cuda_runtime.runtime()
        count = cuda_runtime.check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        for ordinal in range(count):
            prop = cuda_runtime.check(rt.cudaGetDeviceProperties(ordinal), f"cudaGetDeviceProperties({ordinal})")
            raw = prop.name
            name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            found.append(GPU(ordinal, name, (prop.major, prop.minor), int(prop.totalGlobalMem)))
    except CudaError as exc:
        return found, exc
    return found, None


DOCTOR_HINT = "`fi-ffi doctor` shows what this machine has"
MESSAGE_WIDTH = 100  # columns of a no_gpu_message line


def no_gpu_message(needs: str) -> str:
    """``""`` where CUDA finds a GPU, else what to tell the user of ``needs`` (``"the engine"``, a script's name)
    instead of a CUDA traceback: a first line saying that it needs an NVIDIA GPU and its driver, then, indented and
    wrapped at 100 columns, why there is none (the failed call and its cause) and the fix, naming
    ``fi-ffi doctor`` once."""
    found, error = _devices()
    if found:
        return ""
    cause = "CUDA reports no device" if error is None else f"{error.what} failed: {error.description}"
    fix = "" if error is None else error.hint
    if "fi-ffi doctor" not in fix:
        fix = f"{fix.rstrip('.')}; {DOCTOR_HINT}" if fix else DOCTOR_HINT
    lines = [f"{needs} needs an NVIDIA GPU and its driver, and none is usable here:"]
    for text in (cause, fix):
        lines += _wrapped(text, MESSAGE_WIDTH, "  ")
    return "\n".join(lines)


def _wrapped(text: str, width: int, indent: str) -> list[str]:
    """``text`` in lines of at most ``width`` columns, each starting with ``indent``; a `backticked command` is
    never split (a word longer than the width has a line of its own)."""
    import re

    lines: list[str] = []
    line = ""
    for word in re.findall(r"`[^`]*`\S*|\S+", text):
        if line and len(indent) + len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(indent + line)
    return lines


def report() -> SystemReport:
    """Collect the facts (loads libcudart through the loader if it can; loads no kernel)."""
    info: dict[str, Any] = {"python": platform.python_version(), "arch": platform.machine(), "glibc": glibc_version()}
    from . import driver, requirements
    from . import runtime as cuda_runtime

    probed = driver.probe()  # libcuda.so.1 through cffi: what it is, whatever cuda-bindings' release
    if not probed.found:
        info["driver_error"] = requirements.no_driver()
    elif probed.version > 0:
        info["driver_version"] = _version_text(probed.version)
    else:
        info["driver_error"] = f"{driver.LIBRARY} loaded, but cuDriverGetVersion did not answer"
    info["driver_summary"] = requirements.summary()
    try:
        import importlib.metadata

        info["bindings_version"] = importlib.metadata.version("cuda-bindings")
    except Exception:  # not installed (or no metadata): the runtime line below says what is missing
        info["bindings_version"] = ""
    version = cuda_runtime.runtime_version()
    info["bindings_runtime"] = _version_text(version) if version else ""
    from ..loader import libraries, settings

    # The library's own answer, also when FI_FFI_CUDA_VERSION overrides it for wheel selection (the override is
    # reported as such, not next to this library's path).
    info["cuda_version_override"] = settings.get(settings.CUDA_VERSION)
    try:
        info["runtime_path"] = libraries.ensure_cudart()
        info["runtime_version"] = cudart_version(info["runtime_path"])
    except Exception as exc:
        info["runtime_error"] = str(exc)
    info["gpus"], info["gpu_error"] = gpus()
    return SystemReport(**info)
