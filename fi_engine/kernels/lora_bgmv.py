"""The LoRA adapters' two launches per projection (``csrc/lora_bgmv.cu``, compiled with NVRTC through CuPy): each
token row reads the adapter of its own GPU slot, in the manner of Punica's BGMV (batched GEMV), so rows of
different adapters and rows of none share one step.

For a projection ``y = x @ W^T`` (``x [rows, k]``, ``y [rows, n]``, 16-bit), after the base GEMM:

- :meth:`LoraBgmv.shrink`: ``t[r, :width] = scale[s] * A[s] @ x[r]`` with ``s = slots[r]``, ``A [slots, width, k]``
  (``width = parts * rank``: q, k and v stack three parts, gate and up two), ``t`` float32;
- :meth:`LoraBgmv.expand`: ``y[r, j] += t[r, p(j) rank : (p(j) + 1) rank] . Bt[s, :, j]`` with ``Bt [slots, rank,
  n]`` (B transposed, so that neighbouring threads read neighbouring columns) and ``p(j)`` the part of output column
  ``j`` (``p = (j >= n0) + (j >= n1)``).

A row whose slot is negative (a request of the base model, a padding row), or whose adapter leaves the projection
alone (bit ``bit`` of ``targets[s]`` clear), is untouched. The slots, scales and targets are device arrays, read by
the kernels: a CUDA graph captures the launches and each replay serves the step's rows. The layout of the slot
arrays is :mod:`fi_engine.lora.slots`'s.

The shrink has two forms, chosen by the row count (:data:`LONG_ROWS`): a decode step's few rows take the form that
splits each output entry's work widest (a block an entry and row, its warps splitting k), a prefill's rows the form
that reads x fewer times (a warp an entry). On an H100, rank 16, q/k/v of the 8B shape: at 4096 rows the shrink took
343 us split against 168 in the long form; at 1-32 rows both take about 9 us.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .cuda_sources import function_ptr, source

__all__ = ["LoraBgmv", "LoraLaunch", "expand_args", "shrink_args"]

SHRINK_WARPS = 8  # warps a shrink block splits k over (one block an output entry and row); entries a long block takes
EXPAND_THREADS = 256  # output columns an expand block computes
MAX_T_WIDTH = 3 * 512  # t's entries per row an expand block stages (three parts of rank 512): 6 KiB of shared memory
LONG_ROWS = 64  # more rows than this take the long shrink (a prefill's)


class LoraLaunch(NamedTuple):
    """One launch of a product: ``long`` (the long shrink's kernel, for more than :data:`LONG_ROWS` rows; an expand
    has one form), its grid and its typed arguments in the kernel's order."""

    long: bool
    grid: tuple[int, int]
    args: tuple[Any, ...]


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value!r:.40}")
    return int(value)


def _address(name: str, value: object, align: int) -> np.uint64:
    address = _int(name, value, 1, (1 << 64) - 1)
    if address % align:
        raise ValueError(f"{name}: the address 0x{address:x} is not {align}-byte aligned")
    return np.uint64(address)


