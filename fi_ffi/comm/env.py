"""Where this process sits in a multi-process job: its rank, the world size, the GPU it drives and the address of
the rendezvous, read from the variables a launcher already sets.

Launchers understood, in this order (the first whose rank variable is present wins):

==================  ============================  ================================  ==============================
launcher            rank / world size             local rank / local world size     rendezvous address
==================  ============================  ================================  ==============================
torchrun,           ``RANK``, ``WORLD_SIZE``      ``LOCAL_RANK``,                   ``MASTER_ADDR``, ``MASTER_PORT``
``fi-ffi launch``                                 ``LOCAL_WORLD_SIZE`` (optional)
Open MPI mpirun     ``OMPI_COMM_WORLD_RANK``,     ``OMPI_COMM_WORLD_LOCAL_RANK``,   ``MASTER_ADDR``, ``MASTER_PORT``
                    ``OMPI_COMM_WORLD_SIZE``      ``OMPI_COMM_WORLD_LOCAL_SIZE``    (``mpirun -x``)
MPICH / Intel MPI   ``PMI_RANK``, ``PMI_SIZE``    ``MPI_LOCALRANKID``,              ``MASTER_ADDR``, ``MASTER_PORT``
(Hydra)                                           ``MPI_LOCALNRANKS``
Slurm srun          ``SLURM_PROCID``,             ``SLURM_LOCALID``,                ``MASTER_ADDR``, ``MASTER_PORT``
                    ``SLURM_NTASKS``              ``SLURM_NTASKS_PER_NODE`` (opt.)
==================  ============================  ================================  ==============================

MPI launchers do not choose a rendezvous address, so it is always ``MASTER_ADDR``/``MASTER_PORT`` (the host of
rank 0 and a free port on it), as torch.distributed's ``env://`` wants too. A missing or malformed variable is a
:class:`LaunchEnvironmentError` naming it; nothing is guessed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import FiFFIError


class LaunchEnvironmentError(FiFFIError, ValueError):
    """A launcher variable is missing or malformed. ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {message}")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes (one per GPU).
        local_rank: rank on this host; the CUDA device this process drives.
        local_world_size: processes on this host.
        master_addr: host name or address of rank 0's rendezvous server.
        master_port: its TCP port.
        launcher: which launcher's variables were read (``"torchrun"``, ``"openmpi"``, ``"pmi"``, ``"slurm"``).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def single_host(self) -> bool:
        """All ranks on this host (the IPC all-reduce kernels need this)."""
        return self.local_world_size == self.world_size


# launcher -> (rank, world size, local rank, local world size or "" when it has none)
_LAUNCHERS = (
    ("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")),
    (
        "openmpi",
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ),
    ("pmi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),
    ("slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")),
)
_OPTIONAL_LOCAL_SIZE = frozenset({"LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"})


MAX_WORLD_SIZE = (1 << 31) - 1  # NCCL's ranks and world size are C ints
_MAX_DIGITS = 30  # far more than MAX_WORLD_SIZE needs: longer is refused before int() (its digit limit)
_MAX_ADDR = 253  # the longest DNS name


def _text(env: Mapping[str, str], name: str) -> str | None:
    """``env[name]`` as a str without NUL bytes (None when not set); a LaunchEnvironmentError naming it otherwise."""
    raw = env.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise LaunchEnvironmentError(
            name, f"expected a string (environment variables are text), got {type(raw).__name__} {raw!r:.40}"
        )
    if "\0" in raw:
        raise LaunchEnvironmentError(name, f"contains a NUL byte: {raw!r:.60}; set it to plain text")
    return raw


def _int(env: Mapping[str, str], name: str, low: int, high: int, *, what: str) -> int:
    """``env[name]`` as a decimal int in ``[low, high)``; a LaunchEnvironmentError naming ``name`` otherwise."""
    raw = _text(env, name)
    if raw is None:
        raise LaunchEnvironmentError(name, f"not set; expected {what}")
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        raise LaunchEnvironmentError(name, f"expected {what} (a decimal integer), got {raw!r:.60}")
    if len(text.lstrip("0")) > _MAX_DIGITS:
        raise LaunchEnvironmentError(name, f"expected {what} in [{low}, {high}), got a {len(text)}-digit number")
    value = int(text)
    if not low <= value < high:
        raise LaunchEnvironmentError(name, f"expected {what} in [{low}, {high}), got {value}")
    return value


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """The :class:`DistEnv` described by ``env`` (default ``os.environ``); see the module docstring.

    Raises:
        LaunchEnvironmentError: no launcher's variables are present, or one is missing or malformed (the error
            names the variable).
    """
    env = os.environ if env is None else env
    if not isinstance(env, Mapping):
        raise TypeError(
            f"env: expected a mapping of variable names to strings (os.environ or a dict), got {type(env).__name__}"
        )
    for launcher, (rank_var, size_var, local_var, local_size_var) in _LAUNCHERS:
        if rank_var not in env:
            continue
        world = _int(env, size_var, 1, MAX_WORLD_SIZE + 1, what="the number of processes")
        rank = _int(env, rank_var, 0, world, what=f"this process's rank (< {size_var}={world})")
        if local_size_var in _OPTIONAL_LOCAL_SIZE and local_size_var not in env:
            local_world = world
        elif local_size_var == "SLURM_NTASKS_PER_NODE":  # Slurm may write "4(x2)": tasks per node, node count
            raw = _text(env, local_size_var) or ""
            local_world = _int(
                {local_size_var: raw.split("(")[0]},
                local_size_var,
                1,
                world + 1,
                what=f"processes on this host (<= {size_var}={world})",
            )
        else:
            local_world = _int(env, local_size_var, 1, world + 1, what=f"processes on this host (<= {world})")
        local = _int(env, local_var, 0, local_world, what=f"the rank on this host (< {local_world})")
        addr = _text(env, "MASTER_ADDR")
        if addr is None:
            raise LaunchEnvironmentError(
                "MASTER_ADDR", "not set; expected the host name or address of rank 0 (the rendezvous server)"
            )
        name = addr.strip()
        if not name or len(name) > _MAX_ADDR or not name.isprintable() or any(c.isspace() for c in name):
            raise LaunchEnvironmentError(
                "MASTER_ADDR",
                f"expected a host name or address (printable, no spaces, at most {_MAX_ADDR} characters), got "
                f"{addr!r:.60}",
            )
        port = _int(env, "MASTER_PORT", 1, 65536, what="the rendezvous TCP port")
        return DistEnv(rank, world, local, local_world, addr.strip(), port, launcher)
    raise LaunchEnvironmentError(
        "RANK",
        "no launcher variables found: start the ranks with `fi-ffi launch --nproc N -- cmd`, torchrun, or an MPI "
        "launcher (OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID), with MASTER_ADDR and MASTER_PORT set",
    )


__all__ = ["DistEnv", "LaunchEnvironmentError", "read_env"]
