"""The exceptions fi_ffi raises.

Argument problems found before a kernel is called are ``ValueError`` / ``TypeError`` whose text names the argument
and what was expected; catch them as such (``except (ValueError, TypeError)``, as code written for flashinfer-python
does). Most are plain ``ValueError`` / ``TypeError``: the checks each op makes (shapes, ranks, dtypes, devices,
strides, pointers, plans and workspaces, values such as a head count that must divide another). A Python scalar
that cannot be passed as a kernel's scalar (``eps="x"``, ``eps=10**400``) is refused by the one packer of Python
values, :mod:`fi_ffi.abi.values`, as :class:`ArgumentTypeError` / :class:`ArgumentRangeError`: also a
``TypeError`` / ``ValueError``, and also a :class:`FiFFIError`. So ``except FiFFIError`` catches those argument
errors but not the others: it is the clause for what goes wrong below the argument line, where each problem has a
class of its own:

- :class:`KernelError`: a TVM-FFI call returned non-zero; carries the error kind, message and backtrace.
- :class:`LoaderError` and its subclasses: locating, fetching, verifying, extracting or loading libraries.
- :class:`UnsupportedDeviceError`: the GPU cannot run the requested kernel (for example SM90-only kernels).
- :class:`CudaError`: a CUDA runtime call fi_ffi makes itself (allocation, streams, events, graphs, device
  queries) failed; raised by :func:`fi_ffi.cuda.runtime.check` and carrying the CUDA error code and name.
- :class:`ArgumentTypeError` / :class:`ArgumentRangeError` (exported as ``fi_ffi.ArgumentTypeError`` /
  ``fi_ffi.ArgumentRangeError``): a Python value that cannot be passed as a kernel's scalar (the one packer of
  Python values, :mod:`fi_ffi.abi.values`, raises them); they are also ``TypeError`` / ``ValueError``, so code
  catching those keeps working.
- :class:`CublasError`: a cuBLAS or cuBLASLt call (fi_ffi's ``bmm_fp8`` handle, the engine's GEMMs) returned a
  status other than success; carrying the function, the ``cublasStatus_t`` value and its name.
"""

from __future__ import annotations

from typing import ClassVar


class FiFFIError(Exception):
    """Base class of the errors fi_ffi raises itself (argument errors are ValueError/TypeError).

    Of the argument errors, only a scalar the packer refuses (:class:`ArgumentTypeError`,
    :class:`ArgumentRangeError`) is also a FiFFIError; a wrong shape, dtype or device is a plain ``ValueError`` /
    ``TypeError``. Catch argument errors with ``except (ValueError, TypeError)``.
    """


class ArgumentTypeError(FiFFIError, TypeError):
    """A value of a type the parameter does not take (a bool or a float for an int, a non-text for a string).

    The text names the argument, the expected type and the type given.
    """


class ArgumentRangeError(FiFFIError, ValueError):
    """A value of the right type outside what the wire type holds (an int past int64, a float past float64).

    The text names the argument, the value, the range and the fix.
    """


class KernelError(FiFFIError):
    """A TVM-FFI function returned an error.

    Attributes:
        kind: the TVM-FFI error kind, e.g. ``"TypeError"``, ``"ValueError"``, ``"InternalError"``.
        message: the error message as the callee raised it.
        backtrace: the callee's backtrace text (most recent frame first); may be empty.
        function: the name of the function or kernel entry point that was called.
        arguments: a short description of the packed arguments, one item per argument.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        backtrace: str = "",
        function: str = "",
        arguments: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.message = message
        self.backtrace = backtrace
        self.function = function
        self.arguments = arguments
        super().__init__(self._text())

    def _text(self) -> str:
        head = f"{self.kind}: {self.message}"
        if self.function:
            head += f"\n  in call to {self.function}({', '.join(self.arguments)})"
        return head


class LoaderError(FiFFIError):
    """Locating, fetching, verifying, extracting or loading a library failed. The text says how to fix it."""


class LockError(LoaderError):
    """The wheel lock file is malformed or has no entry for this machine."""


class FetchError(LoaderError):
    """A wheel could not be fetched (no network, HTTP error, truncated download, pip failure)."""


class IntegrityError(LoaderError):
    """A file's sha256 does not match the lock."""


class DamagedWheelError(IntegrityError):
    """A wheel that its stamp (or its hash) vouched for could not be unzipped.

    Attributes:
        refetch: True when the damaged copy is fi_ffi's own (in its cache): its stamp was dropped, so the next
            look at it hashes it and replaces it from a good source (a wheelhouse, the lock's ``path``) or
            fetches it again. False for a file fi_ffi does not own (a wheelhouse's), which it never changes.
    """

    def __init__(self, message: str, refetch: bool = False) -> None:
        super().__init__(message)
        self.refetch = refetch


class LibraryLoadError(LoaderError):
    """The dynamic loader refused a shared library (missing dependency, glibc version, wrong architecture)."""


