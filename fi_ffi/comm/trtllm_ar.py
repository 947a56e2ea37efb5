"""TensorRT-LLM's all-reduce kernels (module ``trtllm_comm``): the fused all-reduce (+ residual add, + RMSNorm,
+ FP8 quantization), the MoE reduction / finalize fusions, the older custom all-reduce, and Lamport buffer set-up.

Names and argument order follow flashinfer.comm.trtllm_ar: :func:`trtllm_allreduce_fusion`,
:func:`trtllm_moe_allreduce_fusion`, :func:`trtllm_moe_finalize_allreduce_fusion`,
:func:`trtllm_custom_all_reduce`, :func:`trtllm_lamport_initialize`, :func:`trtllm_lamport_initialize_all`, and the
code enums :class:`AllReduceFusionPattern`, :class:`QuantizationSFLayout`, :class:`AllReduceStrategyType`,
:class:`AllReduceStrategyConfig`, :class:`AllReduceFusionOp`.

The fusion kernels read a **workspace**: a device array of ``3 * world_size + 1`` pointers (every rank's
two-shot buffer, every rank's barrier flags, every rank's triple Lamport buffer, then this rank's 5 int32
counters ``[0, 0, 0, lamport_comm_size, 0]``). :class:`AllReduceFusionWorkspace` makes it over a communicator
(CUDA IPC; one host) for at most ``max_token_num`` tokens of ``hidden_dim``; its :class:`WorkspaceMetadata` is
what the checks compare each call against (world size, capacity, float32 vs 16-bit Lamport buffers), so a call
the workspace cannot hold is refused before the FFI. One call at a time per workspace (its counters are state).

FP4 outputs (patterns 3 and 5, the MoE reduction's quantized output) need swizzled scale layouts fi_ffi does not
describe yet: they are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..abi.wire import (
    BOOL,
    DATA_TYPE,
    FLOAT,
    INT,
    OPT_FLOAT,
    OPT_INT,
    declare,
    optional_tensor,
    tensor,
    tensors,
)
from ..dtypes import DType, bfloat16, float8_e4m3fn, float16, float32, int32, int64
from ..launch import checks
from ..launch.launcher import check_tensor, launcher
from ..launch.pointer_rules import PointerRules
from . import control

URI = "trtllm_comm"
FUSION_WORLD_SIZES = (2, 4, 8, 16)
BARRIER_FLAG_COUNT = 256
MAX_COMM_SIZE = 2147483647 & ~((1 << 21) - 1)  # int32 max rounded down to 2 MiB: the kernels' byte offsets
ONESHOT_MAX_MIB = {2: 512, 4: 64, 8: 42, 16: 42}  # flashinfer's one-shot heuristic (B200), by world size
_ALIGN = 1 << 21
MAX_ELEMENTS = (1 << 31) - 1  # token_num * hidden_dim of one call: the kernels' int32 element counts
_DTYPES = (float16, bfloat16, float32)


class AllReduceFusionPattern:
    """``pattern_code`` of :func:`trtllm_allreduce_fusion`."""

    kAllReduce = 0
    kARResidualRMSNorm = 1
    kARResidualRMSNormFP8Quant = 2
    kARResidualRMSNormFP4Quant = 3
    kARResidualRMSNormOutFP8Quant = 4
    kARResidualRMSNormOutFP4Quant = 5


class QuantizationSFLayout:
    """``layout_code``: scale-factor layout of FP4 outputs."""

    SWIZZLED_128x4 = 0
    SWIZZLED_8x4 = 1
    LINEAR = 2


class AllReduceStrategyType:
    """``strategy_code`` of :func:`trtllm_custom_all_reduce`."""

    NCCL = 0
    MIN_LATENCY = 1
    UB = 2
    AUTO = 3
    ONESHOT = 4
    TWOSHOT = 5
    LOWPRECISION = 6


class AllReduceStrategyConfig:
    """``config_code`` bits of :func:`trtllm_custom_all_reduce`."""

    USE_MEMCPY = 1 << 0
    PUSH_MODE = 1 << 1


class AllReduceFusionOp:
    """``fusion_op_code`` of :func:`trtllm_custom_all_reduce`."""

    NONE = 0
    RESIDUAL_RMS_NORM = 1
    LAST_PROCESS_FOR_UB = 2
    RESIDUAL_RMS_PREPOST_NORM = 3
    RESIDUAL_RMS_NORM_QUANT_FP8 = 4
    RESIDUAL_RMS_NORM_QUANT_NVFP4 = 5
    RESIDUAL_RMS_NORM_OUT_QUANT_FP8 = 6
    RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4 = 7
    MOE_ALLREDUCE_RESIDUAL_RMS_NORM = 8
    MOE_FINALIZE_ALLREDUCE_RESIDUAL_RMS_NORM = 9


# ---- declarations ---------------------------------------------------------------------------------------------

ALLREDUCE_FUSION = declare(
    "trtllm_allreduce_fusion",
    [
        tensor("allreduce_in"),
        ("world_size", INT),
        ("world_rank", INT),
        ("token_num", INT),
        ("hidden_size", INT),
        tensor("workspace_ptrs"),
        ("launch_with_pdl", BOOL),
        ("use_oneshot", BOOL),
        ("trigger_completion_at_end", BOOL),
        ("fp32_acc", BOOL),
        ("pattern_code", INT),
        optional_tensor("allreduce_out", output=True),
        optional_tensor("residual_in"),
        optional_tensor("residual_out", output=True),
        optional_tensor("norm_out", output=True),
        optional_tensor("quant_out", output=True),
        optional_tensor("scale_out", output=True),
        optional_tensor("rms_gamma"),
        ("rms_eps", OPT_FLOAT),
        optional_tensor("scale_factor"),
        ("layout_code", OPT_INT),
    ],
)
CUSTOM_ALL_REDUCE = declare(
    "trtllm_custom_all_reduce",
    [
        tensor("in"),
        tensor("out", output=True),
        ("tp_size", INT),
        ("tp_rank", INT),
        ("token_num", INT),
        ("fusion_op_code", INT),
        ("strategy_code", INT),
        ("config_code", INT),
        ("launch_with_pdl", BOOL),
        ("flag_value", INT),
        *tensors("peer_comm_buffer_ptrs", "peer_barrier_ptrs_in", "peer_barrier_ptrs_out"),
        optional_tensor("bias"),
        optional_tensor("residual"),
        optional_tensor("weight"),
        optional_tensor("weight_pre_residual_norm"),
        ("eps", OPT_FLOAT),
        optional_tensor("intermediate_buffer", output=True),
        optional_tensor("lamport_peer_comm_buffer_ptrs_0"),
        optional_tensor("lamport_peer_comm_buffer_ptrs_1"),
        optional_tensor("lamport_peer_comm_buffer_ptrs_2"),
    ],
)
LAMPORT_INITIALIZE = declare("trtllm_lamport_initialize", [("buffer_ptr", INT), ("size", INT), ("dtype", DATA_TYPE)])
LAMPORT_INITIALIZE_ALL = declare(
    "trtllm_lamport_initialize_all",
    [("buffer_0_ptr", INT), ("buffer_1_ptr", INT), ("buffer_2_ptr", INT), ("size", INT), ("dtype", DATA_TYPE)],
)
MOE_ALLREDUCE_FUSION = declare(
    "trtllm_moe_allreduce_fusion",
    [
        ("world_size", INT),
        ("world_rank", INT),
        ("token_num", INT),
        ("hidden_size", INT),
        tensor("workspace_ptrs"),
        ("launch_with_pdl", BOOL),
        *tensors("residual_in", "rms_gamma"),
        ("rms_eps", FLOAT),
        ("scale_factor", FLOAT),
        ("moe_reduction_device_num_experts", INT),
        *tensors("moe_reduction_scale_input", "moe_reduction_active_experts_token_input", "moe_reduction_token_input"),
        ("layout_code", OPT_INT),
        optional_tensor("moe_allreduce_out", output=True),
        optional_tensor("residual_out", output=True),
        optional_tensor("norm_out", output=True),
        optional_tensor("quant_out", output=True),
        optional_tensor("scale_out", output=True),
    ],
)
MOE_FINALIZE_ALLREDUCE_FUSION = declare(
    "trtllm_moe_finalize_allreduce_fusion",
    [
        *tensors("allreduce_in", "residual_in", "norm_weight", "expanded_idx_to_permuted_idx"),
        *tensors("norm_out", "residual_out", output=True),
        ("launch_with_pdl", BOOL),
        tensor("workspace"),
        ("world_rank", INT),
        ("world_size", INT),
        ("eps", FLOAT),
        optional_tensor("shared_expert_output"),
        optional_tensor("expert_scale_factor"),
    ],
)
DECLARATIONS = tuple(
    (URI, d)
    for d in (
        ALLREDUCE_FUSION,
        CUSTOM_ALL_REDUCE,
        LAMPORT_INITIALIZE,
        LAMPORT_INITIALIZE_ALL,
        MOE_ALLREDUCE_FUSION,
        MOE_FINALIZE_ALLREDUCE_FUSION,
    )
)


# ---- workspace ----------------------------------------------------------------------------------------------------


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class WorkspaceMetadata:
    """What a fusion workspace was made for (a value: the checks' context, part of the launcher's cache key).

    Attributes:
        world_size: ranks.
        max_token_num: tokens a call may reduce, at ``hidden_dim``.
        hidden_dim: hidden size it was sized for (a call may use another one while ``tokens * hidden`` fits).
        use_fp32_lamport: Lamport buffers of float32 (float32 calls) rather than 16-bit (float16/bfloat16).
    """

    world_size: int
    max_token_num: int
    hidden_dim: int
    use_fp32_lamport: bool

    @property
    def elem_size(self) -> int:
        return 4 if self.use_fp32_lamport else 2

    @property
    def buffer_size(self) -> int:
        """Bytes of each rank's two-shot buffer."""
        return self.world_size * self.max_token_num * self.hidden_dim * self.elem_size

    @property
    def flag_size(self) -> int:
        """Bytes of each rank's barrier flags."""
        return self.world_size * BARRIER_FLAG_COUNT * 4

    @property
    def lamport_comm_size(self) -> int:
        """Bytes of one of the three Lamport slices of each rank (capped at :data:`MAX_COMM_SIZE`)."""
        return min(self.world_size * self.max_token_num * self.hidden_dim * self.elem_size, MAX_COMM_SIZE)

    @property
    def lamport_buffer_size(self) -> int:
        return 3 * self.lamport_comm_size

    def allocation_sizes(self) -> tuple[int, int, int]:
        """Bytes allocated per rank for the two-shot buffer, the flags and the Lamport buffer (2 MiB multiples)."""
        return tuple(_round_up(n, _ALIGN) for n in (self.buffer_size, self.flag_size, self.lamport_buffer_size))  # type: ignore[return-value]


