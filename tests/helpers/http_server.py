"""A local HTTP server for the download tests: byte strings served on 127.0.0.1 from a thread, with an HTTP error
or a lying ``Content-Length`` on request (the ``http_server`` fixture starts and stops one per test)."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass


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
