"""Optional packages of the engine's text layer, imported on first use.

``tokenizers`` (the checkpoint's ``tokenizer.json``) and ``jinja2`` (its chat template) belong to the ``engine``
extra but are not needed to import :mod:`fi_engine` or to run it on token ids: nothing imports them at module
level, and a missing one is a :class:`ModuleNotFoundError` that names the install command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "require"]

INSTALL_HINT = "python -m pip install '.[engine]' in the fi_ffi checkout"


def require(
    module: str, needed_for: str, install: str = f"install the engine's text dependencies with: {INSTALL_HINT}"
) -> ModuleType:
    """Import ``module`` (``"tokenizers"``, ``"jinja2.sandbox"``, ...) or raise ModuleNotFoundError naming what
    needs it (``needed_for``, e.g. ``"reading tokenizer.json"``) and how to install it (``install``: by default
    the ``engine`` extra)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        raise ModuleNotFoundError(
            f"{needed_for} needs the {top!r} package, which is not installed ({exc}); {install}",
            name=exc.name,
        ) from exc
