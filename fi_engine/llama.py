"""A Llama serving engine without torch: fi_ffi for FlashInfer's ops, cuBLAS (called through cffi) for the GEMMs,
CuPy for device memory and two small kernels.

::

    from fi_engine.llama import LlamaEngine

    with LlamaEngine("/path/to/Llama-3.2-1B", max_batch=8, cuda_graph=True) as engine:
        result = engine.generate([[128000, 791, 6864], [128000, 40]], max_new_tokens=32)
    print(result.tokens, result.tokens_per_s, result.host_us_per_step)

The model (``config.json`` + ``*.safetensors``, float16 or bfloat16): token embedding; per layer RMSNorm,
fused QKV projection, (Qwen3: per-head RMSNorm of q and k,) RoPE (plain or Llama 3.1 scaled) on q and k, K/V
appended to the paged cache, attention (causal batch prefill, or batch decode) with GQA, output projection, fused
residual-add + RMSNorm, fused gate/up projection, SiLU-and-mul, down projection (Mixtral, Qwen3-MoE: the
mixture-of-experts layer of :mod:`fi_engine.moe` instead); final RMSNorm; LM head (tied to the embedding or
not) with float32 logits; greedy argmax or top-k/top-p sampling. Model types: ``llama``, ``qwen3``, ``mixtral``,
``qwen3_moe`` (:mod:`fi_engine.config`). MoE layers route on the host for prefill and eager decode, and take
their fixed-capacity device path in the decode graph.

Serving (:class:`LlamaEngine`): the prompts are queued (:mod:`fi_engine.paging`), admitted into free batch
slots and prefilled together (one ``batch_prefill_paged_plan``, one run per layer); then each decode step makes
one ``batch_decode_plan`` and runs every layer with it, samples one token per request, copies the tokens to the
host and lets finished requests leave (their pages are freed). With ``cuda_graph=True`` the decode step is
captured once at a fixed batch of ``max_batch`` rows (empty slots padded) and every step re-plans
(``enable_cuda_graph=True``), copies the step's index arrays into the graph's buffers and replays it. A prefill
pads its token rows up to a bucket (:func:`~fi_engine.paging.prefill_buckets`; the padding rows are one more
request living on the padding page) and replays that bucket's CUDA graph, captured the first time the bucket and
batch size are met (:meth:`LlamaEngine._prefill_graph`).

Every buffer is allocated once, in :class:`LlamaEngine`'s constructor; the ops write into them (no allocation
per step, which is also what makes the capture valid). All GPU work runs on the engine's own stream.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from fi_ffi import stream_scope

from . import kernels
from .checkpoint import Checkpoint
from .config import FAMILY_ENGINES, LlamaConfig
from .paging import (
    Layout,
    PageAllocator,
    Request,
    Scheduler,
    _ladder,
    bucket_for,
    decode_layout,
    fill_decode,
    fill_prefill,
    pad_prefill,
    pages_for,
    prefill_buckets,
    prefill_layout,
)

__all__ = ["GenerationResult", "LlamaEngine", "SamplingParams", "step_views"]

_H2D, _D2H, _D2D = 1, 2, 3  # cudaMemcpyKind


def _require_gpu(device: int | None) -> None:
    """Raise :class:`~fi_ffi.errors.UnsupportedDeviceError` unless CUDA device ``device`` (None: 0) is usable."""
    from fi_ffi.cuda import gpus
    from fi_ffi.errors import UnsupportedDeviceError

    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
        raise ValueError(f"device: expected a CUDA ordinal (an int >= 0) or None, got {device!r}")
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


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` (default): greedy argmax. Otherwise softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0: all) and the smallest set of
    probability ``top_p``, drawn with a Philox generator seeded with ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature: expected a float >= 0 (0: greedy), got {type(self.temperature).__name__}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature: expected a finite value >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0: no limit), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p: expected a probability in (0, 1], got {type(self.top_p).__name__}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    """Tokens per prompt (in the order given) and timings.

    ``decode_steps``: decode steps run; ``decode_tokens``: tokens they produced; ``decode_s``: their wall time;
    ``step_host_us``: host time of each step (building the index arrays, planning, launching, and handling the
    sampled tokens; the wait for the GPU excluded).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    step_host_us: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens per second of decode-step wall time."""
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def host_us_per_step(self) -> float:
        """Median host time per decode step, in microseconds."""
        return float(np.median(self.step_host_us)) if self.step_host_us else 0.0


class LlamaEngine:
    """Loads a Llama checkpoint onto one GPU and serves batches of token-id prompts.

    Args:
        model_dir: a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).
        max_batch: batch slots: requests decoded together (the CUDA graph's fixed batch).
        page_size: tokens per KV-cache page.
        max_seq_len: the most tokens (prompt + generated) per request; default
            ``min(max_position_embeddings, 4096)``.
        num_pages: KV-cache pages (page 0 is the padding page); default enough for ``max_batch`` requests of
            ``max_seq_len`` tokens.
        max_prefill_tokens: the most prompt tokens prefilled together (sizes the activation buffers); default
            ``max(max_seq_len, max_batch)``.
        cuda_graph: capture the decode step once and replay it.
        device: the CUDA device ordinal (default 0; with tensor parallelism the communicator's).
        tensor_parallel: ranks the model is split over (:mod:`fi_engine.tensor_parallel`): every rank makes
            its engine with the same arguments and makes the same calls (``fi-ffi generate --tp N`` does that).
        comm: the ranks' :class:`~fi_ffi.comm.nccl.Communicator` (default: made from the launcher's variables,
            and closed with the engine).
        fused_allreduce: sum the partial outputs with the fused all-reduce + residual + RMSNorm kernel where it
            applies (False: NCCL's all-reduce, then ``fused_add_rmsnorm``).
        vocab_parallel: with ``tensor_parallel > 1``, each rank keeps ``1/N`` of the embedding and LM head rows
            (:class:`~fi_engine.tensor_parallel.VocabShard`); False: both whole on every rank.

    ``config`` is this rank's shard of the model (heads and MLP columns divided by ``tensor_parallel``),
    ``model_config`` the checkpoint's. ``prefill_graphs`` (default True): a prefill's token rows are padded up to
    a bucket (:attr:`prefill_buckets`) and run as the CUDA graph of that bucket and batch size, captured the first
    time it is met (see :meth:`_prefill_graph`); set it False to always prefill eagerly. A capture that fails
    leaves that shape eager, with a warning and the reason in :attr:`prefill_graph_failures`.
    ``fused_decode`` (default True): an eager decode step of at most 4 rows on one GPU without MoE layers, by this
    class's own forward pass (not a family engine's), runs its RMSNorms, residual adds and SiLU inside the engine's
    GEMV launches, and RoPE and the KV append too where the QKV GEMV's epilogue serves them (head dim 64 to 512,
    no Qwen3 per-head norms between), with every launch but the attention run packed once (:meth:`_fused_step`;
    the same logits as the separate launches); False: the separate launches.
    ``packed_attention`` (default True): the fused step's attention runs packed too (see below).
    """

    packed_attention: bool = True
    """The fused decode step's attention runs packed once per step view (``fi_ffi.prepare_decode_run``), each call
    taking only the step's plan, instead of a ``batch_decode_run`` per layer (the same logits bit for bit:
    tests/engine/test_gpu_fused_decode.py); False: a ``batch_decode_run`` per layer."""

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
    ) -> None:
        from .tensor_parallel import ResidualAllReduce, shard_config

        _check_engine_arguments(cuda_graph, fused_allreduce, vocab_parallel, device, comm)
        self.model_config = self._read_config(model_dir)
        self.tensor_parallel = _positive("tensor_parallel", tensor_parallel)
        self.cuda_graph = cuda_graph
        self._check_family(self.model_config)
        # one GPU: the config as read (a subclass's own config type, e.g. DeepSeek's, is never sharded)
        tp = self.tensor_parallel
        cfg = self.config = self.model_config if tp == 1 else shard_config(self.model_config, tp)
        # MoE layers: host routing (only the chosen experts' weights are read) for prefill and eager decode; the
        # fixed-capacity device path, which a graph can capture, for the decode graph (token counts set on the device)
        self._static_moe = cuda_graph and cfg.moe is not None
        self.max_batch = _positive("max_batch", max_batch)
        self.page_size = _positive("page_size", page_size)
        self.max_seq_len = _positive(
            "max_seq_len", max_seq_len if max_seq_len is not None else min(cfg.max_position_embeddings, 4096)
        )
        per_request = pages_for(self.max_seq_len, self.page_size)
        self.num_pages = _positive(
            "num_pages", num_pages if num_pages is not None else self.max_batch * per_request + 1
        )
        self.max_prefill_tokens = _positive(
            "max_prefill_tokens",
            max_prefill_tokens if max_prefill_tokens is not None else max(self.max_seq_len, self.max_batch),
        )
        self.graph: Any = None
        # the MoE layers' grouped-GEMM workspace: made by _load where the model has routed experts (close() frees it)
        self._ws_moe: Any = None
        self.prefill_graphs = True
        # token-row buckets of the padded prefill graphs (fi_engine.paging.prefill_buckets says why these)
        self.prefill_buckets = prefill_buckets(self.max_prefill_tokens)
        # an eager decode step of at most 4 rows runs its norms, SiLU, RoPE and KV append inside the GEMVs
        self.fused_decode = True
        self._prefill_graph_cache: dict[tuple[int, ...], Any] = {}
        # (bucket, requests) whose capture failed -> why: those prefills stay eager (and unpadded) from then on
        self.prefill_graph_failures: dict[tuple[int, int], str] = {}
        self.comm: Any = None
        self._own_comm = False
        self._allreduce: Any = None
        self._closed = True  # until everything below exists
        _require_gpu(device)  # before CuPy: its CUDARuntimeError would name neither the cause nor the fix
        try:
            import cupy as cp
        except ImportError as exc:
            raise ImportError(
                f"the Llama engine needs CuPy ({exc}); install it with: python -m pip install cupy-cuda13x"
            ) from exc
        self._cp = cp
        if self.tensor_parallel > 1:
            if comm is None:
                from fi_ffi.comm import Communicator

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
        from .tensor_parallel import VocabShard

        # this rank's rows of the embedding and the LM head (None: the whole vocabulary)
        self.vocab_shard: VocabShard | None = None
        if self.comm is not None and vocab_parallel:
            self.vocab_shard = VocabShard.of(cfg.vocab_size, self.rank, self.tensor_parallel)
        # greedy ids need no broadcast from rank 0 when they come from the shards' combined argmax (_share_ids);
        # off until a 2-GPU run has checked the tokens and measured the step (bench_llama_tp.py, variant "bcast"):
        # set to `self.vocab_shard is not None` to try it
        self._ids_agree = False
        try:
            with cp.cuda.Device(device):
                self.stream = cp.cuda.Stream(non_blocking=True)
                self._s = self.stream.ptr
                from .dense import Dense

                self.dense = Dense(self.stream)
                self._load(Checkpoint(model_dir))
                if self.comm is not None:
                    self._allreduce = ResidualAllReduce(
                        self.comm,
                        max(self.max_prefill_tokens, self.max_batch),
                        cfg.hidden_size,
                        self.dtype,
                        fused=fused_allreduce,
                    )
                self._allocate()
                self._ws_prefill = kernels.workspace(device)
                self._ws_decode = kernels.workspace(device)
                # The uploads and zero fills above ran on the legacy stream, which our non-blocking stream does not
                # wait for: finish them once here.
                cp.cuda.Device(device).synchronize()
                self._closed = False
                if cuda_graph:
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

    # ------------------------------------------------------------------------------------------ loading

    @staticmethod
    def _read_config(model_dir: str | Path) -> Any:
        """The checkpoint's config (a hook: another architecture's engine reads its own config class)."""
        return LlamaConfig.from_dir(model_dir)

    def _load(self, ckpt: Checkpoint) -> None:
        from .tensor_parallel import columns, rows

        cp, c = self._cp, self.model_config  # the checkpoint's shapes; this rank keeps its shard
        hq, hk, d, h, inter = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
        r, n = self.rank, self.tensor_parallel
        embed_info = ckpt.info("model.embed_tokens.weight")
        dtype = embed_info.dtype
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(
                f"model: weights are {dtype}; this engine serves float16 or bfloat16 checkpoints "
                f"(save the model in one of them)"
            )
        self.dtype = dtype
        from .dense import data_type

        self._ab = data_type(dtype)
        self._f32 = data_type("float32")
        self._weights: list[Any] = []  # keeps every device array alive

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if ckpt.info(name).dtype != dtype:
                raise ValueError(
                    f"model: tensor {name!r} is {ckpt.info(name).dtype}, the embedding is {dtype}; "
                    f"mixed-precision checkpoints are not supported"
                )
            return ckpt.array(name, shape)

        def upload(arr: np.ndarray) -> Any:
            dev = cp.asarray(np.ascontiguousarray(arr))
            self._weights.append(dev)
            return dev

        def vector(arr: np.ndarray) -> Any:
            dev = upload(arr)
            return kernels.descriptor(dev.data.ptr, (arr.shape[0],), dtype, self.device, owner=dev)

        vs = self.vocab_shard

        def table(name: str) -> np.ndarray:  # the whole [V, H] table, or this rank's rows of it
            whole = get(name, (c.vocab_size, h))
            return whole if vs is None else vs.take(whole)

        self._embed = upload(table("model.embed_tokens.weight")).data.ptr
        self._lm_head = self._embed if c.tie_word_embeddings else upload(table("lm_head.weight")).data.ptr
        self._head_rows = c.vocab_size if vs is None else vs.rows  # the LM head's output columns on this rank
        self._wqkv, self._wo, self._wgu, self._wd, self._ln1, self._ln2 = [], [], [], [], [], []
        self._q_norm: list[Any] = []
        self._k_norm: list[Any] = []
        self._moe: list[Any] = []
        self._moe_scratch: Any = None
        if c.moe is not None:
            self._ws_moe = kernels.workspace(self.device)  # the grouped GEMMs' own (argument arrays, scratch)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self._wqkv.append(
                upload(
                    np.concatenate(
                        [
                            rows(get(p + "self_attn.q_proj.weight", (hq * d, h)), r, n),
                            rows(get(p + "self_attn.k_proj.weight", (hk * d, h)), r, n),
                            rows(get(p + "self_attn.v_proj.weight", (hk * d, h)), r, n),
                        ]
                    )
                ).data.ptr
            )
            self._wo.append(upload(columns(get(p + "self_attn.o_proj.weight", (h, hq * d)), r, n)).data.ptr)
            if c.qk_norm:  # per head_dim: every rank keeps the whole vector
                self._q_norm.append(vector(get(p + "self_attn.q_norm.weight", (d,))))
                self._k_norm.append(vector(get(p + "self_attn.k_norm.weight", (d,))))
            if c.moe is not None:
                self._moe.append(self._moe_layer(ckpt, p, get, upload))
            else:
                self._wgu.append(
                    upload(
                        np.concatenate(
                            [
                                rows(get(p + "mlp.gate_proj.weight", (inter, h)), r, n),
                                rows(get(p + "mlp.up_proj.weight", (inter, h)), r, n),
                            ]
                        )
                    ).data.ptr
                )
                self._wd.append(upload(columns(get(p + "mlp.down_proj.weight", (h, inter)), r, n)).data.ptr)
            self._ln1.append(vector(get(p + "input_layernorm.weight", (h,))))
            self._ln2.append(vector(get(p + "post_attention_layernorm.weight", (h,))))
        self._norm = vector(get("model.norm.weight", (h,)))

    def _moe_layer(self, ckpt: Checkpoint, p: str, get: Any, upload: Any) -> Any:
        """The :class:`~fi_engine.moe.MoELayer` of layer prefix ``p``: router, experts' gate/up stacked as
        ``[E, 2I, H]`` (gate rows, then up rows, per expert) and down as ``[E, H, I]``."""
        from .moe import MoELayer, MoEScratch, MoEWeights
        from .tensor_parallel import columns, expert_rows, rows

        c = self.config
        m = c.moe
        assert m is not None
        e, h, i = m.num_experts, c.hidden_size, m.intermediate_size  # i: this rank's share with TP
        max_tokens = max(self.max_prefill_tokens, self.max_batch)
        capacity = self.max_batch if self._static_moe else None
        if self._moe_scratch is None:  # one set of activation buffers for every MoE layer (they run in turn)
            self._moe_scratch = MoEScratch(
                num_experts=e, hidden=h, intermediate=i, top_k=m.top_k, max_tokens=max_tokens, dtype=self.dtype,
                capacity=capacity,
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
        router = upload(get(base + "gate.weight", (e, h)))
        r, n = self.rank, self.tensor_parallel
        full = i * n
        if base + "experts.gate_up_proj" in ckpt:
            gate_up = upload(expert_rows(get(base + "experts.gate_up_proj", (e, 2 * full, h)), r, n))
            down_w = upload(
                np.ascontiguousarray(get(base + "experts.down_proj", (e, h, full))[:, :, r * i : (r + 1) * i])
            )
        else:
            gate_up = upload(
                np.stack(
                    [
                        np.concatenate(
                            [
                                rows(get(f"{base}experts.{x}.{gate}.weight", (full, h)), r, n),
                                rows(get(f"{base}experts.{x}.{up}.weight", (full, h)), r, n),
                            ]
                        )
                        for x in range(e)
                    ]
                )
            )
            down_w = upload(
                np.stack([columns(get(f"{base}experts.{x}.{down}.weight", (h, full)), r, n) for x in range(e)])
            )
        return MoELayer(
            MoEWeights(router, gate_up, down_w),
            dtype=self.dtype,
            top_k=m.top_k,
            renormalize=m.renormalize,
            max_tokens=max_tokens,
            stream=self.stream,
            dense=self.dense,
            workspace=self._ws_moe,
            capacity=capacity,
            scratch=self._moe_scratch,
        )

    def _allocate(self) -> None:
        from .dense import GEMV_MAX_ROWS

        cp, c = self._cp, self.config
        storage = np.float16 if self.dtype == "float16" else np.uint16
        rows = max(self.max_prefill_tokens, self.max_batch)
        hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self._qkv_width = (hq + 2 * hk) * d
        b = self._buf = SimpleNamespace(
            h=cp.empty((rows, h), storage),
            x=cp.empty((rows, h), storage),
            qkv=cp.empty((rows, self._qkv_width), storage),
            attn=cp.empty((rows, hq * d), storage),
            gu=cp.empty((rows, 2 * c.intermediate_size), storage),
            act=cp.empty((rows, c.intermediate_size), storage),
            last=cp.empty((self.max_batch, h), storage),
            h_alt=cp.empty((GEMV_MAX_ROWS, h), storage),  # the fused step's second residual buffer (_fused_step)
            logits=cp.empty((self.max_batch, c.vocab_size), np.float32),
            ids=cp.empty(self.max_batch, np.int32),
            kv=cp.zeros((c.num_layers, 2, self.num_pages, self.page_size, hk, d), storage),
        )
        self._allocate_attention_caches()
        if self.vocab_shard is not None:
            # this rank's logits columns, and every rank's shard argmax (value bits, index); the whole logits are
            # only gathered (into `logits`) for sampling
            b.head = cp.empty((self.max_batch, self._head_rows), np.float32)
            b.pairs = cp.empty((self.max_batch, 2), np.int32)
            b.pairs_all = cp.empty(self.tensor_parallel * self.max_batch * 2, np.int32)
        # where the normalized rows live: x (normalized in place), or x2 when the fused all-reduce writes them
        if self._allreduce is not None and self._allreduce.fused:
            b.x2 = cp.empty((rows, h), storage)
        self._normed = b.x2 if hasattr(b, "x2") else b.x
        self._allocate_steps()

    def _allocate_attention_caches(self) -> None:
        """Descriptors of each layer's K and V cache in ``_buf.kv``."""
        c, b = self.config, self._buf
        kv_shape = (self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        self._k_cache = [
            kernels.descriptor(b.kv[i, 0].data.ptr, kv_shape, self.dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]
        self._v_cache = [
            kernels.descriptor(b.kv[i, 1].data.ptr, kv_shape, self.dtype, self.device, owner=b.kv)
            for i in range(c.num_layers)
        ]

    def _allocate_steps(self) -> None:
        """The per-step index arrays (host staging and device), the token-id buffers and the sampling state:
        what every architecture's serving loop shares."""
        cp = self._cp
        max_pages = self.num_pages  # every request's pages at once, plus padding rows' page 0
        max_pages += self.max_batch
        self._dlayout = decode_layout(self.max_batch, max_pages)
        # with room for a padded prefill's padding request (the prefill graphs' buckets: paging.pad_prefill)
        self._playout = prefill_layout(self.max_prefill_tokens, self.max_batch, max_pages, padded=True)
        self._dmeta, self._dhost = self._meta(self._dlayout.total)
        self._pmeta, self._phost = self._meta(self._playout.total)
        self._dh = self._dlayout.views(self._dhost)
        self._ph = self._playout.views(self._phost)
        self._ids_mem = cp.cuda.alloc_pinned_memory(4 * self.max_batch)
        self._ids_host = np.frombuffer(self._ids_mem, np.int32, self.max_batch)
        self._views: dict[tuple[Any, ...], SimpleNamespace] = {}
        self._probs: Any = None
        self._gathered: Any = None  # [N, max_batch, V/N] float32, made on the first sampled step (vocabulary shards)
        self._softmax_ws: Any = None
        self._valid: Any = None
        self._gen: Any = None
        self._gen_seed: int | None = None
        # `_prepare_ahead`: the graph loop prepares the next decode step (index arrays copied, attention planned)
        # while the GPU runs this one (_decode_step); `_staged` marks the end of the last copy out of the host
        # staging buffers. Off until measured on GPUs (benchmarks/bench_llama_tp.py, variant "ahead"); only where
        # the decode plan is this class's (its copy is ordered on the engine's stream).
        self._next_rows: list[Request | None] | None = None
        self._staged = cp.cuda.Event(disable_timing=True)
        self._prepare_ahead = False

    def _meta(self, n: int) -> tuple[Any, np.ndarray]:
        """A device int32 buffer of ``n`` entries and its page-locked host staging twin."""
        mem = self._cp.cuda.alloc_pinned_memory(4 * n)
        host = np.frombuffer(mem, np.int32, n)
        host[:] = 0
        self._weights.append(mem)
        return self._cp.zeros(n, np.int32), host

    def _view(self, kind: str, rows: int, batch: int) -> SimpleNamespace:
        """:func:`step_views` over the engine's buffers, made once per shape."""
        key = (kind, rows, batch)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 256:
                self._views.clear()
            b = self._buf
            meta, layout = (self._dmeta, self._dlayout) if kind == "decode" else (self._pmeta, self._playout)
            arrays = {
                "h": b.h,
                "x": b.x,
                "x2": self._normed,
                "qkv": b.qkv,
                "attn": b.attn,
                "gu": b.gu,
                "act": b.act,
                "logits": b.logits,
                "ids": b.ids,
                "meta": meta,
            }
            v = self._views[key] = step_views(
                self.config,
                self.dtype,
                self.device,
                {k: a.data.ptr for k, a in arrays.items()},
                layout,
                kind,
                rows,
                batch,
                arrays,
            )

        return v

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final RMSNorm for ``rows`` token rows; leaves the normalized hidden states in x.
        ``static_moe``: MoE layers take their fixed-capacity device path (the decode graph's)."""
        c, b, dense, s = self.config, self._buf, self.dense, self._s
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, self._ab
        x, qkv, attn, gu, act = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr, b.gu.data.ptr, b.act.data.ptr
        normed = self._normed.data.ptr  # x, or x2 with the fused all-reduce
        w, hqd, last = self._qkv_width, c.num_qo_heads * c.head_dim, c.num_layers - 1
        self._embed_and_norm(v, rows)
        for i in range(c.num_layers):
            dense.linear(rows, normed, h, self._wqkv[i], w, h, qkv, w, ab, ab)
            if c.qk_norm:  # Qwen3: each q and k head normalized before RoPE
                kernels.qk_rmsnorm(v.q, self._q_norm[i], eps, s)
                kernels.qk_rmsnorm(v.k, self._k_norm[i], eps, s)
            kernels.rope_inplace(v.q, v.k, v.positions, c.rope, s)
            kernels.append_kv(
                v.k,
                v.v,
                v.batch_indices,
                v.positions,
                self._k_cache[i],
                self._v_cache[i],
                v.kv_indices,
                v.kv_indptr,
                v.kv_last_page_len,
                s,
            )
            attention(i, v)
            dense.linear(rows, attn, hqd, self._wo[i], h, hqd, x, h, ab, ab)  # a partial sum with TP
            self._add_norm(v, self._ln2[i])
            if self._moe and static_moe:  # device routing, fixed capacity: capturable
                self._moe[i].forward_static(self._normed, b.x, rows)
            elif self._moe:  # routes on the host: synchronizes the stream (not capturable)
                self._moe[i].forward(self._normed, b.x, rows)
            else:
                dense.linear(rows, normed, h, self._wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab)
                kernels.silu_and_mul(v.gu, v.act, s)
                dense.linear(rows, act, inter, self._wd[i], h, inter, x, h, ab, ab)
            self._add_norm(v, self._ln1[i + 1] if i < last else self._norm)

    def _fuses(self, rows: int) -> bool:
        """Whether an eager decode step of ``rows`` rows runs as :meth:`_fused_step`: ``fused_decode`` on, this
        class's own forward pass and head (a family engine's may differ), one GPU (no all-reduce, no vocabulary
        shard), no MoE layer, and the engine's GEMV serving the rows (at most 4; see Dense.fused_fits)."""
        c, cls = self.config, type(self)
        return (
            self.fused_decode
            and cls._forward is LlamaEngine._forward
            and cls._head is LlamaEngine._head
            and cls._decode_attention is LlamaEngine._decode_attention
            and self._allreduce is None
            and self.vocab_shard is None
            and not self._moe
            and self.dense.fused_fits(rows, c.hidden_size)
            and self.dense.fused_fits(rows, c.intermediate_size)
        )

    def _fused_step(self, v: SimpleNamespace, rows: int) -> None:
        """:meth:`_forward` and :meth:`_head` of a decode step in 5 launches per layer instead of 10: the RMSNorms
        and the residual adds run in the prologue of the GEMV that reads their output (``Dense.fused_linear``,
        modes NORM / ADD_NORM), ``silu_and_mul`` in the down GEMV's (SILU), and RoPE with the KV append as the QKV
        GEMV's epilogue (``Dense.prepared_qkv_rope``; where it does not serve the head dim, or Qwen3's per-head
        norms come between, those stay separate launches: 7 per layer, 9 with the norms). Same rounding points as the
        separate launches: the o and down GEMVs write their rounded output into ``x`` as before; the next GEMV
        forms ``s = h + x`` in float32, normalizes ``s`` (not its rounding, as ``fused_add_rmsnorm`` does) and
        stores ``round(s)`` as the new residual. That store goes to the other of two residual buffers (``h``,
        ``h_alt``), since every block of the launch still reads the old one; the final norm is the LM head's
        prologue. Leaves the float32 logits in ``logits``, finished (:meth:`_finish_logits`).

        Every launch but the attention run is packed once per step view (:meth:`_fused_calls`): a step calls
        them in turn, with the attention run (this step's plan) between each layer's two halves. With
        :attr:`packed_attention` the attention runs are packed once per view too (:meth:`_attention_runs`) and each
        call takes only the step's plan."""
        calls = v.prepared.get("fused step")
        if calls is None:
            calls = v.prepared["fused step"] = self._fused_calls(v, rows)
        embed, layers, head = calls
        embed()
        if self.packed_attention:
            plan = self._decode_plan
            for (before, after), run in zip(layers, self._attention_runs(v, plan), strict=True):
                for call in before:
                    call()
                run.run(plan)
                for call in after:
                    call()
        else:
            attention = self._decode_attention
            for i, (before, after) in enumerate(layers):
                for call in before:
                    call()
                attention(i, v)
                for call in after:
                    call()
        head()
        self._finish_logits(self._buf.logits.data.ptr, rows, self._head_rows)

    def _attention_runs(self, v: SimpleNamespace, plan: Any) -> list[Any]:
        """Each layer's decode attention run over view ``v`` packed once (``kernels.prepared_decode_run``), for plans
        of ``plan``'s settings and batch size (its run context, a value): kept in the view's ``prepared`` with that
        context, and packed again only when a plan of another context comes (one entry per view: bounded)."""
        found = v.prepared.get("attention runs")
        if found is None or found[0] != plan._context:
            index = (v.kv_indptr, v.kv_indices, v.kv_last_page_len)
            runs = [
                kernels.prepared_decode_run(plan, v.q, kc, vc, *index, v.attn, self._s)
                for kc, vc in zip(self._k_cache, self._v_cache, strict=True)
            ]
            found = v.prepared["attention runs"] = (plan._context, runs)
        runs_: list[Any] = found[1]
        return runs_

    def _fused_calls(self, v: SimpleNamespace, rows: int) -> tuple[Any, list[tuple[list[Any], list[Any]]], Any]:
        """The packed launches of :meth:`_fused_step` over view ``v`` (``rows`` rows): the embedding gather, per
        layer (the launches before the attention run, those after it), and the LM head. Each is checked when
        packed (pointer rules, alignment); every operand is an engine buffer or weight, which never moves, and the
        result is kept in the view's ``prepared`` (keyed by a value: the view is made once per step shape)."""
        from fi_ffi import prepare, qk_rmsnorm

        from .dense import ADD_NORM, NORM, SILU

        c, b, dense, s = self.config, self._buf, self.dense, self._s
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, self._ab
        x, qkv, attn, gu = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr, b.gu.data.ptr
        w, hqd = self._qkv_width, c.num_qo_heads * c.head_dim
        fused = dense.prepared_fused
        cur, other = b.h.data.ptr, b.h_alt.data.ptr  # the residual stream, and where its next value goes
        embed = dense.prepared_gather(rows, self._embed, h, v.token_ids, cur, h, h)
        # RoPE and the KV append as the QKV GEMV's epilogue, unless Qwen3's per-head norms come between
        in_gemv = not c.qk_norm and dense.has_qkv_rope(ab, c.head_dim)
        layers = []
        for i in range(c.num_layers):
            # i == 0: input_layernorm of the embedding rows (rmsnorm); then h += the previous layer's down output
            # and input_layernorm (fused_add_rmsnorm), the new residual into `other`
            mode, ln, h_out = (NORM, self._ln1[0].data_ptr, 0) if i == 0 else (ADD_NORM, self._ln1[i].data_ptr, other)
            if in_gemv:
                epilogue = self._rope_append(i, v)
                qkv_call = dense.prepared_qkv_rope(
                    mode, rows, x, h, self._wqkv[i], h, qkv, w, ab, cur, h, ln, h_out, eps, epilogue
                )
            else:
                qkv_call = fused(mode, rows, x, h, self._wqkv[i], w, h, qkv, w, ab, ab, cur, h, ln, h_out, eps)
            before = [qkv_call]
            if i:
                cur, other = other, cur
            if not in_gemv:
                if c.qk_norm:  # Qwen3: each q and k head normalized before RoPE (packed as _add_norm packs its norm)
                    before.append(prepare(qk_rmsnorm, v.q, self._q_norm[i], v.q, eps=eps, stream=s))
                    before.append(prepare(qk_rmsnorm, v.k, self._k_norm[i], v.k, eps=eps, stream=s))
                # RoPE and the append as _forward calls them, packed once (fi_ffi.prepare): the step writes its
                # positions and page table into the view's index arrays, which the kernels read at each launch
                before.append(kernels.prepared_rope_inplace(v.q, v.k, v.positions, c.rope, s))
                append = (v.k, v.v, v.batch_indices, v.positions, self._k_cache[i], self._v_cache[i])
                index = (v.kv_indices, v.kv_indptr, v.kv_last_page_len)
                before.append(kernels.prepared_append_kv(*append, *index, s))
            after = [dense.prepared_linear(rows, attn, hqd, self._wo[i], h, hqd, x, h, ab, ab)]
            # h += o's output; post_attention_layernorm; gate/up; then down of silu(gate) * up
            ln = self._ln2[i].data_ptr
            after.append(
                fused(ADD_NORM, rows, x, h, self._wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab, cur, h, ln, other, eps)
            )
            cur, other = other, cur
            after.append(fused(SILU, rows, gu, 2 * inter, self._wd[i], h, inter, x, h, ab, ab))
            layers.append((before, after))
        # h += the last down output; the final norm; the LM head (the new residual is not needed: no h_out)
        n, logits, ln = self._head_rows, b.logits.data.ptr, self._norm.data_ptr
        mode = ADD_NORM if c.num_layers else NORM
        head = fused(mode, rows, x, h, self._lm_head, n, h, logits, n, ab, self._f32, cur, h, ln, 0, eps)
        return embed, layers, head

    def _rope_append(self, i: int, v: SimpleNamespace) -> Any:
        """The RoPE settings, this step's index arrays and layer ``i``'s caches as the QKV GEMV's epilogue takes
        them (``Dense.prepared_qkv_rope``): the values ``kernels.rope_inplace`` and ``append_kv`` pass."""
        from .dense import RopeAppend

        c, r = self.config, self.config.rope
        kc, vc = self._k_cache[i], self._v_cache[i]
        return RopeAppend(
            hq=c.num_qo_heads,
            hk=c.num_kv_heads,
            d=c.head_dim,
            theta=r.theta,
            scale=r.factor if r.llama3 else 1.0,
            llama3=r.llama3,
            low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor,
            old_context_len=r.original_max_position_embeddings,
            positions=v.positions.data_ptr,
            batch_indices=v.batch_indices.data_ptr,
            kv_indptr=v.kv_indptr.data_ptr,
            kv_indices=v.kv_indices.data_ptr,
            k_cache=kc.data_ptr,
            v_cache=vc.data_ptr,
            page_size=kc.shape[1],
            num_pages=kc.shape[0],
            stride_page=kc.strides[0],
            stride_n=kc.strides[1],
            stride_h=kc.strides[2],
        )

    def _embed_and_norm(self, v: SimpleNamespace, rows: int) -> None:
        """The embedding rows of ``v.token_ids`` into the residual stream ``h`` and the first layer's input norm into
        ``x2``; with a vocabulary shard each rank gathers the rows it has (zeros for the rest) into ``x``, and the
        all-reduce sums them into ``h = 0`` as the residual."""
        c, b, dense, s = self.config, self._buf, self.dense, self._s
        h, vs = c.hidden_size, self.vocab_shard
        if vs is None:
            dense.gather_rows(rows, self._embed, h, v.token_ids, b.h.data.ptr, h, h)
            kernels.rmsnorm(v.h, self._ln1[0], v.x2, c.rms_norm_eps, s)
        else:
            dense.gather_rows_shard(rows, self._embed, h, v.token_ids, b.x.data.ptr, h, h, vs.start, vs.valid)
            self._cp.cuda.runtime.memsetAsync(b.h.data.ptr, 0, rows * h * b.h.itemsize, s)
            self._add_norm(v, self._ln1[0])

    def _add_norm(self, v: SimpleNamespace, weight: Any) -> None:
        """``h += x`` (summed over the ranks first with TP); the rows normalized with ``weight`` into ``x2``."""
        eps = self.config.rms_norm_eps
        if self._allreduce is None:  # packed once per view and weight (keyed by its address, a value): one FFI call
            call = v.prepared.get(weight.data_ptr)
            if call is None:
                call = v.prepared[weight.data_ptr] = kernels.prepared_fused_add_rmsnorm(v.x, v.h, weight, eps, self._s)
            call()
        else:
            self._allreduce(v.x, v.h, weight, v.x2, eps, self._s)

    def _decode_attention(self, i: int, v: SimpleNamespace) -> None:
        kernels.decode_run(
            self._decode_plan,
            v.q,
            self._k_cache[i],
            self._v_cache[i],
            v.kv_indptr,
            v.kv_indices,
            v.kv_last_page_len,
            v.attn,
            self._s,
        )

    def _prefill_attention(self, i: int, v: SimpleNamespace) -> None:
        kernels.prefill_run(
            self._prefill_plan,
            v.q,
            self._k_cache[i],
            self._v_cache[i],
            v.qo_indptr,
            v.kv_indptr,
            v.kv_indices,
            v.kv_last_page_len,
            v.attn,
            self._s,
        )

    def _head(self, rows: int, x: int) -> None:
        """The LM head of ``rows`` normalized rows at ``x``: float32 logits into ``logits`` (whole vocabulary) or,
        with a vocabulary shard, this rank's columns into ``head``."""
        h, n = self.config.hidden_size, self._head_rows
        out = self._buf.logits if self.vocab_shard is None else self._buf.head
        self.dense.linear(rows, x, h, self._lm_head, n, h, out.data.ptr, n, self._ab, self._f32)
        self._finish_logits(out.data.ptr, rows, n)  # on the shard's columns too: sampling gathers finished logits

    def _argmax(self, rows: int) -> None:
        """Greedy tokens into ``ids`` from what :meth:`_head` wrote; with a vocabulary shard each rank's argmax
        (value, global id) is all-gathered and combined (the same token on every rank)."""
        b, vs = self._buf, self.vocab_shard
        if vs is None:
            v = self.config.vocab_size
            self.dense.argmax(rows, b.logits.data.ptr, v, v, b.ids.data.ptr)
            return
        self.dense.argmax_shard(rows, b.head.data.ptr, vs.valid, vs.rows, vs.start, b.pairs.data.ptr)
        self.comm.all_gather(b.pairs[:rows], b.pairs_all[: vs.parts * rows * 2], stream=self._s)
        self.dense.combine_argmax(rows, b.pairs_all.data.ptr, vs.parts, b.ids.data.ptr)

    def _gather_logits(self, rows: int) -> None:
        """With a vocabulary shard: every rank's logits columns into the whole ``logits [rows, V]`` (sampling)."""
        vs, b = self.vocab_shard, self._buf
        assert vs is not None
        if self._gathered is None:  # made on the first sampled step, outside any graph capture
            self._gathered = self._cp.empty(vs.parts * self.max_batch * vs.rows, np.float32)
        self.comm.all_gather(b.head[:rows], self._gathered[: vs.parts * rows * vs.rows], stream=self._s)
        v = self.config.vocab_size
        self.dense.unshard_columns(rows, self._gathered.data.ptr, vs.rows, v, b.logits.data.ptr, v)

    def _decode_body(self, v: SimpleNamespace, rows: int) -> None:
        """One decode step on the device: forward, LM head, argmax into ``ids`` (what the graph captures)."""
        self._forward(v, rows, self._decode_attention, static_moe=self._static_moe)
        self._head(rows, self._normed.data.ptr)
        self._argmax(rows)

    def _capture(self) -> None:
        """Warm up one padded decode step eagerly (loads modules, compiles kernels, picks GEMM algorithms),
        then capture the same step into a CUDA graph."""
        # the captured step is GPU-bound: its GEMMs stay cuBLAS's (the GEMV saves host time, which a replay lacks)
        gemv, self.dense.gemv = self.dense.gemv, False
        try:
            self._capture_step()
        finally:
            self.dense.gemv = gemv

    def _capture_step(self) -> None:
        from .graph import CudaGraph

        rows = self.max_batch
        n_pages = fill_decode([None] * rows, self.page_size, self._dh)
        self._upload_decode(rows, n_pages, cuda_graph=True)
        v = self._view("decode", rows, rows)
        self._decode_body(v, rows)
        self.stream.synchronize()
        graph = CudaGraph(self._s)
        # Nothing in the step may allocate: memory handed out during capture would go back to CuPy's pool after
        # it and be reused while every replay still writes to it. The step only uses buffers made in __init__;
        # this allocator turns a regression into an error at capture instead of silent corruption.
        with self._cp.cuda.using_allocator(_refuse_allocation), graph.capture():
            self._decode_body(v, rows)
        self._graph_plan_info = self._decode_plan.info
        self._graph_checked = False
        self.graph = graph

    def _upload_decode(self, rows: int, n_pages: int, cuda_graph: bool) -> None:
        """Copy the step's index arrays to the device and plan the step (``cuda_graph``: a fixed-batch plan for
        the captured graph)."""
        n = self._dlayout.end("kv_indices", n_pages)
        self._cp.cuda.runtime.memcpyAsync(self._dmeta.data.ptr, _address(self._dhost), 4 * n, _H2D, self._s)
        self._plan_decode(rows, cuda_graph)
        self._staged.record(self.stream)  # the host staging (ours and the plan's) may be rewritten after this

    # ------------------------------------------------------------------------------------------ family hooks
    # (fi_engine.gemma2 and fi_engine.gpt_oss subclass the engine and override these)

    def _check_family(self, cfg: LlamaConfig) -> None:
        """Refuse the model types a subclass serves (``fi_engine.engines.engine_class`` picks it). The one hook
        through which every family engine refuses what it cannot serve (tensor parallelism, a CUDA graph, ...),
        called before any GPU work with ``tensor_parallel`` and ``cuda_graph`` already set on the engine; the
        message names the field and the fix."""
        if cfg.family is not None:
            name = FAMILY_ENGINES[cfg.model_type]
            raise ValueError(
                f"model: a {cfg.model_type} checkpoint; load it with fi_engine.{name} (or "
                f"fi_engine.engines.open_engine, which picks the engine from config.json)"
            )

    def _plan_decode(self, rows: int, cuda_graph: bool) -> None:
        """Plan a decode step of ``rows`` rows whose index arrays are in ``self._dh``."""
        c = self.config
        self._decode_plan = kernels.decode_plan(
            self._ws_decode,
            self._dh["kv_indptr"][: rows + 1],
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            self.page_size,
            self.dtype,
            cuda_graph,
            self._s,
        )

    def _finish_logits(self, logits: int, rows: int, columns: int) -> None:
        """Post-process float32 logits ``[rows, columns]`` at ``logits`` in place: the whole vocabulary, or this
        rank's columns of it with a vocabulary shard (so the transform is elementwise; Gemma 2: the final soft
        cap)."""

    # ------------------------------------------------------------------------------------------ serving

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        eos_token_ids: Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationResult:
        """Generate tokens for each prompt (lists of token ids) until an end-of-sequence token (kept in the
        output) or ``max_new_tokens`` (one value, or one per prompt).

        ``eos_token_ids``: default the checkpoint's ``eos_token_id``; ``()`` to always run to
        ``max_new_tokens``. Returns the tokens in prompt order, with timings. Sampled generation starts a new
        Philox stream from ``sampling.seed`` (offset 0) on every call, so the same call reproduces its tokens.
        """
        self._check_open()
        sampling = sampling or SamplingParams()
        self._gen = None  # a fresh generator per call (seed, offset 0): reproducible generations
        self._next_rows = None
        sched = self._scheduler(eos_token_ids)
        reqs = self._submit(sched, prompts, max_new_tokens)
        result = GenerationResult([], [])
        cp = self._cp
        # TVM-FFI's current stream is the engine's for the whole call: every op is given that stream, and finds it
        # current already (one query instead of a set and a restore around each of the ~10 kernels per layer)
        with cp.cuda.Device(self.device), self.stream, stream_scope(self._s, self.device):
            try:
                while sched.has_work:
                    admitted = sched.admit()
                    if admitted:
                        t = time.perf_counter()
                        self._prefill(sched, admitted, sampling)
                        result.prefill_s += time.perf_counter() - t
                    if sched.active:
                        t = time.perf_counter()
                        result.step_host_us.append(self._decode_step(sched, sampling))
                        result.decode_s += time.perf_counter() - t
                        result.decode_steps += 1
            finally:
                self.stream.synchronize()
        result.tokens = [list(r.output) for r in reqs]
        result.finish_reasons = [r.finish_reason or "" for r in reqs]
        result.decode_tokens = sum(len(r.output) - 1 for r in reqs)
        return result

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits ``[len(prompt), vocab]`` of every position of every prompt (a check against a
        reference implementation; the prompts are prefilled in batches, then their pages freed)."""
        self._check_open()
        sched = self._scheduler(())
        reqs = self._submit(sched, prompts, 1)
        out: dict[int, np.ndarray] = {}
        with self._cp.cuda.Device(self.device), self.stream, stream_scope(self._s, self.device):
            while sched.has_work:
                admitted = sched.admit()
                for r, logits in zip(
                    admitted, self._prefill(sched, admitted, SamplingParams(), all_logits=True), strict=True
                ):
                    out[r.rid] = logits
        return [out[r.rid] for r in reqs]

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """The token-row buckets a prefill is padded up to for its CUDA graph, ascending; by default
        :func:`~fi_engine.paging.prefill_buckets` of ``max_prefill_tokens`` (which says why those). Settable
        to another ladder: a non-empty, strictly ascending sequence of ints ending at ``max_prefill_tokens`` (each
        prefill needs a bucket, and none may pad past the buffers' rows); TypeError/ValueError naming
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
        """Whether an eager decode step runs as :meth:`_fused_step` where it applies (see the class docstring;
        default True). Settable to a bool (TypeError naming ``fused_decode`` otherwise: a string would be true)."""
        return self._fused_decode

    @fused_decode.setter
    def fused_decode(self, on: bool) -> None:
        from .values import flag

        self._fused_decode = flag("fused_decode", on)

    def warm_prefill(self, lengths: Sequence[int], batch: int = 1) -> list[tuple[int, int]]:
        """Capture, before serving, the prefill graphs that prefills of ``lengths`` token rows in all, of ``batch``
        requests each, will replay, so that no request pays a capture (a bucket met the first time costs about
        one eager prefill more than a replay; README, Performance). Each length runs one prefill of ``batch``
        dummy prompts (token 0, ``lengths[i]`` tokens together) with one new token and frees their pages; lengths
        of one bucket capture it once. Nothing is captured where prefill graphs do not apply (``prefill_graphs =
        False``, MoE layers, tensor parallelism, the subclass engines) or a capture fails (a warning says so).

        Args:
            lengths: token rows per prefill, each in ``[batch, max_prefill_tokens]``, at most
                ``batch * (max_seq_len - 1)`` (each dummy prompt leaves room for its token), and with pages for
                all ``batch`` prompts at once in the KV cache (``num_pages - 1``).
            batch: requests per prefill, in ``[1, max_batch]``.

        Returns:
            the ``(bucket rows, requests)`` of every prefill graph the engine now holds, in replay order.
        """
        self._check_open()
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch: expected requests per prefill in [1, {self.max_batch}], got {batch!r:.40}")
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
            raise ValueError(f"lengths: expected a non-empty list of token-row counts, got {lengths!r:.60}")
        top = min(self.max_prefill_tokens, batch * (self.max_seq_len - 1))
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or not batch <= n <= top:
                raise ValueError(
                    f"lengths[{i}]: expected token rows in [{batch}, {top}] (at least one per request; at most "
                    f"max_prefill_tokens, and max_seq_len - 1 per request), got {n!r:.40}"
                )
        runs = []
        for i, n in enumerate(lengths):
            prompts = [[0] * (n // batch + (1 if r < n % batch else 0)) for r in range(batch)]
            # the scheduler admits the batch together only if the KV cache holds it (page 0 is the padding
            # page); short of pages it would prefill fewer requests at a time and capture another shape
            need = sum(pages_for(len(p), self.page_size) for p in prompts)
            if need > self.num_pages - 1:
                raise ValueError(
                    f"lengths[{i}]: {n} token rows of {batch} requests need {need} KV pages, the cache has "
                    f"{self.num_pages - 1} (they would not be prefilled together)"
                )
            runs.append(prompts)
        for prompts in runs:
            self.generate(prompts, 1, eos_token_ids=())
        return [(int(key[0]), int(key[1])) for key in self._prefill_graph_cache]

    def _scheduler(self, eos_token_ids: Sequence[int] | None) -> Scheduler:
        eos = self.config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return Scheduler(
            PageAllocator(self.num_pages),
            self.page_size,
            self.max_batch,
            self.max_seq_len,
            self.max_prefill_tokens,
            self.config.vocab_size,
            eos,
        )

    @staticmethod
    def _submit(
        sched: Scheduler, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]
    ) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts: expected a non-empty list of prompts (lists of token ids)")
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(
                    f"max_new_tokens: expected one value per prompt ({len(prompts)}), got {len(max_new_tokens)}"
                )
            limits = list(max_new_tokens)
        else:
            limits = [max_new_tokens] * len(prompts)
        return [sched.submit(p, m, name=f"prompts[{i}]") for i, (p, m) in enumerate(zip(prompts, limits, strict=True))]

    def _prefill(
        self, sched: Scheduler, reqs: list[Request], sampling: SamplingParams, all_logits: bool = False
    ) -> list[np.ndarray]:
        cp, c, b, s = self._cp, self.config, self._buf, self._s
        batch = len(reqs)
        self._next_rows = None  # the prefill's tokens overwrite `ids`: a step prepared before it cannot run
        ph = self._ph
        nnz, n_pages = fill_prefill(reqs, self.page_size, ph)
        bucket = self._prefill_bucket(nnz, batch)
        if bucket is not None:  # the padding request fills the rows up to the bucket (paging.pad_prefill)
            n_pages = pad_prefill(ph, nnz, bucket, batch, n_pages, self.page_size)
        n = self._playout.end("kv_indices", n_pages)
        cp.cuda.runtime.memcpyAsync(self._pmeta.data.ptr, _address(self._phost), 4 * n, _H2D, s)
        v = self._view("prefill", nnz, batch)  # the real rows and requests: the last-row gather, head, sampling
        if bucket is None or not self._prefill_padded(nnz, batch, bucket):
            self._plan_prefill(batch)
            self._forward(v, nnz, self._prefill_attention)
        full = None
        if all_logits:  # a check, not serving: allocated here
            hr = self._head_rows
            part = cp.empty((nnz, hr), np.float32)
            self.dense.linear(
                nnz, self._normed.data.ptr, c.hidden_size, self._lm_head, hr, c.hidden_size, part.data.ptr, hr,
                self._ab, self._f32,
            )  # fmt: skip
            full = part
            self._finish_logits(part.data.ptr, nnz, hr)
            if self.vocab_shard is not None:  # every rank's columns, then [nnz, V] on the host
                full = cp.empty((self.tensor_parallel, nnz, hr), np.float32)
                self.comm.all_gather(part, full, stream=s)
        h = c.hidden_size
        self.dense.gather_rows(batch, self._normed.data.ptr, h, v.last_rows, b.last.data.ptr, h, h)
        self._head(batch, b.last.data.ptr)
        self._pick(v, batch, sampling)
        tokens = self._fetch_ids(batch, sampling)
        sched.record(reqs, tokens, prefill=True)
        if full is None:
            return []
        host = full.get(stream=self.stream)
        if host.ndim == 3:  # [ranks, nnz, V/N]: the columns side by side, the padding dropped
            host = np.concatenate(list(host), axis=1)[:, : c.vocab_size]
        bounds = ph["qo_indptr"][: batch + 1].tolist()
        return [host[bounds[i] : bounds[i + 1]] for i in range(batch)]

    def _prefill_bucket(self, nnz: int, batch: int) -> int | None:
        """The token rows a prefill of ``nnz`` rows and ``batch`` requests is padded to, to run as that bucket's
        CUDA graph (:meth:`_prefill_graph`); None: it runs eagerly, unpadded. Eager for MoE layers (host routing
        synchronizes), tensor parallelism, the engines that override the pass, ``prefill_graphs = False``, and a
        shape whose capture failed before (:attr:`prefill_graph_failures`)."""
        if not self.prefill_graphs or self._moe or self.comm is not None or not _plain_forward(self):
            return None
        bucket = bucket_for(nnz, self.prefill_buckets)
        return None if (bucket, batch) in self.prefill_graph_failures else bucket

    def _prefill_padded(self, nnz: int, batch: int, bucket: int) -> bool:
        """The forward pass of a prefill padded to ``bucket`` rows (the index arrays on the device), as that bucket's
        graph, or eagerly if its capture fails; False when its CUDA-graph plan fails (e.g. FA2's split-KV scratch
        for a long bucket exceeds the workspace): recorded, and the caller runs the prefill eagerly, unpadded (the
        padded arrays begin with the unpadded ones, so the copy already made serves it)."""
        try:
            self._plan_prefill_padded(batch + 1)
        except Exception as exc:
            self._prefill_graph_failed(bucket, batch, "planning", exc)
            return False
        padded = self._view("padded prefill", bucket, batch + 1)
        if not self._prefill_graph(padded, bucket, batch):
            self._forward(padded, bucket, self._prefill_attention)  # the capture failed: the same pass, eagerly
        return True

    def _prefill_graph_failed(self, rows: int, batch: int, stage: str, exc: Exception) -> None:
        """Record why the prefill graph of ``rows`` rows and ``batch`` requests failed (that shape is eager from
        now on: :meth:`_prefill_bucket`), and warn once."""
        why = f"{stage}: {type(exc).__name__}: {exc}"[:500]
        self.prefill_graph_failures[(rows, batch)] = why
        warnings.warn(
            f"LlamaEngine: the prefill graph of {rows} token rows and {batch} requests failed ({why}); prefills of "
            f"that shape run eagerly from now on (engine.prefill_graph_failures)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _prefill_graph(self, v: SimpleNamespace, rows: int, batch: int) -> bool:
        """Run the padded prefill pass (``rows``: the bucket's token rows, ``v`` its views; ``batch`` real requests
        plus the padding request) as a CUDA graph, captured the first time its shape is met; False: the capture
        failed and the caller runs the same pass eagerly.

        Issuing ~10 launches per layer costs more host time than a small model's GPU takes for them, so an eager
        prefill is host-bound even at thousands of tokens. The graph's shape is the bucket, the batch size and
        the plan's schedule vector: a CUDA-graph plan (``enable_cuda_graph=True``) fixes every workspace offset
        and grid from ``qo_indptr[-1]`` (the bucket) and the batch size alone, and each prefill's plan copies its
        own schedule to those offsets before the replay; every buffer the pass touches was allocated in the
        constructor. A bucket, unlike an exact length, is met again, so it is captured on its first sight.
        At most :data:`_PREFILL_GRAPHS` are kept, the least recently replayed evicted first.
        """
        cache = self._prefill_graph_cache
        key = (rows, batch, *self._prefill_plan.info)
        graph = cache.pop(key, None)
        if graph is None:
            graph = self._capture_prefill(v, rows, batch)
            if graph is None:
                return False
        cache[key] = graph  # (re)inserted last: the dict's order is the replay order, oldest first
        graph.launch()
        return True

    def _capture_prefill(self, v: SimpleNamespace, rows: int, batch: int) -> Any:
        """Capture the padded prefill pass into a new graph (not run yet); None, with a warning and the reason in
        :attr:`prefill_graph_failures`, when the capture fails: the graph is closed and the stream left out of
        capture mode (:meth:`CudaGraph.capture`), so the caller can run the pass eagerly."""
        from .graph import CudaGraph

        cache = self._prefill_graph_cache
        if len(cache) >= _PREFILL_GRAPHS:  # the least recently replayed goes, after its last replay
            self.stream.synchronize()
            cache.pop(next(iter(cache))).close()
        graph = CudaGraph(self._s)
        try:
            with self._cp.cuda.using_allocator(_refuse_allocation), graph.capture():
                self._forward(v, rows, self._prefill_attention)
        except Exception as exc:  # e.g. a launch refused in capture, an allocation, instantiation refused
            graph.close()
            self._prefill_graph_failed(rows, batch, "capture", exc)
            return None
        except BaseException:  # interrupted: nothing else holds the graph
            graph.close()
            raise
        return graph

    def _plan_prefill_padded(self, batch: int) -> None:
        """Plan the padded prefill of ``batch`` requests (the padding request included) for a CUDA graph: the
        schedule's layout then depends only on the bucket and ``batch`` (FlashInfer's ``enable_cuda_graph``)."""
        self._plan_own_prefill(batch, cuda_graph=True)

    def _plan_prefill(self, batch: int) -> None:
        """Plan the prefill attention of ``batch`` requests from the host index arrays (a hook)."""
        self._plan_own_prefill(batch, cuda_graph=False)

    def _plan_own_prefill(self, batch: int, cuda_graph: bool) -> None:
        """This class's prefill plan of ``batch`` requests into ``_prefill_plan`` (``cuda_graph``: see
        :func:`~fi_engine.kernels.prefill_plan`); the one body of the two methods above, which a family
        engine's own ``_plan_prefill`` does not call."""
        c, ph = self.config, self._ph
        self._prefill_plan = kernels.prefill_plan(
            self._ws_prefill,
            ph["qo_indptr"][: batch + 1],
            ph["kv_indptr"][: batch + 1],
            ph["kv_last_page_len"][:batch],
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            self.page_size,
            self.dtype,
            self._s,
            cuda_graph=cuda_graph,
        )

    def _pick(self, v: SimpleNamespace, rows: int, sampling: SamplingParams) -> None:
        """Choose each row's token into ``ids`` from ``logits`` (greedy: argmax)."""
        if sampling.greedy:
            self._argmax(rows)
            return
        if self.vocab_shard is not None:
            self._gather_logits(rows)
        if self._probs is None:  # made on the first sampled (non-greedy) step, outside any graph capture
            self._probs = self._cp.empty((self.max_batch, self.config.vocab_size), np.float32)
            nbytes = kernels.softmax_workspace_bytes(self.max_batch, self.config.vocab_size)
            self._softmax_ws = self._cp.empty((nbytes,), np.uint8)
            self._valid = self._cp.empty((self.max_batch,), np.bool_) if kernels.sampling_needs_valid() else None
        if self._gen is None or self._gen_seed != sampling.seed:
            self._gen, self._gen_seed = kernels.generator(sampling.seed), sampling.seed
        probs = kernels.descriptor(
            self._probs.data.ptr, (rows, self.config.vocab_size), "float32", self.device, owner=self._probs
        )
        top_k = sampling.top_k if sampling.top_k > 0 else self.config.vocab_size
        workspace = kernels.descriptor(
            self._softmax_ws.data.ptr, self._softmax_ws.shape, "uint8", self.device, owner=self._softmax_ws
        )
        valid = (
            None
            if self._valid is None
            else kernels.descriptor(self._valid.data.ptr, (rows,), "bool", self.device, owner=self._valid)
        )
        kernels.sample_top_k_top_p(
            v.logits,
            probs,
            workspace,
            v.ids,
            top_k,
            float(sampling.top_p),
            float(sampling.temperature),
            self._gen,
            self._s,
            valid,
        )

    def _share_ids(self, sampling: SamplingParams) -> None:
        """With TP: every rank takes rank 0's tokens (they compute the same ones; this makes it certain). Not
        needed for greedy tokens from vocabulary shards: every rank combines the same all-gathered (value, id)
        pairs with the same kernel, so the ids agree bit for bit without a collective (one NCCL call and its
        host time saved per step)."""
        if self.comm is not None and not (sampling.greedy and self._ids_agree):
            self.comm.broadcast(self._buf.ids, root=0, stream=self._s)

    def _fetch_ids(self, rows: int, sampling: SamplingParams) -> list[int]:
        """Copy the chosen tokens to the host and wait for the stream (the one synchronization per step)."""
        self._share_ids(sampling)
        self._cp.cuda.runtime.memcpyAsync(_address(self._ids_host), self._buf.ids.data.ptr, 4 * rows, _D2H, self._s)
        self.stream.synchronize()
        return self._ids_host[:rows].tolist()

    def _decode_step(self, sched: Scheduler, sampling: SamplingParams) -> float:
        """One decode step for every active request; returns its host time in microseconds (with a graph, the
        next step's preparation included, which runs while the GPU computes this step)."""
        t0 = time.perf_counter()
        graph = self.graph
        prepared, self._next_rows = self._next_rows, None
        if prepared is not None and sched.same_rows(prepared):
            # prepared during the previous step (index arrays and plan enqueued behind it); its input tokens are
            # that step's output, still in `ids` in slot order: copied on the device
            rows = prepared
            n = len(rows)
            token_ids = self._dmeta.data.ptr + 4 * self._dlayout.offsets["token_ids"]
            self._cp.cuda.runtime.memcpyAsync(token_ids, self._buf.ids.data.ptr, 4 * n, _D2D, self._s)
        else:
            rows = sched.decode_rows(padded=graph is not None)
            n = len(rows)
            self._upload_decode(n, fill_decode(rows, self.page_size, self._dh), cuda_graph=graph is not None)
        v = self._view("decode", n, n)
        if graph is not None:
            if not self._graph_checked:
                # FlashInfer keeps a CUDA-graph schedule's layout fixed for a fixed batch; the graph relies on it.
                if self._decode_plan.info != self._graph_plan_info:
                    raise RuntimeError(
                        "a CUDA-graph decode plan changed its schedule layout; the captured graph cannot replay it"
                    )
                self._graph_checked = True
            graph.launch()
            if not sampling.greedy:
                self._pick(v, n, sampling)
        else:
            if self._fuses(n):
                self._fused_step(v, n)
            else:
                self._forward(v, n, self._decode_attention)
                self._head(n, self._normed.data.ptr)
            self._pick(v, n, sampling)
        self._share_ids(sampling)
        self._cp.cuda.runtime.memcpyAsync(_address(self._ids_host), self._buf.ids.data.ptr, 4 * n, _D2H, self._s)
        if graph is not None and self._prepare_ahead:
            # the next step, as it will be unless a request ends with an end-of-sequence token or a prefill comes
            # first (then it is dropped and made again): staged and planned while the GPU runs this one
            self._staged.synchronize()  # this step's copies out of the staging buffers are done
            ahead = sched.peek_rows()
            self._upload_decode(n, fill_decode(ahead, self.page_size, self._dh, ahead=1), cuda_graph=True)
            self._next_rows = ahead
        t2 = time.perf_counter()
        self.stream.synchronize()
        t3 = time.perf_counter()
        sched.record(rows, self._ids_host[:n].tolist())
        return ((t2 - t0) + (time.perf_counter() - t3)) * 1e6

    # ------------------------------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")

    def close(self) -> None:
        """Free the graph, workspaces and cuBLAS handle (device arrays go with the engine). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.comm is not None and self.comm.aborted:
            return  # the peers are gone or going: no synchronization (queued collectives never finish), no teardown
        with self._cp.cuda.Device(self.device):
            self.stream.synchronize()
            if self.graph is not None:
                self.graph.close()
            for graph in self._prefill_graph_cache.values():
                graph.close()
            self._prefill_graph_cache.clear()
            self._ws_prefill.close()
            self._ws_decode.close()
            if self._ws_moe is not None:  # not `if self._moe`: DeepSeek lists None for its dense layers
                self._ws_moe.close()
            self.dense.close()
            if self._allreduce is not None:
                self._allreduce.close()  # a collective: every rank closes its engine
            if self._own_comm:
                self.comm.close()

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and self.comm is not None and not self._closed and not isinstance(exc, GeneratorExit):
            # With TP an exception on one rank would leave the others waiting in a collective and this rank in
            # close()'s own: tell them (they exit naming this rank; fi_ffi.comm.watchdog) and skip the teardown.
            self.comm.abort(f"{type(exc).__name__}: {exc}")
        self.close()


def step_views(
    c: LlamaConfig,
    dtype: str,
    device: int,
    base: dict[str, int],
    layout: Layout,
    kind: str,
    rows: int,
    batch: int,
    owners: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """Descriptors of one forward pass's operands: the first ``rows`` token rows of the activation buffers
    (``base``: their device addresses, plus ``meta``, the index arrays laid out by ``layout``) and the index
    arrays of a ``batch``-request step (``kind``: "decode", "prefill", or "padded prefill": a prefill whose last
    request is the padding request of :func:`~fi_engine.paging.pad_prefill`, so ``logits`` and ``ids``, which
    hold one row per real request, cover ``batch - 1`` rows).

    q, k and v are strided views into the fused QKV rows ``[rows, (Hq + 2 Hk) * D]`` (no copy); the int32 index
    arrays are regions of ``meta``; ``token_ids`` and ``last_rows`` are raw addresses (read by the gather kernel).
    """
    own = owners or {}
    hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    w = (hq + 2 * hk) * d
    item = 2  # float16 / bfloat16
    qkv, meta = base["qkv"], base["meta"]

    def t(
        name: str,
        shape: tuple[int, ...],
        dt: str = dtype,
        at: int | None = None,
        strides: tuple[int, ...] | None = None,
    ) -> Any:
        return kernels.descriptor(base[name] if at is None else at, shape, dt, device, strides, owner=own.get(name))

    def region(name: str, n: int) -> Any:
        return t("meta", (n,), "int32", meta + 4 * layout.offsets[name])

    # rows of logits and tokens: one per real request (the buffers hold max_batch; the padding request has none)
    chosen = batch - 1 if kind == "padded prefill" else batch

    v = SimpleNamespace(
        h=t("h", (rows, h)),
        x=t("x", (rows, h)),
        x2=t("x2" if "x2" in base else "x", (rows, h)),  # the normalized rows (x itself without a fused all-reduce)
        q=t("qkv", (rows, hq, d), strides=(w, d, 1)),
        k=t("qkv", (rows, hk, d), at=qkv + item * hq * d, strides=(w, d, 1)),
        v=t("qkv", (rows, hk, d), at=qkv + item * (hq + hk) * d, strides=(w, d, 1)),
        attn=t("attn", (rows, hq, d)),
        gu=t("gu", (rows, 2 * c.intermediate_size)),
        act=t("act", (rows, c.intermediate_size)),
        token_ids=meta + 4 * layout.offsets["token_ids"],
        positions=region("positions", rows),
        batch_indices=region("batch_indices", rows),
        kv_indptr=region("kv_indptr", batch + 1),
        kv_last_page_len=region("kv_last_page_len", batch),
        kv_indices=region("kv_indices", layout.sizes["kv_indices"]),
        logits=t("logits", (chosen, c.vocab_size), "float32"),
        ids=t("ids", (chosen,), "int32"),
        prepared={},  # the engine's launches packed once over these views (a kind, or a weight's address -> call)
    )
    if kind in ("prefill", "padded prefill"):
        v.qo_indptr = region("qo_indptr", batch + 1)
        v.last_rows = meta + 4 * layout.offsets["last_rows"]
    return v


# Padded prefill graphs kept per engine. Each is ~10 kernel nodes per layer (a few hundred KB of host and device
# memory for a 30-layer model), and a shape evicted costs one capture (about an eager prefill) when met again. 16
# hold e.g. every quarter-octave bucket from 256 to 2048 rows at one batch size, or the buckets a serving mix
# of a few prompt-length ranges and batch sizes meets; the key grows with (bucket, batch) pairs, so some bound is
# needed.
_PREFILL_GRAPHS = 16


def _plain_forward(engine: LlamaEngine) -> bool:
    """Whether ``engine`` runs LlamaEngine's own forward pass and prefill attention (a subclass's may do host work
    between launches, which a graph would not repeat)."""
    cls = type(engine)
    return (
        cls._forward is LlamaEngine._forward
        and cls._prefill_attention is LlamaEngine._prefill_attention
        and cls._plan_prefill is LlamaEngine._plan_prefill
    )


def _address(host: np.ndarray) -> int:
    """The address of ``host``'s first element (numpy's array interface)."""
    return int(host.__array_interface__["data"][0])


def _refuse_allocation(size: int) -> Any:
    """A CuPy allocator that refuses: installed while the decode step is captured."""
    raise RuntimeError(
        f"the decode step asked CuPy for {size} bytes of device memory while being captured as a "
        f"CUDA graph; allocate every buffer it uses in LlamaEngine.__init__ instead"
    )


def _positive(name: str, value: Any) -> int:
    """A size the engine allocates by (tokens, pages, rows): an int in ``[1, 2**31)`` (the kernels' int32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 31:
        shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) and value >= 1 << 31 else value
        raise ValueError(f"{name}: expected a positive integer below 2**31 (an int32 size), got {shown!r:.60}")
    return value


def _check_engine_arguments(cuda_graph: Any, fused_allreduce: Any, vocab_parallel: Any, device: Any, comm: Any) -> None:
    """The constructor's flags are bools, ``device`` None or a CUDA ordinal, ``comm`` None or a communicator (before
    any of them is used: a truthy string would otherwise switch a path on)."""
    for name, value in (
        ("cuda_graph", cuda_graph),
        ("fused_allreduce", fused_allreduce),
        ("vocab_parallel", vocab_parallel),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r:.40}")
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < 1 << 16):
        raise ValueError(f"device: expected None or a CUDA device ordinal (an int >= 0), got {str(device)[:40]}")
    if comm is not None and not all(hasattr(comm, a) for a in ("world_size", "rank", "device")):
        raise TypeError(f"comm: expected None or a communicator (fi_ffi.comm.Communicator), got {type(comm).__name__}")
