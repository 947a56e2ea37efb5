"""The engine of every model family: one GPU's (or one tensor-parallel rank's) weights, buffers and stream, made
once in the constructor, serving batches of token-id prompts. Its parts, one concern per module:

- the family's definition (:mod:`~fi_engine.runtime.family`; :class:`~fi_engine.models.llama.Llama`,
  :class:`~fi_engine.models.gemma2.Gemma2`, :class:`~fi_engine.models.gpt_oss.GptOss`,
  :class:`~fi_engine.models.deepseek.DeepSeek`):
  config checks, weights, layer body, attention plans;
- :mod:`~fi_engine.runtime.storage`: the activation buffers, KV cache, step index arrays and the views over them;
- :mod:`~fi_engine.runtime.serving`: the serving loop over its scheduler (``generate``, ``prefill_logits``,
  ``warm_prefill``, and the step API: ``add_request``, ``step``, ``abort_request``, ``has_unfinished``);
- :mod:`~fi_engine.runtime.step_graphs`: the decode CUDA graph and the padded prefill graphs;
- :mod:`~fi_engine.runtime.fused_decode`: the fused eager decode step of the Llama pass;
- :mod:`~fi_engine.runtime.sampling`: the :class:`~fi_engine.runtime.sampling.Sampler` the engine holds
  (``sampler``): greedy, top-k / top-p, each request with its own parameters;
- here: the constructor, the embedding, residual add + norm and LM head every family's pass shares, and teardown.

A family engine (:class:`~fi_engine.models.llama.LlamaEngine`, ``Gemma2Engine``, ``GptOssEngine``, ``DeepSeekEngine``)
is this class with its :attr:`Engine.definition` (and its own constructor arguments, if any).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels
from .family import ModelFamily
from .fused_decode import FusedDecode
from .paging import prefill_buckets
from .sampling import Sampler
from .serving import ServingLoop
from .settings import EngineSettings
from .step_graphs import StepGraphs
from .storage import Storage

__all__: list[str] = []


def _require_gpu(device: int | None) -> None:
    """Raise :class:`~fi_ffi.errors.UnsupportedDeviceError` unless CUDA device ``device`` (None: 0) is usable."""
    from ..kernels.system import UnsupportedDeviceError, gpus

    # (``device`` itself is checked by EngineSettings, made before this is called)
    found, why = gpus()
    if not found:
        raise UnsupportedDeviceError(
            f"the Llama engine needs an NVIDIA GPU and its driver: {why or 'CUDA reports no device'}; run it on a "
            f"machine with one (`fi-ffi doctor` shows what this machine has)"
        )
    if (device or 0) >= len(found):
        raise UnsupportedDeviceError(
            f"device: cuda:{device} does not exist; this machine has {len(found)} GPU(s) (ordinals 0 to "
            f"{len(found) - 1})"
        )


class Engine(ServingLoop, StepGraphs, FusedDecode, Storage):
    """Loads a checkpoint of the family :attr:`definition` onto one GPU (or ``tensor_parallel`` GPUs) and serves
    batches of token-id prompts.

    Args:
        model_dir: a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).
        max_batch: batch slots: requests decoded together (the largest decode CUDA graph's rows).
        page_size: tokens per KV-cache page.
        max_seq_len: the most tokens (prompt + generated) per request; default
            ``min(max_position_embeddings, 4096)``.
        num_pages: KV-cache pages (page 0 is the padding page); default enough for ``max_batch`` requests of
            ``max_seq_len`` tokens.
        max_prefill_tokens: the most prompt tokens prefilled together (sizes the activation buffers); default
            ``max(max_seq_len, max_batch)``.
        cuda_graph: capture the decode step once and replay it.
        device: the CUDA device ordinal (default 0; with tensor parallelism the communicator's).
        tensor_parallel: ranks the model is split over (:mod:`fi_engine.layers.tensor_parallel`): every rank makes
            its engine with the same arguments and makes the same calls (``fi-ffi generate --tp N`` does that).
        comm: the ranks' :class:`~fi_ffi.comm.nccl.Communicator` (default: made from the launcher's variables,
            and closed with the engine).
        fused_allreduce: sum the partial outputs with the fused all-reduce + residual + RMSNorm kernel where it
            applies (False: NCCL's all-reduce, then ``fused_add_rmsnorm``).
        vocab_parallel: with ``tensor_parallel > 1``, each rank keeps ``1/N`` of the embedding and LM head rows
            (:class:`~fi_engine.layers.tensor_parallel.VocabShard`); False: both whole on every rank.
        kv_cache_dtype: ``"auto"`` (or None): the KV cache in the model's dtype; ``"fp8_e4m3"`` (or ``"fp8"``):
            float8 e4m3 with a per-tensor scale, half the bytes per token (:mod:`fi_engine.layers.kv_fp8`: bfloat16
            Llama-family models with head_dim 128; anything else is refused here, naming what is missing).
        kv_cache_scales: with an FP8 cache, ``(k_scale, v_scale)`` (stored = value / scale); None: the
            checkpoint's ``self_attn.k_scale`` / ``v_scale`` tensors (the largest over the layers), else 1.0.

    ``config`` is this rank's shard of the model (heads and MLP columns divided by ``tensor_parallel``),
    ``model_config`` the checkpoint's. ``prefill_graphs`` (default True): a prefill's token rows are padded up to
    a bucket (:attr:`prefill_buckets`) and run as the CUDA graph of that bucket and batch size, captured the first
    time it is met (see :meth:`_prefill_graph`); set it False to always prefill eagerly. A capture that fails
    leaves that shape eager, with a warning and the reason in :attr:`prefill_graph_failures`.
    ``fused_decode`` (default True): an eager decode step of at most 4 rows on one GPU, by the Llama pass
    (``ModelFamily.llama_pass``), runs its RMSNorms, residual adds and SiLU inside the engine's GEMV launches (MoE
    layers: their add + norm as one packed kernel, then their step's packed launches, where the MoE path packs),
    and RoPE and the KV append too where the QKV GEMV's epilogue serves them (head dim 64 to 512, no Qwen3 per-head
    norms between), with every launch but the attention run packed once (:meth:`_fused_step`;
    the same logits as the separate launches); False: the separate launches.
    ``packed_attention`` (default True): the fused step's attention runs packed too (see below).
    """

    definition: type[ModelFamily] = ModelFamily
    """The model family this engine class serves (a subclass sets it; one instance per engine, ``family``)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch: int = 32,
        page_size: int = 16,
        max_seq_len: int | None = None,
        num_pages: int | None = None,
        max_prefill_tokens: int | None = None,
        cuda_graph: bool = False,
        device: int | None = None,
        tensor_parallel: int = 1,
        comm: Any = None,
        fused_allreduce: bool = True,
        vocab_parallel: bool = True,
        kv_cache_dtype: str | None = "auto",
        kv_cache_scales: tuple[float, float] | None = None,
    ) -> None:
        settings = EngineSettings(
            max_batch=max_batch,
            page_size=page_size,
            max_seq_len=max_seq_len,
            num_pages=num_pages,
            max_prefill_tokens=max_prefill_tokens,
            cuda_graph=cuda_graph,
            device=device,
            tensor_parallel=tensor_parallel,
            comm=comm,
            fused_allreduce=fused_allreduce,
            vocab_parallel=vocab_parallel,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_scales=kv_cache_scales,
        )  # every argument checked here, before the checkpoint is read
        self._configure(model_dir, settings)
        _require_gpu(device)  # before CuPy: its CUDARuntimeError would name neither the cause nor the fix
        try:
            import cupy as cp
        except ImportError as exc:
            raise ImportError(
                f"the Llama engine needs CuPy ({exc}); install it with: python -m pip install cupy-cuda13x"
            ) from exc
        self.cupy = cp
        self._connect(settings)
        self._open(model_dir)

    def _configure(self, model_dir: str | Path, settings: EngineSettings) -> None:
        """The host side, before any GPU work: the model's config read and checked against ``settings`` (the
        family's refusals, an FP8 cache's), this rank's shard of it, the sizes resolved, and the engine's state
        before its buffers exist."""
        from ..layers import kv_fp8
        from ..layers.tensor_parallel import shard_config

        self.settings = settings
        self.family = self.definition()
        self.model_config = self.family.read_config(model_dir)
        self.tensor_parallel = settings.tensor_parallel
        self.cuda_graph = settings.cuda_graph
        self.family.check(self, self.model_config)
        # the KV cache's element type: "auto" (the model's) or "fp8_e4m3" (normalized by the settings)
        self.kv_cache_dtype = settings.kv_cache_dtype or "auto"
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
        self.graph: Any = None  # the decode graph of max_batch rows (with cuda_graph), one of `graphs`
        self.graphs: dict[int, Any] = {}  # the decode graphs by their rows (StepGraphs.decode_graph_batches)
        self._graph_plan_infos: dict[int, Any] = {}
        self._graph_batches: tuple[int, ...] = ()  # the rows of `graphs`, ascending (once captured)
        self._graphs_checked: set[int] = set()
        # the MoE layers' grouped-GEMM workspace: made by _load where the model has routed experts (close() frees it)
        self.moe_workspace: Any = None
        self.prefill_graphs = True
        # token-row buckets of the padded prefill graphs (fi_engine.runtime.paging.prefill_buckets says why these)
        self.prefill_buckets = prefill_buckets(self.max_prefill_tokens)
        # an eager decode step of at most 4 rows runs its norms, SiLU, RoPE and KV append inside the GEMVs
        self.fused_decode = True
        # the step API launches each decode step and returns, its tokens coming with the next step() (one GPU;
        # ServingLoop._serve_step): the caller's handling of a step's tokens overlaps the next step on the GPU.
        # Off by default (step() then returns each step's own tokens); the servers turn it on
        # (models.registry.open_engine)
        self.overlap_steps = False
        # the step API's admission waits while others decode, up to this many times the last prefill's time, so a
        # burst of arrivals is prefilled in fewer passes (ServingLoop._admit); 0: admitted at the next step
        self.scheduler_delay_factor = 0.0
        # the step API's prefill passes also decode the active requests (ServingLoop.mixed_prefill); off by default
        # (their riders' logits come from the prefill's kernels); the servers turn it on (models.registry.open_engine)
        self.mixed_prefill = False
        self._prefill_graph_cache: dict[tuple[int, ...], Any] = {}
        # (bucket, request slots) whose capture failed -> why: those prefills stay eager (and unpadded) from then on
        self.prefill_graph_failures: dict[tuple[int, int], str] = {}
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
                from ..kernels.system import Communicator

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
        from ..layers.tensor_parallel import VocabShard

        # this rank's rows of the embedding and the LM head (None: the whole vocabulary)
        self.vocab_shard: VocabShard | None = None
        if self.comm is not None and settings.vocab_parallel:
            self.vocab_shard = VocabShard.of(self.config.vocab_size, self.rank, self.tensor_parallel)

    def _open(self, model_dir: str | Path) -> None:
        """The GPU side, on ``device``: the stream and cuBLAS handles, the weights (``ModelFamily.load``), an FP8
        cache's scales, the all-reduce, the buffers (``ModelFamily.allocate``), the workspaces and, with
        ``cuda_graph``, the decode graphs; on a failure, what it made that no finalizer would release is released
        (and the error raised)."""
        from ..layers import kv_fp8
        from ..layers.tensor_parallel import ResidualAllReduce

        cp, device, cfg = self.cupy, self.device, self.config
        try:
            with cp.cuda.Device(device):
                self.stream = cp.cuda.Stream(non_blocking=True)
                self.stream_ptr = self.stream.ptr
                from ..kernels.dense import Dense

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
                    )
                self.family.allocate(self)
                self.sampler = Sampler.of(self)  # the tokens' choice, over the buffers just made
                # the graph loop plans step N + 1 while the GPU runs step N: on an H100 (8B shape, one GPU) 6.39
                # instead of 6.59 ms per step at batch 1, the same tokens (benchmarks/RESULTS.md); not yet measured
                # with tensor parallelism, so off there
                self._prepare_ahead = self.comm is None and self.family.plans_ahead()
                self.prefill_workspace = kernels.workspace(device)
                self.decode_workspace = kernels.workspace(device)
                # The uploads and zero fills above ran on the legacy stream, which our non-blocking stream does not
                # wait for: finish them once here.
                cp.cuda.Device(device).synchronize()
                self._closed = False
                if self.cuda_graph:
                    try:
                        with self.stream:
                            self._capture()
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

    def embed_and_norm(self, v: SimpleNamespace, rows: int) -> None:
        """The embedding rows of ``v.token_ids`` into the residual stream ``h`` and the first layer's input norm into
        ``x2``; with a vocabulary shard each rank gathers the rows it has (zeros for the rest) into ``x``, and the
        all-reduce sums them into ``h = 0`` as the residual."""
        c, b, dense, s = self.config, self.buffers, self.dense, self.stream_ptr
        h, vs = c.hidden_size, self.vocab_shard
        if vs is None:
            dense.gather_rows(rows, self.embed, h, v.token_ids, b.h.data.ptr, h, h)
            kernels.rmsnorm(v.h, self.ln1[0], v.x2, c.rms_norm_eps, s)
        else:
            dense.gather_rows_shard(rows, self.embed, h, v.token_ids, b.x.data.ptr, h, h, vs.start, vs.valid)
            self.cupy.cuda.runtime.memsetAsync(b.h.data.ptr, 0, rows * h * b.h.itemsize, s)
            self.add_norm(v, self.ln1[0])

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
                call = v.prepared[weight.data_ptr] = kernels.prepared_fused_add_rmsnorm(
                    v.x, v.h, weight, eps, self.stream_ptr
                )
            call()
        else:
            self.allreduce(v.x, v.h, weight, v.x2, eps, self.stream_ptr)

    def _head(self, rows: int, x: int) -> None:
        """The LM head of ``rows`` normalized rows at ``x``: float32 logits into ``logits`` (whole vocabulary) or,
        with a vocabulary shard, this rank's columns into ``head``."""
        h, n = self.config.hidden_size, self.head_rows
        out = self.buffers.logits if self.vocab_shard is None else self.buffers.head
        self.dense.linear(rows, x, h, self.lm_head, n, h, out.data.ptr, n, self.gemm_type, self.gemm_f32)
        self._finish_logits(out.data.ptr, rows, n)  # on the shard's columns too: sampling gathers finished logits

    # ------------------------------------------------------------------------------------------ the family's parts

    def _forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final norm for ``rows`` token rows (``ModelFamily.forward``)."""
        self.family.forward(self, v, rows, attention, static_moe)

    def _decode_attention(self, i: int, v: SimpleNamespace) -> None:
        self.family.decode_attention(self, i, v)

    def _prefill_attention(self, i: int, v: SimpleNamespace) -> None:
        self.family.prefill_attention(self, i, v)

    def _plan_decode(self, rows: int, cuda_graph: bool) -> None:
        self.family.plan_decode(self, rows, cuda_graph)

    def _plan_prefill(self, batch: int) -> None:
        self.family.plan_prefill(self, batch)

    def _plan_prefill_padded(self, batch: int) -> None:
        self.family.plan_prefill_padded(self, batch)

    def _finish_logits(self, logits: int, rows: int, columns: int) -> None:
        self.family.finish_logits(self, logits, rows, columns)

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the graph, workspaces and cuBLAS handle (device arrays go with the engine), then what the family
        made (``ModelFamily.close``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()
        self.family.close(self)

    def _release(self) -> None:
        """The engine's own teardown (:meth:`close`)."""
        if self.comm is not None and self.comm.aborted:
            return  # the peers are gone or going: no synchronization (queued collectives never finish), no teardown
        with self.cupy.cuda.Device(self.device):
            self.stream.synchronize()
            for graph in self.graphs.values():
                graph.close()
            self.graphs.clear()
            self.graph = None
            for graph in self._prefill_graph_cache.values():
                graph.close()
            self._prefill_graph_cache.clear()
            self.prefill_workspace.close()
            self.decode_workspace.close()
            if self.moe_workspace is not None:  # not `if self.moe_layers`: DeepSeek lists None for its dense layers
                self.moe_workspace.close()
            self.dense.close()
            if self.allreduce is not None:
                self.allreduce.close()  # a collective: every rank closes its engine
            if self._own_comm:
                self.comm.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and self.comm is not None and not self._closed and not isinstance(exc, GeneratorExit):
            # With TP an exception on one rank would leave the others waiting in a collective and this rank in
            # close()'s own: tell them (they exit naming this rank; fi_ffi.comm.watchdog) and skip the teardown.
            self.comm.abort(f"{type(exc).__name__}: {exc}")
        self.close()
