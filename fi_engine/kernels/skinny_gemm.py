"""The tensor-core GEMM of decode steps of up to 32 rows (``csrc/skinny_gemm.cu``): ``y = x @ W.T`` with ``W`` read
once for all rows, 16-bit, e4m3 (FP8 weights with 128x128-block or per-row scales) or AWQ/GPTQ int4 as the int4 GEMV
reads it: a step of that many rows is still bound by reading the weights. A Dense times it against the GEMV (up to 4
rows) and cuBLASLt (16-bit) or the FP8 and int4 paths once per shape in GPU-bound steps and launches the fastest
(``Dense.linear``).

Each launch is a :class:`Geometry` (a warp's tiles of 16 weight rows, steps in flight, warps a block, how x reaches
the lanes) and a split of k over the grid's y dimension (:meth:`SkinnyGemm.plans`); a split launch adds its ranges'
float32 sums in a fixed order through a scratch of the SkinnyGemm's own (``part``, and a counter per column block
in ``done``, zero between launches), so its output does not depend on the order its blocks finish. The geometries
are those an H100 sweep (``benchmarks/lab_skinny_gemm.py``, 8B shapes, 5-32 rows; benchmarks/RESULTS.md) found
fastest: x read from global memory alongside the weights, or staged in shared memory; and for e4m3 and int4 at 17-32
rows a staged one of two blocks an SM. ``benchmarks/lab_skinny_plans.py`` times every plan a Dense would time.

On Hopper (SM 9.0) int4 weights at 17-32 rows and e4m3 weights at 1-32 rows also have a warpgroup
form (``SKINNY_WG``, :attr:`Geometry.wg`):
four warps multiply their 64 weight rows by x with one ``wgmma`` a k16 product, the decoded weights the A operand from
registers and x, staged in shared memory in the order the lanes' decoded pairs take, the B operand the tensor cores
read themselves. It issues about half the instructions of the ``mma.sync`` form a tile and is offered beside it
(groups of 128 inputs or more; compiled for sm_90a, which where NVRTC refuses leaves the ``mma.sync`` form alone). Its
fastest geometry for most shapes gives each warp two strips of 16 rows (each staged pass of x serving twice the
weight rows), streams their weights through a ring of bulk copies in shared memory (:attr:`Geometry.ring`) and stages
x through registers (:attr:`Geometry.xreg`).

On SM 9.0 its W8A8 form (``E4M3_A8``, on in the engine: :attr:`SkinnyLaunches.w8a8_on`) multiplies 128x128-block
e4m3 weights by x quantized to e4m3 (a scale per row and 128 inputs, as the engine's FP8 GEMM quantizes it) with
Hopper's e4m3 ``wgmma``: the weights' bytes go to the tensor cores as loaded, no decoding, and each k32 product covers
twice the inputs of a 16-bit one. Its geometries are the e4m3 warpgroup form's. ``E4M3_A8Q`` is the same over 16-bit
x, which each block quantizes as it stages a pass (to the bytes and scales the quantizer's launch writes for
``E4M3_A8``): one launch, none before it (:attr:`SkinnyLaunches.w8a8_fused`; the engine offers the in-kernel kind
alone unless :attr:`SkinnyLaunches.w8a8_quantizer` asks for both).

Its W4A8 form (``INT4_A8Q``, an opt-in: :attr:`SkinnyLaunches.w4a8_on`) multiplies int4 weights by x quantized to
int8 in the kernel (a scale per row and 128 inputs) with Hopper's integer ``wgmma``: the codes go to the tensor cores
as bytes (two instructions a word of eight), the sums are exact integers, and each tile's zero is met once, as its
zero times x's sum of codes there.

Its SiLU form (``plans(..., silu=True)``; off in the engine: :attr:`SkinnyLaunches.silu_on`) reads a dense MLP's
16-bit gate/up weight as stored and writes ``silu(x @ gate.T) * (x @ up.T)``: each tile of 16 rows takes 8 gate rows
and the 8 up rows of the same outputs, so each lane holds both sums of its outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .cublas import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
from .cuda_sources import function_ptr, source
from .int4_linear import Int4Weight
from .launch import Launcher

__all__ = [
    "E4M3_A8",
    "E4M3_A8Q",
    "E4M3_BLOCK",
    "E4M3_ROW",
    "GEOMETRIES",
    "INT4",
    "INT4_A8Q",
    "SKINNY_MAX_ROWS",
    "W16",
    "Geometry",
    "SkinnyGemm",
    "SkinnyLaunches",
    "SkinnyPlan",
]

SKINNY_MAX_ROWS = 32  # four groups of the mma's 8
W16, E4M3_BLOCK, E4M3_ROW, INT4 = 0, 1, 2, 3  # weight formats (the kernel's FMT)
# e4m3 block-scaled weights times e4m3 x (W8A8: the warpgroup form only, on Hopper's e4m3 wgmma; x as fp8_quant.cu's
# quant_groups writes it, its scales after its bytes: see SkinnyGemm.plans)
E4M3_A8 = 4
# the same over 16-bit x, which each block quantizes as it stages it (to the bytes and scales of E4M3_A8's x)
E4M3_A8Q = 5
# int4 weights (INT4's layout and records, groups of 128 inputs or more) times 16-bit x, which each block quantizes to
# int8 as it stages it, a scale per row and 128 inputs (W4A8: the warpgroup form only, on Hopper's integer wgmma)
INT4_A8Q = 6
_INT4_FORMATS = (INT4, INT4_A8Q)  # (the int4 layout's: a kilobyte tile of 16 rows and 128 inputs)
_PREFIX = {W16: "skinny", E4M3_BLOCK: "skinny8b", E4M3_ROW: "skinny8r", INT4: "skinny4"}
_SILU_PREFIX = "skinnysilu"  # the SiLU form's kernels (16-bit weights)
# the warpgroup form's (sm_90a)
_WG_PREFIX = {
    INT4: "skinnywg4",
    E4M3_BLOCK: "skinnywg8b",
    E4M3_ROW: "skinnywg8r",
    E4M3_A8: "skinnywg8a",
    E4M3_A8Q: "skinnywg8q",
    INT4_A8Q: "skinnywg4q",
}
WG_OPTIONS = ("-arch=sm_90a",)  # NVRTC's target for the warpgroup form (wgmma exists on sm_90a only)
# put before the warpgroup form's source: a compilation that did not target sm_90a (CuPy adds its own -arch) fails
_WG_REQUIRED = "#define SK_WG_REQUIRED 1\n"
# inputs a lane's 16-byte weight vector covers
_STEP = {W16: 32, E4M3_BLOCK: 64, E4M3_ROW: 64, INT4: 128, E4M3_A8: 64, E4M3_A8Q: 64, INT4_A8Q: 128}
PART_BYTES = 32 << 20  # the split launches' float32 sums
SPLIT_RULE, SPLIT_HALF, SPLIT_WAVES = "rule", "half", "waves"  # SkinnyPlan.split: splits(), half of it, wave_split()
DONE_SLOTS = 1 << 16  # column blocks a split launch may have (a uint32 counter each)


@dataclass(frozen=True)
class Geometry:
    """One launch shape of the kernel: ``nt`` tiles of 16 weight rows a warp, ``u`` steps in flight, ``warps`` a
    block, registers capped for ``min_blocks`` blocks an SM, and ``kx`` inputs of x staged in shared memory at a time
    (0: each lane reads its x from global memory); compiled and offered for ``groups`` groups of 8 rows (1-4)."""

    nt: int
    u: int
    warps: int
    min_blocks: int
    kx: int
    groups: tuple[int, ...] = (1, 2, 3, 4)
    wg: bool = False
    """The warpgroup form (``SKINNY_WG``, int4 and e4m3 weights: Hopper's ``wgmma`` with x staged as its shared-memory
    operand; ``nt`` strips of 16 rows a warp, warps a multiple of 4, x staged; int4 groups and e4m3 blocks of 128
    inputs or more; compiled for sm_90a and offered on SM 9.0 only)."""
    pipe: bool = False
    """The warpgroup form's product sums left running while the next tile is decoded (two sets, alternating by
    product; ``u * nt`` even, each k range whole ``u`` tiles: :attr:`k_unit`), else waited for at once (``nt`` 1
    only)."""
    ring: int = 0
    """The warpgroup form's weights streamed through a ring of this many stages of ``u`` tiles a warp in shared
    memory, one bulk copy (``cp.async.bulk``) a stage, ``ring - 1`` stages in flight while one is summed; 0: ``u``
    tiles in flight in registers."""
    xreg: bool = False
    """The warpgroup form's x staged through registers (16-byte loads a pass ahead, stored in the layout at the pass
    boundary; one block barrier a pass), else by 4-byte asynchronous copies."""

    def name(self, fmt: int, bf16: bool, f32out: bool, mt: int, silu: bool = False) -> str:
        """The kernel's name for ``mt`` groups of 8 rows (``csrc/skinny_gemm.cu``'s ``SKINNY``; ``silu``: its SiLU
        form's, ``SKINNY_SILU``, 16-bit weights and output only; the warpgroup form's, ``SKINNY_WG``)."""
        t = "bf16" if bf16 else "f16"
        out = "f32" if f32out else "16"
        g = f"n{self.nt}_u{self.u}_w{self.warps}_b{self.min_blocks}_x{self.kx}"
        if self.wg:
            return f"{_WG_PREFIX[fmt]}_{t}_{out}_m{mt}_{g}_p{int(self.pipe)}_r{self.ring}_s{int(self.xreg)}"
        return f"{_SILU_PREFIX if silu else _PREFIX[fmt]}_{t}_{out}_m{mt}_{g}"

    def instance(self, fmt: int, bf16: bool, f32out: bool, mt: int, silu: bool = False) -> str:
        """The ``SKINNY(...)`` (``silu``: ``SKINNY_SILU(...)``; the warpgroup form: ``SKINNY_WG(...)``) line that
        compiles :meth:`name`."""
        t = "true" if bf16 else "false"
        shape = f"{mt}, {self.nt}, {self.u}, {self.warps}, {self.min_blocks}, {self.kx}"
        if self.wg:
            name = f"{_WG_PREFIX[fmt]}_{'bf16' if bf16 else 'f16'}_{'f32' if f32out else '16'}"
            shape += f", {int(self.pipe)}, {self.ring}, {int(self.xreg)}"
            return f"SKINNY_WG({name}, {t}, {str(f32out).lower()}, {fmt}, {shape})"
        if silu:
            return f"SKINNY_SILU({_SILU_PREFIX}_{'bf16' if bf16 else 'f16'}_16, {t}, {shape})"
        prefix = f"{_PREFIX[fmt]}_{'bf16' if bf16 else 'f16'}_{'f32' if f32out else '16'}"
        return f"SKINNY({prefix}, {t}, {'true' if f32out else 'false'}, {fmt}, {shape})"

    @property
    def rows_per_block(self) -> int:
        """Weight rows (outputs) a block serves."""
        return 16 * self.nt * self.warps

    def smem(self, fmt: int, mt: int) -> int:
        """Dynamic shared bytes a launch takes: two passes of staged x (none when x is read from global memory); the
        warpgroup form's ring of weights after them (a kilobyte a tile, an 8-byte mbarrier a stage)."""
        if not self.kx:
            return 0
        if self.wg:  # (wgmma's layout: 128-byte core matrices, no padding; e4m3's ring: 16 rows of 128 u + 64 bytes)
            stage = 1024 * self.u * self.nt if fmt in _INT4_FORMATS else 16 * self.nt * (128 * self.u + 64)
            return 2 * 8 * mt * self.kx * 2 + self.warps * self.ring * (stage + 8)
        return 2 * 8 * mt * (self.kx + (32 if fmt == W16 else 8)) * 2

    @property
    def k_unit(self) -> int:
        """Inputs each k range must be a multiple of beyond a step (0: none): the pipelined warpgroup form's ``u``
        tiles of 128."""
        return 128 * self.u if self.wg and self.pipe else 0


