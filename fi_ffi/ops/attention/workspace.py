"""The caller's attention workspaces: a float and an int buffer on the GPU, and a page-locked host buffer.

Batch prefill and batch decode ``plan`` calls compute a schedule on the host, write it into the
page-locked buffer and enqueue an asynchronous copy of it into the int workspace (``cudaMemcpyAsync`` on
the plan's stream, never synchronized). ``run`` calls read the schedule from the int workspace and keep
split-KV partial results in the float workspace. So a plan and the runs that use it must share one
:class:`Workspace` (a :class:`~fi_ffi.ops.attention.plan.Plan` carries its workspace, so they always do) and be issued
on one stream.

Sizes (FlashInfer 0.6.3 defaults, ``flashinfer/decode.py`` and ``flashinfer/prefill.py`` wrappers):

- float workspace: 128 MiB (:data:`FLOAT_BYTES`; the size the upstream docs recommend),
- int workspace: 8 MiB (:data:`INT_BYTES`),
- page-locked host buffer: 8 MiB (:data:`PINNED_BYTES`); it must be at least as large as the int workspace
  because plan stages the whole int-workspace image in it.

Two rules make back-to-back plans safe:

- **Pinned buffer reuse.** A second plan must not overwrite the page-locked buffer before the first plan's
  copy has read it. Each plan records one CUDA event on its stream right after the plan call; the next plan
  on the same workspace first waits for that event only (``cudaEventQuery``, and ``cudaEventSynchronize``
  if it is still pending). This is the single place fi_ffi waits on the GPU, and it never waits for kernels
  enqueued after that copy. An event was chosen over rotating pinned buffers because the int workspace is
  single-buffered anyway (each plan overwrites it), so rotating would save nothing but the rare wait.
- **One live schedule per workspace.** Each plan overwrites the int workspace, so an earlier plan on the same
  workspace becomes stale; running it is a ValueError, not a wrong answer (a generation counter).

Both rules live in one place, :meth:`Workspace.staging`: every op that writes the int workspace (the attention
plans, MLA plans, segment GEMM's argument arrays) does so inside ``with workspace.staging(stream) as stage:``, and
the prepared segment GEMM copies its arrays from the page-locked buffer into its own device buffer inside
``workspace.staging(stream, into_int_buffer=False)`` (the first rule only).

:meth:`Workspace.allocate` allocates the three buffers with ``cuda.bindings`` (``cudaMalloc``,
``cudaMallocHost``; the float buffer is zeroed once, as upstream asks) and frees them on :meth:`close` or at
context exit. :meth:`Workspace.from_buffers` wraps buffers the caller owns. A failing CUDA runtime call raises
:class:`~fi_ffi.errors.CudaError` (through :func:`fi_ffi.cuda.runtime.check`).
"""

from __future__ import annotations

import threading
from typing import Any

from ...cuda import device as cuda_device
from ...cuda import driver
from ...cuda import runtime as cuda_runtime
from ...cuda.runtime import DeviceScope
from ...cuda.runtime import check as _check  # CUDA runtime results: values, or the one CudaError
from ...cuda.runtime import runtime as _rt  # cuda.bindings.runtime, imported on first use
from ...dtypes import Device
from ...launch import checks
from ...launch.aliasing import disjoint
from ...launch.registry import op
from ...tensor.descriptor import Tensor
from ...tensor.protocols import TensorLike

FLOAT_BYTES = 128 << 20
INT_BYTES = 8 << 20
PINNED_BYTES = 8 << 20
TMP_BYTES = 32 << 20  # single prefill/decode scratch (``tmp``) that upstream caches per device
_INT32_END = 1 << 31  # the kernels take each buffer's element count as an int32
_PTR_END = 1 << 64

__all__ = ["FLOAT_BYTES", "INT_BYTES", "PINNED_BYTES", "TMP_BYTES", "Staging", "Workspace"]


# The two calls of every plan (query and record the plan-copy event) go straight to the CUDA driver
# (fi_ffi.cuda.driver): through cuda.bindings each costs a few microseconds. The event itself is created and destroyed
# with cuda.bindings (once per workspace); a runtime event is a driver event.


def _driver() -> Any:
    """libcuda for the event calls; a CudaError where it cannot be used."""
    lib = driver.load()
    if lib is None:
        raise cuda_runtime.no_driver("cuEventRecord")
    return lib


def _driver_error(err: int, what: str) -> None:
    raise cuda_runtime.driver_error(err, what)


def _bytes_of(t: Tensor) -> int:
    return t.shape[0] * t.dtype.itemsize


