"""vLLM's custom all-reduce (module ``vllm_comm``): FlashInfer's one-shot / two-shot kernels over peer memory.

Low-level entry points, with flashinfer.comm.vllm_ar's names and argument order: :func:`init_custom_ar`,
:func:`register_buffer`, :func:`all_reduce`, :func:`get_graph_buffer_ipc_meta`, :func:`register_graph_buffers`,
:func:`dispose`, :func:`meta_size`. The all-reduce object they create (``fa``, an int) holds the peers' signal
buffers (``meta_size()`` bytes of flags, then scratch for the two-shot kernel) and a table of registered buffers
(``rank_data``, 64 bytes per buffer: 8 peer pointers).

:class:`CustomAllReduce` does the set-up over a :class:`~fi_ffi.comm.nccl.Communicator`: signal buffers and one
staging buffer of ``max_size`` bytes per rank through CUDA IPC (:class:`~fi_ffi.comm.ipc.IpcBuffer`), registered
once; a call copies the input into the staging buffer and reduces into ``out``. Under CUDA-graph capture the
input's own address is recorded and, after capture, :meth:`CustomAllReduce.register_graph_buffers` exchanges the
captured inputs' IPC handles (an all-gather) and registers them, so replays read the inputs in place.

Kernel facts (vllm_custom_all_reduce.cuh): world size 2, 4, 6 or 8; float32, float16, bfloat16; element count a
multiple of 16 bytes' worth (4 floats, 8 halves); at most 36 CTAs. With 2 ranks the one-shot kernel always;
with more, one-shot below 512 KiB (4 ranks) / 256 KiB (8), two-shot above, and nothing at all unless
``full_nvlink``: fi_ffi refuses ``full_nvlink=False`` with more than 2 ranks rather than return unreduced data.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..abi.wire import ARRAY, ARRAY_OF_ARRAYS, BOOL, INT, declare, tensor
from ..dtypes import bfloat16, float16, float32, uint8
from ..launch import checks
from ..launch.launcher import check_tensor, launcher
from ..launch.pointer_rules import PointerRules
from . import control

URI = "vllm_comm"
MAX_CTAS = 36  # kMaxBlocks
RANK_DATA_BYTES = 64  # one RankData: 8 peer pointers
WORLD_SIZES = (2, 4, 6, 8)
MAX_SIZE = (1 << 31) - 16  # bytes: the kernels' element counts are int32 (and so is a uint8 descriptor's size)
MAX_GRAPH_ALL_REDUCES = (1 << 31) // RANK_DATA_BYTES - 2  # the table (one more entry) stays an int32 size
_DTYPES = (float32, float16, bfloat16)

INIT_CUSTOM_AR = declare(
    "init_custom_ar",
    [("fake_ipc_ptrs", ARRAY), tensor("rank_data", output=True), ("rank", INT), ("full_nvlink", BOOL)],
    returns="int",
)
REGISTER_BUFFER = declare("register_buffer", [("fa", INT), ("fake_ipc_ptrs", ARRAY)])
ALL_REDUCE = declare(
    "all_reduce",
    [
        ("fa", INT),
        tensor("inp"),
        tensor("out", output=True),
        ("reg_buffer", INT),
        ("reg_buffer_sz_bytes", INT),
        ("num_ctas", INT),
    ],
)
GET_GRAPH_BUFFER_IPC_META = declare("get_graph_buffer_ipc_meta", [("fa", INT)], returns="Tuple<Array<int>, Array<int>>")
REGISTER_GRAPH_BUFFERS = declare(
    "register_graph_buffers", [("fa", INT), ("handles", ARRAY_OF_ARRAYS), ("offsets", ARRAY_OF_ARRAYS)]
)
DISPOSE = declare("dispose", [("fa", INT)])
META_SIZE = declare("meta_size", [], returns="int")

DECLARATIONS = tuple(
    (URI, d)
    for d in (
        INIT_CUSTOM_AR,
        REGISTER_BUFFER,
        ALL_REDUCE,
        GET_GRAPH_BUFFER_IPC_META,
        REGISTER_GRAPH_BUFFERS,
        DISPOSE,
        META_SIZE,
    )
)


def _handle(name: str, fa: Any) -> int:
    value = checks.integer(name, fa)
    if value == 0:
        raise ValueError(f"{name}: the all-reduce handle is 0 (disposed, or never made by init_custom_ar)")
    if not 0 < value < 1 << 63:
        raise ValueError(f"{name}: expected the handle init_custom_ar returned (an address below 2**63), got {value}")
    return value


def _pointers(name: str, ptrs: Any) -> list[int]:
    if isinstance(ptrs, (str, bytes)) or not hasattr(ptrs, "__len__"):
        raise TypeError(f"{name}: expected a list of device pointers (ints), got {type(ptrs).__name__}")
    out = [checks.integer(f"{name}[{i}]", p) for i, p in enumerate(ptrs)]
    for i, p in enumerate(out):
        if not 0 < p < 1 << 64:
            raise ValueError(f"{name}[{i}]: expected a non-NULL device pointer, got {p}")
    return out


def meta_size() -> int:
    """Bytes of one rank's signal flags (``sizeof(vllm::Signal)``); its signal buffer is this plus scratch."""
    return int(control.call(URI, META_SIZE))


