"""fi_engine.serve.engine_process.EngineProcess with several connections (``clients=N``), one per front end, on CPU: the
tests' stand-in engine (tests/helpers/fake_engine.py) in a spawned child, stepped by client processes
(tests/helpers/engine_clients.py) as ``fi-engine serve --api-servers N`` steps it: each client gets exactly its own
requests' outputs (nothing lost, duplicated or crossed), request ids are unique across clients, a client aborts
only its own requests, refusals and engine errors reach the right clients as themselves, and a client process
killed mid-request has its requests aborted, freeing their slots for the others."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time

import pytest
from helpers.engine_clients import hold_slots, run_client
from helpers.fake_engine import expected_tokens

from fi_engine.runtime.stepping import StepEngine
from fi_engine.serve.engine_client import MAX_CLIENTS, EngineClient
from fi_engine.serve.engine_process import EngineProcess
from fi_engine.serve.service import GenerationService

FAKE = "helpers.fake_engine:FakeStepEngine"
VOCAB = 50
WAIT = 30.0


Outputs = dict[int, tuple[list[int], list[str]]]


def take(client: StepEngine, got: Outputs) -> None:
    """One ``client.step()`` into ``got``: rid -> (tokens, finish reasons)."""
    for o in client.step():
        tokens, finishes = got.setdefault(o.rid, ([], []))
        tokens.extend(o.token_ids)
        if o.finish_reason is not None:
            finishes.append(o.finish_reason)


def drain(client: StepEngine, got: Outputs) -> Outputs:
    """Step ``client`` until its requests ended."""
    deadline = time.monotonic() + WAIT
    while client.has_unfinished:
        assert time.monotonic() < deadline, "the requests did not end"
        take(client, got)
    return got


def test_three_client_processes_each_get_exactly_their_own_outputs() -> None:
    ctx = mp.get_context("spawn")
    jobs = {i: [([i + 1, k + 1], 30 + 7 * k + i) for k in range(3)] for i in range(3)}
    jobs[1][0] = ([2, 1], 10**6)  # aborted by its client: no end of its own, however late the client reads
    with EngineProcess(FAKE, VOCAB, max_batch=4, max_seq_len=10**7, step_delay_s=0.002, clients=3) as engine:
        assert engine.clients == 3 and engine.client(2).max_batch == 4 and engine.client(2).max_seq_len == 10**7
        barrier, out = ctx.Barrier(3), ctx.Queue()
        options = {
            0: {"refused": ([1, VOCAB + 5], 20)},  # a token outside the vocabulary: refused, alone
            1: {"abort_own_after": 5},
            # every id the other two connections gave their requests (index + 64 k): ignored by the child
            2: {"abort_others": [i + MAX_CLIENTS * k for i in (0, 1) for k in range(4)]},
        }
        procs = [
            ctx.Process(target=run_client, args=(engine.client(i), jobs[i], barrier, out), kwargs=options[i])
            for i in range(3)
        ]
        for p in procs:
            p.start()
            engine.client(procs.index(p)).close()  # handed over: the front end holds the connection now
        reports = {r[0]: r for r in (out.get(timeout=WAIT) for _ in procs)}
        for p in procs:
            p.join(WAIT)
            assert p.exitcode == 0
    all_rids = [rid for r in reports.values() for rid in r[1]]
    assert len(set(all_rids)) == len(all_rids) == 9  # unique across the clients, none lost
    for i, (_, rids, refusal, outputs, foreign) in reports.items():
        assert foreign == [] and set(outputs) == set(rids)
        for rid, (prompt, limit) in zip(rids, jobs[i], strict=True):
            tokens, finishes = outputs[rid]
            want = expected_tokens(prompt, limit, list(range(VOCAB)))
            if i == 1 and rid == rids[0]:  # aborted by its own client after 5 tokens
                assert finishes == ["abort"] and 5 <= len(tokens) < limit and tokens == want[: len(tokens)]
            else:
                assert finishes == ["length"] and tokens == want, (i, rid)
        assert refusal == (("ValueError", refusal[1]) if i == 0 else None)
    assert f"prompt[1]: token id {VOCAB + 5} is outside the vocabulary" in reports[0][2][1]


def test_a_killed_client_process_frees_its_slots_and_the_others_go_on() -> None:
    ctx = mp.get_context("spawn")
    with EngineProcess(FAKE, VOCAB, max_batch=3, step_delay_s=0.002, clients=2) as engine:
        running = ctx.Event()
        holder = ctx.Process(target=hold_slots, args=(engine.client(0), [([1], 10**6), ([2], 10**6)], running))
        holder.start()
        engine.client(0).close()
        assert running.wait(WAIT), "the holder's requests did not start"
        mine = engine.client(1)
        first = mine.add_request([3], 10**6)
        got: Outputs = {}
        for _ in range(5):
            take(mine, got)  # running beside the holder's two
        assert got[first][0] and not got[first][1]
        holder.kill()
        holder.join(WAIT)
        # the holder's two slots come free: two more requests run beside the first one, which has no end
        second, third = mine.add_requests([([4], 6, None, None), ([5], 7, None, None)])
        deadline = time.monotonic() + WAIT
        while not (got.get(second, ((), []))[1] and got.get(third, ((), []))[1]):
            assert time.monotonic() < deadline, "the killed client's slots were not freed"
            take(mine, got)
        mine.abort_request(first)
        drain(mine, got)
    pool = list(range(VOCAB))
    assert set(got) == {first, second, third}  # none of the holder's
    tokens, finishes = got[first]
    assert finishes == ["abort"] and tokens == expected_tokens([3], len(tokens), pool)
    assert got[second] == (expected_tokens([4], 6, pool), ["length"])
    assert got[third] == (expected_tokens([5], 7, pool), ["length"])


def test_an_engine_error_reaches_every_client() -> None:
    with EngineProcess(FAKE, VOCAB, fail_at_step=3, step_delay_s=0.02, clients=2) as engine:
        clients = [engine.client(0), engine.client(1)]
        for i, c in enumerate(clients):  # the second may come after the failure: its add is told then
            with pytest.raises(RuntimeError, match="engine process: RuntimeError: the fake engine fails at step 3"):
                c.add_request([i + 1], 50)
                drain(c, {})
        with pytest.raises(RuntimeError, match="engine process: the child exited"):  # and then its end
            clients[0].add_request([1], 2)


def test_several_front_ends_serve_one_engine_in_one_process() -> None:
    """Two GenerationServices over two connections of one engine process: each answers its own requests."""
    engine = EngineProcess(FAKE, VOCAB, max_batch=2, clients=2)
    with engine, GenerationService(engine.client(0)) as a, GenerationService(engine.client(1)) as b:
        streams = [(svc.submit([k + 1, i + 1], max_new_tokens=8 + k), [k + 1, i + 1], 8 + k)
                   for k in range(3) for i, svc in enumerate((a, b))]  # fmt: skip
        for stream, prompt, limit in streams:
            assert list(stream.result(WAIT).token_ids) == expected_tokens(prompt, limit, list(range(VOCAB)))


def test_clients_are_named_and_handed_over_before_use() -> None:
    with pytest.raises(ValueError, match=r"clients: expected an int in \[1, 64\]"):
        EngineProcess(FAKE, VOCAB, clients=0)
    with EngineProcess(FAKE, VOCAB, clients=2) as engine:
        assert isinstance(engine.client(1), EngineClient) and engine.client(1).index == 1
        with pytest.raises(ValueError, match=r"index: expected an int in \[0, 2\)"):
            engine.client(2)
        c = engine.client(1)
        c.add_request([1], 3)
        with pytest.raises(ValueError, match="hand a client over before it is used"):
            pickle.dumps(c)
        drain(c, {})
        c.close()
        with pytest.raises(ValueError, match="engine: closed"):
            c.step()
        assert engine.alive
        rid = engine.add_request([2], 2)  # connection 0 (the engine process's own methods) still serves
        assert drain(engine, {}) == {rid: (expected_tokens([2], 2, list(range(VOCAB))), ["length"])}
    assert not engine.alive


def test_wake_returns_a_step_that_waits_for_outputs() -> None:
    # one slot, held by client 0's long request: client 1's queued request gives no output for as long as that runs,
    # so client 1's step() waits, until another thread wakes it
    with EngineProcess(FAKE, VOCAB, max_batch=1, max_seq_len=10**7, step_delay_s=0.005, clients=2) as engine:
        holder, waiter = engine.client(0), engine.client(1)
        held = holder.add_request([1, 2], 10**6)
        assert any(o.rid == held for o in holder.step())  # running
        waiter.add_request([3, 4], 5)
        returned: list[object] = []
        thread = threading.Thread(target=lambda: returned.append(waiter.step()))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not returned  # waiting: nothing for client 1 yet
        woken_at = time.monotonic()
        waiter.wake()
        thread.join(WAIT)
        assert returned == [[]] and time.monotonic() - woken_at < 2.0  # back at once, with nothing
        assert waiter.has_unfinished  # its request still queued
        waiter.wake()  # a wake with no step waiting: the next step returns at once too, then steps wait again
        assert waiter.step() == []
        holder.abort_request(held)  # the slot frees: client 1's request now runs to its end
        got = drain(waiter, {})
        assert [finishes for _, finishes in got.values()] == [["length"]]
        waiter.close()
        waiter.wake()  # after close: nothing happens (no descriptor written to)


def test_a_service_waiting_on_a_queued_request_takes_a_cancel_at_once() -> None:
    # the service's thread waits in its client's step() for the queued request's first output, which never comes
    # while client 0 holds the one slot; its cancel must reach the engine all the same (GenerationService wakes
    # the client), and the request end "abort"
    with EngineProcess(FAKE, VOCAB, max_batch=1, max_seq_len=10**7, step_delay_s=0.005, clients=2) as engine:
        holder = engine.client(0)
        held = holder.add_request([1, 2], 10**6)
        assert any(o.rid == held for o in holder.step())
        with GenerationService(engine.client(1)) as service:
            queued = service.submit([3, 4], max_new_tokens=5)
            assert queued.accepted(WAIT)
            time.sleep(0.2)  # the service's thread is in step() now
            cancelled_at = time.monotonic()
            queued.cancel()
            assert queued.result(WAIT).finish_reason == "abort"
            assert time.monotonic() - cancelled_at < 2.0
            # and a new request is handed to the engine while the thread waits again: it runs once the slot frees
            after = service.submit([5, 6], max_new_tokens=3)
            assert after.accepted(WAIT)
            holder.abort_request(held)
            assert after.result(WAIT).finish_reason == "length"
