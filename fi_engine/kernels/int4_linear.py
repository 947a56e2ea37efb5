"""Linear layers with int4 weights on the GPU (AWQ / GPTQ: a scale and a zero per group of inputs): the registry of a
:class:`~fi_engine.kernels.dense.Dense`'s int4 weights, the GEMV that reads them as stored for a step of few rows
(W4A16), and the dequantizing path for the rest.

Steps of at most :attr:`QuantizedWeights.int4_gemv_max_rows` rows (32): a GEMV of the engine's own on tensor cores
(``gemv4_*`` in ``csrc/int4_gemv.cu``) reads half a byte per weight, decodes each into the exact 16-bit integer
``code + 128`` (float16: ``+ 1024``) once for all rows (an mma's 8 rows per group of 8), and meets each group's scale
and zero in float32 (``s * (sum((code + M) x) - (M + zero) sum(x))``, the sum of x by a second mma; from 17 rows the
zero is subtracted from each decoded pair instead, exactly, which costs less once four groups of rows share it): its
error is float32 summation over the unrounded weights, below that of a 16-bit copy of them. Such a step
is bound by reading the weights, about a quarter of a 16-bit weight's bytes.

A gate/up weight stored with gate and up interleaved by 8 rows (:attr:`Int4Weight.half_n`) has a SiLU form
(``gemv4_*_silu_*``): each lane holds a gate output and its up output, and writes FlashInfer's ``silu_and_mul`` of the
two as the plain GEMV would round them, so the decode step's SiLU launch goes away. Its plain outputs, and its
dequantized rows, are put back in order.

The QKV GEMV has a RoPE form (``gemv4_*_rope_8``, ``Int4Linears.gemv``'s ``rope``, up to 8 rows): FlashInfer's
``apply_rope_pos_ids`` and ``append_paged_kv_cache`` as its epilogue, so the decode step's two launches between the
QKV GEMV and the attention go away. A block serves 16 columns of each half of a head (RoPE pairs ``i`` and ``i + d /
2``) with twice the plain launch's warps, each half summing its tile as the plain GEMV's warps do: the outputs are the
plain GEMV's bits, rotated and appended as those launches would.

More rows (prefill): the weight is dequantized into a 16-bit scratch matrix of the Dense's (``dequant_int4_*``: each
``(code - zero) * scale`` exact in float32 and rounded once, the 16-bit weight a dequantizing loader would have made)
and the 16-bit GEMM runs on it; at that many rows the GEMM's arithmetic, not the extra pass, bounds the step.

The layout the kernels read is :meth:`~fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout`'s: tile-major
``[ceil(n / 16), k / 128, 1024]`` bytes (each kilobyte 16 rows of 128 inputs, so a warp's tile is one contiguous
read) and a uint32 record per row and group (scale and zero), ``k`` a multiple of 128, groups of a power of two of
at least 64 inputs or one group a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cuda_sources import function_ptr, source
from .norm_fold import FOLD_ROWS, FoldIn, FoldOut, fold_ints
from .quantized_linears import QuantizedLinears

__all__ = ["INT4_GEMV_MAX_ROWS", "ROPE_ROWS", "Int4Linears", "Int4Weight"]

INT4_GEMV_MAX_ROWS = 32  # the rows one GEMV launch takes (4 groups of the mma's 8)
ROPE_ROWS = 8  # the rows the GEMV with RoPE and the KV append as its epilogue takes (Int4Linears.gemv's rope)
_COLUMNS = 16  # output columns per block (the mma's m)
_MAX_WARPS = 16  # I4_MAX_WARPS in csrc/int4_gemv.cu (its shared memory holds that many warps' sums)
_TILE = 128  # inputs per tile of the layout
_FUNC_NUM_REGS = 4  # CU_FUNC_ATTRIBUTE_NUM_REGS
_SM_REGISTERS = 65536  # an SM's register file (SM 8.0 to 10.x), given to a warp 256 registers at a time
_U64 = 1 << 64


@dataclass(frozen=True)
class Int4Weight:
    """One registered int4 weight: ``[n, k]`` in the GEMV layout at device address ``w`` (``[ceil(n / 16), k / 128,
    1024]`` bytes), its uint32 records ``[n, k / group_size]`` at ``records``. Addresses as ints."""

    w: int
    n: int
    k: int
    records: int
    group_size: int
    half_n: int = 0
    """0: the rows in order. Else the weight of two stacked projections of ``half_n`` rows each (gate and up), stored
    interleaved by 8 rows (8 of the first, the same 8 of the second, ...): the GEMV's outputs come out in order all
    the same, and its SiLU form pairs each gate column with its up column in one lane (:meth:`Int4Linears.silu`)."""

    @property
    def groups(self) -> int:
        """The groups of inputs of a row (records per row)."""
        return self.k // self.group_size

    @property
    def gshift(self) -> int:
        """log2 of the 64-input half tiles a group spans, as the kernels take it (31: one group a row)."""
        return 31 if self.group_size == self.k else (self.group_size // 64).bit_length() - 1


def _positive(name: str, value: Any, limit: int = 1 << 31) -> int:
    if value.__class__ is not int or not 0 < value < limit:
        raise ValueError(f"{name}: expected an int in [1, {limit}), got {value!r:.40}")
    return int(value)


class Int4Linears(QuantizedLinears[Int4Weight]):
    """The int4 weights one Dense serves and their kernels (compiled on the first :meth:`add`, with NVRTC through
    CuPy; the GEMV needs tensor cores of SM 8.0+); the registry and its launches as
    :class:`~fi_engine.kernels.quantized_linears.QuantizedLinears` keeps them."""

    kind = "int4"

    warps_per_sm = (32, 16, 8)
    """The warps a GEMV launch aims to give each SM (its blocks times their warps, each block 4 to 16 warps and never
    more than the weight's tiles), for launches of up to 8, 16 and 32 rows: a warp holds one tile's loads in flight,
    so shorter matrices want more warps a block; more rows want fewer, since every block reads all of x from L2
    (at 32 rows more than the L1 holds). Measured on an H100 (8B shapes, AWQ; ``bench_gemv.py --int4`` and the
    decode graph, benchmarks/RESULTS.md): at 1 row 32 warps ran the step at 315 tokens/s against 16's 303 and 8's
    276; at 16 rows 16 warps took the four GEMVs in 94 us against 32's 103; at 32 rows 8 warps ran the step at 4,299
    tokens/s against 16's 3,751. Read when a call site is packed (set it on the class to compare)."""

    tiles_ahead = 1
    """The 128-input tiles a warp of the GEMV (up to 16 rows) loads at a time, the next run while it sums one: more
    bytes in flight per warp, more registers. Read when the kernels are compiled (:meth:`options`). The QKV GEMV's
    RoPE form (:meth:`gemv`'s ``rope``: up to 1024 threads a block, so at most 64 registers a thread) spills from 2
    tiles (NVRTC's ptxas on sm_90: 62 registers at 1, 88-100 spilled bytes at 2, 336-400 at 4): slower, not wrong."""

    lean_loop = False
    """Whether the GEMV's warps take the lean loop where they load one tile at a time (:attr:`tiles_ahead` 1, which
    it needs) at up to 16 rows, in the plain, SiLU and RoPE forms (``-DI4_LEAN_LOOP=1``): two sets of registers in
    turn, each loaded while the other is summed, where one set was copied into the other every tile, and each
    record's zero made a 16-bit pair in two instructions where four. The same sums in the same order for the same
    warps a block, so the same bits; but the warps a block come from the kernel's registers (:meth:`_threads`), and
    for groups of 64 at up to 8 rows the lean kernels' 64 (where 56) can give a launch other warps (the 8B QKV: 16
    where 12), whose sums then meet in another order. NVRTC's ptxas for sm_90 counts 147-151 instructions in a tile's
    loop at 8 rows where 162-166 (groups of 64: 158 where 175), 172 where 183-187 at 16 rows; registers 58-60 ->
    63-64 at 8 rows and 74 -> 78 at 16 (the same allocation steps), 56 -> 64 for groups of 64 and 72 -> 77-80 for the
    16-row SiLU form (a step more: fewer warps an SM), none spilled (the RoPE form's groups of 64 spill 4 bytes in
    the plain loop). Off until a GPU has timed it (``bench_llama_tp.py --variants int4-lean``). Read when the kernels
    are compiled (:meth:`options`)."""

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The NVRTC options ``csrc/int4_gemv.cu`` is compiled with: :attr:`tiles_ahead` and :attr:`lean_loop` (what
        ``tools/kernel_fingerprints.py`` compiles too)."""
        ahead, lean = cls.tiles_ahead, cls.lean_loop
        if ahead.__class__ is not int or not 1 <= ahead <= 4:
            raise ValueError(f"Int4Linears.tiles_ahead: expected an int from 1 to 4, got {ahead!r:.40}")
        if lean.__class__ is not bool:
            raise ValueError(f"Int4Linears.lean_loop: expected True or False, got {lean!r:.40}")
        if lean and ahead != 1:
            raise ValueError(
                f"Int4Linears.lean_loop: the lean loop loads one tile at a time; tiles_ahead is {ahead} (set it to 1, "
                f"or lean_loop to False)"
            )
        return (f"-DI4_TILES_AHEAD={ahead}",) + (("-DI4_LEAN_LOOP=1",) if lean else ())

    def __init__(self, launch: Any, ffi: Any, stream: int) -> None:
        super().__init__(launch, ffi, stream)
        self._gemv: dict[tuple[bool, bool, int, bool], int] = {}  # (bf16, f32 out, rows <= R, groups of 64) -> fn
        self._silu: dict[tuple[bool, int, bool], int] = {}  # the SiLU form: (bf16, rows <= R, groups of 64) -> fn
        # the folded norm's forms (norm_fold.py), up to 8 rows: (bf16, "out" | "in" | "silu_in", groups of 64) -> fn
        self._fold: dict[tuple[bool, str, bool], int] = {}
        self._rope: dict[tuple[bool, bool], int] = {}  # the RoPE form (up to 8 rows): (bf16, groups of 64) -> fn
        self._regs: dict[int, int] = {}  # a plain GEMV's fn -> its registers a thread (the warps a block, _threads)

    def add(self, w: int, n: int, k: int, records: int, group_size: int, interleaved: bool = False) -> None:
        """Register the int4 weight ``[n, k]`` at ``w`` (the GEMV layout) with its ``records``; ``interleaved``: two
        stacked projections interleaved by 8 rows (:attr:`Int4Weight.half_n`). ValueError naming the argument: an
        address that is NULL or not 16-byte aligned (``records``: 4), ``k`` not a multiple of 128, a group size
        that is neither ``k`` nor a power of two >= 64 dividing ``k``, an interleaved ``n`` not a multiple of 16;
        RuntimeError where the GPU has no tensor cores the GEMV can use (below SM 8.0)."""
        for name, value, align in (("w", w, 16), ("records", records, 4)):
            if value.__class__ is not int or not 0 < value < _U64 or value % align:
                raise ValueError(f"{name}: expected a non-NULL device address aligned to {align} bytes, got {value!r}")
        n, k = _positive("n", n), _positive("k", k)
        g = _positive("group_size", group_size)
        if k % _TILE:
            raise ValueError(f"k: the int4 GEMV reads {_TILE}-input tiles, so k must be a multiple of {_TILE}, got {k}")
        if not (g == k or (g >= 64 and g & (g - 1) == 0 and k % g == 0)):
            raise ValueError(
                f"group_size: expected k ({k}) or a power of two >= 64 that divides it, got {g}; dequantize the "
                f"weight to 16 bits instead"
            )
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved: expected True or False, got {type(interleaved).__name__}")
        if interleaved and n % 16:
            raise ValueError(f"n: two projections interleaved by 8 rows need n a multiple of 16, got {n}")
        if g == 64 and records % 8:  # (the GEMV reads a tile's two records, one 8-byte load)
            raise ValueError(
                f"records: groups of 64 are read two at a time: expected 8-byte alignment, got 0x{records:x}"
            )
        self._compile()
        self.weights[w] = Int4Weight(w, n, k, records, g, n // 2 if interleaved else 0)
        self._grow_scratch(2 * n * k)

    def _compile(self) -> None:
        if self._module is not None:
            return
        import cupy

        device = cupy.cuda.Device()
        if int(device.compute_capability) < 80:
            raise RuntimeError(
                f"int4 weights: the int4 GEMV needs tensor cores of SM 8.0 or newer; this GPU is SM "
                f"{device.compute_capability}; serve a 16-bit copy of the checkpoint"
            )
        self._sms = int(device.attributes.get("MultiProcessorCount", 132))
        module = cupy.RawModule(code=source("int4_gemv.cu"), options=self.options())
        for bf16, t in ((True, "bf16"), (False, "f16")):
            for f32 in (False, True):
                for r in (8, 16, 32):
                    for g64 in (False, True):
                        name = f"gemv4_{t}_{'f32' if f32 else t}_{r}{'_g64' if g64 else ''}"
                        self._gemv[(bf16, f32, r, g64)] = function_ptr(module.get_function(name))
                        if not f32:
                            silu = f"gemv4_{t}_silu_{r}{'_g64' if g64 else ''}"
                            self._silu[(bf16, r, g64)] = function_ptr(module.get_function(silu))
            for g64 in (False, True):
                g = "_g64" if g64 else ""
                for form, name in (("out", f"{t}_8{g}_fold_out"), ("in", f"{t}_8{g}_fold_in")):
                    self._fold[(bf16, form, g64)] = function_ptr(module.get_function(f"gemv4_{t}_{name}"))
                self._fold[(bf16, "silu_in", g64)] = function_ptr(module.get_function(f"gemv4_{t}_silu_8{g}_fold_in"))
                self._rope[(bf16, g64)] = function_ptr(module.get_function(f"gemv4_{t}_rope_8{g}"))
            self._dequant[bf16] = function_ptr(module.get_function(f"dequant_int4_{t}"))
        for fn in self._gemv.values():  # (every form of a call site takes the plain launch's warps: _threads)
            self._regs[fn] = cupy.cuda.driver.funcGetAttribute(_FUNC_NUM_REGS, fn)
        self._module = module

    def _threads(self, wt: Int4Weight, rows: int, regs: int) -> int:
        """The threads of a plain GEMV block over ``wt`` for ``rows`` rows, of a kernel of ``regs`` registers a
        thread (every form of the call site takes as many warps, the RoPE form twice). The warps a block from
        :attr:`warps_per_sm`; then, up to 8 rows and where ``regs`` is known (> 0), the fewest warps from there up
        that keep the most warps resident an SM by the registers: blocks of 11 warps of 60 registers fit two an SM
        (22 warps) where blocks of 16 fit two too (32 warps; on an H200 the QKV GEMV at 1-8 rows took 15 % less
        time so). At 16 rows the rule was measured mixed (QKV and down 10-13 % faster, gate/up 10 % slower for one
        warp more a block, O 2 %), so the table's warps stay. A ValueError naming :attr:`warps_per_sm` where it is
        not three ints from 1 to 1024."""
        table = self.warps_per_sm
        ok = isinstance(table, tuple) and len(table) == 3 and all(w.__class__ is int and 1 <= w <= 1024 for w in table)
        if not ok:
            raise ValueError(f"Int4Linears.warps_per_sm: expected three ints from 1 to 1024, got {table!r:.60}")
        per_sm = table[0 if rows <= 8 else 1 if rows <= 16 else 2]
        blocks = -(-wt.n // _COLUMNS)
        top = max(1, min(_MAX_WARPS, wt.k // _TILE))
        warps = max(1, min(top, max(4, -(-per_sm * self._sms // blocks))))
        if rows <= 8 and regs > 0:
            warp_regs = -(-32 * regs // 256) * 256

            def resident(w: int) -> int:
                return _SM_REGISTERS // warp_regs // w * w

            warps = max(range(warps, top + 1), key=lambda w: (resident(w), -w))
        return 32 * warps

    def gemv(
        self,
        rows: int,
        x: int,
        x_ld: int,
        wt: Int4Weight,
        y: int,
        y_ld: int,
        bf16: bool,
        f32: bool,
        silu: bool = False,
        fold: FoldOut | FoldIn | None = None,
        rope: list[int] | None = None,
    ) -> tuple:
        """The packed GEMV launch of ``y[:rows] = x[:rows] @ dequant(wt).T`` (rows <= :data:`INT4_GEMV_MAX_ROWS`;
        ``silu``: its SiLU form, ``y[:rows, :half_n] = silu(gate) * up`` of an interleaved weight, 16-bit y; ``fold``:
        a side of the folded norm, :mod:`~fi_engine.kernels.norm_fold`, up to 8 rows, 16-bit y, a :class:`FoldIn`
        one block more; ``rope``: the QKV GEMV's RoPE form, RoPE and the KV append as its epilogue, up to
        :data:`ROPE_ROWS` rows, 16-bit ``y [rows, n]``, ``rope`` the epilogue's arguments as ``fused_args.rope_ints``
        packs them, checked, ``rope[2]`` the head dim: its blocks serve 16 columns of each half of a head with twice
        the plain launch's warps, each half's as the plain launch's, so each output is the plain GEMV's bits):
        ``(function, grid, threads, params, values)``, or ``()`` where x is not 16-byte aligned (x, x_ld) or a fold
        or RoPE form does not serve the call (the RoPE form: more rows, an interleaved weight, or ``rope`` not 17
        values with a head dim that is a multiple of 32 and divides ``n``); a ValueError where y is not aligned to
        its elements or a field of ``fold`` is bad (:func:`~fi_engine.kernels.norm_fold.fold_ints`). Packed once per
        call site (its ints: values only); at most 4096 kept."""

        # the kernel's arguments after the GEMV's (fold: 7, rope: 17; so the keys of the forms differ in length)
        tail = rope if rope is not None else [] if fold is None else fold_ints(fold)  # (checked before the key)

        def pack() -> tuple[Any, ...]:
            item = 4 if f32 and not silu else 2
            if y % item:  # the kernel stores one element at a time: each must be aligned
                kind = "float32" if item == 4 else "16-bit"
                raise ValueError(f"y: 0x{y:x} must be aligned to {item} bytes (its {kind} elements)")
            if x % 16 or x_ld % 8 or not 0 < rows <= INT4_GEMV_MAX_ROWS:
                return ()
            r, g64 = 8 if rows <= 8 else 16 if rows <= 16 else 32, wt.group_size == 64
            grid, per_block = -(-wt.n // _COLUMNS), 1
            if rope is not None:
                d = rope[2] if len(rope) == 17 else 0
                if silu or f32 or fold is not None or not d or rows > ROPE_ROWS or wt.half_n or wt.n % d or d % 32:
                    return ()
                fn, grid, per_block = self._rope[(bf16, g64)], wt.n // 32, 2
            elif fold is None:
                fn = self._silu[(bf16, r, g64)] if silu else self._gemv[(bf16, f32, r, g64)]
            elif rows > FOLD_ROWS or f32 or (silu and isinstance(fold, FoldOut)):
                return ()
            else:
                form = "out" if isinstance(fold, FoldOut) else "silu_in" if silu else "in"
                fn, grid = self._fold[(bf16, form, g64)], grid + (form != "out")
            # every form of a call site takes the plain launch's warps (the RoPE form twice them): the same sums
            plain = self._gemv.get((bf16, False, r, g64), 0)
            threads = per_block * self._threads(wt, rows, self._regs.get(plain, 0))
            params, values = self._slots(
                [x, wt.w, y, rows, wt.n, wt.k, x_ld, y_ld, wt.records, wt.groups, wt.gshift, wt.half_n, *tail]
            )
            return (fn, grid, threads, params, values)

        return self._kept((rows, x, x_ld, wt.w, y, y_ld, bf16, f32, silu, *tail), pack)  # (a FoldOut's h_out is set)

    def dequantize(self, wt: Int4Weight, bf16: bool, null: Any) -> int:
        """Write ``wt`` dequantized into the 16-bit scratch matrix ``[n, k]`` (bfloat16 or float16; an interleaved
        weight's rows in order: the first projection's, then the second's); its address."""

        def args(out: int) -> list[int]:
            return [wt.w, wt.records, out, wt.n, wt.k, wt.groups, wt.gshift, wt.half_n]

        grid = min(self._sms * 16, -(-(wt.n * wt.k // 32) // 256))
        return self._dequantize(wt, bf16, null, grid, args, "dequant_int4")
