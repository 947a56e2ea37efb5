"""CUDA as fi_ffi uses it: the runtime's results as values or errors, the few driver calls, devices, the machine.

- :mod:`~fi_ffi.cuda.runtime`: every CUDA runtime call's result through one :func:`~fi_ffi.cuda.runtime.check`;
- :mod:`~fi_ffi.cuda.driver`: the driver calls made through cffi (pointer attributes, events, launches);
- :mod:`~fi_ffi.cuda.device`: the current device, and each device's properties, read once;
- :mod:`~fi_ffi.cuda.system`: what the machine offers (driver, runtime, GPUs, glibc), for doctor and smoke.

The package's public face is :data:`__all__`, the few names a caller outside fi_ffi (the engine, :mod:`fi_engine`,
or an application making its own CUDA calls beside fi_ffi's) needs; the modules above are fi_ffi's own. Importing it
loads nothing: each module loads its library (cuda-bindings, libcuda) on first use.
"""

from __future__ import annotations

from .device import compute_capability
from .driver import ffi as libcuda_ffi
from .driver import load as libcuda
from .runtime import check, driver_error
from .runtime import runtime as cudart
from .system import gpus, no_gpu_message

# ``cudart``, ``libcuda`` and ``libcuda_ffi`` are the modules' ``runtime``, ``load`` and ``ffi`` under names that
# say which library they are outside their module; they cannot keep those names here, where ``runtime`` and
# ``driver`` are the submodules (``from fi_ffi.cuda import driver`` must keep giving the module).
__all__ = ["check", "compute_capability", "cudart", "driver_error", "gpus", "libcuda", "libcuda_ffi", "no_gpu_message"]
