"""The skinny GEMM on Hopper's warpgroup MMA (``csrc/skinny_wgmma.cu``): ``y = x @ W.T`` for decode steps of 9-32
rows over 16-bit, e4m3 (128x128-block or per-row scales) or AWQ/GPTQ int4 weights, the weights decoded into the A
operand's registers as :mod:`~fi_engine.kernels.skinny_gemm` decodes them and ``x`` staged in shared memory as the B
operand (``wgmma.mma_async`` m64n16k16 / m64n32k16, sm_90a only). At 17-32 rows the skinny GEMM's ``mma.sync``
issues too slowly to keep up with reading the quantized weights; one wgmma takes 64 weight rows and all 32 x rows.

:class:`WgmmaLaunches` is the skinny GEMM's launches of a Dense with these kernels as further candidates: a Dense
times every plan of a shape at warm-up and launches the fastest (``Dense._choice``), so a wgmma plan serves only the
shapes where it measured faster; :attr:`WgmmaLaunches.wgmma` leaves them out (``benchmarks/bench_llama_tp.py
--variants no-wgmma``). The kernels are compiled by NVRTC for sm_90a (CuPy compiles for sm_90, which has no wgmma)
and loaded through CuPy; a split launch shares the skinny GEMM's scratch (``part``, ``done``) and its fixed-order
float32 reduction.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from .cublas import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F
from .cuda_sources import function_ptr, source
from .int4_linear import Int4Weight
from .launch import Launcher
from .skinny_gemm import DONE_SLOTS, E4M3_BLOCK, E4M3_ROW, INT4, PART_BYTES, W16, SkinnyGemm, SkinnyLaunches, SkinnyPlan

__all__ = [
    "GEOMETRIES",
    "WGMMA_MAX_ROWS",
    "WGMMA_MIN_ROWS",
    "WgmmaGemm",
    "WgmmaGeometry",
    "WgmmaLaunches",
]

WGMMA_MIN_ROWS, WGMMA_MAX_ROWS = 9, 32  # x rows padded to 16 (9-16) or 32 (17-32): the instruction's N
_PREFIX = {W16: "wgmma", E4M3_BLOCK: "wgmma8b", E4M3_ROW: "wgmma8r", INT4: "wgmma4"}
_STEP = {W16: 64, E4M3_BLOCK: 64, E4M3_ROW: 64, INT4: 128}  # inputs a step of the kernel
_FMT_NAME = {W16: "SK_W16", E4M3_BLOCK: "SK_E4M3_BLOCK", E4M3_ROW: "SK_E4M3_ROW", INT4: "SK_INT4"}


@dataclass(frozen=True)
class WgmmaGeometry:
    """One launch shape: ``warpgroups`` a block (64 weight rows each), ``u`` steps of weights in flight, ``kx``
    inputs of x staged in shared memory a pass (two buffers)."""

    warpgroups: int
    u: int
    kx: int

    def name(self, fmt: int, bf16: bool, f32out: bool, nr: int) -> str:
        """The kernel's name for ``nr`` (16 or 32) padded x rows (``csrc/skinny_wgmma.cu``'s ``SKINNY_WGMMA``)."""
        types = f"{'bf16' if bf16 else 'f16'}_{'f32' if f32out else '16'}"
        return f"{_PREFIX[fmt]}_{types}_r{nr}_w{self.warpgroups}_u{self.u}_x{self.kx}"

    def instance(self, fmt: int, bf16: bool, f32out: bool, nr: int) -> str:
        """The ``SKINNY_WGMMA(...)`` line that compiles :meth:`name`."""
        prefix = f"{_PREFIX[fmt]}_{'bf16' if bf16 else 'f16'}_{'f32' if f32out else '16'}"
        flags = f"{'true' if bf16 else 'false'}, {'true' if f32out else 'false'}, {_FMT_NAME[fmt]}"
        return f"SKINNY_WGMMA({prefix}, {flags}, {nr}, {self.warpgroups}, {self.u}, {self.kx})"

    @property
    def rows_per_block(self) -> int:
        """Weight rows (outputs) a block serves."""
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        """Threads a block (128 a warpgroup)."""
        return 128 * self.warpgroups

    def smem(self, nr: int) -> int:
        """Dynamic shared bytes: two buffers of ``kx`` inputs of ``nr`` 16-bit x rows."""
        return 2 * self.kx * nr * 2


# the candidates a Dense times per format (every one a default instance of csrc/skinny_wgmma.cu, which
# tools/kernel_fingerprints.py fingerprints)
GEOMETRIES: dict[int, tuple[WgmmaGeometry, ...]] = {
    W16: (WgmmaGeometry(2, 2, 512), WgmmaGeometry(1, 4, 512)),
    E4M3_BLOCK: (WgmmaGeometry(2, 2, 512), WgmmaGeometry(1, 4, 512)),
    E4M3_ROW: (WgmmaGeometry(2, 2, 512), WgmmaGeometry(1, 4, 512)),
    INT4: (WgmmaGeometry(2, 2, 512), WgmmaGeometry(1, 2, 512)),
}


def padded_rows(rows: int) -> int:
    """The instruction's N for ``rows`` x rows: 16 up to 16 rows, else 32."""
    return 16 if rows <= 16 else 32


