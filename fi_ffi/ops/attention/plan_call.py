"""Calling a module's ``plan`` entry point on a workspace: the pinned-buffer handshake around one launch.

A plan call writes the schedule into the workspace's page-locked buffer and enqueues its copy into the int
workspace on the plan's stream (see :mod:`fi_ffi.ops.attention.workspace`). :func:`call_plan` does, under the
workspace's staging (:meth:`~fi_ffi.ops.attention.workspace.Workspace.staging`: its lock, the wait for the
previous plan's copy, the generation counter, the copy's event): launch. Nothing else: the arguments were
checked before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...abi.objects import Array
from ...dtypes import CUDA
from ...errors import KernelError
from ...tensor.streams import stream_handle
from .workspace import Workspace

__all__ = ["call_plan"]


def call_plan(ws: Workspace, launch: Callable[..., Any], stream: Any, *args: Any, **kwargs: Any) -> tuple[Array, int]:
    """Launch ``launch(*args, **kwargs)`` (a plan entry point) on ``ws`` and ``stream``.

    Returns (the owned schedule Array, the workspace generation the plan belongs to).
    """
    s = stream if stream is None or stream.__class__ is int else stream_handle(stream)
    with ws.staging(0 if s is None else s) as stage:  # s None: recorded below on the stream the launch used
        result = launch(*args, stream=s, **kwargs)
        if result.__class__ is not Array:
            if hasattr(result, "release"):
                result.release()
            raise KernelError(
                "TypeError",
                f"plan returned {type(result).__name__}, expected Array<int>",
                function=getattr(launch, "__name__", "plan"),
            )
        if s is None:  # the launch used TVM-FFI's current stream (a plan's arguments are all descriptors)
            if _get_stream is None:
                _bind()
            stage.record(_get_stream(CUDA, ws.device.device_id))
        generation = stage.generation
    return result, generation


_get_stream: Any = None


def _bind() -> None:
    global _get_stream
    from ...abi.runtime import api

    _get_stream = api().TVMFFIEnvGetStream
