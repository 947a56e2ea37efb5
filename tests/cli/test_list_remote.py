"""``fi-ffi list`` reads a remote wheel's zip central directory with HTTP range requests instead of downloading
the 1-2 GB wheel (real CLI in a subprocess, a local HTTP server serving the shared test wheel); a local copy is
read in place. When the range requests fail (a server without byte ranges, one that answers them with an error,
no network), ``list`` downloads nothing: it says why, the wheel's size and what to run instead (exit 2), unless
``--allow-full-download`` allows the whole download, which is then said first with its size. ``fi-ffi fetch``
states the size before the body comes, and with no network says so in one line at once."""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.env import run_fi_ffi

from fi_ffi import loader


class RangeServer:
    """Serves one file on 127.0.0.1, honouring ``Range: bytes=a-b`` and ``bytes=-n`` (``ranges=False``: ignores
    them, as a plain server does; ``range_status``: answers every Range request with that HTTP error instead);
    counts the body bytes it sent."""

    def __init__(self, path: Path, ranges: bool, range_status: int | None = None) -> None:
        self.data = path.read_bytes()
        self.ranges = ranges
        self.sent = 0
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                spec = self.headers.get("Range", "")
                outer.requests.append(spec)
                if spec and range_status is not None:
                    self.send_error(range_status)
                    return
                size = len(outer.data)
                match = re.fullmatch(r"bytes=(\d*)-(\d*)", spec) if ranges else None
                if match is None:
                    start, end, status = 0, size - 1, 200
                elif not match.group(1):  # a suffix: the last n bytes
                    start, end, status = max(0, size - int(match.group(2))), size - 1, 206
                else:
                    start = int(match.group(1))
                    end = min(size - 1, int(match.group(2))) if match.group(2) else size - 1
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                try:
                    self.wfile.write(outer.data[start : end + 1])
                    outer.sent += end - start + 1
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: fine
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name.replace('+', '%2B')}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RangeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(params=[True, False], ids=["ranges", "no-ranges"])
def served(request: pytest.FixtureRequest, shared_wheel: Path) -> Iterator[RangeServer]:
    with RangeServer(shared_wheel, ranges=request.param) as server:
        yield server


def write_lock(tmp_path: Path, wheel: Path, url: str) -> Path:
    pins, _ = loader.lock_entries([wheel], url=url)
    lock = tmp_path / "remote.lock"
    lock.write_text(loader.dump_lock(pins, header="served over loopback"))
    return lock


def run_cli(tmp_path: Path, wheel: Path, url: str, *argv: str, house: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        "FI_FFI_LOCK": str(write_lock(tmp_path, wheel, url)),
        "FI_FFI_WHEELHOUSE": house,
        "FI_FFI_CACHE_DIR": str(tmp_path / "cache"),
        "FI_FFI_OFFLINE": "0",
        "FI_FFI_QUIET": "0",
        "FI_FFI_CUDA_VERSION": "13.0",
    }
    return run_fi_ffi(*argv, timeout=300, **env)


def run_list(tmp_path: Path, wheel: Path, url: str, *extra: str, house: str = "") -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, wheel, url, "list", "--kind", "decode", *extra, house=house)


def size_text(n: int) -> str:
    """The size as the loader writes it (fi_ffi.loader.wheels.size_text), computed here independently."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def closed_port_url(name: str) -> str:
    """An address on loopback where nothing listens: a connection to it is refused, as with no network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name.replace('+', '%2B')}"


def test_list_reads_the_central_directory_not_the_wheel(
    served: RangeServer, shared_wheel: Path, tmp_path: Path
) -> None:
    done = run_list(tmp_path, shared_wheel, served.url)
    cached = list((tmp_path / "cache").rglob("*.whl"))
    size = shared_wheel.stat().st_size
    if served.ranges:
        assert done.returncode == 0, done.stderr
        assert "batch_decode_with_kv_cache" in done.stdout  # the variants, listed
        # a small part of the wheel crossed the wire
        assert served.sent < size // 20, (served.sent, size, served.requests, done.stderr)
        assert len(served.requests) <= 4 and all(r.startswith("bytes=") for r in served.requests)
        assert cached == []  # nothing downloaded, nothing cached: the listing is not verified, so not recorded
        assert "without downloading" not in done.stderr
    else:  # no ranges: said so, with the size and what to run instead; nothing downloaded
        assert done.returncode == 2, done.stderr
        assert "does not serve byte ranges" in done.stderr and size_text(size) in done.stderr, done.stderr
        assert "fi-ffi fetch" in done.stderr and "--allow-full-download" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert cached == [] and served.sent < size, (served.sent, size)  # the body was not read through
        return
    assert done.returncode == 0, done.stderr


