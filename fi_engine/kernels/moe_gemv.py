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

from typing import Any, NamedTuple

import numpy as np

from .cuda_sources import function_ptr, source

__all__ = ["ExpertCall", "GroupedGemv", "GroupedGemvs", "QuantizedGroupedGemv"]

""":func:`~fi_engine.kernels.cuda_sources.source` of ``csrc/grouped_gemv.cu``: the grouped GEMV kernels."""

_WARPS = 8  # warps per block, unless shared memory holds too few blocks per SM (GroupedGemv.min_warps_per_sm)
_ROWS = (1, 2, 4, 8)  # the kernels' staged rows per pass
_MAX_ASSIGN = 1024  # assignments one launch takes (the block's list in shared memory)
_STATIC_SMEM = 4 * _MAX_ASSIGN + 64  # the list and the count
_U64 = 1 << 64


class ExpertCall(NamedTuple):
    """One grouped GEMV launch's operands: ``y[a, :n] = in[a // div, :k] @ W[experts[a]].T`` for the ``a < tokens *
    top_k`` assignments, addresses as ints and row strides in elements: ``x`` the 16-bit input rows (``gated``: rows
    ``[gate | up]`` of ``2 k`` elements, read as ``silu(gate) * up``), ``experts`` the int32 expert of each
    assignment, ``w`` the ``num_experts`` experts' ``[n, k]`` weights, ``y`` the 16-bit output rows."""

    x: int
    x_ld: int
    div: int
    experts: int
    tokens: int
    top_k: int
    w: int
    num_experts: int
    n: int
    k: int
    y: int
    y_ld: int
    gated: bool

    @property
    def assignments(self) -> int:
        """``tokens * top_k``: the rows of ``y``."""
        return self.tokens * self.top_k


KernelLaunch = tuple[Any, int, int, int, list[Any]]
"""A grouped GEMV's launch as a subclass plans it: ``(kernel, blocks per expert, warps per block, shared bytes,
argument ints)`` (float arguments as their float32 bits)."""


def _address(arr: Any) -> Any:
    """A CuPy array's device address; anything else as it is."""
    data = getattr(arr, "data", None)
    return int(data.ptr) if data is not None else arr


class GroupedGemvs:
    """What the grouped GEMVs (:class:`GroupedGemv` over 16-bit experts, and those over FP8 and MXFP4 experts) share:
    one step's launch, for a caller that packs it (:meth:`launch`) or on the stream over CuPy arrays
    (:meth:`__call__`). A subclass plans it (``_plan``) and holds ``stream`` (a ``cupy.cuda.Stream``)."""

    stream: Any

    def _plan(self, call: ExpertCall, epilogue: dict[str, Any]) -> KernelLaunch:
        """The kernel, geometry and arguments of ``call``; ``epilogue``: the keyword arguments only some formats
        take (TypeError naming one this format does not)."""
        raise NotImplementedError

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
        **epilogue: Any,
    ) -> tuple[int, tuple[int, int], int, int, list[Any]]:
        """The launch of :class:`ExpertCall` ``(x, ..., gated)``, pointers as ints: ``(function handle, grid,
        threads per block, shared bytes, arguments)``, for a caller that packs it once (``Launcher.prepared_kernel``);
        the grid has one row of blocks per expert. ``epilogue``: the format's own keyword arguments (MXFP4's bias
        and activation; none for the others). The subclass's ``fits`` must hold."""
        call = ExpertCall(x, x_ld, div, experts, tokens, top_k, w, num_experts, n, k, y, y_ld, gated)
        kernel, blocks, warps, smem, args = self._plan(call, epilogue)
        return function_ptr(kernel), (blocks, num_experts), 32 * warps, smem, args

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
        **epilogue: Any,
    ) -> None:
        """:meth:`launch` over CuPy arrays (``x`` and ``y`` 16-bit rows with contiguous elements, ``experts`` int32,
        ``w`` the experts, an epilogue's arrays too), launched on the stream."""
        x_ld, y_ld = x.strides[0] // x.itemsize, y.strides[0] // y.itemsize
        call = ExpertCall(_address(x), x_ld, div, _address(experts), tokens, top_k, _address(w), num_experts, n, k,
                          _address(y), y_ld, gated)  # fmt: skip
        kernel, blocks, warps, smem, args = self._plan(call, {k: _address(v) for k, v in epilogue.items()})
        # every argument in 8 bytes: a 32-bit parameter reads the low 4 (little-endian), as a packed launch passes them
        typed = tuple(np.uint64(a) for a in args)
        kernel((blocks, num_experts), (32 * warps,), typed, shared_mem=smem, stream=self.stream)


def no_epilogue(epilogue: dict[str, Any]) -> None:
    """TypeError naming the first keyword argument of ``epilogue`` (a format that takes none)."""
    for name in epilogue:
        raise TypeError(f"{name}: this grouped GEMV takes no epilogue arguments (MXFP4's bias and activation)")


