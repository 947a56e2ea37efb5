"""CUDA as fi_ffi uses it: the runtime's results as values or errors, the few driver calls, devices, the machine.

- :mod:`~fi_ffi.cuda.runtime`: every CUDA runtime call's result through one :func:`~fi_ffi.cuda.runtime.check`;
- :mod:`~fi_ffi.cuda.driver`: the driver calls made through cffi (pointer attributes, events, launches);
- :mod:`~fi_ffi.cuda.device`: the current device, and each device's properties, read once;
- :mod:`~fi_ffi.cuda.system`: what the machine offers (driver, runtime, GPUs, glibc), for doctor and smoke.

Nothing here is imported with the package: each module loads its library on first use.
"""
