"""``fi-engine serve --api-servers 2`` (fi_engine.serve.api_servers) end to end on loopback, over the stand-in engine
(tests/helpers/fake_engine.py) in its engine process and a real tokenizer in each front end: the server runs as a
process of its own (tests/helpers/api_servers_main.py; the tests signal it). Requests spread over both front ends
and each gets exactly its tokens; every front end's /metrics is the sum over both; the queue limit holds over both
(429 from either while the one request holding every place runs, served again once it ends); SIGINT lets an open
stream finish and ends every process; a front end killed, or one that cannot start, ends the server with status
1 naming it."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.env import REPO, subprocess_env
from helpers.fake_engine import expected_tokens, lora_seed
from helpers.lora_serving import LOAD, REFUSED, UNLOAD, adapter_folder, assert_loaded_once, assert_refused, load_at_once
from helpers.lora_serving import post as lora_post
from helpers.serve import require_server_stack
from helpers.text_checkpoints import write_text_checkpoint

openai = require_server_stack()
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

MODEL = "fake-model"
WAIT = 30.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("text") / "m")


@pytest.fixture(scope="module")
def codec(model_dir: Path):  # type: ignore[no-untyped-def]
    from fi_engine.text.codec import TextCodec

    return TextCodec.from_dir(model_dir)


@pytest.fixture(scope="module")
def pool(codec) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(set(codec.encode("The quick brown fox jumps over the lazy dog. Hello, how are you today?")))


class Server:
    """The server process (two front ends, one engine process) on an ephemeral port."""

    def __init__(
        self,
        tmp_path: Path,
        model_dir: Path,
        engine: dict[str, Any],
        max_queue: int = 12,
        api_key: str | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        config = {"model_dir": str(model_dir), "api_servers": 2, "engine": engine, "max_queue": max_queue}
        config["graceful_s"] = 10.0
        config |= lora or {}  # lora_modules, allow_runtime_lora_updating
        env = subprocess_env()
        if api_key is not None:
            env["FI_ENGINE_API_KEY"] = api_key
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
        self.stderr_path = tmp_path / "server.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "helpers.api_servers_main", json.dumps(config)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while not line.startswith("READY"):
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.kill()
                raise AssertionError(f"the server did not start: {self.stderr()}")
            line = self.proc.stdout.readline()
        _, port, pids, engine_pid = line.split()
        self.url = f"http://127.0.0.1:{port}"
        self.front_ends = [int(p) for p in pids.split(",")]
        self.engine_pid = int(engine_pid)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=WAIT)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """One /metrics on a new connection (either front end): sample -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=WAIT).text
        families = parser.text_string_to_metric_families(text)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    def per_server(self) -> list[float]:
        m = self.metrics()
        return [m[("fi_engine_api_server_http_responses_total", (("api_server", str(i)),))] for i in range(2)]

    def wait(self) -> int:
        try:
            return self.proc.wait(WAIT)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + WAIT
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, f"processes left: {[p for p in pids if not gone(p)]}"
        time.sleep(0.05)


def post(url: str, body: dict[str, Any]) -> Any:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT)