def init_custom_ar(ipc_tensors: Any, rank_data: Any, rank: int, full_nvlink: bool) -> int:
    """Make the all-reduce object; returns its handle ``fa`` (release it with :func:`dispose`).

    Args:
        ipc_tensors: every rank's signal buffer as mapped in this process (rank order), each ``meta_size()`` bytes
            of zeros followed by at least as much scratch as the largest two-shot input.
        rank_data: device bytes (uint8, contiguous, 16-byte aligned) for the registered-buffer table: 64 bytes
            per registered buffer and per captured all-reduce.
        rank: this rank, ``0 <= rank < len(ipc_tensors)``.
        full_nvlink: every pair of GPUs is NVLink-connected (required with more than 2 ranks).
    """
    ptrs = _pointers("ipc_tensors", ipc_tensors)
    if len(ptrs) not in WORLD_SIZES:
        raise ValueError(f"ipc_tensors: expected one pointer per rank, 2, 4, 6 or 8 ranks; got {len(ptrs)}")
    rank = checks.integer("rank", rank)
    if not 0 <= rank < len(ptrs):
        raise ValueError(f"rank: expected 0 <= rank < {len(ptrs)} (the world size), got {rank}")
    full_nvlink = checks.flag("full_nvlink", full_nvlink)
    if not full_nvlink and len(ptrs) > 2:
        raise ValueError(
            f"full_nvlink: the kernels reduce nothing with {len(ptrs)} ranks unless every pair of GPUs is "
            "NVLink-connected; use NCCL on this machine"
        )
    t = checks.tensor("rank_data", rank_data)
    check_tensor("rank_data", t, output=True)  # NULL, or a range past the end of the address space
    checks.cuda("rank_data", t)
    checks.contiguous("rank_data", t)
    if t.dtype != uint8 or t.numel < RANK_DATA_BYTES:
        raise ValueError(
            f"rank_data: expected at least {RANK_DATA_BYTES} bytes as uint8, got {t.numel} of {t.dtype.name}"
        )
    if t.data_ptr % 16:
        raise ValueError(f"rank_data: data pointer 0x{t.data_ptr:x} must be aligned to 16 bytes")
    return int(control.call(URI, INIT_CUSTOM_AR, ptrs, t, rank, full_nvlink))


def register_buffer(fa: int, fake_ipc_ptrs: Any) -> None:
    """Register one IPC buffer (every rank's address of it, rank order) as an all-reduce input."""
    control.call(URI, REGISTER_BUFFER, _handle("fa", fa), _pointers("fake_ipc_ptrs", fake_ipc_ptrs))


def get_graph_buffer_ipc_meta(fa: int) -> tuple[list[int], list[int]]:
    """The inputs recorded during CUDA-graph capture: (their IPC handles' bytes, 64 per input, as ints; each
    input's offset in its allocation)."""
    handles, offsets = control.call(URI, GET_GRAPH_BUFFER_IPC_META, _handle("fa", fa))
    return list(handles), list(offsets)


def register_graph_buffers(fa: int, handles: Any, offsets: Any) -> None:
    """Register the captured inputs of every rank (``handles[r]``, ``offsets[r]``: rank r's
    :func:`get_graph_buffer_ipc_meta`)."""
    fa = _handle("fa", fa)
    if len(handles) != len(offsets):
        raise ValueError(f"offsets: expected one list per rank ({len(handles)}, as handles), got {len(offsets)}")
    counts = {len(o) for o in offsets}
    if len(counts) > 1 or any(len(h) != 64 * len(o) for h, o in zip(handles, offsets, strict=True)):
        raise ValueError(
            "handles/offsets: every rank must have captured the same number of all-reduces (64 handle bytes and "
            "one offset each); were the graphs captured alike on every rank?"
        )
    control.call(URI, REGISTER_GRAPH_BUFFERS, fa, handles, offsets)


def dispose(fa: int) -> None:
    """Free the all-reduce object (it closes the IPC mappings it opened for graph buffers)."""
    control.call(URI, DISPOSE, _handle("fa", fa))


