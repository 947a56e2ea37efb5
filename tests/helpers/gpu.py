"""What the GPU test modules (``FI_FFI_RUN_GPU_TESTS=1``) need before their first test: torch, or a skip that
says how to install it."""

from __future__ import annotations

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
