"""Which NVIDIA driver each CUDA build needs, and the one place that words a missing or too old driver.

A CUDA ``X.y`` runtime (cuda-bindings' own, linked into ``cuda.bindings.runtime``, or the ``libcudart.so.X`` the
kernel modules link) runs on a driver whose ``cuDriverGetVersion`` is at least ``X000`` (CUDA's minor-version
compatibility: any driver of the same major from :data:`MIN_DRIVER` on). fi_ffi pins CUDA 13 kernels by default
(driver >= 580); a machine with a CUDA 12 driver uses FlashInfer's CUDA 12.9 kernel wheel instead (pinned with
``fi-ffi lock``, with cuda-bindings 12.9 and ``libcudart.so.12``: :func:`cuda12_steps`).

Every message about the driver comes from here: :func:`explain` for a CUDA runtime error (used by
:func:`fi_ffi.cuda.runtime.error`, so every ``CudaError`` of cuda-bindings' runtime, the device queries of
:mod:`fi_ffi.cuda.device`, ``fi-ffi smoke``, ``fi-ffi doctor`` and the engine say the same), :func:`no_driver`
where the driver library cannot be used at all, :func:`problem` for a CUDA version the caller needs (``doctor``:
the kernels the lock selects), :func:`summary` for the report line. The facts are read by
:func:`fi_ffi.cuda.driver.probe` (dlopen of ``libcuda.so.1``, ``cuDriverGetVersion``, ``cuInit``), once.
"""

from __future__ import annotations

from . import driver

# The oldest Linux driver of each CUDA major (NVIDIA's CUDA compatibility guide, "minor version compatibility").
MIN_DRIVER: dict[int, str] = {12: "525.60.13", 13: "580.65.06"}
# The kernel wheel a CUDA 12 driver uses: FlashInfer 0.6.3's CUDA 12.9 build (``<arch>``: x86_64 or aarch64).
CUDA12_WHEEL = "flashinfer_jit_cache-0.6.3+cu129-cp39-abi3-manylinux_2_28_<arch>.whl"
CUDA12_URL = (
    "https://github.com/flashinfer-ai/flashinfer/releases/download/v0.6.3/"
    "flashinfer_jit_cache-0.6.3%2Bcu129-cp39-abi3-manylinux_2_28_<arch>.whl"
)


