"""Load on the OpenAI-compatible server: N concurrent streaming clients, and the engine's own ``generate`` at the
same batch for comparison.

    python benchmarks/bench_serve.py http --url http://127.0.0.1:8000 [--clients 64] [--requests 256]
                                          [--prompt-len 128] [--max-tokens 128] [--model NAME] [--json PATH]
    python benchmarks/bench_serve.py engine --model DIR [--batch 64] [--prompt-len 128] [--max-tokens 128] [--graph]
    python benchmarks/bench_serve.py compare --model DIR [--batch 64] [--prompt-len 128] [--max-tokens 128] [--graph]
                                             [--api-servers N] [--waves 4] [--procs 4] [--client auto]
                                             [--variants mixed,plain] [--rounds N]
    python benchmarks/bench_serve.py selftest                  # the load generator against a CPU stand-in server
    python benchmarks/bench_serve.py standin [--api-servers N] [--batch 64] [--step-ms 1.4] [--prompt-len 128]
                                             [--max-tokens 128] [--procs 4]

``http``: ``--clients`` asyncio clients (split over ``--procs`` processes, 4 by default: one Python process parsing
64 streams' events is itself the bottleneck), each sending streamed ``/v1/completions`` requests (token-id prompts of
``--prompt-len`` random ids, ``max_tokens`` ``--max-tokens``, ``ignore_eos``, greedy) one after another until
``--requests`` have been sent in all. Per request: time to first token (the first event with text), inter-token
latency (between successive events; an event usually carries one token, a split character or a held-back stop
string prefix merges two), completion tokens (the closing usage chunk). Reported: generated tokens per second of
wall time from the first request to the last answer, TTFT and ITL p50/p99 (ms), failed requests, and the CPU the
load generator itself used (in cores: on a machine with few cores it competes with the server it measures).

``engine``: the engine of ``--model`` (``--batch`` slots) runs ``generate`` on ``--batch`` prompts of the same
shape once to warm up, then five times measured: the median run's decode tokens/s (decode steps only) and
end-to-end tokens/s (prefill included).

``compare``: ``engine``, then on the same engine the ideal server's load on its step API (``churn``: the second load
below with no HTTP, each request that ends replaced at once; with each decode step waited for in its ``step()``, and
with ``overlap_steps`` as the server runs it), and a closed loop on the step API whose requests come back 3-10 steps
after they end (a server's turnaround without its HTTP; overlapped: without ``mixed_prefill``, with it, and with it
but ``ServingLoop.pipelined_prefill`` off, twice in turn); then (the engine freed) ``fi-engine serve --model DIR
--max-batch B`` started as a subprocess, ``http`` with ``--clients B`` against it once to warm up (``WB`` requests,
at least ``4B``: the prefill graphs of the shapes the loads meet captured, as in a server that has run a while), then
twice -- ``--requests B`` (one wave: the engine's own workload) and ``--requests WB`` (``--waves W``, 4 by default:
each client sending its next request when one ends, so the front ends' turnaround between a request's end and the
next one's first token costs slot time) -- and the ratio of the server's tokens/s to the engine's end-to-end tokens/s
(the goal: within 10 %). ``--variants`` measures several servers in turn (``mixed``: the serve defaults;
``plain``: ``--no-mixed-prefill``, each prefill a pass of its own), ``--rounds`` times over, each against the same
``generate``. ``--api-servers N`` serves with N front-end processes (``fi-engine serve --api-servers N``). Each load
also reports the server's own mean time to first token (its ``/metrics``: from a request's arrival in a front end to its
first token), which splits the clients' TTFT between the server and the HTTP path and clients around it. ``--client``:
the load generator's HTTP library, aiohttp where installed (as vLLM's serving benchmark; its C parser costs the clients
less than half the CPU httpx does), else httpx.

``standin``: the front end's limit without a GPU. A stand-in engine (the tests' ``FakeStepEngine``) whose every
step takes ``--step-ms`` in all (it sleeps what its own work leaves) and gives one token per row: its own
throughput is measured first (``--batch`` requests added at once and stepped to their end, as ``engine`` runs the
engine's ``generate``), next to the ideal ``batch / step`` tokens/s; then the server over it (in its engine
process, ``--api-servers N`` front ends, as ``fi-engine serve`` runs) gets the same two loads as ``compare``, and
the ratios to both are reported. The default 1.4 ms per step of 64 rows is the H100's decode step of
SmolLM2-135M, about 45,700 tokens/s: what the front ends must keep up with.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestStats:
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def prompts_for(count: int, length: int, seed: int = 0, vocab: tuple[int, int] = (100, 10000)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(length)] for _ in range(count)]


def _take_event(stats: RequestStats, line: str, last: float | None, start: float) -> float | None:
    """One server-sent-event line of a streamed completion into ``stats``; the time of the last text event."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return last
    event = json.loads(line[6:])
    if "error" in event:
        stats.error = str(event["error"])[:200]
        return last
    if event.get("usage"):
        stats.tokens = event["usage"]["completion_tokens"]
    if event.get("choices") and event["choices"][0].get("text"):
        now = time.perf_counter()
        if last is None:
            stats.ttft_s = now - start
        else:
            stats.itl_s.append(now - last)
        return now
    return last


