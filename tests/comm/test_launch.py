"""``fi-ffi launch`` with tiny Python ranks (no GPU): the variables each rank gets, the worst exit status, the
others stopped when one fails, signals forwarded; and the NCCL communicator's lazy import and its errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers.env import subprocess_env

from fi_ffi.comm import launch as launch_mod
from fi_ffi.comm.launch import MULTICAST_OFF, free_port, launch, rank_env

# each rank writes its line with one os.write (atomic on a pipe), so lines of several ranks never interleave
PRINT_ENV = (
    "import os; e = os.environ; os.write(1, ('rank %s %s %s %s %s %s %s %s %s\\n' % (e['RANK'], e['WORLD_SIZE'], "
    "e['LOCAL_RANK'], e['LOCAL_WORLD_SIZE'], e['MASTER_ADDR'], e['MASTER_PORT'], e['NCCL_NVLS_ENABLE'], "
    "e['TORCH_SYMM_MEM_DISABLE_MULTICAST'], e['NVSHMEM_DISABLE_NVLS'])).encode())"
)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", "launch", "--allow-oversubscribe", *args],  # CPU ranks, whatever the GPUs
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_each_rank_prints_its_rank_and_gets_the_torchrun_variables() -> None:
    done = _cli("--nproc", "3", "--master-port", "29999", "--", sys.executable, "-c", PRINT_ENV)
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert lines == [f"rank {r} 3 {r} 3 127.0.0.1 29999 0 1 1" for r in range(3)]


def test_a_free_port_is_picked_and_shared() -> None:
    done = _cli("--nproc", "2", "--", sys.executable, "-c", PRINT_ENV)
    ports = {line.split()[6] for line in done.stdout.splitlines()}
    assert done.returncode == 0 and len(ports) == 1 and 1 <= int(ports.pop()) <= 65535


def test_a_picked_port_lies_below_the_systems_own_range_and_is_free() -> None:
    # the system hands out its ephemeral range to connections and port-0 binds; a port below it cannot be taken by a
    # connection made between the pick and rank 0's listen
    floor = launch_mod._ephemeral_floor(launch_mod._PORT_RANGE_FILE)
    if floor <= launch_mod._FIRST_PICKED_PORT:
        pytest.skip(f"this system states no ephemeral range above {launch_mod._FIRST_PICKED_PORT} ({floor})")
    ports = {free_port() for _ in range(20)}
    assert all(launch_mod._FIRST_PICKED_PORT <= p < floor for p in ports), (floor, ports)
    assert len(ports) > 1  # picked at random: 20 picks from thousands of ports are not all one
    port = ports.pop()
    with socket.create_server(("", port)):  # as rank 0 listens
        pass


def test_without_a_stated_range_the_port_is_the_systems_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    for text in ("", "not numbers\n", "40000\n", "60999 32768\n", "0 70000\n", "\xff\xfe"):
        path = os.path.join(tmp_path, "range")
        with open(path, "w", encoding="latin-1") as f:
            f.write(text)
        assert launch_mod._ephemeral_floor(path) == 0, text
    assert launch_mod._ephemeral_floor(os.path.join(tmp_path, "missing")) == 0
    good = os.path.join(tmp_path, "good")
    with open(good, "w", encoding="ascii") as f:
        f.write("32768\t60999\n")
    assert launch_mod._ephemeral_floor(good) == 32768
    real_floor = launch_mod._ephemeral_floor(launch_mod._PORT_RANGE_FILE)
    monkeypatch.setattr(launch_mod, "_PORT_RANGE_FILE", os.path.join(tmp_path, "missing"))
    port = free_port()
    if real_floor > launch_mod._FIRST_PICKED_PORT:  # the system's own pick: from its range, not below it
        assert port >= real_floor, (port, real_floor)
    with socket.create_server(("127.0.0.1", port)):
        pass


class _Picks:
    """Stands in for random.SystemRandom: ``ports`` first, then ``then`` for ever."""

    def __init__(self, ports: list[int], then: int | None = None) -> None:
        self.ports, self.then = list(ports), then

    def __call__(self) -> _Picks:
        return self

    def randrange(self, start: int, stop: int) -> int:
        assert start == launch_mod._FIRST_PICKED_PORT and stop > start
        return self.ports.pop(0) if self.ports else int(self.then if self.then is not None else start)


def _occupied_port_below_the_range(host: str) -> socket.socket:
    floor = launch_mod._ephemeral_floor(launch_mod._PORT_RANGE_FILE)
    if floor <= launch_mod._FIRST_PICKED_PORT:
        pytest.skip(f"this system states no ephemeral range above {launch_mod._FIRST_PICKED_PORT} ({floor})")
    for port in range(launch_mod._FIRST_PICKED_PORT + 1000, floor):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
            s.listen()
            return s
        except OSError:
            s.close()
    pytest.skip(f"no port below {floor} could be bound on {host}")


def test_a_port_another_program_listens_on_at_one_address_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 0 listens on every address: a listener on 127.0.0.2 alone takes the port from it too
    with _occupied_port_below_the_range("127.0.0.2") as taken:
        busy = taken.getsockname()[1]
        with pytest.raises(OSError):
            socket.create_server(("", busy))  # what rank 0 would meet
        monkeypatch.setattr(launch_mod.random, "SystemRandom", _Picks([busy, busy]))
        port = free_port()
        assert port != busy and port >= launch_mod._FIRST_PICKED_PORT
        with socket.create_server(("", port)):
            pass
        # every pick taken: the system's choice of port 0, which is free too
        monkeypatch.setattr(launch_mod.random, "SystemRandom", _Picks([], then=busy))
        port = free_port()
        assert port != busy
        with socket.create_server(("", port)):
            pass


def test_free_port_names_a_bad_address(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    for bad in (5, None, b"127.0.0.1"):
        with pytest.raises(TypeError, match="addr: expected an IPv4 address"):
            free_port(bad)  # type: ignore[arg-type]
    # where it binds the address itself (no range stated): an address of no interface here, a NUL
    monkeypatch.setattr(launch_mod, "_PORT_RANGE_FILE", os.path.join(tmp_path, "missing"))
    for bad in ("192.0.2.123", "a\x00b"):
        with pytest.raises(ValueError, match="addr: cannot bind"):
            free_port(bad)


def test_ranks_can_bootstrap_from_what_launch_sets() -> None:
    child = (
        "from fi_ffi.comm.env import read_env; from fi_ffi.comm.rendezvous import exchange; e = read_env(); "
        "import os; os.write(1, b'%d %s\\n' % (e.rank, exchange(e, b'uid' if e.rank == 0 else None, timeout=30)))"
    )
    done = _cli("--nproc", "3", "--", sys.executable, "-c", child)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["0 uid", "1 uid", "2 uid"]


def test_a_failing_rank_stops_the_others_and_its_status_is_returned() -> None:
    child = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(0.2 if r == 1 else 120); sys.exit(3)"
    start = time.monotonic()
    done = _cli("--nproc", "3", "--grace", "5", "--", sys.executable, "-c", child)
    assert done.returncode == 3
    assert time.monotonic() - start < 60  # the sleeping ranks were stopped, not waited for
    # the failing rank is named, with its pid and status, and the launcher says it stops the others
    assert re.search(r"fi-ffi launch: rank 1 \(pid \d+\) exited with status 3; stopping the other ranks", done.stderr)
    assert "rank 0 (pid" not in done.stderr and "rank 2 (pid" not in done.stderr  # stopped ranks are not blamed
    assert "Traceback" not in done.stderr


def test_a_clean_run_prints_no_rank_summary() -> None:
    done = _cli("--nproc", "2", "--", sys.executable, "-c", "pass")
    assert done.returncode == 0 and "fi-ffi launch" not in done.stderr


def test_a_rank_killed_by_a_signal_counts_as_128_plus_the_signal() -> None:
    child = "import os, signal, time; r = int(os.environ['RANK']); r == 0 and os.kill(os.getpid(), 9); time.sleep(120)"
    done = _cli("--nproc", "2", "--", sys.executable, "-c", child)
    assert done.returncode == 128 + 9


def test_a_rank_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    child = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); r = int(os.environ['RANK']); "
        "time.sleep(0.2) if r == 0 else time.sleep(120); sys.exit(4)"
    )
    start = time.monotonic()
    done = _cli("--nproc", "2", "--grace", "1", "--", sys.executable, "-c", child)
    assert done.returncode == 4
    assert time.monotonic() - start < 30


def _signal_two_ranks(tmp_path: os.PathLike[str], child: str, signum: int, *options: str) -> tuple[str, int]:
    """``fi-ffi launch --nproc 2 [options] -- python -c child tmp_path``, sent ``signum`` once both ranks have made
    their file in ``tmp_path`` (each rank makes one named by its RANK when its handlers are set): (the ranks' stdout,
    the launcher's exit status)."""
    cmd = [sys.executable, "-m", "fi_ffi", "launch", "--allow-oversubscribe", "--nproc", "2", *options, "--"]
    proc = subprocess.Popen(
        [*cmd, sys.executable, "-c", child, str(tmp_path)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    return out, proc.returncode


def test_signals_to_the_launcher_are_forwarded_to_every_rank(tmp_path: os.PathLike[str]) -> None:
    child = (
        "import os, signal, sys, time\n"
        "def bye(s, f):\n"
        "    os.write(1, ('rank %s got %d\\n' % (os.environ['RANK'], s)).encode()); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"
    )
    out, code = _signal_two_ranks(tmp_path, child, signal.SIGTERM)
    assert sorted(out.splitlines()) == ["rank 0 got 15", "rank 1 got 15"]
    assert code == 128 + signal.SIGTERM


def test_a_signal_to_the_launcher_reaches_each_rank_once_and_no_sigterm_follows(tmp_path: os.PathLike[str]) -> None:
    # each rank takes a second to handle SIGINT (a rank saving its state): a SIGTERM sent after the forwarded SIGINT
    # would show as "got 15" (the launcher sent one on its next poll, and SIGTERM twice where it received SIGTERM)
    child = (
        "import os, signal, sys, time\n"
        "def note(s, f):\n"
        "    os.write(1, ('rank %s got %d\\n' % (os.environ['RANK'], s)).encode())\n"
        "    if s == signal.SIGINT:\n"
        "        time.sleep(1.0); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, note)\n"
        "signal.signal(signal.SIGTERM, note)\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"
    )
    out, code = _signal_two_ranks(tmp_path, child, signal.SIGINT, "--grace", "30")
    assert sorted(out.splitlines()) == ["rank 0 got 2", "rank 1 got 2"]
    assert code == 128 + signal.SIGINT


def test_usage_errors() -> None:
    assert _cli("--nproc", "2").returncode == 2
    assert "expected a command after `--`" in _cli("--nproc", "2", "--").stderr
    assert _cli("--nproc", "0", "--", "true").returncode == 2
    assert _cli("--nproc", "2", "--master-port", "70000", "--", "true").returncode == 2
    missing = _cli("--nproc", "2", "--", "/nonexistent/fi-ffi-rank")
    assert missing.returncode == 127 and "command not found" in missing.stderr


def test_launch_function_arguments() -> None:
    with pytest.raises(ValueError, match="nproc: expected an int >= 1"):
        launch(["true"], 0)
    with pytest.raises(ValueError, match="nproc: expected an int >= 1"):
        launch(["true"], True)
    with pytest.raises(ValueError, match="command: expected a command"):
        launch([], 2)
    assert launch([sys.executable, "-c", "pass"], 2) == 0


def test_rank_env_keeps_the_callers_variables_and_turns_multicast_off() -> None:
    env = rank_env({"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"}, 1, 4, "127.0.0.1", free_port())
    assert env["PATH"] == "/bin" and env["RANK"] == "1" and env["WORLD_SIZE"] == "4"
    assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF
    assert launch_mod.main(1, ["/nonexistent/x"], "127.0.0.1", None, 1.0) == 127


# ---- the communicator's backend ---------------------------------------------------------------------------------


def test_importing_fi_ffi_comm_imports_no_nccl_binding() -> None:
    code = "import sys, fi_ffi.comm; print(sorted(m for m in ('nccl', 'cupy', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


def _nccl_loads() -> bool:
    from fi_ffi.comm.nccl import NcclUnavailableError, load_backend

    try:
        load_backend()
    except NcclUnavailableError:
        return False
    return True


@pytest.mark.skipif("_nccl_loads()", reason="an NCCL binding loads here: nothing is missing")
def test_no_nccl_binding_is_a_clear_error() -> None:
    from fi_ffi.comm.nccl import NcclUnavailableError, load_backend

    with pytest.raises(NcclUnavailableError, match=r"nccl4py: .*; cupy: .*pip install '\.\[comm\]'") as info:
        load_backend()
    assert isinstance(info.value, ImportError)


def test_unknown_backend_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from fi_ffi.comm.nccl import load_backend

    with pytest.raises(ValueError, match="backend: expected one of nccl4py, cupy, got 'mpi'"):
        load_backend("mpi")
    monkeypatch.setenv("FI_FFI_NCCL_BACKEND", "gloo")
    with pytest.raises(ValueError, match="FI_FFI_NCCL_BACKEND='gloo': expected one of nccl4py, cupy"):
        load_backend()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 2, "world_size": 2}, ValueError, r"rank: expected 0 <= rank < world_size \(2\), got 2"),
        ({"rank": -1}, ValueError, r"rank: expected 0 <= rank"),
        ({"world_size": 0}, ValueError, r"world_size: expected 1 <= world_size < 2\*\*31 \(NCCL.s int\), got 0"),
        ({"rank": 1.0}, TypeError, r"rank: expected an int, got float"),
        ({"device": -1}, ValueError, r"device: expected a CUDA ordinal in \[0, 2\*\*31\)"),
        ({"device": "0"}, TypeError, r"device: expected an int, got str"),
        ({"unique_id": b"short"}, ValueError, r"unique_id: expected 128 bytes"),
    ],
)
def test_communicator_arguments_are_checked_before_nccl_is_touched(
    kwargs: dict[str, object], error: type, message: str
) -> None:
    from fi_ffi.comm import Communicator

    args: dict[str, object] = {"rank": 0, "world_size": 2, "unique_id": bytes(128), "device": 0, **kwargs}
    with pytest.raises(error, match=message):
        Communicator(args.pop("rank"), args.pop("world_size"), args.pop("unique_id"), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("wants", [bytes, tuple])
def test_the_cupy_backend_gives_the_id_in_the_form_its_cupy_takes(wants: type) -> None:
    # CuPy is not installed here: a stand-in with CuPy 13's (signed C chars) or CuPy 14's (bytes) signature; the
    # real CuPy 14 refused the tuple with "Argument 'commId' has incorrect type (expected bytes, got tuple)"
    from types import SimpleNamespace

    from fi_ffi.comm.nccl import _CuPy

    got: list[object] = []

    def communicator(n: int, comm_id: object, rank: int) -> str:
        if not isinstance(comm_id, wants):
            raise TypeError(f"Argument 'commId' has incorrect type (expected {wants.__name__})")
        got.append(comm_id)
        return "comm"

    backend = object.__new__(_CuPy)
    backend.n = SimpleNamespace(NcclCommunicator=communicator)
    uid = bytes(range(120, 248))
    assert backend.init(2, uid, 1) == "comm"
    assert got == [uid] if wants is bytes else got == [tuple(b - 256 if b > 127 else b for b in uid)]
