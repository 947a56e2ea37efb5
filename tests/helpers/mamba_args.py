"""Valid ``selective_state_update`` arguments over fake ``cuda:0`` descriptors, for the Mamba CPU tests
(``tests/ops/test_mamba.py`` and the child process it starts with a libcuda stand-in)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fi_ffi.tensor.descriptor import Tensor
from helpers.fakes import fake_cuda


def aligned_cuda(shape: tuple[int, ...], dtype: str, alignment: int) -> Tensor:
    """Like ``fake_cuda`` with the pointer aligned to ``alignment`` bytes."""
    host = np.zeros(int(np.prod(shape)) * 4 + 2 * alignment, dtype=np.uint8)
    ptr = (host.ctypes.data + alignment - 1) // alignment * alignment
    return Tensor.from_pointer(ptr, shape, dtype, 0, owner=host)


def ssu_args(
    batch: int = 2,
    heads: int = 4,
    dim: int = 64,
    dstate: int = 128,
    groups: int = 2,
    state_dtype: str = "float32",
    weight_dtype: str = "float32",
    cache: int = 6,
) -> dict[str, Any]:
    """Valid arguments (fake CUDA descriptors) with the per-head broadcasts Mamba-2 uses."""
    return {
        "state": aligned_cuda((cache, heads, dim, dstate), state_dtype, 128),
        "x": fake_cuda((batch, heads, dim), "bfloat16"),
        "dt": fake_cuda((batch, heads), weight_dtype).view((batch, heads, dim), strides=(heads, 1, 0)),
        "A": fake_cuda((heads,), "float32").view((heads, dim, dstate), strides=(1, 0, 0)),
        "B": fake_cuda((batch, groups, dstate), "bfloat16"),
        "C": fake_cuda((batch, groups, dstate), "bfloat16"),
        "D": fake_cuda((heads,), weight_dtype).view((heads, dim), strides=(1, 0)),
        "z": fake_cuda((batch, heads, dim), "bfloat16"),
        "dt_bias": fake_cuda((heads,), weight_dtype).view((heads, dim), strides=(1, 0)),
        "state_batch_indices": fake_cuda((batch,), "int32"),
        "out": fake_cuda((batch, heads, dim), "bfloat16"),
    }
