"""LoRA adapters over the OpenAI-compatible server (CPU: the stand-in engine of helpers.fake_engine behind the real
uvicorn server, the official ``openai`` client): a request's ``model`` picks its adapter (the base model's name
none), ``/v1/models`` lists adapters under the base model as ``parent``, vLLM's load and unload endpoints open only
with FI_ENGINE_ALLOW_RUNTIME_LORA_UPDATING, their bodies refused by field, no server path in any answer; the engine
thread's calls (GenerationService.call) and an engine process's (EngineProcess.load_lora)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_engine import expected_tokens, lora_seed
from helpers.lora_serving import REFUSED, adapter_folder, assert_loaded_once, assert_refused, load_at_once, post
from helpers.serve import MODEL, WAIT, Served, require_server_stack

from fi_engine.runtime.sampling_params import SamplingParams
from fi_engine.serve.lora_api import RUNTIME_LORA_ENV, ServedAdapters, runtime_lora_allowed
from fi_engine.serve.service import GenerationService, ServiceClosedError

openai = require_server_stack()
httpx = pytest.importorskip("httpx")

PROMPT = [11, 12, 13]  # token ids (within every test vocabulary)


@pytest.fixture
def lora_served(codec: Any, pool: list[int]) -> Iterator[Served]:
    server = Served(codec, pool, max_batch=8, adapters=["sql", "chat"],
                    app_kw={"lora_modules": ["sql", "chat"], "allow_runtime_lora_updating": True})  # fmt: skip
    yield server
    server.close()


def test_models_list_adapters_under_the_base(lora_served: Served) -> None:
    listed = httpx.get(f"{lora_served.url}/v1/models", timeout=WAIT).json()["data"]
    assert [(m["id"], m.get("parent"), m["root"]) for m in listed] == [
        (MODEL, None, MODEL), ("sql", MODEL, "sql"), ("chat", MODEL, "chat")
    ]  # fmt: skip
    assert listed[1]["max_model_len"] == listed[0]["max_model_len"] == 4096
    assert [m.id for m in lora_served.client.models.list().data] == [MODEL, "sql", "chat"]
    assert lora_served.client.models.retrieve("sql").id == "sql"
    with pytest.raises(openai.NotFoundError) as e:
        lora_served.client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "'sql'" in e.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_requests_model_picks_its_adapter(lora_served: Served, codec: Any, pool: list[int], stream: bool) -> None:
    client, engine = lora_served.client, lora_served.engine
    for model, lora in ((MODEL, None), ("sql", "sql"), ("chat", "chat")):
        if stream:
            chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, stream=True, temperature=0)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        seed = 0 if lora is None else lora_seed(lora)
        assert text == codec.decode(expected_tokens(PROMPT, 6, pool, seed))
        sampling = engine.added[-1][3]
        assert isinstance(sampling, SamplingParams) and sampling.lora == lora
    texts = {
        client.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        for m in ("sql", "chat")
    }
    assert len(texts) == 2  # (the adapters' tokens differ)
    reply = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.model == "sql" and engine.added[-1][3].lora == "sql"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="sql2", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_adapters_load_and_unload_at_run_time(lora_served: Served, tmp_path: Path) -> None:
    url, client = lora_served.url, lora_served.client
    folder = adapter_folder(tmp_path / "new")
    done = post(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": folder})
    assert done.status_code == 200 and done.text == "Success: LoRA adapter 'new' added successfully."
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "chat", "new"]
    client.completions.create(model="new", prompt=PROMPT, max_tokens=2)
    assert lora_served.engine.added[-1][3].lora == "new" and "new" in lora_served.engine.lora_names
    done = post(url, "/v1/unload_lora_adapter", {"lora_name": "new"})
    assert done.status_code == 200 and done.text == "Success: LoRA adapter 'new' removed successfully."
    assert "new" not in lora_served.engine.lora_names
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="new", prompt=PROMPT, max_tokens=2)
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": folder}).status_code == 200


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "start"), REFUSED, ids=range(len(REFUSED)))
def test_load_and_unload_bodies_are_refused_by_field(
    lora_served: Served, tmp_path: Path, endpoint: str, body: Any, status: int, param: str | None, start: str
) -> None:
    assert_refused(lora_served.url, tmp_path, endpoint, body, status, param, start)
    assert lora_served.engine.lora_names == ["sql", "chat"]


def test_run_time_changes_are_refused_unless_the_environment_allows_them(
    codec: Any, pool: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RUNTIME_LORA_ENV, raising=False)
    server = Served(codec, pool, adapters=["sql"], app_kw={"lora_modules": ["sql"]})
    try:
        for endpoint, body in (("load", {"lora_name": "x", "lora_path": "/x"}), ("unload", {"lora_name": "sql"})):
            done = post(server.url, f"/v1/{endpoint}_lora_adapter", body)
            error = done.json()["error"]
            assert done.status_code == 404 and error["code"] == "runtime_lora_updating_disabled"
            assert f"start the server with {RUNTIME_LORA_ENV}=1" in error["message"]
        assert server.engine.lora_names == ["sql"]
        assert server.client.completions.create(model="sql", prompt=PROMPT, max_tokens=2).choices
    finally:
        server.close()
    server = Served(codec, pool, app_kw={"allow_runtime_lora_updating": True})  # no adapters served at all
    try:
        done = post(server.url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"})
        assert done.status_code == 400 and done.json()["error"]["code"] == "lora_not_enabled"
        assert "start it with --enable-lora" in done.json()["error"]["message"]
        assert [m.id for m in server.client.models.list().data] == [MODEL]
    finally:
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_an_adapter_the_engine_cannot_read_again_fails_that_request_only(
    lora_served: Served, codec: Any, pool: list[int], stream: bool
) -> None:
    lora_served.engine.broken_adapters.add("sql")
    client = lora_served.client
    if stream:
        chunks = httpx.post(f"{lora_served.url}/v1/completions", timeout=WAIT,
                            json={"model": "sql", "prompt": PROMPT, "max_tokens": 4, "stream": True}).text  # fmt: skip
        events = [json.loads(line[6:]) for line in chunks.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["param"] == "model" and chunks.endswith("data: [DONE]\n\n")
        message = events[-1]["error"]["message"]
    else:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=4)
        assert e.value.body["param"] == "model"
        message = e.value.body["message"]
    assert "lora: the adapter 'sql' could not be read again from its folder" in message
    text = client.completions.create(model="chat", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    assert text == codec.decode(expected_tokens(PROMPT, 4, pool, lora_seed("chat")))


# ---- several API servers over one engine process ----------------------------------------------------------------


@contextlib.contextmanager
def api_servers(codec: Any, pool: list[int], count: int, runtime: bool = True) -> Iterator[tuple[Any, list[str]]]:
    """``count`` API servers over one engine process serving adapter 'sql', as ``--api-servers N`` runs them (one:
    as ``serve`` runs its one) but in this process, so that a test picks the server each request reaches: each a
    service over a connection of its own and ``build_app`` (``shared_engine`` where there are several; ``runtime``:
    its ``allow_runtime_lora_updating``). The engine process and the servers' addresses."""
    from helpers.serve import RunningServer

    from fi_engine.serve.engine_process import EngineProcess
    from fi_engine.serve.openai_server import build_app

    vocab = codec.tokenizer.vocab_size
    with EngineProcess("helpers.fake_engine:FakeStepEngine", vocab, clients=count, pool=pool, adapters=["sql"],
                       max_seq_len=4096) as engine:  # fmt: skip
        services = [GenerationService(engine.client(i), codec) for i in range(count)]
        apps = [build_app(service, MODEL, close_timeout=1.0, lora_modules=["sql"], allow_runtime_lora_updating=runtime,
                          shared_engine=count > 1) for service in services]  # fmt: skip
        servers = [RunningServer(app) for app in apps]
        try:
            yield engine, [server.url for server in servers]
        finally:
            for server in servers:
                server.stop()
            for service in services:
                service.close(timeout=1.0)


