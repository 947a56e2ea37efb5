"""The TCP rendezvous (fi_ffi.comm.rendezvous) over loopback: real processes agree on rank 0's bytes; a missing
rank, a silent server, another job's rank and a rank started twice each end in a RendezvousError, in bounded time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from helpers.env import subprocess_env

from fi_ffi.comm.env import DistEnv
from fi_ffi.comm.launch import free_port
from fi_ffi.comm.rendezvous import RendezvousError, default_timeout, exchange

CHILD = r"""
import sys
from fi_ffi.comm.env import read_env
from fi_ffi.comm.rendezvous import exchange
env = read_env()
payload = bytes(range(128)) if env.rank == 0 else None
print(env.rank, exchange(env, payload, timeout=30).hex(), flush=True)
"""


def _env(rank: int, world: int, port: int) -> DistEnv:
    return DistEnv(rank, world, rank, world, "127.0.0.1", port, "torchrun")


def test_real_processes_receive_rank_0_bytes() -> None:
    port = free_port()
    world = 4
    procs = []
    for rank in reversed(range(world)):  # clients first: they retry until rank 0 listens
        env = subprocess_env(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True))
        time.sleep(0.05)
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0] * world
    assert sorted(int(o[0]) for o in outputs) == list(range(world))
    assert {o[1] for o in outputs} == {bytes(range(128)).hex()}


def test_one_process_world_needs_no_server() -> None:
    assert exchange(_env(0, 1, 1), b"id", timeout=1) == b"id"


def test_a_client_without_server_times_out_naming_the_address() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=rf"rank 1 could not reach rank 0 at 127.0.0.1:{port}"):
        exchange(_env(1, 2, port), None, timeout=0.5)
    assert time.monotonic() - start < 5


def test_a_server_missing_ranks_times_out_naming_them() -> None:
    with pytest.raises(RendezvousError, match=r"for ranks \[1, 2\] of 3"):
        exchange(_env(0, 3, free_port()), b"x" * 128, timeout=0.5)


def _serve_in_thread(world: int, port: int, timeout: float = 5) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def serve() -> None:
        try:
            result.append(exchange(_env(0, world, port), b"id", timeout=timeout))
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    return t, result


def test_a_rank_of_another_job_is_refused() -> None:
    port = free_port()
    t, result = _serve_in_thread(2, port, timeout=2)
    with pytest.raises(RendezvousError, match=r"world size mismatch: rank 0 has WORLD_SIZE=2, rank 1 has 4"):
        exchange(_env(1, 4, port), None, timeout=5)
    assert exchange(_env(1, 2, port), None, timeout=5) == b"id"  # the right rank still gets it
    t.join(10)
    assert result == [b"id"]


def test_a_rank_started_twice_is_refused() -> None:
    port = free_port()
    t, result = _serve_in_thread(3, port, timeout=2)
    assert exchange(_env(1, 3, port), None, timeout=5) == b"id"
    with pytest.raises(RendezvousError, match=r"rank 1 is not expected \(ranks still waiting: \[2\]\)"):
        exchange(_env(1, 3, port), None, timeout=5)
    t.join(10)
    assert isinstance(result[0], RendezvousError) and "ranks [2]" in str(result[0])


def test_a_port_in_use_is_an_error_naming_master_port() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousError, match=rf"cannot listen on port {port} \(MASTER_PORT\)"):
            exchange(_env(0, 2, port), b"id", timeout=1)


def test_something_else_listening_is_not_taken_for_rank_0() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]

        def answer() -> None:
            conn, _ = other.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.0 400\r\n\r\n")

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(RendezvousError, match="not an fi_ffi rendezvous"):
            exchange(_env(1, 2, port), None, timeout=5)
        t.join(5)


@pytest.mark.parametrize(
    ("payload", "rank", "error", "message"),
    [
        (None, 0, TypeError, "payload: rank 0 must give bytes"),
        ("text", 0, TypeError, "payload: rank 0 must give bytes, got str"),
        (b"x", 1, ValueError, "payload: only rank 0 gives the payload"),
        (b"x" * ((1 << 20) + 1), 0, ValueError, "payload: at most 1048576 bytes"),
    ],
)
def test_bad_payloads(payload: object, rank: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        exchange(_env(rank, 2, 1), payload, timeout=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0", "-3", "nan", "inf", "soon"])
def test_bad_timeout_variable_is_named(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("FI_FFI_RENDEZVOUS_TIMEOUT", bad)
    with pytest.raises(ValueError, match=rf"FI_FFI_RENDEZVOUS_TIMEOUT='{bad}': expected a number of seconds > 0"):
        default_timeout()


def test_timeout_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FI_FFI_RENDEZVOUS_TIMEOUT", "2.5")
    assert default_timeout() == 2.5
    monkeypatch.delenv("FI_FFI_RENDEZVOUS_TIMEOUT")
    assert default_timeout() == 300.0
