"""Automatic prefix caching as the server reports it, on CPU: the stand-in engine (helpers.fake_engine) with its
prefix cache model (pages of 16 tokens) behind the official ``openai`` client; its hits travel as
``StepOutput.num_cached_tokens`` through an engine process and the service into the usage's
``prompt_tokens_details.cached_tokens`` (chat and completions, whole and streamed, summed over ``n`` and a list of
prompts, left out with the cache off) and into ``/metrics`` (prompt tokens looked up, found, and their ratio); and
``fi-engine serve --[no-]enable-prefix-caching`` reaches ``open_engine``, in the server's process and in an engine
process, with the start-up line saying whether the cache is on.

Each expected hit is computed here from the token lists alone (:func:`predicted`), not by the stand-in's own
bookkeeping: the longest common beginning of the prompt and an earlier request's computed tokens (its prompt and
its output but the last token), in whole pages, leaving the prompt's last token to compute."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.fake_engine import FakeStepEngine, expected_tokens, open_fake_engine
from helpers.serve import MODEL, WAIT, Served, require_server_stack, run_doc_example
from helpers.text_checkpoints import write_text_checkpoint

from fi_engine.serve.engine_process import EngineProcess
from fi_engine.serve.metrics import ServingMetrics
from fi_engine.serve.service import GenerationService

openai = require_server_stack()

PAGE = 16
SYSTEM = (
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog. Hello, how are you today? "
    "I am fine, thank you. What is the weather like? The quick brown fox jumps over the lazy dog."
)


def predicted(prompt: Sequence[int], earlier: Sequence[Sequence[int]]) -> int:
    """The hit of ``prompt`` given the earlier requests' computed tokens: the longest common beginning with any of
    them, rounded down to whole pages, at most ``len(prompt) - 1`` tokens rounded down to a page."""
    best = 0
    for seq in earlier:
        common = 0
        while common < min(len(prompt), len(seq)) and prompt[common] == seq[common]:
            common += 1
        best = max(best, common)
    return min(best, len(prompt) - 1) // PAGE * PAGE


def computed(prompt: Sequence[int], output: Sequence[int]) -> list[int]:
    """The tokens whose K/V a finished request computed: its prompt and its output but the last token."""
    return [*prompt, *output[:-1]]


@pytest.fixture
def cached(codec, pool):  # type: ignore[no-untyped-def]
    """A server over the stand-in engine with its prefix cache on."""
    server = Served(codec, pool, max_batch=8, prefix_cache_page=PAGE)
    yield server
    server.close()


def usage_of(chunks: list[Any]) -> Any:
    """The usage of a streamed answer: its last chunk's, the only one that has any (include_usage)."""
    assert chunks[-1].usage is not None and all(c.usage is None for c in chunks[:-1])
    return chunks[-1].usage


def cached_tokens(usage: Any) -> int:
    """``usage.prompt_tokens_details.cached_tokens``, typed by the official client."""
    from openai.types.completion_usage import CompletionUsage, PromptTokensDetails

    assert isinstance(usage, CompletionUsage) and isinstance(usage.prompt_tokens_details, PromptTokensDetails)
    assert isinstance(usage.prompt_tokens_details.cached_tokens, int)
    return usage.prompt_tokens_details.cached_tokens


# ---- usage.prompt_tokens_details.cached_tokens ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_completion_usage_counts_the_cached_prompt_tokens(cached: Served, pool, stream) -> None:  # type: ignore[no-untyped-def]
    base = [pool[(7 * i) % len(pool)] for i in range(40)]
    first_reply = expected_tokens(base, 4, pool)
    follow = [*base, *first_reply, pool[1], pool[2]]  # a prompt that continues the first request
    hits = []
    for prompt in (base, follow):
        kw: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        out = cached.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, **kw)
        usage = usage_of(list(out)) if stream else out.usage
        assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 4
        hits.append(cached_tokens(usage))
    want = predicted(follow, [computed(base, first_reply)])
    assert want == 32 and hits == [0, want]  # the first finds nothing; 43 computed tokens hold 2 whole pages


