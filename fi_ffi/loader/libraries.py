"""Loading the shared libraries, in the order the kernel modules need them (ABI.md A.11).

1. ``libtvm_ffi.so``, RTLD_NOW | RTLD_GLOBAL (the modules import ``TVMFFI*`` symbols without listing it as
   NEEDED). Exactly one copy may live in a process (a second aborts on duplicate type registration), so the
   first of these wins (``FI_FFI_RUNTIME`` can force one):

   a. a ``libtvm_ffi.so`` already mapped into the process (``import tvm_ffi`` came first): the same path is
      dlopen'ed again, which returns the same handle and makes its symbols global;
   b. the installed ``apache-tvm-ffi`` package (0.1.x, >= 0.1.6; found with ``importlib.util.find_spec``,
      not imported) - its ``lib/libtvm_ffi.so``, so that a later ``import tvm_ffi`` maps the same file;
   c. the lock's ``[[runtime]]`` wheel for this arch, extracted into the cache.

2. ``libcudart.so.<major>``, the CUDA runtime of the major the lock's kernel wheels were built for
   (:func:`cuda_major`: 13 for the packaged lock, 12 for a lock of CUDA 12 builds, ``FI_FFI_CUDA_VERSION``'s where
   set); the modules' NEEDED entry then matches it by soname. CUDA 13: through
   ``cuda.pathfinder.load_nvidia_dynamic_lib("cudart")`` (pip's ``nvidia-cuda-runtime`` wheel or a system CUDA).
   Any other major (cuda-pathfinder cannot be asked for one): a copy already loaded, pip's wheel
   (``nvidia-cuda-runtime-cu12``: ``nvidia/cuda_runtime/lib``), ``CUDA_HOME`` / ``CUDA_PATH``, then the dynamic
   loader's own search (:func:`find_cudart`).

3. Kernel modules, RTLD_LAZY | RTLD_LOCAL, on first use; never closed. Local: they export static libstdc++
   symbols. Lazy, as TVM-FFI's ``load_module`` does: a function is bound at its first call, so a module that
   references functions nothing defines still loads (FlashInfer 0.7.2's FA2 batch prefill does);
   :mod:`fi_ffi.loader.symbols` names those functions when the module is loaded.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LibraryLoadError, LoaderError
from . import dl, settings

TVM_FFI_BASENAME = "libtvm_ffi.so"
MIN_TVM_FFI = (0, 1, 6)
EXCLUDED_TVM_FFI = {"0.1.8", "0.1.8.post0"}  # FlashInfer 0.6.3 excludes these releases

_lock = threading.RLock()
_runtime: RuntimeInfo | None = None
_cudart: str | None = None
_cuda_version: str | None = None


@dataclass(frozen=True)
class RuntimeInfo:
    """The ``libtvm_ffi.so`` this process uses: ``path``, ``source`` (``"loaded"``, ``"package"``, ``"lock"``,
    ``"env"``), the ``version`` reported by ``TVMFFIGetVersion`` and a ``reason`` sentence."""

    path: str
    source: str
    version: str
    reason: str


# ------------------------------------------------------------------------------------- error translation


def glibc_version() -> str:
    """This system's glibc version (``"2.36"``), or ``"unknown"``."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    return text.split()[-1] if text else "unknown"


