"""The CUDA C of the engine's own kernels, and the loader that reads it: the ``.cu`` and ``.cuh`` files of
``fi_engine/kernels/csrc`` (package data, read with :mod:`importlib.resources` once per process) and the programs
NVRTC compiles from them (:func:`source`). Nothing here runs a kernel: :class:`~fi_engine.kernels.dense.Dense`,
:class:`~fi_engine.kernels.fp8_linear.Fp8Linears`, :class:`~fi_engine.kernels.moe_gemv.GroupedGemv` and
:class:`~fi_engine.layers.kv_fp8.KvFp8` compile them through CuPy, check the arguments of and launch their kernels.

How a program is made: :func:`source` expands each line ``#include "<file>"`` of a ``.cu`` file by that file of
``csrc`` (recursively: ``fp8_fused.cu`` includes ``fused_gemv.cu``), each expansion between ``#line`` directives,
so that a compiler message names the file and line it is about (CuPy gives NVRTC a program name of its own) while
NVRTC sees no include to resolve: the options stay those the engine always passed, and CuPy's kernel cache, keyed
by the program's text, sees a change to a header as a change to every program that includes it (an include left
to NVRTC would be compiled from a stale cache entry). The programs were Python strings once, each with its own copy
of the device functions the headers now hold; ``tools/kernel_fingerprints.py`` proves that every kernel's machine
code is what those strings compiled to.

The headers (``.cuh``), each the same text in every program that includes it:

- ``convert.cuh``: the conversions between float32 and the 16-bit formats (``h2f``, ``b2f``, ``f2h``, ``f2b``;
  ``tof`` / ``fromf`` with the format a template argument, ``load16`` / ``store16`` with it a kernel argument) and
  to e4m3 pairs (``e4m3x2``); included by every program that converts (all but ``rows.cu`` and ``ds_routing.cu``).
- ``load_weights.cuh``: ``load_weights``, the GEMVs' 16-byte weight loads past L1; ``gemv.cu``, ``fused_gemv.cu``,
  ``fp8_gemv.cu``, ``grouped_gemv.cu``, ``int4_gemv.cu``, ``skinny_gemm.cu``.
- ``griddep.cuh``: programmatic dependent launch (``griddep_wait``, ``griddep_launch_dependents``) and
  ``load_acquire`` (a counter other blocks of the grid release); included by ``gemv.cu``, ``fused_gemv.cu``,
  ``fp8_gemv.cu``, ``int4_gemv.cu``, ``skinny_gemm.cu`` and ``lora_bgmv.cu``.
- ``rms_rows.cuh``: FlashInfer's RMSNorm factor of a few rows in its order of sums (``rows_rcp``, ``row_vec``,
  ``rsqrt_approx``); ``fused_gemv.cu`` (its prologue), ``fp8_gemv.cu`` and ``int4_gemv.cu`` (for ``norm_fold.cuh``).
- ``silu_mul.cuh``: ``silu_mul_vec``, FlashInfer's ``silu_and_mul`` of 8 packed elements (its fast-math SiLU);
  ``fused_gemv.cu`` (its SiLU prologue) and ``release_rows.cu``; uses ``convert.cuh``, which each includer includes
  before it.
- ``norm_fold.cuh``: the RMSNorm between two quantized GEMVs folded into them (:mod:`~fi_engine.kernels.norm_fold`:
  ``fold_out``, ``fold_block``, ``fold_factors``); ``int4_gemv.cu``, ``fp8_gemv.cu``, ``fp8_fused.cu``; uses
  ``convert.cuh``, ``griddep.cuh`` and ``rms_rows.cuh``, which each includer includes before it.
- ``row_counts.cuh``: the row counts the 16-bit GEMVs are compiled for and their other compile-time settings
  (``GEMV_FIXED_ROWS``, ``GEMV_PIPELINE``, ``GEMV_FUSED_MIN_BLOCKS``: Dense passes each); ``gemv.cu``,
  ``fused_gemv.cu`` (and through it ``lora_fused.cu``, whose kernels ``ALL_ROW_COUNTS`` makes for each count).
- ``gemv_column.cuh``: one output column of those two GEMVs, their weight loop (``EACH_WEIGHT_VECTOR``) and the store
  of the column's sums (``store_column``); ``gemv.cu``, ``fused_gemv.cu``, after ``row_counts.cuh``.
- ``rope_append.cuh``: RoPE with the KV append as a QKV GEMV's epilogue in FlashInfer's arithmetic (``rope_freq``,
  ``rope_store_append``; ``RopeAppendArgs`` and ``rope_append_pair`` for a kernel that takes them as one value);
  ``fused_gemv.cu`` (and so ``fp8_fused.cu``) and ``int4_gemv.cu``; uses ``convert.cuh``, which each includer
  includes before it.
- ``route.cuh``: ``route_row``; ``fused_gemv.cu`` and ``moe.cu`` (its ``PICKED_BEFORE`` also ``ds_routing.cu``).
- ``fp8_decode.cuh``: the e4m3 decoding and 16-bit widening of the FP8 kernels (``fp8_gemv.cu``, ``fp8_fused.cu``);
  uses ``convert.cuh``'s ``h2f``, which each includer includes before it.
- ``fp8_one_row.cuh``: the FP8 GEMV of one ``x`` row (``gemv8_one`` in ``fp8_gemv.cu``, ``gemv8_pair_one`` in
  ``fp8_fused.cu``); uses ``load_weights``, ``griddep_wait`` and ``fp8_decode.cuh``'s helpers, defined before it.
- ``fp8_rows.cuh``: ``GEMV8_SUMS``, the FP8 GEMV's sums of up to 4 ``x`` rows over four weight rows (``gemv8_rows`` in
  ``fp8_gemv.cu``, ``gemv8_pairs`` in ``fp8_fused.cu``); a macro, so that its loop compiles in place; uses ``SPLITS``
  (each includer defines it), ``load_weights``, ``griddep_wait`` and ``fp8_decode.cuh``'s helpers.
- ``fp8_tensor_cores.cuh``: the tensor-core decoding, mma and main loop of e4m3 weights (``gemv8_tc`` in
  ``fp8_gemv.cu``, whose comment says how they work, and ``gemv8_tc_pairs`` in ``fp8_fused.cu``; its decoding, mma
  and loads in ``grouped_gemv8.cu``; its mma and decoding in ``int4_gemv.cu`` and ``skinny_gemm.cu``); uses
  ``load_weights`` and ``griddep_wait``, defined before it.
- ``int4_decode.cuh``: the int4 weights' layout for the tensor cores and their half-tile sums (``i4_half``,
  ``i4_half_zsub``, the records' factors); ``int4_gemv.cu`` and ``skinny_gemm.cu``; uses ``mma16816``
  (``fp8_tensor_cores.cuh``), which each includer includes before it.
- ``fp8_dequant.cuh``: ``dequant_rows`` and the ``dequant_e4m3_{bf16,f16}`` kernels over it (e4m3 weights times
  their scales into a 16-bit copy); ``fp8_gemv.cu`` and ``grouped_gemv8.cu``.
- ``lora_shrink.cuh``: the LoRA shrink's sum of one entry (``dot8``, ``block_sum``) and its start under
  programmatic dependent launch (``shrink_start``); ``lora_bgmv.cu`` and ``lora_fused.cu`` (whose normed shrink so
  sums as the separate shrink does); uses ``convert.cuh``'s ``tof`` and ``griddep.cuh``.
- ``stage_rows.cuh``: the grouped GEMVs' listing of an expert's assignments and staging of their input rows (SiLU
  and mul made as they are staged, for the down projection); ``grouped_gemv.cu`` and ``grouped_gemv8.cu`` (the
  listing also ``grouped_gemv4.cu``, which stages its rows as float16 itself). The tensor-core ones,
  ``grouped_gemv8.cu`` and ``grouped_gemv4.cu``, also take from it their start (``LIST_ASSIGNMENTS_OR_RETURN``), the
  end of a tile (``SUM_TILE``: the warps' sums through shared memory) and the walk of their chunks of weights
  (``next_chunk``, ``shift_chunks``).

The programs (``.cu``), each also kept as a module constant holding :func:`source`'s text:

``rows.cu`` (compiled as is; launched through CuPy ``RawKernel`` or, for the gather of
the fused decode step, the driver's launch). Copies and exact comparisons only: nothing is rounded.

- ``gather_rows16(src, rows, dst, width, src_ld, dst_ld)``: ``dst[r, :width] = src[rows[r], :width]``, 16-bit
  elements, ``rows`` int32; grid (output rows, column blocks) (the embedding lookup).
- ``gather_rows16_shard(..., lo, n)``: the same for a vocabulary shard holding ids ``[lo, lo + n)``; a row whose
  id is outside gets zeros (the other ranks add theirs).
- ``argmax_rows(x, n, ld, out)``: ``out[r]`` = the first index of the largest of ``x[r, :n]`` (float32 ``x``
  with row stride ``ld``, int32 ``out [rows]``); NaN never wins, a row of NaN/-inf gives 0. One block per row
  (a multiple of 32 threads, at most 1024).
- ``argmax_rows_shard(x, n, ld, offset, pairs)``: a shard's ``pairs [rows, 2]`` int32 = (the largest value's
  float32 bits, its first index + ``offset``).
- ``combine_argmax(pairs, parts, rows, out)``: the all-gathered ``pairs [parts, rows, 2]`` combined into one
  index per row, as :func:`~fi_engine.layers.tensor_parallel.combine_shard_argmax` does in numpy; one thread a row.
- ``unshard_columns(src, rows, width, n, dst, dst_ld)``: the all-gathered float32 shards ``src [parts, rows,
  width]`` as ``dst [rows, :n]`` (the padding columns past ``n`` dropped).

``gemv.cu`` (launched by the driver, Dense._prepared). ``gemv_{f16,bf16}_{f16,f32}_r{R}(x, w,
y, rows, n, k, x_ld, y_ld)``: ``y[r, j] = sum_c x[r, c] * w[j, c]`` for ``r < rows <= 4`` -- ``x [rows, k]`` and ``w
[n, k]`` (row-major, a Linear weight) 16-bit, ``y [rows, n]`` 16-bit or float32, row strides ``x_ld``, ``y_ld`` in
elements. One warp per output column (Dense launches 4 a block, ``ceil(n / 4)`` blocks): lane ``l`` sums, in
float32, the 8-element vectors ``l, l + 32, ...`` of ``w``'s row, then a butterfly sums the 32 lanes. Each lane
loads 4 weight vectors before summing them (``ld.global.nc.L1::no_allocate``: weights are read once, so they bypass
L1), and loads its next 4 before summing those (``GEMV_PIPELINE``); the sums are the same, in the same order, as one
vector at a time. Each kernel is compiled for one row count ``R`` = ``rows``, 1 to 4 (``GEMV_FIXED_ROWS``: the loops
over the rows have a known length, so the loads of ``x``'s rows go out together instead of one behind each row's
branch; 0 compiles one kernel, ``_r0``, for any count). Lab timings on an H100 (8 layers of the 8B shape's four
one-row GEMVs, programmatic dependent launch, weights past L2): 1,305 us with one kernel for any count, 1,194 with a
kernel per count, 1,160 with the pipelined loads too (90 % of HBM bandwidth). Rounding: none but ``y``'s, once, to
nearest even (float32 ``y``: none). ``k`` a multiple of 8; ``x``, ``w`` and ``x``'s rows 16-byte aligned.

``fused_gemv.cu`` (compiled with ``--use_fast_math``, as FlashInfer's modules are;
launched by the driver on 8 warps a block, at most 8 blocks per SM, each block serving a grid-stride set of columns;
each kernel compiled per row count, ``_r1`` .. ``_r4``, as the plain GEMV's, the one-row kernels' registers capped
so that ``GEMV_FUSED_MIN_BLOCKS`` blocks, 4, fit an SM):

- ``gemv_{f16,bf16}_{f16,f32}_{norm,addnorm,silu}(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps)``:
  the GEMV above (the same sums in the same order) whose input rows ``in [rows, k]`` a prologue computes into
  dynamic shared memory (``rows * k * 2`` bytes), so the launch that made them goes away. Its ``MODE`` template
  argument is :data:`~fi_engine.kernels.dense.NORM` (1: ``in = rmsnorm(h) * nw``), ``ADD_NORM`` (2: ``s = h + x``,
  ``h_out = s``, ``in = rmsnorm(s) * nw``; ``x`` and ``h [rows, k]``) or ``SILU`` (3: ``in = silu(x[:, :k]) *
  x[:, k:2k]``; ``x [rows, 2k]``). Rounding: where FlashInfer's ``rmsnorm``, ``fused_add_rmsnorm`` and
  ``silu_and_mul`` round -- ``in`` and ``h_out`` to the 16-bit type, nothing else (``s`` is normalized before
  its rounding) -- then ``y`` once, as the GEMV; the sum of squares in FlashInfer's order and ``rsqrt.approx``,
  so the result equals those launches followed by the GEMV bit for bit.
- ``gemv_{f16,bf16}_{norm,addnorm}_rope(...)``: the NORM / ADD_NORM GEMV of a decode step's QKV projection (``y =
  qkv [rows, (hq + 2 hk) d]``, 16-bit) with FlashInfer's ``apply_rope_pos_ids`` (non-interleaved, all of ``d``)
  and ``append_paged_kv_cache`` (NHD) as its epilogue; each warp computes one head's columns ``i`` and ``i + d /
  2``. Rounding: each column to the 16-bit type as the GEMV's output; the q and k heads rotated in float32 from
  those values and rounded again (as the RoPE kernel writes them); the k and v heads copied into the caches as
  stored in ``y``. The host computes the RoPE constants as FlashInfer's launcher does
  (:meth:`~fi_engine.kernels.dense.RopeAppend.constants`).

- ``gemv_{f16,bf16}_{norm,addnorm}_route(..., eps, normed, normed_ld, top_k, renorm, experts, weights, done)``:
  the NORM / ADD_NORM GEMV of a MoE layer's router (``y``: float32 logits ``[rows, n]``, ``n`` experts) with the
  routing as its epilogue: block 0 writes the normalized input rows to ``normed`` (16-bit, row stride
  ``normed_ld``) for the experts' GEMVs, and the last block to finish (a uint32 counter at ``done``, 0 between
  launches: that block sets it back) routes each row by ``route.cuh``'s ``route_row`` into ``experts``
  (int32) and ``weights`` (float32), ``[rows, top_k]``. One launch where the norm, the GEMV and ``moe_route``
  were three. The logits and the expert choice are those launches' bit for bit (comparisons only); the weights
  come from this module's fast-math ``expf`` and division (within a few float32 ulps of ``moe_route``'s).

``route.cuh``: ``route_row``, the device routing of one token (softmax, top-k,
renormalization), text that the fused GEMV source above and ``moe.cu`` (``moe_route``) both include;
``ds_routing.cu`` includes it for ``PICKED_BEFORE``, the top-k's test of an expert picked already.

``fp8_gemv.cu``: the linear layers of e4m3 weights and 16-bit activations (W8A16) of
:class:`~fi_engine.kernels.fp8_linear.Fp8Linears`: GEMVs of one row to
:data:`~fi_engine.kernels.fp8_linear.FP8_GEMV_MAX_ROWS` (``gemv8_*``, ``gemv8tc_*`` on tensor cores) and the
weights' dequantization to 16 bits for steps of more rows (``dequant_e4m3_*``).

``fp8_fused.cu``: ``fused_gemv.cu``'s prologue (``stage``) and epilogues with a GEMV over
e4m3 weights after it (``GEMV_DEVICE_FUNCTIONS_ONLY`` leaves out its 16-bit kernels): the fused decode step's
launches for FP8 weights (``gemv8_*_{norm,addnorm,silu}_*``: a prologue; ``gemv8_*_{silu,rope}_{row,block}_{1,4}``:
the SiLU or the RoPE and KV append as an epilogue over pairs of output columns). Compiled with ``--use_fast_math``
as ``fused_gemv.cu`` is (the prologue's and the epilogues' rounding must be FlashInfer's); the weights' decoding
multiplies with subnormal inputs honored regardless (``mul_subnormal``).

``fp8_quant.cu``: dynamic e4m3 quantization of 16-bit activations for the FP8
tensor-core GEMM (W8A8, ``Fp8Linears.w8a8``).

``skinny_gemm.cu``: the tensor-core GEMM of decode steps of up to 32 rows over 16-bit, e4m3 or int4 weights
(:mod:`~fi_engine.kernels.skinny_gemm`; each Dense compiles the instances it needs, by ``SKINNY_INSTANCES``).

``release_rows.cu``: FlashInfer's ``fused_add_rmsnorm`` (its sums in its order, ``rms_rows.cuh``) and
``silu_and_mul`` as launches that release the next one at their start, so the GEMM after them loads its first weights
while they run (:mod:`~fi_engine.kernels.release_rows`; ``ModelRunner.release_rows``). Compiled with
``--use_fast_math`` as FlashInfer's modules are.

``grouped_gemv.cu``: the grouped GEMV of a MoE decode step (:mod:`~fi_engine.kernels.moe_gemv`);
``grouped_gemv8.cu``: the same over e4m3 experts read as stored (:mod:`~fi_engine.kernels.fp8_moe_gemv`).

``grouped_gemv4.cu``: the same over MXFP4 experts read as stored (:mod:`~fi_engine.kernels.mxfp4_moe_gemv`), with the
experts' biases and gpt-oss's clamped SwiGLU, and their 16-bit copy (``dequant_mxfp4_{bf16,f16}``).
``append_e4m3.cu``:
the FP8 KV cache's append and output scaling (:mod:`~fi_engine.layers.kv_fp8`).

The programs of the layers and models, each compiled by the module named (CuPy ``RawModule``, no options):
``moe.cu``, the MoE layer's combines, device routing (``route.cuh``), rows and activations
(:class:`~fi_engine.layers.moe.MoELayer`); ``ds_routing.cu``, DeepSeek's grouped top-k routing
(:class:`~fi_engine.layers.deepseek_routing.DeviceGroupedTopk`); ``gemma2.cu``, Gemma 2's scaled embedding and logit
soft cap (:mod:`~fi_engine.models.gemma2`); ``gpt_oss.cu``, gpt-oss's k bias (:mod:`~fi_engine.models.gpt_oss`).

The text of a program is what NVRTC compiles: a change that moves a kernel's
machine code (``tools/kernel_fingerprints.py`` compares it on the CPU) is a new kernel, to be proven on the GPU
against FlashInfer's launches (tests/engine/test_gpu_fused_decode.py).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

__all__ = ["Griddep", "files", "function_ptr", "functions", "read", "source"]

CSRC = "csrc"
"""The folder of the CUDA files inside this package."""

# a line that includes another file of csrc (the only includes the sources make: no system headers, NVRTC has none)
_INCLUDE = re.compile(r'#include "([^"]+)"[^\n]*\n?')


def files() -> list[str]:
    """The names of the CUDA files (``.cu`` and ``.cuh``) in ``csrc``, sorted."""
    return sorted(_names())


def read(file: str) -> str:
    """The text of ``csrc/<file>`` as stored, its includes not expanded; read once per process. TypeError/ValueError
    naming ``file`` where it is no file of :func:`files`."""
    return _stored(_checked(file))


class Griddep:
    """When the engine's kernels let the kernel after them start under programmatic dependent launch
    (``csrc/griddep.cuh``). ``after_wait`` off (the default on one GPU): at their start, so that it loads its weights
    while they run; on: once their own wait for the kernel before them has returned (``GRIDDEP_AFTER_WAIT``), so that
    a kernel that starts has every kernel two or more before it finished. That is what a kernel that reads before its
    own wait needs: FlashInfer's fused all-reduce loads its residual first
    (:class:`~fi_engine.layers.tensor_parallel.ResidualAllReduce`, launched with programmatic dependent launch only
    with this on). Read when a program is made (:func:`source`): set it before the engine compiles its kernels. The
    model runner of a tensor-parallel rank turns it on in its process (``ResidualAllReduce.launch_with_pdl``, on by
    default); on one GPU it measured no faster or slower (benchmarks/RESULTS.md)."""

    after_wait = False


def source(file: str) -> str:
    """The program NVRTC compiles for ``csrc/<file>``: its text with each ``#include "<file>"`` line replaced by
    that file's program (itself expanded), the expansion opened by ``#line 1 "<file>"`` and followed by a ``#line``
    back to the includer's next line; made once per process. With :attr:`Griddep.after_wait` on, a program that
    includes ``griddep.cuh`` starts with ``#define GRIDDEP_AFTER_WAIT``. TypeError/ValueError naming ``file`` where it
    is no file of :func:`files`; ValueError where a file includes itself (through any chain of includes)."""
    program = _program(_checked(file))
    if Griddep.after_wait and "griddep_launch_dependents" in program:
        return "#define GRIDDEP_AFTER_WAIT\n" + program  # (the program opens with its #line 1)
    return program


def functions(cupy: Any, file: str, names: tuple[str, ...], options: tuple[str, ...] = ()) -> list[Any]:
    """The kernels ``names`` of ``csrc/<file>``'s program (:func:`source`), compiled by NVRTC through CuPy's
    ``RawModule`` with ``options``, in the order named; compiled once per process for each set of arguments and
    :attr:`Griddep.after_wait`."""
    return _functions(cupy, file, names, options, Griddep.after_wait)


@functools.cache
def _functions(cupy: Any, file: str, names: tuple[str, ...], options: tuple[str, ...], after_wait: bool) -> list[Any]:
    module = cupy.RawModule(code=source(file), options=options)  # (after_wait: in the key, read by source)
    return [module.get_function(name) for name in names]


def function_ptr(kernel: Any) -> int:
    """The ``CUfunction`` handle (an int, for ``cuLaunchKernel``) of a compiled CuPy kernel: a ``RawModule``
    function (:func:`functions`' items) or a ``RawKernel``."""
    function = getattr(kernel, "kernel", kernel)  # cupy RawKernel / RawModule function -> cupy.cuda.function.Function
    return int(function.ptr)


def _names() -> frozenset[str]:
    folder = resources.files(__package__) / CSRC
    return frozenset(f.name for f in folder.iterdir() if f.name.endswith((".cu", ".cuh")))


def _checked(file: object) -> str:
    """``file`` where it is a file of :func:`files` (so that no other path is read), else TypeError/ValueError."""
    if not isinstance(file, str):
        raise TypeError(f"file: expected a CUDA file's name (str), got {type(file).__name__}")
    if file not in _names():
        raise ValueError(f"file: {file!r:.60} is no CUDA file of fi_engine/kernels/csrc (one of {', '.join(files())})")
    return file


@functools.cache
def _stored(name: str) -> str:
    return (resources.files(__package__) / CSRC / name).read_text(encoding="utf-8")


@functools.cache
def _program(name: str) -> str:
    return _expand(name, ())


def _expand(name: str, including: tuple[str, ...]) -> str:
    if name in including:
        raise ValueError(f"{' -> '.join((*including, name))}: a CUDA file includes itself")
    parts = [f'#line 1 "{name}"\n']
    for number, line in enumerate(read(name).splitlines(keepends=True), 1):
        included = _INCLUDE.fullmatch(line)
        if included is None:
            parts.append(line)
            continue
        parts.append(_expand(included[1], (*including, name)))
        parts.append(f'#line {number + 1} "{name}"\n')
    return "".join(parts)
