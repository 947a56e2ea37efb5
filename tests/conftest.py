"""Shared test fixtures.

Whole session (automatic, see :func:`_fi_ffi_session_env`): the loader runs against a private temporary cache
(``FI_FFI_CACHE_DIR``), shows no progress bars (``FI_FFI_QUIET``), never touches the network
(``FI_FFI_OFFLINE=1``; set ``FI_FFI_TEST_ALLOW_NETWORK=1`` to lift that) and, when the shared test kernel wheel
is present and ``FI_FFI_LOCK`` is not already set, uses a lock pinning that wheel with its folder as
``FI_FFI_WHEELHOUSE``. So no test can download the 1-2 GB upstream wheels, and every test that loads a kernel
module gets the shared wheel's. Subprocesses started by tests inherit these variables.

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
- ``release_072``: for one test, a lock pinning the FlashInfer 0.7.2 test wheel alone is active (every cache that
  remembers a module is emptied before and after); returns its module URIs; skips when the wheel is absent;
- ``release_072_over_063``: likewise with the 0.6.3 test wheels and the 0.7.2 one in one lock (0.7.2 serves the
  names both have, 0.6.3 the rest);
- ``fresh_cache``: an empty cache folder of the test's own (``FI_FFI_CACHE_DIR``);
- ``shared_wheel_env``: ``fresh_cache`` plus the shared wheel's lock and wheelhouse; returns a ``WheelEnv``;
- ``make_wheel``: builds a small wheel (zip) from ``{member: bytes}``;
- ``tvm_ffi_runtime_wheel``: a runtime wheel holding the installed ``libtvm_ffi.so`` (skips without it);
- ``http_server``: a local HTTP server on 127.0.0.1 in a thread serving registered byte strings, with
  options to answer an HTTP error or to lie about ``Content-Length`` and hang up.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.util
import os
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests judge results, never speed: a 2-core CI machine under load can take longer than hypothesis'
# 200 ms default deadline on a first example (imports, a module's first load), which would fail a correct test.
hypothesis_settings.register_profile("fi_ffi", deadline=None)
hypothesis_settings.load_profile("fi_ffi")

REPO = Path(__file__).resolve().parent.parent
SHARED_WHEEL_GLOB = "flashinfer_jit_cache-*.whl"
WHEELS_HINT = "where to get it: CONTRIBUTING.md, section 'Test kernel wheels'"
"""Appended to every skip for a missing test wheel: CONTRIBUTING.md says what ``../shared`` holds and how to get it."""
SHARED_WHEEL_MISSING = (
    "needs the shared test kernel wheel flashinfer_jit_cache-*.whl, found neither in $FI_FFI_TEST_WHEELS nor in "
    f"<repo>/../shared/wheels (outside the checkout); {WHEELS_HINT}"
)

# Run against the checkout even when fi_ffi is not installed (plain `pytest` puts only tests/ on sys.path).
if importlib.util.find_spec("fi_ffi") is None:
    sys.path.insert(0, str(REPO))


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with the checkout first on ``PYTHONPATH``, for child Python processes."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def find_shared_wheel() -> Path | None:
    """The shared test kernel wheel, looked for in ``$FI_FFI_TEST_WHEELS`` then ``<repo>/../shared/wheels``.

    Both lie outside the checkout (the wheel is too big to commit); ``None`` when neither holds one, and every
    test that needs it then skips saying so (:data:`SHARED_WHEEL_MISSING`).
    """
    folders = [os.environ.get("FI_FFI_TEST_WHEELS", ""), str(REPO.parent / "shared" / "wheels")]
    for folder in folders:
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob(SHARED_WHEEL_GLOB))
            if found:
                return found[0]
    return None


needs_shared_wheel = pytest.mark.skipif(find_shared_wheel() is None, reason=SHARED_WHEEL_MISSING)
"""For one ``pytest.param`` of a parametrized test: the case reaches the module lookup (the packaged lock's
wheels are not downloaded in tests), so without the shared test wheel it skips saying so."""


SHARED_072_MISSING = (
    "needs the FlashInfer 0.7.2 test kernel wheel flashinfer_jit_cache_072-*.whl, found neither in "
    f"$FI_FFI_TEST_WHEELS_072 nor in <repo>/../shared/wheels-072 (outside the checkout); {WHEELS_HINT}"
)
TEST_RELEASES = ("0.6.3", "0.7.2")
TEST_RELEASE = os.environ.get("FI_FFI_TEST_RELEASE", "")
"""The release whose modules the session lock prefers (``FI_FFI_TEST_RELEASE``; empty: the 0.6.3 test wheels)."""


def find_wheels_072() -> list[Path]:
    """The FlashInfer 0.7.2 test kernel wheels, from ``$FI_FFI_TEST_WHEELS_072`` or ``<repo>/../shared/wheels-072``."""
    for folder in (os.environ.get("FI_FFI_TEST_WHEELS_072", ""), str(REPO.parent / "shared" / "wheels-072")):
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob("flashinfer_jit_cache*.whl"))
            if found:
                return found
    return []


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
    from fi_ffi import caches
    from fi_ffi.ops.attention import variants

    path.write_text(text)
    monkeypatch.setenv("FI_FFI_LOCK", str(path))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", os.pathsep.join(dict.fromkeys(str(w.parent) for w in wheels)))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")  # the test wheels' CUDA, whatever this machine has
    monkeypatch.delenv("FI_FFI_SM", raising=False)
    caches.reset()  # launchers, bound entry points, plan settings: all resolve again under this lock
    variants._refresh()


COMM_MISSING = f"needs the comm test wheel (FI_FFI_TEST_WHEELS_COMM or <repo>/../shared/wheels-comm); {WHEELS_HINT}"


def comm_wheel() -> Path | None:
    for folder in (os.environ.get("FI_FFI_TEST_WHEELS_COMM", ""), str(REPO.parent / "shared" / "wheels-comm")):
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob("flashinfer_jit_cache_comm-*.whl"))
            if found:
                return found[0]
    return None


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


def pytest_configure(config: pytest.Config) -> None:
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``FI_FFI_TEST_RELEASE=0.7.2``, a GPU test stopped by a module that neither the core 0.6.3 wheel nor the
    0.7.2 wheel holds (the staged set leaves the extension wheel out) is a skip naming the module, not a failure."""
    outcome = yield
    if (
        TEST_RELEASE != "0.7.2"
        or call.excinfo is None
        or item.get_closest_marker("gpu") is None
        or item.get_closest_marker("release_check") is not None
    ):
        return
    from fi_ffi.errors import KernelNotFoundError

    if not call.excinfo.errisinstance(KernelNotFoundError):
        return
    why = f"FI_FFI_TEST_RELEASE=0.7.2 pins no such module: {str(call.excinfo.value).splitlines()[0]}"
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
            mp.setenv("FI_FFI_WHEELHOUSE", os.pathsep.join(dict.fromkeys(str(w.parent) for w in [*pinned, *preferred])))
        yield