@op()
class Workspace:
    """The three buffers that batch attention plans and runs share, plus the plan-copy bookkeeping.

    Attributes:
        float_buffer: 1-D contiguous device buffer (any dtype; its size in bytes is what counts; fewer than
            2**31 elements, the kernels' int32 sizes, and an address range inside the address space).
        int_buffer: 1-D contiguous device buffer on the same device.
        pinned_buffer: 1-D contiguous host buffer (page-locked for asynchronous copies), at least as large as
            ``int_buffer``.
        device: the CUDA device of the two device buffers.
        float_bytes, int_bytes, pinned_bytes: their sizes in bytes.

    One workspace serves one stream of plan/run calls at a time. Use a workspace per concurrent stream.

    Raises:
        TypeError / ValueError: a buffer that is not a uint8 tensor of the device and size asked (named);
            CudaError: :meth:`allocate` could not allocate the buffers.
    """

    __slots__ = (
        "__weakref__",
        "_event",
        "_event_handle",
        "_event_pending",
        "_generation",
        "_lock",
        "_owned",
        "device",
        "float_buffer",
        "float_bytes",
        "int_buffer",
        "int_bytes",
        "pinned_buffer",
        "pinned_bytes",
    )

    def __init__(self, float_buffer: TensorLike, int_buffer: TensorLike, pinned_buffer: TensorLike) -> None:
        """Wrap caller-owned buffers (see :meth:`from_buffers`); nothing is allocated or copied."""
        f = checks.tensor("float_buffer", float_buffer)
        i = checks.tensor("int_buffer", int_buffer)
        p = checks.tensor("pinned_buffer", pinned_buffer)
        for name, t in (("float_buffer", f), ("int_buffer", i), ("pinned_buffer", p)):
            checks.ndim(name, t, 1, "[bytes]")
            checks.contiguous(name, t)
            if t.numel == 0:
                raise ValueError(f"{name}: expected a non-empty buffer, got shape {t.shape}")
            if not t.data_ptr:  # plans and kernels would write there: address 0 takes the CUDA context down
                raise ValueError(
                    f"{name}: data pointer is NULL; pass the address of a buffer you allocated (or use "
                    f"Workspace.allocate)"
                )
            if t.shape[0] >= _INT32_END:
                raise ValueError(
                    f"{name}: {t.shape[0]} elements do not fit the kernels' int32 sizes; describe the buffer "
                    f"with a wider dtype (its size in bytes is what counts) or use a smaller one"
                )
            if t.data_ptr + _bytes_of(t) > _PTR_END:
                raise ValueError(
                    f"{name}: the buffer 0x{t.data_ptr:x} + {_bytes_of(t)} bytes wraps past the end of the "
                    f"address space; pass the address and size of memory you allocated"
                )
        checks.cuda("float_buffer", f)
        checks.cuda("int_buffer", i)
        checks.same_device("int_buffer", i, "float_buffer", f)
        checks.host("pinned_buffer", p)
        # the plans write the int buffer while the kernels use the float buffer as scratch
        disjoint("int_buffer", i, "float_buffer", f)
        if _bytes_of(p) < _bytes_of(i):
            raise ValueError(
                f"pinned_buffer: expected at least {_bytes_of(i)} bytes (the int_buffer's size), got {_bytes_of(p)}"
            )
        self.float_buffer = f
        self.int_buffer = i
        self.pinned_buffer = p
        self.device: Device = f.device
        self.float_bytes = _bytes_of(f)
        self.int_bytes = _bytes_of(i)
        self.pinned_bytes = _bytes_of(p)
        self._owned: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._generation = 0
        self._event: Any = None
        self._event_handle = 0  # int(self._event): the CUevent the driver calls take
        self._event_pending = False

    @classmethod
    def from_buffers(cls, float_buffer: TensorLike, int_buffer: TensorLike, pinned_buffer: TensorLike) -> Workspace:
        """Wrap caller-owned buffers: descriptors or DLPack/CUDA-array-interface producers (torch, CuPy).

        Args:
            float_buffer: 1-D ``[bytes]`` contiguous, on the CUDA device (any dtype; its size in bytes counts),
                :data:`FLOAT_BYTES` recommended.
            int_buffer: 1-D ``[bytes]`` contiguous, on the same device, :data:`INT_BYTES` recommended.
            pinned_buffer: 1-D ``[bytes]`` contiguous page-locked host memory, at least as large as ``int_buffer``.

        The caller keeps them alive and frees them; :meth:`close` frees nothing here.
        """
        return cls(float_buffer, int_buffer, pinned_buffer)

    @classmethod
    def allocate(
        cls,
        device: int = 0,
        *,
        float_bytes: int = FLOAT_BYTES,
        int_bytes: int = INT_BYTES,
        pinned_bytes: int | None = None,
    ) -> Workspace:
        """Allocate the three buffers on CUDA device ``device`` with ``cuda.bindings`` (synchronous, once).

        ``pinned_bytes`` defaults to ``int_bytes``. The float buffer is zeroed (``cudaMemset``). Free them with
        :meth:`close` or by using the workspace as a context manager.
        """
        float_bytes = checks.integer("float_bytes", float_bytes, 1)
        int_bytes = checks.integer("int_bytes", int_bytes, 1)
        pinned_bytes = int_bytes if pinned_bytes is None else checks.integer("pinned_bytes", pinned_bytes, 1)
        device = checks.integer("device", device, 0)
        for name, size in (("float_bytes", float_bytes), ("int_bytes", int_bytes), ("pinned_bytes", pinned_bytes)):
            if size >= _INT32_END:  # described as uint8 buffers below
                raise ValueError(f"{name}: expected fewer than 2**31 bytes (the kernels' int32 sizes), got {size}")
        if device >= _INT32_END:
            raise ValueError(f"device: expected a CUDA device ordinal < 2**31, got {device}")
        if pinned_bytes < int_bytes:
            raise ValueError(f"pinned_bytes: expected at least int_bytes ({int_bytes}), got {pinned_bytes}")
        rt = _rt()
        owned: list[tuple[str, int]] = []
        try:
            with DeviceScope(device):
                err, fptr = rt.cudaMalloc(float_bytes)
                _check(err, "cudaMalloc")
                owned.append(("device", int(fptr)))
                _check(rt.cudaMemset(fptr, 0, float_bytes)[0], "cudaMemset")
                err, iptr = rt.cudaMalloc(int_bytes)
                _check(err, "cudaMalloc")
                owned.append(("device", int(iptr)))
                err, pptr = rt.cudaMallocHost(pinned_bytes)
                _check(err, "cudaMallocHost")
                owned.append(("host", int(pptr)))
                _check(rt.cudaDeviceSynchronize()[0], "cudaDeviceSynchronize")  # the memset, once, at allocation
        except BaseException:
            _free(owned, device)
            raise
        ws = cls(
            Tensor(int(fptr), (float_bytes,), "uint8", device),
            Tensor(int(iptr), (int_bytes,), "uint8", device),
            Tensor(int(pptr), (pinned_bytes,), "uint8", "cpu"),
        )
        ws._owned = owned
        return ws

    @property
    def owns_memory(self) -> bool:
        """True while this workspace holds buffers it allocated (``allocate``) and has not freed them."""
        return bool(self._owned)

    def close(self) -> None:
        """Free what :meth:`allocate` allocated (idempotent). Waits for the last plan copy first.

        The caller must not close a workspace while kernels that use it may still run: freeing device memory
        with ``cudaFree`` synchronizes the device anyway.
        """
        with self._lock:
            owned, self._owned = self._owned, []
            event, self._event, self._event_handle = self._event, None, 0
            self._event_pending = False
            self._generation += 1  # every plan made on it is now stale
        if event is not None:
            rt = _rt()
            rt.cudaEventSynchronize(event)
            rt.cudaEventDestroy(event)
        if owned:
            _free(owned, self.device.device_id)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._owned or self._event is not None:
                self.close()
        except Exception:  # interpreter shutdown: the driver may be gone
            pass

    def __repr__(self) -> str:
        own = "owned" if self._owned else "borrowed"
        return (
            f"<Workspace {self.device} float {self.float_bytes} B, int {self.int_bytes} B, "
            f"pinned {self.pinned_bytes} B, {own}>"
        )

    # -------------------------------------------------------------------------------------- plan bookkeeping

    def staging(self, stream: int, *, into_int_buffer: bool = True) -> Staging:
        """The one way to write the int workspace: ``with workspace.staging(stream) as stage: ...``.

        On entry, in this order: take the workspace's lock (a second staging, from any thread, waits here until
        the first has left its block); wait for the previous staging's pinned-to-device copy only (its event;
        nothing enqueued after it), so the block may overwrite the page-locked buffer; bump the generation, so
        every plan made before is stale from here on (even if the block fails: the int workspace may be half
        written). ``stage.generation`` is the new generation (what a plan made in the block records).

        Inside the block the caller writes the page-locked buffer and enqueues its copy into the int workspace
        on ``stream`` (a plan call does both), then, while still holding the lock, may launch what reads the int
        workspace (so no other staging can overwrite it before that launch is enqueued).

        On leaving the block without an exception the copy's event is recorded on ``stream`` (the next staging
        waits for it), unless the block recorded it earlier with ``stage.record(...)`` (to keep a launch made
        in the block out of what the next staging waits for, or on a stream known only after the call). On an
        exception no event is recorded (no copy is assumed enqueued); the lock is released either way.

        Args:
            stream: the CUDA stream handle (int; 0 is the legacy default stream) the copy is enqueued on.
            into_int_buffer: False where the block copies the page-locked buffer into memory of the caller's, not
                the int workspace (a prepared segment GEMM's argument buffer): the int workspace keeps its schedule,
                so the generation is not bumped and earlier plans stay valid; the lock and the wait are the same.
        """
        return Staging(self, stream, bump=into_int_buffer)

    def _wait_previous_plan_copy(self) -> None:
        """Block until the previous plan's pinned-to-device copy has read the pinned buffer (caller holds lock)."""
        if not self._event_pending:
            return
        cu = _driver()
        err = cu.cuEventQuery(self._event_handle)
        if err:  # usually done already: the copy is tiny and was enqueued earlier
            if err == driver.ERROR_NOT_READY:
                err = cu.cuEventSynchronize(self._event_handle)
            if err:
                _driver_error(err, "cuEventSynchronize(previous plan copy)")
        self._event_pending = False

    def _record_plan_copy(self, stream: int) -> None:
        """Record the event after a plan call on ``stream`` (caller holds lock)."""
        if self._event is None:
            rt = _rt()
            with DeviceScope(self.device.device_id):
                err, event = rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)
                _check(err, "cudaEventCreateWithFlags")
            self._event = event
            self._event_handle = int(event)
        # The plan call has just run on this thread, so the device's context is current (as cudaEventRecord
        # would make it); stream 0 is the legacy default stream in both APIs.
        err = _driver().cuEventRecord(self._event_handle, stream)
        if err:
            _driver_error(err, "cuEventRecord(plan copy)")
        self._event_pending = True


