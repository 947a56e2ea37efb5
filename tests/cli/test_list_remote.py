"""``fi-ffi list`` reads a remote wheel's zip central directory with HTTP range requests instead of downloading
the 1-2 GB wheel (real CLI in a subprocess, a local HTTP server serving the shared test wheel); a local copy is
read in place; a server without byte ranges is said to be one before the whole wheel is downloaded."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.env import subprocess_env

from fi_ffi import loader


class RangeServer:
    """Serves one file on 127.0.0.1, honouring ``Range: bytes=a-b`` and ``bytes=-n`` (``ranges=False``: ignores
    them, as a plain server does); counts the body bytes it sent."""

    def __init__(self, path: Path, ranges: bool) -> None:
        self.data = path.read_bytes()
        self.ranges = ranges
        self.sent = 0
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                spec = self.headers.get("Range", "")
                outer.requests.append(spec)
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


@pytest.fixture(params=[True, False], ids=["ranges", "no-ranges"])
def served(request: pytest.FixtureRequest, shared_wheel: Path) -> Iterator[RangeServer]:
    server = RangeServer(shared_wheel, ranges=request.param)
    try:
        yield server
    finally:
        server.stop()


def run_list(tmp_path: Path, wheel: Path, url: str, house: str = "") -> subprocess.CompletedProcess[str]:
    pins, _ = loader.lock_entries([wheel], url=url)
    lock = tmp_path / "remote.lock"
    lock.write_text(loader.dump_lock(pins, header="served over loopback"))
    env = {
        "FI_FFI_LOCK": str(lock),
        "FI_FFI_WHEELHOUSE": house,
        "FI_FFI_CACHE_DIR": str(tmp_path / "cache"),
        "FI_FFI_OFFLINE": "0",
        "FI_FFI_QUIET": "0",
        "FI_FFI_CUDA_VERSION": "13.0",
    }
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", "list", "--kind", "decode"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(**env),
    )


def test_list_reads_the_central_directory_not_the_wheel(
    served: RangeServer, shared_wheel: Path, tmp_path: Path
) -> None:
    done = run_list(tmp_path, shared_wheel, served.url)
    assert done.returncode == 0, done.stderr
    assert "batch_decode_with_kv_cache" in done.stdout  # the variants, listed
    cached = list((tmp_path / "cache").rglob("*.whl"))
    size = shared_wheel.stat().st_size
    if served.ranges:
        # a small part of the wheel crossed the wire
        assert served.sent < size // 20, (served.sent, size, served.requests, done.stderr)
        assert len(served.requests) <= 4 and all(r.startswith("bytes=") for r in served.requests)
        assert cached == []  # nothing downloaded, nothing cached: the listing is not verified, so not recorded
        assert "without downloading" not in done.stderr
    else:  # no ranges: said so before the whole wheel came, then downloaded and verified as before
        assert "does not serve byte ranges" in done.stderr and "downloading the whole wheel" in done.stderr
        assert [p.name for p in cached] == [shared_wheel.name]


def test_list_reads_a_local_wheelhouse_copy_without_any_request(shared_wheel: Path, tmp_path: Path) -> None:
    server = RangeServer(shared_wheel, ranges=True)
    try:
        done = run_list(tmp_path, shared_wheel, server.url, house=str(shared_wheel.parent))
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "batch_decode_with_kv_cache" in done.stdout and server.requests == []
