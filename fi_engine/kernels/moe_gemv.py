"""The grouped GEMV of a mixture-of-experts decode step: each chosen expert's weights read once, at HBM bandwidth,
for the few tokens that chose it (:class:`GroupedGemv`; CUDA C in ``csrc/grouped_gemv.cu``,
compiled with NVRTC through CuPy).

A decode step of ``T`` tokens with ``k`` experts each makes ``A = T * k`` assignments; assignment ``a`` is token
``a // k``'s ``a % k``-th choice, of expert ``experts[a]`` (the device routing's output). For experts' weights
``W [E, N, K]`` (row-major: ``E`` stacked Linear weights), one launch computes

    ``y[a, j] = sum_c in[a // div, c] * W[experts[a], j, c]``   for ``a < A``, ``j < N``

(``div = k`` for the gate/up projection, whose input rows are the tokens; ``div = 1`` for the down projection,
whose input rows are the assignments' activations). The grid has one row of blocks per expert: a block first
lists the assignments of its expert (an expert no token chose returns at once, its weights unread), stages up to
``R`` of their input rows in shared memory, then streams its share of the expert's ``N`` weight rows (one warp per
row, 4 16-byte loads in flight per lane, past L1, as the dense GEMV of :mod:`~fi_engine.kernels.cuda_sources`) and keeps
``R`` float32 sums per row; more than ``R`` assignments of one expert take further passes over its weights. ``y``
is rounded once to the 16-bit type. Nothing is read back to the host: a CUDA graph can capture it.

The fixed-capacity grouped GEMM (FlashInfer's ``segment_gemm``, :mod:`~fi_engine.layers.moe`) pads every expert's rows
to tensor-core tiles; at 1-8 rows per expert this reads the same weights in fewer, fuller streams
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cuda_sources import source

__all__ = ["GroupedGemv"]

""":func:`~fi_engine.kernels.cuda_sources.source` of ``csrc/grouped_gemv.cu``: the grouped GEMV kernels."""

_WARPS = 8  # warps per block, unless shared memory holds too few blocks per SM (GroupedGemv.min_warps_per_sm)
_ROWS = (1, 2, 4, 8)  # the kernels' staged rows per pass
_MAX_ASSIGN = 1024  # assignments one launch takes (the block's list in shared memory)
_STATIC_SMEM = 4 * _MAX_ASSIGN + 64  # the list and the count


class GroupedGemv:
    """The grouped GEMV kernels compiled once for ``dtype`` (``"float16"`` or ``"bfloat16"``) on CuPy's current
    device, launched on ``stream`` (a ``cupy.cuda.Stream``). :meth:`fits` says whether a shape is served."""

    def __init__(self, dtype: str, stream: Any) -> None:
        if dtype not in ("float16", "bfloat16"):  # before CuPy: named the same with or without a GPU
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r:.40}")
        import cupy

        self.stream = stream
        tag = "bf16" if dtype == "bfloat16" else "f16"
        # fast math as FlashInfer's activation modules compile (the gated staging's __expf and division)
        module = cupy.RawModule(code=source("grouped_gemv.cu"), options=("--use_fast_math",))
        attrs = cupy.cuda.Device().attributes
        self._smem_limit = int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 << 10)) - _STATIC_SMEM
        self._smem_per_sm = int(attrs.get("MaxSharedMemoryPerMultiprocessor", 0))
        self._sms = int(attrs.get("MultiProcessorCount", 132))
        self._fns = {}  # (rows per pass, gated) -> the kernel
        for r in _ROWS:
            for gated in (False, True):
                fn = module.get_function(f"grouped_gemv_{tag}_r{r}{'_silu' if gated else ''}")
                fn.max_dynamic_shared_size_bytes = self._smem_limit
                self._fns[r, gated] = fn
        # the most warps a block of every kernel may have (its registers per thread allow it)
        self._max_warps = min(32, *(int(fn.max_threads_per_block) // 32 for fn in self._fns.values()))
        self._module = module

    min_warps_per_sm = 32
    """A launch whose staged rows leave room for few blocks per SM (4 rows of the down projection's 14336
    elements: 115 KB, one block) gets more warps per block (up to 32), so that each SM still has about this many
    warps streaming weights; 8 warps a block otherwise. 0: always 8 (as before 2026-11-25). Read at each launch's
    packing; set it on the class to compare (``benchmarks/bench_mixtral.py --variants grouped-warps-8``)."""

    def warps_per_block(self, smem: int) -> int:
        """Warps per block for a launch of ``smem`` bytes of staged rows (see :attr:`min_warps_per_sm`)."""
        resident = min(8, self._smem_per_sm // (smem + _STATIC_SMEM + 1024)) if self._smem_per_sm else 8
        if self.min_warps_per_sm <= 0 or resident <= 0:
            return _WARPS
        return min(self._max_warps, max(_WARPS, -(-self.min_warps_per_sm // resident)))

    def rows_per_pass(self, tokens: int, k: int) -> int:
        """Input rows staged per pass for ``tokens`` tokens (an expert has at most one assignment per token) of
        ``k`` elements: the smallest of 1, 2, 4, 8 that holds them all, or fewer where shared memory is short
        (more passes); 0 where not even one row fits (the shape is not served)."""
        want = next((r for r in _ROWS if r >= tokens), _ROWS[-1])
        for r in reversed(_ROWS):
            if r <= want and r * k * 2 <= self._smem_limit:
                return r
        return 0

    def fits(self, tokens: int, top_k: int, n: int, k: int) -> bool:
        """Whether a launch for ``tokens`` tokens of ``top_k`` assignments over ``[E, n, k]`` weights is served
        (k a multiple of 8, at most 1024 assignments, one input row in shared memory)."""
        return 0 < tokens * top_k <= _MAX_ASSIGN and k % 8 == 0 and n > 0 and self.rows_per_pass(tokens, k) > 0

    def _geometry(self, assignments: int, num_experts: int, tokens: int, n: int, k: int) -> tuple[int, int, int]:
        """A launch's rows staged per pass, warps per block and blocks per expert: enough blocks for the active
        experts (at most ``min(E, assignments)``) to fill every SM 8 blocks deep, at most one column per warp."""
        r = self.rows_per_pass(tokens, k)
        warps = self.warps_per_block(r * k * 2)
        active = max(1, min(num_experts, assignments))
        return r, warps, max(1, min(-(-n // warps), -(-8 * self._sms // active)))

    def launch(
        self,
        x: int,
        x_ld: int,
        div: int,
        experts: int,
        tokens: int,
        top_k: int,
        w: int,
        num_experts: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        gated: bool = False,
    ) -> tuple[int, tuple[int, int], int, int, list[int]]:
        """The launch :meth:`__call__` makes, for pointers given as ints: ``(function handle, grid, threads per
        block, shared bytes, arguments)``, for a caller that packs it once (``Launcher.prepared_kernel``)."""
        assignments = tokens * top_k
        r, warps, blocks = self._geometry(assignments, num_experts, tokens, n, k)
        args = [x, x_ld, div, experts, assignments, w, n, k, y, y_ld]
        fn = self._fns[r, gated]
        function = getattr(fn, "kernel", fn)  # a CuPy RawKernel's compiled Function
        return int(function.ptr), (blocks, num_experts), 32 * warps, r * k * 2, args

    def __call__(
        self,
        x: Any,
        div: int,
        experts: Any,
        tokens: int,
        top_k: int,
        w: Any,
        num_experts: int,
        n: int,
        k: int,
        y: Any,
        gated: bool = False,
    ) -> None:
        """``y[a, :n] = x[a // div, :k] @ w[experts[a]].T`` for the ``a < tokens * top_k`` assignments (device
        arrays: ``x`` 16-bit rows with contiguous elements, ``experts`` int32, ``w [num_experts, n, k]``
        contiguous, ``y`` 16-bit rows); :meth:`fits` must hold. Blocks per expert: enough for the active experts
        (at most ``min(E, tokens * top_k)``) to fill every SM 8 blocks deep. ``gated``: ``x``'s rows are
        ``[gate | up]`` of ``2 k`` elements and the product reads ``silu(gate) * up`` in their place (the
        expert's SiLU-and-mul made as the rows are staged)."""
        assignments = tokens * top_k
        r, warps, blocks = self._geometry(assignments, num_experts, tokens, n, k)
        x_ld = x.strides[0] // x.itemsize
        y_ld = y.strides[0] // y.itemsize
        args = (x, np.int64(x_ld), np.int32(div), experts, np.int32(assignments), w, np.int32(n), np.int32(k), y,
                np.int64(y_ld))  # fmt: skip
        self._fns[r, gated]((blocks, num_experts), (32 * warps,), args, shared_mem=r * k * 2, stream=self.stream)
