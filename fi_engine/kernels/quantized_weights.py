"""The FP8 and int4 weights a :class:`~fi_engine.kernels.dense.Dense` serves: their registries (by device address),
the way a linear over one runs when no skinny GEMM was timed faster (the format's GEMV for few rows, cuBLASLt's FP8
GEMM, else the weight dequantized into a 16-bit scratch and the 16-bit GEMM), the packed GEMV of a decode step, and
the decode step's GEMVs over them with an epilogue (SiLU-and-mul; RoPE and the KV append). The kernels themselves
are :mod:`~fi_engine.kernels.fp8_linear`'s and :mod:`~fi_engine.kernels.int4_linear`'s; here they are chosen,
checked and packed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .cublas import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
from .fp8_linear import FP8_GEMV_MAX_ROWS, PAIR_MAX_ROWS, PAIR_ROPE, PAIR_SILU, Fp8Linears, Fp8Weight
from .fused_args import NORM, RopeAppend, caches_apart, check_epilogue_io, indices_apart, rope_ints
from .int4_linear import INT4_GEMV_MAX_ROWS, ROPE_ROWS, Int4Linears, Int4Weight
from .launch import MAX_LD, U64, Launcher, int_arg
from .norm_fold import FOLD_ROWS, FoldCounters, FoldIn, FoldOut, fold_ints

__all__ = ["QuantizedWeights"]


def check_call(wt: Fp8Weight | Int4Weight, kind: str, n: int, k: int, ab_type: int, c_type: int) -> None:
    """ValueError where a call over the registered ``kind`` weight ``wt`` (FP8, int4) gives other shapes or types
    than it serves."""
    if (n, k) != (wt.n, wt.k):
        raise ValueError(f"n, k: the {kind} weight at 0x{wt.w:x} is [{wt.n}, {wt.k}], the call says [{n}, {k}]")
    if ab_type not in (CUDA_R_16BF, CUDA_R_16F) or c_type not in (ab_type, CUDA_R_32F):
        raise ValueError(
            f"ab_type, c_type: {kind} weights take bfloat16 or float16 activations and give the same type or "
            f"float32, got cudaDataType {ab_type} -> {c_type}"
        )


def _check_epilogue_gemv(rows: int, max_rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int) -> None:
    """The ints of a quantized GEMV with an epilogue checked by name: ``rows`` 1 to ``max_rows``, ``k`` in ``[1,
    2**31)``, addresses in ``[0, 2**64)``, row strides in ``[0, 2**40)``."""
    int_arg("rows", rows, 1, max_rows + 1)
    int_arg("k", k, 1, 1 << 31)
    for name, value in (("x", x), ("w", w), ("y", y)):
        int_arg(name, value, 0, U64)
    for name, value in (("x_ld", x_ld), ("y_ld", y_ld)):
        int_arg(name, value, 0, MAX_LD)


class QuantizedWeights:
    """The registries of one Dense's FP8 (:attr:`fp8`, made by the first :meth:`add_fp8_weight`) and int4
    (:attr:`int4`, made by the first :meth:`add_int4_weight`) weights and the launches over them, on ``launcher``.
    ``fused_smem``: the input bytes the fused GEMVs may stage (0: none compiled; the FP8 fused kernels are compiled
    for the same); ``changed``: called after every registration or removal (the Dense drops what it chose and packed
    by address); ``gemm16(key, accumulate)``: the 16-bit GEMM of a dequantized weight (the Dense's cuBLASLt / cuBLAS
    call); ``why_off``: why the launch path is off, where it is."""

    fp8: Fp8Linears | None = None
    int4: Int4Linears | None = None
    fp8_weights: Mapping[int, Fp8Weight] = MappingProxyType({})
    """The registered FP8 weights by device address (empty: none; the Dense reads this mapping on every linear)."""
    int4_weights: Mapping[int, Int4Weight] = MappingProxyType({})
    """The registered int4 weights by device address."""

    fp8_w8a8 = True
    """Whether linears of FP8 weights over more than :attr:`fp8_gemv_max_rows` rows quantize their activations to e4m3
    and run cuBLASLt's FP8 tensor-core GEMM (W8A8, :mod:`~fi_engine.kernels.fp8_linear`); False: the FP8 GEMV up to 8
    rows, else the weight dequantized to 16 bits and the 16-bit GEMM (W8A16, slower: 5 bytes read per weight). A class
    attribute; set it on an instance to override."""

    fp8_w8a8_blocks = True
    """Whether :attr:`fp8_w8a8` serves 128x128-block weights too (per-tensor and per-channel ones: always); False:
    those weights take the dequantizing path above :attr:`fp8_gemv_max_rows` rows."""

    fp8_gemv_max_rows = 8
    """Linears of FP8 weights over at most this many rows run the FP8 GEMV (W8A16); more rows run the FP8 GEMM
    (:attr:`fp8_w8a8`) where cuBLASLt serves the call, else the GEMV up to ``FP8_GEMV_MAX_ROWS`` rows. 8: the GEMV
    runs on tensor cores from 3 rows (``Fp8Linears.tensor_core_rows``), and on an H100 (8B shape, 128x128 blocks,
    decode graph, one run) it beat the FP8 GEMM at 4 rows (914.8 against 831.8 tokens/s) and 8 (1,791.5 against
    1,636.1), and tied at 1 and 2 (cuBLASLt takes no block-scaled call of 1 or 2 rows). It was 2 while the GEMV
    widened each weight per group of rows, which made it compute-bound from 4 rows. A class attribute, read when a
    call is made or a step packed."""

    fp8_fused = False
    """Whether the fused decode step runs over FP8 weights (``csrc/fp8_fused.cu``'s kernels, which
    :meth:`~fi_engine.kernels.fused_gemv.FusedGemvs.fused_linear` serves either way): off, since on an H100 its
    one-row graph ran slower than separate launches over the plain FP8 GEMV (8B shape: 4.57 against 4.00 ms per step;
    benchmarks/RESULTS.md). Read when a step is packed; set it on the class to compare."""

    fp8_epilogues = True
    """Whether the fused decode step runs over FP8 weights with its GEMVs' pairwise epilogues where
    :attr:`fp8_fused` is off (:meth:`prepared_fp8_silu`, :meth:`prepared_fp8_qkv_rope`: SiLU in the gate/up GEMV,
    RoPE and the KV append in the QKV GEMV, the norms as launches of their own); False: the FP8 decode step as
    separate launches. Read when a step is packed; set it on the class to compare."""

    int4_rope = True
    """Whether the fused decode step's QKV GEMV over an int4 weight takes RoPE and the KV append as its epilogue
    (:meth:`prepared_int4_qkv_rope`: the same values as the int4 GEMV, then ``rope_inplace`` and ``append_kv``, two
    launches fewer a layer); False: those two as launches of their own. With :attr:`norm_in_gemv` on, a QKV GEMV
    that takes its input norm folded (its FoldIn form) has no RoPE epilogue: there RoPE and the append stay launches.
    Read when a step is packed; set it on the class to compare (``benchmarks/bench_llama_tp.py --variants
    int4-rope-launches``)."""

    norm_in_gemv = False
    """Whether the fused decode step over FP8 or int4 weights folds each RMSNorm between two GEMVs into them
    (:mod:`~fi_engine.kernels.norm_fold`: the first GEMV stores the new residual and its normalized input short of the
    row's factor, the second multiplies its sums by the factor, which a block of its own grid computes), so that the
    norm has no launch of its own, where the fold forms serve the weights and rows (:meth:`fold_rows`); False (the
    default): the norm's launch (``fused_add_rmsnorm``). Off since it did not pay: on an H100 (8B shape, decode graph
    of one row) FP8 128x128 blocks ran 291.8 / 291.9 tokens/s folded against 300.8 / 301.5 with the launches, AWQ int4
    326.1 / 326.2 against 325.3 / 325.4 (benchmarks/RESULTS.md). Read when a step is packed; set it on the class to
    compare (``bench_llama_tp.py --variants fused,norm-fold``)."""

    int4_gemv_max_rows = INT4_GEMV_MAX_ROWS
    """Linears of int4 weights over at most this many rows (and no ``accumulate``) run the int4 GEMV, reading the
    codes as stored; more rows dequantize the weight into a 16-bit scratch matrix and run the 16-bit GEMM. Read at
    each call and when a call site is packed."""

    def __init__(
        self,
        launcher: Launcher,
        fused_smem: int,
        changed: Callable[[], None],
        gemm16: Callable[[tuple[int, ...], bool], None],
        why_off: str = "",
    ) -> None:
        self._launcher, self._fused_smem, self._why_off = launcher, fused_smem, why_off
        self._changed, self._gemm16 = changed, gemm16
        self._fold_counters = FoldCounters()  # the grid each folded norm's counter pair serves

    def add_fp8_weight(self, w: int, n: int, k: int, scales: int, block: tuple[int, int] | None) -> None:
        """Serve the e4m3 weight ``[n, k]`` (row-major, one byte each) at device address ``w`` with its float32
        ``scales`` (``block`` None: one per output row, ``[n]``; ``(bn, bk)``: one per block, ``[ceil(n / bn),
        ceil(k / bk)]`` row-major): from now on the Dense's ``linear`` (and ``prepared_linear``) with this ``w``
        compute ``x @ (e4m3(w) * scale).T`` (:mod:`~fi_engine.kernels.fp8_linear`: a GEMV reading the bytes for at
        most 8 rows, else cuBLASLt's FP8 GEMM over activations quantized to e4m3 (:attr:`fp8_w8a8`), else the weight
        dequantized into a 16-bit scratch matrix and the 16-bit GEMM). Call it while loading, not during a step (the
        scratch may grow); the weight must stay allocated until :meth:`remove_weight` or the Dense's ``close``.
        ValueError naming a bad argument; RuntimeError where the driver launch path is off."""
        launcher = self._launcher
        if not launcher.open:
            raise RuntimeError(f"FP8 weights need the engine's own GEMV kernels, which are off: {self._why_off}")
        if self.fp8 is None:
            self.fp8 = Fp8Linears(launcher.launch, launcher.ffi, launcher.stream)
        self.fp8.add(w, n, k, scales, block, self._fused_smem)
        self._registries_changed()

    @property
    def serves_fp8(self) -> bool:
        """Whether any weight was registered with :meth:`add_fp8_weight`."""
        return bool(self.fp8_weights)

    def has_fp8_weight(self, w: int) -> bool:
        """Whether the weight at device address ``w`` is registered as FP8 (:meth:`add_fp8_weight`)."""
        return w in self.fp8_weights

    @property
    def fuses_fp8(self) -> bool:
        """Whether the fused decode step serves the registered FP8 weights (:attr:`fp8_fused` and their fused
        kernels compiled, or :attr:`fp8_epilogues` and the epilogue GEMVs compiled); True where there is none."""
        if not self.fp8_weights:
            return True
        if self.fp8 is None:
            return False
        if self.fp8_fused:
            return bool(self.fp8.fused_fn(NORM, True, False, False))
        return self.fp8_epilogues and self.fp8.pair_fn(PAIR_SILU, True, False, 1) is not None

    def add_int4_weight(self, w: int, n: int, k: int, records: int, group_size: int, interleaved: bool = False) -> None:
        """Serve the int4 weight ``[n, k]`` at device address ``w`` in the int4 GEMV's layout (tile-major
        ``[ceil(n / 16), k / 128, 1024]`` bytes with its uint32 ``records`` ``[n, k / group_size]``:
        :meth:`~fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout`): from now on the Dense's ``linear``
        (and ``prepared_linear``) with this ``w`` compute ``x @ ((code - zero) * scale).T``
        (:mod:`~fi_engine.kernels.int4_linear`: a GEMV reading the codes for at most
        :attr:`int4_gemv_max_rows` rows, else the weight dequantized into a 16-bit scratch and the 16-bit GEMM).
        ``n`` and ``k`` as the calls pass them. ``interleaved``: gate and up stacked interleaved by 8 rows
        (``Int4Weight.half_n``; the outputs still come in order, gate's then up's), which
        :meth:`prepared_int4_silu` serves. Register before any step (the scratch may grow); the weight must stay
        allocated until :meth:`remove_weight` or the Dense's ``close``. ValueError naming a bad argument (see
        ``Int4Linears.add``); RuntimeError where the GPU cannot run the GEMV."""
        if self.int4 is None:
            launcher = self._launcher
            self.int4 = Int4Linears(launcher.launch, launcher.ffi, launcher.stream)
        self.int4.add(w, n, k, records, group_size, interleaved)
        self._registries_changed()

    def remove_weight(self, w: int) -> None:
        """Undo :meth:`add_fp8_weight` or :meth:`add_int4_weight` for ``w`` (before freeing it); unknown addresses:
        nothing happens."""
        for registry in (self.fp8, self.int4):
            if registry is not None:
                registry.remove(w)
        self._registries_changed()

    def _registries_changed(self) -> None:
        """A weight registered or removed: mirror the registries (:attr:`fp8_weights`, :attr:`int4_weights`), then
        tell the Dense (``changed``)."""
        if self.fp8 is not None:
            self.fp8_weights = self.fp8.weights
        if self.int4 is not None:
            self.int4_weights = self.int4.weights
        self._changed()

    @property
    def serves_int4(self) -> bool:
        """Whether any weight was registered with :meth:`add_int4_weight`."""
        return bool(self.int4_weights)

    def has_int4_silu(self, w: int) -> bool:
        """Whether :meth:`prepared_int4_silu` serves ``w``: an int4 gate/up weight registered ``interleaved``."""
        wt = self.int4_weights.get(w)
        return wt is not None and wt.half_n > 0 and self._launcher.open

    def has_int4_rope(self, w: int) -> bool:
        """Whether :meth:`prepared_int4_qkv_rope` serves ``w`` in the fused step: :attr:`int4_rope` on, ``w`` an
        int4 weight registered in order (not ``interleaved``) and the launch path open."""
        wt = self.int4_weights.get(w)
        return self.int4_rope and wt is not None and not wt.half_n and self._launcher.open

    def prepared_int4_qkv_rope(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int, rope: RopeAppend
    ) -> Callable[[], None]:
        """A decode step's QKV GEMV over the int4 weight ``w`` (registered in order, ``[(hq + 2 hk) d, k]``) with
        FlashInfer's ``apply_rope_pos_ids`` and ``append_paged_kv_cache`` as its epilogue, checked and packed once:
        ``y = qkv [rows, (hq + 2 hk) d]`` (16-bit, row stride ``y_ld``) the int4 GEMV's outputs of ``x [rows, k]``
        (row stride ``x_ld``), q and k heads rotated, k and v heads also written into ``rope``'s caches, the values of
        the three launches it replaces (``rows`` 1 to 8; as :meth:`prepared_fp8_qkv_rope`, whose ``rope`` it takes).
        Raises TypeError/ValueError naming an argument that is no int or out of range, a weight not registered so or
        of another shape or type, a misaligned ``x`` (16 bytes, and its row stride) or ``y`` (2), ``y`` overlapping
        ``x``, a bad field of ``rope``, a cache overlapping ``x`` or ``y``, an index array overlapping ``y`` or a
        cache."""
        _check_epilogue_gemv(rows, ROPE_ROWS, x, x_ld, w, k, y, y_ld)
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        rope_args = rope_ints(rope)
        wt = self.int4_weights.get(w)
        if wt is None or wt.half_n:
            raise ValueError(f"w: 0x{w:x} is no int4 weight registered in order (add_int4_weight, not interleaved)")
        n = (rope.hq + 2 * rope.hk) * rope.d
        check_call(wt, "int4", n, k, ab_type, ab_type)
        span_x, span_y = check_epilogue_io(rows, x, x_ld, k, y, y_ld, n)
        caches_apart(rope, [("y", y, span_y), ("x", x, span_x)])
        indices_apart(rope, rows, [("y", y, span_y)])
        launcher = self._launcher
        launcher.check_open()
        assert self.int4 is not None
        packed = self.int4.gemv(rows, x, x_ld, wt, y, y_ld, ab_type == CUDA_R_16BF, False, rope=rope_args)
        if not packed:  # (rows, the weight's layout and the head dim were checked above: x's alignment is what is left)
            raise ValueError(f"x: 0x{x:x} (row stride {x_ld}) must be 16-byte aligned for the int4 GEMV's RoPE form")
        fn, grid, threads, params, values = packed
        return launcher.prepared(fn, grid, threads, 0, params, values, "int4 qkv gemv + rope + append", pdl=True)

    def prepared_gemv(
        self, rows: int, x: int, x_ld: int, w: int, n: int, k: int, y: int, y_ld: int, ab_type: int, c_type: int
    ) -> Callable[[], None] | None:
        """The Dense's ``prepared_linear`` over a registered weight ``w`` where the format's GEMV serves the call
        (at most :attr:`fp8_gemv_max_rows` / :attr:`int4_gemv_max_rows` rows, ``x`` aligned): its launch packed once;
        None where ``w`` is no quantized weight or its GEMV does not serve the call. ValueError where the call's
        shapes or types are not the weight's."""
        launcher = self._launcher
        formats: tuple[tuple[Fp8Linears | Int4Linears | None, Mapping[int, Any], str, int], ...] = (
            (self.fp8, self.fp8_weights, "FP8", min(FP8_GEMV_MAX_ROWS, self.fp8_gemv_max_rows)),
            (self.int4, self.int4_weights, "int4", min(INT4_GEMV_MAX_ROWS, self.int4_gemv_max_rows)),
        )
        for lib, weights, kind, max_rows in formats:
            wt = weights.get(w)
            if wt is None or lib is None or not launcher.open or rows > max_rows:
                continue
            check_call(wt, kind, n, k, ab_type, c_type)
            packed = lib.gemv(rows, x, x_ld, wt, y, y_ld, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F)
            if packed:
                fn, grid, threads, params, values = packed
                return launcher.prepared(fn, grid, threads, 0, params, values, f"{kind.lower()} gemv", pdl=True)
        return None

    def fp8_path(self, call: tuple[int, ...], fp8: Fp8Weight, accumulate: bool, lt: Any) -> None:
        """The Dense's ``linear`` call ``call`` (its ``(rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)``) over the
        registered FP8 weight ``fp8`` but the skinny GEMM: the FP8 GEMV for at most :attr:`fp8_gemv_max_rows` rows,
        else the FP8 GEMM (:attr:`fp8_w8a8`) where cuBLASLt (``lt``, the Dense's
        :class:`~fi_engine.kernels.cublas_lt.LtMatmuls` or None) serves it, else the GEMV up to 8 rows, else
        dequantize + 16-bit GEMM."""
        lib = self.fp8
        assert lib is not None
        rows, x, x_ld, _, _, _, y, y_ld, ab_type, c_type = call
        gemv = 0 < rows <= FP8_GEMV_MAX_ROWS and not accumulate
        if gemv and rows <= self.fp8_gemv_max_rows and self._ran_gemv(lib, call, fp8):
            return
        if self.fp8_w8a8 and lib.w8a8(
            lt,
            rows,
            x,
            x_ld,
            fp8,
            y,
            y_ld,
            ab_type == CUDA_R_16BF,
            c_type,
            accumulate,
            self._launcher.null,
            self.fp8_w8a8_blocks,
        ):  # the FP8 tensor-core GEMM over activations quantized on the fly
            return
        if not (gemv and self._ran_gemv(lib, call, fp8)):
            self._dequantized_gemm(lib, call, fp8, accumulate)

    def int4_path(self, call: tuple[int, ...], int4: Int4Weight, accumulate: bool, lt: Any = None) -> None:
        """The Dense's ``linear`` call ``call`` (as :meth:`fp8_path` takes it) over the registered int4 weight
        ``int4`` but the skinny GEMM: the int4 GEMV for at most :attr:`int4_gemv_max_rows` rows, else dequantize +
        16-bit GEMM (``lt``: unused, as :meth:`fp8_path` takes it)."""
        lib = self.int4
        assert lib is not None
        gemv = not accumulate and call[0] <= min(INT4_GEMV_MAX_ROWS, self.int4_gemv_max_rows) and self._launcher.open
        if not (gemv and self._ran_gemv(lib, call, int4)):
            self._dequantized_gemm(lib, call, int4, accumulate)

    def _ran_gemv(self, lib: Fp8Linears | Int4Linears, call: tuple[int, ...], wt: Any) -> bool:
        """Launch the format's GEMV (``lib``'s) of the linear call ``call`` over ``wt``; False where it does not
        serve the call (``x`` misaligned)."""
        rows, x, x_ld, _, _, _, y, y_ld, ab_type, c_type = call
        packed = lib.gemv(rows, x, x_ld, wt, y, y_ld, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F)
        if packed:
            lib.run_gemv(packed, self._launcher.null)
        return bool(packed)

    def _dequantized_gemm(
        self, lib: Fp8Linears | Int4Linears, call: tuple[int, ...], wt: Any, accumulate: bool
    ) -> None:
        """The linear call ``call`` over ``wt`` dequantized into ``lib``'s 16-bit scratch, by the 16-bit GEMM."""
        rows, x, x_ld, _, n, k, y, y_ld, ab_type, c_type = call
        weight = lib.dequantize(wt, ab_type == CUDA_R_16BF, self._launcher.null)
        self._gemm16((rows, x, x_ld, weight, n, k, y, y_ld, ab_type, c_type), accumulate)

    def prepared_fp8_silu(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int, fold: FoldIn | None = None
    ) -> Callable[[], None]:
        """A decode step's gate/up GEMV over the FP8 weight ``w`` (registered, ``[2 m, k]``: the gate rows, then the
        up rows) with FlashInfer's ``silu_and_mul`` as its epilogue, checked and packed once: ``y [rows, m] =
        silu(g) * u`` (16-bit, row stride ``y_ld``), ``g`` and ``u`` the 16-bit outputs of ``x [rows, k] @ w.T``
        (row stride ``x_ld``), each rounded as the Dense's ``linear`` rounds them: one launch for two, the same
        values as the FP8 GEMV then ``silu_and_mul`` (the GPU test checks them). ``rows`` 1 to 4. Raises
        TypeError/ValueError naming an argument that is no int or out of range, a weight not registered as FP8 or of
        another shape, a misaligned ``x`` (16 bytes, and its row stride) or ``y`` (2), or ``y`` overlapping ``x``.
        ``fold``: the second GEMV of a folded norm (:mod:`~fi_engine.kernels.norm_fold`; one row, ``x`` its ``xn``),
        its counters refused where they serve another grid."""
        return self._prepared_pairs(PAIR_SILU, rows, x, x_ld, w, k, y, y_ld, ab_type, None, fold)

    def prepared_fp8_qkv_rope(
        self,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        rope: RopeAppend,
        fold: FoldIn | None = None,
    ) -> Callable[[], None]:
        """A decode step's QKV GEMV over the FP8 weight ``w`` (registered, ``[(hq + 2 hk) d, k]``) into 16-bit ``y =
        qkv [rows, (hq + 2 hk) d]`` with FlashInfer's ``apply_rope_pos_ids`` and ``append_paged_kv_cache`` as its
        epilogue (as :meth:`~fi_engine.kernels.fused_gemv.FusedGemvs.prepared_qkv_rope`'s, over the normalized rows
        ``x`` the launch before wrote), checked and packed once: one launch for three, the same values as the FP8
        GEMV then those two (the GPU test checks them). ``rows`` 1 to 4. Raises as :meth:`prepared_fp8_silu` does,
        and for ``rope`` as ``prepared_qkv_rope`` does (its caches against ``x`` and ``y``). ``fold``: as
        :meth:`prepared_fp8_silu`'s."""
        return self._prepared_pairs(PAIR_ROPE, rows, x, x_ld, w, k, y, y_ld, ab_type, rope, fold)

    def _prepared_pairs(
        self,
        epi: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        rope: Any,
        fold: FoldIn | None,
    ) -> Callable[[], None]:
        """:meth:`prepared_fp8_silu` (``epi`` PAIR_SILU, ``rope`` None) or :meth:`prepared_fp8_qkv_rope`."""
        what = "the SiLU" if epi == PAIR_SILU else "the RoPE"
        _check_epilogue_gemv(rows, PAIR_MAX_ROWS, x, x_ld, w, k, y, y_ld)
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        rope_args = rope_ints(rope) if epi == PAIR_ROPE else [0] * 17  # (the SiLU kernel reads none of them)
        fp8 = self.fp8_weights.get(w)
        if fp8 is None:
            raise ValueError(f"w: 0x{w:x} is no registered FP8 weight (add_fp8_weight); {what} GEMV reads e4m3")
        assert self.fp8 is not None
        n = fp8.n if epi == PAIR_SILU else (rope.hq + 2 * rope.hk) * rope.d
        if epi == PAIR_SILU and fp8.n % 2:
            raise ValueError(f"w: the gate/up weight has {fp8.n} rows; the SiLU pairs gate and up rows, an even count")
        check_call(fp8, "FP8", n, k, ab_type, ab_type)
        out = fp8.n // 2 if epi == PAIR_SILU else n  # y's width
        pairs = out // 2 if epi == PAIR_ROPE else out
        if fold is not None and not isinstance(fold, FoldIn):
            raise TypeError(f"fold: an epilogue GEMV is a folded norm's second (FoldIn), got {type(fold).__name__}")
        tail = [] if fold is None else fold_ints(fold)
        launcher = self._launcher
        bf16, folded = ab_type == CUDA_R_16BF, fold is not None
        launch = None if not launcher.open else self.fp8.pair_launch(epi, bf16, fp8, rows, pairs, folded)
        if launch is None and folded and launcher.open and rows != 1:
            raise ValueError(f"rows: the FP8 GEMV with {what} epilogue and a folded norm serves one row, got {rows}")
        if launch is None:
            raise ValueError(f"w: no FP8 GEMV with {what} epilogue compiled ({self.fp8.fused_error or 'closed'})")
        span_x, span_y = check_epilogue_io(rows, x, x_ld, k, y, y_ld, out)
        if epi == PAIR_ROPE:
            caches_apart(rope, [("y", y, span_y), ("x", x, span_x)])
            written = [("y", y, span_y)]
            if fold is not None:  # (its factors' block writes them, every block draws a ticket)
                written += [("fold.rs", fold.rs, 4 * rows), ("fold.sync", fold.sync, 16)]
            indices_apart(rope, rows, written)
        s_ld, bn, shift, _ = fp8.scale_args
        args = [x, w, y, rows, pairs, k, x_ld, y_ld, fp8.scales, s_ld, bn, shift, *rope_args, *tail]
        params, values = launcher.slots(args)
        name = "fp8 gate/up gemv + silu" if epi == PAIR_SILU else "fp8 qkv gemv + rope + append"
        fn, grid, threads = launch
        if fold is not None:
            self._fold_counters.check(fold.sync, grid)
        return launcher.prepared(fn, grid, threads, 0, params, values, name, pdl=True)

    def prepared_int4_silu(
        self, rows: int, x: int, x_ld: int, w: int, k: int, y: int, y_ld: int, ab_type: int, fold: FoldIn | None = None
    ) -> Callable[[], None]:
        """A decode step's gate/up GEMV over the int4 weight ``w`` (registered ``interleaved``, ``[2 m, k]``) with
        FlashInfer's ``silu_and_mul`` as its epilogue, checked and packed once: ``y [rows, m] = silu(g) * u``
        (16-bit, row stride ``y_ld``), ``g`` and ``u`` the 16-bit outputs of ``x [rows, k] @ w.T`` (row stride
        ``x_ld``) as the Dense's ``linear`` rounds them: one launch for two. ``rows`` 1 to 32. Raises
        TypeError/ValueError naming an argument that is no int or out of range, a weight not registered so or of
        another ``k``, a misaligned ``x`` (16 bytes, and its row stride) or ``y`` (2), or ``y`` overlapping ``x``.
        ``fold``: the second GEMV of a folded norm (:mod:`~fi_engine.kernels.norm_fold`; up to 8 rows, ``x`` its
        ``xn``), its counters refused where they serve another grid."""
        if fold is not None and not isinstance(fold, FoldIn):
            raise TypeError(f"fold: the SiLU GEMV is a folded norm's second GEMV (FoldIn), got {type(fold).__name__}")
        _check_epilogue_gemv(rows, FOLD_ROWS if fold is not None else INT4_GEMV_MAX_ROWS, x, x_ld, w, k, y, y_ld)
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        wt = self.int4_weights.get(w)
        if wt is None or not wt.half_n:
            raise ValueError(f"w: 0x{w:x} is no int4 weight registered interleaved (add_int4_weight)")
        check_call(wt, "int4", wt.n, k, ab_type, ab_type)
        check_epilogue_io(rows, x, x_ld, k, y, y_ld, wt.half_n)
        launcher = self._launcher
        launcher.check_open()
        assert self.int4 is not None
        packed = self.int4.gemv(rows, x, x_ld, wt, y, y_ld, ab_type == CUDA_R_16BF, False, silu=True, fold=fold)
        if not packed:
            raise ValueError(f"x: 0x{x:x} (row stride {x_ld}) must be 16-byte aligned for the int4 GEMV")
        fn, grid, threads, params, values = packed
        if fold is not None:
            self._fold_counters.check(fold.sync, grid)
        return launcher.prepared(fn, grid, threads, 0, params, values, "int4 gate/up gemv + silu", pdl=True)

    def fold_rows(self, w: int) -> int:
        """The most rows a folded norm's GEMVs (:attr:`norm_in_gemv`) serve over the registered weight ``w``: 8 for
        int4 (:meth:`prepared_folded_gemv`, :meth:`prepared_int4_silu`), 1 for FP8 (:meth:`prepared_folded_gemv`
        with a :class:`FoldOut`, :meth:`prepared_fp8_silu`, :meth:`prepared_fp8_qkv_rope`) where those kernels
        compiled; 0 where :attr:`norm_in_gemv` is off, ``w`` is not registered or the launch path is off."""
        if not self.norm_in_gemv or not self._launcher.open:
            return 0
        if w in self.int4_weights:
            return FOLD_ROWS
        fp8 = self.fp8
        return 1 if w in self.fp8_weights and fp8 is not None and fp8.pair_launch_folds() else 0

    def prepared_folded_gemv(
        self,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        ab_type: int,
        fold: FoldOut | FoldIn,
    ) -> Callable[[], None]:
        """A decode step's GEMV over the registered weight ``w`` as one side of a folded norm
        (:mod:`~fi_engine.kernels.norm_fold`), checked and packed once: ``y [rows, n] = x @ w.T`` (16-bit) storing
        ``fold``'s ``h_out`` and ``xn`` too (:class:`FoldOut`: the o and down GEMVs; int4 or FP8), or over ``x =
        xn`` times the rows' factors (:class:`FoldIn`: the QKV GEMV; int4). ``rows`` 1 to :meth:`fold_rows`. Raises
        TypeError/ValueError naming an argument that is no int or out of range, a weight of another format, shape or
        type, a misaligned ``x`` (16 bytes) or ``y`` (2), a bad field of ``fold``, or counters that serve another
        grid (``fold.sync``)."""
        _check_epilogue_gemv(rows, FOLD_ROWS, x, x_ld, w, k, y, y_ld)
        int_arg("n", n, 1, 1 << 31)
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        if not isinstance(fold, (FoldOut, FoldIn)):
            raise TypeError(f"fold: expected a FoldOut or a FoldIn, got {type(fold).__name__}")
        launcher = self._launcher
        launcher.check_open()
        bf16 = ab_type == CUDA_R_16BF
        fp8, int4 = self.fp8_weights.get(w), self.int4_weights.get(w)
        if int4 is not None and self.int4 is not None:
            check_call(int4, "int4", n, k, ab_type, ab_type)
            packed = self.int4.gemv(rows, x, x_ld, int4, y, y_ld, bf16, False, fold=fold)
            kind = "int4"
        elif fp8 is not None and self.fp8 is not None and isinstance(fold, FoldOut):
            check_call(fp8, "FP8", n, k, ab_type, ab_type)
            packed = self.fp8.gemv(rows, x, x_ld, fp8, y, y_ld, bf16, False, fold=fold)
            kind = "fp8"
        else:
            raise ValueError(
                f"w: 0x{w:x} is no int4 weight, nor an FP8 one for a FoldOut: the folded norm's GEMVs read those"
            )
        if not packed:
            raise ValueError(
                f"rows, x: the {kind} folded-norm GEMV serves up to {FOLD_ROWS if kind == 'int4' else 1} rows over x "
                f"16-byte aligned (rows {rows}, x 0x{x:x}, x_ld {x_ld})"
            )
        fn, grid, threads, params, values = packed
        if isinstance(fold, FoldIn):
            self._fold_counters.check(fold.sync, grid)
        return launcher.prepared(fn, grid, threads, 0, params, values, f"{kind} gemv + folded norm", pdl=True)

    def close(self) -> None:
        """Forget the weights and their packed launches, free the scratch matrices (the Dense's ``close``)."""
        if self.fp8 is not None:
            self.fp8.close()
        if self.int4 is not None:
            self.int4.close()
