"""The grouped GEMV of a mixture-of-experts decode step over MXFP4 experts read as stored (W4A16: e2m1 values with
one e8m0 scale per 32, as gpt-oss publishes its experts): :class:`Mxfp4GroupedGemv` (CUDA C in
``csrc/grouped_gemv4.cu``, compiled with NVRTC through CuPy), the experts as it reads them (:class:`Mxfp4Experts`)
and their layout (:func:`tiled_mxfp4`, which the loader applies once, and :func:`tiled_values`, its numpy reading).

The product is :class:`~fi_engine.kernels.fp8_moe_gemv.Fp8GroupedGemv`'s, ``y[a, j] = sum_c in[a // div, c] *
W[experts[a], j, c]`` over a step's assignments, with two things gpt-oss needs: the experts' biases added as the
sums are written (``bias``), and its clamped SwiGLU (or SiLU-and-mul) made as the down projection stages its input
rows (``act``). Each code is decoded once for all of an expert's rows of the pass, by two shifts and masks, into a
float16 pair that an ``mma.m16n8k16`` multiplies by up to 8 input rows (staged as float16: exact for bfloat16
activations within float16's range, clamped at +-65504); each 32-column block's float32 sum takes its scale. The
codes and scales take 0.53 bytes a weight (a quarter of bfloat16's, plus 1/64 for the scales): gpt-oss-20b's
experts 10.4 GB instead of 38 GB.

Steps the GEMV does not serve (long prefills, more than 1024 assignments) read a 16-bit copy of the layer's experts
that :meth:`Mxfp4GroupedGemv.dequantize_launch` writes (every value exact in bfloat16), one buffer shared by every
layer, written before each such use (as the FP8 experts' copy is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..values import arg_int, float32_bits
from .cuda_sources import function_ptr, source
from .moe_gemv import ExpertCall, KernelLaunch, QuantizedGroupedGemv

__all__ = ["Mxfp4Experts", "Mxfp4GroupedGemv", "padded", "tiled_mxfp4", "tiled_values"]

_MAX_ASSIGN = 1024  # assignments one launch takes (the block's list in shared memory)
_STATIC_SMEM = 4 * _MAX_ASSIGN + 64  # the list and the count
_SUMS_SMEM = 16 * 512  # the warps' sums: up to 16 warps of 32 lanes by 4 float32
_MAX_ROWS = 8  # staged rows per pass: the mma's n
_MAX_SCALE = 240  # e8m0 scales above make values past 2**113: the kernel's float32 block factor 2**(s - 113) overflows
_U64 = 1 << 64
ACTIVATIONS = ("none", "silu", "swiglu")
"""The staging's activations (:meth:`Mxfp4GroupedGemv.launch`'s ``act``): the input row as it is; ``silu(gate) * up``;
gpt-oss's ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""


