"""Tensor arguments: the descriptor of device memory and how other libraries' tensors are read as one.

- :mod:`~fi_ffi.tensor.descriptor`: :class:`Tensor`, the descriptor (shape, strides, dtype, device, data pointer)
  and its interned layouts, with the builders that are the only writers of its fields;
- :mod:`~fi_ffi.tensor.intake`: the one reader of each producer type (torch, CuPy, JAX, DLPack, CUDA array
  interface, numpy): :func:`~fi_ffi.as_tensor`, the layout key and data pointer a call reads, and the source
  text of those reads for the launcher's generated code;
- :mod:`~fi_ffi.tensor.streams`: reading a stream (or device ordinal) argument (TVM-FFI's current stream is
  :mod:`fi_ffi.abi.streams`);
- :mod:`~fi_ffi.tensor.protocols`: the static types of what the ops accept (``TensorLike``, ``StreamLike``).

Importing this package imports the descriptor alone: the intake stands above the TVM-FFI layer
(:mod:`fi_ffi.abi`), which the descriptor stands below.
"""

from .descriptor import (
    MAX_NDIM,
    WIRE_DEVICE_TYPE,
    Tensor,
    contiguous_strides,
    from_checked,
    from_layout,
    layout_id,
    relocated,
)

__all__ = [
    "MAX_NDIM",
    "WIRE_DEVICE_TYPE",
    "Tensor",
    "contiguous_strides",
    "from_checked",
    "from_layout",
    "layout_id",
    "relocated",
]
