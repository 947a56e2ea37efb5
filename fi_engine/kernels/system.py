"""The machine as fi_ffi sees it, for the rest of the engine: its GPUs, the communicator between them, where a kernel
module comes from, and fi_ffi's errors. Names handed on as fi_ffi defines them (this layer is the engine's one
importer of fi_ffi; tests/package/test_structure.py holds it to that).
"""

from __future__ import annotations

from fi_ffi import __version__ as __version__
from fi_ffi.comm import AllReduceFusionPattern as AllReduceFusionPattern
from fi_ffi.comm import AllReduceFusionWorkspace as AllReduceFusionWorkspace
from fi_ffi.comm import Communicator as Communicator
from fi_ffi.cuda import compute_capability as compute_capability
from fi_ffi.cuda import gpus as gpus
from fi_ffi.cuda import no_gpu_message as no_gpu_message
from fi_ffi.errors import FiFFIError as FiFFIError
from fi_ffi.errors import UnsupportedDeviceError as UnsupportedDeviceError
from fi_ffi.loader import module_source as module_source

__all__: list[str] = []  # fi_ffi's names, documented there