def shrink_args(
    rows: int,
    x: int,
    x_ld: int,
    slots: int,
    scale: int,
    targets: int,
    bit: int,
    a: int,
    a_slot: int,
    width: int,
    k: int,
    t: int,
    t_ld: int,
) -> LoraLaunch:
    """The form, grid and typed arguments of a shrink launch (see :meth:`LoraBgmv.shrink`); ValueError naming the
    argument for a shape the kernel does not take: ``k`` not a multiple of 8, ``x``, ``x_ld`` or ``a`` not 16-byte
    aligned (the kernel loads 8 elements at a time), ``t_ld`` below ``width``."""
    rows = _int("rows", rows, 1, (1 << 31) - 1)
    k = _int("k", k, 8, (1 << 31) - 1)
    if k % 8:
        raise ValueError(f"k: expected a multiple of 8 (the kernel reads 16-byte vectors), got {k}")
    width = _int("width", width, 1, MAX_T_WIDTH)
    x_ld = _int("x_ld", x_ld, k, (1 << 40))
    if x_ld % 8:
        raise ValueError(f"x_ld: expected a multiple of 8 elements (16-byte aligned rows), got {x_ld}")
    t_ld = _int("t_ld", t_ld, width, (1 << 40))
    a_slot = _int("a_slot", a_slot, 0, 1 << 50)
    if a_slot % 8:
        raise ValueError(f"a_slot: expected a multiple of 8 elements (16-byte aligned matrices), got {a_slot}")
    long = rows > LONG_ROWS
    grid = (-(-width // SHRINK_WARPS), rows) if long else (width, rows)
    args = (
        _address("x", x, 16), np.int64(x_ld), _address("slots", slots, 4), _address("scale", scale, 4),
        _address("targets", targets, 4), np.int32(_int("bit", bit, 1, 1 << 30)), _address("a", a, 16),
        np.int64(a_slot), np.int32(width), np.int32(k), _address("t", t, 4), np.int64(t_ld),
    )  # fmt: skip
    return LoraLaunch(long, grid, args)


def expand_args(
    rows: int,
    t: int,
    t_ld: int,
    tw: int,
    slots: int,
    targets: int,
    bit: int,
    bt: int,
    b_slot: int,
    rank: int,
    n: int,
    n0: int,
    n1: int,
    y: int,
    y_ld: int,
) -> LoraLaunch:
    """The grid and typed arguments of an expand launch (see :meth:`LoraBgmv.expand`; one form at any row count: a
    form that kept B's column for a tile of a prefill's rows measured 2.7x slower at 4096 rows on an H200); ValueError
    naming the argument for one the kernel does not take: ``n0 <= n1 <= n`` broken, ``tw`` (t's entries a row reads)
    short of the parts the column split names or above :data:`MAX_T_WIDTH`, ``y_ld`` below ``n``."""
    rows = _int("rows", rows, 1, (1 << 31) - 1)
    rank = _int("rank", rank, 1, 512)
    n = _int("n", n, 1, (1 << 31) - 1)
    n0 = _int("n0", n0, 1, n)
    n1 = _int("n1", n1, n0, n)
    parts = 1 + (n0 < n) + (n1 < n)
    tw = _int("tw", tw, parts * rank, MAX_T_WIDTH)
    t_ld = _int("t_ld", t_ld, tw, 1 << 40)
    y_ld = _int("y_ld", y_ld, n, 1 << 40)
    grid = (-(-n // EXPAND_THREADS), rows)
    args = (
        _address("t", t, 4), np.int64(t_ld), np.int32(tw), _address("slots", slots, 4),
        _address("targets", targets, 4), np.int32(_int("bit", bit, 1, 1 << 30)), _address("bt", bt, 2),
        np.int64(_int("b_slot", b_slot, 0, 1 << 50)), np.int32(rank), np.int32(n), np.int32(n0), np.int32(n1),
        _address("y", y, 2), np.int64(y_ld),
    )  # fmt: skip
    return LoraLaunch(False, grid, args)


class LoraBgmv:
    """The shrink and expand kernels compiled once for ``dtype`` (``"float16"`` or ``"bfloat16"``) on CuPy's current
    device, launched on ``stream`` (a ``cupy.cuda.Stream``). Addresses are ints (device pointers); the caller keeps
    the buffers alive."""

    def __init__(self, dtype: str, stream: Any) -> None:
        if dtype not in ("float16", "bfloat16"):  # before CuPy: named the same with or without a GPU
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r:.40}")
        import cupy

        self.stream = stream
        tag = "bf16" if dtype == "bfloat16" else "f16"
        module = cupy.RawModule(code=source("lora_bgmv.cu"))
        self._shrink = (module.get_function(f"lora_shrink_{tag}"), module.get_function(f"lora_shrink_long_{tag}"))
        self._expand = module.get_function(f"lora_expand_{tag}")
        self._add_scaled = module.get_function(f"lora_add_scaled_{tag}")

    def shrink(
        self, rows: int, x: int, x_ld: int, slots: int, scale: int, targets: int, bit: int, a: int, a_slot: int,
        width: int, k: int, t: int, t_ld: int,
    ) -> None:  # fmt: skip
        """``t[r, :width] = scale[s] * A_s @ x[r]`` for each of ``rows`` rows whose slot ``s = slots[r]`` is >= 0
        and whose ``targets[s]`` has ``bit``: ``x`` 16-bit rows of ``k`` (row stride ``x_ld`` elements), ``A_s`` at
        ``a + s * a_slot`` elements (``[width, k]`` 16-bit), ``scale`` float32 and ``slots``/``targets`` int32
        device arrays by slot, ``t`` float32 rows of stride ``t_ld``."""
        self.launch_shrink(shrink_args(rows, x, x_ld, slots, scale, targets, bit, a, a_slot, width, k, t, t_ld))

    def expand(
        self, rows: int, t: int, t_ld: int, tw: int, slots: int, targets: int, bit: int, bt: int, b_slot: int,
        rank: int, n: int, n0: int, n1: int, y: int, y_ld: int,
    ) -> None:  # fmt: skip
        """``y[r, j] += t[r, p(j) * rank : (p(j) + 1) * rank] . Bt_s[:, j]`` for the rows :meth:`shrink` serves,
        ``p(j) = (j >= n0) + (j >= n1)``: ``Bt_s`` at ``bt + s * b_slot`` elements (``[rank, n]`` 16-bit), ``y``
        16-bit rows of stride ``y_ld``, rounded once; ``tw``: t's entries each row stages (its parts times
        ``rank``)."""
        self.launch_expand(expand_args(rows, t, t_ld, tw, slots, targets, bit, bt, b_slot, rank, n, n0, n1, y, y_ld))

    def add_scaled(
        self, rows: int, z: int, z_ld: int, slots: int, scale: int, targets: int, bit: int, n: int, y: int, y_ld: int
    ) -> None:
        """``y[r, j] = round(y[r, j] + scale[s] * z[r, j])`` (``j < n``) for the rows :meth:`shrink` serves: the
        segment form's expand product ``z`` (16-bit rows of stride ``z_ld``, :mod:`fi_engine.lora.segment_form`)
        added into the projection's output ``y``. ValueError naming the argument where ``n``, ``z_ld`` or ``y_ld``
        is no multiple of 8 or an address not 16-byte aligned (8 columns a thread)."""
        rows = _int("rows", rows, 1, (1 << 31) - 1)
        n = _int("n", n, 8, (1 << 31) - 1)
        for name, value in (("n", n), ("z_ld", z_ld), ("y_ld", y_ld)):
            if _int(name, value, n, 1 << 40) % 8:
                raise ValueError(f"{name}: expected a multiple of 8 (16-byte vectors), got {value}")
        grid = (-(-n // (8 * EXPAND_THREADS)), rows)
        args = (
            _address("z", z, 16), np.int64(z_ld), _address("slots", slots, 4), _address("scale", scale, 4),
            _address("targets", targets, 4), np.int32(_int("bit", bit, 1, 1 << 30)), np.int32(n), _address("y", y, 16),
            np.int64(y_ld),
        )  # fmt: skip
        self._add_scaled(grid, (EXPAND_THREADS,), args, stream=self.stream)

    @property
    def shrink_function(self) -> int:
        """The short (decode) shrink kernel's ``CUfunction`` handle, for a launch packed elsewhere (the fused
        step's: ``DeviceSlots.prepared_shrink``, 1-4 rows) with :func:`shrink_args`' arguments on
        ``32 * SHRINK_WARPS`` threads."""
        return function_ptr(self._shrink[False])

    def launch_shrink(self, launch: LoraLaunch) -> None:
        """A shrink launch of :func:`shrink_args`' form, grid and arguments (checked there: a caller that launches a
        shape again keeps them)."""
        self._shrink[launch.long](launch.grid, (32 * SHRINK_WARPS,), launch.args, stream=self.stream)

    def launch_expand(self, launch: LoraLaunch) -> None:
        """An expand launch of :func:`expand_args`' grid and arguments (its shared memory: the ``tw`` floats)."""
        self._expand(
            launch.grid, (EXPAND_THREADS,), launch.args, shared_mem=4 * int(launch.args[2]), stream=self.stream
        )