def explain_dlopen_error(path: str, message: str, *, wheel: str = "") -> str:
    """Our error text for the loader's ``message`` about ``path``: the cause and the fix.

    ``wheel`` (the file name of the wheel the library came from) sharpens the glibc advice.
    """
    head = f"cannot load {path}: {message}"
    m = re.search(r"version [`']GLIBC_([0-9.]+)' not found", message)
    if m:
        tag = re.search(r"manylinux_(\d+)_(\d+)", wheel)
        built = (
            f"{wheel} is tagged manylinux_{tag.group(1)}_{tag.group(2)} (glibc >= {tag.group(1)}.{tag.group(2)})"
            if tag
            else "the upstream wheels are manylinux_2_28 builds (glibc >= 2.28); self-built ones need the glibc "
            "they were built against"
        )
        return (
            f"{head}\nIt needs glibc {m.group(1)}, but this system has glibc {glibc_version()}; {built}. "
            "Use a newer system (or container) or a wheel built for this glibc."
        )
    m = re.search(r"libcudart\.so\.(\d+): cannot open shared object file", message)
    if m:
        return f"{head}\nThe CUDA runtime library is not loadable. {cudart_install_hint(int(m.group(1)))}"
    m = re.search(r"^(?:.*: )?([^:\s]+\.so[^:\s]*): cannot open shared object file", message)
    if m and os.path.basename(m.group(1)) != os.path.basename(path):
        return (
            f"{head}\nA library it depends on, {m.group(1)}, is not found by the dynamic loader. Install the "
            f"package that provides it, or add its folder to LD_LIBRARY_PATH."
        )
    m = re.search(r"undefined symbol: (\w+)", message)
    if m:
        if m.group(1).startswith("TVMFFI"):
            return (
                f"{head}\nlibtvm_ffi.so must be loaded RTLD_GLOBAL before kernel modules (fi_ffi.loader does this; "
                "load modules through fi_ffi.loader.load_module), and be a version that exports "
                f"{m.group(1)} (apache-tvm-ffi 0.1.x, >= 0.1.6)."
            )
        return f"{head}\nIt was built against a different version of a library it links."
    if any(s in message for s in ("invalid ELF header", "file too short", "not a dynamic executable")):
        return (
            f"{head}\nThe file is not a valid shared library (damaged or not a library). If it is in the fi_ffi "
            "cache, `fi-ffi cache verify --full` removes damaged files so they are extracted again."
        )
    if "wrong ELF class" in message or "ELF machine" in message or "machine does not match" in message:
        return f"{head}\nIt was built for a different architecture than this {os.uname().machine} machine."
    if "cannot open shared object file" in message or "No such file" in message:
        return f"{head}\nThe file does not exist or cannot be read."
    return head


def load_library(
    path: str | os.PathLike[str], *, global_symbols: bool = False, lazy: bool = False, wheel: str = ""
) -> Any:
    """dlopen ``path`` RTLD_NOW (RTLD_LAZY with ``lazy``) with RTLD_GLOBAL (``global_symbols``) or RTLD_LOCAL;
    returns the handle.

    Failures raise :class:`LibraryLoadError` with cause and fix (see :func:`explain_dlopen_error`).
    """
    flags = (dl.RTLD_LAZY if lazy else dl.RTLD_NOW) | (dl.RTLD_GLOBAL if global_symbols else dl.RTLD_LOCAL)
    path = os.fspath(path)
    try:
        return dl.open_library(path, flags)
    except LibraryLoadError:
        message = dl.last_error()
        if not message:  # open_library consumed dlerror(); ask again for the text
            probe = dl.libc().dlopen(os.fsencode(path), flags)
            message = dl.last_error() if probe == dl.get_ffi().NULL else ""
        raise LibraryLoadError(explain_dlopen_error(path, message or "unknown error", wheel=wheel)) from None


