"""Tensor arguments: the descriptor of device memory and how other libraries' tensors are read as one.

- :mod:`~fi_ffi.tensor.descriptor`: :class:`Tensor`, the descriptor (shape, strides, dtype, device, data pointer)
  and its interned layouts;
- :mod:`~fi_ffi.tensor.interop`: :func:`~fi_ffi.as_tensor`, other libraries' tensors described as Tensors;
- :mod:`~fi_ffi.tensor.producers`: per producer type, the layout key and data pointer a call reads;
- :mod:`~fi_ffi.tensor.streams`: reading a stream (or device ordinal) argument (TVM-FFI's current stream is
  :mod:`fi_ffi.abi.streams`');
- :mod:`~fi_ffi.tensor.protocols`: the static types of what the ops accept (``TensorLike``, ``StreamLike``).

Importing this package imports the descriptor alone: the intake modules stand above the TVM-FFI layer
(:mod:`fi_ffi.abi`), which the descriptor stands below.
"""

from .descriptor import MAX_NDIM, WIRE_DEVICE_TYPE, Tensor, contiguous_strides, from_layout, layout_id

__all__ = ["MAX_NDIM", "WIRE_DEVICE_TYPE", "Tensor", "contiguous_strides", "from_layout", "layout_id"]
