"""Device memory shared by every rank of a communicator on one host, through CUDA IPC.

Each rank allocates ``nbytes`` with ``cudaMalloc``, takes its 64-byte ``cudaIpcGetMemHandle``, and the handles
travel to every rank with one NCCL all-gather of bytes (:meth:`~fi_ffi.comm.nccl.Communicator.all_gather_bytes`);
each rank opens the others' (``cudaIpcOpenMemHandle``). ``ptrs[r]`` is then rank ``r``'s buffer as mapped in this
process. :meth:`IpcBuffer.close` waits for every rank (a barrier, so no peer still reads), closes the peers'
mappings and frees its own memory, exactly once. Legacy IPC handles work between processes of one host only:
the kernels that use these buffers are single-host, and no multicast object is made.
"""

from __future__ import annotations

from typing import Any

from . import cuda


class IpcBuffer:
    """``nbytes`` of device memory on every rank, each rank's mapped into this process (``ptrs``, rank order).

    Args:
        comm: the communicator (its device holds this rank's buffer).
        nbytes: bytes per rank, > 0.
        zero: fill this rank's buffer with zeros before the handles are exchanged (kernels' flags start at 0).
    """

    def __init__(self, comm: Any, nbytes: int, *, zero: bool = True) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes: expected an int > 0, got {nbytes!r}")
        self.comm = comm
        self.nbytes = nbytes
        self.rank = comm.rank
        self.ptrs: list[int] = []
        self._own = cuda.DeviceBuffer(comm.device, nbytes)
        try:
            if zero:
                cuda.memset(self._own.ptr, 0, nbytes, comm.stream)
                cuda.synchronize(comm.stream)
            handles = comm.all_gather_bytes(cuda.ipc_handle(self._own.ptr))
            for r, handle in enumerate(handles):
                self.ptrs.append(self._own.ptr if r == self.rank else cuda.ipc_open(handle))
        except BaseException:
            self._release()
            raise

    @property
    def ptr(self) -> int:
        """This rank's own buffer."""
        return self._own.ptr

    @property
    def closed(self) -> bool:
        return not self._own.ptr

    def close(self, *, barrier: bool = True) -> None:
        """Wait for every rank (``barrier``), unmap the peers' buffers, free this rank's; a second call does
        nothing."""
        if self.closed:
            return
        if barrier and not self.comm.closed:
            self.comm.barrier()
        self._release()

    def _release(self) -> None:
        ptrs, self.ptrs = self.ptrs, []
        cuda.set_device(self.comm.device)
        for r, ptr in enumerate(ptrs):
            if r != self.rank and ptr:
                cuda.ipc_close(ptr)
        self._own.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes x {len(self.ptrs)} ranks"
        return f"<IpcBuffer rank {self.rank}, {state}>"


def close_parts(parts: list[Any]) -> None:
    """Close ``parts`` (:class:`IpcBuffer` and :class:`~fi_ffi.comm.cuda.DeviceBuffer` objects), the last made
    first, without another barrier: the owner that releases them has already waited for every rank."""
    for part in reversed(parts):
        if isinstance(part, IpcBuffer):
            part.close(barrier=False)
        else:
            part.close()


__all__ = ["IpcBuffer"]