def cuda12_steps(arch: str = "") -> str:
    """The way out for a CUDA 12 driver, in one line, for ``arch`` (default: this machine's; docs/operations.md,
    "CUDA 12 drivers", has it step by step)."""
    import platform

    arch = arch or {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    wheel, url = CUDA12_WHEEL.replace("<arch>", arch), CUDA12_URL.replace("<arch>", arch)
    return (
        "`pip install 'cuda-bindings>=12.9,<13' nvidia-cuda-runtime-cu12`, download FlashInfer's CUDA 12.9 kernel "
        f"wheel ({url}), then `fi-ffi lock {wheel} > cu12.lock` and `export FI_FFI_LOCK=$PWD/cu12.lock` "
        '(docs/operations.md, "CUDA 12 drivers")'
    )


# cudaErrorInitializationError, cudaErrorStubLibrary, cudaErrorInsufficientDriver, cudaErrorNoDevice,
# cudaErrorSystemDriverMismatch, cudaErrorUnknown: the runtime's ways of saying "no driver" or "this driver cannot"
DRIVER_CODES = frozenset((3, 34, 35, 100, 803, 999))


def version_text(code: int) -> str:
    """``cuDriverGetVersion`` / ``cudaRuntimeGetVersion``'s ``1000 * major + 10 * minor`` as ``"12.8"``."""
    return f"{code // 1000}.{code % 1000 // 10}"


def driver_release() -> str:
    """The installed kernel driver's release (``"580.65.06"``, from ``/proc/driver/nvidia/version``), or ``""``."""
    import re

    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+([0-9]+(?:\.[0-9]+)+)", text)
    return m.group(1) if m else ""


def can_run(major: int) -> bool | None:
    """Whether the driver runs CUDA ``major`` builds: True/False, None where there is no driver or it hides its
    version."""
    probed = driver.probe()
    if not probed.found or probed.version <= 0:
        return None
    return probed.version // 1000 >= major


NO_DRIVER_FIX = (
    "Install the NVIDIA driver (>= 580 for the CUDA 13 kernels fi_ffi pins, >= 525 for the CUDA 12 build) or run on "
    "a machine with one; in a container, expose the GPUs (`docker run --gpus all`, NVIDIA Container Toolkit). "
    "`fi-ffi doctor` shows what is found"
)


def no_driver_cause() -> str:
    """``"no NVIDIA driver found (<why libcuda.so.1 did not load, or is no driver>)"``."""
    probed = driver.probe()
    if not probed.load_error:  # it loaded, but is a stand-in (driver.DriverProbe.found)
        return (
            f"no NVIDIA driver found ({driver.LIBRARY} loads but answers neither cuDriverGetVersion nor cuInit, "
            f"CUresult {probed.init}: a stand-in library, not the driver)"
        )
    error = probed.load_error
    # cffi's text: "cannot load library 'libcuda.so.1': <dlerror>.  Additionally, ctypes.util.find_library() ..."
    error = error.split(".  Additionally")[0].removeprefix(f"cannot load library '{driver.LIBRARY}': ")
    return f"no NVIDIA driver found ({error or driver.LIBRARY + ' cannot be loaded'})"


def no_driver() -> str:
    """The message for a machine where ``libcuda.so.1`` cannot be loaded: "no NVIDIA driver found", and the fix."""
    return f"{no_driver_cause()}. {NO_DRIVER_FIX}"


BINDINGS12_STEP = (
    "install cuda-bindings 12.9, whose runtime a CUDA 12 driver runs: `pip install 'cuda-bindings>=12.9,<13'` (the "
    "lock already selects CUDA 12 kernels)"
)


def old_driver(version: int, major: int, needs: str, *, way_out: str = "") -> str:
    """The message for a driver that runs CUDA ``version`` (``12080``) only, where ``needs`` (what, e.g. "the CUDA
    13.0 runtime of cuda-bindings") needs CUDA ``major``: both versions, the driver needed, and the ways out
    (``way_out`` in place of the CUDA 12 build's steps, for a CUDA 12 driver)."""
    release = driver_release()
    installed = f"The NVIDIA driver{' ' + release if release else ''} runs CUDA up to {version_text(version)}"
    minimum = MIN_DRIVER.get(major, "")
    wanted = f"a driver >= {minimum.split('.')[0]}" if minimum else f"a driver for CUDA {major}"
    text = f"{installed} (cuDriverGetVersion {version}), but {needs} needs CUDA {major}, that is {wanted}. "
    text += f"Upgrade the driver to {minimum.split('.')[0]} or newer" if minimum else "Upgrade the driver"
    if major >= 13 and version // 1000 == 12:
        text += f", or {way_out}" if way_out else f", or use the CUDA 12 build: {cuda12_steps()}"
    return text


def problem(cuda: str, needs: str, *, way_out: str = "") -> str:
    """Why this machine's driver cannot run CUDA ``cuda`` (``"13.0"``; ``needs`` names what needs it), or ``""``
    where it can (or says nothing: no version reported). ``way_out``: as for :func:`old_driver`."""
    major = int(cuda.split(".")[0])
    probed = driver.probe()
    if not probed.found:
        return no_driver()
    if probed.version > 0 and probed.version // 1000 < major:
        return old_driver(probed.version, major, needs, way_out=way_out)
    return ""


def _lock_major() -> int | None:
    """The CUDA major of the active lock's kernel wheels (:func:`fi_ffi.loader.libraries.cuda_major`), or None."""
    from ..loader import libraries

    try:
        return libraries.cuda_major()[0]
    except Exception:  # a bad FI_FFI_CUDA_VERSION or lock: the selection reports it where it matters
        return None


def explain(code: int, runtime_version: int) -> tuple[str, str] | None:
    """``(description, hint)`` in place of the runtime's own for CUDA error ``code`` of a runtime reporting
    ``runtime_version`` (``13000``), where the driver explains it (missing, or older than the runtime); else None.

    The runtime reports a missing driver as ``cudaErrorInsufficientDriver`` ("CUDA driver version is
    insufficient"), which sends a user without any driver looking for an upgrade: the description says what is
    actually the matter.
    """
    if code not in DRIVER_CODES:
        return None
    probed = driver.probe()
    if not probed.found:
        return no_driver_cause(), NO_DRIVER_FIX
    major = runtime_version // 1000
    if probed.version > 0 and major > 0 and probed.version // 1000 < major:
        needs = f"the CUDA {version_text(runtime_version)} runtime (cuda-bindings)"
        too_old = f"the NVIDIA driver (CUDA {version_text(probed.version)}) is older than this runtime"
        way_out = BINDINGS12_STEP if _lock_major() == 12 else ""
        return too_old, old_driver(probed.version, major, needs, way_out=way_out)
    return None


def summary() -> str:
    """The driver in one line for ``fi-ffi doctor``: its release and the newest CUDA it runs, or why there is none
    (the fix is doctor's PROBLEM line, :func:`problem`, said once)."""
    probed = driver.probe()
    if not probed.found:
        return f"not found: {no_driver_cause()}"
    release = driver_release()
    head = f"{release}, " if release else ""
    if probed.version <= 0:
        return f"{head}loaded, but cuDriverGetVersion did not answer"
    text = f"{head}runs CUDA builds up to {version_text(probed.version)} (cuDriverGetVersion {probed.version})"
    if probed.init != 0:
        text += f"; cuInit failed ({driver.error_name(probed.init) if probed.init > 0 else 'not exported'})"
    return text


__all__ = [
    "BINDINGS12_STEP",
    "CUDA12_URL",
    "CUDA12_WHEEL",
    "DRIVER_CODES",
    "MIN_DRIVER",
    "NO_DRIVER_FIX",
    "can_run",
    "cuda12_steps",
    "driver_release",
    "explain",
    "no_driver",
    "no_driver_cause",
    "old_driver",
    "problem",
    "summary",
    "version_text",
]