class Staging:
    """One staging of a :class:`Workspace` (see :meth:`Workspace.staging`): a context manager.

    Attributes:
        workspace: the workspace staged.
        stream: the stream handle its copy event is recorded on at exit.
        generation: the workspace generation this staging made (valid inside the block and after it; the one
            before it where the staging does not write the int workspace).
    """

    __slots__ = ("_bump", "_recorded", "generation", "stream", "workspace")

    def __init__(self, workspace: Workspace, stream: int, bump: bool = True) -> None:
        self.workspace = workspace
        self.stream = stream
        self.generation = 0
        self._recorded = False
        self._bump = bump  # False: the block leaves the int workspace alone (Workspace.staging's into_int_buffer)

    def __enter__(self) -> Staging:
        ws = self.workspace
        ws._lock.acquire()
        try:
            ws._wait_previous_plan_copy()
        except BaseException:
            ws._lock.release()
            raise
        if self._bump:
            ws._generation += 1  # from here on the int workspace may hold a new schedule: earlier plans are stale
        self.generation = ws._generation
        return self

    def record(self, stream: int | None = None) -> None:
        """Record the copy's event now, on ``stream`` (default: the staging's stream), not at exit."""
        if stream is not None:
            self.stream = stream
        self.workspace._record_plan_copy(self.stream)
        self._recorded = True

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and not self._recorded:
                self.record()
        finally:
            self.workspace._lock.release()