@pytest.mark.parametrize("stream", [False, True])
def test_a_chats_second_turn_finds_its_history_cached(cached: Served, codec, stream) -> None:  # type: ignore[no-untyped-def]
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello, how are you today?"}]
    kw: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    first = cached.client.chat.completions.create(model=MODEL, messages=turn, max_tokens=6, temperature=0, **kw)
    if stream:
        chunks = list(first)
        reply, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage_of(chunks)
    else:
        reply, usage = first.choices[0].message.content, first.usage
    assert cached_tokens(usage) == 0
    prompt1 = codec.encode_chat(turn)
    assert cached.engine.added[-1][1] == tuple(prompt1)
    reply_ids = cached.engine.plan(prompt1, 6, eos=codec.eos_token_ids)
    turn2 = [*turn, {"role": "assistant", "content": reply}, {"role": "user", "content": "What is the weather like?"}]
    second = cached.client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=6, temperature=0, **kw)
    usage2 = usage_of(list(second)) if stream else second.usage
    prompt2 = codec.encode_chat(turn2)
    want = predicted(prompt2, [computed(prompt1, reply_ids)])
    assert want >= 3 * PAGE and cached_tokens(usage2) == want  # the system prompt and the first turn's pages
    assert usage2.prompt_tokens == len(prompt2)


@pytest.mark.parametrize("stream", [False, True])
def test_with_the_cache_off_the_usage_has_no_details(served: Served, pool, stream) -> None:  # type: ignore[no-untyped-def]
    """The stand-in engine without its cache reports None: the usage leaves ``prompt_tokens_details`` out (not a
    0 that would claim a lookup), in the JSON itself."""
    base = [pool[i % len(pool)] for i in range(40)]
    body = {"model": MODEL, "prompt": base, "max_tokens": 3, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    for _ in range(2):
        r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=WAIT)
        assert r.status_code == 200
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            usage = events[-1]["usage"]
        else:
            usage = r.json()["usage"]
        assert usage["prompt_tokens"] == 40 and "prompt_tokens_details" not in usage
    out = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert out.usage is not None and out.usage.prompt_tokens_details is None


