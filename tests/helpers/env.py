"""The checkout the tests run against, and the environment of the child Python processes they start."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The root of the checkout (``tests/helpers/`` is two folders below it)."""


def make_checkout_importable() -> None:
    """Put the checkout first on ``sys.path`` when ``fi_ffi`` is not installed, so a plain ``pytest`` (which puts
    only ``tests/`` on ``sys.path``) runs against it."""
    if importlib.util.find_spec("fi_ffi") is None:
        sys.path.insert(0, str(REPO))


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with the checkout first on ``PYTHONPATH``, for child Python processes."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_fi_ffi(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m fi_ffi ARGS`` of the checkout in a child process with ``env`` added (its output captured as text,
    ended after ``timeout`` seconds)."""
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**env),
    )