def descriptor_fields(nr: int) -> int:
    """The fixed fields of the B operand's shared-memory matrix descriptor (the kernel adds the address): K-major
    without swizzling (bits 62-63: 0), the leading dimension byte offset (between the two 8-input core matrices of
    an instruction's 16 k) ``16 nr`` bytes in bits 16-29, the stride dimension byte offset (between 8-row groups)
    128 bytes in bits 32-45, each in units of 16 bytes; base offset (bits 49-51) 0."""
    lbo, sbo = 16 * nr, 128
    return ((lbo >> 4) & 0x3FFF) << 16 | ((sbo >> 4) & 0x3FFF) << 32


def descriptor(address: int, nr: int) -> int:
    """The whole descriptor of a shared-memory address (what the kernel builds): bits 0-13 ``(address & 0x3FFFF) >>
    4``, then :func:`descriptor_fields`."""
    return descriptor_fields(nr) | (address & 0x3FFFF) >> 4


def _unit(fmt: int, block_k: int) -> int:
    return math.lcm(_STEP[fmt], block_k) if block_k else _STEP[fmt]


def splits(geometry: WgmmaGeometry, fmt: int, rows: int, n: int, k: int, sms: int, block_k: int = 0) -> int:
    """The k ranges of a launch by the skinny GEMM's rule (:func:`~fi_engine.kernels.skinny_gemm.splits`): the fewest
    (a power of two) that give the grid 1.5 blocks an SM, each range whole steps (64 inputs, int4 128) and scale
    blocks, the split sums (``nr`` padded rows a warp's 16 weight rows) within the scratch."""
    blocks = -(-n // geometry.rows_per_block)
    most = max(1, k // _unit(fmt, block_k))
    per_split = blocks * geometry.rows_per_block * padded_rows(rows) * 4
    s = 1
    while 2 * blocks * s < 3 * sms and s * 2 <= most and (s * 2) * per_split <= PART_BYTES:
        s *= 2
    return s


def range_length(fmt: int, k: int, s: int, block_k: int = 0) -> int:
    """Inputs of each of ``s`` ranges of ``k`` (the last may be shorter): whole steps and scale blocks."""
    unit = _unit(fmt, block_k)
    per = -(-k // s)
    return -(-per // unit) * unit


def takes(
    fmt: int, rows: int, x: int, x_ld: int, w: int, n: int, k: int, y: int, f32out: bool, block: tuple[int, int] | None
) -> tuple[int, int, int] | None:
    """Whether the kernel serves a call: ``(bn, bshift, block_k)`` as the skinny GEMM's ``takes`` gives them, or
    None: rows outside ``[9, 32]``, k not whole steps (64 inputs; int4 128), x, ``x_ld`` or W not 16-byte aligned,
    y not aligned to its elements, e4m3 block scales whose rows are not a multiple of 16 or whose width is not 64
    times a power of two."""
    if fmt not in _STEP or not WGMMA_MIN_ROWS <= rows <= WGMMA_MAX_ROWS or not 0 < n < 1 << 31 or not 0 < k < 1 << 30:
        return None
    if k % _STEP[fmt] or x % 16 or x_ld % 8 or w % 16 or y % (4 if f32out else 2):
        return None
    if fmt != E4M3_BLOCK:
        return 16, 0, 0
    if block is None:
        return None
    bn, block_k = block
    if bn <= 0 or bn % 16 or block_k < 64 or block_k & (block_k - 1):
        return None
    return bn, block_k.bit_length() - 7, block_k


def compile_sm90a(code: str) -> tuple[Any, str]:
    """``code`` compiled by NVRTC (cuda.bindings) for sm_90a: ``(a CuPy RawModule, the cubin file it loads)``; the
    caller looks its kernels up (which loads them) and then removes the file. CuPy's own compilation names the
    device's sm_90, whose kernels cannot issue wgmma. RuntimeError with NVRTC's log."""
    import cupy
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), b"skinny_wgmma.cu", 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcCreateProgram: {err}")
    try:
        opts = [b"-arch=sm_90a", b"-std=c++17"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC: {err}: {log.decode(errors='replace')[:4000]}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cubin)
        return cupy.RawModule(path=path), path
    except BaseException:
        os.unlink(path)
        raise


class WgmmaGemm:
    """The wgmma kernels' launches for one Dense: compiled per weight format and type pair on first use
    (:meth:`plans`), sharing the skinny GEMM's split-k scratch. Needs an SM 9.0 GPU (:attr:`available`)."""

    def __init__(self, skinny: SkinnyGemm) -> None:
        import cupy

        self.available = str(cupy.cuda.Device().compute_capability) == "90" and skinny.available
        self.sms = skinny.sms
        self._smem_limit = skinny._smem_limit
        self._part, self._done = skinny._part, skinny._done
        self._modules: dict[tuple[int, bool, bool], Any] = {}
        self._fns: dict[str, int] = {}

    def _function(self, geometry: WgmmaGeometry, fmt: int, bf16: bool, f32out: bool, nr: int) -> int:
        name = geometry.name(fmt, bf16, f32out, nr)
        fn = self._fns.get(name)
        if fn is None:
            family = (fmt, bf16, f32out)
            if family not in self._modules:
                lines = [g.instance(fmt, bf16, f32out, r) for g in GEOMETRIES[fmt] for r in (16, 32)]
                code = "#define WGMMA_INSTANCES " + " ".join(lines) + "\n" + source("skinny_wgmma.cu")
                module, path = compile_sm90a(code)
                try:  # every kernel of the family looked up (loaded) while the cubin file exists
                    for g in GEOMETRIES[fmt]:
                        for r in (16, 32):
                            kernel = module.get_function(g.name(fmt, bf16, f32out, r))
                            kernel.max_dynamic_shared_size_bytes = min(self._smem_limit, g.smem(r))
                            self._fns[g.name(fmt, bf16, f32out, r)] = function_ptr(kernel)
                finally:
                    os.unlink(path)
                self._modules[family] = module
            fn = self._fns[name]
        return fn

    def plans(
        self,
        fmt: int,
        rows: int,
        x: int,
        x_ld: int,
        w: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        bf16: bool,
        f32out: bool,
        scale: int = 0,
        s_ld: int = 0,
        block: tuple[int, int] | None = None,
        int4: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> list[SkinnyPlan]:
        """The launches that compute ``y[:rows] = x[:rows] @ W.T`` (each geometry of :data:`GEOMETRIES`, the split by
        rule and half of it), or ``[]`` where :func:`takes` refuses the call or the GPU is no SM 9.0; arguments as
        :meth:`SkinnyGemm.plans <fi_engine.kernels.skinny_gemm.SkinnyGemm.plans>`'."""
        taken = takes(fmt, rows, x, x_ld, w, n, k, y, f32out, block)
        if taken is None or not self.available:
            return []
        bn, bshift, block_k = taken
        nr = padded_rows(rows)
        fields = descriptor_fields(nr)
        out = []
        for geometry in GEOMETRIES[fmt]:
            blocks = -(-n // geometry.rows_per_block)
            if geometry.smem(nr) > self._smem_limit or blocks > DONE_SLOTS:
                continue
            fn = self._function(geometry, fmt, bf16, f32out, nr)
            best = splits(geometry, fmt, rows, n, k, self.sms, block_k)
            for s in (best, best // 2) if best > 1 else (best,):
                kc = range_length(fmt, k, s, block_k)
                quant = (int4[0], int4[1], int4[3], int4[2]) if fmt == INT4 else (scale, s_ld, bn, bshift)
                args = (x, w, y, self._part, self._done, rows, n, k, x_ld, y_ld, kc, *quant, fields)
                out.append(SkinnyPlan(fn, (blocks, -(-k // kc)), geometry.threads, geometry.smem(nr), args))
        return out


class WgmmaLaunches(SkinnyLaunches):
    """The skinny GEMM's launches of one Dense (:class:`~fi_engine.kernels.skinny_gemm.SkinnyLaunches`) with the
    wgmma kernel's plans after its own: the plans a Dense times per shape, each launched by index."""

    wgmma = True
    """Whether the wgmma plans are candidates (on SM 9.0 GPUs); False: the skinny GEMM's only. Read when a shape is
    first timed; set it on the class to compare (``benchmarks/bench_llama_tp.py --variants no-wgmma``)."""

    def __init__(self, launcher: Launcher) -> None:
        super().__init__(launcher)
        self._wgmma: WgmmaGemm | bool | None = None  # made at the first plans; False: it could not be
        self.wgmma_error = ""
        """Why the wgmma kernels are unavailable, where they are."""

    def plans(self, key: tuple[int, ...], quant: Any) -> list[SkinnyPlan]:
        """The skinny GEMM's plans of the call ``key`` (:meth:`SkinnyLaunches.plans`), then the wgmma kernel's where
        it serves the call and :attr:`wgmma` is on."""
        base = super().plans(key, quant)
        gemm = self._gemm
        rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type = key
        if not self.on or not self.wgmma or not isinstance(gemm, SkinnyGemm):
            return base
        if not WGMMA_MIN_ROWS <= rows <= WGMMA_MAX_ROWS:
            return base
        if self._wgmma is None:
            try:
                self._wgmma = WgmmaGemm(gemm)
            except Exception as exc:  # NVRTC (cuda.bindings) or the device refusing: the skinny GEMM's plans serve
                self._wgmma, self.wgmma_error = False, f"{type(exc).__name__}: {exc}"
        wg = self._wgmma
        if not isinstance(wg, WgmmaGemm):
            return base
        if ab_type not in (CUDA_R_16BF, CUDA_R_16F) or c_type not in (ab_type, CUDA_R_32F):
            return base
        bf16, f32 = ab_type == CUDA_R_16BF, c_type == CUDA_R_32F
        try:
            if quant is None:
                extra = wg.plans(W16, rows, x, x_ld, w, n, k, y, y_ld, bf16, f32)
            elif isinstance(quant, Int4Weight):
                q = (quant.records, quant.groups, quant.gshift, quant.half_n)
                extra = wg.plans(INT4, rows, x, x_ld, quant.w, n, k, y, y_ld, bf16, f32, int4=q)
            else:
                fmt = E4M3_ROW if quant.block is None else E4M3_BLOCK
                s_ld = -(-quant.k // quant.block[1]) if quant.block else 0
                extra = wg.plans(fmt, rows, x, x_ld, quant.w, n, k, y, y_ld, bf16, f32, quant.scales, s_ld, quant.block)
        except Exception as exc:  # a compile refused at first use: the skinny GEMM's plans serve from now on
            self._wgmma, self.wgmma_error = False, f"{type(exc).__name__}: {exc}"
            return base
        return base + extra

    def close(self) -> None:
        """Drop the packed launches, the SkinnyGemm and the wgmma kernels."""
        super().close()
        self._wgmma = None
