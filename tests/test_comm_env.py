"""The launcher environment (fi_ffi.comm.env): every launcher's variables, and every missing or malformed variable
as a LaunchEnvironmentError naming it."""

from __future__ import annotations

import pytest

from fi_ffi.comm.env import DistEnv, LaunchEnvironmentError, read_env

ADDR = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **ADDR}


def test_torchrun_variables() -> None:
    assert read_env(TORCHRUN) == DistEnv(3, 8, 1, 4, "10.0.0.1", 29500, "torchrun")
    assert not read_env(TORCHRUN).single_host


def test_local_world_size_defaults_to_the_world_size() -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    found = read_env(env)
    assert found.local_world_size == 8 and found.single_host


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            DistEnv(1, 2, 1, 2, "10.0.0.1", 29500, "openmpi"),
        ),
        (
            {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"},
            DistEnv(5, 8, 1, 4, "10.0.0.1", 29500, "pmi"),
        ),
        (
            {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2(x2)"},
            DistEnv(2, 4, 0, 2, "10.0.0.1", 29500, "slurm"),
        ),
    ],
    ids=["openmpi", "pmi", "slurm"],
)
def test_mpi_and_slurm_variables(variables: dict[str, str], expected: DistEnv) -> None:
    assert read_env({**variables, **ADDR}) == expected


def test_torchrun_variables_win_over_mpi_ones() -> None:
    env = {**TORCHRUN, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    assert read_env(env).launcher == "torchrun"


def test_no_launcher_at_all_names_rank_and_the_launchers() -> None:
    with pytest.raises(LaunchEnvironmentError, match=r"RANK: no launcher variables.*fi-ffi launch") as info:
        read_env({"PATH": "/bin"})
    assert info.value.variable == "RANK"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_each_missing_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(LaunchEnvironmentError, match=rf"^{missing}: not set") as info:
        read_env(env)
    assert info.value.variable == missing


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RANK", "two", r"RANK: expected .*decimal integer.*'two'"),
        ("RANK", "-1", r"RANK: expected .*decimal integer.*'-1'"),
        ("RANK", "8", r"RANK: expected .*in \[0, 8\), got 8"),
        ("RANK", "", r"RANK: expected .*decimal integer"),
        ("RANK", "1.5", r"RANK: expected .*decimal integer"),
        ("RANK", "٣", r"RANK: expected .*decimal integer"),  # a non-ASCII digit int() would take
        ("WORLD_SIZE", "0", r"WORLD_SIZE: expected the number of processes >= 1, got 0"),
        ("WORLD_SIZE", "1e3", r"WORLD_SIZE: expected .*decimal integer"),
        ("LOCAL_WORLD_SIZE", "9", r"LOCAL_WORLD_SIZE: expected processes on this host .*\[1, 9\), got 9"),
        ("LOCAL_RANK", "4", r"LOCAL_RANK: expected the rank on this host .*\[0, 4\), got 4"),
        ("MASTER_PORT", "0", r"MASTER_PORT: expected the rendezvous TCP port in \[1, 65536\), got 0"),
        ("MASTER_PORT", "65536", r"MASTER_PORT: .*got 65536"),
        ("MASTER_PORT", "http", r"MASTER_PORT: expected .*decimal integer"),
        ("MASTER_ADDR", "", r"MASTER_ADDR: expected a host name or address, got ''"),
        ("MASTER_ADDR", "a b", r"MASTER_ADDR: expected a host name or address"),
    ],
)
def test_each_malformed_variable_is_named(variable: str, value: str, message: str) -> None:
    with pytest.raises(LaunchEnvironmentError, match=message) as info:
        read_env({**TORCHRUN, variable: value})
    assert info.value.variable == variable


def test_surrounding_whitespace_is_tolerated() -> None:
    assert read_env({**TORCHRUN, "RANK": " 3\n", "MASTER_ADDR": " host "}).master_addr == "host"


def test_malformed_slurm_tasks_per_node_is_named() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "x", **ADDR}
    with pytest.raises(LaunchEnvironmentError, match=r"SLURM_NTASKS_PER_NODE: expected"):
        read_env(env)