# the candidates a Dense times for each weight format, by the rows' groups of 8 (1-4); every one is compiled into
# csrc/skinny_gemm.cu's default instances (tools/kernel_fingerprints.py fingerprints them; the warpgroup form's there
# compile without wgmma, so only their names and arguments are checked)
_GLOBAL_X16 = Geometry(1, 4, 4, 1, 0)
_STAGED = Geometry(1, 4, 8, 1, 512)
_GLOBAL_X8 = Geometry(1, 2, 8, 1, 0)
# two blocks an SM at 17-32 rows, x staged (the one-block geometries' registers, 135-237 there, hold an SM to one
# block): registers capped at 128, kept where NVRTC's ptxas reports no spills on sm_90 -- e4m3 row scales as
# _STAGED; e4m3 blocks with 2 steps in flight (4 spill); int4 at 25-32 rows only (17-24 spill)
_STAGED_X2 = {
    E4M3_BLOCK: Geometry(1, 2, 8, 2, 512, (3, 4)),
    E4M3_ROW: Geometry(1, 4, 8, 2, 512, (3, 4)),
    INT4: Geometry(1, 2, 8, 2, 512, (4,)),
}
# the int4 warpgroup form (sm_90a, groups of 128 or more) at 17-32 rows, where an H200 sweep found it fastest for
# the 8B shapes (benchmarks/RESULTS.md; at 9-16 rows, faster alone, the step was no faster): one strip a warp, 8 warps,
# one block an SM with the tile sums left running while the next tile is decoded (x staged 256 or 512 inputs at a
# time, 2 or 4 tiles in flight: 167-226 registers with NVRTC 13), the O shape's fastest; and two strips a warp, 4
# warps, two blocks an SM, the weights in a ring of two stages and x staged through registers (227-239 registers), the
# QKV, gate/up and down shapes' fastest: each staged pass of x serves twice the weight rows, and x's coalesced 16-byte
# loads replace the 4-byte copies that held the one-strip form (Nsight Compute: its warps stalled most on their queue)
_WG4 = (
    Geometry(1, 2, 8, 1, 256, (3, 4), True, True),
    Geometry(1, 4, 8, 1, 512, (3, 4), True, True),
    Geometry(2, 2, 4, 2, 256, (3, 4), True, True, 2, True),
)
# the e4m3 warpgroup form (sm_90a; blocks of 128 inputs or more): x staged through registers (the e4m3 A pairs'
# order), one strip a warp with the weights in a ring or in registers, two strips a warp. On an H200 (benchmarks/
# RESULTS.md) they beat the mma.sync form by up to 47 % in a chain of launches at 16-32 rows, but timed alone, as a
# Dense chooses, they win only O and down at 32 rows: the 8B FP8 step 2-4 % faster there, the same at 8-24 rows
_WG8 = (
    Geometry(1, 2, 8, 1, 256, (1, 2, 3, 4), True, True, 2, True),
    Geometry(1, 2, 8, 1, 256, (1, 2, 3, 4), True, True, 0, True),
    Geometry(1, 2, 4, 2, 256, (1, 2, 3, 4), True, True, 2, True),
    Geometry(2, 1, 4, 2, 128, (1, 2, 3, 4), True, True, 2, True),
)
# W4A8 (sm_90a): the e4m3 form's geometries (x quantized through registers as the W8A8 form's) and the int4 form's
# two strips a warp, at every row group
_WG4Q = (*_WG8, Geometry(2, 2, 4, 2, 256, (1, 2, 3, 4), True, True, 2, True))
GEOMETRIES: dict[int, tuple[Geometry, ...]] = {
    W16: (_GLOBAL_X16, _STAGED),
    E4M3_BLOCK: (_GLOBAL_X8, _STAGED, _STAGED_X2[E4M3_BLOCK], *_WG8),
    E4M3_ROW: (_GLOBAL_X8, _STAGED, _STAGED_X2[E4M3_ROW], *_WG8),
    # (int4: 4 x vectors a step; fewer steps in flight)
    INT4: (Geometry(1, 1, 8, 1, 0), Geometry(1, 2, 8, 1, 512), _STAGED_X2[INT4], *_WG4),
    E4M3_A8: _WG8,
    E4M3_A8Q: _WG8,
    INT4_A8Q: _WG4Q,
}