class QuantizedGroupedGemv(GroupedGemvs):
    """What the grouped GEMVs over quantized experts (FP8: :class:`~fi_engine.kernels.fp8_moe_gemv.
    Fp8GroupedGemv`; MXFP4: :class:`~fi_engine.kernels.mxfp4_moe_gemv.Mxfp4GroupedGemv`) share: their kernels
    compiled once for ``dtype`` (``"float16"`` or ``"bfloat16"``, the activations') on CuPy's current device and
    launched on ``stream``, the expert stacks registered by address (``add``, values only: the arrays must stay
    allocated while the layer runs) and the 16-bit copy of a stack (:meth:`dequantize`). A subclass names its
    ``kind`` (in errors), ``program``, kernels (``kernel_names``, by key; ``dequant_names``, by whether the
    stack is tiled) and ``options``."""

    kind = ""

    def __init__(self, dtype: str, stream: Any) -> None:
        if dtype not in ("float16", "bfloat16"):  # before CuPy: named the same with or without a GPU
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r:.40}")
        import cupy

        self.stream = stream
        module = cupy.RawModule(code=self.program(), options=self.options())
        device = cupy.cuda.Device()
        attrs = device.attributes
        self.tensor_cores = int(device.compute_capability) >= 80  # below: empty kernels, the copy serves
        self._smem_limit = int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 << 10)) - _STATIC_SMEM
        self._sms = int(attrs.get("MultiProcessorCount", 132))
        self._smem_per_sm = int(attrs.get("MaxSharedMemoryPerMultiprocessor", 0))
        self._fns: dict[Any, Any] = {}  # kernel_names' key -> the kernel
        for key, name in self.kernel_names(dtype).items():
            fn = module.get_function(name)
            fn.max_dynamic_shared_size_bytes = self._smem_limit
            self._fns[key] = fn
        self._dequant = {tiled: module.get_function(name) for tiled, name in self.dequant_names(dtype).items()}
        self._module = module
        self.stacks: dict[int, Any] = {}  # weight address -> its registration

    @staticmethod
    def program() -> str:
        """The CUDA C the kernels are compiled from (:func:`~fi_engine.kernels.cuda_sources.source`'s text)."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The NVRTC options the kernels are compiled with."""
        raise NotImplementedError

    @staticmethod
    def kernel_names(dtype: str) -> dict[Any, str]:
        """The GEMVs' names in :meth:`program` for 16-bit activations ``dtype``, by the subclass's key."""
        raise NotImplementedError

    @staticmethod
    def dequant_names(dtype: str) -> dict[bool, str]:
        """The dequantizers' names in :meth:`program` for 16-bit ``dtype``, by whether the stack is tiled."""
        raise NotImplementedError

    @staticmethod
    def _check_stack(w: int, scales: int, scales_align: int, experts: int, n: int, k: int) -> None:
        """``add``'s checks every format makes: ValueError naming an address that is NULL or misaligned (``w`` 16
        bytes, ``scales`` ``scales_align``), or a size the kernels cannot address (``experts``: the grid's second
        dimension, CUDA's limit; ``n``, ``k``: their 32-bit row and column arithmetic)."""
        for name, value, align in (("w", w, 16), ("scales", scales, scales_align)):
            if value.__class__ is not int or not 0 < value < _U64 or value % align:
                raise ValueError(f"{name}: expected a non-NULL device address aligned to {align} bytes, got {value!r}")
        for name, value, top in (("experts", experts, 65535), ("n", n, 1 << 30), ("k", k, 1 << 30)):
            if value.__class__ is not int or not 0 < value <= top:
                raise ValueError(f"{name}: expected an int in [1, {top}], got {value!r:.40}")

    def _stack(self, w: int, experts: int, n: int, k: int) -> Any:
        """The stack registered at ``w`` as ``[experts, n, k]``; ValueError naming ``w`` where none is."""
        st = self.stacks.get(w)
        if st is None or (st.experts, st.n, st.k) != (experts, n, k):
            raise ValueError(
                f"w: no {self.kind} experts [{experts}, {n}, {k}] registered at {w:#x}; register them with add() first"
            )
        return st

    def _registered(self, w: int) -> Any:
        """The stack registered at address ``w``; ValueError naming ``w`` where none is."""
        st = self.stacks.get(w)
        if st is None:
            raise ValueError(f"w: no {self.kind} experts registered at {w:#x}; register them with add() first")
        return st

    def dequantize_launch(self, w: int, out: int) -> tuple[int, tuple[int, int], int, int, list[int]]:
        """The launch writing the registered stack at ``w`` as 16-bit weights ``[E, n, k]`` at ``out``, as
        :meth:`launch` gives it."""
        raise NotImplementedError

    def dequantize(self, w: Any, out: Any) -> None:
        """Write the registered stack ``w`` (a CuPy array) into ``out`` (a C-contiguous 16-bit CuPy array of its
        shape ``[E, n, k]``) on the stream; ValueError naming ``out`` where it is not one (the kernel would write past
        it)."""
        st = self._registered(int(w.data.ptr))
        want = [st.experts, st.n, st.k]
        shape, itemsize = list(getattr(out, "shape", ())), getattr(getattr(out, "dtype", None), "itemsize", 0)
        if shape != want or itemsize != 2 or not getattr(getattr(out, "flags", None), "c_contiguous", 0):
            raise ValueError(f"out: expected a C-contiguous 16-bit array of shape {want}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {shape}")  # fmt: skip
        _, grid, threads, _, args = self.dequantize_launch(st.w, int(out.data.ptr))
        typed = tuple(np.uint64(a) for a in args)  # (8-byte slots, as __call__ passes them)
        self._dequant[st.tiled](grid, (threads,), typed, stream=self.stream)


class GroupedGemv(GroupedGemvs):
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

    def _plan(self, call: ExpertCall, epilogue: dict[str, Any]) -> KernelLaunch:
        """The launch of ``call`` over 16-bit experts ``[E, n, k]`` (contiguous): blocks per expert enough for the
        active experts (at most ``min(E, tokens * top_k)``) to fill every SM 8 blocks deep; :meth:`fits` must hold."""
        no_epilogue(epilogue)
        c = call
        r, warps, blocks = self._geometry(c.assignments, c.num_experts, c.tokens, c.n, c.k)
        args = [c.x, c.x_ld, c.div, c.experts, c.assignments, c.w, c.n, c.k, c.y, c.y_ld]
        return self._fns[r, c.gated], blocks, warps, r * c.k * 2, args