def test_two_api_servers_answer_count_and_limit_together_then_stop_gracefully(
    tmp_path: Path, model_dir: Path, codec: Any, pool: list[int]
) -> None:
    vocab = codec.tokenizer.vocab_size
    engine = {"vocab_size": vocab, "pool": pool, "max_batch": 4, "max_seq_len": 1 << 20, "step_delay_s": 0.005}
    server = Server(tmp_path, model_dir, engine, max_queue=12)  # 4 + 12 = 16 places over both front ends
    try:
        # 16 concurrent clients, each on a connection of its own: spread over both front ends, each answered exactly
        prompts = [[i % 7 + 3, i // 7 + 3] for i in range(16)]
        messages = [[{"role": "user", "content": f"Hi {i}"}] for i in range(16)]

        async def clients() -> list[str]:
            fresh = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))  # a connection per request
            client = openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=WAIT, http_client=fresh
            )

            async def one(i: int) -> str:
                limit = 3 + i % 5
                if i % 4 == 3:
                    chat = await client.chat.completions.create(
                        model=MODEL,
                        messages=messages[i],
                        max_tokens=limit,
                        temperature=0,  # type: ignore[arg-type]
                    )
                    return chat.choices[0].message.content or ""
                if i % 2:
                    out = await client.completions.create(
                        model=MODEL, prompt=prompts[i], max_tokens=limit, temperature=0
                    )
                    return out.choices[0].text
                chunks = await client.completions.create(
                    model=MODEL, prompt=prompts[i], max_tokens=limit, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in chunks])

            try:
                return await asyncio.gather(*(one(i) for i in range(16)))
            finally:
                await client.close()

        got = asyncio.run(clients())
        want = [
            codec.decode(expected_tokens(codec.encode_chat(messages[i]) if i % 4 == 3 else prompts[i], 3 + i % 5, pool))
            for i in range(16)
        ]
        assert got == want

        # every front end's /metrics is the sum over both (six fresh connections: both front ends answer), once
        # both have counted their requests' ends (a stream's last event can reach its client first)
        settled = {("fi_engine_requests_running", ()): 0, ("fi_engine_requests_waiting", ()): 0}
        settled[("fi_engine_requests_total", (("finish_reason", "length"),))] = 16
        deadline = time.monotonic() + WAIT
        while any(server.metrics().get(k) != v for k, v in settled.items()):
            assert time.monotonic() < deadline, f"the metrics did not settle: {server.metrics()}"
            time.sleep(0.02)
        views = [server.metrics() for _ in range(6)]
        assert all(v == views[0] for v in views)
        m = views[0]
        assert m[("fi_engine_generation_tokens_total", ())] == sum(3 + i % 5 for i in range(16))
        assert m[("fi_engine_requests_total", (("finish_reason", "length"),))] == 16
        assert m[("fi_engine_http_responses_total", (("code", "200"),))] == 16
        per_server = server.per_server()
        assert sum(per_server) == 16 and min(per_server) > 0, per_server  # both front ends served

        # one request of 16 choices holds every place of both front ends: either one answers 429
        hold = {"model": MODEL, "prompt": [5], "max_tokens": 10**5, "n": 16, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=hold, timeout=WAIT) as held:
            assert held.status_code == 200
            before = server.per_server()
            refusals = [post(server.url, {"model": MODEL, "prompt": [6], "max_tokens": 2}) for _ in range(20)]
            assert [r.status_code for r in refusals] == [429] * 20
            assert refusals[0].json()["error"]["code"] == "rate_limit_exceeded"
            assert "16 requests are unfinished over the 2 API servers" in refusals[0].json()["error"]["message"]
            after = server.per_server()
            assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # both refused
        # the client hung up: its 16 requests cancelled, their places free again
        deadline = time.monotonic() + WAIT
        while (
            r := post(server.url, {"model": MODEL, "prompt": [6], "max_tokens": 2, "temperature": 0})
        ).status_code != 200:
            assert r.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json()["choices"][0]["text"] == codec.decode(expected_tokens([6], 2, pool))
        assert server.metrics()[("fi_engine_requests_rejected_total", ())] >= 20

        # SIGINT: an open stream finishes, then every process ends
        texts: list[str] = []
        started = threading.Event()

        def stream() -> None:
            chunks = server.client.completions.create(
                model=MODEL, prompt=[7], max_tokens=60, temperature=0, stream=True
            )
            parts = []
            for c in chunks:
                parts.append(c.choices[0].text)
                started.set()
            texts.append("".join(parts))

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(WAIT)
        server.proc.send_signal(signal.SIGINT)
        reader.join(WAIT)
        assert texts == [codec.decode(expected_tokens([7], 60, pool))]
        assert server.wait() == 0, server.stderr()
        wait_gone([*server.front_ends, server.engine_pid])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=WAIT)
    finally:
        server.kill()


def test_the_api_key_holds_in_every_front_end_and_stays_off_their_command_lines(
    tmp_path: Path, model_dir: Path, codec: Any, pool: list[int]
) -> None:
    engine = {"vocab_size": codec.tokenizer.vocab_size, "pool": pool, "max_batch": 4}
    server = Server(tmp_path, model_dir, engine, api_key="sk-front-ends")
    try:
        body = {"model": MODEL, "prompt": [5], "max_tokens": 2}
        for _ in range(12):  # fresh connections: both front ends answer
            assert post(server.url, body).status_code == 401
        keyed = {"Authorization": "Bearer sk-front-ends"}
        answers = [
            httpx.post(f"{server.url}/v1/completions", json=body, headers=keyed, timeout=WAIT) for _ in range(12)
        ]
        assert [r.status_code for r in answers] == [200] * 12
        m = server.metrics()
        assert m[("fi_engine_http_responses_total", (("code", "401"),))] == 12
        assert min(server.per_server()) > 0  # both front ends took some
        for pid in server.front_ends:
            assert b"sk-front-ends" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        server.kill()