def all_reduce(
    fa: int, inp: Any, out: Any, reg_buffer: int, reg_buffer_sz_bytes: int, num_ctas: int, *, stream: Any = None
) -> Any:
    """``out = sum over ranks of inp`` (out of place), asynchronous on ``stream``.

    Args:
        fa: the handle from :func:`init_custom_ar`.
        inp: float32/float16/bfloat16 on a CUDA device, contiguous, 16-byte aligned; element count a multiple of
            ``16 / itemsize``. Registered (or being captured) when ``reg_buffer`` is 0.
        out: same dtype, element count and device; contiguous, 16-byte aligned.
        reg_buffer: 0, or a registered buffer of this rank that ``inp`` is first copied into.
        reg_buffer_sz_bytes: its size (``inp``'s bytes must fit).
        num_ctas: CTAs, 1..36.

    Returns:
        ``out``.
    """
    _all_reduce(_handle("fa", fa), inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, stream=stream)
    return out


def _check_all_reduce(a: SimpleNamespace) -> PointerRules:
    x, o = a.inp, a.out
    for name, t in (("inp", x), ("out", o)):
        checks.dtype_in(name, t, _DTYPES)
        checks.cuda(name, t)
        checks.contiguous(name, t)
    checks.same_dtype("out", o, "inp", x)
    if o.numel != x.numel:
        raise ValueError(f"out: expected {x.numel} elements (as inp), got {o.numel}")
    vec = 16 // x.dtype.itemsize
    if x.numel % vec:
        raise ValueError(
            f"inp: the element count must be a multiple of {vec} (16 bytes of {x.dtype.name}), got {x.numel}"
        )
    if a.fa == 0:
        raise ValueError("fa: the all-reduce handle is 0 (disposed, or never made by init_custom_ar)")
    if not 1 <= a.num_ctas <= MAX_CTAS:
        raise ValueError(f"num_ctas: expected 1..{MAX_CTAS}, got {a.num_ctas}")
    if a.reg_buffer < 0 or a.reg_buffer_sz_bytes < 0:
        raise ValueError("reg_buffer, reg_buffer_sz_bytes: expected a device pointer (or 0) and a size >= 0")
    if a.reg_buffer and x.numel * x.dtype.itemsize > a.reg_buffer_sz_bytes:
        raise ValueError(
            f"inp: {x.numel * x.dtype.itemsize} bytes do not fit the registered buffer ({a.reg_buffer_sz_bytes} bytes)"
        )
    rules = PointerRules({"inp": 16, "out": 16})
    if not a.reg_buffer:  # the peers read inp in place while this rank writes out
        rules.disjoint("out", "inp")
    return rules


_all_reduce = launcher(ALL_REDUCE, URI, _check_all_reduce)