def test_list_reads_a_local_wheelhouse_copy_without_any_request(shared_wheel: Path, tmp_path: Path) -> None:
    with RangeServer(shared_wheel, ranges=True) as server:
        done = run_list(tmp_path, shared_wheel, server.url, house=str(shared_wheel.parent))
    assert done.returncode == 0, done.stderr
    assert "batch_decode_with_kv_cache" in done.stdout and server.requests == []


def test_a_failing_range_request_downloads_nothing(shared_wheel: Path, tmp_path: Path) -> None:
    with RangeServer(shared_wheel, ranges=True, range_status=500) as server:
        done = run_list(tmp_path, shared_wheel, server.url)
    assert done.returncode == 2, done.stderr
    assert "cannot list" in done.stderr and "HTTP 500" in done.stderr and "fi-ffi fetch" in done.stderr
    assert "Nothing was downloaded" in done.stderr and "Traceback" not in done.stderr
    assert server.requests == [server.requests[0]] and server.requests[0].startswith("bytes=")  # no whole GET
    assert list((tmp_path / "cache").rglob("*.whl")) == []


def test_allow_full_download_says_the_size_then_downloads(shared_wheel: Path, tmp_path: Path) -> None:
    with RangeServer(shared_wheel, ranges=False) as server:
        done = run_list(tmp_path, shared_wheel, server.url, "--allow-full-download")
    assert done.returncode == 0, done.stderr
    assert "batch_decode_with_kv_cache" in done.stdout
    said = done.stderr.index(f"downloading the whole wheel, {size_text(shared_wheel.stat().st_size)}")
    assert said < done.stderr.index("fetched "), done.stderr  # the size came before the download
    assert [p.name for p in (tmp_path / "cache").rglob("*.whl")] == [shared_wheel.name]


@pytest.mark.parametrize("argv", [("list", "--kind", "decode"), ("fetch",)], ids=["list", "fetch"])
def test_no_network_is_one_line_at_once(shared_wheel: Path, tmp_path: Path, argv: tuple[str, ...]) -> None:
    started = time.monotonic()
    done = run_cli(tmp_path, shared_wheel, closed_port_url(shared_wheel.name), *argv)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no network" in lines[0] and "connection was refused" in lines[0], done.stderr
    assert "retry in" not in done.stderr  # no backoff: the loader's 5 attempts took 15 s before
    assert took < 10, took  # the interpreter's start and the imports, not retries
    assert list((tmp_path / "cache").rglob("*.whl")) == []


@pytest.mark.parametrize("argv", [("list", "--kind", "decode"), ("fetch",)], ids=["list", "fetch"])
def test_no_network_names_a_wheelhouse_that_does_not_exist(
    shared_wheel: Path, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    # the fix sends the user to FI_FFI_WHEELHOUSE: it said nothing of the folder it names being missing
    missing = tmp_path / "wheelhouse"
    done = run_cli(tmp_path, shared_wheel, closed_port_url(shared_wheel.name), *argv, house=str(missing))
    assert done.returncode == 2, done.stderr
    assert "no network" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"FI_FFI_WHEELHOUSE (it names {missing}, which does not exist: make that folder, or point" in done.stderr


def test_fetch_states_the_size_before_the_download(shared_wheel: Path, tmp_path: Path) -> None:
    with RangeServer(shared_wheel, ranges=True) as server:
        done = run_cli(tmp_path, shared_wheel, server.url, "fetch")
    assert done.returncode == 0, done.stderr
    said = done.stderr.index(f"fetching {shared_wheel.name} ({size_text(shared_wheel.stat().st_size)})")
    assert said < done.stderr.index("fetched "), done.stderr
    assert done.stdout.strip().endswith(shared_wheel.name)
