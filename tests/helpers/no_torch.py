"""The check that a code path never imports torch, run in a fresh interpreter (fi_ffi itself is torch-free)."""

from __future__ import annotations

TORCH_SPY = """\
import sys
attempts = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            attempts.append(name)
        return None
sys.meta_path.insert(0, Spy())
"""
"""Python source to run first in the child (``TORCH_SPY + code``): a meta-path hook that records in ``attempts``
every attempt to import torch or a submodule, so a check bites whether or not torch is installed; ``code`` then
asserts ``not attempts``."""
