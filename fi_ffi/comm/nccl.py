"""The collective engine: an NCCL communicator per process, through NVIDIA's own Python bindings.

Backends, tried in this order (``FI_FFI_NCCL_BACKEND=nccl4py|cupy`` picks one):

- ``nccl4py`` (NVIDIA's, on cuda-python like the rest of fi_ffi; the ``comm`` extra): its low-level module
  ``nccl.bindings.nccl``, which finds ``libnccl.so.2`` through cuda-pathfinder (pip's ``nvidia-nccl-cu13``, the
  one torch installs, or a system NCCL).
- ``cupy``: ``cupy.cuda.nccl`` where CuPy is installed with NCCL (the Llama engine's dependency).

Both are imported only when a communicator is made; neither present is an :class:`NcclUnavailableError` saying
what to install. The communicator is bootstrapped from the launcher's environment
(:func:`fi_ffi.comm.env.read_env`): rank 0 makes the NCCL unique id and hands it out through
:func:`fi_ffi.comm.rendezvous.exchange`; every rank then joins with ``ncclCommInitRank`` on the GPU
``LOCAL_RANK``. NCCL runs across hosts as well as within one.

Tensors are any fi_ffi tensor argument (descriptor, torch, CuPy, DLPack producer): contiguous, on the
communicator's GPU. Collectives are asynchronous on ``stream`` (None: the first tensor's framework stream, else
TVM-FFI's current stream, as fi_ffi ops do); the byte helpers (:meth:`Communicator.all_gather_bytes`,
:meth:`Communicator.barrier`) are synchronous and run on a stream of the communicator's own.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .. import variables
from ..dtypes import DType
from ..errors import FiFFIError
from .env import DistEnv, read_env
from .watchdog import Watchdog, bootstrap

UNIQUE_ID_BYTES = 128

# ncclDataType_t (nccl.h)
_NCCL_TYPES = {
    "int8": 0,
    "uint8": 1,
    "int32": 2,
    "uint32": 3,
    "int64": 4,
    "uint64": 5,
    "float16": 6,
    "float32": 7,
    "float64": 8,
    "bfloat16": 9,
    "float8_e4m3fn": 10,
    "float8_e5m2": 11,
}
# ncclRedOp_t
REDUCE_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


class NcclUnavailableError(FiFFIError, ImportError):
    """No NCCL binding could be loaded; the text says what to install."""


class NcclError(FiFFIError):
    """An NCCL call failed (the backend's message is kept)."""


# ---- backends ---------------------------------------------------------------------------------------------------


class _Nccl4Py:
    """``nccl.bindings.nccl`` (nccl4py)."""

    name = "nccl4py"

    def __init__(self) -> None:
        from nccl.bindings import nccl  # type: ignore[import-not-found]

        self.n = nccl

    def version(self) -> int:
        return int(self.n.get_version())

    def unique_id(self) -> bytes:
        return bytes(self.n.get_unique_id())

    def init(self, world_size: int, unique_id: bytes, rank: int) -> Any:
        if self.version() >= 22300:  # one id, no config: the form nccl4py's own Communicator uses
            return self.n.comm_init_rank_scalable(world_size, rank, 1, bytearray(unique_id), 0)
        return self.n.comm_init_rank(world_size, self.n.UniqueId.from_buffer(bytearray(unique_id)), rank)

    def all_reduce(self, comm: Any, send: int, recv: int, count: int, dtype: int, op: int, stream: int) -> None:
        self.n.all_reduce(send, recv, count, dtype, op, comm, stream)

    def all_gather(self, comm: Any, send: int, recv: int, count: int, dtype: int, stream: int) -> None:
        self.n.all_gather(send, recv, count, dtype, comm, stream)

    def broadcast(self, comm: Any, send: int, recv: int, count: int, dtype: int, root: int, stream: int) -> None:
        self.n.broadcast(send, recv, count, dtype, root, comm, stream)

    def destroy(self, comm: Any) -> None:
        self.n.comm_destroy(comm)


class _CuPy:
    """``cupy.cuda.nccl``."""

    name = "cupy"

    def __init__(self) -> None:
        from cupy.cuda import nccl  # type: ignore[import-not-found,unused-ignore]

        if not getattr(nccl, "available", True):
            raise ImportError("cupy.cuda.nccl is not available (CuPy was installed without NCCL)")
        self.n = nccl

    def version(self) -> int:
        return int(self.n.get_version())

    def unique_id(self) -> bytes:
        return bytes(b & 0xFF for b in self.n.get_unique_id())

    def init(self, world_size: int, unique_id: bytes, rank: int) -> Any:
        # CuPy 13 takes the id as a tuple of C chars (signed), CuPy 14 as bytes ("expected bytes, got tuple")
        try:
            return self.n.NcclCommunicator(world_size, bytes(unique_id), rank)
        except TypeError:
            signed = tuple(b - 256 if b > 127 else b for b in unique_id)
            return self.n.NcclCommunicator(world_size, signed, rank)

    def all_reduce(self, comm: Any, send: int, recv: int, count: int, dtype: int, op: int, stream: int) -> None:
        comm.allReduce(send, recv, count, dtype, op, stream)

    def all_gather(self, comm: Any, send: int, recv: int, count: int, dtype: int, stream: int) -> None:
        comm.allGather(send, recv, count, dtype, stream)

    def broadcast(self, comm: Any, send: int, recv: int, count: int, dtype: int, root: int, stream: int) -> None:
        comm.broadcast(send, recv, count, dtype, root, stream)

    def destroy(self, comm: Any) -> None:
        comm.destroy()


_BACKENDS: dict[str, type[_Nccl4Py] | type[_CuPy]] = {"nccl4py": _Nccl4Py, "cupy": _CuPy}


def load_backend(name: str | None = None) -> Any:
    """The NCCL backend ``name`` (``"nccl4py"``, ``"cupy"``), or the first that loads (``FI_FFI_NCCL_BACKEND``).

    Raises:
        ValueError: an unknown name.
        NcclUnavailableError: none loads (nccl4py missing or without libnccl, CuPy missing or without NCCL).
    """
    if name is None:
        name = variables.choice("FI_FFI_NCCL_BACKEND")  # its row's choices are _BACKENDS' names (a test keeps them)
    if name is not None and (not isinstance(name, str) or name not in _BACKENDS):
        raise ValueError(f"backend: expected one of {', '.join(_BACKENDS)}, got {name!r}")
    reasons = []
    for each in [name] if name else list(_BACKENDS):
        try:
            backend = _BACKENDS[each]()
            backend.version()  # loads libnccl.so.2 now, so a missing library is reported here
            return backend
        except Exception as exc:  # ImportError, a loader error of the binding: say why and try the next one
            reasons.append(f"{each}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    raise NcclUnavailableError(
        "no NCCL binding could be loaded (" + "; ".join(reasons) + "). Install the comm extra: "
        "python -m pip install '.[comm]' in the fi_ffi checkout (nccl4py and nvidia-nccl-cu13), or CuPy with NCCL"
    )


# ---- the communicator -------------------------------------------------------------------------------------------


def open_communicator(name: str, comm: Any, what: str) -> Communicator:
    """``comm`` as an open :class:`Communicator`, for the objects built over one (``what`` names the object).

    Raises:
        TypeError: ``comm`` is not a Communicator (naming ``name`` and how to make one).
        ValueError: it is closed.
    """
    if not isinstance(comm, Communicator):
        raise TypeError(
            f"{name}: expected a fi_ffi.comm.Communicator (Communicator.from_env() on every rank), got "
            f"{type(comm).__name__}"
        )
    if comm.closed:
        raise ValueError(f"{name}: the communicator is closed; make {what} over an open one")
    return comm


class Communicator:
    """One NCCL communicator of this process: ``rank`` of ``world_size``, on CUDA device ``device``.

    Make it with :meth:`from_env` (the usual way: the launcher's variables) or directly from a unique id that the
    ranks already share. Close it with :meth:`close` (or ``with``); closing twice does nothing.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        unique_id: bytes,
        *,
        device: int,
        backend: str | None = None,
        env: DistEnv | None = None,
    ) -> None:
        for name, value in (("rank", rank), ("world_size", world_size), ("device", device)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not 1 <= world_size < 1 << 31:
            raise ValueError(f"world_size: expected 1 <= world_size < 2**31 (NCCL's int), got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        if not 0 <= device < 1 << 31:
            raise ValueError(f"device: expected a CUDA ordinal in [0, 2**31), got {device}")
        if env is not None and not isinstance(env, DistEnv):
            raise TypeError(f"env: expected a fi_ffi.comm.DistEnv (read_env()) or None, got {type(env).__name__}")
        if not isinstance(unique_id, (bytes, bytearray)) or len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"unique_id: expected {UNIQUE_ID_BYTES} bytes (an NCCL unique id), got {unique_id!r:.40}")
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.env = env
        self._backend = load_backend(backend)
        self.backend = self._backend.name
        self._comm: Any = None
        self._stream = 0
        self.watchdog: Watchdog | None = None  # from_env's: the peers' liveness (fi_ffi.comm.watchdog)
        self.aborted = False
        _set_device(device)
        try:
            self._comm = self._backend.init(world_size, bytes(unique_id), rank)
        except Exception as exc:
            raise NcclError(f"ncclCommInitRank (rank {rank} of {world_size}, cuda:{device}) failed: {exc}") from None
        self._stream = _new_stream(device)

    @classmethod
    def from_env(
        cls,
        env: DistEnv | None = None,
        *,
        device: int | None = None,
        backend: str | None = None,
        timeout: float | None = None,
    ) -> Communicator:
        """The communicator of the job described by the launcher's variables (:func:`~fi_ffi.comm.env.read_env`).

        Args:
            env: the job (default: read from ``os.environ``).
            device: the CUDA device (default ``LOCAL_RANK``).
            backend: ``"nccl4py"`` or ``"cupy"`` (default: the first that loads).
            timeout: seconds for the rendezvous (default ``FI_FFI_RENDEZVOUS_TIMEOUT`` or 300).

        The ranks also open their liveness connections (:mod:`fi_ffi.comm.watchdog`): from here on, a rank that
        dies or fails makes every other rank exit with a message naming it instead of waiting forever.
        """
        # every argument checked before NCCL is loaded (loading it is slow, and may fail for its own reasons)
        if env is None:
            env = read_env()
        elif not isinstance(env, DistEnv):
            raise TypeError(
                f"env: expected a fi_ffi.comm.DistEnv (read_env(variables) makes one from a mapping), or None to "
                f"read os.environ; got {type(env).__name__}"
            )
        if device is not None:
            if isinstance(device, bool) or not isinstance(device, int):
                raise TypeError(f"device: expected a CUDA ordinal (int) or None, got {type(device).__name__}")
            if not 0 <= device < 1 << 31:
                raise ValueError(f"device: expected a CUDA ordinal in [0, 2**31), got {device}")
        if backend is not None and (not isinstance(backend, str) or backend not in _BACKENDS):
            raise ValueError(f"backend: expected one of {', '.join(_BACKENDS)} or None, got {backend!r}")
        if timeout is not None:
            from ..launch import checks

            checks.positive_finite("timeout", timeout)
        loaded = load_backend(backend)  # before the rendezvous: a rank without NCCL fails at once, by itself
        unique_id, dog = bootstrap(env, loaded.unique_id() if env.rank == 0 else None, timeout=timeout)
        try:
            comm = cls(
                env.rank,
                env.world_size,
                unique_id,
                device=env.local_rank if device is None else device,
                backend=loaded.name,
                env=env,
            )
        except BaseException as exc:
            if dog is not None:
                dog.fail(f"{type(exc).__name__}: {exc}")
            raise
        comm.watchdog = dog
        return comm

    # ---- collectives on tensors ------------------------------------------------------------------------------

    def all_reduce(self, send: Any, recv: Any = None, *, op: str = "sum", stream: Any = None) -> Any:
        """``recv = reduce(send over ranks)`` (in place when ``recv`` is None); returns ``recv`` (or ``send``).

        ``op``: ``"sum"``, ``"prod"``, ``"max"``, ``"min"``, ``"avg"``.
        """
        if op not in REDUCE_OPS:
            raise ValueError(f"op: expected one of {', '.join(REDUCE_OPS)}, got {op!r}")
        s = self._tensor("send", send)
        r = s if recv is None else self._tensor("recv", recv)
        if r.numel != s.numel or r.dtype != s.dtype:
            raise ValueError(
                f"recv: expected {s.numel} elements of {s.dtype.name} (as send), got {r.numel} of {r.dtype.name}"
            )
        handle = self._stream_of(stream, send)
        self._call(
            "ncclAllReduce",
            self._backend.all_reduce,
            s.data_ptr,
            r.data_ptr,
            s.numel,
            _nccl_type("send", s.dtype),
            REDUCE_OPS[op],
            handle,
        )
        return send if recv is None else recv

    def all_gather(self, send: Any, recv: Any, *, stream: Any = None) -> Any:
        """``recv[i * n:(i + 1) * n] = send of rank i`` (``n`` = ``send``'s element count); returns ``recv``."""
        s = self._tensor("send", send)
        r = self._tensor("recv", recv)
        if r.numel != s.numel * self.world_size or r.dtype != s.dtype:
            raise ValueError(
                f"recv: expected {s.numel * self.world_size} elements of {s.dtype.name} (world_size x send), got "
                f"{r.numel} of {r.dtype.name}"
            )
        handle = self._stream_of(stream, send)
        self._call(
            "ncclAllGather",
            self._backend.all_gather,
            s.data_ptr,
            r.data_ptr,
            s.numel,
            _nccl_type("send", s.dtype),
            handle,
        )
        return recv

    def broadcast(self, buffer: Any, *, root: int = 0, stream: Any = None) -> Any:
        """``buffer = buffer of rank root`` on every rank (in place); returns ``buffer``."""
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.world_size:
            raise ValueError(f"root: expected a rank in [0, {self.world_size}), got {root!r}")
        b = self._tensor("buffer", buffer)
        handle = self._stream_of(stream, buffer)
        self._call(
            "ncclBroadcast",
            self._backend.broadcast,
            b.data_ptr,
            b.data_ptr,
            b.numel,
            _nccl_type("buffer", b.dtype),
            root,
            handle,
        )
        return buffer

    # ---- host helpers (synchronous) --------------------------------------------------------------------------

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (same length on every rank), in rank order; synchronous.

        How IPC handles travel between ranks: staged through device memory of the communicator's GPU.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        n = len(data)
        if n == 0:
            return [b""] * self.world_size
        from . import cuda

        with cuda.DeviceBuffer(self.device, n * (self.world_size + 1)) as staging:
            cuda.copy_to_device(staging.ptr, bytes(data), self._stream)
            self._call(
                "ncclAllGather",
                self._backend.all_gather,
                staging.ptr,
                staging.ptr + n,
                n,
                _NCCL_TYPES["uint8"],
                self._stream,
            )
            gathered = cuda.copy_to_host(staging.ptr + n, n * self.world_size, self._stream)
        return [gathered[i * n : (i + 1) * n] for i in range(self.world_size)]

    def barrier(self) -> None:
        """Return when every rank has called it (an all-reduce of one int on the GPU, then a synchronize)."""
        self.all_gather_bytes(b"\0")

    # ---- lifetime ----------------------------------------------------------------------------------------------

    @property
    def stream(self) -> int:
        """The communicator's own stream (the synchronous helpers and workspace set-up run on it)."""
        return self._stream

    @property
    def closed(self) -> bool:
        return self._comm is None

    def abort(self, reason: str) -> None:
        """This rank will not finish (an exception): tell the peers (they exit, naming this rank and ``reason``,
        instead of waiting in a collective) and drop the communicator without the collective teardown, which
        would wait for them. Later collectives raise; :meth:`close` does nothing more."""
        self.aborted = True
        if self.watchdog is not None:
            self.watchdog.fail(reason)
        self._comm = None

    def close(self) -> None:
        """Destroy the NCCL communicator (after the work queued on it); a second call does nothing."""
        comm, self._comm = self._comm, None
        if self.watchdog is not None:
            self.watchdog.close()  # goodbye: this rank ended normally
        if comm is None:
            return
        _set_device(self.device)
        with contextlib.suppress(Exception):
            self._backend.destroy(comm)
        if self._stream:
            from . import cuda

            cuda.destroy_stream(self._stream)
            self._stream = 0

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"cuda:{self.device}"
        return f"<Communicator rank {self.rank} of {self.world_size}, {self.backend}, {state}>"

    # ---- internals ------------------------------------------------------------------------------------------

    def _tensor(self, name: str, value: Any) -> Any:
        from ..tensor.descriptor import contiguous_strides
        from ..tensor.intake import as_tensor

        if self._comm is None:
            raise ValueError("the communicator is closed")
        t = as_tensor(value, name=name)
        if not t.device.is_cuda or t.device.device_id != self.device:
            raise ValueError(
                f"{name}: expected a tensor on cuda:{self.device} (the communicator's GPU), got {t.device}"
            )
        if t.numel > 1 and t.strides != contiguous_strides(t.shape):
            raise ValueError(f"{name}: expected a contiguous tensor, got shape {t.shape} with strides {t.strides}")
        return t

    def _stream_of(self, stream: Any, first: Any) -> int:
        from ..abi.streams import current_stream
        from ..tensor import intake
        from ..tensor.streams import stream_handle

        if stream is not None:
            handle = stream_handle(stream)
            assert handle is not None
            return handle
        source = intake.stream_source(first)
        return source(self.device) if source is not None else current_stream(self.device)

    def _call(self, what: str, fn: Any, *args: Any) -> None:
        _set_device(self.device)
        try:
            fn(self._comm, *args)
        except Exception as exc:
            raise NcclError(f"{what} (rank {self.rank} of {self.world_size}) failed: {exc}") from None


def _nccl_type(name: str, dtype: DType) -> int:
    found = _NCCL_TYPES.get(dtype.name)
    if found is None:
        raise TypeError(f"{name}: NCCL has no type for {dtype.name}; expected one of {', '.join(_NCCL_TYPES)}")
    return found


def _set_device(device: int) -> None:
    from . import cuda

    cuda.set_device(device)


def _new_stream(device: int) -> int:
    from . import cuda

    return cuda.new_stream(device)


__all__ = [
    "REDUCE_OPS",
    "UNIQUE_ID_BYTES",
    "Communicator",
    "NcclError",
    "NcclUnavailableError",
    "load_backend",
]