# ------------------------------------------------------------------------------------------- TVM-FFI runtime


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def package_runtime() -> tuple[str | None, str]:
    """The ``libtvm_ffi.so`` of the installed ``apache-tvm-ffi`` package if usable: (path or None, why)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("tvm_ffi")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "the apache-tvm-ffi package is not installed"
    try:
        version = importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError:
        return None, "a tvm_ffi package is importable but apache-tvm-ffi's metadata is missing"
    parsed = _parse_version(version)
    if parsed is None or parsed[:2] != (0, 1) or parsed < MIN_TVM_FFI or version in EXCLUDED_TVM_FFI:
        return None, f"the installed apache-tvm-ffi {version} is not a usable 0.1.x (>= 0.1.6, != 0.1.8)"
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "lib" / TVM_FFI_BASENAME
        if lib.is_file():
            return str(lib), f"the installed apache-tvm-ffi {version} package"
    return None, f"the installed apache-tvm-ffi {version} has no lib/{TVM_FFI_BASENAME}"


def _lock_runtime() -> tuple[str, str, str]:
    from . import cache, lockfile, wheels

    lock = lockfile.active_lock()
    arch = lockfile.machine_arch()
    pin = lockfile.select_runtime(lock, arch)
    if pin is None:
        raise LoaderError(
            f"no libtvm_ffi.so: apache-tvm-ffi is not installed and the lock "
            f"{lock.sources.get('runtime', lock.path)} has no [[runtime]] wheel for {arch}. Install it with "
            "`pip install 'apache-tvm-ffi>=0.1.6,<0.2'`, or pin a runtime wheel in the lock"
        )
    path = cache.extract_member(pin, pin.library, lambda: wheels.ensure_wheel(pin))
    return str(path), pin.filename, f"the lock's runtime wheel {pin.filename}"


def runtime_plan() -> tuple[str, str]:
    """Where ``libtvm_ffi.so`` would come from, without loading or fetching anything: (source, detail).

    ``source`` is ``"loaded"``, ``"env"``, ``"package"`` or ``"lock"``.
    """
    if _runtime is not None:
        return _runtime.source, _runtime.path
    choice = settings.get(settings.RUNTIME) or "auto"
    if choice not in ("auto", "package", "lock"):
        return "env", choice
    if choice == "auto":
        loaded = dl.loaded_paths(TVM_FFI_BASENAME)
        if loaded:
            return "loaded", loaded[0]
    if choice in ("auto", "package"):
        path, why = package_runtime()
        if path:
            return "package", path
        if choice == "package":
            raise LoaderError(f"FI_FFI_RUNTIME=package, but {why}")
    return "lock", "the lock's [[runtime]] wheel"


def runtime_library() -> str:
    """Load ``libtvm_ffi.so`` (once per process, RTLD_NOW | RTLD_GLOBAL) and return its path."""
    return runtime_info().path


def runtime_info() -> RuntimeInfo:
    """Load ``libtvm_ffi.so`` if not done yet and say which copy, from where, and its version."""
    global _runtime
    if _runtime is not None:
        return _runtime
    with _lock:
        if _runtime is None:
            _runtime = _load_runtime()
    return _runtime


def _load_runtime() -> RuntimeInfo:
    source, detail = runtime_plan()
    wheel = ""
    loaded = dl.loaded_paths(TVM_FFI_BASENAME)
    if loaded and source == "lock":
        from .cache import cache_root

        if not any(Path(p).is_relative_to(cache_root()) for p in loaded):
            _refuse_second_copy(loaded[0], "the lock's [[runtime]] wheel")
    if source == "env":
        path, reason = os.path.abspath(os.path.expanduser(detail)), f"FI_FFI_RUNTIME={detail}"
        if not os.path.isfile(path):
            raise LoaderError(f"FI_FFI_RUNTIME={detail}: no such file (expected the path of a {TVM_FFI_BASENAME})")
    elif source == "loaded":
        path, reason = detail, "a copy already loaded in this process (reused, not loaded twice)"
    elif source == "package":
        path, reason = detail, package_runtime()[1]
    else:
        path, wheel, reason = _lock_runtime()
    if loaded and os.path.realpath(path) not in {os.path.realpath(p) for p in loaded}:
        _refuse_second_copy(loaded[0], f"{path}, from {reason}")
    handle = load_library(path, global_symbols=True, wheel=wheel)
    version = _tvm_ffi_version(handle, path)
    parsed = _parse_version(version)
    if parsed is None or parsed[:2] != (0, 1):
        raise LibraryLoadError(
            f"{path} reports TVM-FFI ABI version {version}; the kernel modules need 0.1.x. "
            "Install `apache-tvm-ffi>=0.1.6,<0.2` or use the lock's runtime wheel (FI_FFI_RUNTIME=lock)"
        )
    return RuntimeInfo(path=path, source=source, version=version, reason=reason)


def _refuse_second_copy(loaded: str, other: str) -> None:
    raise LoaderError(
        f"{loaded} is already loaded in this process, and loading a second libtvm_ffi.so ({other}) would abort "
        "it (duplicate type registration). Unset FI_FFI_RUNTIME to reuse the loaded copy, or set it before "
        "anything else loads TVM-FFI"
    )


def _tvm_ffi_version(handle: Any, path: str) -> str:
    address = dl.symbol_address(handle, "TVMFFIGetVersion")
    if not address:
        raise LibraryLoadError(f"{path} does not export TVMFFIGetVersion; it is not a TVM-FFI runtime library")
    ffi = dl.get_ffi()
    out = ffi.new("uint32_t[3]")  # TVMFFIVersion: {uint32_t major, minor, patch}
    ffi.cast("void(*)(uint32_t*)", address)(out)
    return f"{out[0]}.{out[1]}.{out[2]}"


# --------------------------------------------------------------------------------------------- CUDA runtime


# The CUDA major whose runtime cuda-pathfinder finds first (its search tries libcudart.so.13 before .so.12), and the
# pip requirement that provides each major's libcudart.
PATHFINDER_MAJOR = 13
CUDART_PACKAGES: dict[int, str] = {12: "nvidia-cuda-runtime-cu12", 13: "nvidia-cuda-runtime>=13.0,<14"}


def cudart_install_hint(major: int) -> str:
    """How to get ``libcudart.so.<major>``: the pip package, or a toolkit of that major."""
    package = CUDART_PACKAGES.get(major)
    if package is None:
        known = ", ".join(f"`{name}` for CUDA {m}" for m, name in sorted(CUDART_PACKAGES.items()))
        return f"Install a CUDA {major} toolkit and set CUDA_HOME (pip provides libcudart as {known})."
    dependency = " (a dependency of fi-ffi on Linux)" if major == PATHFINDER_MAJOR else ""
    return (
        f"Install it with `python -m pip install '{package}'`{dependency}, or install a CUDA {major} toolkit and set "
        "CUDA_HOME."
    )


def cuda_major() -> tuple[int | None, str]:
    """The CUDA major whose runtime the kernel modules will link, and why; ``(None, why)`` where nothing says.

    ``FI_FFI_CUDA_VERSION``'s major where set; else the major of the active lock's kernel wheels for this arch (the
    highest, where the lock pins several: set ``FI_FFI_CUDA_VERSION`` to choose another). Reads the lock only; a lock
    that cannot be read says nothing here (the selection reports it).
    """
    from . import lockfile

    env = settings.get(settings.CUDA_VERSION)
    if env:
        major, _ = lockfile.parse_cuda_version(env, what="FI_FFI_CUDA_VERSION")
        return major, f"FI_FFI_CUDA_VERSION={env}"
    try:
        lock = lockfile.active_lock()
    except LoaderError as exc:
        return None, str(exc)
    arch = lockfile.machine_arch()
    majors = sorted({lockfile.parse_cuda_version(p.cuda)[0] for p in lock.kernels if p.arch == arch})
    where = lock.sources.get("kernel", lock.path)
    if not majors:
        return None, f"the lock {where} pins no kernel wheel for {arch}"
    several = f" (the highest of CUDA {', '.join(map(str, majors))})" if len(majors) > 1 else ""
    return majors[-1], f"the lock {where} pins CUDA {majors[-1]} kernel wheels for {arch}{several}"


def ensure_cudart() -> str:
    """Load the CUDA runtime (``libcudart.so.<major>``, the major of :func:`cuda_major`) once per process; returns its
    path."""
    global _cudart
    if _cudart is not None:
        return _cudart
    with _lock:
        if _cudart is None:
            major, why = cuda_major()
            _cudart = _load_cudart() if major in (None, PATHFINDER_MAJOR) else find_cudart(major, why)
    return _cudart


def find_cudart(major: int, why: str = "") -> str:
    """Load ``libcudart.so.<major>`` and return its path: a copy already loaded, pip's wheel folders
    (``nvidia/cuda_runtime/lib``, ``nvidia/cu<major>/lib`` on ``sys.path``), ``CUDA_HOME`` / ``CUDA_PATH``
    (``lib64``, ``lib``), then the dynamic loader's search by soname.

    Raises:
        LibraryLoadError: none found or loadable, naming the pip package and the toolkit to install.
    """
    import sys

    soname = f"libcudart.so.{major}"
    loaded = dl.loaded_paths(soname, versioned=True)
    if loaded:
        return loaded[0]
    candidates: list[Path] = []
    for entry in sys.path:
        for folder in ("cuda_runtime", f"cu{major}"):
            candidates.append(Path(entry or ".") / "nvidia" / folder / "lib" / soname)
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable, "")
        if root:
            candidates += [Path(root) / "lib64" / soname, Path(root) / "lib" / soname]
    problems = []
    for candidate in candidates:
        if candidate.is_file():
            try:
                load_library(candidate)
            except LibraryLoadError as exc:
                problems.append(str(exc))
                continue
            return str(candidate)
    try:
        load_library(soname)  # LD_LIBRARY_PATH, the ld.so cache, the system folders
    except LibraryLoadError as exc:
        problems.append(str(exc).split("\n")[0])
        because = f", because {why}" if why else ""
        raise LibraryLoadError(
            f"{soname} (the CUDA {major} runtime) is needed{because}, and was not found or did not load "
            f"({'; '.join(problems)}).\n{cudart_install_hint(major)}"
        ) from None
    found = dl.loaded_paths(soname, versioned=True)
    return found[0] if found else soname


def _load_cudart() -> str:
    try:
        import cuda.pathfinder as pathfinder
    except ImportError as exc:
        raise LoaderError(f"cuda-pathfinder is not installed ({exc}); `pip install cuda-pathfinder`") from None
    try:
        found = pathfinder.load_nvidia_dynamic_lib("cudart")
    except pathfinder.DynamicLibNotFoundError as exc:
        raise LibraryLoadError(
            f"libcudart (the CUDA runtime) was not found: {exc}\n{cudart_install_hint(PATHFINDER_MAJOR)}"
        ) from None
    except Exception as exc:  # pathfinder raises RuntimeError subclasses for unloadable files
        raise LibraryLoadError(f"the CUDA runtime library could not be loaded: {exc}") from None
    path = found.abs_path
    if not path:
        loaded = [p for p in dl.loaded_paths("libcudart.so.13") + dl.loaded_paths("libcudart.so.12") if p]
        path = loaded[0] if loaded else "libcudart.so"
    return path


# Kernel modules that list NVIDIA libraries beyond libcudart as NEEDED: loaded through :func:`nvidia_library` first
# (pip wheels or a CUDA toolkit), so the module's NEEDED entries resolve by soname to those copies.
MODULE_LIBRARIES: dict[str, tuple[str, ...]] = {"gemm": ("cublasLt", "cublas")}
# The NVIDIA libraries :func:`nvidia_library` serves -> the pip requirement that provides them.
NVIDIA_LIBRARIES: dict[str, str] = {"cublas": "nvidia-cublas>=13,<14", "cublasLt": "nvidia-cublas>=13,<14"}
_nvidia_loaded: dict[str, str] = {}


def nvidia_library(name: str) -> str:
    """Load NVIDIA library ``name`` (``"cublas"``, ``"cublasLt"``) into the process once; its path, or its CUDA 13
    soname where the copy is mapped from a place cuda-pathfinder cannot name.

    The one finder of these libraries in the repository: the kernel modules that link one (``gemm``: both) load it
    here before the module is opened, fi_ffi's ``bmm_fp8`` handle and the engine's cuBLAS/cuBLASLt bindings
    (:mod:`fi_engine.kernels.cublas`, :mod:`fi_engine.kernels.cublas_lt`) open what it returns, so the process maps one
    copy whoever asks first. Where it is found: cuda-pathfinder's search (the ``nvidia-cublas`` wheel, conda, a CUDA
    toolkit at ``CUDA_HOME``, the dynamic loader's path). Opening the returned path again (``cffi.FFI().dlopen(path)``)
    binds a set of declarations to that same mapping. Cached per name (thread-safe).

    Raises:
        ValueError: ``name`` is not one of :data:`NVIDIA_LIBRARIES`.
        LoaderError: cuda-pathfinder is not installed.
        LibraryLoadError: the library was not found or did not load; the text names the pip package to install.
    """
    found = _nvidia_loaded.get(name)
    if found is not None:
        return found
    package = NVIDIA_LIBRARIES.get(name)
    if package is None:
        raise ValueError(f"name: expected one of {', '.join(sorted(NVIDIA_LIBRARIES))}, got {name!r}")
    with _lock:
        found = _nvidia_loaded.get(name)
        if found is None:
            try:
                import cuda.pathfinder as pathfinder
            except ImportError as exc:
                raise LoaderError(f"cuda-pathfinder is not installed ({exc}); `pip install cuda-pathfinder`") from None
            try:
                loaded = pathfinder.load_nvidia_dynamic_lib(name)
            except Exception as exc:  # DynamicLibNotFoundError, or a RuntimeError for a file that does not load
                raise LibraryLoadError(
                    f"lib{name}.so.13 was not found or did not load: {exc}\nInstall it with `python -m pip install "
                    f"'{package}'`, or install a CUDA 13 toolkit and set CUDA_HOME."
                ) from None
            found = _nvidia_loaded[name] = loaded.abs_path or f"lib{name}.so.13"
    return found


def ensure_module_libraries(uri: str) -> None:
    """Load the NVIDIA libraries module ``uri`` needs beyond libcudart (:data:`MODULE_LIBRARIES`), once each.

    Raises:
        LibraryLoadError: a library was not found or could not be loaded, naming the module and the pip package.
    """
    for name in MODULE_LIBRARIES.get(uri, ()):
        try:
            nvidia_library(name)
        except LibraryLoadError as exc:
            raise LibraryLoadError(f"kernel module {uri!r} needs {exc}") from None


def cuda_runtime_version() -> tuple[str, str]:
    """The CUDA runtime version for wheel selection, ``("13.0", source)``.

    ``FI_FFI_CUDA_VERSION`` wins (nothing is loaded then); otherwise libcudart is loaded and asked with
    ``cudaRuntimeGetVersion`` (1000 * major + 10 * minor).
    """
    env = settings.get(settings.CUDA_VERSION)
    if env:
        from .lockfile import parse_cuda_version

        major, minor = parse_cuda_version(env, what="FI_FFI_CUDA_VERSION")
        return f"{major}.{minor}", "FI_FFI_CUDA_VERSION"
    global _cuda_version
    path = ensure_cudart()
    if _cuda_version is None:
        _cuda_version = cudart_version(path)
    return _cuda_version, f"cudaRuntimeGetVersion of {path}"


def cudart_version(path: str) -> str:
    """The version the CUDA runtime library at ``path`` reports (``cudaRuntimeGetVersion``), e.g. ``"13.0"``.

    ``path`` is opened with the loader's flags (the library the loader loaded: the same handle, nothing is
    mapped twice). :class:`LibraryLoadError` if it cannot be opened, is not a CUDA runtime, or fails.
    """
    handle = load_library(path)
    address = dl.symbol_address(handle, "cudaRuntimeGetVersion")
    if not address:
        raise LibraryLoadError(f"{path} does not export cudaRuntimeGetVersion; it is not a CUDA runtime")
    ffi = dl.get_ffi()
    out = ffi.new("int*")
    rc = ffi.cast("int(*)(int*)", address)(out)
    if rc != 0:
        raise LibraryLoadError(f"cudaRuntimeGetVersion failed with CUDA error {rc} ({path})")
    return f"{out[0] // 1000}.{out[0] % 1000 // 10}"