def test_n_choices_and_several_prompts_sum_their_hits(cached: Served, pool) -> None:  # type: ignore[no-untyped-def]
    """Two prompts x n=2: four requests admitted together, each finding the pages a finished earlier request
    computed (not each other's, written by the same pass); the usage counts each prompt's hit once, as it counts its
    tokens once for its n choices, and sums over the prompts (so cached_tokens never exceeds prompt_tokens)."""
    base = [pool[(3 * i) % len(pool)] for i in range(50)]
    warm = cached.client.completions.create(model=MODEL, prompt=base, max_tokens=2, temperature=0)
    assert cached_tokens(warm.usage) == 0
    done = [computed(base, expected_tokens(base, 2, pool))]
    prompts = [[*base[:20], pool[0], *base[21:]], [*base, pool[4]]]  # share 16 and 48 tokens with it
    out = cached.client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, temperature=0.5, seed=1)
    want = [predicted(p, done) for p in prompts]
    assert want == [16, 48] and len(out.choices) == 4
    assert cached_tokens(out.usage) == sum(want) and out.usage.prompt_tokens == sum(map(len, prompts))
    chunks = list(
        cached.client.completions.create(
            model=MODEL, prompt=[base], n=3, max_tokens=2, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage = usage_of(chunks)
    assert cached_tokens(usage) == predicted(base, done) == 48 and usage.prompt_tokens == len(base)


# ---- /metrics ---------------------------------------------------------------------------------------------------


def metric_values(url: str) -> tuple[dict[str, Any], dict[str, float]]:
    """``/metrics`` parsed as Prometheus text: its families by name and its unlabelled samples' values."""
    parser = pytest.importorskip("prometheus_client.parser")
    r = httpx.get(f"{url}/metrics", timeout=WAIT)
    assert r.status_code == 200
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    return families, {s.name: s.value for f in families.values() for s in f.samples if not s.labels}


def test_metrics_count_the_prompt_tokens_looked_up_and_found(cached: Served, pool) -> None:  # type: ignore[no-untyped-def]
    families, before = metric_values(cached.url)
    assert families["fi_engine_prefix_cache_queries"].type == "counter"  # the parser drops a counter's _total
    assert families["fi_engine_prefix_cache_hits"].type == "counter"
    assert families["fi_engine_prefix_cache_hit_rate"].type == "gauge"
    assert before["fi_engine_prefix_cache_queries_total"] == before["fi_engine_prefix_cache_hits_total"] == 0
    assert before["fi_engine_prefix_cache_hit_rate"] == 0.0  # no query yet: 0, not NaN
    base = [pool[(5 * i) % len(pool)] for i in range(36)]
    prompts = [base, [*base, pool[3]], [*base[:17], pool[9], pool[9]]]
    done: list[list[int]] = []
    hits = []
    for p in prompts:
        out = cached.client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0)
        hits.append(cached_tokens(out.usage))
        assert hits[-1] == predicted(p, done)
        done.append(computed(p, expected_tokens(p, 3, pool)))
    assert hits == [0, 32, 16]
    _, after = metric_values(cached.url)
    queries = sum(map(len, prompts))
    assert after["fi_engine_prefix_cache_queries_total"] == queries == after["fi_engine_prompt_tokens_total"]
    assert after["fi_engine_prefix_cache_hits_total"] == 48
    assert after["fi_engine_prefix_cache_hit_rate"] == pytest.approx(48 / queries, rel=1e-12)


def test_metrics_count_no_lookup_with_the_cache_off(served: Served) -> None:
    served.client.completions.create(model=MODEL, prompt=list(range(3, 40)), max_tokens=2)
    _, values = metric_values(served.url)
    assert values["fi_engine_prompt_tokens_total"] == 37
    assert values["fi_engine_prefix_cache_queries_total"] == values["fi_engine_prefix_cache_hits_total"] == 0
    assert values["fi_engine_prefix_cache_hit_rate"] == 0.0


def test_shared_metrics_sum_the_lookups_and_rate_the_sums() -> None:
    """Several API servers: each counts its own requests' lookups; the hit rate is the ratio of the sums (not a
    mean of each one's rate), the same from every process."""
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = ServingMetrics.shared(2)
    metrics[0].prefix_cache(queries=100, hits=96)
    metrics[1].prefix_cache(queries=300, hits=0)
    metrics[1].prefix_cache(queries=20, hits=16)
    text = metrics[1].render()
    assert text == metrics[0].render()
    value = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples if not s.labels}
    assert value["fi_engine_prefix_cache_queries_total"] == 420 and value["fi_engine_prefix_cache_hits_total"] == 112
    assert value["fi_engine_prefix_cache_hit_rate"] == pytest.approx(112 / 420, rel=1e-12)
    assert metrics[1].prefix_cache_counts == (320, 16)  # its own slot


# ---- through an engine process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [PAGE, None])
def test_an_engine_process_carries_the_hits(codec, pool, page) -> None:  # type: ignore[no-untyped-def]
    """``num_cached_tokens`` crosses the process with a request's first tokens, reaches the stream's first delta
    with tokens and the whole result; None (never 0) from an engine without the cache."""
    vocab = codec.tokenizer.vocab_size
    base = [pool[(11 * i) % len(pool)] for i in range(34)]
    follow = [*base, pool[0]]
    with EngineProcess("helpers.fake_engine:FakeStepEngine", vocab, pool=pool, prefix_cache_page=page) as engine:
        assert engine.prefix_caching is (page is not None)
        with GenerationService(engine, codec) as service:
            first = service.submit(base, max_new_tokens=4).result(WAIT)
            deltas = list(service.submit(follow, max_new_tokens=4))
            again = service.submit(follow, max_new_tokens=4).result(WAIT)
    reported = [d.num_cached_tokens for d in deltas]
    if page is None:
        assert first.num_cached_tokens is None and again.num_cached_tokens is None and set(reported) == {None}
        return
    assert first.num_cached_tokens == 0
    want = predicted(follow, [computed(base, first.token_ids)])
    assert want == 32 and reported[0] == want and set(reported[1:]) <= {None}  # the first delta with tokens only
    assert again.num_cached_tokens == predicted(follow, [computed(follow, expected_tokens(follow, 4, pool))]) == 32


