"""The project's scripts under ``tools/`` and ``benchmarks/`` loaded as modules, for the tests that hold them to
their promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[2] / "tools"
BENCHMARKS = TOOLS.parent / "benchmarks"


def load_script(path: Path) -> ModuleType:
    """The script at ``path`` imported as a module named for its file (registered in ``sys.modules``: dataclasses
    look their module up by name)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as module ``name``."""
    return load_script(TOOLS / f"{name}.py")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (the benchmarks are scripts, not a package)."""
    return load_script(BENCHMARKS / f"{name}.py")