class CustomAllReduce:
    """vLLM's custom all-reduce over a communicator's ranks (one host, 2/4/6/8 GPUs with peer access).

    Args:
        comm: the :class:`~fi_ffi.comm.nccl.Communicator` (its GPU, rank and world size).
        max_size: the largest input in bytes (default 8 MiB: the kernels are for small messages; NCCL wins above).
        full_nvlink: every GPU pair is NVLink-connected (required with more than 2 ranks).
        max_graph_all_reduces: table room for all-reduces captured in CUDA graphs (64 bytes each).
        num_ctas: CTAs per call (1..36).

    Every rank must make it at the same point (it exchanges IPC handles). :meth:`close` (or ``with``) disposes
    of the object and releases the IPC buffers, once.
    """

    def __init__(
        self,
        comm: Any,
        max_size: int = 8 << 20,
        *,
        full_nvlink: bool = True,
        max_graph_all_reduces: int = 4096,
        num_ctas: int = MAX_CTAS,
    ) -> None:
        from ..tensor.descriptor import Tensor
        from . import cuda
        from .ipc import IpcBuffer
        from .nccl import open_communicator

        comm = open_communicator("comm", comm, "a CustomAllReduce")
        max_size = checks.integer("max_size", max_size, 16)
        if max_size % 16 or max_size > MAX_SIZE:
            raise ValueError(
                f"max_size: expected a multiple of 16 bytes up to {MAX_SIZE} (the kernels count elements in int32; "
                f"NCCL serves larger messages), got {max_size}"
            )
        full_nvlink = checks.flag("full_nvlink", full_nvlink)
        if comm.world_size not in WORLD_SIZES:
            raise ValueError(f"comm: the custom all-reduce runs on 2, 4, 6 or 8 ranks, this one has {comm.world_size}")
        if comm.env is not None and not comm.env.single_host:
            raise ValueError("comm: the custom all-reduce needs every rank on one host (CUDA IPC); use NCCL")
        if not full_nvlink and comm.world_size > 2:
            raise ValueError("full_nvlink: required with more than 2 ranks (the kernels reduce nothing otherwise)")
        self.num_ctas = checks.integer("num_ctas", num_ctas, 1)
        if self.num_ctas > MAX_CTAS:
            raise ValueError(f"num_ctas: expected 1..{MAX_CTAS}, got {num_ctas}")
        graphs = checks.integer("max_graph_all_reduces", max_graph_all_reduces, 0)
        if graphs > MAX_GRAPH_ALL_REDUCES:
            raise ValueError(
                f"max_graph_all_reduces: expected at most {MAX_GRAPH_ALL_REDUCES} (the table of {RANK_DATA_BYTES} "
                f"bytes each is described with an int32 size), got {graphs}"
            )
        self.comm = comm
        self.max_size = max_size
        self.fa = 0
        self._parts: list[Any] = []
        try:
            self._signals = IpcBuffer(comm, meta_size() + max_size)  # flags (zero) + two-shot scratch
            self._parts.append(self._signals)
            self._staging = IpcBuffer(comm, max_size, zero=False)
            self._parts.append(self._staging)
            table = cuda.DeviceBuffer(comm.device, RANK_DATA_BYTES * (graphs + 1))
            self._parts.append(table)
            rank_data = Tensor.from_pointer(table.ptr, (table.nbytes,), "uint8", device=comm.device)
            self.fa = init_custom_ar(self._signals.ptrs, rank_data, comm.rank, full_nvlink)
            register_buffer(self.fa, self._staging.ptrs)
            comm.barrier()  # no rank may signal a peer whose flags are not zeroed yet
        except BaseException:
            self._release(barrier=False)
            raise

    def all_reduce(self, inp: Any, out: Any, *, registered: bool = False, stream: Any = None) -> Any:
        """``out = sum over ranks of inp``, asynchronous on ``stream``; returns ``out``.

        ``registered=False`` (the default) copies ``inp`` into the staging buffer first (any memory). With
        ``registered=True`` the kernel reads ``inp`` in place: use it inside CUDA-graph capture (then call
        :meth:`register_graph_buffers` once after capture, on every rank), where ``inp`` must be ``cudaMalloc``
        memory (torch's and CuPy's default allocators are).
        """
        self._open()
        registered = checks.flag("registered", registered)
        from ..tensor.intake import as_tensor

        t = as_tensor(inp, name="inp")  # a descriptor is returned as is
        nbytes = t.numel * t.dtype.itemsize
        if nbytes > self.max_size:
            raise ValueError(f"inp: {nbytes} bytes exceed max_size ({self.max_size}); use NCCL for larger inputs")
        if t.device.is_cuda and t.device.device_id != self.comm.device:
            raise ValueError(f"inp: expected a tensor on cuda:{self.comm.device}, got {t.device}")
        reg, size = (0, 0) if registered else (self._staging.ptr, self.max_size)
        _all_reduce(self.fa, inp, out, reg, size, self.num_ctas, stream=stream)
        return out

    def register_graph_buffers(self) -> int:
        """After CUDA-graph capture, on every rank: exchange and register the captured inputs; returns how many."""
        import struct

        self._open()
        handles, offsets = get_graph_buffer_ipc_meta(self.fa)
        count = len(offsets)
        counts = self.comm.all_gather_bytes(struct.pack("<q", count))
        if len(set(counts)) != 1:
            raise ValueError(
                f"every rank must capture the same all-reduces; counts per rank: "
                f"{[struct.unpack('<q', c)[0] for c in counts]}"
            )
        if count == 0:
            return 0
        mine = bytes(b & 0xFF for b in handles) + struct.pack(f"<{count}q", *offsets)
        gathered = self.comm.all_gather_bytes(mine)
        all_handles = [list(g[: 64 * count]) for g in gathered]
        all_offsets = [list(struct.unpack(f"<{count}q", g[64 * count :])) for g in gathered]
        register_graph_buffers(self.fa, all_handles, all_offsets)
        return count

    @property
    def closed(self) -> bool:
        return not self.fa

    def _open(self) -> None:
        if not self.fa:
            raise ValueError(
                "CustomAllReduce: this object is closed (close() or its with block ended); make a new "
                "CustomAllReduce(comm, ...) on every rank"
            )

    def close(self) -> None:
        """Dispose of the object and release the IPC buffers (after every rank got here); once."""
        if not self.fa and not self._parts:
            return
        self._release(barrier=not self.comm.closed)

    def _release(self, *, barrier: bool) -> None:
        from .ipc import close_parts

        fa, self.fa = self.fa, 0
        if barrier:
            self.comm.barrier()
        if fa:
            dispose(fa)
        parts, self._parts = self._parts, []
        close_parts(parts)

    def __enter__(self) -> CustomAllReduce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DECLARATIONS",
    "CustomAllReduce",
    "all_reduce",
    "dispose",
    "get_graph_buffer_ipc_meta",
    "init_custom_ar",
    "meta_size",
    "register_buffer",
    "register_graph_buffers",
]