@dataclass(frozen=True)
class SkinnyPlan:
    """One launch: the kernel (``function``, a ``CUfunction`` as an int), ``grid`` (column blocks, k ranges),
    ``threads`` a block, ``smem`` dynamic shared bytes and ``args`` (each an int in an 8-byte slot); ``split``: how
    its k ranges were chosen (:data:`SPLIT_RULE`, :data:`SPLIT_HALF` or :data:`SPLIT_WAVES`), ``resident``: the
    blocks of its kernel an SM holds, ``kernel``: the kernel's name (:meth:`Geometry.name`)."""

    function: int
    grid: tuple[int, int]
    threads: int
    smem: int
    args: tuple[int, ...]
    split: str = "rule"
    resident: int = 1
    kernel: str = ""


def _unit(fmt: int, block_k: int) -> int:
    """The inputs a k range is a multiple of: a step, and whole blocks of scales (``block_k``: their width)."""
    return math.lcm(_STEP[fmt], block_k) if block_k else _STEP[fmt]


def splits(geometry: Geometry, fmt: int, rows: int, n: int, k: int, sms: int, block_k: int = 0) -> int:
    """The k ranges of a launch by rule: the fewest (a power of two) that give the grid 1.5 blocks an SM, each range
    a multiple of a step and of the scales' blocks (``block_k``: their width in inputs, 0: none), the split sums
    within :data:`PART_BYTES`. On the H100 sweep of the 8B shapes at 5-32 rows (``benchmarks/lab_skinny_gemm.py``)
    the fastest split was this one or half of it but for the QKV shape staged at 32 rows (a quarter, 5 % faster);
    :meth:`SkinnyGemm.plans` offers both, and :func:`wave_split`'s where this one's grid leaves the last wave of
    blocks part empty (the rule counts SMs, not the blocks an SM holds)."""
    blocks = -(-n // geometry.rows_per_block)
    most = max(1, k // _unit(fmt, block_k))
    per_split = blocks * geometry.rows_per_block * 8 * -(-rows // 8) * 4  # bytes of one range's float32 sums
    s = 1
    while 2 * blocks * s < 3 * sms and s * 2 <= most and (s * 2) * per_split <= PART_BYTES:
        s *= 2
    return s


WAVE_SPLITS = 16  # the most k ranges a wave-fitted split may take (wave_split)
WAVE_GAIN = 0.05  # how much fuller its waves must be than the rule's split's for a wave-fitted split to be offered
WAVE_NEAR = 0.02  # splits whose waves are this close to the fullest count as equal (the fewest ranges win)


def wave_fill(blocks: int, fmt: int, k: int, s: int, slots: int, block_k: int = 0) -> float:
    """How full the waves of a launch of ``blocks`` column blocks and ``s`` k ranges run, with ``slots`` blocks
    resident at a time on the whole GPU (SMs times the blocks an SM holds of the kernel): the work, ``blocks * k``
    inputs, over what its waves could do, ``ceil(grid / slots) * slots`` blocks each as long as a whole range
    (``grid = blocks * ranges``, ranges of :func:`range_length`; a last shorter range counts as a whole one). 1.0:
    every wave full and every range the same length; equal ranges give ``grid / (ceil(grid / slots) * slots)``."""
    kc = range_length(fmt, k, s, block_k)
    grid = blocks * -(-k // kc)
    return blocks * k / (-(-grid // slots) * slots * kc)


def wave_split(
    geometry: Geometry, fmt: int, rows: int, n: int, k: int, sms: int, resident: int, block_k: int = 0
) -> int | None:
    """A split of k whose grid fills whole waves of ``sms * resident`` blocks (``resident``: the blocks of the
    kernel an SM holds, as the driver's occupancy calculator says), offered beside :func:`splits`' rule where the
    rule's grid leaves a wave part empty: of the splits 1 to :data:`WAVE_SPLITS` (within :data:`PART_BYTES` where
    above one, and at most one range a step or scale block), those whose :func:`wave_fill` is within
    :data:`WAVE_NEAR` of the fullest, the fewest ranges of them; returned where its waves are at least
    :data:`WAVE_GAIN` fuller than the rule's split's, else None. The 8B gate/up shape (224 column blocks of 8 warps)
    on 132 SMs holding one block each: the rule keeps one range (224 blocks, 1.7 waves, 85 % full), this gives 4
    (896 blocks, 6.8 waves, 97 %); holding two, 8 (1,792 blocks, 6.8 waves of 264, 97 %)."""
    blocks = -(-n // geometry.rows_per_block)
    slots = max(1, sms * resident)
    most = max(1, k // _unit(fmt, block_k))
    per_split = blocks * geometry.rows_per_block * 8 * -(-rows // 8) * 4  # bytes of one range's float32 sums
    rule = splits(geometry, fmt, rows, n, k, sms, block_k)
    fills = {
        s: wave_fill(blocks, fmt, k, s, slots, block_k)
        for s in range(1, min(WAVE_SPLITS, most) + 1)
        if s == 1 or s * per_split <= PART_BYTES
    }
    fullest = max(fills.values())
    chosen = min(s for s, fill in fills.items() if fill >= fullest - WAVE_NEAR)
    return chosen if fills[chosen] >= wave_fill(blocks, fmt, k, rule, slots, block_k) + WAVE_GAIN else None


def range_length(fmt: int, k: int, s: int, block_k: int = 0) -> int:
    """Inputs of each of ``s`` ranges of ``k`` (the last may be shorter): a multiple of a step and of ``block_k``."""
    unit = _unit(fmt, block_k)
    per = -(-k // s)
    return -(-per // unit) * unit


def takes(
    fmt: int, rows: int, x: int, x_ld: int, w: int, n: int, k: int, y: int, f32out: bool, block: tuple[int, int] | None
) -> tuple[int, int, int] | None:
    """Whether the kernel serves a call (see :meth:`SkinnyGemm.plans`): ``(bn, bshift, block_k)``, the scale blocks'
    rows, log2 of their width over 64 and their width (16, 0, 0 without block scales), or None."""
    if fmt not in _STEP or not 0 < rows <= SKINNY_MAX_ROWS or not 0 < n < 1 << 31 or not 0 < k < 1 << 30:
        return None
    if k % _STEP[fmt] or x % 16 or x_ld % (16 if fmt == E4M3_A8 else 8) or w % 16 or y % (4 if f32out else 2):
        return None
    if fmt not in (E4M3_BLOCK, E4M3_A8, E4M3_A8Q):
        return 16, 0, 0  # (int4: its group records are read per step, whatever the split)
    if block is None:
        return None
    bn, block_k = block
    if bn <= 0 or bn % 16 or block_k < (128 if fmt in (E4M3_A8, E4M3_A8Q) else 64) or block_k & (block_k - 1):
        return None
    return bn, block_k.bit_length() - 7, block_k  # widths of 64 << bshift inputs


class SkinnyGemm:
    """The kernel's launches for one Dense: compiled with NVRTC (through CuPy) per weight format and type pair on
    first use (:meth:`plans`), the split sums' scratch allocated on the current device. Needs tensor cores of SM 8.0
    or newer (:attr:`available`)."""

    def __init__(self) -> None:
        import cupy

        device = cupy.cuda.Device()
        self.available = int(device.compute_capability) >= 80
        self.warpgroups = device.compute_capability == "90"  # the warpgroup form's sm_90a code runs on SM 9.0 only
        self.warpgroups_error = ""  # why a family of the warpgroup form is off on an SM 9.0 (its compilation failed)
        # the warpgroup form's families (format, bf16, f32out, silu, True) whose compilation failed: left out from then
        # on, each alone, so the plans of families already served keep their indices (a Dense's choices)
        self._refused: set[tuple[int, bool, bool, bool, bool]] = set()
        attrs = device.attributes
        self.sms = int(attrs.get("MultiProcessorCount", 132))
        self._smem_limit = int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 << 10))
        self._modules: dict[tuple[int, bool, bool, bool, bool], Any] = {}  # by (format, bf16, f32out, silu, wg)
        self._fns: dict[str, int] = {}
        self._resident: dict[tuple[int, int, int], int] = {}  # (function, threads, smem) -> blocks an SM holds
        # the split launches' scratch: float32 sums, and a counter per column block (zero between launches)
        self.part = cupy.empty(PART_BYTES, cupy.uint8) if self.available else None
        self.done = cupy.zeros(DONE_SLOTS, cupy.uint32) if self.available else None
        self._part = int(self.part.data.ptr) if self.part is not None else 0
        self._done = int(self.done.data.ptr) if self.done is not None else 0
        if self.done is not None:  # zeroed on CuPy's current stream: done before any Dense stream launches a split
            cupy.cuda.get_current_stream().synchronize()

    def _function(self, geometry: Geometry, fmt: int, bf16: bool, f32out: bool, mt: int, silu: bool = False) -> int:
        name = geometry.name(fmt, bf16, f32out, mt, silu)
        fn = self._fns.get(name)
        if fn is None:
            family = (fmt, bf16, f32out, silu, geometry.wg)
            module = self._modules.get(family)
            if module is None:
                import cupy

                same = [g for g in GEOMETRIES[fmt] if g.wg == geometry.wg]  # (the warpgroup form: a module of its own)
                lines = [g.instance(fmt, bf16, f32out, m, silu) for g in same for m in g.groups]
                code = "#define SKINNY_INSTANCES " + " ".join(lines) + "\n" + source("skinny_gemm.cu")
                if geometry.wg:
                    code = _WG_REQUIRED + code
                options = WG_OPTIONS if geometry.wg else ()
                module = self._modules[family] = cupy.RawModule(code=code, options=options)
            kernel = module.get_function(name)
            kernel.max_dynamic_shared_size_bytes = min(self._smem_limit, geometry.smem(fmt, 4))
            fn = self._fns[name] = function_ptr(kernel)
        return fn

    def resident(self, function: int, threads: int, smem: int, fallback: int = 1) -> int:
        """The blocks of ``threads`` threads and ``smem`` dynamic shared bytes of the kernel ``function`` (a
        ``CUfunction``) an SM holds at once, as the driver's ``cuOccupancyMaxActiveBlocksPerMultiprocessor`` says
        (its registers, shared memory and the SM's limits); asked once per kernel and launch shape. ``fallback``
        where the driver cannot answer (the kernel's ``__launch_bounds__`` minimum, which its registers were capped
        to fit)."""
        key = (function, threads, smem)
        held = self._resident.get(key)
        if held is None:
            try:
                from fi_ffi.cuda import libcuda, libcuda_ffi

                lib = libcuda()
                if lib is not None:
                    out = libcuda_ffi().new("int*")
                    if lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(out, function, threads, smem) == 0 and out[0]:
                        held = self._resident[key] = int(out[0])  # (only the driver's answer is kept)
            except (AttributeError, OSError):  # a driver without the call: the launch bounds' figure
                pass
        return fallback if held is None else held

    def plans(
        self,
        fmt: int,
        call: tuple[int, ...],
        scale: int = 0,
        s_ld: int = 0,
        block: tuple[int, int] | None = None,
        int4: tuple[int, int, int, int] = (0, 0, 0, 0),
        silu: bool = False,
        warpgroups: bool = True,
    ) -> list[SkinnyPlan]:
        """The launches that compute ``y[:rows] = x[:rows] @ W.T`` for the linear call ``call``, ``(rows, x, x_ld, w,
        n, k, y, y_ld, ab_type, c_type)`` as :meth:`~fi_engine.kernels.dense.Dense.linear` takes it (``w`` the
        weight the kernel reads, in format ``fmt``; ``ab_type`` bfloat16 or float16, ``c_type`` float32 or
        ``ab_type``): for each candidate geometry of :data:`GEOMETRIES`, the split by rule (:func:`splits`), half of
        it, and the split whose grid fills whole waves of the SMs (:func:`wave_split`, where it beats the rule's); or
        ``[]`` where the kernel does not serve the call: rows outside ``[1, 32]``, ``k`` not a multiple of a step
        (32 inputs, e4m3 64, int4 128), x, ``x_ld`` or W not 16-byte aligned, ``y`` not aligned to its elements,
        block scales whose rows are not a multiple of 16 or whose width is not 64 times a power of two.
        ``E4M3_A8`` (the W8A8 form, warpgroups only): ``x`` e4m3 bytes at row stride ``x_ld`` bytes (a multiple of
        16), its float32 scales after them as the kernel's comment says (``Fp8Linears.x_quantizer`` writes them);
        block scales of 128 inputs or more. ``E4M3_A8Q``: the same over 16-bit ``x`` as the other formats take it,
        quantized in the kernel. ``INT4_A8Q`` (the W4A8 form, warpgroups only): an int4 weight as ``INT4`` takes it,
        groups of 128 inputs or more, times 16-bit ``x`` quantized to int8 in the kernel.
        ``scale``/``s_ld``/``block``: an e4m3 weight's float32 scales (``block`` None: one per row; else ``(bn,
        bk)``, rows of ``s_ld``). ``int4``: an int4 weight's ``(records, groups a row, gshift, half_n)``
        (:class:`~fi_engine.kernels.int4_linear.Int4Weight`'s). ``silu``: the SiLU form's launches, 16-bit weights
        and output only: ``w`` a gate/up weight of ``n`` (even) rows, the gate's ``n / 2`` first, and ``y`` the
        activation ``[rows, n / 2]`` (row stride ``y_ld``), ``silu(x @ gate.T) * (x @ up.T)``, FlashInfer's
        ``silu_and_mul`` of the plain launch's output. ``warpgroups``: False leaves out the warpgroup form's
        launches (:attr:`Geometry.wg`; offered on an SM 9.0 whose NVRTC compiles sm_90a, for int4 groups of 128
        inputs or more at 17-32 rows (the W4A8 form's at 1-32), e4m3 blocks of 128 inputs or more and row scales at
        its geometries' rows).
        Values only: the caller keeps the buffers alive."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = call
        bf16, f32out = ab_type == CUDA_R_16BF, c_type == CUDA_R_32F
        if silu and (fmt != W16 or f32out or n % 2):
            return []
        taken = takes(fmt, rows, x, x_ld, w, n, k, y, f32out, block)
        if taken is None or not self.available:
            return []
        bn, bshift, block_k = taken
        mt = -(-rows // 8)
        out = []
        for geometry in GEOMETRIES[fmt]:
            family = (fmt, bf16, f32out, silu, geometry.wg)
            if geometry.wg and (not warpgroups or not self.warpgroups or silu or family in self._refused):
                continue  # (the warpgroup form: on SM 9.0, where its module compiled)
            e4m3_blocks = fmt in (E4M3_BLOCK, E4M3_A8, E4M3_A8Q)
            if geometry.wg and ((fmt in _INT4_FORMATS and int4[2] == 0) or (e4m3_blocks and bshift == 0)):
                continue  # (int4 groups and e4m3 blocks of 128 inputs or more: a tile's one factor)
            if geometry.k_unit and k % geometry.k_unit:
                continue  # (the pipelined warpgroup form: every k range whole runs of tiles)
            unit = math.lcm(geometry.k_unit, block_k) if geometry.k_unit and block_k else geometry.k_unit or block_k
            if (
                mt not in geometry.groups
                or geometry.smem(fmt, mt) > self._smem_limit
                or -(-n // geometry.rows_per_block) > DONE_SLOTS
            ):
                continue
            try:
                fn = self._function(geometry, fmt, bf16, f32out, mt, silu)
            except Exception as exc:  # (CuPy's CompileException and the driver's errors have no common base)
                if not geometry.wg:
                    raise
                # an NVRTC without sm_90a (or without this family's instructions): the family is left out from now
                # on, the mma.sync geometries serving its calls
                self._refused.add(family)
                self.warpgroups_error = f"{type(exc).__name__}: {exc}"
                continue
            threads, smem = 32 * geometry.warps, geometry.smem(fmt, mt)
            held = self.resident(fn, threads, smem, geometry.min_blocks)
            best = splits(geometry, fmt, rows, n, k, self.sms, unit)
            chosen = {best: SPLIT_RULE}
            if best > 1:
                chosen[best // 2] = SPLIT_HALF
            waves = wave_split(geometry, fmt, rows, n, k, self.sms, held, unit)
            if waves is not None:
                chosen.setdefault(waves, SPLIT_WAVES)
            if silu:  # (the kernel's q_a: the gate's rows)
                quant = (0, 0, n // 2, 0)
            elif fmt in _INT4_FORMATS:
                quant = (int4[0], int4[1], int4[3], int4[2])
            else:
                quant = (scale, s_ld, bn, bshift)
            ranges: set[int] = set()
            for s, split in chosen.items():
                kc = range_length(fmt, k, s, unit)
                grid = (-(-n // geometry.rows_per_block), -(-k // kc))
                if grid[1] in ranges:  # (two splits may round to the same ranges)
                    continue
                ranges.add(grid[1])
                args = (x, w, y, self._part, self._done, rows, n, k, x_ld, y_ld, kc, *quant)
                name = geometry.name(fmt, bf16, f32out, mt, silu)
                out.append(SkinnyPlan(fn, grid, threads, smem, args, split, held, name))
        return out


class SkinnyLaunches:
    """The skinny GEMM's launches of one Dense, through its ``launcher``: the plans of a :meth:`~fi_engine.kernels.
    dense.Dense.linear` call (:meth:`plans`; the :class:`SkinnyGemm` made at the first) and each call's chosen plan
    packed once (:meth:`run`). Keyed by the call's values: :meth:`forget` where what an address holds changes."""

    on = True
    """Whether GPU-bound steps of up to 32 rows may take the skinny GEMM where it is timed faster than the other
    launches of the shape; False: the GEMV (up to 4 rows), cuBLASLt and the FP8 paths only. Read when a shape is
    first timed; set it on the class to compare (``benchmarks/bench_llama_tp.py --variants no-skinny``)."""

    silu_on = False
    """Whether :meth:`~fi_engine.kernels.dense.Dense.gate_up_silu` may time and take the SiLU form (with :attr:`on`);
    False (the default): the gate/up GEMM, then FlashInfer's ``silu_and_mul``, always. Off because on an H200 the
    8B bf16 step at 5-32 rows was no faster with it (benchmarks/RESULTS.md): the form won its timing alone by about
    3 us at 5-8 rows, but the step's tuning kept cuBLASLt then the SiLU launch. ``bench_llama_tp.py --variants
    skinny-silu`` turns it on."""

    w8a8_on = True
    """Whether FP8 weights of 128x128 blocks may take the W8A8 form (``E4M3_A8``, with :attr:`warpgroups_on`; SM 9.0
    only) in steps of more than ``QuantizedWeights.fp8_gemv_max_rows`` rows: x quantized to e4m3 (in the kernel,
    :attr:`w8a8_fused`, and with :attr:`w8a8_quantizer` also into the FP8 scratch first by
    :meth:`~fi_engine.kernels.fp8_linear.Fp8Linears.x_quantizer`, each such plan timed as that pair of launches), then
    Hopper's e4m3 ``wgmma`` over both. Its products are those of cuBLASLt's FP8 GEMM, which serves such rows with x
    quantized per row and 128 inputs alike. On by default (the 8B FP8 step 14-16 % faster at 16 rows on an H200:
    benchmarks/RESULTS.md); ``bench_llama_tp.py --variants no-w8a8`` turns it off. Read, with ``QuantizedWeights``' FP8
    switches, when a shape is first timed and a call packed (set it before the engine warms up)."""

    w8a8_fused = True
    """Whether the W8A8 form (:attr:`w8a8_on`) offers its plans that quantize x in the kernel as they stage it
    (``E4M3_A8Q``: one launch). Read when a shape is first timed and a call packed, as :attr:`w8a8_on` (set it before
    the engine warms up: the plans' indices depend on it; ``bench_llama_tp.py --variants w8a8-quantizer`` turns it
    off and :attr:`w8a8_quantizer` on)."""

    w8a8_quantizer = False
    """Whether the W8A8 form (:attr:`w8a8_on`) also offers its plans over x quantized into the FP8 scratch by a launch
    of its own first (``E4M3_A8``: the quantizer, then the GEMM), after the in-kernel ones; the Dense then times both
    kinds and keeps the faster for each shape. Both stage the same bytes and scales, so give the same outputs bit for
    bit. Off: timed alone, the quantizer's kind wins wide shapes (each block of the in-kernel kind quantizes the x it
    stages, which costs gate/up's many column blocks more than one launch does), but on an H200 the 8B FP8 step with
    both kinds offered was 2 % slower at 16 rows and 1 % at 32 than with the in-kernel kind alone
    (benchmarks/RESULTS.md). Read as :attr:`w8a8_fused` (``bench_llama_tp.py --variants w8a8-both`` turns it on,
    ``w8a8-quantizer`` offers that kind alone)."""

    w4a8_on = False
    """Whether int4 weights (groups of 128 inputs or more) may take the W4A8 form (``INT4_A8Q``, with
    :attr:`warpgroups_on`; SM 9.0 only): x quantized to int8 in the kernel, a scale per row and 128 inputs, then
    Hopper's integer ``wgmma`` over the codes (exact int32 sums, each tile's zero met there). Off by default and meant
    to stay an opt-in: it changes the products (x rounded to 8 bits, relative error about ``2**-9`` of each group's
    largest value), which the 16-bit int4 paths keep exact, and where it serves depends on which launch each shape
    times fastest. ``bench_llama_tp.py --variants skinny-w4a8`` turns it on. Read when a shape is first timed and a
    call packed (set it before the engine warms up: the plans' indices depend on it)."""

    warpgroups_on = True
    """Whether int4 and FP8 weights may take the warpgroup form (``Geometry.wg``; SM 9.0 only); False: the
    ``mma.sync`` geometries only (and no W8A8 or W4A8 form). (``bench_llama_tp.py --variants no-wg4`` and ``no-wg8``
    leave the form out for int4 or FP8 weights alone.)"""

    error = ""
    """Why the skinny GEMM is unavailable, where it is."""

    def __init__(self, launcher: Launcher, quantized: Any = None) -> None:
        """``quantized``: the Dense's :class:`~fi_engine.kernels.quantized_weights.QuantizedWeights`, whose FP8
        registry quantizes x for the W8A8 form (None: no W8A8 form)."""
        self._launcher = launcher
        self._quantized = quantized  # the Dense's QuantizedWeights: its FP8 registry quantizes x for the W8A8 form
        self._gemm: SkinnyGemm | bool | None = None  # made at the first plans; False: it could not be
        # a call's packed launch, by (call, plan index, SiLU form) (values only)
        self._calls: dict[tuple[Any, ...], Any] = {}

    def plans(self, key: tuple[int, ...], quant: Any, silu: bool = False) -> list[SkinnyPlan]:
        """The launches for the linear call ``key`` (``(rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)``) over a
        16-bit weight (``quant`` None) or the registered FP8 or int4 weight ``quant`` (``[]`` where the kernel does not
        serve the call, or :attr:`on` is off); ``silu``: the SiLU form's over a 16-bit gate/up weight, ``y`` the
        activation (:meth:`SkinnyGemm.plans`; ``[]`` where :attr:`silu_on` is off). Over a 128x128-block FP8 weight with
        :attr:`w8a8_on`, the W8A8 form's plans follow the e4m3 form's (:attr:`w8a8_fused`: over x as it is, quantized in
        the kernel; then :attr:`w8a8_quantizer`: over the FP8 scratch that the quantizer fills first,
        :meth:`_x_quantizer`); over an int4
        weight with :attr:`w4a8_on`, the W4A8 form's follow the int4 form's. Makes the
        SkinnyGemm at the first call; a GPU or NVRTC it cannot serve leaves it off (:attr:`error`)."""
        ab_type, c_type = key[8:]
        if not self.on or ab_type not in (CUDA_R_16BF, CUDA_R_16F) or c_type not in (ab_type, CUDA_R_32F):
            return []
        if silu and (quant is not None or not self.silu_on):
            return []
        if self._gemm is None:
            try:
                self._gemm = SkinnyGemm()
            except Exception as exc:  # NVRTC or the device refusing: the other launches serve every shape
                self._gemm, self.error = False, f"{type(exc).__name__}: {exc}"
        gemm = self._gemm
        if not isinstance(gemm, SkinnyGemm):
            return []
        if quant is None:
            return gemm.plans(W16, key, silu=silu)
        call = (*key[:3], quant.w, *key[4:])  # the same call over the registered weight's own bytes
        if isinstance(quant, Int4Weight):
            int4 = (quant.records, quant.groups, quant.gshift, quant.half_n)
            plans = gemm.plans(INT4, call, int4=int4, warpgroups=self.warpgroups_on)
            if self.w4a8_on and self.warpgroups_on:  # (the W4A8 form's plans after the int4 form's)
                plans += gemm.plans(INT4_A8Q, call, int4=int4)
            return plans
        fmt = E4M3_ROW if quant.block is None else E4M3_BLOCK
        s_ld = -(-quant.k // quant.block[1]) if quant.block else 0
        plans = gemm.plans(fmt, call, quant.scales, s_ld, quant.block, warpgroups=self.warpgroups_on)
        if fmt != E4M3_BLOCK or not gemm.warpgroups or not self._w8a8_serves(key, quant):
            return plans
        if self.w8a8_fused:  # (the W8A8 form after the e4m3 form's plans: x quantized in the kernel ...)
            plans += gemm.plans(E4M3_A8Q, call, quant.scales, s_ld, quant.block, warpgroups=self.warpgroups_on)
        x8 = self._x_quantizer(key, quant) if self.w8a8_quantizer else None
        if x8 is not None:  # (... then over x quantized at x8[0] first, row stride k)
            call8 = (key[0], x8[0], quant.k, quant.w, *key[4:])
            plans += gemm.plans(E4M3_A8, call8, quant.scales, s_ld, quant.block, warpgroups=self.warpgroups_on)
        return plans

    def _w8a8_serves(self, key: tuple[int, ...], quant: Any) -> bool:
        """Whether the W8A8 form may serve the call ``key`` over the FP8 weight ``quant``: the form on
        (:attr:`w8a8_on`, :attr:`warpgroups_on`), a Dense with an FP8 registry, and rows the engine quantizes x for
        (above ``QuantizedWeights.fp8_gemv_max_rows``, its W8A8 switches on for block weights, 128x128 blocks and
        ``n`` a multiple of 128). (Where cuBLASLt offers no FP8 algorithm the engine dequantizes instead; this form
        still quantizes x there.)"""
        q = self._quantized
        if not (self.w8a8_on and self.warpgroups_on) or getattr(q, "fp8", None) is None:
            return False
        if key[0] <= q.fp8_gemv_max_rows or not (q.fp8_w8a8 and q.fp8_w8a8_blocks):
            return False  # (x quantized only where the engine's FP8 GEMM quantizes it too: the same products)
        return bool(quant.block == (128, 128) and quant.n % 128 == 0)  # (the blocks cuBLASLt's FP8 GEMM takes)

    def _x_quantizer(self, key: tuple[int, ...], quant: Any) -> tuple[int, Any] | None:
        """The W8A8 form's x quantization for the call ``key`` over the FP8 weight ``quant`` (``Fp8Linears.
        x_quantizer``'s ``(xq, launch)``), or None where the form does not serve the call (:meth:`_w8a8_serves`) or
        the quantizer cannot."""
        if not self._w8a8_serves(key, quant):
            return None
        rows, x, x_ld, ab_type = key[0], key[1], key[2], key[8]
        return self._quantized.fp8.x_quantizer(rows, x, x_ld, quant.k, ab_type == CUDA_R_16BF, self._launcher.null)

    def run(self, key: tuple[int, ...], index: int, quant: Any, silu: bool = False) -> bool:
        """Launch plan ``index`` of the call ``key`` (over the FP8 or int4 weight ``quant``, or a 16-bit one; ``silu``:
        of the SiLU form, :meth:`plans`), packed once per call (values only; at most 4096 kept) and launched with
        programmatic dependent launch; False where the call has no such plan (a shape timed on aligned buffers, called
        on others). A W8A8 plan over the quantizer's x (:attr:`w8a8_quantizer`) is two launches, packed together: the
        quantizer into the FP8 scratch, without programmatic dependent launch (so it starts after every earlier launch
        has ended: none still reads the scratch), then the GEMM."""
        packed = self._calls.get((key, index, silu))
        if packed is None:
            plans = self.plans(key, quant, silu)
            if index >= len(plans):
                return False
            plan = plans[index]
            launcher = self._launcher
            params, values = launcher.slots(list(plan.args))
            packed = launcher.prepared(
                plan.function, plan.grid[0], plan.threads, plan.smem, params, values, "skinny gemm", True, plan.grid[1]
            )
            if plan.kernel.startswith(_WG_PREFIX[E4M3_A8]):  # the W8A8 form: x quantized first, packed once with it
                x8 = self._x_quantizer(key, quant)
                if x8 is None:
                    return False
                quantize, gemm = x8[1], packed

                def packed() -> None:
                    quantize()
                    gemm()

            if len(self._calls) > 4096:
                self._calls.clear()
            self._calls[(key, index, silu)] = packed
        packed()
        return True

    def forget(self) -> None:
        """Drop the packed launches (a quantized weight registered or removed changes what an address holds)."""
        self._calls.clear()

    def close(self) -> None:
        """Drop the packed launches and the SkinnyGemm (its scratch)."""
        self._calls.clear()
        self._gemm = None
