"""What the GPU test modules (``FI_FFI_RUN_GPU_TESTS=1``) need before their first test: torch (and, for those that
compare the engine against transformers, CuPy and transformers), or a skip that says how to install it."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

GPU_TESTS_INSTALL = "pip install -e '.[dev,gpu-tests]'"
"""The install command of the GPU tests' own requirements (torch, transformers: the ``gpu-tests`` extra)."""
TORCH_MISSING = f"the GPU tests compare against torch, which is not installed: {GPU_TESTS_INSTALL}"


def require_torch() -> ModuleType:
    """``torch``, imported; where it is missing, the calling test module is skipped with :data:`TORCH_MISSING`
    (named in the summary) instead of failing at collection with ``ModuleNotFoundError``.

    Called at module level, before anything that imports torch (``helpers.attention_reference``, ...).
    """
    __tracebackhide__ = True  # the skip's location is the caller's line (the test module), not this one
    return pytest.importorskip("torch", reason=TORCH_MISSING)


def engine_against_transformers() -> tuple[ModuleType, ModuleType, ModuleType]:
    """CuPy (the engine's), torch and transformers (the reference's), imported, for a GPU test module that compares
    the engine against transformers; the module is skipped, saying why, where GPU tests are off
    (``FI_FFI_RUN_GPU_TESTS`` not 1) or one of them is missing. Called at module level, before anything that imports
    torch."""
    __tracebackhide__ = True  # the skip's location is the caller's line (the test module), not this one
    if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
        pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)
    cupy = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")
    torch = require_torch()
    transformers = pytest.importorskip("transformers", reason="the reference needs transformers (fi-ffi[gpu-tests])")
    return cupy, torch, transformers
