"""The test kernel wheels and the locks that pin them: where each wheel is found (all lie outside the checkout,
in ``<repo>/../shared/`` or a folder named by an environment variable), the skip reason when one is missing, a
lock's text, making a lock the active one, and building a small wheel from bytes.

The session lock itself (every test that loads a kernel module gets the shared wheels') is set up by the
``_fi_ffi_session_env`` fixture in ``tests/conftest.py`` from these functions.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.env import REPO

SHARED = REPO.parent / "shared"
"""The folder beside the checkout that holds the test wheels (``wheels``, ``wheels-072``, ...)."""
SHARED_WHEEL_GLOB = "flashinfer_jit_cache-*.whl"
WHEELS_HINT = (
    "build it with tools/build_test_wheels.py (FlashInfer's own generators and nvcc), or point FI_FFI_TEST_WHEELS at "
    "FlashInfer's prebuilt flashinfer-jit-cache wheel (the file, or its folder); CONTRIBUTING.md, section 'Test "
    "kernel wheels'"
)
"""Appended to every skip for a missing test wheel: the two ways in, and where CONTRIBUTING.md says more."""
SHARED_WHEEL_MISSING = (
    "needs the shared test kernel wheel flashinfer_jit_cache-*.whl, found neither in $FI_FFI_TEST_WHEELS nor in "
    f"<repo>/../shared/wheels (outside the checkout); {WHEELS_HINT}"
)
SHARED_072_MISSING = (
    "needs the FlashInfer 0.7.2 test kernel wheel flashinfer_jit_cache_072-*.whl, found neither in "
    f"$FI_FFI_TEST_WHEELS_072 nor in <repo>/../shared/wheels-072 (outside the checkout); {WHEELS_HINT}"
)
SHARED_MODELS_MISSING = (
    "needs the model-family test kernel wheel flashinfer_jit_cache_models-*.whl, found neither beside the core test "
    "wheel, nor in $FI_FFI_TEST_WHEELS_MODELS, nor in <repo>/../shared/wheels-models (outside the checkout); "
    f"{WHEELS_HINT}"
)
SHARED_FP8_MISSING = (
    "needs the FP8 test kernel wheel flashinfer_jit_cache_fp8-*.whl (bf16 queries over an e4m3 KV cache, FA3 FP8 "
    "prefill), found neither beside the core test wheel, nor in $FI_FFI_TEST_WHEELS_FP8, nor in "
    f"<repo>/../shared/wheels-fp8 (outside the checkout); {WHEELS_HINT}"
)
FP8_DECODE_MODULE = (
    "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128_"
    "posenc_0_use_swa_False_use_logits_cap_False"
)
"""A module only the FP8 test wheel holds: its presence in the session lock tells that wheel is pinned."""
COMM_MISSING = f"needs the comm test wheel (FI_FFI_TEST_WHEELS_COMM or <repo>/../shared/wheels-comm); {WHEELS_HINT}"

TEST_RELEASES = ("0.6.3", "0.7.2")
TEST_RELEASE = os.environ.get("FI_FFI_TEST_RELEASE", "")
"""The release whose modules the session lock prefers (``FI_FFI_TEST_RELEASE``; empty: the 0.6.3 test wheels)."""


def _wheels_in(folders: Sequence[str], pattern: str) -> list[Path]:
    """The wheels matching ``pattern`` in the first of ``folders`` (empty names skipped) that has any, sorted."""
    for folder in folders:
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob(pattern))
            if found:
                return found
    return []


def named_wheel() -> Path | None:
    """The wheel file ``$FI_FFI_TEST_WHEELS`` names, when it names one (FlashInfer's prebuilt
    ``flashinfer_jit_cache-*.whl``, or a test wheel) rather than a folder; else ``None``."""
    named = os.environ.get("FI_FFI_TEST_WHEELS", "")
    return Path(named) if named.endswith(".whl") and Path(named).is_file() else None


def find_shared_wheel() -> Path | None:
    """The shared test kernel wheel: the wheel ``$FI_FFI_TEST_WHEELS`` names, else the one in the folder it names,
    else the one in ``<repo>/../shared/wheels``.

    All lie outside the checkout (the wheel is too big to commit); ``None`` when none holds one, and every test
    that needs it then skips saying so (:data:`SHARED_WHEEL_MISSING`). FlashInfer's own ``flashinfer-jit-cache``
    wheel serves too: its layout is the test wheels' (``flashinfer_jit_cache/jit_cache/<uri>/<uri>.so``), and a test
    stopped by a module it does not hold is a skip naming the module (:func:`supplied_by_user`).
    """
    named = named_wheel()
    if named is not None:
        return named
    found = _wheels_in([os.environ.get("FI_FFI_TEST_WHEELS", ""), str(SHARED / "wheels")], SHARED_WHEEL_GLOB)
    return found[0] if found else None


def supplied_by_user() -> bool:
    """Whether the core test wheel comes from ``$FI_FFI_TEST_WHEELS`` (a wheel of the contributor's choice, such as
    FlashInfer's prebuilt one, which need not hold every module the suite uses) rather than the shared folder."""
    wheel = find_shared_wheel()
    named = os.environ.get("FI_FFI_TEST_WHEELS", "")
    return wheel is not None and bool(named) and (wheel == Path(named) or wheel.parent == Path(named))


needs_shared_wheel = pytest.mark.skipif(find_shared_wheel() is None, reason=SHARED_WHEEL_MISSING)
"""For one ``pytest.param`` of a parametrized test: the case reaches the module lookup (the packaged lock's
wheels are not downloaded in tests), so without the shared test wheel it skips saying so."""


def find_wheels_072() -> list[Path]:
    """The FlashInfer 0.7.2 test kernel wheels, from ``$FI_FFI_TEST_WHEELS_072`` or ``<repo>/../shared/wheels-072``."""
    folders = [os.environ.get("FI_FFI_TEST_WHEELS_072", ""), str(SHARED / "wheels-072")]
    return _wheels_in(folders, "flashinfer_jit_cache*.whl")


def find_wheels_models() -> list[Path]:
    """The FlashInfer 0.6.3 model-family test kernel wheel (grouped/FP8 GEMM, routing, attention sinks, head_dim
    256, Mamba), from ``$FI_FFI_TEST_WHEELS_MODELS`` or ``<repo>/../shared/wheels-models``. On the GPU machine it
    is staged beside the core wheel instead (``.gpu/kernels``), where :func:`shared_wheels` finds it."""
    folders = [os.environ.get("FI_FFI_TEST_WHEELS_MODELS", ""), str(SHARED / "wheels-models")]
    return _wheels_in(folders, "flashinfer_jit_cache_models-*.whl")


def find_wheels_fp8() -> list[Path]:
    """The FlashInfer 0.6.3 FP8 test kernel wheel (bf16-query attention over an e4m3 KV cache, FA3 FP8 prefill, the
    FP8 block-scale GEMM), from ``$FI_FFI_TEST_WHEELS_FP8`` or ``<repo>/../shared/wheels-fp8``. On the GPU machine
    it is staged beside the core wheel instead (``.gpu/kernels``), where :func:`shared_wheels` finds it."""
    folders = [os.environ.get("FI_FFI_TEST_WHEELS_FP8", ""), str(SHARED / "wheels-fp8")]
    return _wheels_in(folders, "flashinfer_jit_cache_fp8-*.whl")


CU12_MISSING = (
    "needs the CUDA 12 test kernel wheel flashinfer_jit_cache-*+cu12*.whl, found neither in $FI_FFI_TEST_WHEELS_CU12 "
    f"nor in <repo>/../shared/wheels-cu12 (outside the checkout); {WHEELS_HINT}"
)


def find_wheel_cu12() -> Path | None:
    """The CUDA 12 test kernel wheel (FlashInfer 0.6.3 built with nvcc 12.4: norm, page, f16 head_dim 128 FA2
    decode and prefill; links ``libcudart.so.12``), from ``$FI_FFI_TEST_WHEELS_CU12`` or
    ``<repo>/../shared/wheels-cu12``; None when neither has it."""
    folders = [os.environ.get("FI_FFI_TEST_WHEELS_CU12", ""), str(SHARED / "wheels-cu12")]
    found = _wheels_in(folders, "flashinfer_jit_cache-*+cu12*.whl")
    return found[0] if found else None


def comm_wheel() -> Path | None:
    """The comm test kernel wheel ``flashinfer_jit_cache_comm-*.whl``: from ``$FI_FFI_TEST_WHEELS_COMM``,
    ``<repo>/../shared/wheels-comm`` or beside ``$FI_FFI_TEST_WHEELS``, the first folder that has one; else None."""
    folders = [
        os.environ.get("FI_FFI_TEST_WHEELS_COMM", ""),
        str(SHARED / "wheels-comm"),
        os.environ.get("FI_FFI_TEST_WHEELS", ""),
    ]
    found = _wheels_in(folders, "flashinfer_jit_cache_comm-*.whl")
    return found[0] if found else None


def shared_wheels(core: Path) -> list[Path]:
    """The core test wheel, the kernel wheels beside it (the extension wheel), the model-family wheel
    (:func:`find_wheels_models`) and the FP8 wheel (:func:`find_wheels_fp8`), pinned together by one lock (their
    module names are disjoint)."""
    # a wheel named by FI_FFI_TEST_WHEELS stands alone (its folder may hold anything, such as other downloads)
    beside = (
        [] if core == named_wheel() else sorted(p for p in core.parent.glob("flashinfer_jit_cache*.whl") if p != core)
    )
    names = {p.name for p in beside}
    extra = [*find_wheels_models(), *find_wheels_fp8()]
    return [core, *beside, *(w for w in extra if w.name not in names)]


def wheelhouse(wheels: Sequence[Path]) -> str:
    """``FI_FFI_WHEELHOUSE`` for ``wheels``: their folders, each once, in order."""
    return os.pathsep.join(dict.fromkeys(str(w.parent) for w in wheels))


def lock_text(wheels: Sequence[Path], preferred: Sequence[Path] = (), header: str = "") -> str:
    """A lock pinning ``wheels``, then ``preferred`` with ``priority = 1`` (they win every module name they share)."""
    import dataclasses

    from fi_ffi import loader

    pins = [loader.lock_entry(w) for w in wheels]
    pins += [dataclasses.replace(loader.lock_entry(w), priority=1) for w in preferred]
    names = ", ".join(w.name for w in [*wheels, *preferred])
    return loader.dump_lock(pins, header=header or f"test lock for {names}")


def use_lock(monkeypatch: pytest.MonkeyPatch, path: Path, text: str, wheels: list[Path]) -> None:
    """Make ``text`` (written to ``path``) the active lock, with the wheels' folders as the wheelhouse, and forget
    everything bound or listed under the previous lock."""
    path.write_text(text)
    monkeypatch.setenv("FI_FFI_LOCK", str(path))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", wheelhouse(wheels))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")  # the test wheels' CUDA, whatever this machine has
    monkeypatch.delenv("FI_FFI_SM", raising=False)
    forget_lock()  # launchers, bound entry points, plan settings: all resolve again under this lock