def padded(k: int) -> int:
    """``k`` rounded up to a multiple of 128: the columns a tiled row holds (its last chunk padded with zero codes);
    TypeError/ValueError naming ``k`` for anything but an int in ``[1, 2**30]``."""
    return -(-arg_int("k", k, 1, 1 << 30) // 128) * 128


def _xp(arr: Any) -> Any:
    """The array module of ``arr``: CuPy for a CuPy array, numpy otherwise."""
    return np if isinstance(arr, np.ndarray) else __import__("cupy")


def tiled_mxfp4(blocks: Any, scales: Any) -> tuple[Any, Any]:
    """MXFP4 weights in the layout the grouped GEMV reads (``csrc/grouped_gemv4.cu``'s header), from the layout
    checkpoints store.

    Args:
        blocks: uint8 ``[E, n, k / 32, 16]`` (numpy or CuPy): each row's blocks of 32 e2m1 codes, two a byte, value
            ``2j`` of a block in the low nibble of byte ``j``.
        scales: uint8 ``[E, n, k / 32]``: each block's e8m0 scale (``2 ** (s - 127)``).

    Returns:
        ``(codes, scales)`` of the same array module: uint8 ``[E, n, padded(k) / 2]`` and ``[E, n, padded(k) / 32]``,
        per expert a run per tile of 16 rows and chunk of 128 columns (1,024 bytes of codes, 64 of scales; the
        padding columns zero codes).

    ValueError naming the argument: a shape that does not fit (``n`` a multiple of 16), a scale above 240 (values
    past ``2 ** 113``: no checkpoint holds such weights; the caller serves them dequantized).
    """
    xp = _xp(blocks)
    for name, arr, nd in (("blocks", blocks, 4), ("scales", scales, 3)):
        if str(getattr(arr, "dtype", None)) != "uint8" or getattr(arr, "ndim", 0) != nd:
            got = f"{getattr(arr, 'dtype', type(arr).__name__)} {list(getattr(arr, 'shape', ()))}"
            raise ValueError(f"{name}: expected a uint8 array of {nd} dimensions, got {got}")
    e, n, nb, width = blocks.shape
    if width != 16 or tuple(scales.shape) != (e, n, nb) or n % 16 or nb == 0:
        raise ValueError(f"blocks, scales: expected [E, n, k / 32, 16] and [E, n, k / 32] with n a multiple of 16, "
                         f"got {list(blocks.shape)} and {list(scales.shape)}")  # fmt: skip
    top = int(scales.max())
    if top > _MAX_SCALE:
        raise ValueError(f"scales: a block scale of 2**{top - 127} (byte {top}); the MXFP4 grouped GEMV takes scales "
                         f"up to 2**{_MAX_SCALE - 127}: serve these experts dequantized")  # fmt: skip
    kp = padded(nb * 32)
    tiled = xp.empty((e, n, kp // 2), xp.uint8)
    for x in range(e):  # one expert at a time: its uint32 temporaries (~20 bytes a weight) are the only extra memory
        tiled[x] = _tiled_codes(xp, blocks[x], kp)
    s = xp.zeros((e, n, kp // 32), xp.uint8)
    s[:, :, :nb] = scales
    # [E, T, rh, g, C, b] -> per (E, T, C): g, rh, b
    s = s.reshape(e, n // 16, 2, 8, kp // 128, 4).transpose(0, 1, 4, 3, 2, 5)
    return tiled, xp.ascontiguousarray(s).reshape(e, n, kp // 32)


def _tiled_codes(xp: Any, blocks: Any, kp: int) -> Any:
    """One expert's ``blocks [n, k / 32, 16]`` as :func:`tiled_mxfp4` lays its codes out: uint8 ``[n, kp / 2]``."""
    n, nb, _ = blocks.shape
    k = nb * 32
    codes = xp.zeros((n, kp), xp.uint32)  # the codes one a word, zero past k
    codes[:, :k] = xp.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(n, k)
    # axes: tile, row half rh, g, chunk, block (u, bl), pair (h2, h1), t, value p -- column 32 b + 16 h2 + 8 h1 + 2 t
    # + p, pair q = 2 h2 + h1, row 8 rh + g
    c = codes.reshape(n // 16, 2, 8, kp // 128, 2, 2, 2, 2, 4, 2)
    q = xp.arange(4, dtype=xp.uint32).reshape(2, 2, 1, 1)
    p = xp.arange(2, dtype=xp.uint32).reshape(1, 1, 1, 2)
    words = (((c & 7) << (3 * q + 16 * p)) | ((c >> 3) << (12 + q + 16 * p))).sum(axis=(6, 7, 9), dtype=xp.uint32)
    # words [T, rh, g, C, u, bl, t] -> per (T, C): run u, lane (g, t), word v = 2 bl + rh
    words = words.transpose(0, 3, 4, 2, 6, 5, 1)
    return xp.ascontiguousarray(words).view(xp.uint8).reshape(n, kp // 2)


def tiled_values(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float32 values ``[E, n, k]`` of :func:`tiled_mxfp4`'s ``codes`` and ``scales`` (numpy), decoded as the
    kernels decode them: each pair's float16 bits by the kernel's shifts and masks (``e2m1_pair``), times
    ``2 ** (s - 113)``. ValueError naming the argument that is not what :func:`tiled_mxfp4` makes."""
    shape = tuple(getattr(codes, "shape", ()))
    if (
        not isinstance(codes, np.ndarray)
        or codes.dtype != np.uint8
        or len(shape) != 3
        or shape[1] % 16
        or shape[2] % 64
    ):
        raise ValueError(f"codes: expected tiled_mxfp4's numpy uint8 [E, n, k_pad / 2], got {type(codes).__name__} "
                         f"{getattr(codes, 'dtype', '')} {list(shape)}")  # fmt: skip
    want = (shape[0], shape[1], shape[2] // 16)
    if not isinstance(scales, np.ndarray) or scales.dtype != np.uint8 or scales.shape != want:
        raise ValueError(f"scales: expected a numpy uint8 array {list(want)}, got {getattr(scales, 'shape', scales)}")
    arg_int("k", k, 1, 2 * shape[2])
    e, n, half = codes.shape
    kp = 2 * half
    words = codes.view(np.uint32).reshape(e, n // 16, kp // 128, 2, 8, 4, 4)  # E, T, C, u, g, t, v
    pairs = []
    for q in range(4):
        if q == 3:
            bits = words & np.uint32(0x8E008E00)
        else:
            bits = ((words << np.uint32(9 - 3 * q)) & np.uint32(0x0E000E00)) | (
                (words << np.uint32(3 - q)) & np.uint32(0x80008000)
            )
        pairs.append(bits.astype(np.uint32).view(np.float16).astype(np.float32))  # [..., v, 2]: low, high value
    # values [E, T, C, u, g, t, v, q, p] -> [E, T, rh, g, C, u, bl, h2, h1, t, p] (v = 2 bl + rh, q = 2 h2 + h1)
    v = np.stack([x.reshape(*words.shape, 2) for x in pairs], axis=-2)
    v = v.reshape(e, n // 16, kp // 128, 2, 8, 4, 2, 2, 2, 2, 2)  # E, T, C, u, g, t, bl, rh, h2, h1, p
    v = v.transpose(0, 1, 7, 4, 2, 3, 6, 8, 9, 5, 10).reshape(e, n, kp)
    s = scales.reshape(e, n // 16, kp // 128, 8, 2, 4).transpose(0, 1, 4, 3, 2, 5).reshape(e, n, kp // 32)
    factor = np.ldexp(np.float32(1), s.astype(np.int32) - 113).astype(np.float32)
    return (v * np.repeat(factor, 32, axis=-1))[:, :, :k]


@dataclass(frozen=True)
class Mxfp4Experts:
    """One layer's MXFP4 experts as stored on the GPU (CuPy arrays in :func:`tiled_mxfp4`'s layout): ``gate_up``
    ``[E, 2I, padded(H) / 2]`` (each expert's gate rows, then its up rows) and ``down`` ``[E, H, padded(I) / 2]``
    uint8 codes with their uint8 scales (``[..., padded(k) / 32]``); ``hidden`` and ``intermediate`` the unpadded
    sizes."""

    gate_up: Any
    gate_up_scales: Any
    down: Any
    down_scales: Any
    hidden: int
    intermediate: int

    def shapes(self) -> tuple[int, int, int]:
        """``(num_experts, hidden, intermediate)``, checked across the four arrays (ValueError naming the one that
        does not fit)."""
        h, i = self.hidden, self.intermediate
        for name, value in (("hidden", h), ("intermediate", i)):
            if value.__class__ is not int or value <= 0 or value % 32:
                raise ValueError(f"mxfp4_experts.{name}: expected a positive multiple of 32, got {value!r:.40}")
        shape = tuple(getattr(self.gate_up, "shape", ()))
        e = shape[0] if shape else 0
        for name, (n, k), div in (
            ("gate_up", (2 * i, h), 2), ("gate_up_scales", (2 * i, h), 32), ("down", (h, i), 2),
            ("down_scales", (h, i), 32),
        ):  # fmt: skip
            arr = getattr(self, name)
            want = (e, n, padded(k) // div)
            got_type, contiguous = (
                str(getattr(arr, "dtype", None)),
                getattr(getattr(arr, "flags", None), "c_contiguous", 0),
            )
            if got_type != "uint8" or not contiguous or tuple(getattr(arr, "shape", ())) != want:
                raise ValueError(f"mxfp4_experts.{name}: expected a C-contiguous uint8 array {list(want)}, got "
                                 f"{got_type} {list(getattr(arr, 'shape', ()))}")  # fmt: skip
        if e == 0:  # (the rows come in tiles of 16: hidden and intermediate are multiples of 32)
            raise ValueError("mxfp4_experts: expected at least one expert, got none")
        return e, h, i

    def nbytes(self) -> int:
        """Device bytes of the codes and scales."""
        return sum(int(getattr(self, n).nbytes) for n in ("gate_up", "gate_up_scales", "down", "down_scales"))


@dataclass(frozen=True)
class _Stack:
    """A registered expert stack ``[E, n, k]`` (addresses as ints)."""

    w: int
    scales: int
    experts: int
    n: int
    k: int
    tiled: bool = True  # (the codes are always in tiled_mxfp4's layout)


@dataclass(frozen=True)
class _Epilogue:
    """A launch's epilogue arguments (:class:`Mxfp4GroupedGemv`'s docstring); a name it lacks is a TypeError."""

    bias: Any = 0
    act: str | None = None
    alpha: float = 0.0
    limit: float = 0.0


class Mxfp4GroupedGemv(QuantizedGroupedGemv):
    """The grouped GEMV kernels over MXFP4 experts, compiled, registered and launched as
    :class:`~fi_engine.kernels.moe_gemv.QuantizedGroupedGemv` says (:meth:`add` registers a stack); :meth:`fits`
    says whether a step is served (never below SM 8.0, where only the 16-bit copy serves). Its launches take an
    epilogue (:class:`_Epilogue`): ``bias`` (the address of float32 ``[num_experts, n]``, or a CuPy array; 0 or None
    for none) added to each output, and ``act`` (one of :data:`ACTIVATIONS`; ``"swiglu"`` with ``alpha`` and
    ``limit``, and only with a bias: gpt-oss's) made as the input rows are staged (``gated`` alone: ``"silu"``)."""

    kind = "MXFP4"

    @staticmethod
    def program() -> str:
        """``grouped_gemv4.cu``'s text."""
        return source("grouped_gemv4.cu")

    @staticmethod
    def kernel_names(dtype: str) -> dict[tuple[str, bool], str]:
        """The names in ``grouped_gemv4.cu`` of the GEMVs for 16-bit activations ``dtype``, by ``(act, bias)``."""
        tag = "bf16" if dtype == "bfloat16" else "f16"
        return {
            ("none", False): f"grouped_gemv4_{tag}",
            ("silu", False): f"grouped_gemv4_{tag}_silu",
            ("none", True): f"grouped_gemv4_{tag}_bias",
            ("swiglu", True): f"grouped_gemv4_{tag}_swiglu_bias",
        }

    @staticmethod
    def dequant_names(dtype: str) -> dict[bool, str]:
        """The dequantizer's name in ``grouped_gemv4.cu`` for 16-bit ``dtype`` (its stacks are always tiled)."""
        return {True: f"dequant_mxfp4_{'bf16' if dtype == 'bfloat16' else 'f16'}"}

    chunks_ahead = 2
    """Chunks of weights (128 columns of a tile's 16 rows) a warp has loading while it sums one. Read when the
    kernels are compiled."""

    min_blocks_per_sm = 2
    """Blocks of 512 threads an SM the kernels' registers must leave room for (``__launch_bounds__``' second argument).
    Read when the kernels are compiled (``benchmarks/lab_mxfp4_gemv.py`` compares: with 2, 4 chunks a warp and 128
    warps an SM, the 20b-shaped gate/up GEMV at 8 tokens took 76 us where 1, 2 and 32 took 245, on an H100)."""

    chunks_per_warp = 4
    """A block's warps split k so that each sums at least this many chunks of 128 of a tile (at most 16 warps)."""

    warps_per_sm = 128
    """The warps a launch spreads over each SM (blocks over the active experts, at most one per tile of 16 rows)."""

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The NVRTC options: fast math (the staging's ``__expf`` and division, as the other grouped GEMVs'),
        :attr:`chunks_ahead` and :attr:`min_blocks_per_sm`."""
        return (
            "--use_fast_math",
            f"-DG4_AHEAD={int(cls.chunks_ahead)}",
            f"-DG4_MIN_BLOCKS={int(cls.min_blocks_per_sm)}",
        )

    def add(self, w: int, scales: int, experts: int, n: int, k: int) -> None:
        """Register the MXFP4 experts ``[experts, n, k]`` at device address ``w`` (codes) with their ``scales``, in
        :func:`tiled_mxfp4`'s layout. ValueError naming the argument: an address that is NULL or misaligned (``w``
        16 bytes, ``scales`` 8), ``n`` not a multiple of 16, ``k`` not a multiple of 32."""
        self._check_stack(w, scales, 8, experts, n, k)
        if n % 16 or k % 32:
            raise ValueError(f"n, k: the MXFP4 grouped GEMV takes tiles of 16 rows and blocks of 32 columns, got "
                             f"[{n}, {k}]")  # fmt: skip
        self.stacks[w] = _Stack(w, scales, experts, n, k)

    def rows_per_pass(self, tokens: int, k: int) -> int:
        """Input rows staged per pass for ``tokens`` tokens of ``k`` elements: up to 8, as many as shared memory
        holds (float16 rows of ``padded(k)``); 0 where not even one fits."""
        return max(0, min(_MAX_ROWS, tokens, (self._smem_limit - _SUMS_SMEM) // (2 * padded(k))))

    def fits(self, tokens: int, top_k: int, n: int, k: int) -> bool:
        """Whether a launch for ``tokens`` tokens of ``top_k`` assignments over ``[E, n, k]`` experts is served
        (tensor cores, at most 1024 assignments, n a multiple of 16 and k of 32, one input row in shared memory)."""
        return (
            self.tensor_cores
            and 0 < tokens * top_k <= _MAX_ASSIGN
            and n > 0
            and n % 16 == 0
            and k % 32 == 0
            and self.rows_per_pass(tokens, k) > 0
        )

    def _geometry(self, assignments: int, tokens: int, st: _Stack) -> tuple[int, int, int, int]:
        """A launch's rows per pass, warps per block, blocks per expert and dynamic shared bytes."""
        r = self.rows_per_pass(tokens, st.k)
        chunks = padded(st.k) // 128
        warps = max(1, min(16, chunks // max(1, int(self.chunks_per_warp))))
        active = max(1, min(st.experts, assignments))
        blocks = max(1, min(st.n // 16, -(-(max(1, int(self.warps_per_sm)) * self._sms // warps) // active)))
        return r, warps, blocks, r * padded(st.k) * 2 + warps * 512

    def _plan(self, call: ExpertCall, epilogue: dict[str, Any]) -> KernelLaunch:
        """The launch of ``y[a, :n] = act(x[a // div]) @ W[experts[a]].T (+ bias[experts[a]])`` for ``call`` over the
        registered stack at ``call.w`` (:meth:`add`), with the class docstring's ``epilogue``; :meth:`fits` must
        hold. ValueError naming ``act, bias`` where the kernels have no such pair."""
        c, epi = call, _Epilogue(**epilogue)
        st = self._stack(c.w, c.num_experts, c.n, c.k)
        bias = epi.bias or 0
        act = epi.act or ("silu" if c.gated else "none")
        if (act, bool(bias)) not in self._fns:
            raise ValueError(f"act, bias: expected 'none' or 'silu' without a bias, 'none' or 'swiglu' with one, got "
                             f"{act!r:.20} and {'a bias' if bias else 'none'}")  # fmt: skip
        r, warps, blocks, smem = self._geometry(c.assignments, c.tokens, st)
        # (the float parameters as their float32 bits: a packed launch passes every argument as an integer slot)
        alpha, limit = float32_bits("alpha", epi.alpha), float32_bits("limit", epi.limit)
        args: list[Any] = [c.x, c.x_ld, c.div, c.experts, c.assignments, c.w, st.scales, c.n, c.k, padded(c.k), bias,
                           alpha, limit, c.y, c.y_ld, r]  # fmt: skip
        return self._fns[act, bool(bias)], blocks, warps, smem, args

    def dequantize_launch(self, w: int, out: int) -> tuple[int, tuple[int, int], int, int, list[Any]]:
        """The launch writing the registered stack at ``w`` as 16-bit weights ``[E, n, k]`` at ``out``, as
        :meth:`launch` gives it."""
        st = self._registered(w)
        rows = st.experts * st.n
        threads = rows * (st.k // 32)
        grid = (max(1, min(16 * self._sms, -(-threads // 256))), 1)
        return function_ptr(self._dequant[True]), grid, 256, 0, [st.w, st.scales, out, rows, st.k, padded(st.k)]
