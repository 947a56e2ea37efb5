"""Gemma 2 (``model_type`` ``gemma2``) on the Llama engine's serving loop, without torch (needs CuPy and the
model-family kernel wheel: its head_dim 256 sliding-window + soft-cap decode and prefill modules).

::

    from fi_engine.models.gemma2 import Gemma2Engine

    with Gemma2Engine("/path/to/gemma-2-2b", max_batch=8, cuda_graph=True) as engine:
        result = engine.generate([[2, 651, 6037]], max_new_tokens=32)

What differs from Llama (transformers' ``Gemma2ForCausalLM``):

- the embedding rows are multiplied by ``sqrt(hidden_size)`` rounded to the weights' dtype (as transformers does);
- four RMSNorms per layer, all Gemma's ``x / RMS(x) * (1 + w)``: input, post-attention (on the attention output,
  before the residual add), pre-feed-forward and post-feed-forward (on the MLP output, before the residual add);
- attention: ``sm_scale = query_pre_attn_scalar ** -0.5``, logits soft-capped (``cap * tanh(s / cap)``,
  ``attn_logit_softcapping``), even layers within a sliding window (``sliding_window`` tokens), odd layers over the
  whole context (``layer_types`` when the config lists them). The wheel has only the sliding-window + soft-cap
  modules for head_dim 256, so a global layer runs them with a window wider than any request (``max_seq_len``):
  the same mask as no window. Prefill uses FA2 (the wheel has no FA3 head_dim 256 module);
- the MLP is GeGLU: ``gelu_tanh(gate) * up``;
- the final logits are soft-capped (``final_logit_softcapping``) in float32 before sampling;
- the LM head is tied to the embedding unless the config says otherwise (Gemma2Config's default).

Tensor parallelism (``tensor_parallel=N``, :mod:`fi_engine.layers.tensor_parallel`): heads, KV cache and GeGLU
columns split as Llama's, the embedding and LM head by vocabulary rows. The post-attention and post-feed-forward
norms apply to the *summed* output of the row-parallel O and down projections, before the residual add, so the
fused all-reduce + residual + RMSNorm (which adds first) does not fit: each partial sum is all-reduced on its own
(the fused workspace's plain ``kAllReduce``, or NCCL), then the two Gemma norms run as on one GPU. The scaled
embedding: each rank scales the rows it has (zeros for the others; the sum is exact). The final soft cap is
elementwise, so it runs on each rank's logits columns before the argmax (which it does not change) or the gather
for sampling. Float16 or bfloat16 checkpoints (the kernel wheel's modules are bfloat16).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..checkpoint.config import LlamaConfig
from ..checkpoint.family_configs import check_dict, flag, layer_windows, number, positive_int, refuse_quantized
from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels
from ..kernels.copies import D2D
from ..runtime.engine import Engine
from ..runtime.family import ModelFamily
from ..values import show
from .registry import SettingsFamily
from .weights import WeightLoader
from .windows import WindowPlans

__all__ = ["Gemma2", "Gemma2Engine", "Gemma2Settings", "gemma2_config", "gemma2_settings"]


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Gemma2Settings:
    """Gemma 2: ``sm_scale = query_pre_attn_scalar ** -0.5``; soft caps (0: off) of the attention logits and of the
    final logits (``cap * tanh(x / cap)``); ``windows[i]`` is layer ``i``'s ``window_left`` (-1: whole context)."""

    query_pre_attn_scalar: float
    attn_logit_softcapping: float
    final_logit_softcapping: float
    sliding_window: int
    windows: tuple[int, ...]


def gemma2_config(d: Any, source: str = "config") -> LlamaConfig:
    """A ``gemma2`` config dict (``source`` names it in errors): the fields shared with Llama
    (:meth:`~fi_engine.checkpoint.config.LlamaConfig.shared`, with ``Gemma2Config``'s defaults for those left out)
    and :class:`Gemma2Settings` in ``family``. Refused by name (ValueError): a ``quantization_config``, an
    activation other than GELU-tanh, attention biases, bad windows, scales or soft caps."""
    check_dict(d, source)
    if d.get("model_type") != "gemma2":  # another family's config (fi_engine.models.registry.read_config picks it)
        raise ValueError(
            f"{source}: model_type {show(d.get('model_type'))} is not gemma2; read it with its family's reader"
        )
    refuse_quantized(d, source)
    d = {"head_dim": 256, "tie_word_embeddings": True, "max_position_embeddings": 8192, **d}  # left out when equal
    cfg = LlamaConfig.shared(d, source)
    return dataclasses.replace(cfg, family=gemma2_settings(d, cfg.num_layers, source))


