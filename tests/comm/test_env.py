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
        ("WORLD_SIZE", "0", r"WORLD_SIZE: expected the number of processes in \[1, 2147483648\), got 0"),
        ("WORLD_SIZE", str(2**40), r"WORLD_SIZE: expected .* in \[1, 2147483648\), got 1099511627776"),
        ("WORLD_SIZE", "9" * 5000, r"WORLD_SIZE: expected .*, got a 5000-digit number"),  # past int()'s digit limit
        ("RANK", "0\x001", r"RANK: contains a NUL byte"),
        ("MASTER_ADDR", "host\x00evil", r"MASTER_ADDR: contains a NUL byte"),
        ("MASTER_ADDR", "host\x07", r"MASTER_ADDR: expected a host name or address \(printable"),
        ("MASTER_ADDR", "h" * 254, r"MASTER_ADDR: expected .*at most 253 characters"),
        ("WORLD_SIZE", "1e3", r"WORLD_SIZE: expected .*decimal integer"),
        ("LOCAL_WORLD_SIZE", "9", r"LOCAL_WORLD_SIZE: expected processes on this host .*\[1, 9\), got 9"),
        ("LOCAL_RANK", "4", r"LOCAL_RANK: expected the rank on this host .*\[0, 4\), got 4"),
        ("MASTER_PORT", "0", r"MASTER_PORT: expected the rendezvous TCP port in \[1, 65536\), got 0"),
        ("MASTER_PORT", "65536", r"MASTER_PORT: .*got 65536"),
        ("MASTER_PORT", "http", r"MASTER_PORT: expected .*decimal integer"),
        ("MASTER_ADDR", "", r"MASTER_ADDR: expected a host name or address .*got ''"),
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


def test_slurm_tasks_per_node_may_not_exceed_the_tasks() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "4(x1)", **ADDR}
    with pytest.raises(LaunchEnvironmentError, match=r"^SLURM_NTASKS_PER_NODE: expected .*<= SLURM_NTASKS=2.*got 4"):
        read_env(env)
    assert read_env({**env, "SLURM_NTASKS_PER_NODE": "2(x1)"}).local_world_size == 2


@pytest.mark.parametrize("env", [5, "RANK=0", ["RANK"], b"RANK=0"])
def test_a_mapping_of_the_wrong_type_is_named(env: object) -> None:
    with pytest.raises(TypeError, match=r"^env: expected a mapping of variable names to strings"):
        read_env(env)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 1.5, [0], b"0"])
def test_a_value_that_is_not_a_string_is_named(value: object) -> None:
    with pytest.raises(LaunchEnvironmentError, match=r"^RANK: expected a string") as info:
        read_env({**TORCHRUN, "RANK": value})
    assert info.value.variable == "RANK"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"env": {"RANK": "0"}}, TypeError, r"^env: expected a fi_ffi.comm.DistEnv \(read_env\(variables\)"),
        ({"env": 5}, TypeError, r"^env: expected a fi_ffi.comm.DistEnv"),
        ({"device": "0"}, TypeError, r"^device: expected a CUDA ordinal"),
        ({"device": -1}, ValueError, r"^device: expected a CUDA ordinal in \[0, 2\*\*31\)"),
        ({"device": True}, TypeError, r"^device: expected a CUDA ordinal"),
        ({"backend": "mpi"}, ValueError, r"^backend: expected one of nccl4py, cupy or None"),
        ({"backend": ["cupy"]}, ValueError, r"^backend: expected one of"),
        ({"timeout": float("nan")}, ValueError, r"^timeout: expected a finite value > 0"),
        ({"timeout": 10**400}, ValueError, r"^timeout: .* does not fit in a float64"),
        ({"timeout": "5"}, TypeError, r"^timeout: expected a float"),
    ],
)
def test_from_env_checks_its_arguments_before_loading_nccl(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict, error: type, message: str
) -> None:
    from fi_ffi.comm import nccl

    def must_not_load(name: object = None) -> None:
        raise AssertionError("NCCL was loaded before the arguments were checked")

    monkeypatch.setattr(nccl, "load_backend", must_not_load)
    args = {"env": read_env(TORCHRUN), **kwargs}
    with pytest.raises(error, match=message):
        nccl.Communicator.from_env(**args)