class KernelNotFoundError(LoaderError):
    """The pinned wheels contain no module (variant) or entry point of the requested name."""


class UnsupportedDeviceError(FiFFIError):
    """The device cannot run the requested kernel (for example an SM90-only kernel on another GPU)."""


class CudaError(FiFFIError):
    """A CUDA runtime call that fi_ffi made itself failed (through ``cuda.bindings.runtime``).

    Raised by :func:`fi_ffi.cuda.runtime.check`, the one place that turns a cuda-python ``(err, *values)`` result
    into values or this error. The text names the call, the CUDA error and a fix.

    Attributes:
        what: the call that failed, as the caller described it (e.g. ``"cudaMalloc(1024)"``).
        code: the ``cudaError_t`` value as an int, or None where cuda-bindings itself could not be imported.
        name: the CUDA error name, e.g. ``"cudaErrorMemoryAllocation"`` (``""`` when ``code`` is None).
        description: the runtime's one-line description of the error (``cudaGetErrorString``).
        hint: what to do about it.
    """

    def __init__(self, what: str, code: int | None, name: str, description: str, hint: str) -> None:
        self.what = what
        self.code = code
        self.name = name
        self.description = description
        self.hint = hint
        cause = f"{name}: {description}" if name else description
        super().__init__(f"{what} failed: {cause}. {hint}")

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str, str, str]]:
        # picklable with its fields (worker processes send errors back to the parent)
        return (type(self), (self.what, self.code, self.name, self.description, self.hint))


class CublasError(FiFFIError, RuntimeError):
    """A cuBLAS or cuBLASLt call returned a ``cublasStatus_t`` other than ``CUBLAS_STATUS_SUCCESS`` (both libraries
    share that enum).

    The one convention for both libraries, wherever the call is made (the ``bmm_fp8`` handle in
    :mod:`fi_ffi.launch.cublaslt`, the engine's GEMMs in :mod:`fi_engine.kernels.cublas` and
    :mod:`fi_engine.kernels.cublas_lt`):
    the caller names the function and passes the status, and its name where the library gave one
    (``cublasGetStatusName``; else :attr:`STATUS_NAMES` names it); the text is ``"{function} failed: {name}
    ({status}). {hint}"``. Also a ``RuntimeError``, as the engine's own class was before it joined this tree.

    Attributes:
        function: the cuBLAS/cuBLASLt function that was called, e.g. ``"cublasLtMatmul"``.
        status: its ``cublasStatus_t`` value as an int (``7``: ``CUBLAS_STATUS_INVALID_VALUE``).
        name: the status's name, e.g. ``"CUBLAS_STATUS_INVALID_VALUE"`` (``"unknown cublasStatus_t"`` if none).
        hint: what to do about it.
    """

    #: ``cublasStatus_t`` value -> name (``cublas_api.h``), for a status the library was not asked to name
    STATUS_NAMES: ClassVar[dict[int, str]] = {
        0: "CUBLAS_STATUS_SUCCESS",
        1: "CUBLAS_STATUS_NOT_INITIALIZED",
        3: "CUBLAS_STATUS_ALLOC_FAILED",
        7: "CUBLAS_STATUS_INVALID_VALUE",
        8: "CUBLAS_STATUS_ARCH_MISMATCH",
        11: "CUBLAS_STATUS_MAPPING_ERROR",
        13: "CUBLAS_STATUS_EXECUTION_FAILED",
        14: "CUBLAS_STATUS_INTERNAL_ERROR",
        15: "CUBLAS_STATUS_NOT_SUPPORTED",
        16: "CUBLAS_STATUS_LICENSE_ERROR",
    }

    def __init__(self, function: str, status: int, name: str = "") -> None:
        self.function = function
        self.status = status
        self.name = name or self.STATUS_NAMES.get(status, "unknown cublasStatus_t")
        self.hint = _CUBLAS_HINTS.get(status, _CUBLAS_HINT_OTHER)
        super().__init__(f"{function} failed: {self.name} ({status}). {self.hint}")

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:
        # picklable with its fields (worker processes send errors back to the parent)
        return (type(self), (self.function, self.status, self.name))


# cublasStatus_t values (cublas_api.h) whose fix differs from the general one
_CUBLAS_HINTS = {
    1: "The handle was destroyed or never made: make a new one (a closed engine cannot run GEMMs)",  # NOT_INITIALIZED
    3: "The device is out of memory: free buffers, or ask for smaller ones",  # ALLOC_FAILED
    8: "This GPU's architecture lacks the feature (e.g. FP8 GEMMs need SM89 or newer): use another dtype or GPU",
}
_CUBLAS_HINT_OTHER = (
    "Check the shapes, dtypes and pointers passed; an earlier asynchronous failure can surface here: rerun with "
    "CUDA_LAUNCH_BLOCKING=1 to find the call that caused it"
)
