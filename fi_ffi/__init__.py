"""fi_ffi: call prebuilt FlashInfer kernels through the TVM-FFI C ABI from pure Python (cffi ABI mode).

Importing fi_ffi loads no shared library and imports neither torch nor cffi's parser: the runtime, the CUDA
runtime and each kernel module are loaded on first use. The public surface:

- descriptors: :class:`Tensor` (``Tensor.from_pointer``), :func:`as_tensor`, dtypes and devices in
  :mod:`fi_ffi.dtypes`;
- ops: :mod:`fi_ffi.ops` (norms, paged-KV append, GDN prefill, attention, RoPE, activations, cascade merge,
  bit packing, sampling, top-k); the sampling ops' random state: :class:`Generator`;
- errors: :class:`KernelError`, :class:`LoaderError`, :class:`CudaError` and friends in :mod:`fi_ffi.errors`;
  argument errors are ``ValueError`` / ``TypeError`` (a refused scalar: :class:`ArgumentTypeError` /
  :class:`ArgumentRangeError`, also :class:`FiFFIError`).
"""

# Each public name is stated once. An op by ``@op`` on its def (fi_ffi/launch/registry.py), from which
# ``python tools/gen_init_stub.py`` writes the generated table ``fi_ffi.launch.exports.OPS`` (name -> defining module);
# every other name (dtypes, errors, Tensor, as_tensor...) as a row of _EXPORTS below: name -> the module (relative
# to fi_ffi) that defines it; "" marks a submodule exported under its own name (``from . import dtypes``). The two
# make one table, from which everything else is derived: ``__all__``, the lazy module ``__getattr__`` (PEP 562: a
# name's module is imported on first use, so ``import fi_ffi`` stays light) and ``__dir__``, and the type stub
# ``__init__.pyi`` that type checkers and IDEs read instead of this file (PEP 561), written by the same tool and kept
# equal to what it writes by tests/package/test_exports.py. Why this shape: cuda.core states each public name once,
# as an eager import, which a lazy package cannot do without loading every op module; scientific-python's
# lazy-loader (SPEC 1) pairs a lazy ``__getattr__`` with a ``.pyi`` stub for type checkers, and makes the stub the
# source (parsed with ``ast`` at every import). Here the sources are dict literals instead (the ops' one generated
# from their defs with ``ast`` once, by the tool): they cost nothing at import, a test reads them as data, and the
# stub is generated from them. ``TYPE_CHECKING`` imports would restate every name a second time.

from __future__ import annotations

import importlib
from typing import Any

# The ground floor every op stands on, imported eagerly as before (cheap: no shared library, no cffi parser), so
# that ``fi_ffi.errors`` and ``fi_ffi.tensor`` are there after ``import fi_ffi``.
from . import dtypes, errors, moved, tensor  # noqa: F401
from .launch.exports import OPS as _OPS

moved.install()  # fi_ffi.models and fi_ffi.typing: their old paths, with a DeprecationWarning

__version__ = "0.1.0"

# The names that are not ops, by hand:
_EXPORTS: dict[str, str] = {
    "dtypes": "",
    "bfloat16": "dtypes",
    "Device": "dtypes",
    "DType": "dtypes",
    "float16": "dtypes",
    "float32": "dtypes",
    "int32": "dtypes",
    "int64": "dtypes",
    "uint8": "dtypes",
    "Tensor": "tensor.descriptor",
    "ArgumentRangeError": "errors",
    "ArgumentTypeError": "errors",
    "CudaError": "errors",
    "FiFFIError": "errors",
    "KernelError": "errors",
    "KernelNotFoundError": "errors",
    "LoaderError": "errors",
    "UnsupportedDeviceError": "errors",
    "as_tensor": "tensor.intake",
    "current_stream": "abi.streams",
    "stream_scope": "abi.streams",
    "prepare": "launch.packing",
    "Generator": "generator",
    # the cuBLAS/cuBLASLt error (fi_ffi's bmm_fp8 handle, the engine's GEMMs)
    "CublasError": "errors",
}
# the ops, one row per @op def (generated: see above); a name is either an op or a hand-written row, never both
_EXPORTS.update(_OPS)

__all__ = sorted(("__version__", *_EXPORTS))


def _resolve(name: str, module: str) -> Any:
    """The object ``name`` of ``fi_ffi.<module>`` (``module == ""``: the submodule ``fi_ffi.<name>`` itself)."""
    if not module:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(name, module)
    globals()[name] = value  # once resolved, a plain module attribute: later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
