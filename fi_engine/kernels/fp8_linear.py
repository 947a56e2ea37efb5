"""Linear layers with e4m3 weights on the GPU: the registry of a :class:`~fi_engine.kernels.dense.Dense`'s FP8 weights,
the GEMV that reads them as stored for a step of few rows (W8A16), and the FP8 tensor-core GEMM for the rest (W8A8).

Steps of at most :attr:`QuantizedWeights.fp8_gemv_max_rows` rows (8): W8A16, 16-bit activations times e4m3 weights
scaled in registers, by a GEMV of the engine's own that reads the weights as stored (up to :data:`FP8_GEMV_MAX_ROWS`
rows per launch). Such a step is bound by reading the weights, and reading one byte per weight instead of two is the
whole gain there; its sums stay float32 over unquantized activations, so its error is the weights' own. From 3 rows
(:attr:`Fp8Linears.tensor_core_rows`) it runs on tensor cores, each weight decoded once into a 16-bit pair for all rows;
below, each lane widens its weights to float32 and sums per row (on an H100 the tensor-core one, which issues half the
instructions, was no faster at one row: the loads, not the decoding, bound a one-row step).

More rows (prefill, decode batches from 9 rows): W8A8 through cuBLASLt's FP8 tensor-core GEMM (:meth:`Fp8Linears.w8a8`).
The activations are quantized to e4m3 on the fly (dynamic scales: one per row for per-tensor and per-channel weights, as
vLLM's per-token scheme; one per row and 128 columns for 128x128-block weights, the DeepSeek-V3 / Qwen3-FP8 recipe), by
a kernel of the engine's own, and the GEMM applies both operands' scales (cuBLASLt's OUTER_VEC_32F, or BLK128x128_32F
for the weight and VEC128_32F for the activations; the block scales handed over in a copy whose rows are padded to 4
floats, since cuBLASLt reads them at 16-byte strides). Measured on an H100 it takes 0.55-0.75x the time of the 16-bit
GEMM on the 8B shapes from 4 rows up; up to 8 rows the tensor-core GEMV beats it (8B decode graph at 4 and 8 rows: 915
and 1,792 tokens/s against the GEMM's 832 and 1,636). cuBLASLt takes no block-scaled call of a row count that is not a
multiple of 4: above 8 rows the last few rows go through the GEMV. A checkpoint's static ``input_scale`` is not used:
scales computed per row are never coarser. Where cuBLASLt offers no algorithm (older than 12.9, a GPU without FP8 tensor
cores, a block other than 128x128) the weight is dequantized into a 16-bit scratch matrix of the Dense's and the 16-bit
GEMM runs on it (W8A16, exact to the 16-bit rounding of each scaled weight; it reads 5 bytes per weight).
:attr:`QuantizedWeights.fp8_w8a8` turns the tensor-core GEMM off, :attr:`QuantizedWeights.fp8_w8a8_blocks` for
128x128-block weights only.

Scales, as :meth:`Fp8Linears.add` takes them: float32, either one per output row (``block`` None: per-tensor
checkpoints repeat their scalar over the rows, per-channel ones give theirs) or one per block of ``bn`` rows by
``bk`` columns (``block=(bn, bk)``, ``bk`` a power of two >= 16: the 128x128 layout of Qwen3-FP8 and
DeepSeek-V3), row-major ``[ceil(n / bn), ceil(k / bk)]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cuda_sources import function_ptr, source
from .norm_fold import FoldOut, fold_ints
from .quantized_linears import QuantizedLinears

__all__ = ["FP8_GEMV_MAX_ROWS", "PAIR_MAX_ROWS", "PAIR_ROPE", "PAIR_SILU", "Fp8Linears", "Fp8Weight"]

FP8_GEMV_MAX_ROWS = 8  # the rows one FP8 GEMV launch takes (one float32 sum per row in registers)
PAIR_SILU = 1  # the pairwise epilogues of the FP8 decode GEMVs (EPI in gemv8_pairs): silu(gate) * up
PAIR_ROPE = 2  # RoPE of the q and k heads and the KV append
PAIR_MAX_ROWS = 4  # the rows one launch of those takes (the fused decode step's, FusedGemvs.fits)
PAIR_THREADS = 128  # 4 warps a block (SPLITS), two pairs of output columns each (one row: one pair a group)
_COLS = 4  # output columns per block (COLS in csrc/fp8_gemv.cu; one row: 2 a group, gemv8_one_row)
_THREADS = 128  # 4 warps a block, each summing a share of every column's k (SPLITS there)
_TC_COLUMNS = 16  # output columns per block of the tensor-core GEMV (gemv8tc_*: the mma's m)
_U64 = 1 << 64


@dataclass(frozen=True)
class Fp8Weight:
    """One registered e4m3 weight: ``[n, k]`` row-major at device address ``w``, its float32 scales at ``scales``
    (``block`` None: ``[n]``; else ``(bn, bk)`` and ``[ceil(n / bn), ceil(k / bk)]``). Addresses as ints."""

    w: int
    n: int
    k: int
    scales: int
    block: tuple[int, int] | None
    # the scales as cuBLASLt's FP8 GEMM reads them: for 128x128 blocks, rows of ceil(k / 128) rounded up to a
    # multiple of 4 (16-byte strides; measured: unpadded rows give wrong products), a padded copy where they differ
    lt_scales: int = 0

    @property
    def scale_args(self) -> tuple[int, int, int, int]:
        """``(s_ld, bn, shift, block)`` as the kernels take them: the scale row stride, rows per block, log2 of
        the 16-byte vectors per block along k, and whether scales are per block."""
        if self.block is None:
            return 0, 1, 0, 0
        bn, bk = self.block
        return -(-self.k // bk), bn, (bk // 16).bit_length() - 1, 1


def _positive(name: str, value: Any, limit: int = 1 << 31) -> int:
    if value.__class__ is not int or not 0 < value < limit:
        raise ValueError(f"{name}: expected an int in [1, {limit}), got {value!r}")
    return int(value)


class Fp8Linears(QuantizedLinears[Fp8Weight]):
    """The FP8 weights one Dense serves and their kernels (compiled on the first :meth:`add`, with NVRTC through
    CuPy; they decode e4m3 with integer operations, so any GPU the engine runs on serves them, not only SM 8.9+);
    the registry and its launches as :class:`~fi_engine.kernels.quantized_linears.QuantizedLinears` keeps them (the
    engine keeps its weights as long as its Dense)."""

    kind = "FP8"

    tensor_core_rows = 3
    """The GEMV runs on tensor cores from this many rows up (``gemv8tc_*`` in
    ``csrc/fp8_gemv.cu``: SM 8.0+, each weight decoded once for all rows; where it
    serves
    the weight: per-row scales, or blocks of a multiple of 16 rows by a multiple of 128 columns), and as ``gemv8_*``
    (each weight widened per group of rows) below; above 8: never. 3: on an H100 (8B shape, 128x128 blocks, decode
    graph; benchmarks/RESULTS.md) the tensor-core GEMV ran 4 % slower at 1 row, as fast at 2, and 10 % faster at 4
    and 8 rows than the FP8 GEMM that served those rows before. Read when a call site is packed (set it on the
    class, before the engine is made, to compare)."""

    lean_loop = False
    """Whether the tensor-core GEMV (``gemv8tc_*``, and its SiLU and RoPE forms) takes the lean loop where ``k`` is a
    multiple of 128 (``-DFP8_LEAN_LOOP=1``, ``csrc/fp8_tensor_cores.cuh``'s ``tc_sums_whole``): every chunk whole,
    so no load is predicated and no register zeroed for one, and two sets of weight registers in turn where one set
    was copied into the other every chunk. The same sums in the same order, so the same outputs. NVRTC's ptxas for
    sm_90 counts 225 instructions a chunk where 273 (block scales) and 212 where 267 (row scales), but registers
    74 -> 80 with block scales (the SiLU form's then spilling 4 bytes, reloaded in the loop), 64 -> 74-76 with row
    scales (which spilled 4-8 bytes and no longer do) and 76 -> 92 for the RoPE form of block scales: fewer warps an
    SM. Off until a GPU has timed it (``bench_llama_tp.py --variants fp8-lean``). Read when the kernels are
    compiled."""

    one_row_blocks_per_sm = 64
    """The blocks a one-row launch of the widening GEMV (``gemv8_*_1``, and its SiLU and RoPE forms) gets per SM, at
    most one per group of two output columns (one pair): each block walks its groups in turn (``gemv8_one_row`` in
    ``csrc/fp8_gemv.cu``), 8 resident an SM. On an H100 (8B shape, 128x128 blocks;
    only
    the gate/up GEMV's 14,336 groups outnumber the blocks there) the batch-1 decode graph ran, tokens/s, at 8: 288.1,
    16: 293.7, 24: 296.2-299.1, 32: 297.2, 64: 298.8-301.2, 128: 299.5-299.7, a block per group: 299.7-300.0
    (benchmarks/RESULTS.md). Read when a call site is packed (set it on the class, before the engine is made, to
    compare)."""

    def __init__(self, launch: Any, ffi: Any, stream: int) -> None:
        super().__init__(launch, ffi, stream)  # (_sms, set at the first compile: the tensor-core GEMV's warps a block)
        self._gemv: dict[tuple[bool, bool, bool, int], int] = {}  # (bf16, f32 out, block, rows <= R) -> CUfunction
        self._tc: dict[tuple[bool, bool, bool], int] = {}  # the tensor-core GEMV: (bf16, f32 out, block) -> CUfunction
        # the fused decode step's GEMVs (a norm, add-norm or SiLU prologue): (mode, bf16, f32 out, block) -> CUfunction
        self._fused: dict[tuple[int, bool, bool, bool], int] = {}
        # the decode step's GEMVs with a pairwise epilogue (SiLU, or RoPE + KV append): (epi, bf16, block, R) ->
        # CUfunction, R the rows one launch serves (1 or 4)
        self._pairs: dict[tuple[int, bool, bool, int], int] = {}
        # their tensor-core form: (epi, bf16, block) -> CUfunction
        self._pairs_tc: dict[tuple[int, bool, bool], int] = {}
        # the folded norm's sides at one row (norm_fold.py): the plain GEMV's FoldOut form, (bf16, block) -> fn, and
        # the pairwise GEMVs' FoldIn form, (epi, bf16, block) -> fn
        self._fold_out: dict[tuple[bool, bool], int] = {}
        self._pairs_fold: dict[tuple[int, bool, bool], int] = {}
        self.fused_error = ""  # why the fused kernels did not compile, if they did not
        self.fused_smem = 0  # the dynamic shared memory (bytes) they may take: the Dense's fused limit less 1 KiB
        # the W8A8 path: the activation quantizers ((bf16, per 128 columns) -> CUfunction; empty where they did not
        # compile, e.g. a GPU below SM 8.9) and each call site's plan (its launches, values only)
        self._quant: dict[tuple[bool, bool], int] = {}
        self.w8a8_error = ""  # why the quantizers did not compile, if they did not
        self._w8a8_plans: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._padded: dict[int, Any] = {}  # weight address -> its block scales padded for cuBLASLt (Fp8Weight)

    def add(self, w: int, n: int, k: int, scales: int, block: tuple[int, int] | None, fused_smem: int = 0) -> None:
        """Register the e4m3 weight ``[n, k]`` at ``w`` with its float32 ``scales`` (see the module docstring).
        ValueError naming the argument: an address that is NULL or not 16-byte aligned (``scales``: 4), ``k`` not
        a multiple of 16, a block that is not two positive ints with ``bk`` a power of two >= 16. ``fused_smem``:
        the dynamic shared memory the fused variants may take (the Dense's; 0: none compiled). 128x128-block scales
        whose rows (``ceil(k / 128)``) are not a multiple of 4 are copied here, padded, for cuBLASLt: register the
        weight again after changing them."""
        for name, value, align in (("w", w, 16), ("scales", scales, 4)):
            if value.__class__ is not int or not 0 < value < _U64 or value % align:
                raise ValueError(f"{name}: expected a non-NULL device address aligned to {align} bytes, got {value!r}")
        n, k = _positive("n", n), _positive("k", k)
        if k % 16:
            raise ValueError(
                f"k: the FP8 GEMV reads 16-byte vectors of weights, so k must be a multiple of 16, got {k}"
            )
        if block is not None:
            ok = isinstance(block, tuple) and len(block) == 2 and all(b.__class__ is int and b > 0 for b in block)
            if not ok or block[1] < 16 or block[1] & (block[1] - 1):
                raise ValueError(
                    f"block: expected (rows, columns), columns a power of two >= 16 (e.g. (128, 128)), got {block!r}"
                )
        self._compile(fused_smem)
        lt_scales = scales
        self._padded.pop(w, None)
        groups = -(-k // 128)
        if block == (128, 128) and groups % 4:
            import cupy

            nb = -(-n // 128)
            given = cupy.ndarray(
                (nb, groups),
                cupy.float32,
                cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(scales, nb * groups * 4, None), 0),
            )
            padded = cupy.zeros((nb, -(-groups // 4) * 4), cupy.float32)
            padded[:, :groups] = given
            cupy.cuda.get_current_stream().synchronize()  # ready whatever stream the GEMMs run on
            self._padded[w] = padded
            lt_scales = int(padded.data.ptr)
        self.weights[w] = Fp8Weight(w, n, k, scales, block, lt_scales)
        self._grow_scratch(2 * n * k)

    @classmethod
    def _lean(cls) -> tuple[str, ...]:
        """The NVRTC option of :attr:`lean_loop` (none by default: the kernels compile as they did before it)."""
        if cls.lean_loop.__class__ is not bool:
            raise ValueError(f"Fp8Linears.lean_loop: expected True or False, got {cls.lean_loop!r:.40}")
        return ("-DFP8_LEAN_LOOP=1",) if cls.lean_loop else ()

    def _compile(self, fused_smem: int) -> None:
        if self._module is not None:
            return
        import cupy

        lean = self._lean()  # (refused here, before any module: not taken for a failed fused module)
        device = cupy.cuda.Device()
        self._sms = int(device.attributes.get("MultiProcessorCount", 132))
        tensor_cores = int(device.compute_capability) >= 80  # mma.sync over 16-bit pairs (below: empty kernels)
        if fused_smem:  # a failure leaves the fused decode step off for FP8 weights, the plain GEMV on
            try:
                fused = cupy.RawModule(code=source("fp8_fused.cu"), options=("--use_fast_math", *lean))
                for bf16, t in ((True, "bf16"), (False, "f16")):
                    for f32 in (False, True):
                        for mode, suffix in ((1, "norm"), (2, "addnorm"), (3, "silu")):
                            for block in (False, True):
                                name = f"gemv8_{t}_{'f32' if f32 else t}_{suffix}_{'block' if block else 'row'}"
                                kernel = fused.get_function(name)
                                if fused_smem > 46 << 10:  # (1 KiB of its own static shared memory more)
                                    kernel.max_dynamic_shared_size_bytes = fused_smem - 1024
                                self._fused[(mode, bf16, f32, block)] = function_ptr(kernel)
                    for epi, suffix in ((PAIR_SILU, "silu"), (PAIR_ROPE, "rope")):
                        for block in (False, True):
                            scales = "block" if block else "row"
                            for r in (1, 4):
                                name = f"gemv8_{t}_{suffix}_{scales}_{r}"
                                self._pairs[(epi, bf16, block, r)] = function_ptr(fused.get_function(name))
                            name = f"gemv8_{t}_{suffix}_{scales}_1_fold_in"
                            self._pairs_fold[(epi, bf16, block)] = function_ptr(fused.get_function(name))
                            if tensor_cores:
                                name = f"gemv8tc_{t}_{suffix}_{scales}"
                                self._pairs_tc[(epi, bf16, block)] = function_ptr(fused.get_function(name))
                self._fused_module, self.fused_smem = fused, fused_smem - 1024
            except Exception as exc:
                self._fused, self._pairs, self._pairs_tc, self._pairs_fold = {}, {}, {}, {}
                self.fused_error = f"{type(exc).__name__}: {exc}"
        try:  # cvt.e4m3x2 needs SM 8.9+: without it, steps of many rows take the dequantizing path
            quant = cupy.RawModule(code=source("fp8_quant.cu"))
            for bf16, t in ((True, "bf16"), (False, "f16")):
                self._quant[(bf16, False)] = function_ptr(quant.get_function(f"quant_rows_{t}"))
                self._quant[(bf16, True)] = function_ptr(quant.get_function(f"quant_groups_{t}"))
            self._quant_module = quant
        except Exception as exc:
            self._quant, self.w8a8_error = {}, f"{type(exc).__name__}: {exc}"
        module = cupy.RawModule(code=source("fp8_gemv.cu"), options=lean)
        for bf16 in (True, False):
            t = "bf16" if bf16 else "f16"
            for f32 in (False, True):
                for block in (False, True):
                    for r in (1, 2, 4, 8):
                        name = f"gemv8_{t}_{'f32' if f32 else t}_{'block' if block else 'row'}_{r}"
                        self._gemv[(bf16, f32, block, r)] = function_ptr(module.get_function(name))
            for block in (False, True):
                name = f"gemv8_{t}_{t}_{'block' if block else 'row'}_1_fold_out"
                self._fold_out[(bf16, block)] = function_ptr(module.get_function(name))
            self._dequant[bf16] = function_ptr(module.get_function(f"dequant_e4m3_{t}"))
        if tensor_cores:
            for bf16 in (True, False):
                t = "bf16" if bf16 else "f16"
                for f32 in (False, True):
                    for block in (False, True):
                        name = f"gemv8tc_{t}_{'f32' if f32 else t}_{'block' if block else 'row'}"
                        self._tc[(bf16, f32, block)] = function_ptr(module.get_function(name))
        self._module = module

    def _forget_packed(self) -> None:
        """Drop the packed launches and the W8A8 plans (their quantized activations live in the scratch too)."""
        super()._forget_packed()
        self._w8a8_plans.clear()

    def fused_fn(self, mode: int, bf16: bool, f32: bool, block: bool) -> int | None:
        """The fused GEMV over e4m3 weights with prologue ``mode`` (1 norm, 2 add-norm, 3 SiLU; see
        ``csrc/fp8_fused.cu``), or None where it did not compile."""
        return self._fused.get((mode, bf16, f32, block))

    def pair_launch_folds(self) -> bool:
        """Whether the folded norm's one-row kernels compiled (:meth:`pair_launch` with ``fold``, :meth:`gemv` with a
        :class:`~fi_engine.kernels.norm_fold.FoldOut`)."""
        return bool(self._pairs_fold) and bool(self._fold_out)

    def pair_fn(self, epi: int, bf16: bool, block: bool, rows: int) -> int | None:
        """The GEMV with a pairwise epilogue (:data:`PAIR_SILU` or :data:`PAIR_ROPE`; ``gemv8_pairs`` in
        ``csrc/fp8_fused.cu``) serving ``rows`` rows (1 to :data:`PAIR_MAX_ROWS`),
        or None
        where it did not compile."""
        return self._pairs.get((epi, bf16, block, 1 if rows == 1 else 4))

    def pair_launch(
        self, epi: int, bf16: bool, wt: Fp8Weight, rows: int, pairs: int, fold: bool = False
    ) -> tuple[int, int, int] | None:
        """``(function, grid, threads)`` of the GEMV with a pairwise epilogue over ``wt`` for ``rows`` rows and
        ``pairs`` pairs of output columns: on tensor cores from :attr:`tensor_core_rows` rows where they serve the
        weight (8 pairs a block, as many warps as :meth:`gemv` gives the GEMV over ``wt``, so each column's sums are
        that GEMV's), else the widening kernel (4 warps a block; 2 pairs a block, or for one row a group of one pair
        at a time over :meth:`_one_row_grid` blocks); None where neither compiled. ``fold``: the second GEMV of a
        folded norm (norm_fold.py; one row only, one block more), None where it does not serve the call."""
        _, _, shift, block = wt.scale_args
        if fold:
            fn = self._pairs_fold.get((epi, bf16, bool(block)))
            return None if fn is None or rows != 1 else (fn, self._one_row_grid(pairs) + 1, PAIR_THREADS)
        if rows >= self.tensor_core_rows:
            tc = self._pairs_tc.get((epi, bf16, bool(block)))
            if tc is not None and (not block or (16 << shift) % 128 == 0):
                return tc, -(-pairs // 8), self._tc_threads(wt)
        fn = self.pair_fn(epi, bf16, bool(block), rows)
        if fn is None:
            return None
        return fn, self._one_row_grid(pairs) if rows == 1 else -(-pairs // 2), PAIR_THREADS

    def _one_row_grid(self, groups: int) -> int:
        """The blocks of a one-row widening launch over ``groups`` groups (see :attr:`one_row_blocks_per_sm`; a
        ValueError naming it where it is no int from 1 to 1024)."""
        per_sm = self.one_row_blocks_per_sm
        if per_sm.__class__ is not int or not 1 <= per_sm <= 1024:
            raise ValueError(f"Fp8Linears.one_row_blocks_per_sm: expected an int from 1 to 1024, got {per_sm!r:.40}")
        return max(1, min(groups, per_sm * self._sms))

    def _tc_threads(self, wt: Fp8Weight) -> int:
        """The threads a block of the tensor-core GEMV over ``wt`` (16 columns a block; the pairwise form takes the
        same, so that its sums are that GEMV's): 8 warps where 4 would leave fewer than 8 warps an SM (the 8B shape's
        o and down: 256 blocks), else 4 (measured on an H100: each the faster there)."""
        return 256 if -(-wt.n // _TC_COLUMNS) * 4 < 8 * self._sms else 128

    def gemv(
        self,
        rows: int,
        x: int,
        x_ld: int,
        wt: Fp8Weight,
        y: int,
        y_ld: int,
        bf16: bool,
        f32: bool,
        fold: FoldOut | None = None,
    ) -> tuple:
        """The packed GEMV launch of ``y[:rows] = x[:rows] @ dequant(wt).T`` (rows <= :data:`FP8_GEMV_MAX_ROWS`;
        ``fold``: the first GEMV of a folded norm, :mod:`~fi_engine.kernels.norm_fold`, one row, 16-bit y):
        ``(function, grid, threads, params, values)``, or ``()`` where x is not 16-byte aligned (x, x_ld) or the fold
        form does not serve the call; a ValueError naming a bad field of ``fold``. Packed once per call site (its
        ints: values only); at most 4096 kept."""
        if fold is not None and not isinstance(fold, FoldOut):
            raise TypeError(f"fold: the FP8 GEMV is a folded norm's first GEMV (FoldOut), got {type(fold).__name__}")
        tail = [] if fold is None else fold_ints(fold)  # (checked before it is part of a key)

        def pack() -> tuple[Any, ...]:
            if x % 16 or x_ld % 8:
                return ()
            s_ld, bn, shift, block = wt.scale_args
            tc = self._tc.get((bf16, f32, bool(block))) if rows >= self.tensor_core_rows else None
            if fold is not None:  # (its one-row kernel only)
                fn, grid, threads = self._fold_out.get((bf16, bool(block))), self._one_row_grid(-(-wt.n // 2)), _THREADS
                if fn is None or rows != 1 or f32:
                    return ()
            elif tc is not None and (not block or (bn % _TC_COLUMNS == 0 and (16 << shift) % 128 == 0)):
                fn, grid, threads = tc, -(-wt.n // _TC_COLUMNS), self._tc_threads(wt)
            else:
                fn = self._gemv[(bf16, f32, bool(block), 1 if rows == 1 else 2 if rows == 2 else 4 if rows <= 4 else 8)]
                grid = self._one_row_grid(-(-wt.n // 2)) if rows == 1 else -(-wt.n // _COLS)
                threads = _THREADS
            params, values = self._slots([x, wt.w, y, rows, wt.n, wt.k, x_ld, y_ld, wt.scales, s_ld, bn, shift, *tail])
            return (fn, grid, threads, params, values)

        return self._kept((rows, x, x_ld, wt.w, y, y_ld, bf16, f32, *tail), pack)

    def dequantize(self, wt: Fp8Weight, bf16: bool, null: Any) -> int:
        """Write ``wt`` scaled into the 16-bit scratch matrix ``[n, k]`` (bfloat16 or float16); its address."""
        s_ld, bn, shift, block = wt.scale_args
        vectors = wt.n * wt.k // 16

        def args(out: int) -> list[int]:
            return [wt.w, out, wt.n, wt.k, wt.scales, s_ld, bn, shift, block]

        return self._dequantize(wt, bf16, null, min(132 * 16, -(-vectors // 256)), args, "dequant_e4m3")

    def w8a8(
        self,
        lt: Any,
        rows: int,
        x: int,
        x_ld: int,
        wt: Fp8Weight,
        y: int,
        y_ld: int,
        bf16: bool,
        c_type: int,
        accumulate: bool,
        null: Any,
        blocks: bool = False,
    ) -> bool:
        """``y[:rows] (+)= x[:rows] @ dequant(wt).T`` with e4m3 activations (see the module docstring): x quantized
        into the scratch, then cuBLASLt's FP8 GEMM (``lt``: the Dense's
        :class:`~fi_engine.kernels.cublas_lt.LtMatmuls`).
        cuBLASLt serves some row counts only (measured on an H100: 16 and 37 rows with per-row scales, 16 and not
        37 with blocks): the rows it serves go through it and the last few through the FP8 GEMV, 8 at a time.
        False, with nothing launched, where this path cannot serve the call: the caller dequantizes instead.
        ``blocks``: serve 128x128-block weights too (:attr:`QuantizedWeights.fp8_w8a8_blocks`)."""
        if wt.block is not None and not blocks:
            return False
        key = (rows, x, x_ld, wt.w, y, y_ld, bf16, c_type, accumulate)
        plan = self._w8a8_plans.get(key)
        if plan is None:
            plan = self._plan_w8a8(lt, *key)
            if len(self._w8a8_plans) > 4096:
                self._w8a8_plans.clear()
            self._w8a8_plans[key] = plan
        if not plan:
            return False
        (fn, grid, threads, params, _), entry, xq, tail = plan
        self._run(fn, grid, threads, params, null, "e4m3 activation quantization")
        status = lt.fp8_call(entry, xq, wt.w, wt.lt_scales, y, accumulate)
        if status:
            from fi_ffi.errors import CublasError

            from .cublas import status_name

            raise CublasError("cublasLtMatmul(FP8)", status, status_name(status))
        for packed in tail:
            self.run_gemv(packed, null)
        return True

    def x_quantizer(self, rows: int, x: int, x_ld: int, k: int, bf16: bool, null: Any) -> tuple[int, Any] | None:
        """The skinny GEMM's W8A8 form's x (``skinny_gemm.E4M3_A8``): ``(xq, launch)``, where ``launch()`` quantizes
        ``x[:rows, :k]`` (16-bit, row stride ``x_ld`` elements) into the scratch at ``xq`` as that form reads it, the
        e4m3 bytes ``[rows, k]`` (row stride ``k``) then, 256-byte aligned, float32 scales ``[k / 128, rows]`` (one
        per row and 128 inputs, as :meth:`w8a8` quantizes for 128x128-block weights); None where it cannot: no
        quantizer (below SM 8.9), ``k`` not a multiple of 128, x not 16-byte aligned or ``x_ld`` not a multiple of 8,
        or more than the scratch holds. Packed here (the caller keeps it per call site; ``null``: the launcher's
        NULL); the scratch is the one :meth:`w8a8` and the dequantizing path use, so it holds this x until the next
        FP8 call."""
        quant = self._group_quantizer(rows, x, x_ld, k, bf16) if not (k % 128 or x % 16 or x_ld % 8) else None
        if quant is None:
            return None

        def launch() -> None:  # (quant keeps the values its params point into)
            self._run(quant[0], quant[1], quant[2], quant[3], null, "e4m3 activation quantization")

        return int(self._scratch.data.ptr), launch

    def _group_quantizer(self, rows: int, x: int, x_ld: int, k: int, bf16: bool) -> tuple[Any, ...] | None:
        """The launch that quantizes ``x[:rows, :k]`` (16-bit, row stride ``x_ld``) a scale per row and 128 inputs
        into the scratch: the e4m3 bytes ``[rows, k]`` (row stride ``k``) at its start, then, 256-byte aligned, the
        float32 scales ``[ceil(k / 128), rows]`` (cuBLASLt's VEC128_32F; the skinny GEMM's W8A8 form reads the same):
        ``(fn, grid, threads, params, values)``, or None where no quantizer compiled, no weight grew the scratch, or
        ``rows`` of them do not fit it."""
        fn = self._quant.get((bf16, True))
        groups, at = -(-k // 128), -(-rows * k // 256) * 256
        if fn is None or rows <= 0 or self._scratch is None or at + 4 * rows * groups > self._scratch.nbytes:
            return None
        scratch = int(self._scratch.data.ptr)
        params, values = self._slots([x, x_ld, rows, k, scratch, scratch + at, rows])
        return fn, -(-rows * groups // 8), 256, params, values

    def _plan_w8a8(
        self,
        lt: Any,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        y: int,
        y_ld: int,
        bf16: bool,
        c_type: int,
        accumulate: bool,
    ) -> tuple[Any, ...]:
        """The launches of one :meth:`w8a8` call site, or ``()`` where it cannot serve it."""
        from .cublas import CUDA_R_32F

        wt = self.weights[w]
        blocked = wt.block is not None
        y_size = 4 if c_type == CUDA_R_32F else 2
        if (
            not self._quant
            or lt is None
            or wt.n % 16
            or (blocked and (wt.block != (128, 128) or wt.k % 128 or wt.n % 128))
            or x % 16
            or x_ld % 8
            or y % 16
            or (y_ld * y_size) % 16
            or wt.lt_scales % 16
        ):
            return ()
        k, groups = wt.k, -(-wt.k // 128)
        scratch = int(self._scratch.data.ptr)
        # the rows cuBLASLt takes, the rest through the GEMV; a call the GEMV could take whole has no tail (it would
        # read the weight twice)
        candidates = (rows,) if rows <= FP8_GEMV_MAX_ROWS else (rows, rows - rows % 4, rows - rows % 16)
        for main in dict.fromkeys(candidates):
            tail_rows = rows - main
            if main <= 0 or (tail_rows and accumulate):
                continue
            q_bytes = -(-main * k // 256) * 256
            if q_bytes + 4 * main * (groups if blocked else 1) > self._scratch.nbytes:
                continue  # more rows than the scratch holds: the dequantizing path (its GEMM takes any rows)
            x_scales = scratch + q_bytes
            entry = lt.fp8_shape(main, wt.n, k, y_ld, c_type, blocked, x_scales, wt.lt_scales)
            if entry is None:
                self.w8a8_error = f"cuBLASLt offers no FP8 algorithm for {main} x {wt.n} x {k} (blocked: {blocked})"
                continue
            tail = []
            for start in range(main, rows, FP8_GEMV_MAX_ROWS):
                r = min(FP8_GEMV_MAX_ROWS, rows - start)
                packed = self.gemv(r, x + 2 * start * x_ld, x_ld, wt, y + y_size * start * y_ld, y_ld, bf16,
                                   c_type == CUDA_R_32F)  # fmt: skip
                if not packed:
                    break
                tail.append(packed)
            else:
                if blocked:  # (x_scales is where it puts the scales; the room was checked above)
                    quant = self._group_quantizer(main, x, x_ld, k, bf16)
                else:
                    params, values = self._slots([x, x_ld, k, scratch, x_scales])
                    quant = (self._quant[(bf16, False)], main, 256, params, values)
                return quant, entry, scratch, tuple(tail)
        return ()

    def remove(self, w: int) -> None:
        """:meth:`QuantizedLinears.remove <fi_engine.kernels.quantized_linears.QuantizedLinears.remove>`, with the
        block scales padded for ``w``."""
        self._padded.pop(w, None)
        super().remove(w)

    def close(self) -> None:
        """Forget the weights, packed launches and padded scales, free the scratch, turn the fused kernels off."""
        super().close()
        self._padded.clear()
        self._fused = {}