def shared_wheels(core: Path) -> list[Path]:
    """The core test wheel, the kernel wheels beside it (the extension wheel) and the model-family wheel
    (:func:`find_wheels_models`), pinned together by one lock (their module names are disjoint)."""
    beside = sorted(p for p in core.parent.glob("flashinfer_jit_cache*.whl") if p != core)
    names = {p.name for p in beside}
    return [core, *beside, *(w for w in find_wheels_models() if w.name not in names)]


SHARED_MODELS_MISSING = (
    "needs the model-family test kernel wheel flashinfer_jit_cache_models-*.whl, found neither beside the core test "
    "wheel, nor in $FI_FFI_TEST_WHEELS_MODELS, nor in <repo>/../shared/wheels-models (outside the checkout); "
    f"{WHEELS_HINT}"
)


def find_wheels_models() -> list[Path]:
    """The FlashInfer 0.6.3 model-family test kernel wheel (grouped/FP8 GEMM, routing, attention sinks, head_dim
    256, Mamba), from ``$FI_FFI_TEST_WHEELS_MODELS`` or ``<repo>/../shared/wheels-models``. On the GPU machine it
    is staged beside the core wheel instead (``.gpu/kernels``), where :func:`shared_wheels` finds it."""
    for folder in (os.environ.get("FI_FFI_TEST_WHEELS_MODELS", ""), str(REPO.parent / "shared" / "wheels-models")):
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob("flashinfer_jit_cache_models-*.whl"))
            if found:
                return found
    return []