def gemma2_settings(d: dict[str, Any], num_layers: int, source: str) -> Gemma2Settings:
    """Gemma 2's settings (defaults: ``Gemma2Config``'s)."""
    check_dict(d, source)
    refuse_quantized(d, source)
    act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{source}: hidden_activation {show(act)} is not supported (Gemma 2 uses 'gelu_pytorch_tanh')")
    if flag(d, "attention_bias", source, False):
        raise ValueError(f"{source}: attention_bias=true is not supported (Gemma 2 projections have no bias)")
    window = positive_int(d, "sliding_window", source, 4096)
    return Gemma2Settings(
        query_pre_attn_scalar=number(d, "query_pre_attn_scalar", source, 256),
        attn_logit_softcapping=number(d, "attn_logit_softcapping", source, 50.0, allow_zero=True),
        final_logit_softcapping=number(d, "final_logit_softcapping", source, 30.0, allow_zero=True),
        sliding_window=window,
        windows=layer_windows(d, num_layers, window, source),
    )


def round_to(value: float, dtype: str) -> float:
    """``value`` rounded to float16 or bfloat16 (round to nearest even), as a Python float."""
    if dtype == "float16":
        return float(np.float16(value))
    bits = int(np.array(value, np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, np.uint32).view(np.float32))


class Gemma2(SettingsFamily, ModelFamily):
    """The Gemma 2 family's definition (module docstring): its config check, weights (four norms per layer, the
    scaled embedding's kernel), layer body, and a sliding-window + soft-cap plan per distinct window."""

    fp8_kv_refusal = "Gemma 2's attention (logits soft caps and sliding windows at head_dim 256)"

    model_type, settings, engine = "gemma2", Gemma2Settings, "Gemma2Engine"

    def parse_config(self, d: Any, source: str) -> LlamaConfig:
        return gemma2_config(d, source)

    # ------------------------------------------------------------------------------------------ loading

    def load(self, eng: Any, ckpt: Checkpoint) -> None:
        from ..layers.tensor_parallel import columns, rows

        c = eng.model_config  # the checkpoint's shapes; this rank keeps its shard (rank r of n)
        r, n, vs = eng.rank, eng.tensor_parallel, eng.vocab_shard
        g: Gemma2Settings = c.family
        hq, hk, d, h, inter = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
        dtype = ckpt.info("model.embed_tokens.weight").dtype
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"model: weights are {dtype}; this engine serves float16 or bfloat16 checkpoints")
        w = WeightLoader.for_engine(eng, ckpt, dtype)  # every upload kept alive by eng.device_arrays
        eng.moe_layers = []

        w.embedding_and_head(eng, c)
        # the embedding's token ids [start, start + valid) (the whole vocabulary on one GPU)
        first, count = (0, c.vocab_size) if vs is None else (vs.start, vs.valid)
        self.embed_ids = (np.int64(first), np.int64(count))
        eng.wqkv, eng.wo, eng.wgu, eng.wd = [], [], [], []
        eng.ln1, self.post_attn, self.pre_ff, self.post_ff = [], [], [], []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv = [w.get(a + "q_proj.weight", (hq * d, h)), w.get(a + "k_proj.weight", (hk * d, h))]
            qkv.append(w.get(a + "v_proj.weight", (hk * d, h)))
            eng.wqkv.append(w.ptr(np.concatenate([rows(x, r, n) for x in qkv])))  # this rank's heads
            eng.wo.append(w.ptr(columns(w.get(a + "o_proj.weight", (h, hq * d)), r, n)))  # a partial sum
            gate_up = [w.get(p + "mlp.gate_proj.weight", (inter, h)), w.get(p + "mlp.up_proj.weight", (inter, h))]
            eng.wgu.append(w.ptr(np.concatenate([rows(x, r, n) for x in gate_up])))  # its GeGLU columns
            eng.wd.append(w.ptr(columns(w.get(p + "mlp.down_proj.weight", (h, inter)), r, n)))
            eng.ln1.append(w.vector(w.get(p + "input_layernorm.weight", (h,))))
            self.post_attn.append(w.vector(w.get(p + "post_attention_layernorm.weight", (h,))))
            self.pre_ff.append(w.vector(w.get(p + "pre_feedforward_layernorm.weight", (h,))))
            self.post_ff.append(w.vector(w.get(p + "post_feedforward_layernorm.weight", (h,))))
        eng.final_norm = w.vector(w.get("model.norm.weight", (h,)))
        eng.q_norm = []
        eng.k_norm = []
        self.embed_scale = np.float32(
            round_to(math.sqrt(h), dtype)
        )  # transformers: sqrt(hidden) as a tensor of the dtype
        self.bf16 = np.int32(dtype == "bfloat16")
        from ..kernels.cuda_sources import source

        module = eng.cupy.RawModule(code=source("gemma2.cu"))
        self.gather_scale = module.get_function("gather_scale16")
        self.soft_cap = module.get_function("soft_cap")
        self.sm_scale = g.query_pre_attn_scalar**-0.5
        # window_left per layer: the sliding layers' window, or (global layers) one wider than any request
        self.windows = [eng.max_seq_len if x < 0 else x for x in g.windows]

    def allocate(self, eng: Any) -> None:
        eng.allocate_layers()
        rows = max(eng.max_prefill_tokens, eng.max_batch)
        storage = np.float16 if eng.dtype == "float16" else np.uint16
        self.y = eng.cupy.empty((rows, eng.config.hidden_size), storage)  # attention / MLP output before its norm
        self.row_views: dict[tuple[int, int], Any] = {}
        # Gemma's norms write their rows into x (the LM head's input too); the fused all-reduce's x2, where the base
        # engine made one, holds the plain all-reduce's sums instead (its output may not overlap its input)
        self.sum = getattr(eng.buffers, "x2", None)
        eng.normed = eng.buffers.x
        self.window_plans = WindowPlans(self.windows, eng.device)

    # ------------------------------------------------------------------------------------------ attention plans

    def plan_prefill(self, eng: Any, batch: int) -> None:
        g, ph = eng.config.family, eng.prefill_arrays
        arrays = (ph["qo_indptr"][: batch + 1], ph["kv_indptr"][: batch + 1], None, ph["kv_last_page_len"][:batch])
        self.prefill_plans = self.window_plans.plan(
            eng,
            False,
            kernels.batch_prefill_paged_plan,
            arrays,
            causal=True,
            logits_soft_cap=g.attn_logit_softcapping,
            sm_scale=self.sm_scale,
            backend="fa2",
        )

    def plan_decode(self, eng: Any, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        g = eng.config.family
        arrays = (eng.decode_arrays["kv_indptr"][: rows + 1], None, None)
        self.decode_plans = self.window_plans.plan(
            eng,
            True,
            kernels.batch_decode_plan,
            arrays,
            logits_soft_cap=g.attn_logit_softcapping,
            sm_scale=self.sm_scale,
            enable_cuda_graph=cuda_graph,
        )

    def prefill_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        kernels.prefill_run(
            self.prefill_plans[self.windows[i]], v.q, eng.k_cache[i], eng.v_cache[i], v.qo_indptr, v.kv_indptr,
            v.kv_indices, v.kv_last_page_len, v.attn, eng.stream_ptr,
        )  # fmt: skip

    def decode_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        kernels.decode_run(
            self.decode_plans[self.windows[i]], v.q, eng.k_cache[i], eng.v_cache[i], v.kv_indptr, v.kv_indices,
            v.kv_last_page_len, v.attn, eng.stream_ptr,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ forward

    def _rows_view(self, eng: Any, buf: Any, rows: int) -> Any:
        """A descriptor of the first ``rows`` rows of ``buf`` (``[*, hidden]``), made once per (buffer, rows)."""
        key = (int(buf.data.ptr), rows)
        t = self.row_views.get(key)
        if t is None:
            t = self.row_views[key] = kernels.descriptor(
                buf.data.ptr, (rows, eng.config.hidden_size), eng.dtype, eng.device, owner=buf
            )
        return t

    def _reduced(self, eng: Any, vy: Any, rows: int) -> Any:
        """The sum over the ranks of each rank's partial rows ``vy`` (one GPU: ``vy`` itself)."""
        if eng.allreduce is None:
            return vy
        out = None if self.sum is None else self._rows_view(eng, self.sum, rows)
        return eng.allreduce.sum(vy, out, eng.stream_ptr)

    def forward(self, eng: Any, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final norm for ``rows`` token rows; the normalized rows end in ``x`` (the LM head's
        input), the residual stream in ``h``."""
        c, b, dense, s = eng.config, eng.buffers, eng.dense, eng.stream_ptr
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, eng.gemm_type
        x, qkv, attn, gu, act, y = (a.data.ptr for a in (b.x, b.qkv, b.attn, b.gu, b.act, self.y))
        w, hqd, last = eng.qkv_width, c.num_qo_heads * c.head_dim, c.num_layers - 1
        vy = self._rows_view(eng, self.y, rows)
        start, valid = self.embed_ids
        if eng.vocab_shard is None:  # the whole table
            self.gather_scale((rows,), (256,), (eng.embed, v.token_ids, b.h.data.ptr, h, self.embed_scale, self.bf16,
                                                 start, valid))  # fmt: skip
        else:  # each rank's vocabulary rows, zeros for the others: their sum is the embedding (exactly)
            self.gather_scale((rows,), (256,), (eng.embed, v.token_ids, y, h, self.embed_scale, self.bf16, start,
                                                 valid))  # fmt: skip
            got = self._reduced(eng, vy, rows)
            eng.cupy.cuda.runtime.memcpyAsync(b.h.data.ptr, got.data_ptr, rows * h * b.h.itemsize, D2D, s)
        kernels.gemma_rmsnorm(v.h, eng.ln1[0], out=v.x, eps=eps, stream=s)
        for i in range(c.num_layers):
            dense.linear(rows, x, h, eng.wqkv[i], w, h, qkv, w, ab, ab)
            kernels.rope_inplace(v.q, v.k, v.positions, c.rope, s)
            eng.append_kv(v, i)
            attention(i, v)
            dense.linear(rows, attn, hqd, eng.wo[i], h, hqd, y, h, ab, ab)  # a partial sum with TP
            kernels.gemma_rmsnorm(
                self._reduced(eng, vy, rows), self.post_attn[i], out=v.x, eps=eps, stream=s
            )  # post-attn
            kernels.gemma_fused_add_rmsnorm(v.x, v.h, self.pre_ff[i], eps=eps, stream=s)  # h += x; x = pre-FF norm
            dense.linear(rows, x, h, eng.wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab)
            kernels.gelu_tanh_and_mul(v.gu, v.act, stream=s)
            dense.linear(rows, act, inter, eng.wd[i], h, inter, y, h, ab, ab)  # a partial sum with TP
            kernels.gemma_rmsnorm(
                self._reduced(eng, vy, rows), self.post_ff[i], out=v.x, eps=eps, stream=s
            )  # post-FF norm
            nxt = eng.ln1[i + 1] if i < last else eng.final_norm
            kernels.gemma_fused_add_rmsnorm(v.x, v.h, nxt, eps=eps, stream=s)

    def finish_logits(self, eng: Any, logits: int, rows: int, columns: int) -> None:
        cap = eng.config.family.final_logit_softcapping
        if cap > 0 and rows:
            n = rows * columns
            self.soft_cap((min(1024, -(-n // 256)),), (256,), (logits, n, np.float32(cap)))

    def close(self, eng: Any) -> None:
        self.window_plans.close()


class Gemma2Engine(Engine):
    """A Gemma 2 checkpoint (:class:`Gemma2`) on one GPU or ``tensor_parallel`` GPUs; arguments and serving API as
    :class:`~fi_engine.models.llama.LlamaEngine`."""

    definition = Gemma2
