"""Kernel-wheel downloads under faults: resume (HTTP Range), retry with backoff, logging, proxy and CA settings.

Every server here is a local ``http.server`` on 127.0.0.1 started by the test; no test reaches the network.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.env import subprocess_env

from fi_ffi.errors import FetchError
from fi_ffi.loader import cache, lockfile, wheels

NAME = "demo_kernels-1.0+cu130-py3-none-linux_x86_64.whl"
PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """How the server answers: ``drops`` requests are cut after ``cut_at`` body bytes (the full length is
    announced); ``ranges`` honours ``Range``; ``fail_first`` answers that many requests with ``status``."""

    drops: int = 0
    cut_at: int = len(PAYLOAD) // 3
    ranges: bool = True
    fail_first: int = 0
    status: int = 503
    requests: list[dict[str, str]] = field(default_factory=list)


class Server:
    """A threaded HTTP(S) server on 127.0.0.1 serving PAYLOAD at any path, as ``Behaviour`` says."""

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        b = behaviour

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                b.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                if len(b.requests) <= b.fail_first:
                    self.send_error(b.status)
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if b.ranges and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD) - start))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                body = PAYLOAD[start:]
                if b.drops > 0:
                    b.drops -= 1
                    body = body[: b.cut_at]
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/dl/" + NAME) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(behaviour, tls))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path) -> Path:
    """Network allowed (local servers only), no proxy or CA settings from the caller, quick retries."""
    monkeypatch.delenv("FI_FFI_OFFLINE", raising=False)
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(wheels, "BACKOFF_S", 0.01)
    return fresh_cache


def pin_for(url: str) -> lockfile.WheelPin:
    text = f'version = 1\n[[kernel]]\nfilename = "{NAME}"\nsha256 = "{SHA}"\ncuda = "13.0"\narch = "x86_64"\n'
    return lockfile.parse_lock(text + f'url = "{url}"\n', Path("/locks/demo.lock")).kernels[0]


def test_a_cut_connection_is_resumed_with_a_range_request(
    serve: Callable[..., Server], online: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="fi_ffi")
    b = Behaviour(drops=2)
    server = serve(b)
    path = wheels.ensure_wheel(pin_for(server.url()))
    assert path.read_bytes() == PAYLOAD and cache.stamped(path, SHA)
    assert [r.get("range") for r in b.requests] == [None, f"bytes={b.cut_at}-", f"bytes={2 * b.cut_at}-"]
    assert b.requests[1]["if-range"] == '"v1"'
    messages = [r.message for r in caplog.records]
    assert any(m == f"fetching {NAME} (3.0 MiB) from {server.url()}" for m in messages), messages
    assert sum("resuming at byte" in m for m in messages) == 2
    assert any(m.startswith(f"fetched {NAME} (3.0 MiB, sha256 verified)") for m in messages)
    assert not [p for p in online.rglob("*") if cache.TMP_MARK in p.name]


def test_a_server_without_range_support_is_read_again_from_the_start(
    serve: Callable[..., Server], online: Path
) -> None:
    b = Behaviour(drops=1, ranges=False)
    server = serve(b)
    assert wheels.ensure_wheel(pin_for(server.url())).read_bytes() == PAYLOAD
    assert len(b.requests) == 2 and b.requests[1]["range"] == f"bytes={b.cut_at}-"  # asked, got 200: restarted


def test_server_errors_are_retried_with_backoff_then_reported(serve: Callable[..., Server], online: Path) -> None:
    b = Behaviour(fail_first=2, status=503)
    server = serve(b)
    assert wheels.ensure_wheel(pin_for(server.url())).read_bytes() == PAYLOAD
    assert len(b.requests) == 3
    shutil.rmtree(online)
    b2 = Behaviour(fail_first=99, status=502)
    server2 = serve(b2)
    with pytest.raises(FetchError, match=rf"cannot download .*\({wheels.ATTEMPTS} attempts\): HTTP 502"):
        wheels.ensure_wheel(pin_for(server2.url()))
    assert len(b2.requests) == wheels.ATTEMPTS
    b3 = Behaviour(fail_first=99, status=403)  # not worth retrying
    with pytest.raises(FetchError, match="HTTP 403"):
        wheels.ensure_wheel(pin_for(serve(b3).url()))
    assert len(b3.requests) == 1


DOWNLOAD = """
import sys
from pathlib import Path
from fi_ffi.loader import lockfile, wheels
text = sys.stdin.read()
wheels.ensure_wheel(lockfile.parse_lock(text, Path("/locks/demo.lock")).kernels[0])
"""


def test_downloads_are_announced_on_stderr_when_logging_is_not_configured(
    serve: Callable[..., Server], online: Path
) -> None:
    server = serve(Behaviour(drops=1))
    text = f'version = 1\n[[kernel]]\nfilename = "{NAME}"\nsha256 = "{SHA}"\ncuda = "13.0"\narch = "x86_64"\n'
    text += f'url = "{server.url()}"\n'
    env = subprocess_env(FI_FFI_QUIET="", FI_FFI_OFFLINE="")
    done = subprocess.run([sys.executable, "-c", DOWNLOAD], input=text, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"fi_ffi: fetching {NAME} (3.0 MiB) from {server.url()}" in done.stderr  # stderr is a pipe here
    assert "resuming at byte" in done.stderr and f"fi_ffi: fetched {NAME}" in done.stderr
    shutil.rmtree(online)
    quiet = subprocess.run(
        [sys.executable, "-c", DOWNLOAD], input=text, capture_output=True, text=True,
        env=subprocess_env(FI_FFI_QUIET="1", FI_FFI_OFFLINE=""),
    )  # fmt: skip
    assert quiet.returncode == 0 and "fi_ffi:" not in quiet.stderr


def test_the_proxy_from_the_environment_is_used_and_no_proxy_is_honoured(
    serve: Callable[..., Server], online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = Behaviour()
    proxy = serve(b)
    monkeypatch.setenv("HTTP_PROXY", proxy.url(""))
    url = f"http://wheels.example.invalid/dl/{NAME}"
    assert wheels.ensure_wheel(pin_for(url)).read_bytes() == PAYLOAD
    assert b.requests[0]["path"] == url  # asked through the proxy: the absolute URL
    shutil.rmtree(online)
    monkeypatch.setenv("NO_PROXY", "wheels.example.invalid")
    with pytest.raises(FetchError, match="no network: cannot reach wheels.example.invalid .*does not resolve"):
        wheels.ensure_wheel(pin_for(url))  # direct: the name does not resolve, said at once (no retries)
    assert len(b.requests) == 1


def test_a_ca_bundle_from_the_environment_is_used(
    serve: Callable[..., Server], online: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    b = Behaviour()
    server = serve(b, tls)
    with pytest.raises(FetchError, match="REQUESTS_CA_BUNDLE") as info:
        wheels.ensure_wheel(pin_for(server.url()))  # a private CA: refused, not retried
    assert "certificate verify failed" in str(info.value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    assert wheels.ensure_wheel(pin_for(server.url())).read_bytes() == PAYLOAD
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    shutil.rmtree(online)
    with pytest.raises(FetchError, match=r"SSL_CERT_FILE=.*missing\.pem names no file"):
        wheels.ensure_wheel(pin_for(server.url()))
