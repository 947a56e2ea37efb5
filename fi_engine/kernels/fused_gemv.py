"""The fused decode step's GEMVs (``csrc/fused_gemv.cu``): the engine's 16-bit GEMV with a prologue computed in the
launch (an RMS norm, an add + RMS norm, or SiLU-and-mul of its input rows) and, after a norm, an epilogue over its
outputs (RoPE and the KV append of the QKV GEMV; SiLU-and-mul of the gate/up GEMV; a MoE router's softmax top-k).
One launch where the unfused step made two or three; the same values bit for bit (the GPU tests check them).

:class:`FusedKernels` compiles them (once per Dense); :class:`FusedGemvs` checks a call (:mod:`~fi_engine.kernels.
fused_args`) and packs it once through the Dense's :class:`~fi_engine.kernels.launch.Launcher`. Over a weight
registered as FP8 the prologue GEMV runs ``csrc/fp8_fused.cu``'s kernel instead
(:class:`~fi_engine.kernels.quantized_weights.QuantizedWeights`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, NamedTuple, ParamSpec

from fi_ffi.cuda import driver_error

from .call_forms import forwarded_signature, same_parameters, value_then_parameters
from .cublas import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
from .cuda_sources import function_ptr, source
from .fused_args import (
    ADD_NORM,
    FUSED_SUFFIX,
    GATE_UP,
    NORM,
    PAIRS,
    PLAIN,
    ROPE,
    ROUTE,
    SILU,
    RopeAppend,
    RouterEpilogue,
    caches_apart,
    check_fused_values,
    epilogue_mode,
    fused_args,
    indices_apart,
    rope_ints,
)
from .gemv_settings import GEMV_MAX_ROWS, GEMV_NAMES, GemvSettings, unroll
from .launch import MAX_LD, U64, Launcher, int_arg, overlap
from .quantized_weights import QuantizedWeights, check_call

__all__ = ["EpilogueCall", "FusedGemvs", "FusedKernels", "load_row_kernels"]

WARPS = 8  # output columns per block per pass (one warp each); a block stages its input rows once
_STATIC_SMEM = 48 << 10  # dynamic shared memory a kernel may take without opting in
P = ParamSpec("P")


class EpilogueCall(NamedTuple):
    """One fused GEMV call checked and unpacked (:meth:`FusedGemvs.linear_parts`, ``qkv_rope_parts``,
    ``gate_up_silu_parts``), for its packed launch or the LoRA form's (:mod:`~fi_engine.kernels.lora_fused`), which
    launches its own kernel with these arguments and the expand's after them: ``key`` the call's values in
    :func:`~fi_engine.kernels.fused_args.check_fused_values`' order (``mode`` with its epilogue's flag), ``fn`` the
    fused kernel of its row count (None for PLAIN without an epilogue: no fused kernel of its own), ``smem`` its
    shared bytes, ``ints`` its kernel arguments, ``columns`` the output columns (or pairs of them) its warps split,
    ``weight_rows`` the weight's rows (the GEMV's outputs before the epilogue)."""

    key: tuple[Any, ...]
    fn: Any
    smem: int
    ints: list[int]
    columns: int
    weight_rows: int


def _output_type(key: tuple[Any, ...], c_type: int) -> None:
    """ValueError naming ``c_type`` where the call ``key`` (:meth:`FusedGemvs.linear`'s values) asks for another
    output type than the one its kernel writes (``c_type``)."""
    if int_arg("c_type", key[10], -(1 << 63), 1 << 63) != c_type:
        raise ValueError(f"c_type: this GEMV writes its output as type {c_type}, got {key[10]!r:.40}")


def _epilogue_form(
    parts: Callable[Concatenate[FusedGemvs, P], EpilogueCall], name: str, doc: str
) -> Callable[Concatenate[FusedGemvs, P], Callable[[], None]]:
    """The packed-once form of ``parts`` (its parameters, checked by it): the returned launch's ``name``."""

    def prepared(self: FusedGemvs, *args: P.args, **kwargs: P.kwargs) -> Callable[[], None]:
        call = parts(self, *args, **kwargs)
        return self._prepared_epilogue(call.fn, call.smem, call.ints, call.columns, name)

    prepared.__doc__ = doc
    prepared.__signature__ = forwarded_signature(parts, "Callable[[], None]")  # type: ignore[attr-defined]
    return prepared


@dataclass
class FusedKernels:
    """The compiled fused GEMVs (:meth:`compile`): ``fns`` ``(mode, ab_type, c_type) -> CUfunction`` per row count
    (1 to 4; empty: none compiled), ``smem`` the most dynamic shared memory (bytes) a launch may take (its input
    rows), ``grid`` the most blocks a launch takes (:attr:`fused_blocks_per_sm` per SM; each stages its input rows
    once), ``module`` the CuPy module that owns the functions."""

    fns: dict[tuple[int, int, int], tuple[int, ...]] = field(default_factory=dict)
    smem: int = 0
    grid: int = 1056
    module: Any = None

    fused_blocks_per_sm = 8
    """The fused GEMVs' blocks per SM at most (their grid: this many times the SMs, each block serving a grid-stride
    set of columns after computing its prologue -- the norm or SiLU of the input rows -- once): more blocks keep more
    weight loads in flight, fewer recompute the prologue fewer times. Read when a Dense is made; set it on the class
    to compare (``benchmarks/bench_llama_tp.py --variants fused-blocks-N``)."""

    rope_unroll = 4
    """16-byte weight vectors in flight for each of the two columns of the fused QKV + RoPE + append GEMV
    (``prepared_qkv_rope``), as :attr:`~fi_engine.kernels.gemv_settings.GemvSettings.gemv_unroll` for the others; 1
    is the one-vector loop it had before (``benchmarks/bench_llama_tp.py --variants rope-unroll-1``). Compiled in when
    a Dense is made."""

    fused_min_blocks = 4
    """The one-row fused GEMVs' registers capped (``__launch_bounds__``) so that this many of their 256-thread
    blocks fit an SM (1: no cap). Compiled in when a Dense is made; set it on the class to compare
    (``benchmarks/bench_llama_tp.py --variants fused-min-blocks-N``)."""

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The NVRTC options ``csrc/fused_gemv.cu`` is compiled with: fast math (as FlashInfer's modules are),
        :meth:`~fi_engine.kernels.gemv_settings.GemvSettings.gemv_options`, :attr:`rope_unroll` and
        :attr:`fused_min_blocks` (what ``tools/kernel_fingerprints.py`` compiles too)."""
        return (
            "--use_fast_math",
            *GemvSettings.gemv_options(),
            f"-DROPE_UNROLL={unroll(cls.rope_unroll)}",
            f"-DGEMV_FUSED_MIN_BLOCKS={max(1, min(32, int(cls.fused_min_blocks)))}",
        )

    @staticmethod
    def kernel_names() -> dict[tuple[int, int, int], str]:
        """The fused GEMVs a Dense loads, ``(mode, ab_type, c_type) -> kernel name`` (without the ``_r<rows>``
        suffix): the prologue kernels of every type pair, and per 16-bit type the QKV + RoPE + append, gate/up + SiLU
        and MoE router kernels after a NORM or ADD_NORM prologue, and the first two after the PLAIN one (a
        tensor-parallel rank's rows, normalized by its all-reduce)."""
        names = {}
        for (ab, c), name in GEMV_NAMES.items():
            for mode, suffix in FUSED_SUFFIX.items():
                names[(mode, ab, c)] = f"{name}_{suffix}"
        for ab, name in ((CUDA_R_16F, "f16"), (CUDA_R_16BF, "bf16")):
            for mode, suffix in ((NORM, "norm"), (ADD_NORM, "addnorm")):
                names[(mode | ROPE, ab, ab)] = f"gemv_{name}_{suffix}_rope"
                names[(mode | GATE_UP, ab, ab)] = f"gemv_{name}_{suffix}_gateup"
                names[(mode | ROUTE, ab, CUDA_R_32F)] = f"gemv_{name}_{suffix}_route"
            names[(PLAIN | ROPE, ab, ab)] = f"gemv_{name}_plain_rope"
            names[(PLAIN | GATE_UP, ab, ab)] = f"gemv_{name}_plain_gateup"
        return names

    @classmethod
    def compile(cls, cupy: Any) -> FusedKernels:
        """Compile every kernel of :meth:`kernel_names` for 1 to 4 rows, opted in to the device's shared memory
        (rows x k input values beyond 48 KiB); raises what NVRTC or the driver raise."""
        module = cupy.RawModule(code=source("fused_gemv.cu"), options=cls.options())
        attrs = cupy.cuda.Device().attributes
        fns, smem = load_row_kernels(cupy, module, cls.kernel_names())
        grid = max(1, int(cls.fused_blocks_per_sm)) * int(attrs.get("MultiProcessorCount", 132))
        return cls(fns, smem, grid, module)


def load_row_kernels(cupy: Any, module: Any, names: dict[Any, str]) -> tuple[dict[Any, tuple[int, ...]], int]:
    """The fused GEMVs ``names`` (``key -> kernel name`` without the ``_r<rows>`` suffix) of the compiled ``module``:
    ``key -> CUfunction per row count``, each opted in to the device's shared memory beyond 48 KiB where it allows,
    and the most dynamic shared memory (bytes) a launch of them may take."""
    limit = _STATIC_SMEM - 1024  # the static part (the sums of squares) counts against the same 48 KiB
    optin = int(cupy.cuda.Device().attributes.get("MaxSharedMemoryPerBlockOptin", 0)) - 1024

    def load(kernel_name: str) -> tuple[int, ...]:
        nonlocal optin
        kernels = GemvSettings.by_row_count(module, kernel_name, keep=True)
        for kernel in kernels:
            if optin > limit:  # rows x k input values beyond 48 KiB: opt in once per kernel
                try:
                    kernel.max_dynamic_shared_size_bytes = optin
                except Exception:
                    optin = limit
        return tuple(function_ptr(kernel) for kernel in kernels)

    fns = {key: load(name) for key, name in names.items()}
    return fns, max(limit, optin)


class FusedGemvs:
    """The fused GEMVs of one Dense: ``kernels`` (:class:`FusedKernels`) launched through ``launcher``, over 16-bit
    weights or those registered in ``quantized`` (FP8: the prologue GEMV's own kernels; int4: refused)."""

    def __init__(self, launcher: Launcher, kernels: FusedKernels, quantized: QuantizedWeights) -> None:
        self._launcher, self._kernels, self._quantized = launcher, kernels, quantized
        self._fns = kernels.fns
        self._args: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # linear()'s packed calls, keyed by their values
        # what linear() launches with, bound once (its per-call path reads no launcher attribute)
        self._launch, self._stream, self._null = launcher.launch, launcher.stream, launcher.null

    def fits(self, rows: int, k: int) -> bool:
        """Whether :meth:`linear` serves ``rows`` input rows of ``k`` elements (16-bit): the launch path is on, the
        fused kernels compiled, ``rows <= GEMV_MAX_ROWS``, ``k`` a multiple of 8 and the rows fit the shared memory a
        block may take. TypeError naming ``rows`` or ``k`` when one is no int."""
        if rows.__class__ is not int or k.__class__ is not int:  # (two class tests on the per-step path)
            int_arg("rows", rows, -(1 << 63), 1 << 63)
            int_arg("k", k, -(1 << 63), 1 << 63)
        return (
            self._launcher.open
            and bool(self._fns)
            and 0 < rows <= GEMV_MAX_ROWS
            and 0 < k < 1 << 31
            and k % 8 == 0
            and rows * k * 2 <= self._kernels.smem
        )

    def linear(
        self,
        mode: int,
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
        h: int = 0,
        h_ld: int = 0,
        norm_weight: int = 0,
        h_out: int = 0,
        eps: float = 0.0,
    ) -> None:
        """``y[:rows, :n] = in @ w.T`` (``w`` row-major ``[n, k]``, float32 sums, ``y`` rounded once to
        ``c_type``) where the input rows ``in [rows, k]`` are computed in the launch itself (``mode``):

        - :data:`~fi_engine.kernels.fused_args.NORM`: ``in = rmsnorm(h) * norm_weight`` (``h [rows, k]``, row stride
          ``h_ld``; ``x`` unused);
        - :data:`~fi_engine.kernels.fused_args.ADD_NORM`: ``s = h + x``; ``h_out = s`` (rounded; skipped where
          ``h_out`` is 0); ``in = rmsnorm(s) * norm_weight`` -- FlashInfer's ``fused_add_rmsnorm(x, h,
          norm_weight)``, with the new residual written to ``h_out``, which must not overlap ``h`` (every block reads
          ``h``);
        - :data:`~fi_engine.kernels.fused_args.SILU`: ``in = silu(x[:, :k]) * x[:, k:2k]`` (FlashInfer's
          ``silu_and_mul``; ``x [rows, 2k]``).

        (:data:`~fi_engine.kernels.fused_args.PLAIN`, the input rows as they are, is refused here: it serves only the
        epilogue GEMVs, :meth:`prepared_qkv_rope` and :meth:`prepared_gate_up_silu`, and the LoRA form's GEMV
        (:meth:`linear_parts`), each of which has a kernel of its own.)

        Rounded where those kernels round (``in`` and ``h_out`` to the 16-bit type), so the result equals theirs
        followed by the Dense's GEMV. Pointers as ints, strides in elements; ``eps`` the norm's epsilon. :meth:`fits`
        must hold. Raises TypeError/ValueError naming an argument that is no int (``eps``: no finite float), an
        address outside ``[0, 2**64)`` or whose rows run past it, a row stride shorter than its row (more than one
        row), misaligned (x, h, h_out, norm_weight and their row strides: 16 bytes; y: its element) or overlapping
        (``h_out`` with ``h``, ``x`` or ``y``; ``y`` with ``x`` or ``h``): checked when a call site is packed, and a
        call site is keyed by every value, so every call is covered."""
        key = (mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, eps)
        try:
            packed = self._args.get(key)
        except TypeError:  # an unhashable value: _pack refuses it by name
            packed = None
        if packed is None:
            packed = self._pack(key)
        fn, grid, smem, params, _ = packed
        err = self._launch(fn, grid, 1, 1, 32 * WARPS, 1, 1, smem, self._stream, params, self._null)
        if err:
            raise driver_error(err, f"cuLaunchKernel(fused gemv, mode={mode}, rows={rows}, n={n}, k={k})")

    @same_parameters(linear)
    def prepared(self, key: tuple[Any, ...]) -> Callable[[], None]:
        """:meth:`linear` with these arguments (its parameters) checked and packed once: calling the result launches
        it again (no key built, no lookup: about one ``cuLaunchKernel``). The result keeps the packed argument array
        alive; after the Dense's ``close`` it raises instead of launching."""
        fn, grid, smem, params, values = self._pack(key)
        return self._launcher.prepared(fn, grid, 32 * WARPS, smem, params, values, "fused gemv", pdl=True)

    @same_parameters(linear)
    def linear_parts(self, key: tuple[Any, ...]) -> EpilogueCall:
        """:meth:`linear`'s call (its parameters) checked as :meth:`linear` checks it, and unpacked for the LoRA form
        (:class:`EpilogueCall`); ``mode`` PLAIN (``in = x [rows, k]`` as it is) is taken too, and ``c_type`` must be
        ``ab_type`` (16-bit ``y``: ValueError naming ``c_type`` otherwise)."""
        fn, _, smem, _, _ = self._pack(key, checks_only=True)
        _output_type(key, key[9])
        return EpilogueCall(key, fn, smem, fused_args(key), key[5], key[5])

    def _pack(self, key: tuple[Any, ...], checks_only: bool = False) -> tuple[Any, ...]:
        """Check one :meth:`linear` call site and pack its kernel arguments once: ``(function, grid, shared bytes,
        params, values)``; at most 4096 kept, then the cache starts again. ``checks_only``: the checks and
        ``(function, grid, shared bytes, None, None)``, nothing packed or kept (the epilogues and the LoRA forms pack
        their own), mode PLAIN taken too (the LoRA form's GEMV over rows made before; no function of its own here)."""
        check_fused_values(key, plain=checks_only)
        mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type, h, h_ld, norm_weight, h_out, _ = key
        if mode & PAIRS and not checks_only:  # (an AssertionError below otherwise)
            raise ValueError(
                f"mode: expected NORM, ADD_NORM or SILU; the RoPE and SiLU epilogues are prepared_qkv_rope's and "
                f"prepared_gate_up_silu's, got {mode}"
            )
        fn: Any = self._fns.get((mode, ab_type, c_type))  # per row count (16-bit); the FP8 kernel's own below
        if fn is None and mode != PLAIN:
            why = "compiled (closed, or NVRTC refused them)" if not self._fns else "for these types"
            raise ValueError(f"ab_type, c_type: no fused GEMV {why} ({ab_type}, {c_type}, mode {mode})")
        quantized = self._quantized
        if quantized.int4_weights and w in quantized.int4_weights:
            raise ValueError("w: the fused GEMVs read 16-bit or FP8 weights; this one is registered as int4")
        fp8 = quantized.fp8_weights.get(w) if quantized.fp8_weights else None
        if fp8 is not None:  # e4m3 weights: the same prologue before the FP8 GEMV (fp8_linear)
            if mode == PLAIN:  # (checks_only: the LoRA form's GEMV over rows made before)
                raise ValueError("w: the LoRA fused GEMVs read 16-bit weights; this one is registered as FP8")
            lib = quantized.fp8
            assert lib is not None
            if mode & PAIRS:
                raise ValueError("w: the RoPE and SiLU epilogues read 16-bit weights; this one is registered as FP8")
            check_call(fp8, "FP8", n, k, ab_type, c_type)
            fn = lib.fused_fn(mode, ab_type == CUDA_R_16BF, c_type == CUDA_R_32F, fp8.block is not None)
            if fn is None:
                raise ValueError(f"w: no fused GEMV over FP8 weights compiled ({lib.fused_error or 'closed'})")
            if rows * k * 2 > lib.fused_smem:
                raise ValueError(f"rows, k: the FP8 fused GEMV stages at most {lib.fused_smem} bytes of input")
        pairs, mode = mode & PAIRS, mode & ~PAIRS
        if not self.fits(rows, k):
            raise ValueError(f"rows, k: the fused GEMV does not serve {rows} rows of {k} (see fits)")
        if fp8 is None and fn is not None:
            fn = fn[rows - 1]  # the 16-bit kernel of this many rows
        if not 0 < n < 1 << 31:
            raise ValueError(f"n: expected 1 to 2**31 - 1 output columns, got {n}")
        reads_h = mode in (NORM, ADD_NORM)  # (SILU and PLAIN read x alone)
        if rows > 1:  # rows closer than a row's width would overlap (one row never steps by its stride)
            widths = [("y_ld", y_ld, n)] + ([("h_ld", h_ld, k)] if reads_h else [])
            widths += [("x_ld", x_ld, 2 * k if mode == SILU else k)] if mode != NORM else []  # NORM reads no x
            for name, value, width in widths:
                if value < width:
                    raise ValueError(f"{name}: {value} elements between rows is less than a row's {width}")
        out_item = 4 if c_type == CUDA_R_32F else 2
        span_in = 2 * ((rows - 1) * h_ld + k)  # bytes of h's (and h_out's) rows
        x_width = 2 * k if mode == SILU else k
        span_x = 2 * ((rows - 1) * x_ld + x_width)
        span_y = out_item * ((rows - 1) * y_ld + n)
        checks = [("w", w, 16), ("y", y, out_item)]
        if not reads_h:
            checks += [("x", x, 16), ("x_ld", 2 * x_ld, 16)]
        else:
            checks += [("h", h, 16), ("h_ld", 2 * h_ld, 16), ("norm_weight", norm_weight, 16)]
        if mode == ADD_NORM:
            checks += [("x", x, 16), ("x_ld", 2 * x_ld, 16), ("h_out", h_out, 16)]
        for name, value, align in checks:
            if value % align or (value == 0 and not name.endswith("_ld") and name != "h_out"):
                raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
        reads = [("x", x, span_x)] if mode != NORM else []
        if reads_h:
            reads.append(("h", h, span_in))
        ends = [*reads, ("w", w, (1 if fp8 is not None else 2) * n * k), ("y", y, span_y)]
        ends += [("norm_weight", norm_weight, 2 * k)] if reads_h else []
        ends += [("h_out", h_out, span_in)] if mode == ADD_NORM else []
        for name, base, span in ends:
            if base + span > U64:
                raise ValueError(f"{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
        for name, base, span in reads:
            if overlap(y, span_y, base, span):
                raise ValueError(f"y: overlaps {name} (the launch writes y while other blocks still read {name})")
            if mode == ADD_NORM and h_out and overlap(h_out, span_in, base, span):
                raise ValueError(f"h_out: overlaps {name} (block 0 writes h_out while every block reads {name})")
        if mode == ADD_NORM and h_out and overlap(h_out, span_in, y, span_y):
            raise ValueError("h_out: overlaps y")
        if checks_only:
            return (fn, None, rows * k * 2, None, None)
        assert not pairs
        args = fused_args(key)
        grid = min((n + WARPS - 1) // WARPS, self._kernels.grid)
        if fp8 is not None:  # its scales; two groups of 4 columns a block (csrc/fp8_fused.cu)
            args += [fp8.scales, *fp8.scale_args[:3]]
            grid = min((n + 7) // 8, self._kernels.grid)
        params, values = self._launcher.slots(args)
        packed = (fn, grid, rows * k * 2, params, values)  # values: kept with params
        if len(self._args) > 4096:
            self._args.clear()
        self._args[key] = packed
        return packed

    def epilogue_grid(self, columns: int) -> int:
        """The blocks of a GEMV with an epilogue over ``columns`` (output columns, or pairs of them): one warp per
        ``WARPS`` of them a pass, at most the fused grid's blocks."""
        return min((columns + WARPS - 1) // WARPS, self._kernels.grid)

    def _prepared_epilogue(
        self, fn: int, smem: int, ints: list[int], columns: int, name: str, extra_blocks: int = 0
    ) -> Callable[[], None]:
        """A GEMV with an epilogue, its checked arguments ``ints`` packed once, on :meth:`epilogue_grid`'s blocks
        and ``extra_blocks`` more (a LoRA GEMV's in-grid shrink)."""
        launcher = self._launcher
        params, values = launcher.slots(ints)
        grid = self.epilogue_grid(columns) + extra_blocks
        return launcher.prepared(fn, grid, 32 * WARPS, smem, params, values, name, pdl=True)

    def has_qkv_rope(self, ab_type: int, d: int, mode: int = ADD_NORM) -> bool:
        """Whether :meth:`prepared_qkv_rope` serves ``ab_type`` inputs and head dim ``d`` after prologue ``mode``
        (its kernels compiled; the head dims FlashInfer's RoPE serves). TypeError naming ``ab_type`` or ``d`` when one
        is no int (or ``mode``)."""
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        int_arg("d", d, -(1 << 63), 1 << 63)
        int_arg("mode", mode, -(1 << 63), 1 << 63)
        return (mode | ROPE, ab_type, ab_type) in self._fns and d in (64, 128, 256, 512)

    @value_then_parameters(linear)
    def qkv_rope_parts(self, rope: RopeAppend, call: tuple[Any, ...]) -> EpilogueCall:
        """:meth:`prepared_qkv_rope`'s call (``rope``, then :meth:`linear`'s parameters) checked (its errors) and
        unpacked (:class:`EpilogueCall`: the kernel of this row count, its shared bytes, its arguments, the column
        pairs)."""
        mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, _, h, h_ld, norm_weight, h_out, eps = call
        epilogue_mode(mode, "RoPE", plain=True)
        rope_args = rope_ints(rope)
        if n != (rope.hq + 2 * rope.hk) * rope.d:
            raise ValueError(f"n: the QKV GEMV's columns are (rope.hq + 2 rope.hk) rope.d, got {n!r:.40}")
        key = (mode | ROPE, rows, x, x_ld, w, n, k, y, y_ld, ab_type, ab_type, h, h_ld, norm_weight, h_out, eps)
        fn, _, smem, _, _ = self._pack(key, checks_only=True)
        _output_type(call, ab_type)
        y_area = ("y", y, 2 * ((rows - 1) * y_ld + n))
        h_out_area = [("h_out", h_out, 2 * ((rows - 1) * h_ld + k))] if mode == ADD_NORM and h_out else []
        areas = [y_area]
        if mode != PLAIN:  # (PLAIN reads no h)
            areas.append(("h", h, 2 * ((rows - 1) * h_ld + k)))
        if mode != NORM:
            areas.append(("x", x, 2 * ((rows - 1) * x_ld + k)))
        caches_apart(rope, [*areas, *h_out_area])
        indices_apart(rope, rows, [y_area, *h_out_area])  # (what the launch writes)
        return EpilogueCall(key, fn, smem, [*fused_args(key), *rope_args], n // 2, n)

    prepared_qkv_rope = _epilogue_form(
        qkv_rope_parts,
        "qkv gemv + rope + append",
        """The fused QKV GEMV of a decode step (``rope``, then :meth:`linear`'s parameters: ``n`` ``(rope.hq + 2
        rope.hk) rope.d``, ``c_type`` ``ab_type``; ``mode`` NORM or ADD_NORM, as :meth:`linear`, or
        :data:`~fi_engine.kernels.fused_args.PLAIN`: the input rows ``x [rows, k]`` as they are, ``h``,
        ``norm_weight``, ``h_out`` and ``eps`` unused -- a tensor-parallel rank's rows, normalized by its all-reduce;
        16-bit ``y = qkv [rows, (hq + 2 hk) d]``) with FlashInfer's ``apply_rope_pos_ids`` (in place,
        non-interleaved, every element rotated; Llama 3.1 scaling where ``rope.llama3``) and ``append_paged_kv_cache``
        (NHD) of this step's k and v as its epilogue, checked and packed once (see :meth:`prepared`): one launch for
        three. The result equals those launches' bit for bit (the GPU test checks it). Raises TypeError/ValueError
        naming an argument as :meth:`linear` does, ``rope`` that is no
        :class:`~fi_engine.kernels.fused_args.RopeAppend` or one of its fields (``rope.<field>``) of the wrong type or
        range, a misaligned, NULL or overlapping cache or index array (the caches against y, h, x and h_out), or a
        shape the kernel does not serve.""",
    )

    def has_gate_up_silu(self, ab_type: int, mode: int = ADD_NORM) -> bool:
        """Whether :meth:`prepared_gate_up_silu` serves ``ab_type`` inputs after prologue ``mode`` (its kernels
        compiled). TypeError naming ``ab_type`` (or ``mode``) when it is no int."""
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        int_arg("mode", mode, -(1 << 63), 1 << 63)
        return (mode | GATE_UP, ab_type, ab_type) in self._fns

    @same_parameters(linear)
    def gate_up_silu_parts(self, call: tuple[Any, ...]) -> EpilogueCall:
        """:meth:`prepared_gate_up_silu`'s call (:meth:`linear`'s parameters) checked (its errors) and unpacked as
        :meth:`qkv_rope_parts` (the column pairs: ``n / 2``)."""
        mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, _, h, h_ld, norm_weight, h_out, eps = call
        epilogue_mode(mode, "SiLU", plain=True)
        int_arg("n", n, 2, 1 << 31)
        if n % 2:
            raise ValueError(f"n: the gate/up weight pairs its gate and up rows, an even count; got {n}")
        m = n // 2
        # the GEMV's checks over y's real extent (m columns); the weight's 2 m rows checked after
        key = (mode | GATE_UP, rows, x, x_ld, w, m, k, y, y_ld, ab_type, ab_type, h, h_ld, norm_weight, h_out, eps)
        fn, _, smem, _, _ = self._pack(key, checks_only=True)
        _output_type(call, ab_type)
        if w + 2 * n * k > U64:
            raise ValueError(f"w: 0x{w:x} + {2 * n * k} bytes runs past the end of the address space")
        # (17 zero slots: the RoPE arguments, which the SiLU kernel reads none of)
        return EpilogueCall(key, fn, smem, [*fused_args(key, n), *[0] * 17], m, n)

    prepared_gate_up_silu = _epilogue_form(
        gate_up_silu_parts,
        "gate/up gemv + silu",
        """The fused gate/up GEMV of a decode step (:meth:`linear`'s parameters, ``c_type`` ``ab_type``; ``mode``
        NORM or ADD_NORM, as :meth:`linear`, or PLAIN as
        :meth:`prepared_qkv_rope` takes it; the 16-bit weight
        ``w [n, k]`` holds the ``n / 2`` gate rows, then the ``n / 2`` up rows) with FlashInfer's ``silu_and_mul`` as
        its epilogue, checked and packed once (see :meth:`prepared`): ``y [rows, n / 2] = silu(g) * u`` (16-bit, row
        stride ``y_ld``), ``g`` and ``u`` the GEMV's columns ``j`` and ``n / 2 + j`` rounded as its output is. One
        launch where the fused GEMV and ``silu_and_mul`` were two, and the down GEMV after it reads ``y`` as it is (no
        SiLU prologue recomputed in each of its blocks); the same values as those launches bit for bit (the GPU test
        checks them). Raises TypeError/ValueError naming an argument as :meth:`linear` does (``y``'s extent: ``n /
        2`` columns), an odd ``n``, or a weight registered as FP8 (``QuantizedWeights.prepared_fp8_silu`` serves
        those).""",
    )

    def has_router(self, ab_type: int) -> bool:
        """Whether :meth:`prepared_router` serves ``ab_type`` inputs (its kernels compiled). TypeError naming
        ``ab_type`` when it is no int."""
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        return (ADD_NORM | ROUTE, ab_type, CUDA_R_32F) in self._fns

    @value_then_parameters(linear)
    def prepared_router(self, route: RouterEpilogue, call: tuple[Any, ...]) -> Callable[[], None]:
        """A MoE layer's router GEMV of a decode step (``route``, then :meth:`linear`'s parameters: ``mode`` NORM or
        ADD_NORM; float32 logits ``y [rows, n]``, ``c_type`` CUDA_R_32F, over ``n`` experts' ``[n, k]`` 16-bit router
        weight ``w``) with the routing as its epilogue, checked and packed once (see :meth:`prepared`): the
        normalized rows also written to ``route.normed``, then each row's softmax top-``route.top_k`` experts and
        weights (as ``moe_route``), one launch where the norm, the router GEMV and the routing were three. The logits
        and the experts equal those launches' bit for bit; the weights are within a few float32 ulps (fast-math
        ``expf``; the GPU test checks both). Raises TypeError/ValueError naming an argument as :meth:`linear` does,
        ``route`` that is no :class:`~fi_engine.kernels.fused_args.RouterEpilogue` or one of its fields
        (``route.<field>``) of the wrong type or range, misaligned, NULL or overlapping another operand, or a shape
        the kernel does not serve."""
        mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, _, h, h_ld, norm_weight, h_out, eps = call
        epilogue_mode(mode, "routing")
        _output_type(call, CUDA_R_32F)
        if not isinstance(route, RouterEpilogue):
            raise TypeError(f"route: expected a RouterEpilogue, got {type(route).__name__}")
        r = route
        int_arg("route.top_k", r.top_k, 1, 65)
        if not isinstance(r.renormalize, bool):
            raise TypeError(f"route.renormalize: expected a bool, got {type(r.renormalize).__name__}")
        for name in ("normed", "experts", "weights", "done"):
            int_arg(f"route.{name}", getattr(r, name), 0, U64)
        int_arg("route.normed_ld", r.normed_ld, 0, MAX_LD)
        key = (mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, CUDA_R_32F, h, h_ld, norm_weight, h_out, eps)
        check_fused_values(key)
        if self._quantized.fp8_weights and w in self._quantized.fp8_weights:
            raise ValueError("w: the routing epilogue reads 16-bit router weights; this one is registered as FP8")
        _, _, smem, _, _ = self._pack(key, checks_only=True)  # the GEMV's own checks
        fns = self._fns.get((mode | ROUTE, ab_type, CUDA_R_32F))
        if fns is None:
            raise ValueError(f"ab_type: no router GEMV compiled for it ({ab_type}; see has_router)")
        fn = fns[rows - 1]  # (rows checked by the GEMV's checks above)
        if r.top_k > n:
            raise ValueError(f"route.top_k: expected at most n ({n}) experts, got {r.top_k}")
        if rows > 1 and r.normed_ld < k:
            raise ValueError(f"route.normed_ld: {r.normed_ld} elements between rows is less than a row's {k}")
        span_normed = 2 * ((rows - 1) * r.normed_ld + k)
        span_choice = 4 * rows * r.top_k
        aligned = [("normed", r.normed, 16), ("normed_ld", 2 * r.normed_ld, 16), ("experts", r.experts, 4)]
        aligned += [("weights", r.weights, 4), ("done", r.done, 4)]
        for name, value, align in aligned:
            if value % align or (value == 0 and name != "normed_ld"):
                raise ValueError(f"route.{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
        outs = [("normed", r.normed, span_normed), ("experts", r.experts, span_choice)]
        outs += [("weights", r.weights, span_choice), ("done", r.done, 4)]
        span_in = 2 * ((rows - 1) * h_ld + k)
        others = [("h", h, span_in), ("norm_weight", norm_weight, 2 * k), ("w", w, 2 * n * k)]
        others += [("y", y, 4 * ((rows - 1) * y_ld + n))]
        if mode == ADD_NORM:
            others.append(("x", x, 2 * ((rows - 1) * x_ld + k)))
            if h_out:
                others.append(("h_out", h_out, span_in))
        for i, (name, base, span) in enumerate(outs):
            if base + span > U64:
                raise ValueError(f"route.{name}: 0x{base:x} + {span} bytes runs past the end of the address space")
            for other, obase, ospan in others + [(f"route.{o}", b, n_) for o, b, n_ in outs[:i]]:
                if overlap(base, span, obase, ospan):
                    raise ValueError(
                        f"route.{name}: overlaps {other} (the launch writes it while reading or writing that)"
                    )
        ints = [*fused_args(key), r.normed, r.normed_ld, r.top_k, int(r.renormalize), r.experts, r.weights, r.done]
        return self._prepared_epilogue(fn, smem, ints, n, "router gemv + routing")

    def close(self) -> None:
        """Forget the packed calls and the kernels: :meth:`linear` refuses from now on (:meth:`fits` is False)."""
        self._args.clear()
        self._fns = {}
