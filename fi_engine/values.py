"""Checks of single values that the checkpoint readers and host helpers of :mod:`fi_engine` share: an int
argument within bounds, a flag (strictly a bool; or, as fi_ffi's, 0 and 1 too), a numpy array argument of a rank,
a float's float32 bits for a kernel argument slot, a checkpoint directory's path, and a value shown short in an
error message.

The engine's own (it takes no private helper of fi_ffi's): :func:`integer` and :func:`flag` refuse what fi_ffi's
op arguments refuse, with the same messages.

Its own module so that the config readers (:mod:`.config`, :mod:`.family_configs`, :mod:`.deepseek_config`) and
the host helpers (:mod:`.deepseek_routing`, :mod:`.mla_weights`) stand on it without importing one another.
"""

from __future__ import annotations

import math
import os
import reprlib
import struct
from typing import Any

import numpy as np

__all__ = [
    "FLOAT32_MAX",
    "MAX_SIZE",
    "arg_array",
    "arg_flag",
    "arg_int",
    "flag",
    "float32_bits",
    "integer",
    "model_dir_fspath",
    "show",
]

MAX_SIZE = (1 << 31) - 1  # every size and token id reaches the kernels as an int32
FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite value: what a kernel's float argument can hold


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def show(value: Any) -> str:
    """``repr(value)`` cut short (a config may hold a 4000-digit number or a huge list)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
        return f"an integer of {value.bit_length()} bits"
    try:  # reprlib stops at a depth (a deeply nested list would exhaust the recursion limit)
        text = _REPR.repr(value)
    except ValueError:  # an integer past Python's digit limit inside a container
        text = f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def model_dir_fspath(model_dir: Any) -> str | bytes:
    """``os.fspath(model_dir)``, a checkpoint directory's path: TypeError for a value that is no path (str or
    os.PathLike), ValueError for one holding a NUL byte (which no file system call takes)."""
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(
            f"model_dir: expected a path (str or os.PathLike) of a Hugging Face checkpoint directory, got "
            f"{type(model_dir).__name__}"
        )
    fs = os.fspath(model_dir)
    if ("\0" if isinstance(fs, str) else b"\0") in fs:  # type: ignore[operator]
        raise ValueError(f"model_dir: contains a NUL byte: {model_dir!r:.80}; pass the directory's path")
    return fs


def arg_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]`` (a bool or a float is no int), else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {int(value)}")
    return int(value)


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (anything with ``__index__`` but a bool: numpy integers too), at least ``minimum`` when
    given; else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    try:
        value = int(value.__index__())
    except (TypeError, ValueError):  # an array with __index__ that refuses (numpy arrays of size != 1)
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def arg_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's included), else TypeError naming ``name`` (1, "yes" and None are not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {show(value)}")
    return bool(value)


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool (a bool, 0 or 1), else TypeError naming ``name`` (a string would be true)."""
    if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def float32_bits(name: str, value: float) -> int:
    """The IEEE float32 bits of ``value`` as an unsigned int (a kernel's float argument goes into an integer slot),
    else ValueError naming ``name``: no float (a bool is none), NaN, an infinity, or a finite value past float32's
    largest (3.4028235e38), which would reach the kernel as an infinity (``struct.pack`` raises OverflowError)."""
    try:
        packed = b"" if isinstance(value, bool) or not math.isfinite(value) else struct.pack("<f", value)
    except (OverflowError, TypeError, struct.error):
        packed = b""
    if not packed:
        raise ValueError(
            f"{name}: expected a finite float within float32's range (|x| <= 3.4028235e38), got {show(value)}"
        )
    return int.from_bytes(packed, "little")


def arg_array(name: str, value: Any, ndim: int, shape: str) -> np.ndarray:
    """``value`` if it is a ``ndim``-D numpy array of numbers (``shape`` describes it), else TypeError/ValueError
    naming ``name``."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        what = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name}: expected a numpy array of numbers {shape}, got {what}")
    if value.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {shape}, got shape {value.shape}")
    return value
