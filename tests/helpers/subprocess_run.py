"""Child processes of the multi-process tests: the workers of this package started by path, alone or as ranks
under ``fi-ffi launch``, with a lock of their own pinning the test kernel wheels they need.

Needs no GPU to import (the GPU count is asked for only when a test calls :func:`gpu_count`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers.env import subprocess_env
from helpers.wheels import comm_wheel as comm_wheel  # the GPU tests import it from here too
from helpers.wheels import lock_text, wheelhouse

HELPERS = Path(__file__).resolve().parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast off for NCCL, torch and NVSHMEM: the multi-GPU tests set it in their own process (children
inherit it) before anything starts a communicator."""


def multicast_off() -> None:
    """Set :data:`NO_MULTICAST` in ``os.environ``."""
    os.environ.update(NO_MULTICAST)


def worker_path(name: str) -> str:
    """The path of the worker script ``tests/helpers/<name>.py`` (started by path: it imports ``fi_ffi`` only)."""
    return str(HELPERS / f"{name}.py")


def worker(name: str, *args: str | Path) -> list[str]:
    """The command line running worker ``name`` with ``args`` in this interpreter."""
    return [sys.executable, worker_path(name), *map(str, args)]


def fi_ffi_generate(model: str | Path, *args: str) -> list[str]:
    """The command line of ``fi-ffi generate --model MODEL ARGS...`` in this interpreter (``python -m fi_ffi``)."""
    return [sys.executable, "-m", "fi_ffi", "generate", "--model", str(model), *args]


def launched(n: int, cmd: Sequence[str]) -> list[str]:
    """``cmd`` as ``n`` ranks under ``fi-ffi launch`` (one process per GPU)."""
    return [sys.executable, "-m", "fi_ffi", "launch", "--nproc", str(n), "--", *cmd]


def gpu_count() -> int:
    """The CUDA devices this process sees (through the CUDA runtime, as the ranks will)."""
    from fi_ffi.comm.cuda import device_count

    return device_count()


def wheels_env(lock: Path, wheels: Sequence[Path]) -> dict[str, str]:
    """Writes a lock pinning ``wheels`` to the file ``lock`` and returns the environment for child processes that
    load from them: that lock, the wheels' folders as wheelhouse, CUDA 13.0, offline."""
    lock.write_text(lock_text(list(wheels)))
    return subprocess_env(
        FI_FFI_LOCK=str(lock),
        FI_FFI_WHEELHOUSE=wheelhouse(wheels),
        FI_FFI_CUDA_VERSION="13.0",
        FI_FFI_OFFLINE="1",
    )


def run_ok(cmd: Sequence[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` to its end and asserts it exited 0, showing the last 6000 characters of its output if not."""
    done = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done
