"""A rank that dies or raises does not hang the others (no GPU: the real launcher, rendezvous and watchdog, with
ranks that wait forever as ranks blocked in a collective would; tests/helpers/watchdog_worker.py).

Every rank that lost a peer must exit within a bound with ``PEER_LOST_EXIT_CODE`` and a message naming the rank,
and ``fi-ffi launch`` must name the rank that failed, even though the survivors ignore the launcher's SIGTERM and
its ``--grace`` is far longer than the bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.subprocess_run import worker_path

from fi_ffi.comm.launch import free_port, rank_env
from fi_ffi.comm.watchdog import PEER_LOST_EXIT_CODE

WORKER = worker_path("watchdog_worker")
BOUND_S = 20.0  # generous for 2 shared CPU cores; the watchdog itself reacts within milliseconds


def _wait_ready(folder: Path, n: int, procs: list[subprocess.Popen[str]] | None = None) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = {int(p.name.split("-")[1]): p for p in folder.glob("ready-*")}
        if len(ready) == n and all(p.read_text() for p in ready.values()):
            return {r: int(p.read_text()) for r, p in ready.items()}
        if procs and any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    raise AssertionError(f"the ranks did not get ready: {sorted(folder.iterdir())}")


def _launch(folder: Path, n: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fi_ffi", "launch", "--allow-oversubscribe", "--nproc", str(n),
         "--grace", "120", "--", sys.executable, WORKER, str(folder), mode],
        env=subprocess_env(FI_FFI_RENDEZVOUS_TIMEOUT="60"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], started: float) -> tuple[int, str, float]:
    try:
        _, err = proc.communicate(timeout=BOUND_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the job hung after a rank's death:\n{err[-3000:]}") from None
    return proc.returncode, err, time.monotonic() - started


def test_a_sigkilled_rank_ends_every_other_rank_and_launch_names_it(tmp_path: Path) -> None:
    proc = _launch(tmp_path, 3, "hang")
    pids = _wait_ready(tmp_path, 3)
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code, err, took = _finish(proc, started)
    assert took < BOUND_S, err
    assert f"fi-ffi launch: rank 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL)" in err
    for r in (0, 2):
        assert f"fi_ffi: rank {r} of 3: lost rank 1 died" in err, err
    assert code == 128 + signal.SIGKILL  # the cause's status, not the survivors' 75
    assert "did not stop within --grace" not in err  # the watchdog ended them, not the launcher's SIGKILL


def test_a_rank_that_raises_ends_the_others_with_its_error(tmp_path: Path) -> None:
    proc = _launch(tmp_path, 3, "raise")
    _wait_ready(tmp_path, 3)
    code, err, took = _finish(proc, time.monotonic())
    assert took < BOUND_S, err
    assert "RuntimeError: boom in rank 1" in err  # the rank's own traceback
    for r in (0, 2):
        assert f"fi_ffi: rank {r} of 3: lost rank 1 failed: RuntimeError: boom in rank 1" in err, err
    assert "fi-ffi launch: rank 1 (pid" in err and "exited with status 1;" in err
    assert code == 1


def test_without_a_launcher_the_death_of_rank_0_ends_the_others(tmp_path: Path) -> None:
    # no launcher to stop anyone: only the watchdog can end rank 1 and 2 (which ignore SIGTERM)
    port = free_port()
    base = subprocess_env(FI_FFI_RENDEZVOUS_TIMEOUT="60")
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path), "hang"],
            env=rank_env(base, r, 3, "127.0.0.1", port),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    try:
        pids = _wait_ready(tmp_path, 3, procs)
        started = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        for r in (1, 2):
            _, err = procs[r].communicate(timeout=BOUND_S + 30)
            assert time.monotonic() - started < BOUND_S
            assert procs[r].returncode == PEER_LOST_EXIT_CODE, err
            assert f"fi_ffi: rank {r} of 3: lost rank 0 died" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_ranks_that_end_normally_at_different_times_are_not_lost(tmp_path: Path) -> None:
    proc = _launch(tmp_path, 3, "clean")
    code, err, _ = _finish(proc, time.monotonic())
    assert code == 0, err
    assert "lost" not in err and "fi-ffi launch:" not in err


def test_launch_describes_how_a_rank_ended() -> None:
    from fi_ffi.comm.launch import describe_exit

    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(PEER_LOST_EXIT_CODE) == f"exited with status {PEER_LOST_EXIT_CODE} (it lost a peer rank)"


@pytest.mark.parametrize("world", [1])
def test_a_world_of_one_has_no_watchdog(world: int) -> None:
    from fi_ffi.comm.env import DistEnv
    from fi_ffi.comm.watchdog import bootstrap

    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                  master_port=free_port(), launcher="test")  # fmt: skip
    assert bootstrap(env, b"x", timeout=5) == (b"x", None)