def _free(owned: list[tuple[str, int]], device_id: int) -> None:
    rt = _rt()
    with DeviceScope(device_id):
        for kind, ptr in owned:
            if kind == "device":
                rt.cudaFree(ptr)
            else:
                rt.cudaFreeHost(ptr)


def current_stream(device: Device) -> int:
    """TVM-FFI's current stream of ``device`` on this thread (0: the legacy default stream)."""
    from ...abi.streams import current_stream as current

    return current(device.device_id)


def tmp_bytes_needed(
    device_id: int,
    kv_len: int,
    qo_len: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim_vo: int,
    o_itemsize: int,
    prefill: bool,
) -> int | None:
    """An upper bound on the scratch the single prefill/decode kernels may use when they split the KV.

    Both launchers split the KV into at most ``ceil(kv_len / 256)`` chunks, and into no more chunks than the
    device's resident CTAs allow (per KV head and query tile; prefill query tiles are >= 16 rows), and then use
    ``chunks * qo_len * num_qo_heads * (head_dim_vo * sizeof(o) + 4)`` bytes of ``tmp``. None: unknown (no
    device to ask).
    """
    found = cuda_device.known_properties(device_id)  # read once per device, in fi_ffi.cuda.device
    if found is None:
        return None
    blocks = found.max_resident_blocks
    if kv_len <= 256:
        return 0
    chunks = -(-kv_len // 256)
    if prefill:  # splits only into >= 2 chunks
        tiles = -(-(qo_len * (num_qo_heads // num_kv_heads)) // 16)
        chunks = min(chunks, blocks // (num_kv_heads * tiles))
        if chunks <= 1:
            return 0
    else:  # the decode launcher uses tmp whenever kv_len > 256, even for a single chunk
        chunks = max(1, min(chunks, blocks // num_kv_heads))
    return chunks * qo_len * num_qo_heads * (head_dim_vo * o_itemsize + 4)