def workspace_metadata(world_size: int, max_token_num: int, hidden_dim: int, dtype: Any) -> WorkspaceMetadata:
    """The metadata of a workspace for ``max_token_num`` tokens of ``hidden_dim`` elements of ``dtype``."""
    from ..dtypes import dtype as to_dtype

    world_size = checks.integer("world_size", world_size)
    if world_size not in FUSION_WORLD_SIZES:
        raise ValueError(f"world_size: the fusion kernels run on 2, 4, 8 or 16 ranks, got {world_size}")
    max_token_num = checks.integer("max_token_num", max_token_num, 1)
    hidden_dim = checks.integer("hidden_dim", hidden_dim, 1)
    if max_token_num * hidden_dim > MAX_ELEMENTS:
        raise ValueError(
            f"max_token_num, hidden_dim: {max_token_num} x {hidden_dim} elements exceed {MAX_ELEMENTS} (the kernels "
            f"count a call's elements in int32); make the workspace for fewer tokens"
        )
    dt = to_dtype(dtype)
    if dt not in _DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dt.name}")
    if hidden_dim % (16 // dt.itemsize):
        raise ValueError(
            f"hidden_dim: expected a multiple of {16 // dt.itemsize} (16 bytes of {dt.name}), got {hidden_dim}"
        )
    return WorkspaceMetadata(world_size, max_token_num, hidden_dim, dt == float32)


class AllReduceFusionWorkspace:
    """The IPC workspace of the fusion kernels over a communicator's ranks (one host).

    Args:
        comm: the :class:`~fi_ffi.comm.nccl.Communicator`.
        max_token_num: tokens per call at most.
        hidden_dim: hidden size.
        dtype: the calls' dtype (float16/bfloat16 share 16-bit Lamport buffers; float32 needs its own workspace).

    Every rank makes it at the same point. ``ptrs`` is the pointer array (an int64 descriptor) to pass as
    ``workspace_ptrs``; :meth:`close` releases everything once.
    """

    def __init__(self, comm: Any, max_token_num: int, hidden_dim: int, dtype: Any = "bfloat16") -> None:
        import struct

        from ..tensor.descriptor import Tensor
        from . import cuda
        from .ipc import IpcBuffer
        from .nccl import open_communicator

        comm = open_communicator("comm", comm, "an AllReduceFusionWorkspace")
        self.metadata = workspace_metadata(comm.world_size, max_token_num, hidden_dim, dtype)
        if comm.env is not None and not comm.env.single_host:
            raise ValueError("comm: the fusion kernels need every rank on one host (CUDA IPC); use NCCL")
        self.comm = comm
        self._parts: list[Any] = []
        m = self.metadata
        try:
            buffer_bytes, flag_bytes, lamport_bytes = m.allocation_sizes()
            buffers = [IpcBuffer(comm, buffer_bytes), IpcBuffer(comm, flag_bytes)]
            self._parts += buffers
            lamport = IpcBuffer(comm, lamport_bytes, zero=False)
            self._parts.append(lamport)
            buffers.append(lamport)
            lamport_dtype = float32 if m.use_fp32_lamport else float16  # -0.0 of bf16 has the same bits as f16's
            trtllm_lamport_initialize(lamport.ptr, lamport_bytes // lamport_dtype.itemsize, lamport_dtype)
            counters = cuda.DeviceBuffer(comm.device, 5 * 4)
            self._parts.append(counters)
            cuda.copy_to_device(counters.ptr, struct.pack("<5i", 0, 0, 0, m.lamport_comm_size, 0), comm.stream)
            pointers = [p for b in buffers for p in b.ptrs] + [counters.ptr]
            table = cuda.DeviceBuffer(comm.device, 8 * len(pointers))
            self._parts.append(table)
            cuda.copy_to_device(table.ptr, struct.pack(f"<{len(pointers)}Q", *pointers), comm.stream)
            cuda.device_synchronize()  # the Lamport initialisation ran on the legacy stream
            self.ptrs = Tensor.from_pointer(table.ptr, (len(pointers),), int64, device=comm.device)
            comm.barrier()  # no rank may write into a peer's buffers before they are initialised
        except BaseException:
            self._release(barrier=False)
            raise

    @property
    def closed(self) -> bool:
        return not self._parts

    def close(self) -> None:
        """Release the buffers (after every rank got here); once."""
        if self._parts:
            self._release(barrier=not self.comm.closed)

    def _release(self, *, barrier: bool) -> None:
        from .ipc import close_parts

        parts, self._parts = self._parts, []
        if barrier and parts:
            self.comm.barrier()
        close_parts(parts)

    def __enter__(self) -> AllReduceFusionWorkspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allreduce_fusion(
        self,
        allreduce_in: Any,
        *,
        pattern: int = AllReduceFusionPattern.kAllReduce,
        allreduce_out: Any = None,
        residual_in: Any = None,
        residual_out: Any = None,
        norm_out: Any = None,
        quant_out: Any = None,
        rms_gamma: Any = None,
        rms_eps: float | None = None,
        scale_factor: Any = None,
        use_oneshot: bool | None = None,
        fp32_acc: bool = False,
        launch_with_pdl: bool = False,
        trigger_completion_at_end: bool = True,
        stream: Any = None,
    ) -> None:
        """:func:`trtllm_allreduce_fusion` on this workspace, with the token count and hidden size taken from
        ``allreduce_in`` (``[token_num, hidden_dim]``). ``trigger_completion_at_end`` (with ``launch_with_pdl``): the
        next kernel may launch once this one ends (True, flashinfer's choice) or once it has waited for the kernel
        before it (False, the one-shot kernel only: the next kernel must wait for this one itself)."""
        if self.closed:
            raise ValueError(_CLOSED)
        from ..tensor.intake import as_tensor

        t = as_tensor(allreduce_in, name="allreduce_in")
        if t.ndim != 2:
            raise ValueError(f"allreduce_in: expected [token_num, hidden_dim], got shape {t.shape}")
        trtllm_allreduce_fusion(
            allreduce_in,
            self.metadata.world_size,
            self.comm.rank,
            t.shape[0],
            t.shape[1],
            self,
            launch_with_pdl=launch_with_pdl,
            trigger_completion_at_end=trigger_completion_at_end,
            fp32_acc=fp32_acc,
            pattern_code=pattern,
            use_oneshot=use_oneshot,
            allreduce_out=allreduce_out,
            residual_in=residual_in,
            residual_out=residual_out,
            norm_out=norm_out,
            quant_out=quant_out,
            scale_out=None,
            rms_gamma=rms_gamma,
            rms_eps=rms_eps,
            scale_factor=scale_factor,
            layout_code=None,
            stream=stream,
        )


_CLOSED = (
    "AllReduceFusionWorkspace: this workspace is closed (close() or its with block ended); make a new "
    "AllReduceFusionWorkspace(comm, max_token_num, hidden_dim, dtype) on every rank"
)


def _workspace(workspace_ptrs: Any, metadata: WorkspaceMetadata | None) -> tuple[Any, WorkspaceMetadata]:
    """The pointer array and metadata of ``workspace_ptrs`` (a workspace, or a tensor with ``metadata``)."""
    if isinstance(workspace_ptrs, AllReduceFusionWorkspace):
        if workspace_ptrs.closed:
            raise ValueError(f"workspace_ptrs: {_CLOSED}")
        return workspace_ptrs.ptrs, workspace_ptrs.metadata
    if not isinstance(metadata, WorkspaceMetadata):
        raise TypeError(
            "metadata: a raw workspace_ptrs tensor needs its WorkspaceMetadata (workspace_metadata(...)), so that "
            "sizes can be checked; or pass the AllReduceFusionWorkspace itself"
        )
    # named as the caller wrote it (the MoE finalize declaration calls it "workspace"), on every call
    t = checks.tensor("workspace_ptrs", workspace_ptrs)
    check_tensor("workspace_ptrs", t)
    _pointer_table("workspace_ptrs", t, 3 * metadata.world_size + 1)
    if t.data_ptr % 8:
        raise ValueError(f"workspace_ptrs: data pointer 0x{t.data_ptr:x} must be aligned to 8 bytes (int64)")
    return t, metadata


def _dims(token_num: Any, hidden_dim: Any) -> tuple[int, int]:
    """``token_num`` and ``hidden_dim`` as the caller named them, each at least 1 and their product an int32."""
    tokens = checks.integer("token_num", token_num, 1)
    hidden = checks.integer("hidden_dim", hidden_dim, 1)
    for name, value in (("token_num", tokens), ("hidden_dim", hidden)):
        if value > MAX_ELEMENTS:
            raise ValueError(f"{name}: expected at most {MAX_ELEMENTS} (the kernels' int32), got {value}")
    return tokens, hidden


def _should_use_oneshot(token_num: int, hidden_dim: int, itemsize: int, world_size: int) -> bool:
    mib = token_num * hidden_dim * 2 * world_size * itemsize / (1 << 20)
    return mib <= ONESHOT_MAX_MIB[world_size]


# ---- checks --------------------------------------------------------------------------------------------------------


def _rows(name: str, t: Any, ref: Any, shape: tuple[int, ...], dtype: DType | None = None) -> None:
    checks.shape(name, t, shape, "[token_num, hidden_dim]" if len(shape) == 2 else "")
    if dtype is None:
        checks.same_dtype(name, t, "allreduce_in", ref)
    elif t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name}, got {t.dtype.name}")
    checks.cuda(name, t)
    checks.contiguous(name, t)


def _pointer_table(name: str, t: Any, entries: int) -> None:
    if t.dtype != int64 or t.ndim != 1 or t.numel < entries:
        raise ValueError(
            f"{name}: expected an int64 device array of at least {entries} pointers, got {t.dtype.name}{list(t.shape)}"
        )
    checks.cuda(name, t)
    checks.contiguous(name, t)


def _check_fusion(a: SimpleNamespace) -> PointerRules:
    meta: WorkspaceMetadata = a.context
    x = a.allreduce_in
    checks.dtype_in("allreduce_in", x, _DTYPES)
    checks.cuda("allreduce_in", x)
    checks.contiguous("allreduce_in", x)
    if a.world_size != meta.world_size:
        raise ValueError(f"world_size: the workspace was made for {meta.world_size} ranks, got {a.world_size}")
    if not 0 <= a.world_rank < a.world_size:
        raise ValueError(f"world_rank: expected 0 <= world_rank < {a.world_size}, got {a.world_rank}")
    if a.token_num < 1 or a.hidden_size < 1 or x.numel != a.token_num * a.hidden_size:
        raise ValueError(
            f"token_num, hidden_dim: expected allreduce_in's {x.numel} elements as token_num x hidden_dim, got "
            f"{a.token_num} x {a.hidden_size}"
        )
    vec = 16 // x.dtype.itemsize
    if a.hidden_size % vec:  # the declaration's hidden_size is the caller's hidden_dim (allreduce_in.shape[1])
        raise ValueError(
            f"hidden_dim: expected a multiple of {vec} (16 bytes of {x.dtype.name}), got {a.hidden_size}; pad "
            f"allreduce_in's rows (allreduce_in.shape[1]) to it"
        )
    if a.token_num * a.hidden_size > meta.max_token_num * meta.hidden_dim:
        raise ValueError(
            f"allreduce_in: {a.token_num} x {a.hidden_size} elements exceed the workspace ({meta.max_token_num} tokens "
            f"x {meta.hidden_dim}); make a larger AllReduceFusionWorkspace"
        )
    if meta.use_fp32_lamport != (x.dtype == float32):
        kind = "float32" if meta.use_fp32_lamport else "float16/bfloat16"
        raise TypeError(f"allreduce_in: the workspace was made for {kind} calls, got {x.dtype.name}")
    if not a.use_oneshot and a.token_num <= a.world_size:
        raise ValueError(
            f"use_oneshot: the two-shot kernel needs more tokens ({a.token_num}) than ranks ({a.world_size})"
        )
    _pointer_table("workspace_ptrs", a.workspace_ptrs, 3 * meta.world_size + 1)
    pattern = a.pattern_code
    names = {
        0: "kAllReduce",
        1: "kARResidualRMSNorm",
        2: "kARResidualRMSNormFP8Quant",
        4: "kARResidualRMSNormOutFP8Quant",
    }
    if pattern in (
        AllReduceFusionPattern.kARResidualRMSNormFP4Quant,
        AllReduceFusionPattern.kARResidualRMSNormOutFP4Quant,
    ):
        raise ValueError(f"pattern_code: {pattern} (FP4 output) is not supported by fi_ffi; use 0, 1, 2 or 4")
    if pattern not in names:
        raise ValueError(f"pattern_code: expected one of {sorted(names)} (AllReduceFusionPattern), got {pattern}")
    shape = (a.token_num, a.hidden_size)
    needed = {0: ("allreduce_out",), 1: ("residual_in", "residual_out", "norm_out", "rms_gamma")}.get(pattern)
    if needed is None:  # FP8 quantized output (and norm_out for pattern 4)
        needed = ("residual_in", "residual_out", "quant_out", "rms_gamma", "scale_factor") + (
            ("norm_out",) if pattern == 4 else ()
        )
    for name in needed:
        if getattr(a, name) is None:
            raise ValueError(f"{name}: required by pattern {names[pattern]}")
    allowed = set(needed) | {"allreduce_out"}
    for name in ("residual_in", "residual_out", "norm_out", "quant_out", "scale_out", "rms_gamma", "scale_factor"):
        if getattr(a, name) is not None and name not in allowed:
            raise ValueError(f"{name}: not used by pattern {names[pattern]}; pass None")
    align = {"allreduce_in": 16}
    for name in ("allreduce_out", "residual_in", "residual_out", "norm_out"):
        t = getattr(a, name)
        if t is not None:
            _rows(name, t, x, shape)
            align[name] = 16
    if a.quant_out is not None:
        _rows("quant_out", a.quant_out, x, shape, float8_e4m3fn)
        align["quant_out"] = 16
    if a.rms_gamma is not None:
        _rows("rms_gamma", a.rms_gamma, x, (a.hidden_size,))
        align["rms_gamma"] = 16
        if a.rms_eps is None or not (a.rms_eps > 0 and math.isfinite(a.rms_eps)):
            raise ValueError(f"rms_eps: expected a finite value > 0 with RMSNorm, got {a.rms_eps}")
    if a.scale_factor is not None:
        if a.scale_factor.dtype != float32 or a.scale_factor.numel != 1:
            raise ValueError(
                f"scale_factor: expected one float32 element, got {a.scale_factor.numel} of {a.scale_factor.dtype.name}"
            )
        checks.cuda("scale_factor", a.scale_factor)
    if a.layout_code is not None:
        raise ValueError("layout_code: only FP4 outputs use it; pass None")
    # each thread reads its residual element before writing residual_out there: in place is allowed; every other
    # output must not overlap an input or another output (other threads and peers read the inputs meanwhile)
    outputs = [n for n in ("allreduce_out", "residual_out", "norm_out", "quant_out") if getattr(a, n) is not None]
    inputs = [n for n in ("allreduce_in", "rms_gamma", "scale_factor") if getattr(a, n) is not None]
    rules = PointerRules(align).outputs_apart(outputs, inputs)
    for out in outputs:
        if a.residual_in is not None:
            if out == "residual_out":
                rules.same_or_disjoint("residual_out", "residual_in")
            else:
                rules.disjoint(out, "residual_in")
    return rules


_allreduce_fusion = launcher(ALLREDUCE_FUSION, URI, _check_fusion)


def trtllm_allreduce_fusion(
    allreduce_in: Any,
    world_size: int,
    world_rank: int,
    token_num: int,
    hidden_dim: int,
    workspace_ptrs: Any,
    launch_with_pdl: bool,
    trigger_completion_at_end: bool,
    fp32_acc: bool,
    pattern_code: int,
    use_oneshot: bool | None,
    allreduce_out: Any,
    residual_in: Any,
    residual_out: Any,
    norm_out: Any,
    quant_out: Any,
    scale_out: Any,
    rms_gamma: Any,
    rms_eps: float | None,
    scale_factor: Any,
    layout_code: int | None,
    metadata: WorkspaceMetadata | None = None,
    *,
    stream: Any = None,
) -> None:
    """The fused all-reduce, asynchronous on ``stream`` (flashinfer.comm.trtllm_allreduce_fusion).

    ``out = sum over ranks of allreduce_in`` ``[token_num, hidden_dim]`` (float16/bfloat16/float32), then by
    ``pattern_code`` (:class:`AllReduceFusionPattern`):

    - 0 ``kAllReduce``: ``allreduce_out = out``.
    - 1 ``kARResidualRMSNorm``: ``residual_out = out + residual_in``; ``norm_out = rmsnorm(residual_out) * rms_gamma``.
    - 2 ``kARResidualRMSNormFP8Quant``: as 1, then ``quant_out = fp8_e4m3(norm / scale_factor)`` instead of norm_out
      (the norm rounded to the dtype first, times ``1 / scale_factor``, round to nearest, saturated at +-448).
    - 4 ``kARResidualRMSNormOutFP8Quant``: as 2, and norm_out too.

    ``allreduce_out`` may be given with every pattern. ``workspace_ptrs`` is an :class:`AllReduceFusionWorkspace`,
    or its pointer array with ``metadata``. ``use_oneshot=None`` picks by size as flashinfer does (one-shot up to
    512 MiB of traffic with 2 ranks, 64 with 4, 42 with 8); the two-shot kernel needs more tokens than ranks.
    ``scale_factor`` is a float32 device tensor of one element (CUDA-graph safe) or a float; ``scale_out`` and
    ``layout_code`` (FP4 only) must be None.
    """
    ptrs, meta = _workspace(workspace_ptrs, metadata)
    token_num, hidden_dim = _dims(token_num, hidden_dim)
    world_size = checks.integer("world_size", world_size)
    if world_size not in ONESHOT_MAX_MIB:
        raise ValueError(f"world_size: the fusion kernels run on 2, 4, 8 or 16 ranks, got {world_size}")
    if use_oneshot is None:
        from ..tensor.intake import as_tensor

        itemsize = as_tensor(allreduce_in, name="allreduce_in").dtype.itemsize
        use_oneshot = _should_use_oneshot(token_num, hidden_dim, itemsize, world_size)
        if token_num * hidden_dim * itemsize * world_size > meta.lamport_comm_size:
            use_oneshot = False  # the Lamport slice cannot hold it (flashinfer's MAX_COMM_SIZE fallback)
    if isinstance(scale_factor, (int, float)) and not isinstance(scale_factor, bool):
        raise TypeError(
            "scale_factor: pass a float32 device tensor of one element (a float would need a device copy per call)"
        )
    _allreduce_fusion(
        allreduce_in,
        world_size,
        world_rank,
        token_num,
        hidden_dim,
        ptrs,
        launch_with_pdl,
        use_oneshot,
        trigger_completion_at_end,
        fp32_acc,
        pattern_code,
        allreduce_out,
        residual_in,
        residual_out,
        norm_out,
        quant_out,
        scale_out,
        rms_gamma,
        None if rms_eps is None else checks.finite("rms_eps", rms_eps),
        scale_factor,
        layout_code,
        stream=stream,
        context=meta,
    )


# ---- MoE -------------------------------------------------------------------------------------------------------------


def _check_moe_finalize(a: SimpleNamespace) -> PointerRules:
    meta: WorkspaceMetadata = a.context
    r = a.residual_in
    checks.dtype_in("residual_in", r, (float16, bfloat16))
    checks.ndim("residual_in", r, 2, "[token_num, hidden_dim]")
    checks.cuda("residual_in", r)
    checks.contiguous("residual_in", r)
    tokens, hidden = r.shape
    if hidden % 8:
        raise ValueError(f"residual_in: hidden_dim must be a multiple of 8 (16 bytes), got {hidden}")
    if a.world_size != meta.world_size or not 0 <= a.world_rank < a.world_size:
        raise ValueError(
            f"world_size, world_rank: the workspace is for {meta.world_size} ranks; got rank {a.world_rank} of "
            f"{a.world_size}"
        )
    if meta.use_fp32_lamport:
        raise TypeError("workspace: made for float32 calls; the MoE fusions run float16/bfloat16")
    if tokens * hidden > meta.max_token_num * meta.hidden_dim:
        raise ValueError(
            f"residual_in: {tokens} x {hidden} exceed the workspace ({meta.max_token_num} x {meta.hidden_dim})"
        )
    x = a.allreduce_in
    checks.ndim("allreduce_in", x, 2, "[permuted_rows, hidden_dim]")
    if x.shape[1] != hidden:
        raise ValueError(f"allreduce_in: expected hidden_dim {hidden} (as residual_in), got {x.shape[1]}")
    checks.same_dtype("allreduce_in", x, "residual_in", r)
    checks.cuda("allreduce_in", x)
    checks.contiguous("allreduce_in", x)
    idx = a.expanded_idx_to_permuted_idx
    checks.ndim("expanded_idx_to_permuted_idx", idx, 2, "[token_num, top_k]")
    if idx.dtype != int32 or idx.shape[0] != tokens or idx.shape[1] < 1:
        raise ValueError(
            f"expanded_idx_to_permuted_idx: expected int32 [token_num={tokens}, top_k >= 1], got "
            f"{idx.dtype.name}{list(idx.shape)}"
        )
    checks.cuda("expanded_idx_to_permuted_idx", idx)
    checks.contiguous("expanded_idx_to_permuted_idx", idx)
    for name in ("norm_out", "residual_out", "shared_expert_output"):
        t = getattr(a, name)
        if t is not None:
            checks.shape(name, t, (tokens, hidden), "[token_num, hidden_dim]")
            checks.same_dtype(name, t, "residual_in", r)
            checks.cuda(name, t)
            checks.contiguous(name, t)
    w = a.norm_weight
    checks.shape("norm_weight", w, (hidden,), "[hidden_dim]")
    checks.same_dtype("norm_weight", w, "residual_in", r)
    checks.cuda("norm_weight", w)
    if a.expert_scale_factor is not None:
        s = a.expert_scale_factor
        checks.shape("expert_scale_factor", s, tuple(idx.shape), "[token_num, top_k]")
        checks.same_dtype("expert_scale_factor", s, "residual_in", r)
        checks.cuda("expert_scale_factor", s)
        checks.contiguous("expert_scale_factor", s)
    checks.positive_finite("eps", a.eps)
    _pointer_table("workspace", a.workspace, 3 * meta.world_size + 1)
    align = {n: 16 for n in ("allreduce_in", "residual_in", "norm_out", "residual_out", "norm_weight")}
    if a.shared_expert_output is not None:
        align["shared_expert_output"] = 16
    inputs = [
        "allreduce_in",
        "norm_weight",
        "expanded_idx_to_permuted_idx",
        "shared_expert_output",
        "expert_scale_factor",
    ]
    rules = PointerRules(align).outputs_apart(["norm_out", "residual_out"], inputs)
    return rules.disjoint("norm_out", "residual_in").same_or_disjoint("residual_out", "residual_in")


_moe_finalize = launcher(MOE_FINALIZE_ALLREDUCE_FUSION, URI, _check_moe_finalize)


def trtllm_moe_finalize_allreduce_fusion(
    allreduce_in: Any,
    residual_in: Any,
    norm_weight: Any,
    expanded_idx_to_permuted_idx: Any,
    norm_out: Any,
    residual_out: Any,
    workspace_ptrs: Any,
    launch_with_pdl: bool,
    world_rank: int,
    world_size: int,
    eps: float,
    shared_expert_output: Any,
    expert_scale_factor: Any,
    metadata: WorkspaceMetadata | None = None,
    *,
    stream: Any = None,
) -> None:
    """MoE finalize + all-reduce + residual add + RMSNorm (flashinfer.comm.trtllm_moe_finalize_allreduce_fusion).

    Per token ``t``: ``y = sum_k scale[t, k] * allreduce_in[idx[t, k]]`` (rows ``idx = -1`` skipped; ``scale`` =
    ``expert_scale_factor`` or 1) ``+ shared_expert_output[t]``, all-reduced over ranks; ``residual_out = y +
    residual_in``; ``norm_out = rmsnorm(residual_out) * norm_weight``. float16/bfloat16; ``allreduce_in``
    ``[permuted_rows, hidden_dim]``, ``expanded_idx_to_permuted_idx`` int32 ``[token_num, top_k]`` (its values
    index ``allreduce_in``'s rows: on the device, not checked).
    """
    ptrs, meta = _workspace(workspace_ptrs, metadata)
    _moe_finalize(
        allreduce_in,
        residual_in,
        norm_weight,
        expanded_idx_to_permuted_idx,
        norm_out,
        residual_out,
        launch_with_pdl,
        ptrs,
        world_rank,
        world_size,
        checks.finite("eps", eps),
        shared_expert_output,
        expert_scale_factor,
        stream=stream,
        context=meta,
    )


def _check_moe_reduction(a: SimpleNamespace) -> PointerRules:
    meta: WorkspaceMetadata = a.context
    tokens, hidden, experts = a.token_num, a.hidden_size, a.moe_reduction_device_num_experts
    x = a.moe_reduction_token_input
    checks.dtype_in("moe_reduction_token_input", x, (float16, bfloat16))
    if a.world_size != meta.world_size or not 0 <= a.world_rank < a.world_size:
        raise ValueError(
            f"world_size, world_rank: the workspace is for {meta.world_size} ranks; got rank {a.world_rank} of "
            f"{a.world_size}"
        )
    if meta.use_fp32_lamport:
        raise TypeError("workspace_ptrs: made for float32 calls; the MoE fusions run float16/bfloat16")
    if tokens < 1 or hidden < 1 or hidden % 8 or experts < 1:
        raise ValueError(
            f"token_num, hidden_dim, moe_reduction_device_num_experts: expected >= 1 (hidden_dim a multiple of 8), "
            f"got {tokens}, {hidden}, {experts}"
        )
    if tokens * hidden > meta.max_token_num * meta.hidden_dim:
        raise ValueError(
            f"token_num: {tokens} x {hidden} exceed the workspace ({meta.max_token_num} x {meta.hidden_dim})"
        )
    shapes = {
        "moe_reduction_token_input": (tokens, hidden),
        "residual_in": (tokens, hidden),
        "moe_reduction_active_experts_token_input": (experts, tokens, hidden),
        "rms_gamma": (hidden,),
    }
    for name, shape in shapes.items():
        t = getattr(a, name)
        checks.shape(name, t, shape)
        checks.same_dtype(name, t, "moe_reduction_token_input", x)
        checks.cuda(name, t)
        checks.contiguous(name, t)
    s = a.moe_reduction_scale_input
    checks.shape("moe_reduction_scale_input", s, (experts, tokens), "[experts, token_num]")
    if s.dtype != float32:
        raise TypeError(f"moe_reduction_scale_input: expected float32, got {s.dtype.name}")
    checks.cuda("moe_reduction_scale_input", s)
    checks.contiguous("moe_reduction_scale_input", s)
    if a.quant_out is not None or a.scale_out is not None or a.layout_code is not None:
        raise ValueError("quant_out, scale_out, layout_code: FP4 output is not supported by fi_ffi; pass None")
    outs = [n for n in ("moe_allreduce_out", "residual_out", "norm_out") if getattr(a, n) is not None]
    if not outs:
        raise ValueError("moe_allreduce_out, residual_out, norm_out: pass at least one output")
    for name in outs:
        t = getattr(a, name)
        checks.shape(name, t, (tokens, hidden), "[token_num, hidden_dim]")
        checks.same_dtype(name, t, "moe_reduction_token_input", x)
        checks.cuda(name, t)
        checks.contiguous(name, t)
    checks.positive_finite("rms_eps", a.rms_eps)
    _pointer_table("workspace_ptrs", a.workspace_ptrs, 3 * meta.world_size + 1)
    inputs = [*shapes, "moe_reduction_scale_input"]
    rules = PointerRules({n: 16 for n in (*shapes, *outs)})
    rules.outputs_apart([o for o in outs if o != "residual_out"], inputs)
    if "residual_out" in outs:
        rules.outputs_apart(["residual_out"], [n for n in inputs if n != "residual_in"])
        rules.same_or_disjoint("residual_out", "residual_in")
        for o in outs:
            if o != "residual_out":
                rules.disjoint(o, "residual_out")
    return rules


_moe_reduction = launcher(MOE_ALLREDUCE_FUSION, URI, _check_moe_reduction)


def trtllm_moe_allreduce_fusion(
    world_size: int,
    world_rank: int,
    token_num: int,
    hidden_dim: int,
    workspace_ptrs: Any,
    launch_with_pdl: bool,
    residual_in: Any,
    rms_gamma: Any,
    rms_eps: float,
    scale_factor: float,
    moe_reduction_device_num_experts: int,
    moe_reduction_scale_input: Any,
    moe_reduction_active_experts_token_input: Any,
    moe_reduction_token_input: Any,
    layout_code: int | None,
    moe_allreduce_out: Any,
    residual_out: Any,
    norm_out: Any,
    quant_out: Any,
    scale_out: Any,
    metadata: WorkspaceMetadata | None = None,
    *,
    stream: Any = None,
) -> None:
    """MoE reduction + all-reduce + residual add + RMSNorm (flashinfer.comm.trtllm_moe_allreduce_fusion).

    Per token: ``y = sum_e scale_input[e, t] * active_experts_token_input[e, t] + token_input[t]``, all-reduced;
    ``moe_allreduce_out = y``; ``residual_out = y + residual_in``; ``norm_out = rmsnorm(residual_out) * rms_gamma``
    (each output optional, at least one). float16/bfloat16; scales float32 ``[experts, token_num]``.
    """
    ptrs, meta = _workspace(workspace_ptrs, metadata)
    token_num, hidden_dim = _dims(token_num, hidden_dim)
    _moe_reduction(
        world_size,
        world_rank,
        token_num,
        hidden_dim,
        ptrs,
        launch_with_pdl,
        residual_in,
        rms_gamma,
        checks.finite("rms_eps", rms_eps),
        checks.finite("scale_factor", scale_factor),
        moe_reduction_device_num_experts,
        moe_reduction_scale_input,
        moe_reduction_active_experts_token_input,
        moe_reduction_token_input,
        layout_code,
        moe_allreduce_out,
        residual_out,
        norm_out,
        quant_out,
        scale_out,
        stream=stream,
        context=meta,
    )


# ---- the older custom all-reduce and the Lamport set-up ------------------------------------------------------------


def _check_custom(a: SimpleNamespace) -> PointerRules:
    x, o = getattr(a, "in"), a.out
    checks.dtype_in("inp", x, _DTYPES)
    checks.cuda("inp", x)
    checks.contiguous("inp", x)
    checks.shape("out", o, x.shape)
    checks.same_dtype("out", o, "inp", x)
    checks.cuda("out", o)
    checks.contiguous("out", o)
    if a.tp_size not in (2, 4, 8, 16) or not 0 <= a.tp_rank < a.tp_size:
        raise ValueError(f"tp_size, tp_rank: expected rank < size in 2, 4, 8, 16; got {a.tp_rank} of {a.tp_size}")
    if a.token_num < 1 or x.numel % a.token_num:
        raise ValueError(f"token_num: expected a divisor of inp's {x.numel} elements, got {a.token_num}")
    if a.fusion_op_code not in (AllReduceFusionOp.NONE, AllReduceFusionOp.RESIDUAL_RMS_NORM):
        raise ValueError("fusion_op_code: fi_ffi passes NONE (0) or RESIDUAL_RMS_NORM (1) to this older kernel")
    if a.strategy_code not in (AllReduceStrategyType.ONESHOT, AllReduceStrategyType.TWOSHOT):
        raise ValueError("strategy_code: expected ONESHOT (4) or TWOSHOT (5)")
    for name in ("peer_comm_buffer_ptrs", "peer_barrier_ptrs_in", "peer_barrier_ptrs_out"):
        _pointer_table(name, getattr(a, name), a.tp_size)
    lamport = [getattr(a, f"lamport_peer_comm_buffer_ptrs_{i}") for i in range(3)]
    if any(t is not None for t in lamport) and any(t is None for t in lamport):
        raise ValueError("lamport_peer_comm_buffer_ptrs_0/1/2: pass all three or none")
    for i, t in enumerate(lamport):
        if t is not None:
            _pointer_table(f"lamport_peer_comm_buffer_ptrs_{i}", t, a.tp_size)
    if a.fusion_op_code == AllReduceFusionOp.RESIDUAL_RMS_NORM:
        hidden = x.numel // a.token_num
        for name in ("residual", "weight", "intermediate_buffer"):
            if getattr(a, name) is None:
                raise ValueError(f"{name}: required by RESIDUAL_RMS_NORM")
        checks.shape("residual", a.residual, x.shape)
        checks.shape("weight", a.weight, (hidden,))
        checks.shape("intermediate_buffer", a.intermediate_buffer, x.shape)
        if a.eps is None or not a.eps > 0:
            raise ValueError(f"eps: expected > 0 with RESIDUAL_RMS_NORM, got {a.eps}")
    # last: every argument checked first (this one asks the lock which release serves the module)
    if a.tp_size != LAMPORT_STRIDE and (
        a.fusion_op_code == AllReduceFusionOp.RESIDUAL_RMS_NORM or any(t is not None for t in lamport)
    ):
        _refuse_lamport_stride_defect(a.tp_size)
    return PointerRules({"in": 16, "out": 16}).disjoint("out", "in")


_custom_all_reduce = launcher(CUSTOM_ALL_REDUCE, URI, _check_custom)

LAMPORT_STRIDE = 16  # MAX_RANKS_PER_NODE: the stride at which the kernels read the three Lamport pointer rows
LAMPORT_STRIDE_FIXED_IN = "0.6.17"  # the first FlashInfer release whose host code writes them at that stride


def _refuse_lamport_stride_defect(tp_size: int) -> None:
    """Refuse a call that may reach the Lamport kernel on a module whose host code mis-strides its pointers.

    FlashInfer's ``trtllm_custom_all_reduce`` before 0.6.17 writes the Lamport buffer pointers of rank ``i`` at
    ``i + tp_size * k`` while the kernels read ``i + MAX_RANKS_PER_NODE * k`` (k = 0, 1, 2; upstream PR #3903
    fixed it): they agree only at 16 ranks, and at any other world size the kernel dereferences unset pointers.
    The Lamport kernel runs for RESIDUAL_RMS_NORM (up to 16 tokens of at least 256 elements, chosen on the
    device side of the FFI), so such calls, and any call given the Lamport pointers, are refused there.
    """
    from ..launch.kernels import module_release
    from ..loader.lockfile import release_key

    release = module_release(URI)
    if release and release_key(release) >= release_key(LAMPORT_STRIDE_FIXED_IN):
        return
    which = f"FlashInfer {release}" if release else "a module whose lock entry records no FlashInfer release"
    raise ValueError(
        f"tp_size: {tp_size} ranks with RESIDUAL_RMS_NORM or Lamport buffers on {which}: its host code writes the "
        f"Lamport buffer pointers at stride tp_size while the kernels read them at stride {LAMPORT_STRIDE} "
        f"(upstream defect, fixed by FlashInfer PR #3903 in {LAMPORT_STRIDE_FIXED_IN}), so only {LAMPORT_STRIDE} "
        f"ranks are safe; pin trtllm_comm from FlashInfer >= {LAMPORT_STRIDE_FIXED_IN}, use fusion_op_code NONE "
        f"without Lamport buffers, or use trtllm_allreduce_fusion"
    )


def trtllm_custom_all_reduce(
    inp: Any,
    out: Any,
    tp_size: int,
    tp_rank: int,
    token_num: int,
    fusion_op_code: int,
    strategy_code: int,
    config_code: int,
    launch_with_pdl: bool,
    flag_value: int,
    peer_comm_buffer_ptrs: Any,
    peer_barrier_ptrs_in: Any,
    peer_barrier_ptrs_out: Any,
    bias: Any,
    residual: Any,
    weight: Any,
    weight_pre_residual_norm: Any,
    eps: float | None,
    intermediate_buffer: Any,
    lamport_peer_comm_buffer_ptrs_0: Any,
    lamport_peer_comm_buffer_ptrs_1: Any,
    lamport_peer_comm_buffer_ptrs_2: Any,
    *,
    stream: Any = None,
) -> None:
    """TensorRT-LLM's older custom all-reduce (deprecated upstream in favour of :func:`trtllm_allreduce_fusion`):
    declared and checked; fi_ffi makes no workspace for it (its 7 IPC buffers: see
    :class:`~fi_ffi.comm.ipc.IpcBuffer`). On modules from FlashInfer before 0.6.17 a call that may reach the Lamport
    kernel (RESIDUAL_RMS_NORM, or Lamport buffers given) is refused below 16 ranks: that host code mis-strides the
    Lamport pointers (upstream PR #3903)."""
    # the declaration calls the input "in" (a Python keyword): checked here under the caller's name
    inp = checks.tensor("inp", inp)
    check_tensor("inp", inp)
    if inp.data_ptr % 16:
        raise ValueError(f"inp: data pointer 0x{inp.data_ptr:x} must be aligned to 16 bytes (vector loads)")
    _custom_all_reduce(
        inp,
        out,
        tp_size,
        tp_rank,
        token_num,
        fusion_op_code,
        strategy_code,
        config_code,
        launch_with_pdl,
        flag_value,
        peer_comm_buffer_ptrs,
        peer_barrier_ptrs_in,
        peer_barrier_ptrs_out,
        bias,
        residual,
        weight,
        weight_pre_residual_norm,
        None if eps is None else checks.finite("eps", eps),
        intermediate_buffer,
        lamport_peer_comm_buffer_ptrs_0,
        lamport_peer_comm_buffer_ptrs_1,
        lamport_peer_comm_buffer_ptrs_2,
        stream=stream,
    )


def _lamport_dtype(dtype: Any) -> DType:
    from ..dtypes import dtype as to_dtype

    dt = to_dtype(dtype)
    if dt not in _DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dt.name}")
    return dt