def test_the_stand_ins_hits_are_on_the_first_output_only() -> None:
    """The stand-in's model itself (the GPU engine's contract, StepOutput.num_cached_tokens): on a request's first
    output; two requests admitted in one step do not find each other's pages; its tokens are those without it."""
    engine = FakeStepEngine(50, prefix_cache_page=4, max_batch=4)
    plain = FakeStepEngine(50, max_batch=4)
    prompt = list(range(10, 23))
    outs: dict[int, list[Any]] = {}
    for e in (engine, plain):
        for _ in range(2):  # together: the same step
            e.add_request(prompt, 3)
    while engine.has_unfinished:
        for o in engine.step():
            outs.setdefault(o.rid, []).append(o)
    later = engine.add_request(prompt, 3)
    while engine.has_unfinished:
        for o in engine.step():
            outs.setdefault(o.rid, []).append(o)
    assert [outs[r][0].num_cached_tokens for r in (0, 1, later)] == [0, 0, 12]  # 13 tokens: 3 pages, the last computed
    assert all(o.num_cached_tokens is None for r in outs for o in outs[r][1:])
    plain_outs = [o for _ in range(3) for o in plain.step()]
    assert all(o.num_cached_tokens is None for o in plain_outs) and not plain.prefix_caching
    assert [t for o in outs[0] for t in o.token_ids] == [t for o in plain_outs if o.rid == 0 for t in o.token_ids]


