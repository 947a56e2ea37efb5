"""The suite's fixtures and pytest hooks, nothing else (tests/package/test_suite_structure.py checks it): what
tests share that is not a fixture lives in ``tests/helpers/`` (the wheels and locks: ``helpers.wheels``; the
checkout and child environments: ``helpers.env``; the local HTTP server: ``helpers.http_server``).

Whole session (automatic, see :func:`_fi_ffi_session_env`): the loader runs against a private temporary cache
(``FI_FFI_CACHE_DIR``), shows no progress bars (``FI_FFI_QUIET``), never touches the network
(``FI_FFI_OFFLINE=1``; set ``FI_FFI_TEST_ALLOW_NETWORK=1`` to lift that) and, when the shared test kernel wheel
is present and ``FI_FFI_LOCK`` is not already set, uses a lock pinning that wheel with its folder as
``FI_FFI_WHEELHOUSE``. So no test can download the 1-2 GB upstream wheels, and every test that loads a kernel
module gets the shared wheel's. Subprocesses started by tests inherit these variables. The ops' driver check
(:func:`fi_ffi.launch.kernels.require_driver`) is passed in the test process (not in its subprocesses), so that
calls reach the real modules on a machine without a driver.

GPU suite against FlashInfer 0.7.2 (``FI_FFI_TEST_RELEASE=0.7.2``): the session lock pins the 0.6.3 test wheels
and the 0.7.2 one (``$FI_FFI_TEST_WHEELS_072`` or ``<repo>/../shared/wheels-072``) with ``priority = 1`` on the
0.7.2 entries, so every module 0.7.2 has comes from it and the 0.6.3 wheels serve the rest (single
prefill/decode, GDN, ...). A GPU test whose module neither pinned wheel holds is reported as skipped, naming the
module, in that mode only (unless marked ``release_check``). ``tools/gpu_run.sh`` sets this up on the GPU machine.

Fixtures for tests:

- ``shared_wheel``: path of the shared test kernel wheel (skips the test when it is absent);
- ``shared_wheel_lock``: a lock file pinning it (written with ``fi_ffi.loader.lock_entry``);
- ``kernel_modules``: the loader is ready to load the shared wheel's modules (runtime and libcudart load);
  returns the available module URIs; skips when the wheel or libcudart is missing;
- ``models_modules``: the model-family test wheel (``../shared/wheels-models``: grouped/FP8 GEMM, routing,
  attention sinks, head_dim 256, Mamba) is pinned by the session lock beside the core wheels; returns the module
  URIs; skips naming the wheel when it is absent (on the GPU machine: stage it in ``.gpu/kernels``);
- ``fp8_modules``: likewise for the FP8 test wheel (``../shared/wheels-fp8``: bf16 queries over an e4m3 KV cache,
  FA3 FP8 prefill); skips naming the wheel when it is absent;
- ``release_072``: for one test, a lock pinning the FlashInfer 0.7.2 test wheel alone is active (every cache that
  remembers a module is emptied before and after); returns its module URIs; skips when the wheel is absent;
- ``release_072_over_063``: likewise with the 0.6.3 test wheels and the 0.7.2 one in one lock (0.7.2 serves the
  names both have, 0.6.3 the rest);
- ``make_array``: TVM-FFI's ``ffi.Array`` constructor (to make a plan's schedule for fake-device runs);
- ``fake_device_only``: skips the test on a machine with a GPU (for tests whose fake-device descriptors point at
  host memory, which real kernels would dereference; the GPU suite covers those calls);
- ``fresh_cache``: an empty cache folder of the test's own (``FI_FFI_CACHE_DIR``);
- ``shared_wheel_env``: ``fresh_cache`` plus the shared wheel's lock and wheelhouse; returns a ``WheelEnv``;
- ``make_wheel``: builds a small wheel (zip) from ``{member: bytes}``;
- ``tvm_ffi_runtime_wheel``: a runtime wheel holding the installed ``libtvm_ffi.so`` (skips without it);
- ``http_server``: a local HTTP server on 127.0.0.1 in a thread serving registered byte strings, with
  options to answer an HTTP error or to lie about ``Content-Length`` and hang up;
- ``codec``: the ``TextCodec`` of ``helpers.text_checkpoints.write_text_checkpoint`` (a byte-level BPE tokenizer,
  a ChatML-style template; needs ``tokenizers`` and ``jinja2``), and ``pool``: plain tokens of it (no special
  token) for the serving tests' stand-in engine to generate from; a test module may define its own;
- ``served``: the OpenAI-compatible server on loopback over the stand-in engine (``helpers.serve.Served``: 8
  slots, over ``codec`` and ``pool``) with an official ``openai`` client; closed after the test.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.env import make_checkout_importable
from helpers.http_server import LocalServer
from helpers.wheels import (
    COMM_MISSING,
    FP8_DECODE_MODULE,
    SHARED_072_MISSING,
    SHARED_FP8_MISSING,
    SHARED_MODELS_MISSING,
    SHARED_WHEEL_MISSING,
    TEST_RELEASE,
    TEST_RELEASES,
    WheelEnv,
    build_wheel,
    comm_wheel,
    find_shared_wheel,
    find_wheels_072,
    forget_lock,
    lock_text,
    shared_wheels,
    supplied_by_user,
    use_lock,
    wheelhouse,
)
from hypothesis import settings as hypothesis_settings


def pytest_configure(config: pytest.Config) -> None:
    make_checkout_importable()  # run against the checkout even when fi_ffi is not installed
    # Property tests judge results, never speed: a 2-core CI machine under load can take longer than hypothesis'
    # 200 ms default deadline on a first example (imports, a module's first load), which would fail a correct test.
    hypothesis_settings.register_profile("fi_ffi", deadline=None)
    hypothesis_settings.load_profile("fi_ffi")
    if TEST_RELEASE and TEST_RELEASE not in TEST_RELEASES:
        raise pytest.UsageError(
            f"FI_FFI_TEST_RELEASE: expected one of {', '.join(TEST_RELEASES)}, got {TEST_RELEASE!r}"
        )
    if TEST_RELEASE == "0.7.2" and not find_wheels_072():
        raise pytest.UsageError(f"FI_FFI_TEST_RELEASE=0.7.2 {SHARED_072_MISSING}")
    config.addinivalue_line(
        "markers",
        "release_check: never turned into a skip by FI_FFI_TEST_RELEASE=0.7.2 when "
        "a module is missing (the test is about which module serves a call)",
    )


@pytest.fixture
def comm_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The comm wheel pinned alone for this test (everything bound under it is forgotten afterwards)."""
    from fi_ffi import caches

    wheel = comm_wheel()
    if wheel is None:
        pytest.skip(COMM_MISSING)
    path = tmp_path / "comm.lock"
    use_lock(monkeypatch, path, lock_text([wheel]), [wheel])
    yield path
    caches.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test stopped by a module the pinned test wheels do not hold is a skip naming the module, not a failure,
    where that is expected: with ``FI_FFI_TEST_WHEELS`` naming a wheel of the contributor's (FlashInfer's prebuilt
    ``flashinfer-jit-cache`` wheel holds its own set of modules), and for GPU tests with
    ``FI_FFI_TEST_RELEASE=0.7.2`` (the staged set leaves the extension wheel out)."""
    outcome = yield
    if call.excinfo is None or item.get_closest_marker("release_check") is not None:
        return
    from fi_ffi.errors import KernelNotFoundError

    if not call.excinfo.errisinstance(KernelNotFoundError):
        return
    first = str(call.excinfo.value).splitlines()[0]
    if supplied_by_user():
        why = f"the test wheel FI_FFI_TEST_WHEELS names holds no such module: {first}"
    elif TEST_RELEASE == "0.7.2" and item.get_closest_marker("gpu") is not None:
        why = f"FI_FFI_TEST_RELEASE=0.7.2 pins no such module: {first}"
    else:
        return
    report = outcome.get_result()
    report.outcome = "skipped"
    report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {why}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the GPU machine, skip tests that need a machine without a GPU (fake cuda:0 descriptors over host
    memory would really launch there)."""
    if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
        return
    skip = pytest.mark.skip(reason="needs a machine without a GPU (CI has none)")
    for item in items:
        if item.get_closest_marker("cpu_only") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _fi_ffi_session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Isolate the loader for the whole session (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FI_FFI_CACHE_DIR", str(tmp_path_factory.mktemp("fi_ffi_cache")))
        mp.setenv("FI_FFI_QUIET", "1")
        # a flashinfer-jit-cache installed beside the tests (the GPU machine installs the test wheels for the
        # flashinfer-python peers) must not replace the wheels the tests pin; tests of that feature set it to 1
        if not os.environ.get("FI_FFI_USE_INSTALLED"):
            mp.setenv("FI_FFI_USE_INSTALLED", "0")
        if os.environ.get("FI_FFI_TEST_ALLOW_NETWORK") != "1":
            mp.setenv("FI_FFI_OFFLINE", "1")
        wheel = find_shared_wheel()
        if wheel is not None and not os.environ.get("FI_FFI_LOCK"):
            lock = tmp_path_factory.mktemp("fi_ffi_lock") / "shared-wheel.lock"
            preferred = find_wheels_072() if TEST_RELEASE == "0.7.2" else []
            names = {w.name for w in preferred}
            pinned = [w for w in shared_wheels(wheel) if w.name not in names]
            lock.write_text(lock_text(pinned, preferred))
            mp.setenv("FI_FFI_LOCK", str(lock))
            mp.setenv("FI_FFI_WHEELHOUSE", wheelhouse([*pinned, *preferred]))
        # The CPU tests cross the FFI to the real modules with descriptors claiming cuda:0 (their wire layout):
        # the ops' "no NVIDIA driver found" check is passed in this process only; tests/ops/test_no_driver.py
        # calls the ops in child processes, where it is not.
        from fi_ffi.launch import kernels

        mp.setattr(kernels, "_driver_found", True)
        yield


@pytest.fixture(scope="session")
def shared_wheel() -> Path:
    """Path of the shared test kernel wheel (21 sm_90a modules); skips the test if it is not present."""
    wheel = find_shared_wheel()
    if wheel is None:
        pytest.skip(SHARED_WHEEL_MISSING)
    return wheel


@pytest.fixture(scope="session")
def shared_wheel_lock(shared_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lock file (format version 1) pinning the shared test wheel, generated by ``loader.lock_entry``."""
    path = tmp_path_factory.mktemp("shared_lock") / "shared.lock"
    path.write_text(lock_text([shared_wheel]))
    return path


@pytest.fixture(scope="session")
def kernel_modules(shared_wheel: Path) -> list[str]:
    """The loader set up for the shared wheel's modules (session env); returns their URIs.

    Loads libtvm_ffi.so and libcudart; skips when libcudart (CUDA 13 runtime) is not installed.
    """
    from fi_ffi import loader
    from fi_ffi.errors import LibraryLoadError

    if os.environ.get("FI_FFI_RUN_GPU_TESTS") == "1":
        # These tests send descriptors that claim cuda:0 but point at host memory, relying on the missing GPU
        # to stop the kernel; on a GPU machine the kernel would run on host pointers. The GPU tests cover it.
        pytest.skip("CPU-only signature proof: skipped where a GPU would really launch the kernel")
    if TEST_RELEASE == "0.7.2":
        pytest.skip(
            "CPU signature proofs run under the 0.6.3 session lock; FI_FFI_TEST_RELEASE=0.7.2 is for the "
            "GPU suite (the release_072 fixture covers 0.7.2 on CPU)"
        )
    loader.runtime_library()
    try:
        loader.ensure_cudart()
    except LibraryLoadError as exc:
        pytest.skip(f"libcudart is not available: {exc}")
    return loader.available_uris()


@pytest.fixture(scope="session")
def models_modules() -> list[str]:
    """The model-family modules are pinned by the session lock (CPU: ``../shared/wheels-models``; GPU machine: the
    wheel staged beside the core one); returns every available module URI; skips naming the wheel otherwise.
    Needs no GPU and no libcudart of its own: the tests that load modules on CPU also ask ``kernel_modules``."""
    from fi_ffi import loader

    if find_shared_wheel() is None:  # no session lock: the packaged one would need the 1-2 GB upstream wheels
        pytest.skip(SHARED_WHEEL_MISSING)
    uris = loader.available_uris()
    if "dsv3_fused_routing" not in uris:
        pytest.skip(SHARED_MODELS_MISSING)
    return uris


@pytest.fixture(scope="session")
def fp8_modules() -> list[str]:
    """The FP8 attention modules are pinned by the session lock (CPU: ``../shared/wheels-fp8``; GPU machine: the
    wheel staged beside the core one); returns every available module URI; skips naming the wheel otherwise."""
    from fi_ffi import loader

    if find_shared_wheel() is None:
        pytest.skip(SHARED_WHEEL_MISSING)
    uris = loader.available_uris()
    if FP8_DECODE_MODULE not in uris:
        pytest.skip(SHARED_FP8_MISSING)
    return uris


@pytest.fixture
def release_072(kernel_modules: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """For this test, the FlashInfer 0.7.2 test wheel is the only pinned kernel wheel; returns its module URIs.

    Every cache that remembers a module (launchers and their frames, bound entry points, plan settings, the
    variant listing) is emptied before and after, so later tests bind the session's 0.6.3 modules again.
    """
    from fi_ffi import loader

    wheels = find_wheels_072()
    if not wheels:
        pytest.skip(SHARED_072_MISSING)
    with monkeypatch.context() as mp:
        use_lock(mp, tmp_path / "072.lock", lock_text(wheels, header="FlashInfer 0.7.2 test wheel"), wheels)
        yield loader.available_uris()
    forget_lock()


@pytest.fixture
def release_072_over_063(
    kernel_modules: list[str], shared_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """For this test, one lock pins the 0.6.3 test wheels and the 0.7.2 one (by the lock's default rules the newer
    release serves a name both have); returns the module URIs. Caches are emptied as for ``release_072``."""
    from fi_ffi import loader

    wheels = find_wheels_072()
    if not wheels:
        pytest.skip(SHARED_072_MISSING)
    both = [*shared_wheels(shared_wheel), *wheels]
    with monkeypatch.context() as mp:
        use_lock(mp, tmp_path / "both.lock", lock_text(both, header="0.6.3 + 0.7.2 test wheels"), both)
        yield loader.available_uris()
    forget_lock()


@pytest.fixture(scope="module")
def make_array() -> Any:
    from fi_ffi.abi.call import Function

    return Function.global_function("ffi.Array")


@pytest.fixture
def fake_device_only() -> None:
    from cuda.bindings import runtime as rt

    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("fake-device packing tests need a machine without a GPU (the GPU suite covers the calls)")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder for this test only, set as ``FI_FFI_CACHE_DIR``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shared_wheel_env(
    fresh_cache: Path, shared_wheel: Path, shared_wheel_lock: Path, monkeypatch: pytest.MonkeyPatch
) -> WheelEnv:
    """A fresh cache, with ``FI_FFI_LOCK`` pinning the shared wheel and its folder as ``FI_FFI_WHEELHOUSE``."""
    monkeypatch.setenv("FI_FFI_LOCK", str(shared_wheel_lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(shared_wheel.parent))
    return WheelEnv(cache=fresh_cache, lock=shared_wheel_lock, wheel=shared_wheel)


@pytest.fixture
def make_wheel(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_wheel(filename, {member: bytes}, folder=None)`` → path of a new wheel (default folder:
    ``tmp_path / "wheels"``)."""

    def make(filename: str, members: dict[str, bytes], folder: Path | None = None) -> Path:
        return build_wheel((folder or tmp_path / "wheels") / filename, members)

    return make


@pytest.fixture(scope="session")
def tvm_ffi_runtime_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runtime wheel ``apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_28_<arch>.whl`` whose
    ``tvm_ffi/lib/libtvm_ffi.so`` is the installed package's (real library, self-built wheel)."""
    import platform

    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("apache-tvm-ffi is not installed (dev extra)")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_ffi.so"
    name = f"apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_28_{platform.machine()}.whl"
    return build_wheel(tmp_path_factory.mktemp("runtime_wheel") / name, {"tvm_ffi/lib/libtvm_ffi.so": lib.read_bytes()})


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """A :class:`LocalServer` for the test; stopped afterwards."""
    server = LocalServer()
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture(scope="session")
def codec(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from helpers.text_checkpoints import write_text_checkpoint

    from fi_engine.text.codec import TextCodec

    return TextCodec.from_dir(write_text_checkpoint(tmp_path_factory.mktemp("text") / "m"))


@pytest.fixture(scope="session")
def pool(codec: Any) -> list[int]:
    return sorted(set(codec.encode("The quick brown fox jumps over the lazy dog. Hello, how are you today?")))


@pytest.fixture
def served(codec: Any, pool: list[int]) -> Iterator[Any]:
    from helpers.serve import Served

    server = Served(codec, pool, max_batch=8)
    yield server
    server.close()