def trtllm_lamport_initialize(buffer_ptr: int, size: int, dtype: Any) -> None:
    """Fill ``size`` elements of ``dtype`` at device address ``buffer_ptr`` with negative zeros (the Lamport
    protocol's "not written yet"), on the legacy default stream."""
    ptr = checks.integer("buffer_ptr", buffer_ptr)
    if not 0 < ptr < 1 << 63:
        raise ValueError(f"buffer_ptr: expected a non-NULL device address, got {ptr}")
    n = checks.integer("size", size, 0)
    control.call(URI, LAMPORT_INITIALIZE, ptr, n, _lamport_dtype(dtype))


def trtllm_lamport_initialize_all(
    buffer_0_ptr: int, buffer_1_ptr: int, buffer_2_ptr: int, size: int, dtype: Any
) -> None:
    """:func:`trtllm_lamport_initialize` of three buffers of ``size`` **bytes** each (then a device synchronize)."""
    ptrs = [checks.integer(f"buffer_{i}_ptr", p) for i, p in enumerate((buffer_0_ptr, buffer_1_ptr, buffer_2_ptr))]
    for i, p in enumerate(ptrs):
        if not 0 < p < 1 << 63:
            raise ValueError(f"buffer_{i}_ptr: expected a non-NULL device address, got {p}")
    n = checks.integer("size", size, 0)
    control.call(URI, LAMPORT_INITIALIZE_ALL, *ptrs, n, _lamport_dtype(dtype))


__all__ = [
    "DECLARATIONS",
    "AllReduceFusionOp",
    "AllReduceFusionPattern",
    "AllReduceFusionWorkspace",
    "AllReduceStrategyConfig",
    "AllReduceStrategyType",
    "QuantizationSFLayout",
    "WorkspaceMetadata",
    "trtllm_allreduce_fusion",
    "trtllm_custom_all_reduce",
    "trtllm_lamport_initialize",
    "trtllm_lamport_initialize_all",
    "trtllm_moe_allreduce_fusion",
    "trtllm_moe_finalize_allreduce_fusion",
    "workspace_metadata",
]
