"""The model runner: one GPU's (or one tensor-parallel rank's) model, made once and run step by step. It holds the
family's weights (loaded by the family definition, :mod:`~fi_engine.runtime.family`), the activation buffers and the
paged KV cache's tensors (the Llama pass's: :meth:`ModelRunner.allocate_layers`), and its parts: the step's
host-device traffic (``io``: index arrays in, tokens out, the step views; :mod:`~fi_engine.runtime.worker.step_io`),
the CUDA graphs (``step_graphs``: :mod:`~fi_engine.runtime.worker.step_graphs`), the fused decode step (``fused``:
:mod:`~fi_engine.runtime.worker.fused_decode`), a tensor-parallel rank's decode step with the GEMVs' epilogues
(``tp_fused``: :mod:`~fi_engine.runtime.worker.tp_epilogues`) and the
:class:`~fi_engine.runtime.sample.sampler.Sampler` over its logits (``sampler``), on its own CUDA stream.

The serving loop (:mod:`~fi_engine.runtime.serving`) drives it one way per step: the scheduler picks the rows, the
runner stages their index arrays (:meth:`ModelRunner.stage_decode`, :meth:`ModelRunner.run_prefill`) and runs the
forward pass and the LM head (:meth:`ModelRunner.run_decode`), the sampler picks the tokens, the runner copies them out
(:meth:`ModelRunner.send_decode_tokens`), and the scheduler records them. The runner knows nothing of requests
beyond the rows it is given (their pages and positions): no queue, no admission, no token limits.

A family definition reaches the runner (its ``eng`` argument) only through the family interface declared in
:class:`~fi_engine.runtime.worker.state.RunnerState`, which the runner implements and its parts are given.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...checkpoint.safetensors import Checkpoint
from ...kernels import flashinfer as kernels
from ...lora.batch import takes_adapters
from ...values import flag
from ..family import ModelFamily
from ..sample.sampler import Sampler
from ..sched.request import Request
from ..sched.step_arrays import fill_decode, fill_prefill, pad_prefill
from ..settings import EngineSettings
from .fused_decode import FusedDecode
from .graph_shapes import _ladder, prefill_buckets, prefill_slots
from .state import RunnerState
from .step_graphs import StepGraphs
from .step_io import StepIO
from .tp_epilogues import TpEpilogueStep

__all__ = ["ModelRunner"]


def _require_gpu(device: int | None) -> None:
    """Raise :class:`~fi_ffi.errors.UnsupportedDeviceError` unless CUDA device ``device`` (None: 0) is usable."""
    from ...kernels.system import UnsupportedDeviceError, gpus, no_gpu_message

    # (``device`` itself is checked by EngineSettings, made before this is called)
    found, _ = gpus()
    if not found:
        raise UnsupportedDeviceError(no_gpu_message("the engine"))
    if (device or 0) >= len(found):
        raise UnsupportedDeviceError(
            f"device: cuda:{device} does not exist; this machine has {len(found)} GPU(s) (ordinals 0 to "
            f"{len(found) - 1})"
        )


class ModelRunner(RunnerState):
    """One GPU's model of family ``family`` (a :class:`~fi_engine.runtime.family.ModelFamily` instance), loaded from
    ``model_dir`` with ``settings`` (checked already: :class:`~fi_engine.runtime.settings.EngineSettings`).

    ``config`` is this rank's shard of the model (heads and MLP columns divided by ``tensor_parallel``),
    ``model_config`` the checkpoint's. ``prefill_graphs`` (default True): a prefill's token rows are padded up to
    a bucket (:attr:`prefill_buckets`) and run as the CUDA graph of that bucket and batch size, captured the first
    time it is met (``step_graphs``); set it False to always prefill eagerly. A capture that fails leaves that shape
    eager, with a warning and the reason in ``prefill_graph_failures``.
    ``fused_decode`` (default True): an eager decode step of at most 4 rows (8 over int4 weights) on one GPU, by the
    Llama pass (``ModelFamily.llama_pass``), runs its RMSNorms, residual adds and SiLU inside the runner's GEMV launches
    (MoE layers: their add + norm as one packed kernel, then their step's packed launches, where the MoE path packs),
    and RoPE and the KV append too where the QKV GEMV's epilogue serves them (head dim 64 to 512, no Qwen3 per-head
    norms between), with every launch but the attention run packed once (``fused``, :mod:`.fused_decode`; the same
    logits as the separate launches); False: the separate launches.
    ``packed_attention`` (default True): the fused step's attention runs packed too.
    ``prepare_ahead``: the graph loop stages decode step n + 1 while the GPU runs step n (one GPU, or a
    tensor-parallel rank with :attr:`tp_prepare_ahead`; a family whose plans order their copies on the stream:
    ``ModelFamily.plans_ahead``).

    Its parts, each given the runner: ``io`` (:class:`~fi_engine.runtime.worker.step_io.StepIO`, made with the
    buffers), ``step_graphs`` (:class:`~fi_engine.runtime.worker.step_graphs.StepGraphs`), ``fused``
    (:class:`~fi_engine.runtime.worker.fused_decode.FusedDecode`), ``tp_fused``
    (:class:`~fi_engine.runtime.worker.tp_epilogues.TpEpilogueStep`) and ``sampler``
    (:class:`~fi_engine.runtime.sample.sampler.Sampler`). The switches below are read by the parts when they pack
    or capture; set one on the class (``ModelRunner.silu_in_gate_up = False``) to compare.
    """

    int4_as_stored = True
    """AWQ / GPTQ int4 projections (the dense Llama family's) stay int4 on the GPU, read by the engine's int4 GEMV
    (:mod:`~fi_engine.kernels.int4_linear`: about a quarter of a 16-bit weight's bytes a decode step); False:
    dequantized to the 16-bit type at load, as a 16-bit checkpoint is served. A projection the GEMV cannot take
    (inputs not a multiple of 128, groups neither a power of two >= 64 nor the whole row, a tensor-parallel shard
    that cuts a group, a GPU below SM 8.0) is dequantized either way. Read at load (set it on the class, before the
    engine is made, to compare)."""

    fp8_experts_as_stored = True
    """The e4m3 experts of an FP8 mixture-of-experts checkpoint (Mixtral, Qwen3-MoE; DeepSeek-V3's routed experts)
    stay e4m3 on the GPU, read by the FP8 grouped GEMV at decode (:mod:`~fi_engine.kernels.fp8_moe_gemv`: half a
    16-bit expert's bytes), with a 16-bit copy of one layer's experts written for the steps it does not serve (long
    prefills); False: dequantized to the 16-bit type at load (``fi-engine serve``'s start-up line says which).
    Experts whose scale blocks or shapes the GEMV cannot take (block rows not a multiple of 16 dividing the matrix,
    block columns below 128, a tensor-parallel share that cuts a block:
    :meth:`Fp8Scheme.experts_for <fi_engine.checkpoint.quantization.Fp8Scheme.experts_for>`) are dequantized either
    way. Read at load (set it on the class, before the engine is made, to compare)."""

    graph_fused_decode = True
    """A decode graph of one row captures the fused step (``fused.step``, where :meth:`fuses` holds) instead of the
    separate launches: on an H100, 8B shape, 6.02 instead of 6.19 ms per step (the norms, SiLU, RoPE and KV append
    leave 4 of every 9 launches; benchmarks/RESULTS.md). Not at 2-4 rows over 16-bit weights, where the fused GEMVs'
    per-row work makes them slower than cuBLASLt (over int4 weights: :attr:`graph_fused_int4_rows`). Read
    when the graph is captured (at construction): set it on the class to compare."""

    graph_fused_int4_rows = 8
    """Over int4 weights, the decode graphs of up to this many rows (at most 8: ``fused.fits_int4_wide``) capture the
    fused step too, with :attr:`graph_fused_decode`: its GEMVs are the int4 GEMVs the separate launches run (the norms
    stay launches), with SiLU, RoPE and the KV append in their epilogues, so a layer has three launches fewer. On an
    H100, 8B AWQ: 656 against 615 tokens/s at 2 rows, 1,266 against 1,222 at 4 (benchmarks/RESULTS.md). Not over FP8
    weights, whose epilogue step was slower there at 2-4 rows than the separate launches (471 against 497, 925
    against 965). 1: the fused step at one row only. Read when the graphs are captured (at construction): set it on
    the class to compare."""

    lora_base_graphs = True
    """An engine serving LoRA adapters (``lora``) captures each decode graph twice: with the adapters' launches, which
    a step where a row takes an adapter replays, and without them (the pass of an engine without adapters, the fused
    step at one row: :attr:`graph_fused_decode`), which a step where no row does replays; each step picks by its rows'
    adapter slots (``step_graphs``, :mod:`.step_graphs`). The second set costs, at open, one more eager warm-up step
    and capture per batch size of the ladder (``step_graphs.capture_s``) and the graphs' driver memory (no buffer:
    the step's buffers are the runner's). False: one set, with the adapters' launches, which every step replays (a
    step of base rows then pays them as one with adapters does). Read when the graphs are captured (at
    construction): set it on the class to compare."""

    lora_fused = True
    """A decode step of 1 to 4 rows where a row takes a LoRA adapter runs the LoRA form of the fused step
    (``fused.fits_lora``: the adapters' shrinks, one a projection group, computing their own input as the fused GEMVs'
    prologues do and launched with programmatic dependent launch, and the expand in the fused GEMVs' epilogues,
    before RoPE and SiLU), eagerly and in the one-row decode graph of the adapters' set; False: such a step takes the
    separate launches with the adapters' (each projection's GEMM, then its shrink and expand). Read when the engine
    opens (the kernels are compiled then, one GPU only) and the graphs are captured: set it on the class to compare
    (``benchmarks/bench_lora.py --lora-fused both``: a batch-1 step with an adapter at 0.95x the base engine's
    tokens/s with it, 0.79x without, on an H100)."""

    lora_shrink_in_grid = True
    """In the LoRA form of the fused step (:attr:`lora_fused`), each projection group's shrink runs in its GEMV's own
    grid (extra blocks, the first to start, whose sums the GEMV blocks wait for on the GPU before their expand: the
    ``lora_grid_*`` kernels of ``csrc/lora_fused.cu``), not as a launch before it: no launch added to the fused step,
    and the sums beside the weights' streaming rather than before it. False: a shrink launch before each GEMV. A
    batch-1 step with an adapter ran at 0.95x the base engine's tokens/s in the grid, 0.87x with the launches; 4 rows
    of 4 adapters 0.85x either way (H100, benchmarks/RESULTS.md). Read when the engine opens (the LoRA GEMVs are
    compiled in one form): set it on the class to compare (``benchmarks/bench_lora.py --lora-fused on,launch``)."""

    decode_graph_ladder = True
    """Capture the decode step at every batch size of :func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`
    (each step replays the smallest graph holding its occupied slots); False: one graph of ``max_batch`` rows, which
    every step replays (before 2026-11-25). Read when the graphs are captured (at construction): set it on the class to
    compare."""

    tune_decode_graphs = True
    """On one GPU, each decode graph's 16-bit GEMM shapes whose launches timed alone came within 15 % of the fastest
    are tried in the captured step with each of them, and the graph keeps the launch whose step replays fastest
    (:mod:`~fi_engine.runtime.worker.step_tuning`; ``step_graphs.tuning`` says what it tried and kept): launches
    close alone can differ by more in the step, where each overlaps the kernel before it (on an H200, an 8B step of
    8 rows 4.8 or 5.2 ms by which of two gate/up launches 0.1 % apart alone won). Shapes over FP8 or int4 weights
    keep the launch timed alone (the module says why). It costs, at open, a capture and 14 replays a launch tried
    (at most 2 a shape). With tensor parallelism only in lock step (:attr:`tp_tune_decode_graphs`): ranks on their own
    would replay their trials out of step. Read when the graphs are captured (at construction): set it on the class
    to compare."""

    tp_tune_decode_graphs = False
    """With tensor parallelism, :attr:`tune_decode_graphs` in lock step: rank 0's shapes and close launches tried on
    every rank, every trial's step time the slowest rank's, so each rank captures, replays and keeps the same trials
    (:mod:`~fi_engine.runtime.worker.step_tuning`). Off: on two H200s (8B shape, decode graphs) it moved no batch past
    the noise, tokens/s with / without it: 1 row 371.5 / 371.3-372.7, 2 rows 682.3-684.2 / 675.6-681.4, 8 rows
    2,494.3-2,509.7 / 2,510.3-2,524.5, 32 rows 8,277.0 / 8,244.8-8,283.9 (benchmarks/RESULTS.md). Read when the graphs
    are captured: set it on the class to compare."""

    tensor_core_decode_rows: int = 16
    """Decode graphs of at least this many rows (eager steps: never) run the Llama family's attention on FlashInfer's
    FA2 paged-prefill kernel, one query row a request, where the query heads a KV head serves are 4 or more and the
    wheels hold that module (``Llama.plan_decode``; the decode kernel where they do not); 0: the decode kernel always
    (and :attr:`tensor_core_decode_context` off). The prefill kernel takes a KV head's queries together on tensor cores
    in tiles of many keys, where the decode kernel walks the keys a few at a time: on an H200 (8B shape, 32 query and 8
    KV heads, head dim 128, pages of 16, CUDA graph, us a layer) 11.3 against 15.1 at 32 rows and 48 keys, 15.5 against
    30.8 at 256, 43.0 against 56.9 at 1,024; at 8 rows 12.1 against 26.5 at 256 keys but 10.3 against 9.0 at 48. The 8B
    step after 1,024-token prompts ran 11 % faster with it at 2 rows, 9 % at 4, 7 % at 8 and 4-5 % at 32 (FP8 and int4
    weights: 6-12 % at 8 and 32); after 32-token prompts it was even at 2-8 rows and 2-5 % faster at 16 and 32, and
    within 2 % of the decode kernel over int4 weights at 4 and 8 rows (with :attr:`prefill_kernel_pdl`; 3-5 % slower
    without). Graphs of fewer rows (1-8 at the default 16) are captured on both kernels and choose per step
    (:attr:`tensor_core_decode_context`): the int4 step then ran 1.1-1.4 % faster at 4 and 8 rows than with the setting
    at 2 (only the one-row graph choosing) and the same at 1, 16 and 32 rows (one call on an H200,
    benchmarks/RESULTS.md); bf16 steps did not move (an earlier call). Its steps' attention matches a float32 reference
    and its greedy tokens transformers' (tests/engine/test_gpu_tc_decode.py). Read at each graph size's capture: set it
    on the class before the engine is made (``bench_llama_tp.py --variants no-tc-decode``); a graph keeps the kernel it
    was captured with."""

    tensor_core_decode_context: int = 64
    """The decode graphs of fewer rows than :attr:`tensor_core_decode_rows` (those of 1-8 rows, by default) are
    captured twice, on the decode kernel and on the prefill kernel, and each step replays the prefill kernel's where
    its longest context has at least this many tokens (``Llama.plan_decode``); 0: they keep the decode kernel. At one
    row the decode kernel is the faster only at the shortest contexts: on an H200 (8B heads, CUDA graph, us a layer)
    6.9 against 9.6 at 32 keys and 8.9 against 9.7 at 48, but 10.3 against 9.6 at 64, 16.3 against 9.7 at 128 and
    29.2 against 12.5 at 4,096; the 8B step of one row after 1,024-token prompts ran 5 % faster (240.4 against 228.2
    tokens/s; benchmarks/RESULTS.md). The second graph costs one more warm-up step and capture a graph size at
    start-up (one a set with LoRA adapters and :attr:`lora_base_graphs`) and no buffer. Read at capture (a graph size
    keeps the value its capture saw): set it on the class before the engine is made (``bench_llama_tp.py --variants
    tc-decode-context-N``)."""

    packed_attention: bool = True
    """The fused decode step's attention runs packed once per step view (``fi_ffi.prepare_decode_run``), each call
    taking only the step's plan, instead of a ``batch_decode_run`` per layer (the same logits bit for bit:
    tests/engine/test_gpu_fused_decode.py); False: a ``batch_decode_run`` per layer."""

    attention_pdl: bool = True
    """The packed attention runs launched with programmatic dependent launch where the GEMVs are
    (``Launcher.launches_with_pdl``: Hopper and later): each may start while the QKV GEMV drains, and the O GEMV after
    it while it drains (FlashInfer's ``enable_pdl``). Read when the runs are packed; set it on the class to compare."""

    prefill_kernel_pdl: bool = True
    """A decode graph's attention on FlashInfer's prefill kernel (:attr:`tensor_core_decode_rows`) launched with
    programmatic dependent launch where the GEMVs can be (``Launcher.launches_with_pdl``: Hopper and later), as the
    fused step's packed decode-kernel runs are (:attr:`attention_pdl`); in every step that takes the prefill kernel,
    the fused step's and the separate launches' alike (a launch after one without PDL simply waits for it). On an H200
    after 32-token prompts the int4 fused step of 4 and 8 rows ran 3.2 % and 2.8 % faster with it (1,532 against
    1,484 and 3,114 against 3,030 tokens/s), the bf16 graphs of 8 and 32 rows 0.2-0.4 % (benchmarks/RESULTS.md).
    Read at each run; set it on the class to compare (``bench_llama_tp.py --variants no-prefill-kernel-pdl``)."""

    silu_in_gate_up: bool = True
    """The fused step's gate/up GEMV over 16-bit weights writes ``silu(gate) * up``
    (``FusedGemvs.prepared_gate_up_silu``) and the down GEMV reads it as its input; False: the gate/up GEMV writes both
    halves and the down GEMV computes SiLU-and-mul in a prologue, in each of its blocks (the engine's step before
    2026-11-25). The same values either way (tests/engine/test_gpu_fused_decode.py). Read when the step is packed; set
    it on the class to compare (``benchmarks/bench_llama_tp.py --variants silu-prologue``)."""

    tp_fused_epilogues: bool = True
    """On a tensor-parallel rank, a decode step of at most 4 rows of a dense Llama-pass model with 16-bit weights
    (eager, and in the decode graphs) runs RoPE with the KV append as its QKV GEMV's epilogue and SiLU-and-mul as its
    gate/up GEMV's, both GEMVs reading the rows the all-reduce normalized (``tp_fused``,
    :mod:`~fi_engine.runtime.worker.tp_epilogues`: 7 launches a layer instead of 10; the same values, which the
    separate launches compute the same way: tests/engine/test_gpu_llama_tp.py compares the tokens); False: the
    separate launches. Read at each step (set it on the class to compare: ``benchmarks/bench_llama_tp.py --variants
    no-tp-fused``; a decode graph keeps what it captured)."""

    tp_prepare_ahead: bool = True
    """On a tensor-parallel rank too, the graph loop stages decode step n + 1 while the GPU runs step n
    (:attr:`prepare_ahead`; the family must plan ahead: ``ModelFamily.plans_ahead``). Every rank stages the same
    rows (they run the same scheduler on the same shared tokens), and the staging only orders host-to-device copies
    and the attention plan on the rank's own stream, no collective. On by default
    (``ServingLoop.tp_pipelined_decode`` launches the staged step ahead; ``benchmarks/bench_llama_tp.py --variants
    no-tp-pipe`` turns both off). Read when the engine opens: set it on the class."""

    norm_pdl: bool = True
    """The FP8 step's norms (``QuantizedWeights.fp8_epilogues``: launches of their own) launched with programmatic
    dependent launch where the GEMVs are (FlashInfer's ``enable_pdl``): each may start while the GEMV before it drains.
    Read when the step is packed; set it on the class to compare."""

    release_rows: bool = True
    """On one GPU, a decode step's separate launches take the engine's own residual-add RMSNorm and SiLU-and-mul
    (:class:`~fi_engine.kernels.release_rows.ReleasingRows`: FlashInfer's arithmetic, each releasing the GEMM after
    it at its start, so the GEMM loads its first weights while they run) in place of FlashInfer's
    ``fused_add_rmsnorm`` and ``silu_and_mul`` (the same values, bit for bit on an H200:
    tests/engine/test_gpu_release_rows.py). On an H200 the 8B step of 32 rows decoded 7 % faster with them in AWQ
    int4, 2-3 % in bf16 and FP8, and FP8's step of 8 rows 4 % (benchmarks/RESULTS.md). Read when a step view's
    launches are packed: set it on the class to compare (``bench_llama_tp.py --variants no-release-rows``)."""

    _kv_scales: tuple[float, float] | None = None  # (class default: a runner assembled without __init__)
    _releasing: Any = None  # the ReleasingRows, made at the first launch that takes it (False: it did not compile)
    release_rows_error = ""  # why the releasing launches did not compile, if they did not

    def __init__(self, family: ModelFamily, model_dir: str | Path, settings: EngineSettings) -> None:
        self._configure(family, model_dir, settings)
        Checkpoint.files(model_dir)  # the weights' files all there: said before the GPU, which cannot supply them
        _require_gpu(settings.device)  # before CuPy: its CUDARuntimeError would name neither the cause nor the fix
        try:
            import cupy as cp
        except ImportError as exc:
            raise ImportError(
                f"the engine needs CuPy ({exc}); install the engine extra: python -m pip install '.[engine]' in the "
                "checkout"
            ) from exc
        self.cupy = cp
        self._connect(settings)
        self._open(model_dir)

    def _configure(self, family: ModelFamily, model_dir: str | Path, settings: EngineSettings) -> None:
        """The host side, before any GPU work: the model's config read and checked against ``settings`` (the
        family's refusals, an FP8 cache's), this rank's shard of it, the sizes resolved, and the engine's state
        before its buffers exist."""
        from ...layers import kv_fp8
        from ...layers.tensor_parallel import shard_config

        self.settings = settings
        self.family = family
        self.model_config = self.family.read_config(model_dir)
        self.tensor_parallel = settings.tensor_parallel
        self.cuda_graph = settings.cuda_graph
        self.family.check(self, self.model_config)
        # the KV cache's element type: "auto" (the model's) or "fp8_e4m3" (normalized by the settings)
        self.kv_cache_dtype = settings.kv_cache_dtype or "auto"  # (the settings made None "auto"; for the type)
        if self.kv_cache_dtype == "fp8_e4m3":
            kv_fp8.check_supported(self.family, self.model_config, model_dir)
        self._kv_scales = settings.kv_cache_scales
        self.kv_fp8: Any = None  # the FP8 cache's scales and kernels (kv_fp8.KvFp8), made once the model is loaded
        # one GPU: the config as read (a family's own config type, e.g. DeepSeek's, is never sharded)
        tp = self.tensor_parallel
        cfg = self.config = self.model_config if tp == 1 else shard_config(self.model_config, tp)
        # MoE layers (Llama family): the fixed-capacity device path (routing and token counts on the device; only
        # the chosen experts' weights are read; a graph can capture it) for every step of at most max_batch rows,
        # eager or captured; host routing for longer prefills
        self.static_moe = self.cuda_graph and cfg.moe is not None
        sizes = settings.sizes(cfg)
        self.max_batch = sizes.max_batch
        self.page_size = sizes.page_size
        self.max_seq_len = sizes.max_seq_len
        self.num_pages = sizes.num_pages
        self.max_prefill_tokens = sizes.max_prefill_tokens
        self.step_graphs = StepGraphs(self)  # the decode graphs (with cuda_graph) and the padded prefill graphs
        self.fused = FusedDecode(self)  # the fused eager decode step
        self.tp_fused = TpEpilogueStep(self)  # a tensor-parallel rank's decode step with the GEMVs' epilogues
        # the MoE layers' grouped-GEMM workspace: made by _load where the model has routed experts (close() frees it)
        self.moe_workspace: Any = None
        self.prefill_graphs = True
        # token-row buckets of the padded prefill graphs (graph_shapes.prefill_buckets says why these)
        self.prefill_buckets = prefill_buckets(self.max_prefill_tokens)
        # an eager decode step of at most 4 rows runs its norms, SiLU, RoPE and KV append inside the GEMVs
        self.fused_decode = True
        # (bucket, request slots) whose capture failed -> why: those prefills stay eager (and unpadded) from then on
        self.prefill_graph_failures: dict[tuple[int, int], str] = {}
        # LoRA adapters (fi_engine.lora): the GPU slots and their kernels, made by _open where settings.lora is set;
        # step_lora: those of the step being run (lora where one of its rows takes an adapter, else None: the base
        # model's path), set by run_decode and run_prefill; _decode_adapters: whether a row of the decode step staged
        # last takes one (set where it is staged)
        self.lora: Any = None
        self.step_lora: Any = None
        self.lora_gemvs: Any = None  # the LoRA fused step's GEMVs (_lora_gemvs; None: not compiled)
        self._decode_adapters = False
        if settings.lora is not None and not family.serves_lora:
            raise ValueError(
                f"lora: {type(family).__name__}'s layers take no adapters (the Llama family's do: llama, qwen3, "
                f"mixtral and qwen3_moe attention); serve this model without lora"
            )
        self.comm: Any = None
        self._own_comm = False
        self.allreduce: Any = None
        self._closed = True  # until _open has made everything

    def _connect(self, settings: EngineSettings) -> None:
        """This rank's communicator (with tensor parallelism: ``settings.comm``, else one made from the launcher's
        variables, which the engine then closes), its device, rank and vocabulary shard."""
        comm, device = settings.comm, settings.device
        if self.tensor_parallel > 1:
            if comm is None:
                from ...kernels.system import Communicator

                comm, self._own_comm = Communicator.from_env(), True
            if comm.world_size != self.tensor_parallel:
                raise ValueError(
                    f"comm: has {comm.world_size} ranks, tensor_parallel is {self.tensor_parallel}; start as many "
                    f"ranks as the tensor-parallel size"
                )
            if device is not None and device != comm.device:
                raise ValueError(f"device: {device}, but this rank's communicator drives cuda:{comm.device}")
            device = comm.device
            self.comm = comm
        self.device = device = 0 if device is None else device
        self.rank = 0 if self.comm is None else self.comm.rank
        from ...layers.tensor_parallel import VocabShard

        # this rank's rows of the embedding and the LM head (None: the whole vocabulary)
        self.vocab_shard: VocabShard | None = None
        if self.comm is not None and settings.vocab_parallel:
            self.vocab_shard = VocabShard.of(self.config.vocab_size, self.rank, self.tensor_parallel)

    def _open(self, model_dir: str | Path) -> None:
        """The GPU side, on ``device``: the stream and cuBLAS handles, the weights (``ModelFamily.load``), an FP8
        cache's scales, the all-reduce, the buffers (``ModelFamily.allocate``), the sampler, the workspaces and, with
        ``cuda_graph``, the decode graphs; on a failure, what it made that no finalizer would release is released
        (and the error raised)."""
        from ...layers import kv_fp8
        from ...layers.tensor_parallel import ResidualAllReduce

        cp, device, cfg = self.cupy, self.device, self.config
        if self.comm is not None and self.settings.fused_allreduce and ResidualAllReduce.launch_with_pdl:
            # before any kernel of this rank is compiled: they let the next kernel start after their own wait, so
            # that the fused all-reduce may launch early (ResidualAllReduce says why; one rank, one process)
            from ...kernels.cuda_sources import Griddep

            Griddep.after_wait = True
        try:
            with cp.cuda.Device(device):
                self.stream = cp.cuda.Stream(non_blocking=True)
                self.stream_ptr = self.stream.ptr
                from ...kernels.dense import Dense

                self.dense = Dense(self.stream)
                ckpt = Checkpoint(model_dir)
                self.family.load(self, ckpt)
                if self.kv_cache_dtype == "fp8_e4m3":
                    self.kv_fp8 = kv_fp8.open_fp8_cache(self, ckpt, self._kv_scales)
                if self.comm is not None:
                    self.allreduce = ResidualAllReduce(
                        self.comm,
                        max(self.max_prefill_tokens, self.max_batch),
                        cfg.hidden_size,
                        self.dtype,
                        fused=self.settings.fused_allreduce,
                        pdl=self.dense.launcher.launches_with_pdl,
                    )
                self.family.allocate(self)
                if self.settings.lora is not None:
                    self.lora = self._lora_slots(self.settings.lora)
                    self.lora_gemvs = self._lora_gemvs()
                self.sampler = Sampler.of(self)  # the tokens' choice, over the buffers just made
                # the graph loop plans step N + 1 while the GPU runs step N: on an H100 (8B shape, one GPU) 6.39
                # instead of 6.59 ms per step at batch 1, the same tokens (benchmarks/RESULTS.md); with tensor
                # parallelism only with tp_prepare_ahead (on by default: see it)
                self.prepare_ahead = (self.comm is None or self.tp_prepare_ahead) and self.family.plans_ahead()
                self.prefill_workspace = kernels.workspace(device)
                self.decode_workspace = kernels.workspace(device)
                # The uploads and zero fills above ran on the legacy stream, which our non-blocking stream does not
                # wait for: finish them once here.
                cp.cuda.Device(device).synchronize()
                self._closed = False
                if self.cuda_graph:
                    try:
                        with self.stream:
                            self.step_graphs.capture()
                    except BaseException:
                        self.close()
                        raise
        except BaseException:
            if self._closed:  # the engine never opened: release what it made that no finalizer would
                dense = getattr(self, "dense", None)
                if dense is not None:  # cuBLAS and cuBLASLt handles (the original error is the one raised)
                    with contextlib.suppress(Exception), cp.cuda.Device(device):
                        dense.close()
                if self._own_comm:  # the communicator it made
                    self.comm.close()
            raise

    def _lora_slots(self, settings: Any) -> Any:
        """The LoRA adapters' GPU slots (:class:`~fi_engine.lora.device.DeviceSlots`) for ``settings``: every
        projection group the family's forward adapts, ``max_loras`` slots of ``max_lora_rank``, the shrink's scratch
        for the longest step."""
        from ...lora.adapter import BaseShapes
        from ...lora.device import DeviceSlots
        from ...lora.slots import SlotLayout

        layout = SlotLayout.of(BaseShapes.of(self.config, self.dtype), settings.max_lora_rank)
        rows = max(self.max_prefill_tokens, self.max_batch)
        return DeviceSlots(self.cupy, layout, settings.max_loras, self.dtype, rows, self.stream)

    def _lora_gemvs(self) -> Any:
        """The LoRA form of the fused step's GEMVs (:class:`~fi_engine.kernels.lora_fused.LoraFusedGemvs`) where
        :attr:`lora_fused` is on, the fused GEMVs compiled and the engine runs on one GPU (the fused step's); None
        otherwise, and where NVRTC or the driver refuse them (a warning says why; such steps take the separate
        launches)."""
        if not self.lora_fused or self.comm is not None or not self.dense.fused.fits(1, 8):
            return None
        from ...kernels.lora_fused import LoraFusedGemvs, LoraFusedKernels

        try:
            kernels = LoraFusedKernels.compile(self.cupy, self.lora_shrink_in_grid)
        except Exception as exc:  # NVRTC or the driver: the separate launches serve such steps
            why = f"the LoRA fused GEMVs did not compile ({exc}); LoRA steps take the separate launches"
            warnings.warn(why, stacklevel=2)
            return None
        return LoraFusedGemvs(self.dense.fused, self.dense.launcher, kernels)

    # ------------------------------------------------------------------------------------------ its switches

    @property
    def graph(self) -> Any:
        """The decode graph of ``max_batch`` rows once captured (``cuda_graph=True``), else None."""
        return self.step_graphs.graph

    @property
    def graphs(self) -> dict[int, Any]:
        """The decode graphs by their rows (:attr:`decode_graph_batches`), once captured: those a step where no row
        takes a LoRA adapter replays (every step, for an engine without adapters; ``step_graphs.lora_graphs`` holds
        those of the other steps), on the kernel of each size's first capture; a size captured on a second attention
        kernel too (:attr:`tensor_core_decode_context`) has that graph in ``step_graphs.second_graphs``, which the
        steps planned for that kernel replay."""
        return self.step_graphs.graphs

    @property
    def decode_graph_batches(self) -> tuple[int, ...]:
        """The batch sizes (rows) of the decode graphs, ascending, the last ``max_batch``: those the engine captured
        (``cuda_graph=True``), or before the capture those it will capture (:attr:`decode_graph_ladder`)."""
        return self.step_graphs.batches()

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """The token-row buckets a prefill is padded up to for its CUDA graph, ascending; by default
        :func:`~fi_engine.runtime.worker.graph_shapes.prefill_buckets` of ``max_prefill_tokens`` (which says why those).
        Settable to another ladder: a non-empty, strictly ascending sequence of ints ending at ``max_prefill_tokens``
        (each prefill needs a bucket, and none may pad past the buffers' rows); TypeError/ValueError naming
        ``prefill_buckets`` otherwise."""
        return self._prefill_buckets

    @prefill_buckets.setter
    def prefill_buckets(self, buckets: Sequence[int]) -> None:
        top = self.max_prefill_tokens
        ladder = _ladder("prefill_buckets", buckets, top)
        if ladder[-1] != top:
            raise ValueError(
                f"prefill_buckets: expected the last bucket to be max_prefill_tokens ({top}), got {ladder[-1]}"
            )
        self._prefill_buckets = ladder

    @property
    def fused_decode(self) -> bool:
        """Whether an eager decode step runs as the fused step (``fused``) where it applies (see the class docstring;
        default True). Settable to a bool (TypeError naming ``fused_decode`` otherwise: a string would be true)."""
        return self._fused_decode

    @fused_decode.setter
    def fused_decode(self, on: bool) -> None:
        self._fused_decode = flag("fused_decode", on)

    # ------------------------------------------------------------------------------------------ the family interface

    def allocate_layers(self) -> None:
        """The Llama pass's buffers (``buffers``): activations of ``max(max_prefill_tokens, max_batch)`` rows, the
        last-row gather, logits and ids of ``max_batch`` rows, the paged KV cache ``[layers, 2, pages, page_size,
        Hk, D]`` (with its per-layer descriptors), the vocabulary shard's and the fused all-reduce's; then the step
        arrays (:meth:`allocate_steps`). A family's ``allocate`` calls it, or lays out its own."""
        from ...kernels.dense import GEMV_MAX_ROWS
        from ...kernels.norm_fold import FOLD_ROWS
        from ...layers.tensor_parallel import allocate_rank_buffers

        cp, c = self.cupy, self.config
        storage = np.float16 if self.dtype == "float16" else np.uint16
        rows = max(self.max_prefill_tokens, self.max_batch)
        hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.qkv_width = (hq + 2 * hk) * d
        b = self.buffers = SimpleNamespace(
            h=cp.empty((rows, h), storage),
            x=cp.empty((rows, h), storage),
            qkv=cp.empty((rows, self.qkv_width), storage),
            attn=cp.empty((rows, hq * d), storage),
            gu=cp.empty((rows, 2 * c.intermediate_size), storage),
            act=cp.empty((rows, c.intermediate_size), storage),
            last=cp.empty((self.max_batch, h), storage),
            h_alt=cp.empty((GEMV_MAX_ROWS, h), storage),  # the fused step's second residual buffer (fused.step)
            # the folded norms of the quantized fused step (kernels.norm_fold): the second GEMV's input short of the
            # row's factor, and per layer and norm (input, post-attention) the counter pair and the rows' factors
            xn=cp.empty((GEMV_MAX_ROWS, h), storage),
            fold_sync=cp.zeros((c.num_layers, 2, 2), np.uint64),
            fold_rs=cp.zeros((c.num_layers, 2, FOLD_ROWS), np.float32),
            logits=cp.empty((self.max_batch, c.vocab_size), np.float32),
            ids=cp.empty(self.max_batch, np.int32),
            # one byte per element with an FP8 cache (kv_cache_dtype="fp8_e4m3": e4m3 bits), else the model's dtype
            kv=cp.zeros((c.num_layers, 2, self.num_pages, self.page_size, hk, d), np.uint8 if self.kv_fp8 else storage),
        )
        self._allocate_attention_caches()
        # the vocabulary shard's logits columns and argmaxes; where the normalized rows live (x2 with the fused
        # all-reduce, else x)
        self.normed = allocate_rank_buffers(self, b, rows, storage)
        self.allocate_steps()

    def _allocate_attention_caches(self) -> None:
        """Descriptors of each layer's K and V cache in ``buffers.kv``."""
        c, b = self.config, self.buffers
        kv_shape = (self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        dtype = self.kv_dtype
        self.k_cache = [
            kernels.descriptor(b.kv[i, 0].data.ptr, kv_shape, dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]
        self.v_cache = [
            kernels.descriptor(b.kv[i, 1].data.ptr, kv_shape, dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]

    def allocate_steps(self) -> None:
        """The per-step index arrays (host staging and device), the token-id buffers and the step views
        (:class:`~fi_engine.runtime.worker.step_io.StepIO`, ``io``): what every architecture's serving loop shares; a
        family's ``allocate`` calls it once its buffers exist."""
        self.io = StepIO(self)
        self.decode_arrays = self.io.decode_arrays
        self.prefill_arrays = self.io.prefill_arrays
        self.staged_wait_s = 0.0  # the last staging's wait for io.staged (ServingLoop._advance_pipelined)
        # the graph loop prepares the next decode step while the GPU runs this one (stage_decode_ahead); the
        # runner turns it on where the family allows it (ModelFamily.plans_ahead)
        self.prepare_ahead = False

    def embed_and_norm(self, v: SimpleNamespace, rows: int) -> None:
        """The embedding rows of ``v.token_ids`` into the residual stream ``h`` and the first layer's input norm into
        ``x2``; with a vocabulary shard each rank gathers the rows it has (zeros for the rest) into ``x``, and the
        all-reduce sums them into ``h = 0`` as the residual."""
        c, b, dense, s = self.config, self.buffers, self.dense, self.stream_ptr
        h, vs = c.hidden_size, self.vocab_shard
        if vs is None:
            dense.rows.gather_rows(rows, self.embed, h, v.token_ids, b.h.data.ptr, h, h)
            kernels.rmsnorm(v.h, self.ln1[0], v.x2, c.rms_norm_eps, s)
        else:
            dense.shards.gather_rows_shard(rows, self.embed, h, v.token_ids, b.x.data.ptr, h, h, vs.start, vs.valid)
            self.cupy.cuda.runtime.memsetAsync(b.h.data.ptr, 0, rows * h * b.h.itemsize, s)
            self.add_norm(v, self.ln1[0])

    def append_kv(self, v: SimpleNamespace, i: int) -> None:
        """This step's keys and values (``v.k``, ``v.v``: ``[rows, kv_heads, head_dim]``) into layer ``i``'s paged
        cache, each row at its request's position (``v``'s page table: ``kv_indptr``, ``kv_indices``,
        ``kv_last_page_len``)."""
        kernels.append_kv(
            v.k, v.v, v.batch_indices, v.positions, self.k_cache[i], self.v_cache[i], v.kv_indices, v.kv_indptr,
            v.kv_last_page_len, self.stream_ptr,
        )  # fmt: skip

    def add_norm(self, v: SimpleNamespace, weight: Any) -> None:
        """``h += x`` (summed over the ranks first with TP); the rows normalized with ``weight`` into ``x2``."""
        eps = self.config.rms_norm_eps
        if self.allreduce is None and v.kind != "decode":
            # a prefill's view is met once per shape (an eager prefill) or captured once (a padded one): packing each
            # layer's call would check every argument of all of them (~0.25 ms each, ~14 ms for 30 layers on the
            # first prefill of a shape); the op's own launch cache checks the shape once and each call's pointers
            kernels.fused_add_rmsnorm(v.x, v.h, weight, eps, self.stream_ptr)
        elif self.allreduce is None:  # packed once per view and weight (keyed by its address, a value): one FFI call
            call = v.prepared.get(weight.data_ptr)
            if call is None:
                call = self._released_add_norm(v, weight, eps) if self.release_rows else None
                if call is None:
                    call = kernels.prepared_fused_add_rmsnorm(v.x, v.h, weight, eps, self.stream_ptr)
                v.prepared[weight.data_ptr] = call
            call()
        else:
            self.allreduce(v.x, v.h, weight, v.x2, eps, self.stream_ptr)

    def _released_add_norm(self, v: SimpleNamespace, weight: Any, eps: float) -> Any:
        """:meth:`add_norm`'s call over decode view ``v`` packed as the engine's releasing add-norm, or None where it
        does not serve (:meth:`releasing_rows` None, or rows and weight not of the runner's type and one width)."""
        rr = self.releasing_rows()
        x, h = v.x, v.h
        if rr is None or not _rows_of(self.dtype, x, h) or tuple(weight.shape) != (x.shape[1],):
            return None
        rows, k = x.shape
        bf16 = self.dtype == "bfloat16"
        x_ld, h_ld = x.strides[0], h.strides[0]
        return rr.prepared_add_rmsnorm(rows, x.data_ptr, h.data_ptr, weight.data_ptr, k, x_ld, h_ld, eps, bf16)

    def releasing_silu_and_mul(self, v: SimpleNamespace) -> Any:
        """With :attr:`release_rows` and a decode view ``v`` on one GPU, the engine's own SiLU-and-mul of ``v.gu``
        into ``v.act`` packed once (FlashInfer's ``silu_and_mul``'s arithmetic, releasing the down GEMM at its start);
        else None (the family packs FlashInfer's; a tensor-parallel rank keeps it, as its add-norms are the fused
        all-reduce's; so does a runner whose :meth:`releasing_rows` is None)."""
        if not (self.release_rows and v.kind == "decode" and self.allreduce is None):
            return None
        rr = self.releasing_rows()
        gu, act = v.gu, v.act
        if rr is None or not _rows_of(self.dtype, gu, act) or gu.shape[1] != 2 * act.shape[1]:
            return None
        rows, inter = act.shape
        bf16 = self.dtype == "bfloat16"
        return rr.prepared_silu_mul(rows, gu.data_ptr, act.data_ptr, inter, gu.strides[0], act.strides[0], bf16)

    def releasing_rows(self) -> Any:
        """The :class:`~fi_engine.kernels.release_rows.ReleasingRows` of this runner's Dense launcher, made (compiled)
        at the first call; None where its launches would gain nothing or cannot run: a launcher without
        programmatic dependent launch (before Hopper, or the driver launch path off), or kernels that did not
        compile (:attr:`release_rows_error` says why; FlashInfer's launches serve from then on)."""
        if self._releasing is None:
            if not self.dense.launcher.launches_with_pdl:
                return None
            from ...kernels.release_rows import ReleasingRows

            try:
                self._releasing = ReleasingRows(self.dense.launcher)
            except Exception as exc:  # (CuPy's CompileException and the driver's errors have no common base)
                self._releasing, self.release_rows_error = False, f"{type(exc).__name__}: {exc}"
        return self._releasing or None

    def dense_moe(self, rows: int) -> bool:
        """Whether the MoE layers run a step of ``rows`` rows dense over the experts: the family's ``moe_path``
        (:meth:`~fi_engine.runtime.family.ModelFamily.moe_path_for`); never for a family without that choice
        (DeepSeek's: the dense path does not make its routing)."""
        return self.family.moe_path_for(self, rows) == "dense"

    # ------------------------------------------------------------------------------------------ the step's pass

    def forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final norm for ``rows`` token rows over step views ``v`` (the family's ``forward``);
        ``attention``: :meth:`decode_attention` or :meth:`prefill_attention`."""
        self.family.forward(self, v, rows, attention, static_moe)

    def decode_attention(self, i: int, v: SimpleNamespace) -> None:
        """Layer ``i``'s decode attention (the family's)."""
        self.family.decode_attention(self, i, v)

    def prefill_attention(self, i: int, v: SimpleNamespace) -> None:
        """Layer ``i``'s prefill attention (the family's)."""
        self.family.prefill_attention(self, i, v)

    def plan_decode(self, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        """Plan a decode step of ``rows`` rows from ``decode_arrays`` (the family's plan); ``kind``: the plan kind of
        one of the kernels the family's ``decode_graph_kernels`` names, asked for at the capture of that kernel's
        graph (None: the family chooses)."""
        self.family.plan_decode(self, rows, cuda_graph, kind)

    def plan_prefill(self, batch: int) -> None:
        """Plan the prefill attention of ``batch`` requests from ``prefill_arrays`` (the family's plan)."""
        self.family.plan_prefill(self, batch)

    def plan_prefill_padded(self, batch: int) -> None:
        """Plan a padded prefill of ``batch`` requests for its CUDA graph (the family's plan)."""
        self.family.plan_prefill_padded(self, batch)

    def finish_logits(self, logits: int, rows: int, columns: int) -> None:
        """The family's post-processing of float32 logits ``[rows, columns]`` at ``logits``, in place."""
        self.family.finish_logits(self, logits, rows, columns)

    def head(self, rows: int, x: int) -> None:
        """The LM head of ``rows`` normalized rows at ``x``: float32 logits into ``logits`` (whole vocabulary) or,
        with a vocabulary shard, this rank's columns into ``head``."""
        h, n = self.config.hidden_size, self.head_rows
        out = self.buffers.logits if self.vocab_shard is None else self.buffers.head
        self.dense.linear(rows, x, h, self.lm_head, n, h, out.data.ptr, n, self.gemm_type, self.gemm_f32)
        self.finish_logits(out.data.ptr, rows, n)  # on the shard's columns too: sampling gathers finished logits

    def view(self, kind: str, rows: int, batch: int) -> SimpleNamespace:
        """The step views of a ``kind`` step (``"decode"``, ``"prefill"``, ``"padded prefill"``) of ``rows`` token
        rows and ``batch`` requests over the runner's buffers (``io.view``: made once per shape)."""
        return self.io.view(kind, rows, batch)

    def upload_decode(self, rows: int, n_pages: int, cuda_graph: bool) -> None:
        """Copy the decode step's index arrays (``n_pages`` page ids) to the device and plan the step (``cuda_graph``:
        a fixed-batch plan for the captured graph)."""
        self.io.copy_decode(n_pages)
        self.plan_decode(rows, cuda_graph)
        self.io.staged.record(self.stream)  # the host staging (ours and the plan's) may be rewritten after this

    def _takes_adapters(self, arrays: dict[str, np.ndarray], rows: int) -> bool:
        """Whether a row of the first ``rows`` of a step's host arrays (``decode_arrays`` or ``prefill_arrays``, just
        filled) takes a LoRA adapter (:func:`~fi_engine.lora.batch.takes_adapters`); False for an engine serving
        none."""
        return self.lora is not None and takes_adapters(arrays["lora_slots"][:rows])

    def fuses(self, rows: int) -> bool:
        """Whether an eager decode step of ``rows`` rows runs as the fused step (``fused.fits``; where a row of the
        step takes a LoRA adapter, its LoRA form where ``fused.fits_lora`` holds: ``step_lora`` set, which each step
        sets before its pass, so asked between steps this answers for the step last run)."""
        return self.fused.fits(rows)

    def decode_pass(self, v: SimpleNamespace, rows: int, fused: bool, static_moe: bool = False) -> None:
        """A decode step's forward pass and LM head over views ``v``: the fused step (``fused``), a tensor-parallel
        rank's step with the GEMVs' epilogues where it fits (``tp_fused``, :attr:`tp_fused_epilogues`), or the
        family's forward and :meth:`head`."""
        if fused:
            self.fused.step(v, rows)
        elif self.allreduce is not None and self.tp_fused.fits(rows):  # (one GPU: never asked)
            self.tp_fused.step(v, rows)
        else:
            self.forward(v, rows, self.decode_attention, static_moe=static_moe)
            self.head(rows, self.normed.data.ptr)

    # ------------------------------------------------------------------------------------------ one step's work

    def run_prefill(
        self,
        rows: Sequence[Request],
        riders_behind: int,
        graph_slots: int | None,
        ahead: int,
        all_logits: bool = False,
        last_head: bool = True,
    ) -> tuple[SimpleNamespace, int, Any]:
        """Stage and run the prefill pass of ``rows`` (requests with their pages; a rider first, one token row at
        its position ``ahead`` tokens on, then the admitted prompts), through the LM head of each request's last
        row, by slot. ``riders_behind``: the first rows ride behind a decode step in flight, their input tokens
        gathered on the device from its ``ids`` by slot. ``graph_slots``: the request slots its graph is padded to
        (None: :func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots` of its requests).
        Returns the view whose ``logits`` / ``ids`` rows are the slots (one per slot up to the highest, an empty
        slot's row garbage), that width, and with ``all_logits`` the float32 logits of every token row (on the
        device; ``[ranks, rows, V/N]`` with a vocabulary shard). ``last_head=False`` (with ``all_logits``: a
        speculative pass reads every row's): no LM head by slot (the view's logits are left as they were)."""
        cp, c, b = self.cupy, self.config, self.buffers
        batch = len(rows)
        if graph_slots is None:
            graph_slots = prefill_slots(batch, self.max_batch)
        ph = self.prefill_arrays
        nnz, n_pages = fill_prefill(rows, self.page_size, ph, ahead)
        # the adapters' launches only where a row takes one (a padded graph is keyed by it too)
        self.step_lora = self.lora if self._takes_adapters(ph, nnz) else None
        k = riders_behind
        if k:  # riders come first, one row each: rows 0..k-1 take the tokens of their slots
            ph["rider_slots"][:k] = [r.slot for r in rows[:k]]
        # each request's last row, by slot: the rows whose logits choose the tokens
        slots = [r.slot for r in rows]
        width = max(slots) + 1
        ends = ph["last_rows"][:batch].copy()
        ph["last_rows"][:width] = 0
        ph["last_rows"][slots] = ends
        bucket = self.step_graphs.prefill_bucket(nnz, graph_slots)
        if self.step_lora is not None and self.step_lora.takes_segment_form(nnz):
            bucket = None  # (the adapters' segment form runs eagerly: its segments are the host's, per pass)
        if bucket is not None:  # the padding request fills the rows up to the bucket, empty ones the slots
            n_pages = pad_prefill(ph, nnz, bucket, batch, n_pages, self.page_size, requests=graph_slots + 1)
        io = self.io
        io.copy_prefill(n_pages)
        if k:
            self.dense.rows.gather_ids(
                k, b.ids.data.ptr, io.prefill_region("rider_slots"), io.prefill_region("token_ids")
            )
        v = self.view("prefill", nnz, batch)  # the real rows and requests
        if bucket is None or not self.step_graphs.run_padded_prefill(nnz, graph_slots, bucket):
            self.plan_prefill(batch)
            if self.step_lora is not None:  # the rows' slots on the host: the adapters' segment form may serve them
                self.step_lora.begin_step(ph["lora_slots"][:nnz])
            try:
                self.forward(v, nnz, self.prefill_attention)
            finally:
                if self.step_lora is not None:
                    self.step_lora.begin_step(None)
        full = None
        if all_logits:  # a check, not serving: allocated here
            hr = self.head_rows
            part = cp.empty((nnz, hr), np.float32)
            self.dense.linear(
                nnz, self.normed.data.ptr, c.hidden_size, self.lm_head, hr, c.hidden_size, part.data.ptr, hr,
                self.gemm_type, self.gemm_f32,
            )  # fmt: skip
            full = part
            self.finish_logits(part.data.ptr, nnz, hr)
            if self.vocab_shard is not None:  # every rank's columns, then [nnz, V] on the host
                full = cp.empty((self.tensor_parallel, nnz, hr), np.float32)
                self.comm.all_gather(part, full, stream=self.stream_ptr)
        if not last_head:
            return v, width, full
        h = c.hidden_size
        vs = v if width == batch else self.view("prefill", nnz, width)  # the sampled rows: one per slot
        self.dense.rows.gather_rows(width, self.normed.data.ptr, h, vs.last_rows, b.last.data.ptr, h, h)
        self.head(width, b.last.data.ptr)
        return vs, width, full

    def split_logits(self, full: Any, batch: int) -> list[np.ndarray]:
        """:meth:`run_prefill`'s ``all_logits`` on the host, one ``[prompt rows, vocab]`` array per request of the
        pass (waits for the stream)."""
        host = full.get(stream=self.stream)
        if host.ndim == 3:  # [ranks, nnz, V/N]: the columns side by side, the padding dropped
            host = np.concatenate(list(host), axis=1)[:, : self.config.vocab_size]
        bounds = self.prefill_arrays["qo_indptr"][: batch + 1].tolist()
        return [host[bounds[i] : bounds[i + 1]] for i in range(batch)]

    def send_prefill_tokens(self, width: int) -> Any:
        """Copy the pass's chosen tokens (``buffers.ids``, one per slot up to ``width``) to the host behind it on the
        stream; returns the event marking the copy's end (:meth:`prefill_tokens` reads them once it has passed)."""
        return self.io.send_prefill_tokens(width)

    def prefill_tokens(self, slots: Sequence[int]) -> list[int]:
        """The tokens the last prefill pass chose for ``slots`` (after its copy: :meth:`send_prefill_tokens`)."""
        return self.io.prefill_tokens(slots)

    def stage_decode(self, rows: Sequence[Request | None], ahead: int = 0) -> None:
        """Fill and upload the decode step's index arrays for ``rows`` (None: a padding row), ``ahead`` tokens on
        from where each request stands, and plan its attention (a fixed-batch plan with the decode graph)."""
        filled = fill_decode(rows, self.page_size, self.decode_arrays, ahead=ahead)
        self._decode_adapters = self._takes_adapters(self.decode_arrays, len(rows))
        self.upload_decode(len(rows), filled, cuda_graph=self.graph is not None)

    def stage_decode_ahead(self, rows: Sequence[Request | None], ahead: int) -> None:
        """:meth:`stage_decode` for a step that runs after the ones in flight (:attr:`prepare_ahead`, the decode
        graph): first waits until the last staging's copies are out of the host buffers (the wait in seconds kept in
        ``staged_wait_s``)."""
        t = time.perf_counter()
        self.io.staged.synchronize()  # the copies out of the staging buffers of the step before are done
        self.staged_wait_s = time.perf_counter() - t
        filled = fill_decode(rows, self.page_size, self.decode_arrays, ahead=ahead)
        self._decode_adapters = self._takes_adapters(self.decode_arrays, len(rows))
        self.upload_decode(len(rows), filled, cuda_graph=True)

    def feed_staged_decode(self, rows: int) -> None:
        """A decode step staged ahead takes its input tokens from the step or pass before it, still in
        ``buffers.ids`` in slot order: copied on the device into its ``token_ids``."""
        self.io.feed_staged_decode(rows)

    def run_decode(self, rows: int) -> tuple[SimpleNamespace, bool]:
        """Run the staged decode step of ``rows`` rows through the LM head: the decode graph of that many rows (its
        argmax into ``ids`` included), or eagerly (the fused step where it applies). A step where no row takes a LoRA
        adapter runs as an engine without adapters would (no adapters' launches, the fused step where it fits; its
        graph one captured so: :attr:`lora_base_graphs`); one where a row does, the separate launches with the
        adapters'. Returns the step's views and whether the graph already wrote every row's argmax."""
        v = self.view("decode", rows, rows)
        adapters = self._decode_adapters
        self.step_lora = self.lora if adapters else None
        if self.graph is None:
            self.decode_pass(v, rows, self.fuses(rows))
            return v, False
        self.step_graphs.replay_decode(rows, adapters)  # its argmax is every greedy row's token
        return v, True

    def send_decode_tokens(self, rows: int) -> tuple[np.ndarray, Any]:
        """Copy the step's chosen tokens (``buffers.ids``) to the host behind it on the stream, into the next of
        the two decode token buffers (two steps may be in flight); returns that buffer and the event marking the
        copy's end."""
        return self.io.send_decode_tokens(rows)

    def prefill_graph_shapes(self) -> list[tuple[int, int]]:
        """The ``(bucket rows, request slots)`` of every prefill graph held, in replay order (least recent first)."""
        return self.step_graphs.shapes()

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the graphs, workspaces and cuBLAS handle (device arrays go with the runner), then what the family
        made (``ModelFamily.close``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()
        self.family.close(self)

    def _release(self) -> None:
        """The runner's own teardown (:meth:`close`)."""
        if self.comm is not None and self.comm.aborted:
            return  # the peers are gone or going: no synchronization (queued collectives never finish), no teardown
        with self.cupy.cuda.Device(self.device):
            self.stream.synchronize()
            self.step_graphs.close()
            self.prefill_workspace.close()
            self.decode_workspace.close()
            if self.moe_workspace is not None:  # not `if self.moe_layers`: DeepSeek lists None for its dense layers
                self.moe_workspace.close()
            if self.lora is not None:
                self.lora.close()
            self.dense.close()
            if self.allreduce is not None:
                self.allreduce.close()  # a collective: every rank closes its engine
            if self._own_comm:
                self.comm.close()


def _rows_of(dtype: str, *tensors: Any) -> bool:
    """Whether each of ``tensors`` (fi_ffi descriptors) is 2-D rows of ``dtype`` (float16 or bfloat16) of one count,
    each row contiguous: what the releasing launches take."""
    rows = tensors[0].shape[0]
    return dtype in ("float16", "bfloat16") and all(
        t.ndim == 2 and t.shape[0] == rows and t.strides[1] == 1 and t.dtype.name == dtype for t in tensors
    )