def forget_lock() -> None:
    """Empty every cache that remembers a module bound or listed under a lock (launchers and their frames, bound
    entry points, plan settings, the attention variant listing)."""
    from fi_ffi import caches
    from fi_ffi.ops.attention import variants

    caches.reset()
    variants._refresh()


@dataclass(frozen=True)
class WheelEnv:
    """What ``shared_wheel_env`` set up: the cache folder, the lock file and the wheel."""

    cache: Path
    lock: Path
    wheel: Path


def build_wheel(path: Path, members: dict[str, bytes], *, dist: str = "", version: str = "") -> Path:
    """Write a wheel at ``path`` holding ``members`` plus a minimal dist-info (METADATA, WHEEL, RECORD).

    ``dist`` / ``version`` default to the fields of the file name. Returns ``path``.
    """
    parts = path.name.removesuffix(".whl").split("-")
    dist = dist or parts[0].replace("_", "-")
    version = version or parts[1]
    info = f"{parts[0]}-{parts[1]}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: fi_ffi-tests\nRoot-Is-Purelib: false\nTag: {'-'.join(parts[-3:])}\n"
    ).encode()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


TINY_WHEEL = "tiny-1.0+cu130-py3-none-linux_x86_64.whl"


def pin_tiny_wheel(
    monkeypatch: pytest.MonkeyPatch, folder: Path, members: dict[str, bytes], *, hash_members: bool = False
) -> Path:
    """Build :data:`TINY_WHEEL` holding ``members`` (fake modules) in ``folder/wheels`` and make a lock pinning it
    (``folder/tiny.lock``; with member hashes if ``hash_members``) the active one (:func:`use_lock`); returns the
    wheel."""
    from fi_ffi import loader

    wheel = build_wheel(folder / "wheels" / TINY_WHEEL, members)
    lock = loader.dump_lock([loader.lock_entry(wheel, hash_members=hash_members)])
    use_lock(monkeypatch, folder / "tiny.lock", lock, [wheel])
    return wheel
