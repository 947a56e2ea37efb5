"""Dense math of the engine: cuBLAS GEMMs (through cffi, :mod:`~fi_engine.kernels.cublas`; cuBLASLt with algorithms
cached per shape, :mod:`~fi_engine.kernels.cublas_lt`), a GEMV of its own for GEMMs of at most 4 rows, the skinny GEMM
for GPU-bound steps of up to 32 rows where it is timed faster (:mod:`~fi_engine.kernels.skinny_gemm`), and the choice
among them per call. :class:`Dense` routes each linear to one of those and holds the parts the engine reaches through
it: the packed-launch plumbing (:mod:`~fi_engine.kernels.launch`), the fused decode-step GEMVs
(:mod:`~fi_engine.kernels.fused_gemv`), the FP8 and int4 weights (:mod:`~fi_engine.kernels.quantized_weights`), and
the row kernels of sampling and of a vocabulary split over ranks (:mod:`~fi_engine.kernels.row_kernels`,
:mod:`~fi_engine.kernels.shard_kernels`). Their CUDA C is :mod:`~fi_engine.kernels.cuda_sources`.

Why ``cublasGemmEx`` on raw pointers rather than ``cupy.matmul``: ``matmul`` has no bfloat16 (numpy has no such
dtype), may allocate temporaries, and goes through CuPy's cuBLAS wrappers, which reset the handle's stream on every
call and refuse to run during stream capture. Our handle is bound once to the engine's stream with a fixed
workspace, writes into our buffers and never allocates, so the GEMMs can be captured in a CUDA graph. The
kernels are compiled once with NVRTC (``cupy.RawModule``) and never allocate either (a ``RawKernel`` or
``cuLaunchKernel`` launch is a plain kernel launch, which capture records).

Every launch goes to CuPy's *current* stream (kernels) or the handle's stream (GEMMs, the GEMV); the engine makes
its stream current and gives it to :class:`Dense`, so they are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from fi_ffi.cuda import driver_error
from fi_ffi.errors import CublasError, LibraryLoadError

from .call_forms import same_parameters
from .cublas import (
    CUBLAS_COMPUTE_32F,
    CUBLAS_GEMM_DEFAULT,
    CUBLAS_OP_N,
    CUBLAS_OP_T,
    CUDA_R_16BF,
    CUDA_R_16F,
    CUDA_R_32F,
    Handle,
    status_name,
)
from .cuda_sources import functions, source
from .fused_gemv import FusedGemvs, FusedKernels
from .gemv_settings import GEMV_MAX_ROWS, GEMV_NAMES, GemvSettings
from .launch import MAX_LD, U64, Launcher, int_arg
from .launch_timing import LaunchTimer, close_choices
from .quantized_weights import QuantizedWeights, check_call
from .row_kernels import ROW_KERNELS, RowKernels
from .shard_kernels import SHARD_KERNELS, ShardKernels
from .skinny_gemm import SKINNY_MAX_ROWS, SkinnyLaunches

__all__ = [
    "CUDA_R_16BF",
    "CUDA_R_16F",
    "CUDA_R_32F",
    "GEMV_MAX_ROWS",
    "WORKSPACE_BYTES",
    "Dense",
    "data_type",
]

# cuBLAS's scratch: 32 MiB, what NVIDIA's cuBLAS documentation recommends for Hopper (4 MiB suffices before it).
WORKSPACE_BYTES = 32 << 20
_GEMV_WARPS = 4  # output columns per block (one warp each)
_GEMV, _LT = -1, -2  # Dense._choice: the GEMV, cuBLASLt (or the FP8 paths); 0, 1, ...: a skinny plan
# the last value of a timed shape's key for Dense.gate_up_silu: the gate/up GEMM and its SiLU-and-mul as one choice
# (_LT: Dense.linear, then silu_and_mul; 0, 1, ...: a plan of the skinny GEMM's SiLU form)
_SILU_FORM = 1
_LinearCall = tuple[int, int, int, int, int, int, int, int, int, int]  # Dense.linear's arguments but accumulate


def data_type(dtype: str) -> int:
    """The cudaDataType_t of an fi_ffi dtype name."""
    try:
        return {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF, "float32": CUDA_R_32F}[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}") from None


def gemv_bound(rows: int, n: int, k: int) -> bool:
    """The rule where a shape cannot be timed (``Dense._choice``): whether the GEMV likely reads a ``[n, k]``
    weight for ``rows`` rows faster than cuBLASLt when only the device's time counts (a CUDA graph's replay): one
    row, or an output at least 16 times wider than deep (the LM head), up to :data:`GEMV_MAX_ROWS` rows. From an
    H100 (benchmarks/bench_gemv.py; benchmarks/RESULTS.md): at one row the GEMV read the 8B shape's weights at
    68-92 % of HBM bandwidth, cuBLASLt at 64-86 %, each winning some shapes; at 2-4 rows the GEMV's per-row reads
    of ``x`` make it slower than cuBLASLt except for the LM head."""
    return rows == 1 or n >= 16 * k


class Dense:
    """A cuBLAS handle bound to ``stream`` with a workspace of its own, the GEMV kernels, and the parts that launch
    the rest (compiled on construction). Create it on the device it serves (CuPy's current device).

    Args:
        stream: the engine's ``cupy.cuda.Stream``; kernels launch on CuPy's current stream, which the engine
            keeps equal to it.

    ``gemv`` (True where the kernel compiled and the driver loaded): :meth:`linear` of at most
    :data:`GEMV_MAX_ROWS` rows runs a GEMV kernel of its own, launched with ``cuLaunchKernel`` on arguments packed
    once per call site, instead of cuBLAS (whose launch costs several times more host time: an eager decode step
    is host-bound). ``lt``: the other GEMMs go through cuBLASLt with cached algorithms.

    Its parts: ``launcher`` (:class:`~fi_engine.kernels.launch.Launcher`: packed launches through the driver),
    ``fused`` (:class:`~fi_engine.kernels.fused_gemv.FusedGemvs`: the decode step's GEMVs with a prologue or
    epilogue), ``quantized`` (:class:`~fi_engine.kernels.quantized_weights.QuantizedWeights`: the FP8 and int4
    weights :meth:`linear` reads as such), ``rows`` (:class:`~fi_engine.kernels.row_kernels.RowKernels`: row gather
    and argmax) and ``shards`` (:class:`~fi_engine.kernels.shard_kernels.ShardKernels`: the vocabulary shards'
    gather, argmax and reassembly).
    """

    # no quantized weight until one is registered (class defaults: the host tests build a Dense without its GPU
    # __init__); a mirror of quantized.fp8_weights / int4_weights, which linear reads on every call
    _fp8_weights: Any = MappingProxyType({})
    _int4_weights: Any = MappingProxyType({})

    def __init__(self, stream: Any) -> None:
        import cupy

        # cuBLAS scratch, allocated here so that no GEMM allocates (least of all during capture); kept alive as
        # long as the handle and any graph captured with it (the engine closes the graph first).
        self._workspace = cupy.empty(WORKSPACE_BYTES, cupy.uint8)
        self._blas = Handle()
        try:
            self._blas.bind(stream.ptr, self._workspace.data.ptr, WORKSPACE_BYTES)
            row_fns = functions(cupy, "rows.cu", ROW_KERNELS + SHARD_KERNELS)
        except BaseException:
            self._blas.close()
            raise
        self._stream = stream.ptr
        self._gemv_fns: dict[tuple[int, int], tuple[int, ...]] = {}  # (ab_type, c_type) -> CUfunction per row count
        self._gemv_args: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self.gemv = False
        self.gemv_error = ""  # why the GEMV is unavailable, if it is
        # True while a GPU-bound step is issued (a CUDA graph's warm-up and capture): each shape of up to 32 rows
        # then takes the launch timed fastest on this device (_choice: the GEMV, the skinny GEMM, cuBLASLt or the
        # quantized paths), not the GEMV for every shape of <= 4 rows as eagerly, where its lower host time wins
        self.bandwidth_bound = False
        # which launch serves a shape of up to SKINNY_MAX_ROWS rows in a GPU-bound step, timed once per
        # (rows, n, k, ab_type, c_type, FP8 weight or 0): _LT, _GEMV or the index of a skinny plan (_choice)
        self._choices: dict[tuple[int, ...], int] = {}
        # each timed shape's launches and their times alone, in ms (LaunchTimer.times), by the _choices key
        self._timings: dict[tuple[int, ...], dict[int, float]] = {}
        launcher, fused = Launcher(stream.ptr), FusedKernels()
        try:  # the small-row GEMV (see linear); a GPU or driver it cannot serve leaves it off
            from fi_ffi.cuda import libcuda, libcuda_ffi

            lib = libcuda()
            if lib is not None:
                gemv = cupy.RawModule(code=source("gemv.cu"), options=GemvSettings.gemv_options())
                self._gemv_fns = {key: GemvSettings.by_row_count(gemv, name) for key, name in GEMV_NAMES.items()}
                self._gemv_module = gemv
                try:  # CUDA 12.0 drivers and later; Hopper and later run its programmatic dependent launch
                    major = int(cupy.cuda.Device().compute_capability[:-1] or 0)
                    launch_ex = lib.cuLaunchKernelEx if major >= 9 else None
                except (AttributeError, ValueError):
                    launch_ex = None
                launcher = Launcher(stream.ptr, lib.cuLaunchKernel, launch_ex, libcuda_ffi())
                self.gemv = True
                try:
                    fused = FusedKernels.compile(cupy)
                except Exception as exc:  # NVRTC refusing: the engine keeps its separate norm and activation launches
                    self.gemv_error = f"fused GEMV: {type(exc).__name__}: {exc}"
            else:
                self.gemv_error = "libcuda could not be loaded or cuInit failed (fi_ffi.cuda.libcuda)"
        except Exception as exc:  # NVRTC or the driver refusing: cuBLAS serves every GEMM
            self._gemv_fns, self.gemv_error = {}, f"{type(exc).__name__}: {exc}"
        self.launcher = launcher
        self._launch, self._null = launcher.launch, launcher.null  # the eager GEMV's, bound once
        gather_fn, argmax_fn, *shard_fns = row_fns  # (ROW_KERNELS, then SHARD_KERNELS)
        self.rows = RowKernels(gather_fn, argmax_fn, launcher)
        self.shards = ShardKernels(*shard_fns)
        fused_smem = fused.smem if fused.fns else 0
        self.quantized = QuantizedWeights(launcher, fused_smem, self._quantized_changed, self._gemm16, self.gemv_error)
        self.fused = FusedGemvs(launcher, fused, self.quantized)
        self._fp8_path, self._int4_path = self.quantized.fp8_path, self.quantized.int4_path  # (bound once)
        self._skinny = SkinnyLaunches(launcher, self.quantized)
        self._timer = LaunchTimer(stream.ptr)
        self._gemm, self._h = self._blas.gemm_ex, self._blas.ptr
        self._batched = self._blas.gemm_strided_batched_ex
        self._one, self._zero = self._blas.one, self._blas.zero
        # cuBLASLt with the algorithm chosen once per shape (cublas_lt's docstring says why); None: GemmEx only
        self._lt: Any = None
        self._lt_shape: Any = None
        try:
            from .cublas_lt import LtMatmuls

            self._lt = LtMatmuls(stream.ptr, self._workspace.data.ptr, WORKSPACE_BYTES, self._one, self._zero)
            self._lt_shape = self._lt.shape
        except (LibraryLoadError, CublasError):
            self._lt = None
        except BaseException:  # anything else is raised: the cuBLAS handle has no finalizer, destroy it first
            self._blas.close()
            raise

    def _quantized_changed(self) -> None:
        """A quantized weight registered or removed: mirror the registries, and drop the timed choices and packed
        skinny launches (keyed by addresses and shapes), since it changes what a call at those addresses reads (a
        16-bit weight allocated where an FP8 one was must not be read as e4m3). Registrations happen at load, so the
        next step times its shapes again."""
        self._fp8_weights, self._int4_weights = self.quantized.fp8_weights, self.quantized.int4_weights
        self._choices.clear()
        self._timings.clear()
        self._skinny.forget()

    @property
    def lt(self) -> bool:
        """Whether :meth:`linear` goes through cuBLASLt (cached algorithms); False: ``cublasGemmEx``. Settable (a
        benchmark compares the two); cuBLASLt that could not be loaded stays off."""
        return self._lt_shape is not None

    @lt.setter
    def lt(self, on: bool) -> None:
        self._lt_shape = self._lt.shape if on and self._lt is not None else None

    def linear(
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
        c_type: int,
        accumulate: bool = False,
    ) -> None:
        """``y[:rows, :n] = x[:rows, :k] @ w.T`` with ``w`` a row-major ``[n, k]`` matrix (a PyTorch-style
        Linear weight); pointers as ints, leading dimensions (row strides) in elements; ``ab_type``/``c_type``:
        cudaDataType_t of x and w / of y. Accumulates in float32 (as torch's float16/bfloat16 matmul).
        ``accumulate``: ``y += x @ w.T`` (y's old values join the float32 sum). A ``w`` registered with
        ``quantized.add_fp8_weight`` is read as e4m3 times its scales, one registered with ``add_int4_weight`` as
        int4."""
        if self._fp8_weights:  # empty unless FP8 weights were registered: one truth test on the 16-bit path
            fp8 = self._fp8_weights.get(w)
            if fp8 is not None:
                self._quantized_linear(
                    fp8, "FP8", self._fp8_path, (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type), accumulate
                )
                return
        if self._int4_weights:  # (the same for int4 weights)
            int4 = self._int4_weights.get(w)
            if int4 is not None:
                self._quantized_linear(
                    int4, "int4", self._int4_path, (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type), accumulate
                )
                return
        if self.gemv and not accumulate and rows <= SKINNY_MAX_ROWS:
            key = (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
            # eagerly the GEMV serves every shape it takes, for its lower host time; a GPU-bound step the fastest
            choice = self._choices.get((rows, n, k, ab_type, c_type, 0)) if self.bandwidth_bound else None
            if choice is None:
                choice = self._choice(key, 0) if self.bandwidth_bound else _GEMV if rows <= GEMV_MAX_ROWS else _LT
            if choice == _GEMV and self._run_gemv(key):
                return
            if choice >= 0 and self._skinny.run(key, choice, None):
                return
        self._gemm16((rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type), accumulate)

    def gate_up_silu(
        self,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        gu: int,
        gu_ld: int,
        act: int,
        act_ld: int,
        ab_type: int,
        silu: Callable[[], object],
    ) -> None:
        """``act[:rows, :n / 2] = silu(x @ gate.T) * (x @ up.T)`` for the gate/up weight ``w`` (row-major ``[n, k]``,
        the gate's ``n / 2`` rows first), x, gu and act of type ``ab_type``, row strides in elements. As
        :meth:`linear` into ``gu`` (``[rows, n]``), then ``silu()`` (the caller's FlashInfer ``silu_and_mul`` of gu
        into act, packed once); in GPU-bound steps of up to 32 rows over a 16-bit weight, the skinny GEMM's SiLU form
        instead where it was timed faster than those two launches together (once per shape, as :meth:`_choice`
        times; ``SkinnyLaunches.silu_on``). The form rounds each sum to ``ab_type`` as the GEMM's output would be, so
        it differs from the two launches only where their GEMMs' float32 sums do (another launch, another order)."""
        quantized = w in self._fp8_weights or w in self._int4_weights
        if self.bandwidth_bound and self.gemv and 0 < rows <= SKINNY_MAX_ROWS and not quantized:
            key = (rows, x, x_ld, w, n, k, act, act_ld, ab_type, ab_type)
            ckey = (rows, n, k, ab_type, ab_type, 0, _SILU_FORM)
            choice = self._choices.get(ckey)
            if choice is None:
                choice = self._silu_choice(key, ckey, (rows, x, x_ld, w, n, k, gu, gu_ld, ab_type, ab_type), silu)
            if choice >= 0 and self._skinny.run(key, choice, None, True):
                return
        self.linear(rows, x, x_ld, w, n, k, gu, gu_ld, ab_type, ab_type)
        silu()

    def _silu_choice(
        self, key: tuple[int, ...], ckey: tuple[int, ...], plain: _LinearCall, silu: Callable[[], object]
    ) -> int:
        """Which launch serves :meth:`gate_up_silu`'s shape (its choice key ``ckey``) in GPU-bound steps: ``_LT``
        (:meth:`linear`'s call ``plain`` into gu, then ``silu``) or the index of a plan of the skinny GEMM's SiLU form
        for the call ``key`` (into act), the fastest timed on the call's own buffers as :meth:`_choice` times;
        ``_LT`` during a capture (no timing there, nor a SkinnyGemm made) or where the form has no plan."""
        import cupy

        if cupy.cuda.runtime.streamIsCapturing(self._stream):
            return _LT
        plans = len(self._skinny.plans(key, None, True))
        if not plans:
            self._choices[ckey] = _LT
            return _LT

        def separate() -> None:
            self.linear(*plain)
            silu()

        separate()  # (times the GEMM's own shape first, where it was not: no timing within a timing)
        runs: dict[int, Callable[[], object]] = {_LT: separate}
        for i in range(plans):
            runs[i] = lambda i=i: self._skinny.run(key, i, None, True)  # type: ignore[misc]
        return self._timed_choice(ckey, runs)

    @same_parameters(linear)
    def prepared_linear(self, call: tuple[Any, ...]) -> Callable[[], None]:
        """:meth:`linear` (its parameters) with these arguments packed once where the GEMV serves it (see
        ``FusedGemvs.prepared``); elsewhere (``accumulate`` among them) a call of :meth:`linear` with them. Raises
        TypeError/ValueError naming an argument that is no int or out of range (addresses in ``[0, 2**64)``,
        ``rows``, ``n``, ``k`` in ``[1, 2**31)``, row strides in ``[0, 2**40)``; ``accumulate`` no bool), or, where
        the GEMV serves it, a misaligned ``y``."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, accumulate = call
        for name, value in (("rows", rows), ("n", n), ("k", k)):
            int_arg(name, value, 1, 1 << 31)
        for name, value in (("x", x), ("w", w), ("y", y)):
            int_arg(name, value, 0, U64)
        for name, value in (("x_ld", x_ld), ("y_ld", y_ld)):
            int_arg(name, value, 0, MAX_LD)
        for name, value in (("ab_type", ab_type), ("c_type", c_type)):
            int_arg(name, value, -(1 << 31), 1 << 31)
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate: expected a bool, got {type(accumulate).__name__}")
        args = (rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
        if accumulate:  # (y's old values join the sum: the GEMV and the packed launches write y)
            return lambda: self.linear(*args, accumulate=True)
        if w in self._fp8_weights or w in self._int4_weights:  # the format's GEMV where it serves the call
            prepared = self.quantized.prepared_gemv(*args)
            return prepared if prepared is not None else lambda: self.linear(*args)
        packed = self._pack_gemv(args) if self.gemv and rows <= GEMV_MAX_ROWS else ()
        if not packed:
            return lambda: self.linear(*args)
        fn, grid, params, values = packed
        return self.launcher.prepared(fn, grid, 32 * _GEMV_WARPS, 0, params, values, "gemv", pdl=True)

    def _gemm16(self, key: tuple[int, ...], accumulate: bool = False) -> None:
        """cuBLASLt (or ``cublasGemmEx``) for :meth:`linear`'s call ``key`` over a 16-bit weight."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        # Column-major view: y^T (n x rows, ld y_ld) = op_T(w as k x n, ld k) . x^T (k x rows, ld x_ld).
        shape = self._lt_shape
        if shape is not None:
            entry = shape(rows, n, k, x_ld, y_ld, ab_type, c_type)
            if entry is not None:
                status = self._lt(entry, x, w, y, accumulate)
                if status:
                    raise CublasError("cublasLtMatmul", status, status_name(status))
                return
        beta = self._one if accumulate else self._zero
        self._cublas(self._gemm, "cublasGemmEx", n, rows, k, w, ab_type, x, ab_type, x_ld, beta, y, c_type, y_ld)

    def _quantized_linear(
        self, wt: Any, kind: str, path: Callable[..., None], key: tuple[int, ...], accumulate: bool
    ) -> None:
        """:meth:`linear`'s call ``key`` over the registered ``kind`` (FP8, int4) weight ``wt``: in a GPU-bound step
        of at most 32 rows the skinny GEMM where it was timed faster (:meth:`_choice`); else the format's own ``path``
        (``QuantizedWeights.fp8_path`` or ``int4_path``)."""
        check_call(wt, kind, key[4], key[5], key[8], key[9])
        if not accumulate and self._skinny_quantized(key, wt):
            return
        path(key, wt, accumulate, self._lt)

    def _choice(self, key: tuple[int, ...], quant_w: int) -> int:
        """Which launch serves the shape of the call ``key`` (:meth:`linear`'s arguments; ``quant_w``: the FP8 or int4
        weight's address, 0 for a 16-bit one) in GPU-bound steps: ``_GEMV``, ``_LT`` (cuBLASLt, or the FP8 or int4
        paths: ``QuantizedWeights.fp8_path``, ``int4_path``) or the index of a skinny plan, the fastest on the device,
        timed once per shape on the call's own buffers (y is overwritten by the call that asked;
        :class:`~fi_engine.kernels.launch_timing.LaunchTimer`: best of 3 each after a first run, L2 flushed before
        every run so each reads its weight from HBM, as a decode step does). A capture cannot time (no
        synchronization is allowed in it): a shape first met there takes :func:`gemv_bound`'s rule, the GEMV or the
        rest; the engine warms its step up eagerly before capturing it, so none is."""
        import cupy

        rows, n, k, ab_type, c_type = key[0], key[4], key[5], key[8], key[9]
        fp8 = self._fp8_weights.get(quant_w) if quant_w else None
        int4 = self._int4_weights.get(quant_w) if quant_w and fp8 is None else None
        quant = fp8 if fp8 is not None else int4
        if cupy.cuda.runtime.streamIsCapturing(self._stream) or (quant is None and self._lt_shape is None):
            return _GEMV if quant is None and rows <= GEMV_MAX_ROWS and gemv_bound(rows, n, k) else _LT
        runs: dict[int, Callable[[], object]] = {}
        if quant is None and rows <= GEMV_MAX_ROWS and (self._gemv_args.get(key) or self._pack_gemv(key)):
            runs[_GEMV] = lambda: self._run_gemv(key)
        for i in range(len(self._skinny.plans(key, quant))):
            runs[i] = lambda i=i: self._skinny.run(key, i, quant)  # type: ignore[misc]
        if fp8 is not None:
            runs[_LT] = lambda: self._fp8_path(key, fp8, False, self._lt)
        elif int4 is not None:
            runs[_LT] = lambda: self._int4_path(key, int4, False, self._lt)
        else:
            runs[_LT] = lambda: self._gemm16(key)
        return self._timed_choice((rows, n, k, ab_type, c_type, quant_w), runs)

    def _timed_choice(self, ckey: tuple[int, ...], runs: dict[int, Callable[[], object]]) -> int:
        """Time ``runs`` (each launch of one shape by its label; ``LaunchTimer.times``), record the times and the
        fastest under the shape's key ``ckey``, and return that label."""
        times = self._timings[ckey] = self._timer.times(runs)
        choice = self._choices[ckey] = min(times, key=times.__getitem__)
        return choice

    def close_choices(
        self, rows: int, within: float, most: int
    ) -> list[tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]]:
        """The shapes of ``rows`` rows timed so far whose launches came within ``within`` (a fraction) of the
        fastest alone, with those launches (at most ``most`` + 1, fastest first):
        :func:`~fi_engine.kernels.launch_timing.close_choices` over this Dense's timings. ``StepGraphs`` times them
        in the captured step (:meth:`set_choices`)."""
        return close_choices(self._timings, rows, within, most)

    def timed_launches(self) -> dict[tuple[int, ...], tuple[dict[int, float], int | None]]:
        """What the GPU-bound steps' timing found so far, a copy: for each shape's key ``(rows, n, k, ab_type, c_type,
        quantized weight's address or 0)`` (:meth:`gate_up_silu`'s: the same and a last value, 1), each launch's time
        alone in ms (labels as :meth:`close_choices` names
        them: -1 the GEMV, -2 cuBLASLt or the format's own path, 0, 1, ... a skinny plan) and the launch serving it
        now (the step tuning may have set another, :meth:`set_choices`; None where none is set)."""
        return {key: (dict(times), self._choices.get(key)) for key, times in self._timings.items()}

    def choices(self, keys: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        """The launches chosen for the shapes' keys ``keys`` (as :meth:`close_choices` names them)."""
        return tuple(self._choices[k] for k in keys)

    def timed_all(self, keys: tuple[tuple[int, ...], ...], labels: tuple[int, ...]) -> bool:
        """Whether every one of ``labels`` is a launch timed for every one of ``keys`` (so :meth:`set_choices` takes
        them): another rank's list of close launches, checked against this Dense's timings."""
        return all(label in self._timings.get(key, ()) for key in keys for label in labels)

    def set_choices(self, keys: tuple[tuple[int, ...], ...], labels: tuple[int, ...]) -> None:
        """Serve each of ``keys`` (as :meth:`close_choices` names them) by the launch of the same place in
        ``labels`` (one of the key's timed launches) from the next call on: a step captured after it launches
        those."""
        for key, label in zip(keys, labels, strict=True):
            if label not in self._timings.get(key, ()):
                raise ValueError(f"set_choices: {label} is not a launch timed for the shape {key}")
            self._choices[key] = label

    def _skinny_quantized(self, key: tuple[int, ...], quant: Any) -> bool:
        """Launch :meth:`linear`'s call ``key`` as the skinny GEMM over the registered FP8 or int4 weight ``quant``
        where a GPU-bound step of at most 32 rows timed it faster than the format's own path (:meth:`_choice`); False
        where it does not serve the call."""
        rows, n, k, ab_type, c_type = key[0], key[4], key[5], key[8], key[9]
        if not (self.bandwidth_bound and self.gemv and 0 < rows <= SKINNY_MAX_ROWS):
            return False
        choice = self._choices.get((rows, n, k, ab_type, c_type, quant.w))
        if choice is None:
            choice = self._choice(key, quant.w)
        return choice >= 0 and self._skinny.run(key, choice, quant)

    def _run_gemv(self, key: tuple[int, ...]) -> bool:
        """Launch the GEMV of :meth:`linear`'s call ``key`` (up to 4 rows); False where it does not take the call."""
        packed = self._gemv_args.get(key)
        if packed is None:
            packed = self._pack_gemv(key)
        if not packed:
            return False
        fn, grid, params, _ = packed
        err = self._launch(fn, grid, 1, 1, 32 * _GEMV_WARPS, 1, 1, 0, self._stream, params, self._null)
        if err:
            raise driver_error(err, f"cuLaunchKernel(gemv, rows={key[0]}, n={key[4]}, k={key[5]})")
        return True

    def _pack_gemv(self, key: tuple[int, ...]) -> tuple[Any, ...]:
        """The GEMV launch of one :meth:`linear` call, its kernel arguments packed once: ``(function, grid,
        params, values)`` (``params``: the ``void*[8]`` of argument addresses into ``values``, the ``uint64_t[8]``
        that must live as long as it), or ``()`` where the GEMV does not apply (a dtype pair it lacks, k not a
        multiple of 8, x, w or x's rows not 16-byte aligned). Keyed by the call's ints only (values, no caller
        object); at most 4096 kept, then the cache starts again."""
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        fns = self._gemv_fns.get((ab_type, c_type))
        fn = fns[rows - 1] if fns is not None and 0 < rows <= GEMV_MAX_ROWS else None
        item = 4 if c_type == CUDA_R_32F else 2
        if fn is not None and y % item:  # the kernel stores one element at a time: each must be aligned
            raise ValueError(
                f"y: 0x{y:x} must be aligned to {item} bytes (its {'float32' if item == 4 else '16-bit'} elements)"
            )
        packed: tuple[Any, ...] = ()
        if fn is not None and k % 8 == 0 and x_ld % 8 == 0 and x % 16 == 0 and w % 16 == 0 and 0 < n < 1 << 31:
            params, values = self.launcher.slots([x, w, y, rows, n, k, x_ld, y_ld])
            packed = (fn, (n + _GEMV_WARPS - 1) // _GEMV_WARPS, params, values)  # values: kept with params
        if len(self._gemv_args) > 4096:
            self._gemv_args.clear()
        self._gemv_args[key] = packed
        return packed

    def batched_linear(
        self,
        batch: int,
        rows: int,
        x: int,
        x_ld: int,
        x_stride: int,
        w: int,
        n: int,
        k: int,
        w_stride: int,
        y: int,
        y_ld: int,
        y_stride: int,
        ab_type: int,
        c_type: int,
    ) -> None:
        """``batch`` independent :meth:`linear` products: ``y_b = x_b @ w_b.T`` for ``b < batch`` where ``x_b``,
        ``w_b`` (row-major ``[n, k]``) and ``y_b`` start ``b * x_stride``, ``b * w_stride``, ``b * y_stride``
        elements after ``x``, ``w``, ``y`` (MLA's per-head products: head ``b``'s columns of a ``[rows, H * d]``
        activation, its own weight). One cuBLAS call."""
        operands = (w_stride, x, ab_type, x_ld, x_stride, self._zero, y, c_type, y_ld, y_stride, batch)
        self._cublas(self._batched, "cublasGemmStridedBatchedEx", n, rows, k, w, ab_type, *operands)

    def _cublas(
        self, gemm: Callable[..., int], name: str, n: int, rows: int, k: int, w: int, ab_type: int, *operands: Any
    ) -> None:
        """One cuBLAS GEMM ``gemm`` (``name``: its entry point, for the error) of the column-major view ``y^T (n x
        rows) = op_T(w as k x n, ld k) . x^T``, float32 compute, the default algorithm: ``operands`` are its
        arguments after ``w``'s (x's, beta, y's, and the batched form's strides and count)."""
        head = (self._h, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, self._one, w, ab_type, k)
        status = gemm(*head, *operands, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        if status:
            raise CublasError(name, status, status_name(status))

    def close(self) -> None:
        """Destroy the cuBLAS handles (later GEMMs raise :class:`~fi_ffi.errors.CublasError`, small-row ones
        included: the GEMV is turned off) and turn the parts off (prepared launches refuse). Idempotent."""
        self.gemv = False  # else a GEMM of <= GEMV_MAX_ROWS rows would still launch after close
        self.launcher.close()
        self._timer.close()
        self._gemv_args.clear()
        self._skinny.close()
        self.fused.close()  # fused.linear refuses after close (fused.fits is False)
        self.quantized.close()
        self._lt_shape = None
        lt, self._lt = self._lt, None  # `lt = True` after close cannot bring back a destroyed cuBLASLt handle
        if lt is not None:
            lt.close()
        self._blas.close()
        self._h = self._blas.ptr  # NULL: cuBLAS answers CUBLAS_STATUS_NOT_INITIALIZED, no use after free


def __getattr__(name: str) -> Any:  # the names that left for fused_args, for one release (fi_engine.moved.NAMES)
    from ..moved import old_name

    return old_name(__name__, name)