def test_a_front_end_that_dies_ends_the_server_naming_it(
    tmp_path: Path, model_dir: Path, codec: Any, pool: list[int]
) -> None:
    engine = {"vocab_size": codec.tokenizer.vocab_size, "pool": pool, "max_batch": 4}
    server = Server(tmp_path, model_dir, engine)
    try:
        assert server.client.completions.create(model=MODEL, prompt=[5], max_tokens=3).usage.completion_tokens == 3
        os.kill(server.front_ends[1], signal.SIGKILL)
        assert server.wait() == 1
        assert "API server 1 exited (status -9) while serving; the other API servers were stopped" in server.stderr()
        wait_gone([server.front_ends[0], server.engine_pid])
    finally:
        server.kill()


def test_a_front_end_that_cannot_start_is_named(tmp_path: Path, codec: Any) -> None:
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with pytest.raises(AssertionError, match=r"API server \d failed to start: .*tokenizer\.json"):
        Server(tmp_path, empty, {"vocab_size": codec.tokenizer.vocab_size})


def test_serve_api_servers_refuses_lora_arguments_by_name_before_any_front_end(model_dir: Path, codec: Any) -> None:
    from fi_engine.serve.api_servers import serve_api_servers
    from fi_engine.serve.engine_process import EngineProcess

    with EngineProcess("helpers.fake_engine:FakeStepEngine", codec.tokenizer.vocab_size, clients=2) as engine:
        with pytest.raises(ValueError, match=rf"^lora_modules\[0\]: '{MODEL}' is the base model's name"):
            serve_api_servers(engine, model_dir, MODEL, port=0, lora_modules=[MODEL])
        with pytest.raises(TypeError, match=r"^lora_modules: expected the adapters' names"):
            serve_api_servers(engine, model_dir, MODEL, port=0, lora_modules="sql")
        with pytest.raises(TypeError, match=r"^allow_runtime_lora_updating: expected True, False or None"):
            serve_api_servers(engine, model_dir, MODEL, port=0, lora_modules=[], allow_runtime_lora_updating="yes")  # type: ignore[arg-type]
        assert engine.alive  # (its connections unused: no front end started)


def test_lora_adapters_through_two_api_servers(tmp_path: Path, model_dir: Path, codec: Any, pool: list[int]) -> None:
    engine = {"vocab_size": codec.tokenizer.vocab_size, "pool": pool, "max_batch": 4, "adapters": ["sql"]}
    lora = {"lora_modules": ["sql"], "allow_runtime_lora_updating": True}
    server = Server(tmp_path, model_dir, engine, lora=lora)
    url = server.url

    def through_both(model: str, status: int) -> list[Any]:
        """12 requests of ``model``, each on a connection of its own: answered ``status`` by both front ends."""
        before = server.per_server()
        answers = [post(url, {"model": model, "prompt": [5, 6], "max_tokens": 3, "temperature": 0}) for _ in range(12)]
        assert [r.status_code for r in answers] == [status] * 12, answers[0].text
        assert all(a > b for a, b in zip(server.per_server(), before, strict=True))  # both front ends answered
        return answers

    try:
        for _ in range(6):  # the adapter loaded at start, in the list of both
            models = httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"]
            assert [(m["id"], m.get("parent")) for m in models] == [(MODEL, None), ("sql", MODEL)]
        want = codec.decode(expected_tokens([5, 6], 3, pool, lora_seed("sql")))
        assert {r.json()["choices"][0]["text"] for r in through_both("sql", 200)} == {want}

        # loaded through one front end: served by both; unloaded through one: 404 from both
        loaded = lora_post(url, LOAD, {"lora_name": "new", "lora_path": adapter_folder(tmp_path / "new")})
        assert loaded.status_code == 200, loaded.text
        want = codec.decode(expected_tokens([5, 6], 3, pool, lora_seed("new")))
        assert {r.json()["choices"][0]["text"] for r in through_both("new", 200)} == {want}
        assert lora_post(url, UNLOAD, {"lora_name": "new"}).status_code == 200
        refused = through_both("new", 404)
        assert {(r.json()["error"]["code"], r.json()["error"]["param"]) for r in refused} == {
            ("model_not_found", "model")
        }
        for _ in range(6):
            assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"]] == [MODEL, "sql"]

        # one name loaded through both front ends at once (fresh connections: the kernel picks each one's), loaded once
        folder = adapter_folder(tmp_path / "dup")
        for round_ in range(3):
            name = f"dup{round_}"
            assert_loaded_once(load_at_once([url] * 4, name, folder), name)
            ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"]]
            assert ids.count(name) == 1 and lora_post(url, UNLOAD, {"lora_name": name}).status_code == 200

        before = server.per_server()
        for case in REFUSED:  # the bodies refused by field, whichever front end reads them
            for _ in range(2):
                assert_refused(url, tmp_path, *case)
        assert all(a > b for a, b in zip(server.per_server(), before, strict=True))
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"]] == [MODEL, "sql"]
        assert "Traceback" not in server.stderr()
    finally:
        server.kill()