async def one_request(client: Any, url: str, body: dict[str, Any]) -> RequestStats:
    """One streamed completion over ``client``: an ``aiohttp.ClientSession`` or an ``httpx.AsyncClient``."""
    stats = RequestStats()
    start = time.perf_counter()
    last = None
    try:
        if hasattr(client, "ws_connect"):  # aiohttp: its C HTTP parser and line reader
            async with client.post(f"{url}/v1/completions", json=body) as response:
                if response.status != 200:
                    stats.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                    return stats
                async for raw in response.content:
                    last = _take_event(stats, raw.decode().rstrip("\r\n"), last, start)
                    if stats.error:
                        break
        else:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    stats.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return stats
                async for line in response.aiter_lines():
                    last = _take_event(stats, line, last, start)
                    if stats.error:
                        break
    except Exception as exc:  # a failed request is counted, not fatal
        stats.error = f"{type(exc).__name__}: {exc}"
    return stats


def client_library(name: str) -> str:
    """``name`` (``auto``: aiohttp where it is installed, as vLLM's serving benchmark uses, else httpx)."""
    if name != "auto":
        return name
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "httpx"
    return "aiohttp"


async def run_http(
    url: str,
    clients: int,
    requests: int,
    prompt_len: int,
    max_tokens: int,
    model: str | None,
    vocab: tuple[int, int] = (100, 10000),
    seed: int = 0,
    library: str = "auto",
    ready: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """``requests`` streamed completions over ``clients`` concurrent connections of ``library`` (aiohttp, httpx or
    auto: :func:`client_library`); the row of measurements (with the raw latencies, ``_ttft`` / ``_itl``, and the
    wall clock's ``_t0`` / ``_t1``, for merging processes). ``ready`` is called once everything but the load is set
    up (libraries imported, prompts made, the model's name asked for, the session open) and the clock starts when it
    returns: :func:`run_http_procs` waits there for every process, so that the wall time it merges covers the load
    alone, not one process's set-up while the others already load the server."""
    entered = time.perf_counter()
    import httpx

    library = client_library(library)

    prompts = prompts_for(requests, prompt_len, seed=seed, vocab=vocab)
    if model is None:
        async with httpx.AsyncClient(timeout=60) as c:
            model = (await c.get(f"{url}/v1/models")).json()["data"][0]["id"]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestStats] = []
    if library == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=clients + 8)
        session: Any = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
    else:
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        session = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)

    async with session as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                results.append(await one_request(client, url, body))

        setup_s = time.perf_counter() - entered
        if ready is not None:
            ready()
        t0, wall_t0, cpu0 = time.perf_counter(), time.time(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0  # this load generator's own CPU time (it shares the machine's cores)
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    return {
        "mode": "http",
        "client": library,
        "url": url,
        "model": model,
        "clients": clients,
        "requests": requests,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "wall_s": wall,
        "client_cpu_s": cpu,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_ms_p50": percentile(ttft, 0.5) * 1e3,
        "ttft_ms_p99": percentile(ttft, 0.99) * 1e3,
        "itl_ms_p50": percentile(itl, 0.5) * 1e3,
        "itl_ms_p99": percentile(itl, 0.99) * 1e3,
        "_ttft": ttft,
        "_itl": itl,
        "_t0": wall_t0,
        "_t1": wall_t0 + wall,
        "_setup_s": setup_s,
    }


def _http_process(job: tuple[Any, ...], barrier: Any, out: Any) -> None:
    # every process starts its clients at once, each once its own set-up is done: a process that imports its HTTP
    # library and asks for the model's name after the others started would add its set-up to the merged wall time
    # (with the server part-loaded meanwhile)
    out.put(asyncio.run(run_http(*job, ready=barrier.wait)))


def run_http_procs(
    url: str,
    clients: int,
    requests: int,
    prompt_len: int,
    max_tokens: int,
    model: str | None,
    procs: int,
    vocab: tuple[int, int] = (100, 10000),
    library: str = "auto",
) -> dict[str, Any]:
    """:func:`run_http` with the clients split over ``procs`` processes (one Python process parsing every
    stream's events saturates a core before a fast server does), merged into one row: tokens over the wall time
    from the first start to the last end, latencies pooled."""
    if procs <= 1:
        return asyncio.run(run_http(url, clients, requests, prompt_len, max_tokens, model, vocab, 0, library))
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = []
    for p in range(procs):
        share = (clients // procs + (p < clients % procs), requests // procs + (p < requests % procs))
        job = (url, share[0], share[1], prompt_len, max_tokens, model, vocab, p, library)
        workers.append(ctx.Process(target=_http_process, args=(job, barrier, out)))
    for w in workers:
        w.start()
    parts = [out.get() for _ in workers]
    for w in workers:
        w.join()
    wall = max(r["_t1"] for r in parts) - min(r["_t0"] for r in parts)
    ttft = [x for r in parts for x in r["_ttft"]]
    itl = [x for r in parts for x in r["_itl"]]
    tokens = sum(r["tokens"] for r in parts)
    row = dict(parts[0], clients=clients, requests=requests, procs=procs, wall_s=wall, tokens=tokens)
    row["client_cpu_s"] = sum(r["client_cpu_s"] for r in parts)
    # how far apart the processes' set-ups ended: what the merged wall time would include had each started its load
    # as soon as its own set-up was done
    setups = [r["_setup_s"] for r in parts]
    row["client_setup_ms"] = (1e3 * min(setups), 1e3 * max(setups))
    row.update(
        failed=sum(r["failed"] for r in parts),
        first_error=next((r["first_error"] for r in parts if r["first_error"]), None),
        tokens_per_s=tokens / wall if wall else 0.0,
        ttft_ms_p50=percentile(ttft, 0.5) * 1e3,
        ttft_ms_p99=percentile(ttft, 0.99) * 1e3,
        itl_ms_p50=percentile(itl, 0.5) * 1e3,
        itl_ms_p99=percentile(itl, 0.99) * 1e3,
        _ttft=ttft,
        _itl=itl,
    )
    return row


def run_engine(model: str, batch: int, prompt_len: int, max_tokens: int, graph: bool) -> dict[str, Any]:
    from fi_engine.models.registry import engine_class

    with engine_class(model)(model, max_batch=batch, cuda_graph=graph) as engine:
        return measure_generate(engine, model, batch, prompt_len, max_tokens, graph)


def measure_generate(
    engine: Any, model: str, batch: int, prompt_len: int, max_tokens: int, graph: bool
) -> dict[str, Any]:
    """``engine.generate`` of ``batch`` prompts once to warm up, then five times: the median run's row."""
    prompts = prompts_for(batch, prompt_len)
    runs = []
    engine.generate(prompts, max_tokens, eos_token_ids=())  # warm-up (graphs captured, kernels loaded)
    for _ in range(5):  # the median run: one run of SmolLM2's 64 x 128 tokens lasts ~0.2 s and varies by ~10 %
        t0 = time.perf_counter()
        result = engine.generate(prompts, max_tokens, eos_token_ids=())
        runs.append((time.perf_counter() - t0, result))
    wall, result = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    tokens = sum(len(t) for t in result.tokens)
    return {
        "mode": "engine",
        "model": model,
        "batch": batch,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "graph": graph,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": result.tokens_per_s,
        "prefill_ms": result.prefill_s * 1e3,
    }


def churn_load(
    engine: Any, prompts: list[list[int]], batch: int, max_tokens: int, turnaround: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """``batch`` of ``prompts`` added to ``engine`` (its step API) at once, and each one that ends replaced by the
    next until all have run: at once by default (the ideal server: no HTTP, no front end, no wait between a
    request's end and the next one's admission), or ``turnaround = (lo, hi)`` steps later, a number drawn for each
    (seeded: the same draws for every engine), as a closed loop of clients whose next request takes a few steps to
    come back (a server's turnaround, without its HTTP: arrivals spread, so prefill passes meet decoding requests).
    Steps that admitted requests (a prefill, then the decode step) and the others are timed apart."""
    rng = random.Random(7)
    sent = tokens = 0
    admit_s: list[float] = []
    plain_s: list[float] = []
    admitted = 0
    due: list[int] = []  # (a heap) the step() call after which each ended request's successor is added
    calls = 0
    t0 = time.perf_counter()
    for _ in range(min(batch, len(prompts))):
        engine.add_request(prompts[sent], max_tokens, eos_token_ids=())
        sent += 1
    new = sent
    while engine.has_unfinished or due:
        t = time.perf_counter()
        outs = engine.step()
        calls += 1
        (admit_s if new else plain_s).append(time.perf_counter() - t)
        admitted += new
        new = 0
        for o in outs:
            tokens += len(o.token_ids)
            if o.finish_reason is not None:
                heapq.heappush(due, calls + rng.randint(*turnaround))
        while due and due[0] <= calls:
            heapq.heappop(due)
            if sent < len(prompts):
                engine.add_request(prompts[sent], max_tokens, eos_token_ids=())
                sent += 1
                new += 1
    wall = time.perf_counter() - t0
    return {
        "mode": "churn",
        "batch": batch,
        "max_tokens": max_tokens,
        "requests": sent,
        "turnaround": turnaround,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "admit_steps": len(admit_s),
        "admitted_mean": admitted / max(len(admit_s), 1),
        "admit_step_ms": 1e3 * sum(admit_s) / max(len(admit_s), 1),
        "plain_steps": len(plain_s),
        "plain_step_ms": 1e3 * sum(plain_s) / max(len(plain_s), 1),
    }


def run_churn(
    model: str, batch: int, prompt_len: int, max_tokens: int, graph: bool, waves: int
) -> list[dict[str, Any]]:
    """The engine of ``model`` (``batch`` slots): :func:`measure_generate`, then :func:`churn_load` of ``waves *
    batch`` requests with each decode step waited for in its ``step()`` and with ``overlap_steps`` (as ``fi-engine
    serve`` runs it), in turn. One engine for all three, so that the ideal server is compared with the very engine
    whose ``generate`` it is held to: once a second engine had been opened in a process, every engine of it stepped
    about 9 % slower on an H100 (SmolLM2 shapes, 64 rows: 1.32 against 1.22 ms a decode step; benchmarks/RESULTS.md,
    2026-11-23), which made an ideal server on a second engine look 7 % slower than the engine it was held to."""
    from fi_engine.models.registry import open_engine

    with open_engine(model, max_batch=batch, cuda_graph=graph) as engine:
        rows = [measure_generate(engine, model, batch, prompt_len, max_tokens, graph)]
        for overlap in (False, True):
            engine.overlap_steps = overlap
            row = churn_load(engine, prompts_for(waves * batch, prompt_len, seed=1), batch, max_tokens)
            rows.append(dict(row, model=model, prompt_len=prompt_len, graph=graph, overlap=overlap))
        # a closed loop whose requests come back 3-10 steps after they end (about a server's turnaround), as the
        # server steps (overlapped): without mixed prefill passes, with them, and with them but each pass launched
        # only once the decode step before it is read (pipelined_prefill off), twice in turn (a warm-up first: the
        # prefill graphs of the shapes it meets)
        engine.overlap_steps = True
        churn_load(engine, prompts_for(waves * batch, prompt_len, seed=2), batch, max_tokens, TURNAROUND)
        try:
            for _ in range(2):
                for mixed, piped in ((False, True), (True, False), (True, True)):
                    engine.mixed_prefill = mixed
                    type(engine).pipelined_prefill = piped
                    row = churn_load(
                        engine, prompts_for(waves * batch, prompt_len, seed=1), batch, max_tokens, TURNAROUND
                    )
                    rows.append(
                        dict(row, model=model, prompt_len=prompt_len, graph=graph, overlap=True, mixed=mixed,
                             pipelined_prefill=piped)
                    )  # fmt: skip
        finally:
            type(engine).pipelined_prefill = True
    return rows


TURNAROUND = (3, 10)  # steps between a request's end and its successor's arrival in the closed-loop churn rows


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not healthy within {timeout} s")


def run_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine, *churn = run_churn(args.model, args.batch, args.prompt_len, args.max_tokens, args.graph, args.waves)
    for row in churn:
        row["vs_engine"] = row["tokens_per_s"] / engine["tokens_per_s"]
    print(table([engine, *churn]), flush=True)
    command = [sys.executable, "-m", "fi_engine", "serve", args.model, "--port", str(args.port)]
    command += ["--max-batch", str(args.batch), "--max-queue", str(4 * args.batch), "--log-level", "warning"]
    command += ["--graph"] if args.graph else []
    command += ["--api-servers", str(args.api_servers)]
    if args.scheduler_delay_factor is not None:
        command += ["--scheduler-delay-factor", str(args.scheduler_delay_factor)]
    rows = [engine, *churn]
    for _ in range(args.rounds):  # the variants in turn, round after round: machine drift spreads over all of them
        for variant in args.variants.split(","):
            wave, http = measure_server(command + SERVER_VARIANTS[variant], args)
            for row in (wave, http):
                row["scheduler_delay_factor"] = args.scheduler_delay_factor
                row["variant"] = variant
                row["vs_engine"] = row["tokens_per_s"] / engine["tokens_per_s"]
            print(table([wave, http]), flush=True)
            rows += [wave, http]
    return rows


# `compare --variants`: the server's options per variant ("mixed": the serve defaults, each prefill pass decoding the
# running requests too; "plain": each prefill a pass of its own, the decode step after it)
SERVER_VARIANTS = {"mixed": [], "plain": ["--no-mixed-prefill"]}


def measure_server(command: list[str], args: argparse.Namespace, vocab: tuple[int, int] = (100, 10000)) -> list[Any]:
    """Start the server ``command`` (listening on ``args.port``), load it as ``compare`` does, stop it with
    SIGINT: the rows of one wave and of ``args.waves``."""
    url = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(command)
    try:
        wait_healthy(url, proc)
        # a warm-up load as the measured ones (as long as the longer one), so that the engine has captured the
        # prefill graphs of the shapes they meet (the first prefill of a new (token rows, requests) shape costs a
        # capture, 20-70 ms on an H100 for SmolLM2, where a replay takes 2-14 ms): what a server that has run a
        # while has. A warm-up of 4 waves had left 4 captures (~95 ms) inside a measured 16-wave load (2026-11-24)
        warm = max(args.waves, 4) * args.batch
        run_http_procs(url, args.batch, warm, args.prompt_len, args.max_tokens, None, args.procs, vocab)
        # one wave (the engine's own run: `batch` requests at once) and four (each client sends its next request
        # when one ends: arrivals spread, so prefills interleave with decode steps and the last wave tails off)
        rows = []
        for requests in (args.batch, args.waves * args.batch):
            before = server_ttft(url)
            rows.append(
                run_http_procs(
                    url, args.batch, requests, args.prompt_len, args.max_tokens, None, args.procs, vocab, args.client
                )
            )
            after = server_ttft(url)
            if after[1] > before[1]:
                rows[-1]["server_ttft_ms_mean"] = (after[0] - before[0]) / (after[1] - before[1]) * 1e3
        wave, http = rows
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for row in (wave, http):
        row["api_servers"] = args.api_servers
    return [wave, http]


def _variants(text: str) -> str:
    """``--variants`` checked: names of SERVER_VARIANTS, comma-separated."""
    unknown = [v for v in text.split(",") if v not in SERVER_VARIANTS]
    if unknown:
        known = ", ".join(SERVER_VARIANTS)
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}; expected some of {known}")
    return text


def server_ttft(url: str) -> tuple[float, int]:
    """The server's own time-to-first-token histogram so far, from ``/metrics``: (sum in seconds, count). Its
    clock runs from a request's arrival in the front end to its first token in the service, so the mean over a
    load, beside the clients' TTFT, splits the wait between the server and the clients' own processing."""
    import httpx

    total, count = 0.0, 0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or "_time_to_first_token_seconds_" not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith("_seconds_sum"):
            total = float(value)
        elif name.endswith("_seconds_count"):
            count = int(float(value))
    return total, count


TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")


def standin_text(model_dir: str) -> tuple[Any, list[int]]:
    """The stand-in's tokenizer (the tests' text checkpoint in ``model_dir``) and the plain tokens it generates."""
    from fi_engine.text.codec import TextCodec

    codec = TextCodec.from_dir(model_dir)
    return codec, sorted(set(codec.encode("The quick brown fox jumps over the lazy dog. Hello, how are you today?")))


def run_standin_engine(model_dir: str, batch: int, step_s: float, prompt_len: int, max_tokens: int) -> dict[str, Any]:
    """The stand-in engine's own throughput: ``batch`` requests added at once and stepped to their end."""
    sys.path.insert(0, TESTS)
    from helpers.fake_engine import FakeStepEngine

    codec, pool = standin_text(model_dir)
    vocab = codec.tokenizer.vocab_size
    engine = FakeStepEngine(vocab, pool=pool, max_batch=batch, step_s=step_s)
    prompts = prompts_for(batch, prompt_len, vocab=(3, vocab))
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, max_tokens)
    tokens = 0
    while engine.has_unfinished:
        tokens += sum(len(o.token_ids) for o in engine.step())
    wall = time.perf_counter() - t0
    return {
        "mode": "standin",
        "batch": batch,
        "step_ms": step_s * 1e3,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ideal_tokens_per_s": batch / step_s,
    }


def run_standin(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tempfile
    from pathlib import Path

    sys.path.insert(0, TESTS)
    from helpers.text_checkpoints import write_text_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_text_checkpoint(Path(tmp) / "m"))
        own = run_standin_engine(model_dir, args.batch, args.step_ms / 1e3, args.prompt_len, args.max_tokens)
        print(table([own]), flush=True)
        command = [sys.executable, os.path.abspath(__file__), "standin-server", "--model-dir", model_dir]
        command += ["--port", str(args.port), "--batch", str(args.batch), "--step-ms", str(args.step_ms)]
        command += ["--api-servers", str(args.api_servers)]
        codec, _ = standin_text(model_dir)
        rows = measure_server(command, args, vocab=(3, codec.tokenizer.vocab_size))
    for row in rows:
        row["vs_engine"] = row["tokens_per_s"] / own["tokens_per_s"]
        row["vs_ideal"] = row["tokens_per_s"] / own["ideal_tokens_per_s"]
    return [own, *rows]


def serve_standin(args: argparse.Namespace) -> int:
    """The server over the stand-in engine, as ``fi-engine serve`` runs (one front end in this process, or
    ``--api-servers N`` front-end processes), until SIGINT."""
    sys.path.insert(0, TESTS)
    from fi_engine.serve.engine_process import EngineProcess

    codec, pool = standin_text(args.model_dir)
    engine = EngineProcess(
        "helpers.fake_engine:FakeStepEngine",
        codec.tokenizer.vocab_size,
        pool=pool,
        max_batch=args.batch,
        step_s=args.step_ms / 1e3,
        clients=args.api_servers,
    )
    with engine:
        if args.api_servers > 1:
            from fi_engine.serve.api_servers import serve_api_servers

            serve_api_servers(
                engine, args.model_dir, "standin", port=args.port, max_queue=4 * args.batch, graceful_s=5,
                log_level="warning",
            )  # fmt: skip
            return 0
        from fi_engine.serve.openai_server import serve
        from fi_engine.serve.service import GenerationService

        service = GenerationService(engine, codec, max_queue=4 * args.batch)
        try:
            serve(service, "standin", port=args.port, graceful_s=5, log_level="warning")
        except KeyboardInterrupt:  # the benchmark's SIGINT, after the graceful shutdown
            pass
        finally:
            service.close(timeout=5)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["mode"] == "standin":
            lines.append(
                f"stand-in engine  batch {r['batch']:4d}  step {r['step_ms']:.2f} ms  out {r['max_tokens']}: "
                f"{r['tokens_per_s']:9.1f} tokens/s on its own (ideal {r['ideal_tokens_per_s']:.1f})"
            )
        elif r["mode"] == "churn":
            extra = f" ({r['vs_engine']:.3f}x the engine)" if "vs_engine" in r else ""
            extra += " [overlap_steps]" if r.get("overlap") else ""
            extra += f" [mixed_prefill {'on' if r['mixed'] else 'off'}]" if "mixed" in r else ""
            extra += " [pipelined_prefill off]" if r.get("pipelined_prefill") is False else ""
            lo, hi = r.get("turnaround", (0, 0))
            when = "at once" if hi == 0 else f"{lo}-{hi} steps later"
            lines.append(
                f"engine steps     batch {r['batch']:4d}  requests {r['requests']}  prompt {r['prompt_len']}  out "
                f"{r['max_tokens']}, each ended request replaced {when}: {r['tokens_per_s']:9.1f} tokens/s{extra}; "
                f"{r['admit_steps']} steps admitted ({r['admitted_mean']:.1f} requests each, "
                f"{r['admit_step_ms']:.2f} ms a step), {r['plain_steps']} did not ({r['plain_step_ms']:.2f} ms)"
            )
        elif r["mode"] == "engine":
            lines.append(
                f"engine generate  batch {r['batch']:4d}  prompt {r['prompt_len']}  out {r['max_tokens']}  "
                f"{'graph' if r['graph'] else 'eager'}: {r['tokens_per_s']:9.1f} tokens/s end to end, "
                f"{r['decode_tokens_per_s']:9.1f} decode, prefill {r['prefill_ms']:.1f} ms"
            )
        else:
            extra = f"  ({r['vs_engine']:.3f}x the engine)" if "vs_engine" in r else ""
            extra += f" ({r['vs_ideal']:.3f}x its ideal)" if "vs_ideal" in r else ""
            extra += f" [{r['api_servers']} API servers]" if r.get("api_servers", 1) > 1 else ""
            extra += f" [{r['procs']} client processes]" if r.get("procs", 1) > 1 else ""
            extra += f" [{r['client']}]" if "client" in r else ""
            if r.get("scheduler_delay_factor") is not None:
                extra += f" [scheduler delay factor {r['scheduler_delay_factor']}]"
            extra += f" [{r['variant']}]" if "variant" in r else ""
            lines.append(
                f"http serve       clients {r['clients']:4d}  requests {r['requests']}  prompt {r['prompt_len']}  "
                f"out {r['max_tokens']}: {r['tokens_per_s']:9.1f} tokens/s{extra}; TTFT p50 {r['ttft_ms_p50']:.1f} "
                f"ms p99 {r['ttft_ms_p99']:.1f} ms"
                + (f" (server's own {r['server_ttft_ms_mean']:.1f} ms mean)" if "server_ttft_ms_mean" in r else "")
                + f"; ITL p50 {r['itl_ms_p50']:.2f} ms p99 {r['itl_ms_p99']:.2f} ms; failed {r['failed']}"
                + (f" (first: {r['first_error']})" if r["failed"] else "")
                + (
                    f"; the load generator used {r['client_cpu_s'] / r['wall_s']:.2f} CPU cores"
                    if "client_cpu_s" in r
                    else ""
                )
                + (
                    "; its processes' set-up {:.0f}-{:.0f} ms (not timed)".format(*r["client_setup_ms"])
                    if "client_setup_ms" in r
                    else ""
                )
            )
    return "\n".join(lines)


def run_selftest(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The load generator against the server over the tests' CPU stand-in engine (no GPU, no weights)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import tempfile
    from pathlib import Path

    from helpers.fake_engine import FakeStepEngine
    from helpers.serve import running
    from helpers.text_checkpoints import write_text_checkpoint

    from fi_engine.serve.openai_server import build_app
    from fi_engine.serve.service import GenerationService
    from fi_engine.text.codec import TextCodec

    with tempfile.TemporaryDirectory() as tmp:
        codec = TextCodec.from_dir(write_text_checkpoint(Path(tmp) / "m"))
        pool = sorted(set(codec.encode("The quick brown fox jumps over the lazy dog.")))
        engine = FakeStepEngine(codec.tokenizer.vocab_size, pool=pool, max_batch=args.clients, step_delay_s=0.002)
        service = GenerationService(engine, codec, max_queue=4 * args.clients)
        with service, running(build_app(service, "fake")) as server:
            vocab = (3, codec.tokenizer.vocab_size)  # past the special tokens
            if args.procs > 1:
                return [run_http_procs(server.url, args.clients, args.requests, args.prompt_len, args.max_tokens,
                                       None, args.procs, vocab, args.client)]  # fmt: skip
            http = run_http(
                server.url, args.clients, args.requests, args.prompt_len, args.max_tokens, None, vocab, 0, args.client
            )
            return [asyncio.run(http)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("http", "engine", "compare", "selftest", "standin", "standin-server"):
        p = sub.add_parser(name)
        p.add_argument("--prompt-len", type=int, default=128)
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--json", help="write the rows to this file")
        if name in ("http", "selftest"):
            p.add_argument("--clients", type=int, default=64)
            p.add_argument("--requests", type=int, default=256)
        if name in ("http", "compare", "selftest", "standin"):
            p.add_argument("--procs", type=int, default=4, help="client processes (the clients split over them)")
            p.add_argument(
                "--client", choices=("auto", "aiohttp", "httpx"), default="auto",
                help="the clients' HTTP library (auto: aiohttp where installed, else httpx)",
            )  # fmt: skip
        if name in ("compare", "standin", "standin-server"):
            p.add_argument("--api-servers", type=int, default=1, help="the server's front-end processes")
            p.add_argument("--waves", type=int, default=4, help="the second load: requests per client, in turn")
        if name in ("standin", "standin-server"):
            p.add_argument("--batch", type=int, default=64, help="the stand-in's slots (and the clients)")
            p.add_argument("--step-ms", type=float, default=1.4, help="milliseconds each stand-in step takes")
            p.add_argument("--port", type=int, default=8392)
        if name == "standin-server":
            p.add_argument("--model-dir", required=True, help="the text checkpoint the front ends read")
        if name == "http":
            p.add_argument("--url", default="http://127.0.0.1:8000")
            p.add_argument("--model", default=None, help="the served name (default: the first /v1/models lists)")
        if name in ("engine", "compare"):
            p.add_argument("--model", required=True, help="checkpoint directory")
            p.add_argument("--batch", type=int, default=64)
            p.add_argument("--graph", action="store_true")
        if name == "compare":
            p.add_argument("--port", type=int, default=8391)
            p.add_argument(
                "--scheduler-delay-factor", type=float, default=None, help="the server's (default: its own default)"
            )
            p.add_argument(
                "--variants",
                default="mixed",
                type=_variants,
                help=f"server variants measured in turn, comma-separated, of {', '.join(SERVER_VARIANTS)} (default "
                "mixed: the serve defaults)",
            )
            p.add_argument("--rounds", type=int, default=1, help="times the variants are measured in turn")
    args = parser.parse_args(argv)
    if args.mode == "http":
        rows = [
            run_http_procs(
                args.url,
                args.clients,
                args.requests,
                args.prompt_len,
                args.max_tokens,
                args.model,
                args.procs,
                library=args.client,
            )
        ]
    elif args.mode == "engine":
        rows = [run_engine(args.model, args.batch, args.prompt_len, args.max_tokens, args.graph)]
    elif args.mode == "compare":
        rows = run_compare(args)
    elif args.mode == "standin":
        rows = run_standin(args)
    elif args.mode == "standin-server":
        return serve_standin(args)
    else:
        rows = run_selftest(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=2)
    return 0 if all(r.get("failed", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
