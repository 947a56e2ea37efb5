"""The grouped GEMV of a mixture-of-experts decode step over FP8 (e4m3) experts read as stored (W8A16):
:class:`Fp8GroupedGemv` (CUDA C in ``csrc/grouped_gemv8.cu``, compiled with NVRTC through CuPy), and the
experts' weights as it reads them (:class:`Fp8Experts`).

The product is :class:`~fi_engine.kernels.moe_gemv.GroupedGemv`'s, ``y[a, j] = sum_c in[a // div, c] *
W[experts[a], j, c]`` over a step's ``A = tokens * top_k`` assignments, with ``W`` an expert's e4m3 codes times
its scales: per output row (``block`` None; a per-tensor scale is one repeated over the rows) or per block of
``(bn, bk)`` rows and columns, ``bn`` a multiple of 16 and ``bk`` of 128 (the published 128x128). Each weight is
read once as its byte and decoded once, for all of an expert's rows of the pass, into a 16-bit pair that one
``mma.m16n8k16`` multiplies by up to 8 input rows (SM 8.0+). The float32 sums of a 128-column chunk take its block
scale; ``y`` is rounded once. Half the bytes of the 16-bit experts at batch 1-8, where a step is bound by them.
The codes are read row-major, or in :func:`tiled_layout`'s order (each of a warp's loads 512 contiguous bytes; 5-30 %
faster on an H100, benchmarks/RESULTS.md) where the loader could store them so.

Steps the GEMV does not serve (long prefills, more than 1024 assignments) read a 16-bit copy of the layer's
experts that :meth:`Fp8GroupedGemv.dequantize_launch` writes (each code times its scale, rounded once, as
:meth:`~fi_engine.checkpoint.fp8_weights.Fp8Matrix.dequantized` computes it): one buffer the size of one layer's
16-bit experts, shared by every layer, written before each such use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checkpoint.quantization import grouped_gemv_block
from .cuda_sources import function_ptr, source
from .moe_gemv import ExpertCall, KernelLaunch, QuantizedGroupedGemv, no_epilogue

__all__ = ["Fp8Experts", "Fp8GroupedGemv", "tiled_layout"]

_MAX_ASSIGN = 1024  # assignments one launch takes (the block's list in shared memory)
_STATIC_SMEM = 4 * _MAX_ASSIGN + 64  # the list and the count
_SUMS_SMEM = 16 * 512  # the warps' sums: up to 16 warps of 32 lanes by 4 float32
_MAX_ROWS = 8  # staged rows per pass: the mma's n
_BLOCK_EXPECTED = (
    "expected None or (rows, columns): rows a multiple of 16, columns a power of two >= 128 (e.g. (128, 128))"
)


@dataclass(frozen=True)
class Fp8Experts:
    """One layer's e4m3 experts as stored on the GPU (CuPy arrays): ``gate_up [E, 2I, H]`` and ``down [E, H, I]``
    uint8 codes (row-major per expert, the layout of :class:`~fi_engine.layers.moe.MoEWeights`), and their float32
    scales: ``block`` None, one per output row (``gate_up_scales [E, 2I]``, ``down_scales [E, H]``); ``block = (bn,
    bk)``, one per block (``[E, 2I / bn, ceil(H / bk)]`` and ``[E, H / bn, ceil(I / bk)]``, the rows whole blocks).
    ``tiled``: both code arrays hold their bytes in :func:`tiled_layout`'s order (the shapes stay ``[E, n, k]``)."""

    gate_up: Any
    gate_up_scales: Any
    down: Any
    down_scales: Any
    block: tuple[int, int] | None
    tiled: bool = False

    def shapes(self) -> tuple[int, int, int]:
        """``(num_experts, hidden, intermediate)``, checked across the four arrays (ValueError naming the one that
        does not fit)."""
        for name, dtype in (("gate_up", "uint8"), ("down", "uint8"), ("gate_up_scales", "float32"),
                            ("down_scales", "float32")):  # fmt: skip
            arr = getattr(self, name)
            if not isinstance(getattr(arr, "shape", None), tuple):
                raise ValueError(f"fp8_experts.{name}: expected a CuPy array, got {type(arr).__name__}")
            got, contiguous = str(getattr(arr, "dtype", None)), getattr(getattr(arr, "flags", None), "c_contiguous", 0)
            if got != dtype or not contiguous:
                raise ValueError(f"fp8_experts.{name}: expected a C-contiguous {dtype} array (the kernels read its "
                                 f"bytes as such), got {got}{'' if contiguous else ', not C-contiguous'}")  # fmt: skip
        if not grouped_gemv_block(self.block):
            raise ValueError(f"fp8_experts.block: {_BLOCK_EXPECTED}, got {self.block!r:.60}")
        if self.tiled.__class__ is not bool:
            raise ValueError(f"fp8_experts.tiled: expected True or False, got {self.tiled!r:.40}")
        if self.gate_up.ndim != 3 or self.gate_up.shape[1] % 2:
            raise ValueError(f"fp8_experts.gate_up: expected [experts, 2 * intermediate, hidden], got "
                             f"{tuple(self.gate_up.shape)}")  # fmt: skip
        e, i2, h = self.gate_up.shape
        if tuple(self.down.shape) != (e, h, i2 // 2):
            raise ValueError(f"fp8_experts.down: expected [{e}, {h}, {i2 // 2}], got {tuple(self.down.shape)}")
        for name, (n, k) in (("gate_up_scales", (i2, h)), ("down_scales", (h, i2 // 2))):
            want = scale_shape(e, n, k, self.block)
            if tuple(getattr(self, name).shape) != want:
                raise ValueError(f"fp8_experts.{name}: expected {list(want)}, got {list(getattr(self, name).shape)}")
        return e, h, i2 // 2


def scale_shape(experts: int, n: int, k: int, block: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of the scales of ``experts`` e4m3 matrices ``[n, k]`` (see :class:`Fp8Experts`)."""
    if block is None:
        return (experts, n)
    bn, bk = block
    return (experts, -(-n // bn), -(-k // bk))


def tiled_layout(codes: Any) -> Any:
    """The e4m3 experts ``codes [E, n, k]`` (a numpy or CuPy uint8 array, row-major per expert; ``n`` a multiple of
    16, ``k`` of 128) with their bytes in the order the FP8 grouped GEMV's warps load them (a new array of the same
    shape and type): per expert, tile ``T`` of rows ``16 T .. 16 T + 15`` and chunk ``C`` of columns ``128 C ..``
    make 2,048 contiguous bytes, four runs of 512 (``q = 0..3``), each the 16 bytes of lane ``l = 4 g + t`` in
    turn: row ``16 T + g + 8 (q // 2)``, columns ``128 C + 64 (q % 2) + 16 t ..`` -- so each of a warp's loads is
    512 contiguous bytes (``grouped_gemv8.cu``, TILED). ValueError naming the shape where it does not tile."""
    if str(getattr(codes, "dtype", None)) != "uint8":  # the order is of bytes: other elements would be moved whole
        raise ValueError(f"codes: expected a uint8 array of e4m3 codes, got {getattr(codes, 'dtype', type(codes))}")
    shape: tuple[int, ...] = tuple(getattr(codes, "shape", ()))
    if len(shape) != 3 or shape[1] % 16 or shape[2] % 128:
        raise ValueError(f"codes: expected [experts, n, k] with n a multiple of 16 and k of 128, got {list(shape)}")
    e, n, k = shape
    # axes: expert, tile, row half (q // 2), g, chunk, column half (q % 2), t, byte
    split = codes.reshape(e, n // 16, 2, 8, k // 128, 2, 4, 16)
    return split.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(e, n, k).copy()


@dataclass(frozen=True)
class _Stack:
    """A registered expert stack ``[E, n, k]`` (addresses as ints) and its scale arguments as the kernels take them:
    ``s_e`` scales per expert, ``s_ld`` per block row, ``bn`` rows per block, ``shift`` log2 of the 16-byte vectors
    per block along k, ``block`` whether scales are per block."""

    w: int
    scales: int
    experts: int
    n: int
    k: int
    s_e: int
    s_ld: int
    bn: int
    shift: int
    block: bool
    tiled: bool = False


class Fp8GroupedGemv(QuantizedGroupedGemv):
    """The grouped GEMV kernels over e4m3 experts, compiled, registered and launched as
    :class:`~fi_engine.kernels.moe_gemv.QuantizedGroupedGemv` says (:meth:`add` registers a stack); :meth:`fits`
    says whether a step is served (never below SM 8.0, where only the 16-bit copy serves)."""

    kind = "e4m3"

    @staticmethod
    def program() -> str:
        """``grouped_gemv8.cu``'s text."""
        return source("grouped_gemv8.cu")

    @staticmethod
    def kernel_names(dtype: str) -> dict[tuple[bool, bool, bool], str]:
        """The names in ``grouped_gemv8.cu`` of the GEMVs for 16-bit activations ``dtype``, by ``(gated, per-block
        scales, tiled)``."""
        tag = "bf16" if dtype == "bfloat16" else "f16"
        return {
            (gated, block, tiled): f"grouped_gemv8_{tag}_{'block' if block else 'row'}{'_silu' if gated else ''}"
            f"{'_tiled' if tiled else ''}"
            for gated in (False, True)
            for block in (False, True)
            for tiled in (False, True)
        }

    @staticmethod
    def dequant_names(dtype: str) -> dict[bool, str]:
        """The names in ``grouped_gemv8.cu`` of the dequantizers for 16-bit ``dtype``, by ``tiled``."""
        tag = "bf16" if dtype == "bfloat16" else "f16"
        return {tiled: f"dequant_e4m3_{tag}{'_tiled' if tiled else ''}" for tiled in (False, True)}

    min_blocks_per_sm = 1
    """Blocks of 512 threads an SM the kernels' registers must leave room for (``__launch_bounds__``' second
    argument: 1 caps them at 128 a thread, 2 at 64). Read when the kernels are compiled (set it on the class to
    compare: ``benchmarks/bench_grouped_gemv.py --min-blocks``)."""

    chunks_ahead = 2
    """Chunks of weights (128 columns of a tile's 16 rows) a warp has loading while it sums one: the bytes in
    flight that keep HBM busy (each one 16 more registers a thread). Read when the kernels are compiled
    (``benchmarks/bench_grouped_gemv.py --ahead``)."""

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The NVRTC options the kernels are compiled with: fast math as the 16-bit grouped GEMV's (the gated
        staging's ``__expf`` and division are the same), :attr:`chunks_ahead` and :attr:`min_blocks_per_sm`."""
        return (
            "--use_fast_math",
            f"-DG8_AHEAD={int(cls.chunks_ahead)}",
            f"-DG8_MIN_BLOCKS={int(cls.min_blocks_per_sm)}",
        )

    def add(
        self, w: int, scales: int, experts: int, n: int, k: int, block: tuple[int, int] | None, tiled: bool = False
    ) -> None:
        """Register the e4m3 experts ``[experts, n, k]`` at device address ``w`` with their float32 ``scales`` (see
        :class:`Fp8Experts`), their bytes in :func:`tiled_layout`'s order where ``tiled`` (row-major otherwise).
        ValueError naming the argument: an address that is NULL or misaligned (``w`` 16 bytes, ``scales`` 4), ``k``
        not a multiple of 16, a block whose rows are not a multiple of 16 dividing ``n`` or whose columns are not a
        power of two >= 128, a tiled stack whose ``n`` is not a multiple of 16 or ``k`` of 128."""
        self._check_stack(w, scales, 4, experts, n, k)
        if k % 16:
            raise ValueError(f"k: the FP8 grouped GEMV reads 16-byte vectors of weights, so k must be a multiple of "
                             f"16, got {k}")  # fmt: skip
        if tiled and (n % 16 or k % 128):
            raise ValueError(f"tiled: the tiled layout needs n a multiple of 16 and k of 128, got [{n}, {k}]")
        if tiled.__class__ is not bool:
            raise ValueError(f"tiled: expected True or False, got {tiled!r:.40}")
        if block is None:
            self.stacks[w] = _Stack(w, scales, experts, n, k, n, 0, 1, 0, False, tiled)
            return
        if not grouped_gemv_block(block) or n % block[0]:
            raise ValueError(f"block: {_BLOCK_EXPECTED}, rows dividing n ({n}), got {block!r:.60}; dequantize these "
                             f"experts at load instead")  # fmt: skip
        bn, bk = block
        s_ld = -(-k // bk)
        shift = (bk // 16).bit_length() - 1
        self.stacks[w] = _Stack(w, scales, experts, n, k, (n // bn) * s_ld, s_ld, bn, shift, True, tiled)

    def rows_per_pass(self, tokens: int, k: int) -> int:
        """Input rows staged per pass for ``tokens`` tokens (an expert has at most one assignment per token) of
        ``k`` elements: up to 8, as many as shared memory holds; 0 where not even one fits."""
        return max(0, min(_MAX_ROWS, tokens, (self._smem_limit - _SUMS_SMEM) // (2 * k)))

    def fits(self, tokens: int, top_k: int, n: int, k: int) -> bool:
        """Whether a launch for ``tokens`` tokens of ``top_k`` assignments over ``[E, n, k]`` experts is served
        (tensor cores, at most 1024 assignments, k a multiple of 16, one input row in shared memory)."""
        return (
            self.tensor_cores
            and 0 < tokens * top_k <= _MAX_ASSIGN
            and k % 16 == 0
            and n > 0
            and self.rows_per_pass(tokens, k) > 0
        )

    chunks_per_warp = 4
    """A block's warps split k so that each sums at least this many chunks of 128 of a tile (at most 8 warps, 16
    where the staged rows leave room for one block an SM; at least 1). Read at each launch's packing; set it on the
    class to compare (``benchmarks/bench_mixtral.py --variants fp8-chunks-N``)."""

    wide_blocks = True
    """Blocks of up to 16 warps where the staged rows leave room for only one block an SM (the down projection's
    4-8 rows of 14,336 values), so that the SM still has 16 warps streaming weights; False: 8 at most. Read as
    :attr:`chunks_per_warp` is."""

    warps_per_sm = 32
    """The warps a launch spreads over each SM (blocks over the active experts, at most one per tile of 16 weight
    rows). Read as :attr:`chunks_per_warp` is (``--variants fp8-warps-N``)."""

    def _geometry(self, assignments: int, tokens: int, st: _Stack) -> tuple[int, int, int, int]:
        """A launch's rows per pass, warps per block, blocks per expert and dynamic shared bytes: up to 8 warps a
        block splitting k (:attr:`chunks_per_warp`; 16 where :attr:`wide_blocks` and the staged rows leave room
        for one block an SM), :attr:`warps_per_sm` warps an SM over the active experts (at
        most ``min(E, assignments)``), at most one block per tile of 16 weight rows."""
        r = self.rows_per_pass(tokens, st.k)
        staged = r * st.k * 2 + _STATIC_SMEM + 8 * 512 + 1024  # a block of 8 warps (1 KiB: the driver's reserve)
        widest = 16 if self.wide_blocks and self._smem_per_sm and self._smem_per_sm < 2 * staged else 8
        warps = max(1, min(widest, st.k // (128 * max(1, int(self.chunks_per_warp)))))
        active = max(1, min(st.experts, assignments))
        per_sm = max(1, int(self.warps_per_sm))
        blocks = max(1, min(-(-st.n // 16), -(-(per_sm * self._sms // warps) // active)))
        return r, warps, blocks, r * st.k * 2 + warps * 512

    def _plan(self, call: ExpertCall, epilogue: dict[str, Any]) -> KernelLaunch:
        """The launch of ``call`` over the registered stack at ``call.w`` (:meth:`add`; ``y[a, :n] = x[a // div, :k]
        @ dequant(w[experts[a]]).T``); :meth:`fits` must hold."""
        no_epilogue(epilogue)
        c = call
        st = self._stack(c.w, c.num_experts, c.n, c.k)
        r, warps, blocks, smem = self._geometry(c.assignments, c.tokens, st)
        args = [c.x, c.x_ld, c.div, c.experts, c.assignments, c.w, c.n, c.k, st.scales, st.s_e, st.s_ld, st.bn,
                st.shift, c.y, c.y_ld, r]  # fmt: skip
        return self._fns[c.gated, st.block, st.tiled], blocks, warps, smem, args

    def dequantize_launch(self, w: int, out: int) -> tuple[int, tuple[int, int], int, int, list[int]]:
        """The launch writing the registered stack at ``w`` as 16-bit weights ``[E, n, k]`` at ``out`` (each code
        times its scale, rounded once), as :meth:`launch` gives it."""
        st = self._registered(w)
        rows = st.experts * st.n
        vectors = rows * st.k // 16
        args = [st.w, out, rows, st.k, st.scales, st.s_ld, st.bn, st.shift, int(st.block)]
        grid = (max(1, min(16 * self._sms, -(-vectors // 256))), 1)
        return function_ptr(self._dequant[st.tiled]), grid, 256, 0, args