# ---- fi-engine serve --[no-]enable-prefix-caching ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder the serve command reads on CPU: a config, a tokenizer and a chat template."""
    root = write_text_checkpoint(tmp_path_factory.mktemp("serve") / "m")
    config = {"model_type": "llama", "vocab_size": 330, "hidden_size": 64, "intermediate_size": 128}
    config |= {"num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("in_process", [True, False])
@pytest.mark.parametrize(("flags", "on"), [((), True), (("--no-enable-prefix-caching",), False)])
def test_serve_passes_the_switch_to_open_engine(  # type: ignore[no-untyped-def]
    model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_process, flags, on
) -> None:
    """``serve`` hands ``prefix_caching`` to ``open_engine`` (stood in for by helpers.fake_engine.open_fake_engine,
    which needs no GPU): in the server's own process (``--in-process``) or as the engine process's argument, where
    the real :class:`EngineProcess` builds the engine in its child. The start-up line says whether the engine
    caches, and the requests served show it (a repeated prompt finds its pages, or None is reported)."""
    from fi_engine import cli
    from fi_engine.models import registry
    from fi_engine.serve import engine_process, openai_server

    opened: list[dict[str, Any]] = []

    def open_engine(model_dir: str, **kwargs: Any) -> FakeStepEngine:
        opened.append(kwargs)
        return open_fake_engine(model_dir, **kwargs)

    real_process = engine_process.EngineProcess

    def process(factory: str, model_dir: str, **kwargs: Any) -> EngineProcess:
        assert factory == "fi_engine.models.registry:open_engine"
        opened.append(kwargs)
        return real_process("helpers.fake_engine:open_fake_engine", model_dir, **kwargs)

    served: list[Any] = []

    def serve(service: GenerationService, names: Any, **kw: Any) -> None:  # one prompt twice, then "shut down"
        prompt = list(range(40, 80))
        served.extend(service.submit(prompt, max_new_tokens=2).result(WAIT).num_cached_tokens for _ in range(2))

    monkeypatch.setattr(registry, "open_engine", open_engine)
    monkeypatch.setattr(engine_process, "EngineProcess", process)
    monkeypatch.setattr(openai_server, "serve", serve)
    where = ["--in-process"] if in_process else []
    assert cli.main(["serve", str(model), "--port", "0", *where, *flags]) == 0
    assert len(opened) == 1 and opened[0]["prefix_caching"] is on and opened[0]["chunked_prefill"] is True
    line = capsys.readouterr().err
    assert line.startswith("fi-engine serve: serving ")
    assert f"prefix caching {'on' if on else 'off'}, chunked prefill off)" in line  # (the stand-in has no chunks)
    assert served == ([0, 32] if on else [None, None])


def test_serve_passes_chunking_and_speculation_to_open_engine(model: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--no-enable-chunked-prefill``, ``--max-num-batched-tokens`` and ``--speculative-config`` reach
    ``open_engine`` as its keywords (the JSON object as a dict; the engine checks its keys)."""
    from fi_engine import cli
    from fi_engine.models import registry
    from fi_engine.serve import openai_server

    opened: list[dict[str, Any]] = []

    def open_engine(model_dir: str, **kwargs: Any) -> FakeStepEngine:
        opened.append(kwargs)
        return open_fake_engine(model_dir, **kwargs)

    monkeypatch.setattr(registry, "open_engine", open_engine)
    monkeypatch.setattr(openai_server, "serve", lambda *a, **k: None)
    config = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    flags = ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "256", "--speculative-config", config]
    assert cli.main(["serve", str(model), "--port", "0", "--in-process", *flags]) == 0
    assert opened[0]["chunked_prefill"] is False and opened[0]["max_num_batched_tokens"] == 256
    assert opened[0]["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    assert "chunked prefill off)" in capsys.readouterr().err


def test_serve_says_when_the_engine_cannot_cache(model: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Asked for (the default) but not served by the engine (``open_engine`` leaves it off: another family, tensor
    parallelism): the start-up line says so."""
    from fi_engine import cli
    from fi_engine.models import registry
    from fi_engine.serve import openai_server

    def open_engine(model_dir: str, **kwargs: Any) -> FakeStepEngine:
        assert kwargs["prefix_caching"] is True
        return open_fake_engine(model_dir, **{**kwargs, "prefix_caching": False})

    monkeypatch.setattr(registry, "open_engine", open_engine)
    monkeypatch.setattr(openai_server, "serve", lambda *a, **k: None)
    assert cli.main(["serve", str(model), "--port", "0", "--in-process"]) == 0
    assert "prefix caching off (not served by this engine), chunked prefill" in capsys.readouterr().err


def test_serve_help_names_the_switch(capsys: pytest.CaptureFixture[str]) -> None:
    from fi_engine import cli

    assert cli.main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in text and "usage.prompt_tokens_details" in text


def test_the_docs_example_runs(cached: Served, codec, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """docs/engine-text.md's prefix-caching example against the stand-in server: the second turn finds the system
    prompt and the first turn computed."""
    run_doc_example("### Prefix caching", cached.url)
    (p1, hit1), (p2, hit2) = (map(int, line.split()) for line in capsys.readouterr().out.splitlines())
    prompts = [list(a[1]) for a in cached.engine.added]
    assert [p1, p2] == [len(p) for p in prompts] and hit1 == 0
    sampling = cached.engine.added[0][3]  # the checkpoint's default temperature: sampled, with a random seed
    seed = 0 if sampling is None or sampling.greedy else sampling.seed or 0
    reply = cached.engine.plan(prompts[0], 16, seed=seed, eos=codec.eos_token_ids)
    assert hit2 == predicted(prompts[1], [computed(prompts[0], reply)]) and hit2 >= 4 * PAGE
