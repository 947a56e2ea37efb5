"""Tensor parallelism without torch: NCCL communicators and FlashInfer's all-reduce kernels.

- :mod:`.env`: the launcher's variables (torchrun, ``fi-ffi launch``, Open MPI, MPICH/Intel MPI, Slurm).
- :mod:`.rendezvous`: rank 0 hands the NCCL unique id to the others over TCP.
- :mod:`.nccl`: :class:`Communicator` (nccl4py or CuPy's NCCL; the ``comm`` extra).
- :mod:`.launch`: ``fi-ffi launch --nproc N -- cmd``.
- :mod:`.cuda`: the CUDA runtime calls of this package (device memory, streams, legacy IPC handles).
- :mod:`.ipc`: :class:`~.ipc.IpcBuffer`, device memory of every rank mapped into each (one host).
- :mod:`.control`: packing of the kernels' set-up calls (lists of ints, dtypes) from their declarations.
- :mod:`.vllm_ar`: vLLM's custom all-reduce (``vllm_comm``), :class:`~.vllm_ar.CustomAllReduce`.
- :mod:`.trtllm_ar`: TensorRT-LLM's fused all-reduce, MoE fusions (``trtllm_comm``),
  :class:`~.trtllm_ar.AllReduceFusionWorkspace`.

Nothing here imports NCCL, CuPy or torch until a communicator is made.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .env import DistEnv, LaunchEnvironmentError, read_env
from .nccl import Communicator, NcclError, NcclUnavailableError
from .rendezvous import RendezvousError

if TYPE_CHECKING:
    from .trtllm_ar import AllReduceFusionPattern, AllReduceFusionWorkspace

# Names of a submodule that imports the calling engine (fi_ffi.launch): resolved on first use, so that
# ``import fi_ffi.comm`` stays as light as before (a communicator needs none of them).
_LAZY = {"AllReduceFusionPattern": "trtllm_ar", "AllReduceFusionWorkspace": "trtllm_ar"}

__all__ = [
    "AllReduceFusionPattern",
    "AllReduceFusionWorkspace",
    "Communicator",
    "DistEnv",
    "LaunchEnvironmentError",
    "NcclError",
    "NcclUnavailableError",
    "RendezvousError",
    "read_env",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