def _lock_text_for(*wheels: Path) -> str:
    return lock_text(list(wheels))


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
    path.write_text(_lock_text_for(shared_wheel))
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


@pytest.fixture
def release_072(kernel_modules: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """For this test, the FlashInfer 0.7.2 test wheel is the only pinned kernel wheel; returns its module URIs.

    Every cache that remembers a module (launchers and their frames, bound entry points, plan settings, the
    variant listing) is emptied before and after, so later tests bind the session's 0.6.3 modules again.
    """
    wheels = find_wheels_072()
    if not wheels:
        pytest.skip(SHARED_072_MISSING)
    with monkeypatch.context() as mp:
        use_lock(mp, tmp_path / "072.lock", lock_text(wheels, header="FlashInfer 0.7.2 test wheel"), wheels)
        yield _available_uris()
    _forget_lock()


@pytest.fixture
def release_072_over_063(
    kernel_modules: list[str], shared_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """For this test, one lock pins the 0.6.3 test wheels and the 0.7.2 one (by the lock's default rules the newer
    release serves a name both have); returns the module URIs. Caches are emptied as for ``release_072``."""
    wheels = find_wheels_072()
    if not wheels:
        pytest.skip(SHARED_072_MISSING)
    both = [*shared_wheels(shared_wheel), *wheels]
    with monkeypatch.context() as mp:
        use_lock(mp, tmp_path / "both.lock", lock_text(both, header="0.6.3 + 0.7.2 test wheels"), both)
        yield _available_uris()
    _forget_lock()


def _available_uris() -> list[str]:
    from fi_ffi import loader

    return loader.available_uris()


def _forget_lock() -> None:
    from fi_ffi import caches
    from fi_ffi.ops.attention import variants

    caches.reset()
    variants._refresh()


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder for this test only, set as ``FI_FFI_CACHE_DIR``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(cache))
    return cache


@dataclass(frozen=True)
class WheelEnv:
    """What ``shared_wheel_env`` set up: the cache folder, the lock file and the wheel."""

    cache: Path
    lock: Path
    wheel: Path


@pytest.fixture
def shared_wheel_env(
    fresh_cache: Path, shared_wheel: Path, shared_wheel_lock: Path, monkeypatch: pytest.MonkeyPatch
) -> WheelEnv:
    """A fresh cache, with ``FI_FFI_LOCK`` pinning the shared wheel and its folder as ``FI_FFI_WHEELHOUSE``."""
    monkeypatch.setenv("FI_FFI_LOCK", str(shared_wheel_lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(shared_wheel.parent))
    return WheelEnv(cache=fresh_cache, lock=shared_wheel_lock, wheel=shared_wheel)


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


@dataclass
class Route:
    """What ``http_server`` answers for one path: ``status``, ``body``, and ``claim_length`` (a
    ``Content-Length`` to announce instead of the true one; the server then sends ``body`` and hangs up)."""

    body: bytes
    status: int = 200
    claim_length: int | None = None


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving :class:`Route` s; ``url(path)`` gives their address."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404, "no such file")
                    return
                if route.status != 200:
                    self.send_error(route.status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                length = route.claim_length if route.claim_length is not None else len(route.body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(route.body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, *, status: int = 200, claim_length: int | None = None) -> str:
        """Serve ``body`` at ``path``; returns its URL."""
        self.routes[path] = Route(body, status, claim_length)
        return self.url(path)

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        """Shut the server down and close its socket (later connections are refused)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """A :class:`LocalServer` for the test; stopped afterwards."""
    server = LocalServer()
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()