@pytest.fixture
def front_ends(codec: Any, pool: list[int]) -> Iterator[tuple[Any, list[str]]]:
    """Two API servers over one engine process (:func:`api_servers`)."""
    with api_servers(codec, pool, 2) as served:
        yield served


def complete(url: str, model: str, stream: bool = False) -> Any:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": stream}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT)


def listed(url: str) -> list[tuple[str, str | None]]:
    return [(m["id"], m.get("parent")) for m in httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"]]


def test_an_adapter_loaded_or_unloaded_through_one_api_server_is_seen_by_the_other(
    front_ends: tuple[Any, list[str]], codec: Any, pool: list[int], tmp_path: Path
) -> None:
    engine, (a, b) = front_ends
    for url in (a, b):  # the adapter loaded at start, through each
        assert listed(url) == [(MODEL, None), ("sql", MODEL)]
        text = complete(url, "sql").json()["choices"][0]["text"]
        assert text == codec.decode(expected_tokens(PROMPT, 3, pool, lora_seed("sql")))
    calls = engine.client(1)._calls  # (the round trips b's connection made besides its requests)
    assert [complete(b, name).status_code for name in ("sql", MODEL, "sql")] == [200] * 3
    assert engine.client(1)._calls == calls  # names it knows: no round trip to ask the engine

    folder = adapter_folder(tmp_path / "n")
    assert post(a, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": folder}).status_code == 200
    done = complete(b, "new")  # a name b did not know: it asks the engine, which serves it
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["text"] == codec.decode(expected_tokens(PROMPT, 3, pool, lora_seed("new")))
    assert listed(b) == [(MODEL, None), ("sql", MODEL), ("new", MODEL)]
    assert httpx.get(f"{b}/v1/models/new", timeout=WAIT).json()["parent"] == MODEL

    assert post(b, "/v1/unload_lora_adapter", {"lora_name": "new"}).status_code == 200  # b learned it: b unloads it
    assert engine.lora_names == ["sql"]
    for url, stream in ((a, False), (a, True), (b, False), (b, True)):  # a still had the name: the engine says no
        done = complete(url, "new", stream)
        error = done.json()["error"]
        assert (done.status_code, error["code"], error["param"]) == (404, "model_not_found", "model"), error
        assert "'new' is not served here; this server serves 'fake-model', 'sql'" in error["message"]
    assert listed(a) == listed(b) == [(MODEL, None), ("sql", MODEL)]
    assert httpx.get(f"{a}/v1/models/new", timeout=WAIT).status_code == 404

    # loaded through a, refused as loaded already through b; unloaded through b, then 404 to unload through a
    folder = adapter_folder(tmp_path / "x")
    assert post(a, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": folder}).status_code == 200
    again = post(b, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": folder})
    assert again.status_code == 400
    assert again.json()["error"]["message"].startswith("lora_name: the adapter 'x' is loaded")
    assert post(b, "/v1/unload_lora_adapter", {"lora_name": "x"}).status_code == 200
    gone = post(a, "/v1/unload_lora_adapter", {"lora_name": "x"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert engine.lora_names == ["sql"]


def test_one_name_loaded_through_two_api_servers_at_once_is_loaded_once(
    front_ends: tuple[Any, list[str]], tmp_path: Path
) -> None:
    engine, urls = front_ends
    folder = adapter_folder(tmp_path / "dup")
    for round_ in range(3):
        name = f"dup{round_}"
        assert_loaded_once(load_at_once(urls, name, folder), name)
        assert engine.lora_names.count(name) == 1
        assert all(listed(url).count((name, MODEL)) == 1 for url in urls)


def test_refused_load_and_unload_bodies_through_two_api_servers(
    front_ends: tuple[Any, list[str]], tmp_path: Path
) -> None:
    engine, urls = front_ends
    for url in urls:
        for case in REFUSED:
            assert_refused(url, tmp_path, *case)
    assert engine.lora_names == ["sql"]


def test_api_servers_whose_engine_process_ended_answer_503_where_they_would_ask_it(
    front_ends: tuple[Any, list[str]],
) -> None:
    engine, urls = front_ends
    engine._proc.kill()
    engine._proc.join(WAIT)
    for url in urls:
        for answer in (httpx.get(f"{url}/v1/models", timeout=WAIT), complete(url, "unknown")):
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text


def test_api_servers_without_run_time_loading_never_ask_the_engine_for_its_adapters(
    codec: Any, pool: list[int], tmp_path: Path
) -> None:
    with api_servers(codec, pool, 2, runtime=False) as (engine, urls):  # the adapters served cannot change
        calls = [engine.client(i)._calls for i in range(2)]  # (each connection's round trips besides its requests)
        for url in urls:
            assert listed(url) == [(MODEL, None), ("sql", MODEL)]
            assert complete(url, "nope").json()["error"]["code"] == "model_not_found"
            assert httpx.get(f"{url}/v1/models/nope", timeout=WAIT).status_code == 404
            done = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": adapter_folder(tmp_path / "x")})
            assert done.json()["error"]["code"] == "runtime_lora_updating_disabled"
        assert [engine.client(i)._calls for i in range(2)] == calls


def assert_load_and_unload_unavailable(url: str, tmp_path: Path) -> None:
    """Loading and unloading through ``url`` are answered 503 ``unavailable``, as a request that generates is."""
    for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": adapter_folder(tmp_path / "x")}),
        ("/v1/unload_lora_adapter", {"lora_name": "sql"}),
    ):
        answer = post(url, path, body)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text


def test_load_and_unload_answer_503_once_the_service_is_closed(
    lora_served: Served, codec: Any, pool: list[int], tmp_path: Path
) -> None:
    lora_served.service.close(timeout=1.0)
    assert_load_and_unload_unavailable(lora_served.url, tmp_path)
    with api_servers(codec, pool, 1) as (engine, (url,)):  # one API server over an engine process that has ended
        engine._proc.kill()
        engine._proc.join(WAIT)
        assert_load_and_unload_unavailable(url, tmp_path)


# ---- the parts on their own -------------------------------------------------------------------------------------


def test_served_adapters_refuse_names_a_request_cannot_give() -> None:
    for names, match in [
        (["m"], r"^lora_modules\[0\]: 'm' is the base model's name"),
        (["a", "a"], r"^lora_modules\[1\]: 'a' is an adapter's name already"),
        (["a b"], r"^lora_modules\[0\]: expected 1 to 128 printable characters"),
        ("a", r"^lora_modules: expected the adapters' names"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            ServedAdapters(names, ["m"], True)
    adapters = ServedAdapters(["a"], ["m", "alias"], False)
    assert adapters.models == ["m", "alias", "a"] and adapters.lora_of("a") == "a" and adapters.lora_of("m") is None
    assert [runtime_lora_allowed({RUNTIME_LORA_ENV: v}) for v in ("1", "true", "True ", "0", "", "yes")] == [
        True, True, True, False, False, False
    ]  # fmt: skip
    assert runtime_lora_allowed({}) is False


def test_build_app_checks_its_lora_arguments(codec: Any, pool: list[int]) -> None:
    from helpers.fake_engine import FakeStepEngine

    from fi_engine.serve.openai_server import build_app

    with GenerationService(FakeStepEngine(codec.tokenizer.vocab_size), codec) as service:
        with pytest.raises(TypeError, match=r"^allow_runtime_lora_updating: expected True, False or None"):
            build_app(service, MODEL, allow_runtime_lora_updating="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"^lora_modules\[0\]: '{MODEL}' is the base model's name"):
            build_app(service, MODEL, lora_modules=[MODEL])


def test_service_calls_run_in_the_engine_thread_between_steps(codec: Any) -> None:
    from helpers.fake_engine import FakeStepEngine

    engine = FakeStepEngine(codec.tokenizer.vocab_size, adapters=["a"])
    service = GenerationService(engine, codec)
    seen: list[int] = []

    def names(e: Any) -> list[str]:
        seen.append(threading.get_ident())
        return list(e.lora_names)

    assert service.call(names).result(WAIT) == ["a"] and seen == [service._thread.ident]
    with pytest.raises(ValueError, match=r"^lora_name: no adapter named 'b' is loaded"):
        service.call(lambda e: e.unload_lora("b")).result(WAIT)
    with pytest.raises(TypeError, match=r"^fn: expected a callable taking the engine, got str"):
        service.call("unload_lora")  # type: ignore[arg-type]
    assert service.submit(PROMPT, 3).result(WAIT).finish_reason == "length"  # the thread goes on serving
    service.close()
    with pytest.raises(ServiceClosedError):
        service.call(names).result(WAIT)


def test_an_engine_process_loads_adapters_and_sends_an_ended_requests_error(
    codec: Any, pool: list[int], tmp_path: Path
) -> None:
    from fi_engine.serve.engine_process import EngineProcess

    vocab = codec.tokenizer.vocab_size
    with EngineProcess("helpers.fake_engine:FakeStepEngine", vocab, pool=pool, adapters=["a"],
                       broken_adapters=["gone"]) as engine:  # fmt: skip
        assert engine.lora_names == ["a"]
        engine.load_lora("b", adapter_folder(tmp_path / "b"))
        engine.load_lora("gone", adapter_folder(tmp_path / "gone"))
        with pytest.raises(ValueError, match=r"^adapter_config\.json: missing from the adapter folder$"):
            engine.load_lora("c", str(tmp_path / "c"))
        with pytest.raises(ValueError, match=r"^lora_name: no adapter named 'c'"):
            engine.unload_lora("c")
        engine.unload_lora("b")
        assert engine.lora_names == ["a", "gone"]
        with GenerationService(engine, codec) as service:
            good = service.submit(PROMPT, 3, SamplingParams(lora="a"))
            bad = service.submit(PROMPT, 3, SamplingParams(lora="gone"))
            assert list(good.result(WAIT).token_ids) == expected_tokens(PROMPT, 3, pool, lora_seed("a"))
            with pytest.raises(ValueError, match=r"^lora: the adapter 'gone' could not be read again"):
                bad.result(WAIT)
