"""Static types for what fi_ffi's ops accept: tensors (:data:`TensorLike`) and CUDA streams (:data:`StreamLike`).

For type checkers only: nothing here is checked at run time (the ops check every argument themselves and raise
:mod:`fi_ffi.errors` naming it), and importing this module imports neither torch, CuPy nor numpy. The protocols
describe the interchange protocols that :func:`fi_ffi.as_tensor` reads, so any producer that speaks one of them
type-checks without fi_ffi knowing its class:

- :class:`fi_ffi.Tensor`, the descriptor of raw device memory (``Tensor.from_pointer``);
- :class:`SupportsDLPack`: ``__dlpack__`` and ``__dlpack_device__`` (numpy, CuPy, JAX, torch, cuda.core, ...);
- :class:`SupportsCudaArrayInterface`: ``__cuda_array_interface__`` (numba, CuPy, ...);
- :class:`SupportsArrayInterface`: numpy's ``__array_interface__`` (host memory; numpy arrays of ml_dtypes).

The host index arrays that plans read (:data:`IndexLike`) may also be lists or tuples of ints.

A library without type information (CuPy ships none) is ``Any`` to a type checker and is accepted as it is.

Ops that write into a caller's tensor return that tensor: they are typed with :data:`TensorT`, so
``out = fi_ffi.rmsnorm(x, w, out=my_array)`` keeps ``my_array``'s own type.

Streams (:data:`StreamLike`): ``None`` (the producer's current stream), an int ``cudaStream_t``, an object with
``__cuda_stream__`` (cuda.core), a torch stream (``.cuda_stream``), a CuPy stream (``.ptr``) or a cuda.bindings
``CUstream`` / ``cudaStream_t`` (``getPtr()``); see :mod:`fi_ffi.tensor.streams`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from .descriptor import Tensor

__all__ = [
    "BindingsStreamLike",
    "CupyStreamLike",
    "IndexLike",
    "StreamLike",
    "SupportsArrayInterface",
    "SupportsCudaArrayInterface",
    "SupportsCudaStream",
    "SupportsDLPack",
    "TensorLike",
    "TensorT",
    "TorchStreamLike",
]


class SupportsDLPack(Protocol):
    """A DLPack producer: ``__dlpack__(...)`` gives a capsule, ``__dlpack_device__()`` ``(device_type, id)``.

    Both are typed loosely (any arguments, any result) because producers disagree on keyword arguments and on the
    device type's class (an int, an ``IntEnum`` or, in JAX, an ``Enum``).
    """

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        """A DLPack capsule of the memory (fi_ffi passes ``stream`` and, where accepted, ``max_version``)."""
        ...

    def __dlpack_device__(self) -> Any:
        """``(device_type, device_id)`` as DLPack numbers them (1 CPU, 2 CUDA, 3 CUDA host, 13 managed)."""
        ...


class SupportsCudaArrayInterface(Protocol):
    """An object with ``__cuda_array_interface__`` (v2/v3): a mapping with ``shape``, ``typestr``, ``data``, ..."""

    @property
    def __cuda_array_interface__(self) -> Mapping[str, Any]:
        """The interface's mapping (numba's CUDA array interface, v2 or v3)."""
        ...


class SupportsArrayInterface(Protocol):
    """An object with numpy's ``__array_interface__`` (host memory)."""

    @property
    def __array_interface__(self) -> Mapping[str, Any]:
        """numpy's array interface mapping (``shape``, ``typestr``, ``data``, ``strides``)."""
        ...


TensorLike: TypeAlias = Tensor | SupportsDLPack | SupportsCudaArrayInterface | SupportsArrayInterface
"""Any tensor argument of an op: a :class:`fi_ffi.Tensor` or an object of one of the protocols above."""

IndexLike: TypeAlias = TensorLike | Sequence[int]
"""A host int32 index array a plan reads on the host (``qo_indptr``, ``kv_indptr``, ...): a host tensor (numpy,
a CPU :class:`fi_ffi.Tensor`, ...) or a list/tuple of ints."""

TensorT = TypeVar("TensorT", bound=TensorLike)
"""The type of a tensor an op writes and returns as passed (``out``, ``q_rope``, ...)."""


class SupportsCudaStream(Protocol):
    """cuda.core's stream protocol: ``__cuda_stream__()`` gives ``(version, handle)``."""

    def __cuda_stream__(self) -> Any:
        """``(version, handle)``: the protocol's version and the ``cudaStream_t`` as an int."""
        ...


class TorchStreamLike(Protocol):
    """A torch stream: ``torch.cuda.Stream`` (its ``cuda_stream`` is the ``cudaStream_t`` as an int)."""

    @property
    def cuda_stream(self) -> int:
        """The ``cudaStream_t`` value."""
        ...


class CupyStreamLike(Protocol):
    """A CuPy stream: ``cupy.cuda.Stream`` (its ``ptr`` is the ``cudaStream_t`` as an int)."""

    @property
    def ptr(self) -> int:
        """The ``cudaStream_t`` value."""
        ...


class BindingsStreamLike(Protocol):
    """A cuda.bindings ``CUstream`` / ``cudaStream_t`` (``getPtr()`` gives the handle as an int)."""

    def getPtr(self) -> int:
        """The handle's value."""
        ...


StreamLike: TypeAlias = int | SupportsCudaStream | TorchStreamLike | CupyStreamLike | BindingsStreamLike | None
"""A ``stream=`` argument: None, an int ``cudaStream_t`` or a stream object (see the module docstring)."""
