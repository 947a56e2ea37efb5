"""Producers the benchmarks time beside torch and CuPy: an object with only ``__cuda_array_interface__``, and JAX
arrays (made from torch tensors). Imported by bench_goals.py and bench_floor.py."""

from __future__ import annotations

import os
from typing import Any

# JAX (imported only for its rows) must not take 75 % of the GPU's memory at start, as it does by default
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


class CAIObject:
    """A producer that speaks only ``__cuda_array_interface__`` (as numba's device arrays do), its dict built per
    access (CuPy's own property, which this wraps, builds it per access too)."""

    __slots__ = ("_array",)

    def __init__(self, array: Any) -> None:
        self._array = array

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self._array.__cuda_array_interface__


def jax_arrays(*tensors: Any) -> list[Any]:
    """JAX arrays on the first GPU holding copies of torch CUDA ``tensors`` (raises where JAX has no GPU)."""
    import jax
    import jax.numpy as jnp

    gpu = jax.devices("gpu")[0]
    # through float32 (numpy has no bfloat16), then JAX's cast to the tensor's own dtype
    arrays = [jax.device_put(jnp.asarray(t.cpu().float().numpy()).astype(str(t.dtype)[6:]), gpu) for t in tensors]
    for a in arrays:
        a.block_until_ready()
    return arrays
