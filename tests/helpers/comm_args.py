"""Keyword arguments of valid calls of the communication kernels over fake ``cuda:0`` descriptors, and a
communicator that needs no NCCL, for the CPU tests (``tests/comm/test_allreduce_kernels.py``, the bad-input
campaign)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fi_ffi.comm import trtllm_ar
from fi_ffi.comm.trtllm_ar import AllReduceFusionPattern, WorkspaceMetadata
from fi_ffi.tensor.descriptor import Tensor


def fake_cuda(shape: tuple[int, ...], dtype: str = "bfloat16", offset: int = 0) -> Tensor:
    """A descriptor claiming cuda:0 over host memory (never touched: there is no GPU), ``offset`` bytes past a
    256-byte boundary."""
    host = np.zeros(max(1, int(np.prod(shape))) * 8 + 512, dtype=np.uint8)
    ptr = (host.ctypes.data + 255) // 256 * 256 + offset
    return Tensor.from_pointer(ptr, shape, dtype, "cuda:0", owner=host)


META = WorkspaceMetadata(2, 64, 256, False)


T, H = 16, 256


def fusion_args(pattern: int = AllReduceFusionPattern.kARResidualRMSNorm, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        allreduce_in=fake_cuda((T, H)),
        world_size=2,
        world_rank=1,
        token_num=T,
        hidden_dim=H,
        workspace_ptrs=fake_cuda((7,), "int64"),
        launch_with_pdl=False,
        trigger_completion_at_end=True,
        fp32_acc=False,
        pattern_code=pattern,
        use_oneshot=True,
        allreduce_out=None,
        residual_in=fake_cuda((T, H)),
        residual_out=fake_cuda((T, H)),
        norm_out=fake_cuda((T, H)),
        quant_out=None,
        scale_out=None,
        rms_gamma=fake_cuda((H,)),
        rms_eps=1e-6,
        scale_factor=None,
        layout_code=None,
        metadata=META,
    )
    if pattern == AllReduceFusionPattern.kAllReduce:
        args.update(residual_in=None, residual_out=None, norm_out=None, rms_gamma=None, allreduce_out=fake_cuda((T, H)))
    if pattern in (
        AllReduceFusionPattern.kARResidualRMSNormFP8Quant,
        AllReduceFusionPattern.kARResidualRMSNormOutFP8Quant,
    ):
        args.update(quant_out=fake_cuda((T, H), "float8_e4m3fn"), scale_factor=fake_cuda((1,), "float32"))
        if pattern == AllReduceFusionPattern.kARResidualRMSNormFP8Quant:
            args.update(norm_out=None)
    args.update(over)
    return args


def moe_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        allreduce_in=fake_cuda((T * 2, H)),
        residual_in=fake_cuda((T, H)),
        norm_weight=fake_cuda((H,)),
        expanded_idx_to_permuted_idx=fake_cuda((T, 2), "int32"),
        norm_out=fake_cuda((T, H)),
        residual_out=fake_cuda((T, H)),
        workspace_ptrs=fake_cuda((7,), "int64"),
        launch_with_pdl=False,
        world_rank=0,
        world_size=2,
        eps=1e-6,
        shared_expert_output=None,
        expert_scale_factor=None,
        metadata=META,
    )
    args.update(over)
    return args


def moe_reduction_args(**over: Any) -> dict[str, Any]:
    e = 3
    args: dict[str, Any] = dict(
        world_size=2,
        world_rank=0,
        token_num=T,
        hidden_dim=H,
        workspace_ptrs=fake_cuda((7,), "int64"),
        launch_with_pdl=False,
        residual_in=fake_cuda((T, H)),
        rms_gamma=fake_cuda((H,)),
        rms_eps=1e-6,
        scale_factor=1.0,
        moe_reduction_device_num_experts=e,
        moe_reduction_scale_input=fake_cuda((e, T), "float32"),
        moe_reduction_active_experts_token_input=fake_cuda((e, T, H)),
        moe_reduction_token_input=fake_cuda((T, H)),
        layout_code=None,
        moe_allreduce_out=None,
        residual_out=fake_cuda((T, H)),
        norm_out=fake_cuda((T, H)),
        quant_out=None,
        scale_out=None,
        metadata=META,
    )
    args.update(over)
    return args


def custom_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        inp=fake_cuda((T, H)),
        out=fake_cuda((T, H)),
        tp_size=2,
        tp_rank=0,
        token_num=T,
        fusion_op_code=0,
        strategy_code=trtllm_ar.AllReduceStrategyType.ONESHOT,
        config_code=0,
        launch_with_pdl=False,
        flag_value=1,
        peer_comm_buffer_ptrs=fake_cuda((2,), "int64"),
        peer_barrier_ptrs_in=fake_cuda((2,), "int64"),
        peer_barrier_ptrs_out=fake_cuda((2,), "int64"),
        bias=None,
        residual=None,
        weight=None,
        weight_pre_residual_norm=None,
        eps=None,
        intermediate_buffer=None,
        lamport_peer_comm_buffer_ptrs_0=None,
        lamport_peer_comm_buffer_ptrs_1=None,
        lamport_peer_comm_buffer_ptrs_2=None,
    )
    args.update(over)
    return args


def cpu_communicator(world_size: int = 2, *, closed: bool = False) -> Any:
    """A :class:`~fi_ffi.comm.nccl.Communicator` of rank 0 on cuda:0 without NCCL (none loads on this machine):
    the objects below check it and their other arguments before they allocate anything."""
    from fi_ffi.comm.nccl import Communicator

    comm = object.__new__(Communicator)
    comm.rank, comm.world_size, comm.device, comm.env, comm.backend, comm._stream = 0, world_size, 0, None, "none", 0
    comm._comm = None if closed else object()
    return comm
