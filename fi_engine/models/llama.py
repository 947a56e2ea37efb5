"""A Llama serving engine without torch: fi_ffi for FlashInfer's ops, cuBLAS (called through cffi) for the GEMMs,
CuPy for device memory and two small kernels.

::

    from fi_engine.models.llama import LlamaEngine

    with LlamaEngine("/path/to/Llama-3.2-1B", max_batch=8, cuda_graph=True) as engine:
        result = engine.generate([[128000, 791, 6864], [128000, 40]], max_new_tokens=32)
    print(result.tokens, result.tokens_per_s, result.host_us_per_step)

The model (``config.json`` + ``*.safetensors``, float16 or bfloat16; also with FP8 projections, served as e4m3, a
mixture-of-experts model's experts too (read as stored by the FP8 grouped GEMV at decode, a 16-bit copy of one
layer's experts written for longer steps:
:attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.fp8_experts_as_stored`); dense models also with
AWQ / GPTQ int4 projections, served as stored by the engine's int4 GEMV where it takes their shape, else dequantized
as they are read: :attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.int4_as_stored`): token embedding; per layer
RMSNorm, fused QKV projection, (Qwen3: per-head RMSNorm of q and k,) RoPE (plain or Llama 3.1 scaled) on q and k,
K/V appended to the paged cache, attention (causal batch prefill, or batch decode) with GQA, output projection, fused
residual-add + RMSNorm, fused gate/up projection, SiLU-and-mul, down projection (Mixtral, Qwen3-MoE: the
mixture-of-experts layer of :mod:`fi_engine.layers.moe` instead); final RMSNorm; LM head (tied to the embedding or
not) with float32 logits; greedy argmax or top-k/top-p sampling. Model types: ``llama``, ``qwen3``, ``mixtral``,
``qwen3_moe`` (:mod:`fi_engine.checkpoint.config`). MoE layers take a device path (no host step) for every step of at
most ``max_batch`` rows, eager or in a decode graph: the fixed-capacity routed path (the grouped GEMV, or the grouped
GEMM) or dense over the experts, as ``moe_path`` picks (:mod:`fi_engine.models.moe_paths`); longer prefills route on
the host.

Serving (:class:`~fi_engine.runtime.engine.Engine`, of which :class:`LlamaEngine` is the Llama family's): the prompts
are queued (:mod:`fi_engine.runtime.sched`), admitted into free batch slots and prefilled together (one
``batch_prefill_paged_plan``, one run per layer); then each decode step makes one ``batch_decode_plan`` (a decode
graph of 2 rows or more: the FA2 ``batch_prefill_paged_plan`` of one query a request, :meth:`Llama.plan_decode`) and
runs every layer with it, samples one token per request, copies the tokens to the host and lets finished requests
leave (their pages are freed). With ``cuda_graph=True`` the decode step is captured at each batch size of
:func:`~fi_engine.runtime.worker.graph_shapes.decode_batches` (1, 2, 4, ..., ``max_batch`` rows) and every step replays
the smallest holding its occupied slots (empty ones among them padded): it re-plans (``enable_cuda_graph=True``), copies
the step's index arrays into the graph's buffers and replays it. A prefill pads its token rows up to a bucket
(:func:`~fi_engine.runtime.worker.graph_shapes.prefill_buckets`; the padding rows are one more request living on the
padding page) and its requests up to a few slot counts with empty requests
(:func:`~fi_engine.runtime.worker.graph_shapes.prefill_slots`), and replays that shape's CUDA graph, captured the first
time it is met (:mod:`~fi_engine.runtime.worker.step_graphs`).

Every buffer is allocated once, in the engine's constructor; the ops write into them (no allocation
per step, which is also what makes the capture valid). All GPU work runs on the engine's own stream.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from ..checkpoint.config import LlamaConfig
from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels
from ..layers.moe import MoELayer
from ..runtime.engine import Engine
from ..runtime.family import ModelFamily
from ..runtime.sampling_params import SamplingParams
from ..runtime.sched.step_arrays import kv_lengths
from ..runtime.serving import GenerationResult
from ..runtime.settings import with_settings
from ..runtime.worker.model_runner import ModelRunner
from ..runtime.worker.step_io import step_views
from .decode_queries import DecodeQueryOffsets
from .moe_paths import MoEPaths
from .registry import family_config_json
from .weights import WeightLoader

__all__ = ["GenerationResult", "Llama", "LlamaEngine", "SamplingParams", "step_views"]


class Llama(MoEPaths, ModelFamily):
    """The Llama family's definition (``llama``, ``qwen3``, ``mixtral``, ``qwen3_moe``): Llama's config, its weights
    (fused QKV and gate/up, Qwen3's per-head norms, Mixtral's and Qwen3-MoE's experts), the Llama pass (the module
    docstring) and FlashInfer's paged prefill and decode plans. The fused decode step and the padded prefill graphs
    serve it (:attr:`~fi_engine.runtime.family.ModelFamily.llama_pass`). ``moe_path``: the MoE layers' path for MoE
    models (:class:`~fi_engine.models.moe_paths.MoEPaths`; :class:`LlamaEngine` passes its argument on)."""

    llama_pass = True
    serves_lora = True  # forward adds the adapters of its rows after each projection (eng.step_lora: fi_engine.lora)
    fp8_kv_refusal = ""  # bf16 queries over an e4m3 cache: FA2 decode and paged prefill (head_dim 128, kv_fp8)
    _planned: tuple[int, bool, bytes] | None = None  # the key of the decode plan in the workspace (plan_decode)
    _decode_qo: DecodeQueryOffsets | None = None  # a decode row's query offsets for the prefill kernel

    def __init__(self, moe_path: str = "auto") -> None:
        super().__init__(moe_path)
        # by a decode graph's rows: the plan kinds it was captured with (decode_graph_kernels: fixed at its capture)
        self._graph_kernels: dict[int, tuple[str, ...]] = {}
        # by the rows of a graph size captured on both kernels: the context (tokens) from which a step takes the
        # prefill kernel's graph (ModelRunner.tensor_core_decode_context, read at that capture)
        self._graph_context: dict[int, int] = {}
        self._context_lens = np.zeros(0, np.int32)  # step_kernel's scratch of KV lengths (max_batch once needed)

    def _moe_gemv_rows(self) -> int:
        return MoELayer.gemv_tokens  # read per call: a benchmark may set it on the class

    def _moe_experts_stored(self) -> bool:
        return self.experts_stored

    def plans_ahead(self) -> bool:
        return type(self).plan_decode is Llama.plan_decode  # a subclass planning otherwise opts out

    def read_config(self, model_dir: str | Path) -> LlamaConfig:
        """The checkpoint's ``config.json`` read by :meth:`LlamaConfig.from_dict
        <fi_engine.checkpoint.config.LlamaConfig.from_dict>`; a model type another family serves is refused naming
        its engine (``fi_engine.models.registry.engine_class`` picks it)."""
        return LlamaConfig.from_dict(*family_config_json(model_dir, type(self)))

    def check(self, eng: ModelRunner, cfg: LlamaConfig) -> None:
        """Refuse a MoE path the model cannot take, and FP8 projections that ``eng.tensor_parallel`` ranks (or, on
        one GPU, the stacking of q, k and v or of gate and up) would cut inside a block of scales, naming the
        projection (:meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.shard_refusal`)."""
        self.check_moe_path(cfg)
        n = eng.tensor_parallel
        why = None if cfg.fp8 is None else cfg.fp8.shard_refusal(*_fp8_projection_sizes(cfg), n)
        if why is not None and n > 1:
            raise ValueError(f"tensor_parallel: {n}: {why}; pick a tensor_parallel whose shards hold whole blocks of "
                             f"scales, or serve a bfloat16 copy")  # fmt: skip
        if why is not None:
            raise ValueError(f"model: {why}; serve a bfloat16 copy of this checkpoint")

    def load(self, eng: ModelRunner, ckpt: Checkpoint) -> None:
        c = eng.model_config  # the checkpoint's shapes; this rank keeps its shard
        hq, hk, d, h, inter = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
        r, n = eng.rank, eng.tensor_parallel
        embed_info = ckpt.info("model.embed_tokens.weight")
        dtype = embed_info.dtype
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(
                f"model: weights are {dtype}; this engine serves float16 or bfloat16 checkpoints "
                f"(save the model in one of them)"
            )
        # every upload kept alive by eng.device_arrays; AWQ/GPTQ int4 projections kept int4 for the int4 GEMV
        # (ModelRunner.int4_as_stored) or dequantized to dtype as read; FP8 experts kept e4m3
        # (ModelRunner.fp8_experts_as_stored) or dequantized as read (w.linear)
        w = WeightLoader.for_engine(eng, ckpt, dtype, c.int4, c.fp8)
        vs = eng.vocab_shard
        fp8 = c.fp8  # an Fp8Scheme: attention and dense MLPs e4m3 (fi_engine.checkpoint.fp8_weights), the rest 16-bit
        # where quantized projections stay as stored (e4m3 always; int4 unless ModelRunner.int4_as_stored is off)
        stored = eng.dense if fp8 is not None or (c.int4 is not None and eng.int4_as_stored) else None

        def table(whole: np.ndarray) -> np.ndarray:  # the whole [V, H] table, or this rank's rows of it
            return whole if vs is None else vs.take(whole)

        eng.embed = w.ptr(table(w.get("model.embed_tokens.weight", (c.vocab_size, h))))
        tied = c.tie_word_embeddings
        eng.lm_head = eng.embed if tied else w.ptr(table(w.linear("lm_head", (c.vocab_size, h))))  # GPTQ lm_head: int4
        eng.head_rows = c.vocab_size if vs is None else vs.rows  # the LM head's output columns on this rank
        eng.wqkv, eng.wo, eng.wgu, eng.wd, eng.ln1, eng.ln2 = [], [], [], [], [], []
        eng.q_norm = []
        eng.k_norm = []
        eng.moe_layers = []
        if c.moe is not None:
            eng.moe_workspace = kernels.workspace(eng.device)  # the grouped GEMMs' own (argument arrays, scratch)
            # decided once for every layer: shapes and shards the FP8 grouped GEMV cannot read are dequantized
            self.experts_stored = w.keeps_fp8_experts(eng, h, c.moe.intermediate_size)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_parts = [(a + "q_proj", (hq * d, h)), (a + "k_proj", (hk * d, h)), (a + "v_proj", (hk * d, h))]
            eng.wqkv.append(w.projection(stored, qkv_parts, r, n, 0))
            eng.wo.append(w.projection(stored, [(a + "o_proj", (h, hq * d))], r, n, 1))
            if c.qk_norm:  # per head_dim: every rank keeps the whole vector
                eng.q_norm.append(w.vector(w.get(p + "self_attn.q_norm.weight", (d,))))
                eng.k_norm.append(w.vector(w.get(p + "self_attn.k_norm.weight", (d,))))
            if c.moe is not None:
                eng.moe_layers.append(load_moe_layer(eng, ckpt, p, w))
            else:
                gate_up = [(p + "mlp.gate_proj", (inter, h)), (p + "mlp.up_proj", (inter, h))]
                eng.wgu.append(w.projection(stored, gate_up, r, n, 0, interleave=True))
                eng.wd.append(w.projection(stored, [(p + "mlp.down_proj", (h, inter))], r, n, 1))
            eng.ln1.append(w.vector(w.get(p + "input_layernorm.weight", (h,))))
            eng.ln2.append(w.vector(w.get(p + "post_attention_layernorm.weight", (h,))))
        eng.final_norm = w.vector(w.get("model.norm.weight", (h,)))

    def plan_prefill_padded(self, eng: ModelRunner, batch: int) -> None:
        """Plan the padded prefill of ``batch`` requests (the padding request included) for a CUDA graph: the
        schedule's layout then depends only on the bucket and ``batch`` (FlashInfer's ``enable_cuda_graph``)."""
        self._plan_own_prefill(eng, batch, cuda_graph=True)

    def plan_prefill(self, eng: ModelRunner, batch: int) -> None:
        """Plan the prefill attention of ``batch`` requests from the host index arrays ."""
        self._plan_own_prefill(eng, batch, cuda_graph=False)

    def _plan_own_prefill(self, eng: ModelRunner, batch: int, cuda_graph: bool) -> None:
        """This class's prefill plan of ``batch`` requests into ``eng.prefill_plan`` (``cuda_graph``: see
        :func:`~fi_engine.kernels.flashinfer.prefill_plan`); the one body of the two methods above, ."""
        ph = eng.prefill_arrays
        eng.prefill_plan = self._paged_prefill_plan(
            eng,
            eng.prefill_workspace,
            (ph["qo_indptr"][: batch + 1], ph["kv_indptr"][: batch + 1], ph["kv_last_page_len"][:batch]),
            cuda_graph,
        )

    def _paged_prefill_plan(
        self,
        eng: ModelRunner,
        ws: Any,
        arrays: tuple[Any, Any, Any],
        cuda_graph: bool,
        backend: Literal["auto", "fa2", "fa3"] = "auto",
    ) -> Any:
        """FlashInfer's causal paged-prefill plan on workspace ``ws`` of the host ``arrays`` (query offsets, page
        offsets, last pages' lengths) with this model's heads, page size, types and scale: the prefill's plan, and the
        decode step's where it takes the prefill kernel (``backend`` "fa2", :meth:`plan_decode`)."""
        c = eng.config
        return kernels.prefill_plan(
            ws,
            *arrays,
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            eng.page_size,
            eng.dtype,
            eng.stream_ptr,
            cuda_graph=cuda_graph,
            kv_dtype=eng.kv_dtype,
            sm_scale=eng.kv_sm_scale,
            backend=backend,
        )

    def plan_decode(self, eng: ModelRunner, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        """Plan a decode step of ``rows`` rows whose index arrays are in ``eng.decode_arrays``: FlashInfer's FA2
        paged-prefill plan of one query a request (kind ``"batch_prefill"``) or its decode plan (``"batch_decode"``).
        ``kind``: the kernel of the graph being captured (:meth:`decode_graph_kernels`); None: eager steps take the
        decode kernel (their host time bounds them at small batches, and the prefill plan is made every step where the
        decode plan is mostly reused, below), a decode graph's step the kernel its graph size was captured with
        (:meth:`tensor_core_decode`, asked at its first capture and kept), or, where that size was captured on both,
        the one :meth:`step_kernel` picks for this step's contexts. Where the wheels have no FA2 module of the model's
        settings, the decode kernel serves (:attr:`tensor_core_decode_refused`).

        The decode plan of the last step is kept where this one's ``kv_indptr`` is the same (no request crossed a
        page boundary, 15 steps of 16 at page size 16): FlashInfer's decode plan reads only ``kv_indptr`` and the
        fixed settings, so it would write the same schedule again, and a plan costs the step 30-60 us of host time
        (benchmarks/bench_engine_host.py). The prefill plan also reads the last pages' lengths: made every step
        (ahead of it, while the GPU runs the step before, where the runner prepares ahead)."""
        c = eng.config
        indptr = eng.decode_arrays["kv_indptr"][: rows + 1]
        if cuda_graph and kind is None:
            kind = self.step_kernel(eng, rows)
        if cuda_graph and kind == "batch_prefill":
            arrays = (self._decode_queries(eng).host(rows), indptr, eng.decode_arrays["kv_last_page_len"][:rows])
            self._planned = None
            try:
                eng.decode_plan = self._paged_prefill_plan(eng, eng.decode_workspace, arrays, cuda_graph, "fa2")
                return
            except kernels.KernelNotFoundError as exc:  # no FA2 module of these settings: the decode kernel serves
                self.tensor_core_decode_refused = f"{type(exc).__name__}: {exc}"
                self._graph_kernels[rows] = ("batch_decode",)
        key = (rows, cuda_graph, indptr.tobytes())
        if key == self._planned and eng.decode_plan is not None:
            return
        self._planned = None  # until the plan below exists: a failed plan leaves nothing to reuse
        eng.decode_plan = kernels.decode_plan(
            eng.decode_workspace,
            indptr,
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            eng.page_size,
            eng.dtype,
            cuda_graph,
            eng.stream_ptr,
            kv_dtype=eng.kv_dtype,
            sm_scale=eng.kv_sm_scale,
        )
        self._planned = key

    def prefill_attention(self, eng: ModelRunner, i: int, v: SimpleNamespace) -> None:
        kernels.prefill_run(
            eng.prefill_plan,
            v.q,
            eng.k_cache[i],
            eng.v_cache[i],
            v.qo_indptr,
            v.kv_indptr,
            v.kv_indices,
            v.kv_last_page_len,
            v.attn,
            eng.stream_ptr,
        )

    tensor_core_decode_refused = ""
    """Why the decode steps run the decode kernel where :attr:`ModelRunner.tensor_core_decode_rows` asks for the
    prefill kernel (its plan's error: no FA2 module of the model's settings in the wheels); "" where it did not."""

    def _prefill_kernel_serves(self, eng: ModelRunner) -> bool:
        """Whether the model's decode steps can take the prefill kernel: :attr:`ModelRunner.tensor_core_decode_rows`
        set, 4 or more query heads a KV head (fewer leave the prefill kernel's query tiles mostly empty), and no
        refusal of that plan before (:attr:`tensor_core_decode_refused`)."""
        c = eng.config
        heads = c.num_qo_heads >= 4 * c.num_kv_heads
        return bool(eng.tensor_core_decode_rows) and heads and not self.tensor_core_decode_refused

    def tensor_core_decode(self, eng: ModelRunner, rows: int) -> bool:
        """Whether every step of a decode graph of ``rows`` rows plans FlashInfer's FA2 paged prefill (one query a
        request) in place of its decode kernel: :attr:`ModelRunner.tensor_core_decode_rows` and more rows, where the
        prefill kernel serves the model at all."""
        return rows >= eng.tensor_core_decode_rows and self._prefill_kernel_serves(eng)

    def decode_graph_kernels(self, eng: ModelRunner, rows: int) -> tuple[str, ...]:
        """Both kernels for a decode graph of fewer rows than :attr:`ModelRunner.tensor_core_decode_rows`, captured
        on the decode kernel, where :attr:`ModelRunner.tensor_core_decode_context` is set and the prefill kernel
        serves the model (each step then picks one: :meth:`step_kernel`); else ``()``, the one graph. Asked after the
        graph size's first capture; the answer is kept (a prefill plan refused at the second capture takes it back:
        :meth:`plan_decode`)."""
        kinds = self._graph_kernels.get(rows, ())
        if (
            kinds == ("batch_decode",)
            and rows < eng.tensor_core_decode_rows
            and eng.tensor_core_decode_context > 0
            and self._prefill_kernel_serves(eng)
        ):
            kinds = self._graph_kernels[rows] = ("batch_decode", "batch_prefill")
            self._graph_context[rows] = eng.tensor_core_decode_context
            self._context_lens = np.zeros(eng.max_batch, np.int32)  # (step_kernel's scratch: no allocation a step)
        return kinds if len(kinds) > 1 else ()

    def step_kernel(self, eng: ModelRunner, rows: int) -> str:
        """The plan kind of a decode graph's step of ``rows`` rows: at the graph size's first plan (its capture's)
        the prefill kernel where :meth:`tensor_core_decode` says so, else the decode kernel, kept for its later steps;
        where the size was captured on both (:meth:`decode_graph_kernels`), the prefill kernel when the step's longest
        context (from ``decode_arrays``; a padding row's is 1) has :attr:`ModelRunner.tensor_core_decode_context`
        tokens or more, as that setting was at the capture."""
        kinds = self._graph_kernels.get(rows)
        if kinds is None:
            kinds = self._graph_kernels[rows] = (
                ("batch_prefill",) if self.tensor_core_decode(eng, rows) else ("batch_decode",)
            )
        if len(kinds) == 1:
            return kinds[0]
        arrays = eng.decode_arrays
        lens = kv_lengths(arrays["kv_indptr"], arrays["kv_last_page_len"], rows, eng.page_size, self._context_lens)
        return "batch_prefill" if int(lens.max()) >= self._graph_context[rows] else "batch_decode"

    def _decode_queries(self, eng: ModelRunner) -> DecodeQueryOffsets:
        """A decode row's query offsets for the prefill kernel, made at the first such plan (plans are made outside
        any capture)."""
        if self._decode_qo is None:
            self._decode_qo = DecodeQueryOffsets(eng)
        return self._decode_qo

    def decode_attention(self, eng: ModelRunner, i: int, v: SimpleNamespace) -> None:
        plan = eng.decode_plan
        if plan.kind == "batch_prefill":  # (plan_decode: the FA2 prefill kernel, one query a request)
            view = self._decode_queries(eng).view(v.kv_last_page_len.shape[0])
            pdl = eng.prefill_kernel_pdl and eng.dense.launcher.launches_with_pdl
            kernels.prefill_run(
                plan, v.q, eng.k_cache[i], eng.v_cache[i], view, v.kv_indptr, v.kv_indices, v.kv_last_page_len, v.attn,
                eng.stream_ptr, enable_pdl=pdl,
            )  # fmt: skip
            return
        kernels.decode_run(
            eng.decode_plan,
            v.q,
            eng.k_cache[i],
            eng.v_cache[i],
            v.kv_indptr,
            v.kv_indices,
            v.kv_last_page_len,
            v.attn,
            eng.stream_ptr,
        )

    def forward(
        self, eng: ModelRunner, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False
    ) -> None:
        """Embedding to the final RMSNorm for ``rows`` token rows; leaves the normalized hidden states in x.
        ``static_moe``: MoE layers take their fixed-capacity device path (the decode graph's)."""
        c, b, dense, s = eng.config, eng.buffers, eng.dense, eng.stream_ptr
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, eng.gemm_type
        x, qkv, attn, gu, act = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr, b.gu.data.ptr, b.act.data.ptr
        normed = eng.normed.data.ptr  # x, or x2 with the fused all-reduce
        w, hqd, last = eng.qkv_width, c.num_qo_heads * c.head_dim, c.num_layers - 1
        fp8 = eng.kv_fp8
        dense_moe = bool(eng.moe_layers) and eng.dense_moe(rows)  # the MoE path of this step, chosen once
        # LoRA: each projection's GEMM is followed by its rows' adapters (fi_engine.lora.device) where a row of this
        # step takes one (the runner's step_lora), else nothing: a step of base rows launches what an engine without
        # adapters does
        lora = eng.step_lora.apply if eng.step_lora is not None else _no_adapters
        slots = getattr(v, "lora_slots", 0)
        silu = v.prepared.get("silu_and_mul")  # the dense MLP's activation, packed once over these views
        if silu is None and not eng.moe_layers:
            silu = eng.releasing_silu_and_mul(v) or kernels.prepared_silu_and_mul(v.gu, v.act, s)
            v.prepared["silu_and_mul"] = silu
        eng.embed_and_norm(v, rows)
        for i in range(c.num_layers):
            dense.linear(rows, normed, h, eng.wqkv[i], w, h, qkv, w, ab, ab)
            lora("qkv", i, rows, normed, h, qkv, w, slots)
            if c.qk_norm:  # Qwen3: each q and k head normalized before RoPE
                kernels.qk_rmsnorm(v.q, eng.q_norm[i], eps, s)
                kernels.qk_rmsnorm(v.k, eng.k_norm[i], eps, s)
            kernels.rope_inplace(v.q, v.k, v.positions, c.rope, s)
            if fp8 is not None:  # K/V quantized to e4m3 on their way into the cache; the output times v_scale
                fp8.append(v, rows, i)
            else:
                eng.append_kv(v, i)
            attention(i, v)
            if fp8 is not None:
                fp8.scale_output(v, rows)
            dense.linear(rows, attn, hqd, eng.wo[i], h, hqd, x, h, ab, ab)  # a partial sum with TP
            lora("o", i, rows, attn, hqd, x, h, slots)
            eng.add_norm(v, eng.ln2[i])
            if dense_moe:  # every expert, no host step: capturable
                eng.moe_layers[i].forward_dense(eng.normed, b.x, rows)
            elif eng.moe_layers and (static_moe or rows <= eng.max_batch):  # device routing, fixed capacity: capturable
                eng.moe_layers[i].forward_static(eng.normed, b.x, rows)
            elif eng.moe_layers:  # routes on the host: synchronizes the stream (not capturable)
                eng.moe_layers[i].forward(eng.normed, b.x, rows)
            elif eng.step_lora is None:  # the GEMM and its SiLU, or the skinny GEMM's SiLU form where timed faster
                dense.gate_up_silu(rows, normed, h, eng.wgu[i], 2 * inter, h, gu, 2 * inter, act, inter, ab, silu)
                dense.linear(rows, act, inter, eng.wd[i], h, inter, x, h, ab, ab)
            else:  # the adapters add to gu before the activation
                dense.linear(rows, normed, h, eng.wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab)
                lora("gate_up", i, rows, normed, h, gu, 2 * inter, slots)
                silu()
                dense.linear(rows, act, inter, eng.wd[i], h, inter, x, h, ab, ab)
                lora("down", i, rows, act, inter, x, h, slots)
            eng.add_norm(v, eng.ln1[i + 1] if i < last else eng.final_norm)


class LlamaEngine(Engine):
    """A Llama-family checkpoint (:class:`Llama`) on one GPU or ``tensor_parallel`` GPUs; the arguments and serving
    API are :class:`~fi_engine.runtime.engine.Engine`'s, and ``moe_path`` for MoE models (Mixtral, Qwen3-MoE).

    Args:
        moe_path: how the MoE layers run a step of up to ``max_batch`` token rows
            (:class:`~fi_engine.models.moe_paths.MoEPaths`): ``"auto"`` (default): the grouped GEMV (routed on the
            device, each chosen expert's weights read once) for steps of at most
            :attr:`~fi_engine.layers.moe.MoELayer.gemv_tokens` rows whose assignments number at most twice the experts,
            then dense over the experts where :func:`~fi_engine.layers.moe.choose_path` says so (Mixtral's 8 experts,
            top-2: from 9 rows), else routed (the fixed-capacity grouped GEMM); ``"routed"`` or ``"dense"`` force one
            path. Steps of more rows (long prefills) route on the host.
    """

    definition = Llama

    @with_settings
    def __init__(self, model_dir: str | Path, *, moe_path: str = "auto", **settings: Any) -> None:
        super().__init__(model_dir, family=self.definition(moe_path), **settings)


def _no_adapters(*args: Any) -> None:
    """The forward's LoRA step where the engine serves no adapters: nothing."""


def _fp8_projection_sizes(c: LlamaConfig) -> tuple[list[list[tuple[str, int]]], list[tuple[str, int]]]:
    """The projections of config ``c`` that an FP8 checkpoint keeps e4m3, as
    :meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.shard_refusal` takes them: the stacks cut by output rows
    (q, k, v; a dense MLP's gate, up) and those cut by input columns (o; down), with their whole sizes."""
    q, kv = c.num_qo_heads * c.head_dim, c.num_kv_heads * c.head_dim
    stacks = [[("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)]]
    row_parallel = [("self_attn.o_proj", q)]
    if c.moe is None:  # (experts: Fp8Scheme.experts_for)
        stacks.append([("mlp.gate_proj", c.intermediate_size), ("mlp.up_proj", c.intermediate_size)])
        row_parallel.append(("mlp.down_proj", c.intermediate_size))
    return stacks, row_parallel


def load_moe_layer(eng: ModelRunner, ckpt: Checkpoint, p: str, w: WeightLoader, experts: range | None = None) -> Any:
    """Engine ``eng``'s :class:`~fi_engine.layers.moe.MoELayer` of layer prefix ``p``, read and uploaded by ``w``:
    router, experts' gate/up stacked as ``[E, 2I, H]`` (gate rows, then up rows, per expert) and down as
    ``[E, H, I]``, all in the 16-bit type the grouped GEMMs read. Per-expert tensors of an FP8 checkpoint stay
    e4m3 (:func:`_read_fp8_experts`) where the family keeps them so (``experts_stored``), the layer's 16-bit
    weights then being the model's shared copy buffers (``moe_expert_copy``); else they are dequantized by
    :meth:`~fi_engine.models.weights.WeightLoader.linear`. ``experts``: the checkpoint's experts the layer holds
    whole (tensor parallelism split by expert: DeepSeek's ``expert_split="experts"``; the layer's router their rows
    of the router, the routing over every expert the caller's); None: every expert, with TP this rank's share of
    each one's intermediate columns."""
    from ..layers.moe import MoEScratch, MoEWeights
    from ..layers.tensor_parallel import columns, expert_rows, rows

    c = eng.config
    m = c.moe
    assert m is not None
    ids = range(m.num_experts) if experts is None else experts
    e, h, i = len(ids), c.hidden_size, m.intermediate_size  # i: this rank's share with TP split by columns
    max_tokens = max(eng.max_prefill_tokens, eng.max_batch)
    # the Llama pass: the fixed-capacity device path serves every step of at most max_batch rows (each decode step,
    # eager or a graph's replay): no host routing, so no stream synchronization per layer; longer prefills route on
    # the host. Other families (DeepSeek) take it in their decode graph, and with e4m3 experts for every step of at
    # most max_batch rows (their grouped GEMV over the family's own routing: forward_static_routed).
    capacity = eng.max_batch if eng.static_moe or eng.family.llama_pass or eng.family.experts_stored else None
    # the dense-over-experts path's buffers where some step of at most max_batch rows takes it (moe_path_for is
    # monotonic in the rows: dense from some row count up)
    dense_rows = eng.max_batch if eng.dense_moe(eng.max_batch) else None
    if eng.family.moe_scratch is None:  # one set of activation buffers for every MoE layer (they run in turn)
        eng.family.moe_scratch = MoEScratch(
            num_experts=e, hidden=h, intermediate=i, top_k=m.top_k, max_tokens=max_tokens, dtype=eng.dtype,
            capacity=capacity, dense_rows=dense_rows,
        )  # fmt: skip
    # Per-expert tensors (checkpoints on the Hub, transformers 4): Mixtral block_sparse_moe.experts.N.w1 (gate),
    # w3 (up), w2 (down); Qwen3-MoE mlp.experts.N.gate_proj, up_proj, down_proj. Fused tensors (transformers
    # 5 saves these): mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I].
    if c.model_type == "mixtral" and p + "block_sparse_moe.gate.weight" in ckpt:
        base, gate, up, down = p + "block_sparse_moe.", "w1", "w3", "w2"
    elif c.model_type == "mixtral":
        base, gate, up, down = p + "mlp.", "w1", "w3", "w2"
    else:
        base, gate, up, down = p + "mlp.", "gate_proj", "up_proj", "down_proj"
    # With TP (i is this rank's share, full = i * n): every rank keeps the whole router (the ranks route alike)
    # and columns [r * i, (r + 1) * i) of every expert's intermediate size, so its output is a partial sum
    get, linear, upload = w.get, w.linear, w.upload
    # FP8 checkpoints leave the router 16-bit (their ignore lists)
    router = upload(linear(base + "gate", (m.num_experts, h))[ids.start : ids.stop])
    r, n = (eng.rank, eng.tensor_parallel) if experts is None else (0, 1)  # (whole experts: no column cut)
    full = i * n
    fp8_experts = None
    if eng.family.experts_stored and base + "experts.gate_up_proj" not in ckpt:
        fp8_experts = _read_fp8_experts(ckpt, w, base, (gate, up, down), ids, h, i, r, n)
    if fp8_experts is not None:
        if eng.family.moe_expert_copy is None:  # written by each layer before a path that reads 16-bit experts
            storage = w.cp.float16 if eng.dtype == "float16" else w.cp.uint16
            eng.family.moe_expert_copy = (w.cp.empty((e, 2 * i, h), storage), w.cp.empty((e, h, i), storage))
        gate_up, down_w = eng.family.moe_expert_copy
    elif base + "experts.gate_up_proj" in ckpt:
        stacked_gu = get(base + "experts.gate_up_proj", (m.num_experts, 2 * full, h))[ids.start : ids.stop]
        gate_up = upload(expert_rows(stacked_gu, r, n))
        stacked_down = get(base + "experts.down_proj", (m.num_experts, h, full))[ids.start : ids.stop]
        down_w = upload(np.ascontiguousarray(stacked_down[:, :, r * i : (r + 1) * i]))
    else:
        gate_up = upload(
            np.stack(
                [
                    np.concatenate(
                        [
                            rows(linear(f"{base}experts.{x}.{gate}", (full, h)), r, n),
                            rows(linear(f"{base}experts.{x}.{up}", (full, h)), r, n),
                        ]
                    )
                    for x in ids
                ]
            )
        )
        down_w = upload(np.stack([columns(linear(f"{base}experts.{x}.{down}", (h, full)), r, n) for x in ids]))
    return MoELayer(
        MoEWeights(router, gate_up, down_w),
        dtype=eng.dtype,
        top_k=m.top_k,
        renormalize=m.renormalize,
        max_tokens=max_tokens,
        stream=eng.stream,
        dense=eng.dense,
        workspace=eng.moe_workspace,
        capacity=capacity,
        scratch=eng.family.moe_scratch,
        dense_rows=dense_rows,
        fp8_experts=fp8_experts,
    )


def _read_fp8_experts(
    ckpt: Checkpoint,
    w: WeightLoader,
    base: str,
    names: tuple[str, str, str],
    experts: int | range,
    h: int,
    i: int,
    rank: int = 0,
    ranks: int = 1,
) -> Any:
    """The ``experts`` (ids; an int: the first that many) of MoE prefix ``base`` as stored
    (:class:`~fi_engine.kernels.fp8_moe_gemv.Fp8Experts`, uploaded by ``w``): each expert's e4m3 gate and up
    (``names[0]``, ``names[1]``) stacked as ``[2i, h]`` and its down ``[h, i]``, with their scales
    (:func:`~fi_engine.checkpoint.fp8_weights.read_fp8_linear`). With ``ranks`` > 1, ``i`` is this rank's share:
    intermediate rows (gate, up) and columns (down) ``[rank i, (rank + 1) i)`` of every expert. The caller has found
    the shapes fit (:meth:`Fp8Scheme.experts_for <fi_engine.checkpoint.quantization.Fp8Scheme.experts_for>`)."""
    from ..checkpoint.fp8_weights import Fp8Matrix, read_fp8_linear
    from ..kernels.fp8_moe_gemv import Fp8Experts, tiled_layout

    scheme = w.fp8
    assert scheme is not None
    block, full, lo, hi = scheme.block, i * ranks, rank * i, (rank + 1) * i
    gate, up, down = names
    experts = range(experts) if isinstance(experts, int) else experts

    def read(name: str, shape: tuple[int, int]) -> Fp8Matrix:
        return read_fp8_linear(ckpt, scheme, f"{base}experts.{name}", shape)

    gu = [Fp8Matrix.stacked([read(f"{x}.{p}", (full, h)).rows(lo, hi) for p in (gate, up)]) for x in experts]
    dn = [read(f"{x}.{down}", (h, full)).columns(lo, hi) for x in experts]

    # the codes in the order the GEMV's warps load them, where the shapes tile (512-byte runs: measured 5-30 % faster
    # than rows on an H100, benchmarks/RESULTS.md); laid out on the GPU where the loader uploads with CuPy
    tiled = h % 128 == 0 and i % 128 == 0
    xp = w.cp if hasattr(w.cp, "concatenate") else np

    def stacked(mats: list[Any], field: str) -> Any:
        arr = np.stack([getattr(m, field) for m in mats])
        return w.upload(tiled_layout(xp.asarray(arr)) if tiled and field == "weight" else arr)

    gate_up, down = stacked(gu, "weight"), stacked(dn, "weight")
    return Fp8Experts(gate_up, stacked(gu, "scales"), down, stacked(dn, "scales"), block, tiled)
