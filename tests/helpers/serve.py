"""The OpenAI-compatible server on loopback for the server tests: uvicorn in a thread on an ephemeral port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RunningServer:
    """A uvicorn server of ``app`` in a thread; :attr:`url` is its address, :meth:`stop` its graceful stop."""

    def __init__(self, app: Any, graceful_s: float = 5.0) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the test server did not stop"


@contextmanager
def running(app: Any, graceful_s: float = 5.0) -> Iterator[RunningServer]:
    server = RunningServer(app, graceful_s)
    try:
        yield server
    finally:
        server.stop()
