"""Front ends of one engine process for tests/engine/test_engine_process_clients.py: functions that run in spawned
processes, each stepping its own :class:`~fi_engine.serve.engine_client.EngineClient` and reporting what it saw."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def run_client(
    client: Any,
    requests: list[tuple[list[int], int]],
    barrier: Any,
    out: Any,
    abort_own_after: int | None = None,
    abort_others: Sequence[int] = (),
    refused: tuple[list[int], int] | None = None,
) -> None:
    """Add ``requests`` (``(prompt, max_new_tokens)``; with ``refused``, one the engine refuses, first), wait at
    ``barrier`` (every client's requests are in the engine), abort the ids ``abort_others`` where they are not its
    own (the other clients' ids: a connection may not end another's requests) and its own first request once it has
    ``abort_own_after`` tokens, then step until all ended. Puts ``(index, rids, refusal, outputs, foreign)`` on
    ``out``: ``outputs`` maps each rid to ``(tokens, finish_reasons)``, ``foreign`` lists rids not its own it saw."""
    batch = [(list(p), n, None, None) for p, n in requests]
    if refused is not None:
        batch.insert(0, (refused[0], refused[1], None, None))
    results = client.add_requests(batch)
    refusal = None
    if refused is not None:
        first = results.pop(0)
        refusal = (type(first).__name__, str(first))
    rids = [int(r) for r in results]
    barrier.wait(30)
    for rid in abort_others:
        if rid not in rids:
            client.abort_request(rid)
    outputs: dict[int, tuple[list[int], list[str]]] = {rid: ([], []) for rid in rids}
    foreign: list[int] = []
    aborted = abort_own_after is None
    deadline = time.monotonic() + 60
    while client.has_unfinished and time.monotonic() < deadline:
        for o in client.step():
            if o.rid not in outputs:
                foreign.append(o.rid)
                continue
            tokens, finishes = outputs[o.rid]
            tokens.extend(o.token_ids)
            if o.finish_reason is not None:
                finishes.append(o.finish_reason)
        if not aborted and len(outputs[rids[0]][0]) >= int(abort_own_after or 0):
            client.abort_request(rids[0])
            aborted = True
    out.put((client.index, rids, refusal, outputs, foreign))
    client.close()


def hold_slots(client: Any, requests: list[tuple[list[int], int]], running: Any) -> None:
    """Add ``requests``, set ``running`` once each has a token, then step on (as a front end does) until killed."""
    client.add_requests([(list(p), n, None, None) for p, n in requests])
    started: set[int] = set()
    while True:
        for o in client.step():
            started.add(o.rid)
        if len(started) == len(requests):
            running.set()
